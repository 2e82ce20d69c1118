"""Measure the plain-PyTorch CPU path of the ops against what a CPU user would write instead.

    .venv/bin/python perf_reports/cpu/measure.py [--threads 1] [--repeats 7] [--out perf_reports/cpu]

Each op and pass is timed as the best of ``--repeats`` loops (a loop: about 0.1 s of calls), wall
clock, dynconv's loops and the alternative's interleaved, with ``torch.set_num_threads`` fixed. ``fwd`` runs on inputs that need no gradient;
``dx`` / ``dw`` time one ``torch.autograd.grad`` through a recorded forward (retained graph) where
only the input / only the weight-side operands need a gradient. ``ratio`` is dynconv's time over the
alternative's (below 1: dynconv faster). Writes ``ratios.csv`` (not ``results.csv``: that name is the GPU benchmark's, which `dynconv plot` reads from every folder) and ``README.md`` in ``--out``.
Must run without TRITON_INTERPRET (the plain path is what is measured).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("unset TRITON_INTERPRET: this measures the plain CPU path, not the interpreter")

import dynconv  # noqa: E402
from dynconv.ops import reference_expert, reference_involution  # noqa: E402

# Modest shapes: the measuring machine is small and shared.
DW = dict(B=8, C=64, H=28, K=5)
COND = dict(B=8, C=32, H=28, K=3, E=4)
DR = dict(B=4, C=32, H=16, K=3, E=4, m=4)
INV = dict(B=4, C=32, H=28, K=5, G=4)
# Tiny problems: the time there is the fixed cost of a call (checks, dispatch, autograd.Function).
DW_TINY = dict(B=1, C=4, H=4, K=3)
COND_TINY = dict(B=1, C=4, H=4, K=3, E=2)


def _loop_time(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _best_of_both(ours, theirs, repeats):
    """Best per-call time of each, their loops interleaved so that a load change on the shared
    machine hits both alike."""
    ours(), theirs()  # warm-up (allocator, one-time dispatch setup)
    n = 1
    while _loop_time(ours, n) * n < 0.1:
        n *= 2
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        best = [min(best[0], _loop_time(ours, n)), min(best[1], _loop_time(theirs, n))]
    return best


def _passes(op, inputs, x_name, weight_names):
    """{pass: zero-argument callable} for fwd, dx and dw of ``op(**inputs)``; each backward pass on its
    own graph, where only the operands it differentiates need a gradient (an autograd.Function's
    backward sees ``needs_input_grad``, not which gradients were asked for)."""
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    def backward_to(names):
        leaves = {k: (v.detach().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        y = op(**leaves)
        g = torch.randn_like(y)
        wanted = [leaves[k] for k in names]
        return lambda: torch.autograd.grad(y, wanted, g, retain_graph=True)

    return {"fwd": lambda: op(**plain), "dx": backward_to((x_name,)), "dw": backward_to(weight_names)}


# --- the alternatives: what a user writes without dynconv -----------------------------------

def dwconv_batch_as_groups(x, weight, bias):
    B, C, H, W = x.shape
    K = weight.shape[-1]
    y = F.conv2d(x.reshape(1, B * C, H, W), weight.reshape(B * C, 1, K, K), bias.reshape(B * C),
                 padding=K // 2, groups=B * C)
    return y.reshape(B, C, *y.shape[2:])


def condconv_timm(x, experts, routing, bias):
    """timm's CondConv2d: the mixed kernel by one GEMM, then the batch-as-groups conv."""
    B, C, H, W = x.shape
    E, Cout = experts.shape[:2]
    weight = (routing @ experts.reshape(E, -1)).reshape(B * Cout, *experts.shape[2:])
    y = F.conv2d(x.reshape(1, B * C, H, W), weight, (routing @ bias).reshape(B * Cout), padding=1, groups=B)
    return y.reshape(B, Cout, *y.shape[2:])


def drconv_all_regions(x, experts, routing, bias, guide):
    return reference_expert.drconv_all_regions(x, experts, routing, bias, padding=1, guide=guide)


def _cases(DW=DW, COND=COND, DR=DR, INV=INV):
    r = torch.randn
    s = DW
    dw_in = dict(x=r(s["B"], s["C"], s["H"], s["H"]), weight=r(s["B"], s["C"], s["K"], s["K"]), bias=r(s["B"], s["C"]))
    s = COND
    cond_in = dict(x=r(s["B"], s["C"], s["H"], s["H"]), experts=r(s["E"], s["C"], s["C"], s["K"], s["K"]),
                   routing=torch.rand(s["B"], s["E"]), bias=r(s["E"], s["C"]))
    s = DR
    dr_in = dict(x=r(s["B"], s["C"], s["H"], s["H"]), experts=r(s["E"], s["C"], s["C"], s["K"], s["K"]),
                 routing=torch.rand(s["B"], s["m"], s["E"]), bias=r(s["E"], s["C"]),
                 guide=r(s["B"], s["m"], s["H"], s["H"]))
    s = INV
    inv_in = dict(x=r(s["B"], s["C"], s["H"], s["H"]), weight=r(s["B"], s["G"], s["K"], s["K"], s["H"], s["H"]))
    return [
        ("dynamic_dwconv2d", DW, "batch-as-groups F.conv2d", dw_in, "x", ("weight", "bias"),
         dynconv.dynamic_dwconv2d, dwconv_batch_as_groups),
        ("expert_conv2d (CondConv)", COND, "timm CondConv2d", cond_in, "x", ("experts", "routing", "bias"),
         lambda **a: dynconv.expert_conv2d(**a, padding=1), condconv_timm),
        ("expert_conv2d (DRConv)", DR, "all regions + select", dr_in, "x", ("experts", "routing", "bias", "guide"),
         lambda **a: dynconv.expert_conv2d(**a, padding=1), drconv_all_regions),
        ("involution", INV, "unfold", inv_in, "x", ("weight",),
         dynconv.involution, lambda x, weight: reference_involution.involution_unfold(x, weight)),
    ]


