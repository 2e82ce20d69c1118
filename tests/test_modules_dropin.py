"""The dynconv modules where nn.Conv2d fits: batch 0, channels_last models, nn.Conv2d's constructor
arguments (padding strings and modes, factory kwargs, meta init), named shape errors, temperatures in
the state_dict, reprs, docstrings and py.typed. Tiny shapes: kernels run through the interpreter."""
import importlib.resources
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv.nn.expert as expert_module
from dynconv.nn import CondConv2d, DRConv2d, DynamicConv2d, DynamicDWConv2d, Involution2d, ODConv2d
from dynconv.reference import expert_conv2d_loop
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("nan_poison")

EXPERT = {
    "condconv": lambda *a, **k: CondConv2d(*a, **k, num_experts=2),
    "dynamicconv": lambda *a, **k: DynamicConv2d(*a, **k, num_experts=2),
    "odconv": lambda *a, **k: ODConv2d(*a, **k, num_experts=2),
    "drconv": lambda *a, **k: DRConv2d(*a, **k, region_num=2, num_experts=2),
}
DEPTHWISE = {
    "involution": lambda **k: Involution2d(4, 3, group_channels=2, reduction_ratio=2, fused=False, **k),
    "involution_fused": lambda **k: Involution2d(4, 3, group_channels=2, reduction_ratio=2, fused=True, **k),
    "dwconv": lambda **k: DynamicDWConv2d(4, 3, reduction_ratio=2, **k),
    "dwconv_per_pixel": lambda **k: DynamicDWConv2d(4, 3, reduction_ratio=2, homogeneous=False, fused=False, **k),
}


def _all_modules():
    modules = {name: (lambda make=make: make(4, 6, 3, padding=1)) for name, make in EXPERT.items()}
    modules.update({name: (lambda make=make: make()) for name, make in DEPTHWISE.items()})
    return modules


ALL = _all_modules()
@pytest.mark.parametrize("name", list(ALL))
def test_batch_zero_gives_empty_output_and_zero_gradients(name, device):
    module = ALL[name]().to(device).train()
    x = torch.randn(0, 4, 5, 5, device=device, requires_grad=True)
    y = module(x)
    expected = (0, 6 if name in EXPERT else 4, 5, 5)
    assert y.shape == expected
    y.sum().backward()
    assert x.grad.shape == x.shape
    for pname, p in module.named_parameters():
        assert p.grad is None or (p.grad == 0).all(), pname


@pytest.mark.parametrize("name", list(EXPERT))
def test_batch_zero_reaches_the_op_with_consistent_shapes(name, monkeypatch):
    """The module's own code (routing, attentions, BatchNorm, reshapes) with B = 0, up to the op:
    a stand-in op checks the shapes it gets and returns an empty output tied to every input."""
    module = EXPERT[name](4, 6, 3, padding=1).train()
    seen = {}

    def stand_in(x, experts, routing, bias=None, stride=1, padding=0, dilation=1, groups=1, spatial=None, guide=None):
        seen.update(x=x.shape, routing=routing.shape, spatial=None if spatial is None else spatial.shape,
                    guide=None if guide is None else guide.shape)
        tied = sum(t.sum() for t in (x, experts, routing, bias, spatial, guide) if t is not None)
        return tied * 0 + x.new_zeros(x.shape[0], experts.shape[1], *module.output_size(*x.shape[2:]))

    monkeypatch.setattr(expert_module, "expert_conv2d", stand_in)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = module(x)
    assert y.shape == (0, 6, 5, 5) and seen["x"][0] == 0 and seen["routing"][0] == 0
    y.sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is None or (p.grad == 0).all(), pname


