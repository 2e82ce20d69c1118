"""Run-time config lookup (kernels/configs.py) and `dynconv autotune`, on CPU.

A GPU is simulated by patching the lookup's notion of the active device; run-time tuning is
replaced by a stub so that "no file" is observable without timing anything.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
import warnings

import pytest
import torch

from dynconv import autotune
from dynconv.kernels import configs
from dynconv.kernels import involution as inv
from helpers import idle_tuning_spaces, run_without_interpreter

H100 = "NVIDIA H100 80GB HBM3"
KERNEL = "involution_fwd"
EXACT = ["K", "stride_h", "stride_w", "channels_last", "dtype_bytes"]
DEFAULT = {"BLOCK_G": 1, "BLOCK_CG": 16, "BLOCK_H": 4, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1}
KEY = {"B": 32, "C": 64, "G": 4, "H": 56, "W": 56, "K": 7, "stride_h": 1, "stride_w": 1, "channels_last": 0, "dtype_bytes": 2}


def cfg(**changes):
    return {**DEFAULT, **changes}


def table_file(rows: dict, triton_version=None, schema=configs.SCHEMA, kernel=KERNEL) -> dict:
    data = configs.new_file(H100, {kernel: {"exact": EXACT, "table": {
        configs.key_string(configs.bucket_key(key, EXACT)): {"config": config} for key, config in rows}}})
    data["schema"] = schema
    if triton_version is not None:
        data["triton"] = triton_version
    return data


def write(folder, data, name="NVIDIA_H100.json"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A simulated H100 with an empty user folder and package folder, and run-time tuning stubbed."""
    user, package = tmp_path / "user", tmp_path / "package"
    monkeypatch.setattr(configs, "_active_device", lambda: H100)
    monkeypatch.setattr(configs, "config_dirs", lambda: [user, package])
    tuned = []

    def no_tuning(device, kernel, key, default):
        tuned.append((kernel, dict(key)))
        return None

    monkeypatch.setattr(configs, "_tune_at_run_time", no_tuning)
    configs.clear_cache()
    yield user, package, tuned
    configs.clear_cache()


def lookup(key=KEY, default=DEFAULT, kernel=KERNEL):
    return configs.get_config(kernel, dict(key), dict(default))


# ---------------------------------------------------------------------------------------------
# Device names, buckets, nearest rows
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, canonical", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA_H100"), ("NVIDIA H100 PCIe", "NVIDIA_H100"),
    ("NVIDIA H100 NVL", "NVIDIA_H100"), ("NVIDIA H200", "NVIDIA_H200"), ("NVIDIA H200 NVL", "NVIDIA_H200"),
    ("NVIDIA GH200 480GB", "NVIDIA_GH200_480GB"), ("NVIDIA A100-SXM4-80GB", "NVIDIA_A100_SXM4_80GB"),
])
def test_device_names(name, canonical):
    assert configs.canonical_device_name(name) == canonical
    assert configs.file_names(name)[-1] == canonical + ".json"
    assert configs.file_names("NVIDIA H100 PCIe")[0] == "NVIDIA_H100_PCIe.json"  # exact name first


@pytest.mark.parametrize("n, bucket", [(0, 1), (1, 1), (3, 4), (5, 4), (7, 8), (28, 32), (40, 32), (48, 64), (56, 64), (64, 64), (96, 128)])
def test_bucket_value_is_nearest_power_of_two_in_log2(n, bucket):
    assert configs.bucket_value(n) == bucket


def test_bucket_key_keeps_exact_fields():
    bucketed = configs.bucket_key(KEY, EXACT)
    assert bucketed == {**KEY, "B": 32, "C": 64, "G": 4, "H": 64, "W": 64}
    assert configs.bucket_key({**KEY, "K": 5}, EXACT)["K"] == 5  # K 5 and K 3 must not share a row
    assert configs.parse_key_string(configs.key_string(bucketed)) == bucketed


def test_nearest_row_prefers_own_bucket_then_log2_distance_within_exact_fields():
    rows = {configs.key_string({**KEY, "H": 64, "W": 64}): "own",
            configs.key_string({**KEY, "H": 16, "W": 16}): "far",
            configs.key_string({**KEY, "H": 128, "W": 64}): "near",
            configs.key_string({**KEY, "H": 64, "W": 64, "dtype_bytes": 4}): "other dtype"}
    assert configs.nearest_row(rows, KEY, EXACT)[1] == "own"
    del rows[configs.key_string({**KEY, "H": 64, "W": 64})]
    assert configs.nearest_row(rows, KEY, EXACT)[1] == "near"
    # Only rows with equal exact fields qualify, however close the rest.
    assert configs.nearest_row(rows, {**KEY, "dtype_bytes": 8}, EXACT) is None
    assert configs.nearest_row(rows, {**KEY, "dtype_bytes": 4, "H": 7}, EXACT)[1] == "other dtype"


def test_nearest_row_ignores_rows_of_another_key_layout():
    rows = {configs.key_string({"C": 64, "H": 64}): "foreign"}
    assert configs.nearest_row(rows, KEY, EXACT) is None


# ---------------------------------------------------------------------------------------------
# Lookup order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cuda, interpreted", [(False, False), (True, True)])
def test_cpu_and_interpreter_return_the_default_silently(monkeypatch, tmp_path, cuda, interpreted):
    monkeypatch.setattr(configs, "config_dirs", lambda: [tmp_path])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr("dynconv.kernels._launch.kernels_are_interpreted", lambda: interpreted)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    write(tmp_path, table_file([(KEY, cfg(BLOCK_W=64))]))
    configs.clear_cache()
    configs._gpu_usable.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert lookup() == DEFAULT
    finally:
        configs._gpu_usable.cache_clear()


