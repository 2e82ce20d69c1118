"""The lane helpers of the NCHW per-pixel kernels (``involution_nchw.py`` and its bf16 pair kernels,
``involution_nchw_pairs.py``): one pixel (or pair) per lane, lanes along W."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _wide(value, INDEX_64: tl.constexpr):
    """``value`` as int64 in the INDEX_64 variants, so every product with it is formed in 64 bits."""
    if INDEX_64:
        value = tl.cast(value, tl.int64)  # tl.cast: the interpreter passes scalars as Python ints
    return value


@triton.jit
def _lanes(BLOCKS, Wo, G, CHUNKS, CG, CH: tl.constexpr, STRIP: tl.constexpr, LANES: tl.constexpr,
           INDEX_64: tl.constexpr):
    """Each lane's (sample, group, first channel, first output row, column, in range): lanes are laid
    over the flattened (sample, group, chunk, strip, column) space, column fastest, so no lane idles
    for a row narrower than the tile and a warp's accesses stay contiguous along W."""
    # Widened before the multiply: lanes past 2^31 when a thread holds one channel of one row.
    lane = _wide(tl.program_id(0), INDEX_64) * LANES + tl.arange(0, LANES)
    j = lane % Wo
    rest = lane // Wo
    i0 = (rest % BLOCKS) * STRIP
    rest = rest // BLOCKS
    chunk = rest % CHUNKS
    rest = rest // CHUNKS
    g = rest % G
    b = rest // G
    return b, g, g * CG + chunk * CH, i0, j


@triton.jit
def _row_group_shifts(row_first, H, ROW_STRIDE: tl.constexpr, ROW_GROUPS: tl.constexpr):
    """Per group of ROW_GROUPS (runs of halo rows, counted from ``row_first``, that lie all outside or
    all inside x in every strip), the pointer offset (whole rows of ROW_STRIDE) that moves the run
    into x: the weight gradients' loads there read rows inside x; the sums they feed are zeroed when
    stored."""
    shifts = ()
    for gr in tl.static_range(len(ROW_GROUPS)):
        start = row_first + ROW_GROUPS[gr][0]
        last = tl.minimum(tl.maximum(start, 0), H - (ROW_GROUPS[gr][1] - ROW_GROUPS[gr][0]))
        shifts = shifts + ((last - start) * ROW_STRIDE,)
    return shifts
