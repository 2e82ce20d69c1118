"""torch ops for SPEC.md §2: ``dynconv.expert_conv2d`` (CondConv, DynamicConv, ODConv, DRConv).

Registered with torch.library as ``torch.ops.dynconv.expert_conv2d`` (forward),
``expert_conv2d_backward_input`` (∂x) and ``expert_conv2d_backward_weight`` (∂experts, ∂routing,
∂bias, ∂spatial, ∂guide). Each has a fake implementation, so ``torch.compile(fullgraph=True)``
traces through it, and the forward has an autograd formula built from the backward ops.
CUDA tensors run the Triton kernels; CPU tensors run the batch-as-groups conv of
``reference_expert`` (its backward from ``torch.nn.grad``), or the Triton kernels through the interpreter
when TRITON_INTERPRET=1 was set before import.

Inside the ops ``routing`` is always ``(B, m, E)``; the public function views ``(B, E)`` as m = 1.
Plain eager calls of the public function run the same bodies through an autograd.Function,
without the dispatcher (``ops/_eager.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dynconv.kernels import expert_conv as kernels
from dynconv.kernels._launch import kernels_are_interpreted

from . import _eager
from . import reference_expert as reference
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Checks: every bad input is named before a kernel runs.
# ---------------------------------------------------------------------------------------------

def _check_routing_rank(routing) -> None:
    if not isinstance(routing, Tensor):
        raise TypeError(f"routing must be a torch.Tensor, got {type(routing).__name__}")
    if routing.dim() not in (2, 3):
        raise ValueError(f"routing must be 2-D (B, E) or 3-D (B, m, E), got shape {tuple(routing.shape)}")


def _check(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups):
    """Validates the op's arguments (routing already (B, m, E)); returns the geometry and (Ho, Wo)."""
    _check_tensors(x, experts, routing, bias, spatial, guide, groups)
    return _geometry(x.shape, experts.shape, routing.shape, _shape(bias), _shape(spatial), _shape(guide),
                     stride, padding, dilation, groups)


def _shape(t):
    return None if t is None else t.shape


def _check_tensors(x, experts, routing, bias, spatial, guide, groups):
    check_tensor(x, "x", 4, "(B, Cin, H, W)")
    check_tensor(experts, "experts", 5, "(E, Cout, Cin/groups, kh, kw)")
    _check_routing_rank(routing)
    if bias is not None:
        check_tensor(bias, "bias", 2, "(E, Cout)")
    if spatial is not None:
        check_tensor(spatial, "spatial", 3, "(B, kh, kw)")
    if guide is not None:
        check_tensor(guide, "guide", 4, "(B, m, Ho, Wo)")
    check_dtypes_and_devices(x=x, experts=experts, routing=routing, bias=bias, spatial=spatial, guide=guide)
    if not isinstance(groups, (int, torch.SymInt)) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")


def _geometry(x_shape, experts_shape, routing_shape, bias_shape, spatial_shape, guide_shape, stride, padding,
              dilation, groups):
    """The checks that need only shapes (ranks already checked); (stride, padding, dilation, out)."""
    B, Cin, H, W = x_shape
    E, Cout, cin_g, kh, kw = experts_shape
    if E < 1 or Cout < 1 or kh < 1 or kw < 1:
        raise ValueError(f"experts must have at least one expert, output channel and tap, got shape {tuple(experts_shape)}")
    if groups < 1 or Cin % groups != 0 or Cout % groups != 0:
        raise ValueError(f"input channels Cin={Cin} and output channels Cout={Cout} must be divisible by groups={groups}")
    if cin_g * groups != Cin:
        raise ValueError(f"experts hold {cin_g} input channels per group, but x has Cin={Cin} channels "
                         f"in {groups} groups (expected {Cin // groups})")
    m = routing_shape[1]
    if routing_shape[0] != B:
        raise ValueError(f"batch mismatch: x has {B} samples, routing has {routing_shape[0]}")
    if routing_shape[2] != E:
        raise ValueError(f"routing weighs {routing_shape[2]} experts, but there are E={E} experts")
    if bias_shape is not None and tuple(bias_shape) != (E, Cout):
        raise ValueError(f"bias must have shape (E, Cout) = {(E, Cout)}, got {tuple(bias_shape)}")
    if spatial_shape is not None and tuple(spatial_shape) != (B, kh, kw):
        raise ValueError(f"spatial must have shape (B, kh, kw) = {(B, kh, kw)}, got {tuple(spatial_shape)}")
    stride, padding, dilation = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    out = output_hw((H, W), (kh, kw), stride, padding, dilation)
    if guide_shape is None:
        if m != 1:
            raise ValueError(f"routing has m={m} regions but no guide was given; "
                             "regions need guide logits (B, m, Ho, Wo)")
    else:
        if guide_shape[0] != B:
            raise ValueError(f"batch mismatch: x has {B} samples, guide has {guide_shape[0]}")
        if guide_shape[1] != m:
            raise ValueError(f"region count mismatch: guide has m={guide_shape[1]} regions, routing has m={m}")
        if tuple(guide_shape[2:]) != out:
            raise ValueError(f"guide's spatial size {tuple(guide_shape[2:])} must equal the output size {out}")
    return stride, padding, dilation, out


