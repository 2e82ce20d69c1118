"""Issue 14, training beyond one process: every dynconv.nn module under DistributedDataParallel and
FSDP2 (``fully_shard``), eager and under torch.compile, on 2 gloo processes on 127.0.0.1.

One step on 2 ranks × 2 samples must give the output, the gradient of every parameter and the
parameters after an SGD step of the single-process run on the 4 concatenated samples (float64,
BatchNorm in eval mode). The ranks run the plain CPU path (TRITON_INTERPRET=0: no interpreter),
which is the path a CPU user trains on; the distributed engines see the same custom ops and
autograd formulas as on CUDA. The compiled runs are the slow part (``-k "not compiled"`` skips
them); DYNCONV_TEST_COMPILE_BACKEND=inductor compiles with inductor instead of aot_eager (about
3x the time on 2 cores; passes too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker

WORKER = Path(worker.__file__)
COMPILE_BACKEND = os.environ.get("DYNCONV_TEST_COMPILE_BACKEND", "aot_eager")
# One model per engine under compile: the expert op with every attention input (ODConv) for DDP,
# the fused involution op for FSDP2.
COMPILED = {"ddp": "ODConv2d", "fsdp2": "Involution2d-fused"}


def _launch(tmp_path, runs: list[str], timeout: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    for attempt in range(2):  # the free port may be taken between probing it and binding it: once more
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        cmd = [sys.executable, str(WORKER), "--out", str(out)] + [f"--run={r}" for r in runs]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    reports = [out / f"rank{r}.json" for r in range(worker.WORLD)]
    missing = [str(p) for p in reports if not p.exists()]
    assert proc.returncode == 0 and not missing, (
        f"worker failed (rc {proc.returncode}, missing {missing}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {r: json.loads(p.read_text()) for r, p in enumerate(reports)}


def _failures(reports: dict, run: str, case: str) -> list[str]:
    failures = []
    for rank, report in reports.items():
        if report["interpreted"] is not False:
            failures.append(f"rank {rank} ran the Triton interpreter, not the plain CPU path")
        result = report["runs"][run][case]
        if "exception" in result:
            failures.append(f"{run} {case} rank {rank}:\n{result['exception']}")
            continue
        errors = result["errors"]
        if not any(k.startswith("grad ") for k in errors):
            failures.append(f"{run} {case}: no parameters compared")
        bad = {k: v for k, v in errors.items() if not v <= worker.TOLERANCE}
        if bad:
            failures.append(f"{run} {case} rank {rank}: differs from the single-process step: {bad}")
    return failures


# One test per launch: under pytest-xdist a fixture shared by several tests would launch once per worker.
def test_one_step_equals_single_process(tmp_path):
    reports = _launch(tmp_path, ["ddp", "fsdp2"], timeout=300)
    failures = [f for wrap in ("ddp", "fsdp2") for case in worker.CASES for f in _failures(reports, f"{wrap}/eager", case)]
    assert not failures, "\n".join(failures)


def test_one_step_equals_single_process_compiled(tmp_path):
    reports = _launch(tmp_path, [f"{wrap}/{COMPILE_BACKEND}={case}" for wrap, case in COMPILED.items()], timeout=600)
    failures = [f for wrap, case in COMPILED.items() for f in _failures(reports, f"{wrap}/{COMPILE_BACKEND}", case)]
    assert not failures, "\n".join(failures)
