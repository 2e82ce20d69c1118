"""What the neighbourhood-attention kernel modules share (docs/operators.md §1c).

Layout ``(B, H, W, heads, D)`` for q, k, v and the output, any strides. Along each image axis,
position ``i`` belongs to the subsequence ``g = i mod d`` at index ``t = i // d`` (length ``L_g``);
tap ``u`` of its window is subsequence index ``start(t) + u``, with ``start = t - K//2``
("sliding", masked outside the image) or that clamped to ``[0, L_g - K]`` ("neighborhood",
NATTEN's shifted window). The relative-position bias index of a (query, key) pair is
``t_key - t_query + K - 1`` per axis.

Here: that window geometry as JIT helpers (a window's start, a key's holders, a program's tile),
and the launch configuration of the per-lane kernels (``na2d.py``, ``na2d_pair.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2
from .configs import get_config


# Lanes x head-dim elements per program: 16 fp32 elements of each [Q, D] tile per thread at 4 warps.
TILE_ELEMENTS = 2048
# The rpb-gradient product contracts over the query lanes: tl.dot needs at least 16 of them.
MIN_QUERIES = 16

@triton.jit
def _window_start(t, length, K, NEIGHBORHOOD: tl.constexpr):
    """The first key index of the window of query index ``t`` in a subsequence of ``length``."""
    start = t - K // 2
    if NEIGHBORHOOD:
        start = tl.minimum(tl.maximum(start, 0), length - K)
    return start

@triton.jit
def _axis(pos, L, K, d, NEIGHBORHOOD: tl.constexpr):
    """Subsequence (group), index in it, its length, and the window's first index, per position."""
    g = pos % d
    t = pos // d
    length = (L - g + d - 1) // d
    return g, t, length, _window_start(t, length, K, NEIGHBORHOOD)

