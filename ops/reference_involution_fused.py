"""Plain-PyTorch fused involution: span conv, then shift-and-add.

These functions materialise the per-pixel weights: they are the CPU path of
``dynconv.involution_fused`` and the float64 reference of its tests, not a fused implementation.
``span_weight`` is ``(K²·G, R)`` or the span conv's ``(K²·G, R, 1, 1)``; output channel
``g·K² + u·K + v`` of the span conv is tap (u, v) of group g. Geometry arguments are (h, w) pairs
(``padding=None`` is ``d·(K-1)//2``).

The shift-and-add here slices the padded input while it is still 4-D and only then splits the
channels into groups, so every tap window is ``(B, G, C/G, Ho, Wo)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _geometry(x_hw, K, stride, padding, dilation):
    stride, dilation = _pair(stride), _pair(dilation)
    padding = tuple(d * (K - 1) // 2 for d in dilation) if padding is None else _pair(padding)
    out = tuple((x_hw[a] + 2 * padding[a] - dilation[a] * (K - 1) - 1) // stride[a] + 1 for a in range(2))
    return stride, padding, dilation, out


def _window(padded, u, v, stride, dilation, out, G):
    """Tap (u, v)'s strided view of the padded 4-D input, split into groups: (B, G, C/G, Ho, Wo)."""
    h0, w0 = u * dilation[0], v * dilation[1]
    view = padded[:, :, h0: h0 + stride[0] * (out[0] - 1) + 1: stride[0],
                  w0: w0 + stride[1] * (out[1] - 1) + 1: stride[1]]
    B, C = view.shape[:2]
    return view.reshape(B, G, C // G, *out)


def generated_weights(z, span_weight, span_bias, kernel_size: int, groups: int):
    """The span conv's output viewed as per-pixel weights ``(B, G, K, K, Ho, Wo)``."""
    B, R, Ho, Wo = z.shape
    span = span_weight.reshape(span_weight.shape[0], R)
    w = torch.einsum("or,brhw->bohw", span, z)
    if span_bias is not None:
        w = w + span_bias[None, :, None, None]
    return w.reshape(B, groups, kernel_size, kernel_size, Ho, Wo)


def shift_add(x, weight, stride=1, padding=None, dilation=1):
    """``y[b,c,i,j] = Σ_{u,v} weight[b,g(c),u,v,i,j] · x[b,c,i·s-p+u·d, j·s-p+v·d]`` in K² strided
    multiply-adds, accumulated in at least fp32. Differentiable by autograd."""
    B, C = x.shape[:2]
    G, K = weight.shape[1], weight.shape[2]
    stride, padding, dilation, out = _geometry(x.shape[2:], K, stride, padding, dilation)
    acc = torch.promote_types(x.dtype, torch.float32)
    padded = F.pad(x.to(acc), (padding[1], padding[1], padding[0], padding[0]))
    y = torch.zeros((B, G, C // G, *out), dtype=acc, device=x.device)
    for u in range(K):
        for v in range(K):
            y = y + weight[:, :, u, v].unsqueeze(2).to(acc) * _window(padded, u, v, stride, dilation, out, G)
    return y.reshape(B, C, *out).to(x.dtype)


def involution_fused_reference(x, z, span_weight, span_bias, kernel_size: int, groups: int, stride=1,
                               padding=None, dilation=1):
    """``involution(x, span(z))`` with the weights materialised. Differentiable by autograd."""
    weight = generated_weights(z, span_weight, span_bias, kernel_size, groups)
    return shift_add(x, weight, stride, padding, dilation)


def fused_backward_input(grad, z, span_weight, span_bias, kernel_size, x_hw, stride, padding, dilation):
    """dx: each tap's weighted gradient added back onto its input window."""
    B, C = grad.shape[:2]
    G = span_weight.shape[0] // (kernel_size * kernel_size)
    stride, padding, dilation, out = _geometry(x_hw, kernel_size, stride, padding, dilation)
    acc = torch.promote_types(grad.dtype, torch.float32)
    weight = generated_weights(z.to(acc), span_weight.to(acc), None if span_bias is None else span_bias.to(acc),
                               kernel_size, G)
    padded = torch.zeros((B, C, x_hw[0] + 2 * padding[0], x_hw[1] + 2 * padding[1]), dtype=acc, device=grad.device)
    g = grad.to(acc).reshape(B, G, C // G, *out)
    for u in range(kernel_size):
        for v in range(kernel_size):
            _window(padded, u, v, stride, dilation, out, G).add_(weight[:, :, u, v].unsqueeze(2) * g)
    return padded[:, :, padding[0]: padding[0] + x_hw[0], padding[1]: padding[1] + x_hw[1]].to(grad.dtype)


def fused_grad_weights(grad, x, kernel_size, groups, stride, padding, dilation):
    """dW ``(B, G·K², Ho, Wo)``, in at least fp32: the per-pixel weight gradient."""
    B, C, Ho, Wo = grad.shape
    stride, padding, dilation, out = _geometry(x.shape[2:], kernel_size, stride, padding, dilation)
    acc = torch.promote_types(x.dtype, torch.float32)
    padded = F.pad(x.to(acc), (padding[1], padding[1], padding[0], padding[0]))
    g = grad.to(acc).reshape(B, groups, C // groups, Ho, Wo)
    dw = torch.empty((B, groups, kernel_size, kernel_size, Ho, Wo), dtype=acc, device=x.device)
    for u in range(kernel_size):
        for v in range(kernel_size):
            dw[:, :, u, v] = (g * _window(padded, u, v, stride, dilation, out, groups)).sum(dim=2)
    return dw.reshape(B, groups * kernel_size * kernel_size, Ho, Wo)


def fused_backward_z(grad, x, span_weight, kernel_size, stride, padding, dilation):
    G = span_weight.shape[0] // (kernel_size * kernel_size)
    dw = fused_grad_weights(grad, x, kernel_size, G, stride, padding, dilation)
    return torch.einsum("or,bohw->brhw", span_weight.to(dw.dtype), dw).to(x.dtype)


def fused_backward_span(grad, x, z, kernel_size, groups, stride, padding, dilation):
    """(dspan (K²G, R), dbias (K²G,)) in the dtype of x."""
    dw = fused_grad_weights(grad, x, kernel_size, groups, stride, padding, dilation)
    dspan = torch.einsum("bohw,brhw->or", dw, z.to(dw.dtype))
    return dspan.to(x.dtype), dw.sum(dim=(0, 2, 3)).to(x.dtype)
