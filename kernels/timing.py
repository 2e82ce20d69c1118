"""The one timer of ``dynconv bench``, ``dynconv autotune`` and the run-time tuning of the config
lookup (kernels/configs.py), so their figures are comparable: CUDA events around each call, L2
overwritten before each, warm-up first, median with the 20th and 80th percentiles.

It lives beside the kernels because the runtime tunes with it and the runtime imports no tool;
the tools import it from here. Imports nothing of dynconv.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def quantiles(times_ms: Iterable[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile), linearly interpolated between the order statistics
    (numpy.percentile's default; numpy is no runtime dependency)."""
    t = sorted(float(v) for v in times_ms)
    if not t:
        raise ValueError("no timings")

    def at(q: float) -> float:
        pos = q * (len(t) - 1)
        low = int(pos)
        high = min(low + 1, len(t) - 1)
        return t[low] + (t[high] - t[low]) * (pos - low)

    return at(0.5), at(0.2), at(0.8)


class Timer:
    """Times ``fn(i)`` (i: the call's index, for rotating inputs) with ``reset(i)`` run before
    each call outside the timed region. CUDA events on a GPU; the host clock on CPU (the CPU
    path exists to test the benchmark's plumbing, not to measure anything)."""

    def __init__(self, device: str, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10,
                 max_reps: int = 1000):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self._flush = None
        if device == "cuda":
            import torch
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or (64 << 20)
            # Overwritten before every timed call so the call starts with nothing of its own in L2.
            self._flush = torch.empty(max(2 * l2, 256 << 20), dtype=torch.int8, device="cuda")

    def _sync(self):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[int], object], reset: Callable[[int], None] = lambda i: None):
        # Warm-up: at least two calls (the first compiles and autotunes), then until warmup_ms.
        calls, start = 0, time.perf_counter()
        while True:
            reset(calls)
            fn(calls)
            calls += 1
            self._sync()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if calls >= 2 and elapsed_ms >= self.warmup_ms:
                break
        estimate = elapsed_ms / calls
        min_reps = self.min_reps if estimate < 100 else min(3, self.min_reps)
        reps = int(min(self.max_reps, max(min_reps, self.rep_ms / max(estimate, 1e-3))))
        if self.device != "cuda":
            times = []
            for i in range(reps):
                reset(i)
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e3)
            return quantiles(times)
        import torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            reset(i)
            self._flush.zero_()
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize()
        return quantiles(s.elapsed_time(e) for s, e in zip(starts, ends))
