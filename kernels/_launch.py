"""A kernel launch as data: run it, or compile it ahead of time for a GPU we do not have.

Every launcher in ``kernels/`` builds a :class:`Launch` (kernel, grid, arguments, meta-parameters)
and calls it. Building the same object from ``meta`` tensors gives the exact signature the JIT
would see on a GPU, so the AOT compile check and ``dynconv inspect`` test what really launches.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

from . import configs
from .configs import kernels_are_interpreted  # noqa: F401 - the ops and tools ask here

_INTERPRETED = kernels_are_interpreted()  # fixed when the kernels were decorated

_TRITON_DTYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}

# The installed triton's (major, minor). A few defaults depend on it: the ptxas each triton ships
# allocates registers differently, and a tile one keeps in registers another spills.
TRITON_VERSION = tuple(int(n) for n in triton.__version__.split(".")[:2])

# Architectures the AOT check compiles for, with their shared-memory ceiling per block (bytes).
ARCHS = {90: 232448, 80: 166912}


@functools.lru_cache(maxsize=None)
def _arch_of(device: int) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_arch() -> int:
    """The current CUDA device's architecture as 90 for sm_90 (Triton launches on the current one)."""
    return _arch_of(torch.cuda.current_device())


@contextlib.contextmanager
def conv_tf32(allowed: bool):
    """torch's tf32 switch for convs, which the fp32 tensor-core kernels follow, set for a block: the
    catalogues list the launches of both settings. Not for threads: the switch is process-wide."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code: triton.cdiv is a JIT-aware wrapper that costs microseconds a call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without triton's per-call wrapper overhead."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


INT32_MAX = 2**31 - 1


def split_tiles(tiles: int, splits: int, s: int) -> range:
    """The tiles the programs of split s of a persistent loop walk: s, s + splits, ..."""
    return range(s, tiles, splits)


def split_trips(tiles: int, splits: int) -> int | list[int]:
    """A persistent loop's trips (``Launch.loops``): one count per split (split_tiles), equally many
    programs each (one count where they agree)."""
    trips = [len(split_tiles(tiles, splits, s)) for s in range(splits)]
    return trips[0] if len(set(trips)) == 1 else trips


def conv_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision in a conv kernel: fp32 follows torch's conv switch (on by
    default), so the kernels round like cuDNN would."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether any element offset of these tensors (None: absent) exceeds int32 (then the kernels
    take their INDEX_64 variant, which forms every offset in 64 bits)."""
    return any(t is not None and _max_offset(t) > INT32_MAX for t in tensors)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def inner_strides(prefix: str, t: torch.Tensor, axes: str = "chw") -> dict[str, int]:
    """``t``'s strides along its last ``len(axes)`` dims, named ``prefix + axis`` ("sx", x, "hw" ->
    sxh, sxw): passed as compile-time constants, they make a kernel variant per feature-map size, and
    every tap's and halo row's offset from a program's base pointer an immediate."""
    return {prefix + a: s for a, s in zip(axes, t.stride()[t.dim() - len(axes):])}


def runs_kernels(t: torch.Tensor) -> bool:
    """Whether the ops hand ``t`` to the Triton kernels: a CUDA tensor, or under TRITON_INTERPRET=1
    any tensor with data (a meta tensor takes the plain path: shapes only, nothing to interpret)."""
    return t.is_cuda or (_INTERPRETED and not t.is_meta)


