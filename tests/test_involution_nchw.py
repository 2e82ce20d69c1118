"""The NCHW per-pixel involution kernels (kernels/involution_nchw.py) against float64 references.

Launched directly with small tiles (32 lanes, strips of 3 rows, channel chunks of 1-2), so tiles are
cut by the image edge, lanes run past the last sample, and groups span several chunks; every output
is NaN-poisoned first (an element no lane writes fails).
"""
import pytest
import torch

from dynconv.kernels import involution as kernels
from dynconv.kernels import involution_nchw as nchw
from dynconv.kernels import involution_weight_grad as weight_grad
from dynconv.reference import involution_unfold
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("nan_poison")

# (B, C, H, W, K, G, stride, dilation, padding)
CASES = [
    (2, 8, 7, 9, 3, 2, 1, 1, None),    # G < C, odd sizes, two samples
    (1, 3, 9, 7, 3, 3, 2, 1, None),    # G = C, stride 2, odd H
    (1, 4, 7, 5, 5, 2, 3, 1, None),    # stride 3, odd H: phases whose last tap slot passes K
    (1, 4, 8, 5, 2, 2, 2, 2, 0),       # stride 2, dilation 2: phases no tap reaches
    (1, 6, 3, 4, 7, 2, 1, 1, None),    # K larger than the image, three channels per group
    (1, 4, 6, 7, 3, 1, (1, 2), (2, 1), 1),  # different strides and dilations per axis
    (1, 16, 9, 11, 9, 1, 2, 1, None),  # K >= 8: the narrower tiles (8 channels of 16, 4 rows), two chunks
]
IDS = [f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}G{c[5]}s{c[6]}d{c[7]}" for c in CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _problem(case, dtype):
    B, C, H, W, K, G, s, d, p = case
    s, d = _pair(s), _pair(d)
    p = tuple(dd * (K - 1) // 2 for dd in d) if p is None else _pair(p)
    Ho, Wo = ((n + 2 * pp - dd * (K - 1) - 1) // ss + 1 for n, ss, pp, dd in zip((H, W), s, p, d))
    x64 = torch.randn(B, C, H, W, dtype=torch.float64)
    w64 = torch.randn(B, G, K, K, Ho, Wo, dtype=torch.float64)
    dy64 = torch.randn(B, C, Ho, Wo, dtype=torch.float64)
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    y64 = involution_unfold(x64, w64, None, s, p, d)
    y64.backward(dy64)
    return (x64, w64, dy64, y64.detach()), (s, p, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nchw_kernels_forward_input_and_weight_gradients(case, dtype, nan_poison):
    if dtype == torch.bfloat16 and case[6] == 1:
        pytest.skip("bf16 at the strided cases only (interpreter time)")
    launches = _run_three_kernels(case, dtype)
    assert all(launch.name.startswith("involution_nchw_") for launch in launches)


def _run_three_kernels(case, dtype) -> tuple:
    """Forward, input and weight gradients of ``case`` at a small tile, each checked against float64
    autograd on the rounded operands; the launches, for the caller to see which kernels ran."""
    (x64, w64, dy64, y64), geometry = _problem(case, dtype)
    x, w, dy = (t.detach().to(dtype) for t in (x64, w64, dy64))
    CG = x.shape[1] // w.shape[1]
    config = {"CH": nchw._chunk(CG, 2), "STRIP": 3, "BLOCK_W": 32, "num_warps": 1}
    y = torch.empty(y64.shape, dtype=dtype)
    dx = torch.empty(x.shape, dtype=dtype)
    dw = torch.empty(w.shape, dtype=dtype)
    launches = (kernels.forward_launch(x, w, None, y, *geometry, config),
                kernels.backward_input_launch(dy, w, dx, *geometry, config),
                weight_grad.backward_weight_launch(dy, x, dw, *geometry, True, config))
    for launch in launches:
        launch()
    # The references see the rounded operands.
    x64r, w64r, dy64r = (t.detach().to(dtype).double().requires_grad_(True) for t in (x64, w64, dy64))
    y_ref = involution_unfold(x64r, w64r, None, *geometry)
    y_ref.backward(dy64r)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, x64r.grad, dtype, "dx")
    assert_close(dw, w64r.grad, dtype, "dw")
    return launches


def test_input_gradient_skips_a_missing_tap_without_multiplying_it():
    """Stride 3, K = 5: a phase's last tap slot passes K; an inf in dy that only such a slot would
    meet must not turn into 0 * inf = NaN."""
    (x64, w64, dy64, _), geometry = _problem((1, 2, 7, 5, 5, 1, 3, 1, None), torch.float32)
    dy = dy64.float()
    dy[0, 0, 0, 0] = float("inf")
    w = w64.detach().float()
    dx = torch.empty(x64.shape)
    kernels.backward_input_launch(dy, w, dx, *geometry, {"CH": 1, "STRIP": 2, "BLOCK_W": 32, "num_warps": 1})()
    dy64r = dy.double().requires_grad_(False)
    x64r = torch.zeros(x64.shape, dtype=torch.float64, requires_grad=True)
    involution_unfold(x64r, w.double(), None, *geometry).backward(dy64r)
    finite = torch.isfinite(x64r.grad)
    assert 0 < finite.sum() < finite.numel()
    assert torch.equal(torch.isfinite(dx), finite)
    assert_close(dx[finite], x64r.grad[finite], torch.float32, "dx where finite")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_input_gradient_in_fenced_batches_of_halo_rows(case, monkeypatch, nan_poison):
    """The single-pixel input gradient loads its dy halo rows in fenced batches (_dx_rows_ahead: two
    rows, fp32 at row stride 1); here a fence every row and every two, at strides 1, 3 (a last tap
    slot past K) and 2 with dilation 2 (phases no tap reaches)."""
    (x64, w64, dy64, _), geometry = _problem(case, torch.float32)
    w, dy = w64.detach().float(), dy64.float()
    x64r = torch.zeros(x64.shape, dtype=torch.float64, requires_grad=True)
    involution_unfold(x64r, w.double(), None, *geometry).backward(dy.double())
    for ahead in (1, 2):
        monkeypatch.setattr(nchw, "_dx_rows_ahead", lambda stride_h, size, ahead=ahead: ahead)
        dx = torch.full(x64.shape, float("nan"))
        launch = nchw.backward_input_launch(dy, w, dx, *geometry, False, {"CH": 1, "STRIP": 3, "BLOCK_W": 32,
                                                                          "num_warps": 1})
        assert launch.name == "involution_nchw_bwd_input_kernel" and launch.meta["ROWS_AHEAD"] == ahead
        launch()
        assert_close(dx, x64r.grad, torch.float32, f"dx, fenced every {ahead} rows")


@pytest.mark.parametrize("batch", [1, 2])
def test_weight_gradient_in_batches_of_chunks_with_a_partial_last(batch, monkeypatch, nan_poison):
    """The single-pixel weight gradient loads DW_BATCH chunks of channels a trip: three chunks of one
    channel in batches of two leave a last batch half past the group (masked, summing nothing). K = 7
    over a 3 x 4 image: every halo row outside x is read shifted into it, every column clamped, and
    their sums zeroed when stored."""
    monkeypatch.setattr(nchw, "DW_BATCH", batch)
    case = CASES[4]  # three channels a group, K = 7 larger than the image
    (x64, w64, dy64, _), geometry = _problem(case, torch.float32)
    x, dy = x64.detach().float(), dy64.float()
    dw = torch.full(w64.shape, float("nan"))
    launch = nchw.backward_weight_launch(dy, x, dw, *geometry, False, {"CH": 1, "STRIP": 3, "BLOCK_W": 32,
                                                                       "num_warps": 1})
    assert launch.meta["BATCH"] == batch and launch.loops == ((case[4], (-(-3 // batch),)),)
    assert launch.meta["CHANNELS_FULL"] == (batch == 1) and launch.meta["ROW_GROUPS"] == ((0, 3), (6, 9))
    launch()
    w64r = w64.detach().requires_grad_(True)
    involution_unfold(x.double(), w64r, None, *geometry).backward(dy.double())
    assert_close(dw, w64r.grad, torch.float32, f"dw, batches of {batch}")


def test_dispatch_and_declared_loops():
    """NCHW per-pixel calls take these kernels with K, strides and within-sample strides
    compile-time; channels_last, per-sample weights, K > MAX_K or a generic config do not."""
    def tensors(K, H, stride, G=2, fmt=torch.contiguous_format):
        Ho = (H - 1) // stride + 1
        x = torch.empty((2, 32, H, H), device="meta").to(memory_format=fmt)
        y = torch.empty((2, 32, Ho, Ho), device="meta").to(memory_format=fmt)
        return x, torch.empty((2, G, K, K, Ho, Ho), device="meta"), y

    x, w, y = tensors(7, 32, 1)
    geometry = ((1, 1), (3, 3), (1, 1))
    fwd = kernels.forward_launch(x, w, None, y, *geometry)
    dx = kernels.backward_input_launch(y, w, x, *geometry)
    dw = weight_grad.backward_weight_launch(y, x, w, *geometry, True)
    assert [launch.name for launch in (fwd, dx, dw)] == [
        "involution_nchw_fwd_kernel", "involution_nchw_bwd_input_kernel", "involution_nchw_bwd_weight_kernel"]
    assert fwd.meta["KS"] == 7 and fwd.meta["sxh"] == 32 and fwd.loops == (7,) and dx.loops == (7,)
    assert dw.loops == ((7, (16 // dw.meta["CH"] // dw.meta["BATCH"],)),)
    x, w, y = tensors(7, 31, 2)
    dx = kernels.backward_input_launch(y, w, x, (2, 2), (3, 3), (1, 1))
    assert dx.meta["GH"] == 1 and dx.loops == (4,)  # four tap columns per phase, not seven
    x, w, y = tensors(nchw.MAX_K + 2, 8, 1)
    assert kernels.forward_launch(x, w, None, y, (1, 1), (7, 7), (1, 1)).name == "involution_fwd_kernel"
    x, w, y = tensors(3, 8, 1, fmt=torch.channels_last)
    assert kernels.forward_launch(x, w, None, y, (1, 1), (1, 1), (1, 1)).name == "involution_fwd_kernel"
    x, w, y = tensors(3, 8, 1)
    generic = {"BLOCK_G": 1, "BLOCK_CG": 4, "BLOCK_H": 2, "BLOCK_W": 4, "num_warps": 1}
    assert kernels.forward_launch(x, w, None, y, (1, 1), (1, 1), (1, 1), generic).name == "involution_fwd_kernel"
    # per-sample weights: the depth-wise kernels of dynamic_dwconv.py
    assert kernels.forward_launch(x, w[..., 0, 0], None, y, (1, 1), (1, 1), (1, 1)).name == "dwconv_fwd_kernel"


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (1, 4, 0, 5), (1, 0, 5, 5)], ids=["B0", "H0", "C0"])
def test_empty_tensors(shape):
    """Empty inputs launch nothing, except the weight gradient of groups with no channels: zero."""
    B, C, H, W = shape
    G = 2 if C else 1
    x = torch.randn(shape)
    w = torch.randn(B, G, 3, 3, H, W)
    y, dw = torch.empty(shape), torch.empty(w.shape)
    geometry = ((1, 1), (1, 1), (1, 1))
    for launch in (kernels.forward_launch(x, w, None, y, *geometry), kernels.backward_input_launch(y, w, x, *geometry)):
        assert launch.name.startswith("involution_nchw_") and launch.grid[0] == 0
        launch()
    launch = weight_grad.backward_weight_launch(y, x, dw, *geometry, True)
    assert launch.name == "involution_nchw_bwd_weight_kernel"
    launch()
    assert torch.equal(dw, torch.zeros_like(dw))


# bf16 with even widths: x (or dy) and the weights read as int32 pairs of pixels (the *_pairs kernels).
PAIR_CASES = [
    (2, 8, 6, 8, 3, 2, 1, 1, None),    # two samples, G < C, two chunks per group
    (1, 8, 4, 6, 7, 2, 1, 1, None),    # K larger than the image, odd padding, two chunks per group
    (1, 2, 7, 8, 3, 1, 2, 1, None),    # stride 2, odd H
    (1, 4, 6, 8, 5, 2, 1, 2, None),    # dilation 2, even padding
    (1, 2, 5, 8, 4, 1, 2, 1, 1),       # even K, stride 2, padding 1
    (1, 2, 5, 6, 5, 1, 1, 1, None),    # even padding at stride 1
    (1, 4, 3, 4, 1, 2, 1, 1, None),    # K = 1: no tap pair, only the last column
    (2, 4, 7, 8, 5, 2, 1, 1, None),    # dw pairs: two samples, a partial last strip, lanes past the last sample
    (1, 4, 9, 6, 5, 2, (2, 1), 1, None),  # dw pairs at row stride 2
]
PAIR_IDS = [f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}G{c[5]}s{c[6]}d{c[7]}" for c in PAIR_CASES]


# K = 7: a group of four and three left (pairs: a three-trip loop and one left); dilation 2 at K = 5
# (pairs: a two-trip loop and one left). Groups of four never loop: K <= PAIRS_MAX_K.
GROUP_CASES = [PAIR_CASES[1], PAIR_CASES[3]]


@pytest.mark.parametrize("group, ahead", [(2, 0), (4, 3), (2, 1)], ids=["group2", "group4-fenced3", "group2-fenced1"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=[f"K{c[4]}d{c[7]}" for c in GROUP_CASES])
def test_pair_forward_and_input_gradient_in_either_tap_group(case, group, ahead, monkeypatch, nan_poison):
    """The pair forward and input gradient read a halo row once per group of tap columns: four with
    triton 3.6, two with newer tritons (PAIR_TAP_GROUP); both on either triton, the forward with a
    per-sample bias. The input gradient's pair kernel too where its launcher keeps it off (DX_PAIRS:
    a ptxas spill, not its arithmetic). Their halo rows unfenced (newer tritons) and in fenced batches
    (triton 3.6: PAIR_ROWS_AHEAD), down to a fence every row."""
    monkeypatch.setattr(nchw, "PAIR_TAP_GROUP", group)
    monkeypatch.setattr(nchw, "PAIR_ROWS_AHEAD", {"fwd": ahead, "dx": ahead})
    monkeypatch.setattr(nchw, "DX_PAIRS", True)
    (x64, w64, dy64, _), geometry = _problem(case, torch.bfloat16)
    x, w, dy = (t.detach().to(torch.bfloat16) for t in (x64, w64, dy64))
    bias = torch.randn(x.shape[0], x.shape[1]).to(torch.bfloat16)
    y = torch.full((x.shape[0], x.shape[1]) + tuple(w.shape[-2:]), float("nan"), dtype=torch.bfloat16)
    dx = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    config = {"CH": nchw._chunk(x.shape[1] // w.shape[1], 2), "STRIP": 3, "BLOCK_W": 32, "num_warps": 1}
    # nchw's launchers, not the cached plans of kernels.*
    launches = (nchw.forward_launch(x, w, bias, y, *geometry, False, config),
                nchw.backward_input_launch(dy, w, dx, *geometry, False, config))
    groups = case[4] // group
    for launch, name in zip(launches, ("fwd", "bwd_input")):
        assert launch.name == f"involution_nchw_{name}_pairs_kernel" and launch.meta["TAP_GROUP"] == group
        assert launch.meta["ROWS_AHEAD"] == ahead
        assert launch.loops == ((groups,) if groups > 1 else ())
        launch()
    x64r, w64r, dy64r = (t.double().requires_grad_(True) for t in (x, w, dy))
    y_ref = involution_unfold(x64r, w64r, bias.double(), *geometry)
    y_ref.backward(dy64r)
    assert_close(y, y_ref, torch.bfloat16, f"y, tap group {group}")
    assert_close(dx, x64r.grad, torch.bfloat16, f"dx, tap group {group}")


def test_pair_kernels_stop_at_pairs_max_k():
    """Past PAIRS_MAX_K the forward and input gradient take the single-pixel kernels (a run-time loop
    over the pair kernels' groups of tap columns spills); up to it, their pair kernels."""
    x = torch.empty((1, 8, 12, 12), device="meta", dtype=torch.bfloat16)
    for K in (nchw.PAIRS_MAX_K, nchw.PAIRS_MAX_K + 2):
        w = torch.empty((1, 2, K, K, 12, 12), device="meta", dtype=torch.bfloat16)
        geometry = ((1, 1), ((K - 1) // 2,) * 2, (1, 1), False)
        pairs = K <= nchw.PAIRS_MAX_K
        assert nchw.forward_launch(x, w, None, x, *geometry).name == (
            "involution_nchw_fwd_pairs_kernel" if pairs else "involution_nchw_fwd_kernel")
        assert nchw.backward_input_launch(x, w, x, *geometry).name == (
            "involution_nchw_bwd_input_pairs_kernel" if pairs and nchw.DX_PAIRS else "involution_nchw_bwd_input_kernel")


@pytest.mark.parametrize("case", PAIR_CASES, ids=PAIR_IDS)
def test_pair_kernels_forward_input_and_weight_gradients(case, nan_poison):
    launches = _run_three_kernels(case, torch.bfloat16)
    assert launches[0].name == "involution_nchw_fwd_pairs_kernel"
    # The input gradient's pairs need triton 3.6 or older, stride 1 and even input widths (all cases have them).
    stride = case[6] if isinstance(case[6], tuple) else (case[6], case[6])
    assert launches[1].name == ("involution_nchw_bwd_input_pairs_kernel" if nchw.DX_PAIRS and stride == (1, 1)
                                else "involution_nchw_bwd_input_kernel")
    # The weight gradient's pairs need column stride 1, groups of an even number of channels and K >= 5.
    stride_w = case[6] if isinstance(case[6], int) else case[6][1]
    pairs = stride_w == 1 and case[1] // case[5] % 2 == 0 and case[4] >= 5
    assert launches[2].name == ("involution_nchw_bwd_weight_pairs_kernel" if pairs else "involution_nchw_bwd_weight_kernel")


@pytest.mark.parametrize("case", [(2, 8, 7, 8, 5, 2, 1, 1, None), (1, 4, 9, 6, 7, 2, (2, 1), 1, None)],
                         ids=["B2C8H7W8K5G2", "B1C4H9W6K7G2s2x1"])
def test_weight_gradient_of_bf16_pairs_reads_channels_last_copies(case):
    """Where the pair weight gradient would run and the runs kernel applies, the entry point copies dy
    and x to channels_last and runs the runs kernel on the copies (weight_grad_copies): two samples,
    an odd height, row stride 2; against float64 on the rounded operands, dw NaN-poisoned."""
    (x64, w64, dy64, _), geometry = _problem(case, torch.bfloat16)
    x, dy = (t.detach().bfloat16() for t in (x64, dy64))
    dw = torch.empty(w64.shape, dtype=torch.bfloat16)
    assert weight_grad.weight_grad_copies(dy, x, dw, geometry[0])
    copies = (t.contiguous(memory_format=torch.channels_last) for t in (dy, x))
    assert weight_grad.backward_weight_launch(*copies, dw, *geometry, True).name == "involution_bwd_weight_runs_kernel"
    weight_grad.involution_backward_weight(dy, x, dw, *geometry)
    x64r, w64r, dy64r = (t.detach().bfloat16().double().requires_grad_(True) for t in (x64, w64, dy64))
    involution_unfold(x64r, w64r, None, *geometry).backward(dy64r)
    assert_close(dw, w64r.grad, torch.bfloat16, "dw")


def test_weight_gradient_copies_only_where_the_pair_kernel_would_run():
    """No copies for channels_last x, fp32, K = 3, an odd number of channels a group, column stride 2,
    more channels a group than the runs kernel holds, or an explicit config."""
    def copies(C=8, G=2, K=5, dtype=torch.bfloat16, stride=(1, 1), channels_last=False, config=None):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty((1, C, 8, 8), dtype=dtype, device="meta").to(memory_format=fmt)
        dy = torch.empty((1, C, 8, 8 // stride[1]), dtype=dtype, device="meta")
        dw = torch.empty((1, G, K, K, 8, 8 // stride[1]), dtype=dtype, device="meta")
        return weight_grad.weight_grad_copies(dy, x, dw, stride, config)

    assert copies()
    assert not copies(channels_last=True)
    assert not copies(dtype=torch.float32)
    assert not copies(K=3)
    assert not copies(C=6)
    assert not copies(stride=(1, 2))
    assert not copies(C=128, G=2)
    assert not copies(config={"CH": 2, "STRIP": 3, "BLOCK_W": 32, "num_warps": 1})


def test_weight_gradient_pairs_shift_every_row_they_read_into_x():
    """The pair weight gradient reads halo rows outside x from rows inside instead (and zeroes their
    sums): each group of ``_row_groups`` is all outside or all inside x in every strip, at most H rows,
    and shifted as the kernel shifts it, it reads rows of x only; the rows in no group are inside x in
    every strip. (Values cannot show a stray address: its sums are zeroed. So the host's groups are
    checked here, over every small geometry.)"""
    # R1: three rows above the first strip, three below the last.
    assert nchw._row_groups(56, 7, 8, 7, 1, 3, 1) == ((0, 3), (11, 14))
    # Four rows, K = 7, strips of 3: rows above strip 0, below strip 1, below both.
    assert nchw._row_groups(4, 7, 3, 2, 1, 3, 1) == ((0, 3), (4, 7), (7, 9))
    for H in range(1, 9):
        for K in (5, 7, 9):
            for stride in (1, 2):
                for dilation in (1, 2):
                    for padding in range(0, dilation * (K - 1) + 1):
                        Ho = (H + 2 * padding - dilation * (K - 1) - 1) // stride + 1
                        for strip in (1, 3, 8):
                            if Ho < 1:
                                continue
                            tiles = -(-Ho // strip)
                            halo = (strip - 1) * stride + (K - 1) * dilation + 1
                            groups = nchw._row_groups(H, K, strip, tiles, stride, padding, dilation)
                            grouped = {h for start, end in groups for h in range(start, end)}
                            for tile in range(tiles):
                                first = tile * strip * stride - padding
                                for h in set(range(halo)) - grouped:
                                    assert 0 <= first + h < H
                                for start, end in groups:
                                    assert end - start <= H
                                    inside = [0 <= first + h < H for h in range(start, end)]
                                    assert all(inside) or not any(inside)
                                    shifted = min(max(first + start, 0), H - (end - start))  # the kernel's clamp
                                    assert all(0 <= shifted + h - start < H for h in range(start, end))
                                    if all(inside):
                                        assert shifted == first + start
