"""Spatial-specific, channel-shared weighting (docs/operators.md §1): involution and dynamic depth-wise conv.

One family of kernels serves both ops. A weight is either per pixel, ``(B, G, K, K, Ho, Wo)``
(involution, inhomogeneous dynamic depth-wise conv), or per sample, ``(B, G, K, K)`` (homogeneous
dynamic depth-wise conv); the kernels take a ``PER_PIXEL`` switch and never expand the latter.

Every program owns a 3-D tile ``[BLOCK_G groups, BLOCK_CG channels of each group, BLOCK_H*BLOCK_W
pixels]``. The weight of a tile is loaded once per tap as ``[BLOCK_G, 1, pixels]`` and broadcast
over the group's channels, so G = 1 (involution) and G = C (depth-wise) are the same code.
All strides are passed, so NCHW, channels_last and non-contiguous views need no copies; Triton
specialises the unit stride and vectorises along whichever axis it belongs to.

This module holds the forward and the input gradient, and the tile helpers the weight gradients
(``involution_weight_grad.py``) share with them.

Kernels here know nothing of autograd: ``ops/involution.py`` wires them into torch.
"""
from __future__ import annotations


import functools
import itertools
import math

import torch
import triton
import triton.language as tl

from . import dynamic_dwconv as dwconv
from . import involution_nchw
from ._fence import fence
from ._indexing import gather_source, widen
from ._keys import problem_key
from ._launch import (TRITON_VERSION, Launch, cacheable, cdiv, config_key, is_channels_last, layout, needs_int64,
                      next_power_of_2, planned)
from .configs import get_config


