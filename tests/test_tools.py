"""The tools (bench, plot, autotune, inspect, overhead, bounds, demo, providers) stand apart from
the runtime, import no circle, and behave as command-line programs (issue 14)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The package's import names and the folders they live in (pyproject's package-dir).
PACKAGE_DIRS = {"dynconv": ROOT / "dynconv", "dynconv.kernels": ROOT / "kernels", "dynconv.ops": ROOT / "ops",
                "dynconv.autotune_configs": ROOT / "autotune_configs"}
TOOLS = ("bench", "plot", "autotune", "inspect", "overhead", "bounds", "bounds_cases", "demo", "providers",
         "console", "reports", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere (top level or inside a function)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        base = name if _is_package(name, modules) else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                    mod = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    mod = node.module or ""
                # `from package import module` imports the module
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    graph = import_graph()
    assert "dynconv.plot" in graph["dynconv.bench"] and "dynconv.bench" not in graph["dynconv.plot"]
    # Function-level imports count too: a late import that closes a circle is still a circle.
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_every_tuning_module_registers_its_spaces_with_configs():
    """configs imports no tuning module (that was a circle): each registers itself when the kernels
    package loads, so run-time tuning and `dynconv autotune` still see every tuned kernel."""
    from dynconv.kernels import configs, expert_conv_tuning, involution_fused_tuning, involution_tuning

    modules = (involution_tuning, expert_conv_tuning, involution_fused_tuning)
    expected = {name for module in modules for name in module.autotune_space()}
    assert set(configs.spaces()) == expected
    assert {"involution_fwd", "expert_conv_fwd", "involution_fused_fwd"} <= expected
    configs.register_spaces(involution_tuning.autotune_space)  # a second registration changes nothing
    assert set(configs.spaces()) == expected


def test_kernel_modules_do_not_import_their_tuning_modules():
    graph = import_graph()
    for kernel in ("involution", "expert_conv", "involution_fused"):
        assert f"dynconv.kernels.{kernel}_tuning" not in graph[f"dynconv.kernels.{kernel}"]
        assert f"dynconv.kernels.{kernel}" in graph[f"dynconv.kernels.{kernel}_tuning"]


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_runtime_imports_no_tool_and_no_matplotlib():
    graph = import_graph()
    modules = _modules()
    runtime = [m for m in graph if m in ("dynconv", "dynconv.nn", "dynconv.reference")
               or m.startswith(("dynconv.ops", "dynconv.nn.", "dynconv.kernels"))]
    runtime = [m for m in runtime if not m.endswith("_tuning")]
    assert "dynconv.kernels.involution" in runtime and "dynconv.nn.expert" in runtime
    tools = {f"dynconv.{t}" for t in TOOLS}
    for module in runtime:
        bad = _reachable(graph, module) & tools
        assert not bad, f"{module} imports tools {sorted(bad)}"
        for reached in _reachable(graph, module):
            text = modules[reached].read_text()
            assert "matplotlib" not in text, f"{reached} (reached from {module}) mentions matplotlib"


# ---------------------------------------------------------------------------------------------
# The commands: exit statuses, one-line errors, plain --help, progress, where they write
# ---------------------------------------------------------------------------------------------

import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from dynconv import console  # noqa: E402

COMMANDS = ("run", "inspect", "autotune", "bench", "plot", "overhead")


def _dynconv(*args, cwd=None, env=None):
    import os

    env = dict(os.environ, **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "dynconv", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# Every command line a user can add --help to; the ones that take a while must offer --quiet.
HELP_COMMANDS = [(name,) for name in COMMANDS] + [("inspect", "--bounds")]
SLOW_COMMANDS = {"inspect", "autotune", "bench", "plot", "overhead", "run"}


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_help_is_plain_text_and_states_the_exit_statuses(command, capsys):
    from dynconv import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert console.EXIT_STATUSES in text, command
    if command[0] in SLOW_COMMANDS:
        assert "--quiet" in text, f"dynconv {' '.join(command)} has no progress switch"
    for rst in ("``", ":func:`", ":mod:`", ":class:`", ":data:`", "METHOD.md", ".. "):
        assert rst not in text, f"dynconv {' '.join(command)} --help shows {rst!r}"


def test_the_command_list_is_plain_text(capsys):
    from dynconv import cli

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert console.EXIT_STATUSES in text and "``" not in text and set(COMMANDS) <= set(cli.SUBCOMMANDS)


def test_plain_unwraps_rest():
    assert console.plain("``a`` and :func:`~x.y.z`, :mod:`m.n`, *em* **strong**::") == "a and z, m.n, em strong:"


def test_no_gpu_has_one_status_across_the_tools(tmp_path, monkeypatch, capsys):
    from dynconv import autotune, bench

    assert console.EXIT_NO_GPU not in (console.EXIT_OK, console.EXIT_FAILED, console.EXIT_USAGE)
    monkeypatch.setattr(bench, "_gpu_available", lambda: False)
    assert bench.main(["--out", str(tmp_path)]) == console.EXIT_NO_GPU
    monkeypatch.setattr(autotune, "no_gpu_reason", lambda: "no CUDA GPU (test)")
    assert autotune.main([]) == console.EXIT_NO_GPU
    assert autotune.NO_GPU_STATUS == console.EXIT_NO_GPU
    capsys.readouterr()


def test_overhead_on_cuda_without_gpu_and_inspect_of_no_module_fail_in_one_line(monkeypatch, capsys):
    import torch

    from dynconv import inspect, overhead

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert overhead.main(["--device", "cuda"]) == console.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--device cpu" in err
    from dynconv.kernels import _launch

    monkeypatch.setattr(_launch, "kernels_are_interpreted", lambda: False)
    assert inspect.main(["--module", "nosuch"]) == console.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nosuch" in err and "involution" in err


def test_progress_is_quiet_off_a_terminal_and_with_the_flag():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, quiet, shown in ((io.StringIO(), False, False), (Tty(), True, False), (Tty(), False, True)):
        progress = console.Progress(3, "work", quiet=quiet, stream=stream)
        for _ in range(3):
            progress.update("step")
        assert bool(stream.getvalue()) is shown
    assert "3/3" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_bench_shows_progress_per_shape_layout_and_dtype(tmp_path, monkeypatch):
    from dynconv import bench

    seen = []

    class Recorder(console.Progress):
        def update(self, note="", n=1):
            seen.append(n)
            super().update(note, n)

    monkeypatch.setattr(bench, "Progress", Recorder)
    monkeypatch.setattr(bench, "_resolve_providers", lambda *a: {})  # nothing to measure: the plumbing only
    bench.run_benchmarks(shapes=["R1", "R2"], dtypes=["fp32"], layouts=["nchw", "nhwc"], out=tmp_path,
                         device="cpu", log=lambda *a: None, quiet=True)
    assert sum(seen) == 2 * 2


class _Recorder(console.Progress):
    made: list = []

    def __init__(self, total, title, quiet=False, stream=None):
        super().__init__(total, title, quiet, stream)
        self.notes = []
        _Recorder.made.append(self)

    def update(self, note="", n=1):
        self.notes.append((note, n))
        super().update(note, n)


def test_run_shows_progress_through_the_demo_and_passes_quiet_on(tmp_path, monkeypatch):
    from dynconv import demo, plot

    _Recorder.made = []
    monkeypatch.setattr(demo, "Progress", _Recorder)
    assert demo.interpreter_demo(batch=1, channels=16, size=5, stride=1, quiet=True)
    (shown,) = _Recorder.made
    assert shown.total == 3 and shown.done == 3 and shown.notes[0] == ("forward", 0)

    children, plots = [], []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: children.append(cmd[-1]) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(plot, "main", lambda argv: plots.append(argv) or 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert demo.main(["--out", str(tmp_path), "--quiet"]) == 0
    assert "quiet=True" in children[0] and plots == [["--reports", str(tmp_path), "--quiet"]]
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert "quiet=False" in children[1] and plots[1] == ["--reports", str(tmp_path)]


def test_run_outside_the_checkout_writes_nothing(tmp_path):
    done = _dynconv("run", cwd=tmp_path)  # as a user types it, from a folder of theirs
    assert done.returncode == console.EXIT_USAGE, done.stderr
    assert "--out" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_and_plot_outside_the_checkout_write_nothing(tmp_path, monkeypatch, capsys):
    from dynconv import bench, plot

    monkeypatch.chdir(tmp_path)
    assert bench.main([]) == console.EXIT_USAGE and "--out" in capsys.readouterr().err
    assert plot.main([]) == console.EXIT_USAGE and "--reports" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_default_reports_folder_only_inside_the_checkout(tmp_path, monkeypatch):
    from dynconv import reports

    monkeypatch.chdir(ROOT)
    assert reports.default_reports_dir() == ROOT / "perf_reports"
    monkeypatch.chdir(tmp_path)
    assert reports.default_reports_dir() is None


# ---------------------------------------------------------------------------------------------
# One timer and one GPU-name normaliser for bench and autotune
# ---------------------------------------------------------------------------------------------

class _RecordingTimer:
    made: list = []

    def __init__(self, device, *windows, **kw):
        self.calls = 0
        _RecordingTimer.made.append(self)

    def __call__(self, fn, reset=lambda i: None):
        for i in range(2):
            reset(i)
            fn(i)
        self.calls += 1
        return (1.0, 0.5, 1.5)


def test_bench_and_autotune_time_with_the_same_timer(tmp_path, monkeypatch):
    import torch

    from dynconv import autotune, bench
    from dynconv.kernels import configs, timing
    from dynconv.roofline import Problem

    monkeypatch.setattr(timing, "Timer", _RecordingTimer)
    _RecordingTimer.made = []
    tiny = {"T": Problem(op="dynamic_dwconv2d", B=1, C=2, H=4, W=4, K=3)}
    monkeypatch.setattr(bench, "_resolve_providers", lambda *a: {"unfold": lambda **kw: None})
    monkeypatch.setattr(bench, "measure", lambda fn, p, pass_, dtype, device, timer, *a: dict(
        zip(("ms_median", "ms_p20", "ms_p80"), timer(lambda i: None)), gbps=0.0, tflops=0.0))
    monkeypatch.setattr(bench, "check_forward", lambda *a: {})
    bench.run_benchmarks(shapes=["T"], dtypes=["fp32"], passes=["forward"], layouts=["nchw"], out=tmp_path,
                         device="cpu", problems=tiny, log=lambda *a: None, quiet=True)
    assert len(_RecordingTimer.made) == 1 and _RecordingTimer.made[0].calls == 1

    launched = []

    class Space:
        def inputs(self, spec, dtype, device):
            return {"x": torch.zeros(4, dtype=dtype)}

        def launch(self, spec, tensors, config):
            return lambda: launched.append(config["BLOCK"])

    case = autotune.Case(kernel="k", label="l", spec={}, key={}, dtype="float32",
                         candidates=[{"BLOCK": 16}, {"BLOCK": 32}], default={"BLOCK": 16})
    autotune.time_case(case, Space(), "cpu", l2_bytes=0, quick=True)
    assert len(_RecordingTimer.made) == 2 and _RecordingTimer.made[1].calls == 2
    assert case.times == {(("BLOCK", 16),): 1.0, (("BLOCK", 32),): 1.0} and sorted(set(launched)) == [16, 32]

    # The config lookup's run-time tuning (a GPU with no tuned file) times with it too.
    launched.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    picks = [{"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}]
    space = configs.KernelSpace(problems=None, inputs=lambda spec, dtype, device: {}, key=None, default=None,
                                launch=lambda spec, tensors, config: lambda: launched.append(config["BLOCK_N"]),
                                candidates=lambda key, quick: picks, spec_for_key=lambda key: ({}, torch.float32))
    assert configs._time_candidates(space, {"N": 64}, picks[0]) == picks[0]
    assert len(_RecordingTimer.made) == 3 and _RecordingTimer.made[2].calls == 2 and sorted(set(launched)) == [16, 32]


def test_nothing_times_with_another_timer():
    sources = [*ROOT.joinpath("dynconv").rglob("*.py"), *ROOT.joinpath("kernels").glob("*.py")]
    assert not [p.name for p in sources if "do_bench" in p.read_text()]
    assert [p.name for p in sources if "class Timer" in p.read_text()] == ["timing.py"]


def test_bench_and_autotune_name_a_gpu_with_one_normaliser(monkeypatch):
    from dynconv import autotune, bench
    from dynconv.kernels import configs

    seen = []
    monkeypatch.setattr(configs, "normalise_device_name", lambda name: seen.append(name) or "NORMALISED")
    assert bench.normalised_gpu_name("Some GPU") == "NORMALISED"
    assert autotune.destination(None, "Other GPU").name.startswith(configs.canonical_device_name("Other GPU"))
    assert seen[0] == "Some GPU" and "Other GPU" in seen


# ---------------------------------------------------------------------------------------------
# The plots, on a tiny SYNTHETIC csv (made-up numbers, not a measurement)
# ---------------------------------------------------------------------------------------------

HBM_GBPS = 2000.0
# provider -> fraction of the HBM ceiling it reaches; dynconv ABOVE the roof on purpose
SYNTHETIC_SPEED = {"dynconv": 1.3, "shift_add": 0.4, "unfold": 0.004}


def _synthetic_csv(root, with_backward_nhwc=False):
    from dynconv import bench
    from dynconv.roofline import minimum_bytes, minimum_flops, resolve_shape

    rows = []
    for layout, dtypes in (("nchw", ("fp32", "bf16")), ("nhwc", ("bf16",))):
        passes = ("forward", "backward") if layout == "nchw" or with_backward_nhwc else ("forward",)
        for shape in ("R1@H14", "R1@H28", "R1"):
            p = resolve_shape(shape)
            for dtype in dtypes:
                for pass_ in passes:
                    nbytes, flops = minimum_bytes(p, pass_, dtype), minimum_flops(p, pass_)
                    for provider, speed in SYNTHETIC_SPEED.items():
                        ms = nbytes / (HBM_GBPS * speed * 1e6)
                        rows.append({"op": "involution", "pass": pass_, "dtype": dtype, "layout": layout,
                                     "shape": shape, "provider": provider, "ms_median": ms, "ms_p20": ms,
                                     "ms_p80": ms, "gbps": nbytes / ms / 1e6, "tflops": flops / ms / 1e9,
                                     "peak_mem_mb": 1.0, "gpu": "SYNTHETIC", "torch": "t", "triton": "t",
                                     "commit": "0", "date": "2000-01-01T00:00:00Z"})
    folder = root / "SYNTHETIC_GPU"
    bench.write_csv(folder / "results.csv", rows, merge=False)
    (folder / "ceilings.json").write_text(f'{{"hbm_gbps": {HBM_GBPS}, "fp32_tflops": 50.0, "bf16_tflops": 500.0}}')
    return folder


@pytest.fixture(scope="module")
def synthetic_figures(tmp_path_factory):
    """name -> the matplotlib figure each drawing function built (captured before saving)."""
    from dynconv import plot

    folder = _synthetic_csv(tmp_path_factory.mktemp("reports"))
    data = plot.load(folder.parent)[0]
    figures = {}
    saved = plot._save
    try:
        plot._save = lambda fig, path: figures.setdefault(path.name, fig) and [path]
        for draw in (plot.draw_throughput, plot.draw_speedup, plot.draw_roofline):
            draw(data)
    finally:
        plot._save = saved
    assert {"throughput_involution_R1_nchw", "throughput_involution_R1_nhwc", "speedup_fp32_nchw",
            "speedup_bf16_nhwc", "roofline"} <= set(figures)
    return figures


def _data_lines(ax):
    return [line for line in ax.lines if not line.get_label().startswith("_") and line.get_gid() is None]


def test_every_line_is_labelled_and_above_a_labelled_tick(synthetic_figures):
    from dynconv.providers import label

    for name, fig in synthetic_figures.items():
        if not name.startswith("throughput"):
            continue
        for ax in fig.axes:
            lines = _data_lines(ax)
            assert lines, f"{name}: empty panel {ax.get_title()}"
            texts = {t.get_text() for t in ax.texts}
            for line in lines:
                assert line.get_label() in texts, f"{name} {ax.get_title()}: line {line.get_label()} has no label"
            assert label("unfold") in texts
            lowest = min(min(line.get_ydata()) for line in lines)
            bottom, top = ax.get_ylim()
            formatter = ax.yaxis.get_major_formatter()
            labelled = [t for t in ax.yaxis.get_major_locator().tick_values(bottom, top)
                        if bottom * (1 - 1e-9) <= t <= top and formatter(t, 0)]
            assert labelled and min(labelled) <= lowest, f"{name} {ax.get_title()}: lowest line below every tick"


def test_points_above_a_roof_are_flagged(synthetic_figures):
    flagged = {name: sum(line.get_gid() == "above-roof" for ax in fig.axes for line in ax.lines)
               for name, fig in synthetic_figures.items()}
    # dynconv runs at 1.3 × the HBM ceiling in every panel of the throughput figures and the roofline
    assert flagged["throughput_involution_R1_nchw"] >= 4 and flagged["roofline"] >= 1
    roofline_texts = [t.get_text() for ax in synthetic_figures["roofline"].axes for t in ax.texts]
    assert any("above roof" in t for t in roofline_texts)
    assert flagged["speedup_fp32_nchw"] == 0


def test_no_empty_panels_and_one_unit_per_figure(synthetic_figures):
    for name, fig in synthetic_figures.items():
        for ax in fig.axes:
            assert ax.lines or ax.patches or ax.collections, f"{name}: empty panel {ax.get_title()}"
        units = {unit for ax in fig.axes for unit in ("TFLOP/s", "GB/s") if unit in ax.get_ylabel()}
        assert len(units) <= 1, f"{name} mixes {units}"
    # the nhwc figure: one pass measured -> one panel per dtype, not an empty backward panel
    assert len(synthetic_figures["throughput_involution_R1_nhwc"].axes) == 1
    assert len(synthetic_figures["speedup_bf16_nhwc"].axes) == 1


def test_a_figure_keeps_one_unit_when_dtypes_sit_on_either_side_of_the_ridge(tmp_path, monkeypatch):
    from dynconv import plot

    data = plot.load(_synthetic_csv(tmp_path).parent)[0]
    monkeypatch.setattr(plot, "_memory_bound", lambda data, base, dtype: dtype == "bf16")  # fp32 compute-bound
    figures = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: figures.setdefault(path.name, fig) and [path])
    plot.draw_throughput(data)
    fig = figures["throughput_involution_R1_nchw"]
    assert {ax.get_title().split(" ")[0] for ax in fig.axes} == {"fp32", "bf16"}
    assert {ax.get_ylabel() for ax in fig.axes} == {"GB/s (minimum model / time)"}


def test_plot_leaves_out_a_folder_whose_results_csv_is_not_a_benchmarks(tmp_path, capsys):
    from dynconv import plot
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "results.csv").write_text("op,ratio\ninvolution,1.0\n")
    assert plot.load(tmp_path) == []
    assert "skipped" in capsys.readouterr().err


def test_the_gpu_session_script_names_only_what_exists():
    """A lease is 15 minutes, once in a while: its script must not find a typo there (the first
    lease's pytest paths lacked `.py` and ran nothing)."""
    import re

    script = ROOT / "perf_reports" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    files = re.search(r"tests=\(([^)]*)\)", text).group(1).split()
    assert files and all((ROOT / "tests" / f"{name}.py").is_file() for name in files), files
    for test_id in re.findall(r"(tests/test_\w+\.py::\w+)", text):
        path, name = test_id.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test_id
    from dynconv import bounds

    # the options the script passes to the model's measuring mode parse
    parser_source = Path(bounds.__file__).read_text()
    for option in ("--measure", "--case"):
        assert f'"{option}"' in parser_source and option in text
