"""The NCHW expert-conv forward and input gradient in aligned row boxes (``kernels/expert_conv_rows.py``)
against float64.

Through the op on fp16, bf16 (the harness's interpreter shim) and fp32 NCHW inputs, NaN-poisoned,
every gradient checked too; each case asserts which launches ran in boxes (the forward always, the
stride-1 input gradient where dy qualifies) and that what ran in boxes copied nothing to channels_last.
"""
import pytest
import torch

from dynconv.kernels import expert_conv as kernels
from dynconv.kernels import expert_conv_input_grad as input_grad_kernels
from dynconv.kernels import expert_conv_rows as rows
from dynconv.kernels import expert_conv_weight_grad as weight_grad_kernels
from dynconv.kernels import layout
from test_expert_conv import Case, _check

pytestmark = pytest.mark.usefixtures("nan_poison")

# name: (case, box, output columns a box, the element sizes whose input gradient reads dy in row boxes too)
CASES = {
    # 'same' 3 x 3 at a 56-pixel row (E2's): one 64-pixel box of two rows a tile, odd H (a half
    # tile), 40 of a 64-column tile, a bias. dy's 40 channels are no whole K-steps: dx as before.
    "same-3x3-w56": (Case(B=2, Cin=32, Cout=40, H=5, W=56, E=2), 64, 56, ()),
    # Two groups, dilation 2 (a halo of 8 past 2 columns of padding), 48 pixels: 48 of 64 used.
    "groups2-dilation2-w48": (Case(B=1, Cin=64, Cout=32, H=4, W=48, E=2, groups=2, padding=2, dilation=2), 64, 48,
                              (4,)),
    # No padding: 54 outputs, not whole chunks (stored element-wise), no halo, no bias; dy's 54
    # columns are no whole chunks: dx as before.
    "valid-w56": (Case(B=1, Cin=32, Cout=32, H=4, W=56, E=2, padding=0, bias=False), 64, 56, ()),
    # 96 pixels: two 64-pixel boxes of 48 outputs each, overlapping by the halo and the reach.
    "two-boxes-w96": (Case(B=1, Cin=32, Cout=32, H=2, W=96, E=2), 64, 48, (2, 4)),
    # 112 pixels: one 128-pixel box a row.
    "box128-w112": (Case(B=1, Cin=32, Cout=32, H=3, W=112, E=2), 128, 112, (2, 4)),
    # 1 x 1: one accumulator, no shift.
    "1x1-w64": (Case(B=1, Cin=32, Cout=32, H=3, W=64, E=2, kh=1, kw=1, padding=0), 64, 64, (2, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_in_row_boxes(name, dtype, device, monkeypatch):
    """The forward, and where dy qualifies the stride-1 input gradient (the same kernel on dy with the
    kernels transposed and flipped), read NCHW in place; below 64 channels a group the kernel
    gradient copies nothing either."""
    case, box, step, dx_sizes = CASES[name]
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: True)
    monkeypatch.setattr(kernels, "materialise_part", lambda filter_size, B, m, out_pixels: B)
    x = torch.empty((case.B, case.Cin, case.H, case.W), dtype=dtype)
    y = torch.empty((case.B, case.Cout, *case.out_hw), dtype=dtype)
    experts = torch.empty((case.E, case.Cout, case.Cin // case.groups, case.kh, case.kw), dtype=dtype)
    geometry = [(n, n) for n in (case.stride, case.padding, case.dilation)]
    assert kernels.forward_in_rows(x, experts, 1, case.groups, *geometry)
    assert not kernels.forward_copies_input(x, experts, 1, case.groups, *geometry)
    assert rows.box_columns(case.W, case.out_hw[1], case.kw, case.padding, case.dilation) == (box, step)
    dx_in_rows = input_grad_kernels.input_grad_in_rows(y, x, experts, 1, case.groups, *geometry)
    assert dx_in_rows == (dtype.itemsize in dx_sizes)
    launched, copied = [], []
    for entry in ("forward_launch", "input_grad_launch"):
        launch = getattr(rows, entry)
        monkeypatch.setattr(rows, entry, lambda *a, entry=entry, launch=launch, **k:
                            launched.append((entry, a[0].shape)) or launch(*a, **k))
    copy = kernels.channels_last_copy
    for module in (kernels, input_grad_kernels, weight_grad_kernels, layout):
        monkeypatch.setattr(module, "channels_last_copy", lambda t: copied.append(t.shape) or copy(t))
    out = _check(case, dtype, device)
    assert out.shape == y.shape
    # the input gradient's launch goes through forward_launch too
    expected = [("forward_launch", x.shape)]
    expected += [("input_grad_launch", y.shape), ("forward_launch", y.shape)] * dx_in_rows
    assert launched == expected
    # no copy of x; dy's where the input gradient takes the channels_last streamed tiles instead
    dy_copied = input_grad_kernels.input_grad_copies_output_grad(y, x, experts, 1, case.groups, *geometry)
    assert not (dy_copied and dx_in_rows)
    assert copied == [y.shape] * dy_copied


def test_rows_are_taken_only_where_they_apply():
    """Other layouts, fp64, strides, spatial attention, kernel widths, unaligned widths and rows
    whose boxes would waste over a quarter of their columns keep the other kernels."""
    def reads_in_rows(dtype=torch.float16, W=56, fmt=torch.contiguous_format, stride=1, kw=3, cin=32, spatial=False):
        x = torch.empty((2, cin, 8, W), dtype=dtype).contiguous(memory_format=fmt)
        experts = torch.empty((2, 64, cin, 3, kw), dtype=dtype)
        return kernels.forward_in_rows(x, experts, 1, 1, (stride, stride), (1, 1), (1, 1), spatial)

    assert reads_in_rows() and reads_in_rows(torch.bfloat16) and reads_in_rows(torch.float32)
    assert not reads_in_rows(torch.float64)
    assert not reads_in_rows(fmt=torch.channels_last)
    assert not reads_in_rows(stride=2)
    assert not reads_in_rows(kw=5)
    assert not reads_in_rows(spatial=True)
    assert not reads_in_rows(W=60)  # rows not 16-byte aligned
    assert not reads_in_rows(W=28)  # 28 of a box's 64 columns
    assert not reads_in_rows(cin=48)  # not whole channel blocks
    assert rows.box_columns(28, 28, 3, 1, 1) is None
    assert rows.box_columns(112, 112, 3, 1, 1) == (128, 112)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_of_64_channels_copies_only_x(dtype, device, monkeypatch):
    """From 64 channels a group the 16-bit kernel gradient reads x's channels_last copy; dy, whose
    pixels are one flat axis of a multiple of 16, it reads in place (DY_FLAT steps), so the op makes
    no copy of dy for both backward passes and the input gradient reads dy in row boxes."""
    case = Case(B=1, Cin=64, Cout=64, H=2, W=56, E=2)
    x, experts, routing = _materialised(case, dtype, monkeypatch)
    assert weight_grad_kernels.weight_grad_copies_inputs(x, x, 1, 1, (1, 1))
    assert weight_grad_kernels.reads_output_grad_flat(x, 1)
    assert not weight_grad_kernels.weight_grad_copies_output_grad(x, x, 1, 1, (1, 1))
    assert not weight_grad_kernels.backward_shares_output_grad(x, x, experts, routing, 1, (1, 1), (1, 1), (1, 1))
    assert not weight_grad_kernels.reads_output_grad_flat(x[..., :6], 1)  # 12 pixels: planes not 16-aligned
    launched, copied = _record_backward(monkeypatch)
    _check(case, dtype, device)
    assert copied == [x.shape]  # x, for the kernel gradient
    weight_launch = launched[-1][0]
    assert weight_launch.meta["DY_FLAT"] and not weight_launch.meta["FLAT"]
    assert launched[:-1] == ["forward_launch", "input_grad_launch", "forward_launch"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_shares_the_input_gradients_copy_of_dy(dtype, device, monkeypatch):
    """Where the input gradient copies dy anyway (24-pixel rows: no row boxes), the kernel gradient
    reads that one copy rather than dy in place, though dy would qualify."""
    case = Case(B=1, Cin=64, Cout=64, H=2, W=24, E=2)
    x, experts, routing = _materialised(case, dtype, monkeypatch)
    assert weight_grad_kernels.reads_output_grad_flat(x, 1)
    assert weight_grad_kernels.backward_shares_output_grad(x, x, experts, routing, 1, (1, 1), (1, 1), (1, 1))
    launched, copied = _record_backward(monkeypatch)
    _check(case, dtype, device)
    assert copied == [x.shape] * 3  # x for the forward, dy once for both backward passes, x for the kernel gradient
    assert launched[:-1] == []  # no row boxes
    assert not launched[-1][0].meta["DY_FLAT"]


def _materialised(case: Case, dtype, monkeypatch):
    """Stand-ins (x, experts, routing) of ``case`` for the routing predicates, with the op
    set to materialise the whole batch's kernels (the streamed tiles' condition)."""
    monkeypatch.setattr(kernels, "should_materialise", lambda *args: True)
    monkeypatch.setattr(kernels, "materialise_part", lambda filter_size, B, m, out_pixels: B)
    x = torch.empty((case.B, case.Cin, case.H, case.W), dtype=dtype)
    experts = torch.empty((case.E, case.Cout, case.Cin // case.groups, case.kh, case.kw), dtype=dtype)
    return x, experts, torch.empty((case.B, 1, case.E), dtype=dtype)


def _record_backward(monkeypatch):
    """(launches, copied shapes) the op makes: the row-box entry points by name, the kernel
    gradient's launches as they are, channels_last copies by shape."""
    launched, copied = [], []
    launch = weight_grad_kernels.launch_with_partials
    monkeypatch.setattr(weight_grad_kernels, "launch_with_partials",
                        lambda *a, **k: launched.append(launch(*a, **k)) or launched[-1])
    for entry in ("forward_launch", "input_grad_launch"):
        rows_launch = getattr(rows, entry)
        monkeypatch.setattr(rows, entry, lambda *a, entry=entry, rows_launch=rows_launch, **k:
                            launched.append(entry) or rows_launch(*a, **k))
    copy = kernels.channels_last_copy
    for module in (kernels, input_grad_kernels, weight_grad_kernels, layout):
        monkeypatch.setattr(module, "channels_last_copy", lambda t: copied.append(t.shape) or copy(t))
    return launched, copied
