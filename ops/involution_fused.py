"""torch ops for the fused involution (issue 6): ``dynconv.involution_fused``.

``y = involution(x, span(z))`` where ``span`` is the last 1x1 conv of the kernel generation
(``R → K²·G``), computed inside the aggregation kernel so the per-pixel weights
``(B, G, K, K, Ho, Wo)`` never reach global memory, in the forward or the backward.

Registered as ``torch.ops.dynconv.involution_fused`` with backward ops
``involution_fused_backward_input`` (dx), ``involution_fused_backward_z`` (dz) and
``involution_fused_backward_span`` (span weight and bias), each with a fake implementation for
``torch.compile``. CUDA tensors run the Triton kernels; CPU tensors run the plain-PyTorch span conv
plus shift-and-add (``ops/reference_involution_fused.py``, which does materialise the weights), or
the Triton kernels through the interpreter when TRITON_INTERPRET=1 was set before import. Plain
eager calls of the public function run the same bodies through an autograd.Function, without the
dispatcher (``ops/_eager.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dynconv.kernels import involution_fused as kernels
from dynconv.kernels._launch import kernels_are_interpreted

from . import _eager
from . import reference_involution_fused as reference
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


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Checks: every bad input is named before a kernel runs.
# ---------------------------------------------------------------------------------------------

def _check_kernel_size(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, torch.SymInt)):
        raise TypeError(f"kernel_size must be an int, got {kernel_size!r}")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    return kernel_size


def _check(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation):
    """Validates the op's inputs; returns (groups, stride, padding, dilation, output size)."""
    _check_tensors(x, z, span_weight, span_bias)
    K = _check_kernel_size(kernel_size)
    return _geometry(x.shape, z.shape, span_weight.shape, None if span_bias is None else span_bias.shape, K,
                     stride, padding, dilation)


def _check_tensors(x, z, span_weight, span_bias):
    check_tensor(x, "x", 4, "(B, C, H, W)")
    check_tensor(z, "z", 4, "(B, R, Ho, Wo)")
    check_tensor(span_weight, "span_weight", 2, "(K²·G, R)")
    if span_bias is not None:
        check_tensor(span_bias, "span_bias", 1, "(K²·G,)")
    check_dtypes_and_devices(x=x, z=z, span_weight=span_weight, span_bias=span_bias)


def _geometry(x_shape, z_shape, span_shape, span_bias_shape, K, stride, padding, dilation):
    """The checks that need only shapes (ranks already checked); (groups, stride, padding, dilation, out)."""
    B, C, H, W = x_shape
    O, R = span_shape
    if O < 1 or O % (K * K) != 0:
        raise ValueError(f"span_weight has {O} rows: it must be a positive multiple of K² = {K * K} (K²·G rows)")
    G = O // (K * K)
    if C % G != 0:
        raise ValueError(f"channels C={C} must be divisible by the groups G={G} (span_weight rows {O} / K²)")
    if z_shape[0] != B:
        raise ValueError(f"batch mismatch: x has {B} samples, z has {z_shape[0]}")
    if z_shape[1] != R or R < 1:
        raise ValueError(f"z has {z_shape[1]} channels but span_weight expects R = {R}")
    if span_bias_shape is not None and span_bias_shape[0] != O:
        raise ValueError(f"span_bias must have shape ({O},) to match span_weight, got {tuple(span_bias_shape)}")
    stride, padding, dilation = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    out = output_hw((H, W), (K, K), stride, padding, dilation)
    if tuple(z_shape[2:]) != out:
        raise ValueError(
            f"z's spatial size {tuple(z_shape[2:])} must equal the output size {out} "
            f"(input {H}x{W}, K={K}, stride {stride}, padding {padding}, dilation {dilation})")
    return G, stride, padding, dilation, out


# Eager calls repeat a few problems over and over. Fake tensors' symbolic sizes are unhashable,
# so the ops' own checks (torch.compile's path) stay uncached.
_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry)


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies: the custom ops and the eager autograd.Function both run these.
# ---------------------------------------------------------------------------------------------

def _forward(x, z, span_weight, span_bias, kernel_size, groups, stride, padding, dilation, out):
    y = _empty(x, (x.shape[0], x.shape[1], *out), memory_format_of(x))
    if _use_triton(x):
        kernels.involution_fused_forward(x, z, span_weight, span_bias, y, kernel_size, stride, padding, dilation)
    else:
        y.copy_(reference.involution_fused_reference(x, z, span_weight, span_bias, kernel_size, groups,
                                                     stride, padding, dilation))
    return y


