"""``dynconv plot``: draw the performance plots and ``perf_reports/README.md`` from the csv files.

    dynconv plot [--reports DIR] [--gpu FOLDER]

For every GPU folder (``<reports>/<gpu>/results.csv``, or only ``--gpu``) it draws, as PNG and SVG:

* ``throughput_<op>_<shape>_<layout>``: throughput against input size for each size sweep and
  layout, one panel per dtype and pass, one line per provider, the measured ceiling dashed. GB/s
  for memory-bound ops, TFLOP/s for compute-bound ones (both from the minimum model of
  :mod:`dynconv.roofline`).
* ``speedup_<dtype>_<layout>``: speedup over the unfold baseline (family 1) or the
  batch-as-groups conv (family 2, which has no unfold form) at the reference shapes, one panel
  per pass.
* ``static/roofline_predicted_triton<version>``: the static model's PREDICTED roofline from the
  tables ``dynconv inspect --bounds`` committed under ``<reports>/static`` (no GPU, no compiling
  here); never mixed with a measured point.
* ``roofline``: dynconv's achieved TFLOP/s (each op's headline provider) against arithmetic
  intensity at the reference shapes, one panel per layout and dtype, under the measured
  bandwidth and compute roofs; each point labelled with its fraction of the roof.

Every ratio and every plot compares providers within one layout (the csv's ``layout``: nchw or
nhwc, i.e. channels_last); rows from before that column are nchw. Then it rewrites
``<reports>/README.md`` from every GPU folder's data: the plots and a summary table (time and
memory ratio against each baseline, % of roofline; a layout column). Both report each op's
headline provider (``providers.HEADLINE``: ``dynconv``, or ``dynconv_fused`` for
``involution_layer``); every other provider of the op is a baseline. Nothing is drawn or written
for a GPU without measurements; with none at all, the README says so.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from dynconv.console import Progress, add_quiet, command_parser, fail
from dynconv.providers import LAYOUTS, PROVIDERS, SPEEDUP_BASELINE, headline, label
from dynconv.reports import default_reports_dir, read_csv
from dynconv.roofline import (
    DTYPE_BYTES,
    FAMILY,
    PASSES,
    REFERENCE_SHAPES,
    SWEEPS,
    arithmetic_intensity,
    roof_tflops,
    split_shape_name,
)

DTYPES = tuple(DTYPE_BYTES)
STATUSES = ("OOM", "error", "mismatch")
PASS_SHORT = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}
PASS_MARKER = {"forward": "o", "backward": "s", "forward+backward": "^"}
COMPUTE_CEILING = {"fp32": "fp32_tflops", "fp16": "fp16_tflops", "bf16": "bf16_tflops"}
NUMERIC = ("ms_median", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb")
LAYOUT_TITLE = {"nchw": "NCHW (contiguous)", "nhwc": "NHWC (channels_last)",
                "bhwnd": "(B, H, W, heads, D)", "bnhwd": "(B, heads, H, W, D)"}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

class GpuData:
    """One GPU folder: its rows (numbers parsed; ``status`` set for OOM/error/mismatch rows)
    and its ceilings (None if ``ceilings.json`` is missing)."""

    def __init__(self, folder: Path, rows: list[dict], ceilings: dict | None):
        self.folder, self.rows, self.ceilings = folder, rows, ceilings
        self.name = rows[0]["gpu"] if rows else folder.name
        self._index = {(r["op"], r["pass"], r["dtype"], r["shape"], r["provider"], _layout(r)): r for r in rows}

    def get(self, op, pass_, dtype, shape, provider, layout="nchw"):
        return self._index.get((op, pass_, dtype, shape, provider, layout))

    def layouts(self, rows=None) -> list[str]:
        """The layouts measured (in ``rows``, default all), known ones in :data:`LAYOUTS` order."""
        present = {_layout(r) for r in (self.rows if rows is None else rows)}
        return [x for x in LAYOUTS if x in present] + sorted(present - set(LAYOUTS))

    def values(self, key):
        seen = []
        for r in self.rows:
            if r[key] not in seen:
                seen.append(r[key])
        return seen

    def compute_peak(self, dtype: str) -> float | None:
        if not self.ceilings:
            return None
        return self.ceilings.get(COMPUTE_CEILING[dtype]) or (self.ceilings.get("bf16_tflops") if dtype == "fp16" else None)


def _layout(row: dict) -> str:
    return row.get("layout") or "nchw"  # rows written before the column were measured in NCHW


def _layout_title(layout: str) -> str:
    return LAYOUT_TITLE.get(layout, layout)


def _parse(row: dict) -> dict:
    row = dict(row)
    row["layout"] = _layout(row)
    row["status"] = row["ms_median"] if row["ms_median"] in STATUSES else None
    for key in NUMERIC:
        try:
            row[key] = float(row[key]) if row[key] not in ("", None) and not row["status"] else None
        except ValueError:
            row[key] = None
    if row["status"] is None and row["ms_median"] is None:
        row["status"] = "error"
    return row


def load(reports: Path, gpu: str | None = None) -> list[GpuData]:
    """Every GPU folder under ``reports`` that holds a results.csv (or only ``gpu``)."""
    folders = [reports / gpu] if gpu else sorted(p for p in reports.iterdir() if p.is_dir()) if reports.is_dir() else []
    data = []
    for folder in folders:
        csv_path = folder / "results.csv"
        if not csv_path.exists():
            continue
        try:
            rows = [_parse(r) for r in read_csv(csv_path)]
        except ValueError as exc:  # not a `dynconv bench` csv: leave the folder out, say so, draw the rest
            print(f"dynconv plot: skipped {folder}: {exc}", file=sys.stderr)
            continue
        if not rows:
            continue
        ceilings_path = folder / "ceilings.json"
        ceilings = json.loads(ceilings_path.read_text()) if ceilings_path.exists() else None
        data.append(GpuData(folder, rows, ceilings))
    return data


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "svg.fonttype": "none", "figure.dpi": 110,
                         # Fixed SVG element ids: redrawing unchanged data must change no file.
                         "svg.hashsalt": "dynconv"})
    return plt


def provider_style(name: str) -> dict:
    """One colour per provider everywhere; the static floor dashed grey."""
    if name == "static_conv":
        return {"color": "0.35", "linestyle": "--"}
    names = [n for n in PROVIDERS if n != "static_conv"]
    index = names.index(name) if name in names else len(names) + hash(name) % 4
    return {"color": f"C{index % 10}", "linestyle": "-"}


def _readable_log_axis(axis, suffix: str = ""):
    """Log ticks at 1, 2, 5 × 10^k written as plain numbers (``2,000``, ``0.5×``), so a narrow
    range still shows several labelled ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}{suffix}" if v >= 10 else f"{v:.3g}{suffix}"))


