"""dynconv.expert_conv2d (docs/operators.md §2) against float64 references.

Kernels run through the Triton interpreter on CPU (see conftest.py); every allocation is
NaN-poisoned so an output element that no program writes fails the comparison. bf16 is left to
the GPU run (the interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584).
"""
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

import dynconv
import dynconv.ops.expert_conv as expert_ops
from dynconv.kernels import _launch
from dynconv.kernels import expert_conv as kernels
from dynconv.kernels import expert_conv_guide as guide_kernels
from dynconv.kernels import expert_conv_input_grad as input_grad_kernels
from dynconv.kernels import region_conv_input_grad
from dynconv.kernels import expert_conv_weight_grad as weight_grad_kernels
from dynconv.kernels import layout
from dynconv.kernels.region_tables import meta_region_tables, region_tables
from dynconv.kernels._launch import TRITON_VERSION
from dynconv.ops.reference_expert import all_region_outputs
from dynconv.reference import drconv_all_regions, expert_conv2d_grouped, expert_conv2d_loop
from helpers import assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("nan_poison")


@dataclass(frozen=True)
class Case:
    B: int = 2
    Cin: int = 4
    Cout: int = 6
    H: int = 7
    W: int = 6
    kh: int = 3
    kw: int = 3
    E: int = 3
    m: int = 1
    groups: int = 1
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    bias: bool = True
    spatial: bool = False
    guide: bool = False

    @property
    def out_hw(self):
        return tuple((n + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
                     for n, k in ((self.H, self.kh), (self.W, self.kw)))

    def inputs(self):
        """Float64 inputs; routing is (B, E) for m = 1 without a guide, else (B, m, E)."""
        Ho, Wo = self.out_hw
        routing_shape = (self.B, self.m, self.E) if (self.m > 1 or self.guide) else (self.B, self.E)
        f64 = dict(dtype=torch.float64)
        return {
            "x": torch.randn(self.B, self.Cin, self.H, self.W, **f64),
            "experts": torch.randn(self.E, self.Cout, self.Cin // self.groups, self.kh, self.kw, **f64) * 0.5,
            "routing": torch.rand(routing_shape, **f64),
            "bias": torch.randn(self.E, self.Cout, **f64) if self.bias else None,
            "spatial": torch.rand(self.B, self.kh, self.kw, **f64) + 0.5 if self.spatial else None,
            # Well-separated logits: fp16 rounding must not change a pixel's region.
            "guide": torch.randn(self.B, self.m, Ho, Wo, **f64) * 4 if self.guide else None,
        }

    def geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


CASES = {
    "basic": Case(),
    "groups2-stride2-odd-spatial-nobias": Case(Cin=4, Cout=6, H=9, W=7, kh=3, kw=2, groups=2, stride=2, bias=False,
                                             spatial=True),
    "dilation2": Case(B=1, H=8, W=9, dilation=2, padding=2, E=2),
    "1x1-stride2": Case(H=7, W=5, kh=1, kw=1, padding=0, stride=2, spatial=True),
    "depthwise-5x3": Case(B=1, Cin=5, Cout=5, groups=5, kh=5, kw=3, padding=2, E=2),
    "wide-channels": Case(B=1, Cin=20, Cout=40, H=5, W=5, E=2, spatial=True),  # several channel and K tiles
    # 16 channels a group: the per-tap channel loops, with stride phases (odd H) and regions in the input gradient.
    "taps-stride2-odd": Case(B=1, Cin=16, Cout=16, H=7, W=6, kh=3, kw=2, E=2, stride=2, spatial=True),
    "taps-drconv-stride2": Case(B=1, Cin=16, Cout=16, H=5, W=7, E=2, m=2, guide=True, stride=2, dilation=2,
                                padding=2),
    # NCHW stride 1, output as large as the input: the kernel gradient's FLAT pixel steps (a 9 x 9 reach
    # over a 3 x 4 image: every tap shifts past the image edges).
    "taps-flat-k5-dilation2": Case(B=1, Cin=16, Cout=16, H=3, W=4, kh=5, kw=5, padding=4, dilation=2, E=2),
    # Two K-steps a tap, the last partial (48 and 40 channels in blocks of 32), over the live taps of
    # each stride phase: with dilation 2 at stride 2 half the phases have none; at 5 x 4, stride 2,
    # the live rows and columns of a phase are two apart.
    "taps-blocks-stride2-dilation2": Case(B=1, Cin=48, Cout=40, H=7, W=6, E=2, stride=2, dilation=2, padding=2),
    "taps-blocks-k5x4-stride2": Case(B=1, Cin=40, Cout=48, H=9, W=8, kh=5, kw=4, E=2, stride=2, padding=2,
                                     spatial=True),
    "drconv-m3": Case(m=3, guide=True, spatial=True),
    "drconv-m4-groups2-stride2": Case(B=2, Cin=4, Cout=4, H=9, W=8, m=4, guide=True, groups=2, stride=2, E=2),
    "drconv-m1": Case(B=1, m=1, guide=True),
}


def _reference(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return expert_conv2d_loop(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _dynconv(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return dynconv.expert_conv2d(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _check(case: Case, dtype, device, memory_format=None):
    return check_against_reference(_dynconv, _reference, case.inputs(), dtype, device, memory_format,
                                   **case.geometry())


@pytest.fixture(params=["on-the-fly", "materialised"])
def mixing(request, monkeypatch):
    """Both sources of the mixed kernels: mixed in registers, or written once by a GEMM."""
    materialise = request.param == "materialised"
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: materialise)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients(name, dtype, mixing, device):
    case = CASES[name]
    y = _check(case, dtype, device)
    assert y.shape == (case.B, case.Cout, *case.out_hw)


# The taps cases in channels_last (test_forward_and_gradients runs them in NCHW): the per-tap loops in both layouts.
@pytest.mark.parametrize("name", ["basic", "drconv-m3", "taps-stride2-odd", "taps-drconv-stride2",
                                  "taps-blocks-k5x4-stride2"])
def test_channels_last(name, device):
    y = _check(CASES[name], torch.float16, device, torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_streamed_tiles(dtype, memory_format, device, monkeypatch):
    """Convs of 64 channels a group with materialised kernels take the four-stage streamed tiles
    (128 x 64, K-steps of 64 bytes: two or four a tap) in the forward and the input gradient; in
    NCHW through channels_last copies of x and dy (the kernel gradient too), the outputs NCHW."""
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: True)
    monkeypatch.setattr(kernels, "materialise_part", lambda filter_size, B, m, out_pixels: B)  # what configs assume
    streamed = kernels._streamed_tiles(64, dtype)
    assert streamed["num_stages"] == 4 and streamed["BLOCK_K"] * dtype.itemsize == 64
    assert kernels.default_forward_config(64, dtype, 30, cin_g=64, plain=True) == streamed
    assert input_grad_kernels.default_input_grad_config(64, dtype, 64, plain=True) == streamed
    case = Case(B=1, Cin=64, Cout=64, H=5, W=6, E=2)
    x = torch.empty((1, 64, 5, 6), dtype=dtype).to(memory_format=memory_format)
    experts = torch.empty((1, 64, 64, 3, 3), dtype=dtype)
    nchw = memory_format == torch.contiguous_format
    assert kernels.forward_copies_input(x, experts, 1, 1, (1, 1), (1, 1), (1, 1)) == nchw
    assert input_grad_kernels.input_grad_copies_output_grad(x, x, experts, 1, 1, (1, 1), (1, 1), (1, 1)) == nchw
    # fp32 NCHW at stride 1, output as large as the input: the kernel gradient's FLAT steps, no copy
    flat_fp32 = nchw and dtype == torch.float32
    assert weight_grad_kernels.weight_grad_copies_inputs(x, x, 1, 1, (1, 1)) == (nchw and not flat_fp32)
    copies = []
    copy = kernels.channels_last_copy
    for module in (kernels, input_grad_kernels, weight_grad_kernels, layout):
        monkeypatch.setattr(module, "channels_last_copy", lambda t: copies.append(t.shape) or copy(t))
    y = _check(case, dtype, device, memory_format)
    assert y.is_contiguous(memory_format=memory_format)
    # x in the forward; dy once for both backward passes (the input gradient's alone for fp32) and x
    # in the kernel gradient (not fp32)
    assert copies == ([x.shape] * (2 if flat_fp32 else 3) if nchw else [])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_drconv_backward_reads_channels_last_copies(dtype, memory_format, monkeypatch, device):
    """DRConv at 64 channels: the region forward reads x's channels_last copy, the backward copies dy
    once for the region input gradient and the kernel gradient, which copies x too (its region
    steps, five stages deep); every gradient against float64."""
    from dynconv.kernels import region_conv

    case = Case(B=1, Cin=64, Cout=64, H=5, W=6, E=2, m=3, guide=True)
    x = torch.empty((1, 64, 5, 6), dtype=dtype).to(memory_format=memory_format)
    nchw = memory_format == torch.contiguous_format
    assert weight_grad_kernels.weight_grad_copies_inputs(x, x, 3, 1, (1, 1)) == nchw
    experts = torch.empty((2, 64, 64, 3, 3), dtype=dtype)
    routing = torch.empty((1, 3, 2), dtype=dtype)
    assert weight_grad_kernels.backward_shares_output_grad(x, x, experts, routing, 1, (1, 1), (1, 1), (1, 1)) == nchw
    config = weight_grad_kernels.weight_grad_config(x.contiguous(memory_format=torch.channels_last), experts[:1], 3,
                                                    1, (1, 1))
    assert config["num_stages"] == 5 and config["BLOCK_K"] * dtype.itemsize == 64
    copies = []
    copy = kernels.channels_last_copy
    for module in (kernels, weight_grad_kernels, layout, region_conv, region_conv_input_grad):
        monkeypatch.setattr(module, "channels_last_copy", lambda t: copies.append(t.shape) or copy(t))
    y = _check(case, dtype, device, memory_format)
    assert y.is_contiguous(memory_format=memory_format)
    # NCHW: x (forward), dy (shared), x (kernel gradient); channels_last: the NCHW dy the check's
    # output gradient is, which the input gradient (by columns) copies.
    assert copies == [x.shape] * (3 if nchw else 1)


def test_input_gradient_materialises_for_dx_pixels():
    """At stride 2 a sample's mixed kernels outgrow y (196 output pixels at X1) but not dx (784):
    the forward mixes on the fly, the input gradient materialises them in parts (bounded by dx)."""
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty((64, 256, 28, 28), **meta).to(memory_format=torch.channels_last)
    experts = torch.empty((4, 256, 256, 3, 3), **meta)
    routing = torch.empty((64, 1, 4), **meta)
    assert input_grad_kernels.input_grad_pixels(x) == 784
    assert kernels.batch_parts(experts, routing, 14 * 14, None) == [(slice(None), False)]
    parts = kernels.batch_parts(experts, routing, input_grad_kernels.input_grad_pixels(x), None)
    assert len(parts) == 4 and all(materialised for _, materialised in parts)
    config = input_grad_kernels.input_grad_config(x, experts, 1, 1, (2, 2))
    assert (config["BLOCK_P"], config["BLOCK_N"], config["num_stages"]) == (128, 128, 3)


def test_strided_input_gradient_reads_kernels_materialised_for_dx(monkeypatch, device):
    """16 channels, 3 x 3 taps (144 weights a kernel) on a 16 x 16 image at stride 2: the kernels pay
    and fit for dx's 256 pixels, not for y's 64, so the forward mixes on the fly and the input
    gradient reads them materialised; every gradient against float64."""
    sources = []
    weight_source = kernels.weight_source

    def spy(experts, routing, materialise, innermost=kernels.CIN_INNERMOST):
        sources.append((innermost, materialise))
        return weight_source(experts, routing, materialise, innermost)

    monkeypatch.setattr(kernels, "weight_source", spy)
    _check(Case(B=2, Cin=16, Cout=16, H=16, W=16, E=2, stride=2), torch.float32, device)
    assert (kernels.CIN_INNERMOST, False) in sources and (kernels.COUT_INNERMOST, True) in sources


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_input_gradient_streams_materialised_kernels(dtype, memory_format, device, monkeypatch):
    """Materialised kernels of 64 channels a group at stride 2 (odd sizes: phases of unequal
    pixels and live taps): the input gradient's 128 x 128 tiles stepping 128 bytes, three stages,
    dy read through a channels_last copy in NCHW; every gradient against float64."""
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: True)
    monkeypatch.setattr(kernels, "materialise_part", lambda filter_size, B, m, out_pixels: B)
    x = torch.empty((1, 64, 7, 6), dtype=dtype).to(memory_format=memory_format)
    experts = torch.empty((2, 64, 64, 3, 3), dtype=dtype)
    dy = torch.empty((1, 64, 4, 3), dtype=dtype).to(memory_format=memory_format)
    in_rows, copies, config = input_grad_kernels.input_grad_route(dy, x, experts, 1, 1, (2, 2), (1, 1), (1, 1))
    assert not in_rows and copies == (memory_format == torch.contiguous_format)
    assert config["BLOCK_P"] == 128 and config["BLOCK_K"] * dtype.itemsize == 128 and config["num_stages"] == 3
    _check(Case(B=1, Cin=64, Cout=64, H=7, W=6, E=2, stride=2), dtype, device, memory_format)


def test_float64(device):
    _check(CASES["drconv-m3"], torch.float64, device)


def test_strided_view_input(device):
    """Kernels take every stride: a non-contiguous slice of a wider tensor needs no copy."""
    case = CASES["basic"]
    inputs = case.inputs()
    wide = torch.randn(case.B, case.Cin * 2, case.H, case.W + 3, dtype=torch.float32, device=device)
    x = wide[:, ::2, :, 1:1 + case.W]
    assert not x.is_contiguous()
    args = {k: (v.float().to(device) if v is not None else None) for k, v in inputs.items() if k != "x"}
    y = _dynconv(x, **args, **case.geometry())
    expected = _reference(x.double().cpu(), **{k: (v.double().cpu() if v is not None else None)
                                              for k, v in args.items()}, **case.geometry())
    assert_close(y, expected, torch.float32, "strided view")


def test_kernel_gradient_a_part_of_the_batch_at_a_time(monkeypatch, device):
    """The per-sample kernel gradient bounded to one sample's: two parts, reduced in order, give
    the expert, routing, bias, spatial and guide gradients of the whole batch."""
    monkeypatch.setattr(expert_ops, "DW_BUFFER_BYTES", 1)
    batch_sizes = []
    whole = weight_grad_kernels.expert_conv_backward_kernel

    def recording(grad, x, *args):
        batch_sizes.append(x.shape[0])
        return whole(grad, x, *args)

    monkeypatch.setattr(weight_grad_kernels, "expert_conv_backward_kernel", recording)
    _check(CASES["drconv-m3"], torch.float32, device)  # B = 2
    assert batch_sizes and set(batch_sizes) == {1}


def test_regions_spanning_many_tiles(monkeypatch, device):
    """Small pixel tiles: regions span several tiles and the grid's spare tiles stay idle."""
    default = kernels.default_forward_config
    monkeypatch.setattr(kernels, "default_forward_config", lambda *a, **k: {**default(*a, **k), "BLOCK_P": 16})
    _check(replace(CASES["drconv-m3"], H=9, W=10), torch.float32, device)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("E,m,groups,bias", [(2, 3, 1, True), (3, 3, 2, False), (4, 2, 1, True)],
                         ids=["bank", "bank-groups2-nobias", "mixing-E-over-m"])
def test_guide_scores_expert_bank(E, m, groups, bias, layout, monkeypatch, device):
    """∂S from the experts' own outputs mixed afterwards (E <= m), or from the mixed kernels (E > m),
    against float64 y_r; stride 2, odd sizes, spatial attention, NaN-poisoned scores."""
    case = Case(B=2, Cin=16 * groups, Cout=16, H=7, W=5, E=E, m=m, guide=True, stride=2, spatial=True,
                groups=groups, bias=bias)
    inputs = case.inputs()
    Ho, Wo = case.out_hw
    dy = torch.randn(case.B, case.Cout, Ho, Wo, dtype=torch.float64)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    t = {k: (v.float().to(device) if v is not None else None) for k, v in inputs.items()}
    launched = []
    real = guide_kernels.guide_score_launch

    def spy(x, source, *args):
        launched.append(source)
        return real(x, source, *args)

    monkeypatch.setattr(guide_kernels, "guide_score_launch", spy)
    mixed_bias = t["routing"] @ t["bias"] if bias else None
    scores = guide_kernels.expert_conv_guide_scores(
        t["x"].contiguous(memory_format=fmt), t["experts"], t["routing"], t["spatial"], mixed_bias,
        dy.float().to(device).contiguous(memory_format=fmt), groups, (2, 2), (1, 1), (1, 1),
        expert_bias=t["bias"])
    assert len(launched) == 1 and launched[0].mix == (E > m)
    ref = {k: (v.float().double() if v is not None else None) for k, v in inputs.items()}
    y_all = all_region_outputs(ref["x"], ref["experts"], ref["routing"], ref["bias"], 2, 1, 1, groups,
                               spatial=ref["spatial"])
    assert_close(scores, (y_all * dy.float().double()[:, None]).sum(2), torch.float32, "guide scores")


def test_guide_scores_expert_bank_reads_a_channels_last_copy(monkeypatch, device):
    """NCHW x with 64 channels and 576 output pixels: the expert-bank scores take the streamed tiles
    through a channels_last copy of x; against float64 y_r, NaN-poisoned scores."""
    case = Case(B=1, Cin=64, Cout=64, H=24, W=24, E=2, m=2, guide=True)
    inputs = case.inputs()
    x = inputs["x"].float().to(device)
    experts = inputs["experts"].float().to(device)
    assert guide_kernels.bank_copies_input(x, experts, 1, (1, 1), (1, 1), (1, 1))
    copies = []
    copy = guide_kernels.channels_last_copy
    monkeypatch.setattr(guide_kernels, "channels_last_copy", lambda t: copies.append(t.shape) or copy(t))
    dy = torch.randn(1, 64, 24, 24, dtype=torch.float64)
    routing = inputs["routing"].float().to(device)
    scores = guide_kernels.expert_conv_guide_scores(x, experts, routing, None, None, dy.float().to(device), 1, (1, 1),
                                              (1, 1), (1, 1))
    assert copies == [x.shape]
    y_all = all_region_outputs(inputs["x"].float().double(), inputs["experts"].float().double(),
                               inputs["routing"].float().double(), None, 1, 1, 1, 1)
    assert_close(scores, (y_all * dy.float().double()[:, None]).sum(2), torch.float32, "guide scores")


def test_drconv_region_forward_reads_nchw_input_through_a_channels_last_copy(monkeypatch, device):
    """NCHW DRConv: the region forward streams x's channels_last copy (taps past the image edges at
    stride 2, 3 K-steps a tap, a partial last one) and writes y NCHW; against float64, y NaN-poisoned."""
    from dynconv.kernels import region_conv

    case = Case(B=2, Cin=40, Cout=24, H=7, W=6, E=2, m=3, guide=True, stride=2)
    inputs = case.inputs()
    f32 = {k: v.float().to(device) if v is not None else None for k, v in inputs.items()}
    read = []
    launch = region_conv.forward_launch

    def spy(x, *args, **kwargs):
        read.append(_launch.is_channels_last(x))
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(region_conv, "forward_launch", spy)
    monkeypatch.setattr(region_conv, "default_forward_config",
                        lambda *a: {"BLOCK_O": 16, "BLOCK_P": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2})
    assert region_conv.forward_copies_input(f32["x"])
    Ho, Wo = case.out_hw
    y = torch.full((case.B, case.Cout, Ho, Wo), float("nan"), device=device)
    mixed_bias = torch.einsum("bme,eo->bmo", f32["routing"], f32["bias"])
    region_conv.region_forward(f32["x"], f32["experts"], f32["routing"], None, mixed_bias,
                               region_tables(f32["guide"]), y, 1, (2, 2), (1, 1), (1, 1))
    assert read and all(read)
    expected = _reference(inputs["x"], inputs["experts"], inputs["routing"], inputs["bias"], guide=inputs["guide"],
                          **case.geometry())
    assert_close(y, expected, torch.float32, "y")


@pytest.mark.parametrize("kh, m, bits", [(3, 5, 3), (5, 8, 0)])
def test_drconv_input_gradient_packs_each_row_s_tap_regions(kh, m, bits, device):
    """The region input gradient's one loop over (tap, region, channel block): each row's regions of
    all the taps packed into one word before the loop (3 bits a tap for 5 regions), or read in the
    loop where 25 taps of 3 bits do not fit 64; stride 2 with odd sizes (live taps per phase), all
    gradients against float64."""
    assert input_grad_kernels.region_bits((kh, kh), m) == bits
    case = Case(B=1, Cin=16, Cout=16, H=7, W=6, kh=kh, kw=kh, padding=kh // 2, E=2, m=m, guide=True, stride=2)
    _check(case, torch.float32, device, torch.channels_last)


def test_drconv_ties_and_an_empty_region(device):
    """A guide whose logits tie (argmax takes the first) and leave region 1 without a pixel; the
    expert bank (E <= m) forms its gradient."""
    case = Case(B=2, Cin=16, Cout=16, H=5, W=7, E=2, m=3, guide=True, stride=2)
    inputs = case.inputs()
    guide = torch.zeros_like(inputs["guide"])
    guide[:, 2, :, 1::2] = 1.0  # region 2 on odd columns, ties between 0, 1 (and 2) elsewhere: region 0
    inputs["guide"] = guide
    check_against_reference(_dynconv, _reference, inputs, torch.float32, device, torch.channels_last,
                            **case.geometry())


def test_region_tables_sort_pixels_by_region():
    guide = torch.randn(2, 3, 5, 7)
    tables = region_tables(guide)
    region = guide.argmax(1).reshape(2, -1)
    assert torch.equal(tables.region, region.int())
    for b in range(2):
        sorted_regions = region[b, tables.perm[b].long()]
        assert torch.equal(sorted_regions, torch.sort(region[b]).values)
        counts = torch.bincount(region[b], minlength=3)
        assert tables.count[b].tolist() == counts.tolist()
        assert tables.pixel_start[b].tolist() == [0, *torch.cumsum(counts, 0)[:-1].tolist()]


def test_region_tile_bound_is_tight():
    # 3 regions of 5, 5 and 25 pixels in tiles of 4: 2 + 2 + 7 = 11 = ceil(35/4) + 3 - 1.
    assert kernels.region_tile_bound(35, 3, 4) == 11


def test_weight_gradient_takes_flat_pixel_steps_where_they_apply():
    """FLAT pixel steps for NCHW at stride 1 with an output as large as the input and no regions;
    the gathered steps everywhere else (the cases above run both)."""
    def meta(case, channels_last=False):
        Ho, Wo = case.out_hw
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty((case.B, case.Cin, case.H, case.W), device="meta").to(memory_format=fmt)
        dy = torch.empty((case.B, case.Cout, Ho, Wo), device="meta").to(memory_format=fmt)
        experts = torch.empty((1, case.Cout, case.Cin // case.groups, case.kh, case.kw), device="meta")
        stride = (case.stride, case.stride)
        config = weight_grad_kernels.weight_grad_config(x, experts, case.m, case.groups, stride)
        dw = torch.empty((1, case.B, case.m, case.Cout, case.Cin // case.groups, case.kh, case.kw), device="meta")
        regions = meta_region_tables(case.B, Ho * Wo, case.m) if case.guide else None
        launch = weight_grad_kernels.backward_weight_launch(dy, x, regions, dw, (case.kh, case.kw), case.groups,
                                                            stride, (case.padding,) * 2, (case.dilation,) * 2, config)
        return launch.meta["FLAT"]

    assert meta(CASES["taps-flat-k5-dilation2"])
    assert meta(CASES["wide-channels"])
    assert not meta(CASES["taps-flat-k5-dilation2"], channels_last=True)
    assert not meta(CASES["taps-stride2-odd"])
    assert not meta(replace(CASES["taps-flat-k5-dilation2"], padding=3))  # a smaller output
    assert not meta(CASES["taps-drconv-stride2"])


def test_kernel_gradient_is_stored_channels_innermost():
    """The per-(sample, region) kernel gradient lies Cin/g innermost, so a program stores its tile
    as contiguous rows; the launch passes that unit stride, which triton specialises on."""
    dw = weight_grad_kernels.kernel_grad_buffer(2, 3, 4, 8, 5, (3, 3), torch.float32, "meta")
    assert dw.shape == (2, 3, 4, 8, 5, 3, 3) and dw.stride()[4] == 1 and dw.stride()[6] == 5
    x = torch.empty((3, 5, 6, 6), device="meta").to(memory_format=torch.channels_last)
    dy = torch.empty((3, 8, 6, 6), device="meta").to(memory_format=torch.channels_last)
    experts = torch.empty((1, 8, 5, 3, 3), device="meta")
    config = weight_grad_kernels.weight_grad_config(x, experts, 4, 1, (1, 1))
    regions = meta_region_tables(3, 36, 4)
    launch = weight_grad_kernels.backward_weight_launch(dy, x, regions, dw, (3, 3), 1, (1, 1), (1, 1), (1, 1), config)
    assert launch.args["sdw_i"] == 1


def test_nchw_wide_tiles(device):
    """The widest 2-byte NCHW defaults (64 x 256 forward, 256 x 128 input gradient, 128 x 128 x 64
    FLAT kernel gradient; materialised kernels, as large as the output) give the reference's values."""
    case = Case(B=1, Cin=128, Cout=256, H=16, W=16, kh=1, kw=1, padding=0, E=2)
    x = torch.empty((1, 128, 16, 16), dtype=torch.float16, device="meta")
    experts = torch.empty((2, 256, 128, 1, 1), dtype=torch.float16, device="meta")
    fwd = kernels.forward_config(x, experts, 1, 1, (1, 1), (0, 0), (1, 1))
    dx = input_grad_kernels.input_grad_config(x, experts, 1, 1, (1, 1))
    dw = weight_grad_kernels.weight_grad_config(x, experts[:1], 1, 1, (1, 1))
    assert (fwd["BLOCK_P"], fwd["BLOCK_N"], dx["BLOCK_P"], dx["BLOCK_N"]) == (64, 256, 256, 128)
    assert (dw["BLOCK_O"], dw["BLOCK_N"], dw["BLOCK_K"]) == (128, 128, 64)
    _check(case, torch.float16, device)


def test_nchw_256_pixel_tiles_for_plain_convs_only():
    """2-byte NCHW tiles of 256 pixels go to plain convs, one kernel a sample at stride 1; not to a
    stride, DRConv's regions or the guide scores (whose kernel spills them), nor on triton 3.9 to
    the 64-bit variants (they load the patch pixels x channels, which spilled them)."""
    x = torch.empty((2, 128, 64, 64), dtype=torch.bfloat16, device="meta")
    experts = torch.empty((4, 128, 128, 3, 3), dtype=torch.bfloat16, device="meta")
    one = (1, 1)
    assert kernels.forward_config(x, experts, 1, 1, one, one, one)["BLOCK_P"] == 256
    assert input_grad_kernels.input_grad_config(x, experts, 1, 1, one)["BLOCK_P"] == 256
    huge = torch.empty((2**17 + 1, 128, 64, 64), dtype=torch.bfloat16, device="meta")  # past 2^31 elements
    assert kernels.forward_config(huge, experts, 1, 1, one, one, one)["BLOCK_P"] <= 128
    assert input_grad_kernels.input_grad_config(huge, experts, 1, 1, one)["BLOCK_P"] == (256 if TRITON_VERSION <= (3, 6) else 128)
    assert kernels.forward_config(x, experts, 1, 1, (2, 2), one, one)["BLOCK_P"] <= 128
    assert input_grad_kernels.input_grad_config(x, experts, 1, 1, (2, 2))["BLOCK_P"] <= 128
    assert kernels.forward_config(x, experts, 2, 1, one, one, one)["BLOCK_P"] <= 128
    assert guide_kernels.bank_config(x, experts, 1, one, one, one)["BLOCK_P"] <= 128


@pytest.mark.parametrize("name, padding", [("drconv-m3", 1), ("taps-flat-k5-dilation2", 4)])
def test_weight_gradient_pixel_splits(name, padding, monkeypatch, device):
    """Split pixel chunks (two-stage, fixed-order sum) give the same gradients, deterministically;
    regions' chunks of sorted pixels, and FLAT chunks of consecutive ones."""
    monkeypatch.setattr(weight_grad_kernels, "weight_grad_splits", lambda *args: 3)
    case = replace(CASES[name], H=12, W=11, padding=padding)
    _check(case, torch.float32, device)
    inputs = {k: (v.float().to(device).requires_grad_() if v is not None else None)
              for k, v in case.inputs().items()}
    grads = []
    for _ in range(2):
        y = _dynconv(**inputs, **case.geometry())
        grads.append(torch.autograd.grad(y, [inputs["experts"], inputs["routing"]], torch.ones_like(y)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["taps-stride2-odd", "taps-drconv-stride2", "drconv-m3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_weight_gradient_register_prefetch(name, channels_last, monkeypatch, device):
    """One stage: the gathered pixel steps double-buffer in registers (PREFETCH), each chunk's
    first step loaded before its loop and the step past a chunk's end reading nothing; per tap
    and flattened, with and without regions, two chunks of two or more 16-pixel steps each."""
    monkeypatch.setattr(weight_grad_kernels, "weight_grad_splits", lambda *args: 2)
    default = weight_grad_kernels.weight_grad_config
    prefetched = []

    def one_stage(*args):
        return dict(default(*args), num_stages=1)

    launch = weight_grad_kernels.backward_weight_launch

    def recording(*args):
        built = launch(*args)
        prefetched.append(built.meta["PREFETCH"])
        return built

    monkeypatch.setattr(weight_grad_kernels, "weight_grad_config", one_stage)
    monkeypatch.setattr(weight_grad_kernels, "backward_weight_launch", recording)
    case = replace(CASES[name], H=17, W=15)
    _check(case, torch.float32, device, torch.channels_last if channels_last else None)
    assert prefetched and all(prefetched)


def test_batch_materialised_in_parts(monkeypatch, device):
    """Mixed kernels larger than y but worth materialising: one launch per part of the batch, each
    part's kernels within y's size."""
    monkeypatch.setattr(kernels, "MATERIALISE_MIN_PIXELS", 1)
    case = Case(B=3, Cin=4, Cout=4, H=4, W=5, E=2, spatial=True)
    experts, routing = torch.empty((case.E, case.Cout, case.Cin, 3, 3)), torch.empty((case.B, 1, case.E))
    parts = kernels.batch_parts(experts, routing, 20, None)  # 36 weights per filter > 20 output pixels
    assert len(parts) == 3 and all(materialised for _, materialised in parts)
    assert all(len(range(case.B)[samples]) * 36 <= case.B * 20 for samples, _ in parts)
    _check(case, torch.float32, device)


def test_int64_indexing_variant_matches(monkeypatch, device):
    """The INDEX_64 code path (chosen past 2^31 elements) computes the same values."""
    monkeypatch.setattr(kernels, "needs_int64", lambda *tensors: True)
    _check(CASES["drconv-m4-groups2-stride2"], torch.float32, device)


def test_int64_indexing_is_chosen_past_int32():
    big = torch.empty((1, 1, 2**16, 2**15 + 1), device="meta")
    assert kernels.needs_int64(big)
    assert not kernels.needs_int64(torch.empty((1, 1, 2**16, 2**15 - 1), device="meta"))
    experts = torch.empty((2, 1, 1, 1, 1), device="meta")
    routing = torch.empty((1, 1, 2), device="meta")
    source = kernels.weight_source(experts, routing, materialise=False)
    config = kernels.default_forward_config(1, torch.float32)
    launch = kernels.forward_launch(big, source, None, None, None, big, (1, 1), 1, (1, 1), (0, 0), (1, 1), config)
    assert launch.meta["INDEX_64"]


def test_materialising_is_bounded_by_the_output_size():
    experts = torch.empty((4, 64, 64, 3, 3), device="meta")
    routing = torch.empty((8, 1, 4), device="meta")
    assert kernels.should_materialise(experts, routing, 56 * 56)       # 576 weights per filter <= 3136 pixels
    assert not kernels.should_materialise(experts, routing, 14 * 14)   # too few pixels to pay for it
    regions = torch.empty((8, 8, 4), device="meta")
    assert not kernels.should_materialise(experts, regions, 56 * 56)  # 8 regions: 4608 > 3136


def test_reference_guide_gradient_is_the_spec_estimator():
    """The references' ∂guide is S ⊙ (∂S - Σ_r S ⊙ ∂S) with ∂S_r = Σ_o ∂y · y_r, written out here."""
    case = CASES["drconv-m3"]
    inputs = case.inputs()
    guide = inputs["guide"].requires_grad_()
    args = {k: v for k, v in inputs.items() if k != "guide"}
    weight = torch.einsum("bre,eoikl->broikl", args["routing"], args["experts"]) * args["spatial"][:, None, None, None]
    mixed_bias = args["routing"] @ args["bias"]
    y_all = torch.stack([torch.cat([F.conv2d(args["x"][b: b + 1], weight[b, r], mixed_bias[b, r], padding=1)
                                    for b in range(case.B)]) for r in range(case.m)], dim=1)
    region = guide.argmax(1)
    expected_y = torch.gather(y_all, 1, region[:, None, None].expand(-1, 1, case.Cout, -1, -1)).squeeze(1)
    grad = torch.randn_like(expected_y)
    dS = (grad[:, None] * y_all).sum(2)
    S = torch.softmax(guide.detach(), 1)
    expected_dguide = S * (dS - (S * dS).sum(1, keepdim=True))
    for reference in (expert_conv2d_loop, expert_conv2d_grouped, drconv_all_regions):
        guide.grad = None
        y = reference(**args, guide=guide, **case.geometry())
        assert_close(y, expected_y, torch.float64, reference.__name__ + " output")
        y.backward(grad)
        assert_close(guide.grad, expected_dguide, torch.float64, reference.__name__)


def test_references_agree_with_per_sample_conv():
    """The batch-as-groups trick and the loop against F.conv2d with explicitly mixed kernels."""
    case = CASES["groups2-stride2-odd-spatial-nobias"]
    inputs = case.inputs()
    x, experts, routing, spatial = inputs["x"], inputs["experts"], inputs["routing"], inputs["spatial"]
    expected = torch.cat([
        F.conv2d(x[b: b + 1], sum(routing[b, e] * experts[e] for e in range(case.E)) * spatial[b], None,
                 case.stride, case.padding, case.dilation, case.groups)
        for b in range(case.B)])
    for reference in (expert_conv2d_loop, expert_conv2d_grouped):
        assert_close(reference(x, experts, routing, spatial=spatial, **case.geometry()), expected, torch.float64,
                     reference.__name__)


def test_guide_with_one_region_gives_zero_guide_gradient(device):
    case = CASES["drconv-m1"]
    inputs = {k: (v.float().to(device).requires_grad_() if v is not None else None)
              for k, v in case.inputs().items()}
    y = _dynconv(**inputs, **case.geometry())
    y.sum().backward()
    assert torch.equal(inputs["guide"].grad, torch.zeros_like(inputs["guide"]))


def test_only_requested_gradients_are_computed(device):
    case = CASES["drconv-m3"]
    inputs = {k: (v.float().to(device) if v is not None else None) for k, v in case.inputs().items()}
    inputs["routing"].requires_grad_()
    y = _dynconv(**inputs, **case.geometry())
    (grad,) = torch.autograd.grad(y.sum(), [inputs["routing"]])
    assert grad.shape == inputs["routing"].shape and not torch.isnan(grad).any()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs
# ---------------------------------------------------------------------------------------------

def _good():
    return dict(x=torch.randn(2, 4, 6, 6), experts=torch.randn(3, 6, 2, 3, 3), routing=torch.rand(2, 3),
                bias=torch.randn(3, 6), groups=2, padding=1)


BAD_INPUTS = [
    ({"x": torch.randn(4, 6, 6)}, ValueError, r"x must be 4-D"),
    ({"experts": torch.randn(6, 2, 3, 3)}, ValueError, r"experts must be 5-D"),
    ({"routing": torch.rand(2, 1, 1, 3)}, ValueError, r"routing must be 2-D \(B, E\) or 3-D"),
    ({"routing": torch.rand(3, 3)}, ValueError, r"batch mismatch: x has 2 samples, routing has 3"),
    ({"routing": torch.rand(2, 4)}, ValueError, r"routing weighs 4 experts, but there are E=3"),
    ({"routing": torch.rand(2, 2, 3)}, ValueError, r"routing has m=2 regions but no guide"),
    ({"bias": torch.randn(3, 5)}, ValueError, r"bias must have shape \(E, Cout\) = \(3, 6\)"),
    ({"groups": 3}, ValueError, r"must be divisible by groups=3"),
    ({"experts": torch.randn(3, 6, 4, 3, 3)}, ValueError, r"experts hold 4 input channels per group"),
    ({"spatial": torch.rand(2, 3, 2)}, ValueError, r"spatial must have shape \(B, kh, kw\) = \(2, 3, 3\)"),
    ({"routing": torch.rand(2, 2, 3), "guide": torch.randn(2, 3, 6, 6)}, ValueError,
     r"region count mismatch: guide has m=3 regions, routing has m=2"),
    ({"routing": torch.rand(2, 2, 3), "guide": torch.randn(2, 2, 5, 6)}, ValueError,
     r"guide's spatial size \(5, 6\) must equal the output size \(6, 6\)"),
    ({"routing": torch.rand(2, 2, 3), "guide": torch.randn(1, 2, 6, 6)}, ValueError,
     r"batch mismatch: x has 2 samples, guide has 1"),
    ({"x": torch.randint(0, 3, (2, 4, 6, 6))}, TypeError, r"x must be float16, bfloat16, float32 or float64"),
    ({"routing": torch.rand(2, 3, dtype=torch.float64)}, TypeError, r"all tensors must have the same dtype"),
    ({"padding": -1}, ValueError, r"padding must be >= 0"),
    ({"stride": (1, 2, 3)}, TypeError, r"stride must be an int or a pair of ints"),
    ({"x": torch.randn(2, 4, 1, 1), "padding": 0}, ValueError, r"output size .* is not positive"),
    ({"experts": torch.randn(3, 6, 2, 0, 3)}, ValueError, r"at least one expert, output channel and tap"),
]


@pytest.mark.parametrize("change, error, match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_named(change, error, match):
    args = {**_good(), **change}
    x, experts, routing = args.pop("x"), args.pop("experts"), args.pop("routing")
    with pytest.raises(error, match=match):
        dynconv.expert_conv2d(x, experts, routing, **args)


def test_mixed_devices_are_named():
    # A meta tensor stands in for a second device on a CPU-only machine.
    args = _good()
    with pytest.raises(ValueError, match="same device.*experts on meta"):
        dynconv.expert_conv2d(args["x"], args["experts"].to("meta"), args["routing"], groups=2, padding=1)


# ---------------------------------------------------------------------------------------------
# As torch sees the op
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["groups2-stride2-odd-spatial-nobias", "drconv-m3"])
def test_opcheck(name, device):
    case = CASES[name]
    inputs = {k: (v.float().to(device) if v is not None else None) for k, v in case.inputs().items()}
    for k in ("x", "experts", "routing", "spatial", "guide", "bias"):
        if inputs[k] is not None:
            inputs[k].requires_grad_()
    routing = inputs["routing"] if inputs["routing"].dim() == 3 else inputs["routing"][:, None]
    args = (inputs["x"], inputs["experts"], routing.detach().requires_grad_(), inputs["bias"], inputs["spatial"],
            inputs["guide"], [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2, case.groups)
    torch.library.opcheck(torch.ops.dynconv.expert_conv2d, args)
    if inputs["guide"] is not None:  # with the region tables built before it, as the op path passes them
        guide = inputs["guide"].detach()
        torch.library.opcheck(torch.ops.dynconv.expert_conv2d_region_tables, (guide,))
        regions = torch.ops.dynconv.expert_conv2d_region_tables(guide)
        torch.library.opcheck(torch.ops.dynconv.expert_conv2d, args + (regions,))


def test_torch_compile_streamed_nchw(device, monkeypatch):
    """An NCHW conv on the streamed tiles under torch.compile: its backward formula, traced on fake
    tensors, copies dy to channels_last once for both backward ops (a custom op); gradients as eager."""
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: True)
    monkeypatch.setattr(kernels, "materialise_part", lambda filter_size, B, m, out_pixels: B)
    inputs = Case(B=1, Cin=64, Cout=64, H=4, W=5, E=2).inputs()

    def layer(x, experts, routing, bias):
        return (dynconv.expert_conv2d(x, experts, routing, bias, padding=1) ** 2).sum()

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        args = [inputs[k].float().to(device).requires_grad_() for k in ("x", "experts", "routing", "bias")]
        fn(*args).backward()
        results.append([a.grad for a in args])
    for eager, compiled in zip(*results):
        assert_close(compiled, eager, torch.float32, "compiled grad")


def test_torch_compile_fullgraph(device):
    case = CASES["drconv-m3"]
    inputs = {k: v.float().to(device).requires_grad_() for k, v in case.inputs().items()}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, experts, routing, bias, spatial, guide):
        y = dynconv.expert_conv2d(x, experts, torch.softmax(routing, -1), bias, padding=1, spatial=spatial,
                                  guide=guide)
        return torch.relu(y).sum()

    out = layer(**inputs)
    out.backward()
    expected = torch.relu(_reference(**{k: v.detach().double().cpu() for k, v in inputs.items()
                                        if k != "routing"},
                                     routing=torch.softmax(inputs["routing"].detach().double().cpu(), -1),
                                     **case.geometry())).sum()
    assert_close(out.detach(), expected, torch.float32, "compiled")
    assert all(v.grad is not None and not torch.isnan(v.grad).any() for v in inputs.values())


@pytest.mark.parametrize("name", ["groups2-stride2-odd-spatial-nobias", "drconv-m3"])
def test_cpu_pytorch_path(name, monkeypatch):
    """Without the interpreter, CPU tensors take the batch-as-groups path (and autograd through it)."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)

    def no_kernels(*args, **kwargs):
        raise AssertionError("a Triton kernel ran on the plain-PyTorch path")

    for module, entry in ((kernels, "expert_conv_forward"), (input_grad_kernels, "expert_conv_backward_input"),
                          (region_conv_input_grad, "region_backward_input"),
                          (weight_grad_kernels, "expert_conv_backward_kernel"),
                          (guide_kernels, "expert_conv_guide_scores")):
        monkeypatch.setattr(module, entry, no_kernels)
    case = CASES[name]
    check_against_reference(_dynconv, _reference, case.inputs(), torch.float32, "cpu", **case.geometry())
    y = check_against_reference(_dynconv, _reference, case.inputs(), torch.float64, "cpu",
                                torch.channels_last, **case.geometry())
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_autocast_casts_like_a_conv(monkeypatch):
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    args = _good()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dynconv.expert_conv2d(args["x"], args["experts"], args["routing"], args["bias"], padding=1, groups=2)
    assert y.dtype == torch.bfloat16
