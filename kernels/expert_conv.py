"""K-expert kernel mixing (docs/operators.md §2): CondConv, DynamicConv, ODConv and DRConv as implicit GEMMs.

Every pass is an implicit GEMM fed to ``tl.dot`` (tensor cores for fp16/bf16, tf32 for fp32 when
``torch.backends.cudnn.allow_tf32`` allows it, DMMA for fp64). The kernel size is a compile-time
constant (``KH``, ``KW``); one loop runs over every tap's channel blocks, so the asynchronous
copies of the operands run ahead across the taps, a K-step adds a scalar tap offset, and a tap's
zero padding is a bit of a per-row mask formed before the loop; the weights are laid out once,
outside every kernel, with Cin/g innermost, so both dot operands are plain 2-D tiles. Below 16 channels
per group (depth-wise, narrow groups) one loop over the flattened reduction ``k = (u·kw + v)·C + c``
wastes no lanes instead. The operands stream channel-contiguous (``_streamed_tiles``): an NCHW
input whose conv would take those tiles in channels_last is read through a channels_last copy
(``kernels/layout.py``; ``forward_copies_input``, the input gradient's
``input_grad_copies_output_grad``), the output written in its own layout; at stride 1, where its
rows fill aligned boxes, in place instead (``expert_conv_rows.py``: ``forward_in_rows``, the input
gradient's ``input_grad_in_rows``).

Where the mixed kernel ``W[b,r] = spatial[b] ⊙ Σ_e routing[b,r,e]·experts[e]`` comes from:

* **on the fly** (``MIX``): each weight tile is mixed in registers from the E expert tiles right
  before the ``tl.dot``. No memory at all; costs E·BLOCK_K·BLOCK_N FMAs and E tile loads (the
  experts are shared by the whole batch, so they stay in L2) per K-step of every pixel tile.
* **materialised**: one GEMM ``routing (B·m, E) @ experts (E, Cout·Cin/g·kh·kw)`` writes the
  mixed kernels, which every pixel tile then reads. Chosen only while it pays and is bounded:
  when a region has at least ``MATERIALISE_MIN_PIXELS`` output pixels to amortise it and the
  mixed kernels are no larger than the output ``y`` (``m·Cin/g·kh·kw <= Ho·Wo``); where only the
  second fails, a part of the batch at a time (``batch_parts``: at most ``MATERIALISE_MAX_PARTS``
  launches). So the extra memory is at most the size of the output, never more. The input
  gradient counts its own pixels, dx's (``input_grad_pixels``): its tiles are dx's, so that is
  what a materialised kernel saves mixing for, and dx is the output it bounds the memory by.

The spatial attention ``spatial[b, u, v]`` is applied to the weight tile in both cases (a per-row
scale), so it is never materialised into the kernels.

DRConv (``guide``): the pixels of every sample are sorted by region (``region_tables.py``: a stable
counting sort on the device, one launch, no host synchronisation), and a pixel tile holds pixels of
one region only, so the forward is a grouped GEMM: one conv per output pixel, whatever m is. The
grid has the upper bound ``ceil(Ho·Wo / BLOCK_P) + m`` tiles per sample; tiles past a sample's last
one run an empty loop.

Backward:

* input gradient, gather form (each ``dx`` element written once, no atomics):
  ``kernels/expert_conv_input_grad.py``, on this module's weight sources, keys and tile helpers.
* kernel gradient ``dW[b,r] = Σ_{p in region r} dy[b,:,p] ⊗ patch[b,p,:]`` per (sample, region):
  ``kernels/expert_conv_weight_grad.py``, which shares this module's region tables and keys.
* guide scores ``∂S[b,r,p] = Σ_o dy[b,o,p]·y_r[b,o,p]`` for the straight-through estimator:
  ``kernels/expert_conv_guide.py``, on this module's forward tile (y_r recomputed for every region).

Kernels here know nothing of autograd: ``ops/expert_conv.py`` wires them into torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (INT32_MAX, TRITON_VERSION, Launch, cacheable, cdiv, config_key, is_channels_last, layout,
                      needs_int64, next_power_of_2, planned)
from ._launch import conv_input_precision as _input_precision
from . import expert_conv_rows
from .configs import get_config
from ._indexing import widen
from .layout import channels_last_copy, channels_last_empty
from .region_tables import RegionTables, meta_region_tables, region_tile, region_tile_bound
# A region needs this many output pixels before materialising its mixed kernel beats mixing on the fly.
MATERIALISE_MIN_PIXELS = 256
# At most this many launches per pass when the batch's mixed kernels are materialised a part at a time.
MATERIALISE_MAX_PARTS = 8


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, r, w_off, sp_off, sp_mask, mask, NUM_MIX: tl.constexpr,
                 sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb,
                 MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_64: tl.constexpr):
    """The tile ``W[b, r]`` at element offsets ``w_off`` (o, c, u, v part), in ACC_DTYPE where it is
    mixed or scaled, else in the weight's own dtype.

    ``sp_off`` / ``sp_mask`` (the u, v part of the spatial offsets, one per row) broadcast against ``w_off``;
    ``sp_mask`` None: ``sp_off`` is one in-range tap's scalar offset.
    ``r`` must already be int64 in the INDEX_64 variants (or the constant 0). NUM_MIX, the experts
    mixed, is a compile-time constant: unrolled, their loads go out together, one memory round trip
    a K-step where a run-time loop waited for each in turn (X1 dx bf16 NHWC PREDICTED 8.7% -> 30%).
    """
    base = w_ptr + b * sw_b + r * sw_r + w_off
    if MIX:
        tile = tl.zeros(w_off.shape, dtype=ACC_DTYPE)
        coef_row = coef_ptr + b * sc_b + r * sc_r
        if INDEX_64:
            # Step scalar pointers by one expert instead of forming e * sw_e: 64-bit offsets with no
            # 64-bit product in the loop (the product made ptxas 12.8 spill the DRConv forward on sm_80).
            expert = w_ptr + b * sw_b + r * sw_r
            for e in tl.static_range(NUM_MIX):
                coef = tl.load(coef_row).to(ACC_DTYPE)
                tile += coef * tl.load(expert + w_off, mask=mask, other=0.0).to(ACC_DTYPE)
                coef_row += sc_e
                expert += sw_e
        else:
            for e in tl.static_range(NUM_MIX):
                coef = tl.load(coef_row + e * sc_e).to(ACC_DTYPE)
                tile += coef * tl.load(base + e * sw_e, mask=mask, other=0.0).to(ACC_DTYPE)
    elif HAS_SPATIAL:
        tile = tl.load(base, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        # As stored: the caller converts it to the operand's dtype, and a round trip through
        # ACC_DTYPE would stage the tile through registers instead of an async copy to shared memory.
        tile = tl.load(base, mask=mask, other=0.0)
    if HAS_SPATIAL:
        if sp_mask is None:  # one in-range tap: a scalar
            scale = tl.load(spatial_ptr + b * ssb + sp_off)
        else:
            scale = tl.load(spatial_ptr + b * ssb + sp_off, mask=sp_mask, other=0.0)
        tile = tile * scale.to(ACC_DTYPE)
    return tile


@triton.jit
def _split_k(k, CH, KW):
    """(c, u, v) of the flattened reduction index k = (u·KW + v)·CH + c (the fallback loops' K-steps)."""
    tap = k // CH
    return k % CH, tap // KW, tap % KW


@triton.jit
def _rows_tile(rows, cols, row_ok, col_ok, CHANNEL_ROWS: tl.constexpr):
    """The (rows x cols) tile at ``rows[:, None] + cols[None, :]`` (a tap's pixels x channels), zero
    where masked. CHANNEL_ROWS: loaded as (cols x rows) and transposed, which is what leads triton
    3.9's coalescing to lay the lanes along the pixels (see ``_tap_meta``)."""
    if CHANNEL_ROWS:
        return tl.trans(tl.load(rows[None, :] + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0))
    return tl.load(rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptrs, tile, mask, CHANNEL_ROWS_OUT: tl.constexpr):
    """Store a (pixels x channels) tile; CHANNEL_ROWS_OUT: as (channels x pixels), transposed (see
    ``_out_meta``)."""
    if CHANNEL_ROWS_OUT:
        tl.store(tl.trans(ptrs), tl.trans(tile), mask=tl.trans(mask))
    else:
        tl.store(ptrs, tile, mask=mask)


@triton.jit
def _inside_bits(first, step, size, K: tl.constexpr):
    """Per element, bit t set where first + t·step lies in [0, size), for the K taps of one axis."""
    inside = tl.zeros_like(first)
    for t in tl.static_range(K):
        position = first + t * step
        inside |= ((position >= 0) & (position < size)).to(inside.dtype) << t
    return inside


@triton.jit
def _conv_tile(x_ptr, w_ptr, coef_ptr, spatial_ptr, b, r, g, o, o_ok, i, j, pix_ok, c_end,
               H, W, CIN_G, NUM_MIX,
               sxb, sxc, sxh, sxw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
               SH, SW, PH, PW, DH, DW,
               KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, INDEX_64: tl.constexpr,
               ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr):
    """acc[p, n] = Σ_k patch[b, (i_p, j_p), k] · W[b, r, o_n, k] over channels c < c_end (0 skips it all).

    TAP_LOOP: K-steps of BLOCK_K channels of one tap, one loop over all the taps' steps (see below).
    Otherwise (fewer channels per group than BLOCK_K: depth-wise, narrow groups) one loop over the
    flattened reduction k = (u·kw + v)·CIN_G + c, which wastes no lanes on a short channel axis.
    CHANNEL_ROWS: the per-tap patch is loaded as (channels x pixels) and transposed (see ``_tap_meta``).
    """
    h_first = i * SH - PH
    w_first = j * SW - PW
    x_group = x_ptr + b * sxb + (g * CIN_G) * sxc
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC_DTYPE)
    if TAP_LOOP:
        cc = tl.arange(0, BLOCK_K)
        if INDEX_64:
            cc = cc.to(tl.int64)
        # One loop over (tap, channel block): the pipeline's loads run ahead across the taps, where a
        # channel loop per tap fills and drains it KH·KW times a tile. What a tap changes is formed
        # without per-row work in the loop: its offset is a scalar (u·DH·sxh + v·DW·sxw), and whether a
        # row reads inside the image is bit u of h_inside and bit v of w_inside (KH, KW <= 32).
        h_inside = tl.where(pix_ok, _inside_bits(h_first, DH, H, KH), 0)
        w_inside = _inside_bits(w_first, DW, W, KW)
        x_rows = x_group + h_first * sxh + w_first * sxw
        w_cols = (o * sw_o)[None, :]
        tap = 0
        c0 = 0
        for _ in range(0, KH * KW * tl.cdiv(c_end, BLOCK_K)):
            c = c0 + cc
            u = tap // KW
            v = tap - u * KW
            row_ok = ((h_inside >> u) & (w_inside >> v) & 1) != 0
            x_tap = widen(u * DH, INDEX_64) * sxh + widen(v * DW, INDEX_64) * sxw
            w_tap = widen(u, INDEX_64) * sw_u + widen(v, INDEX_64) * sw_v
            sp_tap = widen(u, INDEX_64) * ssu + widen(v, INDEX_64) * ssv
            c_ok = c < c_end
            patch = _rows_tile(x_rows + x_tap, c * sxc, row_ok, c_ok, CHANNEL_ROWS)
            weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, r, (c * sw_i + w_tap)[:, None] + w_cols, sp_tap,
                                  None, c_ok[:, None] & o_ok[None, :], NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r,
                                  sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
            # out_dtype on every accumulating dot: triton 3.6 asserts it equals acc's dtype and
            # defaults it to fp32, so fp64 accumulators must name it.
            acc = tl.dot(patch, weight.to(patch.dtype), acc, input_precision=INPUT_PRECISION,
                         out_dtype=ACC_DTYPE)
            c0 += BLOCK_K
            tap_done = c0 >= c_end
            tap += tap_done.to(tl.int32)
            c0 = tl.where(tap_done, 0, c0)
    else:
        k_end = c_end * (KH * KW)
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                k = k.to(tl.int64)
            k_ok = k < k_end
            c, u, v = _split_k(k, CIN_G, KW)
            h = h_first[:, None] + (u * DH)[None, :]
            w = w_first[:, None] + (v * DW)[None, :]
            ok = pix_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            patch = tl.load(x_group + (c * sxc)[None, :] + h * sxh + w * sxw, mask=ok, other=0.0)
            weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, r,
                                  (c * sw_i + u * sw_u + v * sw_v)[:, None] + (o * sw_o)[None, :],
                                  (u * ssu + v * ssv)[:, None], k_ok[:, None], k_ok[:, None] & o_ok[None, :],
                                  NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE,
                                  INDEX_64)
            acc = tl.dot(patch, weight.to(patch.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def expert_conv_fwd_kernel(
    x_ptr, w_ptr, coef_ptr, spatial_ptr, bias_ptr, y_ptr,
    pixel_start_ptr, count_ptr, perm_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX: tl.constexpr, NUM_REGIONS, TILES, N_TILES,
    sxb, sxc, sxh, sxw,
    sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
    sc_b, sc_r, sc_e,
    ssb, ssu, ssv,
    sbias_b, sbias_r, sbias_o,
    syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GUIDE: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr,
    CHANNEL_ROWS_OUT: tl.constexpr,
):
    """y[b, o, p] = bias[b, r(p), o] + Σ_k W[b, r(p), o, k] · patch[b, p, k]; a tile is one region."""
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    pid_n = tl.program_id(1)
    g = pid_n // N_TILES
    on = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = on < COUT_G
    P = Ho * Wo
    c_end = CIN_G
    if INDEX_64:
        b = b.to(tl.int64)
    if HAS_GUIDE:
        r, p, pix_ok, valid = region_tile(pixel_start_ptr, count_ptr, perm_ptr, b, t, NUM_REGIONS, P, BLOCK_P,
                                          BLOCK_R)
        c_end = tl.where(valid, c_end, 0)
        r = widen(r, INDEX_64)
    else:
        r = 0
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_ok = p < P
    if INDEX_64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
        on = on.to(tl.int64)
        g = g.to(tl.int64)
    o = g * COUT_G + on
    i = p // Wo
    j = p % Wo
    acc = _conv_tile(x_ptr, w_ptr, coef_ptr, spatial_ptr, b, r, g, o, o_ok, i, j, pix_ok, c_end,
                     H, W, CIN_G, NUM_MIX,
                     sxb, sxc, sxh, sxw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
                     SH, SW, PH, PW, DH, DW, KH, KW, TAP_LOOP, BLOCK_P, BLOCK_N, BLOCK_K, MIX, HAS_SPATIAL, INDEX_64,
                     ACC_DTYPE, INPUT_PRECISION, CHANNEL_ROWS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + b * sbias_b + r * sbias_r + o * sbias_o, mask=o_ok, other=0.0).to(ACC_DTYPE)[None, :]
    y_off = b * syb + (o * syc)[None, :] + (i * syh + j * syw)[:, None]
    _store_tile(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), pix_ok[:, None] & o_ok[None, :], CHANNEL_ROWS_OUT)


# --------------------------------------------------------------------------------------------
# Host side: region tables, weight sources, configurations, launches
# --------------------------------------------------------------------------------------------

@dataclass
class WeightSource:
    """Where the kernels read W[b, r]: the experts mixed on the fly, or materialised mixed kernels.

    ``weight`` strides are (b, r, e, o, c, u, v): experts have zero (b, r) strides, materialised
    kernels a zero e stride. ``coef`` is the routing (B, m, E) when mixing on the fly, else None.
    """

    weight: torch.Tensor
    strides: tuple[int, ...]
    coef: torch.Tensor | None
    num_mix: int

    @property
    def mix(self) -> bool:
        return self.coef is not None


def should_materialise(experts: torch.Tensor, routing: torch.Tensor, out_pixels: int) -> bool:
    """Materialise while it pays (enough pixels per region) and stays bounded (no bigger than y)."""
    return materialises(experts[0].numel() // experts.shape[1], routing.shape[1], out_pixels)


def materialises(filter_size: int, m: int, out_pixels: int) -> bool:
    """``should_materialise`` from sizes alone: ``filter_size`` = Cin/g · kh · kw."""
    return out_pixels >= MATERIALISE_MIN_PIXELS * m and m * filter_size <= out_pixels


def materialise_part(filter_size: int, B: int, m: int, out_pixels: int) -> int:
    """Samples whose mixed kernels one launch materialises: B when ``materialises``; else, where
    the mixing pays (enough pixels per region) but all B samples' kernels would outgrow y, the most
    samples whose kernels stay within y's size, evened out over at most MATERIALISE_MAX_PARTS
    launches (so the bound on extra memory holds); 0 mixes on the fly."""
    if materialises(filter_size, m, out_pixels):
        return B
    if B == 0 or out_pixels < MATERIALISE_MIN_PIXELS * m:
        return 0
    most = B * out_pixels // (m * filter_size)
    if most == 0 or cdiv(B, most) > MATERIALISE_MAX_PARTS:
        return 0
    return cdiv(B, cdiv(B, most))


def batch_parts(experts: torch.Tensor, routing: torch.Tensor | None, out_pixels: int,
                materialise: bool | None) -> list[tuple[slice, bool]]:
    """(samples, materialise) of each launch of a pass: the whole batch at once, or, when only a
    part of it may be materialised at a time (``materialise_part``), equal parts of it."""
    if routing is None or materialise is not None:
        return [(slice(None), bool(materialise))]
    B, m = routing.shape[:2]
    if should_materialise(experts, routing, out_pixels):
        return [(slice(None), True)]
    part = materialise_part(experts[0].numel() // experts.shape[1], B, m, out_pixels)
    if part == 0:
        return [(slice(None), False)]
    return [(slice(b, b + part), True) for b in range(0, B, part)]


def _part(t: torch.Tensor | None, samples: slice) -> torch.Tensor | None:
    return None if t is None else t[samples]


# The axis a pass lays its materialised kernels' innermost in memory: its reduction axis, so that
# tl.dot reads the weight tile K-major, as cp.async copies it (the only order tf32 wgmma takes).
CIN_INNERMOST = 2  # the forward and the guide scores
COUT_INNERMOST = 1  # the input gradient


def weight_source(experts: torch.Tensor, routing: torch.Tensor | None, materialise: bool,
                  innermost: int = CIN_INNERMOST) -> WeightSource:
    """``routing`` is (B, m, E). Materialising costs B·m·Cout·Cin/g·kh·kw elements of x's dtype.
    ``innermost``: CIN_INNERMOST or COUT_INNERMOST, the pass's reduction axis, for materialised
    kernels (``mix_experts``). Experts mixed on the fly keep Cin/g innermost in every pass: their tile
    is mixed in registers and the compiler stores it to shared memory in either order (Cout
    innermost spilled a 64-bit DRConv input gradient on sm_80 with triton 3.6, and moved no row of
    the static model: X1 dx).

    Without routing, ``experts`` are already mixed per-sample kernels (B, m, Cout, Cin/g, kh, kw)
    (the ops' higher-order derivatives convolve with a kernel gradient): read as materialised.
    """
    if routing is None:
        s = experts.stride()
        return WeightSource(experts, (s[0], s[1], 0, *s[2:]), None, 1)
    E = experts.shape[0]
    if materialise:
        mixed = mix_experts(experts, routing, innermost)
        s = mixed.stride()
        return WeightSource(mixed, (s[0], s[1], 0, *s[2:]), None, 1)
    experts = _channels_innermost(experts)
    s = experts.stride()
    return WeightSource(experts, (0, 0, *s), routing, E)


def mix_experts(experts: torch.Tensor, routing: torch.Tensor, innermost: int = CIN_INNERMOST) -> torch.Tensor:
    """``routing (B, m, E) @ experts`` as (B, m, Cout, Cin/g, kh, kw), the experts' axis ``innermost``
    laid innermost in memory: mixed straight into that order, so only the E experts are permuted (no
    copy at all when they are laid so already), never the B·m mixed kernels."""
    B, m, E = routing.shape
    ordered = experts.movedim(innermost, -1)
    flat = torch.matmul(routing.reshape(B * m, E), ordered.reshape(E, -1))
    return flat.reshape(B, m, *ordered.shape[1:]).movedim(-1, innermost + 1)


def _channels_innermost(experts: torch.Tensor) -> torch.Tensor:
    """``experts`` (E, Cout, Cin/g, kh, kw) with Cin/g innermost in memory, as experts mixed on the fly
    are read in every pass. A view when they are laid out so already (channels_last), else one copy
    of the E experts, made outside every kernel loop."""
    return experts.movedim(CIN_INNERMOST, -1).contiguous().movedim(-1, CIN_INNERMOST)


def _pow2_between(n: int, low: int, high: int) -> int:
    return max(low, min(next_power_of_2(max(int(n), 1)), high))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def problem_key(x: torch.Tensor, experts: torch.Tensor, m: int, groups: int, stride) -> dict:
    B, Cin, H, W = x.shape
    E, Cout, _, kh, kw = experts.shape
    # depthwise (one input channel per group) sets apart the layers whose tiles are shaped unlike
    # any other's; groups itself is bucketed by the tuning tables like the channel counts. Both
    # stride components: a (1, 2) layer must not take a (1, 1) layer's tiles.
    return {"B": B, "Cin": Cin, "Cout": Cout, "H": H, "W": W, "kh": kh, "kw": kw, "E": E, "m": m,
            "groups": groups, "depthwise": int(Cin == groups), "stride_h": stride[0], "stride_w": stride[1],
            "channels_last": int(is_channels_last(x)), "dtype_bytes": x.element_size()}


def _block_k(dtype: torch.dtype) -> int:
    # 4-byte operands: K = 32 gathered tiles spill on sm_80; 16 keeps every default spill-free.
    return 32 if dtype.itemsize == 2 else 16


def _num_warps(dtype: torch.dtype, tile_rows: int, mixing: bool = False) -> int:
    # Measured with `dynconv inspect`: 4-byte 64-row tiles at 8 warps make ptxas spill a few
    # scalars on sm_80 (at under 64 registers); at 4 warps they fit without spilling. So do 64-row
    # tiles mixing on the fly (their per-tap loops hold about 200 registers a thread on sm_80).
    return 8 if (dtype.itemsize == 2 and not mixing) or tile_rows >= 128 else 4


def _channel_block(cin_g: int, dtype: torch.dtype, mixing: bool = False) -> int:
    """The reduction block of a per-tap channel loop: the largest power of two within a group's
    channels (so no lane is masked when they are a multiple of it), up to what the operand width
    allows; below 16 channels the flattened reduction's block (``_conv_tile``). Mixing on the fly
    holds an fp32 weight tile in registers: there the flattened block's size, which sm_80 fits
    without spilling (`dynconv inspect`; 64 and 32 spill the DRConv and ODConv rows)."""
    if cin_g < 16 or mixing:
        return min(_block_k(dtype), 1 << (max(cin_g, 16).bit_length() - 1))
    cap = {2: 64, 4: 32}.get(dtype.itemsize, 16)
    return min(cap, 1 << (cin_g.bit_length() - 1))


def _streams(reduce_g: int, dtype: torch.dtype, mixing: bool, index_64: bool) -> bool:
    """Whether a channels_last launch takes :func:`_streamed_tiles`: a plain (materialised) weight of
    2- or 4-byte operands whose groups fill the per-tap K-steps. 64-bit offsets keep the smaller
    tiles, whose registers are checked spill-free with them."""
    return not mixing and not index_64 and dtype.itemsize in (2, 4) and reduce_g >= 64


def _forward_streams(cin_g: int, dtype: torch.dtype, mixing: bool, index_64: bool, plain: bool,
                     pixels_per_region: int) -> bool:
    """:func:`_streams` for a forward: its regions (or strided samples) tall enough for 128-pixel tiles."""
    return _streams(cin_g, dtype, mixing, index_64) and (plain or pixels_per_region >= 1024)


def _streamed_tiles(cols: int, dtype: torch.dtype) -> dict:
    """Tiles for channels_last convs whose operands both stream through cp.async (K-steps of 64 bytes
    a row), four stages deep: the loads of a K-step are issued three K-steps before its wgmma, which
    covers a memory round trip of about 1000 cycles (the latency the model fits) at 2 programs an SM.
    64 x 256 where an output tile has 256 columns (each loaded row feeds more MMA), else 128 rows.
    PREDICTED on triton 3.6, sm_90: C256/E2 fwd and dx, bf16 and fp32, 98-100%; E1 94% (its 784
    pixels a sample in tiles of 64). Three stages leave the K-steps waiting (C256 fwd bf16 58%)."""
    block_n = _pow2_between(cols, 16, 256)
    return {"BLOCK_P": 64 if block_n == 256 else 128, "BLOCK_N": block_n, "BLOCK_K": 64 // dtype.itemsize,
            "num_warps": 8, "num_stages": 4}


def default_forward_config(cout_g: int, dtype: torch.dtype, pixels_per_region: int = 0,
                           index_64: bool = False, cin_g: int = 0, mixing: bool = False,
                           channels_last: bool = True, plain: bool = False) -> dict:
    """``plain``: one kernel a sample at stride 1, no region tables, no guide scores (whose registers
    a 256-pixel NCHW tile leaves no room for: see _nchw_tiles)."""
    if channels_last and _forward_streams(cin_g, dtype, mixing, index_64, plain, pixels_per_region):
        return _streamed_tiles(cout_g, dtype)
    # Taller pixel tiles amortise the on-the-fly mixing (E·BLOCK_K·BLOCK_N FMAs per K-step) over
    # more rows; small regions keep 64 so their last, partial tile wastes less. With int64 offsets
    # a 128-pixel DRConv tile mixing on the fly spills on sm_80 and sm_90 (dynconv inspect); 64 does not.
    block_p = 128 if pixels_per_region >= 1024 and dtype != torch.float64 and not index_64 else 64
    block_k = _channel_block(cin_g, dtype, mixing)
    config = {"BLOCK_P": block_p, "BLOCK_N": _pow2_between(cout_g, 16, 64), "BLOCK_K": block_k,
              "num_warps": _num_warps(dtype, block_p, mixing), "num_stages": 2}
    if channels_last:
        return config
    config = _nchw_tiles(config, cout_g, cin_g, dtype, mixing, plain, index_64)
    # 64-bit offsets at eight warps: at four a DRConv mixing on the fly spills on sm_80 and sm_90
    # (64 columns, triton 3.9; 32 columns, triton 3.6 on sm_80). Whether a launch mixes is the
    # caller's to choose, so every 64-bit launch.
    return {**config, "num_warps": 8} if index_64 else config


def _nchw_tiles(config: dict, cols: int, reduce_g: int, dtype: torch.dtype, mixing: bool, plain: bool = False,
                index_64: bool = False) -> dict:
    """NCHW per-tap tiles (``cols`` the output columns, ``reduce_g`` the channels a tap reduces).

    An NCHW patch tile is pixel-contiguous: gathered with scalar loads (about six instructions an
    element: address, load, store to shared memory), whose values sit in registers until stored.
    So K-steps of 16 channels (32 or 64 spill on sm_80 with triton 3.9, and cost sm_90 L1 traffic
    with 3.9), and columns up to 128 to spread each gathered element over more MMA work: PREDICTED
    on triton 3.6, E1 fwd bf16 NCHW 64 x 64 x 16 27%, 64 x 128 x 16 78%; E2 fp32 128 x 64 x 16 77%,
    128 x 128 x 16 98%. Tiles of 64 pixels at four warps (one 64 x 128 wgmma group a K-step); 2-byte
    tiles of 256 pixels for plain convs (below; ``plain``: see default_forward_config).
    """
    if reduce_g < 16:  # the flattened loop: its own tiles
        return config
    config = {**config, "BLOCK_K": 16}
    if mixing or reduce_g < 64:
        return config
    tall = config["BLOCK_P"] == 128
    if dtype.itemsize == 2:
        # Each gathered element feeds BLOCK_N columns of MMA: 64 x 256 where a group has 256 output
        # columns (PREDICTED on triton 3.6 against 64 x 128: E1 fwd bf16 NCHW 78% -> 95%, E1 dx 74%
        # -> 94%). 128 x 128 x 32 spills on sm_80 with triton 3.9.
        if cols >= 256:
            return {**config, "BLOCK_P": 64, "BLOCK_N": 256, "num_warps": 8, "num_stages": 2}
        # 256 x 128 where 128 pixels were tall enough: E2 fwd/dx bf16 NCHW 78% -> 94% PREDICTED on
        # triton 3.6, whose ptxas fits it on sm_80 and sm_90 (217 and 200 registers, two stages);
        # on triton 3.9 69/70% -> 83/85%, with the tile channel-major (``_tap_meta``'s CHANNEL_ROWS:
        # 204-255 registers; loaded pixels x channels it spilled 270-360 local loads and stores).
        # The guide-score kernel spills it on 3.6 (84-138 local loads and stores): plain convs only;
        # on 3.9 not the 64-bit variants, which load pixels x channels.
        if plain and tall and cols >= 128 and (TRITON_VERSION <= (3, 6) or not index_64):
            return {**config, "BLOCK_P": 256, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    # 4-byte 64-pixel tiles at eight warps: at four a DRConv fwd spills on sm_80 with triton 3.9.
    return {**config, "BLOCK_N": _pow2_between(cols, 16, 128), "num_warps": 8 if tall or dtype.itemsize == 4 else 4,
            "num_stages": 3 if tall and dtype.itemsize == 2 else 2}


def _geometry_args(stride, padding, dilation) -> dict:
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def _mixing_args(source: WeightSource, spatial) -> dict:
    coef_strides = source.coef.stride() if source.mix else (0, 0, 0)
    spatial_strides = spatial.stride() if spatial is not None else (0, 0, 0)
    return dict(
        w_ptr=source.weight, coef_ptr=source.coef, spatial_ptr=spatial,
        **dict(zip(("sw_b", "sw_r", "sw_e", "sw_o", "sw_i", "sw_u", "sw_v"), source.strides)),
        **dict(zip(("sc_b", "sc_r", "sc_e"), coef_strides)),
        **dict(zip(("ssb", "ssu", "ssv"), spatial_strides)),
    )


def _bias_args(bias_mixed) -> dict:
    strides = bias_mixed.stride() if bias_mixed is not None else (0, 0, 0)
    return dict(bias_ptr=bias_mixed, **dict(zip(("sbias_b", "sbias_r", "sbias_o"), strides)))


def _check_grid(axis1: int) -> None:
    if axis1 > 65535:
        raise ValueError(f"too many channel tiles for the grid ({axis1}); use a larger BLOCK_N")


def output_pixels(hw, kernel_hw, stride, padding, dilation) -> int:
    size = [(hw[a] + 2 * padding[a] - dilation[a] * (kernel_hw[a] - 1) - 1) // stride[a] + 1 for a in range(2)]
    return size[0] * size[1]


def _source_key(source: WeightSource) -> tuple:
    """A weight source's part of a plan key: the mode (mixing or materialised) and its tensors."""
    return (layout(source.weight), tuple(source.strides), layout(source.coef), source.num_mix)


def _regions_key(regions: RegionTables | None) -> tuple | None:
    """Region tables' part of a plan key: their tensors' layouts (the number of regions is count's
    width); never their values, which change with the guide every call."""
    if regions is None:
        return None
    return tuple(layout(t) for t in (regions.region, regions.perm, regions.count, regions.pixel_start))


def _region_tensors(regions: RegionTables | None, names: tuple[str, ...]) -> tuple:
    return tuple(None if regions is None else getattr(regions, n) for n in names)


def _tap_meta(cin_g: int, kernel_hw, block_k: int, pixels_first: torch.Tensor, index_64: bool) -> dict:
    """The compile-time kernel size and ``_conv_tile``'s loop form: K-steps within a tap while a
    group's channels fill a reduction block (and the kernel is at most 32 wide: the loops keep a bit
    a kernel row and column), the flattened reduction otherwise (no lanes wasted). Both layouts:
    NCHW takes its own tiles (``_nchw_tiles``).

    CHANNEL_ROWS for NCHW (``pixels_first``, the tensor whose per-tap tiles the kernel gathers) on
    triton 3.9: its pixel offsets' contiguity is hidden (``p % Wo``), and its coalescing then lays the
    lanes along the channels, an HW-strided sector each (E2 fwd/dx fp32 NCHW PREDICTED 64/46% ->
    98/98%); a (channels x pixels) load, transposed, lays them along the pixels. Triton 3.6 lays
    them along the pixels as written and loses with the transposed form (E2 fwd bf16 94% -> 49%).
    Not in the 64-bit variants: the transposed tile's registers spill a DRConv forward mixing on
    the fly on sm_80 (61 local loads and stores at 128 registers)."""
    channel_rows = TRITON_VERSION > (3, 6) and not is_channels_last(pixels_first) and not index_64
    tap_loop = cin_g >= block_k and max(kernel_hw) <= 32
    return dict(KH=kernel_hw[0], KW=kernel_hw[1], TAP_LOOP=tap_loop, CHANNEL_ROWS=channel_rows)


def _out_meta(out: torch.Tensor) -> dict:
    """CHANNEL_ROWS_OUT, the store's counterpart of ``_tap_meta``'s CHANNEL_ROWS: on triton 3.9 an
    output tile stored into NCHW as written (pixels x channels, the pixel offsets' contiguity hidden)
    took 209-255 registers, one program an SM (C256 dx bf16 NCHW PREDICTED 46%); stored as
    (channels x pixels), transposed, 111 (86%). Triton 3.6 takes 112 as written and 255 transposed."""
    return dict(CHANNEL_ROWS_OUT=TRITON_VERSION > (3, 6) and not is_channels_last(out))


def _conv_tile_loops(cin_g: int, meta: dict) -> tuple:
    """``_conv_tile``'s loop: over every tap's channel blocks, or the flattened reduction (the
    experts of on-the-fly mixing are unrolled inside a step)."""
    taps = meta["KH"] * meta["KW"]
    if meta["TAP_LOOP"]:
        return (cdiv(cin_g, meta["BLOCK_K"]) * taps,)
    return (cdiv(cin_g * taps, meta["BLOCK_K"]),)


def _past_int32(image: torch.Tensor, out_channels: int, out_pixels: int) -> bool:
    """Whether a launch on ``image`` (x, or dx) and its output-side tensor (y, or dy: ``out_channels``
    x ``out_pixels`` a sample) takes 64-bit offsets, as its launcher will find: for the defaults,
    which are chosen before the output-side tensor is at hand."""
    return needs_int64(image) or image.shape[0] * out_channels * out_pixels > INT32_MAX


def is_plain_conv(m: int, stride) -> bool:
    """One kernel a sample at stride 1: the convs the widest NCHW tiles are for (``plain`` in
    :func:`default_forward_config`)."""
    return m == 1 and tuple(stride) == (1, 1)


def _forward_problem(x, experts, m, groups, stride, padding, dilation) -> dict:
    """:func:`default_forward_config`'s arguments for a forward on ``x``."""
    pixels = output_pixels(x.shape[2:], experts.shape[3:], stride, padding, dilation)
    return dict(cout_g=experts.shape[1] // groups, dtype=x.dtype, pixels_per_region=pixels // m,
                index_64=_past_int32(x, experts.shape[1], pixels), cin_g=experts.shape[2],
                mixing=materialise_part(experts[0].numel() // experts.shape[1], x.shape[0], m, pixels) == 0,
                channels_last=is_channels_last(x), plain=is_plain_conv(m, stride))


def forward_config(x, experts, m, groups, stride, padding, dilation) -> dict:
    return get_config("expert_conv_fwd", problem_key(x, experts, m, groups, stride),
                      default_forward_config(**_forward_problem(x, experts, m, groups, stride, padding, dilation)))


def _copies_for_streaming(problem: dict) -> bool:
    """Whether a forward-like pass (the forward, the expert-bank guide scores) with these
    :func:`default_forward_config` arguments reads a channels_last copy of its NCHW input
    (``kernels/layout.py``): where that copy's conv takes the streamed tiles. PREDICTED (sm_90,
    triton 3.6) with the copy counted: C256 fwd bf16 NCHW 27% -> 86%."""
    return not problem["channels_last"] and _forward_streams(
        problem["cin_g"], problem["dtype"], problem["mixing"], problem["index_64"], problem.get("plain", False),
        problem["pixels_per_region"])


def _routed_config(kernel: str, key: dict, problem: dict, copies: bool, default) -> dict:
    """``kernel``'s config for the tensor a pass reads: where it reads a channels_last copy, the
    copy's (the problem key and the default's layout switched to channels_last)."""
    if copies:
        key, problem = {**key, "channels_last": 1}, {**problem, "channels_last": True}
    return get_config(kernel, key, default(**problem))


def forward_copies_input(x, experts, m, groups, stride, padding, dilation, has_spatial: bool = False) -> bool:
    """Whether a forward on NCHW ``x`` reads a channels_last copy of it (:func:`_copies_for_streaming`)
    rather than in place (:func:`forward_in_rows`)."""
    problem = _forward_problem(x, experts, m, groups, stride, padding, dilation)
    return _copies_for_streaming(problem) and not _in_rows(problem, x, experts, m, groups, stride, padding, dilation,
                                                           has_spatial)


def forward_in_rows(x, experts, m, groups, stride, padding, dilation, has_spatial: bool = False) -> bool:
    """Whether a forward reads NCHW ``x`` in place, in aligned row tiles (``expert_conv_rows``), where
    it would otherwise read a channels_last copy; ``experts`` as :func:`_per_kernel` shapes them."""
    return _in_rows(_forward_problem(x, experts, m, groups, stride, padding, dilation), x, experts, m, groups,
                    stride, padding, dilation, has_spatial)


def _in_rows(problem: dict, x, experts, m, groups, stride, padding, dilation, has_spatial: bool) -> bool:
    Cout, kernel_hw = experts.shape[1], tuple(experts.shape[3:])
    out_w = output_pixels((1, x.shape[3]), (1, kernel_hw[1]), (1, stride[1]), (0, padding[1]), (1, dilation[1]))
    return expert_conv_rows.supported(x, Cout, out_w, problem["mixing"], has_spatial, m, kernel_hw, groups, stride,
                                      padding, dilation, problem["index_64"])


def forward_route(x, experts, m, groups, stride, padding, dilation,
                  has_spatial: bool = False) -> tuple[bool, bool, dict | None]:
    """(whether the forward reads ``x`` in row boxes, whether it reads a channels_last copy of it, the
    config of the tensor it otherwise reads), from one look at the problem: the op's host path per call."""
    problem = _forward_problem(x, experts, m, groups, stride, padding, dilation)
    if _in_rows(problem, x, experts, m, groups, stride, padding, dilation, has_spatial):
        return True, False, None
    copies = _copies_for_streaming(problem)
    return False, copies, _routed_config("expert_conv_fwd", problem_key(x, experts, m, groups, stride), problem,
                                         copies, default_forward_config)


def forward_launch(x, source: WeightSource, spatial, bias_mixed, regions: RegionTables | None, y,
                   kernel_hw, groups, stride, padding, dilation, config: dict) -> Launch:
    if not cacheable(x):
        return _forward_launch(x, source, spatial, bias_mixed, regions, y, kernel_hw, groups, stride, padding,
                               dilation, config)
    key = ("expert_conv_fwd", layout(x), _source_key(source), layout(spatial), layout(bias_mixed),
           _regions_key(regions), layout(y), tuple(kernel_hw), groups, *stride, *padding, *dilation,
           config_key(config))
    return planned(key, ("x_ptr", "y_ptr", "w_ptr", "coef_ptr", "spatial_ptr", "bias_ptr", "pixel_start_ptr",
                         "count_ptr", "perm_ptr"),
                   (x, y, source.weight, source.coef, spatial, bias_mixed,
                    *_region_tensors(regions, ("pixel_start", "count", "perm"))),
                   lambda: _forward_launch(x, source, spatial, bias_mixed, regions, y, kernel_hw, groups, stride,
                                           padding, dilation, config))


def _forward_launch(x, source: WeightSource, spatial, bias_mixed, regions: RegionTables | None, y,
                    kernel_hw, groups, stride, padding, dilation, config: dict) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    m = regions.num_regions if regions is not None else 1
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    n_tiles = cdiv(Cout // groups, meta["BLOCK_N"])
    tiles = region_tile_bound(Ho * Wo, m, meta["BLOCK_P"]) if regions is not None else cdiv(Ho * Wo, meta["BLOCK_P"])
    args = dict(
        x_ptr=x, y_ptr=y, **_mixing_args(source, spatial), **_bias_args(bias_mixed),
        pixel_start_ptr=regions.pixel_start if regions is not None else None,
        count_ptr=regions.count if regions is not None else None,
        perm_ptr=regions.perm if regions is not None else None,
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups,
        NUM_REGIONS=m, TILES=tiles, N_TILES=n_tiles,
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("syb", "syc", "syh", "syw"), y.stride())),
        **_geometry_args(stride, padding, dilation),
    )
    index_64 = needs_int64(x, y, source.weight, source.coef, spatial, bias_mixed)
    meta.update(_tap_meta(Cin // groups, kernel_hw, meta["BLOCK_K"], x, index_64), **_out_meta(y))
    meta.update(BLOCK_R=next_power_of_2(m), MIX=source.mix, NUM_MIX=source.num_mix,
                HAS_SPATIAL=spatial is not None, HAS_BIAS=bias_mixed is not None, HAS_GUIDE=regions is not None,
                INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_fwd_kernel, (B * tiles, groups * n_tiles, 1), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_conv_tile_loops(Cin // groups, meta))


def channels_last_stand_in(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape and dtype in channels_last: what a config is looked up for
    when a launch reads a channels_last copy."""
    return channels_last_empty(t, "meta")


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated.
# --------------------------------------------------------------------------------------------

def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_strides(source: WeightSource) -> tuple:
    """A materialised (one region) source's (b, o, i, u, v) strides: what ``expert_conv_rows`` reads."""
    b, _, _, *rest = source.strides
    return (b, *rest)


def _per_kernel(experts, routing):
    """(an experts-shaped tensor for configurations and the kernel size, m): without routing,
    ``experts`` are per-sample kernels (B, m, Cout, Cin/g, kh, kw), see ``weight_source``."""
    if routing is None:
        return experts[0], experts.shape[1]
    return experts, routing.shape[1]


def expert_conv_forward(x, experts, routing, spatial, bias_mixed, regions: RegionTables | None, y, groups, stride,
                        padding, dilation, materialise: bool | None = None, config: dict | None = None) -> None:
    """``routing`` (B, m, E); ``bias_mixed`` (B, m, Cout) or None; ``regions`` the tables of a DRConv
    guide of m > 1 regions, else None."""
    shaped, m = _per_kernel(experts, routing)
    in_rows = False
    if config is None:
        in_rows, copies, config = forward_route(x, shaped, m, groups, stride, padding, dilation, spatial is not None)
        x = channels_last_copy(x) if copies else x
    for samples, materialised in batch_parts(experts, routing, y.shape[2] * y.shape[3], materialise):
        source = weight_source(experts, _part(routing, samples), materialised)
        if in_rows and not source.mix:
            expert_conv_rows.forward_launch(x[samples], source.weight, _rows_strides(source),
                                            _part(bias_mixed, samples), y[samples], shaped.shape[3:], groups,
                                            padding, dilation)()
            continue
        if in_rows:  # a part that mixes on the fly after all (an explicit ``materialise=False``)
            config = forward_config(x, shaped, m, groups, stride, padding, dilation)
        part_regions = regions.part(samples) if regions is not None else None
        forward_launch(x[samples], source, _part(spatial, samples), _part(bias_mixed, samples), part_regions,
                       y[samples], shaped.shape[3:], groups, stride, padding, dilation, config)()


@dataclass
class CatalogueProblem:
    """One representative layer of the AOT catalogues, on meta tensors (here and in
    ``expert_conv_weight_grad``): x, its output y, the experts, routing, spatial attention and
    mixed bias as an op receives them."""
    x: torch.Tensor
    y: torch.Tensor
    experts: torch.Tensor
    routing: torch.Tensor
    spatial: torch.Tensor | None
    bias: torch.Tensor
    groups: int
    geometry: tuple
    tag: str

    @property
    def m(self) -> int:
        return self.routing.shape[1]


# (B, Cin, Cout, H, W, kh, kw, groups, E, m, stride, spatial, label)
_CATALOGUE_SHAPES = [
    (32, 64, 64, 56, 56, 3, 3, 1, 4, 1, 1, False, "CondConv 3x3"),
    # Materialised, 128 channels a group at stride 1: the 256-pixel 2-byte NCHW tiles.
    (8, 128, 128, 56, 56, 3, 3, 1, 4, 1, 1, False, "DynamicConv 3x3 wide"),
    (32, 256, 256, 14, 14, 3, 3, 1, 4, 1, 1, True, "ODConv 3x3 small map"),
    (32, 128, 128, 15, 15, 1, 1, 1, 8, 1, 2, False, "1x1 stride 2"),
    (32, 96, 96, 28, 28, 5, 5, 96, 4, 1, 1, False, "depth-wise 5x5"),
    (8, 64, 64, 64, 64, 3, 3, 1, 8, 8, 1, False, "DRConv m=8"),
]
# A layer over 2^31 elements (B, C, H, W, k, E): the 64-bit variants.
INT64_CATALOGUE_SHAPE = (2304, 64, 128, 128, 3, 4)
INT64_CATALOGUE_GEOMETRY = ((1, 1), (1, 1), (1, 1))


def catalogue_problems() -> list[CatalogueProblem]:
    """The catalogue's layers in fp32, fp16 and bf16, NCHW and channels_last."""
    problems = []
    for B, Cin, Cout, H, W, kh, kw, groups, E, m, s, with_spatial, label in _CATALOGUE_SHAPES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                pad = ((kh - 1) // 2, (kw - 1) // 2)
                Ho = (H + 2 * pad[0] - kh) // s + 1
                Wo = (W + 2 * pad[1] - kw) // s + 1
                meta = dict(dtype=dtype, device="meta")
                problems.append(CatalogueProblem(
                    x=torch.empty((B, Cin, H, W), **meta).to(memory_format=fmt),
                    y=torch.empty((B, Cout, Ho, Wo), **meta).to(memory_format=fmt),
                    experts=torch.empty((E, Cout, Cin // groups, kh, kw), **meta),
                    routing=torch.empty((B, m, E), **meta),
                    spatial=torch.empty((B, kh, kw), **meta) if with_spatial else None,
                    bias=torch.empty((B, m, Cout), **meta), groups=groups, geometry=((s, s), pad, (1, 1)),
                    tag=f"{label} {str(dtype).removeprefix('torch.')} {'NHWC' if channels_last else 'NCHW'}"))
    return problems


def catalogue() -> list[Launch]:
    """The forward's default launches at representative shapes, on meta tensors (for AOT checks); the
    guide scores' are ``expert_conv_guide``'s, the input gradient's ``expert_conv_input_grad``'s, the
    kernel gradient's ``expert_conv_weight_grad``'s."""
    launches = []
    for problem in catalogue_problems():
        x, y, experts, routing, spatial, bias = (problem.x, problem.y, problem.experts, problem.routing,
                                                 problem.spatial, problem.bias)
        m, groups, geometry = problem.m, problem.groups, problem.geometry
        kh, kw = experts.shape[3:]
        Ho, Wo = y.shape[2], y.shape[3]
        # What the forward reads: x in row boxes, x, or its channels_last copy.
        in_rows, copies, config = forward_route(x, experts, m, groups, *geometry, spatial is not None)
        conv_x = channels_last_stand_in(x) if copies else x
        # The first launch of the pass (all of them when the batch is materialised in parts).
        samples, materialised = batch_parts(experts, routing, Ho * Wo, None)[0]
        yp, sp, bp, conv_xp = (_part(t, samples) for t in (y, spatial, bias, conv_x))
        source = weight_source(experts, _part(routing, samples), materialised)
        if in_rows:
            launch = expert_conv_rows.forward_launch(conv_xp, source.weight, _rows_strides(source), bp, yp, (kh, kw),
                                                     groups, *geometry[1:])
        else:
            regions = meta_region_tables(yp.shape[0], Ho * Wo, m) if m > 1 else None
            launch = forward_launch(conv_xp, source, sp, bp, regions, yp, (kh, kw), groups, *geometry, config)
        launch.label = problem.tag + (" materialised" if materialised else "")
        launches.append(launch)
    return launches + _int64_catalogue()


def _int64_catalogue() -> list[Launch]:
    """The int64-offset variants (over 2^31 elements): DRConv mixing on the fly with spatial attention
    and bias, and materialised kernels without a guide."""
    launches = []
    B, C, H, W, k, E = INT64_CATALOGUE_SHAPE
    geometry = INT64_CATALOGUE_GEOMETRY
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty((B, C, H, W), **meta)
    experts = torch.empty((E, C, C, k, k), **meta)
    for m, materialised in ((4, False), (1, True)):
        routing = torch.empty((B, m, E), **meta)
        source = weight_source(experts, routing, materialised)
        spatial = None if materialised else torch.empty((B, k, k), **meta)
        bias = None if materialised else torch.empty((B, m, C), **meta)
        config = forward_config(x, experts, m, 1, *geometry)
        regions = meta_region_tables(B, H * W, m) if m > 1 else None
        launch = forward_launch(x, source, spatial, bias, regions, x, (k, k), 1, *geometry, config)
        assert launch.meta["INDEX_64"]
        launch.label = (f"over 2^31 elements {'DRConv m=4 spatial' if m > 1 else 'CondConv'} bfloat16 NCHW"
                        + (" materialised" if materialised else ""))
        launches.append(launch)
    return launches
