"""torch ops for docs/operators.md §2: ``dynconv.expert_conv2d`` (CondConv, DynamicConv, ODConv, DRConv).

Registered with torch.library as ``torch.ops.dynconv.expert_conv2d`` (forward),
``expert_conv2d_backward_input`` (∂x) and ``expert_conv2d_backward_weight`` (∂experts, ∂routing,
∂bias, ∂spatial, ∂guide), with DRConv's region tables built once before the forward by
``expert_conv2d_region_tables`` and passed to the backward ops. Each has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it, and the forward has an autograd formula built
from the backward ops. Higher
derivatives (a create_graph backward) are built from differentiable steps instead:
``expert_conv2d_backward_input``, ``expert_conv2d_backward_kernel`` (per-sample kernel gradient)
and ``expert_conv2d_per_sample`` (the forward with already-mixed kernels), each with an autograd
formula made of the others (see "Differentiable backward passes" below).
CUDA tensors run the Triton kernels; CPU tensors run the batch-as-groups conv of
``reference_expert`` (its backward by the transposed conv and ``aten.convolution_backward``), or the
Triton kernels through the interpreter when TRITON_INTERPRET=1 was set before import.

Inside the ops ``routing`` is always ``(B, m, E)``; the public function views ``(B, E)`` as m = 1.
Plain eager calls of the public function run the same bodies through an autograd.Function,
without the dispatcher (``ops/_eager.py``); so do calls under functorch transforms and forward-mode
AD, for which the Functions carry jvp and vmap rules that custom ops cannot have.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dynconv.kernels import expert_conv as kernels
from dynconv.kernels import expert_conv_guide as guide_kernels
from dynconv.kernels import expert_conv_input_grad as input_grad_kernels
from dynconv.kernels import expert_conv_weight_grad as weight_grad_kernels
from dynconv.kernels import layout, region_conv, region_conv_input_grad
from dynconv.kernels._launch import runs_kernels
from dynconv.kernels.region_tables import RegionTables, packed_size, packed_tables, region_tables, unpacked_tables

from . import _eager
from .layout import channels_last_copy_op
from ._eager import fold_vmapped, unfold_vmapped
from . import reference_expert as reference
from .reference_involution import conv2d_input
from ._checks import (
    as_pair,
    autocast_inputs,
    check_dtypes_and_devices,
    check_tensor,
    is_channels_last,
    memory_format_of,
    output_hw,
)

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


# Inside the bodies ``weights`` are either the shared experts (E, Cout, Cin/g, kh, kw), mixed by
# ``routing`` (B, m, E), or, with ``routing`` None, already-mixed per-sample kernels
# (B, m, Cout, Cin/g, kh, kw) whose ``bias`` is per sample too (B, m, Cout): the derivatives of the
# backward passes convolve with a kernel gradient. Either way Cout, Cin/g, kh, kw are the last four.

def _regions(weights: Tensor, routing: Tensor | None) -> int:
    return weights.shape[1] if routing is None else routing.shape[1]


# DRConv's region tables (kernels/region_tables.py) are built once a training step: before the
# forward (``_forward_tables``), packed into one int32 tensor that the forward saves and its backward
# passes reach as ``regions``; a pass given none (the differentiable steps, the per-sample op) builds
# its own.

def _builds_tables(x: Tensor, weights: Tensor, routing: Tensor | None, guide: Tensor | None) -> bool:
    """Whether a forward's kernels read region tables: a guide of m > 1 regions, and x for the kernels."""
    return (guide is not None and _regions(weights, routing) > 1 and x.numel() > 0 and not x.is_meta
            and runs_kernels(x))


def _forward_tables(x, weights, routing, guide) -> Tensor | None:
    """The packed tables an eager forward builds for itself and its backward, or None."""
    return packed_tables(region_tables(guide)) if _builds_tables(x, weights, routing, guide) else None


def _tables(guide: Tensor | None, m: int, packed: Tensor | None) -> RegionTables | None:
    """The region tables the kernels read for a guide of m > 1 regions, else None: the forward's
    (``packed``) or, without them, built here (one launch)."""
    if guide is None or m <= 1:
        return None
    if packed is None:
        return region_tables(guide)
    B, _, Ho, Wo = guide.shape
    return unpacked_tables(packed, B, Ho * Wo, m)


def _mixed_bias(routing, bias):
    if bias is None or routing is None:
        return bias
    return torch.matmul(routing, bias)


def _fixed(guide):
    """The guide as the convolution sees it: only its argmax, which has no derivative."""
    return guide.detach() if guide is not None else None


def _one_hot_regions(guide: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, m, Ho, Wo) indicator of each pixel's region, argmax as torch.argmax (a NaN logit wins).
    Built contiguous by one comparison: F.one_hot's permuted (B, Ho, Wo, m) made every product with
    it a strided pass (measured: perf_reports/cpu/)."""
    regions = torch.arange(guide.shape[1], device=guide.device).view(-1, 1, 1)
    return (guide.argmax(dim=1, keepdim=True) == regions).to(dtype)


def _selected_bias(mixed_bias: Tensor, guide, y_shape) -> Tensor:
    """The (B, m, Cout) bias of every pixel's region, as (B, Cout, Ho, Wo)."""
    B, Cout, Ho, Wo = y_shape
    if guide is None or mixed_bias.shape[1] == 1:
        return mixed_bias[:, 0, :, None, None].expand(B, Cout, Ho, Wo)
    return torch.einsum("brhw,bro->bohw", _one_hot_regions(guide, mixed_bias.dtype), mixed_bias)


def _region_grad_sums(grad: Tensor, guide, m: int, acc: torch.dtype) -> Tensor:
    """Σ over each region's pixels of ∂y: the (B, m, Cout) gradient of the mixed bias."""
    if m == 1:
        return grad.to(acc).sum(dim=(2, 3))[:, None]
    return torch.einsum("bohw,brhw->bro", grad.to(acc), _one_hot_regions(guide, acc))


