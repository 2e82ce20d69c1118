"""The family-1 ops as torch sees them: input errors, opcheck, torch.compile, the modules."""
import pytest
import torch

import dynconv
from dynconv.kernels import involution as kernels
from dynconv.reference import involution_unfold
from helpers import assert_close


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_INVOLUTION = [
    ("x rank", lambda: (_x(4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {}, ValueError, r"x must be 4-D"),
    ("weight rank", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8)), {}, ValueError, r"weight must be 6-D"),
    ("groups", lambda: (_x(1, 6, 8, 8), _x(1, 4, 3, 3, 8, 8)), {}, ValueError, r"divisible by the weight's groups"),
    ("spatial", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 7, 8)), {}, ValueError, r"must equal the output size \(8, 8\)"),
    ("spatial stride 2", lambda: (_x(1, 4, 9, 9), _x(1, 1, 3, 3, 4, 4)), {"stride": 2}, ValueError, r"output size \(5, 5\)"),
    ("batch", lambda: (_x(2, 4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {}, ValueError, r"batch mismatch"),
    ("non-square", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 5, 8, 8)), {}, ValueError, r"square"),
    ("integer x", lambda: (torch.ones(1, 4, 8, 8, dtype=torch.int32), _x(1, 1, 3, 3, 8, 8)), {}, TypeError, r"x must be float16"),
    ("mixed dtypes", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8, 8, dtype=torch.float16)), {}, TypeError, r"same dtype"),
    ("stride 0", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {"stride": 0}, ValueError, r"stride must be >= 1"),
    ("negative padding", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {"padding": -1}, ValueError, r"padding must be >= 0"),
    ("dilation 0", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {"dilation": 0}, ValueError, r"dilation must be >= 1"),
    ("float stride", lambda: (_x(1, 4, 8, 8), _x(1, 1, 3, 3, 8, 8)), {"stride": 1.5}, TypeError, r"stride must be an int"),
    ("empty output", lambda: (_x(1, 4, 2, 2), _x(1, 1, 5, 5, 1, 1)), {"padding": 0}, ValueError, r"not positive"),
    ("not a tensor", lambda: ([[1.0]], _x(1, 1, 3, 3, 8, 8)), {}, TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,make,kwargs,error,match", BAD_INVOLUTION, ids=[b[0] for b in BAD_INVOLUTION])
def test_involution_rejects_bad_input_before_any_kernel(name, make, kwargs, error, match, monkeypatch):
    monkeypatch.setattr(kernels, "forward_launch", lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    x, w = make()
    with pytest.raises(error, match=match):
        dynconv.involution(x, w, **kwargs)


BAD_DWCONV = [
    ("weight rank", lambda: (_x(1, 4, 8, 8), _x(1, 4, 3), None), ValueError, r"weight must be 4-D"),
    ("bias shape", lambda: (_x(2, 4, 8, 8), _x(2, 4, 3, 3), _x(4)), ValueError, r"bias must be 2-D"),
    ("bias size", lambda: (_x(2, 4, 8, 8), _x(2, 4, 3, 3), _x(2, 3)), ValueError, r"bias must have shape \(B, C\)"),
    ("bias dtype", lambda: (_x(2, 4, 8, 8), _x(2, 4, 3, 3), _x(2, 4, dtype=torch.float64)), TypeError, r"same dtype"),
    ("groups", lambda: (_x(1, 4, 8, 8), _x(1, 3, 3, 3), None), ValueError, r"divisible"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_DWCONV, ids=[b[0] for b in BAD_DWCONV])
def test_dynamic_dwconv2d_rejects_bad_input(name, make, error, match):
    x, w, b = make()
    with pytest.raises(error, match=match):
        dynconv.dynamic_dwconv2d(x, w, b)


def test_devices_must_agree():
    # A meta tensor stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="same device, got x on cpu, weight on meta"):
        dynconv.involution(_x(1, 4, 8, 8), torch.empty(1, 1, 3, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="same device"):
        dynconv.dynamic_dwconv2d(_x(1, 4, 8, 8), _x(1, 4, 3, 3), torch.empty(1, 4, device="meta"))


def test_ops_are_registered():
    for name in ("involution", "dynamic_dwconv2d", "involution_backward_input", "involution_backward_weight"):
        assert hasattr(torch.ops.dynconv, name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_involution(channels_last, device):
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(2, 2, 3, 3, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dynconv.involution, (x, w, [2, 2], [1, 1], [1, 1]))


def test_opcheck_dynamic_dwconv2d(device):
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(2, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dynconv.dynamic_dwconv2d, (x, w, b, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.dynconv.dynamic_dwconv2d, (x, w, None, [2, 2], [0, 0], [1, 1]))


def test_torch_compile_fullgraph_traces_the_ops(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, w_pixel, w_sample, bias):
        y = dynconv.involution(x, w_pixel)
        return dynconv.dynamic_dwconv2d(torch.relu(y), w_sample, bias, stride=2)

    x = torch.randn(2, 4, 7, 7, device=device, requires_grad=True)
    wp = torch.randn(2, 2, 3, 3, 7, 7, device=device, requires_grad=True)
    ws = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(2, 4, device=device, requires_grad=True)
    out = block(x, wp, ws, b)
    out.sum().backward()
    expected = involution_unfold(torch.relu(involution_unfold(x, wp)), ws, b, stride=2)
    assert_close(out, expected.detach(), torch.float32, "compiled")
    assert all(t.grad is not None for t in (x, wp, ws, b))


# --- modules --------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 9), (5, 12), (1, 1)])
def test_involution2d_output_shape_and_gradients(stride, hw, device):
    layer = dynconv.nn.Involution2d(16, kernel_size=3, stride=stride, group_channels=8).to(device)
    x = torch.randn(2, 16, *hw, device=device, requires_grad=True)
    y = layer(x)
    expected_hw = tuple((n + 2 * 1 - 2 - 1) // stride + 1 for n in hw)
    conv = torch.nn.Conv2d(16, 16, 3, stride, 1).to(device)
    assert y.shape == (2, 16, *expected_hw) == conv(x).shape
    y.square().sum().backward()
    assert x.grad is not None
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_involution2d_matches_the_reference_formulation(device):
    layer = dynconv.nn.Involution2d(16, kernel_size=7, stride=2, group_channels=4).to(device).eval()
    x = torch.randn(2, 16, 10, 12, device=device)
    weight = layer.kernel(x)
    # Even H, W: the reference's AvgPool2d(2, 2) fits, and adaptive pooling must equal it.
    pooled = torch.nn.functional.avg_pool2d(x, 2, 2)
    z = layer.span(torch.relu(layer.bn(layer.reduce(pooled))))
    assert_close(weight.reshape(z.shape), z.double(), torch.float32, "kernel generation")
    assert_close(layer(x), involution_unfold(x.double(), weight.double(), stride=2, padding=3), torch.float32, "y")


@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_dynamic_dwconv2d_module(homogeneous, stride, device):
    layer = dynconv.nn.DynamicDWConv2d(8, kernel_size=3, stride=stride, reduction_ratio=4,
                                       homogeneous=homogeneous).to(device)
    x = torch.randn(2, 8, 9, 7, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == torch.nn.Conv2d(8, 8, 3, stride, 1)(x.cpu()).shape
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_modules_train_with_batch_one(device):
    for layer in (dynconv.nn.DynamicDWConv2d(8, 3), dynconv.nn.Involution2d(16, 3, group_channels=8)):
        layer = layer.to(device).train()
        x = torch.randn(1, layer.channels, 1, 1, device=device)
        layer(x).sum().backward()


def test_modules_compile_fullgraph(device):
    layer = dynconv.nn.Involution2d(16, kernel_size=3, stride=2, group_channels=8).to(device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 7, 7, device=device)
    assert_close(compiled(x), layer(x).double(), torch.float32, "compiled module")