@triton.jit
def _tile_channels(pid_ch, CG_TILES, G, CG, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, INDEX_64: tl.constexpr):
    """Group, channel-in-group and channel indices ([BLOCK_G, BLOCK_CG, 1]) of this program's tile, and their mask."""
    g = (pid_ch // CG_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    cg = (pid_ch % CG_TILES) * BLOCK_CG + tl.arange(0, BLOCK_CG)
    if INDEX_64:
        g = g.to(tl.int64)
        cg = cg.to(tl.int64)
    g3 = g[:, None, None]
    cg3 = cg[None, :, None]
    channel_mask = (g3 < G) & (cg3 < CG)
    return g3, cg3, g3 * CG + cg3, channel_mask


@triton.jit
def _tile_indices(pid_pix, pid_ch, TILES_W, CG_TILES, G, CG,
                  BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                  INDEX_64: tl.constexpr):
    """Group, channel-in-group and pixel coordinates of this program's tile."""
    tile_h = pid_pix // TILES_W
    tile_w = pid_pix % TILES_W
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    # BLOCK_W is a power of two: the row split is a shift, and columns stay provably contiguous.
    row = tile_h * BLOCK_H + p // BLOCK_W
    col = tile_w * BLOCK_W + p % BLOCK_W
    if INDEX_64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    g3, cg3, c3, channel_mask = _tile_channels(pid_ch, CG_TILES, G, CG, BLOCK_G, BLOCK_CG, INDEX_64)
    return g3, cg3, c3, channel_mask, row, col


@triton.jit
def _flat_pixels(tile, B, ROWS, COLS, PIXELS: tl.constexpr, INDEX_64: tl.constexpr):
    """Each lane's (sample, row, column) when lanes run over the flattened (sample, row, column) space,
    column fastest: no lane idles where the width is no multiple of a power-of-two tile (28, 14, 7).
    Lanes past the last sample read sample B - 1 (in bounds, never stored) and get row ROWS, which
    the callers' stores mask off."""
    p = widen(tile, INDEX_64) * PIXELS + tl.arange(0, PIXELS)
    col = p % COLS
    rest = p // COLS
    b = rest // ROWS
    row = tl.where(b < B, rest % ROWS, ROWS)
    return tl.minimum(b, B - 1), row, col


@triton.jit
def _program_lanes(pid0, pid_ch, TILES, B, ROWS, COLS, TILES_W, CG_TILES, G, CG, FLAT: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, LANE_ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
                   INDEX_64: tl.constexpr):
    """(set, sample, row, column, group, channel-in-group, channel, channel mask) of this program's
    lanes, for the forward and the input gradient. Programs come in sets of TILES. FLAT: a set's
    LANE_ROWS x BLOCK_W lanes run over the flattened (sample, row, column) space of ROWS x COLS
    pixels a sample (_flat_pixels), and the set is a stride phase; otherwise a set is one sample,
    tiled by LANE_ROWS x BLOCK_W rectangles, TILES_W to a row of tiles."""
    outer = pid0 // TILES
    tile = pid0 % TILES
    if FLAT:
        b, row, col = _flat_pixels(tile, B, ROWS, COLS, LANE_ROWS * BLOCK_W, INDEX_64)
        g3, cg3, c3, channel_mask = _tile_channels(pid_ch, CG_TILES, G, CG, BLOCK_G, BLOCK_CG, INDEX_64)
    else:
        b = widen(outer, INDEX_64)
        g3, cg3, c3, channel_mask, row, col = _tile_indices(tile, pid_ch, TILES_W, CG_TILES, G, CG,
                                                            BLOCK_G, BLOCK_CG, LANE_ROWS, BLOCK_W, INDEX_64)
    return outer, b, row, col, g3, cg3, c3, channel_mask


@triton.jit
def _channel_chunks(pid_ch, CG_TILES, g3, cg3, G, CG, BLOCK_CG: tl.constexpr, CHUNKS: tl.constexpr):
    """Channel indices and masks of this program's CHUNKS chunks of BLOCK_CG channels per group.

    A program owns CHUNKS * BLOCK_CG consecutive channels of each of its groups; ``cg3`` is its first
    chunk as _tile_indices placed it (BLOCK_CG channels per program), moved here to the program's span.
    """
    first = cg3 + (pid_ch % CG_TILES) * (BLOCK_CG * (CHUNKS - 1))
    channels = ()
    masks = ()
    for q in tl.static_range(CHUNKS):
        channels = channels + (g3 * CG + first + q * BLOCK_CG,)
        masks = masks + ((g3 < G) & (first + q * BLOCK_CG < CG),)
    return channels, masks


@triton.jit
def _pair_chunks(pid_ch, CG_TILES, g3, G, CG, BLOCK_CG: tl.constexpr, CHUNKS: tl.constexpr):
    """_channel_chunks for 16-bit data read as int32 pairs of channels (CG even): each chunk's BLOCK_CG // 2
    pair indices (channel // 2) and masks."""
    # Pair indices only (no 2 * k): the load vectorises when its mask is provably constant over a chunk.
    first = (pid_ch % CG_TILES) * (BLOCK_CG // 2 * CHUNKS) + tl.arange(0, BLOCK_CG // 2)[None, :, None]
    pairs = ()
    masks = ()
    for q in tl.static_range(CHUNKS):
        pair = first + q * (BLOCK_CG // 2)
        pairs = pairs + (g3 * (CG // 2) + pair,)
        masks = masks + ((g3 < G) & (pair < CG // 2),)
    return pairs, masks


@triton.jit
def _bf16_pairs(lo, hi):
    """fp32 ``lo`` (even channels) and ``hi`` (odd channels) rounded to bf16 and packed as int32 pairs."""
    lo_bits = lo.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi_bits = hi.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (lo_bits | (hi_bits << 16)).to(tl.int32, bitcast=True)


# Kernel sizes whose row taps are unrolled at compile time (no tap // K, tap % K, and each loaded
# input row is reused across taps in registers); larger K takes the run-time K² loop. Only
# channels_last tiles take this path (see unrolled_taps).
MAX_UNROLLED_K = 13
# Whether per-pixel weights with one channel a group (R3) take the unrolled kernels whatever their
# dtype. The run-time loop issues fewer instructions but waits a memory round trip per tap: with
# triton 3.6's ptxas the unrolled ones predict R3 fwd bf16 NHWC 90.8% against 49.6% (dx 97% against
# 85%). With triton 3.9's they wait as long as the loop (46% and 23% against 49% and 77%) unless a
# column's rows are all loaded before its sums (PRELOAD): then 16-bit reaches HBM (fwd and dx 100%),
# while fp32 falls to 46% (the loop: 93% and 87%). So newer tritons unroll 16-bit R3 only, preloaded.
UNROLLED_DEPTHWISE = TRITON_VERSION <= (3, 6)
# Output rows per thread in the unrolled kernels ("strip"): a strip of S rows reads S + K - 1 input
# rows per column tap instead of S * K, so each loaded (and, in bf16, converted) input element
# feeds min(S, K) multiply-adds. Capped so the accumulators stay in registers.
MAX_STRIP = 8


@triton.jit
def _row_loads(src_col, ok, r: tl.constexpr, RSTEP, ssh, chunk_step, channel_masks, INDEX_64: tl.constexpr,
               CHANNELS_FULL: tl.constexpr, CHUNKS: tl.constexpr):
    """Source row r of a column tap as loaded: CHUNKS raw chunks, zero where ``ok`` (the row's bit) is off."""
    raws = ()
    for q in tl.static_range(CHUNKS):
        # A 64-bit scalar offset (loop-invariant, formed once): two adds per load, where a 32-bit one
        # is moved, shifted and widened each time.
        row_offset = tl.cast(widen(r * RSTEP, INDEX_64) * ssh + q * chunk_step, tl.int64)
        if CHANNELS_FULL:
            raws = raws + (tl.load(src_col + row_offset, mask=ok[None, None, :], other=0),)
        else:
            raws = raws + (tl.load(src_col + row_offset, mask=channel_masks[q] & ok[None, None, :], other=0),)
    return raws


@triton.jit
def _pixel_weight(w_cols, w_slots, ok, g_ok, first_tap_ok, r: tl.constexpr, s: tl.constexpr,
                  WEIGHT_AT_SOURCE: tl.constexpr, FIRST_TAP_MAY_MISS: tl.constexpr, CHANNELS_FULL: tl.constexpr):
    """The per-pixel weight strip row s reads source row r through (tap slot r - s), as loaded."""
    if WEIGHT_AT_SOURCE:
        w_ok = ok[None, None, :] if CHANNELS_FULL else g_ok & ok[None, None, :]
        if FIRST_TAP_MAY_MISS and r == s:
            w_ok = w_ok & first_tap_ok  # no read past the weight either
        weight = tl.load(w_cols[s] + w_slots[r - s], mask=w_ok, other=0.0)
    else:
        weight = tl.load(w_cols[s] + w_slots[r - s])
    return weight


@triton.jit
def _behind_fence(weight, after, ACC_DTYPE: tl.constexpr):
    """A loaded weight in ACC_DTYPE plus the fence's zero ``after`` (int32), so that no sum it feeds
    starts before the fence. A bf16 is the top half of an fp32: its widening shift and the add are
    one instruction (LEA), where a float add after the conversion is a second."""
    if weight.dtype == tl.bfloat16:
        return (weight.to(tl.float32).to(tl.int32, bitcast=True) + after).to(tl.float32, bitcast=True)
    return weight.to(ACC_DTYPE) + after.to(ACC_DTYPE)


@triton.jit
def _strip_taps(src, src_channels, chunk_step, channel_masks, row_first, RSTEP, SRC_H, ssh, col_first, CSTEP, SRC_W,
                ssw, w_group, g_ok, swu, swv, swh, sww, w_out_pix, out_row, OUT_H,
                U_FIRST, U_STEP, V_FIRST, V_STEP, K, zero,
                TAPS_V, STRIP: tl.constexpr, TAPS_U: tl.constexpr, CHUNKS: tl.constexpr, PAIRS: tl.constexpr,
                PER_PIXEL: tl.constexpr, WEIGHT_AT_SOURCE: tl.constexpr, FIRST_TAP_MAY_MISS: tl.constexpr,
                INDEX_64: tl.constexpr, CHANNELS_FULL: tl.constexpr, PRELOAD: tl.constexpr = False,
                STAGED: tl.constexpr = False):
    """The tap sums (in ``zero``'s shape and dtype) of a strip of STRIP output rows per pixel of the tile.

    Taps are indexed by slots: tap slot (a, b) is kernel tap (U_FIRST + a*U_STEP, V_FIRST + b*V_STEP),
    and strip row s reads it from source row ``row_first + (s + a)*RSTEP`` (RSTEP is 1 when STRIP > 1),
    column ``col_first + b*CSTEP``. So one source row serves every (s, a) with s + a fixed, and is
    loaded once per column tap. Per-pixel weights are read at the output pixel (forward) or at the
    source pixel (input gradient, WEIGHT_AT_SOURCE); per-sample weights of a column tap are loaded
    once and held for all its rows. With FIRST_TAP_MAY_MISS, slot 0 of each axis may name tap K
    (a stride phase with fewer taps): such a tap is skipped by a uniform branch, never multiplied by
    a zero weight (0 * inf would poison the sum).
    A thread holds CHUNKS channel chunks of the same groups (chunk q at ``src_channels + q * chunk_step``,
    masked by ``channel_masks[q]``), so every weight it loads serves all of them; the sums come back as
    ``accs[s * CHUNKS + q]``. PAIRS: ``src`` holds bf16 read as int32 pairs of channels (``src_channels``
    index pairs), and each chunk is summed as two parts, even and odd channels,
    ``accs[s * 2 * CHUNKS + 2 * q + odd]``: one shift or mask widens each element, where a bf16 load's
    conversion takes two instructions.
    Every load is a per-thread pointer, formed once, plus a scalar offset (one wide multiply-add;
    a uniform base plus a per-thread offset takes two adds), and a source row's mask is one bit of a
    per-thread word (one test; comparing the row each time took a predicate register per row).
    PRELOAD (per-pixel weights only): a column tap's every source row and weight is loaded before its
    first sum, so the column waits one memory round trip rather than one per row.
    STAGED (per-pixel weights only): the source rows go through triton's copy pipeline (cp.async into
    shared memory a column ahead: no registers held, no round trip waited) and the column's weights
    are loaded before its sums, behind the fence, so the column waits one round trip for them.
    """
    if STRIP > 1:
        RSTEP = 1  # known here, so that with compile-time strides each row's offset is an immediate
    ACC_DTYPE: tl.constexpr = zero.dtype
    PARTS: tl.constexpr = 2 * CHUNKS if PAIRS else CHUNKS
    ROWS: tl.constexpr = STRIP + TAPS_U - 1  # at most MAX_STRIP + MAX_UNROLLED_K - 1 < 32 bits
    accs = ()
    for s in tl.static_range(STRIP * PARTS):
        accs = accs + (zero,)
    # The column taps are a run-time loop (the code of one column is large enough), the row taps and
    # the strip unrolled. Unrolled-loop indices stay inline: a name assigned on every unrolled trip
    # turns into a tensor.
    b_first = 0
    first_tap_ok = 0
    if FIRST_TAP_MAY_MISS:
        # A tensor, not a Python bool: the interpreter passes scalars as Python ints.
        first_tap_ok = (tl.zeros((1, 1, 1), dtype=tl.int32) + U_FIRST) < K
        b_first = (V_FIRST >= K).to(tl.int32)  # column slot 0 names tap K: this phase has one tap fewer
    row_bits = tl.zeros(row_first.shape, dtype=tl.int32)
    for r in tl.static_range(ROWS):
        row_bits = row_bits | (((row_first + r * RSTEP >= 0) & (row_first + r * RSTEP < SRC_H)).to(tl.int32) << r)
    src_rows = src + (src_channels + (row_first * ssh + col_first * ssw)[None, None, :])
    if PER_PIXEL:
        # A pointer per strip row; tap slot a of strip row s is that pointer plus a scalar of the slot and
        # column tap (one wide multiply-add per weight).
        w_rows = ()
        for s in tl.static_range(STRIP):
            if WEIGHT_AT_SOURCE:  # at source row s + a: the slot's scalar adds a rows
                w_rows = w_rows + (w_group + ((row_first + s * RSTEP) * swh + col_first * sww)[None, None, :],)
            else:
                # Output rows clamped into the image: a tile's rows (and, in w_out_pix, columns) past it are
                # never stored, so their weights need no mask, and the loads no zeroed registers or predicates.
                w_rows = w_rows + (w_group + (tl.minimum(out_row + s, OUT_H - 1) * swh + w_out_pix)[None, None, :],)
    for b in tl.range(b_first, TAPS_V, num_stages=2 if STAGED else 1):
        col = col_first + b * CSTEP
        col_bits = tl.where((col >= 0) & (col < SRC_W), row_bits, 0)
        src_col = src_rows + widen(b * CSTEP, INDEX_64) * ssw
        w_v = widen(V_FIRST + b * V_STEP, INDEX_64) * swv
        if PER_PIXEL:
            # This column tap's pointer per strip row, and each slot's offset from it: with compile-time
            # strides an immediate, and the slot's weight a load with no address arithmetic.
            w_v_col = w_v
            if WEIGHT_AT_SOURCE:
                w_v_col = w_v_col + widen(b * CSTEP, INDEX_64) * sww
            w_cols = ()
            for s in tl.static_range(STRIP):
                w_cols = w_cols + (w_rows[s] + w_v_col,)
            w_slots = ()
            for a in tl.static_range(TAPS_U):
                w_slot = widen(U_FIRST + a * U_STEP, INDEX_64) * swu
                if WEIGHT_AT_SOURCE:
                    w_slot = w_slot + widen(a * RSTEP, INDEX_64) * swh
                w_slots = w_slots + (w_slot,)
        if not PER_PIXEL:
            w_col = w_group + w_v
            held = ()
            for t in tl.static_range(TAPS_U):
                w_ok = g_ok
                if FIRST_TAP_MAY_MISS and t == 0:
                    w_ok = w_ok & first_tap_ok
                held = held + (tl.load(w_col + widen(U_FIRST + t * U_STEP, INDEX_64) * swu, mask=w_ok,
                                       other=0.0).to(ACC_DTYPE),)
        if PRELOAD or STAGED:
            # Every row of the column (STAGED: every weight) loaded before any is summed, then a fence
            # (see _fence) whose zero every weight adds: the column's loads go out as one batch (one
            # round trip), where ptxas issued each row's just before its sums. The fence's store is of
            # no loaded value: one that stored a row waited for it to land, and its load then waited a
            # second round trip.
            loaded = ()
            for r in tl.static_range(ROWS):
                ok = (col_bits & (1 << r)) != 0
                weights = ()
                for s in tl.static_range(STRIP):
                    weight = 0.0  # strip rows not reading row r: never used
                    if r - s >= 0 and r - s < TAPS_U:
                        weight = _pixel_weight(w_cols, w_slots, ok, g_ok, first_tap_ok, r, s, WEIGHT_AT_SOURCE,
                                               FIRST_TAP_MAY_MISS, CHANNELS_FULL)
                    weights = weights + (weight,)
                rows = ()  # STAGED: loaded below, where the pipeline turns them into copies a column ahead
                if PRELOAD:
                    rows = _row_loads(src_col, ok, r, RSTEP, ssh, chunk_step, channel_masks, INDEX_64,
                                      CHANNELS_FULL, CHUNKS)
                loaded = loaded + ((rows, weights),)
            # At a weight's address, not an output's (which this helper has not): the source rows, the
            # batch that matters, come from another tensor, so ptxas cannot prove them apart from it.
            # STAGED orders the weights themselves: at the strip's weights' pointer, which no column's
            # offset (a run-time sum) lets ptxas prove apart from them.
            first_weight = (w_rows[0] if STAGED else w_cols[0] + w_slots[0]).to(tl.pointer_type(tl.int32), bitcast=True)
            after = fence(first_weight, SRC_H)
        for r in tl.static_range(ROWS):
            ok = (col_bits & (1 << r)) != 0
            if PRELOAD:
                raws = loaded[r][0]
            else:
                raws = _row_loads(src_col, ok, r, RSTEP, ssh, chunk_step, channel_masks, INDEX_64, CHANNELS_FULL,
                                  CHUNKS)
            xvs = ()
            for q in tl.static_range(CHUNKS):
                raw = raws[q]
                if PAIRS:
                    # A bf16 is the top half of an fp32: shift the even channel up, mask the odd one.
                    xvs = xvs + ((raw << 16).to(tl.float32, bitcast=True),
                                 (raw & -65536).to(tl.float32, bitcast=True))
                else:
                    xvs = xvs + (raw.to(ACC_DTYPE),)
            new = ()
            for s in tl.static_range(STRIP):
                if r - s >= 0 and r - s < TAPS_U:  # tap slot r - s of strip row s
                    if PRELOAD or STAGED:
                        weight = _behind_fence(loaded[r][1][s], after, ACC_DTYPE)
                    elif PER_PIXEL:
                        weight = _pixel_weight(w_cols, w_slots, ok, g_ok, first_tap_ok, r, s, WEIGHT_AT_SOURCE,
                                               FIRST_TAP_MAY_MISS, CHANNELS_FULL).to(ACC_DTYPE)
                    else:
                        weight = held[r - s]
                    for q in tl.static_range(PARTS):
                        acc = accs[s * PARTS + q]
                        if FIRST_TAP_MAY_MISS and r == s:
                            if U_FIRST < K:
                                acc += weight * xvs[q]
                        else:
                            acc += weight * xvs[q]
                        new = new + (acc,)
                else:
                    for q in tl.static_range(PARTS):
                        new = new + (accs[s * PARTS + q],)
            accs = new
    return accs


@triton.jit
def _chunk_setup(sample, pid_ch, CG_TILES, g3, cg3, G, CG, sc, sh, sw, ACC_DTYPE: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, PIXELS: tl.constexpr, CHUNKS: tl.constexpr,
                 PAIRS: tl.constexpr, INDEX_64: tl.constexpr):
    """What _strip_taps reads a program's channel chunks through, for the forward's x and the input
    gradient's dy (``sample``: the tensor at this program's sample; ``sc, sh, sw``: its strides):
    (channel indices per chunk (pairs with PAIRS), their masks, the source pointer, chunk 0's offsets,
    the offset from one chunk to the next, the row and column strides in source elements, and a zero
    accumulator of one part)."""
    if PAIRS:
        channels, masks = _pair_chunks(pid_ch, CG_TILES, g3, G, CG, BLOCK_CG, CHUNKS)
        src = sample.to(tl.pointer_type(tl.int32), bitcast=True)
        offsets = channels[0]
        chunk_step = BLOCK_CG // 2
        # Strides in int32 pairs: even (_pairs), so a shift halves them exactly.
        ssh = widen(sh, INDEX_64) >> 1
        ssw = widen(sw, INDEX_64) >> 1
        zero = tl.zeros((BLOCK_G, BLOCK_CG // 2, PIXELS), dtype=ACC_DTYPE)
    else:
        channels, masks = _channel_chunks(pid_ch, CG_TILES, g3, cg3, G, CG, BLOCK_CG, CHUNKS)
        src = sample
        offsets = channels[0] * sc
        chunk_step = BLOCK_CG * widen(sc, INDEX_64)
        ssh = sh
        ssw = sw
        zero = tl.zeros((BLOCK_G, BLOCK_CG, PIXELS), dtype=ACC_DTYPE)
    return channels, masks, src, offsets, chunk_step, ssh, ssw, zero


@triton.jit
def involution_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    B, C, H, W, Ho, Wo, CG, K,
    sxb, sxc, sxh, sxw,
    swb, swg, swu, swv, swh, sww,
    sbb, sbc,
    syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W, CG_TILES, STRIP_ROWS,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PER_PIXEL: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TAPS: tl.constexpr = 0, STRIP: tl.constexpr = 1, CHUNKS: tl.constexpr = 1, PAIRS: tl.constexpr = False,
    CHANNELS_FULL: tl.constexpr = False, INNER: tl.constexpr = None, PRELOAD: tl.constexpr = False,
    STAGED: tl.constexpr = False,
):
    """y[b,c,i,j] = bias[b,c] + sum_{u,v} w[b,g(c),u,v,(i,j)] * x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW].

    INNER (unrolled taps): the within-sample strides (sxh, sxw, swu, swv, swh, sww) as compile-time
    constants, so every row's and tap's offset from a thread's pointer is an immediate.
    TAPS = K unrolls the row taps (a run-time loop over the K column taps), each thread summing a
    strip of STRIP output rows (STRIP > 1 needs SH = DH = 1) over CHUNKS chunks of BLOCK_CG channels
    of its groups; TAPS = 0 is the run-time K² loop for any K (STRIP = CHUNKS = 1). PAIRS (bf16, per
    pixel, no bias; channels contiguous, CG and the other strides even, x and y 4-byte aligned): x and y
    are read and written as int32 pairs of channels (see _strip_taps).
    BLOCK_H counts output rows, BLOCK_H // STRIP rows of strips. With TAPS, a tile is not a rectangle:
    its (BLOCK_H // STRIP) * BLOCK_W lanes run over the flattened (sample, strip row, column) space
    (STRIP_ROWS strip rows per sample, see _flat_pixels), so the sample is a lane's own.
    """
    G = C // CG
    # With TAPS, one set of TILES_PIX programs over the flattened batch.
    _, b, i, j, g3, cg3, c3, channel_mask = _program_lanes(
        tl.program_id(0), tl.program_id(1), TILES_PIX, B, STRIP_ROWS, Wo, TILES_W, CG_TILES, G, CG, TAPS > 0,
        BLOCK_G, BLOCK_CG, BLOCK_H // STRIP, BLOCK_W, INDEX_64)
    i = i * STRIP  # the strip's first output row
    x_sample = x_ptr + b * sxb
    # Channel offsets stay int32 and meet the pixel offset at each load: a hoisted pointer per
    # element would hold two registers each through all taps.
    x_channel = c3 * sxc
    w_group = w_ptr + b * swb + g3 * swg
    channels = (c3,)
    channel_masks = (channel_mask,)
    if TAPS > 0:
        if INNER is not None:
            sxh, sxw, swu, swv, swh, sww = INNER[0], INNER[1], INNER[2], INNER[3], INNER[4], INNER[5]
        channels, channel_masks, x_src, x_channels, chunk_step, ssh, ssw, zero = _chunk_setup(
            x_sample, tl.program_id(1), CG_TILES, g3, cg3, G, CG, sxc, sxh, sxw, ACC_DTYPE,
            BLOCK_G, BLOCK_CG, (BLOCK_H // STRIP) * BLOCK_W, CHUNKS, PAIRS, INDEX_64)
        accs = _strip_taps(x_src, x_channels, chunk_step, channel_masks, i * SH - PH, DH, H, ssh, j * SW - PW, DW, W, ssw,
                           w_ptr + b * swb + tl.minimum(g3, G - 1) * swg, g3 < G, swu, swv, swh, sww,
                           tl.minimum(j, Wo - 1) * sww, i, Ho,
                           0, 1, 0, 1, K, zero, K, STRIP, TAPS, CHUNKS, PAIRS, PER_PIXEL, False, False, INDEX_64,
                           CHANNELS_FULL, PRELOAD, STAGED)
        if HAS_BIAS:
            new = ()
            for q in tl.static_range(CHUNKS):
                bias = tl.load(bias_ptr + b * sbb + channels[q] * sbc, mask=channel_masks[q], other=0.0)
                new = new + (bias.to(ACC_DTYPE),)
            biased = ()
            for t in tl.static_range(STRIP * CHUNKS):
                biased = biased + (accs[t] + new[t % CHUNKS],)
            accs = biased
    else:
        out_mask = (i < Ho) & (j < Wo)
        if PER_PIXEL:
            w_taps = w_group + (i * swh + j * sww)[None, None, :]
            w_mask = (g3 < G) & out_mask[None, None, :]
        else:
            w_taps = w_group
            w_mask = g3 < G
        acc = tl.zeros((BLOCK_G, BLOCK_CG, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE)
        if HAS_BIAS:
            # Added before the taps, so its offsets and mask are not held through the tap loop.
            acc += tl.load(bias_ptr + b * sbb + c3 * sbc, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        h_first = i * SH - PH
        w_first = j * SW - PW
        for tap in range(K * K):
            # One loop over the taps (see involution_bwd_weight_kernel).
            u = tap // K
            v = tap % K
            h_in = h_first + u * DH
            w_in = w_first + v * DW
            ok = out_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
            weight = tl.load(w_taps + widen(u, INDEX_64) * swu + widen(v, INDEX_64) * swv, mask=w_mask, other=0.0)
            xv = tl.load(x_sample + (x_channel + (h_in * sxh + w_in * sxw)[None, None, :]),
                         mask=channel_mask & ok[None, None, :], other=0.0)
            acc += weight.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
        accs = (acc,)
    if PAIRS:
        y_pairs = (y_ptr + b * syb).to(tl.pointer_type(tl.int32), bitcast=True)
        for t in tl.static_range(STRIP * CHUNKS):
            s = t // CHUNKS
            y_off = channels[t % CHUNKS] + ((i + s) * (widen(syh, INDEX_64) >> 1) + j * (widen(syw, INDEX_64) >> 1))[
                None, None, :]
            tl.store(y_pairs + y_off, _bf16_pairs(accs[2 * t], accs[2 * t + 1]),
                     mask=channel_masks[t % CHUNKS] & ((i + s < Ho) & (j < Wo))[None, None, :])
    else:
        for t in tl.static_range(STRIP * CHUNKS):
            s = t // CHUNKS
            y_off = b * syb + channels[t % CHUNKS] * syc + ((i + s) * syh + j * syw)[None, None, :]
            tl.store(y_ptr + y_off, accs[t].to(y_ptr.dtype.element_ty),
                     mask=channel_masks[t % CHUNKS] & ((i + s < Ho) & (j < Wo))[None, None, :])


@triton.jit
def involution_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    B, C, H, W, Ho, Wo, CG, K,
    sdyb, sdyc, sdyh, sdyw,
    swb, swg, swu, swv, swh, sww,
    sdxb, sdxc, sdxh, sdxw,
    SH, SW, PH, PW, DH, DW,
    TILES_W, CG_TILES, TILES_PHASE, GH, GW, INV_H, INV_W, TAPS_V, STRIP_ROWS, COLS,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PER_PIXEL: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TAPS_U: tl.constexpr = 0, STRIP: tl.constexpr = 1,
    FIRST_TAP_MAY_MISS: tl.constexpr = False, PHASE_MAY_BE_EMPTY: tl.constexpr = False, CHUNKS: tl.constexpr = 1,
    PAIRS: tl.constexpr = False, CHANNELS_FULL: tl.constexpr = False, INNER: tl.constexpr = None,
    PRELOAD: tl.constexpr = False, STAGED: tl.constexpr = False,
):
    """Gather form of dx: each input pixel sums the taps that read it, so no atomics are needed.

    dx[b,c,h,w] = sum_{u,v} w[b,g,u,v,i,j] * dy[b,c,i,j] with i = (h+PH-u*DH)/SH when that is a whole
    number inside [0, Ho), likewise j.

    Unrolled (TAPS_U > 0): programs are split by stride phase (h % SH, w % SW), and a phase's taps are
    the u with u*DH = h + PH (mod SH): u0, u0 + SH/GH, ... (GH = gcd(SH, DH), INV_H the inverse of
    DH/GH modulo SH/GH), at most TAPS_U of them, so no tap is masked off for the stride. Each thread
    sums a strip of STRIP rows of its phase (STRIP > 1 needs DH/GH = 1) over CHUNKS chunks of BLOCK_CG
    channels of its groups (PAIRS: dy and dx as int32 pairs of bf16 channels, see involution_fwd_kernel).
    INNER (unrolled): sdyh, sdyw, swu, swv, swh, sww compile-time (see involution_fwd_kernel).
    A phase's lanes run over its flattened (sample, strip row, column) space (STRIP_ROWS strip rows of
    COLS columns per sample, see _flat_pixels), TILES_PHASE programs of them.
    TAPS_U = 0: the run-time tap loop over all K² taps for any K and stride (STRIP = CHUNKS = 1, one phase).
    """
    G = C // CG
    # Unrolled: a set of TILES_PHASE programs per stride phase; else a set per sample (one phase).
    phase, b, h, w, g3, cg3, c3, channel_mask = _program_lanes(
        tl.program_id(0), tl.program_id(1), TILES_PHASE, B, STRIP_ROWS, COLS, TILES_W, CG_TILES, G, CG, TAPS_U > 0,
        BLOCK_G, BLOCK_CG, BLOCK_H // STRIP, BLOCK_W, INDEX_64)
    # Channel offsets stay int32 until they meet the pixel offset (see involution_fwd_kernel).
    dy_sample = dy_ptr + b * sdyb
    dy_channel = c3 * sdyc
    w_group = w_ptr + b * swb + g3 * swg
    channels = (c3,)
    channel_masks = (channel_mask,)
    if TAPS_U > 0:
        if INNER is not None:
            sdyh, sdyw, swu, swv, swh, sww = INNER[0], INNER[1], INNER[2], INNER[3], INNER[4], INNER[5]
        channels, channel_masks, dy_src, dy_channels, chunk_step, ssh, ssw, zero = _chunk_setup(
            dy_sample, tl.program_id(1), CG_TILES, g3, cg3, G, CG, sdyc, sdyh, sdyw, ACC_DTYPE,
            BLOCK_G, BLOCK_CG, (BLOCK_H // STRIP) * BLOCK_W, CHUNKS, PAIRS, INDEX_64)
        hh = h * STRIP  # the strip's first row among the rows of this phase
        ph = phase // SW
        pw = phase % SW
        rh = ph + PH
        rw = pw + PW
        step_h = SH // GH
        step_w = SW // GW
        u0 = ((rh // GH) * INV_H) % step_h
        v0 = ((rw // GW) * INV_W) % step_w
        # Slots run from the last tap down, so that the source row grows with the slot.
        row_first = hh + (rh - u0 * DH) // SH - (TAPS_U - 1) * (DH // GH)
        col_first = w + (rw - v0 * DW) // SW - (TAPS_V - 1) * (DW // GW)
        accs = _strip_taps(dy_src, dy_channels, chunk_step, channel_masks, row_first, DH // GH, Ho, ssh,
                           col_first, DW // GW, Wo, ssw, w_group, g3 < G, swu, swv, swh, sww, 0, 0, 0,
                           u0 + (TAPS_U - 1) * step_h, -step_h, v0 + (TAPS_V - 1) * step_w, -step_w, K, zero,
                           TAPS_V, STRIP, TAPS_U, CHUNKS, PAIRS, PER_PIXEL, True, FIRST_TAP_MAY_MISS, INDEX_64,
                           CHANNELS_FULL, PRELOAD, STAGED)
        # Input rows and columns of this phase.
        h = ph + SH * hh
        w = pw + SW * w
        h_step = SH
        phase_ok = (rh % GH == 0) & (rw % GW == 0)
    else:
        in_mask = (h < H) & (w < W)
        acc = tl.zeros((BLOCK_G, BLOCK_CG, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE)
        for tap in range(K * K):
            # One loop over the taps (see involution_bwd_weight_kernel).
            u = tap // K
            v = tap % K
            i, row_ok = gather_source(h, PH, u, DH, SH, Ho, in_mask)
            j, ok = gather_source(w, PW, v, DW, SW, Wo, row_ok)
            ok3 = ok[None, None, :]
            w_tap = w_group + widen(u, INDEX_64) * swu + widen(v, INDEX_64) * swv
            if PER_PIXEL:
                weight = tl.load(w_tap + (i * swh + j * sww)[None, None, :], mask=(g3 < G) & ok3, other=0.0)
            else:
                weight = tl.load(w_tap, mask=g3 < G, other=0.0)
            grad = tl.load(dy_sample + (dy_channel + (i * sdyh + j * sdyw)[None, None, :]), mask=channel_mask & ok3,
                           other=0.0)
            acc += weight.to(ACC_DTYPE) * grad.to(ACC_DTYPE)
        accs = (acc,)
        h_step = 1
    if PAIRS:
        if PHASE_MAY_BE_EMPTY:
            # No tap reaches this phase (DH and SH share a factor the offset lacks): dx is zero.
            new = ()
            for t in tl.static_range(2 * STRIP * CHUNKS):
                new = new + (tl.where(phase_ok, accs[t], 0.0),)
            accs = new
        dx_pairs = (dx_ptr + b * sdxb).to(tl.pointer_type(tl.int32), bitcast=True)
        for t in tl.static_range(STRIP * CHUNKS):
            row = h + (t // CHUNKS) * h_step
            dx_off = channels[t % CHUNKS] + (row * (widen(sdxh, INDEX_64) >> 1) + w * (widen(sdxw, INDEX_64) >> 1))[
                None, None, :]
            tl.store(dx_pairs + dx_off, _bf16_pairs(accs[2 * t], accs[2 * t + 1]),
                     mask=channel_masks[t % CHUNKS] & ((row < H) & (w < W))[None, None, :])
    else:
        for t in tl.static_range(STRIP * CHUNKS):
            acc = accs[t]
            if PHASE_MAY_BE_EMPTY:
                # No tap reaches this phase (DH and SH share a factor the offset lacks): dx is zero.
                acc = tl.where(phase_ok, acc, 0.0)
            row = h + (t // CHUNKS) * h_step
            dx_off = b * sdxb + channels[t % CHUNKS] * sdxc + (row * sdxh + w * sdxw)[None, None, :]
            tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),
                     mask=channel_masks[t % CHUNKS] & ((row < H) & (w < W))[None, None, :])


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def _pow2_at_most(n: int, cap: int) -> int:
    return max(1, min(next_power_of_2(max(int(n), 1)), cap))


@functools.lru_cache(maxsize=4096)
def _default_config(C: int, G: int, height: int, width: int, channels_last: bool, max_warps: int) -> dict:
    """A safe, reasonable tile for a pass whose tile spans ``height x width`` pixels.

    NCHW favours wide pixel rows (the contiguous axis), channels_last wide channel blocks.
    """
    cg = C // G
    if channels_last:
        block_cg = _pow2_at_most(cg, 32)
        block_g = _pow2_at_most(G, max(1, 32 // block_cg))
        block_w = _pow2_at_most(width, 8)
        block_h = _pow2_at_most(height, max(1, 32 // block_w))
    else:
        block_cg = _pow2_at_most(cg, 16)
        block_g = _pow2_at_most(G, max(1, 16 // block_cg))
        block_w = _pow2_at_most(width, 32)
        block_h = _pow2_at_most(height, max(1, 128 // block_w))
    elements = block_g * block_cg * block_h * block_w
    # About eight accumulator elements per thread: more spills on Hopper for the NHWC tiles.
    num_warps = max(1, min(max_warps, elements // 256))
    return {"BLOCK_G": block_g, "BLOCK_CG": block_cg, "BLOCK_H": block_h, "BLOCK_W": block_w,
            "num_warps": num_warps, "num_stages": 1}


def default_config(C: int, G: int, height: int, width: int, channels_last: bool, max_warps: int = 8) -> dict:
    """The launcher's own tile (cached: it is asked on every call; callers get a copy to change)."""
    return dict(_default_config(C, G, height, width, channels_last, max_warps))


@functools.lru_cache(maxsize=4096)
def _tap_config(C: int, G: int, height: int, width: int, channels_last: bool, element_size: int,
                per_pixel: bool, strips: bool, K: int) -> dict:
    """The default tile of the forward and input-gradient kernels: BLOCK_H counts output rows, in strips
    of STRIP rows per thread (_strip_shape; one row without ``strips``: strided or dilated rows share no
    source rows).

    channels_last, per pixel, a group of at least one 16-byte vector: a thread owns CHUNKS such chunks
    (BLOCK_CG channels each) of one group, up to CHANNELS_PER_THREAD channels, so each weight it loads
    serves all of them; lanes along pixels, the axis the weight is contiguous in, so the weight and the
    input share one layout (with lanes along groups too, triton moves the input through shared memory
    to meet the weight). Smaller groups: lanes along groups and pixels, one chunk.
    NCHW: lanes along a row of pixels, and up to 16 channels of a group in each thread's registers, so
    a per-pixel weight is loaded once for all of them.
    """
    cg = C // G
    chunks = 1
    if channels_last:
        vector = 16 // element_size
        block_cg = _pow2_at_most(cg, vector)
        if per_pixel and cg >= vector:
            per_thread = CHANNELS_PER_THREAD.get(element_size, DEFAULT_CHANNELS_PER_THREAD)
            chunks = min(cdiv(cg, block_cg), max(1, per_thread // block_cg))
            block_g = 1
        else:
            block_g = _pow2_at_most(G, max(1, 32 // block_cg))
        block_w = _pow2_at_most(width, 8)
        threads_per_row = block_g * block_w
    else:
        block_cg = _pow2_at_most(cg, 16)
        block_g = _pow2_at_most(G, max(1, 8 // block_cg))
        block_w = _pow2_at_most(width, 32)
        threads_per_row = block_w
    cap = _strip_cap(block_g * block_cg, chunks, channels_last, element_size, per_pixel, K) if strips else 1
    strip, rows = _strip_shape(height, cap, max(1, 32 // threads_per_row), max(1, 128 // threads_per_row))
    num_warps = max(1, min(4, threads_per_row * rows // 32))
    return {"BLOCK_G": block_g, "BLOCK_CG": block_cg, "BLOCK_H": rows * strip, "BLOCK_W": block_w,
            "CHUNKS": chunks, "num_warps": num_warps, "num_stages": 1}


def _strip_shape(height: int, cap: int, min_rows: int, max_rows: int) -> tuple[int, int]:
    """(strip, rows of strips) of a tile over ``height`` rows, at least ``min_rows`` rows (a warp's worth of
    pixels): the fewest padded rows, then the longest strip, then the most rows. Strips need not be
    powers of two (7 covers 28 and 56 exactly); rows are."""
    best = None
    for strip in range(1, max(1, min(cap, height)) + 1):
        rows = min_rows
        while rows <= max_rows:
            tile = strip * rows
            score = (cdiv(height, tile) * tile, -strip, -rows)
            if best is None or score < best[0]:
                best = (score, (strip, rows))
            if tile >= height:
                break
            rows *= 2
    return best[1]


# Channels of one group a channels_last thread sums per pixel (in 16-byte chunks), by element size:
# each per-pixel weight it loads and converts serves that many multiply-adds. 16-bit data: 16 channels
# and strips of 7 rows (112 accumulators) is what the loop's issue budget needs, at 250-254 registers on
# sm_80 and sm_90 with both tritons; more, or 16 fp32 channels, spills (dynconv inspect).
CHANNELS_PER_THREAD = {2: 16}
DEFAULT_CHANNELS_PER_THREAD = 8


def _strip_cap(channels: int, chunks: int, channels_last: bool, element_size: int, per_pixel: bool,
               K: int) -> int:
    """The longest strip whose accumulators fit the budget of _tap_config, for a tile of ``channels``
    channels per chunk (channels_last: a thread holds one 16-byte vector of them per chunk; NCHW: all
    of them), with K taps a row."""
    # Accumulators per thread (AOT-checked with triton 3.6's ptxas: beyond these it spills; NCHW
    # threads also hold every pixel's row offsets, held per-sample weights take K per channel).
    if channels_last:
        budget = (112 if element_size == 2 else 64) if per_pixel else 16  # 112: 16-bit strips of 7 x 16 channels
        held = min(channels, 16 // element_size) * chunks
    else:
        budget = 32 if element_size <= 2 and per_pixel else 16
        held = channels
    # The STRIP + K - 1 source rows a thread holds grow with K too: from K = 8 strips of 7 spilled
    # (channels_last per pixel, triton 3.6 and 3.9, sm_90: the 16-bit input gradient 16-215 local
    # loads and stores, fp32 4-8 at K = 8), from K = 11 the 16-bit input gradient's strips of 4 too.
    longest = MAX_STRIP if K <= 7 else 4 if K <= 10 else 3
    return max(1, min(longest, budget // held))


def tap_config(C: int, G: int, height: int, width: int, channels_last: bool, K: int, element_size: int = 2,
               per_pixel: bool = True, strips: bool = True) -> dict:
    """The forward's and input gradient's own tile over ``height x width`` output (input) pixels for
    K x K kernels (a copy)."""
    return dict(_tap_config(C, G, height, width, channels_last, element_size, per_pixel, strips, K))


def _preloaded_depthwise(src) -> bool:
    """Whether per-pixel depth-wise (R3) tiles take the unrolled kernels preloaded: 16-bit ones on
    triton newer than 3.6 (see UNROLLED_DEPTHWISE)."""
    return not UNROLLED_DEPTHWISE and src.element_size() == 2


def _preload(src, weight) -> bool:
    """Whether the unrolled forward and input gradient load a column tap's every source
    row and weight before its first sum (_strip_taps, PRELOAD): per-pixel fp32 weights, and on
    triton newer than 3.6 16-bit depth-wise ones (UNROLLED_DEPTHWISE). ptxas otherwise issues each
    row's loads just before its sums and waits a memory round trip per row; a column at once holds
    about 100 more registers, which 16-bit tiles of 16 channels a thread do not have (they spilled,
    and narrower tiles predicted less than the row-at-a-time walk). A depth-wise tile holds one
    channel a group: triton 3.6's ptxas walks it row at a time well enough (R3 fwd bf16 NHWC 90.8%,
    preloaded 86%), 3.9's only preloaded."""
    if weight.dim() != 6:
        return False
    return src.element_size() == 4 or (weight.shape[1] == src.shape[1] and _preloaded_depthwise(src))


# Staged tiles ptxas left a stack frame on (a sweep of K 3-13 at 8, 16 and 32 channels a group, sm_80
# and sm_90): on triton 3.9 the input gradient (R1: 4 local loads and stores at 255 registers) and the
# forward with one 16-byte chunk a thread (K = 7, sm_80: 8 bytes); on triton 3.6 the input gradient
# with two chunks at K = 5 (56-80 bytes; K = 3, 4, 6, 7 and 9-13 clean). They keep the row walk.
STAGED_NEWER_TRITON = TRITON_VERSION > (3, 6)
# Staged forwards are capped at this many registers on sm_90: at 254 an SM held 8 of their warps (R1:
# 3584 two-warp programs, 6.8 waves of 528, paid as 7), at 200 it holds 10 (5.4 waves, paid as 6).
# PREDICTED (sm_90): R1/R2 fwd bf16 NHWC 83.3/83.7% -> 87.2% (triton 3.6), 81.3/81.2% -> 88.0% (3.9),
# issue-bound. A sweep (K 3-13, 8-32 channels a group, 20 and 56 pixels square) found ptxas spilling
# some shapes under it (K = 3 at 56: 104-128 bytes of stack; K = 5, 7 at 20 on triton 3.6), so the cap
# is the Launch's checked kind: dropped where the compiled kernel has local memory. The input
# gradient stays uncapped (R2: 16 bytes of stack at 200 for an issue bound of 82%).
STAGED_FORWARD_SM90_REGISTERS = 200
# Shared memory a staged tile's source rows may take (two columns of them): within what a block may
# hold on sm_80 (163 KB) and sm_86/89 (99 KB).
STAGED_MAX_BYTES = 64 * 1024


def _staged(src, weight, meta: dict, strip: int, taps_u: int, input_grad: bool = False) -> bool:
    """Whether the unrolled forward and input gradient stage a column's source rows through the copy
    pipeline and load its weights first (_strip_taps, STAGED): the bf16 pair tiles (PAIRS: per-pixel
    weights) not preloaded, which the row-at-a-time walk made wait a round trip for every few rows
    (PREDICTED, triton 3.6: R1 fwd/dx bf16 NHWC 56.8/54.8% -> 83.3/79.9%; 3.9: fwd 56.0% -> 81.3%).
    fp16 tiles (a conversion an element) spilled staged (sm_80, triton 3.6: 28 local loads and
    stores). ``meta``: the launch's, PAIRS, PRELOAD and CHUNKS set."""
    if not meta["PAIRS"] or meta["PRELOAD"]:
        return False
    if STAGED_NEWER_TRITON and (input_grad or meta["CHUNKS"] == 1):
        return False
    if input_grad and weight.shape[2] == 5 and meta["CHUNKS"] == 2:
        return False
    pixels = meta["BLOCK_H"] // strip * meta["BLOCK_W"]
    row_bytes = meta["BLOCK_G"] * meta["BLOCK_CG"] * meta["CHUNKS"] * pixels * src.element_size()
    return 2 * (strip + taps_u - 1) * row_bytes <= STAGED_MAX_BYTES


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _weight_strides(weight: torch.Tensor) -> tuple[int, ...]:
    """(b, g, u, v, h, w) strides; per-sample weights get zero pixel strides."""
    s = weight.stride()
    return tuple(s) if weight.dim() == 6 else (*s, 0, 0)


def _split_config(config: dict, grid_cg: bool, C: int, G: int):
    meta = {k: config[k] for k in ("BLOCK_G", "BLOCK_CG", "BLOCK_H", "BLOCK_W")}
    cg_tiles = cdiv(C // G, meta["BLOCK_CG"]) if grid_cg else 1
    return meta, cg_tiles, config.get("num_warps", 4), config.get("num_stages", 1)


def _grid(pixel_programs, G, cg_tiles, block_g):
    ch_tiles = cdiv(G, block_g) * cg_tiles
    if ch_tiles > 65535:
        raise ValueError(f"too many channel tiles for the grid ({ch_tiles}); use a larger BLOCK_G/BLOCK_CG")
    return (pixel_programs, ch_tiles, 1)


def _flat_tiles(B: int, strip_rows: int, cols: int, meta: dict, strip: int) -> int:
    """Programs over the flattened (sample, strip row, column) space of one phase (see _flat_pixels)."""
    return cdiv(B * strip_rows * cols, meta["BLOCK_H"] // strip * meta["BLOCK_W"])


def forward_launch(x, weight, bias, y, stride, padding, dilation, config=None) -> Launch:
    if not cacheable(x):
        return _forward_launch(x, weight, bias, y, stride, padding, dilation, config)
    key = ("involution_fwd", layout(x), layout(weight), layout(bias), layout(y), *stride, *padding, *dilation,
           config_key(config), _pairs_aligned(x, y))
    return planned(key, ("x_ptr", "w_ptr", "bias_ptr", "y_ptr"), (x, weight, bias, y),
                   lambda: _forward_launch(x, weight, bias, y, stride, padding, dilation, config))


def unrolled_taps(x, weight) -> bool:
    """Whether the forward and input gradient unroll their taps (else the run-time tap loop over
    default_config's tile).

    Channels_last only, and only with channels to share a tap's weight, but for per-pixel weights
    on triton 3.6 or older and 16-bit ones on newer (UNROLLED_DEPTHWISE). A per-sample weight's K
    held values per channel left no registers. NCHW per-pixel calls and depth-wise per-sample weights
    never reach this choice: the launchers hand them to involution_nchw.py and dynamic_dwconv.py first.
    """
    if weight.shape[2] > MAX_UNROLLED_K or not is_channels_last(x):
        return False
    return weight.shape[1] < x.shape[1] or (weight.dim() == 6 and (UNROLLED_DEPTHWISE or _preloaded_depthwise(x)))


def forward_default(x, weight, Ho: int, Wo: int, strips: bool = True) -> dict:
    """The forward's default tile (a copy); ``strips``: whether consecutive output rows read consecutive
    input rows (stride and dilation 1 along H)."""
    C, G = x.shape[1], weight.shape[1]
    if not unrolled_taps(x, weight):
        return default_config(C, G, Ho, Wo, is_channels_last(x))
    return tap_config(C, G, Ho, Wo, is_channels_last(x), weight.shape[2], x.element_size(), weight.dim() == 6,
                      strips)


def _forward_launch(x, weight, bias, y, stride, padding, dilation, config=None) -> Launch:
    if dwconv.handles(weight, config):
        return dwconv.forward_launch(x, weight, bias, y, stride, padding, dilation, config)
    if involution_nchw.covers(x, weight, config):
        return involution_nchw.forward_launch(x, weight, bias, y, stride, padding, dilation,
                                              needs_int64(x, weight, bias, y), config)
    B, C, H, W = x.shape
    G, K = weight.shape[1], weight.shape[2]
    Ho, Wo = y.shape[2], y.shape[3]
    config = config or get_config("involution_fwd", problem_key(x, G, K, stride),
                                  forward_default(x, weight, Ho, Wo, stride[0] == 1 and dilation[0] == 1))
    meta, _, num_warps, num_stages = _split_config(config, True, C, G)
    taps = K if unrolled_taps(x, weight) else 0
    chunks = config.get("CHUNKS", 1) if taps else 1
    cg_tiles = cdiv(C // G, meta["BLOCK_CG"] * chunks)
    # Strip rows share input rows only when consecutive output rows read consecutive input rows.
    strip = _strip(meta, chunks, taps > 0 and stride[0] == 1 and dilation[0] == 1, x, weight)
    strip_rows = cdiv(Ho, strip)
    if taps:  # one set of programs over the flattened batch (see _program_lanes)
        tiles_w, tiles_pix = 1, _flat_tiles(B, strip_rows, Wo, meta, strip)
        programs = tiles_pix
    else:
        tiles_w = cdiv(Wo, meta["BLOCK_W"])
        tiles_pix = cdiv(Ho, meta["BLOCK_H"]) * tiles_w
        programs = B * tiles_pix
    bias_strides = bias.stride() if bias is not None else (0, 0)
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias, y_ptr=y,
        B=B, C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K,
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("swb", "swg", "swu", "swv", "swh", "sww"), _weight_strides(weight))),
        sbb=bias_strides[0], sbc=bias_strides[1],
        **dict(zip(("syb", "syc", "syh", "syw"), y.stride())),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        TILES_PIX=tiles_pix, TILES_W=tiles_w, CG_TILES=cg_tiles, STRIP_ROWS=strip_rows,
    )
    meta.update(PER_PIXEL=weight.dim() == 6, HAS_BIAS=bias is not None,
                INDEX_64=needs_int64(x, weight, bias, y), ACC_DTYPE=_acc_dtype(x.dtype), TAPS=taps, STRIP=strip,
                PRELOAD=taps > 0 and _preload(x, weight),
                CHUNKS=chunks, PAIRS=taps > 0 and bias is None and _pairs(x, y, weight, meta),
                CHANNELS_FULL=taps > 0 and _channels_full(C, G, meta, chunks))
    meta["STAGED"] = taps > 0 and _staged(x, weight, meta, strip, taps)
    meta["INNER"] = _inner_strides(x, weight, meta) if taps else None
    return Launch(involution_fwd_kernel, _grid(programs, G, cg_tiles, meta["BLOCK_G"]), args, meta,
                  num_warps, num_stages, loops=_tap_loops(taps > 0, K, K),
                  sm90_max_registers=STAGED_FORWARD_SM90_REGISTERS if meta["STAGED"] else 0)


def backward_input_launch(dy, weight, dx, stride, padding, dilation, config=None) -> Launch:
    if not cacheable(dy):
        return _backward_input_launch(dy, weight, dx, stride, padding, dilation, config)
    key = ("involution_bwd_input", layout(dy), layout(weight), layout(dx), *stride, *padding, *dilation,
           config_key(config), _pairs_aligned(dy, dx))
    return planned(key, ("dy_ptr", "w_ptr", "dx_ptr"), (dy, weight, dx),
                   lambda: _backward_input_launch(dy, weight, dx, stride, padding, dilation, config))


def _backward_input_launch(dy, weight, dx, stride, padding, dilation, config=None) -> Launch:
    if dwconv.handles(weight, config):
        return dwconv.backward_input_launch(dy, weight, dx, stride, padding, dilation, config)
    if involution_nchw.covers(dx, weight, config):
        return involution_nchw.backward_input_launch(dy, weight, dx, stride, padding, dilation,
                                                     needs_int64(dy, weight, dx), config)
    B, C, H, W = dx.shape
    G, K = weight.shape[1], weight.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    config = config or get_config("involution_bwd_input", problem_key(dx, G, K, stride),
                                  input_grad_default(dx, weight, stride, dilation))
    meta, _, num_warps, num_stages = _split_config(config, True, C, G)
    unrolled = unrolled_taps(dx, weight)
    chunks = config.get("CHUNKS", 1) if unrolled else 1
    cg_tiles = cdiv(C // G, meta["BLOCK_CG"] * chunks)
    (gh, step_h, inv_h), (gw, step_w, inv_w) = (_phase_taps(s, d) for s, d in zip(stride, dilation))
    if unrolled:
        # One set of programs per stride phase, each over the input pixels of its phase.
        phases, rows, cols = stride[0] * stride[1], cdiv(H, stride[0]), cdiv(W, stride[1])
        taps_u, taps_v = cdiv(K, step_h), cdiv(K, step_w)
    else:
        phases, rows, cols, taps_u, taps_v = 1, H, W, 0, 0
    # Strip rows of a phase share dy rows only when a phase's taps step one dy row.
    strip = _strip(meta, chunks, unrolled and dilation[0] // gh == 1, dx, weight)
    strip_rows = cdiv(rows, strip)
    if unrolled:  # a phase's programs run over its flattened (sample, strip row, column) space
        tiles_w, tiles_phase = 1, _flat_tiles(B, strip_rows, cols, meta, strip)
    else:
        tiles_w = cdiv(cols, meta["BLOCK_W"])
        tiles_phase = cdiv(rows, meta["BLOCK_H"]) * tiles_w
    args = dict(
        dy_ptr=dy, w_ptr=weight, dx_ptr=dx,
        B=B, C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("swb", "swg", "swu", "swv", "swh", "sww"), _weight_strides(weight))),
        **dict(zip(("sdxb", "sdxc", "sdxh", "sdxw"), dx.stride())),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        TILES_W=tiles_w, CG_TILES=cg_tiles, TILES_PHASE=tiles_phase,
        GH=gh, GW=gw, INV_H=inv_h, INV_W=inv_w, TAPS_V=taps_v, STRIP_ROWS=strip_rows, COLS=cols,
    )
    meta.update(PER_PIXEL=weight.dim() == 6, INDEX_64=needs_int64(dy, weight, dx), ACC_DTYPE=_acc_dtype(dy.dtype),
                TAPS_U=taps_u, PRELOAD=unrolled and _preload(dy, weight),
                STRIP=strip, CHUNKS=chunks, CHANNELS_FULL=unrolled and _channels_full(C, G, meta, chunks),
                PAIRS=unrolled and _pairs(dy, dx, weight, meta),
                FIRST_TAP_MAY_MISS=unrolled and (K % step_h != 0 or K % step_w != 0),
                PHASE_MAY_BE_EMPTY=unrolled and (gh > 1 or gw > 1))
    meta["STAGED"] = unrolled and _staged(dy, weight, meta, strip, taps_u, input_grad=True)
    meta["INNER"] = _inner_strides(dy, weight, meta) if unrolled else None
    programs = phases * tiles_phase if unrolled else B * tiles_phase
    trips = _phase_column_taps(K, stride[1], padding[1], gw, step_w, inv_w, taps_v) if unrolled else None
    return Launch(involution_bwd_input_kernel, _grid(programs, G, cg_tiles, meta["BLOCK_G"]), args,
                  meta, num_warps, num_stages, loops=_tap_loops(unrolled, taps_v, K, trips))


def input_grad_default(dx, weight, stride, dilation=(1, 1)) -> dict:
    """The input gradient's default tile, over the pixels of one stride phase (a copy)."""
    B, C, H, W = dx.shape
    if not unrolled_taps(dx, weight):
        return default_config(C, weight.shape[1], H, W, is_channels_last(dx))
    strips = dilation[0] // math.gcd(stride[0], dilation[0]) == 1
    return tap_config(C, weight.shape[1], cdiv(H, stride[0]), cdiv(W, stride[1]), is_channels_last(dx),
                      weight.shape[2], dx.element_size(), weight.dim() == 6, strips)


def _inner_strides(src, weight, meta: dict):
    """The unrolled kernels' within-sample strides as compile-time constants (a variant per feature-map
    size and layout, as involution_nchw.py): the source's row and column strides and the weight's tap and
    pixel strides. None in the INDEX_64 variants (offsets too large for immediates anyway)."""
    if meta["INDEX_64"]:
        return None
    return (*src.stride()[2:], *_weight_strides(weight)[2:])


def _channels_full(C: int, G: int, meta: dict, chunks: int) -> bool:
    """Whether every channel chunk of every program lies inside its group (the unrolled loads then need
    no channel mask, only the pixel's)."""
    return G % meta["BLOCK_G"] == 0 and (C // G) % (meta["BLOCK_CG"] * chunks) == 0


def _pairs_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor starts on a 4-byte boundary (the int32 pairs of _pairs; part of a plan's key)."""
    return all(t.data_ptr() % 4 == 0 for t in tensors)


def _pairs(src, dst, weight, meta: dict) -> bool:
    """Whether the unrolled kernels read ``src`` and write ``dst`` as int32 pairs of bf16 channels: per-pixel
    weights, channels contiguous, pairs inside one group and one chunk (CG and BLOCK_CG even), every
    other stride even and both tensors 4-byte aligned."""
    if src.dtype != torch.bfloat16 or dst.dtype != torch.bfloat16 or weight.dim() != 6:
        return False
    if (src.shape[1] // weight.shape[1]) % 2 or meta["BLOCK_CG"] % 2:
        return False
    return _pairs_aligned(src, dst) and all(
        t.stride(1) == 1 and all(t.stride(d) % 2 == 0 for d in (0, 2, 3)) for t in (src, dst))


def _phase_taps(stride: int, dilation: int) -> tuple[int, int, int]:
    """(gcd, step, inverse) of one axis: the taps u of a stride phase satisfy u*dilation = r (mod stride),
    which has solutions only when gcd | r, then u = (r/gcd) * inverse (mod step), step = stride/gcd."""
    g = math.gcd(stride, dilation)
    step = stride // g
    return g, step, pow(dilation // g, -1, step) if step > 1 else 0


def _phase_column_taps(K: int, stride: int, pad: int, gcd: int, step: int, inverse: int, taps: int) -> list[int]:
    """The column-tap loop's trips in each column phase of the input gradient (equally many programs
    each): ``taps`` slots, less the first where it names tap K (the phase has a tap fewer; the loop
    starts past it, as _strip_taps does)."""
    trips = []
    for pw in range(stride):
        v0 = ((pw + pad) // gcd * inverse) % step
        trips.append(taps - (v0 + (taps - 1) * step >= K))
    return trips


def _tap_loops(unrolled: bool, column_taps: int, K: int, phase_trips: list[int] | None = None) -> tuple:
    """Trip counts of the fwd/dx tap loops: the column-tap loop over ``column_taps`` slots (a one-slot
    loop compiles to none), its trips per stride phase where they differ (_phase_column_taps), or the
    run-time K² loop."""
    if not unrolled:
        return (K * K,)
    if column_taps <= 1:
        return ()
    if phase_trips:
        return (phase_trips if len(set(phase_trips)) > 1 else phase_trips[0],)
    return (column_taps,)


def _strip(meta: dict, chunks: int, reuse: bool, x, weight) -> int:
    """Output rows per thread: when consecutive rows share source rows, the longest strip the register
    budget allows that splits the tile's BLOCK_H rows into a power of two of strips, else 1 (then a
    BLOCK_H that is no power of two is rounded down to one in ``meta``)."""
    rows = meta["BLOCK_H"]
    if not reuse:
        meta["BLOCK_H"] = 1 << (rows.bit_length() - 1)
        return 1
    cap = _strip_cap(meta["BLOCK_G"] * meta["BLOCK_CG"], chunks, is_channels_last(x), x.element_size(),
                     weight.dim() == 6, weight.shape[2])
    strips = [s for s in range(1, min(cap, rows) + 1) if rows % s == 0 and _is_pow2(rows // s)]
    if not strips:  # e.g. a tuned BLOCK_H of 28 where the budget allows strips of 4 at most
        meta["BLOCK_H"] = rows = 1 << (rows.bit_length() - 1)
        strips = [s for s in range(1, min(cap, rows) + 1) if rows % s == 0]
    return max(strips)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated (layout is the op's call).
# --------------------------------------------------------------------------------------------

def involution_forward(x, weight, bias, y, stride, padding, dilation, config=None) -> None:
    forward_launch(x, weight, bias, y, stride, padding, dilation, config)()


def involution_backward_input(dy, weight, dx, stride, padding, dilation, config=None) -> None:
    backward_input_launch(dy, weight, dx, stride, padding, dilation, config)()


def catalogue_problems():
    """(label, x, y, weight, bias, geometry) at representative shapes, on meta tensors: the problems
    this module's catalogue and involution_weight_grad's compile."""
    shapes = [  # (B, C, H, W, K, G, stride, label)
        (32, 256, 56, 56, 7, 16, 1, "R1 involution"),
        (32, 128, 56, 56, 7, 128, 1, "R3 depth-wise per-pixel"),
        (8, 64, 31, 31, 3, 4, 2, "stride 2, odd H"),
    ]
    for (B, C, H, W, K, G, s, label), dtype, channels_last, per_pixel in itertools.product(
            shapes, (torch.float32, torch.float16, torch.bfloat16), (False, True), (True, False)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        p = (K - 1) // 2
        Ho = (H + 2 * p - (K - 1) - 1) // s + 1
        x = torch.empty((B, C, H, W), dtype=dtype, device="meta").to(memory_format=fmt)
        y = torch.empty((B, C, Ho, Ho), dtype=dtype, device="meta").to(memory_format=fmt)
        wshape = (B, G, K, K, Ho, Ho) if per_pixel else (B, G, K, K)
        w = torch.empty(wshape, dtype=dtype, device="meta")
        bias = None if per_pixel else torch.empty((B, C), dtype=dtype, device="meta")
        tag = f"{label} {dtype} {'NHWC' if channels_last else 'NCHW'} {'pixel' if per_pixel else 'sample'}"
        yield tag, x, y, w, bias, ((s, s), (p, p), (1, 1))
    # Per-sample weights at K = 5, 16-bit channels_last: the only K at which the weight gradient's
    # walk, too, takes two channels a thread (dynamic_dwconv._taps_config).
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty((16, 96, 28, 28), dtype=dtype, device="meta").to(memory_format=torch.channels_last)
        w = torch.empty((16, 96, 5, 5), dtype=dtype, device="meta")
        yield (f"depth-wise 5x5 {dtype} NHWC sample", x, torch.empty_like(x), w,
               torch.empty((16, 96), dtype=dtype, device="meta"), ((1, 1), (2, 2), (1, 1)))


def over_int32_problem():
    """The catalogues' problem past 2^31 elements: x (bf16, 2304 x 256 x 64 x 64) in NCHW and in
    channels_last, per-pixel weights of 16 groups at K = 3, and its geometry."""
    x = torch.empty((2304, 256, 64, 64), dtype=torch.bfloat16, device="meta")
    w = torch.empty((2304, 16, 3, 3, 64, 64), dtype=torch.bfloat16, device="meta")
    return x, x.to(memory_format=torch.channels_last), w, ((1, 1), (1, 1), (1, 1))


def label_over_int32(launches_and_kinds) -> list[Launch]:
    """The over-2^31 launches of (launch, kind) pairs, each checked to take 64-bit offsets and labelled
    by layout (a kind ending in "channels_last" is NHWC) and kind."""
    labelled = []
    for launch, kind in launches_and_kinds:
        assert launch.meta["INDEX_64"]
        layout_name = "NHWC" if kind.endswith("channels_last") else "NCHW"
        launch.label = f"over 2^31 elements torch.bfloat16 {layout_name} {kind.removesuffix(' channels_last')}"
        labelled.append(launch)
    return labelled


def catalogue() -> list[Launch]:
    """The forward and input-gradient launches ops make by default at representative shapes, on meta
    tensors (for AOT checks); involution_weight_grad.catalogue has the weight gradients'."""
    launches = []
    for tag, x, y, w, bias, geometry in catalogue_problems():
        for launch in (forward_launch(x, w, bias, y, *geometry), backward_input_launch(y, w, x, *geometry)):
            launch.label = tag
            launches.append(launch)
    # Large kernels per pixel, NCHW at an odd width (the single-pixel kernels) and channels_last (taps
    # unrolled): the reference shapes' K = 7 left their tiles' spills from K = 8 on unseen (see
    # involution_nchw.nchw_config and _strip_cap).
    for dtype, channels_last, s in itertools.product((torch.float32, torch.bfloat16), (False, True), (1, 2)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        K, Ho, Wo = 11, (32 - 1) // s + 1, (33 - 1) // s + 1  # 4-row NCHW strips at either stride
        x = torch.empty((8, 64, 32, 33), dtype=dtype, device="meta").to(memory_format=fmt)
        y = torch.empty((8, 64, Ho, Wo), dtype=dtype, device="meta").to(memory_format=fmt)
        w = torch.empty((8, 4, K, K, Ho, Wo), dtype=dtype, device="meta")
        geometry = ((s, s), (K // 2, K // 2), (1, 1))
        for launch in (forward_launch(x, w, None, y, *geometry), backward_input_launch(y, w, x, *geometry)):
            launch.label = f"K = 11, stride {s} {dtype} {'NHWC' if channels_last else 'NCHW'} pixel"
            launches.append(launch)
    # Over 2^31 elements: the int64-offset variants, per pixel and per sample.
    x, x_cl, w, geometry = over_int32_problem()
    w_sample = torch.empty((2304, 16, 3, 3), dtype=torch.bfloat16, device="meta")
    bias = torch.empty((2304, 256), dtype=torch.bfloat16, device="meta")
    return launches + label_over_int32(((forward_launch(x, w, None, x, *geometry), "pixel"),
                                        (backward_input_launch(x, w, x, *geometry), "pixel"),
                                        (forward_launch(x, w_sample, bias, x, *geometry), "sample"),
                                        (backward_input_launch(x, w_sample, x, *geometry), "sample"),
                                        (forward_launch(x_cl, w, None, x_cl, *geometry), "pixel channels_last"),
                                        (backward_input_launch(x_cl, w, x_cl, *geometry), "pixel channels_last")))
