"""`llamahot-tui`: a live monitor of running llamahot processes (Textual)."""
from llamahot.tui.app import HotCacheMonitor, main

__all__ = ["HotCacheMonitor", "main"]
