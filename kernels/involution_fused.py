"""Fused involution: the span conv that generates the per-pixel kernels runs inside the
aggregation, so the weight tensor ``(B, G, K, K, Ho, Wo)`` never reaches global memory.

The layer is ``y[b,c,p] = Σ_k w[b,g(c),k,p] · x[b,c,shift_k(p)]`` with generated weights
``w[b,g,k,p] = Σ_r S[g·K²+k, r] · z[b,r,p] + β[g·K²+k]`` (S, β: the span conv's 1x1 weight and bias;
z: the reduced feature ``(B, R, Ho, Wo)``). Output channel ``g·K² + u·K + v`` of the span conv is
tap (u, v) of group g, exactly the ``view(B, G, K, K, Ho, Wo)`` of the unfused module.

fp16/bf16 layers with 8..32 channels per group, R <= 64 and a small enough halo run the tensor-core
halo kernels of ``involution_fused_halo.py`` instead (the launchers below choose; see
``takes_halo_path``): forward, dz and dspan at stride 1, the input gradient at strides 1 and 2; so
do fp32 layers while torch allows tf32 in convs. The per-tap kernels here take everything else
(fp32 with tf32 off, fp64, depth-wise and wide groups, large R or halos).

Per-tap kernels (all deterministic: every output element and every partial has exactly one writer):

* ``fused_fwd_kernel`` — the family-1 3-D tile ``[BLOCK_G, BLOCK_CG, pixels]``. Per tap the
  program generates ``w_k = S_k · z_tile`` ([BLOCK_G, BLOCK_R] @ [BLOCK_R, pixels], a ``tl.dot``
  with fp32 accumulation; the z tile is loaded once when R fits one block) and broadcasts it over
  the group's channels. Weights stay in fp32 (the unfused path rounds them to the input dtype).
* ``fused_bwd_input_kernel`` — dx in gather form, as ``involution_bwd_input_kernel``: the input
  pixel (h, w) receives tap k from the output pixel ``o_k(h, w)``, a different output pixel for each
  tap. Instead of staging a halo of generated weights, the program regenerates ``w_k`` at exactly
  those output pixels from a gathered z tile (``S_k · z[:, o_k(tile)]``): the dot work equals the
  forward's, the extra bytes are R·pixels per tap from L1/L2, and no program writes another's
  pixels, so there are no atomics and no halo bookkeeping for stride, dilation or odd K.
* ``fused_bwd_z_kernel`` — per output tile, for each group block and tap, ``dW_k = Σ_{c∈g} dy ·
  x_shift`` ([BLOCK_G, pixels], on-chip) and ``dz += S_kᵀ · dW_k`` (``tl.dot``). A program owns its
  tile's dz for every group, so dz needs no reduction across programs.
* ``fused_bwd_span_kernel`` — ``dS[g·K²+k, r] = Σ_{b,p} dW_k · z`` and ``dβ = Σ_{b,p} dW_k``. A
  program owns one tap, one group block and one contiguous slab of (sample, pixel tile) pairs; it
  accumulates ``dW_k · zᵀ`` ([BLOCK_G, pixels] @ [pixels, BLOCK_R]) in registers over the slab and
  writes one fp32 partial per slab; the caller sums the partials in a fixed order (stage two).
  Float atomics would make dS depend on scheduling; the partials are ``slabs × K²G × R`` fp32
  (about 8 MB at RedNet's R1 shape), far smaller than the per-pixel weights they replace.

dW is recomputed in both gradient kernels (2·K²·C multiply-adds per pixel instead of one) because
the alternative — one kernel producing dz and dS together — must either hold ``G·K²·R`` partials
per program or read-modify-write them in global memory once per tile and tap. The products are
read from L1/L2 (the 49 taps of a tile hit the same lines), so DRAM traffic stays one pass of x and
dy per kernel. The programs of one slab in the span kernel differ only in their tap and run
adjacently, so they walk the same dy and x lines together.

Dot operands are in the input dtype (dW is rounded to it before the two span products, as the
unfused path's materialised dW is); fp32 inputs use ``input_precision="tf32x3"`` here (three tf32
products: fp32-level error on tensor cores; plain tf32 would round the operands to 10 mantissa
bits). The halo kernels, which fp32 takes only while torch allows tf32 in convs, use plain tf32.
A contraction shorter than 16 (a dz dot over fewer than 16 groups) and fp64 use a broadcast
multiply-reduce instead, with blocks the launcher keeps small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (TRITON_VERSION, Launch, cacheable, cdiv, config_key, conv_tf32, is_channels_last, layout,
                      needs_int64, next_power_of_2, planned)
from .configs import get_config
from ._indexing import gather_source, widen
from .involution import _acc_dtype, _pow2_at_most, _tile_indices
from . import involution_fused_halo as halo
from .layout import channels_last_copy, channels_last_empty

# Programs the span-gradient kernel aims for: enough to fill any current GPU several times, few
# enough that the fp32 partials stay a few MB. A constant, so the reduction order (and the result)
# does not depend on the device.
SPAN_GRAD_PROGRAMS = 2048
# Elements of the [M, K, N] product a broadcast multiply-reduce may materialise.
FMA_PRODUCT_ELEMENTS = 8192
# Pixels per tile: at least 16, the shortest tl.dot contraction (the span-gradient dot contracts
# over pixels).
TILE_PIXELS = 16


@triton.jit
def _matmul(a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``a @ b`` accumulated in ACC_DTYPE: tensor cores, or a broadcast multiply-reduce when the
    contraction is shorter than tl.dot allows or the dtype is fp64."""
    if USE_DOT:
        out = tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        # b first: Triton's combine pass turns sum(a[:, :, None] * b[None, :, :], 1) into a tf32 dot
        # of any contraction length, which summed wrongly on an H200 (kernels._launch.unwritten_dots).
        out = tl.sum(b[None, :, :].to(ACC_DTYPE) * a[:, :, None].to(ACC_DTYPE), axis=1)
    return out


@triton.jit
def _tap_weights(span_rows, g_ok, ssr, z_pix, pix_ok, szr, R,
                 BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, PIXELS: tl.constexpr, ONE_R_CHUNK: tl.constexpr,
                 USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 INDEX_64: tl.constexpr):
    """``Σ_r S[row_g, r] · z[r, p]`` ([BLOCK_G, PIXELS]) for the span rows ``span_rows`` (pointers,
    one per group) and the z pixels ``z_pix`` (pointers at channel 0), over R in BLOCK_R chunks."""
    r = tl.arange(0, BLOCK_R)
    if ONE_R_CHUNK:
        # No loop when R fits one block: a third nested runtime loop costs registers across all three.
        r_ok = r < R
        r = widen(r, INDEX_64)
        span = tl.load(span_rows[:, None] + r[None, :] * ssr, mask=g_ok[:, None] & r_ok[None, :], other=0.0)
        z = tl.load(z_pix[None, :] + r[:, None] * szr, mask=r_ok[:, None] & pix_ok[None, :], other=0.0)
        weight = _matmul(span, z, USE_DOT, DOT_PRECISION, ACC_DTYPE)
    else:
        weight = tl.zeros((BLOCK_G, PIXELS), dtype=ACC_DTYPE)
        for r_start in range(0, R, BLOCK_R):
            rr = r_start + r
            r_ok = rr < R
            rr = widen(rr, INDEX_64)
            span = tl.load(span_rows[:, None] + rr[None, :] * ssr, mask=g_ok[:, None] & r_ok[None, :], other=0.0)
            z = tl.load(z_pix[None, :] + rr[:, None] * szr, mask=r_ok[:, None] & pix_ok[None, :], other=0.0)
            weight += _matmul(span, z, USE_DOT, DOT_PRECISION, ACC_DTYPE)
    return weight


