"""NCHW per-pixel involution kernels (weights ``(B, G, K, K, Ho, Wo)``): forward, input gradient by
stride phase, weight gradient.

Every program owns one (sample, group, chunk of CH channels of the group) and a strip of STRIP rows
of BLOCK_W pixels. Its tensors are 1-D over the BLOCK_W pixels, one pixel per lane, so the lanes
lie along W (the contiguous axis) whatever the compiler infers; the CH channels and the STRIP rows
are tuples of such tensors, held in each thread's registers. Rows, channels and the tap rows are
unrolled (the kernel size, strides and dilations are compile-time constants), the tap columns a
run-time loop (unrolled too, ptxas takes minutes). So:

* a per-pixel weight is loaded once and serves the CH channels of its group;
* an input row is loaded once per tap column and serves every (strip row, tap row) pair reading it;
* row offsets and masks are scalars shared by the program, only the column offset is per lane;
* loads go out in batches (halo rows, or chunks of channels) behind a fence (_fence): ptxas issues
  each load just before its first use, which made every halo row a memory round trip of its own.

bf16 with even widths and strides takes the pair variants of ``involution_nchw_pairs.py`` (launched
from here): two adjacent pixels per lane, read as int32 pairs of bf16, for the forward (K <=
PAIRS_MAX_K), the input gradient at stride 1 (see dx_pairs) and the weight gradient (column stride
1, even groups, K >= 5: see dw_pairs).

The generic kernels of ``kernels/involution.py`` remain the fallback for what these do not cover
(K > MAX_K, channels_last, per-sample weights). Kernels here know nothing of autograd.
"""
from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

import torch

from ._fence import fence as _fence
from ._launch import TRITON_VERSION, Launch, cdiv, inner_strides, is_channels_last
from ._nchw_lanes import _lanes, _row_group_shifts, _wide
from .configs import get_config
from .involution_nchw_pairs import (involution_nchw_bwd_input_pairs_kernel, involution_nchw_bwd_weight_pairs_kernel,
                                    involution_nchw_fwd_pairs_kernel)

# Kernel sizes these kernels unroll; larger K takes the generic run-time tap loop.
MAX_K = 13
# Tap columns the pair forward and input gradient read per loaded halo row. Four load 3 words per
# 4 taps where pairs of taps load 2 per 2; triton 3.6's ptxas (12.8, the GPU machines') keeps them
# in registers, but the sm_90 ptxas of newer tritons (CUDA 13's, triton 3.9) hoists the group's
# loads past 255 registers and spills at any tile, so they take pairs.
PAIR_TAP_GROUP = 4 if TRITON_VERSION <= (3, 6) else 2
# Whether the input gradient takes its pair kernel at all. Triton 3.6's ptxas compiles it without
# spills at every tile its launcher picks; with the sm_90 ptxas of newer tritons it spills at some
# (8 channels a group at K = 5, 16 at K = 11, with pairs of taps), and no smaller tile found both
# clean and faster than the single-pixel kernel, so they keep that one.
DX_PAIRS = TRITON_VERSION <= (3, 6)
# Kernel sizes the forward and input-gradient pair kernels take. With triton 3.6 a run-time loop over
# their groups of tap columns (K >= 8) makes ptxas 12.8 spill hundreds of values at every chunk of
# channels (K = 9, 11; sm_80 and sm_90), where K <= 7 compiles clean; larger K takes the
# single-pixel kernels.
PAIRS_MAX_K = 7
# Halo rows the pair forward and input gradient load as one batch before a fence (see _fence); 0:
# the whole halo, no fence. Triton 3.6's ptxas issues each row's loads just before its sums (a round
# trip a row) and keeps 4 rows (forward; the input gradient's weights: 3) in registers at the pair
# tiles; newer tritons' hoists the loads itself, and a fence there costs more than it saves
# (R1 forward, PREDICTED: 3.6 20% -> 72% at 4 rows; 3.9 63% unfenced, 57% at 2 rows).
PAIR_ROWS_AHEAD = {"fwd": 4, "dx": 3} if TRITON_VERSION <= (3, 6) else {"fwd": 0, "dx": 0}
# Channel chunks the single-pixel weight gradient loads as one batch at most, and the 32-bit words
# its sums and a batch's dy and x may hold: four chunks of two channels at K = 7 (209 words) fill
# sm_90's 255 registers; at 232 (8 rows, triton 3.9) sm_80 spilled.
DW_BATCH = 4
DW_HELD_WORDS = 210


@triton.jit
def _channel_row(ptr, mask, sc: tl.constexpr, CH: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 MASKED: tl.constexpr = True):
    """One row of CH channels (``ptr`` at the first, channel stride ``sc``) as a tuple in ACC_DTYPE,
    zero where ``mask`` is off (MASKED; else read unmasked): the within-sample stride is a
    compile-time constant, so each channel's address is an immediate offset."""
    values = ()
    for q in tl.static_range(CH):
        if MASKED:
            values = values + (tl.load(ptr + q * sc, mask=mask, other=0.0).to(ACC_DTYPE),)
        else:
            values = values + (tl.load(ptr + q * sc).to(ACC_DTYPE),)
    return values


