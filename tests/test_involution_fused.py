"""dynconv.involution_fused (issue 6) and the modules' fused path against float64 references.

Kernels run through the Triton interpreter on CPU (see conftest.py), fp32 and fp16 only: the
interpreter's bf16 tl.dot is wrong (docs/operators.md §4), so bf16 is checked on a GPU. Every allocation is
NaN-poisoned, so an element no program writes fails the comparison.
"""
import os

import pytest
import torch

import dynconv
import dynconv.ops.involution_fused as fused_ops
from dynconv.kernels import _launch
from dynconv.kernels import involution_fused as kernels
from dynconv.nn import DynamicDWConv2d, Involution2d
from dynconv.reference import involution_fused_reference, involution_unfold
from dynconv.ops import reference_involution_fused as reference
from helpers import assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("nan_poison")

# (B, C, H, W, K, G, R, stride, dilation): G = 16 takes the tensor-core dot for the weights and dz;
# G = 2 and G = C = 4 take the multiply-reduce dz; stride 2 with odd H; even K; dilation 2; R not
# a power of two.
CASES = [
    (2, 32, 6, 7, 3, 16, 8, 1, 1),
    (1, 32, 9, 8, 3, 2, 12, 2, 1),      # stride 2, odd H
    (1, 4, 7, 6, 4, 4, 3, 1, 2),        # G = C (inhomogeneous dynamic depth-wise), even K, dilation 2
]
# 8 and 16 channels per group: fp16 and bf16 take the tensor-core halo kernels, and fp32 does while
# torch allows tf32 in convs (the suite turns it off: fp32 takes the per-tap kernels above).
HALO_CASES = [
    (2, 32, 6, 7, 3, 2, 20, 1, 1),      # forward, dz, dspan on halo kernels (2 slabs)
    (1, 16, 9, 10, 3, 2, 12, 2, 1),     # stride 2, odd H: dx on the halo kernel over 2 x 2 input tiles
    (1, 32, 7, 6, 4, 2, 3, 1, 2),       # even K, dilation 2; 16 channels a group: dz by pairs
    (1, 16, 3, 2, 5, 2, 16, 1, 1),      # K larger than the image: every halo reaches past its edges
]
CASE_IDS = [f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}K{c[4]}G{c[5]}R{c[6]}s{c[7]}d{c[8]}" for c in CASES + HALO_CASES]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# bf16 tl.dot multiplies raw bit patterns in the interpreter (triton-lang/triton#11584): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if os.environ.get("DYNCONV_TEST_DEVICE") == "cuda" else [])


def _out(n, K, s, d):
    return (n + 2 * (d * (K - 1) // 2) - d * (K - 1) - 1) // s + 1


def _inputs(case, conv_weight=False, bias=True):
    B, C, H, W, K, G, R, s, d = case
    Ho, Wo = _out(H, K, s, d), _out(W, K, s, d)
    span_shape = (K * K * G, R, 1, 1) if conv_weight else (K * K * G, R)
    inputs = {
        "x": torch.randn(B, C, H, W, dtype=torch.float64),
        "z": torch.randn(B, R, Ho, Wo, dtype=torch.float64),
        "span_weight": torch.randn(span_shape, dtype=torch.float64) / R ** 0.5,
        "span_bias": torch.randn(K * K * G, dtype=torch.float64) if bias else None,
    }
    return inputs, dict(kernel_size=K, groups=G, stride=s, dilation=d)


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS[:len(CASES)])
def test_forward_and_every_gradient(case, dtype, fmt, device):
    inputs, geometry = _inputs(case)
    y = check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, dtype, device,
                                memory_format=FORMATS[fmt], **geometry)
    assert y.is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("case", HALO_CASES, ids=CASE_IDS[len(CASES):])
def test_halo_forward_and_every_gradient(case, dtype, fmt, device):
    inputs, geometry = _inputs(case)
    y = check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, dtype, device,
                                memory_format=FORMATS[fmt], **geometry)
    assert y.is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("case", HALO_CASES, ids=CASE_IDS[len(CASES):])