# Eager calls repeat a few problems over and over. Fake tensors' symbolic sizes are unhashable,
# so the ops' own checks (torch.compile's path) stay uncached.
_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry)


def _empty(like: Tensor, shape, fmt: torch.memory_format) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=fmt)


def _mixed_bias(routing, bias):
    return torch.matmul(routing, bias) if bias is not None else None


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies: the custom ops and the eager autograd.Function both run these.
# ---------------------------------------------------------------------------------------------

def _forward(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, out):
    y = _empty(x, (x.shape[0], experts.shape[1], *out), memory_format_of(x))
    if _use_triton(x):
        kernels.expert_conv_forward(x, experts, routing, spatial, _mixed_bias(routing, bias), guide, y, groups,
                                    stride, padding, dilation)
    else:
        y.copy_(reference.expert_conv2d_grouped(x, experts, routing, bias, stride, padding, dilation, groups,
                                                spatial=spatial, guide=guide))
    return y


# The CPU path of the backward ops: the same quantities as the kernels, from the batch-as-groups
# conv's own backward (torch.nn.grad), computed in the accumulation dtype.

def _region_masked_grad(grad, guide, m, groups):
    """∂y split by region, (B, m, Cout, Ho, Wo) → the grouped conv's (1, B·groups·m·Cout/g, Ho, Wo)."""
    if m == 1:
        masked = grad[:, None]
    else:
        one_hot = torch.nn.functional.one_hot(guide.argmax(dim=1), m).permute(0, 3, 1, 2).to(grad.dtype)
        masked = grad[:, None] * one_hot[:, :, None]
    return reference.as_grouped_output(masked, grad.shape[0], m, groups), masked


def _cpu_backward_input(grad, experts, routing, spatial, guide, x_size, stride, padding, dilation, groups):
    acc = _acc_dtype(grad.dtype)
    B, m = routing.shape[:2]
    weight, _ = reference.mix_kernels(experts.to(acc), routing.to(acc), None,
                                      spatial.to(acc) if spatial is not None else None)
    grouped_grad, _ = _region_masked_grad(grad.to(acc), guide, m, groups)
    dx = torch.nn.grad.conv2d_input((1, B * x_size[1], *x_size[2:]), reference.as_grouped_weight(weight, groups),
                                    grouped_grad, stride, padding, dilation, B * groups)
    return dx.reshape(tuple(x_size))


