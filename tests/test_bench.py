"""`dynconv bench` / `dynconv plot` on CPU: the byte and FLOP model, the csv, the plots, the README.

Every csv written here is SYNTHETIC (made-up times, gpu named "SYNTHETIC ...") and lives under
tmp_path only: nothing here may ever reach perf_reports/.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from dynconv import bench, plot, providers
from dynconv.console import EXIT_NO_GPU
from dynconv.roofline import (
    REFERENCE_SHAPES,
    Problem,
    minimum_bytes,
    minimum_flops,
    resolve_shape,
    roof_tflops,
    split_shape_name,
    sweep_shape_names,
)

SYNTHETIC_GPU = "SYNTHETIC GPU (test data, not a measurement)"

# ---------------------------------------------------------------------------------------------
# The model, against numbers worked out by hand
# ---------------------------------------------------------------------------------------------
# R1: x = y = 32·256·56·56 = 25,690,112 elements; weight = 32·16·7·7·56·56 = 78,675,968.
R1_X, R1_W = 25_690_112, 78_675_968
R1_FWD_FLOPS = 2 * 32 * 256 * 3136 * 49  # = 2,517,630,976


def test_involution_model_r1():
    p = REFERENCE_SHAPES["R1"]
    assert minimum_bytes(p, "forward", "bf16") == 2 * (R1_X + R1_W + R1_X) == 260_112_384
    assert minimum_flops(p, "forward") == R1_FWD_FLOPS == 2_517_630_976
    # backward reads dy, x, weight and writes dx, dweight
    assert minimum_bytes(p, "backward", "bf16") == 2 * (3 * R1_X + 2 * R1_W)
    assert minimum_flops(p, "backward") == 2 * R1_FWD_FLOPS
    # one unit: dy, x, weight read once; y, dx, dweight written once
    assert minimum_bytes(p, "forward+backward", "fp32") == 4 * (4 * R1_X + 2 * R1_W)
    assert minimum_flops(p, "forward+backward") == 3 * R1_FWD_FLOPS


def test_dwconv_model_r4_counts_bias():
    p = REFERENCE_SHAPES["R4"]
    x, w, bias = 64 * 256 * 56 * 56, 64 * 256 * 49, 64 * 256  # 51,380,224; 802,816; 16,384
    assert minimum_bytes(p, "forward", "fp32") == 4 * (x + w + bias + x)
    # backward needs no bias: ∂bias is a sum of dy
    assert minimum_bytes(p, "backward", "fp32") == 4 * ((x + x + w) + (x + w + bias))
    contraction = 2 * 64 * 256 * 3136 * 49
    assert minimum_flops(p, "forward") == contraction + x == 5_086_642_176
    assert minimum_flops(p, "backward") == 2 * contraction + x


def test_expert_conv2d_model_e1():
    p = REFERENCE_SHAPES["E1"]
    x = 64 * 256 * 28 * 28                       # 12,845,056 (= y)
    experts, routing, bias = 4 * 256 * 256 * 9, 64 * 4, 4 * 256
    assert minimum_bytes(p, "forward", "fp16") == 2 * (x + experts + routing + bias + x)
    assert minimum_bytes(p, "backward", "fp16") == 2 * ((x + x + experts + routing + bias)
                                                        + (x + experts + routing + bias))
    conv = 2 * 64 * (256 * 256 * 9) * 784       # one kernel per output pixel
    mix = 2 * 64 * 4 * (256 * 256 * 9) + 2 * 64 * 4 * 256
    assert minimum_flops(p, "forward") == conv + mix + x == 59_504_984_064
    assert minimum_flops(p, "backward") == 2 * conv + 2 * mix + x


def test_drconv_model_small_shape():
    p = Problem("drconv", B=2, C=4, H=5, W=5, K=3, Cout=6, E=3, m=2, bias=True)
    # x 200, experts 3·6·4·9 = 648, routing 2·2·3 = 12, guide 2·2·25 = 100, bias 18, y 2·6·25 = 300
    assert minimum_bytes(p, "forward", "fp32") == 4 * 1278 == 5112
    assert minimum_bytes(p, "backward", "fp32") == 4 * (1278 + 978) == 9024
    # conv 2·2·216·25 = 21,600; mixes 2·2·2·3·216 + 2·2·2·3·6 = 5,328; bias adds 2·6·25 = 300
    assert minimum_flops(p, "forward") == 21_600 + 5_328 + 300 == 27_228
    # ∂x, ∂W: one conv each; ∂S: m convs (43,200) + Σ_o (1,200) + bias in y_r (600); mixes twice
    assert minimum_flops(p, "backward") == 43_200 + 10_656 + 300 + 43_200 + 1_200 + 600 == 99_156


# R1-layer: R1's Involution2d from the reduced feature on, R = 256/4 = 64, K²G = 49·16 = 784 span rows.
# z = 32·64·56·56 = 6,422,528; span weight 784·64 = 50,176; span bias 784.
L1_Z, L1_S, L1_B = 6_422_528, 50_176, 784
L1_SPAN_FLOPS = 2 * 32 * 3136 * 64 * 784      # = 10,070,523,904 (the 1x1 span conv as a GEMM)
L1_BIAS_ADDS = 32 * 3136 * 784                 # = 78,675,968


def test_involution_layer_model_r1():
    p = REFERENCE_SHAPES["R1-layer"]
    # forward: x, z, span weight and bias read, y written; the per-pixel weights (R1_W) never appear
    assert minimum_bytes(p, "forward", "bf16") == 2 * (R1_X + L1_Z + L1_S + L1_B + R1_X) == 115_707_424
    # backward: dy, x, z, span weight and bias (∂x needs the generated weights) → dx, dz, dspan, dbias
    assert minimum_bytes(p, "backward", "bf16") == 2 * ((2 * R1_X + L1_Z + L1_S + L1_B)
                                                        + (R1_X + L1_Z + L1_S + L1_B)) == 180_034_624
    assert minimum_bytes(p, "forward+backward", "fp32") == 4 * (3 * R1_X + 2 * (L1_Z + L1_S + L1_B) + R1_X)
    # span GEMM + its bias adds + aggregation; backward twice each contraction, ∂bias one sum
    assert minimum_flops(p, "forward") == L1_SPAN_FLOPS + L1_BIAS_ADDS + R1_FWD_FLOPS == 12_666_830_848
    assert minimum_flops(p, "backward") == 2 * L1_SPAN_FLOPS + L1_BIAS_ADDS + 2 * R1_FWD_FLOPS == 25_254_985_728
    assert minimum_flops(p, "forward+backward") == 37_921_816_576


def test_involution_layer_model_small_shape_without_bias():
    p = Problem("involution_layer", B=2, C=4, H=5, W=5, K=3, G=2, R=3, stride=2)
    # Ho = Wo = 3: x 200, z 2·3·9 = 54, span 18·3 = 54, y 2·4·9 = 72
    assert minimum_bytes(p, "forward", "fp32") == 4 * (200 + 54 + 54 + 72)
    assert minimum_bytes(p, "backward", "fp32") == 4 * ((72 + 200 + 54 + 54) + (200 + 54 + 54))
    # span 2·2·9·3·18 = 1,944; aggregation 2·2·4·9·9 = 1,296
    assert minimum_flops(p, "forward") == 1_944 + 1_296
    assert minimum_flops(p, "backward") == 2 * (1_944 + 1_296)
    with pytest.raises(ValueError, match="R >= 1"):
        Problem("involution_layer", B=1, C=4, H=5, W=5, K=3, G=2)


def test_geometry_and_shape_names():
    assert Problem("involution", B=1, C=4, H=7, W=7, K=3, G=1, stride=2).out_hw == (4, 4)
    assert Problem("involution", B=1, C=4, H=7, W=9, K=5, G=1, dilation=2).out_hw == (7, 9)
    assert split_shape_name("R1@H112") == ("R1", 112) and split_shape_name("E2") == ("E2", 56)
    assert resolve_shape("R4@H14").H == 14 and resolve_shape("R4@H14").C == 256
    assert "R1" not in sweep_shape_names() and "R1@H112" in sweep_shape_names()
    assert split_shape_name("R1-layer@H28") == ("R1-layer", 28) and "R1-layer@H14" in sweep_shape_names()
    assert resolve_shape("R1-layer").R == 64
    for bad in ("R9", "r1", "R1@112", "R1@Hx", "R1-Layer", "R1-other"):
        with pytest.raises(ValueError):
            resolve_shape(bad)


def test_roof():
    assert roof_tflops(1.0, hbm_gbps=3000, peak_tflops=700) == pytest.approx(3.0)
    assert roof_tflops(1e4, hbm_gbps=3000, peak_tflops=700) == 700


# ---------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------

def test_columns_are_the_issues():
    assert ",".join(bench.COLUMNS) == ("op,pass,dtype,layout,shape,provider,ms_median,ms_p20,ms_p80,gbps,tflops,"
                                       "peak_mem_mb,gpu,torch,triton,commit,date")
    assert bench.LEGACY_COLUMNS == [c for c in bench.COLUMNS if c != "layout"]


def _row(**fields):
    row = {"op": "involution", "pass": "forward", "dtype": "bf16", "shape": "R1", "provider": "dynconv",
           "gpu": SYNTHETIC_GPU, "torch": "synthetic", "triton": "synthetic", "commit": "0" * 40,
           "date": "2000-01-01T00:00:00Z"}
    row.update(fields)
    return row


def test_csv_merge_replaces_same_key_and_keeps_the_rest(tmp_path):
    path = tmp_path / "results.csv"
    bench.write_csv(path, [_row(ms_median=1.0), _row(provider="unfold", ms_median="OOM")])
    bench.write_csv(path, [_row(ms_median=2.0)])
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == bench.COLUMNS
    rows = {r["provider"]: r for r in bench.read_csv(path)}
    assert rows["dynconv"]["ms_median"] == "2" and rows["unfold"]["ms_median"] == "OOM"
    bench.write_csv(path, [_row(ms_median=3.0)], merge=False)
    assert [r["provider"] for r in bench.read_csv(path)] == ["dynconv"]
    path.write_text("op,pass\ninvolution,forward\n")
    with pytest.raises(ValueError, match="columns"):
        bench.read_csv(path)


def test_csv_layout_is_part_of_the_key(tmp_path):
    path = tmp_path / "results.csv"
    bench.write_csv(path, [_row(layout="nchw", ms_median=1.0), _row(layout="nhwc", ms_median=2.0),
                           _row(ms_median=9.0, provider="unfold")])  # no layout given: nchw
    bench.write_csv(path, [_row(layout="nhwc", ms_median=3.0)])
    rows = {(r["layout"], r["provider"]): r["ms_median"] for r in bench.read_csv(path)}
    assert rows == {("nchw", "dynconv"): "1", ("nhwc", "dynconv"): "3", ("nchw", "unfold"): "9"}
    # nchw before nhwc within a shape, whatever order they were written in
    assert [r["layout"] for r in bench.read_csv(path) if r["provider"] == "dynconv"] == ["nchw", "nhwc"]


def _write_legacy_csv(path, rows):
    """A results.csv as written before the layout column existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench.LEGACY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: bench._fmt(r.get(c)) for c in bench.LEGACY_COLUMNS} for r in rows)


