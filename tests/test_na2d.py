"""Neighbourhood attention (docs/operators.md §1c): dynconv.na2d, na2d_qk, na2d_av and
dynconv.nn.NeighborhoodAttention2d against float64 references.

The fused kernels run through the Triton interpreter on CPU (see conftest.py); every allocation is
NaN-poisoned so an output element that no program writes fails the comparison. The references
themselves are checked against the definition written as loops (NATTEN's window rule).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
import dynconv.ops.na2d as na2d_ops
from dynconv.kernels import _launch
from dynconv.kernels import na2d as kernels
from dynconv.kernels import na2d_pair as pair_kernels
from dynconv.kernels import na2d_tiled as tiled_kernels
from dynconv.reference import na2d_av_gather, na2d_gather, na2d_naive, na2d_qk_gather, na2d_taps
from helpers import assert_close, check_against_reference

# (H, W, heads, D, K, dilation, window, rpb): borders on every side, K = 3 and 5, dilation on one
# or both axes, the window as large as the image, both window kinds, with and without rpb.
CASES = [
    (7, 6, 2, 8, 3, (1, 1), "neighborhood", True),
    (6, 7, 1, 16, 5, (1, 1), "neighborhood", True),
    (7, 7, 2, 4, 3, (2, 1), "neighborhood", True),
    (5, 6, 1, 8, 5, (1, 1), "neighborhood", False),   # K = H: every query sees the whole column
    (6, 5, 2, 8, 3, (1, 2), "sliding", True),
    (5, 7, 1, 4, 5, (1, 1), "sliding", False),
    (3, 5, 1, 4, 5, (1, 1), "sliding", True),        # K larger than the image
]
CASE_IDS = [f"H{c[0]}W{c[1]}n{c[2]}D{c[3]}K{c[4]}d{c[5][0]}{c[5][1]}-{c[6]}{'-rpb' if c[7] else ''}" for c in CASES]


def _inputs(case, B=1):
    H, W, heads, D, K, dilation, window, with_rpb = case
    q, k, v = (torch.randn(B, H, W, heads, D, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, dtype=torch.float64) if with_rpb else None
    return dict(q=q, k=k, v=v, rpb=rpb), dict(kernel_size=K, dilation=dilation, window=window)


def _na2d(q, k, v, rpb, kernel_size, dilation, window):
    return dynconv.na2d(q, k, v, kernel_size, dilation, rpb=rpb, window=window)


def _reference(q, k, v, rpb, kernel_size, dilation, window):
    return na2d_gather(q, k, v, kernel_size, dilation, rpb, None, window)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_references_agree_with_the_definition(case):
    """Gather and tap-loop paths against the loops with NATTEN's own window-start rule."""
    tensors, geometry = _inputs(case)
    K, d, window = geometry["kernel_size"], geometry["dilation"], geometry["window"]
    q, k, v, rpb = tensors.values()
    expected = na2d_naive(q, k, v, K, d, rpb, None, window)
    assert_close(na2d_gather(q, k, v, K, d, rpb, None, window), expected, torch.float64, "gather")
    assert_close(na2d_taps(q, k, v, K, d, rpb, None, window)[0], expected, torch.float64, "taps")


def test_neighborhood_window_is_natten_s():
    """Spot values of the shifted window and its rpb index, worked out by hand (K=3, L=5, d=1 and 2)."""
    from dynconv.ops.reference_na2d import window_indices

    keys, valid, rel = window_indices(5, 3, 1, "neighborhood")
    assert keys.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]] and valid.all()
    assert rel[0].tolist() == [2, 3, 4] and rel[4].tolist() == [0, 1, 2]
    keys, _, rel = window_indices(7, 3, 2, "neighborhood")  # subsequences 0,2,4,6 and 1,3,5
    assert keys[0].tolist() == [0, 2, 4] and keys[6].tolist() == [2, 4, 6] and keys[5].tolist() == [1, 3, 5]
    assert rel[5].tolist() == [0, 1, 2]
    keys, valid, rel = window_indices(5, 3, 1, "sliding")
    assert valid[0].tolist() == [False, True, True] and rel[0].tolist() == [1, 2, 3]


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_na2d_forward_and_gradients(case, device):
    tensors, geometry = _inputs(case)
    check_against_reference(_na2d, _reference, tensors, torch.float32, device, **geometry)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_na2d_half_precision(dtype, device):
    tensors, geometry = _inputs(CASES[2])
    y = check_against_reference(_na2d, _reference, tensors, dtype, device, **geometry)
    assert y.dtype == dtype


# The tensor-core kernels on 4 x 4 tiles and 32-key chunks, so every case has several tiles and chunks:
# windows crossing tile edges, dilation groups, sliding borders, K > image; at K = 3 the forward's union
# (36 keys) ends in a 16-key tail chunk, at K = 5 (64 keys) in none.
TILED_CASES = [
    (10, 9, 1, 16, 3, (1, 1), "neighborhood", True),  # interior tiles: every union key is someone's
    (9, 7, 1, 16, 3, (2, 1), "neighborhood", True),
    (6, 9, 1, 24, 5, (1, 1), "neighborhood", False),  # D padded to 32
    (6, 5, 2, 16, 3, (1, 2), "sliding", True),
    (3, 5, 1, 16, 5, (1, 1), "sliding", True),  # K larger than the image
]


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("case", TILED_CASES, ids=[f"H{c[0]}W{c[1]}D{c[3]}K{c[4]}d{c[5][0]}{c[5][1]}-{c[6]}"
                                                   for c in TILED_CASES])