def _label(threads):
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(cpu=cpu, torch=torch.__version__, threads=threads, commit=commit, cores=os.cpu_count())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    cases = _cases() + _cases(DW=DW_TINY, COND=COND_TINY)[:2]
    for name, shape, alternative, inputs, x_name, weight_names, ours, theirs in cases:
        with torch.no_grad():  # same values first, or the times compare nothing
            torch.testing.assert_close(ours(**inputs), theirs(**inputs), rtol=1e-4, atol=1e-3)
        mine, other = _passes(ours, inputs, x_name, weight_names), _passes(theirs, inputs, x_name, weight_names)
        for p in ("fwd", "dx", "dw"):
            t_ours, t_theirs = _best_of_both(mine[p], other[p], args.repeats)
            rows.append(dict(op=name, shape=" ".join(f"{k}={v}" for k, v in shape.items()), pass_=p,
                             alternative=alternative, dynconv_ms=f"{t_ours * 1e3:.3f}",
                             alternative_ms=f"{t_theirs * 1e3:.3f}", ratio=f"{t_ours / t_theirs:.2f}"))
            print(f"{name:26s} {p:3s} dynconv {t_ours * 1e3:8.3f} ms  {alternative:26s} {t_theirs * 1e3:8.3f} ms"
                  f"  ratio {t_ours / t_theirs:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "ratios.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _write_readme(args.out / "README.md", rows, _label(args.threads))


def _write_readme(path, rows, label):
    lines = [
        "# CPU path: measured against the obvious alternative",
        "",
        "MEASURED (not predicted) by `perf_reports/cpu/measure.py` on a CPU: "
        f"{label['cpu']}, {label['cores']} logical cores, torch {label['torch']}, "
        f"`torch.set_num_threads({label['threads']})`, commit {label['commit']}. The machine was shared "
        "with other jobs and noisy: each time is the best of several loops (dynconv's and the "
        "alternative's interleaved), and ratios within about "
        "±15% of 1 are a tie. Other CPUs and thread counts will differ.",
        "",
        "`ratio` = dynconv time / alternative time (below 1: dynconv faster). `fwd`: forward on inputs "
        "needing no gradient; `dx` / `dw`: one backward to the input / to all weight-side operands.",
        "",
        "| op | shape | pass | alternative | dynconv ms | alternative ms | ratio |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['pass_']} | {r['alternative']} | {r['dynconv_ms']} | "
                     f"{r['alternative_ms']} | {r['ratio']} |")
    lines += [
        "",
        "The tiny-shape rows (B=1) show the fixed cost of a dynconv call (argument checks, the "
        "custom op or autograd.Function, the explicit backward bodies) that the alternatives, plain "
        "torch calls, do not pay (0.02-0.07 ms). The CondConv gap at the modest shape (0.1-0.2 ms) "
        "is larger than that and not explained yet: the forward body timed alone in one process "
        "came within 5% of the timm code. Per-pixel involution's dw is slower than unfold's "
        "(autograd's one product and sum over the K²-times-larger patch tensor), which the plain "
        "path does not build. DRConv's dw is slower by design: the guide's "
        "gradient needs every region's output, which the op recomputes in the backward instead of "
        "keeping the (B, m, Cout, Ho, Wo) stack alive from the forward as autograd does for the "
        "alternative (memory: one output, not m).",
        "",
        "Algorithms of the plain path (`ops/involution.py`, `ops/expert_conv.py`): per-sample "
        "`dynamic_dwconv2d` runs one depthwise `F.conv2d` over `(1, B·C, H, W)` with `groups = B·C` "
        "and its backward by the transposed depthwise conv (dx) and a depthwise conv of x by the output "
        "gradient (dw; torch's own depthwise weight gradient is the 12 ms of the alternative's dw row); "
        "`expert_conv2d` mixes the "
        "kernels by one GEMM and runs the batch-as-groups conv, returning its result without a copy, "
        "and with a guide (DRConv) convolves every region and gathers each pixel's argmax region. "
        "Per-pixel `involution` stays shift-and-add (K² strided multiply-adds): no tensor K² times "
        "the output, where unfold materialises `K²·C·Ho·Wo` per sample.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
