"""``dynconv inspect --bounds``: a static performance model, for sessions with no GPU.

Every figure here is PREDICTED, never measured. For each kernel launch at the reference shapes it
compiles the launch ahead of time (triton's own ptxas, sm_90 by default), reads the SASS, weights
every instruction by the trip counts of the loops around it (the launcher declares them with the
launch: ``Launch.loops``) and turns the executed instructions into a time bound per pipe on an
H200 model (``MODEL``):

* issue: every warp-instruction takes one of 4 issue slots per clock per SM;
* int: the integer/logic ALU (adds, compares, selects, shifts, moves) at half the warp rate;
* fma: fp32 arithmetic at the full rate (the CUDA-core FMA ceiling, ~67 TFLOP/s fp32), IMAD on
  its heavy half at half rate (two slots each);
* xu: conversions and special functions, 16 lanes per clock per SM;
* l1: bytes through L1 (global and shared accesses, whole 32-byte sectors) at 128 B per clock per SM;
* hbm: the kernel's own minimum bytes (each input read once, each output written once) at 4.3 TB/s;
* mma: tensor-core instructions at their type's rate;
* latency: waves of resident programs, each as long as one warp's critical path through the
  scoreboards ptxas set (``latency.py``: every global load waits ``latency_cycles["global"]``).

The kernel's predicted time is the largest of these, and the PREDICTED fraction of the roofline is
``roofline time / that time``, where the roofline time is the larger of the HBM floor and the
compute floor of the right ceiling (CUDA-core FMA for the family-1 kernels, tensor cores for
``tl.dot`` kernels). The throughput pipes alone (``predicted_fraction_throughput``) are an upper
bound; the latency pipe is an estimate whose one free figure, the global-load latency, was set
against the one kernel measured so far (perf_reports/NOTES.md), so the fraction with it is a
prediction, not a bound.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import latency, ptx_sim, sass
from .console import Progress, add_quiet, command_parser
from .bounds_cases import Case, selected_cases

# The H200 model of issues 12 and 13 (clock and SM count of the H200 SXM at boost).
MODEL = {
    "gpu": "H200 model",
    "sms": 132,
    "clock_hz": 1.98e9,
    "issue_per_clock": 4.0,  # warp-instructions per clock per SM (4 schedulers)
    "int_per_clock": 2.0,  # half rate
    "fma_per_clock": 4.0,  # 128 fp32 lanes
    "xu_per_clock": 0.5,  # 16 lanes
    "l1_bytes_per_clock": 128.0,
    "hbm_bytes_per_s": 4.3e12,
    # Tensor-core FLOP per clock per SM. 16-bit wgmma (HGMMA): 3023, i.e. the ~790 TFLOP/s bf16 matrix
    # product other sessions of this workplace measured on H200 (device tool's KINDS.md; the dense
    # datasheet figure, 4096, is not reached in practice); tf32 at half of it; mma.sync (HMMA) taken
    # at half the wgmma rate on Hopper (an assumption); fp64 DMMA.
    "mma_flop_per_clock": {"gmma16": 3023.0, "gmmatf32": 1511.5, "hmma16": 1511.5, "hmmatf32": 755.75,
                           "dmma": 256.0, "imma": 6046.0},
    # Cycles until a scoreboard clears (latency.py). Global: fitted to the one kernel measured on an
    # H200 (R1's bf16 NCHW forward, 297 us, config picked at run time from six: the default is
    # predicted at 300 us, the fastest of the six at 210; perf_reports/NOTES.md). Published pointer
    # chases put an unloaded H100 HBM miss near 600 cycles; a loaded memory system is slower. The
    # others are short-pipe figures of the order those studies give.
    "latency_cycles": {"global": 1000.0, "shared": 30.0, "constant": 20.0, "other": 15.0, "operands": 20.0},
    # What one SM holds at once (Hopper): registers, warps, programs, shared memory (1 KB reserved a program).
    "sm_limits": {"registers": 65536, "warps": 64, "programs": 32, "shared_bytes": 233472, "shared_reserved": 1024},
}
ASSUMPTIONS = ("PREDICTED by a static model, not measured: H200 model (132 SMs at 1.98 GHz, 4 warp-instructions "
               "issued per clock per SM, integer pipe at half rate, fp32 FMA 128 lanes, L1 128 B/clock/SM, "
               "HBM 4.3 TB/s, HGMMA 3023 FLOP/clock/SM = 790 TFLOP/s bf16 (tf32: half), HMMA at half the HGMMA rate); every instruction of a loop "
               "body counted on every trip (trip counts declared by the launcher; where they differ between programs, "
               "by stride phase or a persistent program's share of the tiles, their mean over the programs, the "
               "slowest class of programs in the latency walk), masked lanes and branches "
               "not taken included; cache misses beyond the minimum bytes ignored. Latency: one warp's critical path through "
               f"the scoreboards ptxas set, every global load {MODEL['latency_cycles']['global']:.0f} cycles (fitted to "
               "the one kernel measured), "
               "times the waves of programs the registers and shared memory let an SM hold; an estimate, "
               "so the fraction is a prediction, and the throughput pipes alone an upper bound")
# What each figure of a row is: computed from the compiled code, or PREDICTED by the model.
FIGURES = {
    "warp_instructions": "computed: SASS instructions x the launcher's declared loop trips x warps x programs",
    "instructions_per_fma": "computed: executed thread-instructions per useful multiply-add",
    "load_widths": "computed: bytes per lane of the global loads in the SASS",
    "sector_efficiency": "computed (sector_source says how): distinct bytes asked for / 32-byte sectors touched",
    "main_accesses": "computed: the simulated warp's global accesses moving the most sectors",
    "requested_bytes": "computed: bytes the global loads and stores ask for, all warps",
    "requested_over_min": "computed: requested_bytes / min_bytes",
    "min_bytes": "computed: the kernel's inputs read once and outputs written once (roofline.py's model)",
    "flops": "computed: useful FLOPs, 2 per multiply-add",
    "pipe_us": "PREDICTED: each pipe's busy time on the H200 model (issue, int, fma, xu, l1, hbm minimum, mma, latency)",
    "bound_us": "PREDICTED: the largest pipe time (with the latency pipe an estimate of the kernel's time), "
                "plus copy_us",
    "copy_us": "PREDICTED: the launches whose output the kernel reads, run before it, each modelled as a "
               "launch of its own: layout copies (NCHW inputs copied to channels_last), DRConv's column product",
    "workspace_bytes": "computed: bytes the kernel moves through a workspace (reads back what a launch before "
                       "it wrote, or writes for a step after it: the kernel gradient's fp32 partials), on its "
                       "HBM pipe (L2 residency not assumed), not in min_bytes",
    "registers": "computed: registers a thread, from the cubin",
    "resident_programs": "computed: programs an SM holds at once (registers, shared memory, warp and block slots)",
    "warps_per_scheduler": "computed: resident warps an SM scheduler interleaves (of 4), capped by the grid",
    "waves": "computed: programs / (SMs x resident programs), rounded up",
    "warp_cycles": "PREDICTED: one warp's critical path in clocks (latency.py, MODEL['latency_cycles'])",
    "waiting_share": "PREDICTED: the share of that path the warp spends waiting on scoreboards",
    "waits": "PREDICTED: the instructions that warp waits longest before (SASS address, cycles a warp, share of its path)",
    "limiter": "PREDICTED: the pipe that sets bound_us",
    "roofline_us": "PREDICTED: max(min_bytes at HBM, flops at the compute ceiling)",
    "predicted_fraction": "PREDICTED: roofline_us / bound_us, the fraction a GPU is expected to measure",
    "predicted_fraction_throughput": "PREDICTED: the same without the latency pipe, an upper bound",
    "predicted_fraction_of_hbm": "PREDICTED: HBM floor / bound_us (the audit quotes this for the fused layer)",
}
FIELDS = ("case", "kernel", "dtype", "layout", "arch", "triton", "limiter", "bound_us", "predicted_fraction")
PIPES = ("issue", "int", "fma", "xu", "l1", "hbm", "mma", "latency")
WAITS_KEPT = 5  # instructions of the wait profile a row keeps
THROUGHPUT_PIPES = PIPES[:-1]


def fma_tflops() -> float:
    """The CUDA-core fp32 FMA ceiling of the model (2 FLOP per lane per clock)."""
    return MODEL["sms"] * MODEL["fma_per_clock"] * 32 * 2 * MODEL["clock_hz"] / 1e12


def mma_tflops(kind: str = "gmma16") -> float:
    return MODEL["sms"] * MODEL["mma_flop_per_clock"][kind] * MODEL["clock_hz"] / 1e12


def compute_seconds(case: Case) -> float:
    """The compute floor: each ceiling's FLOPs at its rate; separate pipes, so the slowest binds."""
    return max(flops / ((fma_tflops() if kind == "fma" else mma_tflops(kind)) * 1e12)
               for kind, flops in case.compute.items())


