"""The plain-PyTorch CPU path (no Triton interpreter) picks the algorithms measured fastest in
perf_reports/cpu/, and each is right against a float64 reference: forward, every gradient and the
gradients of gradients.

* ``dynamic_dwconv2d`` (per-sample weights): one depthwise ``F.conv2d`` over ``(1, B·C, H, W)`` with
  ``groups = B·C``; its input gradient by the transposed conv; its weight gradient as a
  depthwise conv of the input by the output gradient. No shift-and-add.
* ``expert_conv2d``: one batch-as-groups conv whose output is returned as is (no copy), for DRConv
  over every region with each pixel's region gathered; its backward by one transposed conv, one
  ``convolution_backward`` (kernels and biases) and, for DRConv's guide, one conv over every region.
The choice is checked by spying on the calls, never by timing."""
import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv.kernels import _launch
from dynconv.ops import reference_expert, reference_involution
from dynconv.reference import drconv_all_regions, expert_conv2d_grouped, involution_unfold
from helpers import check_against_reference

F64 = torch.float64


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setattr(_launch, "_INTERPRETED", False)


@pytest.fixture
def conv_calls(monkeypatch):
    """Every F.conv2d call as (weight shape, groups, output)."""
    calls, real = [], F.conv2d

    def spy(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        y = real(input, weight, bias, stride, padding, dilation, groups)
        calls.append((tuple(weight.shape), groups, y))
        return y

    monkeypatch.setattr(F, "conv2d", spy)
    return calls


def _forbid(monkeypatch, module, *names):
    for name in names:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"the CPU path called {_name}")
        monkeypatch.setattr(module, name, refuse)


def test_dwconv_forward_is_one_depthwise_conv_over_the_batch(plain, conv_calls, monkeypatch):
    _forbid(monkeypatch, reference_involution, "involution_shift_add")
    B, C, K = 2, 4, 3
    dynconv.dynamic_dwconv2d(torch.randn(B, C, 5, 5), torch.randn(B, 2, K, K), torch.randn(B, C))
    assert [(w, g) for w, g, _ in conv_calls] == [((B * C, 1, K, K), B * C)]


def test_dwconv_backward_is_torch_depthwise_conv(plain, conv_calls, monkeypatch):
    _forbid(monkeypatch, reference_involution, "shift_add_backward_input", "shift_add_backward_weight")
    # torch's depthwise weight gradient is ~10x slower than the conv below; conv2d_input copies x.
    _forbid(monkeypatch, torch.nn.grad, "conv2d_weight", "conv2d_input")
    inputs, real = [], F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a: inputs.append(a[6]) or real(*a))
    B, C, K, H = 2, 4, 3, 5
    x, w = torch.randn(B, C, H, H, requires_grad=True), torch.randn(B, C, K, K, requires_grad=True)
    y = dynconv.dynamic_dwconv2d(x, w, stride=2)
    conv_calls.clear()
    torch.autograd.grad(y, [x, w], torch.randn_like(y))
    assert inputs == [B * C]
    # The weight gradient: the input convolved by the output gradient as a (B·C, 1, Ho, Wo) kernel.
    assert [(wt, g) for wt, g, _ in conv_calls] == [((B * C, 1, *y.shape[2:]), B * C)]