def test_csv_without_layout_column_reads_as_nchw(tmp_path):
    path = tmp_path / "results.csv"
    _write_legacy_csv(path, [_row(ms_median=1.0), _row(provider="unfold", ms_median="OOM")])
    rows = bench.read_csv(path)
    assert [(r["layout"], r["provider"], r["ms_median"]) for r in rows] == [("nchw", "dynconv", "1"),
                                                                            ("nchw", "unfold", "OOM")]
    # Merging new measurements upgrades the header; an nchw row replaces its legacy twin, nhwc adds.
    bench.write_csv(path, [_row(layout="nchw", ms_median=2.0), _row(layout="nhwc", ms_median=3.0)])
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == bench.COLUMNS
    rows = {(r["layout"], r["provider"]): r["ms_median"] for r in bench.read_csv(path)}
    assert rows == {("nchw", "dynconv"): "2", ("nhwc", "dynconv"): "3", ("nchw", "unfold"): "OOM"}


def test_layout_plan_defaults():
    every = [("nchw", d) for d in bench.DTYPES] + [("nhwc", d) for d in bench.DTYPES]
    assert bench.layout_plan(list(bench.DTYPES), None, quick=False) == every
    # --quick: nhwc in bf16 only; none where bf16 is not asked for
    assert bench.layout_plan(list(bench.DTYPES), None, quick=True) == \
        [("nchw", d) for d in bench.DTYPES] + [("nhwc", "bf16")]
    assert bench.layout_plan(["fp32"], None, quick=True) == [("nchw", "fp32")]
    # named layouts: exactly those, in every dtype, quick or not
    assert bench.layout_plan(["fp32", "bf16"], ["nhwc"], quick=True) == [("nhwc", "fp32"), ("nhwc", "bf16")]


