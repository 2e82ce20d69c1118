"""Fused involution on tensor cores: 2-D pixel tiles with a halo, as fused neighbourhood attention.

One program owns an ``BLOCK_H x BLOCK_W`` tile of pixels (64) of one sample and walks every group.
Per group both products are ``tl.dot``s with M = the tile's pixels:

* the span product ``w[p, k] = Σ_r z[p, r] · S[g·K²+k, r]`` ([P, R] @ [R, KK]): the tile's
  generated weights for all K² taps at once (KK = K² padded to a power of two; the padding columns
  are zero, since S and β are loaded masked);
* the window product. A pixel's neighbourhood lies in the halo of input pixels (rows PITCH_W
  apart, a power of two). ``A[p, q]`` is pixel p's weight for halo pixel q, the tap linking
  them, or zero when q lies outside p's window; ``y[p, c] = A[p, :] @ x_halo[:, c]``. The weights
  are generated as [P, KP, KP] (taps padded per row, KP > K) and spread into A in two gathers of
  short axes (tap row to halo row, tap column to halo column, a zero padding tap where none links
  them): cheaper than one gather along the whole halo, which triton lowers to a shuffle per
  candidate. The index tables depend on the geometry only and are built once for all groups. The
  16-bit forward takes the window per pair of pixel rows (a pair's halo rows, not the tile's: half
  the elements to spread) in a batched dot, and so do its dz at 16 channels a group and dspan (but
  16-bit NCHW above 16 channels); fp32 (tf32) forwards and the input gradient take the whole
  tile's halo (BLOCK_Q): by pairs, fp32's windows spill.

The window product does ``Q / K²`` times the useful multiply-adds (128 / 49 for the pairs at K = 7,
256 / 49 for the tile's halo on an 8 x 8 tile), on tensor cores at 12 (bf16) or 6 (tf32) times the
CUDA cores' rate, and every x element is loaded once per program (by pairs: once per pair that
reads it, from L1), not once per tap.

The input gradient is the same window product turned around: a tile of dx's pixels, the halo of
output pixels that read them, the weights generated at the halo (``[Q, R] @ [R, KP²]``) and spread
over the tile's pixels in the same two short gathers, ``Aᵀ[q, p] = w[q, tap(q, p)]``, then
``dx = (Aᵀ)ᵀ @ dy_halo``. The weight gradients start from
``D[p, q] = Σ_{c∈g} dy[p, c] · x_halo[q, c]`` (the dot of attention logits) and pick each
pixel's K² taps out of it: ``dW[p, k] = D[p, q(p, k)]``. From dW, ``dz += dW @ S_g`` (a program
per tile walks the groups) and ``dS_g += dWᵀ @ z`` (a program per group walks a fixed slab of
tiles and writes one partial: no atomics, deterministic).

Generated weights and dW enter the dots in the input dtype (as the unfused path rounds its
materialised weights); fp32 inputs come here only while torch allows tf32 in convs, and both products
run in plain tf32 (a tf32x3 forward needs more shared memory than an SM has). K, stride and
dilation are compile-time constants here: they size the halo.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._indexing import widen

TILE_H = 8
TILE_W = 8
# The largest padded halo the kernels take (the tap table is [pixels, BLOCK_Q] int32, live across
# the group loop); larger kernels or strides take the per-tap kernels.
MAX_BLOCK_Q = 256


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def halo_extent(K: int, stride: int, dilation: int, tile: int, transposed: bool) -> int:
    """Halo rows (or columns) of a ``tile``-pixel tile: the input window of an output tile, or
    (``transposed``, for dx) the output pixels whose windows reach an input tile."""
    if transposed:
        return (tile - 1 + (K - 1) * dilation) // stride + 2
    return (tile - 1) * stride + (K - 1) * dilation + 1


def halo_meta(K: int, stride, dilation, transposed: bool) -> dict:
    hh = halo_extent(K, stride[0], dilation[0], TILE_H, transposed)
    hw = halo_extent(K, stride[1], dilation[1], TILE_W, transposed)
    # Halo rows are PITCH_W apart, a power of two, so the halo axis reshapes to [rows, PITCH_W].
    return dict(BLOCK_H=TILE_H, BLOCK_W=TILE_W, HALO_H=hh, HALO_W=hw, PITCH_W=_pow2(hw),
                BLOCK_Q=_pow2(hh) * _pow2(hw), BLOCK_KK=_pow2(K * K + 1))


def pair_meta(K: int, stride, dilation) -> dict:
    """The halo of a pair of pixel rows (the forward and dz kernels): the halo rows a pair reads
    (PAIR_ROWS, padded to KPR), as many columns as the tile's halo (HALO_W, padded to PITCH_W)."""
    rows = stride[0] + (K - 1) * dilation[0] + 1
    meta = halo_meta(K, stride, dilation, False)
    return dict(BLOCK_H=meta["BLOCK_H"], BLOCK_W=meta["BLOCK_W"], HALO_W=meta["HALO_W"], PITCH_W=meta["PITCH_W"],
                PAIR_ROWS=rows, KPR=_pow2(rows))


