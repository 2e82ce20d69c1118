"""The launches `gpu_session.sh profile` puts under Nsight Compute.

Each case runs dynconv's forward and backward at a reference shape twice: the first run compiles
and tunes, the second runs between cudaProfilerStart/Stop (ncu --profile-from-start off) inside an
NVTX range named after the case (ncu --nvtx), so the report holds warm launches only, each
labelled. Inputs are random, never zeros (METHOD.md). Without ncu it still runs, and says how
long each case took, which is no measurement: ncu serialises and replays every kernel.

    python perf_reports/ncu_cases.py                 # every case
    python perf_reports/ncu_cases.py R1:bf16 E1:bf16:nhwc
"""
from __future__ import annotations

import sys
import time

import torch

from dynconv.providers import PROVIDERS, make_inputs, output_shape
from dynconv.roofline import resolve_shape

# shape:dtype[:layout]; the layouts issue 7's targets name (family 2 in channels_last).
DEFAULT_CASES = ("R1:bf16", "R1:fp32", "R2:bf16", "R3:bf16", "R4:bf16", "R4:fp32",
                 "E1:bf16:nhwc", "E2:bf16:nhwc", "D1:bf16:nhwc", "R1-layer:bf16:nhwc")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_case(case: str, profiled: bool) -> float:
    shape, dtype_name, *rest = case.split(":")
    layout = rest[0] if rest else "nchw"
    p = resolve_shape(shape)
    provider = "dynconv_fused" if p.op == "involution_layer" else "dynconv"
    fn = PROVIDERS[provider].resolve(p.op)
    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    t = make_inputs(p, dtype, "cuda", requires_grad=True, layout=layout)
    dy = torch.randn(output_shape(p), device="cuda", dtype=dtype).to(memory_format=fmt)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if profiled:
        torch.cuda.profiler.start()
    with torch.cuda.nvtx.range(f"{case} {provider}"):
        fn(t, p).backward(dy)
    torch.cuda.synchronize()
    if profiled:
        torch.cuda.profiler.stop()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("ncu_cases: no CUDA GPU visible; nothing to profile", file=sys.stderr)
        return 2
    for case in argv or DEFAULT_CASES:
        run_case(case, profiled=False)
        seconds = run_case(case, profiled=True)
        print(f"{case}: forward+backward ran ({seconds * 1e3:.1f} ms wall, under the profiler if any)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