@triton.jit
def involution_nchw_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    B, H, W, Ho, Wo, G, CG,
    sxb, swb, swg, sbb, sbc, syb,
    PH, PW, ROW_TILES, CHUNKS,
    sxc: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
    swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr, sww: tl.constexpr,
    syc: tl.constexpr, syh: tl.constexpr, syw: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y[b,c,i,j] = bias[b,c] + sum_{u,v} w[b,g,u,v,i,j] * x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW].

    Strip row s reads input row (first row) + s*SH + u*DH through tap u: the HALO rows of a tap
    column are loaded once each and serve every (s, u) that reads them.
    """
    b, g, c0, i0, j = _lanes(ROW_TILES, Wo, G, CHUNKS, CG, CH, STRIP, BLOCK_W, INDEX_64)
    j_ok = b < B
    x_chunk = x_ptr + (b * sxb + c0 * sxc)
    w_pixels = w_ptr + b * swb + g * swg + i0 * swh + j * sww
    row_first = i0 * SH - PH
    col_first = j * SW - PW
    HALO: tl.constexpr = (STRIP - 1) * SH + (KS - 1) * DH + 1
    accs = ()
    for _ in tl.static_range(STRIP * CH):
        accs = accs + (tl.zeros((BLOCK_W,), dtype=ACC_DTYPE),)
    for v in range(KS):
        col = col_first + v * DW
        col_ok = (col >= 0) & (col < W) & j_ok  # j_ok: lanes past the last sample read nothing
        x_col = x_chunk + col * sxw
        w_col = w_pixels + _wide(v, INDEX_64) * swv
        x_halo = x_col + row_first * sxh
        for h in tl.static_range(HALO):
            row = row_first + h
            ok = col_ok & (row >= 0) & (row < H)
            xs = _channel_row(x_halo + h * sxh, ok, sxc, CH, ACC_DTYPE)
            new = ()
            for s in tl.static_range(STRIP):
                # Strip row s reads halo row h through tap row u = (h - s*SH) / DH when that is a tap.
                weight = None
                if h >= s * SH:
                    if (h - s * SH) % DH == 0:
                        if (h - s * SH) // DH < KS:
                            weight = tl.load(w_col + ((h - s * SH) // DH * swu + s * swh),
                                             mask=j_ok & (i0 + s < Ho), other=0.0).to(ACC_DTYPE)
                for q in tl.static_range(CH):
                    if weight is not None:
                        new = new + (accs[s * CH + q] + weight * xs[q],)
                    else:
                        new = new + (accs[s * CH + q],)
            accs = new
    y_chunk = y_ptr + b * syb + c0 * syc + i0 * syh + j * syw
    for s in tl.static_range(STRIP):
        for q in tl.static_range(CH):
            acc = accs[s * CH + q]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + b * sbb + (c0 + q) * sbc).to(ACC_DTYPE)
            tl.store(y_chunk + (q * syc + s * syh), acc.to(y_ptr.dtype.element_ty), mask=j_ok & (i0 + s < Ho))


@triton.jit
def _dx_tap_column(accs, dy_col, w_col, col_ok, halo_first, last_row_ok, fence, Ho,
                   sdyc: tl.constexpr, sdyh: tl.constexpr, swu: tl.constexpr, swh: tl.constexpr,
                   KS: tl.constexpr, STEP_H: tl.constexpr, TAPS_U: tl.constexpr, ROW_STEP: tl.constexpr,
                   HALO: tl.constexpr, CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr):
    """accs plus one tap column's sums of involution_nchw_bwd_input_kernel: its HALO dy rows, in
    batches of ROWS_AHEAD behind a fence (0: all, unfenced)."""
    AHEAD: tl.constexpr = HALO if ROWS_AHEAD == 0 else ROWS_AHEAD
    for k0 in tl.static_range(0, HALO, AHEAD):
        # AHEAD halo rows and their weights loaded as one batch (see _fence).
        batch = ()
        for k in tl.static_range(k0, HALO):
            if k < k0 + AHEAD:
                row = halo_first + k
                ok = col_ok & (row >= 0) & (row < Ho)
                grads = _channel_row(dy_col + k * sdyh, ok, sdyc, CH, ACC_DTYPE)
                weights = ()
                for s in tl.static_range(STRIP):
                    # Strip row s reads halo row k through slot t = (s + (TAPS_U-1)*ROW_STEP - k) / ROW_STEP.
                    weight = tl.zeros((BLOCK_W,), dtype=ACC_DTYPE)  # strip rows not reading k: never used
                    if s + (TAPS_U - 1) * ROW_STEP - k >= 0:
                        if (s + (TAPS_U - 1) * ROW_STEP - k) % ROW_STEP == 0:
                            if (s + (TAPS_U - 1) * ROW_STEP - k) // ROW_STEP < TAPS_U:
                                weight = tl.load(w_col + ((s + (TAPS_U - 1) * ROW_STEP - k) // ROW_STEP * STEP_H * swu
                                                          + k * swh), mask=ok, other=0.0).to(ACC_DTYPE)
                    weights = weights + (weight,)
                batch = batch + ((grads, weights),)
        if AHEAD < HALO:
            after = _fence(fence, Ho).to(ACC_DTYPE)
        rest = batch
        for k in tl.static_range(k0, HALO):
            if k < k0 + AHEAD:
                batch_row, rest = rest[0], rest[1:]
                grads = batch_row[0]
                new = ()
                for s in tl.static_range(STRIP):
                    for q in tl.static_range(CH):
                        acc = accs[s * CH + q]
                        if s + (TAPS_U - 1) * ROW_STEP - k >= 0:
                            if (s + (TAPS_U - 1) * ROW_STEP - k) % ROW_STEP == 0:
                                if (s + (TAPS_U - 1) * ROW_STEP - k) // ROW_STEP < TAPS_U:
                                    weight = batch_row[1][s]
                                    if AHEAD < HALO:
                                        weight = weight + after
                                    if (s + (TAPS_U - 1) * ROW_STEP - k) // ROW_STEP == TAPS_U - 1 \
                                            and KS % STEP_H != 0:
                                        # The last slot passes K in some phases: skipped, not multiplied
                                        # by a zero weight (0 * inf would poison the sum).
                                        acc = tl.where(last_row_ok, acc + weight * grads[q], acc)
                                    else:
                                        acc = acc + weight * grads[q]
                        new = new + (acc,)
                accs = new
    return accs


@triton.jit
def involution_nchw_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    B, H, W, Ho, Wo, G, CG,
    sdyb, swb, swg, sdxb,
    PH, PW, ROWS, COLS, ROW_TILES, CHUNKS,
    sdyc: tl.constexpr, sdyh: tl.constexpr, sdyw: tl.constexpr,
    swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr, sww: tl.constexpr,
    sdxc: tl.constexpr, sdxh: tl.constexpr, sdxw: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, INV_H: tl.constexpr, INV_W: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr = 0,
):
    """Gather form of dx by stride phase: dx[b,c,h,w] = sum of w[b,g,u,v,i,j] * dy[b,c,i,j] over the taps
    with h = i*SH - PH + u*DH and w = j*SW - PW + v*DW.

    The input pixels of a phase (h % SH, w % SW) = (ph, pw) are read only by the taps u = u0 (mod
    STEP_H), STEP_H = SH/GH, GH = gcd(SH, DH), u0 = ((ph+PH)/GH * INV_H) mod STEP_H (INV_H the
    inverse of DH/GH modulo STEP_H), and only when GH divides ph + PH; likewise columns. Lanes run
    over the flattened (sample, group, chunk, phase, strip, phase column) space, so a phase's lanes
    visit exactly its taps: tap slot t is u = u0 + t*STEP_H (the last slot may pass K), and reads dy
    row i(s) - t*DH/GH for strip row s. The dy rows of a tap column are loaded once and serve
    every (s, t) reading them.
    """
    STEP_H: tl.constexpr = SH // GH
    STEP_W: tl.constexpr = SW // GW
    TAPS_U: tl.constexpr = (KS + STEP_H - 1) // STEP_H
    TAPS_V: tl.constexpr = (KS + STEP_W - 1) // STEP_W
    ROW_STEP: tl.constexpr = DH // GH
    COL_STEP: tl.constexpr = DW // GW
    lane = _wide(tl.program_id(0), INDEX_64) * BLOCK_W + tl.arange(0, BLOCK_W)
    ww = lane % COLS
    rest = lane // COLS
    hh0 = (rest % ROW_TILES) * STRIP
    rest = rest // ROW_TILES
    phase = rest % (SH * SW)
    rest = rest // (SH * SW)
    chunk = rest % CHUNKS
    rest = rest // CHUNKS
    g = rest % G
    b = rest // G
    c0 = g * CG + chunk * CH
    rh = phase // SW + PH
    rw = phase % SW + PW
    lane_ok = (b < B) & (rh % GH == 0) & (rw % GW == 0)  # a phase no tap reaches: dx is zero there
    u0 = ((rh // GH) * INV_H) % STEP_H
    v0 = ((rw // GW) * INV_W) % STEP_W
    # dy row of strip row 0 through slot 0, and the column of slot 0.
    i_first = hh0 + (rh - u0 * DH) // SH
    j_first = ww + (rw - v0 * DW) // SW
    HALO: tl.constexpr = STRIP + (TAPS_U - 1) * ROW_STEP
    halo_first = i_first - (TAPS_U - 1) * ROW_STEP  # halo row k is dy row halo_first + k
    # Per-lane pointers formed once; a tap column moves them by a scalar, a halo row and a channel by
    # immediate offsets (within-sample strides are compile-time constants).
    dy_chunk = dy_ptr + (b * sdyb + c0 * sdyc) + halo_first * sdyh + j_first * sdyw
    w_taps = w_ptr + b * swb + g * swg + u0 * swu + v0 * swv + halo_first * swh + j_first * sww
    last_row_ok = u0 + (TAPS_U - 1) * STEP_H < KS
    fence = dx_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, BLOCK_W)  # see _fence
    accs = ()
    for _ in tl.static_range(STRIP * CH):
        accs = accs + (tl.zeros((BLOCK_W,), dtype=ACC_DTYPE),)
    for t_v in range(TAPS_V):
        col = j_first - t_v * COL_STEP
        col_ok = (col >= 0) & (col < Wo) & lane_ok & (v0 + t_v * STEP_W < KS)
        dy_col = dy_chunk - _wide(t_v, INDEX_64) * (COL_STEP * sdyw)
        w_col = w_taps + _wide(t_v, INDEX_64) * (STEP_W * swv - COL_STEP * sww)
        accs = _dx_tap_column(accs, dy_col, w_col, col_ok, halo_first, last_row_ok, fence, Ho, sdyc, sdyh, swu, swh,
                              KS, STEP_H, TAPS_U, ROW_STEP, HALO, CH, STRIP, BLOCK_W, ACC_DTYPE, ROWS_AHEAD)
    h = rh - PH + SH * hh0
    w = rw - PW + SW * ww
    dx_chunk = dx_ptr + (b * sdxb + c0 * sdxc) + h * sdxh + w * sdxw
    for s in tl.static_range(STRIP):
        ok = (b < B) & (h + SH * s < H) & (w < W)
        for q in tl.static_range(CH):
            tl.store(dx_chunk + (q * sdxc + s * SH * sdxh), accs[s * CH + q].to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dw_chunk(dy_group, x_col, x_shifted, c, grad_ok, x_ok, sdyc: tl.constexpr, sdyh: tl.constexpr,
              sxc: tl.constexpr, sxh: tl.constexpr, STRIP: tl.constexpr, HALO: tl.constexpr, CH: tl.constexpr,
              ROW_GROUPS: tl.constexpr, MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The dy (STRIP rows) and x (HALO rows of one tap column) of channels c .. c + CH - 1, flat
    tuples row-major: what involution_nchw_bwd_weight_kernel sums for one chunk. The halo rows of
    group g of ROW_GROUPS are read from ``x_shifted[g]`` (inside x); MASKED (a strip past the last
    output row, a chunk past the group's channels): dy where ``grad_ok[s]``, x where ``x_ok``."""
    grads = ()
    for s in tl.static_range(STRIP):
        grads = grads + _channel_row(dy_group + c * sdyc + s * sdyh, grad_ok[s], sdyc, CH, ACC_DTYPE, MASKED)
    x_chunk = x_col + c * sxc
    x_groups = ()
    for g in tl.static_range(len(ROW_GROUPS)):
        x_groups = x_groups + (x_shifted[g] + c * sxc,)
    rows = ()
    for h in tl.static_range(HALO):
        row = x_chunk
        for g in tl.static_range(len(ROW_GROUPS)):
            if h >= ROW_GROUPS[g][0] and h < ROW_GROUPS[g][1]:
                row = x_groups[g]
        rows = rows + _channel_row(row + h * sxh, x_ok, sxc, CH, ACC_DTYPE, MASKED)
    return grads, rows


