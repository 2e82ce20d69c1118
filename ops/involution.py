"""torch ops for docs/operators.md §1: ``dynconv.involution`` and ``dynconv.dynamic_dwconv2d``.

Registered with torch.library as ``torch.ops.dynconv.involution`` / ``dynamic_dwconv2d`` (forward)
and ``involution_backward_input`` / ``involution_backward_weight`` (shared by both: a per-sample
weight is the per-pixel one with no pixel axes). Each op has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it, and an autograd formula built from the other
ops, to any order. CUDA tensors run the Triton kernels; CPU tensors run torch's depthwise conv over
the batch (per-sample weights) or shift-and-add (per-pixel weights), or the Triton kernels through
the interpreter when TRITON_INTERPRET=1 was set before import. Plain eager
calls of the public functions, forward-mode AD and torch.func's transforms run the same bodies
through autograd.Functions (with jvp and vmap rules), without the dispatcher (``ops/_eager.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from dynconv.kernels import involution as kernels
from dynconv.kernels import involution_weight_grad as weight_grad
from dynconv.kernels._launch import runs_kernels

from . import _eager
from ._eager import fold_vmapped
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

def _plain(t: Tensor) -> bool:
    """The plain-PyTorch CPU path: per-sample weights by the batch-as-groups depthwise conv (torch's
    own conv kernels, measured fastest on CPU: perf_reports/cpu/), per-pixel ones by shift-and-add."""
    return not t.is_meta and not runs_kernels(t)


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
        raise ValueError(f"kernel size K must be >= 1, got a weight of shape {tuple(weight_shape)}")
    if weight_shape[0] != B:
        raise ValueError(f"batch mismatch: x has {B} samples, weight has {weight_shape[0]}")
    if G < 1 or C % G != 0:
        raise ValueError(f"channels C={C} must be divisible by the weight's groups G={G}")
    stride, padding, dilation = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    out = output_hw((H, W), (K, K), stride, padding, dilation, empty_ok=True)
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


def _default_padding(padding, dilation, weight_shape):
    K = weight_shape[2]
    if padding is None:
        if K < 1:  # named here: the default padding of K = 0 would be reported as a negative padding
            raise ValueError(f"kernel size K must be >= 1, got a weight of shape {tuple(weight_shape)}")
        d = as_pair(dilation, "dilation", 1)
        return (d[0] * (K - 1) // 2, d[1] * (K - 1) // 2)
    return padding


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies: the custom ops and the autograd.Functions all run these. Meta
# tensors and empty problems launch no kernel: an empty result needs no values, and an empty
# operand makes every value zero (an empty channel axis still leaves a weight gradient to fill).
# ---------------------------------------------------------------------------------------------

def _forward(x, weight, bias, stride, padding, dilation, out):
    fmt = memory_format_of(x)
    if _plain(x) and x.numel() and out[0] * out[1]:  # the plain result itself, no copy into an empty
        if weight.dim() == 4:
            y = reference.dwconv_batch_as_groups(x, weight, bias, stride, padding, dilation)
        else:
            y = reference.involution_shift_add(x, weight, bias, stride, padding, dilation)
        return y.contiguous(memory_format=fmt)
    y = _empty(x, (x.shape[0], x.shape[1], *out), fmt)
    if y.numel() == 0 or y.is_meta:
        return y
    if x.numel() == 0:  # an empty image under padding: only the bias reaches the output
        return y.copy_(bias[:, :, None, None].expand_as(y)) if bias is not None else y.zero_()
    kernels.involution_forward(x, weight, bias, y, stride, padding, dilation)
    return y


def _backward_input(grad, weight, x_size, channels_last, stride, padding, dilation):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if _plain(grad) and grad.numel() and weight.numel() and all(x_size):
        body = (reference.dwconv_batch_as_groups_backward_input if weight.dim() == 4
                else reference.shift_add_backward_input)
        return body(grad, weight, tuple(x_size[2:]), stride, padding, dilation).contiguous(memory_format=fmt)
    dx = _empty(grad, x_size, fmt)
    if dx.numel() == 0 or dx.is_meta:
        return dx
    if grad.numel() == 0 or weight.numel() == 0:
        return dx.zero_()
    kernels.involution_backward_input(grad, weight, dx, stride, padding, dilation)
    return dx


def _backward_weight(grad, x, weight_size, stride, padding, dilation):
    if _plain(x) and grad.numel() and x.numel() and all(weight_size):
        body = (reference.dwconv_batch_as_groups_backward_weight if len(weight_size) == 4
                else reference.shift_add_backward_weight)
        return body(grad, x, tuple(weight_size), stride, padding, dilation).contiguous()
    dw = torch.empty(tuple(weight_size), dtype=x.dtype, device=x.device)
    if dw.numel() == 0 or dw.is_meta:
        return dw
    if grad.numel() == 0 or x.numel() == 0:
        return dw.zero_()
    weight_grad.involution_backward_weight(grad, x, dw, stride, padding, dilation)
    return dw


# ---------------------------------------------------------------------------------------------
# Derivatives. The op is bilinear, so with F = forward (x, w) -> y, Bx = backward_input (g, w) -> dx
# and Bw = backward_weight (g, x) -> dw, {F, Bx, Bw} is closed under differentiation:
#   F(x, w):  dx = Bx(g, w),  dw = Bw(g, x),  dbias = g.sum(2, 3);  tangent F(tx, w) + F(x, tw) + tbias
#   Bx(g, w): dg = F(h, w),   dw = Bw(g, h);                        tangent Bx(tg, w) + Bx(g, tw)
#   Bw(g, x): dg = F(x, k),   dx = Bx(g, k);                        tangent Bw(tg, x) + Bw(g, tx)
# (h, k: the incoming x- and w-shaped gradients). Each of F, Bx, Bw is an autograd.Function whose
# backward and jvp call the Functions again, so derivatives of every order run the same kernels;
# their vmap rules fold the vmapped dim into the batch, so torch.func's transforms compose.
# ---------------------------------------------------------------------------------------------

def _differentiably(function, body, *args):
    """``body(*args)``, through ``function`` when the result's own derivative may be wanted."""
    # The batched gradients and tangents of torch.autograd (``is_grads_batched``, ``jacobian(vectorize=
    # True)``) arrive as legacy batched tensors outside any functorch transform, always among the
    # first two operands: the kernels cannot take them, the custom ops (batched by a loop) can.
    if _is_legacy_batched(args[0]) or _is_legacy_batched(args[1]):
        return _AS_OP[function](*args)
    return body(*args) if _eager.graph_free() else function.apply(*args)


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _sum(*terms):
    present = [t for t in terms if t is not None]
    return functools.reduce(torch.add, present) if present else None


