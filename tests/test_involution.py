"""dynconv.involution and dynconv.dynamic_dwconv2d (docs/operators.md §1) against float64 references.

Kernels run through the Triton interpreter on CPU (see conftest.py); every allocation is
NaN-poisoned so an output element that no program writes fails the comparison.
"""
import pytest
import torch

import dynconv
from dynconv.kernels import _launch, configs
from dynconv.kernels import involution as kernels
from dynconv.kernels import involution_nchw
from dynconv.kernels import involution_weight_grad as weight_grad
from dynconv.reference import involution_naive, involution_shift_add, involution_unfold
from helpers import assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("nan_poison")

# (B, C, H, W, K, G, stride, dilation, padding): odd sizes, stride 2 with odd H, dilation 2,
# K = 1, 3, 4, 7, G = 1 and G = C, K larger than the image, explicit padding.
CASES = [
    (2, 8, 7, 9, 3, 2, 1, 1, None),
    (1, 6, 9, 7, 3, 6, 2, 1, None),     # G = C, stride 2, odd H
    (2, 4, 6, 5, 1, 1, 1, 1, None),     # K = 1, G = 1
    (1, 4, 8, 8, 4, 2, 1, 2, None),     # even K, dilation 2
    (1, 4, 3, 4, 7, 4, 1, 1, None),     # K larger than the image
    (2, 4, 10, 9, 3, 1, 2, 2, 1),       # stride 2 and dilation 2, explicit padding
    (1, 32, 5, 5, 3, 2, 1, 1, 0),       # groups wider than one channel tile; no padding
]
CASE_IDS = [f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}G{c[5]}s{c[6]}d{c[7]}p{c[8]}" for c in CASES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _out_size(H, W, K, s, d, p):
    p = d * (K - 1) // 2 if p is None else p
    return (H + 2 * p - d * (K - 1) - 1) // s + 1, (W + 2 * p - d * (K - 1) - 1) // s + 1


def _inputs(case, per_pixel):
    B, C, H, W, K, G, s, d, p = case
    Ho, Wo = _out_size(H, W, K, s, d, p)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    w = torch.randn((B, G, K, K, Ho, Wo) if per_pixel else (B, G, K, K), dtype=torch.float64)
    return x, w, dict(stride=s, padding=p, dilation=d)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_references_agree_with_the_spec_loops(case):
    """The unfold and shift-and-add baselines are themselves checked against docs/operators.md written as loops."""
    for per_pixel in (True, False):
        x, w, geometry = _inputs(case, per_pixel)
        bias = None if per_pixel else torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
        expected = involution_naive(x, w, bias, **geometry)
        assert_close(involution_unfold(x, w, bias, **geometry), expected, torch.float64, "unfold")
        assert_close(involution_shift_add(x, w, bias, **geometry), expected, torch.float64, "shift-add")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_involution_forward_and_gradients(case, dtype, memory_format, device):
    x, w, geometry = _inputs(case, per_pixel=True)
    y = check_against_reference(dynconv.involution, involution_unfold, {"x": x, "weight": w}, dtype, device,
                                memory_format, **geometry)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dynamic_dwconv2d_forward_and_gradients(case, dtype, memory_format, device):
    x, w, geometry = _inputs(case, per_pixel=False)
    bias = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
    y = check_against_reference(dynconv.dynamic_dwconv2d, involution_unfold, {"x": x, "weight": w, "bias": bias},
                                dtype, device, memory_format, **geometry)
    assert y.is_contiguous(memory_format=memory_format)


def test_dynamic_dwconv2d_without_bias(device):
    x, w, geometry = _inputs(CASES[0], per_pixel=False)
    check_against_reference(lambda x, weight, **g: dynconv.dynamic_dwconv2d(x, weight, None, **g),
                            lambda x, weight, **g: involution_unfold(x, weight, None, **g),
                            {"x": x, "weight": w}, torch.float32, device, **geometry)


def test_float64_is_exact_enough_for_gradcheck(device):
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(1, 2, 3, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dynconv.involution(a, b, stride=2), (x, w))


def test_non_contiguous_views(device):
    """Sliced inputs and permuted weights go to the kernels by their strides, not via copies."""
    base = torch.randn(2, 12, 9, 11, dtype=torch.float64)
    x = base[:, 2:10, 1:8, ::2]  # strided in every dim
    Ho, Wo = x.shape[2], x.shape[3]
    w = torch.randn(2, 2, Ho, Wo, 3, 3, dtype=torch.float64).permute(0, 1, 4, 5, 2, 3)
    assert not x.is_contiguous() and not w.is_contiguous()
    expected = involution_unfold(x, w)
    actual = dynconv.involution(x.to(device).float(), w.to(device).float())
    assert_close(actual, expected, torch.float32, "strided views")


def test_autograd_with_expanded_gradient(device):
    """y.sum().backward() hands the backward a zero-stride gradient."""
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, 6, 6, device=device, requires_grad=True)
    dynconv.involution(x, w).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    involution_unfold(xr, wr).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    assert_close(w.grad, wr.grad, torch.float32, "dw")


