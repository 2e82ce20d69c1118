"""Autotuning space of the fused-involution kernels (``kernels/involution_fused.py``; contract in
``kernels/configs.py``).

Four configs are tuned, one per ``get_config`` name of the launchers, all keyed by
``involution_fused.problem_key`` (B, C, G, R, H, W, K, stride_h, stride_w, layout, element size):

* ``involution_fused_fwd`` — keyed on x; its tile spans the output pixels;
* ``involution_fused_bwd_input`` — keyed on dy (so H, W are the *output* size), tile over dx's pixels;
* ``involution_fused_bwd_z`` and ``involution_fused_bwd_span`` — keyed on x, tiles over the output.

A config is ``BLOCK_G, BLOCK_CG, BLOCK_H, BLOCK_W, BLOCK_R, num_warps, num_stages``. Every kernel
has a ``tl.dot`` whose dimensions are (M, K, N):

=========== =================== ====================== ===================
kernel      M                   K (contraction)        N
=========== =================== ====================== ===================
fwd         BLOCK_G             BLOCK_R                pixels
bwd_input   BLOCK_G             BLOCK_R                pixels
bwd_z       BLOCK_R             BLOCK_G                pixels
bwd_span    BLOCK_G             pixels                 BLOCK_R
=========== =================== ====================== ===================

(pixels = BLOCK_H * BLOCK_W). Candidates are the neighbourhood of the launcher's default that
keeps its dot-or-multiply-reduce choice (``involution_fused.uses_dot``), every dot dimension a
power of two >= 16 (smaller only where the default itself is, because the problem is), pixel
tiles of 16..64, and a static register estimate (:func:`_registers`) within what ptxas holds
without spilling on sm_80/sm_90. The sweep then compiles each survivor for the GPU and drops
those that spill anyway.
"""
from __future__ import annotations

import itertools
import math

import torch

from ._launch import Launch
from . import involution_fused as fused
from .configs import KernelSpace, Problem, register_spaces, triton_next_pow2

_KERNELS = {"involution_fused_fwd": "fwd", "involution_fused_bwd_input": "bwd_input",
            "involution_fused_bwd_z": "bwd_z", "involution_fused_bwd_span": "bwd_span"}
# As the family-1 kernels: G and C are bucketed, so RedNet stages with 16-channel groups share
# rows, while a depth-wise key (G = C) lies far (in log2) from a grouped one and finds its own.
_EXACT = ("K", "stride_h", "stride_w", "channels_last", "dtype_bytes")
_DTYPES = {2: torch.float16, 4: torch.float32, 8: torch.float64}

# (label, B, C, H = W, K, G, R, stride): RedNet's involution layers (16 channels per group, R = C/4)
# from dynconv.roofline (R1, R2, R3), one with stride 2, and one with R above one 128-wide R block.
_LAYERS = [
    ("R1 RedNet-50 stage 1 involution", 32, 256, 56, 7, 16, 64, 1),
    ("R2 RedNet-50 stage 2 involution", 64, 512, 28, 7, 32, 128, 1),
    ("R2 stride 2 (56 -> 28) involution", 64, 512, 56, 7, 32, 128, 2),
    ("R3 inhomogeneous depth-wise (G = C)", 32, 128, 56, 7, 128, 32, 1),
    ("RedNet-50 stage 3 involution (R = 256)", 64, 1024, 14, 7, 64, 256, 1),
]
_QUICK = ("R1 RedNet-50 stage 1 involution", "R3 inhomogeneous depth-wise (G = C)")

_MIN_DOT = 16  # tl.dot's smallest useful tile dimension (and the contraction 16-bit operands need)
_MAX_PIXELS = 64  # 32 pixels already cost 200+ registers in NCHW (see default_config)
_MAX_BLOCK_R = 128
# Fp32 registers per thread the live tiles may take (see _registers): what ptxas holds without
# spilling on sm_80/sm_90 next to addresses and masks, calibrated on the AOT compiles.
_MAX_REGISTERS = 80
_MIN_TILE_PER_THREAD = 2  # fewer: the 3-D tile is replicated across threads
_SIZE = {True: 6, False: 10}  # candidates per problem, default included: --quick / full sweep