def test_quantiles_and_rotation():
    assert bench.quantiles([5, 1, 2, 3, 4]) == pytest.approx((3.0, 1.8, 4.2))
    assert bench.rotation_sets(set_bytes=1 << 20, l2_bytes=50 << 20) == 4
    assert bench.rotation_sets(set_bytes=40 << 20, l2_bytes=50 << 20) == 3
    assert bench.rotation_sets(set_bytes=1 << 30, l2_bytes=50 << 20) == 1


def test_gpu_folder_name_is_the_config_files_normaliser():
    assert bench.normalised_gpu_name("NVIDIA H200 (MIG 1g.18gb)") == "NVIDIA_H200_MIG_1g_18gb"
    assert bench.normalised_gpu_name("???") == "unknown_gpu"
    # the same folder name as the autotuning configs' files
    assert bench.normalised_gpu_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"


# ---------------------------------------------------------------------------------------------
# The measuring loop on CPU (tiny shapes; the CPU timer measures nothing of interest, the test
# is of the plumbing: providers, passes, statuses, the model columns)
# ---------------------------------------------------------------------------------------------

def _wrong(op):
    return lambda t, p: torch.zeros_like(providers.PROVIDERS["shift_add"].resolve(op)(t, p)) + 1


def _out_of_memory(op):
    def run(t, p):
        raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB (synthetic, raised by the test)")
    return run


