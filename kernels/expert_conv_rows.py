"""The expert-conv forward on NCHW inputs, read as they lie: aligned image-row tiles, one
accumulator per kernel column (docs/operators.md §2).

A channels_last conv streams channel-contiguous tiles (``expert_conv.py``); an NCHW input had to be
copied to channels_last first (``forward_copies_input``), a read and a write of x before the conv:
a quarter of E2's forward (PREDICTED 47.8 of 200.7 µs, bf16, triton 3.6). Read in place, an NCHW
tile is pixel-contiguous, and wgmma takes a 16-bit operand pixel-major straight from shared memory
(a tf32 one through registers).
What stops it is the tap's shift: the tile of tap column ``v`` starts ``v·dilation - padding``
pixels off, two or four bytes from a 16-byte boundary, so no asynchronous copy (cp.async or TMA: triton
documents a descriptor's innermost offset as 16-byte aligned) can load it.

So the shift moves to the output. A program loads, for each kernel row ``u`` and channel block,
one tile of ``ROWS`` image rows by ``BOX`` pixels starting at an aligned column ``w0 - HALO``, and
multiplies it by every kernel column's weight tile into that column's own accumulator:
``acc_v[(r, j)] = Σ_u Σ_c x[c, h0 + r + u·dh - ph, w0 - HALO + j] · W[o, c, u, v]``. Then once,
after the loop, ``y[h0 + r, w0 - HALO + j] = Σ_v acc_v[(r, j + v·dw - pw)]`` (a ``tl.gather`` along
the pixels; 'same' padding leaves the middle column in place). The same MMA work as a per-tap
loop, each x tile loaded once for KW taps, the loads 16-byte aligned and pipelined, no copy of x.
PREDICTED (triton 3.6 and 3.9, sm_90): E2 and C256 fwd NCHW 87.5% in bf16 and fp32, MMA-bound at
the box's use (56 of 64 columns), were 74.7% and 86.2% through the copy (triton 3.6).

Where it applies (``supported``): a plain or materialised weight (no mixing on the fly, no spatial
attention, no regions), stride 1, KW in (1, 3), 2- or 4-byte floats, an NCHW-contiguous x whose width is a
multiple of 8 (aligned rows), 32-bit offsets, whole channel blocks, and rows that use at least
``MIN_BOX_USE`` of the box columns (``box_columns``): a row up to ``BOX - HALO`` pixels takes one
box, a wider one several overlapping by the halo and the kernel's reach.

Kernels here know nothing of autograd: ``ops/expert_conv.py`` wires them into torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import TRITON_VERSION, Launch, cacheable, cdiv, conv_input_precision, is_channels_last, layout, planned

# Pixels a tile holds (two rows of a 64-pixel box, or one of 128) and the boxes a tile may take.
TILE_PIXELS = 128
BOXES = (64, 128)
# The least share of a tile's box columns that outputs use for a row to be read in boxes.
MIN_BOX_USE = 0.75
# Bytes of channels a K-step reads (as the streamed channels_last tiles), output columns a tile.
STEP_BYTES = 64
BLOCK_N = 64
# An accumulator per kernel column: 3 x (128 x 64) fp32 over eight warps is 96 registers a thread.
KERNEL_COLUMNS = (1, 3)


@triton.jit
def _column_shifted(acc, shift: tl.constexpr, BOX: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """``acc`` read ``shift`` pixels along each box row, zero past the row's ends."""
    if shift == 0:
        return acc
    p = tl.arange(0, M)
    t = p % BOX + shift
    inside = (t >= 0) & (t < BOX)
    source = tl.where(inside, p + shift, p)
    moved = tl.gather(acc, tl.broadcast_to(source[:, None], [M, N]), 0)
    return tl.where(inside[:, None], moved, 0.0)


