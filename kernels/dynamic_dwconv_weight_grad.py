"""The per-sample depth-wise weight gradient (``dynamic_dwconv.py``'s weights, one-channel groups):
``dw[b, c, u, v] = Σ_{i,j} dy[b, c, i, j] · x[b, c, i - PH + u, j·SW - PW + v·DW]``.

``dwconv_bwd_weight_kernel`` walks down the x rows of a tile as the forward's row walk does (the
same compile-time strides, row vectors and halo loads of ``dynamic_dwconv.py``), holds a thread's
K*K tap sums in registers, and runs as a fixed number of persistent programs whose fp32 partials
the caller sums in a fixed order (deterministic, no atomics). ``involution_weight_grad.py``
dispatches here for 4-D weights with one-channel groups at row stride and dilation 1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import dynamic_dwconv as dwconv
from ._fence import fence
from ._launch import Launch, cdiv, inner_strides, is_channels_last, needs_int64, split_tiles
from .dynamic_dwconv import (MAX_K, _acc_dtype, _channels_in_share, _fenced_halo, _grid, _halo, _inside_tiles,
                             _row_vectors, _tiles, _vector_width, _widen, taps_config)

# Programs the weight gradient aims for: a fixed count, so the partials and their summation order
# never depend on the GPU. About twelve one-warp programs per SM of an H100/H200, one wave at the
# occupancy their 128-168 registers allow: at 512 (one warp a scheduler) the static model's latency
# term put R4's dw at 20-36% of its roofline, waiting on memory with nothing to interleave; at 1536,
# 47-69% (PREDICTED, triton 3.6), for partials three times as large (9.6 MB at R4).
PERSISTENT_PROGRAMS = 1536
# x rows the channels_last weight gradient's unmasked walk loads as one batch behind a fence
# (_weight_rows): a row at a time, each waited a round trip. PREDICTED on triton 3.6 (3.9 alike): R4 dw
# NHWC fp32/bf16 69/53% -> 87/65% at two rows (168 registers, as at one); four rows take 242 and two
# waves of the persistent programs (fp32 56%). NCHW's interior walk takes two rows too up to
# NCHW_BATCH_MAX_K, capped at 128 registers on sm_90 (uncapped, 143-152 registers put its 2048 one-warp
# programs in two waves: R4 fp32 62% -> 42%): ptxas fits K <= 7 there without a spill on both tritons
# (K = 9 spills 224-272 bytes and keeps one row). R4 dw NCHW bf16/fp32 47.5/62.4% -> 60.8/63.0% (triton
# 3.6; 3.9 23.9/62.1% -> 60.5/81.2%), PREDICTED.
WEIGHT_ROWS_AHEAD = 2
NCHW_BATCH_MAX_K = 7
NCHW_BATCH_SM90_REGISTERS = 128
# channels_last edge tiles walk their masked rows in the interior's batches (EDGE_ROWS_AHEAD) under this
# cap on sm_90: uncapped, the masks' predicates took 189-216 registers (9-10 one-warp programs an SM
# against 12) and the latency rose by 80% (R4 dw NHWC bf16/fp32 70.7/93.0% -> 39/51%); at 160 the
# occupancy is as before (at 168 ptxas spilled 48 bytes in bf16, at 128 96-120). PREDICTED: R4 dw
# NHWC bf16/fp32 70.7/93.0% -> 74.7/98.8% (triton 3.6), 70.5/91.4% -> 73.5/98.3% (3.9).
CHANNELS_LAST_EDGE_SM90_REGISTERS = 160


@triton.jit
def dwconv_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    C, H, W, HO, WO,
    sdyb, sdyc, sxb, sxc,
    spb, spc, spu, spv, sps,
    PH, TILES, TILES_W, SPLITS, RUN,
    sdyh: tl.constexpr, sdyw: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
    PW: tl.constexpr, SW: tl.constexpr, DW: tl.constexpr, KS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, P: tl.constexpr, INTERIOR: tl.constexpr, VEC: tl.constexpr,
    EDGE_VECTORS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr,
    EDGE_ROWS_AHEAD: tl.constexpr,
):
    """Partials of dw[b,c,u,v] = sum_{i,j} dy[b,c,i,j] * x[b,c,i-PH+u, j*SW-PW+v*DW] (G = C; row stride and
    dilation 1: the launcher sends other geometries to involution_weight_grad.py's kernels).

    A persistent program (sample, split, channel block) walks the tiles split, split + SPLITS, ...
    (P columns per thread x a run of RUN rows). Within a tile it walks down the x rows (_weight_rows).
    Each thread holds the K*K tap sums of its channel; they are reduced over the program's threads
    once, at the end, into part[b, c, u, v, split]; the caller adds the SPLITS partials in a fixed
    order (deterministic, no atomics).
    The row and column strides are compile-time constants (a variant per feature-map size): a row's
    loads are its row pointer plus immediates, where run-time strides took a 64-bit address each.
    A tile whose channels all exist and whose columns (read and written) all lie in the image walks
    without column masks (INTERIOR, the launcher's choice): the masks' predicates, rebuilt from
    registers every row, and the zeros under masked loads were about a tenth of the loop's issue.
    With VEC (NCHW, P a multiple of VEC) it loads each row's columns as VEC-wide vectors from the
    aligned column at or before the halo's first (LEAD columns before it): lanes P columns apart
    loading scalars used a fifth of each 32-byte sector, and L1, not issue, bound the walk.
    EDGE_VECTORS (the launcher's, where x and dy rows hold whole vectors, so that a vector lies wholly
    in the image or out): the other tiles read vectors too, masked a vector at a time, in batches of
    EDGE_ROWS_AHEAD rows. R4's edge tiles, 2 of 7, loaded a halo column at a time, a row a round trip:
    dw NCHW bf16/fp32 62.0/63.0% -> 67.3/65.3% (triton 3.6; 3.9 62.3/81.2% -> 67.1/85.0%), PREDICTED.
    fp32 edges go a row at a time: in batches ptxas spilled 16 bytes under the 128-register cap.
    channels_last edge tiles keep their column masks (one a halo column, the same in every lane) and
    walk in the interior's batches too, under CHANNELS_LAST_EDGE_SM90_REGISTERS (16-bit tiles of one
    channel a thread: of two, triton 3.6 spilled 64-112 bytes at K = 5).
    """
    pid0 = tl.program_id(0)
    b = pid0 // SPLITS
    split = pid0 % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        # Every stride in 64 bits: a tap or halo index times a stride may pass 2^31 on its own.
        b = b.to(tl.int64)
        c = c.to(tl.int64)
        spu = tl.cast(spu, tl.int64)
        spv = tl.cast(spv, tl.int64)
    c2 = c[:, None]
    c_ok = c2 < C
    zero = tl.zeros((BLOCK_C, BLOCK_W), dtype=ACC_DTYPE)
    HALO_W: tl.constexpr = (P - 1) * SW + (KS - 1) * DW + 1
    # The vectors' reach: LEAD columns before the halo, up to the vector that holds its last column.
    LEAD: tl.constexpr = -PW % VEC if VEC > 1 else 0
    REACH: tl.constexpr = (LEAD + HALO_W + VEC - 1) // VEC * VEC if VEC > 1 else HALO_W
    accs = ()
    for k in tl.static_range(KS * KS):
        accs = accs + (zero,)
    dy_channel = dy_ptr + b * sdyb + c2 * sdyc
    x_channel = x_ptr + b * sxb + c2 * sxc
    part = dw_ptr + b * spb + split * sps + c * spc
    fence_at = part[:, None].to(tl.pointer_type(tl.int32), bitcast=True)  # see _fence
    channels_in = (tl.program_id(1) + 1) * BLOCK_C <= C
    for tile in range(split, TILES, SPLITS):
        # Column tiles from both ends in turn (_tile_column), so that the splits share the edge tiles.
        position = tile % TILES_W
        first = tl.where(position % 2 == 0, position // 2, TILES_W - 1 - position // 2) * (BLOCK_W * P)
        col0 = first + tl.arange(0, BLOCK_W) * P
        row0 = (tile // TILES_W) * RUN
        if INDEX_64:
            col0 = col0.to(tl.int64)
        col0 = col0[None, :]
        row_end = tl.minimum(row0 + RUN, HO)
        w_first = col0 * SW - PW
        cols_ok = ()
        outs_ok = ()
        if EDGE_VECTORS:
            # A vector lies wholly in the image or out (the launcher's widths are multiples of VEC).
            for j in tl.static_range(REACH // VEC):
                cols_ok = cols_ok + (c_ok & (w_first - LEAD + j * VEC >= 0) & (w_first - LEAD + j * VEC < W),)
            for j in tl.static_range(P // VEC):
                outs_ok = outs_ok + (c_ok & (col0 + j * VEC < WO),)
        else:
            for qc in tl.static_range(HALO_W):
                cols_ok = cols_ok + (c_ok & (w_first + qc >= 0) & (w_first + qc < W),)
            for p in tl.static_range(P):
                outs_ok = outs_ok + (c_ok & (col0 + p < WO),)
        dy_lane = dy_channel + col0 * sdyw
        x_lane = x_channel + w_first * sxw
        # The vectors' first column, as one constant off col0: triton proves its alignment only so.
        x_vectors = x_channel + (col0 * SW - (PW + LEAD)) * sxw
        # x row t meets dy row t + PH - a through tap row a.
        t_first = tl.maximum(row0 - PH, 0)
        t_last = tl.minimum(row_end - 1 - PH + KS - 1, H - 1)
        interior = (INTERIOR & channels_in & (first * SW - PW - LEAD >= 0)
                    & ((first + (BLOCK_W - 1) * P) * SW - PW - LEAD + REACH <= W) & (first + BLOCK_W * P - 1 < WO))
        if interior:
            accs = _weight_rows(dy_lane, x_lane, x_vectors, accs, cols_ok, outs_ok, row0, row_end, t_first,
                                t_last, PH, fence_at, sdyh, sdyw, sxh, sxw, SW, DW, KS, P, HALO_W, False, VEC, LEAD,
                                REACH, INDEX_64, ACC_DTYPE, ROWS_AHEAD)
        elif EDGE_VECTORS:
            accs = _weight_rows(dy_lane, x_lane, x_vectors, accs, cols_ok, outs_ok, row0, row_end, t_first,
                                t_last, PH, fence_at, sdyh, sdyw, sxh, sxw, SW, DW, KS, P, HALO_W, True, VEC, LEAD,
                                REACH, INDEX_64, ACC_DTYPE, EDGE_ROWS_AHEAD)
        else:
            accs = _weight_rows(dy_lane, x_lane, x_vectors, accs, cols_ok, outs_ok, row0, row_end, t_first,
                                t_last, PH, fence_at, sdyh, sdyw, sxh, sxw, SW, DW, KS, P, HALO_W, True, 1, 0, HALO_W,
                                INDEX_64, ACC_DTYPE, EDGE_ROWS_AHEAD)
    for k in tl.static_range(KS * KS):
        tl.store(part + ((k // KS) * spu + (k % KS) * spv), tl.sum(accs[k], axis=1), mask=c < C)


@triton.jit
def _weight_rows(dy_lane, x_lane, x_vectors, accs, cols_ok, outs_ok, row0, row_end, t_first, t_last, PH, fence_at,
                 sdyh: tl.constexpr, sdyw: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr, SW: tl.constexpr,
                 DW: tl.constexpr, KS: tl.constexpr, P: tl.constexpr, HALO_W: tl.constexpr, MASKED: tl.constexpr,
                 VEC: tl.constexpr, LEAD: tl.constexpr, REACH: tl.constexpr, INDEX_64: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, ROWS_AHEAD: tl.constexpr):
    """One tile's walk down the x rows t_first..t_last, added to ``accs``: each row's P + K - 1 columns
    are loaded once and meet the K rows of dy that read it through tap rows 0..K-1 (a window of K dy
    rows, one new row loaded per step), so every loaded x element serves K * min(P, K) multiply-adds.
    MASKED: the loads keep their column and channel masks (cols_ok, outs_ok: a column's each, or with
    VEC > 1 a vector's), else only dy's rows; VEC > 1 (unit column strides): rows read as vectors
    (_row_vectors).
    ROWS_AHEAD > 1: the rows go in batches, a batch's dy and x rows loaded behind a fence (see
    _fence, at ``fence_at``, an output's address) whose zero every x element of the batch adds, so
    the batch waits one memory round trip, where a row at a time waited one a row; the rows left
    after the batches go one at a time."""
    zero = tl.zeros(cols_ok[0].shape, dtype=ACC_DTYPE)
    grads = ()
    for a in tl.static_range(KS):
        for p in tl.static_range(P):
            if a == 0:
                grads = grads + (zero,)  # loaded at the top of the first step
            else:
                i = tl.zeros(cols_ok[0].shape, dtype=tl.int32) + (t_first + PH - a)
                if INDEX_64:
                    i = i.to(tl.int64)
                ok = (i >= row0) & (i < row_end)
                if MASKED:
                    ok = ok & outs_ok[p // VEC]
                grad = tl.load(dy_lane + (i * sdyh + p * sdyw), mask=ok, other=0.0)
                grads = grads + (_widen(grad, ACC_DTYPE),)
    t_rest = t_first
    if ROWS_AHEAD > 1:
        t_rest = t_first + (t_last + 1 - t_first) // ROWS_AHEAD * ROWS_AHEAD
        for t0 in range(t_first, t_rest, ROWS_AHEAD):
            if INDEX_64:
                t0 = tl.cast(t0, tl.int64)
            batch = ()
            for d in tl.static_range(ROWS_AHEAD):
                batch = batch + (_weight_row_loads(dy_lane, x_lane, x_vectors, cols_ok, outs_ok, row0, row_end, t0 + d,
                                                   PH, sdyh, sdyw, sxh, sxw, P, HALO_W, MASKED, VEC, LEAD, REACH,
                                                   ACC_DTYPE),)
            after = fence(fence_at, row_end)
            for d in tl.static_range(ROWS_AHEAD):
                if x_lane.dtype.element_ty == tl.bfloat16:
                    started = _fenced_halo(batch[d][1], after, LEAD, VEC > 1)  # no add: fused into the widening
                else:
                    started = ()
                    for qc in tl.static_range(HALO_W):
                        started = started + (batch[d][1][qc] + after.to(ACC_DTYPE),)
                accs, grads = _weight_step(accs, grads, batch[d][0], started, zero, KS, P, SW, DW)
    for t in range(t_rest, t_last + 1):
        if INDEX_64:
            t = tl.cast(t, tl.int64)  # tl.cast, not .to: the interpreter's loop indices are Python ints
        dys, xs = _weight_row_loads(dy_lane, x_lane, x_vectors, cols_ok, outs_ok, row0, row_end, t, PH, sdyh, sdyw,
                                    sxh, sxw, P, HALO_W, MASKED, VEC, LEAD, REACH, ACC_DTYPE)
        accs, grads = _weight_step(accs, grads, dys, xs, zero, KS, P, SW, DW)
    return accs


@triton.jit
def _weight_row_loads(dy_lane, x_lane, x_vectors, cols_ok, outs_ok, row0, row_end, t, PH, sdyh: tl.constexpr,
                      sdyw: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr, P: tl.constexpr, HALO_W: tl.constexpr,
                      MASKED: tl.constexpr, VEC: tl.constexpr, LEAD: tl.constexpr, REACH: tl.constexpr,
                      ACC_DTYPE: tl.constexpr):
    """Step t of _weight_rows as loaded and widened: dy row t + PH's P columns (zero outside the run) and
    x row t's HALO_W columns."""
    i = tl.zeros(cols_ok[0].shape, dtype=tl.int32) + (t + PH)  # a tensor: see _store_row
    row_ok = (i >= row0) & (i < row_end)
    dy_row = dy_lane + (t + PH) * sdyh
    if VEC > 1 and MASKED:
        oks = ()
        for j in tl.static_range(P // VEC):
            oks = oks + (outs_ok[j] & row_ok,)
        dys = _row_vectors(dy_row, oks, P, VEC, ACC_DTYPE, True)
    elif VEC > 1:
        dys = _row_vectors(dy_row, row_ok, P, VEC, ACC_DTYPE)
    else:
        dys = ()
        for p in tl.static_range(P):
            if MASKED:
                grad = tl.load(dy_row + p * sdyw, mask=outs_ok[p] & row_ok, other=0.0)
            else:
                grad = tl.load(dy_row + p * sdyw, mask=row_ok, other=0.0)
            dys = dys + (_widen(grad, ACC_DTYPE),)
    xs = _halo(x_lane + t * sxh, x_vectors + t * sxh, cols_ok, sxw, HALO_W, MASKED, VEC, LEAD, REACH, ACC_DTYPE)
    return dys, xs


@triton.jit
def _weight_step(accs, grads, dys, xs, zero, KS: tl.constexpr, P: tl.constexpr, SW: tl.constexpr, DW: tl.constexpr):
    """One step of _weight_rows: x row ``xs`` into every tap, against the window of dy rows whose newest
    is ``dys`` (``grads``: the older K - 1, as the last step left them); the sums and the shifted window."""
    window = dys
    for k in tl.static_range(P, KS * P):
        window = window + (grads[k],)
    new = ()
    for a in tl.static_range(KS):
        for e in tl.static_range(KS):
            acc = accs[a * KS + e]
            for p in tl.static_range(P):
                acc += window[a * P + p] * xs[p * SW + e * DW]
            new = new + (acc,)
    # Shift: the next step's window row a is this step's row a - 1.
    grads = ()
    for p in tl.static_range(P):
        grads = grads + (zero,)
    for k in tl.static_range((KS - 1) * P):
        grads = grads + (window[k],)
    return new, grads


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def _weight_rows_ahead(element_size: int, channels_last: bool, K: int, channels_a_thread: int) -> int:
    """The weight gradient's rows a batch: WEIGHT_ROWS_AHEAD, but one for 16-bit channels_last tiles
    of two channels a thread past triton 3.6 (BATCHES_16BIT_CHANNELS_LAST: triton 3.9's ptxas spilled
    them at K = 5 on sm_90, 6-61 local loads and stores; one channel a thread, it batches at K = 7
    without a spill: R4 dw bf16 NHWC 53.9% -> 64.3%, triton 3.9, PREDICTED) and for NCHW past
    NCHW_BATCH_MAX_K."""
    if (channels_last and element_size == 2 and channels_a_thread > 1
            and not dwconv.BATCHES_16BIT_CHANNELS_LAST):
        return 1
    if not channels_last and K > NCHW_BATCH_MAX_K:
        return 1
    return WEIGHT_ROWS_AHEAD


def _weight_loops(config: dict, source_rows: int, K: int, interior: float | None, ahead: int,
                  edge_ahead: int) -> tuple:
    """Trip counts of _weight_rows' loops in a tile, each as its mean over the tiles: with INTERIOR
    (``interior``, the share of such tiles) the unmasked walk's batches of ``ahead`` rows and the rows
    they leave (one loop when ``ahead`` is 1), then the masked walk's (``edge_ahead`` rows a batch);
    else the masked walk alone."""
    trips = min(config["RUN"] + K - 1, source_rows)
    if interior is None:
        return (trips,)

    def walk(rows_ahead: int, share: float) -> tuple:
        if rows_ahead == 1:
            return (trips * share,)
        return (trips // rows_ahead * share, trips % rows_ahead * share)

    return walk(ahead, interior) + walk(edge_ahead, 1 - interior)


def _tile_column(position: int, tiles_w: int) -> int:
    """The column tile a program walks at ``position`` in a row of tiles: from both ends in turn (0,
    tiles_w - 1, 1, tiles_w - 2, ...), so that programs walking every splits-th tile (the persistent
    splits) share the masked edge tiles: at R4 (7 column tiles, 2 splits) split 0 walked both edges,
    168 row round trips in fp32 NCHW against split 1's 84 (now 140 and 112)."""
    return position // 2 if position % 2 == 0 else tiles_w - 1 - position // 2


def _split_loops(tiles: int, tiles_w: int, splits: int, rows, interior: list[float] | None) -> tuple | list:
    """``Launch.loops`` of the persistent walk: each split's tiles (split_tiles) and ``rows(share)``,
    the row loops of a tile where that share of them walk unmasked (``interior``: the share of each
    column tile's programs that do; None: no INTERIOR variant); one tree per split where they differ
    (the static model's classes of programs), else one."""
    def share(mine: range) -> float | None:
        return None if interior is None else sum(interior[_tile_column(t % tiles_w, tiles_w)] for t in mine) / len(mine)

    if tiles == 1:
        return rows(share(range(1)))
    walks = [split_tiles(tiles, splits, s) for s in range(splits)]
    trees = [((len(mine), rows(share(mine))),) for mine in walks]
    return trees[0] if all(tree == trees[0] for tree in trees) else trees


def handles_weight_grad(C: int, G: int, K: int, stride, dilation, config: dict | None) -> bool:
    """Whether the per-sample weight gradient runs here: one-channel groups, K <= MAX_K, rows read at
    stride and dilation 1 (the row walk)."""
    return (C == G and K <= MAX_K and stride[0] == 1 and dilation[0] == 1
            and (config is None or "P" in config))


def weight_grad_default(B: int, C: int, Ho: int, Wo: int, K: int, channels_last: bool, dtype_bytes: int = 0) -> dict:
    """The forward's walking tile (P columns of a channel per thread, of two adjacent ones for 16-bit
    channels_last up to K = 5; runs of RUN rows)."""
    return taps_config(B, C, Ho, Wo, K, channels_last, True, False, dtype_bytes, weight_grad=True, unit_columns=True)


def weight_grad_partials(B: int, C: int, K: int, Ho: int, Wo: int, config: dict) -> tuple[int, ...]:
    """Shape (B, C, K, K, splits) of the fp32 partials, summed over the last dim by the caller: one per
    persistent program of a (sample, channel block)."""
    tiles, _ = _tiles(config, Ho, Wo)
    blocks = B * cdiv(C, config["BLOCK_C"])
    return (B, C, K, K, max(1, min(tiles, cdiv(PERSISTENT_PROGRAMS, blocks))))


def backward_weight_launch(dy, x, dw, stride, padding, dilation, config) -> Launch:
    """``dw`` is the (B, C, K, K, splits) partials of weight_grad_partials(config)."""
    if not handles_weight_grad(x.shape[1], x.shape[1], dw.shape[2], stride, dilation, config):
        raise ValueError(f"the per-sample depth-wise weight-gradient kernel needs one-channel groups, K <= {MAX_K}, row "
                         f"stride and dilation 1 (got C={x.shape[1]}, K={dw.shape[2]}, stride={tuple(stride)}, "
                         f"dilation={tuple(dilation)})")
    B, C, H, W = x.shape
    K, splits = dw.shape[2], dw.shape[4]
    Ho, Wo = dy.shape[2], dy.shape[3]
    tiles, tiles_w = _tiles(config, Ho, Wo)
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, C=C, H=H, W=W, HO=Ho, WO=Wo,
        sdyb=dy.stride(0), sdyc=dy.stride(1), sxb=x.stride(0), sxc=x.stride(1),
        **dict(zip(("spb", "spc", "spu", "spv", "sps"), dw.stride())),
        PH=padding[0], TILES=tiles, TILES_W=tiles_w, SPLITS=splits, RUN=config["RUN"],
    )
    vec = _vector_width(config["P"], (dy, x), stride[1] == 1 and dilation[1] == 1)
    meta = dict(**inner_strides("sdy", dy, "hw"), **inner_strides("sx", x, "hw"), PW=padding[1], SW=stride[1],
                DW=dilation[1], KS=K, BLOCK_C=config["BLOCK_C"], BLOCK_W=config["BLOCK_W"], P=config["P"],
                INTERIOR=is_channels_last(x) or vec > 1, VEC=vec, INDEX_64=needs_int64(dy, x, dw),
                ACC_DTYPE=_acc_dtype(x.dtype))
    # The edge tiles' masked walk reads vectors too where a vector lies wholly in a row or out.
    meta["EDGE_VECTORS"] = vec > 1 and W % vec == 0 and Wo % vec == 0
    channels_a_thread = max(1, config["BLOCK_C"] * config["BLOCK_W"] // (32 * config.get("num_warps", 4)))
    meta["ROWS_AHEAD"] = _weight_rows_ahead(x.element_size(), is_channels_last(x), K, channels_a_thread)
    # The edge tiles' rows in the interior's batches too, but fp32 NCHW's (16 bytes of stack at 128
    # registers on sm_90) and 16-bit channels_last's of two channels a thread (triton 3.6's ptxas
    # spilled 64-112 bytes at K = 5 under CHANNELS_LAST_EDGE_SM90_REGISTERS).
    if is_channels_last(x):
        edge_batches = x.element_size() == 4 or channels_a_thread == 1
    else:
        edge_batches = meta["EDGE_VECTORS"] and x.element_size() == 2
    meta["EDGE_ROWS_AHEAD"] = meta["ROWS_AHEAD"] if edge_batches else 1
    # The persistent walk over tiles (a split's share of them; with one tile, TILES = 1 is a
    # compile-time constant and the loop disappears), and down each tile's x rows: with INTERIOR the
    # unmasked walk of the interior tiles (in batches, then the rows they leave), then the masked
    # one, each as its mean over the split's tiles.
    interior = None
    if meta["INTERIOR"]:
        inside = _inside_tiles(config, W, Wo, K, stride[1], padding[1], dilation[1], False, vec)[0]
        interior = [_channels_in_share(config, C) if tile else 0.0 for tile in inside]
    loops = _split_loops(tiles, tiles_w, splits,
                         lambda share: _weight_loops(config, H, K, share, meta["ROWS_AHEAD"], meta["EDGE_ROWS_AHEAD"]),
                         interior)
    cap = NCHW_BATCH_SM90_REGISTERS if not is_channels_last(x) and meta["ROWS_AHEAD"] > 1 else 0
    if is_channels_last(x) and meta["EDGE_ROWS_AHEAD"] > 1:
        cap = CHANNELS_LAST_EDGE_SM90_REGISTERS
    return Launch(dwconv_bwd_weight_kernel, _grid(B * splits, C, config["BLOCK_C"]), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 1), loops=loops, sm90_max_registers=cap)