def test_user_folder_beats_package_beats_tuning_beats_default(gpu, recwarn):
    user, package, tuned = gpu
    assert lookup() == DEFAULT and len(tuned) == 1
    write(package, table_file([(KEY, cfg(BLOCK_W=16))]))
    configs.clear_cache()
    assert lookup() == cfg(BLOCK_W=16)
    write(user, table_file([(KEY, cfg(BLOCK_W=64))]))
    configs.clear_cache()
    assert lookup() == cfg(BLOCK_W=64)
    assert len(tuned) == 1  # run-time tuning is not consulted while a file answers


def test_run_time_tuning_answer_is_used_and_warned_about(gpu, monkeypatch):
    monkeypatch.setattr(configs, "_tune_at_run_time", lambda *a: cfg(num_warps=8))
    with pytest.warns(configs.ConfigWarning, match="dynconv autotune"):
        assert lookup() == cfg(num_warps=8)


def test_exact_device_file_beats_canonical_file(gpu, monkeypatch):
    user, _, _ = gpu
    monkeypatch.setattr(configs, "_active_device", lambda: "NVIDIA H100 PCIe")
    write(user, table_file([(KEY, cfg(BLOCK_W=16))]), "NVIDIA_H100.json")
    write(user, table_file([(KEY, cfg(BLOCK_W=64))]), "NVIDIA_H100_PCIe.json")
    assert lookup() == cfg(BLOCK_W=64)


def test_other_gpus_file_is_not_used(gpu, recwarn):
    user, _, _ = gpu
    write(user, table_file([(KEY, cfg(BLOCK_W=64))]), "NVIDIA_H200.json")
    assert lookup() == DEFAULT


def test_nearest_bucket_is_used_for_a_key_not_in_the_table(gpu):
    user, _, tuned = gpu
    write(user, table_file([({**KEY, "H": 16, "W": 16}, cfg(BLOCK_W=16)), ({**KEY, "H": 128, "W": 128}, cfg(BLOCK_W=64))]))
    assert lookup({**KEY, "H": 64, "W": 64}) == cfg(BLOCK_W=64)  # 1 step from 128, 2 from 16
    assert lookup({**KEY, "H": 32, "W": 32}) == cfg(BLOCK_W=16)
    assert tuned == []


def test_a_file_without_rows_for_this_dtype_falls_through_to_the_next_source(gpu, recwarn):
    user, package, _ = gpu
    write(user, table_file([({**KEY, "dtype_bytes": 4}, cfg(BLOCK_W=64))]))
    write(package, table_file([(KEY, cfg(BLOCK_W=16))]))
    assert lookup() == cfg(BLOCK_W=16)


def test_answers_are_cached_and_copies(gpu, monkeypatch):
    user, _, _ = gpu
    write(user, table_file([(KEY, cfg(BLOCK_W=64))]))
    first = lookup()
    first["BLOCK_W"] = 1  # a caller mutating its answer must not change the next one
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert lookup() == cfg(BLOCK_W=64)
    assert opened == []


def test_lookup_overhead_is_about_a_microsecond(gpu):
    user, _, _ = gpu
    write(user, table_file([(KEY, cfg(BLOCK_W=64))]))
    lookup()
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        configs.get_config(KERNEL, KEY, DEFAULT)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} us per lookup"


def test_launcher_uses_the_tuned_config(gpu):
    user, _, _ = gpu
    x = torch.empty((32, 64, 56, 56), device="meta", dtype=torch.float16)
    key = inv.problem_key(x, 4, 15, (1, 1))
    tuned = cfg(BLOCK_G=1, BLOCK_CG=4, BLOCK_H=2, BLOCK_W=64, num_warps=2)
    write(user, table_file([(key, tuned)]))
    # K = 15 per-pixel: past what the NCHW (involution_nchw.py) and per-sample (dynamic_dwconv.py)
    # kernels take, so the generic kernel runs (their own tuned entries: the tests below).
    w = torch.empty((32, 4, 15, 15, 56, 56), device="meta", dtype=torch.float16)
    launch = inv.forward_launch(x, w, None, torch.empty_like(x), (1, 1), (7, 7), (1, 1))
    assert launch.name == "involution_fwd_kernel"
    assert {k: launch.meta[k] for k in ("BLOCK_G", "BLOCK_CG", "BLOCK_H", "BLOCK_W")} == {
        k: tuned[k] for k in ("BLOCK_G", "BLOCK_CG", "BLOCK_H", "BLOCK_W")}
    assert launch.num_warps == 2


