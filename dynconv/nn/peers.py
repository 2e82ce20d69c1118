"""Load the weights of the public reference implementations into the dynconv modules.

Each ``*_from_*`` function takes the peer module or its ``state_dict`` (keys relative to the module)
and the peer's own constructor arguments, under the peer's own names, and returns the equivalent
dynconv module with the weights loaded: it computes the same outputs (to float rounding) in
evaluation and in training mode. The dtype and device follow the peer's weights.

- timm ``CondConv2d`` → ``condconv2d_from_timm``: a ``CondConv2d(shared_routing=True)``, called as
  timm's, ``module(x, routing_weights)`` (EfficientNet-CondConv shares one routing per block).
- OSVAI ``ODConv2d`` → ``odconv2d_from_osvai``: an ``ODConv2d``.
- the DynamicConv reference's ``Dynamic_conv2d`` → ``dynamicconv2d_from_reference``: a ``DynamicConv2d``.
- the official ``involution`` (mmcv ``ConvModule`` names) → ``involution2d_from_official``: an
  ``Involution2d``; ``convert_involution_checkpoint`` renames every involution of a whole
  checkpoint (RedNet).
- DWNet's ``DynamicDWConv`` → ``dynamic_dwconv2d_from_dwnet``: a ``DynamicDWConv2d``.
- DWNet's ``IDynamicDWConv`` → ``involution2d_from_dwnet``: an ``Involution2d``.
- megvii's ``DRConv`` → ``drconv2d_from_megvii``: a ``DRConv2d(design='megvii')``, called with the
  block's mask-net logits, ``module(x, mask_logits)``.

The public PyTorch DRConv re-implementation that generates full per-region kernels from an input
average-pooled to k × k has no form as a mix of shared experts, so it has no converter here.

A peer's 1x1 conv bias in front of a BatchNorm (DWNet's ``IDynamicDWConv``) is folded into the
BatchNorm's running mean: the BatchNorm removes it from the batch statistics anyway.
"""
from __future__ import annotations

from torch import nn

from ._common import int_pair
from .expert import CondConv2d, DRConv2d, DynamicConv2d, ODConv2d
from .involution import DynamicDWConv2d, Involution2d

__all__ = ["condconv2d_from_timm", "odconv2d_from_osvai", "dynamicconv2d_from_reference", "involution2d_from_official",
           "convert_involution_checkpoint", "dynamic_dwconv2d_from_dwnet", "involution2d_from_dwnet",
           "drconv2d_from_megvii"]


def _state(source) -> dict:
    return dict(source.state_dict() if isinstance(source, nn.Module) else source)


def _factory(state: dict) -> dict:
    t = next(v for v in state.values() if v.is_floating_point())
    return {"device": t.device, "dtype": t.dtype}


def _loaded(module: nn.Module, state: dict) -> nn.Module:
    module.load_state_dict(state)  # strict: every peer weight has a place, every one of ours a value
    return module


def _renamed(state: dict, renames: dict[str, str]) -> dict:
    """Keys renamed by prefix: ``{'attention.': ''}`` maps ``attention.fc.weight`` to ``fc.weight``."""
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _fold_bias_into_bn(state: dict, conv_bias: str, bn: str) -> dict:
    """``BN(conv(x) + b)`` is ``BN'(conv(x))`` with ``running_mean' = running_mean - b``."""
    bias = state.pop(conv_bias, None)
    if bias is not None:
        state[bn + "running_mean"] = state[bn + "running_mean"] - bias
    return state


# ---------------------------------------------------------------------------------------------
# Family 2: expert kernels
# ---------------------------------------------------------------------------------------------

