"""nn modules for docs/operators.md §1: ``Involution2d`` and ``DynamicDWConv2d``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops._checks import conv_output_size
from dynconv.ops.involution import dynamic_dwconv2d, involution
from dynconv.ops.involution_fused import involution_fused

from ._common import as_int, batch_norm, check_input, int_pair


def _runs_fused(fused: bool | None, x: torch.Tensor) -> bool:
    """``fused=None`` fuses on CUDA only: on CPU the fused op has no fused implementation to win with."""
    return x.is_cuda if fused is None else fused


def _square_kernel(kernel_size) -> int:
    """The ops generate square K × K kernels: an int or an (h, w) pair with h == w, as K."""
    kh, kw = int_pair(kernel_size, "kernel_size", 1)
    if kh != kw:
        raise ValueError(f"kernel_size must be square (the involution ops generate K x K kernels), got {kernel_size!r}")
    return kh


class _DepthwiseGeometry(nn.Module):
    """Channels, a square K, stride, padding (None: ``d·(K-1)//2``, the references') and dilation."""

    def __init__(self, channels: int, kernel_size, stride, padding, dilation, reduction_ratio: int):
        super().__init__()
        channels, reduction_ratio = as_int(channels, "channels", 1), as_int(reduction_ratio, "reduction_ratio", 1)
        if channels // reduction_ratio < 1:
            raise ValueError(f"channels // reduction_ratio must be >= 1, got {channels} // {reduction_ratio}")
        self.channels, self.reduction_ratio = channels, reduction_ratio
        self.kernel_size = _square_kernel(kernel_size)
        self.stride = int_pair(stride, "stride", 1)
        self.dilation = int_pair(dilation, "dilation", 1)
        if padding is None:
            padding = tuple(d * (self.kernel_size - 1) // 2 for d in self.dilation)
        self.padding = int_pair(padding, "padding", 0)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        K = self.kernel_size
        return tuple(conv_output_size(n, K, s, p, d)
                     for n, s, p, d in zip((h, w), self.stride, self.padding, self.dilation))

    def _pooled_to_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output_size(x.shape[2], x.shape[3])
        return x if tuple(x.shape[2:]) == out else F.adaptive_avg_pool2d(x, out)

    def _geometry_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}")


class Involution2d(_DepthwiseGeometry):
    """Involution (Li et al., CVPR 2021) with the reference code's kernel generation.

    ``φ(x) = conv1x1(C/r → K²·G)(ReLU(BN(conv1x1(C → C/r)(x'))))`` with ``G = C / group_channels``
    and ``x' = x`` at stride 1. At stride s the reference average-pools by s, which gives
    ``floor(H/s)`` rows against ``ceil(H/s)`` output rows for odd H and breaks; here ``x'`` is
    average-pooled adaptively to exactly the output size ``Ho × Wo``, which equals the reference's
    ``AvgPool2d(s, s)`` whenever that one fits.

    Args:
        channels: C, input and output channels.
        kernel_size: K, an int or a square (K, K) pair.
        stride, dilation: ints or (h, w) pairs.
        padding: an int, an (h, w) pair, or None for ``d·(K-1)//2`` (the reference's).
        group_channels: channels per group sharing one generated kernel (G = C / group_channels).
        reduction_ratio: r, the bottleneck's reduction.
        fused: run the span conv inside the aggregation kernel (``dynconv.involution_fused``), so
            the per-pixel weights never reach memory. None (default) fuses on CUDA and keeps the
            unfused span conv + ``dynconv.involution`` elsewhere; False always runs unfused. Both
            compute the same function with the same parameters; the fused one keeps the generated
            weights in fp32.
        device, dtype: factory kwargs, as ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size=7, stride=1, group_channels: int = 16, reduction_ratio: int = 4,
                 fused: bool | None = None, *, padding=None, dilation=1, device=None, dtype=None):
        super().__init__(channels, kernel_size, stride, padding, dilation, reduction_ratio)
        channels, group_channels = as_int(channels, "channels", 1), as_int(group_channels, "group_channels", 1)
        if channels % group_channels != 0:
            raise ValueError(f"channels={channels} must be divisible by group_channels={group_channels}")
        factory = {"device": device, "dtype": dtype}
        self.group_channels = group_channels
        self.groups = channels // group_channels
        reduced = channels // reduction_ratio
        K = self.kernel_size
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False, **factory)
        self.bn = nn.BatchNorm2d(reduced, **factory)
        self.span = nn.Conv2d(reduced, K * K * self.groups, 1, **factory)
        self.fused = fused

    def reset_parameters(self) -> None:
        for layer in (self.reduce, self.bn, self.span):
            layer.reset_parameters()

    def reduced_features(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(conv1x1(x')))`` at output resolution: the input of the span conv."""
        return F.relu(batch_norm(self.bn, self.reduce(self._pooled_to_output(x))))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated per-pixel weights ``(B, G, K, K, Ho, Wo)``."""
        z = self.span(self.reduced_features(x))
        B, _, Ho, Wo = z.shape
        return z.view(B, self.groups, self.kernel_size, self.kernel_size, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "channels")
        if _runs_fused(self.fused, x):
            return involution_fused(x, self.reduced_features(x), self.span.weight, self.span.bias, self.kernel_size,
                                    self.groups, self.stride, self.padding, self.dilation)
        return involution(x, self.kernel(x), self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, group_channels={self.group_channels}, "
                f"reduction_ratio={self.reduction_ratio}, fused={self.fused}")


class DynamicDWConv2d(_DepthwiseGeometry):
    """Dynamic depth-wise convolution (DWNet, Han et al., ICLR 2022).

    homogeneous=True: one K×K kernel per sample and channel from global context,
    ``GAP → conv1x1(C → C/r) → BN → ReLU → conv1x1(C/r → C·K²)``, run without ever expanding it
    to pixels. homogeneous=False: per-pixel kernels from the same bottleneck without pooling
    (pooled to the output size for stride > 1), i.e. involution with G = C.

    Args:
        channels: C, input and output channels.
        kernel_size: K, an int or a square (K, K) pair.
        stride, dilation: ints or (h, w) pairs.
        padding: an int, an (h, w) pair, or None for ``d·(K-1)//2``.
        reduction_ratio: r, the bottleneck's reduction.
        homogeneous: one kernel per sample (True) or per pixel (False).
        bias: a learned static per-channel bias, as in the reference code (initialised to zero).
        fused: inhomogeneous only, as for :class:`Involution2d` with G = C; None fuses on CUDA.
        device, dtype: factory kwargs, as ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size=7, stride=1, reduction_ratio: int = 4, homogeneous: bool = True,
                 bias: bool = True, fused: bool | None = None, *, padding=None, dilation=1, device=None, dtype=None):
        super().__init__(channels, kernel_size, stride, padding, dilation, reduction_ratio)
        if homogeneous and fused:
            raise ValueError("fused=True needs homogeneous=False: per-sample kernels have no per-pixel weights to fuse")
        factory = {"device": device, "dtype": dtype}
        self.homogeneous = homogeneous
        reduced = channels // reduction_ratio
        K = self.kernel_size
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False, **factory)
        self.bn = nn.BatchNorm2d(reduced, **factory)
        self.span = nn.Conv2d(reduced, K * K * channels, 1, **factory)
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if bias else None
        self.fused = fused

    def reset_parameters(self) -> None:
        for layer in (self.reduce, self.bn, self.span):
            layer.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reduced_features(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(conv1x1(context)))``: the input of the span conv (1x1 when homogeneous)."""
        context = F.adaptive_avg_pool2d(x, 1) if self.homogeneous else self._pooled_to_output(x)
        return F.relu(batch_norm(self.bn, self.reduce(context)))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, K, K)`` when homogeneous, else ``(B, C, K, K, Ho, Wo)``."""
        k = self.kernel_size
        z = self.span(self.reduced_features(x))
        B, _, Ho, Wo = z.shape
        if self.homogeneous:
            return z.view(B, self.channels, k, k)
        return z.view(B, self.channels, k, k, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "channels")
        geometry = self.stride, self.padding, self.dilation
        if self.homogeneous:
            bias = None if self.bias is None else self.bias.to(x.dtype).expand(x.shape[0], -1)
            return dynamic_dwconv2d(x, self.kernel(x), bias, *geometry)
        if _runs_fused(self.fused, x):
            y = involution_fused(x, self.reduced_features(x), self.span.weight, self.span.bias, self.kernel_size,
                                 self.channels, *geometry)
        else:
            y = involution(x, self.kernel(x), *geometry)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, reduction_ratio={self.reduction_ratio}, homogeneous={self.homogeneous}, "
                f"bias={self.bias is not None}, fused={self.fused}")
