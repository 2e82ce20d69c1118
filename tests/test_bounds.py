"""The static performance model (``dynconv inspect --bounds``): SASS reading, loop weighting, the
warp address simulation, one real compile, the committed tables and their calibration.

Everything here is PREDICTED-model machinery; nothing is a measurement.
"""
import json
import textwrap
from pathlib import Path

import pytest

from dynconv import bounds, ptx_sim, sass
from helpers import run_without_interpreter

STATIC = Path(__file__).resolve().parents[1] / "perf_reports" / "static"

# A loop of 3 instructions closed by a backward branch, nested inside a loop of 5 more, plus
# straight-line code and the padding ptxas leaves after EXIT.
SNIPPET = """
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0000000000007919 */
        /*0010*/                   IMAD R1, R0, 0x4, RZ ;                  /* 0x0000000400017824 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0030*/                   ISETP.GE.AND P0, PT, R1, 0x10, PT ;     /* 0x000000100100780c */
        /*0040*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0000000504087223 */
        /*0050*/                   LDG.E.U16 R9, desc[UR4][R6.64] ;        /* 0x0000000406097981 */
        /*0060*/               @P0 BRA 0x40 ;                              /* 0x0000000000000947 */
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR24], R24 ; /* 0x0 */
        /*0080*/                   IADD3 R1, R1, 0x1, RZ ;                 /* 0x0000000101017810 */
        /*0090*/              @!PT LDS RZ, [RZ] ;                          /* 0x0 */
        /*00a0*/               @P1 BRA 0x20 ;                              /* 0x0000000000000947 */
        /*00b0*/                   STG.E desc[UR4][R2.64], R8 ;            /* 0x0 */
        /*00c0*/                   EXIT ;                                  /* 0x000000000000794d */
        /*00d0*/                   BRA 0xd0;                               /* 0xfffffffc00fc7947 */
        /*00e0*/                   NOP;                                    /* 0x0000000000007918 */
"""


def test_sass_parser_reads_instructions_widths_and_pipes():
    instructions = sass.parse(SNIPPET)
    assert [i.addr for i in instructions] == list(range(0, 0xF0, 0x10))
    by_addr = {i.addr: i for i in instructions}
    assert by_addr[0x20].opcode == "LDG.E.128" and sass.access_bytes(by_addr[0x20]) == 16
    assert sass.access_bytes(by_addr[0x50]) == 2 and sass.access_bytes(by_addr[0xB0]) == 4
    assert by_addr[0x60].predicate == "@P0" and by_addr[0x60].branch_target == 0x40
    assert by_addr[0x90].never_runs
    assert [sass.pipe(by_addr[a]) for a in (0x10, 0x30, 0x40, 0x20, 0x70, 0x80, 0x60)] == \
        ["imad", "int", "fma", "mem", "mma", "int", "other"]
    # One warp's quarter of a 64x64x16 warpgroup MMA.
    assert sass.mma_flops(by_addr[0x70]) == 2 * 64 * 64 * 16 // 4


@pytest.mark.parametrize("opcode, m, n, k", [("HMMA.16816.F32.BF16", 16, 8, 16), ("HMMA.1688.F32.TF32", 16, 8, 8),
                                             ("HMMA.16816.F32", 16, 8, 16), ("DMMA.884", 8, 8, 4),
                                             ("IMMA.16832.S8.S8", 16, 8, 32), ("IMMA.8816.S8.S8", 8, 8, 16)])
def test_mma_sync_shapes_run_their_digits_together(opcode, m, n, k):
    # A whole warp's matrix instruction: m·n·k multiply-adds (HMMA.16816 once read as m1 n6 k816).
    instruction = sass.parse(f"        /*0000*/                   {opcode} R4, R8, R12, R4 ;  /* 0x0 */\n")[0]
    assert sass.mma_flops(instruction) == 2 * m * n * k


