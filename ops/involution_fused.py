"""torch ops for the fused involution: ``dynconv.involution_fused``.

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
dispatcher (``ops/_eager.py``); so do torch.func transforms, which need the Functions' jvp and vmap
rules. Every derivative of the four maps (forward and three backward) is again one of the four, so
gradients are differentiable to any order, on both paths, without materialising the weights.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dynconv.kernels import involution_fused as kernels
from dynconv.kernels._launch import runs_kernels

from . import _eager
from ._eager import fold_vmapped, unfold_vmapped
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
# The family's four maps. Every path runs these bodies: the custom ops, the eager
# autograd.Functions, and the derivatives of both. Each output is a sum of products with one
# factor from each of some inputs, so an empty factor gives a zero result, written without a
# launch; meta tensors need only their shapes.
# ---------------------------------------------------------------------------------------------

def _done_without_kernel(out: Tensor, *factors: Tensor) -> bool:
    """Whether ``out`` is complete without a kernel: a meta tensor needs only its shape, an empty one
    nothing, and an empty factor makes it zero."""
    if out.is_meta or out.numel() == 0:
        return True
    for t in factors:
        if t.numel() == 0:
            out.zero_()
            return True
    return False


def _groups(span_weight: Tensor, kernel_size: int) -> int:
    return span_weight.shape[0] // (kernel_size * kernel_size)


def _forward(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation):
    """y = F(x, W) with W = span_weight·z + span_bias: the involution of x by the generated weights."""
    B, C, _, _ = x.shape
    _, _, Ho, Wo = z.shape
    y = _empty(x, (B, C, Ho, Wo), memory_format_of(x))
    if _done_without_kernel(y, x):
        return y
    if runs_kernels(x):
        kernels.involution_fused_forward(x, z, span_weight, span_bias, y, kernel_size, stride, padding, dilation)
    else:
        y.copy_(reference.involution_fused_reference(x, z, span_weight, span_bias, kernel_size,
                                                     _groups(span_weight, kernel_size), stride, padding, dilation))
    return y


def _backward_input(grad, z, span_weight, span_bias, kernel_size, x_size, channels_last, stride, padding, dilation):
    """dx = F_xᵀ(grad, W): the adjoint of F in x."""
    dx = _empty(grad, x_size, _format(channels_last))
    if _done_without_kernel(dx, grad):
        return dx
    if runs_kernels(grad):
        kernels.involution_fused_backward_input(grad, z, span_weight, span_bias, dx, kernel_size,
                                                stride, padding, dilation)
    else:
        dx.copy_(reference.fused_backward_input(grad, z, span_weight, span_bias, kernel_size, tuple(x_size[2:]),
                                                stride, padding, dilation))
    return dx


def _backward_z(grad, x, span_weight, kernel_size, z_channels_last, stride, padding, dilation):
    """dz = span_weightᵀ·dW(grad, x), dW being the per-pixel weights' gradient (never stored)."""
    dz = _empty(x, (x.shape[0], span_weight.shape[1], *grad.shape[2:]), _format(z_channels_last))
    if _done_without_kernel(dz, grad, x):
        return dz
    if runs_kernels(x):
        kernels.involution_fused_backward_z(grad, x, span_weight, dz, kernel_size, stride, padding, dilation)
    else:
        dz.copy_(reference.fused_backward_z(grad, x, span_weight, kernel_size, stride, padding, dilation))
    return dz


def _backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation):
    """(d span_weight (K²G, R), d span_bias (K²G,)) = Σ dW(grad, x)·(z, 1) over every sample and pixel,
    deterministic."""
    rows = kernel_size * kernel_size * groups
    dspan = torch.empty((rows, z.shape[1]), dtype=x.dtype, device=x.device)
    dbias = torch.empty((rows,), dtype=x.dtype, device=x.device)
    if _done_without_kernel(dspan, grad, x):  # dspan has K²G·R > 0 elements, as dbias has K²G
        return dspan, dbias.zero_()
    if runs_kernels(x):
        kernels.involution_fused_backward_span(grad, x, z, dspan, dbias, kernel_size, stride, padding, dilation)
    else:
        ref_span, ref_bias = reference.fused_backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation)
        dspan.copy_(ref_span)
        dbias.copy_(ref_bias)
    return dspan, dbias


