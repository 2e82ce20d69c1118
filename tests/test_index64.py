"""Offsets past 2^31 (issue 11 item 4): the INDEX_64 kernel variants form every stride product in
64 bits, and the kernels address tensors whose strides overflow 32-bit products correctly.

Two checks, neither needs a GPU:

* The PTX of every INDEX_64 launch in the kernel catalogues, compiled for sm_90: no 32-bit stride
  argument may feed a 32-bit multiply, multiply-add, add or shift, directly or through 32-bit
  moves (a product of an index and a stride, or a loop-carried offset that LLVM strength-reduced
  out of one). 64-bit forms (``mul.wide.s32``, ``cvt.s64.s32`` then ``.s64`` arithmetic) pass.
  The compiles run in a subprocess: this test process has the interpreter switched on.
* Interpreter runs whose operands are views over a storage of more than 2^31 elements (allocated
  with ``torch.empty`` and never filled: untouched pages never become resident, and the
  interpreter reuses a CPU tensor's storage without copying it), with the stride of a tap,
  region, expert or R axis chosen so that ``index * stride`` passes 2^31. The interpreter computes
  int32 arithmetic in int32 (numpy wraps), so a 32-bit product there addresses 4 GiB before the
  view: the run crashes with SIGSEGV (under pytest-xdist: a crashed worker, reported as a failure)
  or reads a wrong element. A clean failure would need the wrapped address inside the storage,
  i.e. a 2^32-element (8 GiB) address space: more than a small CI machine may grant.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from dynconv.reference import expert_conv2d_loop, involution_fused_reference, involution_naive
from helpers import assert_close, run_without_interpreter

# --------------------------------------------------------------------------------------------
# PTX: no stride argument multiplied in 32 bits
# --------------------------------------------------------------------------------------------

_COMPILE_INT64_VARIANTS = r"""
import json
from dynconv.kernels import KERNEL_MODULES
seen = set()
for module in KERNEL_MODULES:
    for launch in module.catalogue():
        if not launch.meta.get("INDEX_64"):
            continue
        source = launch.source()
        key = (launch.name, str(source.signature), str(launch.meta), launch.num_warps)
        if key in seen:
            continue
        seen.add(key)
        params = [name for name, kind in source.signature.items() if kind != "constexpr"]
        print(json.dumps({"kernel": launch.name, "label": launch.label, "params": params,
                          "ptx": launch.compile(90).asm["ptx"]}))
"""

# Memory strides are the lower-case kernel arguments that start with "s" (sxb, sw_u, s_score_n, ...);
# the upper-case SH/SW are convolution strides.
_STRIDE_ARG = re.compile(r"^s[a-z_]+$")
_INSTRUCTION = re.compile(r"^(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+(.*);")
_LOAD_PARAM = re.compile(r"ld\.param\.[bus]32\s+(%r\d+),\s*\[\w+_param_(\d+)\]")
_REGISTER = re.compile(r"%r\d+\b")
_NARROW_ARITHMETIC = re.compile(r"^(mul|mad|add|sub|shl)(\.lo|\.hi)?(\.cc)?\.[bsu]32$")
_MOVE_32 = re.compile(r"^mov\.[bsu]32$")


def narrow_stride_arithmetic(ptx: str, params: list[str]) -> list[str]:
    """The PTX instructions that do 32-bit integer arithmetic on a 32-bit stride argument, each with
    the source line (``file.py:line``) it came from. ``params`` names the kernel's parameters in order."""
    tainted: dict[str, str] = {}  # register -> the stride argument it holds
    instructions = []
    location = "?"
    for line in ptx.splitlines():
        line = line.strip()
        loc = re.search(r"//\s*(\w+\.py:\d+)", line)
        if line.startswith(".loc") and loc:
            location = loc.group(1)
            continue
        match = _LOAD_PARAM.search(line)
        if match and int(match.group(2)) < len(params) and _STRIDE_ARG.match(params[int(match.group(2))]):
            tainted[match.group(1)] = params[int(match.group(2))]
            continue
        match = _INSTRUCTION.match(line)
        if match:
            instructions.append((match.group(1), _REGISTER.findall(match.group(2)), line, location))
    # 32-bit moves copy a stride into other registers (loop phis become movs): follow them to a fixpoint.
    changed = True
    while changed:
        changed = False
        for opcode, registers, _, _ in instructions:
            moved = _MOVE_32.match(opcode) and len(registers) == 2 and registers[1] in tainted
            if moved and registers[0] not in tainted:
                tainted[registers[0]] = tainted[registers[1]]
                changed = True
    problems = []
    for opcode, registers, line, location in instructions:
        if _NARROW_ARITHMETIC.match(opcode):
            strides = sorted({tainted[r] for r in registers[1:] if r in tainted})
            if strides:
                problems.append(f"{location}: {line}   <- {', '.join(strides)} in 32 bits")
    return problems


