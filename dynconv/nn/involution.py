"""nn modules for SPEC.md §1: ``Involution2d`` and ``DynamicDWConv2d``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops._checks import conv_output_size
from dynconv.ops.involution import dynamic_dwconv2d, involution
from dynconv.ops.involution_fused import involution_fused


def _batch_norm(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """BatchNorm that also trains with one value per channel (batch 1 after global pooling).

    Batch statistics of a single value are undefined; there we normalise with the running
    statistics and leave them unchanged, as in evaluation.
    """
    if bn.training and z.shape[0] * z.shape[2] * z.shape[3] == 1:
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(z)


def _runs_fused(fused: bool | None, x: torch.Tensor) -> bool:
    """``fused=None`` fuses on CUDA only: on CPU the fused op has no fused implementation to win with."""
    return x.is_cuda if fused is None else fused


class Involution2d(nn.Module):
    """Involution (Li et al., CVPR 2021) with the reference code's kernel generation.

    ``φ(x) = conv1x1(C/r → K²·G)(ReLU(BN(conv1x1(C → C/r)(x'))))`` with ``G = C / group_channels``
    and ``x' = x`` at stride 1. At stride s the reference average-pools by s, which gives
    ``floor(H/s)`` rows against ``ceil(H/s)`` output rows for odd H and breaks; here ``x'`` is
    average-pooled adaptively to exactly the output size ``Ho × Wo``, which equals the reference's
    ``AvgPool2d(s, s)`` whenever that one fits.

    ``fused``: run the span conv inside the aggregation kernel (``dynconv.involution_fused``), so
    the per-pixel weights never reach memory. None (default) fuses on CUDA and keeps the unfused
    span conv + ``dynconv.involution`` elsewhere; False always runs unfused. Both paths compute the
    same function with the same parameters; the fused one keeps the generated weights in fp32.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction_ratio: int = 4, fused: bool | None = None):
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"channels={channels} must be divisible by group_channels={group_channels}")
        if channels // reduction_ratio < 1:
            raise ValueError(f"channels // reduction_ratio must be >= 1, got {channels} // {reduction_ratio}")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.padding = (kernel_size - 1) // 2
        reduced = channels // reduction_ratio
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False)
        self.bn = nn.BatchNorm2d(reduced)
        self.span = nn.Conv2d(reduced, kernel_size * kernel_size * self.groups, 1)
        self.fused = fused

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return conv_output_size(h, k, s, p, 1), conv_output_size(w, k, s, p, 1)

    def reduced_features(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(conv1x1(x')))`` at output resolution: the input of the span conv."""
        out = self.output_size(x.shape[2], x.shape[3])
        pooled = x if tuple(x.shape[2:]) == out else F.adaptive_avg_pool2d(x, out)
        return F.relu(_batch_norm(self.bn, self.reduce(pooled)))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated per-pixel weights ``(B, G, K, K, Ho, Wo)``."""
        z = self.span(self.reduced_features(x))
        B, _, Ho, Wo = z.shape
        return z.view(B, self.groups, self.kernel_size, self.kernel_size, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_fused(self.fused, x):
            return involution_fused(x, self.reduced_features(x), self.span.weight, self.span.bias, self.kernel_size,
                                    self.groups, self.stride, self.padding)
        return involution(x, self.kernel(x), self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"group_channels={self.group_channels}, fused={self.fused}")


class DynamicDWConv2d(nn.Module):
    """Dynamic depth-wise convolution (DWNet, Han et al., ICLR 2022).

    homogeneous=True: one K×K kernel per sample and channel from global context,
    ``GAP → conv1x1(C → C/r) → BN → ReLU → conv1x1(C/r → C·K²)``, run without ever expanding it
    to pixels. homogeneous=False: per-pixel kernels from the same bottleneck without pooling
    (pooled to the output size for stride > 1), i.e. involution with G = C.
    ``bias`` is a learned static per-channel bias, as in the reference code.
    ``fused`` (inhomogeneous only): as for :class:`Involution2d`, with G = C; None fuses on CUDA.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, reduction_ratio: int = 4,
                 homogeneous: bool = True, bias: bool = True, fused: bool | None = None):
        super().__init__()
        if channels // reduction_ratio < 1:
            raise ValueError(f"channels // reduction_ratio must be >= 1, got {channels} // {reduction_ratio}")
        if homogeneous and fused:
            raise ValueError("fused=True needs homogeneous=False: per-sample kernels have no per-pixel weights to fuse")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.homogeneous = homogeneous
        self.padding = (kernel_size - 1) // 2
        reduced = channels // reduction_ratio
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False)
        self.bn = nn.BatchNorm2d(reduced)
        self.span = nn.Conv2d(reduced, kernel_size * kernel_size * channels, 1)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.fused = fused

    def reduced_features(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(conv1x1(context)))``: the input of the span conv (1x1 when homogeneous)."""
        if self.homogeneous:
            context = F.adaptive_avg_pool2d(x, 1)
        else:
            out = tuple(conv_output_size(n, self.kernel_size, self.stride, self.padding, 1) for n in x.shape[2:])
            context = x if tuple(x.shape[2:]) == out else F.adaptive_avg_pool2d(x, out)
        return F.relu(_batch_norm(self.bn, self.reduce(context)))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, K, K)`` when homogeneous, else ``(B, C, K, K, Ho, Wo)``."""
        k = self.kernel_size
        z = self.span(self.reduced_features(x))
        B, _, Ho, Wo = z.shape
        if self.homogeneous:
            return z.view(B, self.channels, k, k)
        return z.view(B, self.channels, k, k, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.homogeneous:
            bias = None if self.bias is None else self.bias.to(x.dtype).expand(x.shape[0], -1)
            return dynamic_dwconv2d(x, self.kernel(x), bias, self.stride, self.padding)
        if _runs_fused(self.fused, x):
            y = involution_fused(x, self.reduced_features(x), self.span.weight, self.span.bias, self.kernel_size,
                                 self.channels, self.stride, self.padding)
        else:
            y = involution(x, self.kernel(x), self.stride, self.padding)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"homogeneous={self.homogeneous}, bias={self.bias is not None}"
                + ("" if self.homogeneous else f", fused={self.fused}"))
