"""Hostile and invalid config files (kernels/configs.py): whatever sits under a config file's name,
a lookup answers at once with one warning and falls back; a row the kernel could not compile is
refused by the same rules its tuning space prunes candidates with.

A GPU is simulated as in test_configs.py: the lookup's active device is patched and run-time
tuning is stubbed, so nothing is timed or compiled.
"""
from __future__ import annotations

import json
import os
import threading
import warnings

import pytest
import torch

from dynconv import autotune
from dynconv.kernels import configs
from helpers import idle_tuning_spaces

H100 = "NVIDIA H100 80GB HBM3"
NAME = "NVIDIA_H100.json"
KERNEL = "involution_fwd"
EXACT = ["K", "stride_h", "stride_w", "channels_last", "dtype_bytes"]
DEFAULT = {"BLOCK_G": 1, "BLOCK_CG": 16, "BLOCK_H": 4, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1}
TUNED = {**DEFAULT, "BLOCK_W": 16}
KEY = {"B": 32, "C": 64, "G": 4, "H": 56, "W": 56, "K": 7, "stride_h": 1, "stride_w": 1, "channels_last": 0,
       "dtype_bytes": 2}


def table(kernel, exact, rows) -> dict:
    return configs.new_file(H100, {kernel: {"exact": list(exact), "table": {
        configs.key_string(configs.bucket_key(key, exact)): {"config": config} for key, config in rows}}})


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A simulated H100: a user folder (where the hostile files go) before a package folder that
    holds a good file, so a fallback is visible as the package's answer."""
    user, package = tmp_path / "user", tmp_path / "package"
    user.mkdir()
    package.mkdir()
    (package / NAME).write_text(json.dumps(table(KERNEL, EXACT, [(KEY, TUNED)])))
    monkeypatch.setattr(configs, "_active_device", lambda: H100)
    monkeypatch.setattr(configs, "config_dirs", lambda: [user, package])
    monkeypatch.setattr(configs, "_tune_at_run_time", lambda *args: None)
    configs.clear_cache()
    yield user
    configs.clear_cache()


def without_hanging(fn):
    """``fn()`` on a thread, so that a hang (a FIFO opened for reading) fails the test instead of
    stopping the suite; the test releases such a reader by opening the FIFO's writing end."""
    result, errors = [], []

    def run():
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "hangs"
    if errors:
        raise errors[0]
    return result[0]


def lookup_twice(kernel=KERNEL, key=KEY, default=DEFAULT):
    """Two lookups (a second must not warn again). Returns (answers, config warning messages)."""
    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answers = [configs.get_config(kernel, dict(key), dict(default)) for _ in range(2)]
        return answers, [str(w.message) for w in caught if issubclass(w.category, configs.ConfigWarning)]
    return without_hanging(run)


