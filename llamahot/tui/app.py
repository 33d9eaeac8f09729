"""The live monitor: attaches to a running llamahot process through its shared-memory snapshot.

    llamahot-tui              pick among running llamahot processes (or attach to the only one)
    llamahot-tui --pid PID    watch that process
    llamahot-tui --demo       run the embedded default model here, generating text, and watch it
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from collections import deque
from typing import Callable, Optional

import numpy as np
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.widgets import ContentSwitcher, Footer, Header, OptionList, Sparkline, Static

from llamahot.monitor import running_caches
from llamahot.tui.source import Rates, SnapshotSource, rates

REFRESH_S = 0.25
HEAT = ["#30343f", "#3b4cc0", "#6788ee", "#9abbff", "#c9d7f0", "#edd1c2", "#f7a889", "#e26952", "#b40426"]


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def heat_colour(value: float, top: float) -> str:
    if top <= 0 or value <= 0:
        return HEAT[0]
    return HEAT[1 + min(len(HEAT) - 2, int((len(HEAT) - 1) * value / top))]


class StatsPanel(Static):
    """The headline numbers."""

    def show(self, snap: dict, live: Rates, ended: bool) -> None:
        state = "[b red]process ended — last picture kept[/]" if ended else "[green]live[/]"
        self.update(
            f"[b]{snap['model']}[/]  pid {snap['pid']}  {state}\n"
            f"hit rate [b]{live.hit_rate:6.1%}[/] now, {snap['hit_rate']:6.1%} overall   "
            f"decode [b]{live.decode_tok_s:7.1f}[/] tok/s now, {snap['decode_tok_s']:7.1f} overall\n"
            f"slots {snap['slots_occupied']}/{snap['n_moe_layers'] * snap['hot_experts']} filled "
            f"({snap['hot_experts']} per layer, {snap['slots_loading']} loading), "
            f"{size(snap['slot_bytes'])}   "
            f"moved {size(snap['bytes_moved'])} in {snap['rebalances']} rebalances "
            f"(longest {snap['max_rebalance_ms']:.1f} ms)   tokens {snap['tokens']}"
        )


class SlotHeatmap(Static):
    """Layers × slots: each resident expert coloured by how often it is routed to right now."""

    def show(self, snap: dict, live: Rates) -> None:
        slots = snap["expert_of_slot"]
        hot = live.hotness if live.hotness is not None else np.zeros(snap["routing_counts"].shape)
        top = float(hot.max()) if hot.size else 0.0
        text = Text()
        text.append("slots, coloured by current routing (blue: cold … red: hot; · empty)\n", style="dim")
        for layer in range(slots.shape[0]):
            text.append(f"{layer:3d} ", style="dim")
            for expert in slots[layer]:
                if expert < 0:
                    text.append("·", style="#555555")
                else:
                    text.append("█", style=heat_colour(float(hot[layer, expert]), top))
            text.append("\n")
        self.update(text)


class LayerHitRates(Static):
    """Hit rate per layer, as bars."""

    def show(self, snap: dict, live: Rates) -> None:
        text = Text()
        text.append("hit rate per MoE layer (since the last picture)\n", style="dim")
        width = 40
        for layer, rate in enumerate(live.layer_hit_rate if live.layer_hit_rate is not None else []):
            bar = int(round(width * rate))
            text.append(f"{layer:3d} ", style="dim")
            text.append("█" * bar, style="green")
            text.append("░" * (width - bar), style="#444444")
            text.append(f" {rate:6.1%}\n")
        self.update(text)


class HotCacheMonitor(App):
    """Live hit rate, slot occupancy and tok/s of one llamahot cache."""

    TITLE = "llamahot"
    CSS = """
    StatsPanel { height: 4; padding: 0 1; }
    #speed { height: 4; padding: 0 1; }
    #speed Sparkline { width: 1fr; }
    #speed-label { width: 22; }
    #views { height: 1fr; }
    OptionList { height: auto; max-height: 12; }
    #message { padding: 1 2; }
    """
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("v", "switch_view", "Heat map/layers"),
        Binding("q", "quit", "Quit"),
    ]
    paused = reactive(False)

    def __init__(self, source: Optional[SnapshotSource] = None, *, pid: Optional[int] = None,
                 discover: Callable[[], list[tuple[int, str]]] = running_caches, refresh_s: float = REFRESH_S):
        super().__init__()
        self.source = source
        self.pid = pid
        self.discover = discover
        self.refresh_s = refresh_s
        self.snapshot: Optional[dict] = None
        self.previous: Optional[dict] = None
        self.live = Rates()
        self.ended = False
        self.speed_history: deque[float] = deque([0.0], maxlen=120)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="message")
        yield OptionList(id="picker")
        yield StatsPanel(id="stats")
        with Horizontal(id="speed"):
            yield Static("decode tok/s\n(last 30 s)", id="speed-label")
            yield Sparkline(list(self.speed_history), summary_function=max, id="sparkline")
        with ContentSwitcher(initial="heatmap", id="views"):
            with VerticalScroll(id="heatmap"):
                yield SlotHeatmap(id="heatmap-body")
            with VerticalScroll(id="layers"):
                yield LayerHitRates(id="layers-body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#picker").display = False
        self._show_monitor(False)
        if self.source is None:
            self._choose_source()
        self.set_interval(self.refresh_s, self._on_timer)
        self.refresh_picture()

    # -- attaching ------------------------------------------------------------------------
    def _choose_source(self) -> None:
        caches = [(pid, name) for pid, name in self.discover() if self.pid is None or pid == self.pid]
        message = self.query_one("#message", Static)
        picker = self.query_one("#picker", OptionList)
        if len(caches) == 1:
            self.source = SnapshotSource(caches[0][1])
            message.display = False
        elif caches:
            message.update("Several llamahot caches are running: pick one (arrows, Enter).")
            picker.clear_options()
            picker.add_options([f"pid {pid}  ({name})" for pid, name in caches])
            picker.display = True
            picker.highlighted = 0
            picker.focus()
            self._choices = caches
        else:
            who = f"process {self.pid}" if self.pid is not None else "any process"
            message.update(
                f"No llamahot cache found in {who}. Start one, e.g. `llamahot demo` or "
                "`python examples/chat.py MODEL --hot-experts 8` (a llamahot.Llama with hot_experts set), "
                "or run `llamahot-tui --demo`. Waiting…")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.source = SnapshotSource(self._choices[event.option_index][1])
        event.option_list.display = False
        self.query_one("#message").display = False
        self.refresh_picture()

    def _show_monitor(self, visible: bool) -> None:
        for selector in ("#stats", "#speed", "#views"):
            self.query_one(selector).display = visible

    # -- updating ------------------------------------------------------------------------
    def _on_timer(self) -> None:
        try:
            self.refresh_picture()
        except NoMatches:
            pass  # a tick that lands while the app is closing: its widgets are already gone

    def refresh_picture(self) -> None:
        if self.paused:
            return
        if self.source is None:
            if not self.query_one("#picker").display:
                self._choose_source()
            return
        snap = self.source.read()
        if snap is None:
            if self.snapshot is not None and not self.ended:
                self.ended = True
                self._render_picture()
            return
        self.ended = False
        self.live = rates(self.previous, snap, self.live.hotness)
        self.previous, self.snapshot = snap, snap
        self.speed_history.append(self.live.decode_tok_s)
        self._render_picture()

    def _render_picture(self) -> None:
        snap = self.snapshot
        self._show_monitor(True)
        self.query_one("#message").display = False
        self.sub_title = f"pid {snap['pid']} — {snap['model']}"
        self.query_one(StatsPanel).show(snap, self.live, self.ended)
        self.query_one("#sparkline", Sparkline).data = list(self.speed_history)
        self.query_one(SlotHeatmap).show(snap, self.live)
        self.query_one(LayerHitRates).show(snap, self.live)

    # -- keys ------------------------------------------------------------------------------
    def action_pause(self) -> None:
        self.paused = not self.paused
        self.sub_title = ("paused — " if self.paused else "") + (self.sub_title or "").removeprefix("paused — ")

    def action_switch_view(self) -> None:
        switcher = self.query_one(ContentSwitcher)
        switcher.current = "layers" if switcher.current == "heatmap" else "heatmap"


def run_demo_model(stop: threading.Event) -> None:
    """Generate text with the embedded default model until `stop` is set (for --demo)."""
    import llama_cpp

    from llamahot import Llama
    from llamahot.__main__ import default_model_path

    device = "cuda" if llama_cpp.llama_supports_gpu_offload() else "host"  # no warning under the TUI
    llm = Llama(str(default_model_path()), hot_experts=8, slot_device=device, rebalance_interval=32,
                n_ctx=1024, verbose=False)
    prompts = ["def fibonacci(n):", "class Stack:", "import os\n", "def read_lines(path):"]
    i = 0
    while not stop.is_set():
        for _ in llm.create_completion(prompts[i % len(prompts)], max_tokens=200, temperature=0.8, stream=True):
            if stop.is_set():
                break
        i += 1
    llm.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llamahot-tui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, help="watch this process")
    parser.add_argument("--demo", action="store_true", help="run the embedded default model here and watch it")
    args = parser.parse_args(argv)
    stop = threading.Event()
    if args.demo:
        threading.Thread(target=run_demo_model, args=(stop,), daemon=True).start()
        args.pid = os.getpid()
    try:
        HotCacheMonitor(pid=args.pid).run()
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