def is_channels_last(t: torch.Tensor) -> bool:
    """NHWC strides that are not also NCHW-contiguous (as for C == 1 or 1x1 images)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **meta, num_warps=..., num_stages=...)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    meta: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    label: str = field(default="")
    # Trip counts of the kernel's runtime ``for`` loops per program, in source order: an int per loop
    # without inner loops (a list of ints where equally many programs run each, e.g. one per stride
    # phase, or per persistent split: split_trips), ``(trips, (inner loops...))`` otherwise; a list of
    # such tuples where classes of programs, equally many each, walk different trips all the way down
    # (the depth-wise weight gradient's splits, whose tiles differ). Read only by the static
    # performance model (dynconv/bounds.py), which matches them to the loops of the compiled code.
    loops: tuple | list = field(default=())
    # The program whose warp 0 the static model simulates for its memory accesses (its sector use);
    # empty: the grid's middle program. A launcher whose middle program is an edge tile names one
    # off the image's borders, the model's assumed typical program.
    typical_program: tuple = field(default=())
    # Registers a thread may take when compiled for sm_90 (ptxas' maxnreg; 0: ptxas chooses). A
    # launcher caps a kernel a few registers over a residency step where ptxas fits it without
    # spilling there; other architectures compile it uncapped (the AOT check compiles both ways).
    # The cap is a bet on occupancy, checked on the compiled kernel: where ptxas gives it local
    # memory under the cap (a shape the launcher's sweep did not see), it runs uncapped (__call__,
    # after its first run) and compiles so (compile: what the AOT check and the static model see).
    sm90_max_registers: int = 0
    # The run-time cap check's key (cap_key); empty: formed at each call. A plan forms its launches'
    # once: forming and hashing it cost about a microsecond of host time a call.
    specialisation: tuple = field(default=(), repr=False, compare=False)

    def cap_key(self) -> tuple:
        """(kernel, meta items): what __call__'s cap check keys on (``_LOCAL_MEMORY_UNDER_CAP``)."""
        return self.specialisation or (self.kernel, tuple(self.meta.items()))

    def compile_options(self, arch: int, capped: bool = True) -> dict:
        """Triton's compile options for ``arch`` (90 for sm_90; 0 where none applies)."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if capped and self.sm90_max_registers and arch == 90:
            options["maxnreg"] = self.sm90_max_registers
        return options

    def __call__(self) -> None:
        if min(self.grid) == 0:
            return
        arch = 0 if _INTERPRETED or not self.sm90_max_registers else device_arch()
        options = self.compile_options(arch)
        if "maxnreg" not in options:
            self.kernel[self.grid](**self.args, **self.meta, **options)
            return
        specialisation = self.cap_key()
        if specialisation in _LOCAL_MEMORY_UNDER_CAP:
            options = self.compile_options(arch, capped=False)
        compiled = self.kernel[self.grid](**self.args, **self.meta, **options)
        if "maxnreg" in options and getattr(compiled, "n_spills", 0):  # the kernel's local bytes / 4
            _LOCAL_MEMORY_UNDER_CAP.add(specialisation)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    # -- ahead-of-time compilation --------------------------------------------------------
    def _jit_function(self):
        fn = self.kernel
        # An interpreted kernel wraps the plain JITFunction we need for compilation.
        while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = triton.jit(fn)
        return fn

    def source(self):
        """The ASTSource the JIT would build for these arguments (same specialisation rules)."""
        from triton.compiler import ASTSource

        fn = self._jit_function()
        values = {**self.args, **self.meta}
        signature, constexprs, attrs = {}, {}, {}
        for index, name in enumerate(fn.arg_names):
            value = values[name]
            if name in self.meta or value is None or isinstance(value, bool) or (isinstance(value, int) and value == 1):
                # The JIT turns None and integers equal to 1 into compile-time constants.
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TRITON_DTYPE[value.dtype]
                attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                # The JIT records an (empty) attribute list for every specialisable argument; doing
                # the same keeps AOT compiles and JIT launches on the same cache entry.
                attrs[(index,)] = [["tt.divisibility", 16]] if value % 16 == 0 else []
            elif isinstance(value, float):
                # As the JIT: fp32, unless the kernel declares the parameter's type (fp64 in na2d).
                signature[name] = fn.params[index].annotation_type or "fp32"
            else:
                raise TypeError(f"cannot derive a Triton type for argument {name}={value!r}")
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)

    def compile(self, arch: int = 90):
        """Compiled for sm_<arch> as it runs there: under its sm_90 cap unless ptxas gives it local
        memory (a stack frame) under it, as __call__ decides."""
        from triton.backends.compiler import GPUTarget

        target = GPUTarget("cuda", arch, 32)
        options = self.compile_options(arch)
        compiled = triton.compile(self.source(), target=target, options=options)
        if "maxnreg" in options and _local_bytes(compiled):
            compiled = triton.compile(self.source(), target=target, options=self.compile_options(arch, capped=False))
        return compiled


# Kernel specialisations (kernel, meta) that ptxas gave local memory under their sm_90 register cap
# on this GPU: they run uncapped from their second call on (Launch.sm90_max_registers). A set's add
# and membership test are atomic, so serving threads may share it.
_LOCAL_MEMORY_UNDER_CAP: set[tuple] = set()


# ---------------------------------------------------------------------------------------------
# Launch plans: eager loops repeat a few problems, and building a Launch (config lookup, int64
# check, grid, ~40 arguments) costs more host time than the rest of an op call.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    kernel: Any
    grid: tuple[int, ...]
    scalars: dict[str, Any]
    meta: dict[str, Any]
    num_warps: int
    num_stages: int
    loops: tuple | list = ()
    sm90_max_registers: int = 0
    specialisation: tuple = ()


_plans: dict[tuple, _Plan] = {}
MAX_PLANS = 1024
# Serving threads share the plans. A hit is one dict.get, atomic on its own, so only the writers
# (store with eviction, clear) take the lock: evicting while another thread inserts would
# otherwise delete a key twice or iterate a dict that changes size.
_plans_lock = threading.Lock()


def clear_plans() -> None:
    """Forget every launch plan (``configs.clear_cache`` calls this: a plan holds its config)."""
    with _plans_lock:
        _plans.clear()


configs.on_clear(clear_plans)  # a plan holds the config it was built with


def _store_plan(key: tuple, plan: _Plan) -> None:
    with _plans_lock:
        while len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest: a bound, not a policy (models repeat few shapes)
        _plans[key] = plan


def planned(key: tuple, names: tuple[str, ...], tensors: tuple, build) -> Launch:
    """``build()``'s Launch, from a plan cached under ``key`` with only the tensor arguments filled in.

    ``key`` must determine everything in the launch but the tensors' data: every shape, stride and
    dtype, the geometry, and the explicit config or None; the GPU the config lookup answers for and
    torch's tf32 switch for convs (fp32 kernels choose their products' precision by it) are added
    here. ``names`` are the argument names that take ``tensors`` (None allowed); the rest of the
    arguments must follow from ``key``. Meta tensors never come here (``cacheable``).
    """
    key = (key, configs._active_device(), torch.backends.cudnn.allow_tf32)
    plan = _plans.get(key)
    if plan is not None:
        args = dict(zip(names, tensors))
        args.update(plan.scalars)
        return Launch(plan.kernel, plan.grid, args, plan.meta, plan.num_warps, plan.num_stages, loops=plan.loops,
                      sm90_max_registers=plan.sm90_max_registers, specialisation=plan.specialisation)
    provisional = configs.provisional_answers
    launch = build()
    if configs.provisional_answers == provisional:
        scalars = {k: v for k, v in launch.args.items() if k not in names}
        assert not any(isinstance(v, torch.Tensor) for v in scalars.values()), "a tensor argument not in names"
        meta = dict(launch.meta)
        specialisation = (launch.kernel, tuple(meta.items())) if launch.sm90_max_registers else ()
        _store_plan(key, _Plan(launch.kernel, launch.grid, scalars, meta, launch.num_warps, launch.num_stages,
                               launch.loops, launch.sm90_max_registers, specialisation))
    return launch


def cacheable(t: torch.Tensor) -> bool:
    """Whether launches on ``t`` may use a plan: meta tensors (AOT checks, ``dynconv inspect``, tests
    that watch the config lookup) always build theirs afresh."""
    return t.device.type != "meta"


def layout(t: torch.Tensor | None) -> tuple | None:
    """A tensor's part of a plan key."""
    return None if t is None else (t.dtype, t.device, t.shape, t.stride())