def test_nchw_per_pixel_launcher_uses_its_own_tuned_config(gpu):
    """NCHW per-pixel calls take kernels/involution_nchw.py's kernels, tuned under their own name."""
    user, _, _ = gpu
    x = torch.empty((32, 64, 56, 56), device="meta", dtype=torch.float16)
    key = inv.problem_key(x, 4, 7, (1, 1))
    tuned = {"CH": 4, "STRIP": 2, "BLOCK_W": 64, "num_warps": 2, "num_stages": 1}
    write(user, table_file([(key, tuned)], kernel="involution_nchw_fwd"))
    w = torch.empty((32, 4, 7, 7, 56, 56), device="meta", dtype=torch.float16)
    launch = inv.forward_launch(x, w, None, torch.empty_like(x), (1, 1), (3, 3), (1, 1))
    assert launch.name == "involution_nchw_fwd_kernel"
    assert {k: launch.meta[k] for k in ("CH", "STRIP", "BLOCK_W")} == {"CH": 4, "STRIP": 2, "BLOCK_W": 64}
    assert launch.num_warps == 2
    # bf16 at even widths runs the pair kernel: not the single-pixel kernel's row (same key), its own.
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    with pytest.warns(configs.ConfigWarning, match="dynconv autotune"):  # a file without the pair table
        launch = inv.forward_launch(xb, wb, None, torch.empty_like(xb), (1, 1), (3, 3), (1, 1))
    assert launch.name == "involution_nchw_fwd_pairs_kernel" and launch.meta["CH"] != 4
    pairs_tuned = {"CH": 2, "STRIP": 4, "BLOCK_W": 64, "num_warps": 2, "num_stages": 1}
    write(user, table_file([(key, pairs_tuned)], kernel="involution_nchw_fwd_pairs"))
    configs.clear_cache()
    launch = inv.forward_launch(xb, wb, None, torch.empty_like(xb), (1, 1), (3, 3), (1, 1))
    assert {k: launch.meta[k] for k in ("CH", "STRIP", "BLOCK_W")} == {"CH": 2, "STRIP": 4, "BLOCK_W": 64}


# ---------------------------------------------------------------------------------------------
# Bad files: one warning, then the next source
# ---------------------------------------------------------------------------------------------

BAD_FILES = {
    "truncated": lambda: json.dumps(table_file([(KEY, cfg(BLOCK_W=64))]))[:-40],
    "not json": lambda: "\x00\x01garbage",
    "empty": lambda: "",
    "a list": lambda: "[]",
    "no kernels": lambda: json.dumps({k: v for k, v in table_file([]).items() if k != "kernels"}),
    "row without config": lambda: json.dumps({**table_file([]), "kernels": {KERNEL: {"exact": EXACT, "table": {configs.key_string(KEY): {}}}}}),
    "bad key": lambda: json.dumps({**table_file([]), "kernels": {KERNEL: {"exact": EXACT, "table": {"H:64": {"config": DEFAULT}}}}}),
    "other triton": lambda: json.dumps(table_file([(KEY, cfg(BLOCK_W=64))], triton_version="2.1.0")),
    "other schema": lambda: json.dumps(table_file([(KEY, cfg(BLOCK_W=64))], schema=configs.SCHEMA + 1)),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_warns_once_and_falls_back(gpu, kind):
    user, package, _ = gpu
    path = write(user, BAD_FILES[kind]())
    write(package, table_file([(KEY, cfg(BLOCK_W=16))]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup() == cfg(BLOCK_W=16)
        assert lookup({**KEY, "C": 512}) == cfg(BLOCK_W=16)
        assert lookup(kernel="involution_bwd_input") == DEFAULT
    file_warnings = [w for w in caught if str(path) in str(w.message)]
    assert len(file_warnings) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize("bad, reason", [
    (cfg(BLOCK_W=48), "power of two"),
    (cfg(BLOCK_W=0), "power of two"),
    (cfg(num_warps=3), "num_warps"),
    (cfg(num_warps=64), "num_warps"),
    (cfg(num_stages=0), "num_stages"),
    (cfg(BLOCK_W=True), "not an integer"),
    (cfg(BLOCK_W="32"), "not an integer"),
    ({k: v for k, v in DEFAULT.items() if k != "BLOCK_G"}, "differ"),
    (cfg(BLOCK_M=16), "differ"),
    (cfg(BLOCK_G=64, BLOCK_CG=64, BLOCK_H=64, BLOCK_W=64), "exceeds"),
])
def test_invalid_config_in_file_is_not_used(gpu, bad, reason):
    user, _, _ = gpu
    path = write(user, table_file([(KEY, bad)]))
    assert reason in "; ".join(configs.config_problems(bad, DEFAULT))
    with pytest.warns(configs.ConfigWarning) as caught:
        assert lookup() == DEFAULT
    assert any(str(path) in str(w.message) and reason in str(w.message) for w in caught)


def test_fallback_warns_once_per_gpu_and_names_the_command(gpu):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kernel in ("involution_fwd", "involution_bwd_input", "dwconv_bwd_weight"):
            for c in (64, 128, 256):
                assert lookup({**KEY, "C": c}, kernel=kernel) == DEFAULT
    messages = [str(w.message) for w in caught if issubclass(w.category, configs.ConfigWarning)]
    assert len(messages) == 1 and "dynconv autotune" in messages[0] and H100 in messages[0]


def test_a_cuda_graph_capture_gets_the_default_without_poisoning_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(configs, "_active_device", lambda: H100)
    monkeypatch.setattr(configs, "config_dirs", lambda: [tmp_path])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    configs.clear_cache()
    assert lookup() == DEFAULT
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(configs, "_time_candidates", lambda space, key, default: cfg(num_warps=8))
    with pytest.warns(configs.ConfigWarning):
        assert lookup() == cfg(num_warps=8)
    configs.clear_cache()


# ---------------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------------

def test_atomic_write_leaves_no_temporary_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "gpu.json"
    configs.atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        configs.atomic_write_json(path, {"a": object()})  # fails while serialising
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["gpu.json"]


def _writer(path, tag, rounds):
    # ~1 MB per write, so a non-atomic write would be seen half done by the reader.
    payload = {"writer": tag, "rows": [tag * 7] * 120_000}
    for _ in range(rounds):
        configs.atomic_write_json(path, payload)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "gpu.json"
    configs.atomic_write_json(path, {"writer": "start", "rows": []})
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(path, tag, 15)) for tag in ("a", "b")]
    for w in writers:
        w.start()
    reads = set()
    while any(w.is_alive() for w in writers):
        data = json.loads(path.read_text())  # raises on a torn file
        assert data["writer"] == "start" or data["rows"] == [data["writer"] * 7] * 120_000
        reads.add(data["writer"])
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert json.loads(path.read_text())["writer"] in ("a", "b")
    assert len(reads) >= 2, "the reader never overlapped a writer; the test proved nothing"
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]


