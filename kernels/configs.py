"""Choosing a kernel's launch configuration (block sizes, warps, stages) for a GPU and problem size.

Every launcher calls ``get_config(kernel, key, default)``: ``kernel`` names the kernel
(``"involution_fwd"``...), ``key`` is a flat dict of ints describing the problem (the launcher's
``problem_key``), ``default`` is the launcher's own safe configuration. The answer comes from,
in order:

1. the user folder: ``$DYNCONV_CONFIG_DIR``, else ``$XDG_CACHE_HOME/dynconv``, else
   ``~/.cache/dynconv`` — where ``dynconv autotune`` writes;
2. the files shipped in the package (``dynconv.autotune_configs``);
3. on a GPU with neither: the pruned candidates timed once per problem bucket with the timer of
   ``dynconv bench`` and ``dynconv autotune`` (:mod:`timing`) and the winner kept in memory (a few seconds per new bucket;
   ``DYNCONV_AUTOTUNE=0`` turns this off);
4. the launcher's default.

The first time step 3 or 4 is used for a GPU, one warning says so and names ``dynconv autotune``.
On CPU tensors and under the Triton interpreter (``TRITON_INTERPRET=1``) the default is returned
at once: the interpreter's speed says nothing about a GPU's. Answers are cached per exact key, so
after the first call a lookup costs about a microsecond. Lookups may run on several threads at
once (a hit takes no lock; tuning, warnings and clearing take ``_lock``).

Files
-----
One JSON file per GPU, named after the device as ``torch.cuda.get_device_name()`` reports it with
every run of non-alphanumerics turned into ``_``. H100 and H200 variants (SXM, PCIe, NVL, memory
sizes) share one canonical file, ``NVIDIA_H100.json`` / ``NVIDIA_H200.json``; a file under the
exact name (``NVIDIA_H100_PCIe.json``) is looked for first, so one variant can still be tuned
apart. In a folder::

    {
      "schema": 1,
      "device": "NVIDIA H100 80GB HBM3",       # as measured
      "triton": "3.6.0", "torch": "2.11.0",   # a file from another triton major.minor is ignored
      "measured": "2025-11-21T06:00:00+00:00",
      "kernels": {
        "involution_fwd": {
          "exact": ["K", "stride_h", "stride_w", "channels_last", "dtype_bytes"],
          "table": {
            "B=32,C=64,G=4,H=64,W=64,K=7,stride_h=1,stride_w=1,channels_last=0,dtype_bytes=2": {
              "config": {"BLOCK_G": 1, "BLOCK_CG": 4, "BLOCK_H": 4, "BLOCK_W": 32,
                         "num_warps": 4, "num_stages": 1},
              "ms": 0.412, "default_ms": 0.530, "shapes": ["RedNet-50 stage 1 ..."]
            }
          }
        }
      }
    }

A table key is the problem key *bucketed*: every field not listed in ``exact`` rounded to the
nearest power of two (so 56x56 and 64x64 images share a row). A key missing from the table takes
the row with equal ``exact`` fields nearest in log2 distance; with no such row the file has no
answer for it and the lookup moves on. Only ``config`` is required of a row, and a config is
used only if it has exactly the keys of the launcher's default, with powers of two for blocks and
warps and everything within Triton's limits, and if it keeps its kernel's tuning-space ``rules``
(what the kernel needs to compile and run, e.g. tl.dot's smallest tile). Only a regular file of
at most :data:`MAX_FILE_BYTES` is read (a FIFO, a device or a directory under the name is not
opened for reading). A file that cannot be read, fails to parse, is partial, or comes from
another schema or triton major.minor gives one warning and is skipped — a tuned config is only a
speed hint, so a bad file must never cost more than speed.

Contract for kernel modules (what ``dynconv autotune`` and step 3 sweep)
-----------------------------------------------------------------------
A tuning module (``kernels/<kernel module>_tuning.py``; it imports its kernel module, never the
reverse, and the kernels package imports it) takes part by defining ``autotune_space()`` returning
``{kernel_name: KernelSpace}`` for the names its launchers pass to ``get_config`` and passing that
function to :func:`register_spaces` when it loads: this module imports no kernel or tuning
module (they import it), so the import graph has no circle. A
:class:`KernelSpace` is plain functions over a *spec*, a picklable dict of plain data that the
module defines (sizes, layout, flags — everything but the dtype):

- ``problems(quick) -> [Problem]``: the representative shapes to sweep, each with a label and the
  op it belongs to (``dynconv autotune --ops`` filters on it); ``quick`` asks for a few.
- ``inputs(spec, dtype, device) -> dict``: tensors for one call (device may be ``"meta"``: that
  builds the launch for the AOT resource check without memory).
- ``launch(spec, tensors, config) -> Launch``: the launch the op would make with ``config``
  (``config`` must be passed through so the launcher does not ask ``get_config`` again). It may
  add scratch buffers to ``tensors``.
- ``key(spec, tensors) -> dict``: the problem key exactly as the launcher computes it.
- ``default(spec, tensors) -> dict``: the launcher's default config (the sweep's baseline).
- ``candidates(key, quick) -> [config]``: the candidate configs, already pruned by cheap static
  rules (elements per thread, tiles no larger than the problem). The sweep further drops those
  that spill or overflow shared memory on the GPU's architecture (``_launch.resource_usage``).
  :func:`neighbourhood` builds such a set around the default.
- ``spec_for_key(key) -> (spec, dtype)``: a representative problem for a key, for run-time tuning
  and for compiling shipped tables in tests.
- ``exact``: key fields never bucketed (dtype width, layout, kernel size...).
- ``rules(config, key) -> [str]``: why ``config`` cannot run the kernel at problem ``key`` (empty
  when it can), for a config with the default's keys and Triton's limits. The module's candidates
  keep these rules, and a config read from a file is checked by the same function, so a row
  that passes validation compiles and runs. Optional: none by default.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import timing

SCHEMA = 1
AUTOTUNE_COMMAND = "dynconv autotune"
# Triton refuses tensors of more elements (TRITON_MAX_TENSOR_NUMEL); a config beyond it cannot compile.
MAX_TILE_ELEMENTS = 1 << 20
MAX_BLOCK = 1 << 16
WARPS = (1, 2, 4, 8, 16, 32)  # 32 warps = 1024 threads, the CUDA block limit
MAX_STAGES = 8
# A tuned file holds tens of rows per kernel (kilobytes); anything near this is not one.
MAX_FILE_BYTES = 16 << 20


class ConfigWarning(UserWarning):
    """A tuned configuration is missing or unusable; the kernels still run, maybe slower."""


@dataclasses.dataclass(frozen=True)
class Problem:
    label: str  # for the progress line and the file's "shapes"
    op: str  # what `dynconv autotune --ops` selects, e.g. "involution", "dwconv"
    spec: dict


def no_rules(config: dict, key: dict) -> list[str]:
    return []


def always(spec: dict, tensors: dict) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class KernelSpace:
    problems: Callable[[bool], list[Problem]]
    inputs: Callable[[dict, Any, Any], dict]
    launch: Callable[[dict, dict, dict], Any]
    key: Callable[[dict, dict], dict]
    default: Callable[[dict, dict], dict]
    candidates: Callable[[dict, bool], list[dict]]
    spec_for_key: Callable[[dict], tuple]
    exact: tuple[str, ...] = ()
    rules: Callable[[dict, dict], list[str]] = no_rules
    # BLOCK names the launcher splits itself (strips of any length times a power of two of them):
    # these need only be positive integers <= MAX_BLOCK.
    free_blocks: tuple[str, ...] = ()
    # Whether the launcher reads its table for a problem (spec, its meta tensors): one it serves
    # with a kernel outside the space (the fused layer's halo kernels) is not swept.
    reads_table: Callable[[dict, dict], bool] = always


# ---------------------------------------------------------------------------------------------
# Device names and folders
# ---------------------------------------------------------------------------------------------

# Variants of one chip tune alike; the exact name is still tried first (see file_names).
_CANONICAL = ((re.compile(r"(?<![A-Za-z0-9])H100(?![0-9])", re.I), "NVIDIA_H100"),
              (re.compile(r"(?<![A-Za-z0-9])H200(?![0-9])", re.I), "NVIDIA_H200"))


def normalise_device_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def canonical_device_name(name: str) -> str:
    for pattern, canonical in _CANONICAL:
        if pattern.search(name):
            return canonical
    return normalise_device_name(name)


def file_names(device: str) -> list[str]:
    """File names tried in each folder for ``device``, most specific first."""
    names = [normalise_device_name(device) + ".json", canonical_device_name(device) + ".json"]
    return list(dict.fromkeys(names))


def user_config_dir() -> Path:
    explicit = os.environ.get("DYNCONV_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "dynconv"


def package_config_dir() -> Path:
    from dynconv import autotune_configs

    return Path(autotune_configs.__file__).parent


def config_dirs() -> list[Path]:
    return [user_config_dir(), package_config_dir()]


# ---------------------------------------------------------------------------------------------
# Keys and buckets
# ---------------------------------------------------------------------------------------------

def bucket_value(n: int) -> int:
    """The power of two nearest ``n`` in log2 (so 48 -> 64, 40 -> 32); 0 and negatives -> 1."""
    if n <= 1:
        return 1
    low = 1 << (int(n).bit_length() - 1)
    return low if math.log2(n) - math.log2(low) < 0.5 else low * 2


def bucket_key(key: dict, exact: Iterable[str]) -> dict:
    exact = set(exact)
    return {name: (int(value) if name in exact else bucket_value(int(value))) for name, value in key.items()}


def key_string(key: dict) -> str:
    return ",".join(f"{name}={int(value)}" for name, value in key.items())


def parse_key_string(text: str) -> dict:
    key = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name or name in key:
            raise ValueError(f"bad table key {text!r}")
        key[name] = int(value)
    return key


def _distance(a: dict, b: dict, exact: set) -> float:
    """log2 distance between two bucketed keys, or inf when they are not comparable."""
    if a.keys() != b.keys():
        return math.inf
    total = 0.0
    for name, value in a.items():
        if name in exact:
            if value != b[name]:
                return math.inf
        else:
            total += abs(math.log2(max(value, 1)) - math.log2(max(b[name], 1)))
    return total


def nearest_row(table: dict[str, dict], key: dict, exact: Iterable[str]) -> tuple[str, dict] | None:
    """The row of ``table`` for ``key``: its own bucket, else the nearest comparable one."""
    exact = set(exact)
    wanted = bucket_key(key, exact)
    own = table.get(key_string(wanted))
    if own is not None:
        return key_string(wanted), own
    best = None
    for text, row in table.items():
        d = _distance(wanted, parse_key_string(text), exact)
        if d < math.inf and (best is None or (d, text) < best[0]):
            best = ((d, text), row)
    return None if best is None else (best[0][1], best[1])


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _is_pow2(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


def config_problems(config: Any, default: dict, free_blocks: tuple[str, ...] = ()) -> list[str]:
    """Why ``config`` may not stand in for ``default`` (empty when it may); ``free_blocks``: the
    kernel space's BLOCK names that need not be powers of two."""
    if not isinstance(config, dict):
        return [f"config is {type(config).__name__}, not an object"]
    problems = []
    if set(config) != set(default):
        # A missing key would crash the launcher; an extra one means another kernel's config.
        problems.append(f"keys {sorted(config)} differ from the launcher's {sorted(default)}")
    for name, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name}={value!r} is not an integer")
        elif name in free_blocks and not 1 <= value <= MAX_BLOCK:
            problems.append(f"{name}={value} is not in 1..{MAX_BLOCK}")
        elif name.startswith("BLOCK") and name not in free_blocks and not (_is_pow2(value) and value <= MAX_BLOCK):
            problems.append(f"{name}={value} is not a power of two <= {MAX_BLOCK}")
        elif name == "num_warps" and value not in WARPS:
            problems.append(f"num_warps={value} not in {WARPS}")
        elif name == "num_stages" and not 1 <= value <= MAX_STAGES:
            problems.append(f"num_stages={value} not in 1..{MAX_STAGES}")
    if not problems:
        tile = math.prod(v for n, v in config.items() if n.startswith("BLOCK"))
        if tile > MAX_TILE_ELEMENTS:
            problems.append(f"tile of {tile} elements exceeds Triton's {MAX_TILE_ELEMENTS}")
    return problems