def test_fp32_halo_forward_and_every_gradient_with_tf32(case, fmt, device, monkeypatch):
    """fp32 with torch's tf32 switch on takes the halo kernels in plain tf32. A GPU rounds the
    products' operands to 10 mantissa bits (fp16's tolerance); the interpreter multiplies exactly."""
    inputs, geometry = _inputs(case)
    launched = []
    launch = _launch.Launch.__call__
    monkeypatch.setattr(_launch.Launch, "__call__", lambda self, *a, **k: (launched.append(self.name),
                                                                           launch(self, *a, **k))[1])
    tolerance = torch.float16 if device == "cuda" else torch.float32
    with _launch.conv_tf32(True):
        check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.float32,
                                device, memory_format=FORMATS[fmt], tolerance=tolerance, **geometry)
    stride = geometry["stride"]
    # fp32 forwards by pairs only where the tile-wide kernel spills (8 channels a group, newer ptxas).
    forward = "fused_fwd_halo_pairs_kernel" if kernels.forward_by_pairs(torch.empty(0), case[1] // case[5]) \
        else "fused_fwd_halo_kernel"
    span_grad = "fused_bwd_span_halo_pairs_kernel" if fmt == "nhwc" else "fused_bwd_span_halo_kernel"
    expected = {"fused_bwd_input_halo_kernel"} | (
        {forward, "fused_bwd_z_halo_kernel", span_grad} if stride == 1 else set())
    assert expected <= set(launched), launched


def test_conv_shaped_span_weight_without_bias(device):
    """The span conv's own (K²G, R, 1, 1) weight is accepted and gets its gradient in that shape."""
    inputs, geometry = _inputs(CASES[0], conv_weight=True, bias=False)
    check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.float32, device,
                            **geometry)


def test_strided_span_bias_and_weight(device):
    """Non-contiguous span_weight and span_bias (slices of wider tensors) are read through their strides."""
    inputs, geometry = _inputs(CASES[2])
    x, z, span_w, span_b = (inputs[k].float().to(device) for k in ("x", "z", "span_weight", "span_bias"))
    span_w_view = torch.randn(span_w.shape[0], 2 * span_w.shape[1], device=device)[:, ::2]
    span_b_view = torch.randn(2 * span_b.shape[0], device=device)[1::2]
    span_w_view.copy_(span_w)
    span_b_view.copy_(span_b)
    dy = torch.randn(x.shape[0], x.shape[1], *z.shape[2:], device=device)
    x.requires_grad_()
    y = dynconv.involution_fused(x, z, span_w_view, span_b_view, **geometry)
    y.backward(dy)
    x64 = x.detach().double().cpu().requires_grad_()
    expected = involution_fused_reference(x64, z.double().cpu(), span_w.double().cpu(), span_b.double().cpu(),
                                          **geometry)
    expected.backward(dy.double().cpu())
    assert_close(y, expected, torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "dx")