class _Maps(NamedTuple):
    """One implementation of the four maps (bodies, autograd.Functions or custom ops), each called
    with its custom op's signature."""
    forward: Callable
    backward_input: Callable
    backward_z: Callable
    backward_span: Callable


_BODIES = _Maps(_forward, _backward_input, _backward_z, _backward_span)


# ---------------------------------------------------------------------------------------------
# Derivatives of the four maps, in terms of the four maps. With L(g, x, W) = ⟨g, F(x, W)⟩ and
# W = span_weight·z + span_bias, every map is a partial derivative of L: linear in g and in x, and
# in z and (span_weight, span_bias) through W. A map's vector-Jacobian product puts the incoming
# gradient in the place of the argument the map eliminated; its Jacobian-vector product is one call
# per tangent. ``needs`` says which input gradients are wanted; ``rest`` is (stride, padding, dilation).
# ---------------------------------------------------------------------------------------------

def _forward_vjp(maps, needs, grad, x, z, span_weight, span_bias, kernel_size, *rest):
    dx = dz = dspan = dbias = None
    if grad is None:
        return dx, dz, dspan, dbias
    if needs[0]:
        dx = maps.backward_input(grad, z, span_weight, span_bias, kernel_size, x.shape, is_channels_last(x), *rest)
    if needs[1]:
        dz = maps.backward_z(grad, x, span_weight, kernel_size, is_channels_last(z), *rest)
    if needs[2] or needs[3]:
        dspan, dbias = maps.backward_span(grad, x, z, kernel_size, _groups(span_weight, kernel_size), *rest)
    return dx, dz, (dspan if needs[2] else None), (dbias if needs[3] and span_bias is not None else None)


def _backward_input_vjp(maps, needs, h, grad, z, span_weight, span_bias, kernel_size, *rest):
    """⟨h, F_xᵀ(grad, W)⟩ = L(grad, h, W): h takes x's place."""
    dgrad = dz = dspan = dbias = None
    if h is None:
        return dgrad, dz, dspan, dbias
    if needs[0]:
        dgrad = maps.forward(h, z, span_weight, span_bias, kernel_size, *rest)
    if needs[1]:
        dz = maps.backward_z(grad, h, span_weight, kernel_size, is_channels_last(z), *rest)
    if needs[2] or needs[3]:
        dspan, dbias = maps.backward_span(grad, h, z, kernel_size, _groups(span_weight, kernel_size), *rest)
    return dgrad, dz, (dspan if needs[2] else None), (dbias if needs[3] and span_bias is not None else None)


def _backward_z_vjp(maps, needs, k, grad, x, span_weight, kernel_size, *rest):
    """⟨k, span_weightᵀ·dW(grad, x)⟩ = L(grad, x, span_weight·k): k takes z's place, without the bias."""
    dgrad = dx = dspan = None
    if k is None:
        return dgrad, dx, dspan
    if needs[0]:
        dgrad = maps.forward(x, k, span_weight, None, kernel_size, *rest)
    if needs[1]:
        dx = maps.backward_input(grad, k, span_weight, None, kernel_size, x.shape, is_channels_last(x), *rest)
    if needs[2]:
        dspan = maps.backward_span(grad, x, k, kernel_size, _groups(span_weight, kernel_size), *rest)[0]
    return dgrad, dx, dspan