def test_tiled_kernels_in_float64(case, device):
    """The tiled kernels' masking, online softmax, dq and the inverse-neighbourhood dk, dv, exactly
    (float64 tl.dot): y, lse, dq, dk, dv, and drpb from the dq kernel's ds per (query, tap)."""
    tensors, geometry = _inputs(case)
    q, k, v, rpb = (None if t is None else t.to(device) for t in tensors.values())
    K, d, window = geometry["kernel_size"], geometry["dilation"], geometry["window"]
    y, lse = torch.empty_like(q), torch.empty(q.shape[:4], dtype=torch.float64, device=device)
    config = {"tiled": True, "BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_N": 32, "num_warps": 4}
    kernels.na2d_forward(q, k, v, rpb, y, lse, K, d, 0.3, window == "neighborhood", config)
    leaves = [t.cpu().requires_grad_() for t in (q, k, v)]
    expected = na2d_gather(*leaves, K, d, None if rpb is None else rpb.cpu(), 0.3, window)
    assert_close(y, expected, torch.float64, "y")
    _, expected_lse = na2d_taps(*(t.cpu() for t in (q, k, v)), K, d, None if rpb is None else rpb.cpu(), 0.3, window)
    assert_close(lse, expected_lse, torch.float64, "lse")
    dy = torch.randn_like(q)
    dq = torch.empty_like(q)
    neighborhood = window == "neighborhood"
    ds = None if rpb is None else kernels.rpb_grad_buffer(q, K, d, 0.3, neighborhood, config)
    launch = kernels.backward_query_launch(q, k, v, rpb, dy, lse, (dy * y).sum(-1), dq, ds, K, d, 0.3,
                                           neighborhood, config)
    assert launch.kernel is tiled_kernels.na2d_bwd_query_tiled_kernel
    launch()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    launch = kernels.backward_key_launch(q, k, v, rpb, dy, lse, (dy * y).sum(-1), dk, dv, K, d, 0.3,
                                         window == "neighborhood", config)
    assert launch.kernel is tiled_kernels.na2d_bwd_key_tiled_kernel
    launch()
    if rpb is not None:
        assert ds.shape == (*q.shape[:4], K, K)
        leaves.append(rpb.cpu().requires_grad_())
        expected = na2d_gather(*leaves[:3], K, d, leaves[3], 0.3, window)
        drpb = torch.empty_like(rpb)
        kernels._reduce_window_ds(ds, drpb, K, d, neighborhood)
    expected.backward(dy.cpu())
    for name, actual, leaf in zip(("dq", "dk", "dv", "drpb"), (dq, dk, dv, rpb is not None and drpb), leaves):
        assert_close(actual, leaf.grad, torch.float64, name)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype, with_rpb", [(torch.bfloat16, True), (torch.float16, False)], ids=["bf16-rpb", "fp16"])
def test_half_precision_takes_the_tiled_kernels(dtype, with_rpb, device):
    """bf16 with D >= 16 runs the tensor-core forward, dk/dv and dq (with rpb, storing ds per tap)
    by default; the backward uses the forward's lse."""
    tensors, geometry = _inputs((6, 7, 2, 16, 3, (1, 1), "neighborhood", with_rpb))
    y = check_against_reference(_na2d, _reference, tensors, dtype, device, **geometry)
    assert y.dtype == dtype
    q = torch.empty(1, 6, 7, 2, 16, dtype=torch.bfloat16, device="meta")  # meta: a fresh launch, no plan
    lse = torch.empty(1, 6, 7, 2, device="meta")
    launch = kernels.forward_launch(q, q, q, None, q, lse, 3, (1, 1), 0.25, True)
    assert launch.kernel is tiled_kernels.na2d_fwd_tiled_kernel
    ds = None if not with_rpb else kernels.rpb_grad_buffer(q, 3, (1, 1), 0.25, True)
    assert ds is None or (ds.shape == (1, 6, 7, 2, 3, 3) and ds.dtype == torch.bfloat16)
    rpb = None if not with_rpb else torch.empty(2, 5, 5, dtype=torch.bfloat16, device="meta")
    dq_launch = kernels.backward_query_launch(q, q, q, rpb, q, lse, lse, q, ds, 3, (1, 1), 0.25, True)
    assert dq_launch.kernel is tiled_kernels.na2d_bwd_query_tiled_kernel
    assert dq_launch.meta["RPB_GRAD"] == with_rpb
    dkv_launch = kernels.backward_key_launch(q, q, q, rpb, q, lse, lse, q, q, 3, (1, 1), 0.25, True)
    assert dkv_launch.kernel is tiled_kernels.na2d_bwd_key_tiled_kernel
    assert kernels.uses_tensor_cores("fwd", torch.bfloat16, 16)
    assert not kernels.uses_tensor_cores("fwd", torch.bfloat16, 8)
    assert not kernels.uses_tensor_cores("fwd", torch.float32, 64)
    assert kernels.uses_tensor_cores("dq", torch.float16, 32) and kernels.uses_tensor_cores("dq", torch.float16, 32, True)


