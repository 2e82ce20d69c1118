"""``dynconv inspect --bounds --measure FILE``: time on a GPU the very launches the static model
predicts, one JSON line per row, so each PREDICTED ``bound_us`` of ``perf_reports/static/`` meets a
MEASURED time of the same kernel, config, grid and shape.

The launches are the model's (``bounds_cases``, built on meta tensors by the launchers); each meta
tensor becomes a CUDA tensor of the same sizes, strides and storage offset, filled with random
numbers (index tensors: region maps all zeros, a valid region; region tables cannot be made up,
so those rows are reported as not measured). The kernels are compiled first, in parallel
processes, ahead of time: the JIT then finds them in triton's cache (``Launch.source`` keeps the
two on one cache entry), and the timing runs in one process, one kernel at a time, with the
timer of ``dynconv bench`` (L2 overwritten before each call, median with p20/p80).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

from .bounds_cases import Case, all_cases, selected_cases

# Integer tensors whose all-zero content is valid input (every pixel in region 0).
ZERO_INDEX_ARGUMENTS = {"region_ptr"}


def materialise(t, generator, device: str = "cuda"):
    """A tensor on ``device`` laid out as the meta tensor ``t`` (sizes, strides, offset), random inside."""
    import torch

    from .kernels._launch import _max_offset

    extent = t.storage_offset() + _max_offset(t) + 1  # elements the view reaches in its storage
    if t.dtype.is_floating_point:
        base = torch.randn(extent, generator=generator, device=device, dtype=torch.float32).to(t.dtype)
    else:
        base = torch.zeros(extent, device=device, dtype=t.dtype)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def real_launch(launch, generator, device: str = "cuda"):
    """``launch`` with every meta tensor replaced, or a reason it cannot be measured."""
    import torch

    args = {}
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor):
            if not value.dtype.is_floating_point and name not in ZERO_INDEX_ARGUMENTS:
                return None, f"{name}: an index table made up would not be one the op builds"
            value = materialise(value, generator, device)
        args[name] = value
    return replace(launch, args=args), ""


def real_launches(case: Case, generator, device: str = "cuda"):
    """(the case's launch, the launches the model counts before it, as the op runs them) on real
    memory, or (None, [], why one of them cannot be measured): a kernel timed without a launch it
    reads from (DRConv's column product, its region tables) would not be the row's time."""
    launch, reason = real_launch(case.build(), generator, device)
    copies = []
    for copy, _ in case.copies() if case.copies else ():
        real, why = real_launch(copy, generator, device)
        if real is None:
            return None, [], reason or f"{copy.name} before it: {why}"
        copies.append(real)
    return launch, copies, reason


def _compile(case_names: list[str]) -> int:
    names = set(case_names)
    for case in all_cases():
        if case.name in names:
            case.build().compile(90)
    return len(names)


def precompile(cases: list[Case], jobs: int) -> float:
    """Compile every case's launch for sm_90 in ``jobs`` processes (fills triton's cache); seconds."""
    start = time.perf_counter()
    names = [case.name for case in cases]
    if jobs <= 1:
        _compile(names)
    else:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            pool.map(_compile, [names[i::jobs] for i in range(jobs)])
    return time.perf_counter() - start


def measure(cases: list[Case], out: Path, environment: dict, timer=None, log=print) -> list[dict]:
    """Time each case's launch; one JSON line per case appended to ``out`` as it is measured."""
    import torch

    from .kernels import timing
    from .provenance import kernel_digest

    timer = timer or timing.Timer("cuda", 5.0, 30.0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for case in cases:
        row = {"case": case.case, "kernel": case.kernel, "dtype": case.dtype, "layout": case.layout,
               "status": "MEASURED", **environment}
        try:
            launch, copies, reason = real_launches(case, generator)
            if launch is None:
                row.update(status="not measured", reason=reason)
            else:
                median, p20, p80 = timer(lambda i: [c() for c in copies] + [launch()])
                row.update(copies=[c.name for c in copies])
                row.update(kernel_name=launch.name, kernel_digest=kernel_digest(launch.kernel),
                           grid=list(launch.grid), num_warps=launch.num_warps,
                           meta={k: str(v) for k, v in launch.meta.items()},
                           median_us=round(median * 1e3, 2), p20_us=round(p20 * 1e3, 2), p80_us=round(p80 * 1e3, 2))
            del launch, copies
        except Exception as exc:  # noqa: BLE001 - one kernel's failure is a row, not the end of the run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        torch.cuda.empty_cache()
        rows.append(row)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log(f"{case.name}: {row.get('median_us', row['status'])}")
    return rows


def run(out: Path, case_filter=(), kernel_filter: str = "", jobs: int = 0, log=print) -> int:
    from .provenance import environment

    cases = selected_cases(case_filter, kernel_filter)
    jobs = jobs or min(16, os.cpu_count() or 1)
    log(f"compiling {len(cases)} launches in {jobs} processes ...")
    log(f"  {precompile(cases, jobs):.0f} s")
    rows = measure(cases, out, environment("cuda"), log=log)
    return 0 if all(r["status"] != "error" for r in rows) else 1
