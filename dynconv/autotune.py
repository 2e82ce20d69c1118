"""``dynconv autotune``: time every kernel's candidate configs on this GPU and write the winners.

    dynconv autotune                       # all ops, float16 + float32, ~5-10 min on an H100
    dynconv autotune --quick               # two shapes per op, fewer candidates, ~1-2 min
    dynconv autotune --ops involution --dtypes bfloat16
    dynconv autotune --output autotune_configs/   # a file to commit and ship
    dynconv autotune --check autotune_configs/*.json   # validate files (no GPU needed)

For every kernel and pass, each representative layer shape (RedNet and DWNet layers for the
involution family; whatever the kernels' tuning modules declare in ``autotune_space()``) is run
with each candidate config. Candidates that spill registers or overflow shared memory on this
GPU's architecture are dropped first, by compiling them ahead of time in parallel (the facts
``dynconv inspect`` reports; this also fills Triton's cache, so the timing loop rarely compiles).
Each survivor is timed with the timer ``dynconv bench`` uses (``dynconv.kernels.timing.Timer``: CUDA
events, L2 overwritten before each call, median after warm-up), cycling through
enough copies of the inputs to exceed the L2 cache; one that fails to compile or launch is
skipped. Shapes sharing a table row (see ``dynconv.kernels.configs``) are decided together: the
winner has the best geometric mean of its time relative to each shape's fastest.

The JSON goes to the user folder (``$DYNCONV_CONFIG_DIR``, default ``~/.cache/dynconv``) under
this GPU's canonical name, merged with rows of an earlier run that this one did not measure,
and written atomically, so a concurrent run or a reading process never sees a torn file; the
merge and write hold a file lock, so two runs finishing together keep each other's rows. The
destination is checked before the sweep (its folder writable, the file creatable): a path that
cannot be written fails at once, not after minutes of timing. A file there that ``dynconv
autotune`` did not write is replaced only with ``--force``.
Without a GPU (or under ``TRITON_INTERPRET=1``) it says so and exits with status 3, as every
dynconv command that needs a GPU does.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dynconv.kernels import timing
from dynconv.console import EXIT_NO_GPU, Progress, add_quiet, clock, command_parser

DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32", "float": "float32",
          "float64": "float64", "fp64": "float64"}
# bfloat16 shares float16's rows (the key holds the element width), so the default skips it.
DEFAULT_DTYPES = ("float16", "float32")
NO_GPU_STATUS = EXIT_NO_GPU  # the convention of every dynconv command (console.EXIT_STATUSES)


def no_gpu_reason() -> str | None:
    """Why timings cannot be taken here, or None."""
    import torch

    from dynconv.kernels._launch import kernels_are_interpreted

    if kernels_are_interpreted():
        return ("TRITON_INTERPRET=1 is set, so the kernels run in Triton's CPU interpreter, whose "
                "timings say nothing about a GPU. Unset it and run again on the GPU machine.")
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False). Autotuning times the "
                "kernels on the GPU they will run on: run `dynconv autotune` on that machine. Until "
                "then the shipped configs, run-time tuning or the defaults are used.")
    return None


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One kernel at one shape and dtype, with the configs to time there."""

    kernel: str
    label: str
    spec: dict
    dtype: str
    key: dict
    default: dict
    candidates: list[dict]
    times: dict = field(default_factory=dict)  # config (as a tuple) -> median ms


def build_grid(spaces: dict, ops: list[str] | None, dtypes: list[str], quick: bool) -> list[Case]:
    """Every (kernel, shape, dtype) selected, keyed and with its candidates, from meta tensors."""
    import torch

    cases, seen = [], set()
    for kernel, space in spaces.items():
        for problem in space.problems(quick):
            if ops and problem.op not in ops and kernel not in ops:
                continue
            for dtype in dtypes:
                tensors = space.inputs(problem.spec, getattr(torch, dtype), "meta")
                if not space.reads_table(problem.spec, tensors):
                    continue
                # A space may time a kernel in another dtype than asked (the 16-bit format its
                # kernel runs): the case says which, and a key met twice is timed once.
                timed = str(next(t for t in tensors.values() if isinstance(t, torch.Tensor)).dtype).removeprefix("torch.")
                key = space.key(problem.spec, tensors)
                if (kernel, problem.label, tuple(key.items())) in seen:
                    continue
                seen.add((kernel, problem.label, tuple(key.items())))
                default = space.default(problem.spec, tensors)
                candidates = space.candidates(key, quick)
                if default not in candidates:
                    candidates = [default] + candidates
                cases.append(Case(kernel, problem.label, problem.spec, timed, key, default, candidates))
    return cases


def known_ops(spaces: dict) -> set[str]:
    return {p.op for space in spaces.values() for p in space.problems(False)} | set(spaces)