def _cpu_backward_kernel(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation):
    acc = _acc_dtype(x.dtype)
    B, Cin, H, W = x.shape
    Cout = grad.shape[1]
    grouped_grad, masked = _region_masked_grad(grad.to(acc), guide, m, groups)
    weight_size = (B * groups * m * (Cout // groups), Cin // groups, *kernel_hw)
    dW = torch.nn.grad.conv2d_weight(x.to(acc).reshape(1, B * Cin, H, W), weight_size, grouped_grad,
                                     stride, padding, dilation, B * groups)
    dW = dW.reshape(B, groups, m, Cout // groups, *weight_size[1:]).transpose(1, 2).reshape(B, m, Cout, *weight_size[1:])
    return dW, masked.sum(dim=(3, 4))


def _guide_scores(x, experts, routing, bias, spatial, grad, groups, stride, padding, dilation):
    """∂S[b, r, i, j] = Σ_o ∂y[b, o, i, j] · y_r[b, o, i, j] in the accumulation dtype."""
    if _use_triton(x):
        return kernels.expert_conv_guide_scores(x, experts, routing, spatial, _mixed_bias(routing, bias), grad,
                                                groups, stride, padding, dilation)
    acc = _acc_dtype(x.dtype)
    cast = (lambda t: t.to(acc) if t is not None else None)
    y_all = reference.all_region_outputs(cast(x), cast(experts), cast(routing), cast(bias), stride, padding,
                                         dilation, groups, spatial=cast(spatial))
    return (grad.to(acc)[:, None] * y_all).sum(dim=2)


def _backward_input(grad, experts, routing, spatial, guide, x_size, channels_last, stride, padding, dilation, groups):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = _empty(grad, x_size, fmt)
    if _use_triton(grad):
        kernels.expert_conv_backward_input(grad, experts, routing, spatial, guide, dx, groups, stride, padding,
                                           dilation)
    else:
        dx.copy_(_cpu_backward_input(grad, experts, routing, spatial, guide, x_size, stride, padding, dilation,
                                     groups))
    return dx


def _backward_weight(grad, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, need_guide):
    """(∂experts, ∂routing, ∂bias, ∂spatial, ∂guide); an absent or unwanted one is an empty tensor.

    The per-(sample, region) kernel gradient ``dW (B, m, Cout, Cin/g, kh, kw)`` (fp32; with a
    spatial attention also the pre-spatial mixed kernels, same size) is the memory this costs;
    from it a few small GEMMs give the expert, routing and spatial gradients.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    need_guide = need_guide and guide is not None
    B, m, E = routing.shape
    _, Cout, cin_g, kh, kw = experts.shape
    acc = _acc_dtype(x.dtype)
    if _use_triton(x):
        dW, dbias_mixed = kernels.expert_conv_backward_kernel(grad, x, guide, m, groups, (kh, kw), stride, padding,
                                                              dilation)
    else:
        dW, dbias_mixed = _cpu_backward_kernel(grad, x, guide, m, groups, (kh, kw), stride, padding, dilation)
    route = routing.to(acc).reshape(B * m, E)
    flat_experts = experts.to(acc).reshape(E, -1)
    dspatial, dbias, dguide = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # distinct: outputs may not alias
    if spatial is not None:
        mixed = (route @ flat_experts).reshape(dW.shape)  # W[b, r] before the spatial attention
        dspatial = (dW * mixed).sum(dim=(1, 2, 3)).to(x.dtype)
        dW = dW * spatial.to(acc)[:, None, None, None]
    dW = dW.reshape(B * m, -1)
    dexperts = (route.t() @ dW).reshape(experts.shape)
    drouting = dW @ flat_experts.t()
    if bias is not None:
        dbias_mixed = dbias_mixed.reshape(B * m, Cout)
        drouting = drouting + dbias_mixed @ bias.to(acc).t()
        dbias = (route.t() @ dbias_mixed).to(x.dtype)
    if need_guide:
        if m == 1:
            dguide = torch.zeros_like(guide)  # a softmax over one region is constant
        else:
            dS = _guide_scores(x, experts, routing, bias, spatial, grad, groups, stride, padding, dilation)
            soft = torch.softmax(guide.to(acc), dim=1)
            dguide = (soft * (dS - (soft * dS).sum(dim=1, keepdim=True))).to(x.dtype)
    return dexperts.to(x.dtype), drouting.reshape(B, m, E).to(x.dtype), dbias, dspatial, dguide


def _save(ctx, x, experts, routing, bias, spatial, guide, geometry):
    ctx.geometry = geometry
    ctx.x_size = tuple(x.shape)
    ctx.channels_last = is_channels_last(x)
    ctx.save_for_backward(x, experts, routing, bias, spatial, guide)


def _grads(ctx, grad, backward_input, backward_weight):
    """(dx, dexperts, drouting, dbias, dspatial, dguide), each None where not needed."""
    x, experts, routing, bias, spatial, guide = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx = dexperts = drouting = dbias = dspatial = dguide = None
    if needs[0]:
        dx = backward_input(grad, experts, routing, spatial, guide, ctx.x_size, ctx.channels_last, *ctx.geometry)
    if any(needs[1:6]):
        grads = backward_weight(grad, x, experts, routing, bias, spatial, guide, *ctx.geometry, bool(needs[5]))
        dexperts, drouting, dbias, dspatial, dguide = (g if (need and present is not None) else None
                                                       for g, need, present in zip(
                                                           grads, needs[1:6], (experts, routing, bias, spatial, guide)))
    return dx, dexperts, drouting, dbias, dspatial, dguide


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::expert_conv2d", mutates_args=())
def expert_conv2d_op(x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
                     guide: Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     groups: int) -> Tensor:
    geometry = _check(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups)
    return _forward(x, experts, routing, bias, spatial, guide, *geometry[:3], groups, geometry[3])


@expert_conv2d_op.register_fake
def _(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups):
    _, _, _, out = _check(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups)
    return _empty(x, (x.shape[0], experts.shape[1], *out), memory_format_of(x))


@torch.library.custom_op("dynconv::expert_conv2d_backward_input", mutates_args=())
def backward_input_op(grad: Tensor, experts: Tensor, routing: Tensor, spatial: Tensor | None, guide: Tensor | None,
                      x_size: Sequence[int], channels_last: bool, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int) -> Tensor:
    return _backward_input(grad, experts, routing, spatial, guide, x_size, channels_last, stride, padding, dilation,
                           groups)


@backward_input_op.register_fake
def _(grad, experts, routing, spatial, guide, x_size, channels_last, stride, padding, dilation, groups):
    return _empty(grad, x_size, torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op("dynconv::expert_conv2d_backward_weight", mutates_args=())
def backward_weight_op(grad: Tensor, x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None,
                       spatial: Tensor | None, guide: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], groups: int, need_guide: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_weight(grad, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups,
                            need_guide)


@backward_weight_op.register_fake
def _(grad, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, need_guide):
    need_guide = need_guide and guide is not None
    return (torch.empty_like(experts, memory_format=torch.contiguous_format),
            torch.empty_like(routing, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else x.new_empty(0),
            torch.empty_like(spatial, memory_format=torch.contiguous_format) if spatial is not None else x.new_empty(0),
            torch.empty_like(guide, memory_format=torch.contiguous_format) if need_guide else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs[:6], tuple(inputs[6:]))


def _backward(ctx, grad):
    return (*_grads(ctx, grad, backward_input_op, backward_weight_op), None, None, None, None)


torch.library.register_autograd("dynconv::expert_conv2d", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher
# ---------------------------------------------------------------------------------------------

class _ExpertConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, out):
        _save(ctx, x, experts, routing, bias, spatial, guide, (stride, padding, dilation, groups))
        return _forward(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, out)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the kernels have no derivative of their own
            return _backward_once(ctx, grad)
        return (*_grads(ctx, grad, _backward_input, _backward_weight), None, None, None, None, None)


_backward_once = once_differentiable(_ExpertConv.backward)
_apply = _eager.applier(_ExpertConv)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def expert_conv2d(x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, *, spatial: Tensor | None = None, guide: Tensor | None = None) -> Tensor:
    """Convolution with per-sample (and per-region) mixtures of K expert kernels (SPEC.md §2).

    ``W[b, r] = spatial[b] ⊙ Σ_e routing[b, r, e] · experts[e]`` and the mixed bias likewise;
    without a guide ``y[b] = conv2d(x[b], W[b, 0], bias[b, 0], stride, padding, dilation, groups)``
    (CondConv, DynamicConv, ODConv). With ``guide`` logits (DRConv) every output pixel uses the
    kernel of its region ``argmax_r guide[b, r, i, j]``; the guide gets the straight-through
    gradient ``S ⊙ (∂S - Σ_r S ⊙ ∂S)``, ``S = softmax(guide)``, ``∂S_r = Σ_o ∂y · y_r``.

    Args:
        x: ``(B, Cin, H, W)``, NCHW or channels_last; the output keeps its memory format.
        experts: ``(E, Cout, Cin/groups, kh, kw)``.
        routing: ``(B, E)`` (one kernel per sample) or ``(B, m, E)`` (one per sample and region,
            needs ``guide``).
        bias: ``(E, Cout)`` expert biases, mixed by the routing, or None.
        stride, padding, dilation: ints or (h, w) pairs, as ``torch.nn.functional.conv2d``.
        spatial: ``(B, kh, kw)`` ODConv spatial attention, multiplies every kernel, or None.
        guide: ``(B, m, Ho, Wo)`` DRConv region logits, or None.

    The forward costs one convolution per output pixel whatever m is; no per-sample Python loop.
    See ``dynconv.kernels.expert_conv`` for what is materialised (at most the size of ``y``).
    """
    x, experts, routing, bias, spatial, guide = autocast_inputs(x, experts, routing, bias, spatial, guide)
    _check_routing_rank(routing)
    if routing.dim() == 2:
        routing = routing.unsqueeze(1)
    pairs = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    tensors = x, experts, routing, bias, spatial, guide
    if not _eager.eager(*tensors):
        return expert_conv2d_op(*tensors, *map(list, pairs), groups)
    _check_tensors(*tensors, groups)
    stride, padding, dilation, out = _cached_geometry(x.shape, experts.shape, routing.shape, _shape(bias),
                                                      _shape(spatial), _shape(guide), *pairs, groups)
    if _eager.records_grad(*tensors):
        return _apply(*tensors, stride, padding, dilation, groups, out)
    return _forward(*tensors, stride, padding, dilation, groups, out)