def config_key(config: dict | None) -> tuple | None:
    """An explicit config's part of a plan key (None: the launcher looks one up)."""
    return None if config is None else tuple(config.items())


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def unwritten_dots(ttir: str) -> list[str]:
    """``file:line`` of each ``tt.dot`` in ``ttir`` that Triton made rather than a ``tl.dot``.

    Triton's combine pass rewrites ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)`` into a dot
    with tf32 inputs whatever the dtype and with no check of the contraction's length: fp32 rounded
    to 10 mantissa bits, and on triton 3.6 wrong sums for a contraction of 2 or 4 (seen on an H200).
    Such a dot keeps the location of the reduction, which lies in triton's own ``language``
    package (``tl.sum``); a written dot's lies in the kernel. Each location is followed to the
    first source position it names (the callee of a callsite). Files are not read: a cached
    compile keeps the paths of the checkout that compiled it.
    """
    locations = dict(re.findall(r"^(#loc\d+) = (.*)$", ttir, re.M))
    found = []
    for line in ttir.splitlines():
        if "tt.dot " not in line or (ref := re.search(r"loc\((#loc\d+)\)\s*$", line)) is None:
            continue
        where = locations.get(ref.group(1), "")
        for _ in range(32):  # named and callsite locations refer on to others
            inner = re.search(r"#loc\d+", where)
            if inner is None:
                break
            where = locations.get(inner.group(0), "")
        site = re.search(r'"([^"]+)":(\d+)', where)
        if site is None or "/triton/language/" in site.group(1).replace("\\", "/"):
            found.append(f"{Path(site.group(1)).name}:{site.group(2)}" if site else f"? {where[:80]}")
    return found