def _save(fig, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    # No creation date in the files: redrawing unchanged data leaves the committed plots unchanged.
    fig.savefig(paths[0], dpi=130, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return paths


def _shape_caption(base: str) -> str:
    p = REFERENCE_SHAPES[base]
    if FAMILY[p.op] == 1:
        return f"B={p.B} C={p.C} K={p.K} G={p.G}" + (f" R={p.R}" if p.R else "")
    extra = f" m={p.m}" if p.op == "drconv" else ""
    return f"B={p.B} Cin={p.C} Cout={p.Cout} k={p.K} E={p.E}{extra}"


def _memory_bound(data: GpuData, base: str, dtype: str) -> bool:
    """Whether the reference shape's minimum model sits left of the ridge (bandwidth-bound)."""
    intensity = arithmetic_intensity(REFERENCE_SHAPES[base], "forward", dtype)
    peak = data.compute_peak(dtype)
    hbm = data.ceilings.get("hbm_gbps") if data.ceilings else None
    ridge = peak * 1e3 / hbm if peak and hbm else 100.0  # FLOP/byte; ~H100 bf16 ÷ 10 without ceilings
    return intensity < ridge


def _status_marks(ax, xs_status, style):
    for x, status in xs_status:
        ax.plot([x], [0.04], marker="x", markersize=7, color=style["color"], transform=ax.get_xaxis_transform(),
                clip_on=False, linestyle="none")
        ax.annotate(status, (x, 0.04), xycoords=ax.get_xaxis_transform(), xytext=(4, 2), textcoords="offset points",
                    fontsize=7, color=style["color"])


ABOVE_ROOF = "above-roof"  # the gid of a marker flagging a point above its roof (a model or timing fault)


def _nice_below(v: float) -> float:
    """The largest 1, 2 or 5 × 10^k at most ``v``: a labelled tick of :func:`_readable_log_axis`."""
    k = math.floor(math.log10(v))
    return max(m * 10.0 ** k for m in (1, 2, 5) if m * 10.0 ** k <= v * (1 + 1e-9))


def _nice_above(v: float) -> float:
    k = math.floor(math.log10(v))
    return min(m * 10.0 ** e for e in (k, k + 1) for m in (1, 2, 5) if m * 10.0 ** e >= v * (1 - 1e-9))


def _flag_above_roof(ax, point, text: str = ""):
    """A red ring (and a note) on a point above its roof: drawn, never passed over silently."""
    ax.plot([point[0]], [point[1]], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="red",
            markeredgewidth=1.5, linestyle="none", gid=ABOVE_ROOF)
    if text:
        ax.annotate(text, point, xytext=(0, 9), textcoords="offset points", ha="center", va="bottom",
                    fontsize=6.5, color="red")


def figure_unit(data: GpuData, base: str, dtypes) -> tuple[str, str]:
    """One unit per figure, never TFLOP/s rows next to GB/s rows: GB/s when the shape's minimum
    model is bandwidth-bound in any dtype drawn, else TFLOP/s."""
    return ("gbps", "GB/s") if any(_memory_bound(data, base, d) for d in dtypes) else ("tflops", "TFLOP/s")


def draw_throughput(data: GpuData) -> list[Path]:
    plt = _pyplot()
    written = []
    sweeps = defaultdict(set)  # (op, base, layout) -> sizes measured
    for r in data.rows:
        try:
            base, hw = split_shape_name(r["shape"])
        except ValueError:
            continue
        sweeps[(r["op"], base, r["layout"])].add(hw)
    for (op, base, layout), sizes in sorted(sweeps.items(), key=lambda item: data.layouts().index(item[0][2])):
        if len(sizes) < 2:
            continue
        sizes = sorted(sizes)
        shapes = {hw: base if REFERENCE_SHAPES[base].H == hw else f"{base}@H{hw}" for hw in sizes}
        in_sweep = [r for r in data.rows if r["op"] == op and r["layout"] == layout and r["shape"] in shapes.values()]
        dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in in_sweep)]
        passes = [p for p in PASSES if any(r["pass"] == p for r in in_sweep)]
        metric, unit = figure_unit(data, base, dtypes)
        fig, axes = plt.subplots(len(dtypes), len(passes), figsize=(4.6 * len(passes), 3.3 * len(dtypes) + 0.9),
                                 squeeze=False, sharex=True)
        providers, pending = [], []
        for i, dtype in enumerate(dtypes):
            ceiling = (data.ceilings or {}).get("hbm_gbps") if metric == "gbps" else data.compute_peak(dtype)
            for j, pass_ in enumerate(passes):
                ax = axes[i][j]
                ends, values = [], []
                for provider in data.values("provider"):
                    points, failed = [], []
                    for hw in sizes:
                        r = data.get(op, pass_, dtype, shapes[hw], provider, layout)
                        if r is None:
                            continue
                        if r["status"]:
                            failed.append((hw, r["status"]))
                        elif r[metric]:
                            points.append((hw, r[metric]))
                    if not points and not failed:
                        continue
                    style = provider_style(provider)
                    if provider not in providers:
                        providers.append(provider)
                    if points:
                        ax.plot(*zip(*points), marker=PASS_MARKER[pass_], markersize=4, label=label(provider), **style)
                        # Every line named where it ends, the lowest (the unfold baseline) too.
                        ends.append((points[-1], label(provider), style["color"]))
                        values += [y for _, y in points]
                        for point in points:
                            if ceiling and point[1] > ceiling:
                                _flag_above_roof(ax, point, f"above: {point[1] / ceiling:.0%}")
                    _status_marks(ax, failed, style)
                if not ends and not ax.lines:
                    ax.remove()  # nothing measured in this dtype and pass: no empty panel
                    continue
                if ceiling:
                    ax.axhline(ceiling, color="k", linewidth=1, linestyle=":")
                    ax.annotate(f"measured {'HBM' if metric == 'gbps' else dtype + ' matmul'} {ceiling:,.0f} {unit}",
                                (0.01, ceiling), xycoords=("axes fraction", "data"), xytext=(0, 2),
                                textcoords="offset points", fontsize=7)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(sizes)
                ax.set_xticklabels([str(s) for s in sizes])
                ax.xaxis.set_minor_locator(plt.NullLocator())
                # Room right of the last size for the line names.
                ax.set_xlim(sizes[0] / 1.15, sizes[-1] * 2.2)
                _readable_log_axis(ax.yaxis)
                if values:
                    # Both limits on labelled ticks, so the lowest line sits above a labelled tick.
                    top = max(values + ([ceiling] if ceiling else []))
                    ax.set_ylim(_nice_below(min(values) / 1.05), _nice_above(top * 1.6))
                ax.set_title(f"{dtype} · {pass_}")
                ax.set_ylabel(f"{unit} (minimum model / time)")
                ax.set_xlabel("input H = W")
                pending.append((ax, ends))
        handles = [plt.Line2D([], [], marker="o", markersize=4, label=label(p), **provider_style(p)) for p in providers]
        fig.suptitle(f"{op}, {_layout_title(layout)}: throughput in {unit} against size ({base} with H = W varied: "
                     f"{_shape_caption(base)})\n"
                     f"{data.name} — higher is better; × marks a point that did not run (OOM / error / mismatch); "
                     f"a red ring, a point above the measured ceiling (a fault to look into)",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.93))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
        for ax, ends in pending:
            place_labels(ax, ends, fontsize=6.5)
        written += _save(fig, data.folder / f"throughput_{op}_{base}_{layout}")
    return written


