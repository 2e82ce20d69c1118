"""kernels/region_conv.py: DRConv's region forward on materialised region kernels, against float64
references (interpreter on CPU, NaN-poisoned allocations)."""
import pytest
import torch

import dynconv
from dynconv.kernels import expert_conv, region_conv, region_conv_input_grad
from dynconv.reference import expert_conv2d_loop
from helpers import assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("nan_poison")


def _inputs(B=2, Cin=16, Cout=16, H=7, W=5, k=3, E=3, m=3, groups=1, stride=1, padding=1, bias=True,
            spatial=True, dilation=1):
    Ho = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    f64 = dict(dtype=torch.float64)
    return {
        "x": torch.randn(B, Cin, H, W, **f64),
        "experts": torch.randn(E, Cout, Cin // groups, k, k, **f64) * 0.5,
        "routing": torch.rand(B, m, E, **f64),
        "bias": torch.randn(E, Cout, **f64) if bias else None,
        "spatial": torch.rand(B, k, k, **f64) + 0.5 if spatial else None,
        "guide": torch.randn(B, m, Ho, Wo, **f64) * 4,
    }, dict(stride=stride, padding=padding, groups=groups, **({"dilation": dilation} if dilation != 1 else {}))


def _op(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return dynconv.expert_conv2d(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _reference(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return expert_conv2d_loop(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


@pytest.fixture
def region_launches(monkeypatch):
    """Counts the region kernel's launches; the expert kernels' region forward must not run."""
    launched = []
    real = region_conv.forward_launch

    def spy(*args, **kwargs):
        launched.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(region_conv, "forward_launch", spy)
    monkeypatch.setattr(expert_conv, "expert_conv_forward",
                        lambda *a, **k: pytest.fail("the expert kernels' forward ran for a DRConv layer"))
    return launched


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [dict(), dict(H=9, W=6, stride=2, groups=2, Cin=32, Cout=32, E=2, m=4),
                                   dict(H=3, W=4, k=5, padding=2, bias=False, spatial=False)],
                         ids=["odd", "stride2-groups2", "kernel-over-image"])
def test_region_forward_and_gradients(shape, layout, region_launches, device):
    inputs, geometry = _inputs(**shape)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    y = check_against_reference(_op, _reference, inputs, torch.float32, device, fmt, **geometry)
    assert region_launches and y.is_contiguous(memory_format=fmt)


def test_region_forward_fp16(region_launches, device):
    inputs, geometry = _inputs(B=1, H=6, W=6)
    check_against_reference(_op, _reference, inputs, torch.float16, device, torch.channels_last, **geometry)


def test_region_forward_float64(region_launches, device):
    inputs, geometry = _inputs(B=1, H=5, W=6, E=2, m=2)
    check_against_reference(_op, _reference, inputs, torch.float64, device, torch.channels_last, **geometry)


def test_ties_empty_regions_and_batch_parts(monkeypatch, region_launches, device):
    """Tied logits (argmax takes the first region), regions without a pixel, and a workspace that
    holds one sample's region kernels: one launch per sample."""
    inputs, geometry = _inputs(B=3, m=4, E=2, spatial=True)
    guide = torch.zeros_like(inputs["guide"])
    guide[:, 3, ::2] = 1.0  # region 3 on even rows; ties elsewhere go to region 0; regions 1, 2 empty
    guide[1] = 0.0  # sample 1: all tied, region 0 only
    inputs["guide"] = guide
    one = inputs["experts"][0].numel() * inputs["routing"].shape[1] * 4
    monkeypatch.setattr(region_conv, "WORKSPACE_BYTES", one)
    y = check_against_reference(_op, _reference, inputs, torch.float32, device, **geometry)
    assert len(region_launches) == 3
    assert not y.isnan().any()


def test_narrow_groups_fall_back_to_the_expert_kernels(monkeypatch, device):
    """Fewer than 16 channels a group: the expert kernels' region path (flattened reduction) runs."""
    monkeypatch.setattr(region_conv, "forward_launch", lambda *a, **k: pytest.fail("region kernel for 4 channels"))
    inputs, geometry = _inputs(Cin=4, Cout=6)
    check_against_reference(_op, _reference, inputs, torch.float32, device, **geometry)


def test_mixed_kernels_fold_spatial_attention():
    inputs, _ = _inputs(B=2, m=3, E=2)
    mixed = region_conv.mixed_kernels(inputs["experts"], inputs["routing"], inputs["spatial"])
    expected = torch.einsum("bre,eouvc->brouvc", inputs["routing"], inputs["experts"].movedim(2, -1))
    expected = (expected * inputs["spatial"][:, None, None, :, :, None]).movedim(-1, 3)
    assert mixed.shape == (2, 3, 16, 16, 3, 3) and mixed.stride(3) == 1
    assert_close(mixed, expected, torch.float64, "mixed kernels")
    # The input gradient's order: Cout innermost (its reduction axis), the same kernels.
    for_dx = region_conv.mixed_kernels(inputs["experts"], inputs["routing"], inputs["spatial"],
                                       region_conv.COUT_INNERMOST)
    assert for_dx.shape == mixed.shape and for_dx.stride(2) == 1
    assert_close(for_dx, expected, torch.float64, "mixed kernels, Cout innermost")


def test_catalogue_launches_are_region_launches():
    """The region forward's launches, each followed by the input gradient's on the region kernels."""
    launches = region_conv.catalogue()
    forwards, input_grads = launches[0::2], launches[1::2]
    assert forwards and all(launch.name == "region_conv_fwd_kernel" for launch in forwards)
    assert len(input_grads) == len(forwards)
    assert all(launch.name == "expert_conv_bwd_input_kernel" and launch.meta["HAS_GUIDE"] and not launch.meta["MIX"]
               for launch in input_grads)


def test_region_forward_with_a_tuned_tile(monkeypatch, region_launches, device):
    """A tile the tuner may pick (region_conv_fwd's space): fewer pixels and channels than the default,
    several K-steps per tap and several output-channel tiles."""
    tile = {"BLOCK_O": 16, "BLOCK_P": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(region_conv, "forward_config", lambda *args: dict(tile))
    inputs, geometry = _inputs(B=2, Cin=32, Cout=32, H=7, W=6, m=4)
    check_against_reference(_op, _reference, inputs, torch.float32, device, torch.contiguous_format, **geometry)
    assert region_launches and all(args[-1] == tile for args in region_launches)


# --------------------------------------------------------------------------------------------
# The input gradient by columns (kernels/region_conv_input_grad.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def column_launches(monkeypatch):
    """Counts the column products and folds; the m-region input-gradient kernel must not run."""
    launched = {"columns": [], "fold": []}
    for name, real in (("columns", region_conv_input_grad.columns_launch),
                       ("fold", region_conv_input_grad.fold_launch)):
        def spy(*args, _real=real, _name=name, **kwargs):
            launched[_name].append(args)
            return _real(*args, **kwargs)
        monkeypatch.setattr(region_conv_input_grad, f"{name}_launch", spy)
    monkeypatch.setattr(region_conv, "region_backward_input",
                        lambda *a, **k: pytest.fail("the m-region input gradient ran where the columns fit"))
    return launched


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [dict(H=9, W=7, stride=2, padding=2, dilation=2, groups=2, Cin=32, Cout=32, m=4),
                                   dict(H=3, W=4, k=5, padding=2, E=2, m=5)],
                         ids=["stride2-dilation2-groups2", "kernel-over-image"])
def test_input_gradient_by_columns(shape, layout, column_launches, device):
    """dx through the column product and the fold (odd sizes, stride 2 with odd H, dilation, groups,
    K past the image), every gradient against float64, the workspace NaN-poisoned."""
    dilation = shape.pop("dilation", 1)
    inputs, geometry = _inputs(**shape, dilation=dilation)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    check_against_reference(_op, _reference, inputs, torch.float32, device, fmt, **geometry)
    assert len(column_launches["columns"]) == len(column_launches["fold"]) == 1


def test_input_gradient_columns_in_parts_and_bf16(monkeypatch, column_launches, device):
    """A workspace of one sample's columns: one product and one fold a sample; bf16 operands, the
    columns kept in fp32 (dx rounded once)."""
    inputs, geometry = _inputs(B=3, H=6, W=5, m=3)
    Ho, Wo = 6, 5
    one = region_conv_input_grad.column_count((3, 3), 16) * Ho * Wo * 4
    monkeypatch.setattr(region_conv_input_grad, "COLUMNS_BYTES", one)
    check_against_reference(_op, _reference, inputs, torch.bfloat16, device, torch.channels_last, **geometry)
    assert len(column_launches["columns"]) == len(column_launches["fold"]) == 3
    assert all(args[3].dtype == torch.float32 for args in column_launches["columns"])


def test_input_gradient_columns_with_a_tuned_tile(monkeypatch, column_launches, device):
    """A tile the tuner may pick (region_conv_columns' space): 16-pixel tiles, several column tiles
    and several 16-channel reduction steps, one stage."""
    tile = {"BLOCK_P": 16, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(region_conv_input_grad, "columns_config", lambda *args: dict(tile))
    inputs, geometry = _inputs(B=2, Cin=32, Cout=48, H=7, W=6, m=4, stride=2)
    check_against_reference(_op, _reference, inputs, torch.float32, device, torch.channels_last, **geometry)
    assert column_launches["columns"] and all(args[-1] == tile for args in column_launches["columns"])


def test_input_gradient_falls_back_where_the_columns_do_not_fit(monkeypatch, device):
    """One sample's columns past COLUMNS_BYTES: the m-region kernel, same gradients."""
    monkeypatch.setattr(region_conv_input_grad, "COLUMNS_BYTES", 1)
    monkeypatch.setattr(region_conv_input_grad, "fold_launch", lambda *a, **k: pytest.fail("columns past the bound"))
    inputs, geometry = _inputs(B=2, m=3, stride=2)
    check_against_reference(_op, _reference, inputs, torch.float32, device, torch.channels_last, **geometry)


def test_column_kernels_layout():
    """Row (g, u, v, c) of a region's column kernel holds W[b, r, g·Cout/g + o, c, u, v] over o."""
    inputs, _ = _inputs(B=2, m=3, E=2, Cin=8, Cout=12, groups=2)
    experts = inputs["experts"]  # (E, Cout, Cin/g, 3, 3): two groups of 4 input channels
    mixed = region_conv.mixed_kernels(experts, inputs["routing"], inputs["spatial"])  # (b, m, Cout, Cin/g, u, v)
    cols = region_conv_input_grad.column_kernels(experts, inputs["routing"], inputs["spatial"], groups=2)
    assert cols.shape == (2, 3, 2 * 9 * 4, 6, 1, 1) and cols.stride(3) == 1
    expected = mixed.reshape(2, 3, 2, 6, 4, 3, 3).permute(0, 1, 2, 5, 6, 4, 3).reshape(2, 3, 72, 6, 1, 1)
    assert_close(cols, expected, torch.float64, "column kernels")


def test_catalogue_lists_the_column_product_and_the_fold():
    launches = region_conv_input_grad.catalogue()
    assert [launch.name for launch in launches[:2]] == ["region_conv_columns_kernel", "fold_columns_kernel"]
    assert all(launch.name == "region_conv_columns_kernel" for launch in launches[0::2])



@pytest.fixture
def table_builds(monkeypatch):
    """The guide shapes of the region tables' launches."""
    from dynconv.kernels import region_tables
    builds = []
    real = region_tables.region_tables_launch

    def counted(*args, **kwargs):
        builds.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(region_tables, "region_tables_launch", counted)
    return builds


@pytest.mark.parametrize("columns", [True, False], ids=["columns", "m-region"])
def test_a_training_step_builds_the_region_tables_once(columns, table_builds, monkeypatch, device):
    """The eager forward's region tables serve its input and kernel gradients: one build (one launch)
    a forward and backward, whichever input gradient runs; every gradient against float64."""
    if not columns:
        monkeypatch.setattr(region_conv_input_grad, "uses_columns", lambda *args: False)
    inputs, geometry = _inputs(B=2, H=6, W=5, m=4)
    check_against_reference(_op, _reference, inputs, torch.float32, device, torch.channels_last, **geometry)
    assert table_builds == [inputs["guide"].shape]


def test_a_compiled_training_step_builds_the_region_tables_once(table_builds, device):
    """Under torch.compile the forward op takes the tables of a region-tables op and saves them for
    the backward ops: one build a forward and backward there too."""
    inputs, geometry = _inputs(B=2, H=6, W=5, m=4)
    compiled = torch.compile(_op, fullgraph=True, backend="aot_eager")
    check_against_reference(compiled, _reference, inputs, torch.float32, device, **geometry)
    assert table_builds == [inputs["guide"].shape]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "strided"])
def test_region_bias_gradient_sums_each_region_s_pixels(layout):
    """dbias[b, r] = Σ over region r's pixels of dy (a region empty, one larger than a pixel step, more
    channels than a channel tile), NaN-poisoned, against float64; a strided dy takes the row/column
    offsets."""
    from dynconv.kernels import expert_conv_weight_grad as ecw
    from dynconv.kernels.region_tables import region_tables
    B, m, Cout, Ho, Wo = 2, 4, 160, 7, 9
    guide = torch.randn(B, m, Ho, Wo)
    guide[:, 2] -= 100.0  # region 2 empty
    guide[0, 1, :5] += 100.0  # 45 pixels of region 1 in sample 0: two steps of 32
    dy = torch.randn(B, Cout, Ho, Wo, dtype=torch.bfloat16)
    if layout == "NHWC":
        dy = dy.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        dy = torch.randn(B, Cout, Ho, Wo + 3, dtype=torch.bfloat16)[..., :Wo]  # rows Wo + 3 apart
    tables = region_tables(guide)
    dbias = torch.full((B, m, Cout), float("nan"))
    launch = ecw.region_bias_grad_launch(dy, tables, dbias)
    assert launch.meta["FLAT"] == (layout != "strided")
    launch()
    one_hot = torch.nn.functional.one_hot(guide.argmax(1), m).double()  # (B, Ho, Wo, m)
    expected = torch.einsum("bohw,bhwr->bro", dy.double(), one_hot)
    assert_close(dbias, expected, torch.float32, "dbias")
    assert torch.equal(dbias[:, 2], torch.zeros(B, Cout))
