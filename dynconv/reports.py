"""The results csv and where it lives: read by ``dynconv plot``, written by ``dynconv bench``.

Below both tools (plot reads what bench writes; bench draws plots after measuring), so neither
imports the other to share these.
"""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("op,pass,dtype,layout,shape,provider,ms_median,ms_p20,ms_p80,gbps,tflops,peak_mem_mb,"
           "gpu,torch,triton,commit,date").split(",")
# The header before layouts were measured: every such row was taken in NCHW.
LEGACY_COLUMNS = [c for c in COLUMNS if c != "layout"]


def repository_root() -> Path | None:
    """The checkout dynconv runs from (an editable install), or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "kernels").is_dir() else None


def default_reports_dir() -> Path | None:
    """``perf_reports/`` of the repository checkout dynconv runs from, when the working directory
    is inside that checkout; else None, and the tools write only to a folder they are given."""
    root = repository_root()
    if root is None or not Path.cwd().resolve().is_relative_to(root):
        return None
    return root / "perf_reports"


def row_layout(row: dict) -> str:
    """A row's layout; one written before the column existed was measured in NCHW."""
    return row.get("layout") or "nchw"


def read_csv(path: Path) -> list[dict]:
    """Rows as strings; a file with the header from before the layout column reads with
    ``layout`` = ``nchw``, so committed measurements keep working."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (COLUMNS, LEGACY_COLUMNS):
            raise ValueError(f"{path}: columns {reader.fieldnames} are not {COLUMNS}")
        return [{c: row_layout(r) if c == "layout" else r[c] for c in COLUMNS} for r in reader]