def test_only_the_requested_gradient_is_computed(device, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "backward_input_launch",
                        lambda *a, **k: calls.append("input") or pytest.fail("input gradient not requested"))
    x = torch.randn(1, 4, 5, 5, device=device)
    w = torch.randn(1, 1, 3, 3, 5, 5, device=device, requires_grad=True)
    dynconv.involution(x, w).sum().backward()
    assert w.grad is not None and not calls


@pytest.mark.parametrize("per_pixel", [True, False])
def test_int64_indexing_variant_matches(per_pixel, device):
    """The INDEX_64 code path (chosen past 2^31 elements) computes the same values."""
    x, w, geometry = _inputs(CASES[1], per_pixel)
    x, w = x.float().to(device), w.float().to(device)
    stride, padding, dilation = (2, 2), (1, 1), (1, 1)
    Ho, Wo = _out_size(x.shape[2], x.shape[3], 3, 2, 1, None)
    y32 = torch.empty(x.shape[0], x.shape[1], Ho, Wo, device=device)
    y64 = torch.empty_like(y32)
    launch = kernels.forward_launch(x, w, None, y32, stride, padding, dilation)
    assert not launch.meta["INDEX_64"]
    launch()
    launch = kernels.forward_launch(x, w, None, y64, stride, padding, dilation)
    launch.meta["INDEX_64"] = True
    launch()
    assert torch.equal(y32, y64)


def test_int64_indexing_is_chosen_past_int32():
    small = torch.empty((2, 4, 8, 8), device="meta")
    big = torch.empty((2304, 256, 64, 64), device="meta")  # 2^31 + 2^28 elements
    edge = torch.empty((2048, 256, 64, 64), device="meta")  # exactly 2^31 elements: last offset 2^31 - 1
    assert not kernels.needs_int64(small)
    assert kernels.needs_int64(big)
    assert not kernels.needs_int64(edge)
    w = torch.empty((2304, 16, 3, 3, 64, 64), device="meta")
    assert kernels.forward_launch(big, w, None, big, (1, 1), (1, 1), (1, 1)).meta["INDEX_64"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 10 GB free")
def test_over_int32_elements_on_gpu():
    """A real tensor past 2^31 elements: the last sample must still be right."""
    B, C, H, W = 2304, 256, 64, 64
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(B, 1, 3, 3, dtype=torch.bfloat16, device="cuda")
    y = dynconv.dynamic_dwconv2d(x, w)
    tail = slice(B - 2, B)
    expected = involution_unfold(x[tail].double(), w[tail].double())
    assert_close(y[tail], expected, torch.bfloat16, "last samples")


def test_cpu_path_without_interpreter_matches(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take shift-and-add: same values and gradients."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(kernels, "forward_launch", lambda *a, **k: pytest.fail("Triton kernel ran on the CPU path"))
    for case in (CASES[1], CASES[5]):
        x, w, geometry = _inputs(case, per_pixel=True)
        check_against_reference(dynconv.involution, involution_unfold, {"x": x, "weight": w}, torch.float32,
                                **geometry)
        x, w, geometry = _inputs(case, per_pixel=False)
        bias = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
        check_against_reference(dynconv.dynamic_dwconv2d, involution_unfold, {"x": x, "weight": w, "bias": bias},
                                torch.float32, memory_format=torch.channels_last, **geometry)


def test_autocast_runs_in_the_autocast_dtype(device):
    x = torch.randn(1, 4, 6, 6, device=device)
    w = torch.randn(1, 2, 3, 3, 6, 6, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = dynconv.involution(x, w)
    assert y.dtype == torch.bfloat16
    assert_close(y, involution_unfold(x.bfloat16().double(), w.bfloat16().double()), torch.bfloat16, "autocast")


def test_per_sample_weight_gradient_is_deterministic(device):
    x = torch.randn(2, 8, 9, 9, device=device)
    w = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        w.grad = None
        dynconv.dynamic_dwconv2d(x, w).square().sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("per_pixel", [True, False])
def test_weight_gradient_with_groups_wider_than_one_channel_chunk(per_pixel, device):
    """A tile narrower than the group loops over channel chunks (the defaults read a group at once)."""
    B, C, G, H, W, K = 2, 24, 2, 7, 6, 3
    x = torch.randn(B, C, H, W, device=device)
    dy = torch.randn(B, C, H, W, device=device)
    config = {"BLOCK_G": 1, "BLOCK_CG": 4, "BLOCK_H": 2, "BLOCK_W": 4, "num_warps": 1, "num_stages": 1}
    geometry = ((1, 1), (1, 1), (1, 1))
    wshape = (B, G, K, K, H, W) if per_pixel else (B, G, K, K)
    if per_pixel:
        dw = torch.empty(wshape, device=device)
        launch = weight_grad.backward_weight_launch(dy, x, dw, *geometry, True, config)
    else:
        dw = torch.empty(weight_grad.weight_grad_partials(B, G, K, H, W, config), device=device)
        launch = weight_grad.backward_weight_launch(dy, x, dw, *geometry, False, config)
    assert not launch.meta["ONE_CG_CHUNK"]
    launch()
    if not per_pixel:
        dw = dw.sum(-1)
    w64 = torch.zeros(wshape, dtype=torch.float64, requires_grad=True)
    involution_unfold(x.double().cpu(), w64).backward(dy.double().cpu())
    assert_close(dw, w64.grad, torch.float32, "dw")


# The forward's and input gradient's paths (kernels/involution.py): taps unrolled with strips of
# output rows (channels_last, groups of several channels, K <= MAX_UNROLLED_K: the bf16 NHWC cases
# with G < C) or the run-time tap loop (the others); the unrolled input gradient split by stride phase.
PATH_CASES = [  # (B, C, H, W, K, G, stride, dilation, padding)
    (1, 4, 7, 5, 5, 2, 3, 1, None),   # stride 3, odd H: phases with a tap fewer (K % 3 != 0)
    (1, 2, 9, 6, 3, 2, 3, 2, 1),      # stride 3, dilation 2: a phase's taps step two dy rows (no strip)
    (1, 4, 8, 5, 2, 2, 2, 2, 0),      # stride 2, dilation 2: phases no tap reaches (dx is zero there)
    (1, 2, 5, 4, 15, 2, 1, 1, None),  # K = 15 > MAX_UNROLLED_K: the run-time tap loop
]
PATH_IDS = [f"H{c[2]}W{c[3]}K{c[4]}s{c[6]}d{c[7]}" for c in PATH_CASES]


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format),
                                                  (torch.bfloat16, torch.channels_last)], ids=["fp32-nchw", "bf16-nhwc"])
