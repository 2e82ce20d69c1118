"""Launch plans (kernels/_launch.planned): one problem's launch is built once, then only its tensors
change. A plan reused across layouts, strides or dtypes would read the wrong elements, so each
call here is checked against the reference with NaN-poisoned outputs."""
import pytest
import torch

import dynconv
from dynconv.kernels import _launch, configs
from dynconv.kernels import involution as kernels
from dynconv.kernels import expert_conv as expert
from dynconv.kernels import expert_conv_guide as expert_guide
from dynconv.kernels import expert_conv_input_grad as expert_input_grad
from dynconv.kernels import expert_conv_weight_grad as expert_weight_grad
from dynconv.kernels import involution_fused as fused
from dynconv.kernels.region_tables import region_tables
from dynconv.reference import expert_conv2d_loop, involution_fused_reference, involution_unfold
from helpers import assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("nan_poison", "fresh_plans")


@pytest.fixture
def fresh_plans():
    # Plans made under a patched config lookup must not reach other tests.
    configs.clear_cache()
    yield
    configs.clear_cache()

GEOMETRY = dict(stride=1, padding=1, dilation=1)


def _layouts(x: torch.Tensor):
    """The same shape as NCHW, channels_last, and an (N, H, C, W) view: dense, so the dtype cast in
    check_against_reference keeps its strides."""
    yield "nchw", x.contiguous()
    yield "nhwc", x.contiguous(memory_format=torch.channels_last)
    yield "nhcw", x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


def test_plans_follow_layout_stride_and_dtype(device):
    B, C, H, W, K, G = 2, 8, 6, 7, 3, 2
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    w = torch.randn(B, G, K, K, H, W, dtype=torch.float64)
    seen = set()

    def involution(x, weight, **geometry):
        seen.add((x.dtype, x.stride()))
        return dynconv.involution(x, weight, **geometry)

    for dtype in (torch.float32, torch.float16):
        for _, xx in _layouts(x):
            check_against_reference(involution, involution_unfold, {"x": xx, "weight": w}, dtype, device, **GEOMETRY)
    assert len(seen) == 6
    if _launch.kernels_are_interpreted() or device != "cpu":
        # One plan per layout and dtype: none was shared.
        assert len([key for key in _launch._plans if key[0][0] == "involution_fwd"]) == 6


def test_plan_launch_matches_a_fresh_build():
    x = torch.randn(2, 8, 6, 7)
    w = torch.randn(2, 2, 3, 3, 6, 7)
    geometry = ((1, 1), (1, 1), (1, 1))
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx = x.contiguous(memory_format=fmt)
        y = torch.empty_like(xx)
        first = kernels.forward_launch(xx, w, None, y, *geometry)
        other_x, other_y = torch.randn_like(xx), torch.empty_like(y)
        again = kernels.forward_launch(other_x, w, None, other_y, *geometry)
        fresh = kernels._forward_launch(other_x, w, None, other_y, *geometry)
        assert again.args["x_ptr"] is other_x and again.args["y_ptr"] is other_y
        assert (again.grid, again.meta, again.num_warps, again.num_stages) == \
            (fresh.grid, fresh.meta, fresh.num_warps, fresh.num_stages)
        assert again.args == fresh.args and first.args.keys() == fresh.args.keys()


def _simulated_gpu(monkeypatch, tmp_path, tune):
    """An H100 with no config files, whose run-time tuning answers ``tune()``."""
    monkeypatch.setattr(configs, "_active_device", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(configs, "config_dirs", lambda: [tmp_path])
    monkeypatch.setattr(configs, "_tune_at_run_time", lambda *a: tune())


@pytest.mark.filterwarnings("ignore::UserWarning")  # "timing candidates at run time"
def test_clearing_configs_clears_plans(monkeypatch, tmp_path):
    # K = 15: the generic kernel, whose tile the simulated tables below answer (the NCHW kernels of
    # involution_nchw.py take K <= 13 and tiles of their own)
    x = torch.randn(2, 8, 6, 7)
    w = torch.randn(2, 2, 15, 15, 6, 7)
    geometry = ((1, 1), (7, 7), (1, 1))
    kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry)
    assert _launch._plans
    configs.clear_cache()
    assert not _launch._plans
    # A config answered for another GPU is another plan, and a new config after a clear is used.
    tuned = {"BLOCK_G": 1, "BLOCK_CG": 2, "BLOCK_H": 2, "BLOCK_W": 4, "num_warps": 1, "num_stages": 1}
    _simulated_gpu(monkeypatch, tmp_path, lambda: dict(tuned))
    launch = kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry)
    assert launch.meta["BLOCK_W"] == 4 and launch.num_warps == 1
    tuned["BLOCK_W"] = 8
    assert kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry).meta["BLOCK_W"] == 4
    configs.clear_cache()
    assert kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry).meta["BLOCK_W"] == 8