def test_the_ptx_check_finds_a_32_bit_stride_product():
    """The checker itself: a stride multiplied in 32 bits (also after a move) is found; the wide
    and 64-bit forms pass."""
    params = ["x_ptr", "K", "swu", "SH"]
    header = ".loc\t1 110 13                        // involution.py:110:13\n"
    narrow = header + ("ld.param.b32 \t%r5, [k_param_2];\nmov.b32 \t%r9, %r5;\nmul.lo.s32 \t%r50, %r47, %r9;\n")
    assert narrow_stride_arithmetic(narrow, params) == [
        "involution.py:110: mul.lo.s32 \t%r50, %r47, %r9;   <- swu in 32 bits"]
    recurrence = "ld.param.u32 %r5, [k_param_2];\nadd.s32 %r60, %r60, %r5;\n"
    assert narrow_stride_arithmetic(recurrence, params)
    wide = ("ld.param.b32 \t%r5, [k_param_2];\nmul.wide.s32 \t%rd5, %r47, %r5;\n"
            "cvt.s64.s32 \t%rd6, %r5;\nmul.lo.s64 \t%rd7, %rd6, %rd1;\n")
    assert narrow_stride_arithmetic(wide, params) == []
    not_a_stride = "ld.param.b32 \t%r5, [k_param_3];\nmul.lo.s32 \t%r50, %r47, %r5;\n"  # SH: a conv stride
    assert narrow_stride_arithmetic(not_a_stride, params) == []


@pytest.fixture(scope="module")
def int64_ptx() -> list[dict]:
    proc = run_without_interpreter(["-c", _COMPILE_INT64_VARIANTS], timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and rows, f"compiling the INDEX_64 variants failed:\n{proc.stderr[-4000:]}"
    return rows


def test_int64_variants_multiply_no_stride_in_32_bits(int64_ptx):
    kernels = {row["kernel"] for row in int64_ptx}
    # Every kernel of every module has an INDEX_64 launch in its catalogue.
    assert kernels >= {"involution_fwd_kernel", "involution_bwd_input_kernel", "involution_bwd_weight_kernel",
                       "fused_fwd_kernel", "fused_bwd_input_kernel", "fused_bwd_z_kernel", "fused_bwd_span_kernel",
                       "expert_conv_fwd_kernel", "expert_conv_guide_score_kernel", "expert_conv_bwd_input_kernel",
                       "expert_conv_bwd_weight_kernel"}, kernels
    problems = []
    for row in int64_ptx:
        assert ".param" in row["ptx"] and any(_STRIDE_ARG.match(p) for p in row["params"])
        where = f"{row['kernel']} [{row['label']}]"
        problems += [f"{where} {p}" for p in narrow_stride_arithmetic(row["ptx"], row["params"])]
    assert not problems, "32-bit stride arithmetic in INDEX_64 variants:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# Interpreter: strides whose products with a tap, R, expert or region index pass 2^31
# --------------------------------------------------------------------------------------------

BIG = 2**30  # index 2 times this stride is 2^31: one past int32
# Elements of the shared storage: every view below ends before this (2^31 + 2^29 + 2^20 fp16 values,
# 5.4 GB of address space of which the test touches a few pages).
STORAGE_ELEMENTS = 2**31 + 2**29 + 2**20
GEOMETRY = ((1, 1), (1, 1), (1, 1))  # stride, padding, dilation


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def storage():
    """A never-filled fp16 storage past 2^31 elements; views into it are filled (a few pages each).
    The test fails if running the kernels made a GB of it resident (the interpreter copied it)."""
    before = _resident_bytes()
    big = torch.empty(STORAGE_ELEMENTS, dtype=torch.float16)
    yield big
    after = _resident_bytes()
    if before is not None and after is not None:
        assert after - before < 2**30, f"{(after - before) / 2**30:.1f} GiB became resident: the storage was copied"
    del big


def _view(storage, values: torch.Tensor, strides, slot: int) -> torch.Tensor:
    """``values`` placed in ``storage`` with the given element strides, starting at element ``slot``
    (views at different slots never share an element: their low offsets differ)."""
    view = storage.as_strided(values.shape, strides, slot)
    assert max((n - 1) * s for n, s in zip(values.shape, strides)) + slot < STORAGE_ELEMENTS
    view.copy_(values)
    return view


def _nan_view(storage, shape, strides, slot: int) -> torch.Tensor:
    view = storage.as_strided(shape, strides, slot)
    view.fill_(float("nan"))
    return view


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64).to(torch.float16)


