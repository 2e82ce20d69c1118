"""Plain-PyTorch paths for docs/operators.md §1: the unfold baseline and shift-and-add.

* ``involution_unfold`` is the seeds' formulation (``F.unfold`` → multiply → sum). It materialises
  ``K²·C·Ho·Wo`` elements per sample and is the baseline every benchmark compares against.
* ``involution_shift_add`` loops over the K² taps on strided views of the padded input: no unfold
  tensor, one multiply-add per tap. It is the CPU path of the ops and its backward is written out
  (``shift_add_backward_input`` / ``shift_add_backward_weight``) so the ops need no autograd inside.
* ``dwconv_batch_as_groups`` (with ``..._backward_input`` / ``..._backward_weight``) runs a per-sample
  weight as one depthwise conv over ``(1, B·C, H, W)`` with ``groups = B·C``: torch's own conv
  kernels, memory O(input + output). It is the CPU path of ``dynamic_dwconv2d`` (per-sample weights).

``weight`` is per pixel ``(B, G, K, K, Ho, Wo)`` or per sample ``(B, G, K, K)`` everywhere.
Geometry arguments are (h, w) pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _geometry(x, weight, stride, padding, dilation):
    K = weight.shape[2]
    stride, dilation = _pair(stride), _pair(dilation)
    padding = tuple(d * (K - 1) // 2 for d in dilation) if padding is None else _pair(padding)
    out = tuple((x.shape[2 + a] + 2 * padding[a] - dilation[a] * (K - 1) - 1) // stride[a] + 1 for a in range(2))
    return K, stride, padding, dilation, out


def _group_view(t, G):
    B, C = t.shape[:2]
    return t.reshape(B, G, C // G, *t.shape[2:])


def _tap_weight(weight, u, v):
    """The (u, v) tap of the weight, shaped to broadcast against (B, G, CG, Ho, Wo)."""
    w = weight[:, :, u, v]
    return w.unsqueeze(2) if weight.dim() == 6 else w[:, :, None, None, None]


def _tap_window(padded, u, v, stride, dilation, out):
    """The strided view of the padded input that tap (u, v) reads for every output pixel."""
    h0, w0 = u * dilation[0], v * dilation[1]
    return padded[..., h0: h0 + stride[0] * (out[0] - 1) + 1: stride[0],
                  w0: w0 + stride[1] * (out[1] - 1) + 1: stride[1]]


def involution_unfold(x, weight, bias=None, stride=1, padding=None, dilation=1):
    """The unfold baseline: materialises the (B, C·K², Ho·Wo) patch tensor."""
    K, stride, padding, dilation, out = _geometry(x, weight, stride, padding, dilation)
    B, C = x.shape[:2]
    G = weight.shape[1]
    patches = F.unfold(x, K, dilation=dilation, padding=padding, stride=stride)
    patches = patches.view(B, G, C // G, K * K, *out)
    w = weight.reshape(B, G, 1, K * K, *(out if weight.dim() == 6 else (1, 1)))
    y = (w * patches).sum(dim=3).reshape(B, C, *out)
    if bias is not None:
        y = y + bias[:, :, None, None]
    return y


def involution_shift_add(x, weight, bias=None, stride=1, padding=None, dilation=1):
    """Shift-and-add: K² strided multiply-adds, memory O(output). Differentiable by autograd."""
    K, stride, padding, dilation, out = _geometry(x, weight, stride, padding, dilation)
    B, C = x.shape[:2]
    G = weight.shape[1]
    padded = _group_view(F.pad(x, (padding[1], padding[1], padding[0], padding[0])), G)
    y = torch.zeros((B, G, C // G, *out), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for u in range(K):
        for v in range(K):
            y = y + _tap_weight(weight, u, v) * _tap_window(padded, u, v, stride, dilation, out)
    y = y.reshape(B, C, *out)
    if bias is not None:
        y = y + bias[:, :, None, None]
    return y.to(x.dtype)


def shift_add_backward_input(grad, weight, x_hw, stride, padding, dilation):
    """dx of shift-and-add: each tap's weighted gradient added back onto its input window."""
    K = weight.shape[2]
    B, C, Ho, Wo = grad.shape
    G = weight.shape[1]
    out = (Ho, Wo)
    padded = torch.zeros((B, G, C // G, x_hw[0] + 2 * padding[0], x_hw[1] + 2 * padding[1]),
                         dtype=torch.promote_types(grad.dtype, torch.float32), device=grad.device)
    g = _group_view(grad, G)
    for u in range(K):
        for v in range(K):
            _tap_window(padded, u, v, stride, dilation, out).add_(_tap_weight(weight, u, v) * g)
    dx = padded[..., padding[0]: padding[0] + x_hw[0], padding[1]: padding[1] + x_hw[1]]
    return dx.reshape(B, C, *x_hw).to(grad.dtype)


def shift_add_backward_weight(grad, x, weight_shape, stride, padding, dilation):
    """dw of shift-and-add: per tap, the group-summed product of gradient and input window."""
    K = weight_shape[2]
    G = weight_shape[1]
    out = tuple(grad.shape[2:])
    acc = torch.promote_types(x.dtype, torch.float32)
    padded = _group_view(F.pad(x, (padding[1], padding[1], padding[0], padding[0])), G).to(acc)
    g = _group_view(grad, G).to(acc)
    per_pixel = len(weight_shape) == 6
    dw = torch.empty(tuple(weight_shape), dtype=acc, device=x.device)
    for u in range(K):
        for v in range(K):
            prod = g * _tap_window(padded, u, v, stride, dilation, out)
            dw[:, :, u, v] = prod.sum(dim=2) if per_pixel else prod.sum(dim=(2, 3, 4))
    return dw.to(x.dtype)


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


def _batch_as_groups_kernel(weight, C):
    """(B, G, K, K) per-sample kernels as the (B·C, 1, K, K) weight of one depthwise conv."""
    B, G, K = weight.shape[:3]
    return weight[:, :, None].expand(B, G, C // G, K, K).reshape(B * C, 1, K, K)


def dwconv_batch_as_groups(x, weight, bias, stride, padding, dilation):
    """Per-sample weight (B, G, K, K): one conv on (1, B·C, H, W) with groups = B·C."""
    B, C, H, W = x.shape
    acc = _acc(x.dtype)
    flat_bias = bias.to(acc).reshape(B * C) if bias is not None else None
    y = F.conv2d(x.to(acc).reshape(1, B * C, H, W), _batch_as_groups_kernel(weight.to(acc), C), flat_bias,
                 _pair(stride), _pair(padding), _pair(dilation), B * C)
    return y.reshape(B, C, *y.shape[2:]).to(x.dtype)


def conv2d_input(x_hw, weight, grad, stride, padding, dilation, groups):
    """The input gradient of ``F.conv2d`` (``torch.nn.grad.conv2d_input``, which copies an input-sized
    tensor first) as the transposed conv; ``output_padding`` restores the rows the forward's stride
    dropped, and is below the stride, as torch requires."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    reached = [(n - 1) * s - 2 * p + d * (k - 1) + 1
               for n, k, s, p, d in zip(grad.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return F.conv_transpose2d(grad, weight, None, stride, padding, tuple(h - r for h, r in zip(x_hw, reached)),
                              groups, dilation)


def dwconv_batch_as_groups_backward_input(grad, weight, x_hw, stride, padding, dilation):
    """dx of ``dwconv_batch_as_groups``: the transposed depthwise conv."""
    B, C, Ho, Wo = grad.shape
    acc = _acc(grad.dtype)
    dx = conv2d_input(x_hw, _batch_as_groups_kernel(weight.to(acc), C), grad.to(acc).reshape(1, B * C, Ho, Wo),
                      stride, padding, dilation, B * C)
    return dx.reshape(B, C, *x_hw).to(grad.dtype)


def dwconv_batch_as_groups_backward_weight(grad, x, weight_shape, stride, padding, dilation):
    """dw of ``dwconv_batch_as_groups``, summed over each group. ``dw[b, c, u, v] = Σ_ij grad[b, c, i, j] ·
    x_pad[b, c, i·s + u·d, j·s + v·d]`` is itself a depthwise conv of the input with the gradient as
    kernel (stride and dilation swapped): torch's depthwise conv is several times faster on CPU than
    its depthwise weight gradient (perf_reports/cpu/). Rows past K (stride leftovers) are cut."""
    B, C, H, W = x.shape
    G, K = weight_shape[1], weight_shape[2]
    Ho, Wo = grad.shape[2:]
    acc = _acc(x.dtype)
    dw = F.conv2d(x.to(acc).reshape(1, B * C, H, W), grad.to(acc).reshape(B * C, 1, Ho, Wo), None,
                  _pair(dilation), _pair(padding), _pair(stride), B * C)
    return dw[0, :, :K, :K].reshape(B, G, C // G, K, K).sum(dim=2).to(x.dtype)


def involution_naive(x, weight, bias=None, stride=1, padding=None, dilation=1):
    """docs/operators.md §1 written as loops over every index: slow, for tiny shapes in tests only."""
    K, stride, padding, dilation, out = _geometry(x, weight, stride, padding, dilation)
    B, C, H, W = x.shape
    CG = C // weight.shape[1]
    y = torch.zeros((B, C, *out), dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for i in range(out[0]):
                for j in range(out[1]):
                    total = 0.0 if bias is None else float(bias[b, c])
                    for u in range(K):
                        for v in range(K):
                            h = i * stride[0] - padding[0] + u * dilation[0]
                            w = j * stride[1] - padding[1] + v * dilation[1]
                            if 0 <= h < H and 0 <= w < W:
                                wt = weight[b, c // CG, u, v, i, j] if weight.dim() == 6 else weight[b, c // CG, u, v]
                                total += float(wt) * float(x[b, c, h, w])
                    y[b, c, i, j] = total
    return y
