"""``dynconv bench``: time every op, pass, dtype and provider on this GPU; write the reports folder.

    dynconv bench [--ops OP ...] [--dtypes fp32 fp16 bf16] [--layouts nchw nhwc]
                  [--passes forward backward forward+backward] [--shapes R1 E1@H14 ...]
                  [--providers NAME ...] [--quick] [--fresh] [--out DIR]

Method: CUDA events around each call, warm-up first (compilation
and autotuning stay out), then at least 10 timed calls (3 for calls over 100 ms) filling
a 100 ms window (40 ms with ``--quick``); median with 20th/80th percentiles. Before each timed call a buffer larger than L2
is overwritten and the inputs rotate among several sets when one set fits in L2, so no call
reads warm cache. Peak memory is measured in a separate call of the same pass once it
is warm (see :func:`measure_peak_mb`). Every provider's forward output is first checked against the op's
reference provider; a provider that disagrees is recorded as ``mismatch``, one that runs out of
memory as ``OOM``, one that raises as ``error`` (in ``ms_median``): recorded, never dropped.

Layouts (the csv's ``layout``): ``nchw`` (contiguous) or ``nhwc`` (``torch.channels_last``), the
memory format of the activations every provider of a measurement receives alike, and of the dy
its backward gets (the format of the provider's own output). The static cuDNN conv is much faster
in channels_last for the half types, so a dynamic op is only ever compared with it in the same
layout. Default: both layouts in every dtype; with ``--quick``, nchw in every dtype and nhwc in
bf16 only. The performance targets are bf16 channels_last, and a quick run must stay within
about ten minutes: nhwc in every dtype would double the work of an nchw-only run (its tuning too, as
the layout is part of every kernel's tuning key), nhwc in bf16 alone adds a third.
``--layouts`` measures exactly the layouts named, each in every dtype.

The csv is rewritten after every pass of a shape, layout and dtype (rows of an earlier run with the same
op, pass, dtype, layout, shape and provider are replaced, the rest kept; ``--fresh`` starts
over), so a run cut short by a time limit keeps what it measured and ``--shapes`` can split a
full run over several calls. Rows from before the layout column read as ``nchw``.
Without a GPU nothing is measured: the command says so, re-draws the plots from the
measurements already in the reports folder (with none there, it writes nothing) and exits with
status 3, as every dynconv command that needs a GPU does.

The csv and ``ceilings.json`` are replaced atomically through uniquely named temporary files, and
the csv's read-merge-write holds a file lock, so concurrent runs neither crash nor lose rows.
A ``README.md`` in the reports folder that dynconv did not write is never replaced without
``--force``; the command stops before measuring instead.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import sys
from pathlib import Path

from dynconv.kernels import timing
from dynconv.provenance import environment
from dynconv.console import EXIT_NO_GPU, Progress, add_quiet, command_parser, fail
from dynconv.providers import CHECK_REFERENCE, LAYOUTS, PROVIDERS, ProviderUnavailable, make_inputs, providers_for
from dynconv.reports import COLUMNS, LEGACY_COLUMNS, default_reports_dir, read_csv, row_layout
from dynconv.roofline import (
    DTYPE_BYTES,
    OPS,
    PASSES,
    REFERENCE_SHAPES,
    Problem,
    minimum_bytes,
    minimum_flops,
    resolve_shape,
    split_shape_name,
    sweep_shape_names,
)

DTYPES = tuple(DTYPE_BYTES)
# --quick without --layouts measures nhwc in these dtypes only (module docstring).
QUICK_NHWC_DTYPES = ("bf16",)
# Values of ms_median for a measurement that produced no time.
STATUSES = ("OOM", "error", "mismatch")
# ‖y − y_ref‖ / ‖y_ref‖ allowed in the pre-timing check. fp32 leaves room for TF32 dots
# (METHOD.md: near 3e-4); the half types for rounding the output to 8 or 11 bits.
CHECK_TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 3e-2}


def normalised_gpu_name(name: str) -> str:
    """The reports folder of a GPU, named by the one normaliser the autotuning config files use
    (``kernels.configs.normalise_device_name``: ``"NVIDIA H100 80GB HBM3"`` → ``NVIDIA_H100_80GB_HBM3``)."""
    from dynconv.kernels import configs

    return configs.normalise_device_name(name) or "unknown_gpu"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

# One timer for bench and autotune (kernels/timing.py), so their figures compare.
Timer, quantiles = timing.Timer, timing.quantiles


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------

def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _is_oom(exc: BaseException) -> bool:
    import torch
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


def _free(device: str):
    """Return a measurement's memory before the next one, so peaks do not include leftovers."""
    if device == "cuda":
        import torch
        gc.collect()
        torch.cuda.empty_cache()