def _nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float16)


@pytest.mark.parametrize("per_pixel,dtype", [(True, torch.float16), (False, torch.float16), (True, torch.bfloat16)],
                         ids=["per-pixel", "per-sample", "per-pixel-bf16-pairs"])
def test_involution_taps_past_int32(storage, per_pixel, dtype):
    """u * swu passes 2^31 (the weight's tap axis outermost in memory, as in a permuted weight).
    bf16 at even widths takes the NCHW pair kernels (forward, input and weight gradients)."""
    from dynconv.kernels import involution as k
    from dynconv.kernels import involution_nchw as nchw
    from dynconv.kernels import involution_weight_grad as weight_grad

    storage = storage.view(dtype)
    B, C, H, W, G, K = 1, 4, 4, 4, 2, 3 if dtype == torch.float16 else 5  # bf16 pairs: dw at K >= 5
    geometry = ((1, 1), ((K - 1) // 2,) * 2, (1, 1))
    x, dy = _randn(B, C, H, W).to(dtype), _randn(B, C, H, W).to(dtype)
    shape = (B, G, K, K, H, W) if per_pixel else (B, G, K, K)
    swu = 2**31 // (K - 1)  # the last tap row lands on 2^31 (BIG at K = 3); tap columns never reach the next row
    strides = (64, 16, swu, swu // 8, 4, 1) if per_pixel else (64, 16, swu, swu // 8)
    w = _randn(*shape).to(dtype)
    w_big = _view(storage, w, strides, 0)
    bias = None if per_pixel else _randn(B, C).to(dtype)
    assert k.forward_launch(x, w_big, bias, _nan(B, C, H, W).to(dtype), *geometry).meta["INDEX_64"]
    if dtype == torch.bfloat16:
        assert weight_grad.backward_weight_launch(dy, x, w_big, *geometry, True).name == "involution_nchw_bwd_weight_pairs_kernel"
        dx_pairs = k.backward_input_launch(dy, w_big, x, *geometry).name == "involution_nchw_bwd_input_pairs_kernel"
        assert dx_pairs == nchw.DX_PAIRS  # triton 3.6 or older
    outputs = []
    for weight in (w, w_big):  # contiguous (32-bit offsets), then the wide view (INDEX_64)
        y, dx = _nan(B, C, H, W).to(dtype), _nan(B, C, H, W).to(dtype)
        k.involution_forward(x, weight, bias, y, *geometry)
        k.involution_backward_input(dy, weight, dx, *geometry)
        dw = _nan(*shape).to(dtype) if weight is w else _nan_view(storage, shape, strides, 128)
        weight_grad.involution_backward_weight(dy, x, dw, *geometry)
        outputs.append((y, dx, dw.clone()))
    for name, small, wide in zip(("y", "dx", "dw"), *outputs):
        assert not small.isnan().any(), name
        assert torch.equal(small, wide), f"{name}: the INDEX_64 run with wide strides differs"
    expected = involution_naive(x.double(), w.double(), None if bias is None else bias.double(), 1, (K - 1) // 2, 1)
    assert_close(outputs[1][0], expected, dtype, "y")


def test_involution_fused_r_and_span_rows_past_int32(storage):
    """r * szr, row * sso and r * sdzr pass 2^31 (z's R axis and the span weight's rows outermost)."""
    from dynconv.kernels import involution_fused as k

    B, C, H, W, G, K, R = 1, 4, 4, 4, 2, 3, 3
    x, dy = _randn(B, C, H, W), _randn(B, C, H, W)
    z, span_w, span_b = _randn(B, R, H, W), _randn(K * K * G, R) * 0.5, _randn(K * K * G)
    z_strides, span_strides, dz_strides = (64, BIG, 4, 1), (BIG // 8, 1), (64, BIG, 4, 1)
    z_big = _view(storage, z, z_strides, 0)
    span_big = _view(storage, span_w, span_strides, 64)  # row 17 * 2^27 > 2^31
    assert k.forward_launch(x, z_big, span_big, span_b, _nan(B, C, H, W), K, *GEOMETRY).meta["INDEX_64"]
    outputs = []
    for zz, ss in ((z, span_w), (z_big, span_big)):
        y, dx = _nan(B, C, H, W), _nan(B, C, H, W)
        dz = _nan(B, R, H, W) if zz is z else _nan_view(storage, (B, R, H, W), dz_strides, 128)
        dspan, dbias = _nan(K * K * G, R), _nan(K * K * G)
        k.involution_fused_forward(x, zz, ss, span_b, y, K, *GEOMETRY)
        k.involution_fused_backward_input(dy, zz, ss, span_b, dx, K, *GEOMETRY)
        k.involution_fused_backward_z(dy, x, ss, dz, K, *GEOMETRY)
        k.involution_fused_backward_span(dy, x, zz, dspan, dbias, K, *GEOMETRY)
        outputs.append((y, dx, dz.clone(), dspan, dbias))
    for name, small, wide in zip(("y", "dx", "dz", "dspan", "dbias"), *outputs):
        assert not small.isnan().any(), name
        assert torch.equal(small, wide), f"{name}: the INDEX_64 run with wide strides differs"
    expected = involution_fused_reference(x.double(), z.double(), span_w.double(), span_b.double(), K, G, 1, 1, 1)
    assert_close(outputs[1][0], expected, torch.float16, "y")


def test_expert_conv_experts_and_regions_past_int32(storage):
    """e * sw_e and r * sbias_r pass 2^31 (experts and regions outermost), mixing on the fly with a
    DRConv guide: forward, input gradient and guide scores."""
    from dynconv.kernels import expert_conv as k
    from dynconv.kernels import expert_conv_guide, expert_conv_input_grad
    from dynconv.kernels.region_tables import region_tables

    B, C, H, W, E, m, kk = 1, 4, 4, 4, 3, 3, 3
    x, dy = _randn(B, C, H, W), _randn(B, C, H, W)
    experts, routing = _randn(E, C, C, kk, kk) * 0.5, torch.rand(B, m, E).to(torch.float16)
    bias_e, guide = _randn(E, C), _randn(B, m, H, W) * 4  # logits far apart: fp16 keeps each pixel's region
    bias = (routing.double() @ bias_e.double()).to(torch.float16)  # (B, m, C), as the op mixes it
    experts_big = _view(storage, experts, (BIG, 36, 9, 3, 1), 0)
    bias_big = _view(storage, bias, (64, BIG, 1), 256)
    config = k.forward_config(x, experts, m, 1, *GEOMETRY)
    source = k.weight_source(experts_big, routing, materialise=False)
    regions = region_tables(guide)
    assert k.forward_launch(x, source, None, bias_big, regions, _nan(B, C, H, W), (kk, kk), 1, *GEOMETRY,
                            config).meta["INDEX_64"]
    outputs = []
    for ex, bb in ((experts, bias), (experts_big, bias_big)):
        y, dx = _nan(B, C, H, W), _nan(B, C, H, W)
        k.expert_conv_forward(x, ex, routing, None, bb, regions, y, 1, *GEOMETRY, materialise=False)
        expert_conv_input_grad.expert_conv_backward_input(dy, ex, routing, None, regions, dx, 1, *GEOMETRY,
                                                          materialise=False)
        scores = expert_conv_guide.expert_conv_guide_scores(x, ex, routing, None, bb, dy, 1, *GEOMETRY,
                                                            materialise=False)
        outputs.append((y, dx, scores))
    for name, small, wide in zip(("y", "dx", "guide scores"), *outputs):
        assert not small.isnan().any(), name
        assert torch.equal(small, wide), f"{name}: the INDEX_64 run with wide strides differs"
    # And right, not merely equal: the forward against the float64 reference.
    expected = expert_conv2d_loop(x.double(), experts.double(), routing.double(), bias_e.double(), 1, 1, 1,
                                  guide=guide.double())
    assert_close(outputs[1][0], expected, torch.float16, "y")
