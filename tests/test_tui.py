"""The live monitor (Textual pilot tests): a fake snapshot producer, and a real llamahot cache."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("textual")

from llamahot.tui.app import HotCacheMonitor, LayerHitRates, SlotHeatmap, StatsPanel


def fake_snapshot(step: int, n_layers=3, n_expert=8, k=4) -> dict:
    routing = np.zeros((n_layers, n_expert), dtype=np.int64)
    routing[:, :2] = 10 * step          # experts 0 and 1 are hot
    routing[:, 2] = step
    hits = np.full(n_layers, 6 * step)
    misses = np.full(n_layers, 2 * step)
    slots = np.tile(np.array([0, 1, 2, -1], dtype=np.int32), (n_layers, 1))[:, :k]
    return dict(name="llamahot_1_0", pid=1, model="fake.gguf", time=float(step), tokens=10 * step,
                hits=int(hits.sum()), misses=int(misses.sum()), hit_rate=0.75, decode_tokens=10 * step,
                decode_seconds=0.1 * step, decode_tok_s=100.0, prefill_tokens=0, prefill_seconds=0.0,
                bytes_moved=2**30 * step, rebalances=step, max_rebalance_ms=1.5, slots_loading=0,
                slot_bytes=2**29, n_moe_layers=n_layers, n_expert=n_expert, hot_experts=k,
                hits_per_layer=hits, misses_per_layer=misses, expert_of_slot=slots, routing_counts=routing,
                slots_occupied=int((slots >= 0).sum()))


class FakeSource:
    def __init__(self, stop_after: int = 1000):
        self.step = 0
        self.stop_after = stop_after

    def read(self):
        self.step += 1
        return fake_snapshot(self.step) if self.step <= self.stop_after else None


def text_of(widget) -> str:
    return str(widget.render())


def test_monitor_shows_live_numbers_and_keys():
    async def scenario():
        app = HotCacheMonitor(FakeSource(), refresh_s=0.05)
        async with app.run_test() as pilot:
            await pilot.pause(0.3)
            stats = text_of(app.query_one(StatsPanel))
            assert "fake.gguf" in stats and "75.0%" in stats and "100.0" in stats and "live" in stats
            heat = app.query_one(SlotHeatmap).render()
            assert "·" in str(heat)  # the empty slot
            # Hot experts (0, 1) and a cold one (2) get different colours.
            colours = {span.style for span in heat.spans if str(heat)[span.start:span.end] == "█"}
            assert len(colours) >= 2
            await pilot.press("v")
            assert app.query_one("#views").current == "layers"
            assert "75.0%" in text_of(app.query_one(LayerHitRates))
            await pilot.press("p")
            frozen = app.source.step
            await pilot.pause(0.3)
            assert app.source.step == frozen, "paused: no new pictures"
            await pilot.press("p")
            await pilot.pause(0.2)
            assert app.source.step > frozen
            await pilot.press("q")
    asyncio.run(scenario())


def test_monitor_keeps_the_last_picture_when_the_process_ends():
    async def scenario():
        app = HotCacheMonitor(FakeSource(stop_after=3), refresh_s=0.05)
        async with app.run_test() as pilot:
            await pilot.pause(0.5)
            stats = text_of(app.query_one(StatsPanel))
            assert "process ended" in stats and "fake.gguf" in stats
    asyncio.run(scenario())


def test_monitor_says_how_to_start_one_when_nothing_runs():
    async def scenario():
        app = HotCacheMonitor(discover=lambda: [], refresh_s=0.05)
        async with app.run_test() as pilot:
            await pilot.pause(0.2)
            assert "llamahot-tui --demo" in text_of(app.query_one("#message"))
    asyncio.run(scenario())


def test_a_refresh_tick_while_the_app_closes_is_harmless():
    """CI once saw the refresh timer fire after the screen's widgets were gone (NoMatches)."""
    async def scenario():
        app = HotCacheMonitor(discover=lambda: [], refresh_s=60)
        async with app.run_test() as pilot:
            await pilot.pause(0.05)
            await app.query_one("#picker").remove()
            app._on_timer()
    asyncio.run(scenario())


def test_monitor_lets_you_pick_among_several():
    async def scenario():
        app = HotCacheMonitor(discover=lambda: [(1, "llamahot_1_0"), (2, "llamahot_2_0")], refresh_s=0.05)
        async with app.run_test() as pilot:
            await pilot.pause(0.1)
            assert app.query_one("#picker").display
            await pilot.press("down", "enter")
            assert app.source.name == "llamahot_2_0"
    asyncio.run(scenario())


DECODER = """
import sys, time, llamahot
llm = llamahot.Llama(sys.argv[1], hot_experts=4, rebalance_interval=8, n_ctx=512, n_threads=2, verbose=False,
                     slot_device="host")
llm.eval(llm.tokenize(b"def f(x):\\n"))
print("ready", flush=True)
end = time.time() + float(sys.argv[2])
token = 20
while time.time() < end:
    llm.eval([token]); token = 20 + (token + 7) % 200
    if llm.n_tokens > 400: llm.reset(); llm.eval(llm.tokenize(b"def f(x):\\n"))
llm.close()
"""


def test_monitor_watches_a_real_llamahot_process(text_model):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", DECODER, text_model, "3"], cwd="/", stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"

    async def scenario():
        app = HotCacheMonitor(pid=proc.pid, refresh_s=0.05)
        async with app.run_test() as pilot:
            await pilot.pause(0.6)
            stats = text_of(app.query_one(StatsPanel))
            assert "qwen3moe-tiny.gguf" in stats and f"pid {proc.pid}" in stats and "live" in stats
            assert "/16 filled" in stats
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            await pilot.pause(0.3)
            assert "process ended" in text_of(app.query_one(StatsPanel))
    asyncio.run(scenario())


@pytest.mark.skipif(__import__("shutil").which("tmux") is None, reason="needs tmux")
def test_tui_demo_in_a_real_terminal(tmp_path):
    """`llamahot-tui --demo` in tmux: the screen shows live numbers and the slot map; q quits."""
    import shutil
    import subprocess
    import sys
    import time

    exe = shutil.which("llamahot-tui") or f"{sys.executable} -m llamahot.tui.app"
    socket = f"llamahot-test-{tmp_path.name}"
    tmux = ["tmux", "-L", socket]
    subprocess.run(tmux + ["new-session", "-d", "-s", "tui", "-x", "140", "-y", "30", f"{exe} --demo; sleep 5"],
                   check=True, cwd="/")
    try:
        screen = ""
        for _ in range(60):  # the demo synthesizes and loads its model first
            time.sleep(1)
            screen = subprocess.run(tmux + ["capture-pane", "-t", "tui", "-p"], capture_output=True,
                                    text=True).stdout
            if "live" in screen and "hit rate" in screen and "tok/s now" in screen:
                break
        assert "live" in screen and "hit rate" in screen, screen
        assert "slots, coloured by current routing" in screen and "Quit" in screen
        subprocess.run(tmux + ["send-keys", "-t", "tui", "q"], check=True)
        time.sleep(2)
        screen = subprocess.run(tmux + ["capture-pane", "-t", "tui", "-p"], capture_output=True, text=True).stdout
        assert "Pause/resume" not in screen, "q quits the monitor"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