def row_problems(kernel: str, config: Any, key: dict, default: dict) -> list[str]:
    """Why a file's ``config`` may not run ``kernel`` at problem ``key`` (empty when it may): the
    generic checks, then the kernel's own tuning-space rules."""
    space = spaces().get(kernel)
    problems = config_problems(config, default, space.free_blocks if space is not None else ())
    if problems:
        return problems
    return list(space.rules(config, key)) if space is not None else []


def _version_mm(version: str) -> tuple[str, ...]:
    return tuple(str(version).split("+")[0].split(".")[:2])


def triton_version() -> str:
    import triton

    return triton.__version__


def file_problems(data: Any) -> list[str]:
    """Structural problems of a parsed config file (empty when it can be used here)."""
    if not isinstance(data, dict):
        return ["not a JSON object"]
    if data.get("schema") != SCHEMA:
        return [f"schema {data.get('schema')!r}, this dynconv reads schema {SCHEMA}"]
    if not isinstance(data.get("triton"), str):
        return ["no triton version"]
    if _version_mm(data["triton"]) != _version_mm(triton_version()):
        # Code generation changes between triton releases; so do the winners.
        return [f"measured with triton {data['triton']}, this is triton {triton_version()}"]
    kernels = data.get("kernels")
    if not isinstance(kernels, dict):
        return ["no kernels table"]
    problems = []
    for name, entry in kernels.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("table"), dict):
            problems.append(f"{name}: no table")
            continue
        exact = entry.get("exact", [])
        if not isinstance(exact, list) or not all(isinstance(e, str) for e in exact):
            problems.append(f"{name}: 'exact' is not a list of names")
        for text, row in entry["table"].items():
            try:
                parse_key_string(text)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
            if not isinstance(row, dict) or not isinstance(row.get("config"), dict):
                problems.append(f"{name}[{text}]: no config")
    return problems