def test_merge_keeps_rows_a_partial_sweep_did_not_measure(tmp_path):
    path = write(tmp_path, table_file([(KEY, cfg(BLOCK_W=16)), ({**KEY, "C": 512}, cfg(BLOCK_W=8))]))
    fresh = table_file([(KEY, cfg(BLOCK_W=64))])
    fresh["kernels"]["dwconv_bwd_weight"] = {"exact": EXACT, "table": {}}
    merged = configs.merge_into(path, fresh)["kernels"]
    row = lambda key: merged[KERNEL]["table"][configs.key_string(configs.bucket_key(key, EXACT))]["config"]  # noqa: E731
    assert row(KEY) == cfg(BLOCK_W=64)
    assert row({**KEY, "C": 512}) == cfg(BLOCK_W=8)
    assert "dwconv_bwd_weight" in merged
    write(tmp_path, table_file([(KEY, cfg(BLOCK_W=16))], triton_version="2.0.0"))
    assert configs.merge_into(path, fresh) == fresh  # rows from another triton are not carried over


# ---------------------------------------------------------------------------------------------
# The sweep's pieces that need no GPU
# ---------------------------------------------------------------------------------------------

def _kernel_modules():
    """Every loaded module of dynconv.kernels (the launchers dispatch to modules of their own, e.g.
    dynamic_dwconv and involution_nchw, which each read their tuned configs)."""
    return [m for name, m in sorted(sys.modules.items()) if name.startswith("dynconv.kernels.")]


def test_every_kernel_has_a_space_and_its_grid_keys_match_the_launchers(monkeypatch):
    spaces = configs.spaces()
    assert set(spaces) >= {"involution_fwd", "involution_bwd_input", "involution_bwd_weight", "dwconv_bwd_weight",
                           "expert_conv_fwd", "expert_conv_bwd_input", "expert_conv_bwd_weight",
                           "involution_fused_fwd", "involution_fused_bwd_input", "involution_fused_bwd_z",
                           "involution_fused_bwd_span"}
    cases = autotune.build_grid(spaces, None, ["float16"], quick=True)
    assert {c.kernel for c in cases} == set(spaces) - idle_tuning_spaces()
    for case in cases:
        assert case.candidates[0] == case.default
        assert all(not configs.config_problems(c, case.default, spaces[case.kernel].free_blocks)
                   for c in case.candidates)
        # the launcher, asked with no config, computes this very key
        seen = []
        space = spaces[case.kernel]
        tensors = space.inputs(case.spec, torch.float16, "meta")
        for module in _kernel_modules():
            if hasattr(module, "get_config"):
                monkeypatch.setattr(module, "get_config", lambda kernel, key, default: seen.append((kernel, key)) or default)
        space.launch(case.spec, tensors, None)
        assert seen == [(case.kernel, case.key)]



def test_tuned_tables_do_not_displace_the_fused_halo_kernels(monkeypatch):
    """The fused spaces tune per-tap tiles, never timed against the halo kernels: the launchers ask
    no table where the halo kernels run, and the sweep leaves those problems out."""
    from dynconv.kernels import involution_fused as fused

    fused_kernels = ("involution_fused_fwd", "involution_fused_bwd_input", "involution_fused_bwd_z",
                     "involution_fused_bwd_span")
    spaces = {name: space for name, space in configs.spaces().items() if name in fused_kernels}
    cases = autotune.build_grid(spaces, None, ["float16"], quick=True)
    assert {case.kernel for case in cases} == set(fused_kernels)
    swept = {(case.kernel, case.label) for case in cases}
    asked = []
    monkeypatch.setattr(fused, "get_config", lambda kernel, key, default: asked.append(kernel) or default)
    for name, space in spaces.items():
        for problem in space.problems(True):
            tensors = space.inputs(problem.spec, torch.float16, "meta")
            asked.clear()
            launch = space.launch(problem.spec, tensors, None)
            halo = "_halo_" in launch.name
            assert halo == (not space.reads_table(problem.spec, tensors)), (name, problem.label)
            assert ((name, problem.label) in swept) == (not halo) == bool(asked), (name, problem.label, asked)
    assert any("R1" in problem.label and (name, problem.label) not in swept
               for name, space in spaces.items() for problem in space.problems(True))


def test_fused_involution_keys_on_both_stride_components():
    from dynconv.kernels import involution_fused as fused

    space = configs.spaces()["involution_fused_fwd"]
    x = torch.empty((8, 64, 32, 32), device="meta")
    square, wide = fused.problem_key(x, 4, 3, 16, (1, 1)), fused.problem_key(x, 4, 3, 16, (1, 2))
    assert (wide["stride_h"], wide["stride_w"]) == (1, 2)
    table = {configs.key_string(configs.bucket_key(square, space.exact)): {"config": {}}}
    # A (1, 2) layer must not borrow the (1, 1) layer's row, nor the (2, 1) layer's.
    assert configs.nearest_row(table, wide, space.exact) is None
    assert configs.nearest_row({configs.key_string(configs.bucket_key(fused.problem_key(x, 4, 3, 16, (2, 1)),
                                                                      space.exact)): {"config": {}}},
                               wide, space.exact) is None
    # The representative problem of a non-square key has that very key (run-time tuning and
    # the file check build their problems from it).
    for name in ("involution_fused_fwd", "involution_fused_bwd_input", "involution_fused_bwd_z",
                 "involution_fused_bwd_span"):
        space = configs.spaces()[name]
        key = dict(B=8, C=64, G=4, R=16, H=32, W=16, K=3, stride_h=1, stride_w=2, channels_last=0, dtype_bytes=2)
        spec, dtype = space.spec_for_key(key)
        assert space.key(spec, space.inputs(spec, dtype, "meta")) == key, name