@pytest.mark.usefixtures("nan_poison")
def test_cpu_path_without_interpreter_matches(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the tap loop: same values and gradients."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(kernels, "forward_launch", lambda *a, **k: pytest.fail("Triton kernel ran on the CPU path"))
    for case in CASES:
        tensors, geometry = _inputs(case, B=2)
        check_against_reference(_na2d, _reference, tensors, torch.float32, **geometry)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=[CASE_IDS[2], CASE_IDS[4]])
def test_unfused_pair_forward_and_gradients(case, device):
    tensors, geometry = _inputs(case, B=2)
    K, d, window = geometry["kernel_size"], geometry["dilation"], geometry["window"]
    if window == "neighborhood":  # sliding scores hold -inf: test_sliding_scores_mask_keys_outside_the_image
        check_against_reference(lambda q, k, rpb: dynconv.na2d_qk(q, k, K, d, rpb=rpb, window=window),
                                lambda q, k, rpb: na2d_qk_gather(q, k, K, d, rpb, window),
                                dict(q=tensors["q"], k=tensors["k"], rpb=tensors["rpb"]), torch.float32, device)
    attn = torch.randn(*tensors["q"].shape[:4], K, K, dtype=torch.float64)  # any weights, not softmaxed
    check_against_reference(lambda attn, v: dynconv.na2d_av(attn, v, K, d, window=window),
                            lambda attn, v: na2d_av_gather(attn, v, K, d, window),
                            dict(attn=attn, v=tensors["v"]), torch.float32, device)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("window", ["neighborhood", "sliding"])
def test_kernels_across_tile_borders(window, device):
    """Small tiles (the tests' images otherwise fit one tile): windows and inverse neighbourhoods that
    cross tile edges, lanes of one tile with different holder ranges, rpb partials of several tiles."""
    config = {"BLOCK_H": 4, "BLOCK_W": 4, "num_warps": 4, "num_stages": 1}
    B, H, W, heads, D, K, d = 1, 7, 6, 1, 4, 3, (2, 1)
    neighborhood = window == "neighborhood"
    q, k, v, dy = (torch.randn(B, H, W, heads, D, device=device) for _ in range(4))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, device=device)
    y, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse = torch.empty(B, H, W, heads, device=device)
    drpb = torch.empty_like(rpb)
    kernels.na2d_forward(q, k, v, rpb, y, lse, K, d, 0.5, neighborhood, config)
    kernels.na2d_backward(dy, q, k, v, rpb, y, lse, dq, dk, dv, drpb, K, d, 0.5, neighborhood, config)
    leaves = [t.double().cpu().requires_grad_() for t in (q, k, v, rpb)]
    expected = na2d_gather(*leaves[:3], K, d, leaves[3], 0.5, window)
    expected.backward(dy.double().cpu())
    assert_close(y, expected, torch.float32, "y")
    for name, actual, leaf in zip(("dq", "dk", "dv", "drpb"), (dq, dk, dv, drpb), leaves):
        assert_close(actual, leaf.grad, torch.float32, name)
    # the unfused kernels on the same tiles
    scores = torch.empty(B, H, W, heads, K, K, device=device)
    pair_kernels.na2d_qk_forward(q, k, rpb, scores, K, d, neighborhood, config)
    s_expected = na2d_qk_gather(q.double().cpu(), k.double().cpu(), K, d, rpb.double().cpu(), window)
    assert torch.equal(torch.isinf(scores.cpu()), torch.isinf(s_expected))
    finite = torch.isfinite(s_expected)
    assert_close(scores.cpu()[finite], s_expected[finite], torch.float32, "scores")
    ds = torch.randn_like(scores)
    pair_kernels.na2d_qk_backward(ds, q, k, dq, dk, drpb, K, d, neighborhood, config)
    leaves = [t.double().cpu().requires_grad_() for t in (q, k, rpb)]
    s64 = na2d_qk_gather(leaves[0], leaves[1], K, d, leaves[2], window)
    s64.backward(torch.where(torch.isfinite(s64), ds.double().cpu(), 0))
    for name, actual, leaf in zip(("qk dq", "qk dk", "qk drpb"), (dq, dk, drpb), leaves):
        assert_close(actual, leaf.grad, torch.float32, name)
    attn = torch.randn_like(scores)
    pair_kernels.na2d_av_forward(attn, v, y, K, d, neighborhood, config)
    dattn = torch.empty_like(attn)
    pair_kernels.na2d_av_backward(dy, attn, v, dattn, dv, K, d, neighborhood, config)
    leaves = [t.double().cpu().requires_grad_() for t in (attn, v)]
    y64 = na2d_av_gather(*leaves, K, d, window)
    y64.backward(dy.double().cpu())
    assert_close(y, y64, torch.float32, "av y")
    assert_close(dattn, leaves[0].grad, torch.float32, "av dattn")
    assert_close(dv, leaves[1].grad, torch.float32, "av dv")