@triton.jit
def _tile(TILES, TILES_W, HEADS, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, INDEX_64: tl.constexpr):
    """(sample, head, rows, columns) of this program: one flat grid, tiles of one (sample, head) adjacent."""
    pid = tl.program_id(0) % TILES
    bh = tl.program_id(0) // TILES
    b = bh // HEADS
    h = bh % HEADS
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (pid // TILES_W) * BLOCK_H + p // BLOCK_W
    j = (pid % TILES_W) * BLOCK_W + p % BLOCK_W
    if INDEX_64:
        b = b.to(tl.int64)
        h = h.to(tl.int64)
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return b, h, i, j

# The JIT passes a Python float to an undeclared parameter as fp32, which left float64 attention 1e-6
# off on an H200 (the interpreter keeps Python floats). The kernels take the scale once more as a
# declared fp64 and, in float64, derive their constants from it; the other dtypes keep the fp32
# arguments, whose compiled code this leaves as it was (an fp64 scale converted on entry held one
# more register, and na2d_bwd_key_kernel spilled on sm_80).
@triton.jit
def _fp64_scales(scale_f64):
    """(scale, scale·log2 e, 1/scale, log2 e, ln 2) in float64."""
    log2e = tl.full((), 1.4426950408889634, tl.float64)
    return scale_f64, scale_f64 * log2e, 1.0 / scale_f64, log2e, tl.full((), 0.6931471805599453, tl.float64)

@triton.jit
def _holders(t, length, K, NEIGHBORHOOD: tl.constexpr):
    """The range [lo, hi] of query indices whose windows hold key index ``t`` (one subsequence)."""
    if NEIGHBORHOOD:
        lo = tl.where(t < K, 0, t - K // 2)
        hi = tl.where(t >= length - K, length - 1, t + K // 2)
    else:
        lo = tl.maximum(t - K // 2, 0)
        hi = tl.minimum(t + K // 2, length - 1)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

def _HOLDER_LOOPS(K: int) -> tuple:
    """Trip counts of the inverse-neighbourhood double loop: K x K holders away from the borders
    (up to 2K-1 per axis next to one; the static model takes the interior)."""
    return ((K, (K,)),)

def default_config(H: int, W: int, D: int, kernel: str = "na2d_fwd") -> dict:
    block_d = next_power_of_2(D)
    queries = max(MIN_QUERIES, min(64, TILE_ELEMENTS // block_d))
    block_w = max(1, min(8, next_power_of_2(W)))
    # Warps from `dynconv inspect` on both triton lanes, sm_80 and sm_90: at 4 warps ptxas (3.6 most of
    # all) caps some of these kernels far below 255 registers and spills a few values; 8 warps do not.
    # At D = 128 the forward spills at 4 and 8 warps but not at 2 (~175 registers), and the key-side
    # backward (six [Q, D] tiles live) spills at 4 and 8 somewhere but nowhere at 16.
    if kernel == "na2d_fwd":
        num_warps = 2 if block_d >= 128 else 4
    elif kernel == "na2d_bwd_key" and block_d >= 128:
        num_warps = 16
    else:
        num_warps = 8
    return {"BLOCK_H": queries // block_w, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": 1}

def problem_key(q: torch.Tensor, K: int, dilation) -> dict:
    B, H, W, heads, D = q.shape
    return {"B": B, "H": H, "W": W, "heads": heads, "D": D, "K": K, "dilation_h": dilation[0],
            "dilation_w": dilation[1], "dtype_bytes": q.element_size()}

def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32

def _rpb_block(K: int) -> int:
    return max(16, next_power_of_2(2 * K - 1))

def _strides(prefix: str, t: torch.Tensor | None, n: int) -> dict:
    names = {6: "bhwnuv", 5: "bhwnd", 4: "bhwn", 3: "nij"}[n]
    values = t.stride() if t is not None else (0,) * n
    return {f"s{prefix}{axis}": s for axis, s in zip(names, values)}

def _common(kernel_name, q, K, dilation, config):
    B, H, W, heads, D = q.shape
    config = config or get_config(kernel_name, problem_key(q, K, dilation), default_config(H, W, D, kernel_name))
    meta = {"BLOCK_H": config["BLOCK_H"], "BLOCK_W": config["BLOCK_W"], "BLOCK_D": next_power_of_2(D)}
    tiles_w = cdiv(W, meta["BLOCK_W"])
    tiles = cdiv(H, meta["BLOCK_H"]) * tiles_w
    scalars = dict(H=H, W=W, HEADS=heads, D=D, K=K, DH=dilation[0], DW=dilation[1], TILES=tiles, TILES_W=tiles_w)
    return meta, scalars, (tiles * B * heads, 1, 1), config.get("num_warps", 4), config.get("num_stages", 1)

def rpb_partial_shape(q, K, dilation, config=None, kernel="na2d_bwd_query") -> tuple[int, ...]:
    """The fp32 partials of the rpb gradient: one (R, R) block per (sample, head, tile) of ``kernel``."""
    B, _, _, heads, _ = q.shape
    _, scalars, _, _, _ = _common(kernel, q, K, dilation, config)
    R = _rpb_block(K)
    return (B, heads, scalars["TILES"], R, R)

def _reduce_rpb_partials(partials, drpb, K) -> None:
    """Sum the per-program partials over samples and tiles (a fixed order) into ``drpb``."""
    R = 2 * K - 1
    drpb.copy_(partials.sum(dim=(0, 2))[:, :R, :R])


# (B, H, W, heads, D, K, dilation, label): the shapes of na2d's and na2d_pair's catalogues.
CATALOGUE_SHAPES = [
    (8, 56, 56, 4, 32, 7, 1, "NAT-tiny stage 1"),
    (2, 128, 128, 8, 64, 13, 1, "B2 H128 heads 8 D64 K13"),
    (2, 31, 29, 2, 128, 5, 2, "D128 dilation 2, odd sizes"),
    (4, 14, 14, 4, 16, 3, 1, "D16 K3"),
]