def test_loops_nest_and_weight_by_declared_trips():
    instructions = sass.parse(SNIPPET)
    forest = sass.loops(instructions)
    # The self-branch after EXIT is padding, not a loop.
    assert [(loop.start, loop.end) for loop in forest] == [(0x20, 0xA0)]
    assert [(loop.start, loop.end) for loop in forest[0].children] == [(0x40, 0x60)]
    counts = dict(zip((i.addr for i in instructions), sass.execution_counts(instructions, forest, ((5, (7,)),))))
    assert counts[0x00] == 1 and counts[0xB0] == 1 and counts[0xC0] == 1
    assert counts[0x20] == 5 and counts[0x70] == 5 and counts[0xA0] == 5
    assert counts[0x40] == 35 and counts[0x60] == 35
    assert counts[0x90] == 0 and counts[0xD0] == 0 and counts[0xE0] == 0
    with pytest.raises(ValueError, match="declares"):
        sass.execution_counts(instructions, forest, (5,))


# A loop ptxas unrolled twice (two FFMA a trip) and its remainder loop (one).
UNROLLED = """
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0 */
        /*0010*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0 */
        /*0020*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0 */
        /*0030*/               @P0 BRA 0x10 ;                              /* 0x0 */
        /*0040*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0 */
        /*0050*/               @P1 BRA 0x40 ;                              /* 0x0 */
        /*0060*/                   EXIT ;                                  /* 0x0 */
"""


def test_trips_that_differ_by_program_class_count_their_mean():
    instructions = sass.parse(SNIPPET)
    forest = sass.loops(instructions)
    # Half the programs run the outer loop 4 times, half 6; the inner loop 6 or 8 times a trip.
    counts = dict(zip((i.addr for i in instructions),
                      sass.execution_counts(instructions, forest, (([4, 6], ([6, 8],)),))))
    assert counts[0x20] == 5 and counts[0x40] == 35 and counts[0x00] == 1
    # The slowest programs' counts (the latency walk's): the largest of each.
    longest = dict(zip((i.addr for i in instructions),
                       sass.execution_counts(instructions, forest, (([4, 6], ([6, 8],)),), longest=True)))
    assert longest[0x20] == 6 and longest[0x40] == 48 and longest[0x00] == 1
    # The pipes count the mean, the latency walk follows the slowest programs.
    classes = bounds.count(SNIPPET, (([4, 6], ([6, 8],)),), programs=1000, num_warps=4)
    assert classes["warp_instructions"] == bounds.count(SNIPPET, ((5, (7,)),), 1000, 4)["warp_instructions"]
    assert classes["warp_cycles"] == bounds.count(SNIPPET, ((6, (8,)),), 1000, 4)["warp_cycles"]
    assert classes["warp_cycles"] > bounds.count(SNIPPET, ((5, (7,)),), 1000, 4)["warp_cycles"]
    # Classes whose whole trees differ (a list of trees): one runs 4 x 8, the other 6 x 6 inner trips.
    # The pipes count their mean (5 outer trips and 34 inner a program); the walk the slower class's,
    # not a blend of each loop's largest (6 x 8).
    trees = bounds.count(SNIPPET, [((4, (8,)),), ((6, (6,)),)], programs=1000, num_warps=4)
    mean = bounds.count(SNIPPET, ((5, (6.8,)),), programs=1000, num_warps=4)
    assert trees["warp_instructions"] == pytest.approx(mean["warp_instructions"])
    assert trees["warp_cycles"] == max(bounds.count(SNIPPET, tree, 1000, 4)["warp_cycles"]
                                       for tree in (((4, (8,)),), ((6, (6,)),)))
    assert trees["warp_cycles"] < classes["warp_cycles"]
    # Split into a main loop unrolled twice and a remainder: 3 trips are 1 + 1, 4 trips 2 + 0.
    instructions = sass.parse(UNROLLED)
    forest = sass.loops(instructions)
    assert [(loop.start, loop.end) for loop in forest] == [(0x10, 0x30), (0x40, 0x50)]
    counts = dict(zip((i.addr for i in instructions), sass.execution_counts(instructions, forest, ([3, 4],))))
    assert counts[0x10] == 1.5 and counts[0x40] == 0.5
    counts = dict(zip((i.addr for i in instructions),
                      sass.execution_counts(instructions, forest, ([3, 4],), longest=True)))
    assert counts[0x10] == 2 and counts[0x40] == 0


