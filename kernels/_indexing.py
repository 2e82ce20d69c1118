"""Index arithmetic the kernel families share: 64-bit products where a launch needs them, and the
gather form of a strided input gradient."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def widen(index, INDEX_64: tl.constexpr):
    """``index`` as int64 in the INDEX_64 variants, so a product with a stride is formed in 64 bits.

    Every index that multiplies a stride passes through here (or is int64 already): a tap,
    region or partial index times the stride of an outer axis passes 2^31 on its own when that
    axis is outermost in memory. The 32-bit variants keep 32-bit products (cheaper, fewer registers).
    """
    if INDEX_64:
        index = tl.cast(index, tl.int64)  # tl.cast, not .to: the interpreter's loop indices are Python ints
    return index


@triton.jit
def gather_source(pos, pad, tap, dilation, stride, out_size, mask):
    """The output index that reads input index ``pos`` through ``tap``, and ``mask`` & whether one exists.

    Solves ``out * stride - pad + tap * dilation == pos`` for a whole ``out`` in ``[0, out_size)``:
    the gather form of an input gradient, where each input element has exactly one writer.
    """
    scaled = pos + pad - tap * dilation
    # Clamp before dividing: masked lanes must still form in-range arithmetic.
    out = tl.maximum(scaled, 0) // stride
    return out, mask & (scaled >= 0) & (scaled % stride == 0) & (out < out_size)