# ---------------------------------------------------------------------------------------------
# Pruning by what the architecture allows (runs in worker processes)
# ---------------------------------------------------------------------------------------------

def check_candidate(task: tuple) -> str | None:
    """Compile one candidate for ``arch``; the reason to drop it, or None to keep it."""
    kernel, spec, dtype, config, arch, shared_limit, warm = task
    import torch

    from dynconv.kernels._launch import resource_usage
    from dynconv.kernels.configs import spaces

    space = spaces()[kernel]
    launch = space.launch(spec, space.inputs(spec, getattr(torch, dtype), "meta"), config)
    try:
        usage = resource_usage(launch, arch)
    except Exception as exc:  # noqa: BLE001 - not compiling is this candidate's verdict
        return f"does not compile: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    spilled = usage.get("spilled", usage.get("spill_bytes", 0) > 0)
    if spilled:
        return "spills registers"
    if shared_limit and usage["shared_bytes"] > shared_limit:
        return f"needs {usage['shared_bytes']} B shared memory > {shared_limit}"
    if warm:
        try:
            # Compile through the JIT too, so the timing loop finds the binary in Triton's cache.
            launch.kernel.warmup(grid=launch.grid, **launch.args, **launch.meta, **launch.compile_options(arch))
        except Exception:  # noqa: BLE001 - only a cache warm-up; the timing loop compiles anyway
            pass
    return None


def prune(cases: list[Case], arch: int, shared_limit: int | None, jobs: int, warm: bool, quiet: bool = False) -> int:
    """Drop the candidates that do not fit ``arch``; returns how many were dropped."""
    tasks = {}
    for case in cases:
        for config in case.candidates:
            task = (case.kernel, case.spec, case.dtype, config, arch, shared_limit, warm)
            tasks.setdefault(json.dumps(task, sort_keys=True, default=str), task)
    progress = Progress(len(tasks), "compile", quiet)
    verdicts = {}
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        # spawn: the parent may hold a CUDA context, which a forked child cannot use.
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(check_candidate, task): name for name, task in tasks.items()}
            for future in concurrent.futures.as_completed(futures):
                try:
                    verdicts[futures[future]] = future.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker condemns only its task
                    verdicts[futures[future]] = f"check failed: {exc}"
                progress.update()
    else:
        for name, task in tasks.items():
            verdicts[name] = check_candidate(task)
            progress.update(task[0])
    dropped = 0
    for case in cases:
        keep = []
        for config in case.candidates:
            name = json.dumps((case.kernel, case.spec, case.dtype, config, arch, shared_limit, warm), sort_keys=True, default=str)
            if verdicts[name] is None:
                keep.append(config)
            else:
                dropped += 1
        case.candidates = keep
    return dropped


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def new_timer(quick: bool):
    """The sweep's timer: bench's, with shorter windows (a candidate's time only ranks it)."""
    return timing.Timer("cuda", *((5.0, 20.0) if quick else (10.0, 40.0)))


def _rotation(tensors: dict, l2_bytes: int) -> int:
    """Copies of the inputs to cycle through so that one pass over them overflows L2 twice."""
    import torch

    size = sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))
    return max(1, min(16, math.ceil(2 * l2_bytes / max(size, 1))))


def time_case(case: Case, space, device, l2_bytes: int, quick: bool, timer=None) -> None:
    """Fill ``case.times`` with the median ms of every candidate that launches, timed by the
    timer ``dynconv bench`` uses (kernels/timing.py), so the two tools' figures compare."""
    import torch

    timer = timer or new_timer(quick)
    dtype = getattr(torch, case.dtype)
    first = space.inputs(case.spec, dtype, device)
    copies = [first] + [space.inputs(case.spec, dtype, device) for _ in range(_rotation(first, l2_bytes) - 1)]
    for config in case.candidates:
        try:
            launches = [space.launch(case.spec, tensors, config) for tensors in copies]
            case.times[tuple(config.items())] = timer(lambda i: launches[i % len(launches)]())[0]
        except Exception:  # noqa: BLE001 - out of resources at launch, or a failed compile: skip it
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    del copies, first


# ---------------------------------------------------------------------------------------------
# Choosing winners
# ---------------------------------------------------------------------------------------------