# ---------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------

_warned: set = set()
_lock = threading.RLock()


def _warn_once(tag: Any, message: str) -> None:
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, ConfigWarning, stacklevel=4)


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of the regular file at ``path``.

    Raises FileNotFoundError when there is none, and OSError or ValueError (with the reason) for
    anything else that is not a readable JSON file of at most :data:`MAX_FILE_BYTES`: a FIFO
    (opened non-blocking, so no writer is waited for), a device such as /dev/zero, a directory,
    an oversized file, bad UTF-8, bad JSON, or JSON nested deeper than the parser's recursion limit.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        # fstat after open: what was opened is what is checked (no race with a swapped name).
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than a config file's {MAX_FILE_BYTES}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        raw = f.read(MAX_FILE_BYTES + 1)  # the size may change after the stat
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"more than a config file's {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict | None:
    """The file's kernels table, or None (absent, or unusable: warned once)."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _warn_once(("file", path), f"dynconv: ignoring config file {path}: {exc}")
        return None
    problems = file_problems(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _warn_once(("file", path), f"dynconv: ignoring config file {path}: {problems[0]}{more}; "
                                   f"run `{AUTOTUNE_COMMAND}` to measure this GPU again")
        return None
    return data["kernels"]


def lookup_file(path: str | os.PathLike, kernel: str, key: dict, default: dict) -> dict | None:
    """The validated config ``path`` holds for ``kernel`` at ``key``, or None."""
    kernels = _load(str(path))
    entry = (kernels or {}).get(kernel)
    if entry is None:
        return None
    found = nearest_row(entry["table"], key, entry.get("exact", []))
    if found is None:
        return None
    text, row = found
    problems = row_problems(kernel, row["config"], key, default)
    if problems:
        _warn_once(("row", str(path), kernel, text),
                   f"dynconv: ignoring {kernel}[{text}] in {path}: {'; '.join(problems)}")
        return None
    return dict(row["config"])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never a mix.

    The temporary file has a unique name (concurrent writers never share one) and lives in the
    destination folder: os.replace is atomic only within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


LOCK_TIMEOUT_S = 120


def file_lock(path: str | os.PathLike):
    """An inter-process lock for a read-merge-write of ``path`` (a hidden ``.<name>.lock`` beside
    it): two tools finishing together would otherwise each merge into the file the other is
    about to replace, and one's rows would be lost."""
    import filelock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(path.parent / f".{path.name}.lock"), timeout=LOCK_TIMEOUT_S)