@pytest.mark.parametrize("cls", [DynamicConv2d, ODConv2d])
@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_non_positive_temperature_is_rejected(cls, temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cls(4, 6, 3, temperature=temperature)
    module = cls(4, 6, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        module.update_temperature(temperature)


# --- channels_last ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXPERT))
def test_model_converts_to_channels_last_and_computes_the_same(name, device):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), EXPERT[name](4, 6, 3, padding=1)).to(device).eval()
    x = torch.randn(2, 4, 5, 5, device=device)
    expected = model(x).detach().double()
    model.to(memory_format=torch.channels_last)
    module = model[1]
    assert module.weight.is_contiguous(memory_format=torch.channels_last)
    # experts is a view of the stored weight, never a copy
    assert module.experts.data_ptr() == module.weight.data_ptr()
    assert module.experts.shape == (2, 6, 4, 3, 3)
    y = model(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.detach(), expected, torch.float32, f"{name} channels_last")


@pytest.mark.parametrize("name", list(EXPERT))
def test_checkpoint_with_five_d_experts_loads(name):
    module = EXPERT[name](4, 6, 3, padding=1)
    legacy = {k: v for k, v in module.state_dict().items() if k not in ("weight", "temperature")}
    legacy["experts"] = torch.randn(2, 6, 4, 3, 3)
    fresh = EXPERT[name](4, 6, 3, padding=1)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.experts, legacy["experts"])


# --- nn.Conv2d's arguments -------------------------------------------------------------------