# A loop whose warp reduction has a divergent slow path: ptxas moves it after the last EXIT
# (``BRA.DIV``) and jumps back into the loop body from there. Seen in triton 3.9's na2d dkv fp32.
COLD_PATH = """
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0 */
        /*0010*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0 */
        /*0020*/                   BRA.DIV UR4, 0x70 ;                     /* 0x0 */
        /*0030*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;       /* 0x0 */
        /*0040*/                   FADD R8, R8, R9 ;                       /* 0x0 */
        /*0050*/               @P0 BRA 0x10 ;                              /* 0x0 */
        /*0058*/              @!P1 EXIT ;                                  /* 0x0 */
        /*0060*/                   EXIT ;                                  /* 0x0 */
        /*0070*/                   WARPSYNC.COLLECTIVE R95, 0x80 ;         /* 0x0 */
        /*0080*/                   BRA 0x40 ;                              /* 0x0 */
        /*0090*/                   BRA 0x90;                               /* 0x0 */
"""


def test_a_jump_back_from_cold_code_after_exit_closes_no_loop():
    instructions = sass.parse(COLD_PATH)
    forest = sass.loops(instructions)
    assert [(loop.start, loop.end, loop.children) for loop in forest] == [(0x10, 0x50, [])]
    counts = dict(zip((i.addr for i in instructions), sass.execution_counts(instructions, forest, (6,))))
    assert counts[0x10] == 6 and counts[0x40] == 6 and counts[0x60] == 1
    assert counts[0x70] == 0 and counts[0x80] == 0
    # A conditional EXIT inside a loop's tail does not end the loop: its back edge still closes it.
    tail = sass.parse("""
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0 */
        /*0010*/                   FFMA R8, R4, R5, R8 ;                   /* 0x0 */
        /*0020*/              @!P6 EXIT ;                                  /* 0x0 */
        /*0030*/                   BRA 0x10 ;                              /* 0x0 */
        /*0040*/                   BRA 0x40;                               /* 0x0 */
""")
    assert [(loop.start, loop.end) for loop in sass.loops(tail)] == [(0x10, 0x30)]


def test_count_turns_instructions_into_pipe_times():
    result = bounds.count(SNIPPET, ((5, (7,)),), programs=1000, num_warps=4)
    w = result["warp_instructions"]
    warps = 4000
    # S2R, IMAD; 5x (LDG, ISETP, HGMMA, IADD3, BRA); 35x (FFMA, LDG.U16, BRA); STG, EXIT
    assert w["issue"] == warps * (2 + 5 * 5 + 35 * 3 + 2)
    assert w["fma"] == warps * 35 and w["imad"] == warps and w["int"] == warps * (5 + 5)  # ISETP, IADD3
    times = bounds.time_bounds(result, min_bytes=10**9)
    sms_hz = bounds.MODEL["sms"] * bounds.MODEL["clock_hz"]
    assert times["issue"] == pytest.approx(w["issue"] / (4 * sms_hz))
    assert times["int"] == pytest.approx(w["int"] / (2 * sms_hz))  # half rate
    assert times["hbm"] == pytest.approx(1e9 / 4.3e12)
    # Coalesced accounting: a 16-byte lane load is 512 B a warp, a 2-byte one 64 B, a store 128 B.
    assert result["l1_bytes"] == warps * (5 * 512 + 35 * 64 + 128)


PTX = textwrap.dedent("""
    .visible .entry probe(
        .param .u64 .ptr .global .align 1 probe_param_0,
        .param .u32 probe_param_1
    )
    .reqntid 32
    {
        .reg .pred %p<3>;
        .reg .b32 %r<20>;
        .reg .b64 %rd<10>;
        ld.param.b64 %rd1, [probe_param_0];
        ld.param.b32 %r1, [probe_param_1];
        mov.u32 %r2, %tid.x;
        mov.u32 %r3, %ctaid.x;
        mov.u32 %r4, 0;
    $L__BB0_1:
        mad.lo.s32 %r5, %r3, 32, %r2;
        mul.wide.s32 %rd2, %r5, 4;
        add.s64 %rd3, %rd1, %rd2;
        // begin inline asm
        ld.global.b32 { %r6 }, [ %rd3 + 0 ];
        // end inline asm
        mul.lo.s32 %r7, %r2, %r1;
        mul.wide.s32 %rd4, %r7, 4;
        add.s64 %rd5, %rd1, %rd4;
        setp.lt.s32 %p1, %r2, 16;
        @%p1 ld.global.b32 { %r8 }, [ %rd5 + 0 ];
        add.s32 %r4, %r4, 1;
        setp.lt.s32 %p2, %r4, 3;
        @%p2 bra $L__BB0_1;
        ret;
    }
""")