def _backward_input(grad, z, span_weight, span_bias, kernel_size, x_size, channels_last, stride, padding, dilation):
    dx = _empty(grad, x_size, _format(channels_last))
    if _use_triton(grad):
        kernels.involution_fused_backward_input(grad, z, span_weight, span_bias, dx, kernel_size,
                                                stride, padding, dilation)
    else:
        dx.copy_(reference.fused_backward_input(grad, z, span_weight, span_bias, kernel_size, tuple(x_size[2:]),
                                                stride, padding, dilation))
    return dx


def _backward_z(grad, x, span_weight, kernel_size, z_channels_last, stride, padding, dilation):
    dz = _empty(x, (x.shape[0], span_weight.shape[1], *grad.shape[2:]), _format(z_channels_last))
    if _use_triton(x):
        kernels.involution_fused_backward_z(grad, x, span_weight, dz, kernel_size, stride, padding, dilation)
    else:
        dz.copy_(reference.fused_backward_z(grad, x, span_weight, kernel_size, stride, padding, dilation))
    return dz


def _backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation):
    """(d span_weight (K²G, R), d span_bias (K²G,)): sums over every sample and pixel, deterministic."""
    rows = kernel_size * kernel_size * groups
    dspan = torch.empty((rows, z.shape[1]), dtype=x.dtype, device=x.device)
    dbias = torch.empty((rows,), dtype=x.dtype, device=x.device)
    if _use_triton(x):
        kernels.involution_fused_backward_span(grad, x, z, dspan, dbias, kernel_size, stride, padding, dilation)
    else:
        ref_span, ref_bias = reference.fused_backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation)
        dspan.copy_(ref_span)
        dbias.copy_(ref_bias)
    return dspan, dbias


def _save(ctx, x, z, span_weight, span_bias, kernel_size, geometry):
    ctx.kernel_size = kernel_size
    ctx.geometry = geometry
    ctx.x_size = tuple(x.shape)
    ctx.x_channels_last = is_channels_last(x)
    ctx.z_channels_last = is_channels_last(z)
    ctx.save_for_backward(x, z, span_weight, span_bias)


