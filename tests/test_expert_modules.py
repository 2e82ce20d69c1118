"""dynconv.nn.CondConv2d / DynamicConv2d / ODConv2d / DRConv2d: drop-in shapes, routing, gradients,
batch 1 in training mode. Kernels run through the interpreter on CPU, so channels stay small."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.nn import CondConv2d, DRConv2d, DynamicConv2d, ODConv2d
from dynconv.reference import expert_conv2d_loop
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("nan_poison")

MODULES = {
    "condconv": lambda *a, **k: CondConv2d(*a, **k, num_experts=3),
    "dynamicconv": lambda *a, **k: DynamicConv2d(*a, **k, num_experts=3),
    "odconv": lambda *a, **k: ODConv2d(*a, **k, num_experts=3),
    "drconv": lambda *a, groups=1, **k: DRConv2d(*a, **k, region_num=3, num_experts=2),
}

# (H, W, kernel_size, stride, padding, dilation): odd and even sizes, strides 1-3, a 1x1 image,
# non-square kernels, a 1x1 kernel.
GEOMETRIES = [
    (7, 7, 3, 1, 1, 1),
    (9, 6, 3, 2, 1, 1),
    (8, 5, (3, 1), 2, (1, 0), 1),
    (5, 7, 1, 3, 0, 1),
    (1, 1, 3, 1, 1, 1),
    (10, 9, 3, 2, 2, 2),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_output_shape_matches_conv2d(name, geometry, device):
    H, W, k, s, p, d = geometry
    module = MODULES[name](4, 6, k, s, p, d).to(device)
    static = nn.Conv2d(4, 6, k, s, p, d)
    x = torch.randn(2, 4, H, W, device=device)
    y = module(x)
    assert y.shape == static(x.cpu()).shape
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_reach_every_parameter(name, device):
    module = MODULES[name](4, 6, 3, 1, 1).to(device)
    x = torch.randn(2, 4, 6, 5, device=device, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, param in module.named_parameters():
        assert param.grad is not None, f"no gradient reached {pname}"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"zero gradient at {pname}"


@pytest.mark.parametrize("name", list(MODULES))
def test_batch_one_in_training_mode(name, device):
    module = MODULES[name](4, 6, 3, 1, 1).to(device).train()
    x = torch.randn(1, 4, 5, 5, device=device)
    y = module(x)
    y.sum().backward()
    assert y.shape == (1, 6, 5, 5) and torch.isfinite(y).all()


def test_odconv_batch_one_normalises_with_running_statistics(device):
    module = ODConv2d(4, 6, 3, padding=1, num_experts=3).to(device).train()
    before = module.bn.running_mean.clone()
    x = torch.randn(1, 4, 5, 5, device=device)
    train_out = module(x)
    assert torch.equal(module.bn.running_mean, before)
    module.eval()
    assert_close(train_out.detach(), module(x).detach(), torch.float32, "batch-1 training vs eval")


@pytest.mark.parametrize("name", list(MODULES))
def test_channels_last_is_kept(name, device):
    module = MODULES[name](4, 6, 3, 1, 1).to(device)
    x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    y = module(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.detach(), module(x.contiguous()).detach(), torch.float32, "channels_last vs NCHW")


def test_grouped_modules(device):
    for cls in (CondConv2d, DynamicConv2d, ODConv2d):
        module = cls(4, 6, 3, padding=1, groups=2, num_experts=2).to(device)
        assert module(torch.randn(2, 4, 5, 5, device=device)).shape == (2, 6, 5, 5)
    depthwise = ODConv2d(4, 4, 3, padding=1, groups=4, num_experts=2)
    assert depthwise.filter_fc is None  # the reference skips the filter attention for depth-wise convs
    assert ODConv2d(4, 6, 1, num_experts=2).spatial_fc is None


def test_dynamicconv_with_one_expert_is_a_static_conv(device):
    module = DynamicConv2d(4, 6, 3, stride=2, padding=1, num_experts=1).to(device)
    x = torch.randn(2, 4, 7, 8, device=device)
    expected = F.conv2d(x.cpu().double(), module.experts[0].detach().cpu().double(),
                        module.bias[0].detach().cpu().double(), 2, 1)
    assert_close(module(x).detach(), expected, torch.float32, "E=1")


def test_drconv_with_one_region_and_expert_is_a_static_conv(device):
    module = DRConv2d(4, 6, 3, padding=1, region_num=1, num_experts=1).to(device)
    x = torch.randn(2, 4, 6, 5, device=device)
    expected = F.conv2d(x.cpu().double(), module.experts[0].detach().cpu().double(),
                        module.bias[0].detach().cpu().double(), 1, 1)
    assert_close(module(x).detach(), expected, torch.float32, "m=1, E=1")


def test_condconv_routing_is_sigmoid_of_linear_pool(device):
    """With one expert, CondConv is the static conv scaled (kernel and bias) by its sigmoid routing."""
    module = CondConv2d(4, 6, 3, padding=1, num_experts=1).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    gate = torch.sigmoid(module.routing_fn(x.mean((2, 3)))).detach().cpu().double()
    static = F.conv2d(x.cpu().double(), module.experts[0].detach().cpu().double(),
                      module.bias[0].detach().cpu().double(), 1, 1)
    assert_close(module(x).detach(), gate[:, :, None, None] * static, torch.float32, "CondConv E=1")


def test_dynamicconv_temperature_anneals_towards_uniform_routing(device):
    module = DynamicConv2d(4, 6, 3, padding=1, num_experts=3).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    module.update_temperature(1e9)
    assert torch.allclose(module.routing(x), torch.full((2, 3), 1 / 3, device=device), atol=1e-6)
    expected = F.conv2d(x.cpu().double(), module.experts.detach().cpu().double().mean(0),
                        module.bias.detach().cpu().double().mean(0), 1, 1)
    assert_close(module(x).detach(), expected, torch.float32, "uniform routing")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        module.update_temperature(0)


def test_odconv_matches_its_formula(device):
    module = ODConv2d(4, 6, 3, padding=1, num_experts=3).to(device).eval()
    x = torch.randn(2, 4, 5, 5, device=device)
    channel, filt, spatial, kernel = (t.detach().cpu().double() for t in module.attentions(x))
    weights = expert_conv2d_loop(x.cpu().double() * channel, module.experts.detach().cpu().double(), kernel,
                                 padding=1, spatial=spatial)
    expected = weights * filt + module.bias.detach().cpu().double()[:, None, None]
    assert_close(module(x).detach(), expected, torch.float32, "ODConv")


def test_drconv_pixels_use_their_regions_kernel(device):
    module = DRConv2d(4, 6, 3, padding=1, region_num=3, num_experts=2).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    routing = module.routing(x).detach().cpu().double()
    guide = module.guide(x).detach().cpu().double()
    expected = expert_conv2d_loop(x.cpu().double(), module.experts.detach().cpu().double(), routing,
                                  module.bias.detach().cpu().double(), padding=1, guide=guide)
    assert_close(module(x).detach(), expected, torch.float32, "DRConv")
    assert routing.shape == (2, 3, 2) and torch.allclose(routing.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_module_compiles_fullgraph(device):
    module = DRConv2d(4, 6, 3, padding=1, region_num=2, num_experts=2).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x).detach(), module(x).detach().double(), torch.float32, "compiled module")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="must be divisible by groups=3"):
        CondConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        DynamicConv2d(4, 6, 3, num_experts=0)
    with pytest.raises(ValueError, match="region_num must be >= 1"):
        DRConv2d(4, 6, 3, region_num=0)


def test_modules_are_exported():
    assert dynconv.nn.CondConv2d is CondConv2d and dynconv.nn.DRConv2d is DRConv2d
