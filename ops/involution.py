"""torch ops for SPEC.md §1: ``dynconv.involution`` and ``dynconv.dynamic_dwconv2d``.

Registered with torch.library as ``torch.ops.dynconv.involution`` / ``dynamic_dwconv2d`` (forward)
and ``involution_backward_input`` / ``involution_backward_weight`` (shared by both: a per-sample
weight is the per-pixel one with no pixel axes). Each op has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it, and an autograd formula built from the
backward ops. CUDA tensors run the Triton kernels; CPU tensors run shift-and-add, or the Triton
kernels through the interpreter when TRITON_INTERPRET=1 was set before import. Plain eager calls
of the public functions run the same bodies through an autograd.Function, without the dispatcher
(``ops/_eager.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dynconv.kernels import involution as kernels
from dynconv.kernels._launch import kernels_are_interpreted

from . import _eager
from . import reference_involution as reference
from ._checks import (
    as_pair,
    autocast_inputs,
    check_dtypes_and_devices,
    check_tensor,
    is_channels_last,
    memory_format_of,
    output_hw,
)

_INTERPRETED = kernels_are_interpreted()


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or _INTERPRETED


def _empty(like: Tensor, shape, fmt: torch.memory_format) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------------
# Checks: every bad input is named before a kernel runs.
# ---------------------------------------------------------------------------------------------

def _check(x, weight, bias, stride, padding, dilation, per_pixel: bool):
    check_tensor(x, "x", 4, "(B, C, H, W)")
    if per_pixel:
        check_tensor(weight, "weight", 6, "(B, G, K, K, Ho, Wo)")
    else:
        check_tensor(weight, "weight", 4, "(B, G, K, K)")
    if bias is not None:
        check_tensor(bias, "bias", 2, "(B, C)")
    check_dtypes_and_devices(x=x, weight=weight, bias=bias)
    return _geometry(x.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation,
                     per_pixel)


def _geometry(x_shape, weight_shape, bias_shape, stride, padding, dilation, per_pixel: bool):
    """The checks that need only shapes (ranks already checked); (stride, padding, dilation, out)."""
    B, C, H, W = x_shape
    G, K = weight_shape[1], weight_shape[2]
    if weight_shape[3] != K:
        raise ValueError(f"weight must hold square K x K kernels, got {weight_shape[2]} x {weight_shape[3]}")
    if K < 1:
        raise ValueError("kernel size must be >= 1")
    if weight_shape[0] != B:
        raise ValueError(f"batch mismatch: x has {B} samples, weight has {weight_shape[0]}")
    if G < 1 or C % G != 0:
        raise ValueError(f"channels C={C} must be divisible by the weight's groups G={G}")
    stride, padding, dilation = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    out = output_hw((H, W), (K, K), stride, padding, dilation)
    if per_pixel and tuple(weight_shape[4:]) != out:
        raise ValueError(
            f"weight's spatial size {tuple(weight_shape[4:])} must equal the output size {out} "
            f"(input {H}x{W}, K={K}, stride {stride}, padding {padding}, dilation {dilation})")
    if bias_shape is not None and tuple(bias_shape) != (B, C):
        raise ValueError(f"bias must have shape (B, C) = {(B, C)}, got {tuple(bias_shape)}")
    return stride, padding, dilation, out


# Eager calls repeat a few problems over and over. Fake tensors' symbolic sizes are unhashable,
# so the ops' own checks (torch.compile's path) stay uncached.
_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry)


def _default_padding(padding, dilation, K):
    if padding is None:
        d = as_pair(dilation, "dilation", 1)
        return (d[0] * (K - 1) // 2, d[1] * (K - 1) // 2)
    return padding


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies: the custom ops and the eager autograd.Function both run these.
# ---------------------------------------------------------------------------------------------

def _forward(x, weight, bias, stride, padding, dilation, out):
    y = _empty(x, (x.shape[0], x.shape[1], *out), memory_format_of(x))
    if _use_triton(x):
        kernels.involution_forward(x, weight, bias, y, stride, padding, dilation)
    else:
        y.copy_(reference.involution_shift_add(x, weight, bias, stride, padding, dilation))
    return y


def _backward_input(grad, weight, x_size, channels_last, stride, padding, dilation):
    dx = _empty(grad, x_size, torch.channels_last if channels_last else torch.contiguous_format)
    if _use_triton(grad):
        kernels.involution_backward_input(grad, weight, dx, stride, padding, dilation)
    else:
        dx.copy_(reference.shift_add_backward_input(grad, weight, tuple(x_size[2:]), stride, padding, dilation))
    return dx


def _backward_weight(grad, x, weight_size, stride, padding, dilation):
    dw = torch.empty(tuple(weight_size), dtype=x.dtype, device=x.device)
    if _use_triton(x):
        kernels.involution_backward_weight(grad, x, dw, stride, padding, dilation)
    else:
        dw.copy_(reference.shift_add_backward_weight(grad, x, tuple(weight_size), stride, padding, dilation))
    return dw


def _save(ctx, x, weight, bias, geometry):
    ctx.geometry = geometry
    ctx.has_bias = bias is not None
    ctx.x_size = tuple(x.shape)
    ctx.weight_size = tuple(weight.shape)
    ctx.channels_last = is_channels_last(x)
    ctx.save_for_backward(x, weight)


def _grads(ctx, grad, backward_input, backward_weight):
    """(dx, dweight, dbias), each None where not needed."""
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx = backward_input(grad, weight, ctx.x_size, ctx.channels_last, *ctx.geometry) if needs[0] else None
    dw = backward_weight(grad, x, ctx.weight_size, *ctx.geometry) if needs[1] else None
    dbias = grad.sum(dim=(2, 3)) if ctx.has_bias and needs[2] else None
    return dx, dw, dbias


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::involution", mutates_args=())
def involution_op(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> Tensor:
    return _forward(x, weight, None, *_check(x, weight, None, stride, padding, dilation, per_pixel=True))


@involution_op.register_fake
def _(x, weight, stride, padding, dilation):
    out = _check(x, weight, None, stride, padding, dilation, per_pixel=True)[3]
    return _empty(x, (x.shape[0], x.shape[1], *out), memory_format_of(x))


@torch.library.custom_op("dynconv::dynamic_dwconv2d", mutates_args=())
def dynamic_dwconv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return _forward(x, weight, bias, *_check(x, weight, bias, stride, padding, dilation, per_pixel=False))


@dynamic_dwconv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation):
    out = _check(x, weight, bias, stride, padding, dilation, per_pixel=False)[3]
    return _empty(x, (x.shape[0], x.shape[1], *out), memory_format_of(x))


# Backward ops, shared by both forwards (a per-sample weight is the per-pixel one without pixel axes).

@torch.library.custom_op("dynconv::involution_backward_input", mutates_args=())
def backward_input_op(grad: Tensor, weight: Tensor, x_size: Sequence[int], channels_last: bool,
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return _backward_input(grad, weight, x_size, channels_last, stride, padding, dilation)


@backward_input_op.register_fake
def _(grad, weight, x_size, channels_last, stride, padding, dilation):
    return _empty(grad, x_size, torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op("dynconv::involution_backward_weight", mutates_args=())
def backward_weight_op(grad: Tensor, x: Tensor, weight_size: Sequence[int], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return _backward_weight(grad, x, weight_size, stride, padding, dilation)


@backward_weight_op.register_fake
def _(grad, x, weight_size, stride, padding, dilation):
    return x.new_empty(tuple(weight_size))


def _setup_context(ctx, inputs, output):
    bias = inputs[2] if len(inputs) == 6 else None
    _save(ctx, inputs[0], inputs[1], bias, tuple(inputs[-3:]))


def _involution_backward(ctx, grad):
    dx, dw, _ = _grads(ctx, grad, backward_input_op, backward_weight_op)
    return dx, dw, None, None, None


def _dwconv_backward(ctx, grad):
    return (*_grads(ctx, grad, backward_input_op, backward_weight_op), None, None, None)


torch.library.register_autograd("dynconv::involution", _involution_backward, setup_context=_setup_context)
torch.library.register_autograd("dynconv::dynamic_dwconv2d", _dwconv_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher
# ---------------------------------------------------------------------------------------------

class _Involution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, out):
        _save(ctx, x, weight, bias, (stride, padding, dilation))
        return _forward(x, weight, bias, stride, padding, dilation, out)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the kernels have no derivative of their own
            return _backward_once(ctx, grad)
        return (*_grads(ctx, grad, _backward_input, _backward_weight), None, None, None, None)


_backward_once = once_differentiable(_Involution.backward)
_apply = _eager.applier(_Involution)


def _call(x, weight, bias, pairs, per_pixel):
    check_dtypes_and_devices(x=x, weight=weight, bias=bias)
    geometry = _cached_geometry(x.shape, weight.shape, None if bias is None else bias.shape, *pairs, per_pixel)
    if _eager.records_grad(x, weight, bias):
        return _apply(x, weight, bias, *geometry)
    return _forward(x, weight, bias, *geometry)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def involution(x: Tensor, weight: Tensor, stride=1, padding=None, dilation=1) -> Tensor:
    """Involution / per-pixel dynamic depth-wise conv (SPEC.md §1a).

    ``y[b,c,i,j] = Σ_{u,v} weight[b, c // (C/G), u, v, i, j] · x[b, c, i·s-p+u·d, j·s-p+v·d]``

    Args:
        x: ``(B, C, H, W)``, NCHW or channels_last; the output keeps its memory format.
        weight: ``(B, G, K, K, Ho, Wo)`` with ``C % G == 0``; G = C is the inhomogeneous
            dynamic depth-wise conv, G = heads with softmaxed scores is local-attention aggregation.
        stride, padding, dilation: ints or (h, w) pairs; ``padding=None`` is ``d·(K-1)//2``.
    """
    check_tensor(x, "x", 4, "(B, C, H, W)")
    check_tensor(weight, "weight", 6, "(B, G, K, K, Ho, Wo)")
    padding = _default_padding(padding, dilation, weight.shape[2])
    x, weight = autocast_inputs(x, weight)
    pairs = _pairs(stride, padding, dilation)
    if _eager.eager(x, weight):
        return _call(x, weight, None, pairs, per_pixel=True)
    return involution_op(x, weight, *map(list, pairs))


def dynamic_dwconv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=None,
                     dilation=1) -> Tensor:
    """Per-sample dynamic depth-wise conv (SPEC.md §1b), without materialising per-pixel weights.

    ``y[b,c,i,j] = bias[b,c] + Σ_{u,v} weight[b, c // (C/G), u, v] · x[b, c, i·s-p+u·d, j·s-p+v·d]``

    Args:
        x: ``(B, C, H, W)``; weight: ``(B, G, K, K)`` with ``C % G == 0``; bias: ``(B, C)`` or None.
    """
    check_tensor(x, "x", 4, "(B, C, H, W)")
    check_tensor(weight, "weight", 4, "(B, G, K, K)")
    if bias is not None:
        check_tensor(bias, "bias", 2, "(B, C)")
    padding = _default_padding(padding, dilation, weight.shape[2])
    x, weight, bias = autocast_inputs(x, weight, bias)
    pairs = _pairs(stride, padding, dilation)
    if _eager.eager(x, weight, bias):
        return _call(x, weight, bias, pairs, per_pixel=False)
    return dynamic_dwconv2d_op(x, weight, bias, *map(list, pairs))


def _pairs(stride, padding, dilation):
    return as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