@pytest.mark.parametrize("per_pixel", [True, False], ids=["pixel", "sample"])
@pytest.mark.parametrize("case", PATH_CASES, ids=PATH_IDS)
def test_tap_paths_forward_and_gradients(case, per_pixel, dtype, memory_format, device):
    x, w, geometry = _inputs(case, per_pixel)
    op = dynconv.involution if per_pixel else dynconv.dynamic_dwconv2d
    check_against_reference(op, involution_unfold, {"x": x, "weight": w}, dtype, device, memory_format, **geometry)


def test_launchers_unroll_taps_in_strips_and_split_the_input_gradient_by_stride_phase():
    def tensors(K, H, stride):  # bf16 channels_last: the layout with the longest strips
        Ho = (H - 1) // stride + 1
        x = torch.empty((2, 32, H, H), device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        y = torch.empty((2, 32, Ho, Ho), device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        return x, torch.empty((2, 2, K, K, Ho, Ho), device="meta", dtype=torch.bfloat16), y

    x, w, y = tensors(7, 32, 1)
    fwd = kernels.forward_launch(x, w, None, y, (1, 1), (3, 3), (1, 1))
    assert fwd.meta["TAPS"] == 7 and fwd.meta["STRIP"] > 1 and fwd.loops == (7,)
    dx = kernels.backward_input_launch(y, w, x, (1, 1), (3, 3), (1, 1))
    assert dx.meta["TAPS_U"] == 7 and dx.args["TAPS_V"] == 7 and dx.meta["STRIP"] > 1
    x, w, y = tensors(7, 31, 2)
    assert kernels.forward_launch(x, w, None, y, (2, 2), (3, 3), (1, 1)).meta["STRIP"] == 1
    dx = kernels.backward_input_launch(y, w, x, (2, 2), (3, 3), (1, 1))
    # Four phases, each over 16 x 16 input pixels and only its own 4 x 4 taps.
    assert dx.meta["TAPS_U"] == 4 and dx.args["TAPS_V"] == 4 and dx.meta["FIRST_TAP_MAY_MISS"]
    assert dx.grid[0] == 4 * dx.args["TILES_PHASE"]
    # The column-tap loop's trips per column phase, as the static model reads them: tap columns 1, 3, 5
    # (padding 3: phase 0) and 0, 2, 4, 6.
    assert dx.loops == ([3, 4],)
    x, w, y = tensors(15, 16, 1)
    fwd = kernels.forward_launch(x, w, None, y, (1, 1), (7, 7), (1, 1))
    assert fwd.meta["TAPS"] == 0 and fwd.meta["STRIP"] == 1 and fwd.loops == (225,)
    dx = kernels.backward_input_launch(y, w, x, (1, 1), (7, 7), (1, 1))
    assert dx.meta["TAPS_U"] == 0 and dx.loops == (225,)


@pytest.mark.parametrize("K,stride,pad,dilation", [(7, 2, 3, 1), (5, 3, 2, 1), (3, 2, 1, 2), (7, 4, 1, 3), (4, 2, 0, 1)])
def test_phase_column_trips_are_each_phase_taps(K, stride, pad, dilation):
    g, step, inverse = kernels._phase_taps(stride, dilation)
    slots = -(-K // step)
    trips = kernels._phase_column_taps(K, stride, pad, g, step, inverse, slots)
    for pw, trip in enumerate(trips):
        taps = [v for v in range(K) if (v * dilation - pw - pad) % stride == 0]
        if (pw + pad) % g == 0:  # a phase no tap reaches runs its slots masked
            assert trip == len(taps), (pw, taps)


@pytest.mark.parametrize("per_pixel", [True, False], ids=["pixel", "sample"])
def test_input_gradient_skips_the_missing_tap_of_a_stride_phase(per_pixel, device):
    """An inf in dy reaches only the dx pixels that read it: a phase's missing tap is skipped, never
    multiplied by a zero weight."""
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    w = torch.randn((1, 2, 3, 3, 4, 4) if per_pixel else (1, 2, 3, 3), dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    y = involution_unfold(xr, w, stride=2)
    dy = torch.randn_like(y)
    dy[0, 1, 1, 2] = float("inf")
    expected, = torch.autograd.grad(y, xr, dy)
    nhwc = torch.channels_last
    dx = torch.full_like(x, float("nan"), dtype=torch.float32, device=device).contiguous(memory_format=nhwc)
    args = (dy.float().to(device).contiguous(memory_format=nhwc), w.detach().float().to(device), dx, (2, 2), (1, 1), (1, 1))
    assert kernels.backward_input_launch(*args).meta["FIRST_TAP_MAY_MISS"]
    kernels.involution_backward_input(*args)
    finite = torch.isfinite(expected)
    assert 0 < finite.sum() < finite.numel()
    assert torch.equal(torch.isfinite(dx).cpu(), finite)
    assert_close(dx.cpu()[finite], expected[finite], torch.float32, "finite dx")


S1, S2D2 = ((1, 1), (1, 1), (1, 1)), ((2, 1), (2, 1), (2, 1))
S2 = ((2, 2), (1, 1), (1, 1))  # row stride 2: the persistent kernel (row stride 1 walks, dynamic_dwconv.py)


@pytest.mark.parametrize("geometry, memory_format, dtype", [
    (S1, torch.contiguous_format, torch.float32), (S1, torch.channels_last, torch.bfloat16),
    (S2D2, torch.channels_last, torch.float32), (S2D2, torch.contiguous_format, torch.bfloat16)],
    ids=["s1-nchw-fp32", "s1-nhwc-bf16", "s2d2-nhwc-fp32", "s2d2-nchw-bf16"])
def test_per_pixel_weight_gradient_runs_kernel_and_its_fallback(geometry, memory_format, dtype, device):
    """The runs kernel (K, strides, dilations compile-time; taps unrolled; the channels_last default)
    and the generic kernel (the NCHW default, and the fallback past RUNS_MAX_K): both against
    float64, at odd sizes with runs cut by the image edge. The runs kernel with groups its chunks
    fill (C = 8: no channel masks) and, in channels_last, groups they overrun (C = 6: a chunk of 4
    over 3 channels)."""
    stride, padding, dilation = geometry
    B, G, H, W, K = 1, 2, 7, 5, 3
    Ho, Wo = ((n + 2 * p - d * (K - 1) - 1) // s + 1 for n, s, p, d in zip((H, W), stride, padding, dilation))
    runs = {"BLOCK_G": 2, "BLOCK_H": 1, "BLOCK_W": 4, "RUN": 3, "num_warps": 1}
    generic = {"BLOCK_G": 1, "BLOCK_CG": 4, "BLOCK_H": 2, "BLOCK_W": 4, "num_warps": 1}
    for C, config in ((6, runs), (8, runs), (6, generic)):
        x = torch.randn(B, C, H, W, device=device).to(dtype).contiguous(memory_format=memory_format)
        dy = torch.randn(B, C, Ho, Wo, device=device).to(dtype).contiguous(memory_format=memory_format)
        w64 = torch.zeros((B, G, K, K, Ho, Wo), dtype=torch.float64, requires_grad=True)
        involution_unfold(x.double().cpu(), w64, None, stride, padding, dilation).backward(dy.double().cpu())
        default = weight_grad.weight_grad_config(x, G, K, stride, Ho, Wo, per_pixel=True)
        assert ("RUN" in default) == (memory_format == torch.channels_last)
        dw = torch.full((B, G, K, K, Ho, Wo), float("nan"), device=device, dtype=dtype)
        launch = weight_grad.backward_weight_launch(dy, x, dw, stride, padding, dilation, True, config)
        assert launch.name == ("involution_bwd_weight_runs_kernel" if config is runs else "involution_bwd_weight_kernel")
        if config is runs:
            # NCHW chunks are one channel each, so they always fit the group.
            assert launch.meta["CHANNELS_FULL"] == (C == 8 or memory_format == torch.contiguous_format), C
        launch()
        assert_close(dw, w64.grad, dtype, f"{launch.name} C={C}")


@pytest.mark.parametrize("geometry, dtype", [(S1, torch.bfloat16), (S2D2, torch.float32)], ids=["s1-bf16", "s2d2-fp32"])
@pytest.mark.parametrize("look_ahead", [1, 2, None], ids=["ahead1", "ahead2", "column"])
@pytest.mark.parametrize("carried", [False, True], ids=["per-column", "carried"])
def test_runs_kernel_with_fewer_rows_ahead_than_its_halo(geometry, dtype, look_ahead, carried, device, monkeypatch):
    """The runs kernel loads halo rows ahead of the row it sums (_runs_look_ahead: a whole tap column,
    None, at these small groups); with fewer, each row's loads are issued rows before its sums and the
    look-ahead stops at the column's end. Either way a column's first rows are loaded at its start or,
    CARRIED, after the last column's final store and carried into the loop (the launcher carries
    them only on triton 3.6 with the whole column ahead; the kernel takes any look-ahead). Against
    float64, the output poisoned with NaN."""
    stride, padding, dilation = geometry
    B, G, C, H, W, K = 1, 2, 8, 7, 5, 3
    Ho, Wo = ((n + 2 * p - d * (K - 1) - 1) // s + 1 for n, s, p, d in zip((H, W), stride, padding, dilation))
    halo = (3 - 1) * stride[0] + (K - 1) * dilation[0] + 1  # a run of 3 rows
    if look_ahead is not None:
        monkeypatch.setattr(weight_grad, "_runs_look_ahead", lambda *args: look_ahead)
    configs.clear_cache()  # no launch plan made with another look-ahead
    x = torch.randn(B, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(B, C, Ho, Wo, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w64 = torch.zeros((B, G, K, K, Ho, Wo), dtype=torch.float64, requires_grad=True)
    involution_unfold(x.double().cpu(), w64, None, stride, padding, dilation).backward(dy.double().cpu())
    dw = torch.full((B, G, K, K, Ho, Wo), float("nan"), device=device, dtype=dtype)
    runs = {"BLOCK_G": 2, "BLOCK_H": 1, "BLOCK_W": 4, "RUN": 3, "num_warps": 1}
    launch = weight_grad.backward_weight_launch(dy, x, dw, stride, padding, dilation, True, runs)
    assert launch.name == "involution_bwd_weight_runs_kernel"
    assert launch.meta["LOOK_AHEAD"] == (halo if look_ahead is None else look_ahead)
    configs.clear_cache()  # nor one made with this look-ahead left for other tests
    launch.meta["CARRIED"] = carried
    launch()
    assert_close(dw, w64.grad, dtype, f"look-ahead {look_ahead}, carried {carried}")


@pytest.mark.parametrize("dtype, preload", [(torch.float32, True), (torch.bfloat16, False)])
def test_channels_last_fp32_tiles_load_a_column_tap_at_once(dtype, preload):
    """The unrolled channels_last forward and input gradient load a whole column tap before summing it
    in fp32 (PRELOAD); 16-bit tiles have no registers for it. Per-sample weights never do."""
    x = torch.empty((2, 32, 14, 14), dtype=dtype, device="meta").to(memory_format=torch.channels_last)
    geometry = ((1, 1), (3, 3), (1, 1))
    for w in (torch.empty((2, 2, 7, 7, 14, 14), dtype=dtype, device="meta"),
              torch.empty((2, 2, 7, 7), dtype=dtype, device="meta")):
        per_pixel = w.dim() == 6
        forward = kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry)
        backward = kernels.backward_input_launch(x, w, torch.empty_like(x), *geometry)
        assert forward.meta.get("PRELOAD", False) == (preload and per_pixel), per_pixel
        assert backward.meta.get("PRELOAD", False) == (preload and per_pixel), per_pixel



@pytest.mark.parametrize("newer_triton", [False, True], ids=["triton-3.6-rule", "newer-triton-rule"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_depthwise_per_pixel_tiles_by_triton(dtype, newer_triton, device, monkeypatch):
    """Per-pixel weights with one channel a group (R3), channels_last: triton 3.6 unrolls every dtype
    (PRELOAD in fp32 only); newer tritons unroll 16-bit only, preloaded, and keep the tap loop for
    fp32 (UNROLLED_DEPTHWISE). Both rules' launches on either triton, forward and input gradient
    against float64, outputs NaN-poisoned."""
    monkeypatch.setattr(kernels, "UNROLLED_DEPTHWISE", not newer_triton)
    configs.clear_cache()  # no launch plan made under the other rule
    B, C, H, W, K = 1, 8, 7, 6, 3
    geometry = ((1, 1), (1, 1), (1, 1))
    x = torch.randn(B, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(B, C, H, W, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(B, C, K, K, H, W, device=device).to(dtype)
    y = torch.full_like(x, float("nan"))
    dx = torch.full_like(x, float("nan"))
    forward = kernels.forward_launch(x, w, None, y, *geometry)
    backward = kernels.backward_input_launch(dy, w, dx, *geometry)
    unrolled = not newer_triton or dtype == torch.bfloat16
    for launch in (forward, backward):
        assert launch.meta.get("PRELOAD", False) == (unrolled and (newer_triton or dtype == torch.float32))
    assert (forward.meta["TAPS"] > 0) == unrolled and (backward.meta["TAPS_U"] > 0) == unrolled
    _run_against_float64(forward, backward, x, w, dy, geometry)


def _run_against_float64(forward, backward, x, w, dy, geometry):
    """Run a forward and an input-gradient launch (outputs NaN-filled), then drop the launch plans they
    made under a monkeypatched rule, and check their outputs against the float64 unfold reference."""
    forward()
    backward()
    configs.clear_cache()  # nor one made under this rule left for other tests
    x64 = x.double().cpu().requires_grad_()
    y64 = involution_unfold(x64, w.double().cpu(), None, *geometry)
    y64.backward(dy.double().cpu())
    assert_close(forward.args["y_ptr"], y64, x.dtype, "y")
    assert_close(backward.args["dx_ptr"], x64.grad, x.dtype, "dx")


@pytest.mark.parametrize("newer_triton", [False, True])
@pytest.mark.parametrize("K,stride", [(3, 1), (5, 1), (5, 2)])
def test_staged_pair_tiles_by_triton(K, stride, newer_triton, device, monkeypatch):
    """Per-pixel bf16 pair tiles (16 channels a thread), channels_last: the forward stages its rows
    (STAGED: a column's weights loaded first, behind the fence); the input gradient on triton 3.6
    only, and not at K = 5 (STAGED_NEWER_TRITON, the spill sweep). Both rules' launches, forward
    and input gradient against float64, outputs NaN-poisoned."""
    monkeypatch.setattr(kernels, "STAGED_NEWER_TRITON", newer_triton)
    configs.clear_cache()  # no launch plan made under the other rule
    B, C, G, H, W = 1, 32, 2, 7, 6
    geometry = ((stride, stride), (K // 2, K // 2), (1, 1))
    Ho, Wo = (H + 2 * (K // 2) - K) // stride + 1, (W + 2 * (K // 2) - K) // stride + 1
    x = torch.randn(B, C, H, W, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(B, C, Ho, Wo, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(B, G, K, K, Ho, Wo, device=device).to(torch.bfloat16)
    y = torch.full_like(dy, float("nan"))
    dx = torch.full_like(x, float("nan"))
    forward = kernels.forward_launch(x, w, None, y, *geometry)
    backward = kernels.backward_input_launch(dy, w, dx, *geometry)
    assert forward.meta["PAIRS"] and forward.meta["CHUNKS"] == 2 and forward.meta["STAGED"]
    assert backward.meta["STAGED"] == (not newer_triton and K != 5)
    _run_against_float64(forward, backward, x, w, dy, geometry)


@pytest.mark.parametrize("K, stride, dilation, carried", [(7, 1, 1, True), (5, 1, 1, True), (5, 2, 1, False),
                                                         (7, 1, 2, False)])
def test_runs_kernel_carries_whole_columns_of_at_most_13_rows_on_triton_3_6(K, stride, dilation, carried,
                                                                          monkeypatch):
    """The launcher carries a tap column's rows into the loop (CARRIED) where the whole column is
    loaded ahead and is at most RUNS_CARRIED_MAX_HALO rows (R1: 13), on triton 3.6: ptxas spills
    longer columns or a rolling look-ahead carried, and triton 3.9 waits for carried 16-bit rows."""
    monkeypatch.setattr(weight_grad, "RUNS_CARRIED", True)
    configs.clear_cache()
    B, G, C, H = 1, 16, 256, 56
    p = dilation * (K - 1) // 2
    Ho = (H + 2 * p - dilation * (K - 1) - 1) // stride + 1
    x = torch.empty(B, C, H, H, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.empty(B, C, Ho, Ho, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dw = torch.empty(B, G, K, K, Ho, Ho, dtype=torch.bfloat16)
    launch = weight_grad.backward_weight_launch(dy, x, dw, (stride,) * 2, (p,) * 2, (dilation,) * 2, True)
    configs.clear_cache()
    assert launch.name == "involution_bwd_weight_runs_kernel"
    assert launch.meta["CARRIED"] == carried, launch.meta
    monkeypatch.setattr(weight_grad, "RUNS_CARRIED", False)
    assert not weight_grad.backward_weight_launch(dy, x, dw, (stride,) * 2, (p,) * 2, (dilation,) * 2,
                                                  True).meta["CARRIED"]
    configs.clear_cache()


def test_runs_kernel_look_ahead_fits_its_registers():
    """The default look-ahead: a whole tap column where the rows are small, fewer rows where the
    run's gradients take most of RUNS_HELD_WORDS, never none, never past the halo."""
    look_ahead = weight_grad._runs_look_ahead
    assert look_ahead(16, 7, 1, 1, 7, 2) == 13  # R1 bf16: the column's 13 rows
    assert look_ahead(16, 7, 1, 1, 7, 4) == 6  # R1 fp32
    assert look_ahead(4, 3, 2, 1, 3, 4) == 7  # the halo of 3 rows at stride 2, K = 3
    assert look_ahead(32, 7, 1, 1, 7, 4) == 1  # 224 words of gradients alone


def test_per_pixel_weight_gradient_past_the_unrolled_kernel_sizes(device):
    """K past both unrolled kernels (RUNS_MAX_K, and the NCHW kernels' MAX_K) takes the generic
    kernel, whose tap loop has a run-time trip count."""
    K = max(weight_grad.RUNS_MAX_K, involution_nchw.MAX_K) + 2
    x = torch.randn(1, 4, 3, 4, device=device)
    w = torch.randn(1, 2, K, K, 3, 4, dtype=torch.float64)
    dy = torch.randn(1, 4, 3, 4, device=device)
    dw = torch.empty(w.shape, device=device)
    launch = weight_grad.backward_weight_launch(dy, x, dw, (1, 1), (K // 2, K // 2), (1, 1), True)
    assert launch.name == "involution_bwd_weight_kernel"
    launch()
    w64 = torch.zeros(w.shape, dtype=torch.float64, requires_grad=True)
    involution_unfold(x.double().cpu(), w64, None, 1, K // 2, 1).backward(dy.double().cpu())
    assert_close(dw, w64.grad, torch.float32, "dw")


D2, S2P3 = ((1, 1), (6, 6), (2, 2)), ((2, 2), (3, 3), (1, 1))


@pytest.mark.parametrize("memory_format, dtype, geometry, K, H, run", [
    (torch.contiguous_format, torch.float32, S2, 3, 17, 4), (torch.channels_last, torch.bfloat16, S2D2, 3, 17, 4),
    (torch.channels_last, torch.float32, D2, 7, 9, 1), (torch.contiguous_format, torch.bfloat16, S2P3, 8, 19, 2)],
    ids=["nchw-fp32-s2", "nhwc-bf16-s2d2", "nhwc-fp32-K7d2", "nchw-bf16-K8s2"])
def test_per_sample_weight_gradient_persistent_partials(memory_format, dtype, geometry, K, H, run, device,
                                                        monkeypatch):
    """The persistent per-sample kernel (G = C): programs walk tiles split, split + SPLITS, ... with a
    tile count not divisible by the program count, B = 1, odd sizes; the partials sum to dw. Runs of
    four rows, and the shorter runs of a long halo (K = 7 at dilation 2, K = 8 at stride 2)."""
    monkeypatch.setattr(weight_grad, "PERSISTENT_PROGRAMS", 2)  # 4 channels in one block: 2 splits
    stride, padding, dilation = geometry
    B, C, W = 1, 4, 5
    Ho, Wo = ((n + 2 * p - d * (K - 1) - 1) // s + 1 for n, s, p, d in zip((H, W), stride, padding, dilation))
    x = torch.randn(B, C, H, W, device=device).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(B, C, Ho, Wo, device=device).to(dtype).contiguous(memory_format=memory_format)
    config = weight_grad.weight_grad_config(x, C, K, stride, Ho, Wo, per_pixel=False, dilation=dilation)
    assert config["RUN"] == run and "P" not in config, config
    shape = weight_grad.weight_grad_partials(B, C, K, Ho, Wo, config)
    tiles = -(-Ho // config["RUN"]) * -(-Wo // config["BLOCK_W"])
    assert shape[-1] == 2 and tiles % 2, (shape, tiles)
    dw = torch.empty((B, C, K, K), device=device, dtype=dtype)
    weight_grad.involution_backward_weight(dy, x, dw, stride, padding, dilation)
    w64 = torch.zeros((B, C, K, K), dtype=torch.float64, requires_grad=True)
    involution_unfold(x.double().cpu(), w64, None, stride, padding, dilation).backward(dy.double().cpu())
    assert_close(dw, w64.grad, dtype, "dw")


# Channels_last per-pixel tiles whose threads hold several chunks of one group (CHUNKS), strips that need
# not be powers of two, and bf16 read and written as int32 pairs of channels (kernels/involution.py:
# _tap_config, _channel_chunks, _pair_chunks).
CHUNK_CASES = [  # (B, C, H, W, K, G, stride, dilation, padding), BLOCK_H, dtype, int32 pairs
    # 12 channels a group: a second channel tile, half masked; strips of 6 rows
    ((1, 24, 7, 5, 3, 2, 1, 1, None), 6, torch.bfloat16, True),
    # 6 channels a group (a chunk partly masked), stride 2: phases; BLOCK_H 3 rounded to 2 without strips
    ((2, 12, 7, 6, 5, 2, 2, 1, None), 3, torch.float32, False),
    # dilation 2, K larger than the image; x two bytes past a 4-byte boundary: no int32 pairs in the forward
    ((1, 16, 4, 5, 7, 1, 1, 2, None), 4, torch.bfloat16, False),
]
CHUNK_IDS = [f"C{c[1]}H{c[2]}W{c[3]}K{c[4]}G{c[5]}s{c[6]}d{c[7]}-{str(dt)[6:]}" for c, _, dt, _ in CHUNK_CASES]


@pytest.mark.parametrize("case, block_h, dtype, pairs", CHUNK_CASES, ids=CHUNK_IDS)
def test_tap_kernels_with_channel_chunks_and_uneven_strips(case, block_h, dtype, pairs, device):
    B, C, H, W, K, G, s, d, p = case
    x, w, _ = _inputs(case, per_pixel=True)
    pad = d * (K - 1) // 2 if p is None else p
    stride, padding, dilation = (s, s), (pad, pad), (d, d)
    nhwc = torch.channels_last
    if dtype == torch.bfloat16 and not pairs:  # channels_last, one element past a 4-byte boundary
        xd = torch.empty(x.numel() + 1, device=device, dtype=dtype)[1:].view(B, H, W, C).permute(0, 3, 1, 2)
        xd.copy_(x)
    else:
        xd = x.to(device, dtype).contiguous(memory_format=nhwc)
    wd = w.to(device, dtype)
    x64 = xd.double().cpu().requires_grad_()
    y64 = involution_unfold(x64, wd.double().cpu(), None, stride, padding, dilation)
    dy = torch.randn(y64.shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=nhwc)
    dx64, = torch.autograd.grad(y64, x64, dy.double().cpu())
    vector = 16 // xd.element_size()
    config = {"BLOCK_G": 1, "BLOCK_CG": vector // 2, "BLOCK_H": block_h, "BLOCK_W": 4, "CHUNKS": 2, "num_warps": 1}
    y = torch.full(y64.shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=nhwc)
    fwd = kernels.forward_launch(xd, wd, None, y, stride, padding, dilation, config)
    assert fwd.meta["CHUNKS"] == 2 and fwd.meta["TAPS"] == K and fwd.meta["PAIRS"] == pairs
    assert fwd.meta["STRIP"] == (block_h if s == 1 and d == 1 else 1)
    fwd()
    assert_close(y, y64.detach(), dtype, "y")
    dx = torch.full(x.shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=nhwc)
    bwd = kernels.backward_input_launch(dy, wd, dx, stride, padding, dilation, config)
    assert bwd.meta["CHUNKS"] == 2 and bwd.meta["TAPS_U"] > 0 and bwd.meta["PAIRS"] == (dtype == torch.bfloat16)
    bwd()
    assert_close(dx, dx64, dtype, "dx")


# The unrolled forward and input gradient lay a tile's lanes over the flattened (sample, strip row,
# column) space (kernels/involution.py: _flat_pixels): programs that straddle two samples, and a last
# program whose lanes run past the last sample. (B, C, H, W, K, G, stride, dilation, padding), BLOCK_H,
# BLOCK_W, dtype.
FLAT_CASES = [
    # bf16 pairs, strips of 4 rows: 2 strip rows x 7 columns a sample, programs of 4 lanes
    ((3, 16, 5, 7, 3, 2, 1, 1, None), 4, 4, torch.bfloat16),
    # fp32, stride 2: each phase 4 rows x 5 columns a sample, programs of 8 lanes
    ((3, 8, 7, 9, 3, 1, 2, 1, None), 2, 4, torch.float32),
]


@pytest.mark.parametrize("case, block_h, block_w, dtype", FLAT_CASES, ids=["bf16-s1", "fp32-s2"])
def test_tap_kernels_lanes_cross_samples(case, block_h, block_w, dtype, device):
    B, C, H, W, K, G, s, d, p = case
    x, w, _ = _inputs(case, per_pixel=True)
    pad = (K - 1) // 2
    stride, padding, dilation = (s, s), (pad, pad), (1, 1)
    nhwc = torch.channels_last
    xd, wd = x.to(device, dtype).contiguous(memory_format=nhwc), w.to(device, dtype)
    x64 = xd.double().cpu().requires_grad_()
    y64 = involution_unfold(x64, wd.double().cpu(), None, stride, padding, dilation)
    dy = torch.randn(y64.shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=nhwc)
    dx64, = torch.autograd.grad(y64, x64, dy.double().cpu())
    config = {"BLOCK_G": 1, "BLOCK_CG": 16 // xd.element_size(), "BLOCK_H": block_h, "BLOCK_W": block_w,
              "num_warps": 1}
    y = torch.full(y64.shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=nhwc)
    fwd = kernels.forward_launch(xd, wd, None, y, stride, padding, dilation, config)
    dx = torch.full(x.shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=nhwc)
    bwd = kernels.backward_input_launch(dy, wd, dx, stride, padding, dilation, config)
    for launch, cols in ((fwd, y.shape[3]), (bwd, bwd.args["COLS"])):
        lanes = launch.meta["BLOCK_H"] // launch.meta["STRIP"] * launch.meta["BLOCK_W"]
        per_sample = launch.args["STRIP_ROWS"] * cols
        assert per_sample % lanes and (B * per_sample) % lanes  # straddling and past-the-end programs exist
        assert launch.args.get("TILES_PHASE", launch.grid[0]) == -(-B * per_sample // lanes)
    fwd()
    assert_close(y, y64.detach(), dtype, "y")
    bwd()
    assert_close(dx, dx64, dtype, "dx")


def test_strips_shorten_for_large_kernels():
    """A strip holds STRIP + K - 1 source rows: from K = 8 strips of at most 4 rows, from K = 11 of
    at most 3 (longer ones spilled), at K = 7 the reference shapes' 7."""
    for K, longest in ((7, 7), (9, 4), (11, 3), (13, 3)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.empty((2, 256, 56, 56), dtype=dtype, device="meta").to(memory_format=torch.channels_last)
            w = torch.empty((2, 16, K, K, 56, 56), dtype=dtype, device="meta")
            geometry = ((1, 1), (K // 2, K // 2), (1, 1))
            strips = [kernels.forward_launch(x, w, None, x, *geometry).meta["STRIP"],
                      kernels.backward_input_launch(x, w, x, *geometry).meta["STRIP"]]
            assert max(strips) <= longest and (K > 7 or strips == [7, 7]), (K, dtype, strips)


def test_tap_config_strips_cover_the_reference_rows_exactly():
    """R1 (56 rows) and R2 (28 rows): strips of 7, no padded rows; threads hold 8 fp32 or 16 bf16 channels of
    a group (the 16 channels of R1's and R2's groups: each weight serves 16 multiply-adds)."""
    for height in (56, 28):
        for element_size, chunks, channels in ((4, 2, 8), (2, 2, 16)):
            config = kernels.tap_config(256, 16, height, height, True, 7, element_size, True)
            assert config["BLOCK_H"] % 7 == 0 and height % config["BLOCK_H"] == 0
            assert config["CHUNKS"] == chunks and config["BLOCK_CG"] * chunks == channels
