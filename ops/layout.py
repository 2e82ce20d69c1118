"""torch.ops.dynconv.channels_last_copy: ``kernels/layout.py``'s copy as a custom op, so that a
backward formula may make it between two backward ops also under torch.compile, which traces
those formulas on fake tensors (a bare Triton launch there would run on no data)."""
from __future__ import annotations

import torch
from torch import Tensor

from dynconv.kernels import layout
from dynconv.kernels._launch import runs_kernels


@torch.library.custom_op("dynconv::channels_last_copy", mutates_args=())
def channels_last_copy_op(x: Tensor) -> Tensor:
    if runs_kernels(x):
        return layout.channels_last_copy(x)
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


@channels_last_copy_op.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.channels_last)


@channels_last_copy_op.register_vmap
def _(info, in_dims, x):
    """Batched (torch.func): the vmapped dimension folded into the batch, one copy for all."""
    if in_dims[0] is None:
        return channels_last_copy_op(x), None
    x = x.movedim(in_dims[0], 0)
    return channels_last_copy_op(x.flatten(0, 1)).unflatten(0, x.shape[:2]), 0


def _copy_backward(ctx, grad):
    return grad  # the same values in another layout


torch.library.register_autograd("dynconv::channels_last_copy", _copy_backward)