def test_a_provisional_config_is_not_remembered(monkeypatch, tmp_path):
    x = torch.randn(2, 8, 6, 7)
    w = torch.randn(2, 2, 3, 3, 6, 7)
    geometry = ((1, 1), (1, 1), (1, 1))

    def capturing():  # a CUDA graph is being captured: the default stands in this once
        raise configs._NotNow

    _simulated_gpu(monkeypatch, tmp_path, capturing)
    kernels.forward_launch(x, w, None, torch.empty_like(x), *geometry)
    assert not _launch._plans


def test_meta_tensors_build_afresh():
    x = torch.empty(2, 8, 6, 7, device="meta")
    w = torch.empty(2, 2, 3, 3, 6, 7, device="meta")
    kernels.forward_launch(x, w, None, x, (1, 1), (1, 1), (1, 1))
    assert not _launch._plans


# ---------------------------------------------------------------------------------------------
# involution_fused: fwd, bwd_input, bwd_z and bwd_span launchers
# ---------------------------------------------------------------------------------------------

def _fused_inputs(B=2, C=8, H=6, W=7, K=3, G=2, R=5, bias=True):
    return {
        "x": torch.randn(B, C, H, W, dtype=torch.float64),
        "z": torch.randn(B, R, H, W, dtype=torch.float64),
        "span_weight": torch.randn(K * K * G, R, dtype=torch.float64) / R ** 0.5,
        "span_bias": torch.randn(K * K * G, dtype=torch.float64) if bias else None,
    }, dict(kernel_size=K, groups=G, stride=1, dilation=1)


def _fused_plans(kind):
    return [key for key in _launch._plans if key[0][0] == f"involution_fused_{kind}"]


def test_fused_plans_follow_layout_stride_dtype_and_bias(device):
    inputs, geometry = _fused_inputs()
    seen = set()

    def involution_fused(x, z, span_weight, span_bias, **geometry):
        seen.add((x.dtype, x.stride(), z.stride(), span_bias is None))
        return dynconv.involution_fused(x, z, span_weight, span_bias, **geometry)

    for dtype in (torch.float32, torch.float16):
        for (_, xx), (_, zz) in zip(_layouts(inputs["x"]), _layouts(inputs["z"])):
            check_against_reference(involution_fused, involution_fused_reference,
                                    {**inputs, "x": xx, "z": zz}, dtype, device, **geometry)
    # The same problem without a bias is another plan (HAS_BIAS), with the bias argument None.
    check_against_reference(involution_fused, involution_fused_reference, {**inputs, "span_bias": None},
                            torch.float32, device, **geometry)
    assert len(seen) == 7
    if _launch.kernels_are_interpreted() or device != "cpu":
        # One plan per layout, dtype and bias for each launcher that takes the bias: none was shared.
        for kind in ("fwd", "bwd_input"):
            assert len(_fused_plans(kind)) == 7, kind
        assert len(_fused_plans("bwd_z")) == len(_fused_plans("bwd_span")) == 6


def test_fused_plans_follow_strided_span_weights(device):
    """A span weight and bias read through strides (slices of wider tensors) are other plans."""
    inputs, geometry = _fused_inputs()
    x, z, span_w, span_b = (inputs[k].float().to(device) for k in ("x", "z", "span_weight", "span_bias"))
    span_w_view = torch.randn(span_w.shape[0], 2 * span_w.shape[1], device=device)[:, ::2]
    span_b_view = torch.randn(2 * span_b.shape[0], device=device)[1::2]
    span_w_view.copy_(span_w)
    span_b_view.copy_(span_b)
    expected = involution_fused_reference(x.double().cpu(), z.double().cpu(), span_w.double().cpu(),
                                          span_b.double().cpu(), **geometry)
    for w, b in ((span_w, span_b), (span_w_view, span_b_view), (span_w, span_b)):
        assert_close(dynconv.involution_fused(x, z, w, b, **geometry), expected, torch.float32, "y")
    if _launch.kernels_are_interpreted() or device != "cpu":
        assert len(_fused_plans("fwd")) == 2


