"""nn modules for docs/operators.md §2: ``CondConv2d``, ``DynamicConv2d``, ``ODConv2d``, ``DRConv2d``.

Each is a drop-in replacement for ``nn.Conv2d``: the same leading constructor arguments
(``in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
device, dtype``, with ``padding='same'``/``'valid'``), the same output shape and memory format, any
batch size including 0 and 1 in training mode, and ``model.to(memory_format=torch.channels_last)``.
Their own arguments (``num_experts`` and the routing's) are keyword-only.

The E expert kernels are stored as one conv weight ``weight (E·Cout, Cin/groups, kh, kw)``: a 4-D
parameter converts to channels_last with the rest of a model, and ``experts`` is its
``(E, Cout, Cin/groups, kh, kw)`` view (no copy, any layout: the kernels take every stride), which
``dynconv.expert_conv2d`` convolves with. Checkpoints holding the 5-D ``experts`` tensor of earlier
versions load unchanged. With ``bias=True`` expert biases ``(E, Cout)`` are mixed by the same
routing (ODConv: a static bias, see there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops._checks import conv_output_size
from dynconv.ops.expert_conv import expert_conv2d

from ._common import (AnnealedTemperature, as_int, batch_norm, check_input, check_padding_mode, int_pair, pad,
                      resolve_padding)

_CONV_ARGS = """
    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
        device, dtype: as ``nn.Conv2d`` (``padding`` also ``'same'``/``'valid'``; ``padding_mode``
            ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``)."""


class _ExpertConv2d(nn.Module):
    """E expert kernels and nn.Conv2d's geometry; subclasses supply the routing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, expert_bias: bool = True):
        super().__init__()
        in_channels, out_channels = as_int(in_channels, "in_channels", 1), as_int(out_channels, "out_channels", 1)
        groups, num_experts = as_int(groups, "groups", 1), as_int(num_experts, "num_experts", 1)
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.in_channels, self.out_channels, self.groups, self.num_experts = in_channels, out_channels, groups, num_experts
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = int_pair(stride, "stride", 1)
        self.padding = padding if isinstance(padding, str) else int_pair(padding, "padding", 0)
        self.dilation = int_pair(dilation, "dilation", 1)
        self.padding_mode = check_padding_mode(padding_mode)
        self._op_padding, self._explicit_padding = resolve_padding(self.padding, self.kernel_size, self.stride,
                                                                   self.dilation, padding_mode)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts * out_channels, in_channels // groups, *self.kernel_size,
                                               **factory))
        shape = (num_experts, out_channels) if expert_bias else (out_channels,)
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if bias else None

    @property
    def experts(self) -> torch.Tensor:
        """The expert kernels ``(E, Cout, Cin/groups, kh, kw)``: a view of ``weight``."""
        return self.weight.view(self.num_experts, self.out_channels, *self.weight.shape[1:])

    def reset_parameters(self) -> None:
        """Every expert initialised as nn.Conv2d initialises its one kernel (the fan-in is per expert)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        legacy = state_dict.pop(prefix + "experts", None)
        if legacy is not None and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = legacy.reshape(-1, *legacy.shape[2:]) if legacy.dim() == 5 else legacy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """nn.Conv2d's output size for an ``h × w`` input."""
        extra = self._explicit_padding or (0, 0, 0, 0)
        padded = (h + extra[2] + extra[3], w + extra[0] + extra[1])
        return tuple(conv_output_size(n, k, s, p, d) for n, k, s, p, d in
                     zip(padded, self.kernel_size, self.stride, self._op_padding, self.dilation))

    def _conv(self, x, routing, bias, **attention):
        x = pad(x, self._explicit_padding, self.padding_mode)
        return expert_conv2d(x, self.experts, routing, bias, self.stride, self._op_padding, self.dilation, self.groups,
                             **attention)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}, num_experts={self.num_experts}")


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Global average pool, (B, C)."""
    return x.mean(dim=(2, 3))


class CondConv2d(_ExpertConv2d):
    __doc__ = """CondConv (Yang et al., NeurIPS 2019): ``routing = sigmoid(Linear(GAP(x)))``, one mixed
    kernel per sample, as timm's ``CondConv2d``.

    ``forward(x, routing=None)``: a routing ``(B, num_experts)`` computed outside the module is used
    instead of the module's own (EfficientNet-CondConv shares one routing across a block's convs).
    """ + _CONV_ARGS + """
        num_experts: the number E of expert kernels.
        shared_routing: the module has no routing layer of its own and ``forward`` needs the routing
            (timm's design: the block computes it once for all its convs).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, shared_routing: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype, num_experts=num_experts)
        self.shared_routing = shared_routing
        self.routing_fn = None if shared_routing else nn.Linear(in_channels, num_experts, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.routing_fn is not None:
            self.routing_fn.reset_parameters()

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing_fn is None:
            raise ValueError("this CondConv2d was built with shared_routing=True: pass forward(x, routing)")
        return torch.sigmoid(self.routing_fn(_pooled(x)))

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.in_channels)
        if routing is None:
            routing = self.routing(x)
        elif routing.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"routing must have shape (B, num_experts) = {(x.shape[0], self.num_experts)}, "
                             f"got {tuple(routing.shape)}")
        return self._conv(x, routing, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_routing={self.shared_routing}"


class DynamicConv2d(AnnealedTemperature, _ExpertConv2d):
    __doc__ = """Dynamic convolution (Chen et al., CVPR 2020):
    ``routing = softmax(FC(ReLU(FC(GAP(x)))) / τ)``. Anneal τ with ``update_temperature`` (the
    paper: 30 → 1 over the first epochs); τ is a buffer, so it is saved and loaded with the weights.
    """ + _CONV_ARGS + """
        num_experts: the number E of expert kernels.
        reduction_ratio: the hidden width is ``in_channels // reduction_ratio + 1`` (the reference code's).
        temperature: the initial softmax temperature τ > 0.
        hidden_channels: the hidden width, overriding reduction_ratio (the reference code uses
            ``num_experts`` for a first layer with 3 input channels).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, reduction_ratio: int = 4, temperature: float = 30.0,
                 hidden_channels: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype, num_experts=num_experts)
        reduction_ratio = as_int(reduction_ratio, "reduction_ratio", 1)
        if hidden_channels is None:
            hidden_channels = in_channels // reduction_ratio + 1
        hidden_channels = as_int(hidden_channels, "hidden_channels", 1)
        self.reduction_ratio, self.hidden_channels = reduction_ratio, hidden_channels
        self._register_temperature(temperature, {"device": device, "dtype": dtype})
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_channels, num_experts, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        self._reset_temperature()

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(F.relu(self.fc1(_pooled(x)))) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        return self._conv(x, self.routing(x), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, reduction_ratio={self.reduction_ratio}, "
                f"temperature={self.initial_temperature}, hidden_channels={self.hidden_channels}")


class ODConv2d(AnnealedTemperature, _ExpertConv2d):
    __doc__ = """Omni-dimensional dynamic convolution (Li et al., ICLR 2022), as the reference code.

    One trunk ``ReLU(BN(conv1x1(GAP(x))))`` of width ``max(int(in_channels · reduction), min_channels)``
    feeds four attentions, each divided by the temperature τ: input channels (sigmoid, scales x),
    output channels (sigmoid, scales y), the kh × kw taps (sigmoid, ``spatial``) and the experts
    (softmax). Like the reference, a depth-wise conv has no output-channel attention, a 1x1 conv no
    spatial attention and a single expert no expert attention. The reference has no bias; here
    ``bias=True`` adds a static ``(Cout,)`` bias after the output-channel attention, as nn.Conv2d
    would. With batch 1 in training mode the trunk's BatchNorm uses its running statistics.
    """ + _CONV_ARGS + """
        num_experts: the number E of expert kernels.
        reduction: the trunk's width relative to in_channels.
        temperature: the initial attention temperature τ > 0 (``update_temperature`` anneals it; a buffer).
        min_channels: the trunk's minimum width.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, reduction: float = 0.0625, temperature: float = 1.0, min_channels: int = 16):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype, num_experts=num_experts, expert_bias=False)
        factory = {"device": device, "dtype": dtype}
        self.reduction, self.min_channels = reduction, min_channels
        self._register_temperature(temperature, factory)
        width = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Conv2d(in_channels, width, 1, bias=False, **factory)
        self.bn = nn.BatchNorm2d(width, **factory)
        self.channel_fc = nn.Conv2d(width, in_channels, 1, **factory)
        depthwise = in_channels == groups and in_channels == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(width, out_channels, 1, **factory)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(width, taps, 1, **factory)
        self.kernel_fc = None if num_experts == 1 else nn.Conv2d(width, num_experts, 1, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The experts as nn.Conv2d's kernel; the attention convs as the reference (Kaiming normal, fan out)."""
        super().reset_parameters()
        self.bn.reset_parameters()
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        for fc in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(fc.bias)
        self._reset_temperature()

    def attentions(self, x: torch.Tensor):
        """(channel (B, Cin, 1, 1), filter (B, Cout, 1, 1) or None, spatial (B, kh, kw) or None, kernel (B, E))."""
        B = x.shape[0]
        trunk = F.relu(batch_norm(self.bn, self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(trunk) / t)
        filt = torch.sigmoid(self.filter_fc(trunk) / t) if self.filter_fc is not None else None
        spatial = (torch.sigmoid(self.spatial_fc(trunk) / t).reshape(B, *self.kernel_size)
                   if self.spatial_fc is not None else None)
        if self.kernel_fc is not None:
            kernel = torch.softmax(self.kernel_fc(trunk).reshape(B, self.num_experts) / t, dim=1)
        else:
            kernel = trunk.new_ones(B, 1)
        return channel, filt, spatial, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        channel, filt, spatial, kernel = self.attentions(x)
        y = self._conv(x * channel, kernel, None, spatial=spatial)
        if filt is not None:
            y = y * filt
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, reduction={self.reduction}, temperature={self.initial_temperature}, "
                f"min_channels={self.min_channels}")


class DRConv2d(_ExpertConv2d):
    __doc__ = """Dynamic region-aware convolution (Chen et al., CVPR 2021) with shared expert kernels.

    Each output pixel uses the kernel of its argmax region of the guide logits ``(B, region_num,
    Ho, Wo)`` (straight-through softmax gradient to the guide); each region's kernel mixes the
    ``num_experts`` shared experts with a per-sample routing ``(B, region_num, num_experts)``.

    ``design='dynconv'`` (default): ``guide = conv(x)`` to ``region_num`` channels with this conv's
    kernel size, stride, padding, padding_mode and dilation, so it has exactly the output's
    ``Ho × Wo`` positions; the routing comes from GAP(x) as in the kernel generator of the public
    PyTorch re-implementation (1x1 conv to ``region_num²`` channels, sigmoid, grouped 1x1 conv,
    one group per region), here producing each region's softmax routing over the shared experts
    instead of the full kernel; ``bias=True`` gives expert biases mixed like the kernels.

    ``design='megvii'`` (the authors' code, so its checkpoints load): ``routing = 2·sigmoid(
    routing_fc(GAP(x))) / num_experts`` with one ``Linear(in_channels, region_num·num_experts)``,
    no guide conv of its own (``forward(x, guide)`` takes the logits of the block's separate mask
    net, resized to the output by nearest neighbour as the authors do), a static ``(Cout,)`` bias.
    """ + _CONV_ARGS + """
        region_num: the number m of regions.
        num_experts: the number E of shared expert kernels.
        design: ``'dynconv'`` or ``'megvii'``, see above.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 region_num: int = 8, num_experts: int = 8, design: str = "dynconv"):
        if design not in ("dynconv", "megvii"):
            raise ValueError(f"design must be 'dynconv' or 'megvii', got {design!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype, num_experts=num_experts, expert_bias=design == "dynconv")
        region_num = as_int(region_num, "region_num", 1)
        factory = {"device": device, "dtype": dtype}
        self.region_num, self.design = region_num, design
        if design == "megvii":
            self.routing_fc = nn.Linear(in_channels, region_num * num_experts, **factory)
        else:
            self.guide = nn.Conv2d(in_channels, region_num, self.kernel_size, self.stride, self.padding,
                                   self.dilation, padding_mode=padding_mode, **factory)
            self.routing_hidden = nn.Conv2d(in_channels, region_num * region_num, 1, **factory)
            self.routing_out = nn.Conv2d(region_num * region_num, region_num * num_experts, 1, groups=region_num,
                                         **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.design == "megvii":  # the authors' initialisation of the routing
            nn.init.normal_(self.routing_fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.routing_fc.bias)
            return
        for conv in (self.guide, self.routing_hidden, self.routing_out):
            conv.reset_parameters()

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(B, region_num, num_experts)."""
        shape = (x.shape[0], self.region_num, self.num_experts)
        if self.design == "megvii":
            return (2.0 / self.num_experts) * torch.sigmoid(self.routing_fc(_pooled(x))).reshape(shape)
        hidden = torch.sigmoid(self.routing_hidden(F.adaptive_avg_pool2d(x, 1)))
        return torch.softmax(self.routing_out(hidden).reshape(shape), dim=2)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``guide``: region logits ``(B, region_num, h, w)`` (needed by, and only by, ``design='megvii'``)."""
        check_input(x, self.in_channels)
        if self.design == "dynconv":
            if guide is not None:
                raise ValueError("design='dynconv' computes its own guide; pass guide only with design='megvii'")
            return self._conv(x, self.routing(x), self.bias, guide=self.guide(x))
        if guide is None:
            raise ValueError("design='megvii' needs the guide logits of the block's mask net: forward(x, guide)")
        out = self.output_size(x.shape[2], x.shape[3])
        if tuple(guide.shape[2:]) != out:
            guide = F.interpolate(guide, out, mode="nearest")
        y = self._conv(x, self.routing(x), None, guide=guide)
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, region_num={self.region_num}, design={self.design!r}"