@triton.jit
def expert_conv_rows_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, y_ptr,
        H, W, Ho, Wo, CIN_G, COUT_G, GROUPS, ROW_TILES, COL_TILES, COL_STEP,
        sw_b, sw_g, sw_o, sw_i, sw_u, sw_v, sbias_b, sbias_o,
        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, HALO: tl.constexpr, BOX: tl.constexpr, ROWS: tl.constexpr,
        OUT_ALIGNED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    M: tl.constexpr = ROWS * BOX
    tile = tl.program_id(0)
    col_tile = tile % COL_TILES
    row_tile = tile // COL_TILES % ROW_TILES
    bg = tile // (COL_TILES * ROW_TILES)  # sample x group
    b = bg // GROUPS
    g = bg % GROUPS
    n0 = tl.program_id(1) * BLOCK_N
    # Rounded to what they are (whole 8-pixel chunks: the launcher's conditions), so the compiler
    # sees every image row and every box start 16 bytes aligned: 16-byte copies and stores.
    W = W // 8 * 8
    COL_STEP = COL_STEP // 8 * 8
    if OUT_ALIGNED:
        Wo = Wo // 8 * 8
    h0 = row_tile * ROWS
    w0 = col_tile * COL_STEP

    p = tl.arange(0, M)
    r = p // BOX
    # Columns masked per 8-pixel chunk (exact: the rows and the box start are chunk-aligned), from
    # the pixel's chunk start in the box, so the compiler sees a mask constant over each 16-byte copy.
    box_chunk = (p // 8 % (BOX // 8)) * 8
    chunk = w0 - HALO + box_chunk
    col_in = (chunk >= 0) & (chunk < W)
    c = tl.arange(0, BLOCK_K)
    n = n0 + tl.arange(0, BLOCK_N)
    n_in = n < COUT_G
    plane = H * W
    x_base = x_ptr + (b * GROUPS + g) * CIN_G * plane
    w_base = w_ptr + b * sw_b + g * sw_g + n[None, :] * sw_o + c[:, None] * sw_i

    # The output tile's first pixel and the bias row: formed before the loop, so that the epilogue
    # holds two pointers rather than the indices they come from.
    y_tile = y_ptr + ((b * GROUPS + g) * COUT_G * Ho + h0) * Wo + w0 - HALO
    if HAS_BIAS:
        bias_row = bias_ptr + b * sbias_b + g * COUT_G * sbias_o
    acc0 = tl.zeros([M, BLOCK_N], tl.float32)
    acc1 = tl.zeros([M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([M, BLOCK_N], tl.float32)
    blocks = CIN_G // BLOCK_K
    for step in tl.range(0, KH * blocks):
        u = step // blocks
        c0 = (step - u * blocks) * BLOCK_K
        xrow = h0 + r + u * DH - PH
        inside = col_in & (xrow >= 0) & (xrow < H)
        offs = (c0 + c[:, None]) * plane + (xrow * W + w0 - HALO)[None, :] + (p % BOX)[None, :]
        a = tl.load(x_base + offs, mask=inside[None, :], other=0.0)  # (channels x pixels), pixel-contiguous
        w_tap = w_base + c0 * sw_i + u * sw_u
        acc0 = tl.dot(a.T, tl.load(w_tap, mask=n_in[None, :], other=0.0), acc0, input_precision=INPUT_PRECISION)
        if KW == 3:
            acc1 = tl.dot(a.T, tl.load(w_tap + sw_v, mask=n_in[None, :], other=0.0), acc1,
                          input_precision=INPUT_PRECISION)
            acc2 = tl.dot(a.T, tl.load(w_tap + 2 * sw_v, mask=n_in[None, :], other=0.0), acc2,
                          input_precision=INPUT_PRECISION)

    # Output pixels are indexed as the box's: q = w - (w0 - HALO). Tap column v reads box column
    # q + v·DW - PW: 'same' padding leaves the middle column in place.
    if KW == 3:
        out = _column_shifted(acc1, DW - PW, BOX, M, BLOCK_N)
        out += _column_shifted(acc0, -PW, BOX, M, BLOCK_N)
        out += _column_shifted(acc2, 2 * DW - PW, BOX, M, BLOCK_N)
    else:
        out = _column_shifted(acc0, -PW, BOX, M, BLOCK_N)
    if HAS_BIAS:
        out += tl.load(bias_row + n * sbias_o, mask=n_in, other=0.0)[None, :].to(tl.float32)
    q = box_chunk if OUT_ALIGNED else p % BOX  # stores masked per chunk too where rows are aligned
    keep = (q >= HALO) & (q < HALO + COL_STEP) & (w0 - HALO + q < Wo) & (h0 + r < Ho)
    y_offs = n[None, :] * (Ho * Wo) + (r * Wo + p % BOX)[:, None]
    tl.store(y_tile + y_offs, out.to(y_ptr.dtype.element_ty), mask=keep[:, None] & n_in[None, :])


def block_k(dtype: torch.dtype) -> int:
    return STEP_BYTES // dtype.itemsize


def _halo(padding_w: int) -> int:
    return cdiv(padding_w, 8) * 8


def box_columns(W: int, Wo: int, kw: int, padding_w: int, dilation_w: int) -> tuple[int, int] | None:
    """(BOX, output columns a tile writes) for a row of ``W`` pixels, ``Wo`` outputs; None where no
    box is worth it. A row whose pixels fit one box past the halo takes one; a wider one boxes
    overlapping by the halo and the kernel's reach, each writing what it holds past them, in whole
    8-pixel chunks. Of the boxes (64 pixels two rows a tile, or 128 one row) the one whose
    columns the outputs use most, at least ``MIN_BOX_USE`` of them: each box column costs its
    MMA work whether an output uses it or not."""
    best = None
    halo = _halo(padding_w)
    reach = max((kw - 1) * dilation_w - padding_w, 0)
    for box in BOXES:
        if W <= box - halo and Wo <= box - halo:
            step = cdiv(Wo, 8) * 8
        else:
            step = (box - halo - reach) // 8 * 8
        if step < 8:
            continue
        use = Wo / (cdiv(Wo, step) * box)
        if use >= MIN_BOX_USE and (best is None or use > best[0]):
            best = (use, box, step)
    return best[1:] if best else None


def supported(x: torch.Tensor, cout: int, out_w: int, mixing: bool, has_spatial: bool, m: int, kernel_hw,
              groups: int, stride, padding, dilation, index_64: bool) -> bool:
    """Whether a forward of ``cout`` channels, ``out_w`` columns, reads NCHW ``x`` in place through
    this kernel (the module's conditions; ``mixing``: the experts mixed on the fly)."""
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.dim() == 4 and not is_channels_last(x)
            and x.is_contiguous() and not mixing and not has_spatial and m == 1 and not index_64
            and tuple(stride) == (1, 1) and kernel_hw[1] in KERNEL_COLUMNS and x.shape[3] % 8 == 0
            and (x.shape[1] // groups) % block_k(x.dtype) == 0 and cout % groups == 0 and padding[1] <= 8
            and box_columns(x.shape[3], out_w, kernel_hw[1], padding[1], dilation[1]) is not None
            and (x.is_meta or x.data_ptr() % 16 == 0))


def forward_launch(x, weight, strides, bias_mixed, y, kernel_hw, groups, padding, dilation,
                   group_axis: int = 1) -> Launch:
    """``weight`` the plain or materialised kernels with (b, o, i, u, v) ``strides`` (a weight source's
    without its region and expert axes), a group's kernels ``group_axis`` (1: o, 2: i) apart by that
    axis' channels a group; ``bias_mixed`` (B, 1, Cout) or None."""
    if not cacheable(x):
        return _forward_launch(x, weight, strides, bias_mixed, y, kernel_hw, groups, padding, dilation, group_axis)
    key = ("expert_conv_rows_fwd", layout(x), layout(weight), tuple(strides), layout(bias_mixed), layout(y),
           tuple(kernel_hw), groups, *padding, *dilation, group_axis)
    return planned(key, ("x_ptr", "w_ptr", "bias_ptr", "y_ptr"), (x, weight, bias_mixed, y),
                   lambda: _forward_launch(x, weight, strides, bias_mixed, y, kernel_hw, groups, padding, dilation,
                                           group_axis))


def _forward_launch(x, weight, strides, bias_mixed, y, kernel_hw, groups, padding, dilation, group_axis) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = y.shape[1:]
    box, step = box_columns(W, Wo, kernel_hw[1], padding[1], dilation[1])
    rows = TILE_PIXELS // box
    row_tiles, col_tiles = cdiv(Ho, rows), cdiv(Wo, step)
    bias_strides = bias_mixed.stride() if bias_mixed is not None else (0, 0, 0)
    args = dict(x_ptr=x, w_ptr=weight, bias_ptr=bias_mixed, y_ptr=y, H=H, W=W, Ho=Ho, Wo=Wo,
                CIN_G=Cin // groups, COUT_G=Cout // groups, GROUPS=groups, ROW_TILES=row_tiles, COL_TILES=col_tiles,
                COL_STEP=step,
                **dict(zip(("sw_b", "sw_o", "sw_i", "sw_u", "sw_v"), strides)),
                sw_g=strides[group_axis] * (Cout if group_axis == 1 else Cin) // groups,
                sbias_b=bias_strides[0], sbias_o=bias_strides[2])
    meta = dict(PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1], KH=kernel_hw[0], KW=kernel_hw[1],
                HALO=_halo(padding[1]), BOX=box, ROWS=rows, OUT_ALIGNED=Wo % 8 == 0, BLOCK_N=BLOCK_N,
                BLOCK_K=block_k(x.dtype),
                INPUT_PRECISION=conv_input_precision(x.dtype),
                HAS_BIAS=bias_mixed is not None)
    n_tiles = cdiv(Cout // groups, BLOCK_N)
    return Launch(expert_conv_rows_fwd_kernel, (B * groups * row_tiles * col_tiles, groups * n_tiles, 1), args, meta,
                  8, 4, loops=(kernel_hw[0] * (Cin // groups // block_k(x.dtype)),),
                  sm90_max_registers=_sm90_cap(x.dtype))


def _sm90_cap(dtype: torch.dtype) -> int:
    """Two programs an SM (128 registers), where ptxas fits the tile without local memory: 16-bit on
    both tritons (127-128 registers), fp32 on triton 3.6; triton 3.9's ptxas gives fp32 16 bytes of
    stack under 128 (three values saved across the loop), so it runs uncapped (164 registers, one
    program an SM: E2 fwd fp32 NCHW PREDICTED 83.5% against 87.5% capped on 3.6)."""
    return 128 if dtype.itemsize == 2 or TRITON_VERSION <= (3, 6) else 0


def transposed_padding(kernel_hw, padding, dilation) -> tuple[int, int]:
    """The padding of the stride-1 conv of dy that is a stride-1 conv's input gradient."""
    return tuple(dilation[a] * (kernel_hw[a] - 1) - padding[a] for a in range(2))


def input_grad_launch(dy, weight, strides, dx, kernel_hw, groups, padding, dilation) -> Launch:
    """A stride-1 input gradient as this module's forward of ``dy``: the kernels transposed (Cout
    the reduction) and flipped (tap (u, v) reads (kh-1-u, kw-1-v): negative tap strides from the
    last tap), the padding transposed. ``weight`` (B, m, Cout, Cin/g, kh, kw) with (b, o, i, u, v)
    ``strides``, as :func:`forward_launch` takes them for the forward."""
    kh, kw = kernel_hw
    b, o, i, u, v = strides
    return forward_launch(dy, weight[..., kh - 1:, kw - 1:], (b, i, o, -u, -v), None, dx, kernel_hw, groups,
                          transposed_padding(kernel_hw, padding, dilation), dilation, group_axis=2)