def _problems(quick: bool) -> list:
    layers = [layer for layer in _LAYERS if layer[0] in _QUICK] if quick else _LAYERS
    return [Problem(f"{label} {'NHWC' if cl else 'NCHW'}", "involution_fused",
                    dict(B=B, C=C, G=G, R=R, H=H, W=H, K=K, stride=s, bias=True, channels_last=cl))
            for label, B, C, H, K, G, R, s in layers for cl in (False, True)]


def _out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # "same" padding (K - 1) // 2, odd K


def _strides(spec: dict) -> tuple[int, int]:
    # The sweep's layers give one stride; a spec rebuilt from a key keeps both components.
    s = spec["stride"]
    return (s, s) if isinstance(s, int) else tuple(s)


def _geometry(spec: dict):
    p = (spec["K"] - 1) // 2
    return _strides(spec), (p, p), (1, 1)


def _inputs(spec: dict, dtype, device) -> dict:
    B, C, G, R, H, W, K = (spec[n] for n in ("B", "C", "G", "R", "H", "W", "K"))
    sh, sw = _strides(spec)
    Ho, Wo = _out(H, sh), _out(W, sw)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format

    def t(*shape, fmt=torch.contiguous_format, scale=1.0):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).normal_(0.0, scale)

    return dict(x=t(B, C, H, W, fmt=fmt), dx=t(B, C, H, W, fmt=fmt), y=t(B, C, Ho, Wo, fmt=fmt),
                dy=t(B, C, Ho, Wo, fmt=fmt), z=t(B, R, Ho, Wo, fmt=fmt), dz=t(B, R, Ho, Wo, fmt=fmt),
                span_weight=t(K * K * G, R, scale=R ** -0.5),
                span_bias=t(K * K * G, scale=0.1) if spec["bias"] else None)


def _launch(kernel: str):
    def launch(spec: dict, ts: dict, config: dict | None) -> Launch:
        K, geometry = spec["K"], _geometry(spec)
        if kernel == "fwd":
            return fused.forward_launch(ts["x"], ts["z"], ts["span_weight"], ts["span_bias"], ts["y"], K, *geometry, config)
        if kernel == "bwd_input":
            return fused.backward_input_launch(ts["dy"], ts["z"], ts["span_weight"], ts["span_bias"], ts["dx"], K,
                                               *geometry, config)
        if kernel == "bwd_z":
            return fused.backward_z_launch(ts["dy"], ts["x"], ts["span_weight"], ts["dz"], K, *geometry, config)
        # The partials' row count depends on the config: resolve it first (one get_config call),
        # then pass it on so the launcher does not ask again.
        x, dy, z = ts["x"], ts["dy"], ts["z"]
        B, R, G = x.shape[0], z.shape[1], spec["G"]
        Ho, Wo = dy.shape[2], dy.shape[3]
        config = fused.span_grad_config(x, G, K, R, geometry[0], Ho, Wo, config)
        slabs, _ = fused.span_grad_slabs(B, Ho, Wo, K, G, R, config)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if ("dspan", slabs) not in ts:
            ts[("dspan", slabs)] = torch.empty((slabs, K * K * G, R), dtype=acc, device=x.device)
            ts[("dbias", slabs)] = torch.empty((slabs, K * K * G), dtype=acc, device=x.device)
        return fused.backward_span_launch(dy, x, z, ts[("dspan", slabs)], ts[("dbias", slabs)], K, *geometry, config)
    return launch


def _keyed(kernel: str, ts: dict):
    """The tensor a launcher keys its table on (and takes the halo path by): dy for bwd_input, else x."""
    return ts["dy"] if kernel == "bwd_input" else ts["x"]


def _key(kernel: str):
    def key(spec: dict, ts: dict) -> dict:
        return fused.problem_key(_keyed(kernel, ts), spec["G"], spec["K"], spec["R"], _strides(spec))
    return key


def _tile_extent(kernel: str, key: dict) -> tuple[int, int]:
    """The pixel grid the kernel's tiles cover, from the key (bwd_input's key holds dy's size)."""
    sh, sw = key["stride_h"], key["stride_w"]
    if kernel == "bwd_input":
        return key["H"] * sh, key["W"] * sw
    return _out(key["H"], sh), _out(key["W"], sw)