def _fused_launch_args(fmt, dtype=torch.float32):
    B, C, H, W, K, G, R = 2, 8, 6, 7, 3, 2, 5
    x = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
    z = torch.randn(B, R, H, W, dtype=dtype).contiguous(memory_format=fmt)
    span_w = torch.randn(K * K * G, R, dtype=dtype)
    span_b = torch.randn(K * K * G, dtype=dtype)
    geometry = ((1, 1), (1, 1), (1, 1))
    config = fused.span_grad_config(x, G, K, R, (1, 1), H, W)
    slabs, _ = fused.span_grad_slabs(B, H, W, K, G, R, config)
    partials = torch.empty(slabs, K * K * G, R)
    bias_partials = torch.empty(slabs, K * K * G)
    return {
        "forward_launch": (lambda t: (t["x"], t["z"], t["w"], t["b"], t["y"], K, *geometry), ("x_ptr", "y_ptr")),
        "backward_input_launch": (lambda t: (t["y"], t["z"], t["w"], t["b"], t["x"], K, *geometry),
                                  ("dy_ptr", "dx_ptr")),
        "backward_z_launch": (lambda t: (t["y"], t["x"], t["w"], t["z"], K, *geometry), ("dy_ptr", "dz_ptr")),
        "backward_span_launch": (lambda t: (t["y"], t["x"], t["z"], t["p"], t["pb"], K, *geometry, config),
                                 ("dy_ptr", "dspan_ptr")),
    }, dict(x=x, z=z, w=span_w, b=span_b, y=torch.empty_like(x), p=partials, pb=bias_partials)


@pytest.mark.parametrize("launcher", ["forward_launch", "backward_input_launch", "backward_z_launch",
                                      "backward_span_launch"])
def test_fused_plan_launch_matches_a_fresh_build(launcher):
    for fmt in (torch.contiguous_format, torch.channels_last):
        launchers, tensors = _fused_launch_args(fmt)
        make_args, watched = launchers[launcher]
        first = getattr(fused, launcher)(*make_args(tensors))
        others = {k: torch.empty_like(v) for k, v in tensors.items()}
        again = getattr(fused, launcher)(*make_args(others))
        fresh = getattr(fused, "_" + launcher)(*make_args(others))
        for name in watched:
            assert again.args[name] is fresh.args[name]
        assert again.args[watched[0]] is not first.args[watched[0]]
        assert (again.kernel, again.grid, again.meta, again.num_warps, again.num_stages) == \
            (fresh.kernel, fresh.grid, fresh.meta, fresh.num_warps, fresh.num_stages)
        assert again.args == fresh.args and first.args.keys() == fresh.args.keys()


def _two_group_span(K, R):
    return torch.randn(2 * K * K, R, dtype=torch.bfloat16), torch.randn(2 * K * K, dtype=torch.bfloat16)


