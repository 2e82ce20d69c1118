"""The weight gradients of the involution family (docs/operators.md §1): dw of per-pixel weights
``(B, G, K, K, Ho, Wo)``, and of per-sample weights ``(B, G, K, K)`` as fp32 partials the caller sums
in a fixed order (deterministic).

Which kernel runs is the launcher's call (weight_grad_default):

- NCHW per pixel: involution_nchw.py's kernels (K <= its MAX_K);
- channels_last per pixel, 2..RUNS_MAX_CG channels a group: ``involution_bwd_weight_runs_kernel``
  (taps unrolled, runs of rows per lane);
- per sample at row stride and dilation 1, one-channel groups: dynamic_dwconv.py's row walk;
- per sample otherwise, one-channel groups: ``involution_bwd_weight_sample_kernel`` (persistent
  programs, K <= SAMPLE_MAX_K);
- anything else: ``involution_bwd_weight_kernel``, the generic tile of involution.py's forward.

Kernels here know nothing of autograd: ``ops/involution.py`` wires them into torch.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from . import dynamic_dwconv_weight_grad as dwconv_dw
from . import involution_nchw
from ._keys import problem_key
from ._launch import (TRITON_VERSION, Launch, cacheable, cdiv, config_key, inner_strides, is_channels_last, layout,
                      needs_int64, next_power_of_2, planned, split_trips)
from ._indexing import widen
from .configs import get_config
from .layout import channels_last_copy, channels_last_empty
from .involution import (_acc_dtype, _grid, _pow2_at_most, _split_config, _tile_indices, catalogue_problems,
                         default_config, label_over_int32, over_int32_problem)


@triton.jit
def involution_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    B, C, H, W, Ho, Wo, CG, K,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sdwb, sdwg, sdwu, sdwv, sdwh, sdww,
    SH, SW, PH, PW, DH, DW,
    TILES_PIX, TILES_W, CG_TILES,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PER_PIXEL: tl.constexpr, ONE_CG_CHUNK: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dw[b,g,u,v,i,j] = sum_{c in g} dy[b,c,i,j] * x[b,c,i*SH-PH+u*DH, j*SW-PW+v*DW].

    Per-sample weights (PER_PIXEL false) also sum over this program's pixel tile and store one
    partial per tile at dw[b, g, u, v, tile] (sdwh is the tile stride); the caller adds the
    partials in a fixed order, so the result is deterministic. Each program loops over all
    channels of its groups (CG_TILES is 1 on the grid).
    """
    pid0 = tl.program_id(0)
    b = pid0 // TILES_PIX
    tile = pid0 % TILES_PIX
    if INDEX_64:
        b = b.to(tl.int64)
    G = C // CG
    g3, cg3, c3, channel_mask, i, j = _tile_indices(
        tile, tl.program_id(1), TILES_W, 1, G, CG,
        BLOCK_G, BLOCK_CG, BLOCK_H, BLOCK_W, INDEX_64)
    out_mask = (i < Ho) & (j < Wo)
    g1 = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    if INDEX_64:
        g1 = g1.to(tl.int64)

    dy_rows = dy_ptr + b * sdyb + (i * sdyh + j * sdyw)[None, None, :]
    x_rows = x_ptr + b * sxb
    dw_group = dw_ptr + b * sdwb + g1 * sdwg
    h_first = i * SH - PH
    w_first = j * SW - PW
    if ONE_CG_CHUNK:
        # The groups' channels fit one chunk: read the gradient tile once, not once per tap.
        grad_tile = tl.load(dy_rows + c3 * sdyc, mask=channel_mask & out_mask[None, None, :], other=0.0)
        grad_tile = grad_tile.to(ACC_DTYPE)
    # One loop over the K² taps, not a u/v nest: a nest holds its outer loop's row terms through the
    # whole inner loop, and ptxas 12.8 (triton 3.6) spills such values to reach an occupancy step.
    for tap in range(K * K):
        u = tap // K
        v = tap % K
        h_in = h_first + u * DH
        w_in = w_first + v * DW
        ok3 = (out_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W))[None, None, :]
        x_tap = x_rows + (h_in * sxh + w_in * sxw)[None, None, :]
        if ONE_CG_CHUNK:
            acc = grad_tile * tl.load(x_tap + c3 * sxc, mask=channel_mask & ok3, other=0.0).to(ACC_DTYPE)
        else:
            acc = tl.zeros((BLOCK_G, BLOCK_CG, BLOCK_H * BLOCK_W), dtype=ACC_DTYPE)
            for cg_start in range(0, CG, BLOCK_CG):
                c = c3 + cg_start
                m = (g3 < G) & (cg3 + cg_start < CG)
                grad = tl.load(dy_rows + c * sdyc, mask=m & out_mask[None, None, :], other=0.0)
                xv = tl.load(x_tap + c * sxc, mask=m & ok3, other=0.0)
                acc += grad.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
        per_pixel = tl.sum(acc, axis=1)  # [BLOCK_G, pixels]
        dw_tap = dw_group + widen(u, INDEX_64) * sdwu + widen(v, INDEX_64) * sdwv
        if PER_PIXEL:
            tl.store(dw_tap[:, None] + (i * sdwh + j * sdww)[None, :],
                     per_pixel.to(dw_ptr.dtype.element_ty), mask=(g1 < G)[:, None] & out_mask[None, :])
        else:
            tl.store(dw_tap + widen(tile, INDEX_64) * sdwh,
                     tl.sum(per_pixel, axis=1).to(dw_ptr.dtype.element_ty), mask=g1 < G)