def _backward_span_vjp(maps, needs, p, q, grad, x, z, kernel_size, groups, *rest):
    """⟨p, Σ dW·zᵀ⟩ + ⟨q, Σ dW⟩ = L(grad, x, p·z + q): (p, q) take the span conv's place."""
    if p is None and q is None:
        return None, None, None
    if p is None:
        p = torch.zeros((kernel_size * kernel_size * groups, z.shape[1]), dtype=x.dtype, device=x.device)
    dgrad = dx = dz = None
    if needs[0]:
        dgrad = maps.forward(x, z, p, q, kernel_size, *rest)
    if needs[1]:
        dx = maps.backward_input(grad, z, p, q, kernel_size, x.shape, is_channels_last(x), *rest)
    if needs[2]:
        dz = maps.backward_z(grad, x, p, kernel_size, is_channels_last(z), *rest)
    return dgrad, dx, dz


def _span_map_jvp(f, lead, z, span_weight, span_bias, t_lead, t_z, t_span_weight, t_span_bias, static):
    """Tangent of ``f(lead, z, span_weight, span_bias, *static)`` (the forward or backward_input):
    linear in lead, in z (whose term has no bias) and in (span_weight, span_bias) together."""
    terms = []
    if t_lead is not None:
        terms.append(f(t_lead, z, span_weight, span_bias, *static))
    if t_z is not None:
        terms.append(f(lead, t_z, span_weight, None, *static))
    if t_span_weight is not None or t_span_bias is not None:
        t_span_weight = torch.zeros_like(span_weight) if t_span_weight is None else t_span_weight
        terms.append(f(lead, z, t_span_weight, t_span_bias, *static))
    return _total(terms) if terms else f(torch.zeros_like(lead), z, span_weight, span_bias, *static)


def _backward_z_jvp(f, primals, tangents, static):
    """Tangent of ``f(grad, x, span_weight, *static)``, linear in each: one call per tangent."""
    terms = [f(*primals[:i], t, *primals[i + 1:], *static) for i, t in enumerate(tangents) if t is not None]
    return _total(terms) if terms else f(torch.zeros_like(primals[0]), *primals[1:], *static)


def _backward_span_jvp(f, grad, x, z, t_grad, t_x, t_z, static):
    """Tangent of ``(Σ dW(grad, x)·zᵀ, Σ dW(grad, x))``: linear in grad and in x; z moves only the first."""
    terms = []
    if t_grad is not None:
        terms.append(f(t_grad, x, z, *static))
    if t_x is not None:
        terms.append(f(grad, t_x, z, *static))
    if t_z is not None:
        t_span_weight, t_span_bias = f(grad, x, t_z, *static)
        terms.append((t_span_weight, torch.zeros_like(t_span_bias)))
    return _total(terms) if terms else f(torch.zeros_like(grad), x, z, *static)


def _total(terms):
    total = terms[0]
    for term in terms[1:]:
        total = tuple(a + b for a, b in zip(total, term)) if isinstance(total, tuple) else total + term
    return total


# ---------------------------------------------------------------------------------------------
# vmap rules: a vmapped dimension folds into the batch dimension of the per-sample tensors.
# Maps that sum over the batch (backward_span), or whose span weight is vmapped, run per slice,
# as does a vmap over nothing.
# ---------------------------------------------------------------------------------------------

def _per_slice(apply, n: int, in_dims, args):
    """``apply`` on each of the ``n`` slices, stacked. ``in_dims`` holds None for every unbatched
    argument (a tuple of Nones for a tuple argument). With no slice (a Jacobian of an empty output),
    one slice of zeros gives the shapes."""
    def slice_(i):
        for a, d in zip(args, in_dims):
            if not isinstance(a, Tensor) or d is None:
                yield a
            else:
                yield a.select(d, i) if n else a.new_zeros(a.shape[:d] + a.shape[d + 1:])
    results = [apply(*slice_(i)) for i in range(max(n, 1))]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r)[:n] for r in zip(*results))
    return torch.stack(results)[:n]


# ---------------------------------------------------------------------------------------------
# autograd.Functions: the eager path (no dispatcher) and torch.func. Their derivatives call these
# Functions again, so every order is differentiable; a backward that records nothing calls the
# bodies directly.
# ---------------------------------------------------------------------------------------------

