"""bf16 through the Triton interpreter (issue 11), with the harness's GPU-semantics shim
(tests/interpreter_bf16.py, installed by conftest.py).

First the shim itself against torch: casts to and from bf16 bit for bit, ``tl.dot`` on bf16 and bf16
arithmetic. Then every op in bf16, ``tl.dot`` paths included, forward and every gradient against
float64 references on NaN-poisoned allocations, NCHW and channels_last, at the bf16 tolerance of
tests/helpers.py (no looser than fp16's scaled by the ratio of the formats' epsilons).
"""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import dynconv
from dynconv.kernels import expert_conv as expert_kernels
from dynconv.reference import expert_conv2d_loop, involution_fused_reference, involution_unfold
from helpers import TOLERANCES, check_against_reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs).to(dst_ptr.dtype.element_ty))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, out_dtype=tl.float32))


@triton.jit
def _arith_kernel(a_ptr, b_ptr, sum_ptr, prod_ptr, neg_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a, b = tl.load(a_ptr + offs), tl.load(b_ptr + offs)
    tl.store(sum_ptr + offs, a + b)
    tl.store(prod_ptr + offs, a * b)
    tl.store(neg_ptr + offs, -a)


def _special_float32(n: int) -> torch.Tensor:
    """Ties to even both ways, the issue's 1 + 2^-8 + 2^-10, overflow to inf, subnormals, signed zero,
    inf and NaNs (one whose payload is only in the bits a truncation drops), then random values."""
    special = [1 + 2**-8 + 2**-10, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-10), 3.3e38, -3.3e38, 3.4e38,
               1e-40, -1e-40, 2**-133, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-3, 65504.0]
    x = torch.randn(n, dtype=torch.float32) * torch.logspace(-30, 30, n, dtype=torch.float64).float()
    x[: len(special)] = torch.tensor(special, dtype=torch.float32)
    x.view(torch.int32)[len(special)] = 0x7F800001  # a NaN that truncation would turn into inf
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 3.3e38 -> fp16 is inf, as on a GPU
def test_shim_casts_round_to_nearest_even_like_torch():
    x = _special_float32(64)
    assert x[0].to(torch.bfloat16).item() == 1.0078125
    out = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, N=64)
    expected = x.to(torch.bfloat16)
    assert out[0].item() == 1.0078125, "fp32 -> bf16 truncates (the interpreter's own cast)"
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(_bits(out[~nan]), _bits(expected[~nan])), "fp32 -> bf16 differs from torch"
    for source in (torch.float16, torch.float64):
        xs = x.to(source)
        _cast_kernel[(1,)](xs, out, N=64)
        expected = xs.to(torch.bfloat16) if source == torch.float16 else xs.float().to(torch.bfloat16)
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan) and torch.equal(_bits(out[~nan]), _bits(expected[~nan])), source
    # Every kind of fp32 bit pattern (NaNs, subnormals, infinities included), at random.
    x = torch.randint(-2**31, 2**31, (4096,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    out = torch.empty(4096, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, N=4096)
    expected = x.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan) and torch.equal(_bits(out[~nan]), _bits(expected[~nan])), "random bits"
    # And back: bf16 widens exactly.
    b = torch.cat([_special_float32(64), x[64:]]).to(torch.bfloat16)
    for target in (torch.float32, torch.float16, torch.float64):
        wide = torch.empty(b.numel(), dtype=target)
        _cast_kernel[(1,)](b, wide, N=b.numel())
        torch.testing.assert_close(wide, b.to(target), equal_nan=True, rtol=0, atol=0, msg=str(target))


def test_shim_dot_multiplies_bf16_values():
    a = torch.randn(16, 32).to(torch.bfloat16)
    b = torch.randn(32, 16).to(torch.bfloat16)
    c = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, c, M=16, K=32, N=16)
    # bf16 products are exact in fp32: only the summation order differs from torch's.
    torch.testing.assert_close(c, a.double().matmul(b.double()).float(), rtol=1e-5, atol=1e-5)


