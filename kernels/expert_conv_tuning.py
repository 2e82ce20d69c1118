"""Autotuning space of the expert-conv kernels (``kernels/expert_conv.py``, ``expert_conv_guide.py``,
``expert_conv_input_grad.py``, ``expert_conv_weight_grad.py``, ``region_conv.py``,
``region_conv_input_grad.py``; contract in ``kernels/configs.py``).

Five configs are tuned, one per ``get_config`` name of the launchers:

* ``expert_conv_fwd`` (also used by the DRConv guide-score kernel, which recomputes the forward);
* ``expert_conv_bwd_input``;
* ``expert_conv_bwd_weight`` (its launcher keys the problem with E = 1: the kernel gradient does
  not depend on the experts);
* ``region_conv_fwd``: DRConv's region forward (``kernels/region_conv.py``), on the DRConv layers;
* ``region_conv_columns``: DRConv's input-gradient column product (``kernels/region_conv_input_grad.py``).

Every pass is a ``tl.dot`` implicit GEMM with a (rows, cols, reduction) tile: (BLOCK_P, BLOCK_N,
BLOCK_K) for the forward, the input gradient and the column product, (BLOCK_O, BLOCK_N, BLOCK_K) for
the kernel gradient, (BLOCK_P, BLOCK_O, BLOCK_K) for the region forward (BLOCK_K channels of one tap).
Candidates are the neighbourhood of the launcher's default, pruned to what ``tl.dot`` takes (every
block a power of two >= 16), tiles no larger than the problem, and what plausibly fits registers
and shared memory (:func:`_plausible`).

An NCHW layer is timed as the op runs it (:func:`_route`): where a pass reads a channels_last copy
of its NCHW operand, the copy's kernel is timed under the copy's key (the row the op looks up,
which the layer's channels_last problem times too: ``choose`` takes the best config over both);
where it reads the operand in row boxes (``expert_conv_rows``, no table) the pass is not swept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import expert_conv as ec
from . import expert_conv_input_grad as eci
from . import expert_conv_weight_grad as ecw
from . import region_conv as rc
from . import region_conv_input_grad as rcg
from . import region_tables as rt
from ._launch import Launch
from .configs import KernelSpace, Problem, neighbourhood, register_spaces

# Block shapes of a group-wise conv depend on the channels per group. `groups` is bucketed like
# the channel counts, so a grouped layer takes the nearest tuned grouped row (16 and 32 groups lie
# one log2 step apart, a dense row five) instead of always missing; `depthwise` is exact, so a
# depth-wise layer never borrows a dense or grouped layer's tiles (without a row of its own it
# is tuned at run time).
# Both stride components are exact: a (1, 2) layer must not take a (1, 1) layer's tiles.
_EXACT = ("kh", "kw", "stride_h", "stride_w", "depthwise", "channels_last", "dtype_bytes")
_DTYPES = {2: torch.float16, 4: torch.float32, 8: torch.float64}

# (label, op, B, Cin, Cout, H = W, k, stride, E, m, groups): CondConv / DynamicConv on ResNet layers
# and DRConv, the reference shapes of dynconv.roofline (E1, E2, D1) plus a 1x1, a strided and a
# grouped (ResNeXt) layer, so grouped layers have a row to find.
_LAYERS = [
    ("E1 CondConv ResNet stage 3 3x3", "expert_conv2d", 64, 256, 256, 28, 3, 1, 4, 1, 1),
    ("E2 DynamicConv ResNet stage 2 3x3", "expert_conv2d", 128, 128, 128, 56, 3, 1, 4, 1, 1),
    ("CondConv ResNet stage 3 1x1 expand", "expert_conv2d", 64, 256, 1024, 14, 1, 1, 4, 1, 1),
    ("CondConv ResNet stage 2 3x3 stride 2", "expert_conv2d", 64, 128, 128, 56, 3, 2, 4, 1, 1),
    ("CondConv ResNeXt-50 stage 2 3x3, 32 groups", "expert_conv2d", 64, 256, 256, 28, 3, 1, 4, 1, 32),
    ("D1 DRConv m=8", "drconv", 32, 128, 128, 28, 3, 1, 8, 8, 1),
]
_QUICK = ("E1 CondConv ResNet stage 3 3x3", "D1 DRConv m=8")

# Static plausibility (per thread of the CTA): fp32 accumulator elements, operand elements held
# in registers before the MMA, and the shared memory the pipelined operands take.
_MAX_ACC_PER_THREAD = 128
_MAX_OPERANDS_PER_THREAD = 64
_MAX_SHARED_BYTES = 160 * 1024  # under sm_80's 163 KiB; the sweep checks the real limit per GPU
_CAPS = {2: (256, 128, 64), 4: (256, 128, 32), 8: (128, 64, 16)}  # (rows, cols, reduction) by element size
_MIN_DOT = 16  # tl.dot's smallest tile (16-bit operands need a contraction of 16 to compile at all)


def _problems(quick: bool) -> list:
    layers = [layer for layer in _LAYERS if layer[0] in _QUICK] if quick else _LAYERS
    return [Problem(f"{label} {'NHWC' if cl else 'NCHW'}", op,
                    dict(B=B, Cin=Cin, Cout=Cout, H=H, W=H, kh=k, kw=k, stride=s, E=E, m=m, groups=g,
                         bias=True, channels_last=cl))
            for label, op, B, Cin, Cout, H, k, s, E, m, g in layers for cl in (False, True)]


def _strides(spec: dict) -> tuple[int, int]:
    # A problem key holds both components; the sweep's layers give one stride, a spec rebuilt
    # from a key gives the pair.
    if "stride_h" in spec:
        return spec["stride_h"], spec["stride_w"]
    s = spec["stride"]
    return (s, s) if isinstance(s, int) else tuple(s)


def _out_hw(spec: dict) -> tuple[int, int]:
    # "same" padding (k - 1) // 2, as the ops' layers use it; spec may also be a problem key
    return tuple((n + 2 * ((k - 1) // 2) - k) // s + 1
                 for n, k, s in zip((spec["H"], spec["W"]), (spec["kh"], spec["kw"]), _strides(spec)))


def _geometry(spec: dict):
    return _strides(spec), ((spec["kh"] - 1) // 2, (spec["kw"] - 1) // 2), (1, 1)


def _inputs(spec: dict, dtype, device) -> dict:
    B, Cin, Cout, H, W, kh, kw, E, m, g = (spec[n] for n in ("B", "Cin", "Cout", "H", "W", "kh", "kw", "E", "m",
                                                             "groups"))
    Ho, Wo = _out_hw(spec)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format

    def t(*shape, fmt=torch.contiguous_format, scale=1.0):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).normal_(0.0, scale)

    ts = dict(x=t(B, Cin, H, W, fmt=fmt), dx=t(B, Cin, H, W, fmt=fmt), y=t(B, Cout, Ho, Wo, fmt=fmt),
              dy=t(B, Cout, Ho, Wo, fmt=fmt), experts=t(E, Cout, Cin // g, kh, kw, scale=(Cin // g * kh * kw) ** -0.5),
              routing=t(B, m, E).softmax(-1), bias=t(B, m, Cout, scale=0.1) if spec["bias"] else None, guide=None)
    if m > 1:
        # A trained guide's regions are spatially coherent blobs (random logits per pixel would
        # scatter them and misrepresent the input gradient, which multiplies once per region in a tile).
        coarse = torch.empty((B, m, 4, 4), dtype=torch.float32, device=device).normal_()
        ts["guide"] = F.interpolate(coarse, size=(Ho, Wo), mode="bilinear", align_corners=False).to(dtype)
    return ts


def _cached(ts: dict, name, build):
    if name not in ts:
        ts[name] = build()
    return ts[name]


def _channels_last(ts: dict, name: str) -> torch.Tensor:
    """The channels_last copy of ``ts[name]`` that the op would make, made once per problem."""
    return _cached(ts, f"{name}_channels_last", lambda: ts[name].contiguous(memory_format=torch.channels_last))


def _route(kernel: str, spec: dict, ts: dict) -> tuple[bool, bool]:
    """(whether the op's forward or input gradient reads its NCHW operand in row boxes, whether it
    reads a channels_last copy of it), as the op's routing answers for these tensors (the kernel
    gradient's copies: :func:`_weight_grad_operands`). DRConv's forward keeps its NCHW row: that key
    is also the mixing guide scores', which read x in place."""
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    if kernel == "expert_conv_fwd" and m == 1:
        x, experts = ts["x"], ts["experts"]
        return ec.forward_in_rows(x, experts, m, g, *geometry), ec.forward_copies_input(x, experts, m, g, *geometry)
    if kernel == "expert_conv_bwd_input" and m == 1:
        dy, dx, experts = ts["dy"], ts["dx"], ts["experts"]
        return (eci.input_grad_in_rows(dy, dx, experts, m, g, *geometry),
                eci.input_grad_copies_output_grad(dy, dx, experts, m, g, *geometry))
    return False, False


