"""nn modules for SPEC.md §2: ``CondConv2d``, ``DynamicConv2d``, ``ODConv2d``, ``DRConv2d``.

Each is a drop-in replacement for ``nn.Conv2d``: the same leading constructor arguments, the same
output shape (``torch.nn.Conv2d``'s size rule) and memory format, any batch size including 1 in
training mode. All hold E expert kernels ``experts (E, Cout, Cin/groups, kh, kw)`` and, with
``bias=True``, expert biases ``(E, Cout)`` mixed by the same routing (ODConv: a static bias, see
there), and convolve with ``dynconv.expert_conv2d``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops._checks import as_pair
from dynconv.ops.expert_conv import expert_conv2d


def _batch_norm(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """BatchNorm that also trains on one value per channel (batch 1 after global pooling).

    Batch statistics of a single value are undefined (nn.BatchNorm2d raises); there we normalise
    with the running statistics and leave them unchanged, as in evaluation.
    """
    if bn.training and z.shape[0] * z.shape[2] * z.shape[3] == 1:
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(z)


class _ExpertConv2d(nn.Module):
    """E expert kernels and the conv geometry; subclasses supply the routing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, num_experts: int = 4, expert_bias: bool = True):
        super().__init__()
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.in_channels, self.out_channels, self.groups, self.num_experts = in_channels, out_channels, groups, num_experts
        self.kernel_size = as_pair(kernel_size, "kernel_size", 1)
        self.stride = as_pair(stride, "stride", 1)
        self.padding = as_pair(padding, "padding", 0)
        self.dilation = as_pair(dilation, "dilation", 1)
        self.experts = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        shape = (num_experts, out_channels) if expert_bias else (out_channels,)
        self.bias = nn.Parameter(torch.empty(shape)) if bias else None
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        """Every expert initialised as nn.Conv2d initialises its one kernel."""
        for expert in self.experts.data:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.experts.shape[2] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, x, routing, bias, **attention):
        return expert_conv2d(x, self.experts, routing, bias, self.stride, self.padding, self.dilation, self.groups,
                             **attention)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, num_experts={self.num_experts}")


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Global average pool, (B, C)."""
    return x.mean(dim=(2, 3))


class CondConv2d(_ExpertConv2d):
    """CondConv (Yang et al., NeurIPS 2019): ``routing = sigmoid(Linear(GAP(x)))``, one mixed kernel
    per sample, as timm's ``CondConv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, num_experts: int = 4):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts)
        self.routing_fn = nn.Linear(in_channels, num_experts)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.routing_fn(_pooled(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.routing(x), self.bias)


class DynamicConv2d(_ExpertConv2d):
    """Dynamic convolution (Chen et al., CVPR 2020):
    ``routing = softmax(FC(ReLU(FC(GAP(x)))) / τ)`` with hidden width ``in_channels // reduction_ratio + 1``
    (the reference code's). Anneal τ with ``update_temperature`` (the paper: 30 → 1 over the
    first epochs)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, num_experts: int = 4, reduction_ratio: int = 4,
                 temperature: float = 30.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts)
        hidden = in_channels // reduction_ratio + 1
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_experts)
        self.update_temperature(temperature)

    def update_temperature(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(F.relu(self.fc1(_pooled(x)))) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.routing(x), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class ODConv2d(_ExpertConv2d):
    """Omni-dimensional dynamic convolution (Li et al., ICLR 2022), as the reference code.

    One trunk ``ReLU(BN(conv1x1(GAP(x))))`` of width ``max(int(in_channels · reduction), 16)``
    feeds four attentions: input channels (sigmoid, scales x), output channels (sigmoid, scales
    y), the kh × kw taps (sigmoid, ``spatial``) and the experts (softmax). Like the reference, a
    depth-wise conv has no output-channel attention, a 1x1 conv no spatial attention and a single
    expert no expert attention. The reference has no bias; here ``bias=True`` adds a static
    ``(Cout,)`` bias after the output-channel attention, as nn.Conv2d would. With batch 1 in
    training mode the trunk's BatchNorm uses its running statistics (see ``_batch_norm``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, num_experts: int = 4, reduction: float = 0.0625,
                 temperature: float = 1.0, min_channels: int = 16):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts,
                         expert_bias=False)
        width = max(int(in_channels * reduction), min_channels)
        self.temperature = float(temperature)
        self.fc = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.channel_fc = nn.Conv2d(width, in_channels, 1)
        depthwise = in_channels == groups and in_channels == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(width, out_channels, 1)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(width, taps, 1)
        self.kernel_fc = None if num_experts == 1 else nn.Conv2d(width, num_experts, 1)
        self._init_attention()

    def _init_attention(self) -> None:
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        for fc in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(fc.bias)

    def attentions(self, x: torch.Tensor):
        """(channel (B, Cin, 1, 1), filter (B, Cout, 1, 1) or None, spatial (B, kh, kw) or None, kernel (B, E))."""
        B = x.shape[0]
        trunk = F.relu(_batch_norm(self.bn, self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(trunk) / t)
        filt = torch.sigmoid(self.filter_fc(trunk) / t) if self.filter_fc is not None else None
        spatial = (torch.sigmoid(self.spatial_fc(trunk) / t).reshape(B, *self.kernel_size)
                   if self.spatial_fc is not None else None)
        if self.kernel_fc is not None:
            kernel = torch.softmax(self.kernel_fc(trunk).reshape(B, -1) / t, dim=1)
        else:
            kernel = trunk.new_ones(B, 1)
        return channel, filt, spatial, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filt, spatial, kernel = self.attentions(x)
        y = self._conv(x * channel, kernel, None, spatial=spatial)
        if filt is not None:
            y = y * filt
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y


class DRConv2d(_ExpertConv2d):
    """Dynamic region-aware convolution (Chen et al., CVPR 2021) with shared expert kernels.

    ``guide = conv(x)`` to ``region_num`` channels with this conv's kernel size, stride, padding
    and dilation, so it has exactly the output's ``Ho × Wo`` positions; each output pixel uses the
    kernel of its argmax region (straight-through softmax gradient to the guide). Per-sample,
    per-region kernels come from GAP(x) as in the reference code's kernel generator (1x1 conv to
    ``region_num²`` channels, sigmoid, grouped 1x1 conv, one group per region), here producing
    each region's routing over ``num_experts`` shared kernels (softmax) instead of the full kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, region_num: int = 8, num_experts: int = 8):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, num_experts)
        if region_num < 1:
            raise ValueError(f"region_num must be >= 1, got {region_num}")
        self.region_num = region_num
        self.guide = nn.Conv2d(in_channels, region_num, self.kernel_size, self.stride, self.padding, self.dilation)
        self.routing_hidden = nn.Conv2d(in_channels, region_num * region_num, 1)
        self.routing_out = nn.Conv2d(region_num * region_num, region_num * num_experts, 1, groups=region_num)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(B, region_num, num_experts)."""
        hidden = torch.sigmoid(self.routing_hidden(F.adaptive_avg_pool2d(x, 1)))
        logits = self.routing_out(hidden).reshape(x.shape[0], self.region_num, self.num_experts)
        return torch.softmax(logits, dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.routing(x), self.bias, guide=self.guide(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, region_num={self.region_num}"