def _saving(n_tensors: int, function: bool):
    """A setup_context that saves the first ``n_tensors`` inputs and keeps the rest as ``ctx.static``.
    A Function's missing gradients and tangents stay None: a zero one would cost a launch."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        if function:
            ctx.save_for_forward(*inputs[:n_tensors])
            ctx.set_materialize_grads(False)
        ctx.static = inputs[n_tensors:]
    return setup_context


def _maps_for_backward() -> _Maps:
    if (torch.is_grad_enabled() or torch.autograd.forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active()):
        return _FUNCTIONS
    return _BODIES


class _Forward(torch.autograd.Function):
    forward = staticmethod(_forward)
    setup_context = staticmethod(_saving(4, True))

    @staticmethod
    def backward(ctx, grad):
        return (*_forward_vjp(_maps_for_backward(), ctx.needs_input_grad, grad, *ctx.saved_tensors, *ctx.static),
                None, None, None, None)

    @staticmethod
    def jvp(ctx, t_x, t_z, t_span_weight, t_span_bias, *_):
        return _span_map_jvp(_Forward.apply, *ctx.saved_tensors, t_x, t_z, t_span_weight, t_span_bias, ctx.static)

    @staticmethod
    def vmap(info, in_dims, x, z, span_weight, span_bias, *static):
        n = info.batch_size
        if n == 0 or in_dims[2] is not None or in_dims[3] is not None:
            return _per_slice(_Forward.apply, n, in_dims, (x, z, span_weight, span_bias, *static)), 0
        return unfold_vmapped(_Forward.apply(fold_vmapped(x, in_dims[0], n), fold_vmapped(z, in_dims[1], n),
                                             span_weight, span_bias, *static), n), 0


class _BackwardInput(torch.autograd.Function):
    forward = staticmethod(_backward_input)
    setup_context = staticmethod(_saving(4, True))

    @staticmethod
    def backward(ctx, h):
        K, _, _, *rest = ctx.static
        return (*_backward_input_vjp(_maps_for_backward(), ctx.needs_input_grad, h, *ctx.saved_tensors, K, *rest),
                *(None,) * 6)

    @staticmethod
    def jvp(ctx, t_grad, t_z, t_span_weight, t_span_bias, *_):
        return _span_map_jvp(_BackwardInput.apply, *ctx.saved_tensors, t_grad, t_z, t_span_weight, t_span_bias,
                             ctx.static)

    @staticmethod
    def vmap(info, in_dims, grad, z, span_weight, span_bias, K, x_size, channels_last, *rest):
        n = info.batch_size
        args = (grad, z, span_weight, span_bias, K, x_size, channels_last, *rest)
        if n == 0 or in_dims[2] is not None or in_dims[3] is not None:
            return _per_slice(_BackwardInput.apply, n, in_dims, args), 0
        x_size = (n * x_size[0], *x_size[1:])
        return unfold_vmapped(_BackwardInput.apply(fold_vmapped(grad, in_dims[0], n), fold_vmapped(z, in_dims[1], n),
                                                   span_weight, span_bias, K, x_size, channels_last, *rest), n), 0


class _BackwardZ(torch.autograd.Function):
    forward = staticmethod(_backward_z)
    setup_context = staticmethod(_saving(3, True))

    @staticmethod
    def backward(ctx, k):
        K, _, *rest = ctx.static
        return (*_backward_z_vjp(_maps_for_backward(), ctx.needs_input_grad, k, *ctx.saved_tensors, K, *rest),
                *(None,) * 5)

    @staticmethod
    def jvp(ctx, t_grad, t_x, t_span_weight, *_):
        return _backward_z_jvp(_BackwardZ.apply, ctx.saved_tensors, (t_grad, t_x, t_span_weight), ctx.static)

    @staticmethod
    def vmap(info, in_dims, grad, x, span_weight, *static):
        n = info.batch_size
        if n == 0 or in_dims[2] is not None:
            return _per_slice(_BackwardZ.apply, n, in_dims, (grad, x, span_weight, *static)), 0
        return unfold_vmapped(_BackwardZ.apply(fold_vmapped(grad, in_dims[0], n), fold_vmapped(x, in_dims[1], n),
                                               span_weight, *static), n), 0


class _BackwardSpan(torch.autograd.Function):
    forward = staticmethod(_backward_span)
    setup_context = staticmethod(_saving(3, True))

    @staticmethod
    def backward(ctx, p, q):
        return (*_backward_span_vjp(_maps_for_backward(), ctx.needs_input_grad, p, q, *ctx.saved_tensors,
                                    *ctx.static), *(None,) * 5)

    @staticmethod
    def jvp(ctx, t_grad, t_x, t_z, *_):
        return _backward_span_jvp(_BackwardSpan.apply, *ctx.saved_tensors, t_grad, t_x, t_z, ctx.static)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_slice(_BackwardSpan.apply, info.batch_size, in_dims, args), (0, 0)


_FUNCTIONS = _Maps(_Forward.apply, _BackwardInput.apply, _BackwardZ.apply, _BackwardSpan.apply)
_apply = _eager.applier(_Forward)


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py). Their derivatives are the
# custom ops again, so a compiled graph is differentiable to every order too.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::involution_fused", mutates_args=())
def involution_fused_op(x: Tensor, z: Tensor, span_weight: Tensor, span_bias: Tensor | None, kernel_size: int,
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    _, stride, padding, dilation, _ = _check(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation)
    return _forward(x, z, span_weight, span_bias, kernel_size, stride, padding, dilation)


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


_CUSTOM_OPS = _Maps(involution_fused_op, backward_input_op, backward_z_op, backward_span_op)


def _op_forward_backward(ctx, grad):
    return (*_forward_vjp(_CUSTOM_OPS, ctx.needs_input_grad, grad, *ctx.saved_tensors, *ctx.static),
            None, None, None, None)


def _op_backward_input_backward(ctx, h):
    K, _, _, *rest = ctx.static
    return (*_backward_input_vjp(_CUSTOM_OPS, ctx.needs_input_grad, h, *ctx.saved_tensors, K, *rest), *(None,) * 6)


def _op_backward_z_backward(ctx, k):
    K, _, *rest = ctx.static
    return (*_backward_z_vjp(_CUSTOM_OPS, ctx.needs_input_grad, k, *ctx.saved_tensors, K, *rest), *(None,) * 5)


def _op_backward_span_backward(ctx, p, q):
    return (*_backward_span_vjp(_CUSTOM_OPS, ctx.needs_input_grad, p, q, *ctx.saved_tensors, *ctx.static),
            *(None,) * 5)


involution_fused_op.register_autograd(_op_forward_backward, setup_context=_saving(4, False))
backward_input_op.register_autograd(_op_backward_input_backward, setup_context=_saving(4, False))
backward_z_op.register_autograd(_op_backward_z_backward, setup_context=_saving(3, False))
backward_span_op.register_autograd(_op_backward_span_backward, setup_context=_saving(3, False))


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
        if _under_torch_func():
            _, *pairs, _ = _check(*tensors, K, *pairs)
            return _Forward.apply(*tensors, K, *pairs)
        return involution_fused_op(*tensors, K, *map(list, pairs))
    _check_tensors(*tensors)
    _, stride, padding, dilation, _ = _cached_geometry(x.shape, z.shape, span_weight.shape,
                                                       None if span_bias is None else span_bias.shape, K, *pairs)
    if _eager.records_grad(*tensors):
        return _apply(*tensors, K, stride, padding, dilation)
    return _forward(*tensors, K, stride, padding, dilation)


def _under_torch_func() -> bool:
    """torch.func transforms need the autograd.Functions' setup_context, jvp and vmap rules, which
    custom ops lack; tracing, compiling and dispatch modes still see the ops."""
    return (torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack())