def _reference_shapes(data: GpuData, rows=None) -> list[str]:
    present = {r["shape"] for r in (data.rows if rows is None else rows)}
    return [s for s in REFERENCE_SHAPES if s in present]


def draw_speedup(data: GpuData) -> list[Path]:
    plt = _pyplot()
    written = []
    if not _reference_shapes(data):
        return written
    # One figure per dtype and layout measured (a quick run has nhwc in bf16 only).
    combos = [(d, x) for x in data.layouts() for d in DTYPES
              if any(r["dtype"] == d and r["layout"] == x for r in data.rows)]
    for dtype, layout in combos:
        in_combo = [r for r in data.rows if r["dtype"] == dtype and r["layout"] == layout]
        shapes = _reference_shapes(data, in_combo)
        if not shapes:
            continue
        # A panel per pass measured here, and only those (no empty panels).
        passes = [p for p in PASSES if any(r["pass"] == p and r["shape"] in shapes for r in in_combo)]
        # The static floor last in every group: it is a reference line, not a competitor.
        providers = sorted(data.values("provider"), key=lambda p: p == "static_conv")
        fig, axes = plt.subplots(len(passes), 1, figsize=(max(7.0, 1.5 * len(shapes) + 2.5), 2.9 * len(passes) + 1.2),
                                 squeeze=False)
        shown = []
        for ax, pass_ in zip(axes[:, 0], passes):
            width = 0.8 / max(1, len(providers) - 1)
            ymax = 1.0
            ymin = 1.0
            for gi, shape in enumerate(shapes):
                op = REFERENCE_SHAPES[shape].op
                baseline = data.get(op, pass_, dtype, shape, SPEEDUP_BASELINE[op], layout)
                others = [p for p in providers
                          if p != SPEEDUP_BASELINE[op] and data.get(op, pass_, dtype, shape, p, layout)]
                if baseline is None:
                    continue
                if baseline["status"]:
                    ax.annotate(f"{label(SPEEDUP_BASELINE[op])}\n{baseline['status']}: no ratio", (gi, 1.0),
                                ha="center", va="bottom", fontsize=7, color="C3")
                    continue
                for k, provider in enumerate(others):
                    r = data.get(op, pass_, dtype, shape, provider, layout)
                    x = gi - 0.4 + width * (k + 0.5)
                    style = provider_style(provider)
                    if provider not in shown:
                        shown.append(provider)
                    if r["status"]:
                        ax.annotate(r["status"], (x, 1.0), ha="center", va="bottom", fontsize=6, rotation=90,
                                    color=style["color"])
                        continue
                    speedup = baseline["ms_median"] / r["ms_median"]
                    ymax, ymin = max(ymax, speedup), min(ymin, speedup)
                    # Bars grow from the 1× line: up is faster than the baseline, down slower.
                    ax.bar(x, speedup - 1.0, width=width * 0.92, bottom=1.0,
                           color=style["color"], alpha=0.55 if provider == "static_conv" else 0.9,
                           hatch="//" if provider == "static_conv" else None, edgecolor="white")
                    ax.annotate(f"{speedup:.3g}×", (x, speedup), ha="center", va="bottom" if speedup >= 1 else "top",
                                fontsize=6, xytext=(0, 1 if speedup >= 1 else -1), textcoords="offset points")
            if not ax.patches and not ax.texts:
                ax.remove()  # no baseline for any shape in this pass: no empty panel
                continue
            ax.axhline(1.0, color="k", linewidth=1)
            ax.set_yscale("log")
            ax.set_ylim(min(0.5, ymin / 2), max(2.0, ymax * 2.5))
            _readable_log_axis(ax.yaxis, "×")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{s}\n{REFERENCE_SHAPES[s].op}\nvs {label(SPEEDUP_BASELINE[REFERENCE_SHAPES[s].op])}"
                                for s in shapes], fontsize=7)
            ax.set_xlim(-0.6, len(shapes) - 0.4)
            ax.set_ylabel("speedup (×, log)")
            ax.set_title(f"{dtype} · {pass_}")
            ax.grid(axis="x", visible=False)
        handles = [plt.Rectangle((0, 0), 1, 1, facecolor=provider_style(p)["color"], edgecolor="white",
                                 alpha=0.55 if p == "static_conv" else 0.9,
                                 hatch="//" if p == "static_conv" else None, label=label(p)) for p in shown]
        fig.suptitle(f"Speedup over the unfold baseline (family 1) / batch-as-groups conv (family 2), {dtype}, "
                     f"{_layout_title(layout)}\n"
                     f"{data.name} — time of the baseline ÷ time of the provider; above 1 is faster", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 0.94))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
        written += _save(fig, data.folder / f"speedup_{dtype}_{layout}")
    return written