def _default_for(kernel: str, key: dict) -> dict:
    h, w = _tile_extent(kernel, key)
    return fused.default_config(kernel, key["C"], key["G"], key["R"], h, w, bool(key["channels_last"]),
                                _DTYPES[key["dtype_bytes"]])


def _default(kernel: str):
    def default(spec: dict, ts: dict) -> dict:
        tile = ts["dx"] if kernel == "bwd_input" else ts["y"]
        return fused.default_config(kernel, spec["C"], spec["G"], spec["R"], tile.shape[2], tile.shape[3],
                                    bool(spec["channels_last"]), _keyed(kernel, ts).dtype)
    return default


def _dot_dims(kernel: str, c: dict) -> tuple[int, int, int]:
    pixels = c["BLOCK_H"] * c["BLOCK_W"]
    return {"fwd": (c["BLOCK_G"], c["BLOCK_R"], pixels), "bwd_input": (c["BLOCK_G"], c["BLOCK_R"], pixels),
            "bwd_z": (c["BLOCK_R"], c["BLOCK_G"], pixels), "bwd_span": (c["BLOCK_G"], pixels, c["BLOCK_R"])}[kernel]


def _registers(kernel: str, c: dict, dtype_bytes: int) -> float:
    """Fp32 registers per thread for the tiles live in ``kernel``'s inner loop, roughly.

    The 3-D tile [BLOCK_G, BLOCK_CG, pixels] is held twice (accumulator or dy tile, and the tap's
    x or dy loads); the dot's operands and result are added in their own widths. Calibrated on
    sm_90 compiles of RedNet shapes: past ~80 ptxas starts spilling, fp32 first.
    """
    G, CG, Rb = c["BLOCK_G"], c["BLOCK_CG"], c["BLOCK_R"]
    P = c["BLOCK_H"] * c["BLOCK_W"]
    acc = 2 if dtype_bytes == 8 else 1
    # fp32 operands are split into tf32 high and low parts (tf32x3): count them twice.
    op = {2: 0.5, 4: 2.0, 8: 2.0}[dtype_bytes]
    tile = 2 * G * CG * P * acc
    if kernel in ("fwd", "bwd_input"):
        # weights [G, P] (acc) = span [G, Rb] @ z [Rb, P]; fwd keeps its z tile across the taps.
        live = tile + G * P * acc + (G * Rb + Rb * P) * op
    elif kernel == "bwd_z":
        # dz [Rb, P] accumulates span_t [Rb, G] @ dW [G, P] (dW: acc, and again as an operand).
        live = tile + Rb * P * acc + G * P * (acc + op) + Rb * G * op
    else:
        # dS [G, Rb] accumulates dW [G, P] @ z_t [P, Rb].
        live = tile + G * Rb * acc + G * P * (acc + op) + P * Rb * op
    return live / (32 * c["num_warps"])


def _rule_problems(kernel: str, c: dict, key: dict) -> list[str]:
    """What a config must keep to run ``kernel`` at ``key`` as tuned: the default's code path
    (tl.dot or multiply-reduce), dot dimensions of 16 or more (below only where the default's are,
    for a problem smaller than one tile), and a multiply-reduce product of bounded size."""
    default = _default_for(kernel, key)
    dtype = _DTYPES[key["dtype_bytes"]]
    dot = fused.uses_dot(kernel, c, dtype)
    if dot != fused.uses_dot(kernel, default, dtype):
        paths = ("tl.dot", "multiply-reduce") if dot else ("multiply-reduce", "tl.dot")
        return ["takes the {} path where the default takes {}".format(*paths)]
    if dot:
        dims = zip(("M", "K", "N"), _dot_dims(kernel, c), _dot_dims(kernel, default))
        small = [f"{name}={v}" for name, v, d in dims if v < min(_MIN_DOT, d)]
        return [f"tl.dot dimension {', '.join(small)} below {_MIN_DOT}"] if small else []
    product = c["BLOCK_G"] * c["BLOCK_R"] * c["BLOCK_H"] * c["BLOCK_W"]
    if product > fused.FMA_PRODUCT_ELEMENTS:  # the multiply-reduce materialises [M, K, N]
        return [f"multiply-reduce product of {product} elements exceeds {fused.FMA_PRODUCT_ELEMENTS}"]
    return []


def _rules(kernel: str):
    return lambda config, key: _rule_problems(kernel, config, key)


