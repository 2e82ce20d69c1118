"""Measure the plain-PyTorch CPU path of the ops against what a CPU user would write instead.

    .venv/bin/python perf_reports/cpu/measure.py [--threads 1] [--repeats 7] [--out perf_reports/cpu]

Each op and pass is timed as the best of ``--repeats`` loops (a loop: about 0.1 s of calls) in CPU
time of the measuring thread (``time.thread_time``: time the scheduler gave to other jobs on a
shared machine is not counted), dynconv's loops and the alternative's interleaved, with
``torch.set_num_threads(1)`` by default (every op runs in the calling thread). ``fwd`` runs on inputs that need no gradient;
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
# Twice the channels: four times the conv's work, the same fixed cost per call.
COND_WIDE = dict(B=8, C=64, H=28, K=3, E=4)
DR = dict(B=4, C=32, H=16, K=3, E=4, m=4)
INV = dict(B=4, C=32, H=28, K=5, G=4)
# Tiny problems: the time there is the fixed cost of a call (checks, dispatch, autograd.Function).
DW_TINY = dict(B=1, C=4, H=4, K=3)
COND_TINY = dict(B=1, C=4, H=4, K=3, E=2)


def _loop_time(fn, n):
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    for _ in range(n):
        fn()
    return (clock() - start) / n


def _best_of_both(ours, theirs, repeats):
    """Best per-call time of each, their loops interleaved so that a load change on the shared
    machine hits both alike, in alternating order."""
    ours(), theirs()  # warm-up (allocator, one-time dispatch setup)
    n = 1
    while _loop_time(ours, n) * n < 0.1:
        n *= 2
    best = [float("inf"), float("inf")]
    for i in range(repeats):
        # Each goes first every other time: whichever runs second after the other's loop finds
        # the caches and the allocator in a different state (an A/A run measured up to 10%).
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            best[which] = min(best[which], _loop_time((ours, theirs)[which], n))
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
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    cases = _cases() + _cases(COND=COND_WIDE)[1:2] + _cases(DW=DW_TINY, COND=COND_TINY)[:2]
    # A/A: the alternative timed against itself, by the same loops. Its spread is the noise floor.
    _, shape, alternative, inputs, x_name, weight_names, _, theirs = _cases()[1]
    cases.append((f"A/A: {alternative} itself", shape, alternative, inputs, x_name, weight_names, theirs, theirs))
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
        f"`torch.set_num_threads({label['threads']})`, commit {label['commit']} (the code measured; the "
        "script and this file were committed after it). The machine was shared with other jobs: each "
        "time is the best of several loops in CPU time of the measuring thread, dynconv's loops and "
        "the alternative's interleaved in alternating order. The A/A row (the alternative timed "
        "against itself) shows the noise floor: ratios that close to 1 are a tie. Other CPUs and "
        "thread counts will differ.",
        "",
        "`ratio` = dynconv time / alternative time (below 1: dynconv faster). `fwd`: forward on inputs "
        "needing no gradient; `dx` / `dw`: one backward to the input / to all weight-side operands "
        "(DRConv: the guide included).",
        "",
        "| op | shape | pass | alternative | dynconv ms | alternative ms | ratio |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['pass_']} | {r['alternative']} | {r['dynconv_ms']} | "
                     f"{r['alternative_ms']} | {r['ratio']} |")
    lines += [
        "",
        "## The algorithm of each op and pass, and why a ratio stays above 1",
        "",
        "- `dynamic_dwconv2d` (per-sample weights): one depthwise `F.conv2d` over `(1, B·C, H, W)` "
        "with `groups = B·C`; dx by the transposed depthwise conv; dw as a depthwise conv of x by the "
        "output gradient (torch's own depthwise weight gradient is the alternative's slow dw row).",
        "- `expert_conv2d` without a guide (CondConv, DynamicConv, ODConv): the kernels mixed by one "
        "GEMM and one conv with `groups = B` on `(1, B·Cin, H, W)`, its output returned without a "
        "copy; dx by the transposed conv; the kernel and bias gradients by one "
        "`aten.convolution_backward`, the routing and expert gradients by two GEMMs. That is timm's "
        "algorithm, step for step. Tried and rejected on this CPU: a Python loop of per-sample dense "
        "convs (about 1.6x slower), convolving with every expert and mixing the E outputs (E times "
        "the work, 4-6x slower), and running the grouped conv in channels_last (oneDNN's NHWC "
        "conv alone is about 2x faster here, but the two layout copies of `(1, B·C, H, W)` cost "
        "more than it saves). What remains above 1 is not the arithmetic: (1) the fixed cost of a call "
        "(argument checks, the autograd.Function, the backward's Python body), which the tiny rows "
        "show (0.03 ms forward, 0.05-0.08 ms backward); (2) dx mixes the kernels again (one small "
        "GEMM) instead of holding the `B·Cout·Cin·kh·kw` mixed kernels from the forward to the "
        "backward, as autograd does for timm (for a late layer, C=512 at 7x7, they are 100x the "
        "activations); (3) the same `aten.convolution_backward` call measured 5-13% slower when it "
        "runs inside a Python autograd.Function's backward than when called directly or from "
        "autograd's own C++ node (timed side by side here; the cause lies in torch, not in the "
        "call). At the small shape (1) explains about a third of the forward's gap; the rest we could "
        "not attribute (the forward's body alone, `expert_conv2d_selected`, timed 1.02-1.03x timm's "
        "code by the same loops). The wider row (four times the conv's work) brings the forward "
        "to a tie while the backward stays near 1.1, in line with (3).",
        "- `expert_conv2d` with a guide (DRConv): the forward convolves every region in one grouped "
        "conv and gathers each pixel's region (no indicator product: faster than the alternative's "
        "select). The backward was slower than it needed to be: the region indicator came from "
        "`F.one_hot` permuted to `(B, m, Ho, Wo)` (a strided tensor that made each product with it "
        "a strided pass), and the masked output gradient was built as `(B, m, Cout, Ho, Wo)` and "
        "then transposed into the grouped conv's channel order. Now the indicator is one contiguous "
        "comparison, the masked gradient is built in the conv's order by one product, the kernel "
        "and bias gradients come from one `aten.convolution_backward`, and the guide's scores from "
        "one conv with the biases folded in and an in-place product. dw stays above 1 by design: "
        "the guide's gradient needs every region's output, which the op recomputes (one more "
        "m-region conv) instead of keeping the `(B, m, Cout, Ho, Wo)` stack alive from the forward "
        "as autograd does for the alternative: one output's memory instead of m, the same choice "
        "as the GPU kernels.",
        "- Per-pixel `involution`: shift-and-add (K² strided multiply-adds), no tensor K² times the "
        "output, where unfold materialises `K²·C·Ho·Wo` per sample. Its dw is slower than unfold's "
        "(autograd's one product and sum over the K²-times-larger patch tensor): the price of that "
        "memory bound.",
        "",
        "Earlier figures (commit 52cb609, same machine, wall clock, dynconv's loops always first): "
        "CondConv 1.11 / 1.16 / 1.17 (fwd / dx / dw), DRConv 0.76 / 1.33 / 1.75. Between the two, the "
        "DRConv backward was rebuilt as above, the kernels are mixed by a GEMM instead of einsum, and "
        "the timing moved to thread CPU time with alternating order (the A/A row).",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