def test_shim_bf16_arithmetic_rounds_like_torch():
    a, b = torch.randn(32).to(torch.bfloat16), torch.randn(32).to(torch.bfloat16)
    outs = [torch.empty(32, dtype=torch.bfloat16) for _ in range(3)]
    _arith_kernel[(1,)](a, b, *outs, N=32)
    for name, out, expected in zip(("a + b", "a * b", "-a"), outs, (a + b, a * b, -a)):
        assert torch.equal(_bits(out), _bits(expected)), name


def test_bf16_tolerance_is_fp16s_scaled_by_the_format():
    scale = torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float16).eps  # 8
    for bf16, fp16 in zip(TOLERANCES[torch.bfloat16], TOLERANCES[torch.float16]):
        assert bf16 <= fp16 * scale


# --------------------------------------------------------------------------------------------
# Every op in bf16 (tiny shapes: the interpreter is slow)
# --------------------------------------------------------------------------------------------

def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("fmt", FORMATS)
def test_involution_and_dynamic_dwconv2d(fmt, device):
    B, C, H, W, K, G = 1, 4, 4, 5, 3, 2
    check_against_reference(dynconv.involution, involution_unfold,
                            {"x": _randn(B, C, H, W), "weight": _randn(B, G, K, K, H, W)},
                            torch.bfloat16, device, FORMATS[fmt], stride=1, padding=1, dilation=1)
    # Per-sample weights, stride 2 with odd H (the deterministic per-tile weight-gradient partials).
    check_against_reference(dynconv.dynamic_dwconv2d, involution_unfold,
                            {"x": _randn(1, C, 5, 4), "weight": _randn(1, C, K, K), "bias": _randn(1, C)},
                            torch.bfloat16, device, FORMATS[fmt], stride=2, padding=1, dilation=1)


def _expert(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return dynconv.expert_conv2d(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _expert_reference(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return expert_conv2d_loop(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


# (regions m, ODConv spatial attention, DRConv guide, mixed kernels materialised): CondConv mixing
# on the fly, ODConv from materialised kernels, DRConv (3 regions, straight-through guide gradient) both ways.
EXPERT_CASES = {"condconv": (1, False, False, False), "odconv-spatial-materialised": (1, True, False, True),
                "drconv-guide": (3, False, True, False), "drconv-guide-materialised": (3, False, True, True)}


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_conv2d(case, fmt, device, monkeypatch):
    m, spatial, guide, materialise = EXPERT_CASES[case]
    monkeypatch.setattr(expert_kernels, "should_materialise", lambda *args: materialise)
    B, Cin, Cout, H, W, E, k = 1, 4, 6, 4, 5, 3, 3
    inputs = {"x": _randn(B, Cin, H, W), "experts": _randn(E, Cout, Cin, k, k) * 0.5,
              "routing": torch.rand(B, m, E, dtype=torch.float64) if guide else torch.rand(B, E, dtype=torch.float64),
              "bias": _randn(E, Cout), "spatial": torch.rand(B, k, k, dtype=torch.float64) + 0.5 if spatial else None,
              # Logits far apart: bf16 rounding must not tie two regions of a pixel.
              "guide": _randn(B, m, H, W) * 4 if guide else None}
    check_against_reference(_expert, _expert_reference, inputs, torch.bfloat16, device, FORMATS[fmt],
                            stride=1, padding=1, dilation=1, groups=1)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 16, 4, 5, 3, 16, 8), (1, 32, 6, 7, 3, 2, 8)], ids=["per-tap", "halo"])
def test_involution_fused(shape, fmt, device):
    # G = 16 and R padded to 16: the weight, dz and span-gradient products of the per-tap kernels
    # all run on tl.dot; 16 channels per group take the halo kernels (forward, dz, dspan).
    B, C, H, W, K, G, R = shape
    inputs = {"x": _randn(B, C, H, W), "z": _randn(B, R, H, W), "span_weight": _randn(K * K * G, R) / R ** 0.5,
              "span_bias": _randn(K * K * G)}
    check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.bfloat16, device,
                            FORMATS[fmt], kernel_size=K, groups=G, stride=1, dilation=1)