def _borrows_across_strides(space, key_for) -> bool:
    """Whether a (1, 2) layer finds the row of a (1, 1) or a (2, 1) layer of equal shape."""
    wide = key_for((1, 2))
    assert (wide["stride_h"], wide["stride_w"]) == (1, 2)
    return any(configs.nearest_row({configs.key_string(configs.bucket_key(key_for(other), space.exact)): {"config": {}}},
                                   wide, space.exact) is not None
               for other in ((1, 1), (2, 1)))


def _round_trips(space, key) -> bool:
    # Run-time tuning and the file check build their problems from the key: it must be that very key.
    spec, dtype = space.spec_for_key(key)
    return space.key(spec, space.inputs(spec, dtype, "meta")) == key


def test_involution_keys_on_both_stride_components():
    x = torch.empty((8, 64, 32, 32), device="meta")
    assert not _borrows_across_strides(configs.spaces()["involution_fwd"], lambda s: inv.problem_key(x, 4, 7, s))
    for name in ("involution_fwd", "involution_bwd_input", "involution_bwd_weight", "dwconv_fwd", "dwconv_bwd_input",
                 "dwconv_bwd_weight", "involution_nchw_fwd", "involution_nchw_bwd_input", "involution_nchw_bwd_input_pairs",
                 "involution_nchw_bwd_weight", "involution_nchw_bwd_weight_pairs"):
        for sh, sw in ((1, 2), (2, 1)):
            key = dict(B=8, C=64, G=4, H=32, W=16, K=7, stride_h=sh, stride_w=sw, channels_last=0, dtype_bytes=2)
            assert _round_trips(configs.spaces()[name], key), (name, sh, sw)


def test_nchw_involution_kernels_look_up_the_key_they_are_tuned_under():
    """The NCHW per-pixel kernels ask get_config with the tuner's key, and their candidates start
    with the default and split the group's channels exactly."""
    from dynconv.kernels import involution_nchw

    x = torch.empty((8, 48, 32, 32), device="meta", dtype=torch.bfloat16)
    assert involution_nchw._key(x, 4, 7, (1, 2)) == inv.problem_key(x, 4, 7, (1, 2))
    for name in ("involution_nchw_fwd", "involution_nchw_fwd_pairs", "involution_nchw_bwd_input",
                 "involution_nchw_bwd_input_pairs", "involution_nchw_bwd_weight", "involution_nchw_bwd_weight_pairs"):
        space = configs.spaces()[name]
        key = inv.problem_key(x, 4, 7, (1, 1))
        candidates = space.candidates(key, False)
        spec, dtype = space.spec_for_key(key)
        assert candidates[0] == space.default(spec, space.inputs(spec, dtype, "meta"))
        assert all(12 % c["CH"] == 0 and c["BLOCK_W"] == 32 * c["num_warps"] for c in candidates)


