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
