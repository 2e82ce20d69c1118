"""K-expert kernel mixing (docs/operators.md §2): CondConv, DynamicConv, ODConv and DRConv as implicit GEMMs.

Every pass is an implicit GEMM fed to ``tl.dot`` (tensor cores for fp16/bf16, tf32 for fp32 when
``torch.backends.cudnn.allow_tf32`` allows it, DMMA for fp64). The taps are unrolled at compile time (``KH``, ``KW`` constexpr) with a
channel loop inside each, so a K-step adds one channel offset per operand and a tap's rows (their
positions and zero-padding mask) are formed once per tap; the weights are laid out once, outside
every kernel, with Cin/g innermost, so both dot operands are plain 2-D tiles. Below 16 channels
per group (depth-wise, narrow groups) one loop over the flattened reduction ``k = (u·kw + v)·C + c``
wastes no lanes instead.

Where the mixed kernel ``W[b,r] = spatial[b] ⊙ Σ_e routing[b,r,e]·experts[e]`` comes from:

* **on the fly** (``MIX``): each weight tile is mixed in registers from the E expert tiles right
  before the ``tl.dot``. No memory at all; costs E·BLOCK_K·BLOCK_N FMAs and E tile loads (the
  experts are shared by the whole batch, so they stay in L2) per K-step of every pixel tile.
* **materialised**: one GEMM ``routing (B·m, E) @ experts (E, Cout·Cin/g·kh·kw)`` writes the
  mixed kernels, which every pixel tile then reads. Chosen only while it pays and is bounded:
  when a region has at least ``MATERIALISE_MIN_PIXELS`` output pixels to amortise it and the
  mixed kernels are no larger than the output ``y`` (``m·Cin/g·kh·kw <= Ho·Wo``); where only the
  second fails, a part of the batch at a time (``batch_parts``: at most ``MATERIALISE_MAX_PARTS``
  launches). So the extra memory is at most the size of the output, never more.

The spatial attention ``spatial[b, u, v]`` is applied to the weight tile in both cases (a per-row
scale), so it is never materialised into the kernels.

DRConv (``guide``): the pixels of every sample are sorted by region (``region_tables``, a stable
argsort on the device, no host synchronisation), and a pixel tile holds pixels of one region only,
so the forward is a grouped GEMM: one conv per output pixel, whatever m is. The grid has the
upper bound ``ceil(Ho·Wo / BLOCK_P) + m`` tiles per sample; tiles past a sample's last one run
an empty loop.

Backward:

* input gradient, gather form (each ``dx`` element written once, no atomics). With regions the
  weight depends on the *output* pixel a tap reads, so a K-step multiplies once per region
  present in a tap's pixels and skips absent ones: coherent regions cost about one conv, scattered
  ones up to m. A program's pixels share one stride phase, so a strided conv's taps that none of
  them reads cost no MMA work.
* kernel gradient ``dW[b,r] = Σ_{p in region r} dy[b,:,p] ⊗ patch[b,p,:]`` per (sample, region),
  summed over pixels inside a program, optionally split over ``SPLITS`` pixel chunks whose fp32
  partials the caller adds in a fixed order: deterministic, no float atomics. The bias gradient
  per (sample, region) comes from the same programs. ``dW`` is fp32 ``(SPLITS, B, m, Cout,
  Cin/g, kh, kw)``; the contraction down to experts, routing and spatial is a few small GEMMs
  left to the caller (ops/).
* guide scores ``∂S[b,r,p] = Σ_o dy[b,o,p]·y_r[b,o,p]`` for the straight-through estimator:
  y_r is recomputed for every region (the estimator needs all m outputs) and reduced against dy
  in the epilogue, per output-channel tile; the caller adds the tiles.

Kernels here know nothing of autograd: ``ops/expert_conv.py`` wires them into torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (INT32_MAX, TRITON_VERSION, Launch, cacheable, cdiv, config_key, is_channels_last, layout,
                      needs_int64, next_power_of_2, planned)
from .configs import get_config
from .involution import gather_source, widen
# Running tile totals past the last region read as "never reached" (a constexpr: kernels may use it).
_PAST_LAST_TILE = tl.constexpr(INT32_MAX)
# A region needs this many output pixels before materialising its mixed kernel beats mixing on the fly.
MATERIALISE_MIN_PIXELS = 256
# At most this many launches per pass when the batch's mixed kernels are materialised a part at a time.
MATERIALISE_MAX_PARTS = 8
# Below this many programs the kernel-gradient pass splits each region's pixels (fills the GPU).
WEIGHT_GRAD_MIN_PROGRAMS = 264


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, r, w_off, sp_off, sp_mask, mask, NUM_MIX,
                 sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb,
                 MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_64: tl.constexpr):
    """The tile ``W[b, r]`` at element offsets ``w_off`` (o, c, u, v part), in ACC_DTYPE.

    ``sp_off`` / ``sp_mask`` (the u, v part of the spatial offsets, one per row) broadcast against ``w_off``;
    ``sp_mask`` None: ``sp_off`` is one in-range tap's scalar offset.
    ``r`` must already be int64 in the INDEX_64 variants (or the constant 0).
    """
    base = w_ptr + b * sw_b + r * sw_r + w_off
    if MIX:
        tile = tl.zeros(w_off.shape, dtype=ACC_DTYPE)
        coef_row = coef_ptr + b * sc_b + r * sc_r
        if INDEX_64:
            # Step scalar pointers by one expert instead of forming e * sw_e: 64-bit offsets with no
            # 64-bit product in the loop (the product made ptxas 12.8 spill the DRConv forward on sm_80).
            expert = w_ptr + b * sw_b + r * sw_r
            for e in range(NUM_MIX):
                coef = tl.load(coef_row).to(ACC_DTYPE)
                tile += coef * tl.load(expert + w_off, mask=mask, other=0.0).to(ACC_DTYPE)
                coef_row += sc_e
                expert += sw_e
        else:
            for e in range(NUM_MIX):
                coef = tl.load(coef_row + e * sc_e).to(ACC_DTYPE)
                tile += coef * tl.load(base + e * sw_e, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        tile = tl.load(base, mask=mask, other=0.0).to(ACC_DTYPE)
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
def _conv_tile(x_ptr, w_ptr, coef_ptr, spatial_ptr, b, r, g, o, o_ok, i, j, pix_ok, c_end,
               H, W, CIN_G, NUM_MIX,
               sxb, sxc, sxh, sxw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
               SH, SW, PH, PW, DH, DW,
               KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, INDEX_64: tl.constexpr,
               ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr):
    """acc[p, n] = Σ_k patch[b, (i_p, j_p), k] · W[b, r, o_n, k] over channels c < c_end (0 skips it all).

    TAP_LOOP: the taps unrolled at compile time, a channel loop inside each, so a K-step adds one
    channel offset per operand and the tap's rows (positions, padding mask) are formed once per tap.
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
        for u in tl.static_range(KH):
            for v in tl.static_range(KW):
                h = h_first + u * DH
                w = w_first + v * DW
                row_ok = pix_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                x_rows = x_group + h * sxh + w * sxw
                w_tap = widen(u, INDEX_64) * sw_u + widen(v, INDEX_64) * sw_v + (o * sw_o)[None, :]
                sp_tap = widen(u, INDEX_64) * ssu + widen(v, INDEX_64) * ssv
                for c0 in range(0, c_end, BLOCK_K):
                    c = c0 + cc
                    c_ok = c < c_end
                    patch = _rows_tile(x_rows, c * sxc, row_ok, c_ok, CHANNEL_ROWS)
                    weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, r, (c * sw_i)[:, None] + w_tap, sp_tap,
                                          None, c_ok[:, None] & o_ok[None, :], NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r,
                                          sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
                    # out_dtype on every accumulating dot: triton 3.6 asserts it equals acc's dtype and
                    # defaults it to fp32, so fp64 accumulators must name it.
                    acc = tl.dot(patch, weight.to(patch.dtype), acc, input_precision=INPUT_PRECISION,
                                 out_dtype=ACC_DTYPE)
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