def release(path):
    """Unblock a reader stuck opening the FIFO at ``path`` (only a broken reader waits there)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE = {
    "fifo": lambda path: os.mkfifo(path),
    "symlink to /dev/zero": lambda path: os.symlink("/dev/zero", path),
    "directory": lambda path: path.mkdir(),
    "100,000-deep array": lambda path: path.write_text(deep_array(100_000)),
    "over the size cap": lambda path: (path.touch(), os.truncate(path, configs.MAX_FILE_BYTES + 1)),  # sparse
    "bad utf-8": lambda path: path.write_bytes(b'{"schema": "\xff"}'),
}
REASON = {"fifo": "not a regular file", "symlink to /dev/zero": "not a regular file",
          "directory": "not a regular file", "100,000-deep array": "nested too deeply",
          "over the size cap": "more than", "bad utf-8": "utf-8"}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_file_gives_one_warning_and_the_next_source(gpu, kind):
    path = gpu / NAME
    HOSTILE[kind](path)
    try:
        answers, messages = lookup_twice()
    finally:
        if kind == "fifo":
            release(path)
    assert answers == [TUNED, TUNED]
    assert len(messages) == 1 and str(path) in messages[0], messages
    assert REASON[kind] in messages[0].lower(), messages[0]


def test_a_deep_but_parseable_file_is_refused_by_structure(gpu):
    (gpu / NAME).write_text(json.dumps({"schema": configs.SCHEMA, "kernels": json.loads(deep_array(500))}))
    answers, messages = lookup_twice()
    assert answers == [TUNED, TUNED] and len(messages) == 1


@pytest.mark.parametrize("kind", ["fifo", "100,000-deep array", "directory"])
def test_autotune_merge_and_check_survive_a_hostile_old_file(tmp_path, kind):
    path = tmp_path / NAME
    HOSTILE[kind](path)
    fresh = table(KERNEL, EXACT, [(KEY, TUNED)])
    try:
        assert without_hanging(lambda: configs.merge_into(path, fresh)) == fresh
        problems = without_hanging(lambda: autotune.check_file(path))
    finally:
        if kind == "fifo":
            release(path)
    assert len(problems) == 1 and "cannot read" in problems[0], problems


# ---------------------------------------------------------------------------------------------
# Rows the kernel cannot run
# ---------------------------------------------------------------------------------------------

def expert_fwd_problem():
    """The first quick expert_conv_fwd problem in fp16: (space, key, default)."""
    space = configs.spaces()["expert_conv_fwd"]
    spec = space.problems(True)[0].spec
    tensors = space.inputs(spec, torch.float16, "meta")
    return space, space.key(spec, tensors), space.default(spec, tensors)


def test_an_expert_conv_row_with_a_contraction_tl_dot_cannot_compile_is_refused(gpu):
    """BLOCK_K = 8 in fp16 passes the generic checks (a power of two, within limits) but tl.dot
    needs K >= 16: the space's rules refuse it, with one warning, and the default is used."""
    space, key, default = expert_fwd_problem()
    bad = {**default, "BLOCK_K": 8}
    assert configs.config_problems(bad, default) == []
    (gpu / NAME).write_text(json.dumps(table("expert_conv_fwd", space.exact, [(key, bad)])))
    answers, messages = lookup_twice("expert_conv_fwd", key, default)
    assert answers == [default, default]
    # One warning for the row; the other says no source had a usable config (the package has none).
    about_row = [m for m in messages if str(gpu / NAME) in m]
    assert len(about_row) == 1 and "BLOCK_K=8" in about_row[0] and "tl.dot" in about_row[0], messages


def test_the_file_check_refuses_the_row_by_the_same_rules(tmp_path):
    space, key, default = expert_fwd_problem()
    path = tmp_path / NAME
    path.write_text(json.dumps(table("expert_conv_fwd", space.exact, [(key, {**default, "BLOCK_K": 8})])))
    problems = autotune.check_file(path)  # refused before any compile, so this runs on CPU
    assert len(problems) == 1 and "BLOCK_K=8" in problems[0] and "tl.dot" in problems[0], problems


def test_a_fused_row_that_leaves_the_defaults_dot_path_is_refused(gpu):
    space = configs.spaces()["involution_fused_fwd"]
    spec = space.problems(True)[0].spec
    tensors = space.inputs(spec, torch.float16, "meta")
    key, default = space.key(spec, tensors), space.default(spec, tensors)
    bad = {**default, "BLOCK_R": 8}  # a contraction under 16 switches the weight product off tl.dot
    assert configs.config_problems(bad, default) == [] and space.rules(bad, key)
    (gpu / NAME).write_text(json.dumps(table("involution_fused_fwd", space.exact, [(key, bad)])))
    answers, messages = lookup_twice("involution_fused_fwd", key, default)
    about_row = [m for m in messages if str(gpu / NAME) in m]
    assert answers == [default, default] and len(about_row) == 1 and "tl.dot" in about_row[0], messages


def test_every_candidate_a_sweep_can_write_passes_the_file_rules():
    """One source of rules: whatever the tuning spaces offer, a file may hold."""
    spaces = configs.spaces()
    cases = autotune.build_grid(spaces, None, ["float16", "float32"], quick=True)
    assert {case.kernel for case in cases} == set(spaces) - idle_tuning_spaces()
    for case in cases:
        for config in case.candidates:
            assert configs.row_problems(case.kernel, config, case.key, case.default) == [], (case.kernel, config)
