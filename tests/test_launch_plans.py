"""Launch plans (kernels/_launch.planned): one problem's launch is built once, then only its tensors
change. A plan reused across layouts, strides or dtypes would read the wrong elements, so each
call here is checked against the reference with NaN-poisoned outputs."""
import pytest
import torch

import dynconv
from dynconv.kernels import _launch, configs
from dynconv.kernels import involution as kernels
from dynconv.reference import involution_unfold
from helpers import check_against_reference

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
    x = torch.randn(2, 8, 6, 7)
    w = torch.randn(2, 2, 3, 3, 6, 7)
    geometry = ((1, 1), (1, 1), (1, 1))
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