def test_run_on_cpu_records_every_provider_and_failure(tmp_path, monkeypatch):
    registry = dict(providers.PROVIDERS)
    registry["wrong"] = providers.Provider("wrong", "wrong on purpose", ("involution",), _wrong)
    registry["oom"] = providers.Provider("oom", "always OOM", ("involution",), _out_of_memory)
    monkeypatch.setattr(providers, "PROVIDERS", registry)
    monkeypatch.setattr(bench, "PROVIDERS", registry)
    tiny = {"T1": Problem("involution", B=1, C=2, H=4, W=4, K=3, G=1),
            "T2": Problem("expert_conv2d", B=2, C=4, H=5, W=5, K=3, Cout=4, E=2, bias=True),
            "T3": Problem("drconv", B=1, C=2, H=4, W=4, K=3, Cout=2, E=2, m=2, bias=True)}
    log = []
    timer = bench.Timer("cpu", warmup_ms=0, rep_ms=0, min_reps=3)  # the interpreter is slow; no timing is judged
    path = bench.run_benchmarks(shapes=["T1"], dtypes=["fp32"], layouts=["nchw"], out=tmp_path, device="cpu",
                                problems=tiny, timer=timer, log=log.append)
    # Family 2 through one pass only (the interpreter is slow); merged into the same csv.
    bench.run_benchmarks(shapes=["T2", "T3"], dtypes=["fp32"], layouts=["nchw"], passes=["forward+backward"],
                         out=tmp_path, device="cpu", problems=tiny, timer=timer, log=log.append)
    rows = bench.read_csv(path)
    t1 = {(r["pass"], r["provider"]): r for r in rows if r["shape"] == "T1"}
    expected = {"dynconv", "unfold", "shift_add", "static_conv", "wrong", "oom"}
    assert {prov for _, prov in t1} == expected and len(t1) == 3 * len(expected)
    for (pass_, prov), r in t1.items():
        if prov == "wrong":
            assert r["ms_median"] == "mismatch"
        elif prov == "oom":
            assert r["ms_median"] == "OOM"
        else:
            ms = float(r["ms_median"])
            assert float(r["ms_p20"]) <= ms <= float(r["ms_p80"])
            assert float(r["gbps"]) == pytest.approx(minimum_bytes(tiny["T1"], pass_, "fp32") / ms / 1e6, rel=1e-4)
            assert float(r["tflops"]) == pytest.approx(minimum_flops(tiny["T1"], pass_) / ms / 1e9, rel=1e-4)
    assert any("MISMATCH: wrong" in line for line in log)
    import dynconv
    family2 = [r for r in rows if r["shape"] in ("T2", "T3")]
    if hasattr(dynconv, "expert_conv2d"):
        assert {r["provider"] for r in family2 if r["shape"] == "T2"} == {"dynconv", "batch_groups", "loop", "static_conv"}
        assert {r["provider"] for r in family2 if r["shape"] == "T3"} == {"dynconv", "batch_groups", "all_regions",
                                                                           "loop", "static_conv"}
        assert not [r for r in family2 if r["ms_median"] in bench.STATUSES]
    else:
        assert any("expert_conv2d: provider dynconv skipped" in line for line in log)
    assert all(r["gpu"] == "cpu" and r["layout"] == "nchw" for r in rows)


def test_run_on_cpu_involution_layer_with_the_fused_provider(tmp_path):
    """``dynconv bench --ops involution_layer`` on a tiny shape: every provider of the layer, the
    fused one through the interpreter, checked against shift-and-add and timed. Two passes only:
    the fused backward takes over a second per call in the interpreter (its span-gradient grid
    is fixed), and forward+backward runs every backward kernel."""
    tiny = {"T4": Problem("involution_layer", B=1, C=4, H=5, W=5, K=3, G=2, R=3, bias=True)}
    log = []
    timer = bench.Timer("cpu", warmup_ms=0, rep_ms=0, min_reps=1)
    path = bench.run_benchmarks(ops=["involution_layer"], shapes=["T4", "R1"], dtypes=["fp32"], layouts=["nchw"],
                                passes=["forward", "forward+backward"], out=tmp_path, device="cpu", problems=tiny,
                                timer=timer, log=log.append)
    rows = {(r["pass"], r["provider"]): r for r in bench.read_csv(path)}
    expected = {"dynconv_fused", "dynconv", "unfold", "shift_add", "static_conv"}
    assert {prov for _, prov in rows} == expected and len(rows) == 2 * len(expected)  # R1 left out by --ops
    assert not any("MISMATCH" in line for line in log)
    for (pass_, prov), r in rows.items():
        assert r["op"] == "involution_layer" and r["shape"] == "T4"
        ms = float(r["ms_median"])  # a status here would raise
        assert float(r["gbps"]) == pytest.approx(minimum_bytes(tiny["T4"], pass_, "fp32") / ms / 1e6, rel=1e-4)
        assert float(r["tflops"]) == pytest.approx(minimum_flops(tiny["T4"], pass_) / ms / 1e9, rel=1e-4)