@triton.jit
def involution_nchw_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    B, H, W, Ho, Wo, G, CG,
    sdyb, sxb, sdwb, sdwg,
    PH, PW, ROW_TILES,
    sdyc: tl.constexpr, sdyh: tl.constexpr, sdyw: tl.constexpr,
    sxc: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
    sdwu: tl.constexpr, sdwv: tl.constexpr, sdwh: tl.constexpr, sdww: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, BATCH: tl.constexpr,
    ROWS_FULL: tl.constexpr = False, CHANNELS_FULL: tl.constexpr = False, ROW_GROUPS: tl.constexpr = (),
):
    """dw[b,g,u,v,i,j] = sum_{c in g} dy[b,c,i,j] * x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW].

    Lanes over the flattened (sample, group, strip, column) space; each thread sums its group's
    channels itself (CH at a time, a run-time loop), so the sum is a chain of FMAs, and holds the
    K tap rows x STRIP rows of one tap column: the x rows of a tap column are loaded once per chunk
    and serve every (strip row, tap row) reading them.
    Every sum reads one x position, through all the channels: where it lies outside x the sum is
    zeroed once, when stored, and the loads read an in-range position instead (the column clamped
    into x; ROW_GROUPS, the runs of halo rows outside x in some strip, each shifted into x, as in the
    pair kernel), so none is masked: the masks, the zeroed registers of masked loads and their
    predicates were half the loop's instructions. ROWS_FULL: the strips tile the output rows;
    CHANNELS_FULL: the batches tile each group's channels (else those loads are masked).
    """
    lane = _wide(tl.program_id(0), INDEX_64) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = lane % Wo
    rest = lane // Wo
    i0 = (rest % ROW_TILES) * STRIP
    rest = rest // ROW_TILES
    g = rest % G
    b = rest // G
    lane_ok = b < B
    b_in = tl.minimum(b, B - 1)  # lanes past the last sample read its data (and store nothing)
    row_first = i0 * SH - PH
    col_first = j * SW - PW
    c_first = g * CG
    dy_group = dy_ptr + (b_in * sdyb + c_first * sdyc) + i0 * sdyh + j * sdyw
    x_group = x_ptr + (b_in * sxb + c_first * sxc) + row_first * sxh
    shifts = _row_group_shifts(row_first, H, sxh, ROW_GROUPS)
    grad_ok = ()
    for s in tl.static_range(STRIP):
        grad_ok = grad_ok + ((i0 + s < Ho) | ROWS_FULL,)
    dw_pixels = dw_ptr + b * sdwb + g * sdwg + i0 * sdwh + j * sdww
    HALO: tl.constexpr = (STRIP - 1) * SH + (KS - 1) * DH + 1
    fence = dw_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, BLOCK_W)  # see _fence
    for v in range(KS):
        col = col_first + v * DW
        col_in = (col >= 0) & (col < W)
        x_col = x_group + tl.minimum(tl.maximum(col, 0), W - 1) * sxw
        x_shifted = ()
        for gr in tl.static_range(len(ROW_GROUPS)):
            x_shifted = x_shifted + (x_col + shifts[gr],)
        accs = ()
        for _ in tl.static_range(STRIP * KS):
            accs = accs + (tl.zeros((BLOCK_W,), dtype=ACC_DTYPE),)
        # Lane masks, not scalar ones (the interpreter takes no scalar mask); a group may have no channels.
        zero = tl.zeros((BLOCK_W,), dtype=tl.int32)
        # BATCH chunks' dy and x loaded before any is summed, then a fence (see _fence): ptxas, short
        # of registers, waited for each halo row's loads in turn, and a chunk loaded a trip ahead
        # waited at the back edge (R1 fp32, PREDICTED: 51% with one chunk ahead, 78% with four a batch).
        for c in range(0, CG, CH * BATCH):
            c = _wide(c, INDEX_64)
            loaded = ()
            for k in tl.static_range(BATCH):
                more = (c + k * CH + zero < CG) | CHANNELS_FULL
                chunk_grad_ok = ()
                for s in tl.static_range(STRIP):
                    chunk_grad_ok = chunk_grad_ok + (grad_ok[s] & more,)
                loaded = loaded + (_dw_chunk(dy_group, x_col, x_shifted, c + k * CH, chunk_grad_ok, more,
                                             sdyc, sdyh, sxc, sxh, STRIP, HALO, CH, ROW_GROUPS,
                                             not (ROWS_FULL and CHANNELS_FULL), ACC_DTYPE),)
            # The fence's zero starts every sum, so no sum moves above it.
            after = _fence(fence, H).to(ACC_DTYPE)
            new = ()
            for t in tl.static_range(STRIP * KS):
                new = new + (accs[t] + after,)
            accs = new
            for k in tl.static_range(BATCH):
                grads, rows = loaded[k]
                for h in tl.static_range(HALO):
                    new = ()
                    for s in tl.static_range(STRIP):
                        for u in tl.static_range(KS):
                            acc = accs[s * KS + u]
                            if h == s * SH + u * DH:  # strip row s reads halo row h through tap row u
                                for q in tl.static_range(CH):
                                    acc = acc + grads[s * CH + q] * rows[h * CH + q]
                            new = new + (acc,)
                    accs = new
        dw_col = dw_pixels + _wide(v, INDEX_64) * sdwv
        for s in tl.static_range(STRIP):
            for u in tl.static_range(KS):
                keep = col_in
                # Only the rows of ROW_GROUPS may lie outside x: the others' sums need the column's test alone.
                for gr in tl.static_range(len(ROW_GROUPS)):
                    if s * SH + u * DH >= ROW_GROUPS[gr][0] and s * SH + u * DH < ROW_GROUPS[gr][1]:
                        row = row_first + s * SH + u * DH
                        keep = keep & (row >= 0) & (row < H)
                tl.store(dw_col + (u * sdwu + s * sdwh), tl.where(keep, accs[s * KS + u], 0.0).to(dw_ptr.dtype.element_ty),
                         mask=lane_ok & grad_ok[s])