def _plausible(kernel: str, c: dict, key: dict) -> bool:
    if _rule_problems(kernel, c, key):
        return False
    threads = 32 * c["num_warps"]
    if c["BLOCK_G"] * c["BLOCK_CG"] * c["BLOCK_H"] * c["BLOCK_W"] < _MIN_TILE_PER_THREAD * threads:
        return False
    return _registers(kernel, c, key["dtype_bytes"]) <= _MAX_REGISTERS


def _pow2_options(value: int, lo: int, hi: int, steps=(-2, -1, 0, 1, 2)) -> list[int]:
    return sorted({value} | {v for v in (value * 2 ** s if s >= 0 else value >> -s for s in steps) if lo <= v <= hi})


def _candidates(kernel: str):
    def candidates(key: dict, quick: bool) -> list[dict]:
        default = _default_for(kernel, key)
        h, w = _tile_extent(kernel, key)
        dot = fused.uses_dot(kernel, default, _DTYPES[key["dtype_bytes"]])
        cap_r = max(_MIN_DOT, triton_next_pow2(key["R"])) if dot else triton_next_pow2(key["R"])
        options = {
            "BLOCK_G": _pow2_options(default["BLOCK_G"], 1, triton_next_pow2(key["G"])),
            "BLOCK_CG": _pow2_options(default["BLOCK_CG"], 1, triton_next_pow2(key["C"] // key["G"])),
            "BLOCK_H": _pow2_options(default["BLOCK_H"], 1, max(triton_next_pow2(h), _MAX_PIXELS)),
            "BLOCK_W": _pow2_options(default["BLOCK_W"], 1, triton_next_pow2(w), steps=(-1, 0, 1)),
            "BLOCK_R": _pow2_options(default["BLOCK_R"], 1, min(cap_r, _MAX_BLOCK_R)),
            "num_warps": (1, 2, 4, 8),
            "num_stages": (1,) if quick else (1, 2),
        }
        found = []
        for values in itertools.product(*options.values()):
            c = dict(zip(options, values))
            pixels = c["BLOCK_H"] * c["BLOCK_W"]
            # 16..64 pixels (the span-gradient dot contracts over them); rows only past the image's
            # height where one row of BLOCK_W cannot reach 16 pixels.
            if not fused.TILE_PIXELS <= pixels <= _MAX_PIXELS:
                continue
            if c["BLOCK_H"] > max(triton_next_pow2(h), fused.TILE_PIXELS // c["BLOCK_W"]):
                continue
            c = {name: c[name] for name in default}
            if c != default and _plausible(kernel, c, key):
                found.append(c)

        def distance(c):
            return (sum(abs(math.log2(c[n]) - math.log2(default[n])) for n in default if n != "num_stages")
                    + abs(c["num_stages"] - default["num_stages"]))

        found.sort(key=lambda c: (distance(c), tuple(c.values())))
        return [dict(default)] + found[: _SIZE[quick] - 1]
    return candidates


def _spec_for_key(kernel: str):
    def spec_for_key(key: dict):
        H, W = _tile_extent(kernel, key) if kernel == "bwd_input" else (key["H"], key["W"])
        spec = dict(B=key["B"], C=key["C"], G=key["G"], R=key["R"], H=H, W=W, K=key["K"],
                    stride=(key["stride_h"], key["stride_w"]), bias=True, channels_last=bool(key["channels_last"]))
        return spec, _DTYPES[key["dtype_bytes"]]
    return spec_for_key


def _reads_table(kernel: str):
    def reads_table(spec: dict, ts: dict) -> bool:
        # The halo kernels serve these problems; the launchers ask no table for them.
        stride, _, dilation = _geometry(spec)
        return not fused.takes_halo_path(_keyed(kernel, ts), spec["G"], spec["R"], spec["K"], stride, dilation,
                                         kernel == "bwd_input")
    return reads_table


def autotune_space() -> dict:
    return {name: KernelSpace(problems=_problems, inputs=_inputs, launch=_launch(kernel), key=_key(kernel),
                              default=_default(kernel), candidates=_candidates(kernel),
                              spec_for_key=_spec_for_key(kernel), exact=_EXACT, rules=_rules(kernel),
                              reads_table=_reads_table(kernel))
            for name, kernel in _KERNELS.items()}


register_spaces(autotune_space)