# One tiny problem per op, every activation with C > 1 and H, W > 1 (so NCHW and NHWC differ).
TINY = {"involution": Problem("involution", B=2, C=4, H=5, W=6, K=3, G=2),
        "dynamic_dwconv2d": Problem("dynamic_dwconv2d", B=2, C=4, H=5, W=6, K=3, G=4, bias=True),
        "expert_conv2d": Problem("expert_conv2d", B=2, C=4, H=5, W=6, K=3, Cout=6, E=2, bias=True),
        "drconv": Problem("drconv", B=2, C=4, H=5, W=6, K=3, Cout=6, E=2, m=3, bias=True),
        "involution_layer": Problem("involution_layer", B=2, C=4, H=5, W=6, K=3, G=2, R=3, bias=True)}


def _channels_last(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", sorted(TINY))
def test_make_inputs_in_channels_last(op):
    p = TINY[op]
    nchw = providers.make_inputs(p, torch.float32, "cpu", generator=torch.Generator().manual_seed(0))
    nhwc = providers.make_inputs(p, torch.float32, "cpu", requires_grad=True,
                                 generator=torch.Generator().manual_seed(0), layout="nhwc")
    assert nchw.keys() == nhwc.keys()
    activations = {"x", "z", "guide"} & nhwc.keys()
    assert "x" in activations and ("guide" in activations) == (op == "drconv")
    assert ("z" in activations) == (op == "involution_layer")
    for name, t in nhwc.items():
        assert torch.equal(t, nchw[name]), name  # the layout changes strides, never values
        assert t.requires_grad and t.is_leaf, name
        assert nchw[name].is_contiguous(), name
        if name in activations:
            assert _channels_last(t), name
        elif name == "static_weight":
            assert t.is_contiguous(memory_format=torch.channels_last)
        else:  # the op's own weights keep their (B, G, K, K[, Ho, Wo]) / (E, Cout, ...) order
            assert t.is_contiguous(), name
    with pytest.raises(ValueError, match="layout"):
        providers.make_inputs(p, torch.float32, "cpu", layout="chwn")


def _spy(record):
    """A provider that is shift-and-add (or batch-as-groups) but notes the layout of the x it
    receives and, through a hook, the strides of the dy its backward receives against its y's."""
    def resolve(op):
        inner = providers.PROVIDERS["shift_add" if providers.FAMILY[op] == 1 else "batch_groups"].resolve(op)

        def run(t, p):
            y = inner(t, p)
            record.append(("x", _channels_last(t["x"])))
            if y.requires_grad:
                y.register_hook(lambda dy, strides=y.stride(): record.append(("dy", dy.stride() == strides)))
            return y
        return run
    return resolve


def test_run_on_cpu_in_nhwc(tmp_path, monkeypatch):
    """``dynconv bench --layouts nhwc`` on tiny shapes: every provider runs on channels_last
    inputs (none fails or disagrees), backward gets a dy in its output's format, and every row
    says nhwc."""
    registry = dict(providers.PROVIDERS)
    record = []
    registry["spy"] = providers.Provider("spy", "spy", ("involution", "expert_conv2d"), _spy(record))
    monkeypatch.setattr(providers, "PROVIDERS", registry)
    monkeypatch.setattr(bench, "PROVIDERS", registry)
    log = []
    timer = bench.Timer("cpu", warmup_ms=0, rep_ms=0, min_reps=1)
    path = bench.run_benchmarks(shapes=["involution"], dtypes=["fp32"], layouts=["nhwc"], out=tmp_path,
                                device="cpu", problems=TINY, timer=timer, log=log.append)
    bench.run_benchmarks(shapes=["expert_conv2d"], dtypes=["fp32"], layouts=["nhwc"], passes=["forward+backward"],
                         out=tmp_path, device="cpu", problems=TINY, timer=timer, log=log.append)
    # z and the guide in channels_last; forward only, as the interpreter is slow on their backward.
    bench.run_benchmarks(shapes=["involution_layer", "drconv"], dtypes=["fp32"], layouts=["nhwc"], passes=["forward"],
                         out=tmp_path, device="cpu", problems=TINY, timer=timer, log=log.append)
    rows = bench.read_csv(path)
    assert {r["layout"] for r in rows} == {"nhwc"}
    assert {(r["shape"], r["provider"]) for r in rows if r["shape"] in ("involution", "expert_conv2d")} == {
        ("involution", prov) for prov in ("dynconv", "unfold", "shift_add", "static_conv", "spy")} | {
        ("expert_conv2d", prov) for prov in ("dynconv", "batch_groups", "loop", "static_conv", "spy")}
    assert {r["provider"] for r in rows if r["shape"] == "involution_layer"} == {
        "dynconv_fused", "dynconv", "unfold", "shift_add", "static_conv"}
    assert {r["provider"] for r in rows if r["shape"] == "drconv"} == {
        "dynconv", "batch_groups", "all_regions", "loop", "static_conv"}
    assert len(rows) == 5 * 3 + 5 + 5 + 5
    assert not [r for r in rows if r["ms_median"] in bench.STATUSES], log
    assert not any("MISMATCH" in line for line in log)
    assert any(line.startswith("involution (involution) fp32 nhwc") for line in log)
    assert record and all(ok for _, ok in record)
    assert {what for what, _ in record} == {"x", "dy"}


def test_dynconv_output_keeps_channels_last():
    """What the nhwc rows time: dynconv's own output stays channels_last, so its dy does too."""
    for op in ("involution", "expert_conv2d"):
        p = TINY[op]
        t = providers.make_inputs(p, torch.float32, "cpu", layout="nhwc")
        with torch.no_grad():
            assert _channels_last(providers.PROVIDERS["dynconv"].resolve(op)(t, p)), op


# ---------------------------------------------------------------------------------------------
# Plots and README from a SYNTHETIC csv
# ---------------------------------------------------------------------------------------------

SPEED = {"dynconv": 1.0, "unfold": 0.25, "shift_add": 0.5, "batch_groups": 0.5, "static_conv": 1.25,
         "dynconv_fused": 2.0}


# In nhwc (where written) the static conv is 2.5× dynconv's speed: cuDNN's channels_last path.
SPEED_NHWC = dict(SPEED, static_conv=2.5)


def synthetic_rows(shapes, dtypes, layout="nchw"):
    """Made-up times from the model at 1 TB/s and 100 TFLOP/s, divided by a per-provider factor."""
    speed = SPEED_NHWC if layout == "nhwc" else SPEED
    rows = []
    for shape in shapes:
        p = resolve_shape(shape)
        for dtype in dtypes:
            for pass_ in ("forward", "backward", "forward+backward"):
                nbytes, flops = minimum_bytes(p, pass_, dtype), minimum_flops(p, pass_)
                for prov in [n for n in speed if p.op in providers.PROVIDERS[n].ops]:
                    key = {"op": p.op, "pass": pass_, "dtype": dtype, "layout": layout, "shape": shape,
                           "provider": prov}
                    if prov == "unfold" and shape == "R1@H28":
                        rows.append(_row(**key, ms_median="OOM"))
                        continue
                    ms = max(nbytes / 1e9, flops / 1e11) / speed[prov]
                    rows.append(_row(**key, ms_median=ms, ms_p20=0.95 * ms, ms_p80=1.05 * ms, gbps=nbytes / ms / 1e6,
                                     tflops=flops / ms / 1e9, peak_mem_mb=100.0 / speed[prov] ** 2))
    return rows


def write_synthetic_reports(root, shapes=("R1@H14", "R1@H28", "R1", "R4", "E1", "R1-layer@H28", "R1-layer"),
                            dtypes=("fp32", "bf16"), nhwc_shapes=("R1@H14", "R1", "E1"), nhwc_dtypes=("bf16",),
                            legacy=False):
    """A small SYNTHETIC results.csv + ceilings.json under ``root`` (as a quick run lays it out:
    nhwc in bf16 only). Not a measurement. ``legacy``: the csv as written before the layout
    column (nchw rows only)."""
    folder = root / "SYNTHETIC_GPU"
    rows = synthetic_rows(shapes, dtypes)
    if legacy:
        _write_legacy_csv(folder / "results.csv", rows)
    else:
        rows += synthetic_rows(nhwc_shapes, nhwc_dtypes, "nhwc")
        bench.write_csv(folder / "results.csv", rows, merge=False)
    (folder / "ceilings.json").write_text('{"hbm_gbps": 2000.0, "fp32_tflops": 50.0, "bf16_tflops": 500.0}')
    return folder


def _assert_real_png(path):
    import matplotlib.image
    assert path.exists() and path.stat().st_size > 5_000, path
    pixels = (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint32)
    colours = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert len(colours) > 20, f"{path} is (nearly) one colour"
    assert path.with_suffix(".svg").exists()


@pytest.fixture(scope="module")
def synthetic_reports(tmp_path_factory):
    """Drawn once for the tests below: matplotlib takes seconds per figure."""
    root = tmp_path_factory.mktemp("reports")
    write_synthetic_reports(root)
    return root, plot.draw_all(root, log=lambda *_: None)


def test_plots_from_synthetic_csv(synthetic_reports):
    root, drawn = synthetic_reports
    folder = root / "SYNTHETIC_GPU"
    names = {p.name for p in drawn}
    for stem in ("throughput_involution_R1_nchw", "throughput_involution_R1_nhwc",
                 "throughput_involution_layer_R1-layer_nchw", "speedup_fp32_nchw", "speedup_bf16_nchw",
                 "speedup_bf16_nhwc", "roofline"):
        assert f"{stem}.png" in names
        _assert_real_png(folder / f"{stem}.png")
    # R4 and E1 have a single size each: no sweep, so no throughput-against-size plot for them;
    # nhwc has bf16 only and no layer rows
    assert not any(n.startswith(("throughput_dynamic_dwconv2d", "throughput_expert", "speedup_fp32_nhwc",
                                 "throughput_involution_layer_R1-layer_nhwc")) for n in names)


def test_readme_summary_from_synthetic_data(synthetic_reports):
    tmp_path, _ = synthetic_reports
    readme = (tmp_path / "README.md").read_text()
    assert SYNTHETIC_GPU in readme and "No benchmark tables yet" not in readme
    links = [line for line in readme.splitlines() if line.startswith("![speedup_")]
    assert [line.split("(")[1] for line in links] == [f"SYNTHETIC_GPU/speedup_{s}.png)" for s in
                                                      ("fp32_nchw", "bf16_nchw", "bf16_nhwc")]
    assert "![roofline" in readme
    bf16 = readme.split("**bf16, family 1")[1].split("family 2")[0]
    assert "| shape | op | layout | pass |" in bf16
    r1 = [line for line in bf16.splitlines() if line.startswith("| R1 | involution | nchw | forward |")][0]
    cells = [c.strip() for c in r1.strip("|").split("|")]
    # dynconv is a column for the layer's rows only; unfold is 4× slower with 16× the memory;
    # shift-and-add 2× and 4×; batch-as-groups serves R4 only; the static floor 0.8× and 0.64×
    assert cells[7:] == ["—", "4.00× · mem 16.00×", "2.00× · mem 4.00×", "—", "0.80× · mem 0.64×"]
    # R1 bf16 forward at 1 TB/s against a 2 TB/s roof (intensity 9.7 FLOP/B is left of the ridge)
    assert cells[6] == "50%"
    # The nhwc row compares with the nhwc static conv (2.5×), never with the nchw one.
    r1 = [line for line in bf16.splitlines() if line.startswith("| R1 | involution | nhwc | forward |")][0]
    assert [c.strip() for c in r1.strip("|").split("|")][7:] == ["—", "4.00× · mem 16.00×", "2.00× · mem 4.00×", "—",
                                                                "0.40× · mem 0.16×"]
    # Rows of a shape: nchw's three passes, then nhwc's.
    r1_layouts = [line.split("|")[3].strip() for line in bf16.splitlines() if line.startswith("| R1 |")]
    assert r1_layouts == 3 * ["nchw"] + 3 * ["nhwc"]
    # fp32 was measured in nchw only: its table has no nhwc row
    fp32 = readme.split("<summary>fp32, family 1")[1].split("</details>")[0]
    assert "| nchw |" in fp32 and "| nhwc |" not in fp32
    # The layer's rows report the fused provider; unfused dynconv is 2× slower with 4× the memory.
    layer = [line for line in readme.splitlines() if line.startswith("| R1-layer | involution_layer (dynconv_fused) |")]
    assert [line.split("|")[4].strip() for line in layer] == 2 * ["forward", "backward", "forward+backward"]
    cells = [c.strip() for c in layer[0].strip("|").split("|")]
    assert cells[7:] == ["2.00× · mem 4.00×", "8.00× · mem 64.00×", "4.00× · mem 16.00×", "—",
                         "1.60× · mem 2.56×"]
    data = plot.load(tmp_path)[0]
    assert data.get("involution", "forward", "bf16", "R1@H28", "unfold")["status"] == "OOM"
    assert data.get("involution", "forward", "bf16", "R1", "static_conv", "nhwc")["layout"] == "nhwc"
    assert data.get("involution", "forward", "fp32", "R1", "static_conv", "nhwc") is None


def test_plot_reads_a_csv_from_before_the_layout_column(tmp_path):
    """Committed measurements without the layout column still draw: every row counts as nchw."""
    write_synthetic_reports(tmp_path, shapes=("R1@H14", "R1", "E1"), dtypes=("bf16",), legacy=True)
    drawn = {p.name for p in plot.draw_all(tmp_path, log=lambda *_: None)}
    assert {"throughput_involution_R1_nchw.png", "speedup_bf16_nchw.png", "roofline.png"} <= drawn
    assert not any("nhwc" in name for name in drawn)
    readme = (tmp_path / "README.md").read_text()
    assert "| R1 | involution | nchw | forward |" in readme and "| nhwc |" not in readme


def test_readme_without_measurements_says_so(tmp_path):
    assert plot.draw_all(tmp_path, log=lambda *_: None) == []
    readme = (tmp_path / "README.md").read_text()
    assert "No benchmark tables yet" in readme
    assert "×" not in readme.split("## Measurements")[1] and "![" not in readme


def test_bench_without_gpu_says_nothing_was_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_gpu_available", lambda: False)
    assert bench.main(["--out", str(tmp_path)]) == EXIT_NO_GPU
    out = capsys.readouterr().out
    assert "NOTHING WAS MEASURED" in out and "no plots drawn" in out
    assert not list(tmp_path.glob("*/results.csv"))

    write_synthetic_reports(tmp_path, shapes=("R1",), dtypes=("bf16",))
    assert bench.main(["--out", str(tmp_path), "--quick"]) == EXIT_NO_GPU  # re-drawn, yet nothing measured
    out = capsys.readouterr().out
    assert "NOTHING WAS MEASURED" in out and "Re-drew" in out
    assert (tmp_path / "SYNTHETIC_GPU" / "roofline.png").exists()


def test_bench_rejects_unknown_names(capsys):
    assert bench.main(["--ops", "convolution"]) == 2
    assert bench.main(["--layouts", "nhwc,chwn"]) == 2
    assert bench.main(["--shapes", "R1@H"]) == 2
    assert "unknown" in capsys.readouterr().err


# Issue 15: N1 is q, k, v and y of 8·56·56·128 = 3,211,264 elements each; 4 heads of D = 32, K = 7.
N1_QKV = 3_211_264
N1_FWD_FLOPS = 4 * 8 * 3136 * 4 * 49 * 32  # 4·K²·D per query and head = 629,407,744


def test_na2d_model_n1_and_rpb():
    p = REFERENCE_SHAPES["N1"]
    assert p.D == 32 and p.out_hw == (56, 56)
    assert minimum_bytes(p, "forward", "bf16") == 2 * 4 * N1_QKV
    assert minimum_bytes(p, "backward", "bf16") == 2 * 7 * N1_QKV  # dy, q, k, v → dq, dk, dv
    assert minimum_flops(p, "forward") == N1_FWD_FLOPS == 629_407_744
    assert minimum_flops(p, "backward") == 2 * N1_FWD_FLOPS
    with_rpb = REFERENCE_SHAPES["N1-rpb"]
    rpb = 4 * 13 * 13
    assert minimum_bytes(with_rpb, "forward", "fp32") == 4 * (4 * N1_QKV + rpb)
    assert minimum_bytes(with_rpb, "backward", "fp32") == 4 * (7 * N1_QKV + 2 * rpb)
    assert minimum_flops(with_rpb, "forward+backward") == 3 * N1_FWD_FLOPS
    n2 = resolve_shape("N2-rpb")
    assert (n2.B, n2.H, n2.G, n2.D, n2.K) == (2, 128, 8, 64, 13)
    with pytest.raises(ValueError, match="heads"):
        Problem("na2d", B=1, C=6, H=5, W=5, K=3, G=4)


def test_run_on_cpu_na2d_providers(tmp_path):
    """``dynconv bench --ops na2d`` on a tiny shape: fused, unfused and gather, the kernels through
    the interpreter, checked against the unfused pair and timed; NATTEN is skipped with a note here."""
    tiny = {"T5": Problem("na2d", B=1, C=8, H=5, W=6, K=3, G=2, bias=True)}
    log = []
    timer = bench.Timer("cpu", warmup_ms=0, rep_ms=0, min_reps=1)
    path = bench.run_benchmarks(ops=["na2d"], shapes=["T5"], dtypes=["fp32"], layouts=["nchw"],
                                passes=["forward+backward"], out=tmp_path, device="cpu", problems=tiny,
                                timer=timer, log=log.append)
    rows = {r["provider"]: r for r in bench.read_csv(path)}
    expected = {"na2d_fused", "na2d_unfused", "na2d_gather"}
    assert expected <= set(rows) and not any("MISMATCH" in line for line in log)
    if "natten" not in rows:
        assert any("provider natten skipped" in line for line in log)
    for prov in expected:
        ms = float(rows[prov]["ms_median"])  # a status here would raise
        assert float(rows[prov]["tflops"]) == pytest.approx(minimum_flops(tiny["T5"], "forward+backward") / ms / 1e9,
                                                            rel=1e-4)


def test_the_commit_named_by_the_environment_wins_over_git(monkeypatch):
    """A device's copied tree can carry a stale .git (the first GPU lease's did): DYNCONV_COMMIT,
    set by whoever sent the tree, is what the measured rows record."""
    from dynconv import provenance

    monkeypatch.delenv("DYNCONV_COMMIT", raising=False)
    from_git = provenance.git_commit()
    monkeypatch.setenv("DYNCONV_COMMIT", "0123abc")
    assert provenance.git_commit() == "0123abc" != from_git
    assert bench.environment("cpu")["commit"] == "0123abc"
