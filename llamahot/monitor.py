"""A cheap live snapshot of each hot cache in shared memory, readable from another process by pid.

Each llamahot.Llama with hot_experts set writes one block named `llamahot_<pid>_<n>` after every
eval (a few KiB of memcpy). A monitor (the TUI) calls `read_snapshots(pid)`. Writes are guarded
by a sequence counter (odd while writing), so a reader retries instead of seeing a torn picture.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import weakref
import sys
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

import numpy as np

MAGIC = 0x504E5354_4F484C4C  # "LLHOTSNP" little-endian
VERSION = 2
PREFIX = "llamahot_"
SCALARS = ("time", "tokens", "hits", "misses", "decode_tokens", "decode_seconds", "prefill_tokens",
           "prefill_seconds", "bytes_moved", "rebalances", "max_rebalance_ms", "slots_loading", "slot_bytes")

_HEADER = np.dtype([("magic", "<u8"), ("version", "<i8"), ("seq", "<i8"), ("pid", "<i8"),
                    ("n_layers", "<i8"), ("n_expert", "<i8"), ("n_slots", "<i8"), ("created", "<f8"),
                    ("model", "S128")])
_instance_numbers = itertools.count()
_live_writers: "weakref.WeakSet[SnapshotWriter]" = weakref.WeakSet()


@atexit.register
def _close_live_writers() -> None:
    """Remove this process's blocks at exit even if a Llama was never closed."""
    for writer in list(_live_writers):
        writer.close()


def _dtype(n_layers: int, n_expert: int, n_slots: int) -> np.dtype:
    return np.dtype(_HEADER.descr + [
        ("scalars", "<f8", (len(SCALARS),)),
        ("hits_per_layer", "<i8", (n_layers,)),
        ("misses_per_layer", "<i8", (n_layers,)),
        ("expert_of_slot", "<i4", (n_layers, n_slots)),
        ("routing_counts", "<i8", (n_layers, n_expert)),   # cumulative; a monitor diffs two pictures
    ])


class SnapshotWriter:
    """The writing side, owned by a HotCache; the block is unlinked on close()."""

    def __init__(self, shm: shared_memory.SharedMemory, record: np.ndarray, tracked: bool = True):
        self._shm = shm
        self._record = record
        self._tracked = tracked
        _live_writers.add(self)

    @classmethod
    def create(cls, pid: int, n_layers: int, n_expert: int, n_slots: int, model: str) -> "SnapshotWriter":
        dtype = _dtype(n_layers, n_expert, n_slots)
        while True:
            name = f"{PREFIX}{pid}_{next(_instance_numbers)}"
            try:
                shm, tracked = _create(name, dtype.itemsize)
                break
            except FileExistsError:  # left by a crashed process that had our pid
                continue
        record = np.ndarray((), dtype=dtype, buffer=shm.buf)
        record[()] = np.zeros((), dtype=dtype)
        record["version"], record["pid"] = VERSION, pid
        record["n_layers"], record["n_expert"], record["n_slots"] = n_layers, n_expert, n_slots
        record["created"], record["model"] = time.time(), model.encode()[:128]
        record["magic"] = MAGIC  # last: a reader ignores a block until it is complete
        return cls(shm, record, tracked)

    @property
    def name(self) -> str:
        return self._shm.name

    def write(self, *, hits_per_layer: np.ndarray, misses_per_layer: np.ndarray,
              expert_of_slot: np.ndarray, routing_counts: np.ndarray | None = None, **scalars: float) -> None:
        r = self._record
        r["seq"] += 1  # odd: being written
        r["scalars"] = [scalars.get(key, 0.0) for key in SCALARS]
        r["hits_per_layer"] = hits_per_layer
        r["misses_per_layer"] = misses_per_layer
        r["expert_of_slot"] = expert_of_slot
        if routing_counts is not None:
            r["routing_counts"] = routing_counts
        r["seq"] += 1

    def close(self) -> None:
        if self._shm is None:
            return
        self._record = None
        self._shm.close()
        try:
            if self._tracked:
                self._shm.unlink()
            else:  # unlink() would ask the resource tracker, which cannot run here
                with _untracked():
                    self._shm.unlink()
        except FileNotFoundError:
            pass
        self._shm = None
        _live_writers.discard(self)