def ceiling_name(case: Case) -> str:
    return "+".join("fma" if kind == "fma" else "mma" for kind in case.compute)


# ---------------------------------------------------------------------------------------------
# The model: SASS counts -> per-pipe time bounds
# ---------------------------------------------------------------------------------------------

def _mma_kind(ins: sass.Instruction) -> str:
    op = ins.opcode
    if ins.base == "DMMA":
        return "dmma"
    if ins.base in ("IMMA", "IGMMA"):
        return "imma"
    precision = "tf32" if "TF32" in op else "16"
    return ("gmma" if "GMMA" in ins.base else "hmma") + precision


def _shared_bytes(ins: sass.Instruction) -> int:
    """Bytes a warp moves in a shared-memory access (LDSM: four 8x8 16-bit matrices per .4)."""
    if ins.base == "LDSM" or ins.base == "STSM":
        last = ins.opcode.rsplit(".", 1)[-1]
        return 128 * (int(last) if last in ("1", "2", "4") else 1)
    return 32 * sass.access_bytes(ins)


def count(dump: str, trips: tuple | list, programs: int, num_warps: int, warp_accesses: ptx_sim.Result | None = None) -> dict:
    """Executed warp-instructions per pipe, L1 bytes, bytes requested from global memory and
    tensor-core time for a whole launch (``programs`` programs of ``num_warps`` warps).

    Global accesses are counted from the SASS as if every lane were active and the lanes of an
    instruction contiguous (whole sectors, at least one); ``warp_accesses``, the simulated
    addresses of one warp (``ptx_sim``), then scales that to the sectors really touched and the
    bytes the active lanes really ask for.
    """
    instructions = sass.parse(dump)
    if not instructions:
        raise ValueError("no SASS instructions in the dump")
    forest = sass.loops(instructions)
    # Classes of programs, equally many each, whose whole trees of trips differ (a list of trees) or
    # that differ loop by loop (a list of trips in one tree): the pipes count every program's work,
    # the classes' mean; the latency walk follows the slowest programs, on which the launch waits.
    trees = trips if isinstance(trips, list) else [trips]
    per_class = [sass.execution_counts(instructions, forest, tree) for tree in trees]
    executed = [sum(counts) / len(trees) for counts in zip(*per_class)]
    warp_cycles, waits = 0.0, {}
    for tree in trees:
        tree_waits: dict = {}
        cycles = latency.warp_cycles(instructions, sass.execution_counts(instructions, forest, tree, longest=True),
                                     forest, MODEL["latency_cycles"], MODEL["mma_flop_per_clock"]["gmma16"] / 4,
                                     tree_waits)
        if cycles > warp_cycles:
            warp_cycles, waits = cycles, tree_waits
    warps = programs * num_warps
    pipes = dict.fromkeys(("issue", "int", "imad", "fma", "xu", "mem", "mma", "other"), 0.0)
    global_ideal = shared = 0.0
    mma_seconds = 0.0
    loads = []
    for ins, n in zip(instructions, executed):
        if not n:
            continue
        total = n * warps
        pipes["issue"] += total
        pipes[sass.pipe(ins)] += total
        if sass.is_global_load(ins) or sass.is_global_store(ins):
            width = sass.access_bytes(ins)
            global_ideal += total * max(32, 32 * width)
            if sass.is_global_load(ins):
                loads.append(width)
        elif ins.base in ("LDS", "STS", "LDSM", "STSM"):
            shared += total * _shared_bytes(ins)
        flops = sass.mma_flops(ins)
        if flops:
            kind = _mma_kind(ins)
            mma_seconds += total * flops / (MODEL["sms"] * MODEL["mma_flop_per_clock"][kind] * MODEL["clock_hz"])
    sector_ratio = useful_ratio = 1.0
    source = "assumed: lanes contiguous, all active"
    if warp_accesses is not None:
        useful, sectors, ideal = warp_accesses.totals()
        # A simulated warp that never reached the main loop (its trip count comes from loaded data,
        # as DRConv's region tables) says nothing about the loop's loads: keep the assumption.
        if ideal >= 0.25 * global_ideal / warps:
            sector_ratio, useful_ratio = sectors / ideal, useful / ideal
            source = "computed: warp 0 of the middle program, simulated"
    return {"warp_instructions": pipes, "l1_bytes": shared + global_ideal * sector_ratio, "sector_source": source,
            "requested_bytes": global_ideal * useful_ratio, "sector_efficiency": useful_ratio / sector_ratio,
            "mma_seconds": mma_seconds, "load_widths": sorted(set(loads)), "instructions": len(instructions),
            "warp_cycles": warp_cycles, "wait_cycles": sum(waits.values()),
            "waits": latency.wait_profile(instructions, waits, warp_cycles, WAITS_KEPT)}