def _weight_grad_operands(spec: dict, ts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, x) as the op's kernel gradient reads them: x's channels_last copy where it copies x, dy's
    too where it does not read dy in place."""
    return ecw.operands_read(ts["dy"], ts["x"], spec["m"], spec["groups"], _strides(spec),
                             lambda t: _channels_last(ts, "dy" if t is ts["dy"] else "x"))


def _source(ts: dict, innermost: int = ec.CIN_INNERMOST) -> ec.WeightSource:
    # What the op would read: materialised mixed kernels or the experts mixed on the fly, laid out
    # for the pass (``innermost``: its reduction axis; Cout innermost is the input gradient's, which
    # counts dx's pixels).
    def build():
        experts, routing = ts["experts"], ts["routing"]
        dx_pass = innermost == ec.COUT_INNERMOST
        pixels = eci.input_grad_pixels(ts["dx"]) if dx_pass else ts["y"].shape[2] * ts["y"].shape[3]
        # A batch the op materialises in parts is timed materialised whole: the same programs.
        return ec.weight_source(experts, routing, ec.batch_parts(experts, routing, pixels, None)[0][1], innermost)
    return _cached(ts, ("source", innermost), build)


def _regions(ts: dict) -> rt.RegionTables | None:
    if ts["guide"] is None:
        return None
    return _cached(ts, "regions", lambda: rt.region_tables(ts["guide"]))


def _key_experts(kernel: str, ts: dict) -> torch.Tensor:
    # The kernel-gradient launcher keys the problem with a one-expert stand-in (see module doc).
    return ts["experts"][:1] if kernel == "expert_conv_bwd_weight" else ts["experts"]


def _forward(spec: dict, ts: dict, config: dict | None) -> Launch:
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    x = _channels_last(ts, "x") if _route("expert_conv_fwd", spec, ts)[1] else ts["x"]
    config = config or ec.forward_config(x, ts["experts"], m, g, *geometry)
    return ec.forward_launch(x, _source(ts), None, ts["bias"], _regions(ts), ts["y"],
                             (spec["kh"], spec["kw"]), g, *geometry, config)


def _input_grad(spec: dict, ts: dict, config: dict | None) -> Launch:
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    dy, dx, experts = ts["dy"], ts["dx"], ts["experts"]
    if config is None:  # the op's lookup: the copy's row where it reads dy's copy (none in row boxes)
        config = eci.input_grad_route(dy, dx, experts, m, g, *geometry)[2] or eci.input_grad_config(
            dx, experts, m, g, geometry[0])
    regions = _regions(ts)
    kernel_hw = (spec["kh"], spec["kw"])
    if regions is not None and rc.backward_input_supported(dy, dx, m):
        # As the op's fallback where the columns do not fit (region_conv.region_backward_input): the
        # first part of the batch whose region kernels fit the workspace, materialised Cout
        # innermost, dy channels_last.
        part = slice(0, rc.batch_part(dx.shape[0], m, experts[0].numel(), dx.element_size()))
        weight = _cached(ts, "region_kernels_dx",
                         lambda: rc.mixed_kernels(experts, ts["routing"][part], None, ec.COUT_INNERMOST))
        dy = _channels_last(ts, "dy")
        return eci.backward_input_launch(dy[part], rc.materialised_source(weight), None, regions.region[part], dx[part],
                                        kernel_hw, g, *geometry, m, config)
    if _route("expert_conv_bwd_input", spec, ts)[1]:
        dy = _channels_last(ts, "dy")
    return eci.backward_input_launch(dy, _source(ts, ec.COUT_INNERMOST), None, regions.region if regions else None, dx,
                                    kernel_hw, g, *geometry, m, config)


def _weight_grad(spec: dict, ts: dict, config: dict | None) -> Launch:
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    dy, x = _weight_grad_operands(spec, ts)
    config = config or ecw.weight_grad_config(x, _key_experts("expert_conv_bwd_weight", ts), m, g, geometry[0])
    # As the op, its partials kept across the candidates of one problem.
    return ecw.launch_with_partials(dy, x, _regions(ts), m, g, (spec["kh"], spec["kw"]), geometry, config,
                                    buffer=lambda name, build: _cached(ts, name, build))[0]


def _region_forward(spec: dict, ts: dict, config: dict | None) -> Launch:
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    x, y, experts = ts["x"], ts["y"], ts["experts"]
    config = config or rc.forward_config(x, experts, m, g, *geometry)
    # As the op: the first part of the batch whose region kernels fit the workspace, materialised.
    part = slice(0, rc.batch_part(x.shape[0], m, experts[0].numel(), x.element_size()))
    weight = _cached(ts, "region_kernels", lambda: rc.mixed_kernels(experts, ts["routing"][part], None))
    tables = _regions(ts).part(part)
    bias = ts["bias"][part] if ts["bias"] is not None else None
    if rc.forward_copies_input(x):  # as the op: an NCHW x read through its channels_last copy
        x = _channels_last(ts, "x")
    return rc.forward_launch(x[part], weight, bias, tables, y[part], g, *geometry, config)


def _region_columns(spec: dict, ts: dict, config: dict | None) -> Launch:
    geometry, m, g = _geometry(spec), spec["m"], spec["groups"]
    dx, dy, experts = ts["dx"], ts["dy"], ts["experts"]
    config = config or rcg.columns_config(dx, experts, m, g, geometry[0])
    # As the op: the first part of the batch, dy channels_last, its region kernels laid for columns.
    Ho, Wo = dy.shape[2:]
    kernel_hw = (spec["kh"], spec["kw"])
    part = slice(0, rcg.columns_part(dy, dx, experts, m))
    weight = _cached(ts, "column_kernels", lambda: rcg.column_kernels(experts, ts["routing"][part], None, g))
    dy = _channels_last(ts, "dy")
    cols = _cached(ts, "columns", lambda: rcg.columns_empty(weight.shape[0], dx.shape[1], kernel_hw, Ho, Wo,
                                                            dx.dtype, dx.device))
    tables = _regions(ts).part(part)
    return rcg.columns_launch(dy[part], weight, tables, cols, g, config)


_LAUNCH = {"expert_conv_fwd": _forward, "expert_conv_bwd_input": _input_grad, "expert_conv_bwd_weight": _weight_grad,
           "region_conv_fwd": _region_forward, "region_conv_columns": _region_columns}


def _key(kernel: str):
    def key(spec: dict, ts: dict) -> dict:
        if kernel == "expert_conv_bwd_weight":
            x = _weight_grad_operands(spec, ts)[1]  # x's copy, where the kernel gradient reads one
        else:
            x = ts["dx"] if kernel in ("expert_conv_bwd_input", "region_conv_columns") else ts["x"]
        found = ec.problem_key(x, _key_experts(kernel, ts), spec["m"], spec["groups"], _strides(spec))
        # A pass that reads a channels_last copy looks up the copy's row (kernels.expert_conv._routed_config).
        return {**found, "channels_last": 1} if _route(kernel, spec, ts)[1] else found
    return key


def _reads_table(kernel: str):
    def reads_table(spec: dict, ts: dict) -> bool:
        if kernel == "expert_conv_bwd_weight":
            # Where it copies dy as well as x it runs the very launch of the layer's channels_last problem.
            return not ecw.weight_grad_copies_output_grad(ts["dy"], ts["x"], spec["m"], spec["groups"], _strides(spec))
        return not _route(kernel, spec, ts)[0]
    return reads_table


def _default_for(kernel: str, key: dict) -> dict:
    """The launcher's default config, from the problem key alone."""
    dtype = _DTYPES[key["dtype_bytes"]]
    g = key["groups"]
    filter_size = key["Cin"] // g * key["kh"] * key["kw"]
    plain = ec.is_plain_conv(key["m"], (key["stride_h"], key["stride_w"]))
    if kernel == "region_conv_fwd":
        return rc.default_forward_config(key["Cout"] // g, key["Cin"] // g, dtype, bool(key["channels_last"]))
    if kernel == "region_conv_columns":
        return rcg.default_columns_config(dtype)
    if kernel == "expert_conv_fwd":
        Ho, Wo = _out_hw(key)
        mixing = ec.materialise_part(filter_size, key["B"], key["m"], Ho * Wo) == 0
        return ec.default_forward_config(key["Cout"] // g, dtype, Ho * Wo // key["m"], cin_g=key["Cin"] // g,
                                         mixing=mixing, channels_last=bool(key["channels_last"]), plain=plain)
    if kernel == "expert_conv_bwd_input":
        mixing = eci.input_grad_mixes(filter_size, key["B"], key["m"], key["H"] * key["W"], False)
        return eci.default_input_grad_config(key["Cin"] // g, dtype, key["Cout"] // g, mixing, key["m"] > 1,
                                            bool(key["channels_last"]), plain)
    flat = ecw.flat_capable(key["m"], (key["stride_h"], key["stride_w"]), bool(key["channels_last"]))
    return ecw.default_weight_grad_config(key["Cout"] // g, key["Cin"] // g * key["kh"] * key["kw"], dtype,
                                         key["Cin"] // g, bool(key["channels_last"]), flat, key["m"] > 1)


def _default(kernel: str):
    def default(spec: dict, ts: dict) -> dict:
        return _default_for(kernel, _key(kernel)(spec, ts))
    return default


def _gemm_dims(kernel: str, key: dict) -> dict:
    """The problem's own size along each block (a tile larger than that only wastes lanes)."""
    g, taps = key["groups"], key["kh"] * key["kw"]
    Ho, Wo = _out_hw(key)
    if kernel == "expert_conv_fwd":
        return {"BLOCK_P": Ho * Wo // key["m"], "BLOCK_N": key["Cout"] // g, "BLOCK_K": key["Cin"] // g * taps}
    if kernel == "region_conv_fwd":
        return {"BLOCK_P": Ho * Wo // key["m"], "BLOCK_O": key["Cout"] // g, "BLOCK_K": key["Cin"] // g}
    if kernel == "region_conv_columns":  # pixels of a region, columns (tap, channel), output channels
        return {"BLOCK_P": Ho * Wo // key["m"], "BLOCK_N": key["Cin"] // g * taps, "BLOCK_K": key["Cout"] // g}
    if kernel == "expert_conv_bwd_input":
        return {"BLOCK_P": key["H"] * key["W"], "BLOCK_N": key["Cin"] // g, "BLOCK_K": key["Cout"] // g * taps}
    return {"BLOCK_O": key["Cout"] // g, "BLOCK_N": key["Cin"] // g * taps, "BLOCK_K": Ho * Wo // key["m"]}


def _dot_blocks(kernel: str) -> tuple[str, str, str]:
    """The config's (rows, cols, reduction) block names."""
    if kernel == "expert_conv_bwd_weight":
        return "BLOCK_O", "BLOCK_N", "BLOCK_K"
    if kernel == "region_conv_fwd":
        return "BLOCK_P", "BLOCK_O", "BLOCK_K"
    return "BLOCK_P", "BLOCK_N", "BLOCK_K"


def _rules(kernel: str):
    def rules(config: dict, key: dict) -> list[str]:
        """What the kernel needs to compile: every tl.dot dimension at least _MIN_DOT."""
        small = [f"{name}={config[name]}" for name in _dot_blocks(kernel) if config[name] < _MIN_DOT]
        return [f"{', '.join(small)} below tl.dot's smallest tile ({_MIN_DOT})"] if small else []
    return rules


def _plausible(kernel: str, config: dict, key: dict) -> bool:
    M, N, K = (config[name] for name in _dot_blocks(kernel))
    threads = 32 * config["num_warps"]
    dtype_bytes = key["dtype_bytes"]
    acc_scale = 2 if dtype_bytes == 8 else 1  # fp64 accumulators take two registers
    return (not _rules(kernel)(config, key)
            and 8 <= M * N * acc_scale / threads <= _MAX_ACC_PER_THREAD
            and (M * K + K * N) * max(1, dtype_bytes // 2) / threads <= _MAX_OPERANDS_PER_THREAD
            and config["num_stages"] * (M * K + K * N) * dtype_bytes <= _MAX_SHARED_BYTES)


def _candidates(kernel: str):
    def candidates(key: dict, quick: bool) -> list[dict]:
        default = _default_for(kernel, key)
        caps = dict(zip(_dot_blocks(kernel), _CAPS[key["dtype_bytes"]]))
        limits = {name: max(_MIN_DOT, min(caps[name], size)) for name, size in _gemm_dims(kernel, key).items()}
        around = neighbourhood(default, limits, elements_per_thread=(0, float("inf")), size=10**6,
                               warps=(4, 8), stages=(1, 2, 3, 4))
        keep = [c for c in around[1:] if _plausible(kernel, c, key)]
        return [default] + keep[: (6 if quick else 12) - 1]
    return candidates


def _spec_for_key(kernel: str):
    def spec_for_key(key: dict):
        spec = {name: key[name] for name in ("B", "H", "W", "kh", "kw", "E", "m", "groups")}
        spec["stride"] = (key["stride_h"], key["stride_w"])
        # A table key's channel counts and groups are bucketed apart: keep the counts multiples of g
        # (a depth-wise key's Cin and groups share one bucket, so Cin stays g).
        g = key["groups"]
        spec.update(Cin=-(-key["Cin"] // g) * g, Cout=-(-key["Cout"] // g) * g)
        spec.update(bias=True, channels_last=bool(key["channels_last"]))
        return spec, _DTYPES[key["dtype_bytes"]]
    return spec_for_key


def _region_problems(quick: bool) -> list:
    return [problem for problem in _problems(quick) if problem.op == "drconv"]


def _input_grad_problems(quick: bool) -> list:
    """DRConv layers' input gradient runs by columns (``region_conv_input_grad``), not this kernel,
    wherever they fit: the sweep leaves them out (a fallback layer is tuned at run time)."""
    return [problem for problem in _problems(quick) if problem.op != "drconv"]


_PROBLEMS = {"region_conv_fwd": _region_problems, "region_conv_columns": _region_problems,
             "expert_conv_bwd_input": _input_grad_problems}


def autotune_space() -> dict:
    return {name: KernelSpace(problems=_PROBLEMS.get(name, _problems), inputs=_inputs,
                              launch=_LAUNCH[name], key=_key(name),
                              default=_default(name), candidates=_candidates(name),
                              spec_for_key=_spec_for_key(name), exact=_EXACT, rules=_rules(name),
                              reads_table=_reads_table(name))
            for name in _LAUNCH}


register_spaces(autotune_space)
