"""Input validation shared by every op: each check raises a ValueError/TypeError naming the problem
before any kernel runs."""
from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import torch

from dynconv.kernels._launch import is_channels_last, memory_format_of

__all__ = ["FLOAT_DTYPES", "as_pair", "check_tensor", "check_dtypes_and_devices", "conv_output_size", "output_hw",
           "is_channels_last", "memory_format_of", "autocast_inputs"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a pair."""
    if type(value) is int and value >= minimum:  # the common case, on every call: keep it cheap
        return (value, value)
    if type(value) in (list, tuple) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= minimum and value[1] >= minimum:
        return (value[0], value[1])
    if _is_int(value):
        pair = (_as_int(value), _as_int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (_as_int(value[0]), _as_int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _is_int(value) -> bool:
    """Python, numpy and symbolic integers (as F.conv2d takes them); never a bool."""
    return isinstance(value, torch.SymInt) or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def _as_int(value):
    """A plain int (hashable, printable like one) for every integer but a symbolic one."""
    return value if isinstance(value, torch.SymInt) else operator.index(value)


def check_tensor(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_dtypes_and_devices(**tensors: torch.Tensor | None) -> None:
    """All given tensors share one floating dtype and one device."""
    dtype = device = None
    for t in tensors.values():  # every call passes this loop: keep it cheap, name culprits below
        if t is None:
            continue
        if dtype is None:
            dtype, device = t.dtype, t.device
            if dtype not in FLOAT_DTYPES:
                break
        elif t.dtype != dtype or t.device != device:
            break
    else:
        return
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise TypeError(f"all tensors must have the same dtype, got {listing}")
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch.nn.Conv2d's output size rule."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_hw(x_hw, kernel: tuple[int, int], stride, padding, dilation, empty_ok: bool = False) -> tuple[int, int]:
    """The output size, which must be positive; with ``empty_ok`` an empty input axis may give an
    empty output axis (nothing is computed on it)."""
    out = tuple(conv_output_size(x_hw[d], kernel[d], stride[d], padding[d], dilation[d]) for d in range(2))
    if any(out[d] < 1 and not (empty_ok and out[d] == 0 and x_hw[d] == 0) for d in range(2)):
        raise ValueError(
            f"output size {out} is not positive: input {tuple(x_hw)}, kernel {kernel}, stride {stride}, "
            f"padding {padding}, dilation {dilation}"
        )
    return out


def autocast_inputs(*tensors):
    """Under autocast, cast floating inputs to the autocast dtype (what a conv would do)."""
    if not torch._C._is_any_autocast_enabled():  # one C call instead of a device lookup per call
        return tensors
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