# --------------------------------------------------------------------------------------------
# Launch builders (called by the launchers of kernels/involution.py and involution_weight_grad.py
# for the cases covers() accepts)
# --------------------------------------------------------------------------------------------

def covers(x, weight, config=None) -> bool:
    """Whether these kernels serve a call: per-pixel weights, NCHW (not channels_last), K <= MAX_K,
    and no explicit config of the generic kernels."""
    return (weight.dim() == 6 and weight.shape[2] <= MAX_K and not is_channels_last(x)
            and (config is None or "CH" in config))


def _pairs(src, W: int, weight, Wo: int) -> bool:
    """Whether the pair kernels read ``src`` (x or dy, ``W`` columns) and the weights (``Wo`` columns) as
    int32 pairs of bf16 along W: both contiguous along W, every other stride and both widths even
    (a pair never straddles a row), 4-byte aligned."""
    if src.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or W % 2 or Wo % 2:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 4 == 0 and all(d % 2 == 0 for d in t.stride()[:-1])
               for t in (src, weight))


def fwd_pairs(x, weight, y) -> bool:
    """Whether the forward runs its pair kernel: K <= PAIRS_MAX_K, x and the weights as pairs (_pairs)."""
    return weight.shape[2] <= PAIRS_MAX_K and _pairs(x, x.shape[3], weight, y.shape[3])