def choose(cases: list[Case], spaces: dict) -> dict:
    """The ``kernels`` section of a config file: per kernel and bucket, the config with the best
    geometric-mean time relative to the fastest, over every shape and dtype in the bucket."""
    from dynconv.kernels.configs import bucket_key, key_string

    groups = defaultdict(list)
    for case in cases:
        if case.times:
            groups[(case.kernel, key_string(bucket_key(case.key, spaces[case.kernel].exact)))].append(case)
    kernels = {}
    for (kernel, text), members in sorted(groups.items()):
        configs = set().union(*(case.times for case in members))
        # Prefer configs measured at every shape of the bucket; a partial one only if none is.
        coverage = {c: sum(c in case.times for case in members) for c in configs}
        full = [c for c in configs if coverage[c] == max(coverage.values())]

        def score(config):
            rel = [math.log(case.times[config] / min(case.times.values())) for case in members if config in case.times]
            return sum(rel) / len(rel)

        winner = min(full, key=lambda c: (score(c), c))
        defaults = [case.times.get(tuple(case.default.items())) for case in members]
        row = {"config": dict(winner),
               "ms": round(sum(case.times[winner] for case in members if winner in case.times), 5),
               "default_ms": round(sum(defaults), 5) if all(d is not None for d in defaults) else None,
               "shapes": sorted({f"{case.label} {case.dtype}" for case in members})}
        entry = kernels.setdefault(kernel, {"exact": list(spaces[kernel].exact), "table": {}})
        entry["table"][text] = row
    return kernels


def speedup_summary(kernels: dict) -> list[str]:
    lines = []
    for kernel, entry in kernels.items():
        ratios = [row["default_ms"] / row["ms"] for row in entry["table"].values() if row.get("default_ms") and row["ms"]]
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            lines.append(f"  {kernel:<24} {len(entry['table']):>3} rows, vs default: geomean x{geo:.2f}, "
                         f"min x{min(ratios):.2f}, max x{max(ratios):.2f}")
        else:
            lines.append(f"  {kernel:<24} {len(entry['table']):>3} rows")
    return lines


def check_file(path: str | os.PathLike, arch: int = 90) -> list[str]:
    """Problems of a config file meant for shipping: its structure, each config's validity, and
    that each compiles for ``sm_<arch>`` without spills and within shared memory (the AOT facts
    of ``dynconv inspect``, so no GPU is needed). Empty when the file is fit to commit."""
    from dynconv.kernels import configs
    from dynconv.kernels._launch import ARCHS, resource_usage

    try:
        data = configs.read_json(path)
    except (OSError, ValueError) as exc:
        return [f"cannot read: {exc}"]
    problems = configs.file_problems(data)
    if problems:
        return problems
    spaces = configs.spaces()
    for kernel, entry in data["kernels"].items():
        if kernel not in spaces:
            problems.append(f"{kernel}: no such kernel")
            continue
        space = spaces[kernel]
        for text, row in entry["table"].items():
            key = configs.parse_key_string(text)
            spec, dtype = space.spec_for_key(key)
            tensors = space.inputs(spec, dtype, "meta")
            bad = configs.row_problems(kernel, row["config"], key, space.default(spec, tensors))
            if bad:
                problems.append(f"{kernel}[{text}]: {'; '.join(bad)}")
                continue
            try:
                usage = resource_usage(space.launch(spec, tensors, row["config"]), arch)
            except Exception as exc:  # noqa: BLE001 - not compiling is the finding
                problems.append(f"{kernel}[{text}]: does not compile for sm_{arch}: {str(exc).splitlines()[:1]}")
                continue
            if usage.get("spilled", usage.get("spill_bytes", 0) > 0):
                problems.append(f"{kernel}[{text}]: spills registers on sm_{arch}")
            if ARCHS.get(arch) and usage["shared_bytes"] > ARCHS[arch]:
                problems.append(f"{kernel}[{text}]: needs {usage['shared_bytes']} B shared memory on sm_{arch}")
    return problems


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def destination(output: str | None, device: str) -> Path:
    from dynconv.kernels.configs import canonical_device_name, user_config_dir

    name = canonical_device_name(device) + ".json"
    if output is None:
        return user_config_dir() / name
    path = Path(output).expanduser()
    return path / name if path.is_dir() or output.endswith(os.sep) else path


def destination_problem(path: Path, force: bool = False) -> str | None:
    """Why the sweep's results could not be written to ``path`` (None: they can). Checked before
    the sweep, by creating the folder and a file in it, so no measurement is lost at the end."""
    from dynconv.kernels.configs import is_config_file

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write into {folder} ({exc.strerror or exc}); choose another --output"
    if os.path.lexists(path):
        if not path.is_file():
            return f"{path} exists and is not a regular file; choose another --output"
        if not force and not is_config_file(path):
            return (f"{path} exists and is not a config file dynconv autotune wrote; it would be replaced. "
                    "Pass --force to replace it, or choose another --output")
    return None


def save(path: Path, device_name: str, kernels: dict) -> None:
    """Merge ``kernels`` into the file at ``path`` and write it, under the file's lock."""
    from dynconv.kernels import configs

    with configs.file_lock(path):
        configs.atomic_write_json(path, configs.merge_into(path, configs.new_file(device_name, kernels)))
    configs.clear_cache()