def test_nchw_involution_tuning_default_is_the_launchers_default(monkeypatch):
    """bf16 at even widths runs the forward's pair kernel (and, at stride 1, the input gradient's, at
    column stride 1 the weight gradient's), whose defaults differ from the single-pixel kernels': each is tuned under its own
    name, in bf16, on the problems that run it, and each table's baseline (and bound on the
    candidates' sums) is the default of the kernel that runs."""
    from dynconv.kernels import involution_nchw

    for dtype, width, name in ((torch.bfloat16, 32, "involution_nchw_fwd_pairs"), (torch.bfloat16, 31, "involution_nchw_fwd"),
                               (torch.float16, 32, "involution_nchw_fwd"), (torch.float32, 32, "involution_nchw_fwd")):
        x = torch.empty((8, 64, 32, width), device="meta", dtype=dtype)
        w = torch.empty((8, 4, 7, 7, 32, width), device="meta", dtype=dtype)
        launch = involution_nchw.forward_launch(x, w, None, torch.empty_like(x), (1, 1), (3, 3), (1, 1), False)
        assert launch.name == ("involution_nchw_fwd_pairs_kernel" if name.endswith("pairs") else "involution_nchw_fwd_kernel")
        space = configs.spaces()[name]
        key = inv.problem_key(x, 4, 7, (1, 1))
        spec, timed = space.spec_for_key(key)
        ts = space.inputs(spec, timed, "meta")
        assert space.launch(spec, ts, space.default(spec, ts)).name == launch.name, (dtype, width)
        default = space.default(spec, ts)
        assert (launch.meta["CH"], launch.meta["STRIP"]) == (default["CH"], default["STRIP"]), (dtype, width)
        assert all(c["CH"] * c["STRIP"] <= default["CH"] * default["STRIP"] for c in space.candidates(key, False))
    # The weight gradient's pair kernel: bf16, even widths, column stride 1; the input gradient's:
    # bf16, even widths, stride 1, triton 3.6 or older.
    dx_pairs = "involution_nchw_bwd_input_pairs" if involution_nchw.DX_PAIRS else "involution_nchw_bwd_input"
    cases = [(kind, dtype, stride, name)
             for kind, pairs, single in (("dw", "involution_nchw_bwd_weight_pairs", "involution_nchw_bwd_weight"),
                                         ("dx", dx_pairs, "involution_nchw_bwd_input"))
             for dtype, stride, name in ((torch.bfloat16, 1, pairs), (torch.bfloat16, 2, single),
                                         (torch.float16, 1, single))]
    for kind, dtype, stride, name in cases:
        x = torch.empty((8, 64, 32, 32), device="meta", dtype=dtype)
        out = (32 - 1) // stride + 1
        dy = torch.empty((8, 64, out, out), device="meta", dtype=dtype)
        w = torch.empty((8, 4, 7, 7, out, out), device="meta", dtype=dtype)
        geometry = ((stride, stride), (3, 3), (1, 1), False)
        launch = (involution_nchw.backward_weight_launch(dy, x, w, *geometry) if kind == "dw"
                  else involution_nchw.backward_input_launch(dy, w, x, *geometry))
        assert launch.name == name + "_kernel", (kind, dtype, stride)
        space = configs.spaces()[name]
        spec, timed = space.spec_for_key(inv.problem_key(x, 4, 7, (stride, stride)))
        ts = space.inputs(spec, timed, "meta")
        default = space.default(spec, ts)
        assert space.launch(spec, ts, default).name == launch.name, (kind, dtype, stride)
        assert (launch.meta["CH"], launch.meta["STRIP"]) == (default["CH"], default["STRIP"]), (kind, dtype, stride)
    # The pair tables' problems all run their pair kernel; a float32 request times it once, in bf16.
    # (The input gradient's table has problems where its launcher runs the pair kernel: triton <= 3.6.)
    from dynconv.autotune import build_grid

    monkeypatch.setattr(involution_nchw, "DX_PAIRS", True)

    # The weight gradient's pair kernel has none: at the sweep's shapes (16 channels a group, K = 7) the
    # entry point copies dy and x to channels_last and runs the channels_last kernel (weight_grad_copies).
    assert not build_grid({"involution_nchw_bwd_weight_pairs": configs.spaces()["involution_nchw_bwd_weight_pairs"]},
                          None, ["bfloat16"], quick=False)
    for name in ("involution_nchw_fwd_pairs", "involution_nchw_bwd_input_pairs"):
        cases = build_grid({name: configs.spaces()[name]}, None, ["float16", "bfloat16", "float32"], quick=False)
        assert cases and {case.dtype for case in cases} == {"bfloat16"}
        assert len({(case.label, tuple(case.key.items())) for case in cases}) == len(cases)
        assert all(case.spec["W"] % 2 == 0 for case in cases)
        for case in cases:
            ts = configs.spaces()[name].inputs(case.spec, torch.bfloat16, "meta")
            launch = configs.spaces()[name].launch(case.spec, ts, configs.spaces()[name].default(case.spec, ts))
            assert launch.name == name + "_kernel", case.label


def test_region_conv_forward_has_a_tuning_space_and_uses_its_rows(gpu):
    """DRConv's region forward is swept on the DRConv layers, from the launcher's own default, and a
    tuned row reaches the launcher."""
    from dynconv.autotune import build_grid
    from dynconv.kernels import region_conv

    space = configs.spaces()["region_conv_fwd"]
    cases = build_grid({"region_conv_fwd": space}, None, ["float16", "float32"], quick=False)
    assert cases and all(case.spec["m"] > 1 for case in cases)
    for case in cases:
        ts = space.inputs(case.spec, getattr(torch, case.dtype), "meta")
        key = space.key(case.spec, ts)
        own = region_conv.default_forward_config(case.spec["Cout"] // case.spec["groups"],
                                                 case.spec["Cin"] // case.spec["groups"], ts["x"].dtype,
                                                 case.spec["channels_last"])
        assert case.candidates[0] == case.default == own
        assert len(case.candidates) > 1 and not any(space.rules(c, key) for c in case.candidates)
        assert space.launch(case.spec, ts, case.candidates[1]).name == "region_conv_fwd_kernel"
    user, _, _ = gpu
    case = cases[0]
    ts = space.inputs(case.spec, getattr(torch, case.dtype), "meta")
    key = space.key(case.spec, ts)
    tuned = dict(case.candidates[1])
    write(user, table_file([(key, tuned)], kernel="region_conv_fwd"))
    geometry = ((1, 1), (1, 1), (1, 1))
    assert region_conv.forward_config(ts["x"], ts["experts"], case.spec["m"], case.spec["groups"], *geometry) == tuned


def test_drconv_column_product_has_a_tuning_space_and_uses_its_rows(gpu):
    """DRConv's input-gradient column product is swept on the DRConv layers from its launcher's
    default, keyed by dx as the op keys it, and a tuned row reaches the launcher."""
    from dynconv.autotune import build_grid
    from dynconv.kernels import region_conv_input_grad

    space = configs.spaces()["region_conv_columns"]
    cases = build_grid({"region_conv_columns": space}, None, ["float16", "float32"], quick=False)
    assert cases and all(case.spec["m"] > 1 for case in cases)
    for case in cases:
        ts = space.inputs(case.spec, getattr(torch, case.dtype), "meta")
        key = space.key(case.spec, ts)
        assert case.candidates[0] == case.default == region_conv_input_grad.default_columns_config(ts["dx"].dtype)
        assert len(case.candidates) > 1 and not any(space.rules(c, key) for c in case.candidates)
        launch = space.launch(case.spec, ts, case.candidates[1])
        assert launch.name == "region_conv_columns_kernel" and launch.meta["BLOCK_P"] == case.candidates[1]["BLOCK_P"]
    user, _, _ = gpu
    case = cases[0]
    ts = space.inputs(case.spec, getattr(torch, case.dtype), "meta")
    tuned = dict(case.candidates[1])
    write(user, table_file([(space.key(case.spec, ts), tuned)], kernel="region_conv_columns"))
    assert region_conv_input_grad.columns_config(ts["dx"], ts["experts"], case.spec["m"], case.spec["groups"],
                                                 (1, 1)) == tuned


