"""Memory latency by pointer chase: the figure the static model's latency term assumes
(``bounds.MODEL["latency_cycles"]["global"]``), measured where a GPU is lent (``dynconv bench``
records it in ``ceilings.json``).

One warp follows a chain of pointers laid in a random order over a buffer, so that every load
waits for the one before and none shares a cache line with it: the time per step is the latency
of a load that misses to the buffer's level (HBM for a buffer far larger than L2, L2 for one that
fits). The same chase run while a copy keeps HBM busy on another stream gives the latency under
load, the figure a bandwidth-bound kernel's warps wait.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def chase_kernel(next_ptr, out_ptr, steps):
    position = tl.zeros((), dtype=tl.int64)
    for _ in range(steps):
        position = tl.load(next_ptr + position)
    tl.store(out_ptr, position)


def chain(slots: int, spacing: int, device, seed: int = 0) -> torch.Tensor:
    """int64 ``next`` pointers over ``slots`` entries ``spacing`` elements apart, visited in one
    random cycle (every slot once before the first repeats)."""
    generator = torch.Generator().manual_seed(seed)
    order = (torch.randperm(slots, generator=generator) * spacing).to(device)
    table = torch.zeros(slots * spacing, dtype=torch.int64, device=device)
    table[order] = order.roll(-1)
    return table


def chase(table: torch.Tensor, steps: int) -> torch.Tensor:
    """Follow ``steps`` pointers from entry 0 (one program of one warp); returns where it ended."""
    out = torch.empty(1, dtype=torch.int64, device=table.device)
    chase_kernel[(1,)](table, out, steps, num_warps=1)
    return out


def measure_latency(buffer_bytes: int = 1 << 30, l2_bytes: int = 8 << 20, steps: int = 20_000,
                    spacing_bytes: int = 4096) -> dict:
    """Nanoseconds per dependent load: from HBM, from L2, and from HBM while a copy saturates it.

    MEASURED on the GPU it runs on (the caller records which); each figure the median of five runs.
    """
    spacing = spacing_bytes // 8
    out = {}

    own = torch.cuda.Stream()  # apart from the copies' stream, and neither the legacy default one

    def per_step(table, load=None) -> float:
        times = []
        with torch.cuda.stream(own):
            chase(table, 100)  # compile, warm the TLB for the start
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if load is not None:
                load()
            with torch.cuda.stream(own):
                start.record()
                chase(table, steps)
                end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e6 / steps)
        return sorted(times)[2]

    hbm = chain(buffer_bytes // spacing_bytes, spacing, "cuda")
    out["hbm_latency_ns"] = per_step(hbm)
    l2 = chain(l2_bytes // 128, 128 // 8, "cuda")
    out["l2_latency_ns"] = per_step(l2)
    del l2
    # The copy runs on a side stream for longer than the chase takes (about steps x 1 us).
    src = torch.rand((2 << 30) // 4, device="cuda")
    dst = torch.empty_like(src)
    side = torch.cuda.Stream()

    def busy():
        with torch.cuda.stream(side):
            for _ in range(max(1, int(steps * 1e-6 / (2 * src.numel() * 4 / 3e12)) + 2)):
                dst.copy_(src)

    out["hbm_loaded_latency_ns"] = per_step(hbm, busy)
    torch.cuda.synchronize()
    del src, dst, hbm
    out["latency_method"] = (f"one warp chasing int64 pointers in a random cycle: {buffer_bytes >> 20} MiB at "
                             f"{spacing_bytes} B apart (hbm), {l2_bytes >> 20} MiB at 128 B apart (l2), the hbm chase "
                             f"beside 2 GiB device copies on another stream (loaded); {steps} steps, median of 5")
    return out