def _gpu() -> tuple:
    """(CUDA index, device name, sm arch, shared memory per block, L2 bytes) of the current GPU."""
    import torch

    from dynconv.kernels._launch import ARCHS, device_arch

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    arch = device_arch()
    shared_limit = getattr(props, "shared_memory_per_block_optin", None) or ARCHS.get(arch)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    return index, torch.cuda.get_device_name(index), arch, shared_limit, l2_bytes


def sweep(spaces: dict, ops: list[str] | None, dtypes: list[str], quick: bool, jobs: int, gpu: tuple,
          quiet: bool = False) -> dict:
    """Prune, time and choose on the GPU: the ``kernels`` section of a config file."""
    import torch

    index, _, arch, shared_limit, l2_bytes = gpu
    cases = build_grid(spaces, ops, dtypes, quick)
    total = sum(len(c.candidates) for c in cases)
    print(f"{len(cases)} shapes x passes, {total} candidate runs before pruning")
    dropped = prune(cases, arch, shared_limit, jobs, warm=jobs > 1, quiet=quiet)
    print(f"dropped {dropped} candidates that spill, overflow shared memory or do not compile on sm_{arch}")

    progress = Progress(len(cases), "time", quiet)
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # the timer's events and L2 flush are on the current device
    timer = new_timer(quick)
    for case in cases:
        time_case(case, spaces[case.kernel], device, l2_bytes, quick, timer)
        progress.update(f"{case.kernel} {case.label} {case.dtype}")
        torch.cuda.empty_cache()
    return choose(cases, spaces)


def _check_command(paths: list[str]) -> int:
    from dynconv.kernels._launch import kernels_are_interpreted

    if kernels_are_interpreted():
        print("dynconv autotune --check: TRITON_INTERPRET=1 is set; unset it to compile for sm_90", file=sys.stderr)
        return NO_GPU_STATUS
    failed = 0
    for path in paths:
        problems = check_file(path)
        failed += bool(problems)
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("dynconv autotune", __doc__)
    add_quiet(parser)
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="only these ops or kernels (e.g. involution dwconv involution_fwd); default all")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", default=list(DEFAULT_DTYPES),
                        help=f"dtypes to time (default {' '.join(DEFAULT_DTYPES)}; bfloat16 shares float16's rows)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and candidates, shorter timings")
    parser.add_argument("--output", metavar="PATH", help="write here (a file, or a folder for <GPU>.json) "
                                                         "instead of the user folder")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --output file even if dynconv autotune did not write it")
    parser.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="processes compiling candidates in parallel")
    parser.add_argument("--check", nargs="+", metavar="FILE",
                        help="validate config files instead (structure, limits, AOT compile for sm_90 "
                             "without spills); needs no GPU")
    args = parser.parse_args(argv)
    if args.check:
        return _check_command(args.check)

    try:
        dtypes = list(dict.fromkeys(DTYPES[d.lower()] for d in args.dtypes))
    except KeyError as exc:
        parser.error(f"unknown dtype {exc.args[0]!r}; choose from {sorted(set(DTYPES))}")

    reason = no_gpu_reason()
    if reason:
        print(f"dynconv autotune: {reason}", file=sys.stderr)
        return NO_GPU_STATUS

    from dynconv.kernels import configs

    spaces = configs.spaces()
    if args.ops:
        unknown = sorted(set(args.ops) - known_ops(spaces))
        if unknown:
            parser.error(f"unknown op {', '.join(unknown)}; choose from {', '.join(sorted(known_ops(spaces)))}")

    gpu = _gpu()
    device_name, arch = gpu[1], gpu[2]
    path = destination(args.output, device_name)
    problem = destination_problem(path, args.force)
    if problem:
        print(f"dynconv autotune: {problem}", file=sys.stderr)
        return 1
    started = time.monotonic()
    print(f"dynconv autotune: {device_name} (sm_{arch}), dtypes {', '.join(dtypes)}, writing {path}")

    kernels = sweep(spaces, args.ops, dtypes, args.quick, args.jobs, gpu, args.quiet)
    if not kernels:
        print("dynconv autotune: no candidate could be timed; nothing written", file=sys.stderr)
        return 1
    try:
        save(path, device_name, kernels)
    except OSError as exc:  # the destination broke during the sweep: keep the measurements anyway
        fd, rescue = tempfile.mkstemp(prefix=f"dynconv-autotune-{path.stem}-", suffix=".json")
        os.close(fd)
        configs.atomic_write_json(rescue, configs.new_file(device_name, kernels))
        print(f"dynconv autotune: could not write {path} ({exc}); the results are in {rescue}", file=sys.stderr)
        return 1
    print(f"wrote {path} in {clock(time.monotonic() - started)}")
    print("\n".join(speedup_summary(kernels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