def test_sliding_scores_mask_keys_outside_the_image(device):
    """na2d_qk's sliding window gives -inf outside the image (and no gradient through those)."""
    tensors, geometry = _inputs(CASES[4])
    q, k, rpb = (tensors[n].float().to(device).requires_grad_() for n in ("q", "k", "rpb"))
    s = dynconv.na2d_qk(q, k, 3, (1, 2), rpb=rpb, window="sliding")
    expected = na2d_qk_gather(q.detach().double(), k.detach().double(), 3, (1, 2), rpb.detach().double(), "sliding")
    assert torch.equal(torch.isinf(s), torch.isinf(expected)) and torch.isinf(s[0, 0, 0, :, 0]).all()
    finite = torch.isfinite(expected)
    assert_close(s[finite], expected[finite], torch.float32, "finite scores")
    torch.where(torch.isfinite(s), s, 0).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(rpb.grad).all()


def test_unfused_pair_composes_to_the_fused_op(device):
    tensors, geometry = _inputs(CASES[0])
    q, k, v, rpb = (tensors[n].float().to(device) for n in ("q", "k", "v", "rpb"))
    K, d = geometry["kernel_size"], geometry["dilation"]
    s = dynconv.na2d_qk(q * q.shape[-1] ** -0.5, k, K, d, rpb=rpb)
    y = dynconv.na2d_av(s.flatten(-2).softmax(-1).view(s.shape), v, K, d)
    assert_close(y, dynconv.na2d(q, k, v, K, d, rpb=rpb).double(), torch.float32, "qk + softmax + av")


def test_float64_gradcheck(device):
    """Fast-mode gradcheck (a random projection of the Jacobian: few kernel runs in the interpreter)."""
    q, k, v = (torch.randn(1, 3, 4, 1, 2, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda q, k, v, rpb: dynconv.na2d(q, k, v, 3, rpb=rpb, scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True)
    fn = lambda q, k, rpb: dynconv.na2d_qk(q, k, 3, rpb=rpb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, rpb), fast_mode=True)
    attn = torch.randn(1, 3, 4, 1, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: dynconv.na2d_av(a, v, 3, window="sliding"), (attn, v), fast_mode=True)


@pytest.mark.parametrize("dtype, D", [(torch.float32, 4), (torch.bfloat16, 16)], ids=["fp32-cuda-cores", "bf16-tiled"])
def test_gradients_are_deterministic(dtype, D, device):
    """Both dq paths: the CUDA-core kernel's partials and the tiled kernel's ds per tap."""
    tensors, geometry = _inputs((5, 4, 1, D, 3, (1, 1), "neighborhood", True), B=2)
    leaves = [tensors[n].to(dtype).to(device).requires_grad_() for n in ("q", "k", "v", "rpb")]
    runs = []
    for _ in range(2):
        grads = torch.autograd.grad(_na2d(*leaves, **geometry).square().sum(), leaves)
        runs.append(grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_packed_qkv_views_need_no_copy(device):
    """q, k, v as strided views of one packed projection, as the module makes them."""
    B, H, W, heads, D, K = 1, 6, 5, 2, 4, 3
    packed = torch.randn(B, H, W, 3, heads, D, device=device)
    q, k, v = packed.unbind(3)
    assert not q.is_contiguous()
    expected = na2d_gather(*(t.double().cpu() for t in (q, k, v)), K)
    assert_close(dynconv.na2d(q, k, v, K), expected, torch.float32, "views")


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("D", [4, 16], ids=["cuda-core", "tiled-forward"])
def test_heads_first_layout_reads_the_same_storage(D, device, monkeypatch):
    """``heads_first=True``: (B, heads, H, W, D) in and out, the kernels reading the caller's storage
    through its strides (no copy), values and gradients as the heads-last call's; na2d_qk / na2d_av too."""
    B, H, W, heads, K = 1, 6, 5, 2, 3
    dtype = torch.bfloat16 if D == 16 else torch.float32
    q, k, v = (torch.randn(B, heads, H, W, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    rpb = torch.randn(heads, 2 * K - 1, 2 * K - 1, device=device).to(dtype).requires_grad_()
    seen = []
    real = na2d_ops._forward
    monkeypatch.setattr(na2d_ops, "_forward", lambda q_, *a: seen.append(q_.data_ptr()) or real(q_, *a))
    y = dynconv.na2d(q, k, v, K, rpb=rpb, heads_first=True)
    assert seen == [q.data_ptr()] and y.shape == (B, heads, H, W, D)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().cpu().movedim(1, 3).requires_grad_() for t in (q, k, v)]
    leaves.append(rpb.detach().double().cpu().requires_grad_())
    expected = na2d_gather(*leaves[:3], K, (1, 1), leaves[3])
    expected.backward(dy.double().cpu().movedim(1, 3))
    assert_close(y.movedim(1, 3), expected, dtype, "y")
    for name, t, leaf in zip(("dq", "dk", "dv", "drpb"), (q, k, v, rpb), leaves):
        grad = leaf.grad if name == "drpb" else leaf.grad.movedim(3, 1)
        assert_close(t.grad, grad, dtype, name)
    scores = dynconv.na2d_qk(q.detach(), k.detach(), K, rpb=rpb.detach(), heads_first=True)
    assert scores.shape == (B, heads, H, W, K, K)
    assert torch.equal(scores.movedim(1, 3), dynconv.na2d_qk(q.detach().movedim(1, 3), k.detach().movedim(1, 3), K,
                                                             rpb=rpb.detach()))
    out = dynconv.na2d_av(scores.softmax(-1), v.detach(), K, heads_first=True)
    assert out.shape == (B, heads, H, W, D)
    assert torch.equal(out.movedim(1, 3), dynconv.na2d_av(scores.movedim(1, 3).softmax(-1), v.detach().movedim(1, 3), K))
    with pytest.raises(ValueError, match=r"q must be 5-D \(B, heads, H, W, D\)"):
        dynconv.na2d(q[0], k, v, K, heads_first=True)
    with pytest.raises(TypeError, match="heads_first must be a bool"):
        dynconv.na2d(q, k, v, K, heads_first=1)


def test_autocast_runs_in_the_autocast_dtype(device):
    q, k, v = (torch.randn(1, 5, 5, 1, 8, device=device) for _ in range(3))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = dynconv.na2d(q, k, v, 3)
    assert y.dtype == torch.bfloat16
    expected = na2d_gather(*(t.bfloat16().double().cpu() for t in (q, k, v)), 3)
    assert_close(y, expected, torch.bfloat16, "autocast")


def test_empty_batch(device):
    q = torch.randn(0, 5, 5, 2, 4, device=device, requires_grad=True)
    y = dynconv.na2d(q, q, q, 3)
    assert y.shape == q.shape
    y.sum().backward()
    assert q.grad.shape == q.shape


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD = [
    ("q rank", lambda: (_t(5, 5, 2, 4), _t(1, 5, 5, 2, 4), _t(1, 5, 5, 2, 4)), {}, ValueError, r"q must be 5-D"),
    ("k shape", lambda: (_t(1, 5, 5, 2, 4), _t(1, 5, 6, 2, 4), _t(1, 5, 5, 2, 4)), {}, ValueError, r"k must have the shape of q"),
    ("v shape", lambda: (_t(1, 5, 5, 2, 4), _t(1, 5, 5, 2, 4), _t(1, 5, 5, 2, 8)), {}, ValueError, r"v must have the shape of q"),
    ("even K", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"kernel_size": 4}, ValueError, r"kernel_size must be odd"),
    ("K·d > image", lambda: (_t(1, 5, 9, 2, 4),) * 3, {"kernel_size": 3, "dilation": 2}, ValueError,
     r"kernel_size·dilation = 3·2 = 6 is larger than the image side H=5"),
    ("K > image", lambda: (_t(1, 9, 4, 2, 4),) * 3, {"kernel_size": 5}, ValueError, r"image side W=4"),
    ("rpb shape", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"rpb": _t(2, 3, 3)}, ValueError, r"rpb must have shape \(heads, 2K-1, 2K-1\) = \(2, 5, 5\)"),
    ("rpb rank", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"rpb": _t(5, 5)}, ValueError, r"rpb must be 3-D"),
    ("mixed dtypes", lambda: (_t(1, 5, 5, 2, 4), _t(1, 5, 5, 2, 4, dtype=torch.float16), _t(1, 5, 5, 2, 4)), {},
     TypeError, r"same dtype"),
    ("rpb dtype", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"rpb": _t(2, 5, 5, dtype=torch.float64)}, TypeError, r"same dtype"),
    ("integer q", lambda: (torch.ones(1, 5, 5, 2, 4, dtype=torch.int32),) * 3, {}, TypeError, r"q must be float16"),
    ("window", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"window": "global"}, ValueError, r"window must be one of"),
    ("dilation 0", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"dilation": 0}, ValueError, r"dilation must be >= 1"),
    ("float K", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"kernel_size": 3.0}, TypeError, r"kernel_size must be an int"),
    ("scale", lambda: (_t(1, 5, 5, 2, 4),) * 3, {"scale": "1"}, TypeError, r"scale must be a float"),
]