def _timm_padding(padding, kernel_size, stride, dilation):
    """timm's padding rule: '' (its default) is ``((s-1) + d·(k-1)) // 2``; 'same' is static when it
    can be (stride 1, even total), else TensorFlow's input-dependent SAME."""
    if not isinstance(padding, str):
        return padding
    mode = padding.lower()
    if mode == "valid":
        return 0
    k, s, d = int_pair(kernel_size, "kernel_size", 1), int_pair(stride, "stride", 1), int_pair(dilation, "dilation", 1)
    if mode == "same" and any(si != 1 or di * (ki - 1) % 2 for ki, si, di in zip(k, s, d)):
        if s != (1, 1):
            raise ValueError("timm's dynamic 'same' padding at stride > 1 depends on the input size; "
                             "dynconv modules pad statically: pad the input yourself and use padding=0")
        return "same"  # at stride 1 TensorFlow's SAME is PyTorch's (the smaller half first)
    return tuple(((si - 1) + di * (ki - 1)) // 2 for ki, si, di in zip(k, s, d))


def condconv2d_from_timm(source, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding="",
                         dilation=1, groups: int = 1, bias: bool = False, num_experts: int = 4) -> CondConv2d:
    """timm's ``CondConv2d`` (weights ``(E, Cout·Cin/g·kh·kw)``; routing computed by the block and
    passed in, as EfficientNet-CondConv shares one across three convs): call ``module(x, routing)``."""
    state = _state(source)
    module = CondConv2d(in_channels, out_channels, kernel_size, stride, _timm_padding(padding, kernel_size, stride,
                                                                                      dilation),
                        dilation, groups, bias, num_experts=num_experts, shared_routing=True, **_factory(state))
    state["weight"] = state["weight"].reshape(module.weight.shape)
    return _loaded(module, state)


def odconv2d_from_osvai(source, in_planes: int, out_planes: int, kernel_size: int, stride=1, padding=0, dilation=1,
                        groups: int = 1, reduction: float = 0.0625, kernel_num: int = 4,
                        temperature: float = 1.0) -> ODConv2d:
    """OSVAI's ``ODConv2d`` (attention in ``attention.*``, no bias; ``temperature``: its attention's
    current ``temperature``, which its state_dict does not hold)."""
    state = _renamed(_state(source), {"attention.": ""})
    module = ODConv2d(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, False,
                      num_experts=kernel_num, reduction=reduction, temperature=temperature, **_factory(state))
    state["weight"] = state["weight"].reshape(module.weight.shape)
    return _loaded(module, state)


def dynamicconv2d_from_reference(source, in_planes: int, out_planes: int, kernel_size: int, ratio: float = 0.25,
                                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, K: int = 4,
                                 temperature: float = 34.0) -> DynamicConv2d:
    """The DynamicConv reference's ``Dynamic_conv2d`` (hidden width ``int(in_planes·ratio) + 1``,
    or K for a first layer with ``in_planes == 3``; ``temperature``: its attention's current one)."""
    state = _renamed(_state(source), {"attention.": ""})
    hidden = K if in_planes == 3 else int(in_planes * ratio) + 1
    module = DynamicConv2d(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, bias, num_experts=K,
                           temperature=temperature, hidden_channels=hidden, **_factory(state))
    state["weight"] = state["weight"].reshape(module.weight.shape)
    state["fc1.weight"] = state["fc1.weight"].flatten(1)
    state["fc2.weight"] = state["fc2.weight"].flatten(1)
    return _loaded(module, state)


def drconv2d_from_megvii(source, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                         groups: int = 1, bias: bool = True, dilation=1, groups_num: int = 8,
                         num_W: int = 8) -> DRConv2d:
    """megvii's ``DRConv`` (weights ``(Cout·Cin·kh·kw, num_W)``, routing ``2·sigmoid(routing_fc(GAP))
    / num_W``, static bias): call ``module(x, guide)`` with the logits of the block's mask net
    (megvii passes their argmax as ``mask``; the argmax of the logits is that mask)."""
    if groups != 1:
        raise ValueError(f"megvii's DRConv holds full (Cout, Cin) kernels and runs with groups=1, got groups={groups}")
    state = _state(source)
    module = DRConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias,
                      region_num=groups_num, num_experts=num_W, design="megvii", **_factory(state))
    state["weight"] = state["weight"].t().reshape(module.weight.shape)
    return _loaded(module, state)


# ---------------------------------------------------------------------------------------------
# Family 1: involution and dynamic depth-wise conv
# ---------------------------------------------------------------------------------------------

_INVOLUTION_RENAMES = {"conv1.conv.": "reduce.", "conv1.bn.": "bn.", "conv2.conv.": "span."}


def involution2d_from_official(source, channels: int, kernel_size: int, stride: int) -> Involution2d:
    """The official ``involution`` (mmcv ``ConvModule`` names ``conv1.conv``, ``conv1.bn``, ``conv2.conv``;
    16 channels per group, reduction 4)."""
    state = _renamed(_state(source), _INVOLUTION_RENAMES)
    module = Involution2d(channels, kernel_size, stride, group_channels=16, reduction_ratio=4, **_factory(state))
    return _loaded(module, state)


def convert_involution_checkpoint(state_dict: dict) -> dict:
    """A whole checkpoint (RedNet) with every official involution's keys renamed to ``Involution2d``'s,
    for a model whose involutions were replaced by ``Involution2d(channels, K, stride)``. An
    involution is recognised by ``conv1.conv.weight``, ``conv1.bn.weight`` and ``conv2.conv.weight``
    under one prefix; every other key is kept as it is."""
    suffix = "conv1.conv.weight"
    prefixes = [key[:-len(suffix)] for key in state_dict if key.endswith(suffix)
                and key[:-len(suffix)] + "conv1.bn.weight" in state_dict
                and key[:-len(suffix)] + "conv2.conv.weight" in state_dict]
    renames = {prefix + old: prefix + new for prefix in prefixes for old, new in _INVOLUTION_RENAMES.items()}
    return _renamed(dict(state_dict), renames)


def dynamic_dwconv2d_from_dwnet(source, dim: int, kernel_size: int, bias: bool = True, stride=1, padding=1,
                                groups: int = 1, reduction: int = 4) -> DynamicDWConv2d:
    """DWNet's homogeneous ``DynamicDWConv`` (used with ``groups=dim``; its blocks pad by
    ``kernel_size // 2``, which for even K grows the output by one, as nn.Conv2d would)."""
    if groups != dim:
        raise ValueError(f"DWNet's DynamicDWConv generates one kernel per channel and runs with groups=dim={dim}, "
                         f"got groups={groups}")
    state = _fold_bias_into_bn(_renamed(_state(source), {"conv1.": "reduce.", "conv2.": "span."}), "reduce.bias",
                               "bn.")
    module = DynamicDWConv2d(dim, kernel_size, stride, reduction, homogeneous=True, bias=bias, padding=padding,
                             **_factory(state))
    return _loaded(module, state)


def involution2d_from_dwnet(source, channels: int, kernel_size: int, group_channels: int) -> Involution2d:
    """DWNet's inhomogeneous ``IDynamicDWConv`` (``group_channels``: what DWNet passes, its head count;
    ``conv1 = Sequential(conv1x1 with bias, BN, ReLU)``, ``conv2 = Sequential(conv1x1)``)."""
    state = _renamed(_state(source), {"conv1.0.": "reduce.", "conv1.1.": "bn.", "conv2.0.": "span."})
    state = _fold_bias_into_bn(state, "reduce.bias", "bn.")
    module = Involution2d(channels, kernel_size, 1, group_channels=group_channels, reduction_ratio=4,
                          padding=(kernel_size - 1) // 2, **_factory(state))
    return _loaded(module, state)
