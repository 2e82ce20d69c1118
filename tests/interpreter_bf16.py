"""bf16 on the Triton interpreter, made to follow the GPU. Test harness only: the library never imports it.

The interpreter (triton 3.6 to 3.9 at least) keeps bf16 values as their uint16 bit patterns and
gets them wrong in three places; on a GPU each is one correct instruction:

* ``tl.dot`` on bf16 operands multiplies the bit patterns as integers (triton-lang/triton#11584).
  GPU: the products of bf16 values, accumulated in fp32.
* Casts to bf16 truncate the fp32 mantissa (no rounding mode is passed), and NaNs whose payload
  sits in the low bits become infinities; other sources (fp16, fp64, integers) are cast as the
  integer value of their bits. GPU: ``cvt.rn.bf16.f32``, round to nearest even, NaN stays NaN.
  Casts from bf16 to anything but fp32 read the bit pattern as an integer. GPU: exact widening.
* Arithmetic with bf16 operands (``a + b`` on two bf16 tensors stays bf16 in Triton's type rules)
  runs on the bit patterns. GPU: the bf16 (or fp32) instruction, rounded to nearest even.

``install()`` replaces ``InterpreterBuilder.cast_impl``, ``create_fp_to_fp``, ``create_dot``,
``binary_op`` and ``unary_op`` with wrappers that widen bf16 operands to fp32 exactly (``bits << 16``),
call the interpreter's own fp32 code, and round fp32 results back with torch's round-to-nearest-even
conversion (the GPU's). Everything without a bf16 operand or result goes to the original method
untouched. Known difference left: fp64 -> bf16 rounds twice (through fp32), the GPU once.
``tests/conftest.py`` installs it for the whole interpreter run; ``tests/test_bf16_interpreter.py``
checks it against torch and runs every op in bf16 through it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

_Builder = interpreter.InterpreterBuilder
_Handle = interpreter.TensorHandle
_ORIGINAL = {name: getattr(_Builder, name) for name in ("cast_impl", "create_fp_to_fp", "create_dot", "binary_op",
                                                         "unary_op")}
_RTZ = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
_RTZ = getattr(_RTZ, "RTZ", None)
_COMPARISONS = {np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal}


def _is_bf16(dtype) -> bool:
    return getattr(dtype, "scalar", dtype) == tl.bfloat16


def bf16_bits_to_float32(bits) -> np.ndarray:
    """Exact: a bf16 value is the top half of the fp32 with the same bits."""
    return (np.asarray(bits).astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_bf16_bits(values, truncate: bool = False) -> np.ndarray:
    """``values`` (any real dtype) as bf16 bit patterns: round to nearest even, as torch and the GPU
    do, or toward zero when ``truncate`` (an explicit rtz rounding mode). NaN stays NaN."""
    array = np.asarray(values)
    shape = array.shape
    t = torch.from_numpy(np.ascontiguousarray(array.reshape(-1)))
    if t.dtype == torch.bool:
        t = t.to(torch.float32)
    if truncate:
        bits32 = t.to(torch.float32).numpy().view(np.uint32)
        out = (bits32 >> 16).astype(np.uint16)
        out[np.isnan(t.to(torch.float32).numpy())] = 0x7FC0
    else:
        out = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return out.reshape(shape)


def _widened(handle):
    """A bf16 handle as an fp32 one (exact); any other handle unchanged."""
    if _is_bf16(handle.dtype):
        return _Handle(bf16_bits_to_float32(handle.data), tl.float32)
    return handle


def _cast_impl(self, src, dst_type):
    src_bf16, dst_bf16 = _is_bf16(src.dtype), _is_bf16(dst_type)
    if not (src_bf16 or dst_bf16):
        return _ORIGINAL["cast_impl"](self, src, dst_type)
    if src_bf16 and dst_bf16:
        return _Handle(np.asarray(src.data).astype(np.uint16), tl.bfloat16)
    if dst_bf16:
        return _Handle(to_bf16_bits(src.data), tl.bfloat16)
    return _ORIGINAL["cast_impl"](self, _widened(src), dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    src_bf16, dst_bf16 = _is_bf16(src.dtype), _is_bf16(dst_type)
    other = dst_type if src_bf16 else src.dtype
    if not (src_bf16 or dst_bf16) or getattr(other, "scalar", other).primitive_bitwidth == 8:
        return _ORIGINAL["create_fp_to_fp"](self, src, dst_type, rounding_mode)  # fp8: not ours to fix
    if dst_bf16 and not src_bf16:
        truncate = _RTZ is not None and rounding_mode == _RTZ
        return _Handle(to_bf16_bits(src.data, truncate), tl.bfloat16)
    return _cast_impl(self, src, dst_type)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if not (_is_bf16(a.dtype) or _is_bf16(b.dtype)):
        return _ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
    return _ORIGINAL["create_dot"](self, _widened(a), _widened(b), d, input_precision, max_num_imprecise_acc)


def _rounded_back(result, op):
    """An fp32 result of an op on widened bf16 operands, rounded to bf16 (comparisons stay as they are)."""
    if op in _COMPARISONS or not np.issubdtype(np.asarray(result.data).dtype, np.floating):
        return result
    return _Handle(to_bf16_bits(result.data), tl.bfloat16)


def _binary_op(self, lhs, rhs, op):
    if not (_is_bf16(lhs.dtype) and _is_bf16(rhs.dtype)):
        return _ORIGINAL["binary_op"](self, lhs, rhs, op)
    return _rounded_back(_ORIGINAL["binary_op"](self, _widened(lhs), _widened(rhs), op), op)


def _unary_op(self, arg, op):
    if not _is_bf16(arg.dtype):
        return _ORIGINAL["unary_op"](self, arg, op)
    return _rounded_back(_ORIGINAL["unary_op"](self, _widened(arg), op), op)


_PATCHES = {"cast_impl": _cast_impl, "create_fp_to_fp": _create_fp_to_fp, "create_dot": _create_dot,
            "binary_op": _binary_op, "unary_op": _unary_op}


def install() -> None:
    """Patch the interpreter's builder (idempotent)."""
    for name, method in _PATCHES.items():
        setattr(_Builder, name, method)


def uninstall() -> None:
    """Restore the interpreter's own methods."""
    for name, method in _ORIGINAL.items():
        setattr(_Builder, name, method)


def installed() -> bool:
    return all(getattr(_Builder, name) is method for name, method in _PATCHES.items())


@contextlib.contextmanager
def gpu_bf16_semantics(enabled: bool = True):
    """Within the block the shim is installed (``enabled``) or removed; the previous state is restored."""
    was = installed()
    (install if enabled else uninstall)()
    try:
        yield
    finally:
        (install if was else uninstall)()
