"""bf16 NCHW per-pixel involution with two adjacent pixels per lane, read as int32 pairs of bf16
(``involution_nchw.py`` launches them; see its notes on lanes, strips and fenced batches).

* ``involution_nchw_fwd_pairs_kernel`` (K <= PAIRS_MAX_K): x and the weights read in pairs, each halo
  row converted once per group of tap columns;
* ``involution_nchw_bwd_input_pairs_kernel``: the input gradient at stride 1, a forward over dy
  with the taps mirrored;
* ``involution_nchw_bwd_weight_pairs_kernel`` (column stride 1, even groups, K >= 5): dy and x read
  in pairs, its tap columns split by parity so that where a pair's columns fall in the words is
  known when compiled.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._fence import fence as _fence
from ._nchw_lanes import _lanes, _row_group_shifts, _wide


@triton.jit
def _halves(raw, zero=0):
    """The two bf16 of an int32 pair as fp32, the lower address first (a bf16 is an fp32's top half).
    ``zero``: a fence's zero (see _fence), folded into the unpacking at no cost (one LEA, one LOP3)."""
    return ((raw << 16) + zero).to(tl.float32, bitcast=True), ((raw | zero) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _columns(words, NW: tl.constexpr):
    """The 2*NW fp32 columns of a halo row's NW words (_halo_words), the lower address first."""
    columns = ()
    for t in tl.static_range(NW):
        lo, hi = _halves(words[t])
        columns = columns + (lo, hi)
    return columns


@triton.jit
def _over_channels(v, CH: tl.constexpr):
    """A lane's value for each of its CH channels: [BLOCK_W] -> [CH * BLOCK_W], channel-major, so each
    thread's CH elements are its own lane's (the broadcast and reshape move nothing between threads)."""
    return tl.reshape(tl.broadcast_to(v[None, :], (CH, v.shape[0])), (CH * v.shape[0],))


@triton.jit
def _words_in_row(cols, lane_ok, width, NW: tl.constexpr):
    """Whether each of the NW words from column ``cols`` (even) lies in a row ``width`` columns wide:
    the masks :func:`_halo_words` takes, the same for every halo row."""
    word_ok = ()
    for t in tl.static_range(NW):
        word_ok = word_ok + (lane_ok & (cols + 2 * t >= 0) & (cols + 2 * t < width),)
    return word_ok


@triton.jit
def _halo_words(words, word_ok, row_ok, NW: tl.constexpr, CH: tl.constexpr):
    """The NW words of a halo row (at ``words``), each one load for all the lane's CH channels (a flat
    axis with the lanes); :func:`_halves` makes them columns."""
    raws = ()
    for t in tl.static_range(NW):
        raws = raws + (tl.load(words + t, mask=_over_channels(word_ok[t] & row_ok, CH), other=0),)
    return raws


@triton.jit
def _fwd_pair_taps(accs, x_words, w_words, fence, v0, lane_ok, i0, row_first, col_first, H, W, Ho,
                   sxh: tl.constexpr, swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr,
                   PW: tl.constexpr, KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                   DW: tl.constexpr, VG: tl.constexpr, CH: tl.constexpr, STRIP: tl.constexpr,
                   BLOCK_W: tl.constexpr, ROWS_AHEAD: tl.constexpr):
    """accs plus the VG column taps v0 .. v0 + VG - 1 of every tap row (see involution_nchw_fwd_pairs_kernel)."""
    PWE: tl.constexpr = PW + PW % 2
    NW: tl.constexpr = (PWE - PW + SW + (VG - 1) * DW) // 2 + 1
    HALO: tl.constexpr = (STRIP - 1) * SH + (KS - 1) * DH + 1
    # Word t of this tap group covers columns col_first + v0*DW + 2t (+1); v0*DW is even (VG*DW even or v0 = 0).
    cols = col_first + v0 * DW
    words = x_words + v0 * DW // 2
    word_ok = _words_in_row(cols, lane_ok, W, NW)
    w_taps = w_words + v0 * (swv // 2)
    AHEAD: tl.constexpr = HALO if ROWS_AHEAD == 0 else ROWS_AHEAD
    for h0 in tl.static_range(0, HALO, AHEAD):
        # AHEAD halo rows and the weights reading them loaded as one batch, then a fence: ptxas would
        # issue each row's loads just before its sums, a round trip a row.
        batch = ()
        for h in tl.static_range(h0, HALO):
            if h < h0 + AHEAD:
                row_ok = (row_first + h >= 0) & (row_first + h < H)
                # The weights of every (strip row, tap, pixel) reading halo row h, one per lane for all its channels.
                ws = ()
                for s in tl.static_range(STRIP):
                    for v in tl.static_range(VG):
                        raw = tl.zeros((BLOCK_W,), dtype=tl.int32)  # strip rows not reading h: never used
                        if h >= s * SH:
                            if (h - s * SH) % DH == 0:
                                if (h - s * SH) // DH < KS:
                                    raw = tl.load(w_taps + ((h - s * SH) // DH * (swu // 2) + v * (swv // 2)
                                                            + s * (swh // 2)),
                                                  mask=lane_ok & (i0 + s < Ho), other=0)
                        ws = ws + (raw,)
                batch = batch + ((_halo_words(words + h * (sxh // 2), word_ok, row_ok, NW, CH), ws),)
        after = 0
        if AHEAD < HALO:
            after = _fence(fence, H)
        rest = batch
        for h in tl.static_range(h0, HALO):
            if h < h0 + AHEAD:
                batch_row, rest = rest[0], rest[1:]
                xs = _columns(batch_row[0], NW)
                new = ()
                for s in tl.static_range(STRIP):
                    for p in tl.static_range(2):
                        acc = accs[s * 2 + p]
                        if h >= s * SH:
                            if (h - s * SH) % DH == 0:
                                if (h - s * SH) // DH < KS:
                                    for v in tl.static_range(VG):
                                        wv = _halves(batch_row[1][s * VG + v], after)[p]
                                        acc = acc + _over_channels(wv, CH) * xs[PWE - PW + p * SW + v * DW]
                        new = new + (acc,)
                accs = new
    return accs


@triton.jit
def involution_nchw_fwd_pairs_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    B, H, W, Ho, Wo, G, CG,
    sxb, swb, swg, sbb, sbc, syb,
    ROW_TILES, CHUNKS,
    sxc: tl.constexpr, sxh: tl.constexpr,
    swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr,
    syc: tl.constexpr, syh: tl.constexpr, syw: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr, TAP_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr, ROWS_AHEAD: tl.constexpr = 0,
):
    """involution_nchw_fwd_kernel for bf16, each lane owning two adjacent output pixels (columns
    2*jj and 2*jj + 1) of CH channels, and x and the weights read as int32 pairs of bf16 along W (W,
    Wo and every stride but the contiguous one even, so a pair never straddles a row or the image
    border).

    The tap columns go in groups of TAP_GROUP (a run-time loop; the K % TAP_GROUP left after it): a
    halo row is loaded once per group as the words covering the TAP_GROUP + 1 columns both pixels
    read (word t: columns col_first + 2t and + 1, col_first even), each converted once, so the taps
    index a compile-time row. A lane's CH channels are one flat axis with it (element c * BLOCK_W +
    lane), so a word is one load for all of them: triton's coalescing pass takes time quadratic in
    the number of loads (minutes with a load per channel), and a [lanes, channels] tile would leave
    two axes of equal contiguity, which triton 3.6 and 3.9 lay out differently.
    """
    PWE: tl.constexpr = PW + PW % 2
    b, g, c0, i0, jj = _lanes(ROW_TILES, Wo // 2, G, CHUNKS, CG, CH, STRIP, BLOCK_W, INDEX_64)
    lane_ok = b < B
    row_first = i0 * SH - PH
    col_first = jj * (2 * SW) - PWE
    channel = tl.arange(0, CH * BLOCK_W) // BLOCK_W
    # Offsets in int32 pairs: every stride is even (the launcher checks), so halving is exact.
    x_lanes = (x_ptr + (b * sxb + c0 * sxc)).to(tl.pointer_type(tl.int32), bitcast=True) \
        + (row_first * (sxh // 2) + col_first // 2)
    x_words = _over_channels(x_lanes, CH) + channel * (sxc // 2)
    w_words = (w_ptr + (b * swb + g * swg)).to(tl.pointer_type(tl.int32), bitcast=True) + (i0 * (swh // 2) + jj)
    # The fences' address: y's, which ptxas cannot tell from x's or the weights'.
    fence = y_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, BLOCK_W)
    accs = ()
    for _ in tl.static_range(STRIP * 2):
        accs = accs + (tl.zeros((CH * BLOCK_W,), dtype=tl.float32),)
    for v0 in range(0, KS - KS % TAP_GROUP, TAP_GROUP):
        v0 = _wide(v0, INDEX_64)  # v0 * swv, a tap column's offset, may pass 2^31
        accs = _fwd_pair_taps(accs, x_words, w_words, fence, v0, lane_ok, i0, row_first, col_first, H, W, Ho,
                              sxh, swu, swv, swh, PW, KS, SH, SW, DH, DW, TAP_GROUP, CH, STRIP, BLOCK_W, ROWS_AHEAD)
    if KS % TAP_GROUP > 0:
        accs = _fwd_pair_taps(accs, x_words, w_words, fence, KS - KS % TAP_GROUP, lane_ok, i0, row_first, col_first,
                              H, W, Ho, sxh, swu, swv, swh, PW, KS, SH, SW, DH, DW, KS % TAP_GROUP, CH, STRIP,
                              BLOCK_W, ROWS_AHEAD)
    y_pixels = y_ptr + _over_channels(b * syb + c0 * syc + i0 * syh + jj * (2 * syw), CH) + channel * syc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + _over_channels(b * sbb + c0 * sbc, CH) + channel * sbc,
                       mask=_over_channels(lane_ok, CH), other=0.0).to(tl.float32)
    for s in tl.static_range(STRIP):
        ok = _over_channels(lane_ok & (i0 + s < Ho), CH)
        for p in tl.static_range(2):
            acc = accs[s * 2 + p]
            if HAS_BIAS:
                acc += bias
            tl.store(y_pixels + (s * syh + p * syw), acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dx_pair_taps(accs, dy_words, w_words, fence, v0, lane_ok, row_first, col_first, Ho, Wo,
                  sdyh: tl.constexpr, swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr,
                  PW: tl.constexpr, KS: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, VG: tl.constexpr,
                  CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr, ROWS_AHEAD: tl.constexpr):
    """accs plus the VG mirrored tap columns v0 .. v0 + VG - 1 of every tap row (see
    involution_nchw_bwd_input_pairs_kernel)."""
    E0: tl.constexpr = PW % 2  # the half of tap v0's column in the first word, from col_first + v0*DW
    NW: tl.constexpr = (E0 + 1 + (VG - 1) * DW) // 2 + 1
    HALO: tl.constexpr = STRIP + (KS - 1) * DH
    # Word t of this tap group covers dy columns col_first + v0*DW + 2t (+1); v0*DW is even.
    cols = col_first + v0 * DW
    words = dy_words + v0 * DW // 2
    word_ok = _words_in_row(cols, lane_ok, Wo, NW)
    # Mirrored tap (u, v) is the weights' tap (KS-1-u, KS-1-v), read at the dy pixel it multiplies.
    w_group = w_words + (v0 * DW // 2 + (KS - 1) * (swu // 2) + (KS - 1 - v0) * (swv // 2))
    AHEAD: tl.constexpr = HALO if ROWS_AHEAD == 0 else ROWS_AHEAD
    for h0 in tl.static_range(0, HALO, AHEAD):
        # AHEAD halo rows and the weights reading them loaded as one batch (see _fwd_pair_taps).
        batch = ()
        for h in tl.static_range(h0, HALO):
            if h < h0 + AHEAD:
                row_ok = (row_first + h >= 0) & (row_first + h < Ho)
                # Strip row s reads halo row h through mirrored tap row u = (h - s) / DH when that is a tap;
                # pixel p reads half E0 + v*DW + p of the halo row: a word, or two when that is odd.
                ws = ()
                for s in tl.static_range(STRIP):
                    for v in tl.static_range(VG):
                        raw = tl.zeros((BLOCK_W,), dtype=tl.int32)  # strip rows not reading h: never used
                        nxt = raw
                        if h >= s:
                            if (h - s) % DH == 0:
                                if (h - s) // DH < KS:
                                    tap = w_group + (h * (swh // 2) + (E0 + v * DW) // 2 - (h - s) // DH * (swu // 2)
                                                     - v * (swv // 2))
                                    raw = tl.load(tap, mask=word_ok[(E0 + v * DW) // 2] & row_ok, other=0)
                                    if (E0 + v * DW) % 2 == 1:
                                        nxt = tl.load(tap + 1, mask=word_ok[(E0 + v * DW) // 2 + 1] & row_ok, other=0)
                        ws = ws + ((raw, nxt),)
                batch = batch + ((_halo_words(words + h * (sdyh // 2), word_ok, row_ok, NW, CH), ws),)
        after = 0
        if AHEAD < HALO:
            after = _fence(fence, Ho)
        rest = batch
        for h in tl.static_range(h0, HALO):
            if h < h0 + AHEAD:
                batch_row, rest = rest[0], rest[1:]
                gs = _columns(batch_row[0], NW)
                new = ()
                for s in tl.static_range(STRIP):
                    acc0 = accs[s * 2]
                    acc1 = accs[s * 2 + 1]
                    if h >= s:
                        if (h - s) % DH == 0:
                            if (h - s) // DH < KS:
                                for v in tl.static_range(VG):
                                    raw, nxt = batch_row[1][s * VG + v]
                                    w0, w1 = _halves(raw, after)
                                    if (E0 + v * DW) % 2 == 1:
                                        w0, w1 = w1, _halves(nxt, after)[0]
                                    acc0 = acc0 + _over_channels(w0, CH) * gs[E0 + v * DW]
                                    acc1 = acc1 + _over_channels(w1, CH) * gs[E0 + v * DW + 1]
                    new = new + (acc0, acc1)
                accs = new
    return accs


@triton.jit
def involution_nchw_bwd_input_pairs_kernel(
    dy_ptr, w_ptr, dx_ptr,
    B, H, W, Ho, Wo, G, CG,
    sdyb, swb, swg, sdxb,
    ROW_TILES, CHUNKS,
    sdyc: tl.constexpr, sdyh: tl.constexpr,
    swu: tl.constexpr, swv: tl.constexpr, swh: tl.constexpr,
    sdxc: tl.constexpr, sdxh: tl.constexpr, sdxw: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    KS: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr, TAP_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, ROWS_AHEAD: tl.constexpr = 0,
):
    """The input gradient at stride 1 for bf16, each lane owning two adjacent input pixels (columns
    2*jj and 2*jj + 1) of CH channels, dy and the weights read as int32 pairs of bf16 along W.

    At stride 1 dx is a forward with the taps mirrored: dx[b,c,h,w] = sum over (u, v) of
    w[b,g,K-1-u,K-1-v,r,q] * dy[b,c,r,q] at r = h - PH + u*DH, q = w - PW + v*DW, where PH and PW are
    the mirrored paddings (K-1)*DH - padding (the launcher's). So the halo rows and tap groups are the
    pair forward's (involution_nchw_fwd_pairs_kernel): a dy halo row is read once per group of tap
    columns, one load per word for all the lane's channels (a flat axis, element c * BLOCK_W + lane).
    Unlike the forward's, a weight sits at the dy pixel it multiplies, so it is a halo read too, one
    word per (strip row, tap), two where the pair straddles words (an odd column offset, known when
    compiled), and serves the CH channels.
    """
    PWE: tl.constexpr = PW + PW % 2
    b, g, c0, i0, jj = _lanes(ROW_TILES, W // 2, G, CHUNKS, CG, CH, STRIP, BLOCK_W, INDEX_64)
    lane_ok = b < B
    row_first = i0 - PH
    col_first = jj * 2 - PWE
    channel = tl.arange(0, CH * BLOCK_W) // BLOCK_W
    # Offsets in int32 pairs: every stride but W's is even (the launcher checks), so halving is exact.
    dy_lanes = (dy_ptr + (b * sdyb + c0 * sdyc)).to(tl.pointer_type(tl.int32), bitcast=True) \
        + (row_first * (sdyh // 2) + col_first // 2)
    dy_words = _over_channels(dy_lanes, CH) + channel * (sdyc // 2)
    w_words = (w_ptr + (b * swb + g * swg)).to(tl.pointer_type(tl.int32), bitcast=True) \
        + (row_first * (swh // 2) + col_first // 2)
    fence = dx_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, BLOCK_W)  # see the forward's
    accs = ()
    for _ in tl.static_range(STRIP * 2):
        accs = accs + (tl.zeros((CH * BLOCK_W,), dtype=tl.float32),)
    for v0 in range(0, KS - KS % TAP_GROUP, TAP_GROUP):
        v0 = _wide(v0, INDEX_64)  # v0 * swv, a tap column's offset, may pass 2^31
        accs = _dx_pair_taps(accs, dy_words, w_words, fence, v0, lane_ok, row_first, col_first, Ho, Wo,
                             sdyh, swu, swv, swh, PW, KS, DH, DW, TAP_GROUP, CH, STRIP, BLOCK_W, ROWS_AHEAD)
    if KS % TAP_GROUP > 0:
        accs = _dx_pair_taps(accs, dy_words, w_words, fence, KS - KS % TAP_GROUP, lane_ok, row_first, col_first,
                             Ho, Wo, sdyh, swu, swv, swh, PW, KS, DH, DW, KS % TAP_GROUP, CH, STRIP, BLOCK_W,
                             ROWS_AHEAD)
    dx_pixels = dx_ptr + _over_channels(b * sdxb + c0 * sdxc + i0 * sdxh + jj * (2 * sdxw), CH) + channel * sdxc
    for s in tl.static_range(STRIP):
        ok = _over_channels(lane_ok & (i0 + s < H), CH)
        for p in tl.static_range(2):
            tl.store(dx_pixels + (s * sdxh + p * sdxw), accs[s * 2 + p].to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _inside(index, size, SIGN_SHIFT):
    """-1 (all bits) where 0 <= index < size, else 0, as int32 (indices lie within +-2^31, INDEX_64
    too): a mask of bits for :func:`_kept`. SIGN_SHIFT is 31, a run-time argument: a shift by a
    constant 31 tells LLVM the mask is 0 or -1, and it turns the AND into a select, which it moves past
    the bf16 rounding and makes a permute and a select for each rounded half."""
    return (~((index | (size - 1 - index)) >> SIGN_SHIFT)).to(tl.int32)


@triton.jit
def _kept(value, bits):
    """The fp32 ``value`` where ``bits`` (from :func:`_inside`) is all ones, else 0: one AND."""
    return (value.to(tl.int32, bitcast=True) & bits).to(tl.float32, bitcast=True)


@triton.jit
def _dw_pair_loads(c, dy_words, x_cols, shifts, i0, Ho,
                   sdyc: tl.constexpr, sdyh: tl.constexpr, sxc: tl.constexpr, sxh: tl.constexpr,
                   KS: tl.constexpr, SH: tl.constexpr, DH: tl.constexpr, CH: tl.constexpr, STRIP: tl.constexpr,
                   STRADDLES: tl.constexpr, ROWS_FULL: tl.constexpr, ROW_GROUPS: tl.constexpr):
    """The int32 words of dy (STRIP rows) and of x (the HALO rows of one tap column, 1 + STRADDLES
    words a row) of the CH channels from c, row-major, as loaded: _dw_pair_sums converts them."""
    HALO: tl.constexpr = (STRIP - 1) * SH + (KS - 1) * DH + 1
    grads = ()
    for s in tl.static_range(STRIP):
        for q in tl.static_range(CH):
            if ROWS_FULL:
                raw = tl.load(dy_words + c * (sdyc // 2) + (q * (sdyc // 2) + s * (sdyh // 2)))
            else:
                raw = tl.load(dy_words + c * (sdyc // 2) + (q * (sdyc // 2) + s * (sdyh // 2)),
                              mask=i0 + s < Ho, other=0)
            grads = grads + (raw,)
    # The chunk's pointers first (and each shifted group's), so that row offsets are immediates.
    x_chunk = ()
    for t in tl.static_range(1 + STRADDLES):
        x_chunk = x_chunk + (x_cols[t] + c * (sxc // 2),)
    x_groups = ()
    for g in tl.static_range(len(ROW_GROUPS)):
        for t in tl.static_range(1 + STRADDLES):
            x_groups = x_groups + (x_cols[t] + (shifts[g] + c * (sxc // 2)),)
    xs = ()
    for h in tl.static_range(HALO):
        words = x_chunk
        for g in tl.static_range(len(ROW_GROUPS)):
            if h >= ROW_GROUPS[g][0] and h < ROW_GROUPS[g][1]:
                words = x_groups[g * (1 + STRADDLES):(g + 1) * (1 + STRADDLES)]
        for q in tl.static_range(CH):
            for t in tl.static_range(1 + STRADDLES):
                xs = xs + (tl.load(words[t] + (h * (sxh // 2) + q * (sxc // 2))),)
    return grads, xs


@triton.jit
def _dw_pair_sums(accs, grads, xs, KS: tl.constexpr, SH: tl.constexpr, DH: tl.constexpr, CH: tl.constexpr,
                  STRIP: tl.constexpr, STRADDLES: tl.constexpr):
    """accs plus the products of one chunk's words (_dw_pair_loads), one tap column's (see _dw_pair_columns)."""
    HALO: tl.constexpr = (STRIP - 1) * SH + (KS - 1) * DH + 1
    W_ROW: tl.constexpr = CH * (1 + STRADDLES)
    dys = ()
    for i in tl.static_range(STRIP * CH):
        lo, hi = _halves(grads[i])
        dys = dys + (lo, hi)
    for h in tl.static_range(HALO):
        halo = ()
        for q in tl.static_range(CH):
            lo, hi = _halves(xs[h * W_ROW + q * (1 + STRADDLES)])
            if STRADDLES:
                lo, hi = hi, (xs[h * W_ROW + q * 2 + 1] << 16).to(tl.float32, bitcast=True)
            halo = halo + (lo, hi)
        new = ()
        for s in tl.static_range(STRIP):
            for u in tl.static_range(KS):
                for p in tl.static_range(2):
                    acc = accs[(s * KS + u) * 2 + p]
                    if h == s * SH + u * DH:  # strip row s reads halo row h through tap row u
                        for q in tl.static_range(CH):
                            acc = acc + dys[(s * CH + q) * 2 + p] * halo[q * 2 + p]
                    new = new + (acc,)
        accs = new
    return accs


@triton.jit
def _dw_pair_columns(dy_words, x_rows, shifts, dw_pixels, PARITY: tl.constexpr, lane_ok, i0, jj, row_first,
                     H, W, Ho, CG, SIGN_SHIFT, sdyc: tl.constexpr, sdyh: tl.constexpr, sxc: tl.constexpr,
                     sxh: tl.constexpr, sdwu: tl.constexpr, sdwv: tl.constexpr, sdwh: tl.constexpr,
                     sdww: tl.constexpr,
                     PW: tl.constexpr, KS: tl.constexpr, SH: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr, ROWS_FULL: tl.constexpr,
                     ROW_GROUPS: tl.constexpr, INDEX_64: tl.constexpr):
    """The tap columns v = PARITY, PARITY + 2, ... of involution_nchw_bwd_weight_pairs_kernel: their
    columns sit alike in the int32 words (a pair's first column, 2*jj + v*DW - PW, has the parity of
    PARITY*DW + PW), so whether a pixel pair straddles two words is a compile-time fact of the loop.

    Every sum reads one x position, through all the channels: where that position lies outside x the
    sum is zeroed once, at the end, instead of masking each load. So every load reads a clamped,
    in-range address and no load is masked (the masks, one per halo row and word, outnumbered the
    predicate registers and were rebuilt before every load)."""
    STRADDLES: tl.constexpr = (PARITY * DW + PW % 2) % 2
    for v in range(PARITY, KS, 2):
        # Pixel p's column through tap v, 2*jj + p + v*DW - PW, lies in word (2*jj + v*DW - PW + p) // 2.
        first = 2 * jj + v * DW - PW
        x_cols = ()
        for t in tl.static_range(1 + STRADDLES):
            word = (first + 2 * t) // 2 if STRADDLES == 0 else (first - 1 + 2 * t) // 2
            x_cols = x_cols + (x_rows + tl.minimum(tl.maximum(word, 0), W // 2 - 1),)
        accs = ()
        for _ in tl.static_range(STRIP * KS * 2):
            accs = accs + (tl.zeros((BLOCK_W,), dtype=tl.float32),)
        # At least one trip: else the zeroed sums are also kept for a path around the loop (twice the zeroing).
        tl.assume(CG >= CH)
        # Each chunk's words are loaded a trip ahead of their sums, so they land while the chunk
        # before is summed (ptxas, short of registers, had waited for each halo row in turn). The
        # last trip's look-ahead reads the last chunk again: unmasked loads must stay in the group.
        words = _dw_pair_loads(0, dy_words, x_cols, shifts, i0, Ho, sdyc, sdyh, sxc, sxh, KS, SH, DH, CH, STRIP,
                               STRADDLES, ROWS_FULL, ROW_GROUPS)
        for c in range(0, CG, CH):
            ahead = c + CH
            ahead = _wide(tl.where(ahead < CG, ahead, CG - CH), INDEX_64)
            words_ahead = _dw_pair_loads(ahead, dy_words, x_cols, shifts, i0, Ho, sdyc, sdyh, sxc, sxh, KS, SH, DH,
                                         CH, STRIP, STRADDLES, ROWS_FULL, ROW_GROUPS)
            accs = _dw_pair_sums(accs, words[0], words[1], KS, SH, DH, CH, STRIP, STRADDLES)
            words = words_ahead
        dw_col = dw_pixels + _wide(v, INDEX_64) * sdwv
        pair = tl.arange(0, 2)[None, :] * sdww
        col_in = (_inside(first, W, SIGN_SHIFT), _inside(first + 1, W, SIGN_SHIFT))
        for s in tl.static_range(STRIP):
            stored = lane_ok if ROWS_FULL else lane_ok & (i0 + s < Ho)
            for u in tl.static_range(KS):
                keep = col_in
                # Only the rows of ROW_GROUPS may lie outside x: the others' sums need the columns' test alone.
                for g in tl.static_range(len(ROW_GROUPS)):
                    if s * SH + u * DH >= ROW_GROUPS[g][0] and s * SH + u * DH < ROW_GROUPS[g][1]:
                        row_in = _inside(row_first + s * SH + u * DH, H, SIGN_SHIFT)
                        keep = (keep[0] & row_in, keep[1] & row_in)
                both = tl.join(_kept(accs[(s * KS + u) * 2], keep[0]), _kept(accs[(s * KS + u) * 2 + 1], keep[1]))
                # The tap's offset joins the pointer alone: u * sdwu may pass 2^31 (INDEX_64), pair is int32.
                tl.store((dw_col + (u * sdwu + s * sdwh))[:, None] + pair, both.to(dw_pixels.dtype.element_ty),
                         mask=stored[:, None])


@triton.jit
def involution_nchw_bwd_weight_pairs_kernel(
    dy_ptr, x_ptr, dw_ptr,
    B, H, W, Ho, Wo, G, CG,
    sdyb, sxb, sdwb, sdwg,
    ROW_TILES, SIGN_SHIFT,
    sdyc: tl.constexpr, sdyh: tl.constexpr,
    sxc: tl.constexpr, sxh: tl.constexpr,
    sdwu: tl.constexpr, sdwv: tl.constexpr, sdwh: tl.constexpr, sdww: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    KS: tl.constexpr, SH: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CH: tl.constexpr, STRIP: tl.constexpr, BLOCK_W: tl.constexpr, ROWS_FULL: tl.constexpr,
    ROW_GROUPS: tl.constexpr, INDEX_64: tl.constexpr,
):
    """involution_nchw_bwd_weight_kernel for bf16 at column stride 1, each lane owning two adjacent
    output pixels (columns 2*jj and 2*jj + 1), dy and x read as int32 pairs of bf16 along W (W, Wo and
    every stride but the contiguous one even): a word load and one shift or mask per element, where a
    bf16 load takes a load, a zeroing and a shift. The tap columns go in two run-time loops by parity,
    so that in each the pair's two x columns either share a word or straddle two, known when compiled.
    ROWS_FULL: the strips tile the output rows exactly (no row of dy to mask).
    """
    b, g, c_first, i0, jj = _lanes(ROW_TILES, Wo // 2, G, 1, CG, CG, STRIP, BLOCK_W, INDEX_64)
    lane_ok = b < B
    b_in = tl.minimum(b, B - 1)  # lanes past the last sample read its data (and store nothing)
    row_first = i0 * SH - PH
    dy_words = (dy_ptr + (b_in * sdyb + c_first * sdyc)).to(tl.pointer_type(tl.int32), bitcast=True) \
        + (i0 * (sdyh // 2) + jj)
    x_rows = (x_ptr + (b_in * sxb + c_first * sxc)).to(tl.pointer_type(tl.int32), bitcast=True) \
        + row_first * (sxh // 2)
    # Halo rows outside x in some strip read, there, rows inside instead (their sums are zeroed, see
    # _dw_pair_columns): each group of ROW_GROUPS (all outside or all inside in every strip) is
    # shifted into x by its lanes, and its rows keep constant offsets from the group's pointer.
    shifts = _row_group_shifts(row_first, H, sxh // 2, ROW_GROUPS)
    dw_pixels = dw_ptr + b * sdwb + g * sdwg + i0 * sdwh + jj * (2 * sdww)
    for parity in tl.static_range(2):
        _dw_pair_columns(dy_words, x_rows, shifts, dw_pixels, parity, lane_ok, i0, jj, row_first, H, W, Ho, CG, SIGN_SHIFT,
                         sdyc, sdyh, sxc, sxh, sdwu, sdwv, sdwh, sdww, PW, KS, SH, DH, DW, CH, STRIP, BLOCK_W,
                         ROWS_FULL, ROW_GROUPS, INDEX_64)
