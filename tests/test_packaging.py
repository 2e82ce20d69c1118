"""Issue 14, a light and self-contained package: the wheel built from this tree, installed with
--no-deps into a fresh venv that sees torch, triton and numpy but cannot import matplotlib, imports
dynconv, runs every op and module forward and backward, and reports its version; its metadata
keeps plotting in an extra."""
from __future__ import annotations

import email
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RUNTIME_REQUIREMENTS = {"torch", "triton", "numpy", "filelock"}  # filelock: torch installs it anyway
BENCH_ONLY = {"matplotlib"}
# A meta-path finder installed at start-up by a .pth in the fresh venv: it refuses the bench-only
# packages (the runtime must not need them) and remembers that someone asked.
BLOCKER = f'''import importlib.abc, sys
BLOCKED = {sorted(BENCH_ONLY)!r}
ATTEMPTS = []
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"{{name}} is not installed (bench-only; blocked by the packaging test)", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
'''
COPY_IGNORE = shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def build_wheel(tmp_path: Path) -> Path:
    # Built from a copy, so the build leaves no build/ or egg-info in the tree other tests import from.
    src = tmp_path / "src" / "dynconv"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    out = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", src, "-w", out])
    wheels = list(out.glob("dynconv-*.whl"))
    assert len(wheels) == 1, f"expected one dynconv wheel, got {wheels}"
    return wheels[0]


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv without pip whose only view of this environment is a .pth to its site-packages."""
    venv = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    (purelib / "_bench_extras_blocker.py").write_text(BLOCKER)
    (purelib / "_bench_extras_blocker.pth").write_text("import _bench_extras_blocker\n")
    # torch, triton and numpy from here; the editable dynconv of this tree is a finder these
    # directories only declare in their own .pth files, which a plain path line does not run.
    (purelib / "zz_torch_from_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    return venv


def _fresh(venv: Path, *args, **env):
    # -I: no PYTHON* variables, no user site, no current directory on sys.path (it may hold the tree).
    return _run([venv / "bin" / "python", "-I", *args], cwd=venv, env=dict(os.environ, **env))


def check_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    requires = meta.get_all("Requires-Dist") or []
    unconditional = [r for r in requires if "extra ==" not in r]
    names_only = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in unconditional}
    assert names_only <= RUNTIME_REQUIREMENTS, f"runtime requirements beyond {RUNTIME_REQUIREMENTS}: {unconditional}"
    for pkg in BENCH_ONLY:
        mentions = [r for r in requires if r.lower().startswith(pkg)]
        assert mentions, f"{pkg} is in no extra of {requires}"
        assert all("extra ==" in r for r in mentions), f"{pkg} required outside an extra: {mentions}"
    assert "bench" in (meta.get_all("Provides-Extra") or []), meta.get_all("Provides-Extra")
    for path in ("dynconv/py.typed", "dynconv/kernels/involution.py", "dynconv/ops/expert_conv.py",
                 "dynconv/nn/expert.py", "dynconv/__main__.py", "dynconv/autotune_configs/__init__.py"):
        assert path in names, f"{path} missing from the wheel"
    tuned = {p.name for p in (REPO / "autotune_configs").glob("*.json")}
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("dynconv/autotune_configs/")}
    assert tuned <= shipped, f"tuned configs missing from the wheel: {tuned - shipped}"
    assert not any(n.startswith(("tests/", "perf_reports/")) for n in names), "tests or reports shipped in the wheel"


def check_blocker(fresh_venv: Path) -> None:
    probe = "import importlib.util as u\ntry:\n    u.find_spec('matplotlib'); print('importable')\nexcept ImportError:\n    print('blocked')"
    assert _fresh(fresh_venv, "-c", probe).strip() == "blocked"
    assert _fresh(fresh_venv, "-c", "import torch, triton, numpy; print('ok')").strip() == "ok"


def check_ops_and_modules(fresh_venv: Path, wheel: Path) -> None:
    # The plain CPU path (TRITON_INTERPRET=0), the one a CPU user of the installed package runs.
    report = json.loads(_fresh(fresh_venv, TESTS / "packaging_smoke.py", TRITON_INTERPRET="0").splitlines()[-1])
    assert Path(report["dynconv"]).is_relative_to(fresh_venv), f"imported dynconv from {report['dynconv']}"
    assert report["interpreted"] is False
    assert wheel.name.startswith(f"dynconv-{report['version']}-")
    assert set(report["ops"]) == {"involution", "dynamic_dwconv2d", "involution_fused", "expert_conv2d"}
    assert {"CondConv2d", "DynamicConv2d", "ODConv2d", "DRConv2d", "Involution2d", "DynamicDWConv2d"} <= set(report["modules"])


def check_version_commands(fresh_venv: Path, wheel: Path) -> None:
    version = wheel.name.split("-")[1]
    assert _fresh(fresh_venv, "-m", "dynconv", "--version").strip() == f"dynconv {version}"
    script = fresh_venv / "bin" / "dynconv"
    assert script.exists(), "the wheel installed no dynconv command"
    assert _run([script, "--version"], cwd=fresh_venv).strip() == f"dynconv {version}"


# One test, not four sharing fixtures: under pytest-xdist each worker would build its own wheel.
def test_wheel_in_fresh_venv_without_matplotlib(tmp_path):
    wheel = build_wheel(tmp_path)
    check_metadata(wheel)
    venv = fresh_venv(tmp_path, wheel)
    check_blocker(venv)
    check_ops_and_modules(venv, wheel)
    check_version_commands(venv, wheel)
