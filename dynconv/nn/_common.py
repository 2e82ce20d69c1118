"""What every dynconv module shares with nn.Conv2d: padding rules, input checks, BatchNorm on one value,
an annealed temperature kept in the state_dict."""
from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops._checks import as_pair

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def batch_norm(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """BatchNorm that also trains on one value per channel (batch 1 after global pooling) or none (batch 0).

    Batch statistics of a single value are undefined (nn.BatchNorm2d raises); there we normalise
    with the running statistics and leave them unchanged, as in evaluation.
    """
    if bn.training and z.shape[0] * z.shape[2] * z.shape[3] <= 1:
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(z)


def as_int(value, name: str, minimum: int) -> int:
    """A Python int from an int or a numpy integer (as ``F.conv2d`` accepts), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def int_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``as_pair`` that also takes numpy integers."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = operator.index(value)
    elif isinstance(value, (tuple, list)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                  for v in value):
        value = tuple(operator.index(v) for v in value)
    return as_pair(value, name, minimum)


def check_padding_mode(padding_mode) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return padding_mode


def resolve_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                    padding_mode: str):
    """nn.Conv2d's padding argument as (the op's symmetric padding pair, an explicit ``F.pad`` tuple or None).

    ``'valid'`` is no padding; ``'same'`` pads ``d·(k-1)`` per axis, the smaller half before, as
    PyTorch does. The op pads symmetrically with zeros; an asymmetric split or a padding_mode other
    than zeros pads the input explicitly instead (the op then pads nothing).
    """
    if isinstance(padding, str):
        if padding == "valid":
            sides = ((0, 0), (0, 0))
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            sides = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel_size, dilation))
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = int_pair(padding, "padding", 0)
        sides = ((ph, ph), (pw, pw))
    symmetric = all(before == after for before, after in sides)
    if symmetric and (padding_mode == "zeros" or not any(before for before, _ in sides)):
        return (sides[0][0], sides[1][0]), None
    (top, bottom), (left, right) = sides
    return (0, 0), (left, right, top, bottom)


def pad(x: torch.Tensor, explicit, padding_mode: str) -> torch.Tensor:
    """``x`` padded by ``explicit`` (F.pad's order) with nn.Conv2d's padding_mode, or ``x`` itself."""
    if explicit is None:
        return x
    return F.pad(x, explicit, mode="constant" if padding_mode == "zeros" else padding_mode)


def check_input(x, channels: int, name: str = "in_channels") -> None:
    """A 4-D input with the module's channel count, named before any matmul deep inside fails."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (B, {name}={channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels, but the module was built with {name}={channels}")


class AnnealedTemperature:
    """Mixin: a softmax/sigmoid temperature τ kept as a buffer, so an annealed τ survives save and load.

    Checkpoints written before τ was a buffer load with the module's current τ.
    """

    temperature: torch.Tensor

    def _register_temperature(self, temperature: float, factory_kwargs: dict) -> None:
        _check_temperature(temperature)
        self.initial_temperature = float(temperature)
        dtype = factory_kwargs.get("dtype") or torch.get_default_dtype()
        self.register_buffer("temperature", torch.full((), float(temperature), dtype=dtype,
                                                       device=factory_kwargs.get("device")))

    def update_temperature(self, temperature: float) -> None:
        """Sets τ (anneal it during training, e.g. 30 → 1 over the first epochs for DynamicConv)."""
        _check_temperature(temperature)
        with torch.no_grad():
            self.temperature.fill_(float(temperature))

    def _reset_temperature(self) -> None:
        with torch.no_grad():
            self.temperature.fill_(self.initial_temperature)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "temperature"
        if key not in state_dict:
            state_dict[key] = self.temperature.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _check_temperature(temperature) -> None:
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