@triton.jit
def _tile_pixels(tile, TILES_W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    h0 = (tile // TILES_W) * BLOCK_H
    w0 = (tile % TILES_W) * BLOCK_W
    return h0, w0, h0 + p // BLOCK_W, w0 + p % BLOCK_W


@triton.jit
def _halo_pixels(h_first, w_first, HALO_H: tl.constexpr, HALO_W: tl.constexpr, PITCH_W: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    q = tl.arange(0, BLOCK_Q)
    return h_first + q // PITCH_W, w_first + q % PITCH_W, (q // PITCH_W < HALO_H) & (q % PITCH_W < HALO_W)


@triton.jit
def _pair_halos(x_sample, h_first, w_first, H, W, sxh, sxw, SH: tl.constexpr, PAIRS: tl.constexpr,
                PAIR_ROWS: tl.constexpr, KPR: tl.constexpr, HALO_W: tl.constexpr, PITCH_W: tl.constexpr,
                INDEX_64: tl.constexpr):
    """Pointers to each pair's halo ([PAIRS, KPR·PITCH_W]: pair i's rows from h_first + 2i·SH) and
    whether each lies in x (off the image, or in the padding, it reads zero)."""
    pr = tl.arange(0, PAIRS)
    q = tl.arange(0, KPR * PITCH_W)
    ih = h_first + (2 * pr * SH)[:, None] + (q // PITCH_W)[None, :]
    iw = w_first + (q % PITCH_W)[None, :] + pr[:, None] * 0
    ok = ((q // PITCH_W < PAIR_ROWS) & (q % PITCH_W < HALO_W))[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return x_sample + widen(ih * sxh + iw * sxw, INDEX_64), ok


@triton.jit
def _tap_of(offset, D: tl.constexpr, K: tl.constexpr, inside=None):
    """The tap (row or column) through which a pixel reads the halo element ``offset`` past its
    first (a multiple of the dilation D below K * D, and ``inside``), else K: the zero tap."""
    is_tap = (offset >= 0) & (offset % D == 0) & (offset < K * D)
    if inside is not None:
        is_tap = is_tap & inside
    return tl.where(is_tap, tl.maximum(offset, 0) // D, K)


@triton.jit
def fused_fwd_halo_kernel(
    x_ptr, z_ptr, span_w_ptr, span_b_ptr, y_ptr,
    H, W, Ho, Wo, G, CG, R,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sso, ssr, ssb,
    syb, syc, syh, syw,
    PH, PW, TILES, TILES_W,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    PITCH_W: tl.constexpr, BLOCK_Q: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y[b, g·CG+c, p] = Σ_q A_g[p, q] · x[b, g·CG+c, q] over the whole tile's input halo (the fp32
    forward: by pairs of pixel rows its tf32 windows spill at 8 and 32 channels a group). The
    weights are generated as [pixels, KP, KP] (taps padded per row to KP > K, so row and column K
    are zero) and spread into the window in two gathers of a short axis: tap column to halo
    column, then tap row to halo row."""
    P: tl.constexpr = BLOCK_H * BLOCK_W
    ROWS: tl.constexpr = BLOCK_Q // PITCH_W
    pid = tl.program_id(0)
    b = widen(pid // TILES, INDEX_64)
    h0, w0, oh, ow = _tile_pixels(pid % TILES, TILES_W, BLOCK_H, BLOCK_W)
    out_ok = (oh < Ho) & (ow < Wo)
    ih, iw, q_ok = _halo_pixels(h0 * SH - PH, w0 * SW - PW, HALO_H, HALO_W, PITCH_W, BLOCK_Q)
    in_ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    # Tap column of (pixel, halo column), tap row of (pixel, halo row); K (a zero column/row) for none.
    p = tl.arange(0, P)
    t = tl.arange(0, PITCH_W)
    dcol = t[None, :] - (p % BLOCK_W)[:, None] * SW
    col_tap = _tap_of(dcol, DW, K, (t < HALO_W)[None, :])
    rr = tl.arange(0, ROWS)
    drow = rr[None, :] - (p // BLOCK_W)[:, None] * SH
    row_tap = _tap_of(drow, DH, K, (rr < HALO_H)[None, :])
    col_pick = col_tap[:, None, :] + tl.zeros((P, KP, PITCH_W), dtype=tl.int32)
    row_pick = row_tap[:, :, None] + tl.zeros((P, ROWS, PITCH_W), dtype=tl.int32)

    r = tl.arange(0, BLOCK_R)
    z = tl.load(z_ptr + b * szb + widen(oh * szh + ow * szw, INDEX_64)[:, None] + r[None, :] * szr,
                mask=out_ok[:, None] & (r < R)[None, :], other=0.0)
    tp = tl.arange(0, KP * KP)
    tap_ok = (tp // KP < K) & (tp % KP < K)
    c = tl.arange(0, BLOCK_CG)
    c_ok = c < CG
    x_halo = x_ptr + b * sxb + widen(ih * sxh + iw * sxw, INDEX_64)[:, None]
    y_tile = y_ptr + b * syb + widen(oh * syh + ow * syw, INDEX_64)[:, None]
    for g in range(G):
        rows = widen(g * (K * K) + (tp // KP) * K + tp % KP, INDEX_64)
        span_t = tl.load(span_w_ptr + rows[None, :] * sso + r[:, None] * ssr,
                         mask=(r < R)[:, None] & tap_ok[None, :], other=0.0)
        # Both of a group's loads before its first dot: issued after it, the halo's load waited a
        # second round trip each group (PREDICTED, triton 3.6, R1-layer fwd bf16 NHWC 24% -> 29%).
        channel = widen(g * CG + c, INDEX_64)
        xv = tl.load(x_halo + channel[None, :] * sxc, mask=in_ok[:, None] & c_ok[None, :], other=0.0)
        weight = tl.dot(z, span_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [P, KP²]
        if HAS_BIAS:
            weight += tl.load(span_b_ptr + rows * ssb, mask=tap_ok, other=0.0).to(ACC_DTYPE)[None, :]
        by_col = tl.gather(tl.reshape(weight.to(xv.dtype), (P, KP, KP)), col_pick, 2)  # [P, KP, PITCH_W]
        window = tl.reshape(tl.gather(by_col, row_pick, 1), (P, BLOCK_Q))
        out = tl.dot(window, xv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(y_tile + channel[None, :] * syc, out.to(y_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & c_ok[None, :])


@triton.jit
def fused_fwd_halo_pairs_kernel(
    x_ptr, z_ptr, span_w_ptr, span_b_ptr, y_ptr,
    H, W, Ho, Wo, G, CG, R,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sso, ssr, ssb,
    syb, syc, syh, syw,
    PH, PW, TILES, TILES_W,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIR_ROWS: tl.constexpr, KPR: tl.constexpr,
    HALO_W: tl.constexpr, PITCH_W: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y[b, g·CG+c, p] = Σ_q A_g[p, q] · x[b, g·CG+c, q], one window product per pair of the tile's
    pixel rows. Pair i (its 2·BLOCK_W pixels, M) reads the PAIR_ROWS halo rows from (h0 + 2i)·SH - PH
    (padded to KPR) by PITCH_W columns, so its window is [M, KPR·PITCH_W]: half the tile-wide
    window's elements, since a pair's rows span SH + (K-1)·DH + 1 halo rows, not the tile's
    (BLOCK_H-1)·SH + (K-1)·DH + 1. The weights are generated as [pixels, KP, KP] (taps padded per row to
    KP > K: row and column K are zero) and spread in two gathers of a short axis: tap row to pair
    row (a shift by the pixel's row in its pair), then tap column to halo column. The window
    product is a batched dot over the pairs (mma.sync; the pairs' halos overlap and are loaded per
    pair, from L1). Gathering the whole tile's [64, 256] window cost 820 instructions a warp per
    group and the pairs' 540 (PREDICTED, triton 3.6, R1-layer fwd bf16 NHWC)."""
    P: tl.constexpr = BLOCK_H * BLOCK_W
    PAIRS: tl.constexpr = BLOCK_H // 2
    M: tl.constexpr = 2 * BLOCK_W
    Q: tl.constexpr = KPR * PITCH_W
    pid = tl.program_id(0)
    b = widen(pid // TILES, INDEX_64)
    h0, w0, oh, ow = _tile_pixels(pid % TILES, TILES_W, BLOCK_H, BLOCK_W)
    out_ok = (oh < Ho) & (ow < Wo)
    m = tl.arange(0, M)
    rr = tl.arange(0, KPR)
    drow = rr[None, :] - (m // BLOCK_W)[:, None] * SH
    row_tap = _tap_of(drow, DH, K)  # [M, KPR]
    t = tl.arange(0, PITCH_W)
    dcol = t[None, :] - (m % BLOCK_W)[:, None] * SW
    col_tap = _tap_of(dcol, DW, K, (t < HALO_W)[None, :])  # [M, PITCH_W]
    row_pick = row_tap[None, :, :, None] + tl.zeros((PAIRS, M, KPR, KP), dtype=tl.int32)
    col_pick = col_tap[None, :, None, :] + tl.zeros((PAIRS, M, KPR, PITCH_W), dtype=tl.int32)

    r = tl.arange(0, BLOCK_R)
    z = tl.load(z_ptr + b * szb + widen(oh * szh + ow * szw, INDEX_64)[:, None] + r[None, :] * szr,
                mask=out_ok[:, None] & (r < R)[None, :], other=0.0)
    tp = tl.arange(0, KP * KP)
    tap_ok = (tp // KP < K) & (tp % KP < K)
    c = tl.arange(0, BLOCK_CG)
    c_ok = c < CG
    # Pair i's halo: rows (h0 + 2i)·SH - PH + u', columns w0·SW - PW + qw.
    x_halo, in_ok = _pair_halos(x_ptr + b * sxb, h0 * SH - PH, w0 * SW - PW, H, W, sxh, sxw, SH, PAIRS, PAIR_ROWS,
                                KPR, HALO_W, PITCH_W, INDEX_64)
    x_halo = x_halo[:, :, None]
    y_tile = y_ptr + b * syb + widen(oh * syh + ow * syw, INDEX_64)[:, None]
    tap_rows = (tp // KP) * K + tp % KP
    if HAS_BIAS:
        bias_next = tl.load(span_b_ptr + widen(tap_rows, INDEX_64) * ssb, mask=tap_ok, other=0.0)
    for g in range(G):
        rows = widen(g * (K * K) + tap_rows, INDEX_64)
        span_t = tl.load(span_w_ptr + rows[None, :] * sso + r[:, None] * ssr,
                         mask=(r < R)[:, None] & tap_ok[None, :], other=0.0)
        channel = widen(g * CG + c, INDEX_64)
        xv = tl.load(x_halo + channel[None, None, :] * sxc, mask=in_ok[:, :, None] & c_ok[None, None, :], other=0.0)
        weight = tl.dot(z, span_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [P, KP²]
        if HAS_BIAS:
            weight += bias_next.to(ACC_DTYPE)[None, :]
            # The next group's, loaded here: a 2-byte load the pipeline does not stage, it cost a round trip a group.
            bias_next = tl.load(span_b_ptr + (rows + K * K) * ssb, mask=tap_ok & (tp * 0 + g + 1 < G), other=0.0)
        by_row = tl.gather(tl.reshape(weight.to(xv.dtype), (PAIRS, M, KP, KP)), row_pick, 2)  # [PAIRS, M, KPR, KP]
        window = tl.reshape(tl.gather(by_row, col_pick, 3), (PAIRS, M, Q))
        out = tl.dot(window, xv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [PAIRS, M, BLOCK_CG]
        out = tl.reshape(out, (P, BLOCK_CG))
        tl.store(y_tile + channel[None, :] * syc, out.to(y_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & c_ok[None, :])


@triton.jit
def _pack16(lo, hi):
    """Two 16-bit tensors as one of 32-bit words, ``lo`` in the low half."""
    return lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _half(word, odd, dtype: tl.constexpr):
    """The high half of each 32-bit ``word`` where ``odd`` (1), else the low half, as ``dtype``."""
    return ((word >> (odd * 16).to(tl.uint32)) & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)


@triton.jit
def _spread_packed(weight, row_tap, col_tap, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                   KP: tl.constexpr):
    """Aᵀ[q, p] = weight[q, tap(q, p)] for 16-bit weights [Q, KP²] (the input gradient's window),
    both gathers on 32-bit words holding a pair of tap columns: tap row to tile row (the index
    holds for both of a word's columns), then each pixel's word by its tap column's half, and the
    half picked by a shift. A 16-bit gather packs and unpacks each value it shuffles."""
    lo, hi = tl.split(tl.reshape(weight, (BLOCK_Q, KP, KP // 2, 2)))
    by_row = tl.gather(_pack16(lo, hi), row_tap[:, :, None] + tl.zeros((BLOCK_Q, BLOCK_H, KP // 2), dtype=tl.int32),
                       1)  # [Q, BLOCK_H, KP / 2]: tap columns in pairs
    word = tl.gather(by_row, (col_tap // 2)[:, None, :] + tl.zeros((BLOCK_Q, BLOCK_H, BLOCK_W), dtype=tl.int32), 2)
    return tl.reshape(_half(word, (col_tap % 2)[:, None, :], weight.dtype), (BLOCK_Q, BLOCK_H * BLOCK_W))


@triton.jit
def fused_bwd_input_halo_kernel(
    dy_ptr, z_ptr, span_w_ptr, span_b_ptr, dx_ptr,
    H, W, Ho, Wo, G, CG, R,
    sdyb, sdyc, sdyh, sdyw,
    szb, szr, szh, szw,
    sso, ssr, ssb,
    sdxb, sdxc, sdxh, sdxw,
    PH, PW, TILES, TILES_W,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    PITCH_W: tl.constexpr, BLOCK_Q: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PACKED: tl.constexpr,
):
    """dx[b, g·CG+c, p] = Σ_q w_g[q, tap(q, p)] · dy[b, g·CG+c, q] over the output pixels q whose
    windows reach the tile. The forward's window turned around: the weights are generated at the
    halo as [halo, KP, KP] and spread over the tile's pixels in the same two short gathers (tap
    column to tile column, tap row to tile row), giving Aᵀ[q, p]; then ``dx = Aᵀᵀ @ dy_halo``.
    Tap row and column depend on one axis each, so the index tables are [halo, BLOCK_W] and
    [halo, BLOCK_H], broadcast in the loop. PACKED (16-bit): the gathers move pairs of weights in
    32-bit words (:func:`_spread_packed`)."""
    P: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    b = widen(pid // TILES, INDEX_64)
    h0, w0, ih, iw = _tile_pixels(pid % TILES, TILES_W, BLOCK_H, BLOCK_W)
    in_ok = (ih < H) & (iw < W)
    # The first output row (column) whose window reaches the tile: floor((h0 + PH - (K-1)·DH) / SH),
    # shifted to a non-negative numerator so integer division floors on every backend.
    reach_h: tl.constexpr = (K - 1) * DH
    reach_w: tl.constexpr = (K - 1) * DW
    oh_first = (h0 + PH - reach_h + reach_h * SH) // SH - reach_h
    ow_first = (w0 + PW - reach_w + reach_w * SW) // SW - reach_w
    oh, ow, q_ok = _halo_pixels(oh_first, ow_first, HALO_H, HALO_W, PITCH_W, BLOCK_Q)
    # Halo pixels off the image or past the halo read dy as zero: their weights need no mask.
    out_ok = q_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
    q = tl.arange(0, BLOCK_Q)
    # Tap column of (halo pixel, tile column), tap row of (halo pixel, tile row); K (zero) for none.
    dcol = (w0 + PW - ow_first * SW) + tl.arange(0, BLOCK_W)[None, :] - (q % PITCH_W)[:, None] * SW
    col_tap = _tap_of(dcol, DW, K)
    drow = (h0 + PH - oh_first * SH) + tl.arange(0, BLOCK_H)[None, :] - (q // PITCH_W)[:, None] * SH
    row_tap = _tap_of(drow, DH, K)

    r = tl.arange(0, BLOCK_R)
    z = tl.load(z_ptr + b * szb + widen(oh * szh + ow * szw, INDEX_64)[:, None] + r[None, :] * szr,
                mask=out_ok[:, None] & (r < R)[None, :], other=0.0)
    tp = tl.arange(0, KP * KP)
    tap_ok = (tp // KP < K) & (tp % KP < K)
    c = tl.arange(0, BLOCK_CG)
    c_ok = c < CG
    dy_halo = dy_ptr + b * sdyb + widen(oh * sdyh + ow * sdyw, INDEX_64)[:, None]
    dx_tile = dx_ptr + b * sdxb + widen(ih * sdxh + iw * sdxw, INDEX_64)[:, None]
    for g in range(G):
        rows = widen(g * (K * K) + (tp // KP) * K + tp % KP, INDEX_64)
        span_t = tl.load(span_w_ptr + rows[None, :] * sso + r[:, None] * ssr,
                         mask=(r < R)[:, None] & tap_ok[None, :], other=0.0)
        # Both of a group's loads before its first dot (see the forward).
        channel = widen(g * CG + c, INDEX_64)
        grad = tl.load(dy_halo + channel[None, :] * sdyc, mask=out_ok[:, None] & c_ok[None, :], other=0.0)
        weight = tl.dot(z, span_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [Q, KP²]
        if HAS_BIAS:
            weight += tl.load(span_b_ptr + rows * ssb, mask=tap_ok, other=0.0).to(ACC_DTYPE)[None, :]
        if PACKED:
            window_t = _spread_packed(weight.to(grad.dtype), row_tap, col_tap, BLOCK_Q, BLOCK_H, BLOCK_W, KP)
        else:
            col_pick = col_tap[:, None, :] + tl.zeros((BLOCK_Q, KP, BLOCK_W), dtype=tl.int32)
            row_pick = row_tap[:, :, None] + tl.zeros((BLOCK_Q, BLOCK_H, BLOCK_W), dtype=tl.int32)
            by_col = tl.gather(tl.reshape(weight.to(grad.dtype), (BLOCK_Q, KP, KP)), col_pick, 2)  # [Q, KP, BLOCK_W]
            window_t = tl.reshape(tl.gather(by_col, row_pick, 1), (BLOCK_Q, P))
        out = tl.dot(tl.trans(window_t), grad, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(dx_tile + channel[None, :] * sdxc, out.to(dx_ptr.dtype.element_ty),
                 mask=in_ok[:, None] & c_ok[None, :])


@triton.jit
def _tap_grad_weights_t(dy_ptr, x_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw, oh, ow, out_ok, ih, iw,
                        in_ok, pick_rows, pick_cols, PITCH_W: tl.constexpr, BLOCK_Q: tl.constexpr,
                        KP: tl.constexpr, BLOCK_CG: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``dWᵀ[u·KP+v, p] = Σ_{c∈g} x[(ph+u, pw+v), c] · dy[p, c]`` ([KP², P], KP = K padded to a
    power of two): the logits ``x_halo @ dyᵀ`` of the halo against the tile, each pixel's taps
    picked out of them in two gathers of a short axis (halo row, then column) rather than one
    along the whole halo."""
    c = tl.arange(0, BLOCK_CG)
    channel = widen(g * CG + c, INDEX_64)
    c_ok = c < CG
    grad_t = tl.load(dy_ptr + b * sdyb + widen(oh * sdyh + ow * sdyw, INDEX_64)[None, :] + channel[:, None] * sdyc,
                     mask=out_ok[None, :] & c_ok[:, None], other=0.0)
    xv = tl.load(x_ptr + b * sxb + widen(ih * sxh + iw * sxw, INDEX_64)[:, None] + channel[None, :] * sxc,
                 mask=in_ok[:, None] & c_ok[None, :], other=0.0)
    # Rounded to the input dtype before the picks (half the shared-memory traffic): the dots take dW
    # in that dtype anyway, as the unfused path materialises it.
    logits_t = tl.dot(xv, grad_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE).to(xv.dtype)  # [Q, P]
    P: tl.constexpr = logits_t.shape[1]
    rows = tl.gather(tl.reshape(logits_t, (BLOCK_Q // PITCH_W, PITCH_W, P)), pick_rows, 0)  # [KP, PITCH_W, P]
    return tl.reshape(tl.gather(rows, pick_cols, 1), (KP * KP, P))


@triton.jit
def _halo_picks(K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
                PITCH_W: tl.constexpr, KP: tl.constexpr):
    """Index tensors of the two picks: the halo row of (tap row u, pixel p) as [KP, PITCH_W, P],
    the halo column of (u, tap column v, p) as [KP, KP, P]; padding taps clamp into the halo."""
    P: tl.constexpr = BLOCK_H * BLOCK_W
    t = tl.arange(0, KP)
    ph = tl.arange(0, P) // BLOCK_W
    pw = tl.arange(0, P) % BLOCK_W
    row = tl.minimum(ph[None, None, :] * SH + t[:, None, None] * DH, HALO_H - 1)
    col = tl.minimum(pw[None, None, :] * SW + t[None, :, None] * DW, HALO_W - 1)
    zero = tl.zeros((KP, PITCH_W, P), dtype=tl.int32)
    return row + zero, col + tl.zeros((KP, KP, P), dtype=tl.int32)


@triton.jit
def _padded_taps(K: tl.constexpr, KP: tl.constexpr):
    """Tap u·K+v of padded tap u·KP+v, and whether it is one (u, v < K)."""
    t = tl.arange(0, KP * KP)
    u = t // KP
    v = t % KP
    return u * K + v, (u < K) & (v < K)


@triton.jit
def _store_span_partials(dspan_ptr, dbias_ptr, dspan, dbias, g, slab, r, R, sps, spo, spr, sbs, sbo,
                         K: tl.constexpr, KP: tl.constexpr, INDEX_64: tl.constexpr):
    """Group g's slab partials of dS ([KP * KP, BLOCK_R], padded taps) and dβ, at rows g·K² + k."""
    tap, tap_ok = _padded_taps(K, KP)
    rows = widen(g * (K * K) + tap, INDEX_64)
    slab = widen(slab, INDEX_64)
    tl.store(dspan_ptr + slab * sps + rows[:, None] * spo + r[None, :] * spr, dspan,
             mask=tap_ok[:, None] & (r < R)[None, :])
    tl.store(dbias_ptr + slab * sbs + rows * sbo, dbias, mask=tap_ok)


@triton.jit
def fused_bwd_z_halo_kernel(
    dy_ptr, x_ptr, span_w_ptr, dz_ptr,
    H, W, Ho, Wo, G, CG, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sso, ssr,
    sdzb, sdzr, sdzh, sdzw,
    PH, PW, TILES, TILES_W,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    PITCH_W: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    KP: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dz[b, r, p] = Σ_g dW_g[p, :] @ S_g[:, r]: a program per tile walks every group and alone
    writes its dz."""
    pid = tl.program_id(0)
    b = widen(pid // TILES, INDEX_64)
    h0, w0, oh, ow = _tile_pixels(pid % TILES, TILES_W, BLOCK_H, BLOCK_W)
    out_ok = (oh < Ho) & (ow < Wo)
    ih, iw, q_ok = _halo_pixels(h0 * SH - PH, w0 * SW - PW, HALO_H, HALO_W, PITCH_W, BLOCK_Q)
    in_ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pick_rows, pick_cols = _halo_picks(K, SH, SW, DH, DW, BLOCK_H, BLOCK_W, HALO_H, HALO_W, PITCH_W, KP)
    tap, tap_ok = _padded_taps(K, KP)
    r = tl.arange(0, BLOCK_R)
    dz_t = tl.zeros((BLOCK_R, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE)
    for g in range(G):
        # Loaded before the logits' dot, with dy and x: after it, its round trip came on top.
        rows = widen(g * (K * K) + tap, INDEX_64)
        span_t = tl.load(span_w_ptr + rows[None, :] * sso + r[:, None] * ssr,
                         mask=tap_ok[None, :] & (r < R)[:, None], other=0.0)
        dw_t = _tap_grad_weights_t(dy_ptr, x_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw, oh, ow,
                                   out_ok, ih, iw, in_ok, pick_rows, pick_cols, PITCH_W, BLOCK_Q, KP, BLOCK_CG,
                                   DOT_PRECISION, INDEX_64, ACC_DTYPE)
        dz_t += tl.dot(span_t, dw_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dz_off = b * sdzb + widen(oh * sdzh + ow * sdzw, INDEX_64)[None, :] + widen(r, INDEX_64)[:, None] * sdzr
    tl.store(dz_ptr + dz_off, dz_t.to(dz_ptr.dtype.element_ty), mask=out_ok[None, :] & (r < R)[:, None])


@triton.jit
def fused_bwd_span_halo_kernel(
    dy_ptr, x_ptr, z_ptr, dspan_ptr, dbias_ptr,
    H, W, Ho, Wo, G, CG, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sps, spo, spr,
    sbs, sbo,
    PH, PW, TILES, TILES_W, TOTAL_TILES, TILES_PER_SLAB,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    PITCH_W: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    KP: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Per-slab partials of dS[g·K²+k, r] = Σ_{b,p} dW_g[p, k] · z[b, r, p] and dβ = Σ_{b,p} dW_g.

    Program (group, slab) walks the slab's (sample, tile) pairs in order, every tap at once, and
    writes its partial once: no atomics, a fixed summation order.
    """
    g = tl.program_id(0)
    slab = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    dspan = tl.zeros((KP * KP, BLOCK_R), dtype=ACC_DTYPE)
    dbias = tl.zeros((KP * KP,), dtype=ACC_DTYPE)
    pick_rows, pick_cols = _halo_picks(K, SH, SW, DH, DW, BLOCK_H, BLOCK_W, HALO_H, HALO_W, PITCH_W, KP)
    first = slab * TILES_PER_SLAB
    for t in range(first, tl.minimum(first + TILES_PER_SLAB, TOTAL_TILES)):
        b = widen(t // TILES, INDEX_64)
        h0, w0, oh, ow = _tile_pixels(t % TILES, TILES_W, BLOCK_H, BLOCK_W)
        out_ok = (oh < Ho) & (ow < Wo)
        ih, iw, q_ok = _halo_pixels(h0 * SH - PH, w0 * SW - PW, HALO_H, HALO_W, PITCH_W, BLOCK_Q)
        in_ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # Loaded before the logits' dot, with dy and x: after it, its round trip came on top.
        zv = tl.load(z_ptr + b * szb + widen(oh * szh + ow * szw, INDEX_64)[:, None] + r[None, :] * szr,
                     mask=out_ok[:, None] & (r < R)[None, :], other=0.0)
        dw_t = _tap_grad_weights_t(dy_ptr, x_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw, oh, ow,
                                   out_ok, ih, iw, in_ok, pick_rows, pick_cols, PITCH_W, BLOCK_Q, KP, BLOCK_CG,
                                   DOT_PRECISION, INDEX_64, ACC_DTYPE)
        dspan += tl.dot(dw_t, zv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dbias += tl.sum(dw_t.to(ACC_DTYPE), axis=1)
    _store_span_partials(dspan_ptr, dbias_ptr, dspan, dbias, g, slab, r, R, sps, spo, spr, sbs, sbo, K, KP, INDEX_64)


@triton.jit
def _pair_picks(SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr, KPR: tl.constexpr, HALO_W: tl.constexpr, PITCH_W: tl.constexpr,
                KP: tl.constexpr, PACKED: tl.constexpr):
    """Index tensors of :func:`_pair_grad_weights`' two picks: the pair row of (pixel, tap row) as
    [PAIRS, M, KP, PITCH_W] (PACKED: PITCH_W / 2, a word per pair of columns), the halo column of
    (pixel, tap column) as [PAIRS, M, KP, KP]; padding taps clamp into the halo."""
    PAIRS: tl.constexpr = BLOCK_H // 2
    M: tl.constexpr = 2 * BLOCK_W
    m = tl.arange(0, M)
    t = tl.arange(0, KP)
    rows = tl.minimum((m // BLOCK_W)[:, None, None] * SH + t[None, :, None] * DH, KPR - 1)  # [M, KP, 1]
    cols = tl.minimum((m % BLOCK_W)[:, None, None] * SW + t[None, None, :] * DW, HALO_W - 1)  # [M, 1, KP]
    WORDS: tl.constexpr = PITCH_W // 2 if PACKED else PITCH_W
    return (rows[None, :, :, :] + tl.zeros((PAIRS, M, KP, WORDS), dtype=tl.int32),
            cols[None, :, :, :] + tl.zeros((PAIRS, M, KP, KP), dtype=tl.int32))


@triton.jit
def _pair_grad_weights(dy_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxc, oh, ow, out_ok, x_pairs, in_ok,
                       pick_rows, pick_cols, PAIRS: tl.constexpr, M: tl.constexpr, KPR: tl.constexpr,
                       PITCH_W: tl.constexpr, KP: tl.constexpr, BLOCK_CG: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       PACKED: tl.constexpr):
    """``dW[i·M+m, u·KP+v] = Σ_{c∈g} dy[pixel m of pair i, c] · x_i[(r·SH + u·DH, pw·SW + v·DW), c]``
    ([P, KP²], x_i pair i's halo, r and pw the pixel's row in its pair and its column): each pair's logits
    ``dy_pair @ x_pairᵀ`` ([M, KPR·PITCH_W], a batched dot) with the pixel's taps picked out in two
    gathers of a short axis (pair row, then column), as the forward spreads them. PACKED (16-bit):
    both gathers on 32-bit words holding a pair of halo columns, the column's half then picked by
    a shift (as :func:`_spread_packed`)."""
    c = tl.arange(0, BLOCK_CG)
    channel = widen(g * CG + c, INDEX_64)
    c_ok = c < CG
    grad = tl.load(dy_ptr + b * sdyb + widen(oh * sdyh + ow * sdyw, INDEX_64)[:, None] + channel[None, :] * sdyc,
                   mask=out_ok[:, None] & c_ok[None, :], other=0.0)
    xv_t = tl.load(x_pairs + channel[None, :, None] * sxc, mask=in_ok[:, None, :] & c_ok[None, :, None], other=0.0)
    logits = tl.dot(tl.reshape(grad, (PAIRS, M, BLOCK_CG)), xv_t, input_precision=DOT_PRECISION,
                    out_dtype=ACC_DTYPE).to(grad.dtype)  # [PAIRS, M, KPR·PITCH_W]
    if PACKED:
        lo, hi = tl.split(tl.reshape(logits, (PAIRS, M, KPR, PITCH_W // 2, 2)))
        rows = tl.gather(_pack16(lo, hi), pick_rows, 2)  # [PAIRS, M, KP, PITCH_W / 2]
        dw = _half(tl.gather(rows, pick_cols // 2, 3), pick_cols % 2, logits.dtype)
    else:
        rows = tl.gather(tl.reshape(logits, (PAIRS, M, KPR, PITCH_W)), pick_rows, 2)  # [PAIRS, M, KP, PITCH_W]
        dw = tl.gather(rows, pick_cols, 3)
    return tl.reshape(dw, (PAIRS * M, KP * KP))


@triton.jit
def fused_bwd_z_halo_pairs_kernel(
    dy_ptr, x_ptr, span_w_ptr, dz_ptr,
    H, W, Ho, Wo, G, CG, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sso, ssr,
    sdzb, sdzr, sdzh, sdzw,
    PH, PW, TILES, TILES_W,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIR_ROWS: tl.constexpr, KPR: tl.constexpr,
    HALO_W: tl.constexpr, PITCH_W: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, PACKED: tl.constexpr,
):
    """dz[b, r, p] = Σ_g dW_g[p, :] @ S_g[:, r] with dW_g by pairs of pixel rows
    (:func:`_pair_grad_weights`): half the logits of the tile-wide kernel, one warpgroup, and the
    group loop in three stages; 16-bit channels_last at 16 channels a group (involution_fused.
    _dz_by_pairs). PREDICTED (sm_90, triton 3.6, R1-layer dz bf16 NHWC): 16.2% -> 43.4%."""
    P: tl.constexpr = BLOCK_H * BLOCK_W
    PAIRS: tl.constexpr = BLOCK_H // 2
    M: tl.constexpr = 2 * BLOCK_W
    pid = tl.program_id(0)
    b = widen(pid // TILES, INDEX_64)
    h0, w0, oh, ow = _tile_pixels(pid % TILES, TILES_W, BLOCK_H, BLOCK_W)
    out_ok = (oh < Ho) & (ow < Wo)
    pick_rows, pick_cols = _pair_picks(SH, SW, DH, DW, BLOCK_H, BLOCK_W, KPR, HALO_W, PITCH_W, KP, PACKED)
    x_pairs, in_ok = _pair_halos(x_ptr + b * sxb, h0 * SH - PH, w0 * SW - PW, H, W, sxh, sxw, SH, PAIRS, PAIR_ROWS,
                                 KPR, HALO_W, PITCH_W, INDEX_64)
    x_pairs = x_pairs[:, None, :]  # [PAIRS, 1, Q]
    tap, tap_ok = _padded_taps(K, KP)
    r = tl.arange(0, BLOCK_R)
    dz = tl.zeros((P, BLOCK_R), dtype=ACC_DTYPE)
    for g in range(G):
        rows = widen(g * (K * K) + tap, INDEX_64)
        span = tl.load(span_w_ptr + rows[:, None] * sso + r[None, :] * ssr,
                       mask=tap_ok[:, None] & (r < R)[None, :], other=0.0)
        dw = _pair_grad_weights(dy_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxc, oh, ow, out_ok, x_pairs, in_ok,
                                pick_rows, pick_cols, PAIRS, M, KPR, PITCH_W, KP, BLOCK_CG, DOT_PRECISION, INDEX_64,
                                ACC_DTYPE, PACKED)
        dz += tl.dot(dw, span, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dz_off = b * sdzb + widen(oh * sdzh + ow * sdzw, INDEX_64)[:, None] + widen(r, INDEX_64)[None, :] * sdzr
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=out_ok[:, None] & (r < R)[None, :])


@triton.jit
def fused_bwd_span_halo_pairs_kernel(
    dy_ptr, x_ptr, z_ptr, dspan_ptr, dbias_ptr,
    H, W, Ho, Wo, G, CG, R,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    szb, szr, szh, szw,
    sps, spo, spr,
    sbs, sbo,
    PH, PW, TILES, TILES_W, TOTAL_TILES, TILES_PER_SLAB,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIR_ROWS: tl.constexpr, KPR: tl.constexpr,
    HALO_W: tl.constexpr, PITCH_W: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, PACKED: tl.constexpr,
):
    """Per-slab partials of dS and dβ as :func:`fused_bwd_span_halo_kernel`, with dW_g by pairs of
    pixel rows (:func:`_pair_grad_weights`, as dz takes it): half the logits, one warpgroup, and on
    channels_last the tile loop in stages (involution_fused._span_pairs_stages). PREDICTED (sm_90,
    triton 3.6, R1-layer dspan bf16 NHWC): 17.9% -> 37.3%."""
    PAIRS: tl.constexpr = BLOCK_H // 2
    M: tl.constexpr = 2 * BLOCK_W
    g = tl.program_id(0)
    slab = tl.program_id(1)
    pick_rows, pick_cols = _pair_picks(SH, SW, DH, DW, BLOCK_H, BLOCK_W, KPR, HALO_W, PITCH_W, KP, PACKED)
    r = tl.arange(0, BLOCK_R)
    dspan = tl.zeros((KP * KP, BLOCK_R), dtype=ACC_DTYPE)
    dbias = tl.zeros((KP * KP,), dtype=ACC_DTYPE)
    first = slab * TILES_PER_SLAB
    for t in range(first, tl.minimum(first + TILES_PER_SLAB, TOTAL_TILES)):
        b = widen(t // TILES, INDEX_64)
        h0, w0, oh, ow = _tile_pixels(t % TILES, TILES_W, BLOCK_H, BLOCK_W)
        out_ok = (oh < Ho) & (ow < Wo)
        x_pairs, in_ok = _pair_halos(x_ptr + b * sxb, h0 * SH - PH, w0 * SW - PW, H, W, sxh, sxw, SH, PAIRS,
                                     PAIR_ROWS, KPR, HALO_W, PITCH_W, INDEX_64)
        zv = tl.load(z_ptr + b * szb + widen(oh * szh + ow * szw, INDEX_64)[:, None] + r[None, :] * szr,
                     mask=out_ok[:, None] & (r < R)[None, :], other=0.0)
        dw = _pair_grad_weights(dy_ptr, b, g, CG, sdyb, sdyc, sdyh, sdyw, sxc, oh, ow, out_ok, x_pairs[:, None, :],
                                in_ok, pick_rows, pick_cols, PAIRS, M, KPR, PITCH_W, KP, BLOCK_CG, DOT_PRECISION,
                                INDEX_64, ACC_DTYPE, PACKED)
        dspan += tl.dot(tl.trans(dw), zv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dbias += tl.sum(dw.to(ACC_DTYPE), axis=0)
    _store_span_partials(dspan_ptr, dbias_ptr, dspan, dbias, g, slab, r, R, sps, spo, spr, sbs, sbo, K, KP, INDEX_64)