# ---------------------------------------------------------------------------------------------
# Forward and backward bodies: the custom ops and the eager autograd.Functions all run these.
# Empty problems are answered here, without a launch.
# ---------------------------------------------------------------------------------------------

def _forward(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out,
             regions: Tensor | None = None):
    """y; ``regions`` the guide's packed tables where the caller built them (``_forward_tables``)."""
    fmt = memory_format_of(x)
    nonempty = x.numel() and weights.shape[-4] and weights.shape[-3] and out[0] * out[1]
    if nonempty and not x.is_meta and not runs_kernels(x):
        # The plain result itself, no copy into an empty (measured: perf_reports/cpu/).
        return reference.expert_conv2d_selected(x, weights, routing, bias, stride, padding, dilation, groups,
                                                spatial=spatial, guide=guide).contiguous(memory_format=fmt)
    y = _empty(x, (x.shape[0], weights.shape[-4], *out), fmt)
    if y.numel() == 0:
        return y
    if x.numel() == 0 or weights.shape[-3] == 0:  # no input channel or pixel: the bias alone
        mixed = _mixed_bias(routing, bias)
        return y.copy_(_selected_bias(mixed, guide, y.shape)) if mixed is not None else y.zero_()
    if y.is_meta:
        return y
    regions = _tables(guide, _regions(weights, routing), regions)
    if regions is not None and routing is not None and region_conv.supported(x, weights, y, routing.shape[1]):
        region_conv.region_forward(x, weights, routing, spatial, _mixed_bias(routing, bias), regions, y, groups,
                                   stride, padding, dilation)
        return y
    kernels.expert_conv_forward(x, weights, routing, spatial, _mixed_bias(routing, bias), regions, y, groups,
                                stride, padding, dilation)
    return y


# The CPU path of the backward ops: the same quantities as the kernels, from the batch-as-groups
# conv's own backward (transposed conv, aten.convolution_backward), in the accumulation dtype. The
# grouped conv's channels are (sample b, group g, region r, channel o of the group): every tensor
# below is built in that order at once, so no (B, m, Cout, Ho, Wo) stack is transposed or copied.