def test_drconv_input_gradient_is_timed_on_the_op_s_region_kernels():
    """DRConv's input gradient runs by columns where they fit: the sweep leaves its layers out of
    the expert input-gradient kernel's grid. Where they do not (run-time tuning of a fallback
    layer), the space times that kernel as the op runs it (region_conv.region_backward_input):
    materialised region kernels of the first part of the batch, Cout innermost, dy channels_last."""
    from dynconv.autotune import build_grid
    from dynconv.kernels import region_conv

    space = configs.spaces()["expert_conv_bwd_input"]
    grid = build_grid({"expert_conv_bwd_input": space}, None, ["float16"], quick=False)
    assert grid and not [c for c in grid if c.spec["m"] > 1]
    spec = dict(B=32, Cin=128, Cout=128, H=28, W=28, kh=3, kw=3, E=8, m=8, groups=1, stride=(1, 1), bias=True,
                channels_last=False)
    ts = space.inputs(spec, torch.float16, "meta")
    launch = space.launch(spec, ts, None)
    part = region_conv.batch_part(spec["B"], spec["m"], ts["experts"][0].numel(), 2)
    assert not launch.meta["MIX"] and launch.meta["HAS_GUIDE"]
    assert launch.args["dx_ptr"].shape[0] == part and launch.args["sw_o"] == 1
    assert launch.args["dy_ptr"].is_contiguous(memory_format=torch.channels_last)


def test_expert_sweep_times_nchw_layers_as_the_op_runs_them():
    """An NCHW pass that reads a channels_last copy is timed on the copy, under the copy's row (the
    one the op looks up); a pass the op runs in row boxes (no table) is not swept; the kernel gradient
    is timed on the operands it reads (dy in place beside x's copy at E2), and not at all where it
    copies both (the very launch of the layer's channels_last problem)."""
    from dynconv.kernels import expert_conv_weight_grad as ecw

    spaces = {name: space for name, space in configs.spaces().items() if name.startswith("expert_conv")}
    grid = {(case.kernel, case.label): case for case in autotune.build_grid(spaces, None, ["float16"], quick=False)}
    e1, e2 = "E1 CondConv ResNet stage 3 3x3", "E2 DynamicConv ResNet stage 2 3x3"
    assert ("expert_conv_fwd", f"{e2} NCHW") not in grid and ("expert_conv_bwd_input", f"{e2} NCHW") not in grid
    assert ("expert_conv_fwd", f"{e2} NHWC") in grid
    d1_dw = [label for kernel, label in grid if kernel == "expert_conv_bwd_weight" and label.startswith("D1 ")]
    assert d1_dw and all(label.endswith("NHWC") for label in d1_dw)

    def launch(kernel, label):
        case = grid[(kernel, label)]
        space = spaces[kernel]
        return case, space.launch(case.spec, space.inputs(case.spec, torch.float16, "meta"), case.default)

    cl = lambda t: t.is_contiguous(memory_format=torch.channels_last)  # noqa: E731
    case, fwd = launch("expert_conv_fwd", f"{e1} NCHW")
    assert case.key["channels_last"] == 1 and cl(fwd.args["x_ptr"]) and not cl(fwd.args["y_ptr"])
    case, dx = launch("expert_conv_bwd_input", f"{e1} NCHW")
    assert case.key["channels_last"] == 1 and cl(dx.args["dy_ptr"]) and not cl(dx.args["dx_ptr"])
    for label in (f"{e1} NCHW", f"{e2} NCHW"):
        case, dw = launch("expert_conv_bwd_weight", label)
        ts = spaces["expert_conv_bwd_weight"].inputs(case.spec, torch.float16, "meta")
        op = ecw.default_launch(ts["dy"], ts["x"], ts["experts"], case.spec["m"], case.spec["groups"],
                                ((1, 1), (1, 1), (1, 1)))
        assert case.key["channels_last"] == 1 and dw.meta["DY_FLAT"] and dw.meta == op.meta, label
        assert cl(dw.args["x_ptr"]) and not cl(dw.args["dy_ptr"]), label


def test_expert_conv_keys_on_both_stride_components():
    from dynconv.kernels import expert_conv as ec

    x, experts = torch.empty((8, 64, 32, 32), device="meta"), torch.empty((4, 64, 64, 3, 3), device="meta")
    space = configs.spaces()["expert_conv_fwd"]
    assert not _borrows_across_strides(space, lambda s: ec.problem_key(x, experts, 1, 1, s))
    for name in ("expert_conv_fwd", "expert_conv_bwd_input", "expert_conv_bwd_weight"):
        space = configs.spaces()[name]
        for sh, sw in ((1, 2), (2, 1)):
            # bwd_weight's launcher keys the problem with one expert (see expert_conv_tuning).
            E = 1 if name == "expert_conv_bwd_weight" else 4
            key = dict(B=8, Cin=64, Cout=128, H=32, W=16, kh=3, kw=3, E=E, m=1, groups=1, depthwise=0,
                       stride_h=sh, stride_w=sw, channels_last=1, dtype_bytes=2)
            assert _round_trips(space, key), (name, sh, sw)
            # NCHW: the forward reads x in place at this stride; the gradients read channels_last
            # copies of dy (dx) and x (dW), so they look up (and are tuned under) the copy's row.
            spec, dtype = space.spec_for_key({**key, "channels_last": 0})
            rebuilt = space.key(spec, space.inputs(spec, dtype, "meta"))
            assert rebuilt == {**key, "channels_last": int(name != "expert_conv_fwd")}, (name, sh, sw)