@pytest.mark.parametrize("name,make,kwargs,error,match", BAD, ids=[b[0] for b in BAD])
def test_na2d_rejects_bad_input_before_any_kernel(name, make, kwargs, error, match, monkeypatch):
    monkeypatch.setattr(kernels, "forward_launch", lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    q, k, v = make()
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        dynconv.na2d(q, k, v, kwargs.pop("kernel_size"), **kwargs)


def test_references_reject_a_neighborhood_window_that_does_not_fit():
    """The references say so as the op does: the loops indexed past the image (IndexError), the
    gathers clamped their windows into it and returned numbers for a window that does not exist."""
    from dynconv.reference import na2d_av_gather, na2d_gather, na2d_naive, na2d_qk_gather
    q = _t(1, 5, 9, 2, 4, dtype=torch.float64)
    for call in (lambda: na2d_naive(q, q, q, 3, (2, 1)), lambda: na2d_gather(q, q, q, 3, (2, 1)),
                 lambda: na2d_qk_gather(q, q, 3, (2, 1)), lambda: na2d_av_gather(_t(1, 5, 9, 2, 3, 3), q, 3, (2, 1))):
        with pytest.raises(ValueError, match=r"kernel_size·dilation = 3·2 = 6 is larger than the image side H=5"):
            call()
    assert na2d_naive(q, q, q, 3, (2, 1), window="sliding").shape == q.shape  # a sliding window may leave it


def test_unfused_ops_reject_bad_input():
    q = _t(1, 5, 5, 2, 4)
    with pytest.raises(ValueError, match=r"attn must have shape \(B, H, W, heads, K, K\) = \(1, 5, 5, 2, 3, 3\)"):
        dynconv.na2d_av(_t(1, 5, 5, 2, 5, 5), q, 3)
    with pytest.raises(ValueError, match=r"attn must be 6-D"):
        dynconv.na2d_av(_t(1, 5, 5, 2, 9), q, 3)
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        dynconv.na2d_qk(q, _t(1, 5, 5, 1, 4), 3)
    with pytest.raises(ValueError, match="same device, got q on cpu, k on meta"):
        dynconv.na2d_qk(q, torch.empty(1, 5, 5, 2, 4, device="meta"), 3)


def test_opcheck(device):
    q, k, v = (torch.randn(1, 3, 3, 1, 2, device=device, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dynconv.na2d, (q, k, v, rpb, 3, [1, 1], 0.5, "neighborhood"))
    torch.library.opcheck(torch.ops.dynconv.na2d_qk, (q, k, rpb, 3, [1, 1], "neighborhood"))
    attn = torch.randn(1, 3, 3, 1, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dynconv.na2d_av, (attn, v, 3, [1, 1], "sliding"))
    torch.library.opcheck(torch.ops.dynconv.na2d_dots, (q, k, 3, [1, 1], "sliding"))
    torch.library.opcheck(torch.ops.dynconv.na2d_key_sum, (attn, q, 3, [1, 1], "neighborhood"))


def test_eager_path_and_custom_ops_agree_bit_for_bit(device, monkeypatch):
    tensors, geometry = _inputs(CASES[4])
    leaves = [tensors[n].float().to(device).requires_grad_() for n in ("q", "k", "v", "rpb")]
    eager = (_na2d(*leaves, **geometry), )
    dy = torch.randn_like(eager[0])
    eager += torch.autograd.grad(eager[0], leaves, dy)
    monkeypatch.setattr(na2d_ops._eager, "eager", lambda *tensors: False)
    via_ops = (_na2d(*leaves, **geometry), )
    via_ops += torch.autograd.grad(via_ops[0], leaves, dy)
    for a, b in zip(eager, via_ops):
        assert torch.equal(a, b)


def test_the_eager_path_calls_no_custom_op(device, monkeypatch):
    for name in ("na2d_op", "na2d_backward_op", "na2d_qk_op", "na2d_qk_backward_op", "na2d_av_op",
                 "na2d_av_backward_op"):
        monkeypatch.setattr(na2d_ops, name, lambda *a, **k: pytest.fail("the eager path went through the dispatcher"))
    q, k, v = (torch.randn(1, 4, 4, 1, 4, device=device, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, device=device, requires_grad=True)
    s = dynconv.na2d_qk(q, k, 3, rpb=rpb)
    y = dynconv.na2d(q, k, v, 3, rpb=rpb) + dynconv.na2d_av(s.softmax(-1), v, 3)
    y.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, rpb))


# --- the module -----------------------------------------------------------------------------

class NATAttention(nn.Module):
    """NAT/DiNAT's ``NeighborhoodAttention`` (SHI-Labs/Neighborhood-Attention-Transformer, natten
    0.14), re-typed with its NATTEN calls replaced by a plain-torch window gather."""

    def __init__(self, dim, kernel_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 dilation=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // self.num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation or 1
        self.window_size = self.kernel_size * self.dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, (2 * kernel_size - 1), (2 * kernel_size - 1)))
        nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, Hp, Wp, C = x.shape
        H, W = int(Hp), int(Wp)
        pad_l = pad_t = pad_r = pad_b = 0
        if H < self.window_size or W < self.window_size:
            pad_l = pad_t = 0
            pad_r = max(0, self.window_size - W)
            pad_b = max(0, self.window_size - H)
            x = F.pad(x, (0, 0, pad_l, pad_r, pad_t, pad_b))
            _, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = self._natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self._natten2dav(attn, v, self.kernel_size, self.dilation)
        x = x.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        if pad_r or pad_b:
            x = x[:, :Hp, :Wp, :]
        return self.proj_drop(self.proj(x))

    @staticmethod
    def _natten2dqkrpb(q, k, rpb, K, d):  # (B, heads, H, W, D) -> (B, heads, H, W, K*K)
        s = na2d_qk_gather(q.permute(0, 2, 3, 1, 4), k.permute(0, 2, 3, 1, 4), K, (d, d), rpb)
        return s.flatten(-2).permute(0, 3, 1, 2, 4)

    @staticmethod
    def _natten2dav(attn, v, K, d):
        a = attn.permute(0, 2, 3, 1, 4).unflatten(-1, (K, K))
        return na2d_av_gather(a, v.permute(0, 2, 3, 1, 4), K, (d, d)).permute(0, 3, 1, 2, 4)