def test_reference_is_involution_of_the_span_conv():
    """The float64 reference itself: span conv by conv2d, aggregation by the unfold baseline."""
    inputs, geometry = _inputs(CASES[1], conv_weight=True)
    K, G, s, d = geometry["kernel_size"], geometry["groups"], geometry["stride"], geometry["dilation"]
    x, z = inputs["x"], inputs["z"]
    w = torch.nn.functional.conv2d(z, inputs["span_weight"], inputs["span_bias"])
    w = w.view(z.shape[0], G, K, K, *z.shape[2:])
    expected = involution_unfold(x, w, None, s, d * (K - 1) // 2, d)
    actual = involution_fused_reference(x, z, inputs["span_weight"], inputs["span_bias"], K, G, s, None, d)
    assert_close(actual, expected, torch.float64, "reference")


# Configurations that force every loop the default tiles skip at these sizes: R in several blocks
# (with a partial last block), a group's channels in several chunks, several group blocks, and
# the multiply-reduce for every product.
LOOP_CONFIGS = {
    "r_blocks": dict(BLOCK_G=16, BLOCK_CG=2, BLOCK_H=2, BLOCK_W=8, BLOCK_R=16),
    "cg_chunks": dict(BLOCK_G=4, BLOCK_CG=1, BLOCK_H=4, BLOCK_W=4, BLOCK_R=16),
    "multiply_reduce": dict(BLOCK_G=8, BLOCK_CG=2, BLOCK_H=2, BLOCK_W=4, BLOCK_R=8),
}


@pytest.mark.parametrize("name", LOOP_CONFIGS, ids=list(LOOP_CONFIGS))
def test_kernel_loops_with_forced_tiles(name, device):
    B, C, H, W, K, G, R, s, d = 2, 32, 7, 6, 3, 16, 20, 2, 1
    config = dict(LOOP_CONFIGS[name], num_warps=4, num_stages=1)
    geometry = ((s, s), (1, 1), (d, d))
    Ho, Wo = _out(H, K, s, d), _out(W, K, s, d)
    x = torch.randn(B, C, H, W, device=device)
    z = torch.randn(B, R, Ho, Wo, device=device)
    span_w = torch.randn(K * K * G, R, device=device) / R ** 0.5
    span_b = torch.randn(K * K * G, device=device)
    dy = torch.randn(B, C, Ho, Wo, device=device)
    dot = [kernels.uses_dot(k, config, torch.float32) for k in ("fwd", "bwd_input", "bwd_z", "bwd_span")]
    if name == "r_blocks":
        assert all(dot)
    if name == "multiply_reduce":
        assert not any(dot)
    y = torch.empty(B, C, Ho, Wo, device=device)
    kernels.involution_fused_forward(x, z, span_w, span_b, y, K, *geometry, config=config)
    assert_close(y, reference.involution_fused_reference(x.double(), z.double(), span_w.double(), span_b.double(),
                                                         K, G, s, 1, d), torch.float32, "y")
    dx = torch.empty_like(x)
    kernels.involution_fused_backward_input(dy, z, span_w, span_b, dx, K, *geometry, config=config)
    assert_close(dx, reference.fused_backward_input(dy.double(), z.double(), span_w.double(), span_b.double(), K,
                                                    (H, W), *geometry), torch.float32, "dx")
    dz = torch.empty_like(z)
    kernels.involution_fused_backward_z(dy, x, span_w, dz, K, *geometry, config=config)
    assert_close(dz, reference.fused_backward_z(dy.double(), x.double(), span_w.double(), K, *geometry),
                 torch.float32, "dz")
    dspan, dbias = torch.empty_like(span_w), torch.empty_like(span_b)
    kernels.involution_fused_backward_span(dy, x, z, dspan, dbias, K, *geometry, config=config)
    ref_span, ref_bias = reference.fused_backward_span(dy.double(), x.double(), z.double(), K, G, *geometry)
    assert_close(dspan, ref_span, torch.float32, "dspan")
    assert_close(dbias, ref_bias, torch.float32, "dbias")


def test_span_gradient_is_deterministic_and_split_into_slabs(device):
    inputs, geometry = _inputs(CASES[0])
    K, G, R = geometry["kernel_size"], geometry["groups"], inputs["z"].shape[1]
    x, z = inputs["x"].float().to(device), inputs["z"].float().to(device)
    dy = torch.randn(x.shape[0], x.shape[1], *z.shape[2:], device=device)
    config = kernels.span_grad_config(x, G, K, R, (1, 1), *z.shape[2:])
    slabs, _ = kernels.span_grad_slabs(x.shape[0], *z.shape[2:], K, G, R, config)
    assert slabs > 1, "the two-stage reduction is not exercised at this shape"
    results = []
    for _ in range(2):
        dspan = torch.empty(K * K * G, R, device=device)
        dbias = torch.empty(K * K * G, device=device)
        kernels.involution_fused_backward_span(dy, x, z, dspan, dbias, K, (1, 1), (1, 1), (1, 1))
        results.append((dspan, dbias))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype, expected", [
    (torch.float16, "fused_bwd_span_halo_pairs_kernel"),  # by pairs of pixel rows, on copies of x and z
    (torch.float32, "fused_bwd_span_halo_kernel"),        # fp32 NCHW: the tile-wide logits
])
def test_halo_span_gradient_is_deterministic_over_slabs(dtype, expected, device):
    """The tensor-core halo kernels: dS and dβ from per-(group, slab) partials, bitwise repeatable,
    and equal to the float64 reference; the launches are the halo kernels."""
    B, C, H, W, K, G, R = HALO_CASES[0][:7]
    x, z = torch.randn(B, C, H, W, device=device).to(dtype), torch.randn(B, R, H, W, device=device).to(dtype)
    dy = torch.randn(B, C, H, W, device=device).to(dtype)
    g = ((1, 1), (1, 1), (1, 1))
    results = []
    with _launch.conv_tf32(True):
        config = kernels.span_grad_config(x, G, K, R, (1, 1), H, W)
        slabs = kernels.span_grad_slabs(B, H, W, K, G, R, config)[0]
        assert config.get("HALO") and slabs > 1
        reads = ((x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last))
                 if kernels.span_grad_copies_inputs(x, G, R, K, (1, 1), (1, 1)) else (x, z))
        partials = torch.empty(slabs, K * K * G, R, device=device), torch.empty(slabs, K * K * G, device=device)
        assert kernels.backward_span_launch(dy, *reads, *partials, K, *g).name == expected
        for _ in range(2):
            dspan = torch.empty(K * K * G, R, device=device, dtype=dtype)
            dbias = torch.empty(K * K * G, device=device, dtype=dtype)
            kernels.involution_fused_backward_span(dy, x, z, dspan, dbias, K, *g)
            results.append((dspan, dbias))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref_span, ref_bias = reference.fused_backward_span(dy.double(), x.double(), z.double(), K, G, *g)
    # tf32 on a GPU rounds fp32's operands to fp16's mantissa; the interpreter multiplies exactly.
    assert_close(results[0][0], ref_span, torch.float16, "dspan")
    assert_close(results[0][1], ref_bias, torch.float16, "dbias")


