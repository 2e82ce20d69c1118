"""Plain-PyTorch paths for docs/operators.md §2 (K-expert kernel mixing), differentiable by autograd.

* ``expert_conv2d_grouped`` — the timm / DWNet batch-as-groups trick: mix the kernels per sample,
  reshape x to ``(1, B·Cin, H, W)`` and run one conv with ``groups = B·groups``. With a guide it
  is ``drconv_all_regions``. It is the CPU path of the ops.
* ``drconv_all_regions`` — the DRConv baseline: every region's kernel convolves every pixel (m
  convs), then each pixel keeps the output of its argmax region.
* ``expert_conv2d_selected`` — the ops' CPU forward: the batch-as-groups conv in the accumulation
  dtype, the kernels mixed by one GEMM, and with a guide each pixel's region picked by a gather
  (no one-hot product, no straight-through surrogate: the ops write their derivatives out).
* ``expert_conv2d_loop`` — a Python loop over the batch, one ``F.conv2d`` per sample (a baseline).

All share the signature of ``dynconv.expert_conv2d``. For a guide they implement the operator contract's
straight-through estimator: the output is the argmax selection, while the guide receives
``∂guide = S ⊙ (∂S - Σ_r S ⊙ ∂S)`` with ``S = softmax(guide)`` and ``∂S[b,r] = Σ_o ∂y[b,o] · y_r[b,o]``,
and each region's kernel only the gradient of its own pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _routing3(routing):
    """Routing as (B, m, E): (B, E) is one region."""
    return routing[:, None] if routing.dim() == 2 else routing


def mix_kernels(experts, routing, bias=None, spatial=None):
    """W[b, r] = spatial[b] ⊙ Σ_e routing[b, r, e] · experts[e]: (B, m, Cout, Cin/g, kh, kw);
    the mixed bias (B, m, Cout) or None. Without routing, ``experts`` (B, m, Cout, Cin/g, kh, kw)
    and ``bias`` (B, m, Cout) are already mixed per sample (the ops' higher derivatives use them)."""
    weight, mixed_bias = _mixed_flat(experts, routing, bias)
    if spatial is not None:
        weight = weight * spatial[:, None, None, None]
    return weight, mixed_bias


def select_regions(y_all, guide):
    """The pixel-wise argmax selection of DRConv with its straight-through guide gradient.

    y_all: (B, m, Cout, Ho, Wo), every region's output; guide: (B, m, Ho, Wo) logits.
    """
    m = guide.shape[1]
    one_hot = F.one_hot(guide.argmax(dim=1), m).permute(0, 3, 1, 2).to(y_all.dtype)
    selected = (one_hot[:, :, None] * y_all).sum(dim=1)
    soft = torch.softmax(guide, dim=1)[:, :, None]
    # d/dS of the surrogate is Σ_o dy·y_r; y_all is detached so the kernels only see their own
    # region's pixels (through `selected`). `surrogate - surrogate.detach()` is zero, except at a
    # NaN logit (NaN - NaN): there the value is the argmax selection, as torch.argmax picks the NaN.
    surrogate = (soft * y_all.detach()).sum(dim=1)
    zero = surrogate - surrogate.detach()
    return selected + torch.where(zero.isnan(), torch.zeros_like(zero), zero)


def as_grouped_weight(weight, groups):
    """(B, m, Cout, Cin/g, kh, kw) kernels as the weight of one conv with groups = B·groups on
    (1, B·Cin, H, W): group b·groups + g holds the m·Cout/g output channels (r, o) of that sample."""
    B, m, Cout = weight.shape[:3]
    grouped = weight.reshape(B, m, groups, Cout // groups, *weight.shape[3:]).transpose(1, 2)
    return grouped.reshape(B * groups * m * (Cout // groups), *weight.shape[3:])


def as_grouped_output(y, batch, regions, groups):
    """(B, m, Cout, Ho, Wo) outputs as the (1, B·groups·m·Cout/g, Ho, Wo) output of that conv."""
    Cout, Ho, Wo = y.shape[2:]
    return y.reshape(batch, regions, groups, Cout // groups, Ho, Wo).transpose(1, 2).reshape(1, -1, Ho, Wo)


def from_grouped_output(y, batch, regions, groups):
    """Inverse of ``as_grouped_output``: (B, m, Cout, Ho, Wo)."""
    Ho, Wo = y.shape[2:]
    y = y.reshape(batch, groups, regions, -1, Ho, Wo).transpose(1, 2)
    return y.reshape(batch, regions, -1, Ho, Wo)


def _no_samples(x, weight, stride, padding, dilation, groups):
    """The (0, Cout, Ho, Wo) output of an empty batch, from the per-sample kernels ``weight`` (0, m,
    Cout, Cin/g, kh, kw): the batch-as-groups conv would take B·groups = 0 groups."""
    return F.conv2d(x, weight.new_zeros(weight.shape[2:]), None, _pair(stride), _pair(padding), _pair(dilation),
                    groups)


def all_region_outputs(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, *, spatial=None):
    """y_r for every region r, (B, m, Cout, Ho, Wo): m convs of every pixel in one grouped conv."""
    weight, mixed_bias = mix_kernels(experts, routing, bias, spatial)
    B, m = weight.shape[:2]
    if B == 0:
        y = _no_samples(x, weight, stride, padding, dilation, groups)
        return y[:, None].expand(0, m, *y.shape[1:])
    Cin, H, W = x.shape[1:]
    y = F.conv2d(x.reshape(1, B * Cin, H, W), as_grouped_weight(weight, groups), None,
                 _pair(stride), _pair(padding), _pair(dilation), B * groups)
    y_all = from_grouped_output(y, B, m, groups)
    if mixed_bias is not None:
        y_all = y_all + mixed_bias[..., None, None]
    return y_all


def drconv_all_regions(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                       spatial=None, guide=None):
    """DRConv baseline: m convs of every pixel (one per region's kernel) by the grouped-conv trick,
    then the argmax selection. Memory: the (B, m, Cout, Ho, Wo) stack of all region outputs."""
    if guide is None:
        raise ValueError("drconv_all_regions needs a guide (B, m, Ho, Wo)")
    y_all = all_region_outputs(x, experts, routing, bias, stride, padding, dilation, groups, spatial=spatial)
    return select_regions(y_all, guide)


def expert_conv2d_grouped(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                          spatial=None, guide=None):
    """The batch-as-groups trick: one conv with groups = B·groups on (1, B·Cin, H, W).
    Materialises the mixed kernels (B, m, Cout, Cin/g, kh, kw)."""
    if guide is not None:
        return drconv_all_regions(x, experts, routing, bias, stride, padding, dilation, groups,
                                  spatial=spatial, guide=guide)
    weight, mixed_bias = mix_kernels(experts, routing, bias, spatial)
    B, _, Cout = weight.shape[:3]
    if B == 0:
        return _no_samples(x, weight, stride, padding, dilation, groups)
    Cin, H, W = x.shape[1:]
    y = F.conv2d(x.reshape(1, B * Cin, H, W), weight.reshape(B * Cout, *weight.shape[3:]),
                 mixed_bias.reshape(B * Cout) if mixed_bias is not None else None,
                 _pair(stride), _pair(padding), _pair(dilation), B * groups)
    y = y.reshape(B, Cout, *y.shape[2:])
    return y.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else y


def _mixed_flat(experts, routing, bias):
    """Per-(sample, region) kernels (B, m, Cout, Cin/g, kh, kw) and biases (B, m, Cout) by one GEMM
    each; without routing ``experts`` and ``bias`` are already per sample."""
    if routing is None:
        return experts, bias
    routing = _routing3(routing)
    B, m, E = routing.shape
    route = routing.reshape(B * m, E)
    weight = (route @ experts.reshape(E, -1)).reshape(B, m, *experts.shape[1:])
    return weight, (route @ bias).reshape(B, m, bias.shape[-1]) if bias is not None else None


def expert_conv2d_selected(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                           spatial=None, guide=None):
    """The forward value only (not for autograd): one batch-as-groups conv in float32 (float64 for
    float64) over every region's kernel, then each pixel's argmax region by a gather."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight, mixed_bias = _mixed_flat(experts.to(acc), routing.to(acc) if routing is not None else None,
                                     bias.to(acc) if bias is not None else None)
    if spatial is not None:
        weight = weight * spatial.to(acc)[:, None, None, None]
    B, m, Cout = weight.shape[:3]
    Cin, H, W = x.shape[1:]
    conv_bias = None
    if mixed_bias is not None:  # the grouped conv's output channels are (b, g, r, o)
        conv_bias = mixed_bias.reshape(B, m, groups, Cout // groups).transpose(1, 2).reshape(-1)
    y = F.conv2d(x.to(acc).reshape(1, B * Cin, H, W), as_grouped_weight(weight, groups), conv_bias,
                 _pair(stride), _pair(padding), _pair(dilation), B * groups)
    if m == 1:
        return y.reshape(B, Cout, *y.shape[2:]).to(x.dtype)
    y_all = from_grouped_output(y, B, m, groups)
    region = guide.argmax(dim=1)[:, None, None]  # torch.argmax: a NaN logit wins, as in the kernels
    y = y_all.gather(1, region.expand(B, 1, Cout, *region.shape[3:])).squeeze(1)
    return y.to(x.dtype)


def expert_conv2d_loop(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                       spatial=None, guide=None):
    """A Python loop over the batch: one conv per sample (per region and sample with a guide)."""
    weight, mixed_bias = mix_kernels(experts, routing, bias, spatial)
    B, m, Cout = weight.shape[:3]
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    outputs = []
    for b in range(B):
        if guide is None:
            w, bias_b = weight[b, 0], (mixed_bias[b, 0] if mixed_bias is not None else None)
        else:
            # Every region's kernel at every pixel, stacked on the channel axis inside each group.
            w = weight[b].reshape(m, groups, Cout // groups, *weight.shape[3:]).transpose(0, 1)
            w, bias_b = w.reshape(m * Cout, *weight.shape[3:]), None
        y = F.conv2d(x[b: b + 1], w, bias_b, *geometry)
        outputs.append(y)
    if not outputs:  # B = 0: only the output's shape to give
        return _no_samples(x, weight, stride, padding, dilation, groups)
    y = torch.cat(outputs)
    if guide is None:
        return y
    Ho, Wo = y.shape[2:]
    y_all = y.reshape(B, groups, m, Cout // groups, Ho, Wo).transpose(1, 2).reshape(B, m, Cout, Ho, Wo)
    if mixed_bias is not None:
        y_all = y_all + mixed_bias[..., None, None]
    return select_regions(y_all, guide)


def _is_channels_last(t):
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