@pytest.mark.parametrize("hw,dilation", [((6, 7), 1), ((4, 3), 1), ((7, 6), 2)], ids=["6x7", "padded-4x3", "dilated"])
def test_module_loads_nat_checkpoints_and_matches(hw, dilation, device):
    torch.manual_seed(0)
    nat = NATAttention(16, 3, 2, dilation=dilation).double()
    ours = dynconv.nn.NeighborhoodAttention2d(16, 2, 3, dilation=dilation)
    ours.load_state_dict(nat.state_dict())
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    ours = ours.to(device)
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    expected = nat(xr)
    xo = x.float().to(device).requires_grad_()
    y = ours(xo)
    assert_close(y, expected, torch.float32, "module output")
    dy = torch.randn_like(expected)
    expected.backward(dy)
    y.backward(dy.float().to(device))
    assert_close(xo.grad, xr.grad, torch.float32, "dx")
    for (name, p), (_, pr) in zip(ours.named_parameters(), nat.named_parameters()):
        assert_close(p.grad, pr.grad, torch.float32, f"d{name}")


def test_module_options(device):
    layer = dynconv.nn.NeighborhoodAttention2d(8, 2, 3, rel_pos_bias=False, attn_drop=0.5, window="sliding").to(device)
    assert layer.rpb is None and "rpb" not in layer.state_dict()
    x = torch.randn(1, 4, 5, 8, device=device, requires_grad=True)
    layer.train()(x).sum().backward()  # attention dropout: the unfused path
    assert x.grad is not None
    layer.eval()
    expected = layer.proj(na2d_gather(*layer.qkv(x).view(1, 4, 5, 3, 2, 4).unbind(3), 3, window="sliding")
                          .reshape(1, 4, 5, 8))
    assert_close(layer(x), expected.detach().double(), torch.float32, "eval, sliding, no rpb")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dynconv.nn.NeighborhoodAttention2d(10, 3, 3)