STAGED_AT_16 = 3 if kernels.SPAN_PAIRS_STAGED_CHANNELS >= 16 else 1  # triton 3.6; sm_80 spills newer ones


@pytest.mark.parametrize("dtype, channels_last, channels, expected, stages", [
    (torch.float16, True, 16, "fused_bwd_span_halo_pairs_kernel", STAGED_AT_16),
    (torch.bfloat16, True, 8, "fused_bwd_span_halo_pairs_kernel", 3),
    (torch.bfloat16, True, 32, "fused_bwd_span_halo_pairs_kernel", 1),  # three stages spill on sm_80
    (torch.bfloat16, False, 16, "fused_bwd_span_halo_pairs_kernel", 1),
    (torch.float16, False, 32, "fused_bwd_span_halo_kernel", 1),        # the pairs spill (newer ptxas)
    (torch.float32, True, 32, "fused_bwd_span_halo_pairs_kernel", 2),
    (torch.float32, False, 16, "fused_bwd_span_halo_kernel", 1),        # the pairs spill (sm_80)
])
def test_span_gradient_kernel_and_stages_by_dtype_layout_and_channels(dtype, channels_last, channels, expected,
                                                                     stages):
    B, G, H, K, R = 2, 2, 9, 5, 20
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(B, channels * G, H, H, **meta).to(memory_format=fmt)
    z = torch.empty(B, R, H, H, **meta).to(memory_format=fmt)
    g = ((1, 1), (2, 2), (1, 1))
    with _launch.conv_tf32(True):
        config = kernels.span_grad_config(x, G, K, R, (1, 1), H, H)
        slabs = kernels.span_grad_slabs(B, H, H, K, G, R, config)[0]
        partials = (torch.empty(slabs, K * K * G, R, device="meta"), torch.empty(slabs, K * K * G, device="meta"))
        launch = kernels.backward_span_launch(x, x, z, *partials, K, *g)
    assert (launch.name, launch.num_stages) == (expected, stages)
    assert launch.num_warps == (4 if "pairs" in expected else 8)