def roof_fraction(data: GpuData, row: dict) -> float | None:
    """Achieved TFLOP/s over the roofline at the row's arithmetic intensity, or None without
    ceilings or a time."""
    peak = data.compute_peak(row["dtype"])
    hbm = (data.ceilings or {}).get("hbm_gbps")
    if row["status"] or not peak or not hbm or not row["gbps"]:
        return None
    intensity = row["tflops"] * 1e3 / row["gbps"]  # FLOP/byte: both numbers come from the model
    return row["tflops"] / roof_tflops(intensity, hbm, peak)


def draw_roofline(data: GpuData, provider: str | None = None) -> list[Path]:
    """``provider``: whose points to draw; None: each op's headline provider."""
    plt = _pyplot()
    hbm = (data.ceilings or {}).get("hbm_gbps")
    shapes = _reference_shapes(data)
    rows = [r for r in data.rows if r["provider"] == (provider or headline(r["op"])) and r["shape"] in shapes
            and not r["status"]]
    if not hbm or not rows:
        return []
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    layouts = data.layouts(rows)
    # A row of panels per layout, so each panel keeps one label per shape and pass.
    fig, axes = plt.subplots(len(layouts), len(dtypes), figsize=(5.6 * len(dtypes), 5.0 * len(layouts)),
                             squeeze=False)
    intensities = [r["tflops"] * 1e3 / r["gbps"] for r in rows]
    lo, hi = min(intensities) / 4, max(intensities) * 30  # room on the right for labels
    pending, roof_samples, roof_labels = [], {}, {}
    panels = [(axes[i][j], layout, dtype) for i, layout in enumerate(layouts) for j, dtype in enumerate(dtypes)]
    for ax, layout, dtype in panels:
        cell = [r for r in rows if r["dtype"] == dtype and r["layout"] == layout]
        if not cell:  # e.g. a quick run's nhwc has bf16 only
            ax.remove()
            continue
        peak = data.compute_peak(dtype)
        ridge = peak * 1e3 / hbm
        xs = sorted({lo, hi, ridge} | {lo * (hi / lo) ** (k / 50) for k in range(51)})
        xs = [x for x in xs if lo <= x <= hi] or [lo, hi]
        ax.plot(xs, [roof_tflops(x, hbm, peak) for x in xs], color="k", linewidth=1.5)
        roof_samples[ax] = [(x, roof_tflops(x, hbm, peak)) for x in xs]
        roof_labels[ax] = []
        hbm_label = ax.annotate(f"HBM {hbm:,.0f} GB/s", (xs[0], roof_tflops(xs[0], hbm, peak)), xytext=(10, -6),
                                textcoords="offset points", va="top", fontsize=7)
        # Left of the ridge and above the roof no point can be: room for the roof's label.
        roof_labels[ax] += [hbm_label, ax.annotate(f"{dtype} matmul {peak:,.0f} TFLOP/s", (ridge, peak), xytext=(-6, 4),
                                       textcoords="offset points", ha="right", va="bottom", fontsize=7)]
        labelled = []
        for r in cell:
            intensity = r["tflops"] * 1e3 / r["gbps"]
            colour = f"C{list(REFERENCE_SHAPES).index(r['shape']) % 10}"
            ax.plot([intensity], [r["tflops"]], marker=PASS_MARKER[r["pass"]], color=colour, markersize=6,
                    linestyle="none")
            fraction = roof_fraction(data, r)
            above = fraction > 1.0 + 1e-9  # faster than the ceilings allow: a timing or model fault
            if above:
                _flag_above_roof(ax, (intensity, r["tflops"]))  # its label says so
            labelled.append(((intensity, r["tflops"]), f"{r['shape']} {PASS_SHORT[r['pass']]} "
                             f"{100 * fraction:.0f}%{' (above roof!)' if above else ''}",
                             "red" if above else colour))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ys = [roof_tflops(lo, hbm, peak)] + [y for (_, y), _, _ in labelled]
        ax.set_ylim(min(ys) / 3, max([peak] + ys) * 4)
        pending.append((ax, labelled))
        ax.set_xlabel("arithmetic intensity (FLOP/byte, minimum model)")
        ax.set_ylabel("achieved TFLOP/s (minimum FLOPs / time)")
        providers = ", ".join(dict.fromkeys(label(r["provider"]) for r in cell))
        ax.set_title(f"{dtype} · {_layout_title(layout)}: {providers}", fontsize=9)
    fig.suptitle(f"Roofline on {data.name}: ceilings measured on the device; label = shape, pass, % of the roof; "
                 "a red ring, a point above the roof (a fault to look into)",
                 fontsize=10)
    markers = [plt.Line2D([], [], marker=m, color="0.3", linestyle="none", label=p) for p, m in PASS_MARKER.items()]
    fig.tight_layout(rect=(0, 0.06 / len(layouts), 1, 1 - 0.05 / len(layouts)))
    fig.legend(handles=markers, loc="lower center", ncol=3, frameon=False)
    # Labels placed after the layout is final, so their screen positions are the saved ones.
    for ax, labelled in pending:
        place_labels(ax, labelled, fontsize=6.5, obstacles=roof_samples[ax], avoid=roof_labels[ax])
    return _save(fig, data.folder / "roofline")