def test_module_compiles_fullgraph(device):
    layer = dynconv.nn.NeighborhoodAttention2d(8, 2, 3).to(device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 5, 4, 8, device=device, requires_grad=True)
    y = compiled(x)
    assert_close(y, layer(x).double(), torch.float32, "compiled module")
    y.sum().backward()
    assert x.grad is not None and layer.rpb.grad is not None and math.isfinite(layer.rpb.grad.sum().item())


# ---------------------------------------------------------------------------------------------
# Derivatives of every order and tangents (ops/na2d_linear.py), against autograd on the gather
# reference in float64. The plain tap loop covers the transforms; the interpreter runs the kernels
# of the three window products once each way.
# ---------------------------------------------------------------------------------------------

# path -> (kernels through the interpreter, eager path allowed)
DERIVATIVE_PATHS = {"plain": (False, True), "plain-custom-op": (False, False),
                    "interpreter": (True, True), "interpreter-custom-op": (True, False)}


def _take(path, monkeypatch):
    interpreted, eager = DERIVATIVE_PATHS[path]
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted)
    if not eager:
        monkeypatch.setattr(na2d_ops._eager, "eager", lambda *tensors: False)


def _derivative_problem(name, window="sliding", B=1):
    """(function, gather reference, float64 primals): borders, dilation on one axis, rpb."""
    K, d = 3, (1, 2)
    q, k, v = (torch.randn(B, 4, 6, 2, 1, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * K - 1, 2 * K - 1, dtype=torch.float64)
    attn = torch.randn(B, 4, 6, 2, K, K, dtype=torch.float64)
    finite = dict(neginf=0.0)  # -inf scores (sliding taps off the image) are constants: compare as 0
    return {"na2d": (lambda q, k, v, r: dynconv.na2d(q, k, v, K, d, rpb=r, window=window),
                     lambda q, k, v, r: na2d_gather(q, k, v, K, d, r, None, window), (q, k, v, rpb)),
            "na2d_qk": (lambda q, k, r: dynconv.na2d_qk(q, k, K, d, rpb=r, window=window).nan_to_num(**finite),
                        lambda q, k, r: na2d_qk_gather(q, k, K, d, r, window).nan_to_num(**finite), (q, k, rpb)),
            "na2d_av": (lambda a, v: dynconv.na2d_av(a, v, K, d, window=window),
                        lambda a, v: na2d_av_gather(a, v, K, d, window), (attn, v))}[name]


def _penalty_grads(fn, primals):
    """Gradients of a gradient penalty: first derivatives kept in the graph, differentiated again."""
    leaves = [p.clone().requires_grad_() for p in primals]
    y = fn(*leaves)
    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    firsts = torch.autograd.grad(y, leaves, dy, create_graph=True)
    penalty = sum(g.square().sum() for g in firsts) + y.square().sum()
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("path", DERIVATIVE_PATHS)
@pytest.mark.parametrize("name", ["na2d", "na2d_qk", "na2d_av"])
def test_a_gradient_penalty_reaches_every_input(name, path, monkeypatch):
    # the custom-op paths take the other window kind, so each kind meets both ways of dispatch
    fn, reference, primals = _derivative_problem(name, "neighborhood" if path.endswith("op") else "sliding")
    expected = _penalty_grads(reference, primals)
    _take(path, monkeypatch)
    for i, (a, e) in enumerate(zip(_penalty_grads(fn, primals), expected)):
        assert_close(a, e, torch.float64, f"penalty gradient of input {i}")


@pytest.mark.parametrize("name", ["na2d", "na2d_qk", "na2d_av"])
def test_gradgradcheck_and_third_derivatives(name, monkeypatch):
    fn, _, primals = _derivative_problem(name)
    _take("plain", monkeypatch)
    leaves = tuple(p.clone().requires_grad_() for p in primals)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)

    def first_derivatives(*leaves):
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, torch.ones_like(y).cumsum(-1), create_graph=True)

    assert torch.autograd.gradgradcheck(first_derivatives, leaves, fast_mode=True)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("path", ["plain", "interpreter"])