@pytest.mark.parametrize("guide", [False, True], ids=["condconv", "drconv"])
def test_expert_forward_returns_the_batch_as_groups_conv_itself(plain, conv_calls, monkeypatch, guide):
    _forbid(monkeypatch, reference_expert, "expert_conv2d_grouped", "drconv_all_regions", "select_regions")
    B, Cin, Cout, E, m, groups = 2, 4, 6, 3, 2, 2
    y = dynconv.expert_conv2d(torch.randn(B, Cin, 5, 5), torch.randn(E, Cout, Cin // groups, 3, 3),
                              torch.rand(B, m, E) if guide else torch.rand(B, E), torch.randn(E, Cout),
                              padding=1, groups=groups, guide=torch.randn(B, m, 5, 5) if guide else None)
    regions = m if guide else 1
    assert [(w, g) for w, g, _ in conv_calls] == [((B * regions * Cout, Cin // groups, 3, 3), B * groups)]
    if not guide:  # the conv's own output, not a copy of it
        assert y.untyped_storage().data_ptr() == conv_calls[0][2].untyped_storage().data_ptr()


def test_drconv_backward_is_one_transposed_conv_one_conv_backward_and_one_conv(plain, conv_calls, monkeypatch):
    """dx by one transposed conv, the kernels' and biases' gradients by one convolution_backward,
    the guide's scores by one conv over every region (the forward recomputed, not kept), and no
    strided one-hot (perf_reports/cpu/)."""
    _forbid(monkeypatch, torch.nn.grad, "conv2d_weight", "conv2d_input")
    _forbid(monkeypatch, F, "one_hot")
    _forbid(monkeypatch, reference_expert, "all_region_outputs", "select_regions")
    transposed, backward = [], []
    real_transposed, real_backward = F.conv_transpose2d, torch.ops.aten.convolution_backward
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a: transposed.append(a[6]) or real_transposed(*a))
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: backward.append(a[-1]) or real_backward(*a))
    B, Cin, Cout, E, m, groups = 2, 4, 6, 3, 2, 2
    leaves = [torch.randn(B, Cin, 5, 5), torch.randn(E, Cout, Cin // groups, 3, 3), torch.rand(B, m, E),
              torch.randn(E, Cout), torch.randn(B, m, 5, 5)]
    x, experts, routing, bias, guide = (t.requires_grad_() for t in leaves)
    y = dynconv.expert_conv2d(x, experts, routing, bias, padding=1, groups=groups, guide=guide)
    conv_calls.clear()
    torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert transposed == [B * groups] and backward == [(False, True, True)]
    assert [(w, g) for w, g, _ in conv_calls] == [((B * m * Cout, Cin // groups, 3, 3), B * groups)]


# Odd sizes, stride 2 with odd H, dilation, K larger than the image, asymmetric geometry.
DW_CASES = {
    "stride2-oddH": dict(H=5, W=6, K=3, G=2, stride=2, padding=1, dilation=1),
    "dilation2": dict(H=6, W=5, K=3, G=4, stride=1, padding=2, dilation=2),
    "K-over-image": dict(H=2, W=3, K=5, G=1, stride=1, padding=2, dilation=1),
    "asymmetric": dict(H=5, W=4, K=2, G=2, stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
}


def _dw_inputs(H, W, K, G, B=2, C=4, **_):
    return dict(x=torch.randn(B, C, H, W, dtype=F64), weight=torch.randn(B, G, K, K, dtype=F64),
                bias=torch.randn(B, C, dtype=F64))


def _dw_reference(x, weight, bias, **geometry):
    return involution_unfold(x, weight, bias, **geometry)


@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_dwconv_matches_float64_reference(plain, nan_poison, case, memory_format):
    geometry = {k: DW_CASES[case][k] for k in ("stride", "padding", "dilation")}
    y = check_against_reference(dynconv.dynamic_dwconv2d, _dw_reference, _dw_inputs(**DW_CASES[case]),
                                torch.float32, memory_format=memory_format, **geometry)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("case", DW_CASES)
def test_dwconv_second_derivatives(plain, nan_poison, case):
    geometry = {k: DW_CASES[case][k] for k in ("stride", "padding", "dilation")}
    leaves = [t.requires_grad_() for t in _dw_inputs(**DW_CASES[case], B=1, C=2 * DW_CASES[case]["G"]).values()]
    fn = lambda x, w, b: dynconv.dynamic_dwconv2d(x, w, b, **geometry)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


EXPERT_CASES = {  # (B, Cin, Cout, E, m, groups, H, stride, spatial)
    "condconv": (2, 2, 4, 3, 1, 1, 5, 1, False),
    "odconv-groups2-stride2": (2, 4, 2, 2, 1, 2, 5, 2, True),
    "drconv": (2, 2, 3, 2, 3, 1, 4, 1, False),
    "drconv-groups2-stride2": (1, 4, 4, 2, 2, 2, 5, 2, True),
}


def _expert_inputs(B, Cin, Cout, E, m, groups, H, stride, spatial):
    Ho = (H - 1) // stride + 1
    return dict(x=torch.randn(B, Cin, H, H, dtype=F64), experts=torch.randn(E, Cout, Cin // groups, 3, 3, dtype=F64),
                routing=torch.rand(B, m, E, dtype=F64) if m > 1 else torch.rand(B, E, dtype=F64),
                bias=torch.randn(E, Cout, dtype=F64),
                spatial=torch.rand(B, 3, 3, dtype=F64) + 0.5 if spatial else None,
                guide=torch.randn(B, m, Ho, Ho, dtype=F64) * 3 if m > 1 else None)


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_matches_float64_reference(plain, nan_poison, case):
    groups, stride = EXPERT_CASES[case][5], EXPERT_CASES[case][7]
    inputs = _expert_inputs(*EXPERT_CASES[case])
    reference = drconv_all_regions if inputs["guide"] is not None else expert_conv2d_grouped
    check_against_reference(dynconv.expert_conv2d, reference, inputs, torch.float32,
                            padding=1, stride=stride, groups=groups)


def test_drconv_second_derivatives(plain, nan_poison):
    inputs = _expert_inputs(*EXPERT_CASES["drconv-groups2-stride2"])
    names = ("x", "experts", "routing", "bias", "spatial")
    leaves = [inputs[k].requires_grad_() for k in names]

    def fn(*tensors):
        return dynconv.expert_conv2d(**dict(zip(names, tensors)), guide=inputs["guide"], padding=1, stride=2,
                                     groups=2)

    assert torch.autograd.gradgradcheck(fn, leaves)


def test_drconv_region_not_chosen_cannot_poison_the_output(plain):
    """Gathering each pixel's region (not an indicator-weighted sum: 0 · inf is NaN) keeps the
    overflowing output of a region no pixel chose out of the result."""
    inputs = {k: v.float() for k, v in _expert_inputs(*EXPERT_CASES["drconv"]).items() if v is not None}
    inputs["routing"][:, 0] = torch.tensor([1.0, 0.0])  # region 0 mixes expert 0 alone
    inputs["guide"][:, 0] += 100.0  # every pixel picks region 0
    expected = dynconv.expert_conv2d(**inputs, padding=1)
    inputs["experts"][1] = 3e38  # the other regions' outputs overflow to ±inf
    torch.testing.assert_close(dynconv.expert_conv2d(**inputs, padding=1), expected)