def cubin_dumps(compiled) -> tuple[dict[str, int], str]:
    """A compiled kernel's resource usage (``REG``, ``STACK``, ``SHARED``, ``LOCAL``) and its SASS,
    as ``cuobjdump`` prints them."""
    usage, sass = _cuobjdump_outputs(compiled, "--dump-resource-usage", "-sass")
    return _usage_counts(usage), sass


def _cuobjdump_outputs(compiled, *flags: str) -> list[str]:
    """What ``cuobjdump <flag>`` prints of the compiled kernel's cubin, for each flag."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return [subprocess.run([_cuobjdump(), flag, cubin.name], capture_output=True, text=True, check=True).stdout
                for flag in flags]


def _usage_counts(dump: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", dump)}


def _local_bytes(compiled) -> int:
    """A compiled kernel's local memory a thread (its stack frame: spills included), as the driver's
    CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, which triton reports as 4 x ``n_spills``, counts it. Its
    resource usage alone: the SASS dump of a large kernel is most of cubin_dumps' time."""
    usage = _usage_counts(*_cuobjdump_outputs(compiled, "--dump-resource-usage"))
    return usage.get("STACK", 0) + usage.get("LOCAL", 0)


def coalescing_work(ttir: str) -> int:
    """The operations of a kernel's TTIR times its memory accesses (loads, stores, atomics): the work
    of triton 3.6's coalescing pass, which walks the whole slice of operations around each access.
    Its compile time follows this product (R4's channels_last fp32 walk on sm_80: 0.39 M compiled
    in 4 s, 0.85 M in 10 s, 2.8 M in 37 s), where the rest of a compile grows with the operations."""
    operations = len(re.findall(r"^\s*(?:%\S+ = )?\"?[a-z_]+\.[a-z_.]+\"?[ (<]", ttir, re.M))
    accesses = len(re.findall(r"\btt\.(?:load|store|atomic_rmw|atomic_cas)\b", ttir))
    return operations * accesses


def resource_usage(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile ``launch`` for sm_<arch> and report registers, spills, shared memory and load widths."""
    compiled = launch.compile(arch)
    usage, sass = cubin_dumps(compiled)
    # A spill is local-memory traffic. STACK alone can be non-zero for a dead local depot that
    # LLVM leaves in the PTX (8 bytes, never loaded or stored), so count LDL/STL in the SASS.
    local_memory_ops = len(re.findall(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\b", sass))
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"\bld\.global(?:\.[a-z0-9]+)*", ptx)
    vector_loads = sum(1 for op in loads if ".v2" in op or ".v4" in op)
    return {
        "kernel": launch.name,
        "label": launch.label,
        "arch": f"sm_{arch}",
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
        "registers": int(usage.get("REG", 0)),
        "sm90_max_registers": launch.sm90_max_registers,
        "stack_bytes": int(usage.get("STACK", 0)),
        "local_memory_ops": local_memory_ops,
        "spilled": local_memory_ops > 0 or int(usage.get("LOCAL", 0)) > 0,
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": ARCHS.get(arch),
        "global_loads": len(loads),
        "vector_loads": vector_loads,
        "unwritten_dots": unwritten_dots(compiled.asm["ttir"]),
        "coalescing_work": coalescing_work(compiled.asm["ttir"]),
        "meta": dict(launch.meta),
    }
