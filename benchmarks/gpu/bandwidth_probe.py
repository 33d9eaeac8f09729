"""Host memory bandwidth on the GPU machine: CPU threads reading host memory (what a cold expert on the
CPU costs), DMA copies host -> device from pinned memory (what a slot load costs), and both at once.
If the two share the machine's memory bandwidth, a slot load costs the decode what a cold row does,
and a policy should minimise misses + loads (the cost model of benchmarks/policies.py).

    python benchmarks/gpu/bandwidth_probe.py [--gib 2] [--threads 16] [--seconds 2]

Needs torch with CUDA (the device has it; it is not a llamahot dependency). Prints GB/s.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def cpu_read_rate(src: torch.Tensor, seconds: float, stop: threading.Event | None = None) -> float:
    """GB/s of the CPU threads summing src (int64 sums: memory-bound) for about `seconds`."""
    words = src.view(torch.int64)
    passes, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and not (stop is not None and stop.is_set()):
        words.sum()
        passes += 1
    return passes * src.numel() / (time.perf_counter() - start) / 1e9


def dma_rate(dst: torch.Tensor, src: torch.Tensor, copies: int, stream: torch.cuda.Stream) -> tuple[float, float]:
    """Queue `copies` host->device copies on `stream`; returns (GB/s, seconds) once they landed."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        begin.record(stream)
        for _ in range(copies):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    seconds = begin.elapsed_time(end) / 1e3
    return copies * src.numel() / seconds / 1e9, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size (well above the L3 cache)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.gib * 2**30) // 8 * 8
    cpu_src = torch.ones(n, dtype=torch.uint8)          # ordinary host memory (touched: ones)
    pinned = torch.ones(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    dma_rate(dst, pinned, 1, stream)                    # warm up
    cpu_read_rate(cpu_src, 0.3)
    alone_cpu, alone_dma, both_cpu, both_dma = [], [], [], []
    for _ in range(args.reps):
        alone_cpu.append(cpu_read_rate(cpu_src, args.seconds))
        rate, seconds = dma_rate(dst, pinned, 8, stream)
        alone_dma.append(rate)
        # Both at once: the copies are queued (the GPU runs them), then the CPU reads until they landed.
        copies = max(1, round(args.seconds / (seconds / 8)))
        done = threading.Event()
        result: list[float] = []

        def copy_all() -> None:
            result.append(dma_rate(dst, pinned, copies, stream)[0])
            done.set()

        copier = threading.Thread(target=copy_all)
        copier.start()
        time.sleep(0.01)
        both_cpu.append(cpu_read_rate(cpu_src, 60.0, stop=done))
        copier.join()
        both_dma.append(result[0])
    med = statistics.median
    print(f"{args.threads} CPU threads, {args.gib:g} GiB buffers, {args.reps} repetitions (median GB/s):")
    print(f"  CPU reading alone: {med(alone_cpu):.1f}  ({' '.join(f'{x:.1f}' for x in alone_cpu)})")
    print(f"  DMA host->device alone: {med(alone_dma):.1f}  ({' '.join(f'{x:.1f}' for x in alone_dma)})")
    print(f"  both at once: CPU {med(both_cpu):.1f} + DMA {med(both_dma):.1f} = {med(both_cpu) + med(both_dma):.1f}"
          f"  (CPU {' '.join(f'{x:.1f}' for x in both_cpu)}; DMA {' '.join(f'{x:.1f}' for x in both_dma)})")
    print(f"  CPU keeps {med(both_cpu) / med(alone_cpu):.2f} of its rate, DMA {med(both_dma) / med(alone_dma):.2f}")


if __name__ == "__main__":
    main()