@pytest.mark.parametrize("name", ["na2d", "na2d_qk", "na2d_av"])
def test_jvp_gives_the_tangent(name, path, monkeypatch):
    fn, reference, primals = _derivative_problem(name)
    tangents = tuple(torch.randn_like(p) for p in primals)
    expected = torch.func.jvp(reference, primals, tangents)
    first_alone = torch.func.jvp(lambda a: reference(a, *primals[1:]), primals[:1], tangents[:1])[1]
    _take(path, monkeypatch)
    y, tangent = torch.func.jvp(fn, primals, tangents)
    assert_close(y, expected[0], torch.float64, "y")
    assert_close(tangent, expected[1], torch.float64, "tangent")
    with torch.autograd.forward_ad.dual_level():  # forward AD outside torch.func
        dual = torch.autograd.forward_ad.make_dual(primals[0], tangents[0])
        tangent = torch.autograd.forward_ad.unpack_dual(fn(dual, *primals[1:])).tangent
    assert_close(tangent, first_alone, torch.float64, "tangent of the first input alone")


def _func_transforms(fn, primals):
    argnums = tuple(range(len(primals)))
    loss = lambda *a: fn(*a).square().sum()  # noqa: E731
    results = {"grad": torch.func.grad(loss, argnums)(*primals),
               "jacrev": torch.func.jacrev(fn, argnums)(*primals),
               "jacfwd": torch.func.jacfwd(fn, argnums)(*primals),
               "hessian": torch.func.hessian(loss, argnums[:2])(*primals)}
    stacked = [torch.stack([p, p.flip(0).cos()], 1) for p in primals]  # vmapped along dim 1
    results["vmap"] = torch.func.vmap(fn, in_dims=1)(*stacked)
    results["vmap-of-grad"] = torch.func.vmap(torch.func.grad(loss), in_dims=(1, *[None] * (len(primals) - 1)))(
        stacked[0], *primals[1:])
    return dict(torch.utils._pytree.tree_flatten_with_path(results)[0])


@pytest.mark.parametrize("name", ["na2d", "na2d_qk", "na2d_av"])
def test_torch_func_transforms_agree_with_the_reference(name, monkeypatch):
    fn, reference, primals = _derivative_problem(name, B=2)
    expected = _func_transforms(reference, primals)
    _take("plain", monkeypatch)
    actual = _func_transforms(fn, primals)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key], expected[key], torch.float64, torch.utils._pytree.keystr(key))


def test_a_tangent_the_custom_ops_would_drop_is_refused(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    fn, _, primals = _derivative_problem("na2d")
    _take("plain", monkeypatch)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(primals[0], torch.ones_like(primals[0]))
        with PassThrough(), pytest.raises(NotImplementedError, match="forward-mode AD under a dispatch mode"):
            fn(dual, *primals[1:])
        with PassThrough():
            fn(*primals)  # no tangent: nothing to refuse


def test_zero_head_dim_is_an_empty_result(device):
    q = torch.randn(1, 5, 5, 2, 0, device=device, requires_grad=True)
    y = dynconv.na2d(q, q, q, 3)
    y.sum().backward()
    assert y.shape == q.shape and q.grad.shape == q.shape


def test_rpb_tiled_kernels_are_register_capped_on_sm90():
    """With a learnt rpb the 16-bit tiled forward (D <= 64) and key-side kernel (D <= 32) are capped
    at 128 registers on sm_90 with triton 3.6 (four programs an SM), dq without one (D <= 32) at 80;
    other heads and fp32 not."""
    caps = tiled_kernels.SM90_REGISTER_CAPS
    cap = caps.get(("fwd", True), (0, 0))[0]
    assert cap == caps.get(("dkv", True), (0, 0))[0] == (128 if _launch.TRITON_VERSION <= (3, 6) else 0)
    K = 7
    for D, dtype, with_rpb, fwd_cap, dkv_cap in ((32, torch.bfloat16, True, cap, cap), (64, torch.float16, True, cap, 0),
                                                 (128, torch.bfloat16, True, 0, 0), (32, torch.bfloat16, False, 0, 0),
                                                 (32, torch.float32, True, 0, 0)):
        meta = dict(device="meta", dtype=dtype)
        q = torch.empty(2, 14, 14, 2, D, **meta)
        rpb = torch.empty(2, 2 * K - 1, 2 * K - 1, **meta) if with_rpb else None
        lse = torch.empty(2, 14, 14, 2, device="meta")
        geometry = (K, (1, 1), D ** -0.5, True)
        fwd = kernels.forward_launch(q, q, q, rpb, q, lse, *geometry)
        dkv = kernels.backward_key_launch(q, q, q, rpb, q, lse, lse, q, q, *geometry)
        assert (fwd.sm90_max_registers, dkv.sm90_max_registers) == (fwd_cap, dkv_cap), (D, dtype, with_rpb)
        assert fwd.compile_options(90).get("maxnreg") == (fwd_cap or None)
        assert "maxnreg" not in fwd.compile_options(80)
        # dq without an rpb, heads of up to 32 features: capped at 80.
        dq = kernels.backward_query_launch(q, q, q, None, q, lse, lse, q, None, *geometry)
        dq_cap = caps.get(("dq", False), (0, 0))[0] if dtype != torch.float32 and D <= 32 else 0
        assert dq.sm90_max_registers == dq_cap, (D, dtype)