@triton.jit
def _multiply_add_rows(acc, a, b, N: tl.constexpr):
    """acc + the sum over axis 1 of a * b ([lanes, N], N a power of two held by each thread) as one
    chain of multiply-adds: tl.sum reduces a tree, which triton 3.9 compiles to a multiply and an
    add per element."""
    if N == 1:
        return acc + tl.reshape(a, (a.shape[0],)) * tl.reshape(b, (b.shape[0],))
    else:
        a0, a1 = tl.split(tl.reshape(a, (a.shape[0], N // 2, 2)))
        b0, b1 = tl.split(tl.reshape(b, (b.shape[0], N // 2, 2)))
        return _multiply_add_rows(_multiply_add_rows(acc, a0, b0, N // 2), a1, b1, N // 2)


@triton.jit
def involution_bwd_weight_runs_kernel(
    dy_ptr, x_ptr, dw_ptr,
    C, H, W, Ho, Wo, CG,
    sdyb, sdyc, sxb, sxc, sdwb, sdwg,
    PH, PW, TILES_PIX, TILES_W,
    sdyh: tl.constexpr, sdyw: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
    sdwu: tl.constexpr, sdwv: tl.constexpr, sdwh: tl.constexpr, sdww: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    RUN: tl.constexpr, LOOK_AHEAD: tl.constexpr, CHANNELS_FULL: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, CARRIED: tl.constexpr = False,
):
    """Per-pixel dw with the kernel size, strides and dilations compile-time constants, taps unrolled.

    Lanes lie along W (coalesced in both layouts); each lane owns a run of RUN output rows of one
    column and its groups' channels in CHUNKS register chunks of CHUNK (a 16-byte vector in
    channels_last, one strided channel in NCHW), so the sum over a group's channels is a chain of
    FMAs in one thread. For one tap column v, the input rows the run reads for all K taps u form a
    halo of (RUN-1)*SH + (K-1)*DH + 1 rows: each is loaded and converted once and serves every
    (row, u) pair that reads it, instead of once per tap. The within-sample strides are compile-time
    constants (a variant per feature-map size), so each row's and tap's offset is an immediate.
    CARRIED: a tap column's first LOOK_AHEAD halo rows are loaded after the last column's final store
    (the first column's before the run's gradient, the two sharing one round trip), in the registers
    the last column's rows had freed, and carried into the loop.
    """
    pid0 = tl.program_id(0)
    b = pid0 // TILES_PIX
    tile = pid0 % TILES_PIX
    # One flat lane axis, pixels fastest then groups: the sums reduced over the chunk axis then lie
    # where the store wants them (a [groups, pixels, chunk] tile left the order of two axes of equal
    # contiguity to triton, which 3.6 and 3.9 settle differently: a shuffle or a trip through shared
    # memory per stored sum).
    PIXELS: tl.constexpr = BLOCK_H * BLOCK_W
    lane = tl.arange(0, BLOCK_G * PIXELS)
    pixel = lane % PIXELS
    row = ((tile // TILES_W) * BLOCK_H + pixel // BLOCK_W) * RUN
    col = (tile % TILES_W) * BLOCK_W + pixel % BLOCK_W
    g = tl.program_id(1) * BLOCK_G + lane // PIXELS
    k = tl.arange(0, CHUNK)
    if INDEX_64:
        b = b.to(tl.int64)
        row = row.to(tl.int64)
        col = col.to(tl.int64)
        g = g.to(tl.int64)
        k = k.to(tl.int64)
    G = C // CG
    group_ok = g < G
    channels = ()
    channels_ok = ()
    for q in tl.static_range(CHUNKS):
        channels = channels + (g[:, None] * CG + q * CHUNK + k[None, :],)
        # CHANNELS_FULL: every chunk of every lane's group exists, so the loads need only the pixel's mask.
        channels_ok = channels_ok + (group_ok[:, None] & (q * CHUNK + k[None, :] < CG),)

    HALO: tl.constexpr = (RUN - 1) * SH + (KS - 1) * DH + 1
    h_first = row * SH - PH
    w_first = col * SW - PW
    rows_ok = ()
    for h in tl.static_range(HALO):
        rows_ok = rows_ok + ((h_first + h >= 0) & (h_first + h < H),)
    # Per-element pointers are formed once; each (tap column, halo row) adds one scalar offset.
    x_lane = x_ptr + b * sxb + (h_first * sxh + w_first * sxw)[:, None]
    x_chunks = ()
    for q in tl.static_range(CHUNKS):
        x_chunks = x_chunks + (x_lane + channels[q] * sxc,)
    if CARRIED:
        pending = _runs_look_ahead_rows(x_chunks, 0, w_first, W, rows_ok, channels_ok, sxh, sxw, DW, LOOK_AHEAD,
                                        CHUNKS, CHANNELS_FULL, INDEX_64)

    # The run's output pixels and their gradient, converted once for all K*K taps.
    grads = ()
    out_ok = ()
    dy_lane = dy_ptr + b * sdyb + (row * sdyh + col * sdyw)[:, None]
    for r in tl.static_range(RUN):
        ok = (row + r < Ho) & (col < Wo)
        out_ok = out_ok + (ok,)
        for q in tl.static_range(CHUNKS):
            m = ok[:, None]
            if not CHANNELS_FULL:
                m = m & channels_ok[q]
            grad = tl.load(dy_lane + (channels[q] * sdyc + r * sdyh), mask=m, other=0.0)
            grads = grads + (grad.to(ACC_DTYPE),)

    dw_lane = dw_ptr + b * sdwb + g * sdwg + row * sdwh + col * sdww
    # Tap columns a run-time loop: unrolled too, ptxas takes minutes on the K*HALO*RUN body (R1 fp32).
    for v in range(KS):
        cols_ok, column = _runs_column(v, w_first, W, sxw, DW, INDEX_64)
        # Halo rows are loaded LOOK_AHEAD rows ahead of the row summed: the stores between rows keep
        # the compiler from moving a row's loads above the last row's (dw might alias x), so each row
        # would otherwise wait out a full memory round trip. (Loading the next column's rows as this
        # column's are summed took more registers than the round trip per column it saved.)
        if not CARRIED:
            pending = _runs_look_ahead_rows(x_chunks, v, w_first, W, rows_ok, channels_ok, sxh, sxw, DW,
                                            LOOK_AHEAD, CHUNKS, CHANNELS_FULL, INDEX_64)
        for h in tl.static_range(HALO):
            raw = ()
            rest = ()
            for q in tl.static_range(len(pending)):
                if q < CHUNKS:
                    raw = raw + (pending[q],)
                else:
                    rest = rest + (pending[q],)
            pending = rest
            if h + LOOK_AHEAD < HALO:
                pending = pending + _runs_halo_row(x_chunks, (h + LOOK_AHEAD) * sxh + column,
                                                   cols_ok & rows_ok[h + LOOK_AHEAD], channels_ok, CHUNKS,
                                                   CHANNELS_FULL)
            halo = ()
            for q in tl.static_range(CHUNKS):
                halo = halo + (raw[q].to(ACC_DTYPE),)
            for r in tl.static_range(RUN):
                # Output row r reads halo row r*SH + u*DH through tap u.
                if h >= r * SH:
                    if (h - r * SH) % DH == 0:
                        if (h - r * SH) // DH < KS:
                            acc = tl.zeros((BLOCK_G * PIXELS,), dtype=ACC_DTYPE)
                            for q in tl.static_range(CHUNKS):
                                acc = _multiply_add_rows(acc, grads[r * CHUNKS + q], halo[q], CHUNK)
                            u = (h - r * SH) // DH
                            offset = widen(v, INDEX_64) * sdwv + (u * sdwu + r * sdwh)
                            tl.store(dw_lane + offset, acc.to(dw_ptr.dtype.element_ty), mask=group_ok & out_ok[r])
        if CARRIED:
            pending = _runs_look_ahead_rows(x_chunks, v + 1, w_first, W, rows_ok, channels_ok, sxh, sxw, DW,
                                            LOOK_AHEAD, CHUNKS, CHANNELS_FULL, INDEX_64, v + 1 < KS)


@triton.jit
def _runs_look_ahead_rows(x_chunks, v, w_first, W, rows_ok, channels_ok, sxh: tl.constexpr, sxw: tl.constexpr,
                          DW: tl.constexpr, LOOK_AHEAD: tl.constexpr, CHUNKS: tl.constexpr,
                          CHANNELS_FULL: tl.constexpr, INDEX_64: tl.constexpr, column_ok=True):
    """Tap column v's first LOOK_AHEAD halo rows, as loaded (CHUNKS entries a row); none read where
    ``column_ok`` is false (past the last column)."""
    cols_ok, column = _runs_column(v, w_first, W, sxw, DW, INDEX_64)
    cols_ok = cols_ok & column_ok
    rows = ()
    for h in tl.static_range(LOOK_AHEAD):
        rows = rows + _runs_halo_row(x_chunks, h * sxh + column, cols_ok & rows_ok[h], channels_ok, CHUNKS,
                                     CHANNELS_FULL)
    return rows


@triton.jit
def _runs_column(v, w_first, W, sxw: tl.constexpr, DW: tl.constexpr, INDEX_64: tl.constexpr):
    """Tap column v's halo: whether each lane's column lies in x, and its offset from the lane's first."""
    return (w_first + v * DW >= 0) & (w_first + v * DW < W), widen(v, INDEX_64) * (DW * sxw)


@triton.jit
def _runs_halo_row(x_chunks, offset, ok, channels_ok, CHUNKS: tl.constexpr, CHANNELS_FULL: tl.constexpr):
    """One halo row of the runs kernel as loaded: a tuple of its CHUNKS channel chunks, zero outside x."""
    row = ()
    for q in tl.static_range(CHUNKS):
        m = ok[:, None]
        if not CHANNELS_FULL:
            m = m & channels_ok[q]
        row = row + (tl.load(x_chunks[q] + offset, mask=m, other=0.0),)
    return row


@triton.jit
def involution_bwd_weight_sample_kernel(
    dy_ptr, x_ptr, dw_ptr,
    C, H, W, Ho, Wo,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    spb, spg, spu, spv, sps,
    PH, PW, TILES_PIX, TILES_W, SPLITS,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, RUN: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Per-sample dw of one-channel groups (G = C) as partials: dw[b, g, u, v, split] = this program's share of
    sum_{i,j} dy[b,g,i,j] * x[b,g,i*SH-PH+u*DH, j*SW-PW+v*DW].

    A persistent program: (sample, group block, split) walks the pixel tiles split, split+SPLITS, ...
    keeping the K*K tap sums of each lane in registers, and reduces them over its lanes once at the
    end, so the caller adds SPLITS partials per weight, not one per tile. A tile is BLOCK_W columns
    of runs of RUN rows; the halo rows of a run are loaded and converted once per tap column (as in
    involution_bwd_weight_runs_kernel).
    """
    pid0 = tl.program_id(0)
    b = pid0 // SPLITS
    split = pid0 % SPLITS
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    w_lane = tl.arange(0, BLOCK_W)
    if INDEX_64:
        b = b.to(tl.int64)
        g = g.to(tl.int64)
    g_ok = (g < C)[:, None]
    dy_sample = dy_ptr + b * sdyb + (g * sdyc)[:, None]
    x_sample = x_ptr + b * sxb + (g * sxc)[:, None]
    HALO: tl.constexpr = (RUN - 1) * SH + (KS - 1) * DH + 1
    accs = ()
    for t in tl.static_range(KS * KS):
        accs = accs + (tl.zeros((BLOCK_G, BLOCK_W), dtype=ACC_DTYPE),)
    for tile in range(split, TILES_PIX, SPLITS):
        # Per lane (not a scalar): the interpreter's loop index is a Python int, and masks must be arrays.
        row = (tile // TILES_W) * RUN + w_lane * 0
        col = (tile % TILES_W) * BLOCK_W + w_lane
        if INDEX_64:
            row = row.to(tl.int64)
            col = col.to(tl.int64)
        col_ok = col < Wo
        grads = ()
        for r in tl.static_range(RUN):
            m = g_ok & (col_ok & (row + r < Ho))[None, :]
            grad = tl.load(dy_sample + ((row + r) * sdyh + col * sdyw)[None, :], mask=m, other=0.0)
            grads = grads + (grad.to(ACC_DTYPE),)
        h_first = row * SH - PH
        w_first = col * SW - PW
        x_tile = x_sample + (h_first * sxh + w_first * sxw)[None, :]
        updated = ()
        for v in tl.static_range(KS):
            w_ok = g_ok & ((w_first + v * DW >= 0) & (w_first + v * DW < W))[None, :]
            column = ()
            for u in tl.static_range(KS):
                column = column + (accs[v * KS + u],)
            # Halo rows stream through: each is used by every (row r, tap u) reading it, then dropped.
            for h in tl.static_range(HALO):
                ok = w_ok & ((h_first + h >= 0) & (h_first + h < H))[None, :]
                xv = tl.load(x_tile + (h * widen(sxh, INDEX_64) + v * DW * widen(sxw, INDEX_64)), mask=ok, other=0.0)
                xv = xv.to(ACC_DTYPE)
                for r in tl.static_range(RUN):
                    if h >= r * SH:
                        if (h - r * SH) % DH == 0:
                            if (h - r * SH) // DH < KS:
                                step = ()
                                for u in tl.static_range(KS):
                                    if u == (h - r * SH) // DH:
                                        step = step + (column[u] + grads[r] * xv,)
                                    else:
                                        step = step + (column[u],)
                                column = step
            updated = updated + column
        accs = updated
    part = dw_ptr + b * spb + split * sps + g * spg
    for t in tl.static_range(KS * KS):
        # accs[v*K + u] holds tap (u, v).
        tap = (t % KS) * widen(spu, INDEX_64) + (t // KS) * widen(spv, INDEX_64)
        tl.store(part + tap, tl.sum(accs[t], axis=1), mask=g < C)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def backward_weight_launch(dy, x, dw, stride, padding, dilation, per_pixel: bool, config=None) -> Launch:
    """``dw`` is (B, G, K, K, Ho, Wo) per pixel, or (B, G, K, K, tiles) fp32 partials per sample."""
    if not cacheable(x):
        return _backward_weight_launch(dy, x, dw, stride, padding, dilation, per_pixel, config)
    key = ("involution_bwd_weight", layout(dy), layout(x), layout(dw), *stride, *padding, *dilation, per_pixel,
           config_key(config))
    return planned(key, ("dy_ptr", "x_ptr", "dw_ptr"), (dy, x, dw),
                   lambda: _backward_weight_launch(dy, x, dw, stride, padding, dilation, per_pixel, config))


def _backward_weight_launch(dy, x, dw, stride, padding, dilation, per_pixel: bool, config=None) -> Launch:
    if per_pixel and involution_nchw.covers(x, dw, config):
        return involution_nchw.backward_weight_launch(dy, x, dw, stride, padding, dilation, needs_int64(dy, x, dw),
                                                      config)
    B, C, H, W = x.shape
    G, K = dw.shape[1], dw.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    config = config or weight_grad_config(x, G, K, stride, Ho, Wo, per_pixel, dilation)
    if not per_pixel and "P" in config:
        return dwconv_dw.backward_weight_launch(dy, x, dw, stride, padding, dilation, config)
    if per_pixel and "RUN" in config:
        return _runs_launch(dy, x, dw, stride, padding, dilation, config)
    if "RUN" in config:
        return _sample_launch(dy, x, dw, stride, padding, dilation, config)
    meta, _, num_warps, num_stages = _split_config(config, False, C, G)
    tiles_w = cdiv(Wo, meta["BLOCK_W"])
    tiles_pix = cdiv(Ho, meta["BLOCK_H"]) * tiles_w
    dw_strides = dw.stride() if per_pixel else (*dw.stride(), 0)
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw,
        B=B, C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=C // G, K=K,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sdwb", "sdwg", "sdwu", "sdwv", "sdwh", "sdww"), dw_strides)),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        TILES_PIX=tiles_pix, TILES_W=tiles_w, CG_TILES=1,
    )
    meta.update(PER_PIXEL=per_pixel, ONE_CG_CHUNK=C // G <= meta["BLOCK_CG"], INDEX_64=needs_int64(dy, x, dw),
                ACC_DTYPE=_acc_dtype(x.dtype))
    loops = (K * K,) if meta["ONE_CG_CHUNK"] else ((K * K, (cdiv(C // G, meta["BLOCK_CG"]),)),)
    return Launch(involution_bwd_weight_kernel, _grid(B * tiles_pix, G, 1, meta["BLOCK_G"]), args, meta,
                  num_warps, num_stages, loops=loops)


def _runs_geometry(config: dict, Ho: int, Wo: int) -> tuple[int, int]:
    """(pixel tiles, tiles along W) of the runs kernel: lanes along W, each a run of RUN rows."""
    tiles_w = cdiv(Wo, config["BLOCK_W"])
    return cdiv(Ho, config["BLOCK_H"] * config["RUN"]) * tiles_w, tiles_w


def _runs_launch(dy, x, dw, stride, padding, dilation, config) -> Launch:
    B, C, H, W = x.shape
    G, K = dw.shape[1], dw.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    CG = C // G
    tiles_pix, tiles_w = _runs_geometry(config, Ho, Wo)
    chunk = _runs_chunk(CG, x.element_size(), is_channels_last(x))
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, C=C, H=H, W=W, Ho=Ho, Wo=Wo, CG=CG,
        sdyb=dy.stride(0), sdyc=dy.stride(1), sxb=x.stride(0), sxc=x.stride(1), sdwb=dw.stride(0), sdwg=dw.stride(1),
        PH=padding[0], PW=padding[1], TILES_PIX=tiles_pix, TILES_W=tiles_w,
    )
    meta = dict(**inner_strides("sdy", dy, "hw"), **inner_strides("sx", x, "hw"), **inner_strides("sdw", dw, "uvhw"),
                KS=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], BLOCK_G=config["BLOCK_G"],
                CHUNK=chunk, CHUNKS=cdiv(CG, chunk), BLOCK_H=config["BLOCK_H"], BLOCK_W=config["BLOCK_W"],
                RUN=config["RUN"], LOOK_AHEAD=_runs_look_ahead(CG, K, stride[0], dilation[0], config["RUN"],
                                                                x.element_size()),
                CHANNELS_FULL=G % config["BLOCK_G"] == 0 and CG % chunk == 0,
                INDEX_64=needs_int64(dy, x, dw),
                ACC_DTYPE=_acc_dtype(x.dtype))
    halo = _runs_halo(K, stride[0], dilation[0], config["RUN"])
    meta["CARRIED"] = RUNS_CARRIED and meta["LOOK_AHEAD"] == halo <= RUNS_CARRIED_MAX_HALO
    # The tap-column loop; the rows and the halo are unrolled inside it.
    return Launch(involution_bwd_weight_runs_kernel, _grid(B * tiles_pix, G, 1, config["BLOCK_G"]), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1), loops=(K,))


def weight_grad_copies(dy, x, dw, stride, config=None) -> bool:
    """Whether the per-pixel weight gradient on NCHW reads channels_last copies of dy and x
    (``kernels/layout.py``), to run the runs kernel instead of the NCHW pair kernel: where the pair
    kernel would run (bf16, column stride 1, even groups, K >= 5) and the runs kernel applies, with
    32-bit offsets and no explicit config. The pair kernel holds a tap column's sums (112 at K = 7)
    and a chunk's words in registers, two programs an SM, and waits on memory for about two thirds
    of its path; the runs kernel reads 16-byte channel vectors. PREDICTED (triton 3.6, sm_90, the
    copies counted): R1/R2 dw bf16 NCHW 42.7/33.9% -> 50.7/50.8%; triton 3.9 alike. x alone copied
    (dy read as 2-byte NCHW loads): R2 60.5%, but R1 41.9%, where ptxas packed dy's loads in pairs
    as they landed and waited a round trip for each pair."""
    if config is not None or dw.dim() != 6 or is_channels_last(x) or needs_int64(dy, x, dw):
        return False
    G, K = dw.shape[1], dw.shape[2]
    CG = x.shape[1] // G
    return (involution_nchw.covers(x, dw) and involution_nchw.dw_pairs(x, dy, CG, K, stride)
            and K <= RUNS_MAX_K and 2 <= CG <= RUNS_MAX_CG)


# The runs kernel unrolls K*K taps and holds RUN x (channels of a group) gradients in registers.
RUNS_MAX_K = 9
RUNS_MAX_CG = 32
# 32-bit words a runs-kernel thread holds in its fp32 gradients and its loaded halo rows: at R1
# (16 channels, 7 rows) 6 fp32 rows or a whole tap column of 13 bf16 rows ahead, 255 and 251 registers
# on sm_90 with triton 3.6, no spills (sm_80 and sm_90, both tritons).
RUNS_HELD_WORDS = 216
# The runs kernel carries a tap column's halo rows into the loop (CARRIED) on triton 3.6, where it
# loads the whole column ahead and that column is at most RUNS_CARRIED_MAX_HALO rows: PREDICTED
# (sm_90) R1/R2 dw bf16 NHWC 84.7/84.9% -> 86.3%. Beyond, ptxas spills (8-152 bytes: 16 channels a
# group at K = 5, stride 2, 13 rows of a 17-row halo ahead; 8 channels a group, 19-23-row halos).
# Triton 3.9 re-pairs a carried 16-bit row's halves in registers right after its load, so the
# load's round trip is waited at the column's end (79.3% against 84.3%).
RUNS_CARRIED = TRITON_VERSION <= (3, 6)
RUNS_CARRIED_MAX_HALO = 13


def _runs_halo(K: int, stride: int, dilation: int, run: int) -> int:
    """Input rows a run of output rows reads through one tap column."""
    return (run - 1) * stride + (K - 1) * dilation + 1


def _runs_look_ahead(CG: int, K: int, stride: int, dilation: int, run: int, element_size: int) -> int:
    """Halo rows the runs kernel loads ahead of the one it sums: as many as RUNS_HELD_WORDS leave
    beside the run's gradients, at least one, at most the tap column's halo."""
    halo = _runs_halo(K, stride, dilation, run)
    row_words = max(1, CG * element_size // 4)
    return max(1, min(halo, (RUNS_HELD_WORDS - run * CG) // row_words))


def _runs_chunk(CG: int, element_size: int, channels_last: bool) -> int:
    """Channels per register chunk: one 16-byte vector when channels are contiguous (channels_last);
    one channel otherwise, so the group's strided channels stay in the thread and their sum is a
    chain of FMAs rather than a shuffle tree."""
    return _pow2_at_most(CG, max(1, 16 // element_size)) if channels_last else 1


@functools.lru_cache(maxsize=1024)
def _runs_config(G: int, Ho: int, Wo: int) -> dict:
    """Run length and lane tile (BLOCK_G x BLOCK_H runs x BLOCK_W columns) covering G x Ho x Wo with
    the fewest idle lanes; then the widest rows of lanes (coalescing), then the longest runs. Runs of
    at most 7 rows: at 8 (R1), with the channel masks gone (CHANNELS_FULL), triton 3.9's ptxas put
    8 bytes on the stack (16-bit on sm_80, fp32 on sm_90)."""
    best = None
    for run in (7, 6, 5, 4):
        for lanes in (64, 128, 32):
            for block_g in (1, 2, 4):
                for block_h in (1, 2, 4, 8, 16, 32, 64):
                    block_w = lanes // (block_g * block_h)
                    if block_w < 1 or block_g > next_power_of_2(G):
                        continue
                    padded = (cdiv(G, block_g) * block_g * cdiv(Ho, block_h * run) * block_h * run
                              * cdiv(Wo, block_w) * block_w)
                    score = (padded / (G * Ho * Wo), -block_w, -run, lanes != 64)
                    if best is None or score < best[0]:
                        best = (score, {"BLOCK_G": block_g, "BLOCK_H": block_h, "BLOCK_W": block_w, "RUN": run,
                                        "num_warps": lanes // 32, "num_stages": 1})
    return best[1]


def _sample_launch(dy, x, part, stride, padding, dilation, config) -> Launch:
    B, C, H, W = x.shape
    K = part.shape[2]
    Ho, Wo = dy.shape[2], dy.shape[3]
    splits = part.shape[4]
    tiles_w = cdiv(Wo, config["BLOCK_W"])
    tiles_pix = cdiv(Ho, config["RUN"]) * tiles_w
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=part, C=C, H=H, W=W, Ho=Ho, Wo=Wo,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("spb", "spg", "spu", "spv", "sps"), part.stride())),
        PH=padding[0], PW=padding[1], TILES_PIX=tiles_pix, TILES_W=tiles_w, SPLITS=splits,
    )
    meta = dict(KS=K, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1], BLOCK_G=config["BLOCK_G"],
                BLOCK_W=config["BLOCK_W"], RUN=config["RUN"], INDEX_64=needs_int64(dy, x, part),
                ACC_DTYPE=_acc_dtype(x.dtype))
    grid = (B * splits, cdiv(C, config["BLOCK_G"]), 1)
    # One loop: the persistent walk over pixel tiles (taps unrolled), a split's share of them.
    return Launch(involution_bwd_weight_sample_kernel, grid, args, meta, config.get("num_warps", 4),
                  config.get("num_stages", 1), loops=(split_trips(tiles_pix, splits),))


# Programs the per-sample weight gradient aims for: the depth-wise walk's count (its reasons hold here).
PERSISTENT_PROGRAMS = dwconv_dw.PERSISTENT_PROGRAMS


def _least_padding(n: int, options) -> int:
    return min(options, key=lambda o: (cdiv(n, o) * o, -o))


# The persistent kernel's limit: at K = 9 with a row stride or dilation, its 81 tap sums spill on sm_90
# at any run length in channels_last (and leave NCHW at 253 registers), so K = 9 takes the generic kernel.
SAMPLE_MAX_K = 8


def _sample_run(K: int, row_stride: int, row_dilation: int, channels_last: bool) -> int:
    """Rows per run of the persistent kernel. A run reads (RUN - 1) * stride + (K - 1) * dilation + 1
    halo rows per tap column, and triton's ptxas keeps every halo row's offsets live beside the K*K
    sums. Runs of four spilled from K = 7 at dilation 2 (both layouts), K = 7 at stride 2 in
    channels_last (sm_80) and K = 8 at stride 2; runs of two at K = 7, dilation 2 (NCHW, triton 3.9)
    and K = 8, stride 2 (channels_last, triton 3.9). Checked on triton 3.6 and 3.9, sm_80 and sm_90."""
    if K <= 5 and row_stride <= 2:
        return 4
    if row_dilation > 1 or row_stride > 2:
        return 1
    if K <= 7:
        return 2 if channels_last else 4
    return 1 if channels_last else 2


@functools.lru_cache(maxsize=1024)
def _sample_config(C: int, K: int, Ho: int, Wo: int, channels_last: bool, row_stride: int,
                   row_dilation: int) -> dict:
    """Lanes along the contiguous axis (channels in channels_last, W in NCHW), one element each (two
    would double the K*K sums a thread holds); runs as long as the halo lets them be (_sample_run)."""
    if channels_last:
        block_g = _pow2_at_most(C, 32)
        block_w = _least_padding(Wo, tuple(w for w in (8, 4, 16) if block_g * w <= 256))
    else:
        block_w = _least_padding(Wo, (32, 16, 8))
        block_g = _pow2_at_most(C, max(1, 128 // block_w))
    num_warps = max(1, min(8, block_g * block_w // 32))
    return {"BLOCK_G": block_g, "BLOCK_W": block_w, "RUN": _sample_run(K, row_stride, row_dilation, channels_last),
            "num_warps": num_warps, "num_stages": 1}


def weight_grad_default(C: int, G: int, K: int, Ho: int, Wo: int, channels_last: bool, per_pixel: bool,
                        B: int = 1, stride=(1, 1), dilation=(1, 1), dtype_bytes: int = 0) -> dict:
    """The launcher's own weight-gradient config: the runs kernel (per pixel, channels_last, 2..RUNS_MAX_CG
    channels per group), dynamic_dwconv.py's walk (per sample, where it applies), the persistent kernel
    (per sample, G = C), else the generic kernel's tile; K up to RUNS_MAX_K for the runs kernel,
    SAMPLE_MAX_K for the persistent one. NCHW per pixel takes involution_nchw.py's kernel before this
    is asked (K <= its MAX_K)."""
    if per_pixel and channels_last and K <= RUNS_MAX_K and 2 <= C // G <= RUNS_MAX_CG:
        return dict(_runs_config(G, Ho, Wo))
    if not per_pixel and dwconv_dw.handles_weight_grad(C, G, K, stride, dilation, None):
        return dwconv_dw.weight_grad_default(B, C, Ho, Wo, K, channels_last, dtype_bytes)
    if not per_pixel and K <= SAMPLE_MAX_K and C == G:
        return dict(_sample_config(C, K, Ho, Wo, channels_last, stride[0], dilation[0]))
    # Eight warps make sm_80 spill in the cross-channel reduction; four do not (dynconv inspect).
    return default_config(C, G, Ho, Wo, channels_last, max_warps=4)


def weight_grad_config(x, G, K, stride, Ho, Wo, per_pixel: bool, dilation=(1, 1)) -> dict:
    name = "involution_bwd_weight" if per_pixel else "dwconv_bwd_weight"
    default = weight_grad_default(x.shape[1], G, K, Ho, Wo, is_channels_last(x), per_pixel, x.shape[0], stride,
                                  dilation, x.element_size())
    config = get_config(name, problem_key(x, G, K, stride), default)
    # Tables key no dilation: a tile tuned at dilation 1 must not pick another kernel for a dilated layer
    # (dynamic_dwconv's walk takes no row dilation), nor give the persistent kernel longer runs than its
    # halo allows there.
    if ("P" in config, "RUN" in config) != ("P" in default, "RUN" in default):
        return default
    if not per_pixel and "RUN" in config and "P" not in config:
        return {**config, "RUN": min(config["RUN"], default["RUN"])}
    return config


def weight_grad_tiles(Ho: int, Wo: int, config: dict) -> int:
    """How many per-tile partials the generic kernel's per-sample weight gradient writes."""
    return cdiv(Ho, config["BLOCK_H"]) * cdiv(Wo, config["BLOCK_W"])


def weight_grad_partials(B: int, G: int, K: int, Ho: int, Wo: int, config: dict) -> tuple[int, ...]:
    """Shape (B, G, K, K, partials) of the fp32 partials of a per-sample weight gradient, summed over
    the last dim: one per persistent program of a (sample, group block), or one per tile from the
    generic kernel."""
    if "P" in config:
        return dwconv_dw.weight_grad_partials(B, G, K, Ho, Wo, config)
    if "RUN" in config:
        tiles = cdiv(Ho, config["RUN"]) * cdiv(Wo, config["BLOCK_W"])
        blocks = B * cdiv(G, config["BLOCK_G"])
        return (B, G, K, K, max(1, min(tiles, cdiv(PERSISTENT_PROGRAMS, blocks))))
    return (B, G, K, K, weight_grad_tiles(Ho, Wo, config))


# --------------------------------------------------------------------------------------------
# Entry point used by ops/: it writes into the dw the caller allocated.
# --------------------------------------------------------------------------------------------

def involution_backward_weight(dy, x, dw, stride, padding, dilation, config=None) -> None:
    """Per-pixel ``dw`` is written directly (from channels_last copies where weight_grad_copies
    says); per-sample ``dw`` via deterministic per-tile partials."""
    if dw.dim() == 6:
        if weight_grad_copies(dy, x, dw, stride, config):
            dy, x = channels_last_copy(dy), channels_last_copy(x)
        backward_weight_launch(dy, x, dw, stride, padding, dilation, True, config)()
        return
    B, G, K = dw.shape[:3]
    Ho, Wo = dy.shape[2], dy.shape[3]
    config = config or weight_grad_config(x, G, K, stride, Ho, Wo, False, dilation)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = weight_grad_partials(B, G, K, Ho, Wo, config)
    partials = torch.empty(shape, dtype=acc, device=x.device)
    backward_weight_launch(dy, x, partials, stride, padding, dilation, False, config)()
    dw.copy_(partials.sum(-1))


def catalogue() -> list[Launch]:
    """The weight-gradient launches ops make by default, on meta tensors (for AOT checks): those of
    involution.catalogue_problems, the persistent kernel past stride and dilation 1, over 2^31 elements."""
    launches = []
    for tag, x, y, w, _, geometry in catalogue_problems():
        per_pixel = w.dim() == 6
        dw = w
        if not per_pixel:
            B, G, K = w.shape[:3]
            cfg = weight_grad_config(x, G, K, geometry[0], *y.shape[2:], per_pixel=False)
            dw = torch.empty(weight_grad_partials(B, G, K, *y.shape[2:], cfg), dtype=torch.float32, device="meta")
        if weight_grad_copies(y, x, dw, geometry[0]):  # ops' copies (involution_backward_weight)
            y, x = channels_last_empty(y, "meta"), channels_last_empty(x, "meta")
        launch = backward_weight_launch(y, x, dw, *geometry, per_pixel)
        launch.label = tag
        launches.append(launch)
    # Depth-wise per sample past row stride and dilation 1 (the reference shapes' stride 1 walks in
    # dynamic_dwconv.py): the persistent kernel's shorter runs (_sample_run) and, at K = 9, the generic kernel.
    for dtype, channels_last, (K, s, d) in itertools.product((torch.float32, torch.bfloat16), (False, True),
                                                             ((7, 2, 1), (7, 1, 2), (8, 2, 1), (9, 2, 1))):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        p = d * (K - 1) // 2
        Ho = (29 + 2 * p - d * (K - 1) - 1) // s + 1
        x = torch.empty((8, 64, 29, 29), dtype=dtype, device="meta").to(memory_format=fmt)
        y = torch.empty((8, 64, Ho, Ho), dtype=dtype, device="meta").to(memory_format=fmt)
        cfg = weight_grad_config(x, 64, K, (s, s), Ho, Ho, per_pixel=False, dilation=(d, d))
        dw = torch.empty(weight_grad_partials(8, 64, K, Ho, Ho, cfg), dtype=torch.float32, device="meta")
        launch = backward_weight_launch(y, x, dw, (s, s), (p, p), (d, d), False, cfg)
        layout_name = "NHWC" if channels_last else "NCHW"
        launch.label = f"depth-wise K = {K}, stride {s}, dilation {d} {dtype} {layout_name} sample"
        launches.append(launch)
    # Over 2^31 elements: the int64-offset variants, per pixel and per sample.
    x, x_cl, w, geometry = over_int32_problem()
    w5 = torch.empty((2304, 16, 5, 5, 64, 64), dtype=torch.bfloat16, device="meta")  # the NCHW dw pairs need K >= 5
    partials = {}
    for G in (16, 256):  # involution's groups, and depth-wise
        cfg = weight_grad_config(x, G, 3, (1, 1), 64, 64, per_pixel=False)
        partials[G] = torch.empty(weight_grad_partials(2304, G, 3, 64, 64, cfg), dtype=torch.float32, device="meta")
    return launches + label_over_int32(
        ((backward_weight_launch(x, x, w, *geometry, True), "pixel"),
         (backward_weight_launch(x, x, w5, (1, 1), (2, 2), (1, 1), True), "pixel K=5"),
         (backward_weight_launch(x, x, partials[16], *geometry, False), "sample"),
         (backward_weight_launch(x, x, partials[256], *geometry, False), "sample depth-wise"),
         (backward_weight_launch(x_cl, x_cl, w, *geometry, True), "pixel channels_last")))