def test_register_cap_is_an_sm90_option_a_plan_keeps():
    """The halo input gradient's register cap (triton <= 3.6, 16 channels a group) reaches ptxas only
    for sm_90, and a launch rebuilt from its plan keeps it."""
    B, C, H, W, K, G, R = 1, 16, 6, 7, 3, 1, 5
    dy = torch.randn(B, C, H, W, dtype=torch.bfloat16)
    z = torch.randn(B, R, H, W, dtype=torch.bfloat16)
    span_w, span_b = torch.randn(K * K * G, R, dtype=torch.bfloat16), torch.randn(K * K * G, dtype=torch.bfloat16)
    geometry = ((1, 1), (1, 1), (1, 1))
    first = fused.backward_input_launch(dy, z, span_w, span_b, torch.empty_like(dy), K, *geometry)
    again = fused.backward_input_launch(dy, z, span_w, span_b, torch.empty_like(dy), K, *geometry)
    assert first.name == "fused_bwd_input_halo_kernel"
    cap = fused.HALO_INPUT_GRAD_SM90_REGISTERS
    assert first.sm90_max_registers == again.sm90_max_registers == cap
    # The plan forms the cap check's key once, as the launch would.
    assert again.cap_key() == first.cap_key() == (again.kernel, tuple(again.meta.items()))
    assert bool(again.specialisation) == bool(cap) and not first.specialisation
    assert cap == (128 if _launch.TRITON_VERSION <= (3, 6) else 0)
    assert again.compile_options(90).get("maxnreg") == (cap or None)
    assert "maxnreg" not in again.compile_options(80) and "maxnreg" not in again.compile_options(0)
    eight = fused.backward_input_launch(dy, z, *_two_group_span(K, R), torch.empty_like(dy), K, *geometry)
    assert eight.name == "fused_bwd_input_halo_kernel" and eight.sm90_max_registers == 0  # it spills there
    # The forward: 16-bit at 16 channels a group in both layouts (fp32, 8 and 32 channels spill
    # under it); the 16-bit forward by pairs in two stages but on NCHW, fp32 tile-wide in one.
    forward_cap = fused.HALO_FORWARD_SM90_REGISTERS
    assert forward_cap == (128 if _launch.TRITON_VERSION <= (3, 6) else 0)
    assert fused.HALO_CAPPED_CHANNELS == 16
    two_groups = _two_group_span(K, R)
    one_group = (span_w, span_b)
    for x, weights, expected, stages in (
            (dy, one_group, forward_cap, 1), (dy.contiguous(memory_format=torch.channels_last), one_group, forward_cap, 2),
            (dy.float(), one_group, 0, 1), (dy, two_groups, 0, 1)):  # 8 channels a group: uncapped
        with _launch.conv_tf32(True):
            launch = fused.forward_launch(x, z.to(x.dtype), *(w.to(x.dtype) for w in weights), torch.empty_like(x),
                                          K, *geometry)
        name = "fused_fwd_halo_pairs_kernel" if fused.forward_by_pairs(x, C // G) else "fused_fwd_halo_kernel"
        assert launch.name == name and launch.sm90_max_registers == expected
        assert launch.num_stages == stages


def test_a_register_cap_the_kernel_spills_under_is_dropped(monkeypatch):
    """An sm_90 cap is a bet on occupancy: a specialisation whose compiled kernel reports local memory
    under it (triton's n_spills) runs uncapped from its second call on; one that fits keeps it, and
    another specialisation of the same kernel bets afresh."""
    calls = []

    class Compiled:
        def __init__(self, n_spills):
            self.n_spills = n_spills

    class Kernel:
        def __init__(self, spills):
            self.spills = spills

        def __getitem__(self, grid):
            def run(**kwargs):
                calls.append((self, kwargs.get("maxnreg")))
                return Compiled(self.spills if "maxnreg" in kwargs else 0)
            return run

    monkeypatch.setattr(_launch, "_INTERPRETED", False)
    monkeypatch.setattr(_launch, "device_arch", lambda: 90)
    monkeypatch.setattr(_launch, "_LOCAL_MEMORY_UNDER_CAP", set())
    spills, fits = Kernel(6), Kernel(0)
    for kernel in (spills, fits):
        for _ in range(3):
            _launch.Launch(kernel, (1,), {}, {"K": 3}, num_warps=2, num_stages=1, sm90_max_registers=200)()
    assert calls == [(spills, 200), (spills, None), (spills, None), (fits, 200), (fits, 200), (fits, 200)]
    _launch.Launch(spills, (1,), {}, {"K": 5}, num_warps=2, num_stages=1, sm90_max_registers=200)()
    assert calls[-1] == (spills, 200)
    # A plan's launches carry their key (Launch.specialisation): the check goes by it.
    planned = (spills, (("K", 7),))
    for _ in range(2):
        _launch.Launch(spills, (1,), {}, {"K": 7}, num_warps=2, num_stages=1, sm90_max_registers=200,
                       specialisation=planned)()
    assert planned in _launch._LOCAL_MEMORY_UNDER_CAP and calls[-2:] == [(spills, 200), (spills, None)]
    monkeypatch.setattr(_launch, "device_arch", lambda: 80)  # other GPUs never take the cap
    _launch.Launch(fits, (1,), {}, {"K": 3}, num_warps=2, num_stages=1, sm90_max_registers=200)()
    assert calls[-1] == (fits, None)
    # The specialisation is keyed by the launch's meta: every capped default launch's must hash.
    from dynconv.kernels import catalogue
    capped = [launch for launch in catalogue() if launch.sm90_max_registers]
    assert capped
    for launch in capped:
        hash((launch.kernel, tuple(launch.meta.items())))


def test_plans_follow_the_tf32_switch(device):
    """fp32 kernels choose their products' precision (and the fused layer its kernels) by torch's tf32
    switch for convs: a plan made under one setting must not serve the other."""
    B, C, H, W, K, G, R = 1, 16, 6, 7, 3, 2, 5
    x, z = torch.randn(B, C, H, W), torch.randn(B, R, H, W)
    span_w, span_b = torch.randn(K * K * G, R), torch.randn(K * K * G)
    geometry = ((1, 1), (1, 1), (1, 1))
    built = {}
    for allowed in (True, False, True):
        with _launch.conv_tf32(allowed):
            launch = fused.forward_launch(x, z, span_w, span_b, torch.empty_like(x), K, *geometry)
        built.setdefault(allowed, []).append((launch.name, launch.meta["DOT_PRECISION"]))
    halo_forward = "fused_fwd_halo_pairs_kernel" if fused.forward_by_pairs(x, C // G) else "fused_fwd_halo_kernel"
    assert built[True] == [(halo_forward, "tf32")] * 2
    assert built[False] == [("fused_fwd_kernel", "tf32x3")]
    assert len(_fused_plans("fwd")) == 2
    if not _launch.kernels_are_interpreted() and device == "cpu":
        return  # the expert op runs its eager path: no plans
    inputs = _expert_inputs(guide=False)
    for allowed, precision in ((True, "tf32"), (False, "ieee"), (True, "tf32")):
        with _launch.conv_tf32(allowed):
            y = _expert_conv(*(inputs[k].to(device, torch.float32) for k in ("x", "experts", "routing")), **GEOMETRY)
        assert y.dtype == torch.float32
        plans = [_launch._plans[key] for key in _expert_plans("fwd") if key[-1] == allowed]
        assert plans and all(plan.meta["INPUT_PRECISION"] == precision for plan in plans)


def test_fused_provisional_config_is_not_remembered(monkeypatch, tmp_path):
    def capturing():
        raise configs._NotNow

    _simulated_gpu(monkeypatch, tmp_path, capturing)
    launchers, tensors = _fused_launch_args(torch.contiguous_format)
    for name in ("forward_launch", "backward_input_launch", "backward_z_launch"):
        make_args, _ = launchers[name]
        getattr(fused, name)(*make_args(tensors))
    assert not _launch._plans


def test_fused_meta_tensors_build_afresh():
    launches = fused.catalogue()
    assert launches and not _launch._plans


# ---------------------------------------------------------------------------------------------
# expert_conv: forward, guide score, bwd input and bwd weight launchers
# ---------------------------------------------------------------------------------------------

def _expert_inputs(guide=True):
    B, Cin, Cout, H, W, K, E, m = 2, 4, 6, 5, 6, 3, 3, 3
    f64 = dict(dtype=torch.float64)
    return {
        "x": torch.randn(B, Cin, H, W, **f64),
        "experts": torch.randn(E, Cout, Cin, K, K, **f64) * 0.5,
        "routing": torch.rand(B, m, E, **f64) if guide else torch.rand(B, E, **f64),
        "bias": torch.randn(E, Cout, **f64),
        "spatial": torch.rand(B, K, K, **f64) + 0.5,
        # Well-separated logits: fp16 rounding must not change a pixel's region.
        "guide": torch.randn(B, m, H, W, **f64) * 4 if guide else None,
    }


def _expert_conv(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return dynconv.expert_conv2d(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _expert_reference(x, experts, routing, bias=None, spatial=None, guide=None, **geometry):
    return expert_conv2d_loop(x, experts, routing, bias, spatial=spatial, guide=guide, **geometry)


def _expert_plans(kind):
    return [key for key in _launch._plans if key[0][0] == f"expert_conv_{kind}"]


@pytest.mark.parametrize("materialise", [False, True], ids=["on-the-fly", "materialised"])
def test_expert_conv_plans_follow_layout_dtype_and_weight_source(materialise, monkeypatch, device):
    monkeypatch.setattr(expert, "should_materialise", lambda *args: materialise)
    inputs = _expert_inputs()
    seen = set()

    def expert_conv(x, **rest):
        seen.add((x.dtype, x.stride()))
        return _expert_conv(x, **rest)

    for dtype in (torch.float32, torch.float16):
        for _, xx in _layouts(inputs["x"]):
            check_against_reference(expert_conv, _expert_reference, {**inputs, "x": xx}, dtype, device,
                                    **GEOMETRY)
    assert len(seen) == 6
    if _launch.kernels_are_interpreted() or device != "cpu":
        for kind in ("fwd", "guide_score", "bwd_weight"):  # the launches that read x
            assert len(_expert_plans(kind)) == 6, kind
        # dx takes x's memory format, and the (N, H, C, W) view's is NCHW: two layouts per dtype.
        assert len(_expert_plans("bwd_input")) == 4
        # The weight source's mode is part of every key that reads the weights.
        mode = 1 if materialise else 3  # num_mix: materialised kernels, or the E experts mixed on the fly
        assert all(key[0][2][3] == mode for key in _expert_plans("fwd"))


def test_expert_conv_plans_take_no_values_from_the_guide(device):
    """Region tables change with the guide every call; the plan holds only their layouts."""
    for _ in range(3):
        check_against_reference(_expert_conv, _expert_reference, _expert_inputs(), torch.float32, device,
                                **GEOMETRY)
    # And without a guide (one region, no region tables) another plan.
    check_against_reference(_expert_conv, _expert_reference, _expert_inputs(guide=False), torch.float32, device,
                            **GEOMETRY)
    if _launch.kernels_are_interpreted() or device != "cpu":
        for kind in ("fwd", "bwd_input", "bwd_weight"):
            assert len(_expert_plans(kind)) == 2, kind


def _expert_launch_args(fmt, materialise):
    inputs = {k: v.float() for k, v in _expert_inputs().items()}
    x = inputs["x"].contiguous(memory_format=fmt)
    experts, routing, spatial, guide = inputs["experts"], inputs["routing"], inputs["spatial"], inputs["guide"]
    B, m = routing.shape[:2]
    Cout, kernel_hw = experts.shape[1], tuple(experts.shape[3:])
    geometry = ((1, 1), (1, 1), (1, 1))
    y = torch.empty(B, Cout, *x.shape[2:]).contiguous(memory_format=fmt)
    bias = torch.randn(B, m, Cout)
    source = expert.weight_source(experts, routing, materialise)
    fwd_cfg = expert.forward_config(x, experts, m, 1, *geometry)
    regions = region_tables(guide)
    score = torch.empty(B, m, expert_guide.score_tiles(Cout, 1, fwd_cfg), y.shape[2] * y.shape[3])
    in_cfg = expert_input_grad.input_grad_config(x, experts, m, 1, (1, 1))
    w_cfg = expert_weight_grad.weight_grad_config(x, experts, m, 1, (1, 1))
    splits = expert_weight_grad.weight_grad_splits(B, m, Cout, 1, experts[0, 0].numel(), y.shape[2] * y.shape[3], w_cfg)
    dw = torch.empty(splits, B, m, *experts.shape[1:])
    return {
        "forward_launch": lambda t: (t["x"], source, spatial, bias, regions, t["y"], kernel_hw, 1, *geometry,
                                     fwd_cfg),
        "guide_score_launch": lambda t: (t["x"], source, spatial, bias, t["y"], t["score"], kernel_hw, 1,
                                         *geometry, fwd_cfg),
        "backward_input_launch": lambda t: (t["y"], source, spatial, regions.region, t["x"], kernel_hw, 1,
                                            *geometry, m, in_cfg),
        "backward_weight_launch": lambda t: (t["y"], t["x"], regions, t["dw"], kernel_hw, 1,
                                             *geometry, w_cfg),
    }, dict(x=x, y=y, score=score, dw=dw)


@pytest.mark.parametrize("materialise", [False, True], ids=["on-the-fly", "materialised"])
@pytest.mark.parametrize("launcher", ["forward_launch", "guide_score_launch", "backward_input_launch",
                                      "backward_weight_launch"])
def test_expert_conv_plan_launch_matches_a_fresh_build(launcher, materialise):
    for fmt in (torch.contiguous_format, torch.channels_last):
        launchers, tensors = _expert_launch_args(fmt, materialise)
        make_args = launchers[launcher]
        module = {"backward_weight_launch": expert_weight_grad, "backward_input_launch": expert_input_grad,
                  "guide_score_launch": expert_guide}.get(launcher, expert)
        first = getattr(module, launcher)(*make_args(tensors))
        others = {k: torch.empty_like(v) for k, v in tensors.items()}
        again = getattr(module, launcher)(*make_args(others))
        fresh = getattr(module, "_" + launcher)(*make_args(others))
        assert again.args["x_ptr" if "x_ptr" in again.args else "dx_ptr"] is others["x"]
        assert first.args.keys() == fresh.args.keys() and again.args == fresh.args
        assert (again.kernel, again.grid, again.meta, again.num_warps, again.num_stages) == \
            (fresh.kernel, fresh.grid, fresh.meta, fresh.num_warps, fresh.num_stages)


def test_expert_conv_meta_tensors_build_afresh():
    launches = (expert.catalogue() + expert_guide.catalogue() + expert_input_grad.catalogue()
                + expert_weight_grad.catalogue())
    assert launches and not _launch._plans