def test_warp_simulation_counts_sectors_per_lane_layout():
    result = ptx_sim.simulate(PTX, [1 << 40, 32], program=(2, 0, 0), grid=(4, 1, 1), num_warps=1)
    assert result.complete
    contiguous, strided = [result.accesses[k] for k in sorted(result.accesses)]
    assert contiguous.instances == strided.instances == 3
    # 32 lanes x 4 contiguous bytes: 4 sectors, all used.
    assert contiguous.sector_bytes == 3 * 128 and contiguous.efficiency == 1.0
    # 16 active lanes 128 bytes apart: one sector each, 4 of its 32 bytes used.
    assert strided.sector_bytes == 3 * 16 * 32 and strided.efficiency == pytest.approx(4 / 32)
    useful, sectors, ideal = result.totals()
    assert (useful, sectors, ideal) == (3 * (128 + 64), 3 * (128 + 512), 3 * 2 * 128)


COPY_PTX = textwrap.dedent("""
    .visible .entry probe(
        .param .u64 .ptr .global .align 1 probe_param_0
    )
    .reqntid 32
    {
        .reg .pred %p<2>;
        .reg .b32 %r<20>;
        .reg .b64 %rd<10>;
        ld.param.b64 %rd1, [probe_param_0];
        mov.u32 %r2, %tid.x;
        mul.wide.s32 %rd2, %r2, 16;
        add.s64 %rd3, %rd1, %rd2;
        mov.u32 %r3, 0;
        setp.lt.s32 %p1, %r2, 8;
        selp.b32 %r4, 16, 0, %p1;
        // begin inline asm
        cp.async.cg.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x10, %r4;
        // end inline asm
        ret;
    }
""")


def test_a_copy_of_source_size_zero_reads_nothing():
    """cp.async with a source size of 0 zero-fills (a masked halo, a pipelined loop's copies past its
    end): only the 8 lanes copying 16 bytes are charged sectors, against the warp's ideal of 32."""
    result = ptx_sim.simulate(COPY_PTX, [1 << 40], program=(0, 0, 0), grid=(1, 1, 1), num_warps=1)
    (copy,) = result.accesses.values()
    assert copy.sector_bytes == 8 * 16 and copy.useful_bytes == 8 * 16
    assert copy.ideal_bytes == 32 * 16


REAL_KERNEL = textwrap.dedent('''
    import json, sys
    import torch, triton, triton.language as tl
    from dynconv import bounds
    from dynconv.kernels._launch import Launch, cubin_dumps

    @triton.jit
    def probe(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(n):
            tap = i // stride  # a runtime division, as the kernels' taps have: ptxas keeps the loop rolled
            acc += tl.load(x_ptr + tap * BLOCK + offs)  # coalesced
            acc += tl.load(x_ptr + offs * stride + i % stride)  # one sector per lane
        tl.store(y_ptr + tl.program_id(0) * BLOCK + offs, acc)

    x = torch.empty(1 << 20, dtype=torch.float32, device="meta")
    launch = Launch(probe, (64, 1, 1), dict(x_ptr=x, y_ptr=x, n=40, stride=96), dict(BLOCK=128),
                    num_warps=4, num_stages=1, loops=(40,))
    compiled = launch.compile(90)
    warp = bounds.simulate_warp(launch, compiled)
    counts = bounds.count(cubin_dumps(compiled)[1], launch.loops, 64, 4, warp)
    print(json.dumps({"counts": counts, "accesses": bounds.main_accesses(warp), "complete": warp.complete}))
''')