def is_config_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds something ``dynconv autotune`` wrote (of any schema or triton
    version), so that replacing it loses nothing the user made: a JSON object with a schema and
    a kernels table, or an empty file."""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            return True
        data = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "schema" in data and isinstance(data.get("kernels"), dict)


def new_file(device: str, kernels: dict, measured: datetime.datetime | None = None) -> dict:
    import torch

    measured = measured or datetime.datetime.now(datetime.timezone.utc)
    return {"schema": SCHEMA, "device": device, "triton": triton_version(),
            "torch": torch.__version__.split("+")[0], "measured": measured.isoformat(timespec="seconds"),
            "kernels": kernels}


def merge_into(path: str | os.PathLike, data: dict) -> dict:
    """``data`` with the rows of the usable file at ``path`` that ``data`` does not replace, so a
    partial sweep (``--ops``) keeps what an earlier one measured."""
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return data
    if file_problems(old):
        return data
    merged = {name: {"exact": entry.get("exact", []), "table": dict(entry["table"])} for name, entry in old["kernels"].items()}
    for name, entry in data["kernels"].items():
        if name in merged and merged[name]["exact"] == entry["exact"]:
            merged[name]["table"].update(entry["table"])
        else:
            merged[name] = entry
    return {**data, "kernels": merged}


# ---------------------------------------------------------------------------------------------
# Candidate sets
# ---------------------------------------------------------------------------------------------

def neighbourhood(default: dict, limits: dict[str, int], *, elements_per_thread=(2, 64), size=12,
                  vary=None, warps=(1, 2, 4, 8), stages=(1,)) -> list[dict]:
    """Configs around ``default``: each ``BLOCK_*`` scaled by 1/4..4 (capped at ``limits[name]``,
    the problem's own size rounded up to a power of two), with ``elements_per_thread`` of the tile
    per thread, the ``size`` nearest to the default in log2 distance. The default comes first, so
    a sweep can never pick something worse than what runs without tuning.
    """
    blocks = [name for name in default if name.startswith("BLOCK")]
    vary = blocks if vary is None else vary
    choices = []
    for name in blocks:
        cap = max(1, triton_next_pow2(limits.get(name, MAX_BLOCK)))
        if name in vary:
            options = {min(cap, max(1, default[name] * 2 ** s if s >= 0 else default[name] >> -s)) for s in (-2, -1, 0, 1, 2)}
        else:
            options = {default[name]}
        choices.append(sorted(options))
    seen, out = set(), []
    for values in itertools.product(*choices, warps, stages):
        config = dict(zip(blocks, values[:len(blocks)]))
        config.update(num_warps=values[-2], num_stages=values[-1])
        config = {name: config.get(name, default[name]) for name in default}
        tile = math.prod(config[name] for name in blocks)
        per_thread = tile / (32 * config["num_warps"])
        if not elements_per_thread[0] <= per_thread <= elements_per_thread[1]:
            continue
        frozen = tuple(config.items())
        if frozen not in seen:
            seen.add(frozen)
            out.append(config)

    def distance(c):
        return sum(abs(math.log2(c[n]) - math.log2(default[n])) for n in (*blocks, "num_warps")) + abs(c["num_stages"] - default["num_stages"])

    out.sort(key=lambda c: (distance(c), tuple(c.values())))
    out = [c for c in out if c != default][: max(0, size - 1)]
    return [dict(default)] + out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# The run-time lookup
# ---------------------------------------------------------------------------------------------

def _interpreter_probe():
    """An empty kernel decorated when this module loads, as the kernel modules (which import it)
    load right after: Triton picks interpreter or compiler at decoration time."""
    import triton

    @triton.jit
    def probe():
        pass

    return probe


_PROBE = _interpreter_probe()


def kernels_are_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before the kernels were imported (a decoration-time switch)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_PROBE, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _gpu_usable() -> bool:
    import torch

    return not kernels_are_interpreted() and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def _active_device() -> str | None:
    """The CUDA device the kernels launch on (Triton uses the current one), or None when the
    kernels cannot run compiled here (no GPU, or the interpreter)."""
    if not _gpu_usable():
        return None
    import torch

    return _device_name(torch.cuda.current_device())


# The tuning modules register their ``autotune_space`` here when they load (the kernels package
# imports them): they import the kernels, which import this module, so it cannot import them.
_space_sources: list[Callable[[], dict[str, KernelSpace]]] = []


def register_spaces(autotune_space: Callable[[], dict[str, KernelSpace]]) -> None:
    """Add a tuning module's ``autotune_space`` to what :func:`spaces` returns."""
    with _lock:
        if autotune_space not in _space_sources:
            _space_sources.append(autotune_space)
            spaces.cache_clear()


@functools.lru_cache(maxsize=None)
def spaces() -> dict[str, KernelSpace]:
    """Every kernel's :class:`KernelSpace`, from the registered tuning modules."""
    found = {}
    for autotune_space in list(_space_sources):
        found.update(autotune_space())
    return found


def _run_time_tuning_enabled() -> bool:
    return os.environ.get("DYNCONV_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


# Counts answers that must not be remembered (a CUDA-graph capture's stand-in default): the launch
# plan cache (_launch.planned) stores a plan only if this did not move while it was built.
provisional_answers = 0

_tuned: dict = {}  # (device, kernel, bucket) -> winner of run-time tuning, or None when it failed


class _NotNow(Exception):
    """Raised through the lookup cache so that a CUDA-graph capture's answer is not remembered."""


def _tune_at_run_time(device: str, kernel: str, key: dict, default: dict) -> dict | None:
    """Time the quick candidate set for ``key``'s bucket on this GPU once; None when impossible."""
    import torch

    if not _run_time_tuning_enabled():
        return None
    if torch.cuda.is_current_stream_capturing():
        # Timing would break the capture; answer with the default this once, tune on a later call.
        raise _NotNow
    space = spaces().get(kernel)
    if space is None:
        return None
    bucket = (device, kernel, key_string(bucket_key(key, space.exact)))
    # Under the lock: two threads never time the same bucket (nor disturb each other's timings),
    # and a concurrent clear_cache cannot empty the table between the store and the read.
    with _lock:
        if bucket not in _tuned:
            _tuned[bucket] = _time_candidates(space, key, default)
        return _tuned[bucket]


def _time_candidates(space: KernelSpace, key: dict, default: dict) -> dict | None:
    import torch

    try:
        spec, dtype = space.spec_for_key(key)
        tensors = space.inputs(spec, dtype, torch.device("cuda", torch.cuda.current_device()))
        # The timer of `dynconv bench` and `dynconv autotune`, with their --quick windows.
        timer = timing.Timer("cuda", 5.0, 20.0)
    except (RuntimeError, ValueError):  # out of memory, or a key the space cannot rebuild
        return None
    best = None
    for config in space.candidates(key, True):
        if config_problems(config, default, space.free_blocks):
            continue
        try:
            launch = space.launch(spec, tensors, config)
            ms = timer(lambda i: launch())[0]
        except Exception:  # noqa: BLE001 - a candidate that cannot compile or launch is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    del tensors
    return None if best is None else dict(best[1])


@functools.lru_cache(maxsize=4096)
def _resolve(device: str, kernel: str, key: tuple, default: tuple) -> tuple | None:
    key, default = dict(key), dict(default)
    for folder in config_dirs():
        for name in file_names(device):
            config = lookup_file(folder / name, kernel, key, default)
            if config is not None:
                return tuple(config.items())
    config = _tune_at_run_time(device, kernel, key, default)
    if config is not None:
        _warn_once(("fallback", device),
                   f"dynconv: no tuned kernel configs for {device} in {config_dirs()[0]} or the package; "
                   f"timing candidates at run time for each new problem size (slow first calls). "
                   f"Run `{AUTOTUNE_COMMAND}` once to tune this GPU.")
        return tuple(config.items())
    _warn_once(("fallback", device),
               f"dynconv: no tuned kernel configs for {device} in {config_dirs()[0]} or the package; "
               f"using untuned defaults, which can be much slower. Run `{AUTOTUNE_COMMAND}` once to tune this GPU.")
    return None


def get_config(kernel: str, key: dict, default: dict) -> dict:
    """The configuration for ``kernel`` at problem ``key`` (a dict of ints) on the current GPU."""
    device = _active_device()
    if device is None:
        return default
    try:
        found = _resolve(device, kernel, tuple(key.items()), tuple(default.items()))
    except _NotNow:
        global provisional_answers
        with _lock:  # a read-modify-write: concurrent captures must each move the counter
            provisional_answers += 1
        return default
    return default if found is None else dict(found)


def clear_cache() -> None:
    """Forget loaded files, run-time tuning and warnings (after writing a file, and in tests)."""
    with _lock:
        _load.cache_clear()
        _resolve.cache_clear()
        _tuned.clear()
        _warned.clear()
        hooks = list(_on_clear)
    for hook in hooks:
        hook()


# Called by clear_cache: caches built from configs register here (the launch plans of _launch,
# which imports this module, so it cannot be imported from here).
_on_clear: list[Callable[[], None]] = []


def on_clear(hook: Callable[[], None]) -> None:
    with _lock:
        if hook not in _on_clear:
            _on_clear.append(hook)