def main_accesses(result: ptx_sim.Result, top: int = 4) -> list[dict]:
    """The simulated warp's global accesses that move the most sector bytes."""
    ranked = sorted(result.accesses.values(), key=lambda a: -a.sector_bytes)[:top]
    return [{"ptx": re.sub(r"\s+", " ", a.text)[:80], "bytes_per_lane": a.width, "store": a.store,
             "sector_efficiency": round(a.efficiency, 3), "instances": a.instances} for a in ranked]


def _ptx_arguments(launch) -> list[int]:
    """The PTX parameters' values in order: pointers as distinct base addresses, scalars as given."""
    source = launch.source()
    values = {**launch.args, **launch.meta}
    out, pointers = [], 0
    for name, kind in source.signature.items():
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            pointers += 1
            out.append(pointers * ptx_sim.POINTER_SPACING)
        elif kind.startswith("fp"):
            out.append(0)
        else:
            out.append(int(values[name]))
    return out


def simulate_warp(launch, compiled) -> ptx_sim.Result:
    """Warp 0 of the program in the middle of the grid (interior tiles: no image border), or of the
    one the launch names (``Launch.typical_program``)."""
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    program = tuple(launch.typical_program) or tuple(g // 2 for g in grid)
    program += (0,) * (3 - len(program))
    return ptx_sim.simulate(compiled.asm["ptx"], _ptx_arguments(launch), program, grid, launch.num_warps)


def time_bounds(counts: dict, min_bytes: int, waves: int = 0) -> dict[str, float]:
    """Seconds each pipe needs at its model rate (module docstring); ``waves`` of programs, each
    ``counts["warp_cycles"]`` long, make the latency pipe."""
    sms_hz = MODEL["sms"] * MODEL["clock_hz"]
    w = counts["warp_instructions"]
    return {
        "issue": w["issue"] / (sms_hz * MODEL["issue_per_clock"]),
        "int": w["int"] / (sms_hz * MODEL["int_per_clock"]),
        "fma": (w["fma"] + 2 * w["imad"]) / (sms_hz * MODEL["fma_per_clock"]),
        "xu": w["xu"] / (sms_hz * MODEL["xu_per_clock"]),
        "l1": counts["l1_bytes"] / (sms_hz * MODEL["l1_bytes_per_clock"]),
        "hbm": min_bytes / MODEL["hbm_bytes_per_s"],
        "mma": counts["mma_seconds"],
        "latency": waves * counts.get("warp_cycles", 0.0) / MODEL["clock_hz"],
    }


def _triton_version() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def occupancy(registers: int, shared_bytes: int, num_warps: int, programs: int) -> dict:
    """Resident programs an SM, warps a scheduler and waves of a launch on the model's GPU."""
    resident = latency.resident_programs(registers, shared_bytes, num_warps, MODEL["sm_limits"])
    if resident < 1:
        raise ValueError(f"a program of {num_warps} warps, {registers} registers and {shared_bytes} B of shared "
                         "memory does not fit an SM")
    on_chip = min(resident, -(-programs // MODEL["sms"]))
    return {"resident_programs": resident, "warps_per_scheduler": round(on_chip * num_warps / 4, 2),
            "waves": -(-programs // (MODEL["sms"] * resident))}


def _launch_bounds(launch, min_bytes: int, arch: int) -> tuple:
    """(usage, counts, occupancy, per-pipe seconds, warp simulation) of one launch."""
    from .kernels._launch import cubin_dumps

    compiled = launch.compile(arch)
    programs = 1
    for extent in launch.grid:
        programs *= extent
    warp = simulate_warp(launch, compiled)
    usage, dump = cubin_dumps(compiled)
    counts = count(dump, launch.loops, programs, launch.num_warps, warp)
    resident = occupancy(usage.get("REG", 0), int(compiled.metadata.shared), launch.num_warps, programs)
    return usage, counts, resident, time_bounds(counts, min_bytes, resident["waves"]), warp


def _copies(case: Case, arch: int) -> tuple[list[dict], float, float]:
    """The case's layout copies, each a launch of its own run before the kernel: their rows (name,
    bound), and their summed time bound and throughput-pipe bound (seconds)."""
    rows, total, throughput = [], 0.0, 0.0
    for launch, min_bytes in case.copies() if case.copies else ():
        bounds = _launch_bounds(launch, min_bytes, arch)[3]
        limiter = max(bounds, key=bounds.get)
        rows.append({"kernel_name": launch.name, "limiter": limiter, "bound_us": round(bounds[limiter] * 1e6, 2)})
        total += bounds[limiter]
        throughput += max(bounds[k] for k in THROUGHPUT_PIPES)
    return rows, total, throughput


def evaluate(case: Case, arch: int = 90, launch=None) -> dict:
    """One row of the model for one case (compiles its launch, or ``launch``: the same problem with
    another config), the layout copies it reads first included."""
    launch = launch or case.build()
    usage, counts, resident, bounds, warp = _launch_bounds(launch, case.min_bytes + case.workspace_bytes, arch)
    limiter = max(bounds, key=bounds.get)
    copies, copy_s, copy_throughput = _copies(case, arch)
    bound = bounds[limiter] + copy_s
    throughput = max(bounds[k] for k in THROUGHPUT_PIPES) + copy_throughput
    compute_s = compute_seconds(case)
    min_hbm = case.min_bytes / MODEL["hbm_bytes_per_s"]
    roofline = max(min_hbm, compute_s)
    w = counts["warp_instructions"]
    return {
        "case": case.case, "kernel": case.kernel, "dtype": case.dtype, "layout": case.layout, "arch": f"sm_{arch}",
        "triton": _triton_version(), "limiter": limiter, "bound_us": round(bound * 1e6, 2),
        "copy_us": round(copy_s * 1e6, 2), "copies": copies,
        "predicted_fraction": round(roofline / bound, 4),
        "predicted_fraction_throughput": round(roofline / throughput, 4),
        "predicted_fraction_of_hbm": round(min_hbm / bound, 4),
        "roofline_us": round(roofline * 1e6, 2),
        "roofline_limiter": "hbm" if min_hbm >= compute_s else ceiling_name(case),
        "pipe_us": {k: round(v * 1e6, 2) for k, v in bounds.items()},
        "kernel_name": launch.name, "grid": list(launch.grid), "num_warps": launch.num_warps,
        "num_stages": launch.num_stages, "loops": launch.loops,
        "registers": usage.get("REG", 0), **resident, "warp_cycles": round(counts["warp_cycles"]),
        "waiting_share": round(counts["wait_cycles"] / counts["warp_cycles"], 3) if counts["warp_cycles"] else 0.0,
        "waits": counts["waits"],
        "meta": {k: str(v) for k, v in launch.meta.items()},
        "warp_instructions": {k: round(v) for k, v in w.items()},
        "instructions_per_fma": round(w["issue"] * 32 / (case.flops / 2), 2),
        "min_bytes": case.min_bytes, "workspace_bytes": case.workspace_bytes,
        "requested_bytes": round(counts["requested_bytes"]),
        "requested_over_min": round(counts["requested_bytes"] / case.min_bytes, 2),
        "l1_bytes": round(counts["l1_bytes"]), "load_widths": counts["load_widths"],
        "sector_efficiency": round(counts["sector_efficiency"], 3), "sector_source": counts["sector_source"],
        "main_accesses": main_accesses(warp),
        "simulated_steps": warp.steps, "simulation_complete": warp.complete,
        "flops": case.flops, "ceiling": ceiling_name(case),
        "status": "PREDICTED",
    }


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def table_name(triton_version: str) -> str:
    return f"bounds-triton{triton_version}"


def markdown(rows: list[dict]) -> str:
    head = rows[0] if rows else {}
    lines = [f"# PREDICTED roofline fractions (static model), triton {head.get('triton', '?')}, {head.get('arch', '?')}",
             "", f"Computed by `dynconv inspect --bounds`. {ASSUMPTIONS}.", "",
             "Columns: `bound` is the largest per-pipe time (µs, PREDICTED time of the kernel); "
             "`fraction` the roofline time over it; `thru` the same without the latency pipe (an upper bound); "
             "`roof` what the roofline is (hbm or the compute ceiling); `lat` the latency pipe (waves x one warp's "
             "critical path); `copy` the launches run before the kernel (layout copies, DRConv's column product; in "
             "`bound`); "
             "`w/s` resident warps an SM scheduler interleaves; "
             "`instr/FMA` executed thread-instructions per useful multiply-add; `req/min` bytes the loads and "
             "stores request over the kernel's minimum bytes; `sectors` the share of each 32-byte sector the "
             "global accesses use (simulated warp; `*`: assumed, the simulation could not follow the loop).", "",
             "Shapes: `REFERENCE_SHAPES` of dynconv/roofline.py, and C256 (3x3, 256->256, 56x56, B32, E4), "
             "X1 (E1 at stride 2), R1s2 (R1 at stride 2) from dynconv/bounds_cases.py.", "",
             "| case | kernel | dtype | layout | limiter | bound µs | roofline µs | roof | fraction | thru | issue | int | fma | l1 | hbm | mma | lat | copy | w/s | instr/FMA | req/min | sectors | load bytes |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['kernel']} | {r['dtype']} | {r['layout']} | ERROR: {r['error'][:80]} |" + " |" * 19)
            continue
        p = r["pipe_us"]
        lines.append(f"| {r['case']} | {r['kernel']} | {r['dtype']} | {r['layout']} | {r['limiter']} | {r['bound_us']:.1f} | "
                     f"{r['roofline_us']:.1f} | {r['roofline_limiter']} | {100 * r['predicted_fraction']:.1f}% | "
                     f"{100 * r['predicted_fraction_throughput']:.1f}% | "
                     + " | ".join(f"{p[k]:.1f}" for k in ("issue", "int", "fma", "l1", "hbm", "mma", "latency"))
                     + f" | {r.get('copy_us', 0):.1f} | {r['warps_per_scheduler']:g} | {r['instructions_per_fma']:.1f} | {r['requested_over_min']:.2f} | "
                     f"{100 * r['sector_efficiency']:.0f}%{'*' if r['sector_source'].startswith('assumed') else ''} | "
                     f"{','.join(str(b) for b in r['load_widths'])} |")
    return "\n".join(lines) + "\n"


def wait_report(rows: list[dict]) -> str:
    """Where each row's simulated warp waits (PREDICTED): the instructions it stalls longest before."""
    lines = ["Where one warp waits (PREDICTED by the latency walk; cycles a warp, share of its path):"]
    for r in rows:
        if "error" in r:
            continue
        rounds = r["waiting_share"] * r["warp_cycles"] / MODEL["latency_cycles"]["global"]
        lines.append(f"{r['case']} {r['kernel']} {r['dtype']} {r['layout']} ({r['kernel_name']}): {r['warp_cycles']} cycles, "
                     f"{100 * r['waiting_share']:.0f}% of them waiting (about {rounds:.0f} memory round trips)")
        for w in r["waits"]:
            lines.append(f"  {w['addr']}  {w['cycles']:>9}  {100 * w['share']:5.1f}%  waits on {w['waits_on']}  {w['instruction']}")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    name = table_name(rows[0]["triton"] if rows else _triton_version())
    doc = {"status": "PREDICTED", "assumptions": ASSUMPTIONS, "figures": FIGURES, "model": MODEL, "rows": rows}
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(rows))
    return paths


def load_tables(folder: Path) -> dict[str, list[dict]]:
    """The committed tables under ``folder``, by triton version (no compiling)."""
    tables = {}
    for path in sorted(Path(folder).glob("bounds-triton*.json")):
        doc = json.loads(path.read_text())
        version = path.stem.removeprefix("bounds-triton")
        tables[version] = [r for r in doc["rows"] if "error" not in r]
    return tables


def run(arch: int = 90, case_filter=(), kernel_filter: str = "", progress=True) -> list[dict]:
    cases = selected_cases(case_filter, kernel_filter)
    rows = []
    shown = Progress(len(cases), f"bounds sm_{arch}", quiet=not progress)
    for case in cases:
        try:
            rows.append(evaluate(case, arch))
        except Exception as exc:  # noqa: BLE001 - a case the model cannot read is a finding, not a crash
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            rows.append({"case": case.case, "kernel": case.kernel, "dtype": case.dtype, "layout": case.layout,
                         "arch": f"sm_{arch}", "triton": _triton_version(), "error": message})
        shown.update(case.name)
    shown.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("dynconv inspect --bounds", __doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90, Hopper)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--case", action="append", default=[],
                        help="only cases whose 'shape kernel dtype layout' contains this (repeatable: any of them)")
    parser.add_argument("--kernel", default="", help="only these kernels, comma-separated (fwd, dx, dw, guide, dz, dspan)")
    parser.add_argument("--write", type=Path, default=None, help="also write bounds-triton<version>.json/.md here")
    parser.add_argument("--waits", action="store_true",
                        help="also print, per row, where one warp waits longest (the latency walk's profile)")
    parser.add_argument("--measure", type=Path, default=None, metavar="FILE",
                        help="on a GPU: time the same launches instead (MEASURED), a JSON line per row appended to FILE")
    parser.add_argument("--jobs", type=int, default=0, help="with --measure: processes compiling ahead (default: CPUs, 16 at most)")
    add_quiet(parser)
    args = parser.parse_args(argv)

    from .kernels._launch import kernels_are_interpreted

    if kernels_are_interpreted():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this command compiles")
    if args.measure:
        import torch

        from . import bounds_measure

        if not torch.cuda.is_available():
            parser.error("--measure times kernels on a GPU: none is visible")
        log = (lambda *a, **k: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        return bounds_measure.run(args.measure, args.case, args.kernel, args.jobs, log)
    rows = run(args.arch, args.case, args.kernel, progress=not args.quiet)
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
    else:
        print(markdown(rows))
        if args.waits:
            print(wait_report(rows))
    if args.write:
        for path in write_tables(rows, args.write):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0