def place_labels(ax, points, fontsize: float = 7.0, obstacles=(), avoid=()):
    """Annotate points without overlaps: each label takes the first of a ring of candidate
    offsets (growing outwards) whose box stays in the axes and hits no label, point or obstacle
    (data coordinates, e.g. samples of a drawn line), with a leader line when it lands away from
    its point; ``avoid``: artists (texts) already drawn. Greedy, top to bottom; good for tens
    of points."""
    import math
    fig = ax.figure
    scale = fig.dpi / 72.0
    char_w, line_h = 0.62 * fontsize * scale, 1.3 * fontsize * scale
    to_screen = ax.transData.transform
    frame = ax.get_window_extent()
    marks = [to_screen(p) for p, _, _ in points] + [to_screen(o) for o in obstacles]
    taken = [(x - 4 * scale, y - 4 * scale, x + 4 * scale, y + 4 * scale) for x, y in marks]
    renderer = fig.canvas.get_renderer()
    taken += [tuple(artist.get_window_extent(renderer).extents) for artist in avoid]
    angles = [a * math.pi / 8 for a in (0, -1, 1, -2, 2, 7, 9, 6, 10, -3, 3, 5, 11, 4, 12, 8)]
    offsets = [(r * math.cos(a), r * math.sin(a)) for r in (7, 14, 22, 32, 44, 58, 74, 92) for a in angles]
    for point, text, colour in sorted(points, key=lambda item: -item[0][1]):
        px, py = to_screen(point)
        w, h = char_w * len(text), line_h
        chosen = offsets[0]
        for dx, dy in offsets:
            x0 = px + dx * scale if dx >= 0 else px + dx * scale - w
            y0 = py + dy * scale - h / 2
            box = (x0, y0, x0 + w, y0 + h)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                chosen = (dx, dy)
                taken.append(box)
                break
        dx, dy = chosen
        far = abs(dx) > 8 or abs(dy) > 8
        ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=colour,
                    ha="left" if dx >= 0 else "right", va="center",
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5, "alpha": 0.7} if far else None)


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------

INTRO = """# Performance reports

Produced by `dynconv bench` on a machine with a CUDA GPU (it measures, writes
`<gpu>/results.csv` and `<gpu>/ceilings.json`, then draws the plots) and re-drawn from the
committed csv files by `dynconv plot`, which also rewrites this page. `make run` does both on a
GPU machine. Every figure below comes from a measurement in one of those csv files.

How it measures (`dynconv/bench.py`): CUDA events around each call after a warm-up; the median
with 20th/80th percentiles over at least 10 calls (3 for calls over 100 ms); a buffer larger than
L2 overwritten before every call and inputs rotated, so no call reads warm cache; peak memory from
`torch.cuda.max_memory_allocated` over one call (inputs, temporaries and, for backward, the saved
forward tensors included). Each provider's forward output is checked against a reference first.
`OOM`, `error` or `mismatch` in `ms_median` marks a measurement that did not produce a time.

`gbps` and `tflops` are the op's *minimum* bytes and FLOPs (docs/operators.md §3, `dynconv/roofline.py`:
each input read once, each output written once; 2 FLOPs per multiply-add) divided by the time,
for every provider alike, so they compare providers at one shape and show the distance to the
device's measured ceilings (HBM: device-to-device copy; compute: torch.mm at 8192³).

Providers: `dynconv` (the Triton kernels), `unfold` (docs/operators.md §3 unfold baseline), `shift_add`
(plain-PyTorch shift-and-add), `batch_groups` (per-sample weights as one grouped conv),
`all_regions` / `loop` (family-2 references), `static_conv` (cuDNN `nn.Conv2d` of the same shape
with fixed weights: depth-wise for family 1, dense for family 2 — the floor, not a competitor).
`involution_layer` is Involution2d from the reduced feature z on (span conv R → K²G, then the
aggregation): `dynconv_fused` runs it as one kernel (`dynconv.involution_fused`, no per-pixel
weights in memory) and is what its summary rows report; the other providers run the span conv
with `F.conv2d` and then their own aggregation, so its `vs dynconv` cell is the fused kernel's
gain over the unfused layer. Its minimum bytes are the fused layer's (x, z, span weights → y).

Layouts (the csv's `layout` column): `nchw` (contiguous) or `nhwc` (`torch.channels_last`), the
memory format of the activations x, z and DRConv's guide (and of the static conv's weight) that
every provider of a measurement receives alike; each backward receives its gradient in the format
of its provider's output. A provider that computes in another format converts inside its call
and is timed doing so. Every ratio, table row and plot compares providers within one layout:
cuDNN's static conv is much faster in channels_last for the half types, so a cross-layout ratio
would flatter one side. `dynconv bench` measures both layouts in every dtype; `--quick` measures
nhwc in bf16 only (the dtype of issue 7's channels_last targets) to fit one 10-minute device
call. Rows from before the column are nchw.

Reference shapes (the csv's `shape` column; `R1@H112` is R1 at H = W = 112):"""


# ---------------------------------------------------------------------------------------------
# PREDICTED roofline: the static model's committed tables (perf_reports/static/), never measured
# ---------------------------------------------------------------------------------------------

KERNEL_MARKER = {"fwd": "o", "dx": "s", "dw": "D", "guide": "P", "dz": "v", "dspan": "^"}


def predicted_tables(reports: Path) -> dict[str, list[dict]]:
    """``dynconv inspect --bounds`` tables committed under ``<reports>/static``, by triton version."""
    from dynconv.bounds import load_tables

    return load_tables(reports / "static")


def draw_predicted(reports: Path) -> list[Path]:
    """One figure per committed table: ``static/roofline_predicted_triton<version>``, every point
    the model's PREDICTED throughput (minimum FLOPs over the predicted time), on the model's roofs."""
    written = []
    for version, rows in predicted_tables(reports).items():
        if rows:
            # The suffix is spelled out: the version's dot would read as one.
            written += _draw_predicted_roofline(rows, reports / "static" / f"roofline_predicted_triton{version}.png")
    return written


def predicted_layouts(rows: list[dict]) -> list[str]:
    """The layouts of a table's rows, one figure row each: NCHW and NHWC first, then any other (the
    attention layouts, BHWND and BNHWD) in the table's order."""
    present = list(dict.fromkeys(r["layout"] for r in rows))
    return [lay for lay in ("NCHW", "NHWC") if lay in present] + [lay for lay in present if lay not in ("NCHW", "NHWC")]