class _Forward(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, out):
        return _forward(x, weight, bias, stride, padding, dilation, out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, out = inputs
        ctx.geometry = (stride, padding, dilation)
        ctx.out = out
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = _differentiably(_BackwardInput, _backward_input, grad, weight, tuple(x.shape), is_channels_last(x),
                             *ctx.geometry) if needs[0] else None
        dw = _differentiably(_BackwardWeight, _backward_weight, grad, x, tuple(weight.shape),
                             *ctx.geometry) if needs[1] else None
        dbias = grad.sum(dim=(2, 3)) if ctx.has_bias and needs[2] else None
        return dx, dw, dbias, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, *_):
        x, weight = ctx.saved_tensors
        geometry = (*ctx.geometry, ctx.out)
        ty = _sum(None if tx is None else _differentiably(_Forward, _forward, tx, weight, None, *geometry),
                  None if tweight is None else _differentiably(_Forward, _forward, x, tweight, None, *geometry))
        if tbias is None:
            return ty
        tbias = tbias[:, :, None, None]
        return tbias.expand(x.shape[0], x.shape[1], *ctx.out).contiguous() if ty is None else ty + tbias

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, out):
        n = info.batch_size
        B, C = x.shape[:2] if in_dims[0] is None else x.movedim(in_dims[0], 0).shape[1:3]
        y = _Forward.apply(fold_vmapped(x, in_dims[0], n), fold_vmapped(weight, in_dims[1], n),
                           fold_vmapped(bias, in_dims[2], n), stride, padding, dilation, out)
        return y.reshape(n, B, C, *out), 0