def dx_pairs(dy, weight, dx, stride, padding, dilation) -> bool:
    """Whether the input gradient runs its pair kernel: on triton 3.6 or older (DX_PAIRS), stride 1,
    K <= PAIRS_MAX_K, dy and the weights as pairs (_pairs), an even input width, padding at most the
    taps' reach (mirrored paddings not negative), and more than one channel a group: with one (R3,
    HBM-bound anyway) triton 3.9's ptxas spilled on sm_80."""
    K = weight.shape[2]
    return (DX_PAIRS and tuple(stride) == (1, 1) and K <= PAIRS_MAX_K and dx.shape[3] % 2 == 0
            and dx.shape[1] > weight.shape[1] and all(p <= (K - 1) * d for p, d in zip(padding, dilation))
            and _pairs(dy, dy.shape[3], weight, dy.shape[3]))


def dw_pairs(x, dy, CG: int, K: int, stride) -> bool:
    """Whether the weight gradient runs its pair kernel: x and dy as pairs (_pairs), column stride 1,
    an even number of channels per group and K >= 5. With one channel a chunk (R3: HBM-bound anyway)
    or K = 3 ptxas keeps 96 registers and spills one to the stack (triton 3.6 at sm_80/sm_90, 3.9 at
    sm_80)."""
    return stride[1] == 1 and CG % 2 == 0 and K >= 5 and _pairs(x, x.shape[3], dy, dy.shape[3])


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _key(x, G: int, K: int, stride) -> dict:
    B, C, H, W = x.shape
    # The fields and order of involution.problem_key (the tuner's key), channels_last always 0 here.
    return {"B": B, "C": C, "G": G, "H": H, "W": W, "K": K, "stride_h": stride[0], "stride_w": stride[1],
            "channels_last": 0, "dtype_bytes": x.element_size()}


