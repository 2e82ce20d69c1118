"""NCHW -> channels_last copies, for kernels that stream channel-contiguous tiles.

The expert conv's tiles stream through asynchronous copies into shared memory, four K-steps
ahead, which needs each operand's reduction axis (the channels) contiguous. An NCHW patch is
pixel-contiguous: it is gathered a 2- or 4-byte element at a time into registers, which the
pipeline does not stream, so every K-step waits out a memory round trip. An NCHW input whose
conv would take the streamed tiles in channels_last is therefore copied to channels_last once
(here) and the conv reads the copy; its output keeps the caller's layout (the conv's store takes
any strides).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, cdiv, needs_int64


@triton.jit
def channels_last_copy_kernel(x_ptr, y_ptr, C, W, HW, P_TILES, sxb, sxc, sxh, sxw,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT_PIXELS: tl.constexpr,
                              INDEX_64: tl.constexpr):
    """y[b, p, c] = x[b, c, p // W, p % W] for a (channels x pixels) tile; y channels_last contiguous.

    Loaded along the pixels (x's unit stride in NCHW), stored along the channels (y's), the
    transpose between them through shared memory. FLAT_PIXELS: a channel's pixels are contiguous
    (NCHW rows back to back), so p is the offset itself and the compiler sees the loads' contiguity."""
    pid = tl.program_id(0)
    b = pid // P_TILES
    p = (pid % P_TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
        c = c.to(tl.int64)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    if FLAT_PIXELS:
        x_off = b * sxb + c[:, None] * sxc + p[None, :]
    else:
        x_off = b * sxb + c[:, None] * sxc + ((p // W) * sxh + (p % W) * sxw)[None, :]
    tile = tl.load(x_ptr + x_off, mask=mask)
    y_off = b * HW * C + p[:, None] * C + c[None, :]
    tl.store(y_ptr + y_off, tl.trans(tile), mask=tl.trans(mask))


_BLOCK_C = 64
_BLOCK_P = 64


def copy_launch(x: torch.Tensor, out: torch.Tensor) -> Launch:
    """The launch writing ``x`` (any strides) into ``out``, channels_last contiguous of x's shape."""
    B, C, H, W = x.shape
    p_tiles = cdiv(H * W, _BLOCK_P)
    return Launch(channels_last_copy_kernel, (B * p_tiles, cdiv(C, _BLOCK_C), 1),
                  dict(x_ptr=x, y_ptr=out, C=C, W=W, HW=H * W, P_TILES=p_tiles,
                       **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride()))),
                  dict(BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P, FLAT_PIXELS=x.stride(3) == 1 and x.stride(2) == W,
                       INDEX_64=needs_int64(x, out)), 4, 1)


def channels_last_empty(x: torch.Tensor, device=None) -> torch.Tensor:
    """A new channels_last tensor of ``x``'s shape and dtype, on ``device`` (default: x's)."""
    return torch.empty(x.shape, dtype=x.dtype, device=device or x.device).to(memory_format=torch.channels_last)


def channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) as a new channels_last contiguous tensor."""
    out = channels_last_empty(x)
    if out.numel():
        copy_launch(x, out)()
    return out


def catalogue() -> list[Launch]:
    """The copy at the expert conv's catalogue dtypes, and a 64-bit one."""
    launches = []
    shapes = [((2, 96, 13, 11), dtype, str(dtype).removeprefix("torch.")) for dtype in
              (torch.float32, torch.float16, torch.bfloat16)]
    shapes.append(((2, 64, 4096, 4200), torch.bfloat16, "bfloat16 past int32"))
    for shape, dtype, label in shapes:
        x = torch.empty(shape, dtype=dtype, device="meta")
        launch = copy_launch(x, channels_last_empty(x))
        launch.label = label
        launches.append(launch)
    return launches
