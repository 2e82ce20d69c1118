"""``dynconv inspect``: compile every kernel ahead of time for a GPU architecture and report its
registers, spills, shared memory and whether its global loads are vectorised.

This is the tuning tool for sessions without a GPU: the numbers come from the triton wheel's
own ptxas and cuobjdump, for exactly the launches the ops make by default.
"""
from __future__ import annotations

import json
import sys

from dynconv.console import EXIT_FAILED, Progress, add_quiet, command_parser, fail


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bounds" in argv:
        from . import bounds

        return bounds.main([a for a in argv if a != "--bounds"])
    parser = command_parser("dynconv inspect", __doc__)
    add_quiet(parser)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper) or 80 (Ampere)")
    parser.add_argument("--module", default="", help="only this kernel module, e.g. involution")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--label", default="", help="only launches whose label contains this")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--bounds", action="store_true",
                        help="the static performance model instead (PREDICTED roofline fractions; --bounds --help)")
    args = parser.parse_args(argv)

    from dynconv.kernels import KERNEL_MODULES, catalogue
    from dynconv.kernels._launch import kernels_are_interpreted, resource_usage

    if kernels_are_interpreted():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this command compiles")
    if args.module:
        modules = {module.__name__.rsplit(".", 1)[-1]: module for module in KERNEL_MODULES}
        if args.module not in modules:
            return fail("dynconv inspect", f"no kernel module {args.module!r}; choose from {', '.join(modules)}")
        launches = modules[args.module].catalogue()
    else:
        launches = catalogue()
    launches = [launch for launch in launches if args.kernel in launch.name and args.label in launch.label]
    # Compiling takes seconds a launch: show where it is (stderr, terminals only).
    progress = Progress(len(launches), f"compile sm_{args.arch}", args.quiet)

    seen = set()
    # coal M: kernels._launch.coalescing_work in millions (compile time on triton 3.6; the AOT test's bound is 2).
    header = (f"{'kernel':<32} {'launch':<44} {'warps':>5} {'regs':>5} {'stack':>5} {'ldl/stl':>7} {'smem':>7} "
              f"{'vec/ld':>7} {'coal M':>6}  meta")
    if not args.json:
        print(header)
    failures = 0
    for launch in launches:
        progress.update(launch.name)
        try:
            # Launches differing only in sizes compile to the same binary: report each binary once.
            source_key = (launch.name, str(launch.source().signature), str(launch.meta), launch.num_warps)
            if source_key in seen:
                continue
            seen.add(source_key)
            usage = resource_usage(launch, args.arch)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a finding, not a crash
            failures += 1
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            if args.json:
                print(json.dumps({"kernel": launch.name, "label": launch.label, "error": message}))
            else:
                print(f"{launch.name:<32} {launch.label:<44} FAILED: {message}")
            continue
        if args.json:
            usage["meta"] = {k: str(v) for k, v in usage["meta"].items()}
            print(json.dumps(usage))
        else:
            blocks = " ".join(f"{k}={v}" for k, v in usage["meta"].items() if k.startswith("BLOCK"))
            print(f"{usage['kernel']:<32} {usage['label'][:44]:<44} {usage['num_warps']:>5} {usage['registers']:>5} "
                  f"{usage['stack_bytes']:>5} {usage['local_memory_ops']:>7} {usage['shared_bytes']:>7} "
                  f"{usage['vector_loads']:>3}/{usage['global_loads']:<3} {usage['coalescing_work'] / 1e6:>6.2f}  {blocks}")
    progress.close()
    return EXIT_FAILED if failures else 0