# (kernel_size, dilation, padding, padding_mode): odd, even and non-square kernels, dilation,
# 'same' with an asymmetric split, 'valid', and every padding_mode.
PADDINGS = [
    (3, 1, "same", "zeros"),
    (4, 1, "same", "zeros"),
    ((2, 3), 2, "same", "zeros"),
    (3, 1, "valid", "zeros"),
    (3, 1, 1, "reflect"),
    ((3, 2), 1, "same", "replicate"),
    (3, 2, 2, "circular"),
    (2, 1, (1, 0), "reflect"),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("geometry", PADDINGS, ids=str)
def test_condconv_pads_as_conv2d(geometry, device):
    k, d, p, mode = geometry
    module = CondConv2d(4, 6, k, padding=p, dilation=d, padding_mode=mode, num_experts=2).to(device)
    static = nn.Conv2d(4, 6, k, padding=p, dilation=d, padding_mode=mode).double()
    with torch.no_grad():  # routing (1, 0) selects expert 0: the module is then this static conv
        static.weight.copy_(module.experts[0])
        static.bias.copy_(module.bias[0])
    x = torch.randn(2, 4, 5, 6, device=device)
    routing = torch.tensor([[1.0, 0.0]] * 2, device=device)
    assert_close(module(x, routing).detach(), static(x.cpu().double()), torch.float32, f"padding {geometry}")


@pytest.mark.parametrize("geometry", PADDINGS[1:3] + PADDINGS[5:7], ids=str)
@pytest.mark.parametrize("name", ["dynamicconv", "odconv", "drconv"])
def test_every_expert_module_takes_conv2d_padding(name, geometry, device):
    k, d, p, mode = geometry
    module = EXPERT[name](4, 6, k, padding=p, dilation=d, padding_mode=mode).to(device)
    x = torch.randn(2, 4, 5, 6, device=device)
    y = module(x)
    assert y.shape == nn.Conv2d(4, 6, k, padding=p, dilation=d, padding_mode=mode)(x.cpu()).shape
    assert torch.isfinite(y).all()


def test_single_expert_dynamicconv_with_same_padding_is_conv2d(device):
    module = DynamicConv2d(4, 6, 4, padding="same", padding_mode="reflect", num_experts=1).to(device)
    static = nn.Conv2d(4, 6, 4, padding="same", padding_mode="reflect").double()
    with torch.no_grad():
        static.weight.copy_(module.experts[0])
        static.bias.copy_(module.bias[0])
    x = torch.randn(1, 4, 5, 5, device=device)
    assert_close(module(x).detach(), static(x.cpu().double()), torch.float32, "DynamicConv2d same")


def test_drconv_groups(device):
    single = DRConv2d(4, 6, 3, 1, 1, 1, 2, region_num=1, num_experts=1).to(device)
    assert single.weight.shape == (6, 2, 3, 3)
    x = torch.randn(2, 4, 5, 5, device=device)
    expected = F.conv2d(x.cpu().double(), single.experts[0].detach().cpu().double(),
                        single.bias[0].detach().cpu().double(), 1, 1, 1, 2)
    assert_close(single(x).detach(), expected, torch.float32, "grouped DRConv2d, one region")
    module = DRConv2d(4, 6, 3, 1, 1, 1, 2, region_num=2, num_experts=2).to(device)
    expected = expert_conv2d_loop(x.cpu().double(), module.experts.detach().cpu().double(),
                                  module.routing(x).detach().cpu().double(), module.bias.detach().cpu().double(),
                                  padding=1, groups=2, guide=module.guide(x).detach().cpu().double())
    assert_close(module(x).detach(), expected, torch.float32, "grouped DRConv2d, two regions")


def test_padding_argument_errors():
    with pytest.raises(ValueError, match="not supported for strided"):
        CondConv2d(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        CondConv2d(4, 6, 3, padding="full")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        DRConv2d(4, 6, 3, padding_mode="mirror")
    with pytest.raises(TypeError, match="groups must be an int"):
        DRConv2d(4, 6, 3, 1, 1, 1, False)


@pytest.mark.parametrize("name", list(ALL))
def test_factory_kwargs_and_meta_init(name):
    make = (lambda **k: EXPERT[name](4, 6, 3, padding=1, **k)) if name in EXPERT else DEPTHWISE[name]
    module = make(device="meta", dtype=torch.float64)
    assert all(t.is_meta and t.dtype == torch.float64 for t in module.state_dict().values() if t.is_floating_point())
    module.to_empty(device="cpu")  # NaN-poisoned: reset_parameters must write every value
    module.reset_parameters()
    for key, t in module.state_dict().items():
        assert torch.isfinite(t).all(), key
    if hasattr(module, "initial_temperature"):
        assert module.temperature.item() == module.initial_temperature
    y = module(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_depthwise_modules_take_tuple_kernel_dilation_and_padding(device):
    for module in (Involution2d(4, (3, 3), group_channels=2, reduction_ratio=2, dilation=(2, 1), padding=(2, 1),
                                fused=False),
                   DynamicDWConv2d(4, (3, 3), reduction_ratio=2, dilation=2, padding=(1, 2))):
        module = module.to(device)
        x = torch.randn(2, 4, 6, 5, device=device)
        expected = nn.Conv2d(4, 4, 3, padding=module.padding, dilation=module.dilation)(x.cpu()).shape
        assert module(x).shape == expected
    # the default padding keeps the size with dilation too
    assert Involution2d(4, 3, group_channels=2, reduction_ratio=2, dilation=2).padding == (2, 2)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_involution2d_dilation_matches_the_unfold_formulation(fused, device):
    module = Involution2d(4, 3, group_channels=2, reduction_ratio=2, dilation=2, fused=fused).to(device).eval()
    x = torch.randn(1, 4, 6, 6, device=device)
    w = module.kernel(x).detach().cpu().double()
    cols = F.unfold(x.cpu().double(), 3, dilation=2, padding=2).view(1, 2, 2, 9, 6, 6)
    expected = (w.view(1, 2, 1, 9, 6, 6) * cols).sum(3).view(1, 4, 6, 6)
    assert_close(module(x).detach(), expected, torch.float32, "dilated Involution2d")


def test_non_square_depthwise_kernel_is_rejected():
    with pytest.raises(ValueError, match="kernel_size must be square"):
        Involution2d(4, (3, 5), group_channels=2)
    with pytest.raises(ValueError, match="kernel_size must be square"):
        DynamicDWConv2d(4, (1, 3))


@pytest.mark.parametrize("name", list(ALL))
def test_wrong_channel_count_is_named(name):
    module = ALL[name]()
    with pytest.raises(ValueError, match="in_channels=4|channels=4"):
        module(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        module(torch.randn(4, 5, 5))


# --- state that changes outputs lives in the state_dict --------------------------------------

@pytest.mark.parametrize("cls", [DynamicConv2d, ODConv2d])
def test_annealed_temperature_survives_save_and_load(cls, device):
    module = cls(4, 6, 3, padding=1, num_experts=3).to(device).eval()
    x = torch.randn(2, 4, 5, 5, device=device)
    before = module(x).detach()
    module.update_temperature(0.5)
    annealed = module(x).detach()
    assert not torch.allclose(before, annealed)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    reloaded = cls(4, 6, 3, padding=1, num_experts=3).to(device).eval()
    reloaded.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(reloaded(x).detach(), annealed)


def test_checkpoint_without_temperature_loads():
    module = DynamicConv2d(4, 6, 3, temperature=5.0)
    state = {k: v for k, v in module.state_dict().items() if k != "temperature"}
    fresh = DynamicConv2d(4, 6, 3, temperature=7.0)
    fresh.load_state_dict(state)  # strict: the missing temperature keeps the module's own
    assert fresh.temperature.item() == 7.0


# --- repr, docstrings, py.typed --------------------------------------------------------------

@pytest.mark.parametrize("cls", [CondConv2d, DynamicConv2d, ODConv2d, DRConv2d, Involution2d, DynamicDWConv2d])
def test_repr_shows_every_constructor_argument_and_docstring_has_args(cls):
    module = cls(4, 6, 3) if cls in (CondConv2d, DynamicConv2d, ODConv2d, DRConv2d) else cls(4, 3, reduction_ratio=2,
                                                                                              **({"group_channels": 2}
                                                                                                 if cls is Involution2d
                                                                                                 else {}))
    text = module.extra_repr()
    assert text in repr(module)
    names = [n for n in inspect.signature(cls).parameters if n not in ("device", "dtype")]
    positional = {"in_channels", "out_channels", "channels"}
    for name in names:
        assert name in positional or f"{name}=" in text, f"{cls.__name__} repr lacks {name}: {text}"
    assert "Args:" in cls.__doc__
    for name in names:
        assert name in cls.__doc__, f"{cls.__name__} docstring lacks {name}"


def test_package_is_typed():
    assert importlib.resources.files("dynconv").joinpath("py.typed").is_file()


def test_external_routing_and_guide_are_checked():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"routing must have shape \(B, num_experts\) = \(2, 2\)"):
        CondConv2d(4, 6, 3, num_experts=2)(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match="shared_routing=True: pass forward"):
        CondConv2d(4, 6, 3, shared_routing=True)(x)
    with pytest.raises(ValueError, match="needs the guide logits"):
        DRConv2d(4, 6, 3, design="megvii")(x)
    with pytest.raises(ValueError, match="computes its own guide"):
        DRConv2d(4, 6, 3)(x, torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="design must be"):
        DRConv2d(4, 6, 3, design="paper")


def test_numpy_integers_are_accepted_as_ints():
    import numpy as np
    i = np.int64
    for module in (CondConv2d(i(4), i(6), i(3), i(1), (i(1), i(1)), num_experts=i(2)),
                   DRConv2d(i(4), i(6), (i(3), i(3)), padding=i(1), groups=i(2), region_num=i(2), num_experts=i(2)),
                   Involution2d(i(4), i(3), i(1), group_channels=i(2), reduction_ratio=i(2), dilation=i(1)),
                   DynamicDWConv2d(i(4), (i(3), i(3)), reduction_ratio=i(2), padding=i(1))):
        assert module(torch.randn(1, 4, 5, 5)).shape[2:] == (5, 5)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        CondConv2d(4.0, 6, 3)