@pytest.mark.parametrize("dtype, K, stride, tf32, expected", [
    (torch.float16, 7, 1, False, "fused_bwd_input_halo_kernel"),    # RedNet's stride-1 layer: the halo kernel
    (torch.bfloat16, 3, 2, False, "fused_bwd_input_halo_kernel"),
    (torch.float16, 9, 1, False, "fused_bwd_input_kernel"),         # a 32 x 32 halo: per tap
    (torch.float32, 7, 1, False, "fused_bwd_input_kernel"),         # tf32 off (the suite's setting): tf32x3
    (torch.float32, 7, 1, True, "fused_bwd_input_halo_kernel"),     # torch's default
])
def test_input_gradient_takes_the_halo_kernel_where_it_fits(dtype, K, stride, tf32, expected):
    B, C, H, G, R = 2, 64, 16, 4, 16
    Ho = (H + 2 * ((K - 1) // 2) - K) // stride + 1
    meta = dict(device="meta", dtype=dtype)
    dy, z = torch.empty(B, C, Ho, Ho, **meta), torch.empty(B, R, Ho, Ho, **meta)
    span_w, span_b = torch.empty(K * K * G, R, **meta), torch.empty(K * K * G, **meta)
    dx = torch.empty(B, C, H, H, **meta)
    g = ((stride, stride), ((K - 1) // 2,) * 2, (1, 1))
    with _launch.conv_tf32(tf32):
        assert kernels.backward_input_launch(dy, z, span_w, span_b, dx, K, *g).name == expected


def test_16_bit_nchw_forward_reads_a_channels_last_copy(device, monkeypatch):
    """fp16/bf16 NCHW x on the halo kernel: the forward copies x to channels_last and the halo
    kernel reads the copy, writing NCHW y, against float64; fp32 and channels_last read x as it is."""
    inputs, geometry = _inputs(HALO_CASES[0])
    read = []
    launch = _launch.Launch.__call__
    monkeypatch.setattr(_launch.Launch, "__call__", lambda self, *a, **k: (
        read.append((self.name, self.args["x_ptr"].is_contiguous(memory_format=torch.channels_last)
                   if self.name == "fused_fwd_halo_pairs_kernel" else None)),
        launch(self, *a, **k))[1])
    y = check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.float16, device,
                                memory_format=torch.contiguous_format, **geometry)
    assert y.is_contiguous()
    assert read[:2] == [("channels_last_copy_kernel", None), ("fused_fwd_halo_pairs_kernel", True)], read
    K, s, d = geometry["kernel_size"], (geometry["stride"],) * 2, (geometry["dilation"],) * 2
    meta = dict(device="meta")
    x16, span16 = torch.empty(2, 32, 6, 7, dtype=torch.float16, **meta), torch.empty(18, 20, dtype=torch.float16, **meta)
    assert kernels.forward_copies_input(x16, span16, 20, K, s, d)
    assert not kernels.forward_copies_input(x16.to(memory_format=torch.channels_last), span16, 20, K, s, d)
    assert not kernels.forward_copies_input(x16, span16, 20, K, s, d, config={"BLOCK_G": 1})
    with _launch.conv_tf32(True):
        assert not kernels.forward_copies_input(x16.float(), span16.float(), 20, K, s, d)


def test_16_bit_nchw_span_gradient_reads_channels_last_copies(device, monkeypatch):
    """fp16/bf16 NCHW x on the halo path: dspan copies x and z to channels_last and the pairs
    kernel reads the copies (dy as it is), against float64; fp32 and channels_last read them as
    they are."""
    inputs, geometry = _inputs(HALO_CASES[0])
    read = []
    launch = _launch.Launch.__call__

    def layouts(self):
        names = ("x_ptr", "z_ptr", "dy_ptr")
        return tuple(self.args[n].is_contiguous(memory_format=torch.channels_last) for n in names)

    monkeypatch.setattr(_launch.Launch, "__call__", lambda self, *a, **k: (
        read.append((self.name, layouts(self) if "span" in self.name else None)), launch(self, *a, **k))[1])
    check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.float16, device,
                            memory_format=torch.contiguous_format, **geometry)
    span = [i for i, (name, _) in enumerate(read) if "span" in name]
    assert len(span) == 1 and read[span[0]] == ("fused_bwd_span_halo_pairs_kernel", (True, True, False)), read
    assert [name for name, _ in read[span[0] - 2:span[0]]] == ["channels_last_copy_kernel"] * 2, read
    B, C, H, W, K, G, R = HALO_CASES[0][:7]
    x16 = torch.empty(B, C, H, W, dtype=torch.float16, device="meta")
    s, d = (1, 1), (1, 1)
    assert kernels.span_grad_copies_inputs(x16, G, R, K, s, d)
    assert not kernels.span_grad_copies_inputs(x16.to(memory_format=torch.channels_last), G, R, K, s, d)
    assert not kernels.span_grad_copies_inputs(x16, G, R, K, s, d, config={"BLOCK_G": 1})
    with _launch.conv_tf32(True):
        assert not kernels.span_grad_copies_inputs(x16.float(), G, R, K, s, d)


@pytest.mark.parametrize("dtype, channels_last, expected", [
    (torch.float16, True, "fused_bwd_z_halo_pairs_kernel"),
    (torch.bfloat16, False, "fused_bwd_z_halo_kernel"),     # 16-bit NCHW: the tile-wide logits
    (torch.bfloat16, True, "fused_bwd_z_halo_pairs_kernel"),
    (torch.float32, True, "fused_bwd_z_halo_kernel"),       # fp32 (tf32): ptxas spills the pairs kernel
])
def test_dz_takes_the_pairs_kernel_in_16_bit_channels_last_at_16_channels(dtype, channels_last, expected):
    B, C, H, K, G, R = 2, 32, 9, 3, 2, 20
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(B, C, H, H, **meta).to(memory_format=fmt)
    z = torch.empty(B, R, H, H, **meta).to(memory_format=fmt)
    with _launch.conv_tf32(True):
        launch = kernels.backward_z_launch(x, x, torch.empty(K * K * G, R, **meta), z, K, (1, 1), (1, 1), (1, 1))
    assert launch.name == expected
    assert launch.num_stages == (1 if expected == "fused_bwd_z_halo_kernel" else 3)
    with _launch.conv_tf32(True):  # 8 channels a group: the pairs kernel spills there (K 5-7)
        eight = kernels.backward_z_launch(x, x, torch.empty(K * K * 2 * G, R, **meta), z, K, (1, 1), (1, 1), (1, 1))
    assert eight.name == "fused_bwd_z_halo_kernel"


def _halo_launches(case, fmt, device):
    """fp16 inputs of HALO_CASES[case] in ``fmt`` and, per launcher, fresh NaN-filled outputs and the
    launch that writes them: (x, groups, stride, {launcher: (outputs, build)})."""
    inputs, geometry = _inputs(HALO_CASES[case])
    K, s, d, G = geometry["kernel_size"], geometry["stride"], geometry["dilation"], geometry["groups"]
    x, z = (inputs[n].half().to(device).contiguous(memory_format=fmt) for n in ("x", "z"))
    span_w, span_b = inputs["span_weight"].half().to(device), inputs["span_bias"].half().to(device)
    dy = torch.randn(x.shape[0], x.shape[1], *z.shape[2:], device=device).half().contiguous(memory_format=fmt)
    g = ((s, s), (d * (K - 1) // 2,) * 2, (d, d))
    R = z.shape[1]
    slabs = kernels.span_grad_slabs(x.shape[0], *z.shape[2:], K, G, R,
                                    kernels.span_grad_config(x, G, K, R, (s, s), *z.shape[2:], dilation=(d, d)))[0]

    def nan(shape, dtype=torch.float16):
        out = torch.full(shape, float("nan"), device=device, dtype=dtype)
        return out.contiguous(memory_format=fmt) if len(shape) == 4 else out

    return x, G, s, {
        "fwd": (lambda: [nan(dy.shape)], lambda out: kernels.forward_launch(x, z, span_w, span_b, *out, K, *g)),
        "bwd_input": (lambda: [nan(x.shape)],
                      lambda out: kernels.backward_input_launch(dy, z, span_w, span_b, *out, K, *g)),
        "bwd_z": (lambda: [nan(z.shape)], lambda out: kernels.backward_z_launch(dy, x, span_w, *out, K, *g)),
        "bwd_span": (lambda: [nan((slabs, K * K * G, R), torch.float32), nan((slabs, K * K * G), torch.float32)],
                     lambda out: kernels.backward_span_launch(dy, x, z, *out, K, *g)),
    }


def _outputs_by_meta(outputs, build, name, values):
    """The outputs of ``build``'s launch run once per value of meta-parameter ``name``, each on fresh ones."""
    results = []
    for value in values:
        out = outputs()
        launch = build(out)
        launch.meta[name] = value
        launch()
        results.append(out)
    return results


@pytest.mark.parametrize("case", [0, 1], ids=["s1", "s2"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_halo_int64_indexing_variant_matches(case, fmt, device):
    """The halo kernels' INDEX_64 code path computes the same values (stride 1: fwd, dx, dz and dspan;
    stride 2: dx)."""
    _, _, s, launches = _halo_launches(case, FORMATS[fmt], device)
    ran = 0
    for name, (outputs, build) in launches.items():
        if "halo" not in build(outputs()).name:
            continue
        results = _outputs_by_meta(outputs, build, "INDEX_64", (False, True))
        assert all(torch.equal(a, b) for a, b in zip(*results)), name
        ran += 1
    assert ran == (4 if s == 1 else 1)


# The kernels with a PACKED variant, where their launchers run them.
PACKED_KERNELS = {"bwd_input": "fused_bwd_input_halo_kernel", "bwd_z": "fused_bwd_z_halo_pairs_kernel",
                  "bwd_span": "fused_bwd_span_halo_pairs_kernel"}


@pytest.mark.parametrize("case", [0, 1, 2, 3], ids=["s1", "s2", "K4d2", "K5"])
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_packed_gathers_match_plain(case, fmt, device):
    """The 16-bit gathers on pairs packed in 32-bit words (PACKED: the input gradient's on triton
    3.6, the pairs kernels' dz and dspan everywhere) move the same values as plain 16-bit gathers:
    the same outputs, bit for bit, every element written."""
    fmt = FORMATS[fmt]
    x, G, s, launches = _halo_launches(case, fmt, device)
    ran = []
    for launcher, name in PACKED_KERNELS.items():
        outputs, build = launches[launcher]
        if build(outputs()).name != name:
            continue
        results = _outputs_by_meta(outputs, build, "PACKED", (False, True))
        for plain, packed in zip(*results):
            if plain.dim() == 4:
                assert not plain.isnan().any(), name
            assert torch.equal(plain, packed), name
        ran.append(name)
    assert "fused_bwd_input_halo_kernel" in ran
    assert ("fused_bwd_span_halo_pairs_kernel" in ran) == (s == 1)
    dz_pairs = s == 1 and fmt == torch.channels_last and x.shape[1] // G == kernels.DZ_PAIRS_CHANNELS
    assert ("fused_bwd_z_halo_pairs_kernel" in ran) == dz_pairs


def test_int64_indexing_variant_matches(device):
    """The INDEX_64 code path (chosen past 2^31 elements) computes the same values in every kernel."""
    inputs, geometry = _inputs(CASES[1])
    K, s = geometry["kernel_size"], geometry["stride"]
    x, z = inputs["x"].float().to(device), inputs["z"].float().to(device)
    span_w, span_b = inputs["span_weight"].float().to(device), inputs["span_bias"].float().to(device)
    dy = torch.randn(x.shape[0], x.shape[1], *z.shape[2:], device=device)
    G = span_w.shape[0] // (K * K)
    geometry = ((s, s), (1, 1), (1, 1))
    partials = lambda: (torch.zeros(kernels.span_grad_slabs(x.shape[0], *z.shape[2:], K, G, z.shape[1],  # noqa: E731
                                                            kernels.span_grad_config(x, G, K, z.shape[1], (s, s),
                                                                                     *z.shape[2:]))[0],
                                    K * K * G, z.shape[1], device=device),
                        torch.zeros(1, device=device))
    builders = {
        "fwd": lambda out: kernels.forward_launch(x, z, span_w, span_b, out, K, *geometry),
        "bwd_input": lambda out: kernels.backward_input_launch(dy, z, span_w, span_b, out, K, *geometry),
        "bwd_z": lambda out: kernels.backward_z_launch(dy, x, span_w, out, K, *geometry),
    }
    shapes = {"fwd": dy.shape, "bwd_input": x.shape, "bwd_z": z.shape}
    for name, build in builders.items():
        outs = []
        for index_64 in (False, True):
            out = torch.empty(shapes[name], device=device)
            launch = build(out)
            assert not launch.meta["INDEX_64"]
            launch.meta["INDEX_64"] = index_64
            launch()
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), name
    outs = []
    for index_64 in (False, True):
        dspan, _ = partials()
        dbias = torch.zeros(dspan.shape[:2], device=device)
        launch = kernels.backward_span_launch(dy, x, z, dspan, dbias, K, *geometry)
        launch.meta["INDEX_64"] = index_64
        launch()
        outs.append((dspan, dbias))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "bwd_span"


def test_int64_indexing_is_chosen_past_int32():
    big = torch.empty((2304, 256, 64, 64), device="meta")  # 2^31 + 2^28 elements
    z = torch.empty((2304, 64, 64, 64), device="meta")
    span_w = torch.empty((9 * 16, 64), device="meta")
    assert kernels.forward_launch(big, z, span_w, None, big, 3, (1, 1), (1, 1), (1, 1)).meta["INDEX_64"]
    small = torch.empty((2, 256, 64, 64), device="meta")
    assert not kernels.forward_launch(small, z[:2], span_w, None, small, 3, (1, 1), (1, 1), (1, 1)).meta["INDEX_64"]


def test_cpu_path_without_interpreter_matches(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take span conv + shift-and-add: same values and gradients."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    for name in ("forward_launch", "backward_input_launch", "backward_z_launch", "backward_span_launch"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("Triton kernel ran on the CPU path"))
    inputs, geometry = _inputs(CASES[1])
    check_against_reference(dynconv.involution_fused, involution_fused_reference, inputs, torch.float32,
                            memory_format=torch.channels_last, **geometry)


def test_only_the_requested_gradients_are_computed(device, monkeypatch):
    inputs, geometry = _inputs(CASES[0])
    for name in ("backward_input_launch", "backward_span_launch"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("a gradient that was not requested ran"))
    x = inputs["x"].float().to(device)
    z = inputs["z"].float().to(device).requires_grad_()
    span_w, span_b = inputs["span_weight"].float().to(device), inputs["span_bias"].float().to(device)
    dynconv.involution_fused(x, z, span_w, span_b, **geometry).sum().backward()
    assert z.grad is not None


# ---------------------------------------------------------------------------------------------
# Modules: fused and unfused paths are one function of the same parameters.
# ---------------------------------------------------------------------------------------------

def _compare_fused_and_unfused(make, x, dtype=torch.float32):
    torch.manual_seed(1)
    unfused = make(False).to(dtype)
    fused = make(True).to(dtype)
    fused.load_state_dict(unfused.state_dict())
    outputs = []
    for module in (unfused, fused):
        xi = x.to(dtype).detach().requires_grad_()
        y = module(xi)
        y.backward(torch.ones_like(y))
        outputs.append((y, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outputs
    assert_close(y1, y0.double(), dtype, "y")
    assert_close(dx1, dx0.double(), dtype, "dx")
    for name in g0:
        assert_close(g1[name], g0[name].double(), dtype, f"grad {name}")


@pytest.mark.parametrize("stride, H, fmt", [(1, 6, "nchw"), (2, 7, "nhwc")], ids=["s1", "s2-oddH-nhwc"])
def test_involution2d_fused_matches_unfused(stride, H, fmt, device):
    x = torch.randn(2, 32, H, 6, device=device).contiguous(memory_format=FORMATS[fmt])
    _compare_fused_and_unfused(
        lambda fused: Involution2d(32, kernel_size=3, stride=stride, group_channels=2, reduction_ratio=2,
                                   fused=fused).to(device), x)


def test_inhomogeneous_dynamic_dwconv2d_fused_matches_unfused(device):
    x = torch.randn(2, 8, 7, 5, device=device)
    _compare_fused_and_unfused(
        lambda fused: DynamicDWConv2d(8, kernel_size=3, stride=2, reduction_ratio=2, homogeneous=False,
                                      fused=fused).to(device), x)


def test_fused_default_is_cuda_only(monkeypatch):
    calls = []
    # The forward body both the custom op and the eager path run.
    monkeypatch.setattr(fused_ops, "_forward", lambda *a: calls.append(a) or pytest.fail("fused on CPU"))
    layer = Involution2d(8, kernel_size=3, group_channels=4)
    assert layer.fused is None
    layer(torch.randn(1, 8, 5, 5))
    assert Involution2d(8, 3, 1, 4).fused is None  # the old positional signature still constructs
    assert not calls
    with pytest.raises(ValueError, match="homogeneous"):
        DynamicDWConv2d(8, homogeneous=True, fused=True)


# ---------------------------------------------------------------------------------------------
# Bad inputs are named before any kernel runs; torch.library and torch.compile integration.
# ---------------------------------------------------------------------------------------------

def _bad(**changes):
    inputs, geometry = _inputs(CASES[0])
    args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in {**inputs, **geometry}.items()}
    args.update(changes)
    return args


BAD_INPUTS = [
    (ValueError, "rows", dict(groups=8)),
    (ValueError, "z has 4 channels", dict(z=torch.randn(2, 4, 6, 7))),
    (ValueError, "output size", dict(z=torch.randn(2, 8, 5, 7))),
    (ValueError, "batch mismatch", dict(z=torch.randn(1, 8, 6, 7))),
    (ValueError, "divisible", dict(x=torch.randn(2, 24, 6, 7))),
    (ValueError, "span_bias", dict(span_bias=torch.randn(5))),
    (ValueError, "1x1", dict(span_weight=torch.randn(144, 8, 3, 3))),
    (ValueError, "x must be 4-D", dict(x=torch.randn(32, 6, 7))),
    (ValueError, "kernel_size must be >= 1", dict(kernel_size=0)),
    (ValueError, "stride", dict(stride=0)),
    (TypeError, "kernel_size must be an int", dict(kernel_size=3.0)),
    (TypeError, "groups must be an int", dict(groups=None)),
    (TypeError, "same dtype", dict(z=torch.randn(2, 8, 6, 7, dtype=torch.float64))),
    (TypeError, "float16, bfloat16", dict(x=torch.ones(2, 32, 6, 7, dtype=torch.int32))),
    (TypeError, "span_weight must be a torch.Tensor", dict(span_weight=[1.0])),
]


@pytest.mark.parametrize("error, match, changes", BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
def test_bad_inputs_are_named(error, match, changes, monkeypatch):
    for name in ("forward_launch", "involution_fused_forward"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    with pytest.raises(error, match=match):
        dynconv.involution_fused(**_bad(**changes))


def test_opcheck(device):
    inputs, geometry = _inputs(CASES[1])
    K, s = geometry["kernel_size"], geometry["stride"]
    args = (inputs["x"].float().to(device).requires_grad_(), inputs["z"].float().to(device).requires_grad_(),
            inputs["span_weight"].float().to(device).requires_grad_(),
            inputs["span_bias"].float().to(device).requires_grad_(), K, [s, s], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.dynconv.involution_fused.default, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    layer = Involution2d(32, kernel_size=3, group_channels=2, reduction_ratio=2, fused=True).to(device)
    x = torch.randn(1, 32, 5, 6, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    dx, dspan = x.grad.clone(), layer.span.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    assert_close(y, y_eager.double(), torch.float32, "y")
    assert_close(dx, x.grad.double(), torch.float32, "dx")
    assert_close(dspan, layer.span.weight.grad.double(), torch.float32, "dspan")