def _listed_blocks() -> Optional[list[tuple[int, int, str]]]:
    """(pid, instance, name) of every snapshot block in /dev/shm; None where there is no listing."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return None
    blocks = []
    for name in names:
        parts = name[len(PREFIX):].split("_") if name.startswith(PREFIX) else []
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            blocks.append((int(parts[0]), int(parts[1]), name))
    return blocks


def snapshot_names(pid: int) -> list[str]:
    """Names of the snapshot blocks of process `pid`, oldest first."""
    blocks = _listed_blocks()
    if blocks is None:  # no /dev/shm listing (macOS): probe the first numbers
        return [f"{PREFIX}{pid}_{i}" for i in range(32)]
    return [name for _, _, name in sorted(b for b in blocks if b[0] == pid)]


def running_caches() -> list[tuple[int, str]]:
    """(pid, block name) of every llamahot cache of a live process on this machine."""
    alive = [(pid, name) for pid, _, name in _listed_blocks() or [] if _alive(pid)]
    return sorted(alive, key=lambda block: block[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_snapshot(name: str, retries: int = 100) -> Optional[dict]:
    """One consistent picture of a snapshot block, or None if it is gone or not complete."""
    try:
        shm = _attach(name)
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return _read_consistent(name, shm.buf, retries)
    finally:
        shm.close()


def _read_consistent(name: str, buf: memoryview, retries: int) -> Optional[dict]:
    if len(buf) < _HEADER.itemsize:
        return None
    header = np.ndarray((), dtype=_HEADER, buffer=buf).copy()
    if int(header["magic"]) != MAGIC or int(header["version"]) != VERSION:
        return None
    dtype = _dtype(int(header["n_layers"]), int(header["n_expert"]), int(header["n_slots"]))
    seq = np.ndarray((), dtype="<i8", buffer=buf, offset=_HEADER.fields["seq"][1])
    for _ in range(retries):
        before = int(seq)
        if before % 2 == 0:
            copy = np.frombuffer(bytes(buf[: dtype.itemsize]), dtype=dtype)[0]
            if int(seq) == before:
                return _as_dict(name, copy)
        time.sleep(0.0001)
    return None


def read_snapshots(pid: int) -> list[dict]:
    """Every live hot cache of process `pid`, oldest first."""
    found = (read_snapshot(name) for name in snapshot_names(pid))
    return [s for s in found if s is not None]


def _as_dict(name: str, r: np.ndarray) -> dict:
    out = {key: float(v) for key, v in zip(SCALARS, r["scalars"])}
    for key in ("tokens", "hits", "misses", "decode_tokens", "prefill_tokens", "bytes_moved", "rebalances",
                "slots_loading", "slot_bytes"):
        out[key] = int(out[key])
    total = out["hits"] + out["misses"]
    out.update(
        name=name, pid=int(r["pid"]), model=r["model"].decode(errors="replace"), created=float(r["created"]),
        n_moe_layers=int(r["n_layers"]), n_expert=int(r["n_expert"]), hot_experts=int(r["n_slots"]),
        hit_rate=out["hits"] / total if total else 0.0,
        decode_tok_s=out["decode_tokens"] / out["decode_seconds"] if out["decode_seconds"] > 0 else 0.0,
        hits_per_layer=r["hits_per_layer"].copy(), misses_per_layer=r["misses_per_layer"].copy(),
        expert_of_slot=r["expert_of_slot"].copy(), routing_counts=r["routing_counts"].copy(),
    )
    out["slots_occupied"] = int((out["expert_of_slot"] >= 0).sum())
    return out


@contextlib.contextmanager
def _untracked():
    """Python < 3.13 registers every SharedMemory with multiprocessing's resource tracker, a helper
    process that unlinks the block when *this* process exits (bpo-39959) and that cannot even start
    when stderr has no file descriptor (inside a Textual app). Skip it for the blocks made here."""
    register, unregister = resource_tracker.register, resource_tracker.unregister
    resource_tracker.register = resource_tracker.unregister = lambda *args: None
    try:
        yield
    finally:
        resource_tracker.register, resource_tracker.unregister = register, unregister


def _create(name: str, size: int) -> tuple[shared_memory.SharedMemory, bool]:
    """Create a block, registered with the resource tracker (it unlinks the block if this process
    dies without running atexit) when the tracker can run; untracked otherwise."""
    try:
        resource_tracker.ensure_running()
    except (ValueError, OSError):
        if sys.version_info >= (3, 13):
            return shared_memory.SharedMemory(name=name, create=True, size=size, track=False), False
        with _untracked():
            return shared_memory.SharedMemory(name=name, create=True, size=size), False
    return shared_memory.SharedMemory(name=name, create=True, size=size), True


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to a writer's block without tracking it (the reader must never unlink it)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    with _untracked():
        return shared_memory.SharedMemory(name=name)