def _leaves(t: dict) -> list:
    return [v for v in t.values() if v.requires_grad]


def _clear_grads(tensors):
    for v in tensors:
        v.grad = None


def _input_bytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def rotation_sets(set_bytes: int, l2_bytes: int, limit: int = 4) -> int:
    """How many input sets to rotate among so that consecutive calls never share cached inputs:
    enough to cover twice the L2, at most ``limit`` (big sets exceed L2 on their own)."""
    return max(1, min(limit, math.ceil(2 * l2_bytes / max(set_bytes, 1))))


def _grads_like_output(fn, sets: list, p: Problem) -> list:
    """One dy per input set in the memory format of the provider's own output, as the layer after
    it would hand back; learnt from one untimed forward (a provider may return another format
    than its input's, and then its backward is measured with the dy it would really get)."""
    import torch
    with torch.no_grad():
        y = fn(sets[0], p)
    dys = [torch.randn_like(y) for _ in sets]  # randn_like keeps y's strides
    del y
    return dys


def measure_peak_mb(fn, p: Problem, pass_: str, dtype, device: str, layout: str = "nchw") -> float | None:
    """Peak device memory of one call of the pass, in MiB: the most allocated at once, minus what
    was allocated before its inputs were made. So it counts the inputs, the output, every
    temporary, and for ``backward`` the tensors the forward saved (made before the reset,
    alive during it). Run it after the pass is warm. None on CPU."""
    if device != "cuda":
        return None
    import torch
    _free(device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t = make_inputs(p, dtype, device, requires_grad=pass_ != "forward", layout=layout)
    if pass_ == "forward":
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            y = fn(t, p)
    elif pass_ == "backward":
        y = fn(t, p)
        dy = torch.randn_like(y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        y.backward(dy)
    else:
        dy = _grads_like_output(fn, [t], p)[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        y = fn(t, p)
        y.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del t, y
    return peak / 2**20


def time_pass(fn, p: Problem, pass_: str, dtype, device: str, timer: Timer, l2_bytes: int,
              layout: str = "nchw"):
    """(median, p20, p80) ms of one pass, inputs rotating among fresh sets."""
    import torch
    first = make_inputs(p, dtype, device, requires_grad=pass_ != "forward", layout=layout)
    sets = [first] + [make_inputs(p, dtype, device, requires_grad=pass_ != "forward", layout=layout)
                      for _ in range(rotation_sets(_input_bytes(first), l2_bytes) - 1)]
    n = len(sets)
    if pass_ == "forward":
        def run(i):
            with torch.no_grad():
                fn(sets[i % n], p)
        return timer(run)
    leaves = [_leaves(t) for t in sets]

    def reset(i):
        _clear_grads(leaves[i % n])

    if pass_ == "backward":
        # One forward graph per set, replayed: only the backward sits between the events.
        ys = [fn(t, p) for t in sets]
        dys = [torch.randn_like(y) for y in ys]
        return timer(lambda i: ys[i % n].backward(dys[i % n], retain_graph=True), reset)
    dys = _grads_like_output(fn, sets, p)
    return timer(lambda i: fn(sets[i % n], p).backward(dys[i % n]), reset)


def relative_error(y, ref) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def check_forward(fns: dict, p: Problem, dtype_name: str, device: str, log, layout: str = "nchw") -> dict[str, str]:
    """Forward of every non-static provider against the op's reference provider on one random
    input set. Returns {provider: status} for those that could not be checked or disagree."""
    import torch
    reference = CHECK_REFERENCE.get(p.op)
    candidates = [n for n in fns if not PROVIDERS[n].static]
    if reference not in fns or len(candidates) < 2:
        return {}
    bad = {}
    generator = torch.Generator(device=device).manual_seed(1234)
    try:
        t = make_inputs(p, _torch_dtype(dtype_name), device, generator=generator, layout=layout)
        with torch.no_grad():
            ref = fns[reference](t, p)
    except Exception as exc:  # the reference itself fails: nothing can be checked
        log(f"  check skipped: reference {reference} failed ({'OOM' if _is_oom(exc) else exc})")
        _free(device)
        return {}
    for name in candidates:
        if name == reference:
            continue
        try:
            with torch.no_grad():
                err = relative_error(fns[name](t, p), ref)
        except Exception:  # the timing run records the failure with its real status
            _free(device)
            continue
        if not err <= CHECK_TOLERANCE[dtype_name]:  # NaN fails too
            log(f"  MISMATCH: {name} differs from {reference} by {err:.2e} (tolerance "
                f"{CHECK_TOLERANCE[dtype_name]:.0e}); recorded as 'mismatch', not timed")
            bad[name] = "mismatch"
    del t, ref
    _free(device)
    return bad


def measure(fn, p: Problem, pass_: str, dtype_name: str, device: str, timer: Timer, l2_bytes: int, log,
            layout: str = "nchw") -> dict:
    """The measured fields of one csv row: times and peak memory, or the status it failed with."""
    import torch
    dtype = _torch_dtype(dtype_name)
    try:
        median, p20, p80 = time_pass(fn, p, pass_, dtype, device, timer, l2_bytes, layout)
        _free(device)
        # After the timing's warm-up: compilation, autotuning (its own flush buffer) and cuDNN's
        # algorithm search have allocated and freed their memory by now, so none of it counts.
        peak = measure_peak_mb(fn, p, pass_, dtype, device, layout)
    except Exception as exc:
        status = "OOM" if _is_oom(exc) else "error"
        if status == "error":
            log(f"  error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        _free(device)
        if device == "cuda":
            torch.cuda.synchronize()  # a broken context raises here and ends the run: nothing after it is real
        return {"ms_median": status}
    finally:
        _free(device)
    fields = {"ms_median": median, "ms_p20": p20, "ms_p80": p80,
              "gbps": minimum_bytes(p, pass_, dtype_name) / median / 1e6,
              "tflops": minimum_flops(p, pass_) / median / 1e9}
    if peak is not None:
        fields["peak_mem_mb"] = peak
    return fields


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def measure_ceilings(timer: Timer, copy_bytes: int = 2 << 30, matmul_n: int = 8192) -> dict:
    """HBM bandwidth from a device-to-device copy (bytes read + bytes written) and matmul
    throughput per dtype, on random data (zeros can run faster than real data)."""
    import torch
    n = copy_bytes // 4
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    median, _, _ = timer(lambda i: dst.copy_(src))
    ceilings = {"hbm_gbps": 2 * n * 4 / median / 1e6}
    del src, dst
    flops = 2 * matmul_n ** 3
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, allow_tf32 in (("fp32_tflops", torch.float32, False), ("tf32_tflops", torch.float32, True),
                                       ("bf16_tflops", torch.bfloat16, None), ("fp16_tflops", torch.float16, None)):
            if allow_tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=dtype)
            b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=dtype)
            median, _, _ = timer(lambda i: torch.mm(a, b))
            ceilings[key] = flops / median / 1e9
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _free("cuda")
    ceilings["method"] = (f"hbm: median of {copy_bytes >> 20} MiB device-to-device copies, read + written bytes; "
                          f"matmul: median of {matmul_n}^3 torch.mm on random data "
                          "(fp32 with TF32 off, tf32 with it on)")
    from .probes import measure_latency

    try:
        ceilings.update(measure_latency())
    except Exception as exc:  # noqa: BLE001 - a failed probe must not cost the bandwidth figures above
        ceilings["latency_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return ceilings


# ---------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def row_key(row: dict) -> tuple:
    return (row["op"], row["pass"], row["dtype"], row_layout(row), row["shape"], row["provider"])


def _sort_key(row: dict):
    try:
        base, hw = split_shape_name(row["shape"])
        shape = (list(REFERENCE_SHAPES).index(base), hw, "")
    except ValueError:  # a shape the table does not know (a test's): after the known ones
        shape = (len(REFERENCE_SHAPES), 0, row["shape"])
    layout = row_layout(row)
    return (OPS.index(row["op"]) if row["op"] in OPS else len(OPS), shape,
            LAYOUTS.index(layout) if layout in LAYOUTS else 9,
            PASSES.index(row["pass"]) if row["pass"] in PASSES else 9,
            DTYPES.index(row["dtype"]) if row["dtype"] in DTYPES else 9, row["provider"])


def write_csv(path: Path, rows: list[dict], merge: bool = True) -> None:
    """Write ``rows``; with ``merge``, keep the rows already there that these do not replace.
    Under the csv's file lock and atomically (see the module docstring)."""
    from dynconv.kernels.configs import atomic_write_text, file_lock

    path = Path(path)
    new = {row_key(r): {c: _fmt(row_layout(r) if c == "layout" else r.get(c)) for c in COLUMNS} for r in rows}
    with file_lock(path):
        old = read_csv(path) if merge and path.exists() else []
        merged = [r for r in old if row_key(r) not in new] + list(new.values())
        merged.sort(key=_sort_key)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(merged)
        atomic_write_text(path, text.getvalue())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def default_shapes(quick: bool) -> list[str]:
    return list(REFERENCE_SHAPES) + ([] if quick else sweep_shape_names())


def layout_plan(dtypes: list[str], layouts: list[str] | None, quick: bool) -> list[tuple[str, str]]:
    """The (layout, dtype) pairs measured at each shape, in order: every pair of the named
    layouts and dtypes; without ``layouts`` both, except that ``quick`` keeps nhwc to
    :data:`QUICK_NHWC_DTYPES` (module docstring)."""
    if layouts:
        return [(layout, dtype) for layout in layouts for dtype in dtypes]
    return [(layout, dtype) for layout in LAYOUTS for dtype in dtypes
            if not (quick and layout == "nhwc" and dtype not in QUICK_NHWC_DTYPES)]


def _resolve_providers(op: str, wanted, log, notes: set) -> dict:
    fns = {}
    for provider in providers_for(op):
        if wanted and provider.name not in wanted:
            continue
        try:
            fns[provider.name] = provider.resolve(op)
        except ProviderUnavailable as exc:
            note = f"{op}: provider {provider.name} skipped: {exc}"
            if note not in notes:
                notes.add(note)
                log("note: " + note)
    if fns and all(PROVIDERS[n].static for n in fns):
        note = f"{op}: skipped: no dynamic provider is available (only the static floor)"
        if note not in notes:
            notes.add(note)
            log("note: " + note)
        return {}
    return fns


def run_benchmarks(ops=None, dtypes=None, passes=None, shapes=None, providers=None, quick=False,
                   out=None, fresh=False, device="cuda", problems=None, timer=None, log=print,
                   layouts=None, quiet=False) -> Path:
    """Measure and write ``<out>/<gpu>/results.csv`` and ``ceilings.json``; returns the csv path.

    ``problems`` maps extra shape names to :class:`Problem` and ``timer`` replaces the default
    :class:`Timer` (tests run tiny shapes on CPU with ``device="cpu"``; such a run measures
    nothing about a GPU and must never be written into ``perf_reports/``)."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU: nothing can be measured")
    out = Path(out) if out is not None else default_reports_dir()
    if out is None:
        raise ValueError("outside a dynconv repository checkout there is no default reports folder: pass out")
    env = environment(device)
    folder = out / normalised_gpu_name(env["gpu"])
    csv_path = folder / "results.csv"
    timer = timer or timing.Timer(device, *((10.0, 40.0) if quick else (25.0, 100.0)))
    l2_bytes = 0
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # the static floor gets cuDNN's fastest algorithm
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
        log(f"measuring ceilings on {env['gpu']} ...")
        ceilings = measure_ceilings(timer)
        ceilings.update(env)
        from dynconv.kernels.configs import atomic_write_text
        atomic_write_text(folder / "ceilings.json", json.dumps(ceilings, indent=2) + "\n")
        log(f"  HBM {ceilings['hbm_gbps']:.0f} GB/s, fp32 {ceilings['fp32_tflops']:.1f} TFLOP/s, "
            f"tf32 {ceilings['tf32_tflops']:.0f}, bf16 {ceilings['bf16_tflops']:.0f}, fp16 {ceilings['fp16_tflops']:.0f}; "
            + (f"load latency HBM {ceilings['hbm_latency_ns']:.0f} ns ({ceilings['hbm_loaded_latency_ns']:.0f} under a "
               f"copy), L2 {ceilings['l2_latency_ns']:.0f} ns" if "hbm_latency_ns" in ceilings
               else f"load latency not measured ({ceilings.get('latency_error')})"))

    problems = dict(problems or {})
    names = list(shapes) if shapes else default_shapes(quick)
    dtypes, passes = list(dtypes or DTYPES), list(passes or PASSES)
    plan = layout_plan(dtypes, list(layouts) if layouts else None, quick)
    notes: set[str] = set()
    first_write = fresh
    progress = Progress(len(names) * len(plan), "bench", quiet)
    try:
        for name in names:
            p = problems[name] if name in problems else resolve_shape(name)
            if ops and p.op not in ops:
                progress.update(n=len(plan))
                continue
            fns = _resolve_providers(p.op, providers, log, notes)
            if not fns:
                progress.update(n=len(plan))
                continue
            for layout, dtype in plan:
                progress.update(f"{name} {dtype} {layout}", n=0)
                rows = []
                try:
                    log(f"{name} ({p.op}) {dtype} {layout}")
                    bad = check_forward(fns, p, dtype, device, log, layout)
                    for pass_ in passes:
                        for provider, fn in fns.items():
                            fields = {"ms_median": bad[provider]} if provider in bad else \
                                measure(fn, p, pass_, dtype, device, timer, l2_bytes, log, layout)
                            rows.append({"op": p.op, "pass": pass_, "dtype": dtype, "layout": layout,
                                         "shape": name, "provider": provider, **fields, **env})
                            log("  " + _describe(rows[-1]))
                        # Written per pass: a run killed by its time limit (SIGKILL runs no finally)
                        # loses at most the pass it was in. The first GPU lease lost R1's forward so.
                        write_csv(csv_path, rows, merge=not first_write)
                        first_write, rows = False, []
                finally:
                    # Even when the device breaks mid-pass, what was measured before it is kept.
                    if rows:
                        write_csv(csv_path, rows, merge=not first_write)
                        first_write = False
                    progress.update(f"{name} {dtype} {layout}")
    finally:
        progress.close()
        if device == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
    if not csv_path.exists():
        log("nothing was measured: every requested op was skipped (see the notes above)")
    return csv_path


def _describe(row: dict) -> str:
    head = f"{row['pass']:<16} {row['provider']:<13}"
    if row["ms_median"] in STATUSES:
        return f"{head} {row['ms_median']}"
    mem = f", peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") is not None else ""
    return (f"{head} {row['ms_median']:.3f} ms [p20 {row['ms_p20']:.3f}, p80 {row['ms_p80']:.3f}]  "
            f"{row['gbps']:.0f} GB/s  {row['tflops']:.2f} TFLOP/s{mem}")


def _gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _split(values):
    """``--ops a,b c`` → ``[a, b, c]``."""
    if not values:
        return None
    return [v for value in values for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("dynconv bench", __doc__)
    add_quiet(parser)
    parser.add_argument("--ops", nargs="+", metavar="OP", help=f"subset of {', '.join(OPS)}")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", help=f"subset of {', '.join(DTYPES)}")
    parser.add_argument("--layouts", nargs="+", metavar="LAYOUT",
                        help=f"subset of {', '.join(LAYOUTS)}, each in every dtype; default: both "
                             f"(with --quick, nhwc in {', '.join(QUICK_NHWC_DTYPES)} only)")
    parser.add_argument("--passes", nargs="+", metavar="PASS", help=f"subset of {', '.join(PASSES)}")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help=f"reference shapes ({', '.join(REFERENCE_SHAPES)}) or sweep points such as R1@H112; "
                             "default: all reference shapes and the size sweep")
    parser.add_argument("--providers", nargs="+", metavar="NAME", help=f"subset of {', '.join(PROVIDERS)}")
    parser.add_argument("--quick", action="store_true",
                        help="reference shapes only, shorter timing windows, nhwc in bf16 only")
    parser.add_argument("--fresh", action="store_true", help="replace results.csv instead of merging into it")
    parser.add_argument("--out", type=Path, default=None, help="reports folder (default: perf_reports/ of the repository checkout dynconv runs "
                             "from; required elsewhere)")
    parser.add_argument("--force", action="store_true",
                        help="replace a README.md in the reports folder that dynconv did not write")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ops, dtypes, passes = _split(args.ops), _split(args.dtypes), _split(args.passes)
    shapes, providers, layouts = _split(args.shapes), _split(args.providers), _split(args.layouts)
    for given, allowed, what in ((ops, OPS, "op"), (dtypes, DTYPES, "dtype"), (passes, PASSES, "pass"),
                                 (layouts, LAYOUTS, "layout"), (providers, tuple(PROVIDERS), "provider")):
        unknown = sorted(set(given or ()) - set(allowed))
        if unknown:
            print(f"dynconv bench: unknown {what} {', '.join(unknown)}; expected {', '.join(allowed)}", file=sys.stderr)
            return 2
    try:
        for name in shapes or ():
            resolve_shape(name)
    except ValueError as exc:
        print(f"dynconv bench: {exc}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else default_reports_dir()
    if out is None:
        return fail("dynconv bench", "not inside a dynconv repository checkout, so there is no default "
                                     "reports folder: pass --out DIR")

    from dynconv import plot
    measured = _gpu_available()
    if not measured:
        print("dynconv bench: no CUDA GPU on this machine, so NOTHING WAS MEASURED.")
        if not plot.load(out):
            # Nothing to re-draw: write nothing (not even a README saying so) into a folder that
            # may not be a reports folder at all.
            print(f"There are no earlier measurements in {out} either: no plots drawn, nothing written. "
                  "Run `dynconv bench` on a machine with a CUDA GPU to produce them.")
            return EXIT_NO_GPU
        print(f"Re-drawing the plots from the measurements already in {out} instead.")
    problem = plot.readme_problem(out, args.force)
    if problem:  # before minutes of measuring, not after
        print(f"dynconv bench: {problem}", file=sys.stderr)
        return 2
    if not measured:
        drawn = plot.draw_all(out, force=args.force, quiet=args.quiet)
        print(f"Re-drew {len(drawn)} plot files from earlier measurements (see each csv's gpu, date and commit).")
        return EXIT_NO_GPU
    csv_path = run_benchmarks(ops=ops, dtypes=dtypes, passes=passes, shapes=shapes, providers=providers,
                              quick=args.quick, out=out, fresh=args.fresh, layouts=layouts, quiet=args.quiet)
    print(f"wrote {csv_path}")
    drawn = plot.draw_all(out, force=args.force, quiet=args.quiet)
    print(f"drew {len(drawn)} plot files and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