def _grads(ctx, grad, backward_input, backward_z, backward_span):
    """(dx, dz, dspan_weight, dspan_bias), each None where not needed."""
    x, z, span_weight, span_bias = ctx.saved_tensors
    K = ctx.kernel_size
    needs = ctx.needs_input_grad
    dx = dz = dspan = dbias = None
    if needs[0]:
        dx = backward_input(grad, z, span_weight, span_bias, K, ctx.x_size, ctx.x_channels_last, *ctx.geometry)
    if needs[1]:
        dz = backward_z(grad, x, span_weight, K, ctx.z_channels_last, *ctx.geometry)
    if needs[2] or needs[3]:
        dspan, dbias = backward_span(grad, x, z, K, span_weight.shape[0] // (K * K), *ctx.geometry)
        if span_bias is None or not needs[3]:
            dbias = None
    return dx, dz, dspan, dbias


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::involution_fused", mutates_args=())
def involution_fused_op(x: Tensor, z: Tensor, span_weight: Tensor, span_bias: Tensor | None, kernel_size: int,
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    geometry = _check(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation)
    return _forward(x, z, span_weight, span_bias, kernel_size, *geometry)


@involution_fused_op.register_fake
def _(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation):
    _, _, _, _, out = _check(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation)
    return _empty(x, (x.shape[0], x.shape[1], *out), memory_format_of(x))


@torch.library.custom_op("dynconv::involution_fused_backward_input", mutates_args=())
def backward_input_op(grad: Tensor, z: Tensor, span_weight: Tensor, span_bias: Tensor | None, kernel_size: int,
                      x_size: Sequence[int], channels_last: bool, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> Tensor:
    return _backward_input(grad, z, span_weight, span_bias, kernel_size, x_size, channels_last, stride, padding,
                           dilation)


@backward_input_op.register_fake
def _(grad, z, span_weight, span_bias, kernel_size, x_size, channels_last, stride, padding, dilation):
    return _empty(grad, x_size, _format(channels_last))


@torch.library.custom_op("dynconv::involution_fused_backward_z", mutates_args=())
def backward_z_op(grad: Tensor, x: Tensor, span_weight: Tensor, kernel_size: int, z_channels_last: bool,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return _backward_z(grad, x, span_weight, kernel_size, z_channels_last, stride, padding, dilation)


@backward_z_op.register_fake
def _(grad, x, span_weight, kernel_size, z_channels_last, stride, padding, dilation):
    return _empty(x, (x.shape[0], span_weight.shape[1], *grad.shape[2:]), _format(z_channels_last))


@torch.library.custom_op("dynconv::involution_fused_backward_span", mutates_args=())
def backward_span_op(grad: Tensor, x: Tensor, z: Tensor, kernel_size: int, groups: int, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> tuple[Tensor, Tensor]:
    return _backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation)


@backward_span_op.register_fake
def _(grad, x, z, kernel_size, groups, stride, padding, dilation):
    rows = kernel_size * kernel_size * groups
    return x.new_empty((rows, z.shape[1])), x.new_empty((rows,))


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs[:5], tuple(inputs[5:]))


def _backward(ctx, grad):
    return (*_grads(ctx, grad, backward_input_op, backward_z_op, backward_span_op), None, None, None, None)


torch.library.register_autograd("dynconv::involution_fused", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher
# ---------------------------------------------------------------------------------------------

class _InvolutionFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, span_weight, span_bias, kernel_size, groups, stride, padding, dilation, out):
        _save(ctx, x, z, span_weight, span_bias, kernel_size, (stride, padding, dilation))
        return _forward(x, z, span_weight, span_bias, kernel_size, groups, stride, padding, dilation, out)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the kernels have no derivative of their own
            return _backward_once(ctx, grad)
        return (*_grads(ctx, grad, _backward_input, _backward_z, _backward_span), None, None, None, None, None, None)


_backward_once = once_differentiable(_InvolutionFused.backward)
_apply = _eager.applier(_InvolutionFused)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def involution_fused(x: Tensor, z: Tensor, span_weight: Tensor, span_bias: Tensor | None, kernel_size: int,
                     groups: int, stride=1, padding=None, dilation=1) -> Tensor:
    """Involution whose per-pixel kernels are generated on-chip from the reduced feature ``z``.

    ``y = involution(x, w)`` with ``w[b,g,u,v,i,j] = Σ_r span_weight[g·K²+u·K+v, r] · z[b,r,i,j]
    + span_bias[g·K²+u·K+v]``: the last 1x1 conv of Involution2d's kernel generation and the
    aggregation in one kernel. Gradients reach x, z, span_weight and span_bias; the per-pixel
    weights and their gradient are never stored (on CUDA; the CPU path materialises them).

    Args:
        x: ``(B, C, H, W)``, NCHW or channels_last; the output keeps its memory format.
        z: ``(B, R, Ho, Wo)``, the reduced feature at output resolution (``Involution2d.reduced_features``).
        span_weight: ``(K²·G, R)`` or the span conv's own ``(K²·G, R, 1, 1)`` weight; its gradient
            comes back in the shape given.
        span_bias: ``(K²·G,)`` or None.
        kernel_size: K. groups: G, with ``C % G == 0``; checked against ``span_weight``'s rows.
        stride, padding, dilation: ints or (h, w) pairs; ``padding=None`` is ``d·(K-1)//2``.
    """
    K = _check_kernel_size(kernel_size)
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if not isinstance(span_weight, Tensor):
        raise TypeError(f"span_weight must be a torch.Tensor, got {type(span_weight).__name__}")
    if span_weight.dim() == 4:
        if tuple(span_weight.shape[2:]) != (1, 1):
            raise ValueError(f"a 4-D span_weight must be a 1x1 conv weight (K²·G, R, 1, 1), got {tuple(span_weight.shape)}")
        span_weight = span_weight.flatten(1)
    if span_weight.dim() == 2 and span_weight.shape[0] != K * K * groups:
        raise ValueError(f"span_weight has {span_weight.shape[0]} rows, expected K²·G = {K}²·{groups} = {K * K * groups}")
    if padding is None:
        d = as_pair(dilation, "dilation", 1)
        padding = (d[0] * (K - 1) // 2, d[1] * (K - 1) // 2)
    x, z, span_weight, span_bias = autocast_inputs(x, z, span_weight, span_bias)
    pairs = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    tensors = x, z, span_weight, span_bias
    if not _eager.eager(*tensors):
        return involution_fused_op(*tensors, K, *map(list, pairs))
    _check_tensors(*tensors)
    geometry = _cached_geometry(x.shape, z.shape, span_weight.shape, None if span_bias is None else span_bias.shape,
                                K, *pairs)
    if _eager.records_grad(*tensors):
        return _apply(*tensors, K, *geometry)
    return _forward(*tensors, K, *geometry)