def _draw_predicted_roofline(rows: list[dict], path: Path) -> list[Path]:
    from dynconv.bounds import MODEL, fma_tflops, mma_tflops

    plt = _pyplot()
    hbm = MODEL["hbm_bytes_per_s"] / 1e9  # GB/s
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    layouts = predicted_layouts(rows)
    fig, axes = plt.subplots(len(layouts), len(dtypes), figsize=(6.4 * len(dtypes), 5.6 * len(layouts)), squeeze=False)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    intensities = [r["flops"] / r["min_bytes"] for r in rows]
    lo, hi = min(intensities) / 4, max(intensities) * 30
    pending = []
    for i, layout in enumerate(layouts):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            cell = [r for r in rows if r["dtype"] == dtype and r["layout"] == layout]
            roofs = {"CUDA-core FMA": fma_tflops(), f"tensor core ({'tf32' if dtype == 'fp32' else dtype})":
                     mma_tflops("gmmatf32" if dtype == "fp32" else "gmma16")}
            xs = [lo * (hi / lo) ** (k / 60) for k in range(61)]
            samples = []
            for (name, peak), style in zip(roofs.items(), ("-", "--")):
                ys = [roof_tflops(x, hbm, peak) for x in xs]
                ax.plot(xs, ys, color="k", linestyle=style, linewidth=1.2, label=f"{name} {peak:,.0f} TFLOP/s")
                samples += list(zip(xs, ys))
            labelled = []
            for r in cell:
                x = r["flops"] / r["min_bytes"]
                y = r["flops"] / (r["bound_us"] * 1e-6) / 1e12
                colour = f"C{cases.index(r['case']) % 10}"
                ax.plot([x], [y], marker=KERNEL_MARKER.get(r["kernel"], "x"), color=colour, linestyle="none")
                labelled.append(((x, y), f"{r['case']} {r['kernel']} {100 * r['predicted_fraction']:.0f}%", colour))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ys = [y for (_, y), _, _ in labelled] or [1.0]
            ax.set_ylim(min(ys) / 3, max(roofs.values()) * 4)
            ax.set_xlabel("arithmetic intensity (FLOP/byte, each kernel's own minimum)")
            ax.set_ylabel("PREDICTED TFLOP/s (minimum FLOPs / predicted time)")
            ax.set_title(f"PREDICTED · {dtype} · {_layout_title(layout.lower())}", fontsize=9)
            ax.legend(loc="upper left", fontsize=7, frameon=False)
            pending.append((ax, labelled, samples))
    version, arch = rows[0]["triton"], rows[0]["arch"]
    fig.suptitle(f"PREDICTED by the static model (dynconv inspect --bounds; triton {version}, {arch}; H200 model, "
                 f"HBM {hbm:,.0f} GB/s; latency fitted to one measured kernel): predictions, not measurements. "
                 "Label: shape, kernel, % of the roofline",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    for ax, labelled, samples in pending:
        place_labels(ax, labelled, fontsize=6, obstacles=samples)
    return _save(fig, path)


def predicted_summary(reports: Path) -> str:
    """A terminal table of the committed predictions: a row per (shape, kernel), a column per dtype and
    layout, with a header wherever the layouts change (the attention rows' are BHWND and BNHWD). One
    decimal: 84.7% must not read as issue 12's 85%."""
    lines = []
    for version, rows in predicted_tables(reports).items():
        lines.append(f"PREDICTED fraction of the roofline (static model, not measured), triton {version}:")
        fractions = {(r["case"], r["kernel"], r["dtype"], r["layout"]): r["predicted_fraction"] for r in rows}
        header = None
        for case, kernel in dict.fromkeys((r["case"], r["kernel"]) for r in rows):
            layouts = predicted_layouts([r for r in rows if r["case"] == case])
            columns = [(dtype, layout) for dtype in ("fp32", "bf16") for layout in layouts]
            if columns != header:
                header = columns
                lines.append(f"  {'case':<9} {'kernel':<6} " + " ".join(f"{d + ' ' + lay:>10}" for d, lay in columns))
            cells = [fractions.get((case, kernel, dtype, layout)) for dtype, layout in columns]
            lines.append(f"  {case:<9} {kernel:<6} "
                         + " ".join(f"{'-' if f is None else f'{100 * f:.1f}%':>10}" for f in cells))
    return "\n".join(lines)


def _predicted_section(reports: Path, tables: dict[str, list[dict]]) -> str:
    if not tables:
        return ""
    out = ["## PREDICTED (static model, not measured)", "",
           "Predicted from the compiled code (`dynconv inspect --bounds`, see `static/`: throughput pipes and a "
           "latency term fitted to the kernels measured above); they are no measurement and are never mixed "
           "with one.", ""]
    for version in tables:
        stem = f"roofline_predicted_triton{version}"
        if (reports / "static" / f"{stem}.png").exists():
            out.append(f"![{stem}](static/{stem}.png)")
        out.append(f"Table: [static/bounds-triton{version}.md](static/bounds-triton{version}.md)")
        out.append("")
    return "\n".join(out)


def _intro() -> str:
    shapes = "\n".join(f"- `{name}` {p.op}: {_shape_caption(name)}, {p.H}×{p.W}" for name, p in REFERENCE_SHAPES.items())
    sweeps = ", ".join(f"{b} at H = W ∈ {{{', '.join(map(str, s))}}}" for b, s in SWEEPS.items())
    return INTRO + "\n\n" + shapes + f"\n\nSize sweep (other dimensions as the reference): {sweeps}.\n"


def _ratio_cell(dyn: dict, base: dict | None) -> str:
    if base is None:
        return "—"
    if base["status"]:
        return f"baseline {base['status']}"
    time_ratio = base["ms_median"] / dyn["ms_median"]
    cell = f"{time_ratio:.2f}×"
    if base.get("peak_mem_mb") and dyn.get("peak_mem_mb"):
        cell += f" · mem {base['peak_mem_mb'] / dyn['peak_mem_mb']:.2f}×"
    return cell


def summary_table(data: GpuData, dtype: str, family: int) -> str | None:
    """Markdown table for one dtype and kernel family at the reference shapes, a row per shape,
    layout and pass: the headline provider's time, peak memory and % of roofline (dynconv; the op
    cell names another headline), and for each baseline measured there in the same layout (time of
    baseline ÷ time of headline) · (its peak memory ÷ the headline's). A provider is a column if it
    is a baseline of some row ("—" in its own rows)."""
    shapes = [s for s in _reference_shapes(data) if FAMILY[REFERENCE_SHAPES[s].op] == family]
    present = {r["provider"] for r in data.rows if r["shape"] in shapes and r["op"] == REFERENCE_SHAPES[r["shape"]].op
               and r["provider"] != headline(r["op"])}
    # Registry order, the static floor last, providers the registry does not know at the end.
    baselines = [p for p in PROVIDERS if p != "static_conv" and p in present]
    baselines += sorted(present - set(PROVIDERS)) + (["static_conv"] if "static_conv" in present else [])
    lines = []
    for shape in shapes:
        op = REFERENCE_SHAPES[shape].op
        main = headline(op)
        for layout, pass_ in ((x, p) for x in data.layouts() for p in PASSES):
            dyn = data.get(op, pass_, dtype, shape, main, layout)
            if dyn is None:
                continue
            if dyn["status"]:
                cells = [dyn["status"], "", ""] + ["" for _ in baselines]
            else:
                fraction = roof_fraction(data, dyn)
                peak = f"{dyn['peak_mem_mb']:,.0f}" if dyn.get("peak_mem_mb") else "—"
                cells = [f"{dyn['ms_median']:.3g}", peak, f"{100 * fraction:.0f}%" if fraction is not None else "—"]
                cells += [_ratio_cell(dyn, data.get(op, pass_, dtype, shape, b, layout) if b != main else None)
                          for b in baselines]
            op_cell = op if main == "dynconv" else f"{op} ({main})"
            lines.append(f"| {shape} | {op_cell} | {layout} | {pass_} | " + " | ".join(cells) + " |")
    if not lines:
        return None
    header = ("| shape | op | layout | pass | dynconv ms | peak MiB | % of roof | "
              + " | ".join(f"vs {label(b)}" for b in baselines) + " |")
    rule = "|" + "---|" * 4 + "---:|" * (3 + len(baselines))
    return "\n".join([header, rule] + lines)


def _speedup_order(path: Path):
    """``speedup_<dtype>_<layout>``: by dtype, then layout."""
    parts = path.stem.split("_")
    dtype, layout = parts[1], parts[2] if len(parts) > 2 else ""
    return (DTYPES.index(dtype) if dtype in DTYPES else 9, LAYOUTS.index(layout) if layout in LAYOUTS else 9,
            path.stem)


def _gpu_section(data: GpuData, reports: Path) -> str:
    rel = data.folder.relative_to(reports).as_posix() if data.folder.is_relative_to(reports) else data.folder.as_posix()
    dates = sorted({r["date"][:10] for r in data.rows if r["date"]})
    commits = sorted({r["commit"][:10] for r in data.rows if r["commit"]})
    versions = sorted({f"torch {r['torch']}, triton {r['triton']}" for r in data.rows})
    out = [f"## {data.name}", "",
           f"Folder `{rel}/`: {len(data.rows)} measurements, taken "
           f"{' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else 'on an unrecorded date'} "
           f"at commit {', '.join(commits) or 'unknown'} with {'; '.join(versions)}."]
    c = data.ceilings
    if c:
        out.append(f"Measured ceilings: HBM {c['hbm_gbps']:,.0f} GB/s; matmul fp32 {c['fp32_tflops']:,.1f}, "
                   + (f"tf32 {c['tf32_tflops']:,.0f}, " if c.get("tf32_tflops") else "")
                   + f"bf16 {c['bf16_tflops']:,.0f}"
                   + (f", fp16 {c['fp16_tflops']:,.0f}" if c.get("fp16_tflops") else "") + " TFLOP/s.")
    else:
        out.append("No `ceilings.json`: the roofline plot and the % of roofline are left out.")
    out.append("")
    if (data.folder / "roofline.png").exists():
        out += [f"![roofline on {data.name}]({rel}/roofline.png)", ""]
    out += ["### Summary at the reference shapes", "",
            "Each `vs` cell: baseline time ÷ dynconv time (above 1: dynconv is faster) · baseline peak "
            "memory ÷ dynconv peak memory (above 1: dynconv needs less); where the op cell names a provider, "
            "its row reports that provider instead of `dynconv`. Against the static conv, the time "
            "ratio is the fraction of a fixed-weight conv's speed that the dynamic op reaches. Every ratio "
            "is within the row's layout: `nchw` (contiguous) or `nhwc` (channels_last).", ""]
    tables = [(d, f, summary_table(data, d, f)) for d in ("bf16", "fp16", "fp32") for f in (1, 2)]
    tables = [(d, f, t) for d, f, t in tables if t]
    if not tables:
        out += ["No dynconv measurements in this folder yet (baselines only).", ""]
    headline = tables[0][0] if tables else None
    for dtype, family, table in tables:
        title = f"{dtype}, family {family} ({'per-pixel / per-sample depth-wise' if family == 1 else 'expert mixing'})"
        if dtype == headline:
            out += [f"**{title}**", "", table, ""]
        else:
            out += [f"<details><summary>{title}</summary>", "", table, "", "</details>", ""]
    speedups = sorted(data.folder.glob("speedup_*.png"), key=_speedup_order)
    if speedups:
        out += ["### Speedup over the baseline", ""] + [f"![{p.stem}]({rel}/{p.name})" for p in speedups] + [""]
    throughputs = sorted(data.folder.glob("throughput_*.png"))
    if throughputs:
        out += ["### Throughput against size", ""] + [f"![{p.stem}]({rel}/{p.name})" for p in throughputs] + [""]
    return "\n".join(out)


# The README's first line: a README without it (and without the heading this page had before the
# marker) is someone else's, and is replaced only when the user says so (--force).
README_MARKER = "<!-- Written by `dynconv plot` / `dynconv bench`, which rewrite this file: edit the code, not it. -->"
_LEGACY_README_START = "# Performance reports\n\nProduced by `dynconv bench`"


def readme_problem(reports: Path, force: bool = False) -> str | None:
    """Why ``reports/README.md`` may not be rewritten (None: it may): it exists and the tool did
    not write it, and ``force`` is not given."""
    path = Path(reports) / "README.md"
    if force or not os.path.lexists(path):
        return None
    start = ""
    if path.is_file():  # a FIFO or a device is nobody's page: not opened (a FIFO would block)
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read(len(README_MARKER))
        except (OSError, ValueError):
            pass
    if start.startswith(README_MARKER) or start.startswith(_LEGACY_README_START):
        return None
    return (f"{path} was not written by dynconv and would be replaced by the reports page; "
            "pass --force to replace it, or choose another folder")


def _measured_kernels_section(reports: Path, tables: dict[str, list[dict]]) -> str:
    """Kernel times measured outside a committed csv (``<gpu>/measured.json``), beside the model."""
    predicted = {(r["case"], r["kernel"], r["dtype"], r["layout"]): r for r in tables.get("3.6", [])}
    lines = []
    for path in sorted(Path(reports).glob("*/measured.json")):
        doc = json.loads(path.read_text())
        for row in doc["rows"]:
            model = predicted.get((row["case"], row["kernel"], row["dtype"], row["layout"]))
            now = "superseded" if row.get("superseded") else f"{model['bound_us']:.0f}" if model else "—"
            lines.append(f"| {doc['gpu']} | {row['case']} {row['kernel']} {row['dtype']} {row['layout']} | "
                         f"{row['median_us']:.0f} | {doc['torch']}, triton {doc['triton']}, {doc['commit']} | {now} |")
    if not lines:
        return ""
    return "\n".join(["## Kernels measured (MEASURED)", "",
                      "Single kernels timed on a GPU (`<gpu>/measured.json`, raw logs beside it), with the static "
                      "model's PREDICTED time of the launcher's default launch today (triton 3.6 table) for comparison; "
                      "`measured.json` says which config was timed.", "",
                      "| GPU | kernel | measured µs | torch, triton, commit | PREDICTED µs |", "|---|---|---:|---|---:|",
                      *lines, ""])


def render_readme(reports: Path, datasets: list[GpuData]) -> str:
    parts = [README_MARKER + "\n" + _intro()]
    tables = predicted_tables(reports)
    measured = _measured_kernels_section(reports, tables)
    if not datasets:
        parts.append("## Measurements\n\n**No benchmark tables yet.** No GPU session has committed the csv of a "
                     "`dynconv bench` run, so there are no tables or plots here"
                     f"{' (single kernels measured so far are listed below)' if measured else ''}. They will appear "
                     "after a GPU session runs `dynconv bench` and commits `perf_reports/<gpu>/`.\n")
    if measured:
        parts.append(measured)
    for data in datasets:
        parts.append(_gpu_section(data, reports))
    predicted = _predicted_section(reports, tables)
    if predicted:
        parts.append(predicted)
    return "\n".join(parts).rstrip() + "\n"


def write_readme(reports: Path, datasets: list[GpuData] | None = None, force: bool = False) -> Path:
    """Rewrite ``reports/README.md``; FileExistsError (see :func:`readme_problem`) for a README the
    tool did not write, unless ``force``."""
    problem = readme_problem(reports, force)
    if problem:
        raise FileExistsError(problem)
    datasets = load(reports) if datasets is None else datasets
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "README.md"
    path.write_text(render_readme(reports, datasets))
    return path


def draw_all(reports: Path | str | None = None, gpu: str | None = None, log=print, force: bool = False,
             quiet: bool = False) -> list[Path]:
    """Draw every plot of every GPU folder (or of ``gpu``) and rewrite the README from all of
    them. Returns the plot files drawn (empty when there is nothing measured). A README the tool
    did not write raises FileExistsError before anything is drawn, unless ``force``."""
    if reports is None:
        reports = default_reports_dir()
    if reports is None:
        raise ValueError("outside a dynconv repository checkout there is no default reports folder: pass reports")
    reports = Path(reports)
    problem = readme_problem(reports, force)
    if problem:
        raise FileExistsError(problem)
    written = []
    datasets = load(reports, gpu)
    draws = (draw_throughput, draw_speedup, draw_roofline)
    progress = Progress(len(datasets) * len(draws), "plot", quiet)  # seconds per figure
    for data in datasets:
        for draw in draws:
            written += draw(data)
            progress.update(f"{data.name} {draw.__name__}")
        log(f"{data.folder}: drew {sum(1 for p in written if p.parent == data.folder)} files")
    write_readme(reports, force=force)
    return written


def main(argv=None) -> int:
    parser = command_parser("dynconv plot", __doc__)
    parser.add_argument("--reports", type=Path, default=None,
                        help="reports folder (default: perf_reports/ of the repository checkout dynconv runs "
                             "from; required elsewhere)")
    parser.add_argument("--gpu", default=None, help="only this GPU folder (the README still covers all of them)")
    parser.add_argument("--force", action="store_true", help="replace a README.md that dynconv did not write")
    add_quiet(parser)
    args = parser.parse_args(argv)
    reports = args.reports if args.reports is not None else default_reports_dir()
    if reports is None:
        return fail("dynconv plot", "not inside a dynconv repository checkout, so there is no default "
                                    "reports folder: pass --reports DIR")
    if args.gpu and not (reports / args.gpu / "results.csv").exists():
        print(f"dynconv plot: no {reports / args.gpu / 'results.csv'}", file=sys.stderr)
        return 2
    predicted = draw_predicted(reports)  # before the README, which links these plots
    try:
        drawn = draw_all(reports, args.gpu, force=args.force, quiet=args.quiet)
    except FileExistsError as exc:
        print(f"dynconv plot: {exc}", file=sys.stderr)
        return 2
    if predicted:
        print(predicted_summary(reports))
        print(f"drew {len(predicted)} PREDICTED roofline files (static model, not measured) under {reports / 'static'}")
    if not drawn:
        print(f"dynconv plot: no measurements in {reports}: nothing drawn; README says so.")
    else:
        print(f"drew {len(drawn)} files; rewrote {reports / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
