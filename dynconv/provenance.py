"""Where a measurement came from: the GPU, torch and triton versions and the commit, for every
MEASURED row (``dynconv bench``, ``dynconv inspect --bounds --measure``)."""
from __future__ import annotations

import datetime as _dt
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """``$DYNCONV_COMMIT`` when set, else ``git rev-parse HEAD`` of the checkout, else ``unknown``.
    The variable wins: a copied tree can carry a stale ``.git`` (on the first GPU lease, git named
    the commit before the one whose tree was measured)."""
    if os.environ.get("DYNCONV_COMMIT"):
        return os.environ["DYNCONV_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: str) -> dict:
    import torch
    import triton
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else device
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def kernel_digest(kernel) -> str:
    """A digest of a Triton kernel's source and of every jitted helper it calls, transitively: a
    measured row stays comparable while it is unchanged, whatever else changes in its file."""
    import hashlib
    import inspect

    def plain(f):
        while hasattr(f, "fn") and not inspect.isfunction(f):
            f = f.fn
        return f

    sources, seen, queue = [], set(), [plain(kernel)]
    while queue:
        fn = queue.pop()
        if fn in seen:
            continue
        seen.add(fn)
        sources.append(inspect.getsource(fn))
        for name in fn.__code__.co_names:
            called = fn.__globals__.get(name)
            if called is not None and hasattr(called, "fn") and inspect.isfunction(plain(called)):
                queue.append(plain(called))
    return hashlib.sha256("\n".join(sorted(sources)).encode()).hexdigest()


def find_kernel(source: str, name: str):
    """The kernel ``name`` of the kernel file ``source`` (``kernels/<module>.py``, as a measured row
    names it)."""
    import importlib

    module = importlib.import_module("dynconv.kernels." + Path(source).stem)
    return getattr(module, name)