def test_one_real_compiled_kernel(tmp_path):
    """A tiny kernel compiled for sm_90 (in a subprocess: this one runs the interpreter)."""
    script = tmp_path / "probe_kernel.py"
    script.write_text(REAL_KERNEL)
    proc = run_without_interpreter([str(script)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["complete"]
    w = out["counts"]["warp_instructions"]
    # 64 programs x 4 warps; the loop body (two loads, the adds, the offsets) runs 40 times a warp.
    assert w["issue"] > 40 * 256 * 4 and w["fma"] >= 40 * 256 * 2
    efficiencies = sorted(a["sector_efficiency"] for a in out["accesses"] if not a["store"])
    assert efficiencies[0] == pytest.approx(4 / 32) and efficiencies[-1] == 1.0


def _committed(version_prefix: str = "") -> dict[str, list[dict]]:
    return {v: rows for v, rows in bounds.load_tables(STATIC).items() if v.startswith(version_prefix)}


def test_committed_tables_follow_the_schema():
    tables = _committed()
    assert "3.6" in tables and len(tables) >= 2, f"expected triton 3.6 and the newest triton under {STATIC}"
    for version, rows in tables.items():
        doc = json.loads((STATIC / f"bounds-triton{version}.json").read_text())
        assert doc["status"] == "PREDICTED" and "not measured" in doc["assumptions"]
        assert (STATIC / f"bounds-triton{version}.md").read_text().startswith("# PREDICTED")
        assert rows, version
        for row in rows:
            assert set(bounds.FIELDS) <= set(row), row
            assert row["triton"] == version and row["arch"] == "sm_90" and row["status"] == "PREDICTED"
            assert row["limiter"] in bounds.PIPES
            assert row["bound_us"] == pytest.approx(max(row["pipe_us"].values()) + row["copy_us"], rel=1e-3, abs=0.03)
            assert row["copy_us"] == pytest.approx(sum(c["bound_us"] for c in row["copies"]), abs=0.03)
            assert 0 < row["predicted_fraction"] <= 1.0001
        names = {(r["case"], r["kernel"], r["dtype"], r["layout"]) for r in rows}
        for case in ("R1", "R2", "R3", "R4"):
            for kernel in ("fwd", "dx", "dw"):
                assert {(case, kernel, d, lay) for d in ("fp32", "bf16") for lay in ("NCHW", "NHWC")} <= names


def test_nchw_expert_rows_count_their_channels_last_copies():
    """The expert conv reads channels_last copies of NCHW x (forward), dy (input gradient; the op
    makes one for both backward passes) and x (kernel gradient, 2-byte) at the reference layers,
    except the forward and input gradient at 56 x 56 (C256, E2), which read them in place in row
    boxes (expert_conv_rows); the committed rows carry those copies in their bound."""
    for version, rows in _committed().items():
        for row in rows:
            if "error" in row:
                continue
            if (row["case"], row["kernel"]) == ("D1", "guide"):  # the expert bank's scores, as a forward
                assert len(row["copies"]) == (row["layout"] == "NCHW"), (version, row["dtype"], row["layout"])
            if row["case"] not in ("C256", "E1", "E2"):
                continue
            names = [c["kernel_name"] for c in row["copies"]]
            in_rows = row["layout"] == "NCHW" and row["case"] != "E1" and row["kernel"] in ("fwd", "dx")
            assert (row["kernel_name"] == "expert_conv_rows_fwd_kernel") == in_rows, (version, row["case"],
                                                                                     row["kernel"])
            # fp32's kernel gradient reads NCHW as it is (FLAT steps: K-major for tf32)
            expected = int(row["layout"] == "NCHW" and (row["kernel"], row["dtype"]) != ("dw", "fp32") and not in_rows)
            assert names == ["channels_last_copy_kernel"] * expected, (version, row["case"], row["kernel"], names)
            assert (row["copy_us"] > 0) == (expected > 0)



def test_drconv_rows_build_the_region_tables_once_and_count_the_partials():
    """D1: the forward builds the region tables (a launch before it) and the backward reads them (no
    tables launch before dx or dw); the kernel gradient follows the bias gradient's launch and writes
    its fp32 per-(sample, region) partials, B·m·Cout·Cin·k² of them, through its HBM pipe."""
    for version, rows in _committed().items():
        for row in rows:
            if row["case"] != "D1" or "error" in row:
                continue
            names = [c["kernel_name"] for c in row["copies"]]
            assert ("region_tables_kernel" in names) == (row["kernel"] == "fwd"), (version, row["kernel"], names)
            assert ("region_bias_grad_kernel" in names) == (row["kernel"] == "dw"), (version, row["kernel"], names)
            if row["kernel"] == "dw":
                assert row["workspace_bytes"] >= 32 * 8 * 128 * 128 * 9 * 4, version

# Issue 12's and 13's audit (triton 3.6, sm_90), the rows this model reproduces within ±20%, as
# (case, kernel, dtype, layout, audited upper bound or range, which fraction the audit quoted).
# Rows it does not reproduce are listed in perf_reports/NOTES.md with the reason.
AUDIT = [
    ("R1", "fwd", "fp32", "NCHW", 0.25, "roofline"), ("R1", "fwd", "fp32", "NHWC", 0.37, "roofline"),
    ("R1", "fwd", "bf16", "NCHW", 0.11, "roofline"), ("R1", "fwd", "bf16", "NHWC", 0.18, "roofline"),
    ("R1", "dx", "fp32", "NCHW", 0.11, "roofline"), ("R1", "dx", "fp32", "NHWC", 0.28, "roofline"),
    ("R1", "dx", "bf16", "NCHW", 0.05, "roofline"), ("R1", "dx", "bf16", "NHWC", 0.16, "roofline"),
    ("R1", "dw", "fp32", "NCHW", 0.27, "roofline"), ("R1", "dw", "fp32", "NHWC", 0.31, "roofline"),
    ("R1", "dw", "bf16", "NCHW", 0.12, "roofline"), ("R1", "dw", "bf16", "NHWC", 0.16, "roofline"),
    ("R1s2", "dx", "bf16", "NHWC", 0.03, "roofline"),
    ("C256", "fwd", "bf16", "NHWC", 0.34, "roofline"), ("C256", "fwd", "bf16", "NCHW", 0.15, "roofline"),
    ("C256", "dx", "bf16", "NHWC", 0.16, "roofline"), ("C256", "dx", "bf16", "NCHW", 0.10, "roofline"),
    ("C256", "dw", "bf16", "NHWC", 0.23, "roofline"), ("C256", "dw", "bf16", "NCHW", 0.12, "roofline"),
    ("E1", "fwd", "bf16", "NHWC", 0.07, "roofline"), ("E1", "dx", "bf16", "NHWC", 0.04, "roofline"),
    ("X1", "dx", "bf16", "NHWC", 0.01, "roofline"), ("D1", "guide", "bf16", "NHWC", 0.03, "roofline"),
    # Quoted as ranges; R4's against the HBM floor (see NOTES.md), the fused layer's "of HBM".
    *[("R4", k, "bf16", lay, (0.02, 0.05), "hbm") for k in ("fwd", "dx", "dw") for lay in ("NCHW", "NHWC")],
    ("R1-layer", "dspan", "bf16", "NHWC", (0.03, 0.04), "hbm"),
    *[("R1-layer", k, "bf16", "NCHW", (0.02, 0.06), "hbm") for k in ("fwd", "dz", "dspan")],
]


def test_calibration_reproduces_the_audit():
    """The model on the kernels of the audit (the frozen calibration table) within ±20% of it."""
    path = STATIC / "calibration-triton3.6.json"
    rows = {(r["case"], r["kernel"], r["dtype"], r["layout"]): r for r in json.loads(path.read_text())["rows"]}
    misses = []
    for case, kernel, dtype, layout, audited, which in AUDIT:
        row = rows[(case, kernel, dtype, layout)]
        predicted = row["predicted_fraction" if which == "roofline" else "predicted_fraction_of_hbm"]
        low, high = audited if isinstance(audited, tuple) else (audited, audited)
        if not 0.8 * low <= predicted <= 1.2 * high:
            misses.append(f"{case} {kernel} {dtype} {layout}: model {predicted:.3f}, audit {audited}")
    assert not misses, "\n".join(misses)


def test_plot_draws_the_predicted_roofline_apart_from_measurements(tmp_path):
    from dynconv import plot

    rows = [dict(case="R1", kernel=k, dtype="bf16", layout="NHWC", arch="sm_90", triton="3.6", limiter="issue",
                 bound_us=300.0, predicted_fraction=0.2, flops=2.5e9, min_bytes=2.6e8) for k in ("fwd", "dx")]
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "bounds-triton3.6.json").write_text(json.dumps({"status": "PREDICTED", "rows": rows}))
    drawn = plot.draw_predicted(tmp_path)
    assert {p.name for p in drawn} == {"roofline_predicted_triton3.6.png", "roofline_predicted_triton3.6.svg"}
    assert plot.draw_all(tmp_path, log=lambda *_: None) == []  # nothing measured: nothing drawn as measured
    readme = (tmp_path / "README.md").read_text()
    measured, predicted = readme.split("## PREDICTED (static model, not measured)")
    assert "No benchmark tables yet" in measured and "![" not in measured.split("## Measurements")[1]
    assert "static/roofline_predicted_triton3.6.png" in predicted
    assert "R1        fwd" in plot.predicted_summary(tmp_path)
    attention = dict(rows[0], case="N1", layout="BHWND")
    assert plot.predicted_layouts([attention, *rows]) == ["NHWC", "BHWND"]  # attention rows get a figure row


def test_predicted_summary_shows_every_layout_to_a_tenth_of_a_percent(tmp_path):
    """The terminal table of `make run`: 84.7% is not printed as the target's 85%, and the attention
    rows come under a header of their own layouts instead of four empty NCHW/NHWC cells."""
    from dynconv import plot

    base = dict(arch="sm_90", triton="3.6", limiter="latency", bound_us=1.0, flops=1.0, min_bytes=1.0)
    rows = [dict(base, case="R1", kernel="dw", dtype="bf16", layout="NHWC", predicted_fraction=0.847),
            dict(base, case="N1", kernel="dq", dtype="bf16", layout="BHWND", predicted_fraction=0.627),
            dict(base, case="N1", kernel="dq", dtype="bf16", layout="BNHWD", predicted_fraction=0.5)]
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "bounds-triton3.6.json").write_text(json.dumps({"status": "PREDICTED", "rows": rows}))
    lines = plot.predicted_summary(tmp_path).splitlines()
    assert lines[1].split()[2:] == ["fp32", "NHWC", "bf16", "NHWC"]
    assert lines[2].split() == ["R1", "dw", "-", "84.7%"]
    assert lines[3].split()[2:] == ["fp32", "BHWND", "fp32", "BNHWD", "bf16", "BHWND", "bf16", "BNHWD"]
    assert lines[4].split() == ["N1", "dq", "-", "-", "62.7%", "50.0%"]