def _region_masked_grad(grad, guide, m, groups):
    """∂y split by region as the grouped conv's output gradient, (B, groups, m, Cout/g, Ho, Wo): one
    product with the regions' indicator (a view of ∂y for one region)."""
    B, Cout, Ho, Wo = grad.shape
    per_group = grad.reshape(B, groups, 1, Cout // groups, Ho, Wo)
    if m == 1:
        return per_group
    return per_group * _one_hot_regions(guide, grad.dtype).view(B, 1, m, 1, Ho, Wo)


def _ungrouped(t, groups):
    """(B, groups, m, Cout/g, ...) in the grouped conv's channel order → (B, m, Cout, ...)."""
    B, _, m, per_group = t.shape[:4]
    return t.transpose(1, 2).reshape(B, m, groups * per_group, *t.shape[4:])


def _cpu_region_outputs(x, weights, routing, bias, spatial, stride, padding, dilation, groups):
    """y_r for every region at every pixel, bias included, as (B, groups, m, Cout/g, Ho, Wo) in the
    accumulation dtype: one batch-as-groups conv over every region's kernel, the mixed biases as
    the conv's own bias (no second pass over the m outputs)."""
    acc = _acc_dtype(x.dtype)
    weight, mixed_bias = reference.mix_kernels(weights.to(acc), _cast(routing, acc), _cast(bias, acc),
                                               _cast(spatial, acc))
    B, m, Cout = weight.shape[:3]
    Cin, H, W = x.shape[1:]
    conv_bias = None
    if mixed_bias is not None:
        conv_bias = mixed_bias.reshape(B, m, groups, Cout // groups).transpose(1, 2).reshape(-1)
    y = torch.nn.functional.conv2d(x.to(acc).reshape(1, B * Cin, H, W), reference.as_grouped_weight(weight, groups),
                                   conv_bias, stride, padding, dilation, B * groups)
    return y.view(B, groups, m, Cout // groups, *y.shape[2:])


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None


def _cpu_backward_input(grad, weights, routing, spatial, guide, x_size, stride, padding, dilation, groups):
    acc = _acc_dtype(grad.dtype)
    B, m = grad.shape[0], _regions(weights, routing)
    weight, _ = reference.mix_kernels(weights.to(acc), _cast(routing, acc), None, _cast(spatial, acc))
    grouped_grad = _region_masked_grad(grad.to(acc), guide, m, groups).reshape(1, -1, *grad.shape[2:])
    dx = conv2d_input(tuple(x_size[2:]), reference.as_grouped_weight(weight, groups), grouped_grad, stride, padding,
                      dilation, B * groups)
    return dx.reshape(tuple(x_size))


def _cpu_backward_kernel(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation):
    acc = _acc_dtype(x.dtype)
    B, Cin, H, W = x.shape
    Cout = grad.shape[1]
    grouped_grad = _region_masked_grad(grad.to(acc), guide, m, groups).reshape(1, -1, *grad.shape[2:])
    weight_size = (B * groups * m * (Cout // groups), Cin // groups, *kernel_hw)
    # The kernel and bias gradients in one pass of the conv's own backward (the bias gradient is
    # the per-channel sum of the masked ∂y: the regions' sums).
    _, dW, dbias = torch.ops.aten.convolution_backward(
        grouped_grad, x.to(acc).reshape(1, B * Cin, H, W), grouped_grad.new_empty(weight_size), [weight_size[0]],
        stride, padding, dilation, False, (0, 0), B * groups, (False, True, True))
    per_group = (B, groups, m, Cout // groups)
    return _ungrouped(dW.view(*per_group, *weight_size[1:]), groups), _ungrouped(dbias.view(per_group), groups)


def _guide_scores(x, weights, routing, bias, spatial, grad, groups, stride, padding, dilation):
    """∂S[b, r, i, j] = Σ_o ∂y[b, o, i, j] · y_r[b, o, i, j] in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    if x.numel() == 0 or grad.numel() == 0 or weights.shape[-3] == 0:  # y_r is the bias alone
        mixed = _mixed_bias(routing, bias)
        if mixed is None:
            return grad.new_zeros((grad.shape[0], _regions(weights, routing), *grad.shape[2:]), dtype=acc)
        return torch.einsum("bohw,bro->brhw", grad.to(acc), mixed.to(acc))
    if runs_kernels(x):
        return guide_kernels.expert_conv_guide_scores(x, weights, routing, spatial, _mixed_bias(routing, bias),
                                                      grad, groups, stride, padding, dilation,
                                                      expert_bias=bias if routing is not None else None)
    y_all = _cpu_region_outputs(x, weights, routing, bias, spatial, stride, padding, dilation, groups)
    B, Cout = grad.shape[:2]
    # In place: y_all is this function's own temporary (m outputs; a product would be a second).
    y_all.mul_(grad.to(acc).reshape(B, groups, 1, Cout // groups, *grad.shape[2:]))
    return y_all.sum(dim=3).sum(dim=1)


def _guide_grad(scores: Tensor, guide: Tensor) -> Tensor:
    """The straight-through estimator S ⊙ (∂S - Σ_r S ⊙ ∂S), S = softmax(guide), in scores' dtype."""
    soft = torch.softmax(guide.to(scores.dtype), dim=1)
    return soft * (scores - (soft * scores).sum(dim=1, keepdim=True))


def _backward_input(grad, weights, routing, spatial, guide, x_size, channels_last, stride, padding, dilation, groups,
                    regions: Tensor | None = None):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not grad.is_meta and not runs_kernels(grad) and grad.numel() and weights.numel() and all(x_size):
        dx = _cpu_backward_input(grad, weights, routing, spatial, guide, x_size, stride, padding, dilation, groups)
        return dx.to(grad.dtype).contiguous(memory_format=fmt)  # the result itself, no copy into an empty
    dx = _empty(grad, x_size, fmt)
    if dx.numel() == 0 or dx.is_meta:
        return dx
    if grad.numel() == 0 or weights.numel() == 0:
        return dx.zero_()
    regions = _tables(guide, _regions(weights, routing), regions)
    if regions is not None and routing is not None and region_conv.backward_input_supported(grad, dx,
                                                                                           routing.shape[1]):
        region_conv_input_grad.region_backward_input(grad, weights, routing, spatial, regions, dx, groups, stride,
                                                     padding, dilation)
        return dx
    input_grad_kernels.expert_conv_backward_input(grad, weights, routing, spatial, regions, dx, groups, stride,
                                                  padding, dilation)
    return dx


def _backward_kernel(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation,
                     regions: RegionTables | None = None):
    """∂W of the per-(sample, region) mixed kernels (B, m, Cout, Cin/g, kh, kw) and ∂ of their mixed
    biases (B, m, Cout), both in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    if grad.numel() == 0 or x.numel() == 0:
        B, Cin = x.shape[:2]
        dW = x.new_zeros((B, m, grad.shape[1], Cin // groups, *kernel_hw), dtype=acc)
        return dW, _region_grad_sums(grad, guide, m, acc)
    if runs_kernels(x):
        if regions is None:
            regions = _tables(guide, m, None)
        return weight_grad_kernels.expert_conv_backward_kernel(grad, x, regions, m, groups, kernel_hw, stride,
                                                               padding, dilation)
    return _cpu_backward_kernel(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation)


def _mix_grads(dW: Tensor, dbias_mixed, weights, routing, bias, spatial):
    """(∂weights, ∂routing, ∂bias, ∂spatial) from the mixed kernels' and biases' gradients by a
    few small GEMMs in dW's dtype; torch ops, so autograd differentiates them. Each is None where
    its tensor is absent (∂routing without routing: per-sample kernels)."""
    acc = dW.dtype
    B, m = dW.shape[:2]
    # Kernels in the order the kernel gradient is stored, Cin/g innermost (kernel_grad_buffer):
    # (..., Cout, kh, kw, Cin/g), so flattening dW is a view, not a copy of the largest tensor here.
    dW = dW.movedim(-3, -1)
    dspatial = dbias = None
    if routing is not None:
        route = routing.to(acc).reshape(B * m, routing.shape[2])  # explicit sizes: B may be 0
        flat_experts = weights.to(acc).movedim(-3, -1).reshape(weights.shape[0], -1)
    if spatial is not None:
        unscaled = (route @ flat_experts).reshape(dW.shape) if routing is not None else weights.to(acc).movedim(-3, -1)
        dspatial = (dW * unscaled).sum(dim=(1, 2, 5))
        dW = dW * spatial.to(acc)[:, None, None, :, :, None]
    if routing is None:
        return dW.movedim(-1, -3), None, dbias_mixed if bias is not None else None, dspatial
    flat = dW.reshape(B * m, math.prod(dW.shape[2:]))
    drouting = flat @ flat_experts.t()
    if bias is not None:
        flat_bias = dbias_mixed.reshape(B * m, dbias_mixed.shape[2])
        drouting = torch.addmm(drouting, flat_bias, bias.to(acc).t())
        dbias = route.t() @ flat_bias
    dweights = (route.t() @ flat).reshape(weights.movedim(-3, -1).shape).movedim(-1, -3)
    return dweights, drouting.reshape(routing.shape), dbias, dspatial


# The per-sample kernel gradient (fp32) the weight side holds at once: a part of the batch at a time
# past this (E1: 151 MB in three parts), so its memory is bounded whatever the batch.
DW_BUFFER_BYTES = 64 * 2**20


def _batch_chunks(B: int, per_sample_bytes: int) -> list[slice]:
    per_chunk = max(1, DW_BUFFER_BYTES // max(per_sample_bytes, 1))
    return [slice(b, min(b + per_chunk, B)) for b in range(0, B, per_chunk)] or [slice(0, 0)]


def _weight_side_grads(backward_kernel, grad, x, guide, weights, routing, bias, spatial, geometry, with_bias=True,
                       regions: RegionTables | None = None):
    """(∂weights, ∂routing, ∂bias, ∂spatial) through the per-(sample, region) kernel gradient, formed a
    part of the batch at a time (``DW_BUFFER_BYTES``) and reduced part by part in a fixed order
    (deterministic). Without routing the kernel gradient is itself the result: one part. ``regions``
    (the guide's tables, where built) go to a ``backward_kernel`` that takes them (``_backward_kernel``)."""
    stride, padding, dilation, groups = geometry
    m = _regions(weights, routing)
    kernel_hw = tuple(weights.shape[-2:])
    B, Cin = x.shape[:2]
    per_sample = m * grad.shape[1] * (Cin // groups) * math.prod(kernel_hw) * _acc_dtype(x.dtype).itemsize
    chunks = _batch_chunks(B, per_sample) if routing is not None else [slice(None)]
    parts = []
    for samples in chunks:
        part_guide = guide[samples] if guide is not None else None
        tables = {"regions": regions.part(samples)} if regions is not None else {}
        dW, dbias_mixed = backward_kernel(grad[samples], x[samples], part_guide, m, groups, kernel_hw, stride,
                                          padding, dilation, **tables)
        parts.append(_mix_grads(dW, dbias_mixed if with_bias else None, weights,
                                routing[samples] if routing is not None else None, bias if with_bias else None,
                                spatial[samples] if spatial is not None else None))
    if len(parts) == 1:
        return parts[0]
    summed = [functools.reduce(torch.add, g) if g[0] is not None else None for g in zip(*parts)]
    per_sample_grads = [torch.cat(g) if g[0] is not None else None for g in zip(*parts)]
    # ∂weights and ∂bias sum over the samples; ∂routing and ∂spatial are per sample.
    return summed[0], per_sample_grads[1], summed[2], per_sample_grads[3]


def _backward_weight(grad, x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, need_guide,
                     regions: Tensor | None = None):
    """(∂weights, ∂routing, ∂bias, ∂spatial, ∂guide); an absent or unwanted one is an empty tensor.

    The per-(sample, region) kernel gradient ``dW (B, m, Cout, Cin/g, kh, kw)`` (fp32; with a
    spatial attention also the pre-spatial mixed kernels, same size) is the memory this costs;
    from it a few small GEMMs give the expert, routing and spatial gradients.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    need_guide = need_guide and guide is not None
    if regions is not None:
        regions = _tables(guide, _regions(weights, routing), regions)
    dweights, drouting, dbias, dspatial = _weight_side_grads(_backward_kernel, grad, x, guide, weights, routing, bias,
                                                             spatial, (stride, padding, dilation, groups),
                                                             regions=regions)
    dguide = None
    if need_guide:
        if guide.shape[1] == 1:
            dguide = torch.zeros_like(guide)  # a softmax over one region is constant
        else:
            scores = _guide_scores(x, weights, routing, bias, spatial, grad, groups, stride, padding, dilation)
            dguide = _guide_grad(scores, guide)
    # Distinct empty tensors for the absent ones: a custom op's outputs may not alias.
    return tuple(g.to(x.dtype, memory_format=torch.contiguous_format) if g is not None else x.new_empty(0)
                 for g in (dweights, drouting, dbias, dspatial, dguide))


def _save(ctx, tensors, geometry, regions=None):
    """The six conv inputs and the forward's packed region tables (or None) for the backward."""
    ctx.geometry = tuple(geometry)
    ctx.x_size = tuple(tensors[0].shape)
    ctx.channels_last = is_channels_last(tensors[0])
    ctx.save_for_backward(*tensors, regions)


def _grads(ctx, grad, backward_input, backward_weight, channels_last_copy):
    """First-order (dx, dweights, drouting, dbias, dspatial, dguide) from the fused backward bodies,
    each None where not needed. Where both bodies would read a channels_last copy of an NCHW grad,
    ``channels_last_copy`` makes it once for both."""
    x, weights, routing, bias, spatial, guide, regions = ctx.saved_tensors
    needs = ctx.needs_input_grad
    stride, padding, dilation, groups = ctx.geometry
    if (needs[0] and any(needs[1:6]) and runs_kernels(grad) and grad.numel()
            and weight_grad_kernels.backward_shares_output_grad(grad, x, weights, routing, groups, stride, padding,
                                                                dilation, spatial is not None)):
        grad = channels_last_copy(grad)
    dx = dweights = drouting = dbias = dspatial = dguide = None
    if needs[0]:
        dx = backward_input(grad, weights, routing, spatial, guide, ctx.x_size, ctx.channels_last, *ctx.geometry,
                            regions=regions)
    if any(needs[1:6]):
        grads = backward_weight(grad, x, weights, routing, bias, spatial, guide, *ctx.geometry, bool(needs[5]),
                                regions=regions)
        dweights, drouting, dbias, dspatial, dguide = (g if (need and present is not None) else None
                                                       for g, need, present in zip(
                                                           grads, needs[1:6], (weights, routing, bias, spatial, guide)))
    return dx, dweights, drouting, dbias, dspatial, dguide


# ---------------------------------------------------------------------------------------------
# Differentiable backward passes. The op is multilinear: y = conv(x, W) + bias, W = spatial ⊙
# (routing · experts). So the derivatives of its backward passes are the forward and the other
# backward pass of the same kernels, plus the mixing GEMMs in torch:
#   <h, Bx(g, W)> = <g, conv(h, W)> = <BW(g, h), W>,   <k, BW(g, x)> = <g, conv(x, k)> = <Bx(g, k), x>,
# with Bx the input gradient, BW the per-sample kernel gradient and k a per-sample kernel. A create_graph
# backward (and every functorch transform) runs these ``steps``: the autograd.Functions on the eager
# path, the custom ops on the dispatcher's, each differentiable again by the same rules.
# DRConv's region choice (argmax) has no derivative: it is held fixed. The guide's straight-through
# gradient is a formula of S = softmax(guide) and ∂S_r = Σ_o ∂y · y_r, built here from the forward
# per region, so autograd differentiates it in S and in every y_r.
# ---------------------------------------------------------------------------------------------

class _Steps(NamedTuple):
    conv: Callable  # (x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups) -> y
    backward_input: Callable  # (grad, weights, routing, spatial, guide, x_size, channels_last, stride,
    #                            padding, dilation, groups) -> dx
    backward_kernel: Callable  # (grad, x, guide, m, groups, kernel_hw, stride, padding, dilation) -> (dW, dbias)


def _like(grads, tensors):
    return tuple(g.to(t.dtype) if (g is not None and t is not None) else None for g, t in zip(grads, tensors))


def _conv_grads(steps: _Steps, grad, saved, needs, x_size, channels_last, geometry, straight_through: bool):
    """Differentiable (dx, dweights, drouting, dbias, dspatial, dguide) of conv (see above); ``saved``
    from ``_save`` (the forward's region tables unused: each step builds its own)."""
    x, weights, routing, bias, spatial, guide = saved[:6]
    stride, padding, dilation, groups = geometry
    fixed = _fixed(guide)
    dx = dweights = drouting = dbias = dspatial = dguide = None
    if needs[0]:
        dx = steps.backward_input(grad, weights, routing, spatial, fixed, x_size, channels_last, *geometry)
    if any(needs[1:5]):
        dweights, drouting, dbias, dspatial = _weight_side_grads(steps.backward_kernel, grad, x, fixed, weights,
                                                                 routing, bias, spatial, geometry)
    if needs[5] and straight_through and guide is not None:
        dguide = _straight_through(steps.conv, grad, x, weights, routing, bias, spatial, guide, geometry)
    grads = _like((dx, dweights, drouting, dbias, dspatial, dguide), saved)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _per_region(weights, routing, bias, r):
    """(weights, routing, bias) of region r alone, as a one-region problem."""
    if routing is None:
        return weights[:, r:r + 1], None, bias[:, r:r + 1] if bias is not None else None
    return weights, routing[:, r:r + 1], bias


def _all_regions(conv, x, weights, routing, bias, spatial, geometry):
    """y_r for every region at every pixel, (B, m, Cout, Ho, Wo): one forward per region."""
    outputs = []
    for r in range(_regions(weights, routing)):
        weights_r, routing_r, bias_r = _per_region(weights, routing, bias, r)
        outputs.append(conv(x, weights_r, routing_r, bias_r, spatial, None, *geometry))
    return torch.stack(outputs, dim=1)


def _straight_through(conv, grad, x, weights, routing, bias, spatial, guide, geometry):
    if guide.shape[1] == 1:
        return torch.zeros_like(guide)  # a softmax over one region is constant
    acc = _acc_dtype(guide.dtype)
    y_all = _all_regions(conv, x, weights, routing, bias, spatial, geometry)
    return _guide_grad((grad.to(acc)[:, None] * y_all.to(acc)).sum(dim=2), guide)


def _backward_input_grads(steps: _Steps, h, saved, needs, geometry):
    """Differentiable (dgrad, dweights, drouting, dspatial, dguide) of Bx(grad, W) against h = ∂dx."""
    grad, weights, routing, spatial, guide = saved
    stride, padding, dilation, groups = geometry
    dgrad = dweights = drouting = dspatial = None
    if needs[0]:
        dgrad = steps.conv(h, weights, routing, None, spatial, _fixed(guide), *geometry)
    if any(needs[1:4]):
        dweights, drouting, _, dspatial = _weight_side_grads(steps.backward_kernel, grad, h, _fixed(guide), weights,
                                                             routing, None, spatial, geometry, with_bias=False)
    grads = _like((dgrad, dweights, drouting, dspatial), saved[:4])
    return tuple(g if need else None for g, need in zip(grads, needs[:4])) + (None,)


def _backward_kernel_grads(steps: _Steps, dW, dbias, saved, needs, geometry, kernel_size):
    """Differentiable (dgrad, dx, dguide) of BW(grad, x) against (dW, dbias) = (∂dW, ∂dbias)."""
    grad, x, guide = saved
    dW = dW.to(x.dtype) if dW is not None else x.new_zeros(kernel_size)
    dbias = dbias.to(x.dtype) if dbias is not None else None
    dgrad = dx = None
    if needs[0]:
        dgrad = steps.conv(x, dW, None, dbias, None, _fixed(guide), *geometry)
    if needs[1]:
        dx = steps.backward_input(grad, dW, None, None, _fixed(guide), tuple(x.shape), is_channels_last(x), *geometry)
    return dgrad, dx, None


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors; see ops/_eager.py)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::expert_conv2d_region_tables", mutates_args=())
def region_tables_op(guide: Tensor) -> Tensor:
    """DRConv's region tables of ``guide`` (B, m, Ho, Wo), packed (``packed_tables``): built before the
    forward op, which saves them for its backward ops."""
    return packed_tables(region_tables(guide))


@region_tables_op.register_fake
def _(guide):
    B, m, Ho, Wo = guide.shape
    return guide.new_empty(packed_size(B, Ho * Wo, m), dtype=torch.int32)


@torch.library.custom_op("dynconv::expert_conv2d", mutates_args=())
def expert_conv2d_op(x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
                     guide: Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     groups: int, regions: Tensor | None = None) -> Tensor:
    """``regions``: the guide's packed region tables (``region_tables_op``), which the backward reads."""
    geometry = _check(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups)
    return _forward(x, experts, routing, bias, spatial, guide, *geometry[:3], groups, geometry[3], regions)


@expert_conv2d_op.register_fake
def _(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, regions=None):
    _, _, _, out = _check(x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups)
    return _empty(x, (x.shape[0], experts.shape[1], *out), memory_format_of(x))


@torch.library.custom_op("dynconv::expert_conv2d_per_sample", mutates_args=())
def per_sample_op(x: Tensor, kernels: Tensor, bias: Tensor | None, guide: Tensor | None, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The convolution with already-mixed per-sample kernels (B, m, Cout, Cin/g, kh, kw) and biases
    (B, m, Cout); regions by argmax(guide), which gets no gradient. Higher derivatives only."""
    return _forward(x, kernels, None, bias, None, guide, stride, padding, dilation, groups,
                    _out_hw(x, kernels, stride, padding, dilation))


@per_sample_op.register_fake
def _(x, kernels, bias, guide, stride, padding, dilation, groups):
    return _empty(x, (x.shape[0], kernels.shape[2], *_out_hw(x, kernels, stride, padding, dilation)),
                  memory_format_of(x))


@torch.library.custom_op("dynconv::expert_conv2d_backward_input", mutates_args=())
def backward_input_op(grad: Tensor, experts: Tensor, routing: Tensor | None, spatial: Tensor | None,
                      guide: Tensor | None, x_size: Sequence[int], channels_last: bool, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int,
                      regions: Tensor | None = None) -> Tensor:
    return _backward_input(grad, experts, routing, spatial, guide, x_size, channels_last, stride, padding, dilation,
                           groups, regions)


@backward_input_op.register_fake
def _(grad, experts, routing, spatial, guide, x_size, channels_last, stride, padding, dilation, groups, regions=None):
    return _empty(grad, x_size, torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op("dynconv::expert_conv2d_backward_weight", mutates_args=())
def backward_weight_op(grad: Tensor, x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None,
                       spatial: Tensor | None, guide: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], groups: int, need_guide: bool, regions: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_weight(grad, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups,
                            need_guide, regions)


@backward_weight_op.register_fake
def _(grad, x, experts, routing, bias, spatial, guide, stride, padding, dilation, groups, need_guide, regions=None):
    need_guide = need_guide and guide is not None
    return (torch.empty_like(experts, memory_format=torch.contiguous_format),
            torch.empty_like(routing, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else x.new_empty(0),
            torch.empty_like(spatial, memory_format=torch.contiguous_format) if spatial is not None else x.new_empty(0),
            torch.empty_like(guide, memory_format=torch.contiguous_format) if need_guide else x.new_empty(0))


@torch.library.custom_op("dynconv::expert_conv2d_backward_kernel", mutates_args=())
def backward_kernel_op(grad: Tensor, x: Tensor, guide: Tensor | None, regions: int, groups: int,
                       kernel_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(∂W, ∂bias) of the per-(sample, region) mixed kernels and biases, accumulation dtype."""
    return _backward_kernel(grad, x, guide, regions, groups, tuple(kernel_hw), tuple(stride), tuple(padding),
                            tuple(dilation))


@backward_kernel_op.register_fake
def _(grad, x, guide, regions, groups, kernel_hw, stride, padding, dilation):
    acc = _acc_dtype(x.dtype)
    B, Cin = x.shape[:2]
    Cout = grad.shape[1]
    return (x.new_empty((B, regions, Cout, Cin // groups, *kernel_hw), dtype=acc),
            x.new_empty((B, regions, Cout), dtype=acc))


def _out_hw(x, weights, stride, padding, dilation):
    return output_hw(x.shape[-2:], tuple(weights.shape[-2:]), tuple(stride), tuple(padding), tuple(dilation))


def _op_conv(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups):
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if routing is None:
        if spatial is not None:
            raise AssertionError("per-sample kernels carry their spatial attention")
        return per_sample_op(x, weights, bias, guide, stride, padding, dilation, groups)
    return expert_conv2d_op(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups)


_OP_STEPS = _Steps(
    conv=_op_conv,
    backward_input=lambda grad, weights, routing, spatial, guide, x_size, channels_last, stride, padding, dilation,
    groups: backward_input_op(grad, weights, routing, spatial, guide, list(x_size), channels_last, list(stride),
                              list(padding), list(dilation), groups),
    backward_kernel=lambda grad, x, guide, m, groups, kernel_hw, stride, padding, dilation: backward_kernel_op(
        grad, x, guide, m, groups, list(kernel_hw), list(stride), list(padding), list(dilation)),
)


def _op_setup_context(ctx, inputs, output):
    _save(ctx, inputs[:6], inputs[6:10], inputs[10])


def _op_backward(ctx, grad):
    if torch.is_grad_enabled():  # create_graph: differentiable steps
        grads = _conv_grads(_OP_STEPS, grad, ctx.saved_tensors, ctx.needs_input_grad, ctx.x_size,
                            ctx.channels_last, ctx.geometry, True)
    else:
        grads = _grads(ctx, grad, backward_input_op, backward_weight_op, channels_last_copy_op)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("dynconv::expert_conv2d", _op_backward, setup_context=_op_setup_context)


def _per_sample_setup_context(ctx, inputs, output):
    x, kernels, bias, guide = inputs[:4]
    _save(ctx, (x, kernels, None, bias, None, guide), inputs[4:])


def _per_sample_backward(ctx, grad):
    needs = ctx.needs_input_grad
    dx, dkernels, _, dbias, _, _ = _conv_grads(_OP_STEPS, grad, ctx.saved_tensors,
                                               (needs[0], needs[1], False, needs[2], False, False), ctx.x_size,
                                               ctx.channels_last, ctx.geometry, False)
    return dx, dkernels, dbias, None, None, None, None, None


torch.library.register_autograd("dynconv::expert_conv2d_per_sample", _per_sample_backward,
                                setup_context=_per_sample_setup_context)


def _backward_input_setup_context(ctx, inputs, output):
    ctx.geometry = tuple(inputs[7:11])
    ctx.save_for_backward(*inputs[:5])


def _backward_input_backward(ctx, h):
    grads = _backward_input_grads(_OP_STEPS, h, ctx.saved_tensors, ctx.needs_input_grad, ctx.geometry)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("dynconv::expert_conv2d_backward_input", _backward_input_backward,
                                setup_context=_backward_input_setup_context)


def _backward_kernel_setup_context(ctx, inputs, output):
    grad, x, guide, regions, groups, kernel_hw, stride, padding, dilation = inputs
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.kernel_size = tuple(output[0].shape)
    ctx.save_for_backward(grad, x, guide)


def _backward_kernel_backward(ctx, dW, dbias):
    grads = _backward_kernel_grads(_OP_STEPS, dW, dbias, ctx.saved_tensors, ctx.needs_input_grad, ctx.geometry,
                                   ctx.kernel_size)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("dynconv::expert_conv2d_backward_kernel", _backward_kernel_backward,
                                setup_context=_backward_kernel_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher. The Functions also serve functorch transforms and
# forward-mode AD, which custom ops cannot: each has a jvp (a sum of the function with one tangent
# at a time, as it is multilinear) and a vmap rule (the vmapped dimension folded into the batch).
# ---------------------------------------------------------------------------------------------

def _transformed() -> bool:
    """Under functorch transforms or forward-mode AD: only the autograd.Functions have the rules."""
    return ((torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0)
            and not torch.compiler.is_compiling())


def _differentiable_backward() -> bool:
    """A create_graph backward, or one under a transform (its tensors are wrapped: no kernel may see them)."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def _vmap_folded(info, in_dims, args, per_sample, call):
    """Runs ``call`` with the vmapped dimension folded into the batch dimension of the per-sample
    tensors (x, routing, spatial, guide, gradients); a vmapped shared tensor (the experts, their
    bias) cannot be folded, so that rare case runs ``call`` once per vmapped index."""
    n = info.batch_size
    in_dims = [d if isinstance(d, int) else None for d in in_dims]  # a non-tensor's entry may be a tuple
    if any(d is not None and not folds for d, folds in zip(in_dims, per_sample)):
        results = [call(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(n)]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
        return torch.stack(results), 0
    folded = []
    for a, d, folds in zip(args, in_dims, per_sample):
        folded.append(fold_vmapped(a, d, n) if folds else a)
    result = call(*folded)
    if isinstance(result, tuple):
        return tuple(unfold_vmapped(t, n) for t in result), (0,) * len(result)
    return unfold_vmapped(result, n), 0


def _rank(t, d):
    return t.dim() - (d is not None)


def _sum_terms(terms, like_shape, like):
    terms = [t for t in terms if t is not None]
    if not terms:
        return like.new_zeros(like_shape)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


class _Conv(torch.autograd.Function):
    """conv(x, W) + bias with W = spatial ⊙ (routing · experts) (or per-sample kernels, routing None),
    regions by argmax(guide) with the straight-through guide gradient."""

    @staticmethod
    def forward(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out):
        return _forward(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[:6], inputs[6:10])
        ctx.save_for_forward(*inputs[:6])
        ctx.out = inputs[10]

    @staticmethod
    def backward(ctx, grad):
        if _differentiable_backward():
            grads = _conv_grads(_EAGER_STEPS, grad, ctx.saved_tensors, ctx.needs_input_grad, ctx.x_size,
                                ctx.channels_last, ctx.geometry, True)
        else:
            grads = _grads(ctx, grad, _backward_input, _backward_weight, layout.channels_last_copy)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tx, tweights, trouting, tbias, tspatial, tguide, *_):
        x, weights, routing, bias, spatial, guide = ctx.saved_tensors
        geometry, fixed = ctx.geometry, _fixed(guide)
        conv = _EAGER_STEPS.conv
        y_shape = (x.shape[0], weights.shape[-4], *ctx.out)
        terms = [
            conv(tx, weights, routing, None, spatial, fixed, *geometry) if tx is not None else None,
            conv(x, tweights, routing, None, spatial, fixed, *geometry) if tweights is not None else None,
            conv(x, weights, trouting, bias, spatial, fixed, *geometry) if trouting is not None else None,
            conv(x, weights, routing, None, tspatial, fixed, *geometry) if tspatial is not None else None,
            _selected_bias(_mixed_bias(routing, tbias), fixed, y_shape) if tbias is not None else None,
        ]
        if tguide is not None and guide.shape[1] > 1:  # Σ_r y_r · (the softmax's tangent)_r
            soft = torch.softmax(guide, dim=1)
            soft_tangent = soft * (tguide - (soft * tguide).sum(dim=1, keepdim=True))
            y_all = _all_regions(conv, x, weights, routing, bias, spatial, geometry)
            terms.append((y_all * soft_tangent[:, :, None]).sum(dim=1))
        return _sum_terms(terms, y_shape, x)

    @staticmethod
    def vmap(info, in_dims, x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out):
        per_sample_kernels = routing is None and _rank(weights, in_dims[1]) == 6
        per_sample = (True, per_sample_kernels, True, per_sample_kernels, True, True) + (False,) * 5
        return _vmap_folded(info, in_dims, (x, weights, routing, bias, spatial, guide, stride, padding, dilation,
                                            groups, out), per_sample, _Conv.apply)


class _BackwardInput(torch.autograd.Function):
    """dx = Bx(grad, W): linear in grad and in the mixed kernels."""

    @staticmethod
    def forward(grad, weights, routing, spatial, guide, x_size, channels_last, stride, padding, dilation, groups):
        return _backward_input(grad, weights, routing, spatial, guide, x_size, channels_last, stride, padding,
                               dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.geometry = tuple(inputs[7:])
        ctx.sizes = tuple(inputs[5:7])
        ctx.save_for_backward(*inputs[:5])
        ctx.save_for_forward(*inputs[:5])

    @staticmethod
    def backward(ctx, h):
        grads = _backward_input_grads(_EAGER_STEPS, h, ctx.saved_tensors, ctx.needs_input_grad, ctx.geometry)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tgrad, tweights, trouting, tspatial, *_):
        grad, weights, routing, spatial, guide = ctx.saved_tensors
        fixed = (_fixed(guide), *ctx.sizes[:2], *ctx.geometry[:4])

        def step(*operands):  # positional: torch 2.11's functorch takes no keywords through Function.apply
            return _EAGER_STEPS.backward_input(*operands, *fixed)

        terms = [step(tgrad, weights, routing, spatial) if tgrad is not None else None,
                 step(grad, tweights, routing, spatial) if tweights is not None else None,
                 step(grad, weights, trouting, spatial) if trouting is not None else None,
                 step(grad, weights, routing, tspatial) if tspatial is not None else None]
        return _sum_terms(terms, ctx.sizes[0], grad)

    @staticmethod
    def vmap(info, in_dims, grad, weights, routing, spatial, guide, x_size, channels_last, *geometry):
        per_sample_kernels = routing is None and _rank(weights, in_dims[1]) == 6
        per_sample = (True, per_sample_kernels, True, True, True) + (False,) * 6

        def call(grad, weights, routing, spatial, guide, x_size, *rest):
            return _BackwardInput.apply(grad, weights, routing, spatial, guide, (grad.shape[0], *x_size[1:]), *rest)

        return _vmap_folded(info, in_dims, (grad, weights, routing, spatial, guide, x_size, channels_last,
                                            *geometry), per_sample, call)


class _BackwardKernel(torch.autograd.Function):
    """(dW, dbias) = BW(grad, x): the per-(sample, region) kernel and bias gradients, bilinear."""

    @staticmethod
    def forward(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation):
        return _backward_kernel(grad, x, guide, m, groups, kernel_hw, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, guide, m, groups, kernel_hw, stride, padding, dilation = inputs
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.rest = inputs[3:]
        ctx.kernel_size = tuple(output[0].shape)
        ctx.save_for_backward(grad, x, guide)
        ctx.save_for_forward(grad, x, guide)

    @staticmethod
    def backward(ctx, dW, dbias):
        grads = _backward_kernel_grads(_EAGER_STEPS, dW, dbias, ctx.saved_tensors, ctx.needs_input_grad,
                                       ctx.geometry, ctx.kernel_size)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tgrad, tx, *_):
        grad, x, guide = ctx.saved_tensors
        terms = []
        if tgrad is not None:
            terms.append(_BackwardKernel.apply(tgrad, x, _fixed(guide), *ctx.rest))
        if tx is not None:
            terms.append(_BackwardKernel.apply(grad, tx, _fixed(guide), *ctx.rest))
        if not terms:
            return tuple(t.new_zeros(t.shape) for t in _BackwardKernel.apply(grad, x, _fixed(guide), *ctx.rest))
        return tuple(sum(parts[1:], parts[0]) for parts in zip(*terms))

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_folded(info, in_dims, args, (True, True, True) + (False,) * 6, _BackwardKernel.apply)


_EAGER_STEPS = _Steps(
    conv=lambda x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups: _Conv.apply(
        x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups,
        _out_hw(x, weights, stride, padding, dilation)),
    backward_input=_BackwardInput.apply,
    backward_kernel=_BackwardKernel.apply,
)
class _EagerConv(torch.autograd.Function):
    """``_Conv`` for plain eager calls: a forward taking ctx is one Python call less than a
    setup_context pair, which the host overhead of every call notices. Forward-mode AD reaches it
    too (``_eager.records_grad``), so it saves what jvp reads then."""

    @staticmethod
    def forward(ctx, x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out):
        regions = _forward_tables(x, weights, routing, guide)
        _save(ctx, (x, weights, routing, bias, spatial, guide), (stride, padding, dilation, groups), regions)
        if torch.autograd.forward_ad._current_level >= 0:
            ctx.save_for_forward(x, weights, routing, bias, spatial, guide)
            ctx.out = out
        return _forward(x, weights, routing, bias, spatial, guide, stride, padding, dilation, groups, out, regions)

    backward = _Conv.backward
    jvp = _Conv.jvp


_apply = _eager.applier(_EagerConv)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def expert_conv2d(x: Tensor, experts: Tensor, routing: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, *, spatial: Tensor | None = None, guide: Tensor | None = None) -> Tensor:
    """Convolution with per-sample (and per-region) mixtures of K expert kernels (docs/operators.md §2).

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
    See ``dynconv.kernels.expert_conv`` for what is materialised (at most the size of ``y``; in the
    input gradient, of ``dx``).
    """
    x, experts, routing, bias, spatial, guide = autocast_inputs(x, experts, routing, bias, spatial, guide)
    _check_routing_rank(routing)
    if routing.dim() == 2:
        routing = routing.unsqueeze(1)
    pairs = as_pair(stride, "stride", 1), as_pair(padding, "padding", 0), as_pair(dilation, "dilation", 1)
    tensors = x, experts, routing, bias, spatial, guide
    if not _eager.eager(*tensors):
        if not _transformed():
            regions = None
            if guide is not None:  # checked before its tables are built
                _check_tensors(*tensors, groups)
                if _builds_tables(x, experts, routing, guide):
                    regions = region_tables_op(_fixed(guide))
            return expert_conv2d_op(*tensors, *map(list, pairs), groups, regions)
        _check_tensors(*tensors, groups)
        geometry = _geometry(x.shape, experts.shape, routing.shape, _shape(bias), _shape(spatial), _shape(guide),
                             *pairs, groups)
        return _Conv.apply(*tensors, *geometry[:3], groups, geometry[3])
    _check_tensors(*tensors, groups)
    stride, padding, dilation, out = _cached_geometry(x.shape, experts.shape, routing.shape, _shape(bias),
                                                      _shape(spatial), _shape(guide), *pairs, groups)
    if _eager.records_grad(*tensors):
        return _apply(*tensors, stride, padding, dilation, groups, out)
    return _forward(*tensors, stride, padding, dilation, groups, out)
