"""``dynconv run`` (what ``make run`` calls): the main job.

With a GPU: run the benchmarks and draw the plots (``dynconv bench`` then ``dynconv plot``).
Without one: run an Involution2d block forward and backward through the Triton interpreter,
check it against the float64 unfold reference, print a short summary, and re-draw the plots
from the measurements committed in the reports folder.

The reports folder is --out DIR; without it, perf_reports/ of the repository checkout dynconv
runs from. Outside a checkout (an installed package) --out is required: the command writes
nowhere it was not told to (--demo-only writes nothing at all).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dynconv.console import EXIT_USAGE, Progress, add_quiet, command_parser, fail
from dynconv.reports import default_reports_dir


def interpreter_demo(batch: int = 2, channels: int = 32, size: int = 14, stride: int = 2, quiet: bool = False) -> bool:
    """Involution2d forward + backward through the interpreter against the unfold reference.

    Must run in a process that set TRITON_INTERPRET=1 before importing dynconv. The interpreter
    takes a while: a progress display on stderr (a terminal only, and not when ``quiet``).
    """
    import torch

    import dynconv
    from dynconv.kernels._launch import kernels_are_interpreted
    from dynconv.reference import involution_unfold

    if not kernels_are_interpreted():
        raise RuntimeError("the interpreter demo needs TRITON_INTERPRET=1 set before dynconv is imported")
    torch.manual_seed(0)
    layer = dynconv.nn.Involution2d(channels, kernel_size=7, stride=stride, group_channels=16).eval()
    x = torch.randn(batch, channels, size, size + 1, requires_grad=True)
    weight = layer.kernel(x).detach().requires_grad_()

    progress = Progress(3, "interpreter demo", quiet)
    progress.update("forward", n=0)
    start = time.perf_counter()
    y = dynconv.involution(x, weight, stride=stride, padding=3)
    progress.update("backward")
    grad = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    seconds = time.perf_counter() - start
    progress.update("float64 reference")

    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y64 = involution_unfold(x64, w64, stride=stride, padding=3)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), grad.double())
    progress.update("done")

    print(f"Involution2d(C={channels}, K=7, stride={stride}, G={layer.groups}) on x {tuple(x.shape)} "
          f"-> y {tuple(y.shape)}, Triton interpreter, {seconds:.1f} s for forward + backward")
    ok = True
    for name, ours, ref in (("y", y, y64), ("dx", dx, dx64), ("dweight", dw, dw64)):
        err = (ours.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        good = err <= 1e-4 * max(1.0, scale) and not torch.isnan(ours).any()
        ok &= good
        print(f"  {name:<8} max |error| vs float64 unfold = {err:.2e} (max |value| {scale:.2e})  {'ok' if good else 'MISMATCH'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("dynconv run", __doc__)
    add_quiet(parser)
    parser.add_argument("--demo-only", action="store_true", help="run only the interpreter demonstration")
    parser.add_argument("--out", type=Path, default=None,
                        help="reports folder (default: perf_reports/ of the repository checkout; required elsewhere)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_reports_dir()
    if out is None and not args.demo_only:
        return fail("dynconv run", "not inside a dynconv repository checkout, so there is no default reports "
                                   "folder: pass --out DIR (or --demo-only, which writes nothing)", EXIT_USAGE)

    import torch

    quiet = ["--quiet"] if args.quiet else []
    if torch.cuda.is_available() and not args.demo_only:
        from dynconv import bench

        return bench.main(["--out", str(out)] + quiet)  # measures, writes <out>/<gpu>/ and draws the plots

    print("No GPU here: nothing is measured. Running the interpreter demonstration instead.\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    demo = subprocess.run([sys.executable, "-c", "import sys, dynconv.demo as d; "
                           f"sys.exit(0 if d.interpreter_demo(quiet={args.quiet}) else 1)"], env=env)
    if demo.returncode != 0:
        print("interpreter demonstration FAILED", file=sys.stderr)
        return demo.returncode
    if args.demo_only:
        return 0
    print(f"\nRe-drawing the plots from the committed measurements in {out} ...")
    try:
        from dynconv import plot
    except ImportError as exc:  # the plotting module is optional until the benchmark issue lands
        print(f"plotting unavailable: {exc}")
        return 0
    return plot.main(["--reports", str(out)] + quiet)


if __name__ == "__main__":
    sys.exit(main())