def test_case_filters_repeat_and_add_up(monkeypatch):
    """`--case` may be given several times: the rows of any of them (one used to replace the other)."""
    from dynconv import bounds_cases

    names = [c.name for c in bounds_cases.selected_cases(["R1 dw fp32 NCHW", "R2 dw bf16 NHWC"])]
    assert names == ["R1 dw fp32 NCHW", "R2 dw bf16 NHWC"]
    assert [c.name for c in bounds_cases.selected_cases("R1 dw fp32 NCHW")] == ["R1 dw fp32 NCHW"]
    assert {c.kernel for c in bounds_cases.selected_cases(["R1 ", "C256 "], "dx")} == {"dx"}
    assert len(bounds_cases.selected_cases()) == len(bounds_cases.all_cases())
    seen = []
    monkeypatch.setattr(bounds, "run", lambda arch, cases, kernels, progress: seen.append(cases) or [])
    monkeypatch.setattr("dynconv.kernels._launch.kernels_are_interpreted", lambda: False)
    bounds.main(["--case", "R1 dw", "--case", "R2 dw", "--quiet"])
    assert seen == [["R1 dw", "R2 dw"]]


def test_na2d_cases_split_the_minimum_model():
    """Issue 15's rows: forward and the two backward kernels of both shapes, with and without rpb; the
    backward kernels' FLOPs add up to roofline.py's backward, each row's bytes cover the model's."""
    from dynconv.bounds_cases import all_cases
    from dynconv.roofline import REFERENCE_SHAPES, minimum_bytes, minimum_flops

    rows = {c.name: c for c in all_cases() if c.case.startswith("N")}
    for shape in ("N1", "N2", "N1-rpb", "N2-rpb"):
        p = REFERENCE_SHAPES[shape]
        for dtype in ("fp32", "bf16"):
            fwd, dq, dkv = (rows[f"{shape} {k} {dtype} BHWND"] for k in ("fwd", "dq", "dkv"))
            assert fwd.flops == minimum_flops(p, "forward")
            assert dq.flops + dkv.flops == minimum_flops(p, "backward")
            assert fwd.min_bytes > minimum_bytes(p, "forward", dtype)  # + the log-sum-exp it writes
            assert set(fwd.compute) <= {"fma", "gmma16", "gmmatf32"} and sum(fwd.compute.values()) == fwd.flops
