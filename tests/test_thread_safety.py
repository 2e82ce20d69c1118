"""Process-wide caches under concurrent callers (serving with several threads is normal): the
launch plans (kernels/_launch.planned) and the config lookup (kernels/configs.get_config).

Each test runs its threads with a tiny switch interval, so that the interpreter changes threads
between almost every pair of bytecodes, for a fixed time: the races these tests were written for
(before the caches took locks) showed up within a fraction of it.
"""
from __future__ import annotations

import sys
import threading
import time
import warnings

import pytest
import torch

from dynconv.kernels import _launch, configs

H100 = "NVIDIA H100 80GB HBM3"
THREADS = 4
SECONDS = 1.0


@pytest.fixture
def fast_switching():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def hammer(work, threads=THREADS):
    """Run ``work(index)`` on ``threads`` threads at once; re-raise the first exception any raised."""
    errors, start = [], threading.Barrier(threads)

    def run(index):
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def test_launch_plans_survive_threads_inserting_past_the_limit(monkeypatch, fast_switching):
    # A small limit, so that (as past 1024 plans in a server) nearly every store evicts.
    monkeypatch.setattr(_launch, "MAX_PLANS", 8)
    _launch.clear_plans()
    x = torch.empty(1)
    deadline = time.monotonic() + SECONDS

    def work(index):
        i = 0
        while time.monotonic() < deadline:
            i += 1
            n = index * 1000 + i % 50  # 50 problems per thread: hits and misses both
            launch = _launch.planned(("thread_test", n), ("x",), (x,),
                                     lambda: _launch.Launch(None, (1,), {"x": x, "n": n}, {"BLOCK": 16}))
            assert launch.args["n"] == n and launch.args["x"] is x

    try:
        hammer(work)
        assert len(_launch._plans) <= _launch.MAX_PLANS
    finally:
        _launch.clear_plans()


def test_config_lookups_race_each_other_and_cache_clears(monkeypatch, tmp_path, fast_switching):
    """Threads look up configs (tuned at run time, stubbed) while one clears the caches, as a
    process does after `dynconv autotune` writes a file."""
    monkeypatch.setattr(configs, "_active_device", lambda: H100)
    monkeypatch.setattr(configs, "config_dirs", lambda: [tmp_path])
    tuned = {"BLOCK_G": 1, "BLOCK_CG": 16, "BLOCK_H": 4, "BLOCK_W": 32, "num_warps": 8, "num_stages": 1}
    default = {**tuned, "num_warps": 4}
    monkeypatch.setattr(configs, "_time_candidates", lambda space, key, d: dict(tuned))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = {"B": 32, "C": 64, "G": 4, "H": 56, "W": 56, "K": 7, "stride_h": 1, "stride_w": 1,
           "channels_last": 0, "dtype_bytes": 2}
    stop = threading.Event()
    calls = 50_000  # a count, not a time: a clock call per lookup changes the interleaving and hid the race

    def work(index):
        if index == 0:
            while not stop.is_set():
                configs.clear_cache()
            return
        try:
            for i in range(calls):
                # 16 buckets (C from 16 to 2^19): lookups miss, tune and hit in every order.
                found = configs.get_config("involution_fwd", {**key, "C": 16 << (i % 16)}, default)
                assert found == tuned
        finally:
            stop.set()

    configs.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", configs.ConfigWarning)
        try:
            hammer(work)
        finally:
            configs.clear_cache()
