"""The command line never destroys user data: `dynconv bench`, `plot` and `autotune` on CPU.

No GPU and no sweep: bench's measuring and autotune's GPU facts and sweep are replaced by fakes
that record whether they ran, so each test can say that a refusal came BEFORE the long part.
"""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from dynconv import autotune, bench, plot
from dynconv.console import EXIT_NO_GPU
from dynconv.kernels import configs

H100 = "NVIDIA H100 80GB HBM3"
USER_README = "# My project\n\nNotes I wrote by hand.\n"
KERNEL = "involution_fwd"
EXACT = ["K", "stride_h", "stride_w", "channels_last", "dtype_bytes"]
CONFIG = {"BLOCK_G": 1, "BLOCK_CG": 16, "BLOCK_H": 4, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1}


def csv_row(provider="dynconv", shape="R1", ms=1.0):
    return {"op": "involution", "pass": "forward", "dtype": "bf16", "layout": "nchw", "shape": shape,
            "provider": provider, "ms_median": ms, "gpu": "TEST_GPU", "torch": "t", "triton": "t",
            "commit": "0" * 40, "date": "2000-01-01T00:00:00Z"}


# ---------------------------------------------------------------------------------------------
# bench / plot: README.md and results.csv
# ---------------------------------------------------------------------------------------------

def test_bench_without_gpu_or_measurements_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_gpu_available", lambda: False)
    (tmp_path / "README.md").write_text(USER_README)
    assert bench.main(["--out", str(tmp_path)]) == EXIT_NO_GPU
    assert "NOTHING WAS MEASURED" in capsys.readouterr().out
    assert (tmp_path / "README.md").read_text() == USER_README
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "no gpu"])
def test_bench_stops_before_replacing_a_readme_it_did_not_write(tmp_path, monkeypatch, capsys, gpu):
    monkeypatch.setattr(bench, "_gpu_available", lambda: gpu)
    ran = []
    monkeypatch.setattr(bench, "run_benchmarks", lambda **kw: ran.append(kw))
    monkeypatch.setattr(plot, "draw_all", lambda *a, **kw: ran.append(a) or [])
    bench.write_csv(tmp_path / "TEST_GPU" / "results.csv", [csv_row()])  # earlier measurements to re-draw
    (tmp_path / "README.md").write_text(USER_README)
    assert bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "README.md" in err and "--force" in err
    assert ran == [], "measured or drew before refusing"
    assert (tmp_path / "README.md").read_text() == USER_README


def test_readme_is_replaced_only_when_the_tool_wrote_it_or_with_force(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(USER_README)
    with pytest.raises(FileExistsError, match="--force"):
        plot.write_readme(tmp_path, [])
    assert plot.main(["--reports", str(tmp_path)]) == 2 and "--force" in capsys.readouterr().err
    assert readme.read_text() == USER_README
    plot.write_readme(tmp_path, [], force=True)
    first = readme.read_text()
    assert first.startswith(plot.README_MARKER) and "No benchmark tables yet" in first
    plot.write_readme(tmp_path, [])  # its own page: rewritten without --force
    # A page from before the marker (the committed perf_reports/README.md) is the tool's too.
    readme.write_text(first[len(plot.README_MARKER) + 1:])
    plot.write_readme(tmp_path, [])
    assert readme.read_text() == first
    readme.unlink()
    os.mkfifo(readme)  # not a file anyone can read safely: never replaced, never opened
    with pytest.raises(FileExistsError):
        plot.write_readme(tmp_path, [])


def _csv_writer(path, tag, rounds):
    for i in range(rounds):
        bench.write_csv(path, [csv_row(provider=f"{tag}{i}")])


def test_concurrent_csv_writers_neither_crash_nor_lose_rows(tmp_path):
    path = tmp_path / "TEST_GPU" / "results.csv"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_csv_writer, args=(path, tag, 25)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0]
    providers = {row["provider"] for row in bench.read_csv(path)}
    assert providers == {f"{tag}{i}" for tag in "ab" for i in range(25)}
    assert not list(path.parent.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# autotune: the destination
# ---------------------------------------------------------------------------------------------

def kernels_section(*keys) -> dict:
    return {KERNEL: {"exact": EXACT, "table": {
        configs.key_string({"B": 32, "C": c, "G": 4, "H": 64, "W": 64, "K": 7, "stride_h": 1, "stride_w": 1,
                            "channels_last": 0, "dtype_bytes": 2}): {"config": CONFIG} for c in keys}}}


@pytest.fixture
def fake_gpu(monkeypatch):
    """autotune.main with a GPU and a sweep that returns one row per call (C = 64, 128, ...)
    without timing anything; yields the list of sweeps run."""
    sweeps = []
    monkeypatch.setattr(autotune, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(autotune, "_gpu", lambda: (0, H100, 90, 232448, 50 << 20))

    def sweep(*args):
        sweeps.append(args)
        return kernels_section(64 << len(sweeps))

    monkeypatch.setattr(autotune, "sweep", sweep)
    yield sweeps
    configs.clear_cache()


def test_autotune_checks_an_unwritable_output_before_the_sweep(tmp_path, fake_gpu, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert autotune.main(["--output", str(blocker / "configs.json")]) == 1
    assert fake_gpu == [], "swept before finding the destination unwritable"
    assert "cannot write into" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_autotune_checks_a_read_only_folder_before_the_sweep(tmp_path, fake_gpu, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert autotune.main(["--output", str(folder / "x.json")]) == 1
    finally:
        folder.chmod(0o700)
    assert fake_gpu == [] and "cannot write into" in capsys.readouterr().err


def test_autotune_replaces_a_file_it_did_not_write_only_with_force(tmp_path, fake_gpu, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert autotune.main(["--output", str(notes)]) == 1
    assert fake_gpu == [] and "--force" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": true}\n'
    assert autotune.main(["--output", str(notes), "--force"]) == 0
    assert configs.is_config_file(notes) and len(fake_gpu) == 1


def test_autotune_merges_into_its_own_file_without_force(tmp_path, fake_gpu):
    out = tmp_path / "configs" / "H100.json"
    assert autotune.main(["--output", str(out)]) == 0
    assert autotune.main(["--output", str(out)]) == 0
    table = json.loads(out.read_text())["kernels"][KERNEL]["table"]
    assert len(fake_gpu) == 2 and len(table) == 2


def test_autotune_keeps_the_results_when_the_write_fails_after_the_sweep(tmp_path, fake_gpu, monkeypatch, capsys):
    def broken(*args):
        raise PermissionError("the folder became read-only")

    monkeypatch.setattr(autotune, "save", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    assert autotune.main(["--output", str(tmp_path / "out.json")]) == 1
    err = capsys.readouterr().err
    rescued = list((tmp_path / "rescue").glob("dynconv-autotune-*.json"))
    assert len(rescued) == 1 and str(rescued[0]) in err
    assert json.loads(rescued[0].read_text())["kernels"] == kernels_section(128)


def _saver(path, tag, rounds):
    for i in range(rounds):
        autotune.save(path, H100, kernels_section(1000 * tag + i))


def test_concurrent_autotune_runs_keep_each_others_rows(tmp_path):
    path = tmp_path / "NVIDIA_H100.json"
    ctx = multiprocessing.get_context("fork")
    savers = [ctx.Process(target=_saver, args=(path, tag, 20)) for tag in (1, 2)]
    for s in savers:
        s.start()
    for s in savers:
        s.join()
    assert [s.exitcode for s in savers] == [0, 0]
    assert len(json.loads(path.read_text())["kernels"][KERNEL]["table"]) == 40
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["NVIDIA_H100.json"]