def test_expert_conv_grouped_layers_find_the_nearest_grouped_row_and_depthwise_only_its_own():
    from dynconv.kernels import expert_conv as ec

    space = configs.spaces()["expert_conv_fwd"]

    def key(cin, groups, hw=28):
        x = torch.empty((64, cin, hw, hw), device="meta")
        return ec.problem_key(x, torch.empty((4, cin, cin // groups, 3, 3), device="meta"), 1, groups, (1, 1))

    dense, grouped = key(256, 1), key(256, 32)
    table = {configs.key_string(configs.bucket_key(k, space.exact)): {"config": {"from": name}}
             for name, k in (("dense", dense), ("grouped", grouped))}

    def row(k):
        found = configs.nearest_row(table, k, space.exact)
        return found and found[1]["config"]["from"]

    # Group counts the sweep never saw take the tuned grouped row (they used to miss every row).
    assert row(key(256, 16)) == row(key(512, 64)) == row(key(128, 32, hw=56)) == "grouped"
    assert row(key(256, 2)) == row(key(512, 1, hw=14)) == "dense"
    # A depth-wise layer takes neither: its tiles are shaped like no other's.
    assert key(256, 256)["depthwise"] == 1 and row(key(256, 256)) is None
    # The sweep has a grouped problem, and a bucketed key's representative problem keeps its groups.
    assert any(p.spec["groups"] > 1 for p in space.problems(False))
    for k in (grouped, key(96, 96), key(192, 24)):
        bucketed = configs.bucket_key(k, space.exact)
        spec, dtype = space.spec_for_key(bucketed)
        rebuilt = space.key(spec, space.inputs(spec, dtype, "meta"))
        assert (rebuilt["groups"], rebuilt["depthwise"]) == (bucketed["groups"], k["depthwise"])

def test_choose_takes_the_best_geometric_mean_within_a_bucket():
    a, b = tuple(cfg(BLOCK_W=16).items()), tuple(cfg(BLOCK_W=64).items())
    d = tuple(DEFAULT.items())
    small = autotune.Case(KERNEL, "s", {}, "float16", {**KEY, "H": 56, "W": 56}, DEFAULT, [], {a: 1.0, b: 1.5, d: 2.0})
    large = autotune.Case(KERNEL, "l", {}, "float16", {**KEY, "H": 64, "W": 64}, DEFAULT, [], {a: 4.0, b: 2.0, d: 4.0})
    only_a = autotune.Case(KERNEL, "o", {}, "float16", {**KEY, "C": 512}, DEFAULT, [], {a: 3.0, d: 6.0})
    spaces = {KERNEL: configs.KernelSpace(*[None] * 7, exact=tuple(EXACT))}
    table = autotune.choose([small, large, only_a], spaces)[KERNEL]["table"]
    both = table[configs.key_string(configs.bucket_key(KEY, EXACT))]
    # a: geomean(1, 2) = 1.41; b: geomean(1.5, 1) = 1.22 -> b, though a wins the sum of times
    assert both["config"] == dict(b) and both["ms"] == 3.5 and both["default_ms"] == 6.0
    assert table[configs.key_string(configs.bucket_key({**KEY, "C": 512}, EXACT))]["config"] == dict(a)


def test_autotune_without_a_gpu_exits_non_zero_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("dynconv.kernels._launch.kernels_are_interpreted", lambda: False)
    assert autotune.main(["--quick"]) != 0
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "dynconv autotune" in err


def test_autotune_under_the_interpreter_refuses(monkeypatch, capsys):
    monkeypatch.setattr("dynconv.kernels._launch.kernels_are_interpreted", lambda: True)
    assert autotune.main([]) != 0
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_autotune_rejects_unknown_dtypes():
    with pytest.raises(SystemExit) as exc:
        autotune.main(["--dtypes", "float8"])
    assert exc.value.code != 0


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------

SHIPPED = sorted(configs.package_config_dir().glob("*.json"))


def check_files(*paths):
    """`dynconv autotune --check` in a fresh interpreter: this suite runs the Triton interpreter,
    which cannot compile for sm_90, and the switch is read at import."""
    done = run_without_interpreter(["-m", "dynconv.autotune", "--check", *map(str, paths)], timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(not SHIPPED, reason="no config files are shipped yet")
def test_shipped_configs_validate_and_compile_for_sm90_without_spills():
    status, output = check_files(*SHIPPED)
    assert status == 0, output


def test_the_file_check_catches_a_spilling_and_an_invalid_config(tmp_path):
    key = {**KEY, "C": 256, "G": 16, "H": 14, "W": 14}
    ok = inv.default_config(256, 16, 14, 14, False)
    spills = {**ok, "BLOCK_G": 1, "BLOCK_CG": 16, "BLOCK_H": 16, "BLOCK_W": 32, "num_warps": 1}
    good = write(tmp_path / "good", table_file([(key, ok)]))
    bad = write(tmp_path / "bad", table_file([(key, ok), ({**key, "C": 512}, spills), ({**key, "C": 1024}, cfg(BLOCK_W=24))]))
    status, output = check_files(good)
    assert status == 0, output
    status, output = check_files(bad)
    assert status == 1 and "2 problem(s)" in output, output
    assert "C=512" in output and "spills" in output and "C=1024" in output and "power of two" in output