def _chunk(CG: int, cap: int) -> int:
    """Channels per program: the largest divisor of the group's CG channels up to ``cap`` (no channel masks)."""
    return max((d for d in range(1, min(CG, cap) + 1) if CG % d == 0), default=1)  # CG = 0: an empty launch


@functools.lru_cache(maxsize=1024)
def nchw_config(CG: int, K: int, rows: int, element_size: int, kind: str, pairs: bool = False) -> dict:
    """Default tile: 128 lanes along the flattened rows, each a strip of STRIP rows and CH channels of
    its group. Sizes as triton 3.6's ptxas keeps them in registers on sm_90 and sm_80 (AOT-checked):
    fp32 has headroom (HBM-bound); 16-bit data needs longer strips or wider chunks to
    amortise each loaded element, and dx and dw hold more per thread (dw: a tap column's K x STRIP
    sums, so narrow chunks)."""
    if pairs and kind == "dw":
        # Two pixels per lane: a tap column's K x STRIP x 2 sums (at most 112, K = 7's), two channels at a time.
        ch, strip = _chunk(CG, 2), max(1, min(8, 56 // K))
    elif pairs:
        # fwd and dx, two pixels per lane: 8 channels x 4 rows x 2 sums fill sm_90's 255 registers
        # (triton 3.6); 8 x 7 spills there. Narrower chunks keep 4 rows too: the unrolled halo rows'
        # loads make compile time grow with the square of the strip (triton 3.6, 4 channels, K = 7:
        # the forward 41 s at 4 rows, 136 s at 8; the input gradient 49 s and 304 s).
        ch = _chunk(CG, 8)
        strip = 4
    elif kind == "dw":
        # Batches of chunks of dy and x halo (_dw_batch) beside the K x STRIP sums: two channels a
        # chunk, at most 7 rows at K = 7, four chunks a batch (R1 fp32 PREDICTED 78% on triton 3.6,
        # 76% on 3.9; 8 rows and three chunks 68%).
        ch, strip = _chunk(CG, 2), max(1, min(7, 56 // K))
    elif kind == "fwd":
        # 6 rows: 5% faster in bf16 (PREDICTED) but fp16 spills on sm_80; fp32 at 4 x 8 went
        # through the stack on sm_80 with triton 3.9.
        # Few channels (G = C): longer strips; at 4 rows triton 3.9's ptxas put a register on the stack.
        # From K = 8, 16 channels x 4 rows spill at stride 2 (2-78 local loads and stores, both
        # tritons, sm_80 and sm_90) and in fp32 at stride 1 too: 8 channels.
        ch = _chunk(CG, 16 if K < 8 else 8)
        strip = 4 if ch > 4 else 8
    elif element_size > 2 or K >= 8:
        # 16-bit from K = 8 as fp32: 8 x 8 spills at stride 1 (2-164 local loads and stores, both
        # tritons, sm_80 and sm_90); 8 x 4 predicts more than 4 x 8 (R1 at K = 9: 49% and 45%).
        ch, strip = _chunk(CG, 8), 4
    else:
        ch, strip = _chunk(CG, 8), 8
    return {"CH": ch, "STRIP": _strip(rows, strip), "BLOCK_W": 128, "num_warps": 4, "num_stages": 1}


def _strip(rows: int, cap: int) -> int:
    """The strip length in [cap/2, cap] that pads ``rows`` least (28 rows: 7, not 8), the longest on a tie."""
    if rows <= cap:
        return max(1, rows)
    return min(range(max(1, cap // 2), cap + 1), key=lambda s: (cdiv(rows, s) * s, -s))


def _row_groups(H: int, K: int, strip: int, row_tiles: int, stride: int, padding: int, dilation: int) -> tuple:
    """The weight gradient's groups of halo rows to shift into x (see _dw_pair_columns): runs of rows
    outside x in the same strips (so in every strip all outside or all inside), at most H rows each."""
    halo = (strip - 1) * stride + (K - 1) * dilation + 1
    firsts = [tile * strip * stride - padding for tile in range(row_tiles)]
    outside = [tuple(not 0 <= first + h < H for first in firsts) for h in range(halo)]
    groups = []
    for h in range(halo):
        if any(outside[h]) and groups and groups[-1][1] == h and outside[groups[-1][0]] == outside[h] \
                and h + 1 - groups[-1][0] <= H:
            groups[-1] = (groups[-1][0], h + 1)
        elif any(outside[h]):
            groups.append((h, h + 1))
    return tuple(groups)


def _grid_size(lanes: int, block: int) -> tuple[int, int, int]:
    return (cdiv(lanes, block), 1, 1)


def _column_loops(trips: int, chunks: int) -> tuple:
    """The declared loops of a tap-column loop around a loop over ``chunks`` channel chunks: a one-trip
    loop compiles to none (its inner loop then stands alone), a zero-trip one to nothing."""
    inner = (chunks,) if chunks > 1 else ()
    if trips > 1:
        return ((trips, inner),) if inner else (trips,)
    return inner if trips == 1 else ()


def forward_launch(x, weight, bias, y, stride, padding, dilation, index_64: bool, config=None) -> Launch:
    B, C, H, W = x.shape
    G, K = weight.shape[1], weight.shape[2]
    Ho, Wo = y.shape[2], y.shape[3]
    CG = C // G
    pairs = fwd_pairs(x, weight, y)
    config = config or get_config("involution_nchw_fwd_pairs" if pairs else "involution_nchw_fwd", _key(x, G, K, stride),
                                  nchw_config(CG, K, Ho, x.element_size(), "fwd", pairs))
    ch, strip, block_w = config["CH"], config["STRIP"], config["BLOCK_W"]
    chunks, row_tiles = CG // ch, cdiv(Ho, strip)
    bias_strides = bias.stride() if bias is not None else (0, 0)
    if pairs:
        args = dict(
            x_ptr=x, w_ptr=weight, bias_ptr=bias, y_ptr=y, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
            sxb=x.stride(0), swb=weight.stride(0), swg=weight.stride(1),
            sbb=bias_strides[0], sbc=bias_strides[1], syb=y.stride(0), ROW_TILES=row_tiles, CHUNKS=chunks,
        )
        meta = dict(**inner_strides("sx", x.select(3, 0), "ch"), **inner_strides("sw", weight.select(5, 0), "uvh"),
                    **inner_strides("sy", y), PH=padding[0], PW=padding[1], KS=K, SH=stride[0], SW=stride[1],
                    DH=dilation[0], DW=dilation[1], CH=ch, STRIP=strip, BLOCK_W=block_w, HAS_BIAS=bias is not None,
                    TAP_GROUP=PAIR_TAP_GROUP, INDEX_64=index_64, ROWS_AHEAD=PAIR_ROWS_AHEAD["fwd"])
        # One run-time loop: the groups of tap columns.
        groups = K // PAIR_TAP_GROUP
        return Launch(involution_nchw_fwd_pairs_kernel, _grid_size(B * G * chunks * row_tiles * (Wo // 2), block_w),
                      args, meta, config.get("num_warps", 4), config.get("num_stages", 1),
                      loops=(groups,) if groups > 1 else ())
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, y_ptr=y, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
        sxb=x.stride(0), swb=weight.stride(0), swg=weight.stride(1),
        sbb=bias_strides[0], sbc=bias_strides[1], syb=y.stride(0),
        PH=padding[0], PW=padding[1], ROW_TILES=row_tiles, CHUNKS=chunks,
    )
    meta = dict(**inner_strides("sx", x), **inner_strides("sw", weight, "uvhw"), **inner_strides("sy", y), KS=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], CH=ch, STRIP=strip,
                BLOCK_W=block_w, HAS_BIAS=bias is not None, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(x.dtype))
    # One run-time loop: the tap columns.
    return Launch(involution_nchw_fwd_kernel, _grid_size(B * G * chunks * row_tiles * Wo, block_w), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1), loops=(K,) if K > 1 else ())


def _dw_batch(K: int, strip: int, ch: int, chunks: int, stride_h: int, dilation_h: int, element_size: int) -> int:
    """Chunks a batch of the single-pixel weight gradient: as many as DW_HELD_WORDS leave beside the
    K x STRIP sums (a chunk: CH channels of STRIP dy rows and HALO x rows); one for fp64 (its sums
    take two words each, and fill the registers alone)."""
    if element_size > 4:
        return 1
    halo = (strip - 1) * stride_h + (K - 1) * dilation_h + 1
    fits = [b for b in range(1, DW_BATCH + 1) if strip * K + b * (strip + halo) * ch <= DW_HELD_WORDS]
    return max(1, min(max(fits, default=1), chunks))


def _dx_rows_ahead(stride_h: int, element_size: int) -> int:
    """The single-pixel input gradient's rows a fenced batch (0: no fence). With fp32 at row stride 1
    both tritons' ptxas issue each dy row's loads just before its sums; two rows a batch take R1 from
    61% to 100% (PREDICTED). At stride 2 (four tap rows a phase) and in 16-bit, where the loads
    already go out together, a fence only costs (R1s2 fp32: 100% -> 62%)."""
    return 2 if stride_h == 1 and element_size == 4 else 0


def _phase_taps(stride: int, dilation: int) -> tuple[int, int, int]:
    """(gcd, step, inverse) of one axis: the taps u of a stride phase satisfy u*dilation = r (mod stride),
    which has solutions only when gcd | r, then u = (r/gcd) * inverse (mod step), step = stride/gcd."""
    g = math.gcd(stride, dilation)
    step = stride // g
    return g, step, pow(dilation // g, -1, step) if step > 1 else 0


def backward_input_launch(dy, weight, dx, stride, padding, dilation, index_64: bool, config=None) -> Launch:
    B, C, H, W = dx.shape
    G, K = weight.shape[1], weight.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    CG = C // G
    (gh, step_h, inv_h), (gw, step_w, inv_w) = (_phase_taps(s, d) for s, d in zip(stride, dilation))
    rows, cols = cdiv(H, stride[0]), cdiv(W, stride[1])
    pairs = dx_pairs(dy, weight, dx, stride, padding, dilation)
    config = config or get_config("involution_nchw_bwd_input_pairs" if pairs else "involution_nchw_bwd_input",
                                  _key(dx, G, K, stride), nchw_config(CG, K, rows, dx.element_size(), "dx", pairs))
    ch, strip, block_w = config["CH"], config["STRIP"], config["BLOCK_W"]
    chunks, row_tiles = CG // ch, cdiv(rows, strip)
    if pairs:
        args = dict(
            dy_ptr=dy, w_ptr=weight, dx_ptr=dx, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
            sdyb=dy.stride(0), swb=weight.stride(0), swg=weight.stride(1), sdxb=dx.stride(0),
            ROW_TILES=row_tiles, CHUNKS=chunks,
        )
        # The mirrored paddings: dx is a stride-1 forward over dy with the taps reversed.
        meta = dict(**inner_strides("sdy", dy.select(3, 0), "ch"), **inner_strides("sw", weight.select(5, 0), "uvh"),
                    **inner_strides("sdx", dx), PH=(K - 1) * dilation[0] - padding[0],
                    PW=(K - 1) * dilation[1] - padding[1], KS=K, DH=dilation[0], DW=dilation[1], CH=ch, STRIP=strip,
                    BLOCK_W=block_w, TAP_GROUP=PAIR_TAP_GROUP, INDEX_64=index_64, ROWS_AHEAD=PAIR_ROWS_AHEAD["dx"])
        groups = K // PAIR_TAP_GROUP
        grid = _grid_size(B * G * chunks * row_tiles * (W // 2), block_w)
        return Launch(involution_nchw_bwd_input_pairs_kernel, grid, args, meta, config.get("num_warps", 4),
                      config.get("num_stages", 1), loops=(groups,) if groups > 1 else ())
    args = dict(
        dy_ptr=dy, w_ptr=weight, dx_ptr=dx, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
        sdyb=dy.stride(0), swb=weight.stride(0), swg=weight.stride(1), sdxb=dx.stride(0),
        PH=padding[0], PW=padding[1], ROWS=rows, COLS=cols, ROW_TILES=row_tiles, CHUNKS=chunks,
    )
    meta = dict(**inner_strides("sdy", dy), **inner_strides("sw", weight, "uvhw"), **inner_strides("sdx", dx),
                KS=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], GH=gh, GW=gw, INV_H=inv_h,
                INV_W=inv_w, CH=ch, STRIP=strip, BLOCK_W=block_w, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(dx.dtype), ROWS_AHEAD=_dx_rows_ahead(stride[0], dx.element_size()))
    lanes = B * G * chunks * stride[0] * stride[1] * row_tiles * cols
    taps_v = cdiv(K, step_w)
    # One run-time loop: the tap columns of a phase.
    return Launch(involution_nchw_bwd_input_kernel, _grid_size(lanes, block_w), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1), loops=(taps_v,) if taps_v > 1 else ())


def backward_weight_launch(dy, x, dw, stride, padding, dilation, index_64: bool, config=None) -> Launch:
    B, C, H, W = x.shape
    G, K = dw.shape[1], dw.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    CG = C // G
    pairs = dw_pairs(x, dy, CG, K, stride)
    config = config or get_config("involution_nchw_bwd_weight_pairs" if pairs else "involution_nchw_bwd_weight",
                                  _key(x, G, K, stride), nchw_config(CG, K, Ho, x.element_size(), "dw", pairs))
    ch, strip, block_w = config["CH"], config["STRIP"], config["BLOCK_W"]
    row_tiles = cdiv(Ho, strip)
    chunks = CG // ch
    if pairs:
        args = dict(
            dy_ptr=dy, x_ptr=x, dw_ptr=dw, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
            sdyb=dy.stride(0), sxb=x.stride(0), sdwb=dw.stride(0), sdwg=dw.stride(1), ROW_TILES=row_tiles,
            SIGN_SHIFT=31,  # an argument, not a constant: see involution_nchw_pairs._inside
        )
        meta = dict(**inner_strides("sdy", dy.select(3, 0), "ch"), **inner_strides("sx", x.select(3, 0), "ch"),
                    **inner_strides("sdw", dw, "uvhw"), PH=padding[0], PW=padding[1], KS=K, SH=stride[0],
                    DH=dilation[0], DW=dilation[1], CH=ch, STRIP=strip, BLOCK_W=block_w,
                    ROWS_FULL=Ho % strip == 0, ROW_GROUPS=_row_groups(H, K, strip, row_tiles, stride[0], padding[0],
                                                                       dilation[0]),
                    INDEX_64=index_64)
        # Two loops over the tap columns (even, then odd), each around the group's channels CH at a time.
        column_loops = _column_loops((K + 1) // 2, chunks) + _column_loops(K // 2, chunks)
        return Launch(involution_nchw_bwd_weight_pairs_kernel, _grid_size(B * G * row_tiles * (Wo // 2), block_w),
                      args, meta, config.get("num_warps", 4), config.get("num_stages", 1), loops=column_loops)
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, B=B, H=H, W=W, Ho=Ho, Wo=Wo, G=G, CG=CG,
        sdyb=dy.stride(0), sxb=x.stride(0), sdwb=dw.stride(0), sdwg=dw.stride(1),
        PH=padding[0], PW=padding[1], ROW_TILES=row_tiles,
    )
    batch = _dw_batch(K, strip, ch, chunks, stride[0], dilation[0], x.element_size())
    meta = dict(**inner_strides("sdy", dy), **inner_strides("sx", x), **inner_strides("sdw", dw, "uvhw"),
                KS=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], CH=ch, STRIP=strip,
                BLOCK_W=block_w, INDEX_64=index_64, ACC_DTYPE=_acc_dtype(x.dtype), BATCH=batch,
                ROWS_FULL=Ho % strip == 0, CHANNELS_FULL=CG % (ch * batch) == 0,
                ROW_GROUPS=_row_groups(H, K, strip, row_tiles, stride[0], padding[0], dilation[0]))
    # The tap columns, and inside each the group's channels BATCH chunks at a time: a loop whenever
    # CG > 1 (triton makes CG = 1 a constant), one trip or more.
    inner = (cdiv(chunks, batch),) if CG > 1 else ()
    loops = ((K, inner),) if K > 1 and inner else ((K,) if K > 1 else inner)
    return Launch(involution_nchw_bwd_weight_kernel, _grid_size(B * G * row_tiles * Wo, block_w), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1), loops=loops)