class _BackwardInput(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(grad, weight, x_size, channels_last, stride, padding, dilation):
        return _backward_input(grad, weight, x_size, channels_last, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, weight, x_size, channels_last, stride, padding, dilation = inputs
        ctx.x_layout = (x_size, channels_last)
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(grad, weight)
        ctx.save_for_forward(grad, weight)

    @staticmethod
    def backward(ctx, h):
        grad, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dgrad = _differentiably(_Forward, _forward, h, weight, None, *ctx.geometry,
                                tuple(grad.shape[2:])) if needs[0] else None
        dweight = _differentiably(_BackwardWeight, _backward_weight, grad, h, tuple(weight.shape),
                                  *ctx.geometry) if needs[1] else None
        return dgrad, dweight, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tgrad, tweight, *_):
        grad, weight = ctx.saved_tensors
        args = (*ctx.x_layout, *ctx.geometry)
        return _sum(None if tgrad is None else _differentiably(_BackwardInput, _backward_input, tgrad, weight, *args),
                    None if tweight is None else _differentiably(_BackwardInput, _backward_input, grad, tweight, *args))

    @staticmethod
    def vmap(info, in_dims, grad, weight, x_size, channels_last, stride, padding, dilation):
        n = info.batch_size
        dx = _BackwardInput.apply(fold_vmapped(grad, in_dims[0], n), fold_vmapped(weight, in_dims[1], n),
                                  (n * x_size[0], *x_size[1:]), channels_last, stride, padding, dilation)
        return dx.reshape(n, *x_size), 0


class _BackwardWeight(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(grad, x, weight_size, stride, padding, dilation):
        return _backward_weight(grad, x, weight_size, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight_size, stride, padding, dilation = inputs
        ctx.weight_size = weight_size
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(grad, x)
        ctx.save_for_forward(grad, x)

    @staticmethod
    def backward(ctx, k):
        grad, x = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dgrad = _differentiably(_Forward, _forward, x, k, None, *ctx.geometry,
                                tuple(grad.shape[2:])) if needs[0] else None
        dx = _differentiably(_BackwardInput, _backward_input, grad, k, tuple(x.shape), is_channels_last(x),
                             *ctx.geometry) if needs[1] else None
        return dgrad, dx, None, None, None, None

    @staticmethod
    def jvp(ctx, tgrad, tx, *_):
        grad, x = ctx.saved_tensors
        args = (ctx.weight_size, *ctx.geometry)
        return _sum(None if tgrad is None else _differentiably(_BackwardWeight, _backward_weight, tgrad, x, *args),
                    None if tx is None else _differentiably(_BackwardWeight, _backward_weight, grad, tx, *args))

    @staticmethod
    def vmap(info, in_dims, grad, x, weight_size, stride, padding, dilation):
        n = info.batch_size
        dw = _BackwardWeight.apply(fold_vmapped(grad, in_dims[0], n), fold_vmapped(x, in_dims[1], n),
                                   (n * weight_size[0], *weight_size[1:]), stride, padding, dilation)
        return dw.reshape(n, *weight_size), 0


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py). Their autograd formulas
# are the table above, written with the ops themselves.
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


def _forward_op(x, weight, stride, padding, dilation):
    """F without bias, by the weight's kind."""
    if weight.dim() == 6:
        return involution_op(x, weight, stride, padding, dilation)
    return dynamic_dwconv2d_op(x, weight, None, stride, padding, dilation)


def _save_operands(ctx, inputs, output):
    """Every op's two tensor operands and its geometry (the last three arguments)."""
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.has_bias = len(inputs) == 6 and inputs[2] is not None
    ctx.geometry = tuple(inputs[-3:])


def _forward_op_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx = backward_input_op(grad, weight, list(x.shape), is_channels_last(x), *ctx.geometry) if needs[0] else None
    dw = backward_weight_op(grad, x, list(weight.shape), *ctx.geometry) if needs[1] else None
    if ctx.has_bias:
        return dx, dw, grad.sum(dim=(2, 3)) if needs[2] else None, None, None, None
    return dx, dw, *[None] * (len(needs) - 2)


def _backward_input_op_backward(ctx, h):
    grad, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dgrad = _forward_op(h, weight, *ctx.geometry) if needs[0] else None
    dweight = backward_weight_op(grad, h, list(weight.shape), *ctx.geometry) if needs[1] else None
    return dgrad, dweight, None, None, None, None, None


def _backward_weight_op_backward(ctx, k):
    grad, x = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dgrad = _forward_op(x, k, *ctx.geometry) if needs[0] else None
    dx = backward_input_op(grad, k, list(x.shape), is_channels_last(x), *ctx.geometry) if needs[1] else None
    return dgrad, dx, None, None, None, None


for _name, _backward in (("involution", _forward_op_backward), ("dynamic_dwconv2d", _forward_op_backward),
                         ("involution_backward_input", _backward_input_op_backward),
                         ("involution_backward_weight", _backward_weight_op_backward)):
    torch.library.register_autograd(f"dynconv::{_name}", _backward, setup_context=_save_operands)


_AS_OP = {
    _Forward: lambda x, weight, bias, stride, padding, dilation, out: (
        involution_op(x, weight, stride, padding, dilation) if weight.dim() == 6
        else dynamic_dwconv2d_op(x, weight, bias, stride, padding, dilation)),
    _BackwardInput: backward_input_op,
    _BackwardWeight: backward_weight_op,
}


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher
# ---------------------------------------------------------------------------------------------

_apply = _eager.applier(_Forward)


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
    """Involution / per-pixel dynamic depth-wise conv (docs/operators.md §1a).

    ``y[b,c,i,j] = Σ_{u,v} weight[b, c // (C/G), u, v, i, j] · x[b, c, i·s-p+u·d, j·s-p+v·d]``

    Args:
        x: ``(B, C, H, W)``, NCHW or channels_last; the output keeps its memory format.
        weight: ``(B, G, K, K, Ho, Wo)`` with ``C % G == 0``; G = C is the inhomogeneous
            dynamic depth-wise conv, G = heads with softmaxed scores is local-attention aggregation.
        stride, padding, dilation: ints or (h, w) pairs; ``padding=None`` is ``d·(K-1)//2``.
    """
    check_tensor(x, "x", 4, "(B, C, H, W)")
    check_tensor(weight, "weight", 6, "(B, G, K, K, Ho, Wo)")
    padding = _default_padding(padding, dilation, weight.shape)
    x, weight = autocast_inputs(x, weight)
    pairs = _pairs(stride, padding, dilation)
    if _eager.eager(x, weight):
        return _call(x, weight, None, pairs, per_pixel=True)
    if _eager.needs_function(x, weight):
        return _Forward.apply(x, weight, None, *_check(x, weight, None, *pairs, per_pixel=True))
    _eager.refuse_tangents("involution", x, weight)
    return involution_op(x, weight, *map(list, pairs))


def dynamic_dwconv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=None,
                     dilation=1) -> Tensor:
    """Per-sample dynamic depth-wise conv (docs/operators.md §1b), without materialising per-pixel weights.

    ``y[b,c,i,j] = bias[b,c] + Σ_{u,v} weight[b, c // (C/G), u, v] · x[b, c, i·s-p+u·d, j·s-p+v·d]``

    Args:
        x: ``(B, C, H, W)``; weight: ``(B, G, K, K)`` with ``C % G == 0``; bias: ``(B, C)`` or None.
    """
    check_tensor(x, "x", 4, "(B, C, H, W)")
    check_tensor(weight, "weight", 4, "(B, G, K, K)")
    if bias is not None:
        check_tensor(bias, "bias", 2, "(B, C)")
    padding = _default_padding(padding, dilation, weight.shape)
    x, weight, bias = autocast_inputs(x, weight, bias)
    pairs = _pairs(stride, padding, dilation)
    if _eager.eager(x, weight, bias):
        return _call(x, weight, bias, pairs, per_pixel=False)
    if _eager.needs_function(x, weight, bias):
        return _Forward.apply(x, weight, bias, *_check(x, weight, bias, *pairs, per_pixel=False))
    _eager.refuse_tangents("dynamic_dwconv2d", x, weight, bias)
    return dynamic_dwconv2d_op(x, weight, bias, *map(list, pairs))


def _pairs(stride, padding, dilation):
    return as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