@triton.jit
def _region_tile(tile_offsets_ptr, pixel_start_ptr, count_ptr, perm_ptr, b, t, NUM_REGIONS, P,
                 BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """(region, pixel ids, pixel mask, valid) of the t-th tile of sample b in region-sorted order.

    ``tile_offsets[b]`` holds the m + 1 running totals of tiles per region; tiles past the last
    one are invalid (no pixels).
    """
    rr = tl.arange(0, BLOCK_R)
    offsets = tl.load(tile_offsets_ptr + b * (NUM_REGIONS + 1) + rr, mask=rr <= NUM_REGIONS, other=_PAST_LAST_TILE)
    r = tl.sum(((rr >= 1) & (offsets <= t)).to(tl.int32), axis=0)
    valid = r < NUM_REGIONS
    r = tl.minimum(r, NUM_REGIONS - 1)
    first_tile = tl.sum(tl.where(rr == r, offsets, 0), axis=0)
    count = tl.load(count_ptr + b * NUM_REGIONS + r)
    start = tl.load(pixel_start_ptr + b * NUM_REGIONS + r)
    q = (t - first_tile) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = q < tl.where(valid, count, 0)
    p = tl.load(perm_ptr + b * P + start + q, mask=pix_ok, other=0)
    return r, p, pix_ok, valid


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def expert_conv_fwd_kernel(
    x_ptr, w_ptr, coef_ptr, spatial_ptr, bias_ptr, y_ptr,
    tile_offsets_ptr, pixel_start_ptr, count_ptr, perm_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX, NUM_REGIONS, TILES, N_TILES,
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
        r, p, pix_ok, valid = _region_tile(tile_offsets_ptr, pixel_start_ptr, count_ptr, perm_ptr, b, t,
                                           NUM_REGIONS, P, BLOCK_P, BLOCK_R)
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
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & o_ok[None, :])


@triton.jit
def expert_conv_guide_score_kernel(
    x_ptr, w_ptr, coef_ptr, spatial_ptr, bias_ptr, dy_ptr, score_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX, TILES, N_TILES,
    sxb, sxc, sxh, sxw,
    sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
    sc_b, sc_r, sc_e,
    ssb, ssu, ssv,
    sbias_b, sbias_r, sbias_o,
    sdyb, sdyc, sdyh, sdyw,
    s_score_b, s_score_r, s_score_n,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr,
):
    """score[b, r, n, p] = Σ_{o in channel tile n} dy[b, o, p] · y_r[b, o, p] (region r on axis 2).

    The caller sums the N_TILES·groups channel tiles: ∂S[b, r, p] of the straight-through estimator.
    """
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    pid_n = tl.program_id(1)
    r = tl.program_id(2)
    g = pid_n // N_TILES
    on = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = on < COUT_G
    P = Ho * Wo
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = p < P
    if INDEX_64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
        on = on.to(tl.int64)
        g = g.to(tl.int64)
        r = r.to(tl.int64)
    o = g * COUT_G + on
    i = p // Wo
    j = p % Wo
    acc = _conv_tile(x_ptr, w_ptr, coef_ptr, spatial_ptr, b, r, g, o, o_ok, i, j, pix_ok, CIN_G,
                     H, W, CIN_G, NUM_MIX,
                     sxb, sxc, sxh, sxw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
                     SH, SW, PH, PW, DH, DW, KH, KW, TAP_LOOP, BLOCK_P, BLOCK_N, BLOCK_K, MIX, HAS_SPATIAL, INDEX_64,
                     ACC_DTYPE, INPUT_PRECISION, CHANNEL_ROWS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + b * sbias_b + r * sbias_r + o * sbias_o, mask=o_ok, other=0.0).to(ACC_DTYPE)[None, :]
    mask = pix_ok[:, None] & o_ok[None, :]
    grad = tl.load(dy_ptr + b * sdyb + (o * sdyc)[None, :] + (i * sdyh + j * sdyw)[:, None], mask=mask, other=0.0)
    score = tl.sum(acc * grad.to(ACC_DTYPE), axis=1)
    tl.store(score_ptr + b * s_score_b + r * s_score_r + widen(pid_n, INDEX_64) * s_score_n + p, score, mask=pix_ok)


@triton.jit
def expert_conv_bwd_input_kernel(
    dy_ptr, w_ptr, coef_ptr, spatial_ptr, region_ptr, dx_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX, NUM_REGIONS, TILES, N_TILES,
    sdyb, sdyc, sdyh, sdyw,
    sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
    sc_b, sc_r, sc_e,
    ssb, ssu, ssv,
    sdxb, sdxc, sdxh, sdxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_GUIDE: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr,
):
    """dx[b, c, h, w] = Σ_{o, u, v} W[b, r(i,j), o, c, u, v] · dy[b, o, i, j], (i, j) the output pixel
    that reads (h, w) through tap (u, v).

    A program's pixels share one stride phase (h mod SH, w mod SW): a tap then reaches either all of
    them or none, so the taps no output pixel reads cost no MMA (no stride² waste). Axis 0 is
    (b, phase, tile of the phase's pixels). TAP_LOOP: taps unrolled, an output-channel loop inside
    each (see ``_conv_tile``); otherwise one loop over k = (u·kw + v)·COUT_G + o, gathered per element.
    """
    pid = tl.program_id(0)
    b = pid // (TILES * SH * SW)
    t = pid % TILES
    phase = (pid // TILES) % (SH * SW)
    ph = phase // SW
    pw = phase % SW
    pid_n = tl.program_id(1)
    g = pid_n // N_TILES
    cn = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cn < CIN_G
    # The phase's pixels: an (Hp, Wp) grid with steps (SH, SW) from (ph, pw).
    Hp = (H - ph + SH - 1) // SH
    Wp = (W - pw + SW - 1) // SW
    q = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = q < Hp * Wp
    if INDEX_64:
        b = b.to(tl.int64)
        q = q.to(tl.int64)
        cn = cn.to(tl.int64)
        g = g.to(tl.int64)
    h = ph + (q // Wp) * SH
    w = pw + (q % Wp) * SW
    dy_group = dy_ptr + b * sdyb + (g * COUT_G) * sdyc
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC_DTYPE)
    if TAP_LOOP:
        oc = tl.arange(0, BLOCK_K)
        if INDEX_64:
            oc = oc.to(tl.int64)
        for u in tl.static_range(KH):
            for v in tl.static_range(KW):
                # Whether this phase's pixels are read through (u, v) at all: one test per tap.
                rise = ph + PH - u * DH
                run = pw + PW - v * DW
                o_end = tl.where((rise % SH == 0) & (run % SW == 0), COUT_G, 0)
                i = (h + PH - u * DH) // SH
                j = (w + PW - v * DW) // SW
                row_ok = pix_ok & (h + PH - u * DH >= 0) & (i < Ho) & (w + PW - v * DW >= 0) & (j < Wo)
                dy_rows = dy_group + i * sdyh + j * sdyw
                w_tap = widen(u, INDEX_64) * sw_u + widen(v, INDEX_64) * sw_v + (cn * sw_i)[None, :]
                sp_off = widen(u, INDEX_64) * ssu + widen(v, INDEX_64) * ssv
                if HAS_GUIDE:
                    region = tl.load(region_ptr + b * Ho * Wo + i * Wo + j, mask=row_ok, other=-1)
                    for rgn in range(NUM_REGIONS):
                        selected = row_ok & (region == rgn)
                        # Coherent regions: a tap's pixels hold one or two of them; skip the others.
                        rgn_end = tl.where(tl.max(selected.to(tl.int32), axis=0) > 0, o_end, 0)
                        for o0 in range(0, rgn_end, BLOCK_K):
                            oo = o0 + oc
                            o_ok = oo < o_end
                            grad = _rows_tile(dy_rows, oo * sdyc, selected, o_ok, CHANNEL_ROWS)
                            weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, widen(rgn, INDEX_64),
                                                  ((g * COUT_G + oo) * sw_o)[:, None] + w_tap, sp_off, None,
                                                  o_ok[:, None] & c_ok[None, :], NUM_MIX, sw_b, sw_r, sw_e, sc_b,
                                                  sc_r, sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
                            acc = tl.dot(grad, weight.to(grad.dtype), acc, input_precision=INPUT_PRECISION,
                                         out_dtype=ACC_DTYPE)
                else:
                    for o0 in range(0, o_end, BLOCK_K):
                        oo = o0 + oc
                        o_ok = oo < o_end
                        grad = _rows_tile(dy_rows, oo * sdyc, row_ok, o_ok, CHANNEL_ROWS)
                        weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, 0,
                                              ((g * COUT_G + oo) * sw_o)[:, None] + w_tap, sp_off, None,
                                              o_ok[:, None] & c_ok[None, :], NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r,
                                              sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
                        acc = tl.dot(grad, weight.to(grad.dtype), acc, input_precision=INPUT_PRECISION,
                                     out_dtype=ACC_DTYPE)
    else:
        K_TOTAL = COUT_G * KH * KW
        for k0 in range(0, K_TOTAL, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                k = k.to(tl.int64)
            k_ok = k < K_TOTAL
            oo, u, v = _split_k(k, COUT_G, KW)
            i, ok = gather_source(h[:, None], PH, u[None, :], DH, SH, Ho, pix_ok[:, None] & k_ok[None, :])
            j, ok = gather_source(w[:, None], PW, v[None, :], DW, SW, Wo, ok)
            grad = tl.load(dy_group + (oo * sdyc)[None, :] + i * sdyh + j * sdyw, mask=ok, other=0.0)
            w_off = ((g * COUT_G + oo) * sw_o + u * sw_u + v * sw_v)[:, None] + (cn * sw_i)[None, :]
            sp_off = (u * ssu + v * ssv)[:, None]
            w_mask = k_ok[:, None] & c_ok[None, :]
            if HAS_GUIDE:
                region = tl.load(region_ptr + b * Ho * Wo + i * Wo + j, mask=ok, other=-1)
                for rgn in range(NUM_REGIONS):
                    selected = ok & (region == rgn)
                    # Coherent regions: most K-steps see one or two of them; skip the others' MMA.
                    if tl.max(tl.max(selected.to(tl.int32), axis=1), axis=0) > 0:
                        weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, widen(rgn, INDEX_64), w_off, sp_off,
                                              k_ok[:, None], w_mask, NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb,
                                              MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
                        acc = tl.dot(tl.where(selected, grad, 0.0).to(grad.dtype), weight.to(grad.dtype), acc,
                                     input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, 0, w_off, sp_off, k_ok[:, None], w_mask,
                                      NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE,
                                      INDEX_64)
                acc = tl.dot(grad, weight.to(grad.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dx_off = b * sdxb + ((g * CIN_G + cn) * sdxc)[None, :] + (h * sdxh + w * sdxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])


@triton.jit
def _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, q0, hi, o_ok, k_ok, u, v,
                      H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                      BLOCK_K: tl.constexpr, TAP_LOOP: tl.constexpr, HAS_GUIDE: tl.constexpr, INDEX_64: tl.constexpr):
    """The kernel gradient's gathered pixel step from ``q0``: (dy tile (o x pixels), patch tile (pixels x k)).

    Pixel q of the (sample, region) is its q-th in region order (HAS_GUIDE) or in raster order;
    a pixel past ``hi`` reads zeros."""
    q = q0 + tl.arange(0, BLOCK_K)
    q_ok = q < hi
    if HAS_GUIDE:
        p = tl.load(perm_ptr + b * P + start + q, mask=q_ok, other=0)
    else:
        p = q
    if INDEX_64:
        p = p.to(tl.int64)
    i = p // Wo
    j = p % Wo
    grad = tl.load(dy_sample + (dy_row[:, None] + (i * sdyh + j * sdyw)[None, :]), mask=o_ok[:, None] & q_ok[None, :],
                   other=0.0)
    if TAP_LOOP:
        h = i * SH - PH + u * DH
        w = j * SW - PW + v * DW
        ok = q_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        patch = tl.load(x_sample + (x_col[None, :] + (h * sxh + w * sxw)[:, None]), mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
    else:
        h = (i * SH - PH)[:, None] + (u * DH)[None, :]
        w = (j * SW - PW)[:, None] + (v * DW)[None, :]
        ok = q_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        patch = tl.load(x_sample + (x_col[None, :] + h * sxh + w * sxw), mask=ok, other=0.0)
    return grad, patch


@triton.jit
def expert_conv_bwd_weight_kernel(
    dy_ptr, x_ptr, pixel_start_ptr, count_ptr, perm_ptr, dw_ptr, dbias_ptr,
    H, W, Ho, Wo, P, CIN_G, COUT_G, KH, KW, NUM_REGIONS, SPLITS, O_TILES, C_TILES,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sdw_s, sdw_b, sdw_r, sdw_o, sdw_i, sdw_u, sdw_v,
    sdb_s, sdb_b, sdb_r, sdb_o,
    SH, SW, PH, PW, DH, DW,
    TAP_LOOP: tl.constexpr, FLAT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_GUIDE: tl.constexpr, HAS_DBIAS: tl.constexpr, PREFETCH: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[s, b, r, o, k] = Σ_{p in chunk s of region r} dy[b, o, p] · patch[b, p, k], and (HAS_DBIAS)
    from the programs of the first k tile dbias[s, b, r, o] = Σ_p dy[b, o, p]. Axis 0 is (b, r, s).
    Without regions the caller sums dy itself: a row sum per K-step (conversions, adds and shuffles
    on every program, though only the first k tile's is stored) costs more issue slots than the MMA.

    TAP_LOOP: a program's k tile is BLOCK_N channels of one tap (axis 2 is (tap, channel tile)), so
    a pixel step forms the patch rows' positions and padding mask once per pixel, not per element.
    Otherwise the tile spans the flattened k = (u·kw + v)·CIN_G + c (fewer channels than BLOCK_N).

    FLAT (per tap, no guide, NCHW-like: both images pixel-contiguous, stride 1, Ho·Wo = H·W): a pixel
    step is BLOCK_K consecutive flat pixels, so dy is read with aligned vector loads and the patch as
    one shifted run per channel, both with lanes along the pixels (the reduction axis, K-major for
    wgmma); the per-element (i, j) split then only forms the padding mask.
    """
    pid = tl.program_id(0)
    s = pid % SPLITS
    br = pid // SPLITS
    b = br // NUM_REGIONS
    r = br % NUM_REGIONS
    pid_o = tl.program_id(1)
    pid_k = tl.program_id(2)
    g = pid_o // O_TILES
    on = (pid_o % O_TILES) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = on < COUT_G
    if TAP_LOOP:
        tap = pid_k // C_TILES
        c = (pid_k % C_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = c < CIN_G
    else:
        k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = k < CIN_G * KH * KW
        tap = k // CIN_G
        c = k % CIN_G
    if HAS_GUIDE:
        start = tl.load(pixel_start_ptr + b * NUM_REGIONS + r)
        count = tl.load(count_ptr + b * NUM_REGIONS + r)
    else:
        start = 0
        count = P
    chunk = tl.cdiv(tl.cdiv(count, SPLITS), BLOCK_K) * BLOCK_K
    lo = s * chunk
    hi = tl.minimum(lo + chunk, count)
    if INDEX_64:
        b = b.to(tl.int64)
        on = on.to(tl.int64)
        g = g.to(tl.int64)
        c = c.to(tl.int64)
        tap = tap.to(tl.int64)
        s = s.to(tl.int64)
        r = r.to(tl.int64)
    o = g * COUT_G + on
    u = tap // KW
    v = tap % KW
    # What the pixel loop reads is kept as offsets from per-sample base pointers, and the k part of the
    # dw offset is formed before the loop: c, u and v then die there instead of being held through it.
    dy_sample = dy_ptr + b * sdyb
    dy_row = o * sdyc
    x_sample = x_ptr + b * sxb
    x_col = (g * CIN_G + c) * sxc
    dw_col = c * sdw_i + u * sdw_u + v * sdw_v
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    if FLAT:
        # The tap's shift in flat pixels (x's rows are W = Wo apart): x[c, p + shift] is patch[p, c].
        rise = u * DH - PH
        run = v * DW - PW
        # Pointers stepped by BLOCK_K pixels: one 64-bit add an element a step, no address product.
        x_step = x_sample + ((x_col + rise * sxh + run)[None, :] + (lo + tl.arange(0, BLOCK_K))[:, None])
    if FLAT:
        for q0 in range(lo, hi, BLOCK_K):
            q = q0 + tl.arange(0, BLOCK_K)
            q_ok = q < hi
            if INDEX_64:
                q = q.to(tl.int64)
            grad = tl.load(dy_sample + (dy_row[:, None] + q[None, :]), mask=o_ok[:, None] & q_ok[None, :], other=0.0)
            i = q // Wo + rise
            j = q % Wo + run
            ok = q_ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)
            patch = tl.load(x_step, mask=ok[:, None] & k_ok[None, :], other=0.0)
            x_step += BLOCK_K
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_DBIAS:
                bias_acc += tl.sum(grad.to(ACC_DTYPE), axis=1)
    elif PREFETCH:
        # Register double buffering instead of triton's cp.async pipeline: the step after next is
        # loaded with vectors along the channels before this step's MMA, and the copy to shared
        # memory (transposed to K-major for tf32) is the compiler's. See default_weight_grad_config.
        grad, patch = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, lo, hi, o_ok,
                                        k_ok, u, v, H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                                        BLOCK_K, TAP_LOOP, HAS_GUIDE, INDEX_64)
        for q0 in range(lo, hi, BLOCK_K):
            grad_next, patch_next = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start,
                                                      q0 + BLOCK_K, hi, o_ok, k_ok, u, v, H, W, Wo, sdyh, sdyw,
                                                      sxh, sxw, SH, SW, PH, PW, DH, DW, BLOCK_K, TAP_LOOP,
                                                      HAS_GUIDE, INDEX_64)
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_DBIAS:
                bias_acc += tl.sum(grad.to(ACC_DTYPE), axis=1)
            grad = grad_next
            patch = patch_next
    else:
        for q0 in range(lo, hi, BLOCK_K):
            grad, patch = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, q0, hi, o_ok,
                                            k_ok, u, v, H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                                            BLOCK_K, TAP_LOOP, HAS_GUIDE, INDEX_64)
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_DBIAS:
                bias_acc += tl.sum(grad.to(ACC_DTYPE), axis=1)
    dw_off = s * sdw_s + b * sdw_b + r * sdw_r + (o * sdw_o)[:, None] + dw_col[None, :]
    tl.store(dw_ptr + dw_off, acc, mask=o_ok[:, None] & k_ok[None, :])
    if HAS_DBIAS and pid_k == 0:
        tl.store(dbias_ptr + s * sdb_s + b * sdb_b + r * sdb_r + o * sdb_o, bias_acc, mask=o_ok)


# --------------------------------------------------------------------------------------------
# Host side: region tables, weight sources, configurations, launches
# --------------------------------------------------------------------------------------------

@dataclass
class RegionTables:
    """Pixels of every sample sorted by DRConv region, built on the device without a host sync.

    region: (B, Ho·Wo) int32 region of each output pixel (argmax of the guide);
    perm: (B, Ho·Wo) int32 pixel ids in region order (stable); count, pixel_start: (B, m) int32;
    tile_offsets: (B, m + 1) int32 running totals of BLOCK_P-pixel tiles per region.
    """

    region: torch.Tensor
    perm: torch.Tensor
    count: torch.Tensor
    pixel_start: torch.Tensor
    tile_offsets: torch.Tensor
    block_p: int

    @property
    def num_regions(self) -> int:
        return self.count.shape[1]


def region_tables(guide: torch.Tensor, block_p: int) -> RegionTables:
    B, m, Ho, Wo = guide.shape
    region = guide.argmax(dim=1).reshape(B, Ho * Wo)
    perm = torch.argsort(region, dim=1, stable=True).to(torch.int32)
    count = torch.zeros((B, m), dtype=torch.int32, device=guide.device)
    count.scatter_add_(1, region, torch.ones_like(region, dtype=torch.int32))
    pixel_start = (torch.cumsum(count, dim=1, dtype=torch.int32) - count).contiguous()
    tiles = (count + block_p - 1) // block_p
    tile_offsets = torch.zeros((B, m + 1), dtype=torch.int32, device=guide.device)
    tile_offsets[:, 1:] = torch.cumsum(tiles, dim=1, dtype=torch.int32)
    return RegionTables(region.to(torch.int32).contiguous(), perm.contiguous(), count.contiguous(),
                        pixel_start, tile_offsets, block_p)


def region_tile_bound(pixels: int, m: int, block_p: int) -> int:
    """Upper bound on Σ_r ceil(count_r / block_p) over any split of ``pixels`` into m regions."""
    return cdiv(pixels, block_p) + m - 1 if m > 1 else cdiv(pixels, block_p)


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


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's conv switch (on by default), so the kernels round like cuDNN would.
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


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


def default_forward_config(cout_g: int, dtype: torch.dtype, pixels_per_region: int = 0,
                           index_64: bool = False, cin_g: int = 0, mixing: bool = False,
                           channels_last: bool = True, plain: bool = False) -> dict:
    """``plain``: one kernel a sample at stride 1, no region tables, no guide scores (whose registers
    a 256-pixel NCHW tile leaves no room for: see _nchw_tiles)."""
    # Taller pixel tiles amortise the on-the-fly mixing (E·BLOCK_K·BLOCK_N FMAs per K-step) over
    # more rows; small regions keep 64 so their last, partial tile wastes less. With int64 offsets
    # a 128-pixel DRConv tile mixing on the fly spills on sm_80 and sm_90 (dynconv inspect); 64 does not.
    block_p = 128 if pixels_per_region >= 1024 and dtype != torch.float64 and not index_64 else 64
    # Wide channel tiles and three stages for 2-byte operands on the per-tap path: 128 x 128 x 32
    # tiles are two 64 x 128 wgmma groups per K-step, their operands streamed by cp.async. K-steps
    # of 64 channels spilled them on sm_80 (channels_last: 6 local loads and stores on triton 3.6, 87
    # on 3.9); 32 fits, and the model sees no change on sm_90 (E2/C256 fwd bf16 NHWC 98%).
    wide = dtype.itemsize == 2 and cin_g >= 64 and block_p == 128 and not mixing
    block_k = _channel_block(cin_g, dtype, mixing)
    config = {"BLOCK_P": block_p, "BLOCK_N": _pow2_between(cout_g, 16, 128 if wide else 64),
              "BLOCK_K": min(32, block_k) if wide else block_k, "num_warps": _num_warps(dtype, block_p, mixing),
              "num_stages": 3 if wide else 2}
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


def default_input_grad_config(cin_g: int, dtype: torch.dtype, cout_g: int = 0, mixing: bool = False,
                              regions: bool = False, channels_last: bool = True, plain: bool = False,
                              index_64: bool = False) -> dict:
    # As the forward's (the reduction runs over output channels here); one stage for 4-byte 64-row
    # operands. Regions hold their loop's tiles in registers as mixing does: the same small tiles,
    # and one stage (two spill 2-byte NHWC on sm_80).
    if regions:  # NCHW: columns up to 32 (64 spill an INDEX_64 variant on sm_80 with triton 3.9)
        config = {"BLOCK_P": 64, "BLOCK_N": _pow2_between(cin_g, 16, 64 if channels_last else 32),
                  "BLOCK_K": _channel_block(cout_g, dtype, True), "num_warps": _num_warps(dtype, 64, True),
                  "num_stages": 1}
        return config if channels_last else _nchw_tiles(config, cin_g, cout_g, dtype, True)
    if dtype.itemsize <= 4 and cout_g >= 64 and not mixing:
        # 128 x 128 tiles for fp32 too: at 64 x 64 its tf32 operands' L1 traffic bounds it (E2 dx fp32
        # NHWC PREDICTED 65% -> 81% on triton 3.6); two stages (three would not fit sm_80's registers).
        # K-steps of 64 bytes a row: 128 bytes spilled channels_last on sm_80 (16-bit: 10 local loads
        # and stores on triton 3.6, 91 on 3.9; fp32: 36 on 3.9), and sm_90's PREDICTED rows keep 98%.
        config = {"BLOCK_P": 128, "BLOCK_N": _pow2_between(cin_g, 16, 128),
                  "BLOCK_K": min(64 // dtype.itemsize, _channel_block(cout_g, dtype)),
                  "num_warps": 8, "num_stages": 3 if dtype.itemsize == 2 else 2}
    elif dtype.itemsize == 2 and cout_g >= 64 and cin_g >= 64 and channels_last:
        # Mixing on the fly (E FMAs per weight element a K-step): 128 pixels share each mixed weight
        # tile, twice as many as at 64, halving the mixing per MMA (X1 dx bf16 NHWC PREDICTED 17.5% ->
        # 34% on triton 3.6). Two stages: the mixed tile is held in fp32 registers. channels_last only:
        # NCHW's scalar gathers on top spill on sm_80 with triton 3.6.
        config = {"BLOCK_P": 128, "BLOCK_N": _pow2_between(cin_g, 16, 128),
                  "BLOCK_K": _channel_block(cout_g, dtype, mixing), "num_warps": 8, "num_stages": 2}
    else:
        config = {"BLOCK_P": 64, "BLOCK_N": _pow2_between(cin_g, 16, 64),
                  "BLOCK_K": _channel_block(cout_g, dtype, mixing), "num_warps": _num_warps(dtype, 64, mixing),
                  "num_stages": 2 if dtype.itemsize == 2 else 1}
    return config if channels_last else _nchw_tiles(config, cin_g, cout_g, dtype, mixing, plain, index_64)


def default_weight_grad_config(cout_g: int, k_total: int, dtype: torch.dtype, cin_g: int = 0,
                               channels_last: bool = False, flat: bool = False) -> dict:
    """``flat``: NCHW at stride 1 with one region, where the kernel's FLAT pixel steps apply when the
    output is as large as the input (the usual padding; the key does not tell, else the gathered
    steps run these tiles)."""
    # Eight warps whatever the dtype: at four, a 4-byte 64 x 64 tile needs about 170 registers a
    # thread, and ptxas 12.8 (triton 3.6) spills a few to fit three blocks per SM on sm_80.
    # Columns: one tap's channels (a power of two within them, so the kernel loops per tap).
    block_n = min(64, 1 << (cin_g.bit_length() - 1)) if cin_g >= 16 else _pow2_between(k_total, 16, 64)
    if dtype.itemsize == 2 and cin_g >= 64 and cout_g >= 64 and (channels_last or flat):
        # 128 x 128 x 64 tiles, three stages: two 64 x 128 wgmma groups per pixel step. Not for the
        # gathered NCHW steps, whose 2-byte scalar loads of both operands then take over 255
        # registers on sm_80; FLAT steps load dy by cp.async (C256 dw bf16 NCHW PREDICTED on
        # triton 3.6: 64 x 64 x 32 25% -> 87%).
        return {"BLOCK_O": _pow2_between(cout_g, 16, 128), "BLOCK_N": min(128, 1 << (cin_g.bit_length() - 1)),
                "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    if dtype.itemsize == 4 and cin_g >= 64 and cout_g >= 64:
        # fp32, both layouts: 128 x 128 x 32. tf32 wgmma reads both operands K-major, and neither dy
        # nor the patch is pixel-contiguous in channels_last: triton's cp.async pipeline copied each
        # to shared memory four bytes at a time. One stage instead, where the kernel double-buffers
        # in registers (PREFETCH): 16-byte loads along the channels, transposed on the way to shared
        # memory (E1 dw fp32 NHWC PREDICTED on triton 3.6: 60% -> 98%, C256/E2 66% -> 100%). NCHW
        # steps 16 pixels: its scalar patch loads at 32 spill on sm_80 with triton 3.9; FLAT steps,
        # K-major already, keep the two-stage cp.async pipeline and 32 pixels (C256 dw fp32 NCHW
        # PREDICTED on triton 3.6: 87% at 16, 100% at 32).
        return {"BLOCK_O": _pow2_between(cout_g, 16, 128), "BLOCK_N": min(128, 1 << (cin_g.bit_length() - 1)),
                "BLOCK_K": 32 if channels_last or flat else 16, "num_warps": 8, "num_stages": 2 if flat else 1}
    return {"BLOCK_O": _pow2_between(cout_g, 16, 64), "BLOCK_N": block_n,
            "BLOCK_K": _block_k(dtype), "num_warps": 8, "num_stages": 2}


def _geometry_args(stride, padding, dilation) -> dict:
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def _mixing_args(source: WeightSource, spatial) -> dict:
    coef_strides = source.coef.stride() if source.mix else (0, 0, 0)
    spatial_strides = spatial.stride() if spatial is not None else (0, 0, 0)
    return dict(
        w_ptr=source.weight, coef_ptr=source.coef, spatial_ptr=spatial, NUM_MIX=source.num_mix,
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
    return tuple(layout(t) for t in (regions.region, regions.perm, regions.count, regions.pixel_start,
                                     regions.tile_offsets))


def _region_tensors(regions: RegionTables | None, names: tuple[str, ...]) -> tuple:
    return tuple(None if regions is None else getattr(regions, n) for n in names)


def _tap_meta(cin_g: int, kernel_hw, block_k: int, pixels_first: torch.Tensor, index_64: bool) -> dict:
    """The compile-time kernel size and ``_conv_tile``'s loop form: per tap while a group's
    channels fill a reduction block, the flattened reduction below that (no lanes wasted). Both
    layouts: NCHW takes its own tiles (``_nchw_tiles``).

    CHANNEL_ROWS for NCHW (``pixels_first``, the tensor whose per-tap tiles the kernel gathers) on
    triton 3.9: its pixel offsets' contiguity is hidden (``p % Wo``), and its coalescing then lays the
    lanes along the channels, an HW-strided sector each (E2 fwd/dx fp32 NCHW PREDICTED 64/46% ->
    98/98%); a (channels x pixels) load, transposed, lays them along the pixels. Triton 3.6 lays
    them along the pixels as written and loses with the transposed form (E2 fwd bf16 94% -> 49%).
    Not in the 64-bit variants: the transposed tile's registers spill a DRConv forward mixing on
    the fly on sm_80 (61 local loads and stores at 128 registers)."""
    channel_rows = TRITON_VERSION > (3, 6) and not is_channels_last(pixels_first) and not index_64
    return dict(KH=kernel_hw[0], KW=kernel_hw[1], TAP_LOOP=cin_g >= block_k, CHANNEL_ROWS=channel_rows)


def _conv_tile_loops(cin_g: int, meta: dict, source: WeightSource) -> tuple:
    """``_conv_tile``'s loops: one channel loop per (unrolled) tap, or one flattened loop; the
    expert loop of on-the-fly mixing inside each."""
    taps = meta["KH"] * meta["KW"]
    if meta["TAP_LOOP"]:
        steps, copies = cdiv(cin_g, meta["BLOCK_K"]), taps
    else:
        steps, copies = cdiv(cin_g * taps, meta["BLOCK_K"]), 1
    return ((steps, (source.num_mix,)) if source.mix else steps,) * copies


def _past_int32(image: torch.Tensor, out_channels: int, out_pixels: int) -> bool:
    """Whether a launch on ``image`` (x, or dx) and its output-side tensor (y, or dy: ``out_channels``
    x ``out_pixels`` a sample) takes 64-bit offsets, as its launcher will find: for the defaults,
    which are chosen before the output-side tensor is at hand."""
    return needs_int64(image) or image.shape[0] * out_channels * out_pixels > INT32_MAX


def is_plain_conv(m: int, stride) -> bool:
    """One kernel a sample at stride 1: the convs the widest NCHW tiles are for (``plain`` in
    :func:`default_forward_config`)."""
    return m == 1 and tuple(stride) == (1, 1)


def forward_config(x, experts, m, groups, stride, padding, dilation) -> dict:
    cout_g = experts.shape[1] // groups
    pixels = output_pixels(x.shape[2:], experts.shape[3:], stride, padding, dilation)
    index_64 = _past_int32(x, experts.shape[1], pixels)
    mixing = materialise_part(experts[0].numel() // experts.shape[1], x.shape[0], m, pixels) == 0
    return get_config("expert_conv_fwd", problem_key(x, experts, m, groups, stride),
                      default_forward_config(cout_g, x.dtype, pixels // m, index_64, experts.shape[2], mixing,
                                             is_channels_last(x), plain=is_plain_conv(m, stride)))


def forward_launch(x, source: WeightSource, spatial, bias_mixed, regions: RegionTables | None, y,
                   kernel_hw, groups, stride, padding, dilation, config: dict) -> Launch:
    """``config`` must be the one ``regions`` was built with (its BLOCK_P sizes the region tiles)."""
    if not cacheable(x):
        return _forward_launch(x, source, spatial, bias_mixed, regions, y, kernel_hw, groups, stride, padding,
                               dilation, config)
    key = ("expert_conv_fwd", layout(x), _source_key(source), layout(spatial), layout(bias_mixed),
           _regions_key(regions), layout(y), tuple(kernel_hw), groups, *stride, *padding, *dilation,
           config_key(config))
    return planned(key, ("x_ptr", "y_ptr", "w_ptr", "coef_ptr", "spatial_ptr", "bias_ptr", "tile_offsets_ptr",
                         "pixel_start_ptr", "count_ptr", "perm_ptr"),
                   (x, y, source.weight, source.coef, spatial, bias_mixed,
                    *_region_tensors(regions, ("tile_offsets", "pixel_start", "count", "perm"))),
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
        tile_offsets_ptr=regions.tile_offsets if regions is not None else None,
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
    meta.update(_tap_meta(Cin // groups, kernel_hw, meta["BLOCK_K"], x, index_64))
    meta.update(BLOCK_R=next_power_of_2(m + 1), MIX=source.mix, HAS_SPATIAL=spatial is not None,
                HAS_BIAS=bias_mixed is not None, HAS_GUIDE=regions is not None, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_fwd_kernel, (B * tiles, groups * n_tiles, 1), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_conv_tile_loops(Cin // groups, meta, source))


def guide_score_launch(x, source: WeightSource, spatial, bias_mixed, dy, score, kernel_hw, groups,
                       stride, padding, dilation, config: dict) -> Launch:
    """``score`` is (B, m, groups·N_TILES, Ho·Wo) in the accumulation dtype."""
    if not cacheable(x):
        return _guide_score_launch(x, source, spatial, bias_mixed, dy, score, kernel_hw, groups, stride, padding,
                                   dilation, config)
    key = ("expert_conv_guide_score", layout(x), _source_key(source), layout(spatial), layout(bias_mixed),
           layout(dy), layout(score), tuple(kernel_hw), groups, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("x_ptr", "dy_ptr", "score_ptr", "w_ptr", "coef_ptr", "spatial_ptr", "bias_ptr"),
                   (x, dy, score, source.weight, source.coef, spatial, bias_mixed),
                   lambda: _guide_score_launch(x, source, spatial, bias_mixed, dy, score, kernel_hw, groups, stride,
                                               padding, dilation, config))


def _guide_score_launch(x, source: WeightSource, spatial, bias_mixed, dy, score, kernel_hw, groups,
                        stride, padding, dilation, config: dict) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    m = score.shape[1]
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    n_tiles = cdiv(Cout // groups, meta["BLOCK_N"])
    tiles = cdiv(Ho * Wo, meta["BLOCK_P"])
    args = dict(
        x_ptr=x, dy_ptr=dy, score_ptr=score, **_mixing_args(source, spatial), **_bias_args(bias_mixed),
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups,
        TILES=tiles, N_TILES=n_tiles,
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        s_score_b=score.stride(0), s_score_r=score.stride(1), s_score_n=score.stride(2),
        **_geometry_args(stride, padding, dilation),
    )
    index_64 = needs_int64(x, dy, score, source.weight, source.coef, spatial, bias_mixed)
    meta.update(_tap_meta(Cin // groups, kernel_hw, meta["BLOCK_K"], x, index_64))
    meta.update(MIX=source.mix, HAS_SPATIAL=spatial is not None, HAS_BIAS=bias_mixed is not None, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_guide_score_kernel, (B * tiles, groups * n_tiles, m), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_conv_tile_loops(Cin // groups, meta, source))


def score_tiles(cout: int, groups: int, config: dict) -> int:
    return groups * cdiv(cout // groups, config["BLOCK_N"])


def input_grad_config(dx, experts, m, groups, stride) -> dict:
    cin_g = dx.shape[1] // groups
    # The output size up to padding: enough to tell whether the op materialises.
    pixels = cdiv(dx.shape[2], stride[0]) * cdiv(dx.shape[3], stride[1])
    mixing = materialise_part(experts[0].numel() // experts.shape[1], dx.shape[0], m, pixels) == 0
    index_64 = _past_int32(dx, experts.shape[1], pixels)
    return get_config("expert_conv_bwd_input", problem_key(dx, experts, m, groups, stride),
                      default_input_grad_config(cin_g, dx.dtype, experts.shape[1] // groups, mixing, m > 1,
                                                is_channels_last(dx), is_plain_conv(m, stride), index_64))


def backward_input_launch(dy, source: WeightSource, spatial, region, dx, kernel_hw, groups, stride, padding,
                          dilation, num_regions: int, config: dict) -> Launch:
    """``region`` is the (B, Ho·Wo) int32 region map, or None without a guide."""
    if not cacheable(dy):
        return _backward_input_launch(dy, source, spatial, region, dx, kernel_hw, groups, stride, padding,
                                      dilation, num_regions, config)
    key = ("expert_conv_bwd_input", layout(dy), _source_key(source), layout(spatial), layout(region), layout(dx),
           tuple(kernel_hw), groups, *stride, *padding, *dilation, num_regions, config_key(config))
    return planned(key, ("dy_ptr", "dx_ptr", "region_ptr", "w_ptr", "coef_ptr", "spatial_ptr"),
                   (dy, dx, region, source.weight, source.coef, spatial),
                   lambda: _backward_input_launch(dy, source, spatial, region, dx, kernel_hw, groups, stride,
                                                  padding, dilation, num_regions, config))


def _backward_input_launch(dy, source: WeightSource, spatial, region, dx, kernel_hw, groups, stride, padding,
                           dilation, num_regions: int, config: dict) -> Launch:
    B, Cin, H, W = dx.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    n_tiles = cdiv(Cin // groups, meta["BLOCK_N"])
    phases = stride[0] * stride[1]
    # Tiles per stride phase: enough for the largest phase (the first), the others mask the rest.
    tiles = cdiv(cdiv(H, stride[0]) * cdiv(W, stride[1]), meta["BLOCK_P"])
    args = dict(
        dy_ptr=dy, dx_ptr=dx, region_ptr=region, **_mixing_args(source, spatial),
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups,
        NUM_REGIONS=num_regions, TILES=tiles, N_TILES=n_tiles,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sdxb", "sdxc", "sdxh", "sdxw"), dx.stride())),
        **_geometry_args(stride, padding, dilation),
    )
    index_64 = needs_int64(dy, dx, source.weight, source.coef, spatial, region)
    meta.update(_tap_meta(Cout // groups, kernel_hw, meta["BLOCK_K"], dy, index_64))
    meta.update(MIX=source.mix, HAS_SPATIAL=spatial is not None, HAS_GUIDE=region is not None, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(dy.dtype),
                INPUT_PRECISION=_input_precision(dy.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_bwd_input_kernel, (B * phases * tiles, groups * n_tiles, 1), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_input_grad_loops(Cout // groups, meta, source, num_regions if region is not None else 0,
                                          phases))


def _input_grad_loops(cout_g: int, meta: dict, source: WeightSource, num_regions: int, phases: int) -> tuple:
    """The input-gradient kernel's loops. Per tap: a tap reaches the pixels of one stride phase in
    ``phases``, so averaged over the programs its channel loop runs 1/phases of its steps. With
    regions, every region's loop is counted on every tap (present or not): an upper bound."""
    per_weight = (source.num_mix,) if source.mix else ()
    taps = meta["KH"] * meta["KW"]
    if meta["TAP_LOOP"]:
        steps = cdiv(cout_g, meta["BLOCK_K"]) / phases
        step = (steps, per_weight) if per_weight else steps
        return ((num_regions, (step,)) if num_regions else step,) * taps
    # Flattened: every K-step runs (the phase's dead taps are masked lanes).
    k_steps = cdiv(cout_g * taps, meta["BLOCK_K"])
    per_step = ((num_regions, per_weight) if per_weight else num_regions,) if num_regions else per_weight
    return ((k_steps, per_step) if per_step else k_steps,)


def weight_grad_config(x, experts, m, groups, stride) -> dict:
    _, Cout, cin_g, kh, kw = experts.shape
    return get_config("expert_conv_bwd_weight", problem_key(x, experts, m, groups, stride),
                      default_weight_grad_config(Cout // groups, cin_g * kh * kw, x.dtype, cin_g,
                                                 is_channels_last(x), flat_capable(m, stride, is_channels_last(x))))


def flat_capable(m: int, stride, channels_last: bool) -> bool:
    """What the problem key tells of ``flat_pixels``: NCHW, stride 1, no regions (padding not known)."""
    return m == 1 and tuple(stride) == (1, 1) and not channels_last


def weight_grad_splits(B: int, m: int, cout: int, groups: int, k_total: int, pixels: int, config: dict) -> int:
    """Pixel chunks per (sample, region): enough programs to fill a GPU, each chunk >= 4 K-steps."""
    programs = B * m * groups * cdiv(cout // groups, config["BLOCK_O"]) * cdiv(k_total, config["BLOCK_N"])
    wanted = cdiv(WEIGHT_GRAD_MIN_PROGRAMS, programs)
    return max(1, min(wanted, pixels // (m * 4 * config["BLOCK_K"])))


def kernel_grad_buffer(splits: int, B: int, m: int, cout: int, cin_g: int, kernel_hw, dtype: torch.dtype,
                       device) -> torch.Tensor:
    """The weight gradient's partials ``(splits, B, m, Cout, Cin/g, kh, kw)`` laid out with Cin/g
    innermost, as :func:`_channels_innermost` lays the experts: a program's tile (output channels x
    channels of one tap, or the flattened taps x channels) is then stored in contiguous 16-byte
    rows, not as fp32 scalars kh·kw apart (a sector each). D1 dw bf16 NHWC PREDICTED 11.5% -> 28.7%
    on triton 3.6, where each (sample, region) sums about a hundred pixels before its store."""
    kh, kw = kernel_hw
    buffer = torch.empty((splits, B, m, cout, kh, kw, cin_g), dtype=dtype, device=device)
    return buffer.movedim(-1, 4)


def backward_weight_launch(dy, x, regions: RegionTables | None, dw, dbias, kernel_hw, groups, stride,
                           padding, dilation, config: dict) -> Launch:
    """``dw``: (SPLITS, B, m, Cout, Cin/g, kh, kw), ``dbias``: (SPLITS, B, m, Cout), both fp32/fp64;
    ``dbias`` None leaves the bias gradient to the caller (without regions it is dy's pixel sum)."""
    if not cacheable(x):
        return _backward_weight_launch(dy, x, regions, dw, dbias, kernel_hw, groups, stride, padding, dilation,
                                       config)
    key = ("expert_conv_bwd_weight", layout(dy), layout(x), _regions_key(regions), layout(dw), layout(dbias),
           tuple(kernel_hw), groups, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("dy_ptr", "x_ptr", "dw_ptr", "dbias_ptr", "pixel_start_ptr", "count_ptr", "perm_ptr"),
                   (dy, x, dw, dbias, *_region_tensors(regions, ("pixel_start", "count", "perm"))),
                   lambda: _backward_weight_launch(dy, x, regions, dw, dbias, kernel_hw, groups, stride, padding,
                                                   dilation, config))


def flat_pixels(dy, x, stride) -> bool:
    """Whether dy's and x's pixels are one flat, unit-stride axis of the same size, tap by tap a
    shifted run of the other's (NCHW, stride 1, output as large as the input): the weight
    gradient's FLAT pixel steps."""
    (_, _, H, W), (Ho, Wo) = x.shape, dy.shape[2:]
    return (tuple(stride) == (1, 1) and (H, W) == (Ho, Wo) and x.stride()[2:] == (W, 1)
            and dy.stride()[2:] == (Wo, 1))


def _backward_weight_launch(dy, x, regions: RegionTables | None, dw, dbias, kernel_hw, groups, stride,
                            padding, dilation, config: dict) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    splits, m = dw.shape[0], dw.shape[2]
    kh, kw = kernel_hw
    meta = {k: config[k] for k in ("BLOCK_O", "BLOCK_N", "BLOCK_K")}
    o_tiles = cdiv(Cout // groups, meta["BLOCK_O"])
    # Per tap while a group's channels fill the column block (see the kernel), else flattened.
    tap_loop = Cin // groups >= meta["BLOCK_N"]
    c_tiles = cdiv(Cin // groups, meta["BLOCK_N"])
    k_tiles = kh * kw * c_tiles if tap_loop else cdiv((Cin // groups) * kh * kw, meta["BLOCK_N"])
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, dbias_ptr=dbias,
        pixel_start_ptr=regions.pixel_start if regions is not None else None,
        count_ptr=regions.count if regions is not None else None,
        perm_ptr=regions.perm if regions is not None else None,
        H=H, W=W, Ho=Ho, Wo=Wo, P=Ho * Wo, CIN_G=Cin // groups, COUT_G=Cout // groups, KH=kh, KW=kw,
        NUM_REGIONS=m, SPLITS=splits, O_TILES=o_tiles, C_TILES=c_tiles,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sdw_s", "sdw_b", "sdw_r", "sdw_o", "sdw_i", "sdw_u", "sdw_v"), dw.stride())),
        **dict(zip(("sdb_s", "sdb_b", "sdb_r", "sdb_o"), dbias.stride() if dbias is not None else (0,) * 4)),
        **_geometry_args(stride, padding, dilation),
    )
    flat = tap_loop and regions is None and flat_pixels(dy, x, stride)
    index_64 = needs_int64(dy, x, dw, dbias)
    stages = config.get("num_stages", 2)
    # One stage: the gathered steps double-buffer in registers themselves (the kernel's PREFETCH).
    # Not the 64-bit variants, which take triton's two-stage pipeline instead: the register buffer
    # spilled a 64-bit fp32 DRConv on sm_80 (4 local loads and stores, triton 3.6).
    gathered_one_stage = not flat and stages == 1
    prefetch = gathered_one_stage and not index_64
    if gathered_one_stage and index_64:
        stages = 2
    meta.update(TAP_LOOP=tap_loop, FLAT=flat, HAS_GUIDE=regions is not None, HAS_DBIAS=dbias is not None,
                PREFETCH=prefetch, INDEX_64=index_64, ACC_DTYPE=_acc_dtype(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype))
    if groups * o_tiles > 65535 or k_tiles > 65535:
        raise ValueError("too many tiles for the grid; use larger BLOCK_O/BLOCK_N")
    # Pixels per (sample, region, split): the mean region size when a guide splits the pixels.
    chunk = cdiv(cdiv(cdiv(Ho * Wo, m), splits), meta["BLOCK_K"])
    return Launch(expert_conv_bwd_weight_kernel, (splits * B * m, groups * o_tiles, k_tiles), args, meta,
                  config.get("num_warps", 4), stages, loops=(chunk,))


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated.
# --------------------------------------------------------------------------------------------

def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_kernel(experts, routing):
    """(an experts-shaped tensor for configurations and the kernel size, m): without routing,
    ``experts`` are per-sample kernels (B, m, Cout, Cin/g, kh, kw), see ``weight_source``."""
    if routing is None:
        return experts[0], experts.shape[1]
    return experts, routing.shape[1]


def expert_conv_forward(x, experts, routing, spatial, bias_mixed, guide, y, groups, stride, padding, dilation,
                        materialise: bool | None = None, config: dict | None = None) -> None:
    """``routing`` (B, m, E); ``bias_mixed`` (B, m, Cout) or None; ``guide`` (B, m, Ho, Wo) or None."""
    shaped, m = _per_kernel(experts, routing)
    config = config or forward_config(x, shaped, m, groups, stride, padding, dilation)
    for samples, materialised in batch_parts(experts, routing, y.shape[2] * y.shape[3], materialise):
        source = weight_source(experts, _part(routing, samples), materialised)
        part_guide = _part(guide, samples)
        regions = region_tables(part_guide, config["BLOCK_P"]) if guide is not None and m > 1 else None
        forward_launch(x[samples], source, _part(spatial, samples), _part(bias_mixed, samples), regions, y[samples],
                       shaped.shape[3:], groups, stride, padding, dilation, config)()


def expert_conv_backward_input(dy, experts, routing, spatial, guide, dx, groups, stride, padding, dilation,
                               materialise: bool | None = None, config: dict | None = None) -> None:
    shaped, m = _per_kernel(experts, routing)
    config = config or input_grad_config(dx, shaped, m, groups, stride)
    for samples, materialised in batch_parts(experts, routing, dy.shape[2] * dy.shape[3], materialise):
        source = weight_source(experts, _part(routing, samples), materialised, COUT_INNERMOST)
        region = None
        if guide is not None and m > 1:
            part_guide = guide[samples]
            region = part_guide.argmax(dim=1).reshape(part_guide.shape[0], -1).to(torch.int32).contiguous()
        backward_input_launch(dy[samples], source, _part(spatial, samples), region, dx[samples], shaped.shape[3:],
                              groups, stride, padding, dilation, m, config)()


def expert_conv_backward_kernel(dy, x, guide, num_regions: int, groups, kernel_hw, stride, padding, dilation,
                                config: dict | None = None):
    """Gradient of the per-(sample, region) kernels and biases: fp32 (fp64) ``dW (B, m, Cout, Cin/g, kh, kw)``
    and ``dbias (B, m, Cout)``, each the fixed-order sum of the pixel-chunk partials."""
    B, Cin = x.shape[:2]
    Cout, Ho, Wo = dy.shape[1:]
    kh, kw = kernel_hw
    m = num_regions
    k_total = (Cin // groups) * kh * kw
    if config is None:
        experts_like = torch.empty((1, Cout, Cin // groups, kh, kw), device="meta")
        config = weight_grad_config(x, experts_like, m, groups, stride)
    regions = region_tables(guide, 1) if guide is not None and m > 1 else None
    splits = weight_grad_splits(B, m, Cout, groups, k_total, Ho * Wo, config)
    acc = _acc_torch_dtype(x.dtype)
    dw = kernel_grad_buffer(splits, B, m, Cout, Cin // groups, kernel_hw, acc, x.device)
    # One region: the bias gradient is dy's pixel sum, a plain reduction (deterministic) rather than a
    # row sum in every program of the kernel (see expert_conv_bwd_weight_kernel).
    dbias = torch.empty((splits, B, m, Cout), dtype=acc, device=x.device) if regions is not None else None
    backward_weight_launch(dy, x, regions, dw, dbias, kernel_hw, groups, stride, padding, dilation, config)()
    if dbias is None:
        dbias = dy.sum((2, 3), dtype=acc).reshape(1, B, 1, Cout)
    if splits == 1:
        return dw[0], dbias[0]
    # Summed in storage order: a sum over the permuted view would return the standard layout.
    return dw.movedim(4, -1).sum(0).movedim(-1, 3), dbias.sum(0)


def expert_bank_source(experts: torch.Tensor) -> WeightSource:
    """The E experts read as E kernels every sample shares: ``W[b, e] = experts[e]`` (zero b stride)."""
    experts = _channels_innermost(experts)
    s = experts.stride()
    return WeightSource(experts, (0, s[0], 0, *s[1:]), None, 1)


def uses_expert_bank(experts: torch.Tensor, routing: torch.Tensor | None) -> bool:
    """Whether the guide scores come from the experts' outputs: y_r = Σ_e routing[b, r, e]·z_e, so
    ∂S[b, r] = Σ_e routing[b, r, e]·(dy · z_e) needs E plain convs with no mixing at all, against m
    convs of mixed kernels (each weight tile mixed from E expert tiles per K-step)."""
    return routing is not None and experts.shape[0] <= routing.shape[1]


def bank_config(x, experts, groups, stride, padding, dilation) -> dict:
    """Tiles of the expert-bank guide scores: one plain conv over every pixel of a sample, so
    128-pixel tiles from 512 pixels on (D1 guide bf16 NHWC PREDICTED 62% at 64 -> 88% on triton 3.6)."""
    cout_g = experts.shape[1] // groups
    pixels = output_pixels(x.shape[2:], experts.shape[3:], stride, padding, dilation)
    index_64 = needs_int64(x) or x.shape[0] * experts.shape[0] * experts.shape[1] * pixels > INT32_MAX
    return get_config("expert_conv_fwd", problem_key(x, experts, 1, groups, stride),
                      default_forward_config(cout_g, x.dtype, 1024 if pixels >= 512 else pixels, index_64,
                                             experts.shape[2], False, is_channels_last(x)))


def expert_conv_guide_scores(x, experts, routing, spatial, bias_mixed, dy, groups, stride, padding, dilation,
                             materialise: bool | None = None, config: dict | None = None,
                             expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """∂S[b, r, i, j] = Σ_o dy[b, o, i, j] · y_r[b, o, i, j], (B, m, Ho, Wo) in the accumulation dtype.

    ``expert_bias`` (E, Cout), the experts' own bias that ``bias_mixed`` mixes: with it (or without
    a bias) and ``uses_expert_bank``, the scores are formed per expert and mixed by ``routing``
    afterwards (a (m x E) @ (E x Ho·Wo) product per sample), unless ``materialise`` forces a mode.
    """
    B, m = routing.shape[:2]
    Cout, Ho, Wo = dy.shape[1:]
    if (materialise is None and uses_expert_bank(experts, routing)
            and (bias_mixed is None or expert_bias is not None)):
        E = experts.shape[0]
        config = config or bank_config(x, experts, groups, stride, padding, dilation)
        score = torch.empty((B, E, score_tiles(Cout, groups, config), Ho * Wo), dtype=_acc_torch_dtype(x.dtype),
                            device=x.device)
        bias = expert_bias.expand(B, E, Cout) if bias_mixed is not None else None
        guide_score_launch(x, expert_bank_source(experts), spatial, bias, dy, score, experts.shape[3:], groups,
                           stride, padding, dilation, config)()
        return torch.matmul(routing.to(score.dtype), score.sum(2)).reshape(B, m, Ho, Wo)
    config = config or forward_config(x, experts, m, groups, stride, padding, dilation)
    score = torch.empty((B, m, score_tiles(Cout, groups, config), Ho * Wo), dtype=_acc_torch_dtype(x.dtype),
                        device=x.device)
    for samples, materialised in batch_parts(experts, routing, Ho * Wo, materialise):
        source = weight_source(experts, routing[samples], materialised)
        guide_score_launch(x[samples], source, _part(spatial, samples), _part(bias_mixed, samples), dy[samples],
                           score[samples], experts.shape[3:], groups, stride, padding, dilation, config)()
    return score.sum(2).reshape(B, m, Ho, Wo)


def meta_region_tables(n: int, pixels: int, m: int, block_p: int) -> RegionTables:
    """Region tables of ``n`` samples of ``pixels`` pixels in ``m`` regions, on the meta device: what
    the AOT catalogues' and the static model's launches read."""
    i32 = dict(dtype=torch.int32, device="meta")
    return RegionTables(*(torch.empty((n, size), **i32) for size in (pixels, pixels, m, m, m + 1)), block_p)


def _catalogue_weight_grad(dy, x, experts, m: int, groups: int, geometry) -> Launch:
    """The kernel-gradient launch an op makes by default for these meta tensors: its config, pixel
    splits, fp32 partials and, with regions, the bias-gradient partials."""
    B, Cin = x.shape[:2]
    Cout, pixels = dy.shape[1], dy.shape[2] * dy.shape[3]
    kernel_hw = tuple(experts.shape[3:])
    config = weight_grad_config(x, experts, m, groups, geometry[0])
    splits = weight_grad_splits(B, m, Cout, groups, Cin // groups * kernel_hw[0] * kernel_hw[1], pixels, config)
    dw = kernel_grad_buffer(splits, B, m, Cout, Cin // groups, kernel_hw, torch.float32, "meta")
    regions = meta_region_tables(B, pixels, m, 1) if m > 1 else None
    dbias = torch.empty((splits, B, m, Cout), dtype=torch.float32, device="meta") if m > 1 else None
    return backward_weight_launch(dy, x, regions, dw, dbias, kernel_hw, groups, *geometry, config)


def catalogue() -> list[Launch]:
    """The launches ops make by default at representative shapes, on meta tensors (for AOT checks)."""
    launches = []
    shapes = [  # (B, Cin, Cout, H, W, kh, kw, groups, E, m, stride, spatial, label)
        (32, 64, 64, 56, 56, 3, 3, 1, 4, 1, 1, False, "CondConv 3x3"),
        # Materialised, 128 channels a group at stride 1: the 256-pixel 2-byte NCHW tiles.
        (8, 128, 128, 56, 56, 3, 3, 1, 4, 1, 1, False, "DynamicConv 3x3 wide"),
        (32, 256, 256, 14, 14, 3, 3, 1, 4, 1, 1, True, "ODConv 3x3 small map"),
        (32, 128, 128, 15, 15, 1, 1, 1, 8, 1, 2, False, "1x1 stride 2"),
        (32, 96, 96, 28, 28, 5, 5, 96, 4, 1, 1, False, "depth-wise 5x5"),
        (8, 64, 64, 64, 64, 3, 3, 1, 8, 8, 1, False, "DRConv m=8"),
    ]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for B, Cin, Cout, H, W, kh, kw, groups, E, m, s, with_spatial, label in shapes:
        for dtype in dtypes:
            for channels_last in (False, True):
                first = len(launches)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                pad = ((kh - 1) // 2, (kw - 1) // 2)
                Ho = (H + 2 * pad[0] - kh) // s + 1
                Wo = (W + 2 * pad[1] - kw) // s + 1
                meta = dict(dtype=dtype, device="meta")
                x = torch.empty((B, Cin, H, W), **meta).to(memory_format=fmt)
                y = torch.empty((B, Cout, Ho, Wo), **meta).to(memory_format=fmt)
                experts = torch.empty((E, Cout, Cin // groups, kh, kw), **meta)
                routing = torch.empty((B, m, E), **meta)
                spatial = torch.empty((B, kh, kw), **meta) if with_spatial else None
                bias = torch.empty((B, m, Cout), **meta)
                geometry = ((s, s), pad, (1, 1))
                tag = f"{label} {str(dtype).removeprefix('torch.')} {'NHWC' if channels_last else 'NCHW'}"
                fwd_cfg = forward_config(x, experts, m, groups, *geometry)
                dx_cfg = input_grad_config(x, experts, m, groups, (s, s))

                # The first launch of the pass (all of them when the batch is materialised in parts).
                samples, materialised = batch_parts(experts, routing, Ho * Wo, None)[0]
                xp, yp, rp, sp, bp = (_part(t, samples) for t in (x, y, routing, spatial, bias))
                source = weight_source(experts, rp, materialised)
                regions = meta_region_tables(xp.shape[0], Ho * Wo, m, fwd_cfg["BLOCK_P"]) if m > 1 else None
                if m > 1:
                    score = torch.empty((xp.shape[0], m, score_tiles(Cout, groups, fwd_cfg), Ho * Wo),
                                        dtype=torch.float32, device="meta")
                    launches.append(guide_score_launch(xp, source, sp, bp, yp, score, (kh, kw), groups, *geometry,
                                                       fwd_cfg))
                    if uses_expert_bank(experts, routing):  # what the op runs; the above when E > m
                        bank_cfg = bank_config(x, experts, groups, *geometry)
                        bank_score = torch.empty((B, E, score_tiles(Cout, groups, bank_cfg), Ho * Wo),
                                                 dtype=torch.float32, device="meta")
                        launches.append(guide_score_launch(x, expert_bank_source(experts), spatial,
                                                           torch.empty((E, Cout), **meta).expand(B, E, Cout), y,
                                                           bank_score, (kh, kw), groups, *geometry, bank_cfg))
                        launches[-1].label = tag + " expert bank"
                launches.append(forward_launch(xp, source, sp, bp, regions, yp, (kh, kw), groups, *geometry, fwd_cfg))
                launches.append(backward_input_launch(yp, weight_source(experts, rp, materialised, COUT_INNERMOST), sp,
                                                      regions.region if m > 1 else None, xp, (kh, kw), groups,
                                                      *geometry, m, dx_cfg))
                launches.append(_catalogue_weight_grad(y, x, experts, m, groups, geometry))
                for launch in launches[first:]:
                    if not launch.label:
                        launch.label = tag + (" materialised" if materialised and "weight" not in launch.name else "")
    launches += _int64_catalogue()
    return launches


def _int64_catalogue() -> list[Launch]:
    """The int64-offset variants (over 2^31 elements): DRConv mixing on the fly with spatial attention
    and bias, and materialised kernels without a guide."""
    launches = []
    B, C, H, W, k, E = 2304, 64, 128, 128, 3, 4
    geometry = ((1, 1), (1, 1), (1, 1))
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty((B, C, H, W), **meta)
    experts = torch.empty((E, C, C, k, k), **meta)
    for m, materialised in ((4, False), (1, True)):
        routing = torch.empty((B, m, E), **meta)
        source = weight_source(experts, routing, materialised)
        spatial = None if materialised else torch.empty((B, k, k), **meta)
        bias = None if materialised else torch.empty((B, m, C), **meta)
        fwd_cfg = forward_config(x, experts, m, 1, *geometry)
        regions = region_map = None
        if m > 1:
            regions = meta_region_tables(B, H * W, m, fwd_cfg["BLOCK_P"])
            region_map = regions.region
            score = torch.empty((B, m, score_tiles(C, 1, fwd_cfg), H * W), dtype=torch.float32, device="meta")
            launches.append(guide_score_launch(x, source, spatial, bias, x, score, (k, k), 1, *geometry, fwd_cfg))
        launches.append(forward_launch(x, source, spatial, bias, regions, x, (k, k), 1, *geometry, fwd_cfg))
        launches.append(backward_input_launch(x, weight_source(experts, routing, materialised, COUT_INNERMOST),
                                              spatial, region_map, x, (k, k), 1, *geometry, m,
                                              input_grad_config(x, experts, m, 1, (1, 1))))
        launches.append(_catalogue_weight_grad(x, x, experts, m, 1, geometry))
        for launch in launches[-(4 if m > 1 else 3):]:
            assert launch.meta["INDEX_64"]
            launch.label = (f"over 2^31 elements {'DRConv m=4 spatial' if m > 1 else 'CondConv'} bfloat16 NCHW"
                            + (" materialised" if materialised and "weight" not in launch.name else ""))
    # fp32 channels_last kernel gradients: one-stage defaults, which the 64-bit variants run on
    # triton's two-stage pipeline instead of the register double buffer (see _backward_weight_launch).
    x = torch.empty((B, C, H, W), dtype=torch.float32, device="meta").to(memory_format=torch.channels_last)
    for m in (1, 4):
        launch = _catalogue_weight_grad(x, x, experts, m, 1, geometry)
        assert launch.meta["INDEX_64"] and not launch.meta["PREFETCH"]
        launch.label = f"over 2^31 elements {'DRConv m=4' if m > 1 else 'CondConv'} float32 NHWC"
        launches.append(launch)
    return launches