@triton.jit
def _pixel_tile(tile, TILES_W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, INDEX_64: tl.constexpr):
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    row = (tile // TILES_W) * BLOCK_H + p // BLOCK_W
    col = (tile % TILES_W) * BLOCK_W + p % BLOCK_W
    if INDEX_64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    return row, col


@triton.jit
def _tap_grad_weights(dy_pix, x_pix, g3, g_ok3, cg3, CG, sdyc, sxc, pix_ok3, tap_ok3, grad,
                      BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, PIXELS: tl.constexpr,
                      ONE_CG_CHUNK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``dW_k[g, p] = Σ_{c∈g} dy[c, p] · x[c, shift_k(p)]`` ([BLOCK_G, PIXELS]). ``x_pix`` points at
    the tap's input pixels; with one channel chunk, ``grad`` is the dy tile the caller holds."""
    if ONE_CG_CHUNK:
        xv = tl.load(x_pix + (g3 * CG + cg3) * sxc, mask=g_ok3 & (cg3 < CG) & tap_ok3, other=0.0)
        dw = tl.sum(grad * xv.to(ACC_DTYPE), axis=1)
    else:
        dw = tl.zeros((BLOCK_G, PIXELS), dtype=ACC_DTYPE)
        for cg_start in range(0, CG, BLOCK_CG):
            c3 = g3 * CG + cg_start + cg3
            m = g_ok3 & (cg_start + cg3 < CG)
            dyv = tl.load(dy_pix + c3 * sdyc, mask=m & pix_ok3, other=0.0)
            xv = tl.load(x_pix + c3 * sxc, mask=m & tap_ok3, other=0.0)
            dw += tl.sum(dyv.to(ACC_DTYPE) * xv.to(ACC_DTYPE), axis=1)
    return dw


@triton.jit
def fused_fwd_kernel(
    x_ptr, z_ptr, span_w_ptr, span_b_ptr, y_ptr,
    C, H, W, Ho, Wo, CG, K, R,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sso, ssr, ssb,
    syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W, CG_TILES,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_R_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y[b,c,i,j] = Σ_{u,v} (S_{g,u,v} · z[b,:,i,j] + β_{g,u,v}) · x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW]."""
    PIXELS: tl.constexpr = BLOCK_H * BLOCK_W
    pid0 = tl.program_id(0)
    pid_ch = tl.program_id(1)
    b = pid0 // TILES_PIX
    if INDEX_64:
        b = b.to(tl.int64)
    G = C // CG
    KK = K * K
    g3, cg3, c3, channel_mask, i, j = _tile_indices(
        pid0 % TILES_PIX, pid_ch, TILES_W, CG_TILES, G, CG,
        BLOCK_G, BLOCK_CG, BLOCK_H, BLOCK_W, INDEX_64)
    out_mask = (i < Ho) & (j < Wo)
    g = (pid_ch // CG_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G

    z_pix = z_ptr + b * szb + i * szh + j * szw
    if ONE_R_CHUNK:
        # The z tile is the same for all K² taps: load it once.
        r = widen(tl.arange(0, BLOCK_R), INDEX_64)
        z_tile = tl.load(z_pix[None, :] + r[:, None] * szr, mask=(r < R)[:, None] & out_mask[None, :], other=0.0)

    x_rows = x_ptr + b * sxb + c3 * sxc
    acc = tl.zeros((BLOCK_G, BLOCK_CG, PIXELS), dtype=ACC_DTYPE)
    h_first = i * SH - PH
    w_first = j * SW - PW
    for tap in range(K * K):
        # One loop over the taps: a u/v nest holds the outer loop's row terms through the whole
        # inner loop, where ptxas 12.8 spills them to reach an occupancy step.
        u = tap // K
        v = tap % K
        h_in = h_first + u * DH
        w_in = w_first + v * DW
        ok = out_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
        span_row = widen(g * KK + tap, INDEX_64)
        if ONE_R_CHUNK:
            span = tl.load(span_w_ptr + span_row[:, None] * sso + r[None, :] * ssr,
                           mask=g_ok[:, None] & (r < R)[None, :], other=0.0)
            weight = _matmul(span, z_tile, USE_DOT, DOT_PRECISION, ACC_DTYPE)
        else:
            weight = _tap_weights(span_w_ptr + span_row * sso, g_ok, ssr, z_pix, out_mask, szr, R,
                                  BLOCK_G, BLOCK_R, PIXELS, False, USE_DOT, DOT_PRECISION, ACC_DTYPE, INDEX_64)
        if HAS_BIAS:
            weight += tl.load(span_b_ptr + span_row * ssb, mask=g_ok, other=0.0).to(ACC_DTYPE)[:, None]
        xv = tl.load(x_rows + (h_in * sxh + w_in * sxw)[None, None, :],
                     mask=channel_mask & ok[None, None, :], other=0.0)
        acc += weight[:, None, :] * xv.to(ACC_DTYPE)
    y_off = b * syb + c3 * syc + (i * syh + j * syw)[None, None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=channel_mask & out_mask[None, None, :])


@triton.jit
def fused_bwd_input_kernel(
    dy_ptr, z_ptr, span_w_ptr, span_b_ptr, dx_ptr,
    C, H, W, Ho, Wo, CG, K, R,
    sdyb, sdyc, sdyh, sdyw,
    szb, szr, szh, szw,
    sso, ssr, ssb,
    sdxb, sdxc, sdxh, sdxw,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W, CG_TILES,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_R_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dx[b,c,h,w] = Σ_{u,v} w[b,g,u,v,i,j] · dy[b,c,i,j], (i, j) the output pixel tap (u, v) of
    (h, w) belongs to; w regenerated from z at exactly those pixels (see the module docstring)."""
    PIXELS: tl.constexpr = BLOCK_H * BLOCK_W
    pid0 = tl.program_id(0)
    pid_ch = tl.program_id(1)
    b = pid0 // TILES_PIX
    if INDEX_64:
        b = b.to(tl.int64)
    G = C // CG
    KK = K * K
    g3, cg3, c3, channel_mask, h, w = _tile_indices(
        pid0 % TILES_PIX, pid_ch, TILES_W, CG_TILES, G, CG,
        BLOCK_G, BLOCK_CG, BLOCK_H, BLOCK_W, INDEX_64)
    in_mask = (h < H) & (w < W)
    g = (pid_ch // CG_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G

    z_sample = z_ptr + b * szb
    dy_rows = dy_ptr + b * sdyb + c3 * sdyc
    acc = tl.zeros((BLOCK_G, BLOCK_CG, PIXELS), dtype=ACC_DTYPE)
    for tap in range(K * K):
        # One loop over the taps (see fused_fwd_kernel).
        u = tap // K
        v = tap % K
        i, row_ok = gather_source(h, PH, u, DH, SH, Ho, in_mask)
        j, ok = gather_source(w, PW, v, DW, SW, Wo, row_ok)
        span_row = widen(g * KK + tap, INDEX_64)
        weight = _tap_weights(span_w_ptr + span_row * sso, g_ok, ssr, z_sample + i * szh + j * szw, ok, szr, R,
                              BLOCK_G, BLOCK_R, PIXELS, ONE_R_CHUNK, USE_DOT, DOT_PRECISION, ACC_DTYPE, INDEX_64)
        if HAS_BIAS:
            weight += tl.load(span_b_ptr + span_row * ssb, mask=g_ok, other=0.0).to(ACC_DTYPE)[:, None]
        grad = tl.load(dy_rows + (i * sdyh + j * sdyw)[None, None, :],
                       mask=channel_mask & ok[None, None, :], other=0.0)
        acc += weight[:, None, :] * grad.to(ACC_DTYPE)
    dx_off = b * sdxb + c3 * sdxc + (h * sdxh + w * sdxw)[None, None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=channel_mask & in_mask[None, None, :])


@triton.jit
def fused_bwd_z_kernel(
    dy_ptr, x_ptr, span_w_ptr, dz_ptr,
    C, H, W, Ho, Wo, CG, K, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sso, ssr,
    sdzb, sdzr, sdzh, sdzw,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_G_BLOCK: tl.constexpr, ONE_CG_CHUNK: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dz[b,r,p] = Σ_{g,k} S[g·K²+k, r] · dW_k[g,p] with dW_k = Σ_{c∈g} dy[b,c,p] · x[b,c,shift_k(p)].

    One program per (sample, pixel tile, R block) loops over every group, so it alone writes its dz.
    """
    PIXELS: tl.constexpr = BLOCK_H * BLOCK_W
    pid0 = tl.program_id(0)
    b = pid0 // TILES_PIX
    if INDEX_64:
        b = b.to(tl.int64)
    G = C // CG
    KK = K * K
    i, j = _pixel_tile(pid0 % TILES_PIX, TILES_W, BLOCK_H, BLOCK_W, INDEX_64)
    out_mask = (i < Ho) & (j < Wo)
    out_mask3 = out_mask[None, None, :]
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rr = widen(rr, INDEX_64)
    cg3 = tl.arange(0, BLOCK_CG)[None, :, None]

    dy_pix = dy_ptr + b * sdyb + (i * sdyh + j * sdyw)[None, None, :]
    x_sample = x_ptr + b * sxb
    h_first = i * SH - PH
    w_first = j * SW - PW
    dz = tl.zeros((BLOCK_R, PIXELS), dtype=ACC_DTYPE)
    g_blocks = tl.cdiv(G, BLOCK_G)
    if ONE_G_BLOCK:
        # A constant trip count of one folds the loop away: one nesting level less to hold registers across.
        g_blocks = 1
    for g_block in range(0, g_blocks):
        g = g_block * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = g < G
        g3 = g[:, None, None]
        if INDEX_64:
            g3 = g3.to(tl.int64)
        g_ok3 = g_ok[:, None, None]
        grad = tl.zeros((BLOCK_G, BLOCK_CG, PIXELS), dtype=ACC_DTYPE)
        if ONE_CG_CHUNK:
            # The group's whole dy tile is reused by all K² taps: keep it in registers.
            grad = tl.load(dy_pix + (g3 * CG + cg3) * sdyc, mask=g_ok3 & (cg3 < CG) & out_mask3,
                           other=0.0).to(ACC_DTYPE)
        for tap in range(K * K):
            # One loop over the taps (see fused_fwd_kernel).
            u = tap // K
            v = tap % K
            h_in = h_first + u * DH
            w_in = w_first + v * DW
            tap_ok3 = (out_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W))[None, None, :]
            x_pix = x_sample + (h_in * sxh + w_in * sxw)[None, None, :]
            dw = _tap_grad_weights(dy_pix, x_pix, g3, g_ok3, cg3, CG, sdyc, sxc, out_mask3, tap_ok3, grad,
                                   BLOCK_G, BLOCK_CG, PIXELS, ONE_CG_CHUNK, ACC_DTYPE)
            span_t = tl.load(span_w_ptr + widen(g * KK + tap, INDEX_64)[None, :] * sso + rr[:, None] * ssr,
                             mask=r_ok[:, None] & g_ok[None, :], other=0.0)
            dz += _matmul(span_t, dw.to(span_t.dtype), USE_DOT, DOT_PRECISION, ACC_DTYPE)
    dz_off = b * sdzb + rr[:, None] * sdzr + (i * sdzh + j * sdzw)[None, :]
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=r_ok[:, None] & out_mask[None, :])


@triton.jit
def fused_bwd_span_kernel(
    dy_ptr, x_ptr, z_ptr, dspan_ptr, dbias_ptr,
    C, H, W, Ho, Wo, CG, K, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sps, spo, spr,
    sbs, sbo,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W, TOTAL_TILES, TILES_PER_SLAB, G_TILES,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_CG_CHUNK: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Per-slab partials of dS[g·K²+k, r] = Σ_{b,p} dW_k[b,g,p] · z[b,r,p] and dβ[g·K²+k] = Σ_{b,p} dW_k.

    Program (tap·G_TILES + group block, R block, slab) walks the slab's (sample, tile) pairs in
    order and writes its partial once: no atomics, a fixed summation order.
    """
    PIXELS: tl.constexpr = BLOCK_H * BLOCK_W
    pid0 = tl.program_id(0)
    tap = pid0 // G_TILES
    u = tap // K
    v = tap % K
    pid_r = tl.program_id(1)
    slab = tl.program_id(2)
    G = C // CG
    KK = K * K
    g = (pid0 % G_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    g3 = g[:, None, None]
    if INDEX_64:
        g3 = g3.to(tl.int64)
    g_ok3 = g_ok[:, None, None]
    cg3 = tl.arange(0, BLOCK_CG)[None, :, None]
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rr = widen(rr, INDEX_64)

    dspan = tl.zeros((BLOCK_G, BLOCK_R), dtype=ACC_DTYPE)
    dbias = tl.zeros((BLOCK_G,), dtype=ACC_DTYPE)
    first = slab * TILES_PER_SLAB
    for t in range(first, tl.minimum(first + TILES_PER_SLAB, TOTAL_TILES)):
        b = t // TILES_PIX
        if INDEX_64:
            b = b.to(tl.int64)
        i, j = _pixel_tile(t % TILES_PIX, TILES_W, BLOCK_H, BLOCK_W, INDEX_64)
        out_mask = (i < Ho) & (j < Wo)
        out_mask3 = out_mask[None, None, :]
        h_in = i * SH - PH + u * DH
        w_in = j * SW - PW + v * DW
        tap_ok3 = (out_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W))[None, None, :]
        dy_pix = dy_ptr + b * sdyb + (i * sdyh + j * sdyw)[None, None, :]
        x_pix = x_ptr + b * sxb + (h_in * sxh + w_in * sxw)[None, None, :]
        grad = tl.zeros((BLOCK_G, BLOCK_CG, PIXELS), dtype=ACC_DTYPE)
        if ONE_CG_CHUNK:
            grad = tl.load(dy_pix + (g3 * CG + cg3) * sdyc, mask=g_ok3 & (cg3 < CG) & out_mask3,
                           other=0.0).to(ACC_DTYPE)
        dw = _tap_grad_weights(dy_pix, x_pix, g3, g_ok3, cg3, CG, sdyc, sxc, out_mask3, tap_ok3, grad,
                               BLOCK_G, BLOCK_CG, PIXELS, ONE_CG_CHUNK, ACC_DTYPE)
        z_t = tl.load(z_ptr + b * szb + (i * szh + j * szw)[:, None] + rr[None, :] * szr,
                      mask=out_mask[:, None] & r_ok[None, :], other=0.0)
        dspan += _matmul(dw.to(z_t.dtype), z_t, USE_DOT, DOT_PRECISION, ACC_DTYPE)
        dbias += tl.sum(dw, axis=1)
    row = widen(g * KK + tap, INDEX_64)
    slab = widen(slab, INDEX_64)
    tl.store(dspan_ptr + slab * sps + row[:, None] * spo + rr[None, :] * spr, dspan,
             mask=g_ok[:, None] & r_ok[None, :])
    if pid_r == 0:
        tl.store(dbias_ptr + slab * sbs + row * sbo, dbias, mask=g_ok)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def uses_dot(kernel: str, config: dict, dtype: torch.dtype) -> bool:
    """Whether ``kernel``'s products run on tl.dot: its contraction — R (weights: fwd, bwd_input),
    groups (bwd_z) or pixels (bwd_span) — is at least 16, and the dtype is not fp64 (fp64 tl.dot
    is no tensor-core path worth having). Otherwise they take the multiply-reduce."""
    contraction = {"fwd": config["BLOCK_R"], "bwd_input": config["BLOCK_R"], "bwd_z": config["BLOCK_G"],
                   "bwd_span": config["BLOCK_H"] * config["BLOCK_W"]}[kernel]
    return contraction >= 16 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def _dot_precision(dtype: torch.dtype) -> str:
    # The per-tap kernels' fp32 products: tf32 would round the operands to 10 mantissa bits; tf32x3
    # splits each into two tf32 parts (fp32-level error at three times the tensor-core work).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def default_config(kernel: str, C: int, G: int, R: int, height: int, width: int, channels_last: bool,
                   dtype: torch.dtype) -> dict:
    """Tile for ``kernel`` ('fwd', 'bwd_input', 'bwd_z', 'bwd_span') over a ``height x width`` grid.

    The channel block covers a whole group where it can (up to 64 channels): a second channel
    tile would regenerate the same weights. Groups fill the rest of 256 channels, so RedNet's
    16-channel groups give a 16 x 16 x 16-pixel tile whose weight dot is [16, R] @ [R, 16]. Tiles
    have 16 pixels even past a small image's edge (masked), because the span-gradient dot
    contracts over them; 32 pixels cost 200+ registers per thread in NCHW for no fewer bytes.
    """
    cg = C // G
    block_cg = _pow2_at_most(cg, 64)
    block_g = _pow2_at_most(G, min(64, max(1, 256 // block_cg)))
    block_w = _pow2_at_most(width, 8 if channels_last else TILE_PIXELS)
    block_h = TILE_PIXELS // block_w
    pixels = block_h * block_w
    # R is zero-padded up to 16 so the weight dot always has a legal contraction.
    block_r = min(max(16, next_power_of_2(R)), 128)
    if not uses_dot(kernel, dict(BLOCK_G=block_g, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_R=block_r), dtype):
        block_r = _pow2_at_most(R, max(1, FMA_PRODUCT_ELEMENTS // (block_g * pixels)))
    elements = block_g * block_cg * pixels
    # About eight tile elements per thread, except where the AOT sweep (dynconv inspect, sm_80 and
    # sm_90) found ptxas spilling at that count: dx wants more threads, and dz fewer unless fp32 NCHW.
    if kernel == "bwd_input" or (kernel == "bwd_z" and dtype == torch.float32 and not channels_last):
        num_warps = max(1, min(8, elements // 128))
    elif kernel == "bwd_z":
        num_warps = max(1, min(4, elements // 256))
    else:
        num_warps = max(1, min(8, elements // 256))
    return {"BLOCK_G": block_g, "BLOCK_CG": block_cg, "BLOCK_H": block_h, "BLOCK_W": block_w,
            "BLOCK_R": block_r, "num_warps": num_warps, "num_stages": 1}


def problem_key(x: torch.Tensor, G: int, K: int, R: int, stride) -> dict:
    B, C, H, W = x.shape
    # Both stride components: a (1, 2) layer must not take a (1, 1) layer's tiles.
    return {"B": B, "C": C, "G": G, "R": R, "H": H, "W": W, "K": K, "stride_h": stride[0], "stride_w": stride[1],
            "channels_last": int(is_channels_last(x)), "dtype_bytes": x.element_size()}


def _config(kernel, x, G, K, R, stride, height, width, config) -> dict:
    """A per-tap kernel's config: the caller's, else the tuned one, else the default. The launchers
    ask only where the halo kernels do not run (or a caller chose a per-tap config): the tuned
    tables hold per-tap tiles, never timed against the halo kernels (`dynconv autotune` leaves
    those problems out)."""
    if config is not None:
        return dict(config)
    default = default_config(kernel, x.shape[1], G, R, height, width, is_channels_last(x), x.dtype)
    return get_config(f"involution_fused_{kernel}", problem_key(x, G, K, R, stride), default)


def _common_meta(config: dict, x: torch.Tensor, use_dot: bool, *tensors) -> tuple[dict, int, int]:
    meta = {k: config[k] for k in ("BLOCK_G", "BLOCK_CG", "BLOCK_H", "BLOCK_W", "BLOCK_R")}
    meta.update(USE_DOT=use_dot, DOT_PRECISION=_dot_precision(x.dtype), INDEX_64=needs_int64(*tensors),
                ACC_DTYPE=_acc_dtype(x.dtype))
    return meta, config.get("num_warps", 4), config.get("num_stages", 1)


def _geometry_args(stride, padding, dilation) -> dict:
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def _strides(names: str, t: torch.Tensor) -> dict:
    return dict(zip(names.split(), t.stride()))


def _channel_grid(B, G, tiles_pix, block_g, cg_tiles):
    ch_tiles = cdiv(G, block_g) * cg_tiles
    if ch_tiles > 65535:
        raise ValueError(f"too many channel tiles for the grid ({ch_tiles}); use a larger BLOCK_G/BLOCK_CG")
    return (B * tiles_pix, ch_tiles, 1)


def forward_launch(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config=None) -> Launch:
    """``span_weight`` is (K²G, R); ``span_bias`` (K²G,) or None."""
    if not cacheable(x):
        return _forward_launch(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config)
    key = ("involution_fused_fwd", layout(x), layout(z), layout(span_weight), layout(span_bias), layout(y), K,
           *stride, *padding, *dilation, config_key(config))
    return planned(key, ("x_ptr", "z_ptr", "span_w_ptr", "span_b_ptr", "y_ptr"), (x, z, span_weight, span_bias, y),
                   lambda: _forward_launch(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config))


def _forward_launch(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config=None) -> Launch:
    B, C, H, W = x.shape
    R = z.shape[1]
    G = span_weight.shape[0] // (K * K)
    Ho, Wo = y.shape[2], y.shape[3]
    if config is None and takes_halo_path(x, G, R, K, stride, dilation, False):
        return _halo_launch(halo.fused_fwd_halo_kernel, x, z, span_weight, span_bias, y, K, stride, padding,
                            dilation, ("x_ptr", "y_ptr", "sxb sxc sxh sxw", "syb syc syh syw"))
    config = _config("fwd", x, G, K, R, stride, Ho, Wo, config)
    meta, num_warps, num_stages = _common_meta(config, x, uses_dot("fwd", config, x.dtype),
                                               x, z, span_weight, span_bias, y)
    tiles_w = cdiv(Wo, meta["BLOCK_W"])
    tiles_pix = cdiv(Ho, meta["BLOCK_H"]) * tiles_w
    cg_tiles = cdiv(C // G, meta["BLOCK_CG"])
    args = dict(
        x_ptr=x, z_ptr=z, span_w_ptr=span_weight, span_b_ptr=span_bias, y_ptr=y,
        C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K, R=R,
        **_strides("sxb sxc sxh sxw", x), **_strides("szb szr szh szw", z), **_strides("sso ssr", span_weight),
        ssb=span_bias.stride(0) if span_bias is not None else 0, **_strides("syb syc syh syw", y),
        **_geometry_args(stride, padding, dilation),
        TILES_PIX=tiles_pix, TILES_W=tiles_w, CG_TILES=cg_tiles,
    )
    meta.update(ONE_R_CHUNK=R <= meta["BLOCK_R"], HAS_BIAS=span_bias is not None)
    r_steps = () if meta["ONE_R_CHUNK"] else (cdiv(R, meta["BLOCK_R"]),)
    return Launch(fused_fwd_kernel, _channel_grid(B, G, tiles_pix, meta["BLOCK_G"], cg_tiles), args, meta,
                  num_warps, num_stages,
                  loops=((K * K, r_steps) if r_steps else K * K,))


# Channels per group from which the halo kernels pay: their window product's N dimension is the
# group's channels, padded to 16 (a depth-wise layer would waste 15/16 of it).
MIN_HALO_CHANNELS = 8
# Past these the [halo, channels] and [R, halo] operand tiles no longer fit 8 warps' registers.
MAX_HALO_CHANNELS = 32
MAX_HALO_R = 64
HALO_DTYPES = (torch.float16, torch.bfloat16)


def takes_halo_path(x, G, R, K, stride, dilation, transposed) -> bool:
    """Whether the tensor-core halo kernels (kernels/involution_fused_halo.py) run this pass.

    fp32 runs there while torch allows tf32 in convs (its default): window and span products in
    plain tf32 (PREDICTED R1-layer fp32 1-6% -> 13-26% of the roofline against the per-tap kernels).
    With the switch off it keeps the per-tap kernels: a tf32x3 forward needs 288 KB of shared
    memory, more than an SM has.
    """
    meta = halo.halo_meta(K, stride, dilation, transposed)
    dtype_ok = x.dtype in HALO_DTYPES or (x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32)
    return (dtype_ok and MIN_HALO_CHANNELS <= x.shape[1] // G <= MAX_HALO_CHANNELS
            and R <= MAX_HALO_R and meta["BLOCK_Q"] <= halo.MAX_BLOCK_Q)


def _halo_meta(x, C, G, K, R, stride, dilation, transposed, tile_h, tile_w, *tensors) -> tuple[dict, int]:
    """Meta-parameters of a halo kernel whose tiles cover a ``tile_h x tile_w`` grid, and its tile count.
    Its products are plain tf32 for fp32: fp32 comes here only while torch allows tf32."""
    meta = halo.halo_meta(K, stride, dilation, transposed)
    meta.update(K=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
                BLOCK_R=max(16, next_power_of_2(R)), BLOCK_CG=max(16, next_power_of_2(C // G)),
                DOT_PRECISION="tf32", INDEX_64=needs_int64(*tensors), ACC_DTYPE=_acc_dtype(x.dtype))
    return meta, cdiv(tile_h, meta["BLOCK_H"]), cdiv(tile_w, meta["BLOCK_W"])


def _halo_grad_meta(x, C, G, K, R, stride, dilation, *tensors) -> tuple[dict, int, int]:
    """The weight-gradient halo kernels' meta: their taps are padded per row (KP = K padded)."""
    meta, tiles_h, tiles_w = _halo_meta(x, C, G, K, R, stride, dilation, False, *tensors[:2], *tensors[2:])
    meta["KP"] = next_power_of_2(K)
    return meta, tiles_h, tiles_w


def _by_pairs(meta: dict, K: int, stride, dilation) -> None:
    """A halo kernel's meta turned to the halo of a pair of pixel rows (the forward, dz, dspan)."""
    for name in ("HALO_H", "BLOCK_Q", "BLOCK_KK"):
        meta.pop(name, None)
    meta.update(halo.pair_meta(K, stride, dilation))


def _halo_launch(kernel, big, z, span_weight, span_bias, out, K, stride, padding, dilation, names) -> Launch:
    """The forward (``big`` = x, ``out`` = y) or the input gradient (``big`` = dy, ``out`` = dx)."""
    B, C = big.shape[:2]
    R = z.shape[1]
    G = span_weight.shape[0] // (K * K)
    transposed = kernel is halo.fused_bwd_input_halo_kernel
    if not transposed and forward_by_pairs(big, C // G):
        kernel = halo.fused_fwd_halo_pairs_kernel
    meta, tiles_h, tiles_w = _halo_meta(big, C, G, K, R, stride, dilation, transposed, out.shape[2], out.shape[3],
                                        big, z, out)
    meta["HAS_BIAS"] = span_bias is not None
    # Both spread [pixels, KP, KP] weights over a window, KP > K so that tap row and column K are zero.
    del meta["BLOCK_KK"]
    meta["KP"] = next_power_of_2(K + 1)
    if kernel is halo.fused_fwd_halo_pairs_kernel:
        _by_pairs(meta, K, stride, dilation)
    if transposed:
        meta["PACKED"] = big.element_size() == 2 and HALO_INPUT_GRAD_PACKED
    x, y = (out, big) if transposed else (big, out)
    args = {names[0]: big, "z_ptr": z, "span_w_ptr": span_weight, "span_b_ptr": span_bias, names[1]: out,
            "H": x.shape[2], "W": x.shape[3], "Ho": y.shape[2], "Wo": y.shape[3], "G": G, "CG": C // G, "R": R,
            **_strides(names[2], big), **_strides("szb szr szh szw", z), **_strides("sso ssr", span_weight),
            "ssb": span_bias.stride(0) if span_bias is not None else 0, **_strides(names[3], out),
            "PH": padding[0], "PW": padding[1], "TILES": tiles_h * tiles_w, "TILES_W": tiles_w}
    warps = HALO_WARPS["bwd_input" if transposed else "fwd"]
    return Launch(kernel, (B * tiles_h * tiles_w, 1, 1), args, meta, warps, _halo_stages(kernel, big),
                  loops=(G,), sm90_max_registers=_halo_register_cap(big, transposed, C // G))


# The forward fits one warpgroup (its [pixels, halo] window is then staged for the dot once, not
# once per warpgroup: a third fewer L1 bytes and tensor-core instructions, PREDICTED), and so do dz
# and dspan by pairs of pixel rows. At 4 warps ptxas spills the input gradient (weights over a
# 256-pixel halo), the tile-wide dz (8 or 32 channels a group, fp32 at 8-192 bytes) and the
# tile-wide dspan in NCHW: they keep two warpgroups.
HALO_WARPS = {"fwd": 4, "bwd_input": 8, "bwd_z": 8, "bwd_z_pairs": 4, "bwd_span": 8, "bwd_span_pairs": 4}
# The input gradient takes 130-150 registers a thread on sm_90: one eight-warp program an SM. Capped
# at 128, two fit, and triton 3.6's ptxas (the GPU machines') keeps it without a spill there
# (PREDICTED, R1-layer dx bf16 NHWC/NCHW 10.9/10.1% -> 21.6/19.4%); newer ptxas spill it (8-32
# bytes of stack), and sm_80 compiles it uncapped. dz would gain as much but spills on 3.6 too, as
# does the fp32 input gradient (196-230 registers: 160 bytes of stack at 128), which stays uncapped.
HALO_INPUT_GRAD_SM90_REGISTERS = 128 if TRITON_VERSION <= (3, 6) else 0
# The 16-bit input gradient's two gathers move pairs of weights in 32-bit words (halo._spread_packed):
# with triton 3.6, 661 instructions a warp per group where 780 moved one 16-bit value each (fewer
# shuffles and byte permutes), PREDICTED (sm_90, R1-layer dx bf16 NHWC/NCHW) 21.6/19.4% ->
# 22.9/20.9%, now as L1-bound as latency-bound; newer tritons lower the packed gathers to more
# integer work (triton 3.9: 11.1% -> 10.5%) and keep the plain ones.
HALO_INPUT_GRAD_PACKED = TRITON_VERSION <= (3, 6)
# The forward takes 134 registers a thread on sm_90 with triton 3.6 (16-bit, channels_last, two
# stages): three one-warpgroup programs an SM. Capped at 128, four fit without a spill there at 16
# channels a group (RedNet's; PREDICTED, R1-layer fwd bf16 NHWC 37.2% -> 48.6%); a sweep of K 3-7
# found 24-416 bytes of stack at 8 and 32 channels (K 5-7), and newer ptxas spill it at 16 too.
HALO_FORWARD_SM90_REGISTERS = 128 if TRITON_VERSION <= (3, 6) else 0
# Both caps hold at 16 channels a group only: the AOT catalogue's 8- and 32-channel layers (K 5
# and 7) found the capped input gradient spilling too (16-80 bytes on sm_90, channels_last).
HALO_CAPPED_CHANNELS = 16
# fp32 (tf32) forwards by pairs spill in most places (8-232 bytes: 8 channels a group on triton 3.6,
# 32 on newer ptxas) and keep the tile-wide kernel; on newer ptxas that one spills at 8 channels
# a group (24 bytes at K = 5, sm_90), where the pairs compile clean at K 3-7 in both layouts.
FP32_PAIRS_CHANNELS = 8 if TRITON_VERSION > (3, 6) else 0


def _halo_register_cap(big: torch.Tensor, transposed: bool, channels_per_group: int) -> int:
    """The sm_90 register cap of the forward (``big`` = x) or input gradient (``big`` = dy)."""
    if big.element_size() != 2 or channels_per_group != HALO_CAPPED_CHANNELS:
        return 0
    return HALO_INPUT_GRAD_SM90_REGISTERS if transposed else HALO_FORWARD_SM90_REGISTERS


def forward_by_pairs(x: torch.Tensor, channels_per_group: int) -> bool:
    """Whether the halo forward builds its window per pair of pixel rows: in 16 bits always; in fp32
    (tf32) only at FP32_PAIRS_CHANNELS, where the tile-wide kernel spills and the pairs do not."""
    return x.element_size() == 2 or channels_per_group == FP32_PAIRS_CHANNELS


def _halo_stages(kernel, big: torch.Tensor) -> int:
    """Two stages for the forward by pairs (the next group's halo and span weights copied while this
    one's products run), but on 16-bit NCHW: its 2-byte halo loads cannot be asynchronous copies, and
    a second stage only holds registers (PREDICTED, triton 3.6, R1-layer fwd bf16 NHWC 38.7% ->
    48.6%; bf16 NCHW 31.1% -> 22.7%). The other halo kernels keep one."""
    if kernel is not halo.fused_fwd_halo_pairs_kernel:
        return 1
    return 1 if big.element_size() == 2 and not is_channels_last(big) else 2


# dz by pairs of pixel rows fits one warpgroup in 16-bit at 16 channels a group (at two stages
# 184-188 registers, no stack at K 3-7 on sm_80/sm_90, both tritons); at 8 and 32 channels ptxas
# spills it (8-120 bytes, K 5-7), and in fp32 at 16 too (8-40 bytes). Three stages (the next two
# groups' dy, x and span weights in flight) compile clean there too (107-193 registers) and hide
# the round trip two did not: PREDICTED (sm_90, R1-layer dz bf16 NHWC) triton 3.6 28.0% -> 40.5%,
# triton 3.9 28.6% -> 39.0%.
DZ_PAIRS_CHANNELS = 16
DZ_PAIRS_STAGES = 3


def _dz_by_pairs(x: torch.Tensor, channels_per_group: int) -> bool:
    """Whether dz takes the pairs kernel: 16-bit channels_last at DZ_PAIRS_CHANNELS. On 16-bit NCHW
    its 2-byte loads of the pairs' overlapping halos cost more than they save (R1-layer dz bf16 NCHW
    28.8% -> 24.7%, PREDICTED, triton 3.6), and in fp32 (tf32) ptxas spills it at K 5-7."""
    return channels_per_group == DZ_PAIRS_CHANNELS and x.element_size() == 2 and is_channels_last(x)


# dspan by pairs of pixel rows (one warpgroup) compiles clean at K 3-7 on sm_80/sm_90 with both
# tritons on channels_last (fp32 at two stages) and on 16-bit NCHW up to SPAN_PAIRS_NCHW_CHANNELS a
# group (at 32, newer ptxas stack 112 bytes at K = 3); fp32 NCHW spills it (RedNet's layer: 40
# bytes on sm_80, triton 3.6). Those keep the tile-wide kernel. 16-bit channels_last takes three
# stages (the next tiles' dy, x and z copied while this one's products run) up to
# SPAN_PAIRS_STAGED_CHANNELS a group: above, sm_80 spills them (8-16 bytes at K = 5: 32 channels on
# triton 3.6, 16 on newer), and one stage it is. PREDICTED (sm_90, triton 3.6, R1-layer dspan): bf16
# NHWC/NCHW 17.9/10.7% -> 37.3/16.0%, fp32 NHWC 19.8% -> 22.6%.
SPAN_PAIRS_NCHW_CHANNELS = 16
SPAN_PAIRS_STAGED_CHANNELS = 16 if TRITON_VERSION <= (3, 6) else 8


def _span_grad_by_pairs(x: torch.Tensor, channels_per_group: int) -> bool:
    """Whether dspan takes the pairs kernel: on channels_last, and on 16-bit NCHW up to
    SPAN_PAIRS_NCHW_CHANNELS a group."""
    if is_channels_last(x):
        return True
    return x.element_size() == 2 and channels_per_group <= SPAN_PAIRS_NCHW_CHANNELS


def _span_pairs_stages(x: torch.Tensor, channels_per_group: int) -> int:
    if not is_channels_last(x):
        return 1  # its 2-byte loads cannot be asynchronous copies: a stage more only holds registers
    if x.element_size() != 2:
        return 2
    return 3 if channels_per_group <= SPAN_PAIRS_STAGED_CHANNELS else 1


def backward_input_launch(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation, config=None) -> Launch:
    if not cacheable(dy):
        return _backward_input_launch(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation, config)
    key = ("involution_fused_bwd_input", layout(dy), layout(z), layout(span_weight), layout(span_bias), layout(dx),
           K, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("dy_ptr", "z_ptr", "span_w_ptr", "span_b_ptr", "dx_ptr"), (dy, z, span_weight, span_bias, dx),
                   lambda: _backward_input_launch(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation,
                                                  config))


def _backward_input_launch(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation, config=None) -> Launch:
    B, C, H, W = dx.shape
    R = z.shape[1]
    G = span_weight.shape[0] // (K * K)
    Ho, Wo = dy.shape[2], dy.shape[3]
    if config is None and takes_halo_path(dy, G, R, K, stride, dilation, True):
        return _halo_launch(halo.fused_bwd_input_halo_kernel, dy, z, span_weight, span_bias, dx, K, stride, padding,
                            dilation, ("dy_ptr", "dx_ptr", "sdyb sdyc sdyh sdyw", "sdxb sdxc sdxh sdxw"))
    config = _config("bwd_input", dy, G, K, R, stride, H, W, config)
    meta, num_warps, num_stages = _common_meta(config, dy, uses_dot("bwd_input", config, dy.dtype),
                                               dy, z, span_weight, span_bias, dx)
    tiles_w = cdiv(W, meta["BLOCK_W"])
    tiles_pix = cdiv(H, meta["BLOCK_H"]) * tiles_w
    cg_tiles = cdiv(C // G, meta["BLOCK_CG"])
    args = dict(
        dy_ptr=dy, z_ptr=z, span_w_ptr=span_weight, span_b_ptr=span_bias, dx_ptr=dx,
        C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K, R=R,
        **_strides("sdyb sdyc sdyh sdyw", dy), **_strides("szb szr szh szw", z),
        **_strides("sso ssr", span_weight), ssb=span_bias.stride(0) if span_bias is not None else 0,
        **_strides("sdxb sdxc sdxh sdxw", dx),
        **_geometry_args(stride, padding, dilation),
        TILES_PIX=tiles_pix, TILES_W=tiles_w, CG_TILES=cg_tiles,
    )
    meta.update(ONE_R_CHUNK=R <= meta["BLOCK_R"], HAS_BIAS=span_bias is not None)
    r_steps = () if meta["ONE_R_CHUNK"] else (cdiv(R, meta["BLOCK_R"]),)
    return Launch(fused_bwd_input_kernel, _channel_grid(B, G, tiles_pix, meta["BLOCK_G"], cg_tiles), args, meta,
                  num_warps, num_stages,
                  loops=((K * K, r_steps) if r_steps else K * K,))


def backward_z_launch(dy, x, span_weight, dz, K, stride, padding, dilation, config=None) -> Launch:
    if not cacheable(x):
        return _backward_z_launch(dy, x, span_weight, dz, K, stride, padding, dilation, config)
    key = ("involution_fused_bwd_z", layout(dy), layout(x), layout(span_weight), layout(dz), K, *stride, *padding,
           *dilation, config_key(config))
    return planned(key, ("dy_ptr", "x_ptr", "span_w_ptr", "dz_ptr"), (dy, x, span_weight, dz),
                   lambda: _backward_z_launch(dy, x, span_weight, dz, K, stride, padding, dilation, config))


def _backward_z_launch(dy, x, span_weight, dz, K, stride, padding, dilation, config=None) -> Launch:
    B, C, H, W = x.shape
    R = dz.shape[1]
    G = span_weight.shape[0] // (K * K)
    Ho, Wo = dy.shape[2], dy.shape[3]
    if config is None and takes_halo_path(x, G, R, K, stride, dilation, False):
        meta, tiles_h, tiles_w = _halo_grad_meta(x, C, G, K, R, stride, dilation, Ho, Wo, dy, x, dz)
        args = dict(dy_ptr=dy, x_ptr=x, span_w_ptr=span_weight, dz_ptr=dz, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=C // G,
                    R=R, **_strides("sdyb sdyc sdyh sdyw", dy), **_strides("sxb sxc sxh sxw", x),
                    **_strides("sso ssr", span_weight), **_strides("sdzb sdzr sdzh sdzw", dz),
                    PH=padding[0], PW=padding[1], TILES=tiles_h * tiles_w, TILES_W=tiles_w)
        if not _dz_by_pairs(x, C // G):
            return Launch(halo.fused_bwd_z_halo_kernel, (B * tiles_h * tiles_w, 1, 1), args, meta,
                          HALO_WARPS["bwd_z"], 1, loops=(G,))
        _by_pairs(meta, K, stride, dilation)
        meta["PACKED"] = x.element_size() == 2
        return Launch(halo.fused_bwd_z_halo_pairs_kernel, (B * tiles_h * tiles_w, 1, 1), args, meta,
                      HALO_WARPS["bwd_z_pairs"], DZ_PAIRS_STAGES, loops=(G,))
    config = _config("bwd_z", x, G, K, R, stride, Ho, Wo, config)
    meta, num_warps, num_stages = _common_meta(config, x, uses_dot("bwd_z", config, x.dtype), dy, x, span_weight, dz)
    tiles_w = cdiv(Wo, meta["BLOCK_W"])
    tiles_pix = cdiv(Ho, meta["BLOCK_H"]) * tiles_w
    r_tiles = cdiv(R, meta["BLOCK_R"])
    if r_tiles > 65535:
        raise ValueError(f"too many R blocks for the grid ({r_tiles}); use a larger BLOCK_R")
    args = dict(
        dy_ptr=dy, x_ptr=x, span_w_ptr=span_weight, dz_ptr=dz,
        C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K, R=R,
        **_strides("sdyb sdyc sdyh sdyw", dy), **_strides("sxb sxc sxh sxw", x),
        **_strides("sso ssr", span_weight), **_strides("sdzb sdzr sdzh sdzw", dz),
        **_geometry_args(stride, padding, dilation),
        TILES_PIX=tiles_pix, TILES_W=tiles_w,
    )
    meta.update(ONE_G_BLOCK=G <= meta["BLOCK_G"], ONE_CG_CHUNK=C // G <= meta["BLOCK_CG"])
    taps = (K * K, (cdiv(C // G, meta["BLOCK_CG"]),)) if not meta["ONE_CG_CHUNK"] else K * K
    loops = (taps,) if meta["ONE_G_BLOCK"] else ((cdiv(G, meta["BLOCK_G"]), (taps,)),)
    return Launch(fused_bwd_z_kernel, (B * tiles_pix, r_tiles, 1), args, meta, num_warps, num_stages, loops=loops)


def span_grad_slabs(B: int, Ho: int, Wo: int, K: int, G: int, R: int, config: dict) -> tuple[int, int]:
    """(slabs, tiles per slab) of the span-gradient reduction: its partials have ``slabs`` rows."""
    total = B * cdiv(Ho, config["BLOCK_H"]) * cdiv(Wo, config["BLOCK_W"])
    if config.get("HALO"):
        # A halo program covers every tap and R: one per (group, slab).
        slabs = max(1, min(total, 65535, cdiv(SPAN_GRAD_PROGRAMS // 2, G)))
        per_slab = cdiv(total, slabs)
        return cdiv(total, per_slab), per_slab
    per_slab_programs = K * K * cdiv(G, config["BLOCK_G"]) * cdiv(R, config["BLOCK_R"])
    slabs = max(1, min(total, 65535, cdiv(SPAN_GRAD_PROGRAMS, per_slab_programs)))
    per_slab = cdiv(total, slabs)
    return cdiv(total, per_slab), per_slab


def span_grad_config(x, G, K, R, stride, Ho, Wo, config=None, dilation=(1, 1)) -> dict:
    """The span-gradient kernel's config; ``{"HALO": True, ...}`` for the halo kernel."""
    if config is None and takes_halo_path(x, G, R, K, stride, dilation, False):
        return dict(HALO=True, BLOCK_H=halo.TILE_H, BLOCK_W=halo.TILE_W)
    return _config("bwd_span", x, G, K, R, stride, Ho, Wo, config)


def backward_span_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation,
                         config=None) -> Launch:
    """``dspan_partials`` (slabs, K²G, R) and ``dbias_partials`` (slabs, K²G), accumulator dtype."""
    if not cacheable(x):
        return _backward_span_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation, config)
    key = ("involution_fused_bwd_span", layout(dy), layout(x), layout(z), layout(dspan_partials),
           layout(dbias_partials), K, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("dy_ptr", "x_ptr", "z_ptr", "dspan_ptr", "dbias_ptr"),
                   (dy, x, z, dspan_partials, dbias_partials),
                   lambda: _backward_span_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding,
                                                 dilation, config))


def _backward_span_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation,
                          config=None) -> Launch:
    B, C, H, W = x.shape
    R = z.shape[1]
    G = dspan_partials.shape[1] // (K * K)
    Ho, Wo = dy.shape[2], dy.shape[3]
    config = span_grad_config(x, G, K, R, stride, Ho, Wo, config, dilation)
    if config.get("HALO"):
        return _backward_span_halo_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation,
                                          config)
    meta, num_warps, num_stages = _common_meta(config, x, uses_dot("bwd_span", config, x.dtype),
                                               dy, x, z, dspan_partials, dbias_partials)
    tiles_w = cdiv(Wo, meta["BLOCK_W"])
    tiles_pix = cdiv(Ho, meta["BLOCK_H"]) * tiles_w
    slabs, per_slab = span_grad_slabs(B, Ho, Wo, K, G, R, config)
    if dspan_partials.shape[0] != slabs:
        raise ValueError(f"span-gradient partials need {slabs} slabs, got {dspan_partials.shape[0]}")
    g_tiles = cdiv(G, meta["BLOCK_G"])
    r_tiles = cdiv(R, meta["BLOCK_R"])
    args = dict(
        dy_ptr=dy, x_ptr=x, z_ptr=z, dspan_ptr=dspan_partials, dbias_ptr=dbias_partials,
        C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K, R=R,
        **_strides("sdyb sdyc sdyh sdyw", dy), **_strides("sxb sxc sxh sxw", x),
        **_strides("szb szr szh szw", z), **_strides("sps spo spr", dspan_partials),
        **_strides("sbs sbo", dbias_partials), **_geometry_args(stride, padding, dilation),
        TILES_PIX=tiles_pix, TILES_W=tiles_w, TOTAL_TILES=B * tiles_pix, TILES_PER_SLAB=per_slab,
        G_TILES=g_tiles,
    )
    meta.update(ONE_CG_CHUNK=C // G <= meta["BLOCK_CG"])
    if r_tiles > 65535:
        raise ValueError(f"too many R blocks for the grid ({r_tiles}); use a larger BLOCK_R")
    tiles = cdiv(B * tiles_pix, slabs)  # per program: the slabs' mean
    loops = ((tiles, (cdiv(C // G, meta["BLOCK_CG"]),)) if not meta["ONE_CG_CHUNK"] else tiles,)
    return Launch(fused_bwd_span_kernel, (K * K * g_tiles, r_tiles, slabs), args, meta, num_warps, num_stages,
                  loops=loops)


def _backward_span_halo_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation,
                               config) -> Launch:
    B, C, H, W = x.shape
    R = z.shape[1]
    G = dspan_partials.shape[1] // (K * K)
    Ho, Wo = dy.shape[2], dy.shape[3]
    slabs, per_slab = span_grad_slabs(B, Ho, Wo, K, G, R, config)
    if dspan_partials.shape[0] != slabs:
        raise ValueError(f"span-gradient partials need {slabs} slabs, got {dspan_partials.shape[0]}")
    meta, tiles_h, tiles_w = _halo_grad_meta(x, C, G, K, R, stride, dilation, Ho, Wo,
                                             dy, x, z, dspan_partials, dbias_partials)
    tiles = tiles_h * tiles_w
    args = dict(dy_ptr=dy, x_ptr=x, z_ptr=z, dspan_ptr=dspan_partials, dbias_ptr=dbias_partials,
                H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=C // G, R=R,
                **_strides("sdyb sdyc sdyh sdyw", dy), **_strides("sxb sxc sxh sxw", x),
                **_strides("szb szr szh szw", z), **_strides("sps spo spr", dspan_partials),
                **_strides("sbs sbo", dbias_partials), PH=padding[0], PW=padding[1], TILES=tiles, TILES_W=tiles_w,
                TOTAL_TILES=B * tiles, TILES_PER_SLAB=per_slab)
    if G > 65535:
        raise ValueError(f"too many groups for the grid ({G})")
    loops = (cdiv(B * tiles, slabs),)
    if not _span_grad_by_pairs(x, C // G):
        return Launch(halo.fused_bwd_span_halo_kernel, (G, slabs, 1), args, meta, HALO_WARPS["bwd_span"], 1,
                      loops=loops)
    _by_pairs(meta, K, stride, dilation)
    meta["PACKED"] = x.element_size() == 2
    return Launch(halo.fused_bwd_span_halo_pairs_kernel, (G, slabs, 1), args, meta, HALO_WARPS["bwd_span_pairs"],
                  _span_pairs_stages(x, C // G), loops=loops)


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated.
# --------------------------------------------------------------------------------------------

def forward_copies_input(x, span_weight, R, K, stride, dilation, config=None) -> bool:
    """Whether the forward on NCHW ``x`` reads a channels_last copy of it (``kernels/layout.py``):
    16-bit x on the halo kernel, whose pairs of pixel rows read overlapping halos, loaded 2 bytes at
    a time and without asynchronous copies in NCHW. PREDICTED (sm_90, R1-layer fwd bf16 NCHW, the
    copy counted, 24 of 109 us): triton 3.6 31.1% -> 34.6%, triton 3.9 15.4% -> 26.2%. fp32 takes
    the tile-wide forward and reads x as it is."""
    return _reads_channels_last_copies(x, span_weight.shape[0] // (K * K), R, K, stride, dilation, config)


def _reads_channels_last_copies(x, G, R, K, stride, dilation, config) -> bool:
    """16-bit NCHW ``x`` on the halo path (the default config): the pairs kernels read channels_last copies."""
    return (config is None and x.element_size() == 2 and not is_channels_last(x)
            and takes_halo_path(x, G, R, K, stride, dilation, False))


def span_grad_copies_inputs(x, G, R, K, stride, dilation, config=None) -> bool:
    """Whether the span-weight gradient on NCHW ``x`` reads channels_last copies of x and z: 16-bit
    x on the halo path, where the pairs kernel otherwise loads the pairs' overlapping halos 2 bytes
    at a time (dy stays as it is: a copy of it saves less than it costs). PREDICTED (sm_90, triton
    3.6, R1-layer dspan bf16 NCHW, the copies counted: 30 of 162 us): 16.0% -> 23.2%."""
    return _reads_channels_last_copies(x, G, R, K, stride, dilation, config)


def involution_fused_forward(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config=None) -> None:
    if forward_copies_input(x, span_weight, z.shape[1], K, stride, dilation, config):
        x = channels_last_copy(x)
    forward_launch(x, z, span_weight, span_bias, y, K, stride, padding, dilation, config)()


def involution_fused_backward_input(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation,
                                    config=None) -> None:
    backward_input_launch(dy, z, span_weight, span_bias, dx, K, stride, padding, dilation, config)()


def involution_fused_backward_z(dy, x, span_weight, dz, K, stride, padding, dilation, config=None) -> None:
    backward_z_launch(dy, x, span_weight, dz, K, stride, padding, dilation, config)()


def involution_fused_backward_span(dy, x, z, dspan, dbias, K, stride, padding, dilation, config=None) -> None:
    """``dspan`` (K²G, R) and ``dbias`` (K²G,) or None, from per-slab partials summed in slab order."""
    B, R = x.shape[0], z.shape[1]
    O = dspan.shape[0]
    G = O // (K * K)
    Ho, Wo = dy.shape[2], dy.shape[3]
    copies = span_grad_copies_inputs(x, G, R, K, stride, dilation, config)
    config = span_grad_config(x, G, K, R, stride, Ho, Wo, config, dilation)
    slabs, _ = span_grad_slabs(B, Ho, Wo, K, G, R, config)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dspan_partials = torch.empty((slabs, O, R), dtype=acc, device=x.device)
    dbias_partials = torch.empty((slabs, O), dtype=acc, device=x.device)
    if copies:
        x = channels_last_copy(x)
        z = z if is_channels_last(z) else channels_last_copy(z)
    backward_span_launch(dy, x, z, dspan_partials, dbias_partials, K, stride, padding, dilation, config)()
    dspan.copy_(dspan_partials.sum(0))
    if dbias is not None:
        dbias.copy_(dbias_partials.sum(0))


def catalogue() -> list[Launch]:
    """The launches the fused op makes by default at representative shapes, on meta tensors."""
    launches = []
    shapes = [  # (B, C, H, W, K, G, R, stride, label)
        (32, 256, 56, 56, 7, 16, 64, 1, "R1 fused involution"),
        (32, 128, 56, 56, 7, 128, 32, 1, "R3 fused depth-wise per-pixel"),
        (8, 64, 31, 31, 3, 4, 16, 2, "fused stride 2, odd H"),
        # Where a sweep found spills by pairs or under the forward's cap: 8 and 32 channels a group.
        (4, 64, 28, 28, 5, 8, 32, 1, "fused 8 channels a group"),
        (4, 128, 28, 28, 7, 4, 32, 1, "fused 32 channels a group"),
    ]
    # fp32 with torch's tf32 switch on (the halo kernels, where they apply; the per-tap kernels are
    # the same either way) and off.
    variants = [(torch.float32, True), (torch.float32, False), (torch.float16, True), (torch.bfloat16, True)]
    for B, C, H, W, K, G, R, s, label in shapes:
        for dtype, tf32 in variants:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                p = (K - 1) // 2
                Ho = (H + 2 * p - (K - 1) - 1) // s + 1
                Wo = (W + 2 * p - (K - 1) - 1) // s + 1
                meta = dict(dtype=dtype, device="meta")
                x = torch.empty((B, C, H, W), **meta).to(memory_format=fmt)
                y = torch.empty((B, C, Ho, Wo), **meta).to(memory_format=fmt)
                z = torch.empty((B, R, Ho, Wo), **meta).to(memory_format=fmt)
                span_w = torch.empty((K * K * G, R), **meta)
                span_b = torch.empty((K * K * G,), **meta)
                geometry = ((s, s), (p, p), (1, 1))
                tag = f"{label} {dtype}{'' if tf32 else ' tf32 off'} {'NHWC' if channels_last else 'NCHW'}"
                with conv_tf32(tf32):
                    cfg = span_grad_config(x, G, K, R, (s, s), Ho, Wo)
                    slabs, _ = span_grad_slabs(B, Ho, Wo, K, G, R, cfg)
                    partials = torch.empty((slabs, K * K * G, R), dtype=torch.float32, device="meta")
                    bias_partials = torch.empty((slabs, K * K * G), dtype=torch.float32, device="meta")
                    # The op's forward reads x's channels_last copy where it makes one.
                    x_read = (channels_last_empty(x, "meta")
                              if forward_copies_input(x, span_w, R, K, (s, s), (1, 1)) else x)
                    # and the span-weight gradient copies of x and z.
                    span_read = ((channels_last_empty(x, "meta"), channels_last_empty(z, "meta"))
                                 if span_grad_copies_inputs(x, G, R, K, (s, s), (1, 1)) else (x, z))
                    built = (forward_launch(x_read, z, span_w, span_b, y, K, *geometry),
                             backward_input_launch(y, z, span_w, span_b, x, K, *geometry),
                             backward_z_launch(y, x, span_w, z, K, *geometry),
                             backward_span_launch(y, *span_read, partials, bias_partials, K, *geometry))
                if dtype == torch.float32 and tf32:
                    built = [launch for launch in built if "_halo_" in launch.name]
                for launch in built:
                    launch.label = tag
                    launches.append(launch)
    # Over 2^31 elements: the int64-offset variants. Depth-wise groups loop over group blocks in
    # the dz kernel; two 128-channel groups loop over channel chunks, and R = 256 over R blocks.
    for C, G, R in ((256, 256, 64), (256, 2, 256)):
        B, H, W, K = 2304, 64, 64, 3
        meta = dict(dtype=torch.bfloat16, device="meta")
        x = torch.empty((B, C, H, W), **meta)
        z = torch.empty((B, R, H, W), **meta)
        span_w = torch.empty((K * K * G, R), **meta)
        span_b = torch.empty((K * K * G,), **meta)
        geometry = ((1, 1), (1, 1), (1, 1))
        slabs, _ = span_grad_slabs(B, H, W, K, G, R, span_grad_config(x, G, K, R, (1, 1), H, W))
        partials = torch.empty((slabs, K * K * G, R), dtype=torch.float32, device="meta")
        bias_partials = torch.empty((slabs, K * K * G), dtype=torch.float32, device="meta")
        for launch in (forward_launch(x, z, span_w, span_b, x, K, *geometry),
                       backward_input_launch(x, z, span_w, span_b, x, K, *geometry),
                       backward_z_launch(x, x, span_w, z, K, *geometry),
                       backward_span_launch(x, x, z, partials, bias_partials, K, *geometry)):
            assert launch.meta["INDEX_64"]
            launch.label = f"over 2^31 elements G={G} R={R} torch.bfloat16 NCHW"
            launches.append(launch)
    return launches
