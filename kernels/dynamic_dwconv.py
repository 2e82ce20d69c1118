"""Homogeneous dynamic depth-wise conv (docs/operators.md §1): a per-sample weight ``(B, G, K, K)``.

A per-sample filter is an ordinary depth-wise conv of each sample, and its weight does not depend on
the pixel, so these kernels hold a thread's K*K weights in registers for the whole program. Each
thread owns one channel (16-bit channels_last: two adjacent ones, read as one 32-bit word) and a
block of S output rows x P output columns; the rows and columns of its
input halo are loaded (and converted) once and feed every tap that reads them, so an input element
serves up to min(S, K) * min(P, K) multiply-adds. Kernel size, strides, dilations, S and P are
compile-time constants: every tap is unrolled and no tap index is computed at run time.

- ``dwconv_fwd_kernel`` and ``dwconv_bwd_input_kernel``: one tap sum (``_tap_sums``), the input
  gradient by stride phase (the same sum over dy with the taps flipped, one set of programs per
  phase, so no tap is masked for the stride).
- ``dwconv_bwd_weight_kernel`` (``dynamic_dwconv_weight_grad.py``): the per-sample weight gradient of
  one-channel groups (G = C), walking the rows with the helpers here (row vectors, halo loads).

``kernels/involution.py`` dispatches here for 4-D weights, ``involution_weight_grad.py`` to the
weight gradient; per-pixel weights stay there.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import triton
import triton.language as tl

from ._fence import fence
from ._keys import problem_key
from ._launch import TRITON_VERSION, Launch, cdiv, inner_strides, is_channels_last, needs_int64, next_power_of_2
from .configs import get_config

# Largest kernel size the unrolled kernels take (K*K weights held per thread); larger K keeps the
# run-time tap loops of involution.py.
MAX_K = 9
# The smallest vector the NCHW forward and input-gradient walks take (_vector_width): 16-bit rows in
# vectors of four (8 bytes) read 71/68% against 73/71% as scalars at R4 bf16 fwd/dx on triton 3.9
# (75/75% against 74/72% on 3.6, PREDICTED); the weight gradient takes them (65/66% against 63/62%).
WALK_VECTOR_BYTES = 16


@triton.jit
def _widen(v, ACC_DTYPE: tl.constexpr):
    """v in ACC_DTYPE; bf16 by its bits (a bf16 is an fp32's top half)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(ACC_DTYPE)


@triton.jit
def _source_row(src_lane, row_ok, cols_ok, o, ssh, ssw, HALO_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Halo row ``o`` of each thread: its HALO_W source columns (``cols_ok``: in the image, and of a
    channel that exists), loaded and converted once."""
    xs = ()
    for q in tl.static_range(HALO_W):
        xv = tl.load(src_lane + (o * ssh + q * ssw), mask=row_ok & cols_ok[q], other=0.0)
        xs = xs + (_widen(xv, ACC_DTYPE),)
    return xs


@triton.jit
def _lanes(tile, TILES_W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
           S: tl.constexpr, P: tl.constexpr, INDEX_64: tl.constexpr):
    """Channels [BLOCK_C, 1] and first output row and column [1, pixels] of each thread's S x P block."""
    q = tl.arange(0, BLOCK_H * BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = ((tile // TILES_W) * BLOCK_H + q // BLOCK_W) * S
    col = ((tile % TILES_W) * BLOCK_W + q % BLOCK_W) * P
    if INDEX_64:
        c = c.to(tl.int64)
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    return c[:, None], row[None, :], col[None, :]


@triton.jit
def _program(TILES_PHASE, PH, PW, sxh, sxw, swu, swv, syh, syw,
             SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, IS_DX: tl.constexpr,
             TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr,
             INV_H: tl.constexpr, INV_W: tl.constexpr, INDEX_64: tl.constexpr):
    """What program_id(0) names, for _tap_sums and _row_walk: (sample, tile, stride phase ph, pw,
    first tap u_first, v_first, source padding pad_h, pad_w) and the six strides, in 64 bits under
    INDEX_64. The forward is phase (0, 0) with tap 0 first and its own padding; the input gradient's
    phases are derived in _tap_sums's docstring (pad_h: slot a reads source row i - pad_h + a*DH/GH)."""
    pid0 = tl.program_id(0)
    b = pid0 // TILES_PHASE
    tile = pid0 % TILES_PHASE
    if INDEX_64:
        # Every stride in 64 bits: a tap or halo index times a stride may pass 2^31 on its own.
        b = b.to(tl.int64)
        sxh = tl.cast(sxh, tl.int64)
        sxw = tl.cast(sxw, tl.int64)
        swu = tl.cast(swu, tl.int64)
        swv = tl.cast(swv, tl.int64)
        syh = tl.cast(syh, tl.int64)
        syw = tl.cast(syw, tl.int64)
    if IS_DX:
        phase = b % (SH * SW)
        b = b // (SH * SW)
        ph = phase // SW
        pw = phase % SW
        rh = ph + PH
        rw = pw + PW
        u0 = ((rh // GH) * INV_H) % (SH // GH)
        v0 = ((rw // GW) * INV_W) % (SW // GW)
        u_first = u0 + (TAPS_H - 1) * (SH // GH)
        v_first = v0 + (TAPS_W - 1) * (SW // GW)
        pad_h = (TAPS_H - 1) * (DH // GH) - (rh - u0 * DH) // SH
        pad_w = (TAPS_W - 1) * (DW // GW) - (rw - v0 * DW) // SW
    else:
        ph = 0
        pw = 0
        u_first = 0
        v_first = 0
        pad_h = PH
        pad_w = PW
    return b, tile, ph, pw, u_first, v_first, pad_h, pad_w, sxh, sxw, swu, swv, syh, syw


@triton.jit
def _add_tap(acc, term, a: tl.constexpr, e: tl.constexpr, u_ok, v_ok, FIRST_TAP_MAY_MISS: tl.constexpr):
    """acc + term for tap slot (a, e), left out where the phase's first tap row (a = 0: u_ok) or column
    (e = 0: v_ok) passes K; a where, not a zero weight (0 * inf would poison the sum)."""
    if FIRST_TAP_MAY_MISS and a == 0 and e == 0:
        acc = tl.where(u_ok & v_ok, acc + term, acc)
    elif FIRST_TAP_MAY_MISS and a == 0:
        acc = tl.where(u_ok, acc + term, acc)
    elif FIRST_TAP_MAY_MISS and e == 0:
        acc = tl.where(v_ok, acc + term, acc)
    else:
        acc += term
    return acc


@triton.jit
def _tap_sums(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, HO, WO, CG,
    sxb, sxc, sxh, sxw,
    swb, swg, swu, swv,
    sbb, sbc,
    syb, syc, syh, syw,
    PH, PW, TILES_PHASE, TILES_W,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, KS: tl.constexpr,
    IS_DX: tl.constexpr, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, INV_H: tl.constexpr, INV_W: tl.constexpr,
    FIRST_TAP_MAY_MISS: tl.constexpr, PHASE_MAY_BE_EMPTY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Forward: y[b,c,i,j] = bias[b,c] + sum_{u,v} w[b,g(c),u,v] * x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW].

    Input gradient (IS_DX): x is dy (H x W), y is dx (HO x WO), SH, SW, DH, DW, PH, PW the forward's,
    and KS the forward's K. Program set (ph, pw) owns the dx pixels
    (ph + SH*i, pw + SW*j). Along one axis (stride s, dilation d, padding p, g = gcd(s, d),
    step = s/g) its taps are u = u0 + t*step with u0*d = ph + p (mod s), t < TAPS, and tap u reads dy
    row i + (ph + p - u*d)/s. Slot a = TAPS-1-t reads dy row i - pad + a*(d/g): a forward tap sum of
    dilation d/g with the taps flipped. Slot 0 may name tap >= K (the phase has one tap fewer): its
    products are dropped by a select, never multiplied by a zero weight (0 * inf would poison the
    sum); a phase no tap reaches (g does not divide ph + p) is zero.
    """
    b, tile, ph, pw, u_first, v_first, pad_h, pad_w, sxh, sxw, swu, swv, syh, syw = _program(
        TILES_PHASE, PH, PW, sxh, sxw, swu, swv, syh, syw, SH, SW, DH, DW, IS_DX, TAPS_H, TAPS_W, GH, GW, INV_H, INV_W,
        INDEX_64)
    if IS_DX:
        U_STEP: tl.constexpr = -(SH // GH)
        V_STEP: tl.constexpr = -(SW // GW)
        SRC_SH: tl.constexpr = 1
        SRC_SW: tl.constexpr = 1
        SRC_DH: tl.constexpr = DH // GH
        SRC_DW: tl.constexpr = DW // GW
        OUT_SH: tl.constexpr = SH
        OUT_SW: tl.constexpr = SW
    else:
        U_STEP: tl.constexpr = 1
        V_STEP: tl.constexpr = 1
        SRC_SH: tl.constexpr = SH
        SRC_SW: tl.constexpr = SW
        SRC_DH: tl.constexpr = DH
        SRC_DW: tl.constexpr = DW
        OUT_SH: tl.constexpr = 1
        OUT_SW: tl.constexpr = 1
    c2, row0, col0 = _lanes(tile, TILES_W, BLOCK_C, BLOCK_H, BLOCK_W, S, P, INDEX_64)
    c_ok = c2 < C
    # The weights of the thread's channel, held for all its taps.
    w_lane = w_ptr + b * swb + (c2 // CG) * swg
    # Tensors, not scalars: the interpreter's scalars make masks it cannot read.
    u_ok = (tl.zeros((BLOCK_C, 1), dtype=tl.int32) + u_first) < KS
    v_ok = (tl.zeros((BLOCK_C, 1), dtype=tl.int32) + v_first) < KS
    # Weights broadcast to the tile once: a broadcast per multiply-add makes triton's layout passes crawl.
    zero = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE)
    wts = ()
    for a in tl.static_range(TAPS_H):
        for e in tl.static_range(TAPS_W):
            w_ok = c_ok
            if FIRST_TAP_MAY_MISS:
                if a == 0:
                    w_ok = w_ok & u_ok
                if e == 0:
                    w_ok = w_ok & v_ok
            wv = tl.load(w_lane + ((u_first + a * U_STEP) * swu + (v_first + e * V_STEP) * swv), mask=w_ok, other=0.0)
            wts = wts + (wv.to(ACC_DTYPE) + zero,)
    HALO_H: tl.constexpr = (S - 1) * SRC_SH + (TAPS_H - 1) * SRC_DH + 1
    HALO_W: tl.constexpr = (P - 1) * SRC_SW + (TAPS_W - 1) * SRC_DW + 1
    h_first = row0 * SRC_SH - pad_h
    w_first = col0 * SRC_SW - pad_w
    cols_ok = ()
    for qc in tl.static_range(HALO_W):
        cols_ok = cols_ok + (c_ok & (w_first + qc >= 0) & (w_first + qc < W),)
    src_lane = x_ptr + b * sxb + c2 * sxc + (h_first * sxh + w_first * sxw)
    accs = ()
    for k in tl.static_range(S * P):
        accs = accs + (tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE),)
    for o in tl.static_range(HALO_H):
        # Halo row o is tap slot a of strip row s when s*SRC_SH + a*SRC_DH == o (with both steps
        # above one some rows serve no tap: loaded all the same, a rare geometry).
        row_ok = (h_first + o >= 0) & (h_first + o < H)
        xs = _source_row(src_lane, row_ok, cols_ok, o, sxh, sxw, HALO_W, ACC_DTYPE)
        new = ()
        for s in tl.static_range(S):
            for p in tl.static_range(P):
                acc = accs[s * P + p]
                for a in tl.static_range(TAPS_H):
                    if s * SRC_SH + a * SRC_DH == o:
                        for e in tl.static_range(TAPS_W):
                            acc = _add_tap(acc, wts[a * TAPS_W + e] * xs[p * SRC_SW + e * SRC_DW], a, e, u_ok, v_ok,
                                           FIRST_TAP_MAY_MISS)
                new = new + (acc,)
        accs = new
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * sbb + c2 * sbc, mask=c_ok, other=0.0).to(ACC_DTYPE)
    if PHASE_MAY_BE_EMPTY:
        phase_ok = ((ph + PH) % GH == 0) & ((pw + PW) % GW == 0)
    y_lane = y_ptr + b * syb + c2 * syc
    for s in tl.static_range(S):
        out_row = (row0 + s) * OUT_SH + ph
        for p in tl.static_range(P):
            out_col = (col0 + p) * OUT_SW + pw
            acc = accs[s * P + p]
            if HAS_BIAS:
                acc += bias
            if PHASE_MAY_BE_EMPTY:
                acc = tl.where(phase_ok, acc, 0.0)
            tl.store(y_lane + (out_row * syh + out_col * syw), acc.to(y_ptr.dtype.element_ty),
                     mask=c_ok & (out_row < HO) & (out_col < WO))


@triton.jit
def _row_walk(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, HO, WO, CG,
    sxb, sxc, sxh, sxw,
    swb, swg, swu, swv,
    sbb, sbc,
    syb, syc, syh, syw,
    PH, PW, TILES_PHASE, TILES_W, RUN,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, KS: tl.constexpr,
    IS_DX: tl.constexpr, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, INV_H: tl.constexpr, INV_W: tl.constexpr,
    FIRST_TAP_MAY_MISS: tl.constexpr, PHASE_MAY_BE_EMPTY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, P: tl.constexpr, INTERIOR: tl.constexpr,
    VEC: tl.constexpr, VEC_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr, FLAT: tl.constexpr, INSIDE_SRC: tl.constexpr,
    INSIDE_OUT: tl.constexpr, FENCE_ROWS: tl.constexpr,
):
    """_tap_sums's sum when source rows step one per output row and per tap row (forward SH = DH = 1;
    input gradient DH/gcd(SH, DH) = 1), walking down the rows instead of unrolling them.

    Each thread owns P output columns of a run of RUN output rows of one channel. A run-time loop
    takes the run's source rows one by one: a row's P + TAPS_W - 1 columns are loaded once and feed
    all TAPS_H x TAPS_W taps of the TAPS_H output rows in flight (a window of accumulators: slot a
    holds the output row that reads this source row through tap row a). The oldest row is then
    complete: stored, and the window shifts. Source rows outside the image are skipped, not loaded
    as zeros. The loop body stays small (fast to compile) while every loaded element serves up to
    TAPS_H * min(P, TAPS_W) multiply-adds.

    With VEC (NCHW at unit column strides, the launcher's _vector_width; VEC_PAD the source column
    padding, known when compiled then) the unmasked walk loads a row's halo as VEC-wide vectors from
    the aligned column at or before its first, and stores an output row's P columns as vectors.

    Every output row must read at least one source row (the launcher checks: _rows_reached), so the
    walk is the kernel's one loop (two with INTERIOR: the unmasked walk, then the masked one; see
    _walk_rows): rows of bias alone would need loops of their own, which ptxas unrolls or not
    depending on the tile, and the static model could no longer tell which SASS loop the declared
    trip counts belong to.

    FLAT (BLOCK_C = 1; the launcher's _flat_fits: NCHW 16-bit at unit column strides, VEC > 1, widths
    multiples of VEC): the lanes lie along the flattened (channel, column block) axis, TILES_W blocks
    a row, so no lane idles where a row's blocks are no power of two (56 columns: 7 blocks of 8), and
    the one walk is masked but still reads and writes vectors: aligned to VEC in a width that is a
    multiple of VEC, a vector lies wholly in the image or wholly out, so one flag masks it. Bit j of
    INSIDE_SRC (INSIDE_OUT): source (output) vector j lies in the image in every lane, and every lane
    is a real (channel, block) (the launcher's _flat_inside), so it takes no mask at all.
    FENCE_ROWS (FLAT): each row's halo joined to a fence's zero (_fenced_halo, the launcher's
    FLAT_FENCED_ROWS).
    """
    b, tile, ph, pw, u_first, v_first, pad_h, pad_w, sxh, sxw, swu, swv, syh, syw = _program(
        TILES_PHASE, PH, PW, sxh, sxw, swu, swv, syh, syw, SH, SW, DH, DW, IS_DX, TAPS_H, TAPS_W, GH, GW, INV_H, INV_W,
        INDEX_64)
    if IS_DX:
        U_STEP: tl.constexpr = -(SH // GH)
        V_STEP: tl.constexpr = -(SW // GW)
        SRC_SW: tl.constexpr = 1
        SRC_DW: tl.constexpr = DW // GW
        OUT_SH: tl.constexpr = SH
        OUT_SW: tl.constexpr = SW
    else:
        U_STEP: tl.constexpr = 1
        V_STEP: tl.constexpr = 1
        SRC_SW: tl.constexpr = SW
        SRC_DW: tl.constexpr = DW
        OUT_SH: tl.constexpr = 1
        OUT_SW: tl.constexpr = 1
    if FLAT:
        # Lanes: BLOCK_W (channel, column block) pairs, flattened; tiles: row runs.
        f = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = f // TILES_W
        col0 = (f % TILES_W) * P
        row0 = tile * RUN
    else:
        # Lanes: BLOCK_C channels x BLOCK_W column blocks; tiles: column blocks x row runs.
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col0 = ((tile % TILES_W) * BLOCK_W + tl.arange(0, BLOCK_W)) * P
        row0 = (tile // TILES_W) * RUN
    if INDEX_64:
        c = c.to(tl.int64)
        col0 = col0.to(tl.int64)
    if FLAT:
        c2 = c[None, :]
    else:
        c2 = c[:, None]
    col0 = col0[None, :]
    c_ok = c2 < C
    w_lane = w_ptr + b * swb + (c2 // CG) * swg
    zero = tl.zeros((BLOCK_C, BLOCK_W), dtype=ACC_DTYPE)
    # Tensors, not scalars: the interpreter's scalars make masks it cannot read.
    u_ok = (tl.zeros((BLOCK_C, 1), dtype=tl.int32) + u_first) < KS
    v_ok = (tl.zeros((BLOCK_C, 1), dtype=tl.int32) + v_first) < KS
    wts = ()
    for a in tl.static_range(TAPS_H):
        for e in tl.static_range(TAPS_W):
            w_ok = c_ok
            if FIRST_TAP_MAY_MISS:
                if a == 0:
                    w_ok = w_ok & u_ok
                if e == 0:
                    w_ok = w_ok & v_ok
            wv = tl.load(w_lane + ((u_first + a * U_STEP) * swu + (v_first + e * V_STEP) * swv), mask=w_ok, other=0.0)
            # Broadcast once: a broadcast per multiply-add makes triton's layout passes crawl.
            wts = wts + (wv.to(ACC_DTYPE) + zero,)
    HALO_W: tl.constexpr = (P - 1) * SRC_SW + (TAPS_W - 1) * SRC_DW + 1
    LEAD: tl.constexpr = -VEC_PAD % VEC if VEC > 1 else 0
    REACH: tl.constexpr = (LEAD + HALO_W + VEC - 1) // VEC * VEC if VEC > 1 else HALO_W
    w_first = col0 * SRC_SW - pad_w
    # The masked walk's flags: a column's (FLAT: a vector's) source in the image, output in it.
    cols_ok = ()
    outs_ok = ()
    if FLAT:
        # A constant true mask: triton drops it (no predicate, no zero fill).
        inside = tl.full(c_ok.shape, 1, tl.int1)
        for j in tl.static_range(REACH // VEC):
            if (INSIDE_SRC >> j) & 1:
                cols_ok = cols_ok + (inside,)
            else:
                cols_ok = cols_ok + (c_ok & (w_first - LEAD + j * VEC >= 0) & (w_first - LEAD + j * VEC < W),)
        for j in tl.static_range(P // VEC):
            if (INSIDE_OUT >> j) & 1:
                outs_ok = outs_ok + (inside,)
            else:
                outs_ok = outs_ok + (c_ok & (col0 + j * VEC < WO),)
    else:
        for qc in tl.static_range(HALO_W):
            cols_ok = cols_ok + (c_ok & (w_first + qc >= 0) & (w_first + qc < W),)
        for p in tl.static_range(P):
            outs_ok = outs_ok + (c_ok & ((col0 + p) * OUT_SW + pw < WO),)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * sbb + c2 * sbc, mask=c_ok, other=0.0).to(ACC_DTYPE) + zero
    else:
        bias = zero
    # False where no tap reaches this phase (the dilation and stride share a factor its offset
    # lacks): dx is zero there.
    live = (tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.int32) + ((ph + PH) % GH + (pw + PW) % GW)) == 0
    # Output rows [row0, row_end) of the run; source row t serves output row t + pad_h - a via tap slot a.
    row_end = tl.minimum(row0 + RUN, (HO - ph + OUT_SH - 1) // OUT_SH)
    t_first = tl.maximum(row0 - pad_h, 0)
    t_last = tl.minimum(row_end - 1 - pad_h + TAPS_H - 1, H - 1)
    src_lane = x_ptr + b * sxb + c2 * sxc + w_first * sxw
    y_lane = y_ptr + b * syb + c2 * syc + (col0 * OUT_SW + pw) * syw
    # The vectors' first columns, each one constant off col0: triton proves their alignment only so.
    src_vectors = x_ptr + b * sxb + c2 * sxc + (col0 - (VEC_PAD + LEAD)) * sxw
    y_vectors = y_ptr + b * syb + c2 * syc + col0 * syw
    # A program whose channels all exist and whose columns (read and written) all lie in the image
    # walks without a mask: where most programs are such (channels_last, one column block a
    # program), the masks' predicates and zero fills were a fifth of the loop's issue slots.
    # INTERIOR (the launcher's choice: channels_last, or NCHW with VEC) compiles both walks; else
    # only the masked one.
    first = (tile % TILES_W) * (BLOCK_W * P)
    interior = (INTERIOR & ((tl.program_id(1) + 1) * BLOCK_C <= C) & (first * SRC_SW - pad_w - LEAD >= 0)
                & ((first + (BLOCK_W - 1) * P) * SRC_SW - pad_w - LEAD + REACH <= W)
                & ((first + BLOCK_W * P - 1) * OUT_SW + pw < WO))
    # Each output row's sum starts from the bias (no add per stored element).
    window = ()
    for k in tl.static_range(TAPS_H * P):
        window = window + (bias,)
    # The batches: the interior programs' unmasked walk, or, with no such walk compiled, the masked
    # one's. The rows they leave, and the masked programs' with an unmasked walk, go a row at a time:
    # five copies of the loop body in all (coalescing_work in kernels/_launch.py: ten took 37 s to
    # compile at R4).
    t_rest = t_first
    if interior:
        window, t_rest = _walk_rows(window, src_lane, y_lane, src_vectors, y_vectors, wts, bias, cols_ok, outs_ok,
                                    u_ok, v_ok, live, row0, row_end, t_first, t_last, pad_h, ph, sxh, sxw, syh, syw,
                                    HALO_W, TAPS_H, TAPS_W, P, SRC_SW, SRC_DW, OUT_SH, OUT_SW, FIRST_TAP_MAY_MISS,
                                    PHASE_MAY_BE_EMPTY, False, VEC, LEAD, REACH, INDEX_64, ACC_DTYPE, ROWS_AHEAD)
    if (not INTERIOR) and (not FLAT) and ROWS_AHEAD > 1:
        window, t_rest = _walk_rows(window, src_lane, y_lane, src_vectors, y_vectors, wts, bias, cols_ok, outs_ok,
                                    u_ok, v_ok, live, row0, row_end, t_first, t_last, pad_h, ph, sxh, sxw, syh, syw,
                                    HALO_W, TAPS_H, TAPS_W, P, SRC_SW, SRC_DW, OUT_SH, OUT_SW, FIRST_TAP_MAY_MISS,
                                    PHASE_MAY_BE_EMPTY, True, 1, 0, HALO_W, INDEX_64, ACC_DTYPE, ROWS_AHEAD)
    # The masked walk: vectors with FLAT, else a column at a time.
    MASKED_VEC: tl.constexpr = VEC if FLAT else 1
    MASKED_LEAD: tl.constexpr = LEAD if FLAT else 0
    MASKED_REACH: tl.constexpr = REACH if FLAT else HALO_W
    window, t_rest = _walk_rows(window, src_lane, y_lane, src_vectors, y_vectors, wts, bias, cols_ok, outs_ok, u_ok,
                                v_ok, live, row0, row_end, t_rest, t_last, pad_h, ph, sxh, sxw, syh, syw, HALO_W,
                                TAPS_H, TAPS_W, P, SRC_SW, SRC_DW, OUT_SH, OUT_SW, FIRST_TAP_MAY_MISS,
                                PHASE_MAY_BE_EMPTY, True, MASKED_VEC, MASKED_LEAD, MASKED_REACH, INDEX_64, ACC_DTYPE, 1,
                                FENCE_ROWS)
    # Rows whose last taps read past the image. Interior programs store them unmasked where they walk
    # a row at a time; after batches, masked (the batches' registers, PREDICTED at R4 on triton 3.6:
    # fp32 NHWC dx 100% so, 89% unmasked; triton 3.9, one row a time: dx fp32 NCHW 62% unmasked, 53%).
    if (ROWS_AHEAD == 1) & interior:
        _store_tail(y_lane, y_vectors, window, t_last, row0, row_end, pad_h, OUT_SH, ph, syh, syw, outs_ok, live,
                    TAPS_H, P, OUT_SW, PHASE_MAY_BE_EMPTY, False, VEC)
    else:
        _store_tail(y_lane, y_vectors, window, t_last, row0, row_end, pad_h, OUT_SH, ph, syh, syw, outs_ok, live,
                    TAPS_H, P, OUT_SW, PHASE_MAY_BE_EMPTY, True, MASKED_VEC)


@triton.jit
def _store_tail(y_lane, y_vectors, window, t_last, row0, row_end, pad_h, OUT_SH: tl.constexpr, ph, syh, syw, outs_ok,
                live, TAPS_H: tl.constexpr, P: tl.constexpr, OUT_SW: tl.constexpr, PHASE_MAY_BE_EMPTY: tl.constexpr,
                MASKED: tl.constexpr, VEC: tl.constexpr):
    """The output rows whose last taps read past source row t_last (the image's or the run's last):
    window slot a (of a = 1..TAPS_H - 1) holds row t_last + 1 + pad_h - a."""
    for a in tl.static_range(1, TAPS_H):
        i = t_last + 1 + pad_h - a
        _store_row(y_lane, y_vectors, window, a * P, i, row0, row_end, OUT_SH, ph, syh, syw, outs_ok, live, P,
                   OUT_SW, PHASE_MAY_BE_EMPTY, MASKED, VEC)


@triton.jit
def _walk_rows(window, src_lane, y_lane, src_vectors, y_vectors, wts, bias, cols_ok, outs_ok, u_ok, v_ok, live, row0,
               row_end, t_first, t_last, pad_h, ph, sxh, sxw, syh, syw, HALO_W: tl.constexpr, TAPS_H: tl.constexpr,
               TAPS_W: tl.constexpr, P: tl.constexpr, SRC_SW: tl.constexpr, SRC_DW: tl.constexpr,
               OUT_SH: tl.constexpr, OUT_SW: tl.constexpr, FIRST_TAP_MAY_MISS: tl.constexpr,
               PHASE_MAY_BE_EMPTY: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr, LEAD: tl.constexpr,
               REACH: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr,
               FENCED: tl.constexpr = False):
    """_row_walk's loop over the source rows from t_first: the window after them, and the first row
    it left. MASKED: the loads and stores keep their column and channel masks (cols_ok, outs_ok),
    else none; VEC > 1 (unmasked): rows read from ``src_vectors`` and written to ``y_vectors`` as
    vectors. ROWS_AHEAD = 1: every row to t_last, one at a time; > 1: whole batches of ROWS_AHEAD
    rows loaded behind a fence (the stores between rows kept ptxas from issuing a row's loads before
    the last row's sums: a round trip a row), the rows left to the caller."""
    if ROWS_AHEAD > 1:
        t_rest = t_first + (t_last + 1 - t_first) // ROWS_AHEAD * ROWS_AHEAD
        fence_at = y_lane.to(tl.pointer_type(tl.int32), bitcast=True)
        for t0 in range(t_first, t_rest, ROWS_AHEAD):
            if INDEX_64:
                t0 = tl.cast(t0, tl.int64)
            batch = ()
            for d in tl.static_range(ROWS_AHEAD):
                batch = batch + (_halo(src_lane + (t0 + d) * sxh, src_vectors + (t0 + d) * sxh, cols_ok, sxw, HALO_W,
                                       MASKED, VEC, LEAD, REACH, ACC_DTYPE),)
            after = fence(fence_at, row_end).to(ACC_DTYPE)
            started = ()
            for k in tl.static_range(TAPS_H * P):
                started = started + (window[k] + after,)
            window = started
            for d in tl.static_range(ROWS_AHEAD):
                window = _walk_step(window, batch[d], t0 + d, wts, bias, u_ok, v_ok, live, y_lane, y_vectors, outs_ok,
                                    row0, row_end, pad_h, ph, syh, syw, TAPS_H, TAPS_W, P, SRC_SW, SRC_DW, OUT_SH,
                                    OUT_SW, FIRST_TAP_MAY_MISS, PHASE_MAY_BE_EMPTY, MASKED, VEC)
    else:
        t_rest = t_last + 1
        for t in range(t_first, t_rest):
            if INDEX_64:
                t = tl.cast(t, tl.int64)  # tl.cast, not .to: the interpreter's loop indices are Python ints
            xs = _halo(src_lane + t * sxh, src_vectors + t * sxh, cols_ok, sxw, HALO_W, MASKED, VEC, LEAD, REACH,
                       ACC_DTYPE)
            if FENCED:
                xs = _fenced_halo(xs, fence(y_lane.to(tl.pointer_type(tl.int32), bitcast=True), row_end), LEAD)
            window = _walk_step(window, xs, t, wts, bias, u_ok, v_ok, live, y_lane, y_vectors, outs_ok, row0,
                                row_end, pad_h, ph, syh, syw, TAPS_H, TAPS_W, P, SRC_SW, SRC_DW, OUT_SH, OUT_SW,
                                FIRST_TAP_MAY_MISS, PHASE_MAY_BE_EMPTY, MASKED, VEC)
    return window, t_rest


@triton.jit
def _fenced_halo(xs, after, LEAD: tl.constexpr, VECTORS: tl.constexpr = True):
    """A 16-bit row's widened columns (vectors from LEAD; else scalars) joined to the fence's zero
    ``after`` (int32), so that no sum starts before the fence and every load of the row goes out
    before it (ptxas may issue a row's last vector after the first one's sums, in the register they
    freed: a second round trip a row). Free in bf16, where the widening is: a scalar's or an even
    column's shift and the add are one LEA, an odd column's mask and the or one LOP3; an integer
    add a column in fp16."""
    fenced = ()
    for qc in tl.static_range(len(xs)):
        bits = xs[qc].to(tl.int32, bitcast=True)
        if (LEAD + qc) % 2 == 0 or not VECTORS:
            bits = bits + after
        else:
            bits = bits | after
        fenced = fenced + (bits.to(tl.float32, bitcast=True),)
    return fenced


@triton.jit
def _walk_step(window, xs, t, wts, bias, u_ok, v_ok, live, y_lane, y_vectors, outs_ok, row0, row_end, pad_h, ph, syh,
               syw, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, P: tl.constexpr, SRC_SW: tl.constexpr,
               SRC_DW: tl.constexpr, OUT_SH: tl.constexpr, OUT_SW: tl.constexpr, FIRST_TAP_MAY_MISS: tl.constexpr,
               PHASE_MAY_BE_EMPTY: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr):
    """One step of _walk_rows: source row t's columns ``xs`` into every tap of the window's rows; the
    oldest row, then complete, stored; the window shifted."""
    new = ()
    for a in tl.static_range(TAPS_H):
        for p in tl.static_range(P):
            acc = window[a * P + p]
            for e in tl.static_range(TAPS_W):
                acc = _add_tap(acc, wts[a * TAPS_W + e] * xs[p * SRC_SW + e * SRC_DW], a, e, u_ok, v_ok,
                               FIRST_TAP_MAY_MISS)
            new = new + (acc,)
    # Slot TAPS_H - 1 (output row t + pad_h - TAPS_H + 1) has all its taps: store it, shift the window.
    i = t + pad_h - (TAPS_H - 1)
    _store_row(y_lane, y_vectors, new, (TAPS_H - 1) * P, i, row0, row_end, OUT_SH, ph, syh, syw, outs_ok, live, P,
               OUT_SW, PHASE_MAY_BE_EMPTY, MASKED, VEC)
    window = ()
    for p in tl.static_range(P):
        window = window + (bias,)
    for k in tl.static_range((TAPS_H - 1) * P):
        window = window + (new[k],)
    return window


@triton.jit
def _store_row(y_lane, y_vectors, window, first, i, row0, row_end, OUT_SH: tl.constexpr, ph, syh, syw, outs_ok,
               live, P: tl.constexpr, OUT_SW: tl.constexpr, PHASE_MAY_BE_EMPTY: tl.constexpr, MASKED: tl.constexpr,
               VEC: tl.constexpr):
    """Store output row ``i`` (window[first:first + P], bias included) when it lies in this run (and,
    MASKED, the columns and channels outs_ok keeps); VEC > 1: as vectors from ``y_vectors``."""
    i = tl.zeros(live.shape, dtype=tl.int32) + i  # a tensor: the interpreter's scalars make unreadable masks
    row_ok = (i >= row0) & (i < row_end)
    if VEC > 1:
        columns = ()
        for p in tl.static_range(P):
            acc = window[first + p]
            if PHASE_MAY_BE_EMPTY:
                acc = tl.where(live, acc, 0.0)
            columns = columns + (acc.to(y_vectors.dtype.element_ty),)
        if MASKED:
            oks = ()
            for j in tl.static_range(P // VEC):
                oks = oks + (row_ok & outs_ok[j],)
            _store_vectors(y_vectors + (i * OUT_SH + ph) * syh, oks, columns, P, VEC, True)
        else:
            _store_vectors(y_vectors + (i * OUT_SH + ph) * syh, row_ok, columns, P, VEC)
    else:
        y_row = y_lane + (i * OUT_SH + ph) * syh
        for p in tl.static_range(P):
            acc = window[first + p]
            if PHASE_MAY_BE_EMPTY:
                acc = tl.where(live, acc, 0.0)
            if MASKED:
                tl.store(y_row + p * OUT_SW * syw, acc.to(y_lane.dtype.element_ty), mask=outs_ok[p] & row_ok)
            else:
                tl.store(y_row + p * OUT_SW * syw, acc.to(y_lane.dtype.element_ty), mask=row_ok)


@triton.jit
def dwconv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, HO, WO, CG,
    sxb, sxc,
    swb, swg, swu, swv,
    sbb, sbc,
    syb, syc,
    PH, PW, TILES, TILES_W, RUN,
    sxh: tl.constexpr, sxw: tl.constexpr, syh: tl.constexpr, syw: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, KS: tl.constexpr,
    WALK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, S: tl.constexpr,
    P: tl.constexpr, INTERIOR: tl.constexpr, VEC: tl.constexpr, VEC_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr = 1, FLAT: tl.constexpr = False,
    INSIDE_SRC: tl.constexpr = 0, INSIDE_OUT: tl.constexpr = 0, FENCE_ROWS: tl.constexpr = False,
):
    """The forward: x (B, C, H, W), y (B, C, HO, WO), w (B, C // CG, KS, KS); WALK: _row_walk (SH = DH = 1),
    else _tap_sums."""
    if WALK:
        _row_walk(x_ptr, w_ptr, bias_ptr, y_ptr, C, H, W, HO, WO, CG, sxb, sxc, sxh, sxw, swb, swg, swu, swv, sbb, sbc,
                  syb, syc, syh, syw, PH, PW, TILES, TILES_W, RUN, SH, SW, DH, DW, KS, False, KS, KS, 1, 1, 0, 0,
                  False, False, BLOCK_C, BLOCK_W, P, INTERIOR, VEC, VEC_PAD, HAS_BIAS, INDEX_64, ACC_DTYPE, ROWS_AHEAD,
                  FLAT, INSIDE_SRC, INSIDE_OUT, FENCE_ROWS)
    else:
        _tap_sums(x_ptr, w_ptr, bias_ptr, y_ptr, C, H, W, HO, WO, CG, sxb, sxc, sxh, sxw, swb, swg, swu, swv, sbb, sbc,
                  syb, syc, syh, syw, PH, PW, TILES, TILES_W, SH, SW, DH, DW, KS, False, KS, KS, 1, 1, 0, 0, False, False,
                  BLOCK_C, BLOCK_H, BLOCK_W, S, P, HAS_BIAS, INDEX_64, ACC_DTYPE)


@triton.jit
def dwconv_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    C, H, W, HO, WO, CG,
    sdyb, sdyc,
    swb, swg, swu, swv,
    sdxb, sdxc,
    PH, PW, TILES_PHASE, TILES_W, RUN,
    sdyh: tl.constexpr, sdyw: tl.constexpr, sdxh: tl.constexpr, sdxw: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, KS: tl.constexpr,
    TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
    GH: tl.constexpr, GW: tl.constexpr, INV_H: tl.constexpr, INV_W: tl.constexpr,
    FIRST_TAP_MAY_MISS: tl.constexpr, PHASE_MAY_BE_EMPTY: tl.constexpr,
    WALK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, S: tl.constexpr,
    P: tl.constexpr, INTERIOR: tl.constexpr, VEC: tl.constexpr, VEC_PAD: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr = 1, FLAT: tl.constexpr = False,
    INSIDE_SRC: tl.constexpr = 0, INSIDE_OUT: tl.constexpr = 0, FENCE_ROWS: tl.constexpr = False,
):
    """The input gradient by stride phase: dy (B, C, H, W), dx (B, C, HO, WO); SH, SW, DH, DW, PH, PW and KS
    the forward's; the grid's first axis runs over (sample, phase, tile). WALK: _row_walk (DH/gcd(SH, DH) = 1),
    else _tap_sums."""
    if WALK:
        _row_walk(dy_ptr, w_ptr, dy_ptr, dx_ptr, C, H, W, HO, WO, CG, sdyb, sdyc, sdyh, sdyw, swb, swg, swu, swv, 0, 0,
                  sdxb, sdxc, sdxh, sdxw, PH, PW, TILES_PHASE, TILES_W, RUN, SH, SW, DH, DW, KS, True, TAPS_H, TAPS_W,
                  GH, GW, INV_H, INV_W, FIRST_TAP_MAY_MISS, PHASE_MAY_BE_EMPTY, BLOCK_C, BLOCK_W, P, INTERIOR, VEC,
                  VEC_PAD, False, INDEX_64, ACC_DTYPE, ROWS_AHEAD, FLAT, INSIDE_SRC, INSIDE_OUT, FENCE_ROWS)
    else:
        _tap_sums(dy_ptr, w_ptr, dy_ptr, dx_ptr, C, H, W, HO, WO, CG, sdyb, sdyc, sdyh, sdyw, swb, swg, swu, swv, 0, 0,
                  sdxb, sdxc, sdxh, sdxw, PH, PW, TILES_PHASE, TILES_W, SH, SW, DH, DW, KS, True, TAPS_H, TAPS_W,
                  GH, GW, INV_H, INV_W, FIRST_TAP_MAY_MISS, PHASE_MAY_BE_EMPTY, BLOCK_C, BLOCK_H, BLOCK_W, S, P, False,
                  INDEX_64, ACC_DTYPE)


@triton.jit
def _row_vectors(row, ok, COLUMNS: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 PER_VECTOR: tl.constexpr = False):
    """The COLUMNS consecutive elements from each lane's ``row`` pointer (aligned to VEC elements, a
    multiple of VEC of them), loaded as VEC-wide vectors (masked by ``ok`` alone, one flag a lane, or
    none; PER_VECTOR: ``ok[j]`` masks vector j) and split into a tuple of per-column tensors, widened
    to ACC_DTYPE."""
    lanes = tl.arange(0, VEC)[None, None, :]
    columns = ()
    for j in tl.static_range(COLUMNS // VEC):
        if ok is None:
            v = tl.load(row[:, :, None] + (j * VEC + lanes))
        elif PER_VECTOR:
            v = tl.load(row[:, :, None] + (j * VEC + lanes), mask=ok[j][:, :, None], other=0.0)
        else:
            v = tl.load(row[:, :, None] + (j * VEC + lanes), mask=ok[:, :, None], other=0.0)
        v = _widen(v, ACC_DTYPE)
        if VEC == 2:
            a, b = tl.split(v)
            columns = columns + (a, b)
        else:
            # (v0, v2), (v1, v3): the split of the last of (.., 2, 2) takes every other element.
            even, odd = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2)))
            v0, v2 = tl.split(even)
            v1, v3 = tl.split(odd)
            columns = columns + (v0, v1, v2, v3)
    return columns


@triton.jit
def _halo(row, vector_row, cols_ok, sxw, HALO_W: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr,
          LEAD: tl.constexpr, REACH: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """A source row's HALO_W columns of each lane, widened: VEC > 1 the REACH columns from
    ``vector_row`` as vectors (_row_vectors; MASKED: vector j by cols_ok[j]), the halo LEAD columns
    into them; else a load a column from ``row`` (MASKED: by cols_ok)."""
    xs = ()
    if VEC > 1:
        if MASKED:
            vectors = _row_vectors(vector_row, cols_ok, REACH, VEC, ACC_DTYPE, True)
        else:
            vectors = _row_vectors(vector_row, None, REACH, VEC, ACC_DTYPE)
        for qc in tl.static_range(HALO_W):
            xs = xs + (vectors[LEAD + qc],)
    else:
        for qc in tl.static_range(HALO_W):
            if MASKED:
                xv = tl.load(row + qc * sxw, mask=cols_ok[qc], other=0.0)
            else:
                xv = tl.load(row + qc * sxw)
            xs = xs + (_widen(xv, ACC_DTYPE),)
    return xs


@triton.jit
def _store_vectors(row, ok, columns, COLUMNS: tl.constexpr, VEC: tl.constexpr, PER_VECTOR: tl.constexpr = False):
    """Store the tuple ``columns`` (COLUMNS per-column tensors, a multiple of VEC) as VEC-wide vectors
    from each lane's ``row`` pointer (aligned to VEC elements), masked by ``ok`` (one flag a lane;
    PER_VECTOR: ``ok[j]`` vector j's): _row_vectors the other way."""
    lanes = tl.arange(0, VEC)[None, None, :]
    for j in tl.static_range(COLUMNS // VEC):
        if VEC == 2:
            v = tl.join(columns[2 * j], columns[2 * j + 1])
        else:
            # (v0, v2) and (v1, v3) joined on a last axis of (.., 2, 2) interleave back to v0..v3.
            even = tl.join(columns[4 * j], columns[4 * j + 2])
            odd = tl.join(columns[4 * j + 1], columns[4 * j + 3])
            v = tl.reshape(tl.join(even, odd), (even.shape[0], even.shape[1], 4))
        if PER_VECTOR:
            tl.store(row[:, :, None] + (j * VEC + lanes), v, mask=ok[j][:, :, None])
        else:
            tl.store(row[:, :, None] + (j * VEC + lanes), v, mask=ok[:, :, None])


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def handles(weight: torch.Tensor, config: dict | None) -> bool:
    """Whether the forward and input gradient of ``weight`` run here: a per-sample weight of K <= MAX_K,
    with no explicit config or one of these kernels' (P in it)."""
    return weight.dim() == 4 and weight.shape[2] <= MAX_K and (config is None or "P" in config)


@functools.lru_cache(maxsize=1024)
def _taps_config(B: int, C: int, height: int, width: int, K: int, channels_last: bool, walk: bool,
                 input_grad: bool, dtype_bytes: int, weight_grad: bool = False, unit_columns: bool = False,
                 flat: bool = True) -> dict:
    """Tile over ``height x width`` output pixels of one program set.

    walk (_row_walk): P output columns per thread, the window of K*P accumulators and the K*K held
    weights sharing the register budget; runs of RUN rows (whole columns, split only when there are
    too few threads: a run's first and last K-1 source rows feed fewer taps). Otherwise (_tap_sums, a
    strided or dilated forward): S x P outputs per thread, kept small, since all its taps are
    unrolled in one block. Lanes: BLOCK_C channels (channels_last: up to 32, coalesced), and BLOCK_W
    (x BLOCK_H) pixel blocks; the least estimated issue, then the most lanes. ``flat``: the 16-bit
    NCHW walk at unit column strides takes _row_walk's FLAT lanes (FLAT_WALK_P) where the launcher
    can (_flat_fits; else it asks again with ``flat`` off).
    """
    if flat and walk and not channels_last and not weight_grad and dtype_bytes == 2 and unit_columns \
            and K <= FLAT_WALK_MAX_K and width % 4 == 0:
        config = {"BLOCK_C": 1, "BLOCK_H": 1, "BLOCK_W": 32, "S": 1, "P": FLAT_WALK_P, "num_warps": 1,
                  "num_stages": 1, "FLAT": 1}
        config["RUN"] = _run(B * C * cdiv(width, FLAT_WALK_P), height, K)
        return config
    best = None
    rows = (1,) if walk else range(1, min(4, height) + 1)
    # channels_last 16-bit walk: two adjacent channels a thread, one 32-bit load (and store) for both,
    # so a column's load, mask and address serve twice the multiply-adds (R4 fwd/dx bf16 NHWC
    # PREDICTED 72/71% -> 82/81% on triton 3.6). Twice the weights and sums: at K = 7, P = 7 the
    # forward and input gradient take 217-254 registers (no spill, sm_80/sm_90, both tritons), from
    # K = 8 more than 255; the weight gradient's sums spill fp16 at K = 7 (triton 3.9, sm_90).
    vec = 2 if walk and channels_last and dtype_bytes == 2 and K <= (5 if weight_grad else 7) and C >= 64 else 1
    for s in rows:
        # P = 7 at K = 7 (49 sums, 49 weights): the channels_last 16-bit input gradient spilled there
        # with triton 3.9's ptxas for sm_80 until its row and column strides became compile-time
        # constants (no 64-bit address a column); now 150 registers, no spill, on sm_80/sm_90.
        cap = max(1, 49 // K) if walk else max(1, 64 // (s * K * K))
        for p in range(1, min(8, width, cap) + 1):
            # NCHW walks at unit column strides read a lane's columns as vectors of four (_vector_width).
            vectors = (walk and unit_columns and not channels_last and width >= 4
                       and (weight_grad or 4 * (dtype_bytes or 4) >= WALK_VECTOR_BYTES))
            if vectors and p % 4:
                continue
            # NCHW: at least the channels that fill a warp's lanes along one row; the walk also tries
            # more channels and fewer lanes along W (lanes P columns apart share fewer sectors).
            fill = min(next_power_of_2(C), 32 * vec if channels_last else max(1, 32 // next_power_of_2(cdiv(width, p))))
            widths = (fill,) if channels_last or not walk else tuple(
                c for c in (1, 2, 4, 8, 16, 32) if fill <= c <= min(32, next_power_of_2(C)))
            for block_c, warps in itertools.product(widths, (1, 2, 4)):
                lanes = 32 * warps * vec // block_c
                if lanes < 1:
                    continue
                for block_h in ((1,) if walk else (1 << i for i in range(lanes.bit_length()))):
                    block_w = lanes // block_h
                    if walk:
                        padded = height * cdiv(width, block_w * p) * block_w * p * cdiv(C, block_c) * block_c
                        halo = (p + K - 1) / (p * K)
                    else:
                        padded = (cdiv(height, block_h * s) * block_h * s * cdiv(width, block_w * p) * block_w * p
                                  * cdiv(C, block_c) * block_c)
                        halo = (s + K - 1) * (p + K - 1) / (s * p * K * K)
                    # Issue per output: a multiply-add per tap plus about four instructions (load,
                    # mask, convert, address) per loaded element, shared by the taps that read it.
                    cost = padded * (1 + 4 * halo / vec)
                    if walk and channels_last:
                        # Column tiles off the image's edges walk unmasked (_row_walk's interior
                        # programs, the weight gradient's interior tiles): about 1.5 of the four
                        # fewer. The edge tiles estimated as the first and the last.
                        tiles_w = cdiv(width, block_w * p)
                        cost = padded * (1 + (4 - 1.5 * (tiles_w - min(tiles_w, 2)) / tiles_w) * halo / vec)
                    if walk and not channels_last:
                        # NCHW walk: lanes P columns apart load scalars, and L1 can bind before issue.
                        # Both fitted to the static model's bounds of triton 3.6's sm_90 SASS at R4
                        # NCHW fp32 over eight tiles (within 5% issue, 10% L1): issue ~ 1 + 1.14 halo,
                        # L1 ~ the 32-byte sectors one warp-wide load touches. Vectors: issue alone
                        # (R4 dw fp32 1.41 instructions a multiply-add PREDICTED, L1 at 57% of issue).
                        l1 = 0 if vectors else 0.059 * _nchw_sectors(block_c, block_w, p, dtype_bytes or 4)
                        cost = padded * max(1 + 1.14 * halo, l1)
                    # On a tie, the fewest channels a program (the narrowest tile), then the most warps.
                    score = (round(cost), block_c, -warps, -block_w)
                    if best is None or score < best[0]:
                        best = (score, {"BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w, "S": s, "P": p,
                                        "num_warps": warps, "num_stages": 1, "FLAT": 0})
    config = best[1]
    if walk:
        config["RUN"] = _run(B * cdiv(C, config["BLOCK_C"]) * config["BLOCK_C"] // vec * cdiv(width, config["P"]),
                             height, K)
    else:
        config["RUN"] = 0
    return config


def _run(threads: int, height: int, K: int) -> int:
    """A walk's RUN: whole columns, split only when there are too few threads."""
    return cdiv(height, max(1, min(cdiv(2**16, threads), height // (4 * K))))


def _nchw_sectors(block_c: int, block_w: int, p: int, nbytes: int) -> float:
    """32-byte sectors one warp's load of a row element touches in NCHW: lanes along W (W-fastest),
    P columns apart, the rest of the warp on other channels' rows; averaged over the row's alignment."""
    along_w = min(block_w, 32)
    offsets = range(0, 32, nbytes)
    distinct = sum(len({(o + lane * p * nbytes) // 32 for lane in range(along_w)}) for o in offsets) / len(offsets)
    return 32 // along_w * distinct


def taps_config(B: int, C: int, height: int, width: int, K: int, channels_last: bool, walk: bool,
                input_grad: bool = False, dtype_bytes: int = 0, weight_grad: bool = False,
                unit_columns: bool = False, flat: bool = True) -> dict:
    """The forward's (input gradient's, weight gradient's) own tile over ``height x width`` output
    (input) pixels (a copy); ``unit_columns``: the layer's column stride and dilation are 1."""
    return dict(_taps_config(B, C, height, width, K, channels_last, walk, input_grad, dtype_bytes, weight_grad,
                             unit_columns, flat))


def _walks(stride: int, dilation: int, input_grad: bool) -> bool:
    """Whether consecutive output rows read consecutive source rows, tap row after tap row (_row_walk)."""
    return dilation // math.gcd(stride, dilation) == 1 if input_grad else stride == 1 and dilation == 1


def forward_default(x, K: int, stride, dilation, Ho: int, Wo: int, flat: bool = True) -> dict:
    """The forward's own tile (a copy)."""
    return taps_config(x.shape[0], x.shape[1], Ho, Wo, K, is_channels_last(x), _walks(stride[0], dilation[0], False),
                       False, x.element_size(), unit_columns=stride[1] == 1 and dilation[1] == 1, flat=flat)


def input_grad_default(dx, K: int, stride, dilation, flat: bool = True) -> dict:
    """The input gradient's own tile over the pixels of one stride phase (a copy)."""
    B, C, H, W = dx.shape
    return taps_config(B, C, cdiv(H, stride[0]), cdiv(W, stride[1]), K, is_channels_last(dx),
                       _walks(stride[0], dilation[0], True), True, dx.element_size(),
                       unit_columns=stride[1] == 1 and dilation[1] == 1, flat=flat)


def forward_config(x, G: int, K: int, stride, dilation, Ho: int, Wo: int) -> dict:
    default = forward_default(x, K, stride, dilation, Ho, Wo)
    return get_config("dwconv_fwd", problem_key(x, G, K, stride), default)


def input_grad_config(dx, G: int, K: int, stride, dilation) -> dict:
    return get_config("dwconv_bwd_input", problem_key(dx, G, K, stride), input_grad_default(dx, K, stride, dilation))


def _grid(rows: int, C: int, block_c: int) -> tuple[int, int, int]:
    return (rows, cdiv(C, block_c), 1)


def _meta(config: dict) -> dict:
    return {**{k: config[k] for k in ("BLOCK_C", "BLOCK_H", "BLOCK_W", "S", "P")}, "FLAT": bool(config.get("FLAT"))}


def _tiles(config: dict, height: int, width: int, walk: bool = True) -> tuple[int, int]:
    """(tiles, tiles along W) of one program set: runs of RUN rows (walk) or BLOCK_H x S rows. FLAT:
    (runs, column blocks a row), the blocks being lanes."""
    if config.get("FLAT"):
        return cdiv(height, config["RUN"]), cdiv(width, config["P"])
    tiles_w = cdiv(width, config["BLOCK_W"] * config["P"])
    rows = config["RUN"] if walk and config["RUN"] else config["BLOCK_H"] * config["S"]
    return cdiv(height, rows) * tiles_w, tiles_w


def _phase_taps(stride: int, dilation: int) -> tuple[int, int, int]:
    """(gcd, step, inverse) of one axis: the taps u of a stride phase satisfy u*dilation = r (mod stride),
    solvable only when gcd | r, then u = (r/gcd) * inverse (mod step), step = stride/gcd."""
    g = math.gcd(stride, dilation)
    step = stride // g
    return g, step, pow(dilation // g, -1, step) if step > 1 else 0


def _phase_pads(stride: int, padding: int, dilation: int, K: int) -> tuple[int, list[int]]:
    """The input gradient's taps a stride phase along one axis, and each phase's source padding (as
    _program derives pad_h and pad_w: slot a reads source index i - pad + a*dilation/gcd)."""
    g, step, inverse = _phase_taps(stride, dilation)
    taps = cdiv(K, step)
    pads = []
    for phase in range(stride):
        r = phase + padding
        first = ((r // g) * inverse) % step
        pads.append((taps - 1) * (dilation // g) - (r - first * dilation) // stride)
    return taps, pads


def _rows_reached(source_rows: int, out_rows: int, stride: int, padding: int, dilation: int, K: int,
                  input_grad: bool) -> bool:
    """Whether every output row of every program set reads at least one source row through the walk's
    taps (_row_walk stores a row only from the step of a source row it reads). Not so when the padding
    is wider than the taps: those rows are the bias alone, and _tap_sums writes them."""
    if not input_grad:
        return padding <= K - 1 and out_rows <= source_rows + padding
    taps, pads = _phase_pads(stride, padding, dilation, K)
    for ph, pad in enumerate(pads):
        rows = cdiv(out_rows - ph, stride)
        # Output row i reads source rows i - pad .. i - pad + taps - 1.
        if rows > 0 and (pad > taps - 1 or rows > source_rows + pad):
            return False
    return True


def _walking(config: dict, stride, padding, dilation, source_rows: int, out_rows: int, K: int, input_grad: bool) -> bool:
    """Whether a launch walks: the config asks for it (RUN) and the geometry allows it. Tuned tables
    key no dilation, so a walking config can meet a dilated layer: it then takes _tap_sums, as a
    layer whose padding leaves output rows that read no source row."""
    return (bool(config["RUN"]) and _walks(stride[0], dilation[0], input_grad)
            and _rows_reached(source_rows, out_rows, stride[0], padding[0], dilation[0], K, input_grad))


# Source rows the walk loads as one batch behind a fence (_walk_rows; not every 16-bit walk, see
# _walk_rows_ahead). Triton 3.6's ptxas keeps them in registers at those walking tiles (R4 fwd/dx
# PREDICTED 43-75% -> 85-100%), newer tritons' too in fp32 (R4 fwd/dx fp32 on triton 3.9: NCHW
# 63/62% -> 88/89%, NHWC 75/68% -> 100%; 168 registers at most, no spill on sm_80/sm_90).
WALK_ROWS_AHEAD = 4
# Newer tritons' ptxas spills the 16-bit channels_last walk in batches even of two rows (thousands of
# stack bytes at R4), so there it walks a row at a time.
BATCHES_16BIT_CHANNELS_LAST = TRITON_VERSION <= (3, 6)


def _walk_rows_ahead(element_size: int, channels_last: bool) -> int:
    """The walk's rows a batch: WALK_ROWS_AHEAD, but one for 16-bit NCHW (sm_80's ptxas, capped at 168
    registers there, spilled in fp16: 40 bytes at four rows, 8 at two; R4 bf16 PREDICTED 74% at four)
    and, past triton 3.6, for 16-bit channels_last (BATCHES_16BIT_CHANNELS_LAST)."""
    if element_size == 2 and not (channels_last and BATCHES_16BIT_CHANNELS_LAST):
        return 1
    return WALK_ROWS_AHEAD


def _walk_loops(walk: bool, config: dict, source_rows: int, K: int, interior: float | None, ahead: int = 1) -> tuple:
    """Trip counts of _row_walk's loops (the source rows of a run), each as its mean over the programs:
    with INTERIOR (``interior``, the share of such programs) the unmasked walk of the interior
    programs, then the masked one; else the masked one alone. ``ahead`` > 1 (_walk_rows'
    ROWS_AHEAD): the first walk's trips are batches, and a row-at-a-time masked loop takes the
    rows its batches left (with INTERIOR, the masked walk's loop)."""
    if not walk:
        return ()
    trips = min(config["RUN"] + K - 1, source_rows)
    if interior is None:
        return (trips // ahead, trips % ahead) if ahead > 1 else (trips,)
    if ahead > 1:
        return (trips // ahead * interior, trips % ahead * interior + trips * (1 - interior))
    return (trips * interior, trips * (1 - interior))


def _inside_tiles(config: dict, source_w: int, out_w: int, K: int, stride: int, padding: int, dilation: int,
                  input_grad: bool, vec: int = 1) -> list[list[bool]]:
    """Per column stride phase (the input gradient's, as _program derives their padding; else one),
    whether each column tile's columns read and written all lie in the image (with ``vec``-wide
    vectors, from the aligned column at or before the halo's first: the kernels' LEAD and REACH)."""
    p = config["P"]
    span = config["BLOCK_W"] * p
    if input_grad:
        taps, pads = _phase_pads(stride, padding, dilation, K)
        src_sw, src_dw, out_sw = 1, dilation // math.gcd(stride, dilation), stride
        phases = list(enumerate(pads))
        tiles_w = cdiv(cdiv(out_w, stride), span)
    else:
        taps, src_sw, src_dw, out_sw = K, stride, dilation, 1
        phases = [(0, padding)]
        tiles_w = cdiv(out_w, span)
    halo = (p - 1) * src_sw + (taps - 1) * src_dw + 1
    inside = []
    for pw, pad in phases:
        lead, reach = _vector_reach(pad, halo, vec)
        inside.append([first * src_sw - pad - lead >= 0
                       and (first + span - p) * src_sw - pad - lead + reach <= source_w
                       and (first + span - 1) * out_sw + pw < out_w for first in range(0, tiles_w * span, span)])
    return inside


def _vector_reach(pad: int, halo: int, vec: int) -> tuple[int, int]:
    """(LEAD, REACH) of a halo row read as ``vec``-wide vectors (the kernels' constants): the columns
    from the aligned column at or before the halo's first to it, and the columns from that aligned
    column to the end of the vector that holds the halo's last."""
    lead = -pad % vec
    return lead, cdiv(lead + halo, vec) * vec


def _interior_share(config: dict, C: int, source_w: int, out_w: int, K: int, stride: int, padding: int,
                    dilation: int, input_grad: bool, vec: int = 1) -> float:
    """The share of a walk's programs that take its unmasked loop (_row_walk's ``interior``): every
    channel of the block exists (_channels_in_share) and its column tile lies inside (_inside_tiles)."""
    phases = _inside_tiles(config, source_w, out_w, K, stride, padding, dilation, input_grad, vec)
    return sum(map(sum, phases)) / sum(map(len, phases)) * _channels_in_share(config, C)


def _channels_in_share(config: dict, C: int) -> float:
    """The share of channel blocks whose channels all exist."""
    return (C // config["BLOCK_C"]) / cdiv(C, config["BLOCK_C"])


def _middle_tile(first_axis_block: int, tiles: int, tiles_w: int, C: int, block_c: int) -> tuple[int, int]:
    """The program of the middle row block and middle column tile (of the first phase, for the input
    gradient) of a sample, and of the middle channel block: the static model's typical program
    (``Launch.typical_program``). The grid's middle program is a sample's first tile, an edge, for
    any even batch."""
    return (first_axis_block * tiles + (tiles // tiles_w) // 2 * tiles_w + tiles_w // 2, cdiv(C, block_c) // 2)


def _vector_width(p: int, tensors, unit_columns: bool, min_bytes: int = 8) -> int:
    """The walks' VEC (_row_walk's, dwconv_bwd_weight_kernel's): four elements (two fp64) where each
    lane's P columns are contiguous and can start aligned in every tensor walked (``unit_columns``:
    the geometry's column stride and dilation are 1; NCHW tensors of unit column stride, P and the
    other strides multiples of the width) and a vector has at least ``min_bytes``; else 1.
    channels_last lanes already lie along the contiguous channels."""
    if not unit_columns or any(is_channels_last(t) or t.stride(3) != 1 for t in tensors):
        return 1
    vec = min(16 // tensors[0].element_size(), 4)
    if vec * tensors[0].element_size() < min_bytes:
        return 1
    aligned = p % vec == 0 and all(n % vec == 0 for t in tensors for n in t.stride()[:3])
    return vec if aligned else 1


# The 16-bit NCHW walks (forward, input gradient) take 135-140 registers a one-warp program on
# sm_90: 14 or 15 programs an SM. Capped at 128, 16 fit, and ptxas (triton 3.6 and 3.9) keeps them
# without a spill (PREDICTED, R4 bf16 NCHW fwd/dx: triton 3.6 54.8/52.5% -> 73.6/72.8%, 3.9
# 53.5/53.2% -> 72.3/71.2%; three waves of programs become two).
WALK_16BIT_NCHW_SM90_REGISTERS = 128


def _walk_register_cap(t: torch.Tensor, walk: bool) -> int:
    return WALK_16BIT_NCHW_SM90_REGISTERS if walk and t.element_size() == 2 and not is_channels_last(t) else 0


# The 16-bit NCHW walks at unit strides (forward, input gradient): FLAT lanes (_row_walk) of P = 8
# columns, read and written as 8-byte vectors, masked a vector at a time. Where a row's column blocks
# are no power of two (R4: 7 blocks of 8) no lane idles, and a row step spends 1.15 instructions a
# multiply-add where a load a column (P = 7) spent 1.33; vectors every lane reads inside the image
# take no mask (_flat_inside: no zero fill, no predicate). K*P sums and K*K weights: 128 registers
# at K = 7 (sm_90's cap, WALK_16BIT_NCHW_SM90_REGISTERS), no spill. PREDICTED (sm_90, triton
# 3.6 / 3.9): R4 fwd bf16 NCHW 73.6/72.3% -> 87.6/87.1%, dx 72.8/71.2% -> 86.0/86.7%.
FLAT_WALK_P = 8
FLAT_WALK_MAX_K = 7
FLAT_WALK_VECTOR_BYTES = 8


def _walk_vectors(config: dict, walk: bool, tensors, stride, dilation) -> int:
    """The walk's VEC (_vector_width): FLAT walks take 8-byte vectors, the others WALK_VECTOR_BYTES."""
    flat = config.get("FLAT", False)
    return _vector_width(config["P"], tensors, walk and stride[1] == 1 and dilation[1] == 1,
                         FLAT_WALK_VECTOR_BYTES if flat else WALK_VECTOR_BYTES)


def _flat_fits(config: dict, walk: bool, vec: int, stride, widths) -> bool:
    """Whether a FLAT config can run: one channel a lane row (BLOCK_C 1), a walk at unit strides whose
    vectors are aligned and whose source and output widths are multiples of them (a vector then lies
    wholly in a row or out)."""
    return (config["BLOCK_C"] == 1 and walk and vec > 1 and tuple(stride) == (1, 1)
            and all(w % vec == 0 for w in widths))


def _walk_plan(config: dict, walking, tensors, stride, dilation, widths, fallback) -> tuple[dict, bool, int]:
    """A launch's (config, whether it walks, VEC): ``walking(config)`` says whether it walks; a FLAT
    config that cannot run here (_flat_fits, over the source and output ``widths``) gives way to
    ``fallback()``, the launcher's own tile with flat off."""
    walk = walking(config)
    vec = _walk_vectors(config, walk, tensors, stride, dilation)
    if config.get("FLAT") and not _flat_fits(config, walk, vec, stride, widths):
        config = fallback()
        walk = walking(config)
        vec = _walk_vectors(config, walk, tensors, stride, dilation)
    return config, walk, vec


# The FLAT walks whose rows go behind a fence (_fenced_halo), by (element type, input gradient): those
# where ptxas issued a row's last vector into the register its first had freed, after that one's
# sums, and waited a second round trip a row (PREDICTED, R4 NCHW, sm_90, triton 3.6: bf16 dx 61.8% ->
# 84.6% fenced, fp16 fwd 123.5 us -> 90.0 us). Elsewhere the fence only costs (bf16 fwd 85.7% ->
# 85.3%, fp16 dx 86.5 us -> 90.8 us). Newer tritons' ptxas keeps the bf16 input gradient's loads
# together unfenced (86.7%) and spilled it fenced (sm_90: 8 bytes of stack).
FLAT_FENCED_ROWS = {(torch.float16, False)} | ({(torch.bfloat16, True)} if TRITON_VERSION <= (3, 6) else set())


def _flat_inside(config: dict, C: int, vec: int, K: int, pad: int, source_w: int, out_w: int) -> dict:
    """A FLAT walk's INSIDE_SRC and INSIDE_OUT (_row_walk): bit j set where source (output) vector j
    of every lane lies in the image, when every lane is a real (channel, block); else none."""
    if not config.get("FLAT"):
        return {"INSIDE_SRC": 0, "INSIDE_OUT": 0}
    p, blocks = config["P"], cdiv(out_w, config["P"])
    if C * blocks % config["BLOCK_W"]:
        return {"INSIDE_SRC": 0, "INSIDE_OUT": 0}
    lead, reach = _vector_reach(pad, p + K - 1, vec)
    first = -pad - lead  # the first vector's column in block 0
    last = (blocks - 1) * p + first  # ... in the last block
    src = sum(1 << j for j in range(reach // vec) if first + j * vec >= 0 and last + (j + 1) * vec <= source_w)
    out = sum(1 << j for j in range(p // vec) if (blocks - 1) * p + (j + 1) * vec <= out_w)
    return {"INSIDE_SRC": src, "INSIDE_OUT": out}


def forward_launch(x, weight, bias, y, stride, padding, dilation, config=None) -> Launch:
    B, C, H, W = x.shape
    CG, K = C // weight.shape[1], weight.shape[2]
    Ho, Wo = y.shape[2], y.shape[3]
    config, walk, vec = _walk_plan(config or forward_config(x, weight.shape[1], K, stride, dilation, Ho, Wo),
                                   lambda c: _walking(c, stride, padding, dilation, H, Ho, K, False), (x, y),
                                   stride, dilation, (W, Wo),
                                   lambda: forward_default(x, K, stride, dilation, Ho, Wo, flat=False))
    flat = config.get("FLAT", False)
    tiles, tiles_w = _tiles(config, Ho, Wo, walk)
    bias_strides = bias.stride() if bias is not None else (0, 0)
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, y_ptr=y, C=C, H=H, W=W, HO=Ho, WO=Wo, CG=CG,
        sxb=x.stride(0), sxc=x.stride(1),
        **dict(zip(("swb", "swg", "swu", "swv"), weight.stride())),
        sbb=bias_strides[0], sbc=bias_strides[1], syb=y.stride(0), syc=y.stride(1),
        PH=padding[0], PW=padding[1], TILES=tiles, TILES_W=tiles_w, RUN=config["RUN"],
    )
    meta = dict(**inner_strides("sx", x, "hw"), **inner_strides("sy", y, "hw"), **_meta(config))
    meta.update(SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], KS=K, WALK=walk,
                INTERIOR=walk and (is_channels_last(x) or vec > 1) and not flat, VEC=vec,
                VEC_PAD=padding[1] if vec > 1 else 0,
                HAS_BIAS=bias is not None, INDEX_64=needs_int64(x, weight, bias, y), ACC_DTYPE=_acc_dtype(x.dtype),
                ROWS_AHEAD=_walk_rows_ahead(x.element_size(), is_channels_last(x)),
                **_flat_inside(config, C, vec, K, padding[1], W, Wo),
                FENCE_ROWS=flat and (x.dtype, False) in FLAT_FENCED_ROWS)
    interior = (_interior_share(config, C, W, Wo, K, stride[1], padding[1], dilation[1], False, vec)
                if meta["INTERIOR"] else None)
    lanes = (C * tiles_w, meta["BLOCK_W"], 1) if flat else (C, meta["BLOCK_C"], tiles_w)
    return Launch(dwconv_fwd_kernel, _grid(B * tiles, *lanes[:2]), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1),
                  loops=_walk_loops(walk, config, H, K, interior, meta["ROWS_AHEAD"]),
                  typical_program=_middle_tile(B // 2, tiles, lanes[2], *lanes[:2]),
                  sm90_max_registers=_walk_register_cap(x, walk))


def backward_input_launch(dy, weight, dx, stride, padding, dilation, config=None) -> Launch:
    B, C, H, W = dx.shape
    CG, K = C // weight.shape[1], weight.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    config = config or input_grad_config(dx, weight.shape[1], K, stride, dilation)
    (gh, step_h, inv_h), (gw, step_w, inv_w) = (_phase_taps(s, d) for s, d in zip(stride, dilation))
    phases = stride[0] * stride[1]
    config, walk, vec = _walk_plan(config, lambda c: _walking(c, stride, padding, dilation, Ho, H, K, True), (dy, dx),
                                   stride, dilation, (Wo, W),
                                   lambda: input_grad_default(dx, K, stride, dilation, flat=False))
    flat = config.get("FLAT", False)
    tiles, tiles_w = _tiles(config, cdiv(H, stride[0]), cdiv(W, stride[1]), walk)
    args = dict(
        dy_ptr=dy, w_ptr=weight, dx_ptr=dx, C=C, H=Ho, W=Wo, HO=H, WO=W, CG=CG,
        sdyb=dy.stride(0), sdyc=dy.stride(1),
        **dict(zip(("swb", "swg", "swu", "swv"), weight.stride())),
        sdxb=dx.stride(0), sdxc=dx.stride(1),
        PH=padding[0], PW=padding[1], TILES_PHASE=tiles, TILES_W=tiles_w, RUN=config["RUN"],
    )
    # At a unit column stride and dilation the one phase's source padding is K - 1 - padding.
    meta = dict(**inner_strides("sdy", dy, "hw"), **inner_strides("sdx", dx, "hw"), **_meta(config))
    meta.update(SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], KS=K,
                TAPS_H=cdiv(K, step_h), TAPS_W=cdiv(K, step_w), GH=gh, GW=gw, INV_H=inv_h, INV_W=inv_w,
                FIRST_TAP_MAY_MISS=K % step_h != 0 or K % step_w != 0, PHASE_MAY_BE_EMPTY=gh > 1 or gw > 1,
                WALK=walk, INTERIOR=walk and (is_channels_last(dx) or vec > 1) and not flat, VEC=vec,
                VEC_PAD=K - 1 - padding[1] if vec > 1 else 0, INDEX_64=needs_int64(dy, weight, dx),
                ACC_DTYPE=_acc_dtype(dy.dtype), ROWS_AHEAD=_walk_rows_ahead(dx.element_size(), is_channels_last(dx)),
                **_flat_inside(config, C, vec, K, K - 1 - padding[1], Wo, W),
                FENCE_ROWS=flat and (dy.dtype, True) in FLAT_FENCED_ROWS)
    interior = (_interior_share(config, C, Wo, W, K, stride[1], padding[1], dilation[1], True, vec)
                if meta["INTERIOR"] else None)
    lanes = (C * tiles_w, meta["BLOCK_W"], 1) if flat else (C, meta["BLOCK_C"], tiles_w)
    return Launch(dwconv_bwd_input_kernel, _grid(B * phases * tiles, *lanes[:2]), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1),
                  loops=_walk_loops(walk, config, Ho, cdiv(K, step_h), interior, meta["ROWS_AHEAD"]),
                  typical_program=_middle_tile(B // 2 * phases, tiles, lanes[2], *lanes[:2]),
                  sm90_max_registers=_walk_register_cap(dx, walk))
