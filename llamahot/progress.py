"""Rich progress bars for the long steps of the command-line tools: synthesis and model loading."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

_console = Console(stderr=True)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                    console=_console, transient=True)


def synth_with_progress(path: Path, preset: str, seed: int = 0) -> Path:
    """Write a synthetic model, with a bar over its tensors."""
    from llamahot.synth import PRESETS, estimate_file_size, synth_model

    with _bar() as bar:
        task = bar.add_task(f"synthesizing {preset} ({estimate_file_size(PRESETS[preset]) / 2**20:.0f} MiB)",
                            total=1.0)

        def report(_name: str, done: int, total: int) -> None:
            bar.update(task, completed=done / max(total, 1))

        return synth_model(path, preset, seed=seed, progress=report)


@contextlib.contextmanager
def loading(what: str) -> Iterator[Callable[[float], None]]:
    """A bar for llama.cpp's model load: pass the yielded function as Llama(load_progress=...)."""
    with _bar() as bar:
        task = bar.add_task(f"loading {what}", total=1.0)
        yield lambda fraction: bar.update(task, completed=fraction)
