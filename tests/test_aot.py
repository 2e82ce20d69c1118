"""Every kernel launch the ops make by default compiles for Hopper (sm_90) and Ampere (sm_80)
with the triton wheel's ptxas: no spills, no stack, shared memory within the architecture, and no
matrix product that Triton made out of a multiply-reduce (``kernels._launch.unwritten_dots``).

The compiles run in a subprocess through ``dynconv inspect`` because this test process has the
interpreter switched on, and the interpreter replaces the kernels that are to be compiled.
"""
import json

import pytest

from dynconv.kernels import KERNEL_MODULES
from dynconv.kernels._launch import ARCHS
from helpers import run_without_interpreter

MODULES = [module.__name__.rsplit(".", 1)[-1] for module in KERNEL_MODULES]
# Compile time (triton 3.6), kernels._launch.coalescing_work: the largest default launch is the bf16
# NCHW pair input gradient at 1.9 M (about 26 s on sm_80); R4's batched walk at 2.8 M (37 s a kernel)
# once made CI's make test take 48 minutes where it had taken 13.
COALESCING_WORK_LIMIT = 2_000_000


def _inspect(module: str, arch: int) -> list[dict]:
    proc = run_without_interpreter(["-m", "dynconv.cli", "inspect", "--json", "--module", module, "--arch", str(arch)],
                                   timeout=1200)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"dynconv inspect reported nothing:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return rows


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("module", MODULES)
def test_default_launches_compile_without_spills(module, arch):
    problems = []
    for row in _inspect(module, arch):
        where = f"{row['kernel']} [{row['label']}] sm_{arch}"
        if "error" in row:
            problems.append(f"{where}: does not compile: {row['error']}")
            continue
        if row["spilled"] or row["local_memory_ops"]:
            problems.append(f"{where}: spills ({row['local_memory_ops']} local loads/stores, {row['registers']} regs)")
        if row["stack_bytes"]:
            problems.append(f"{where}: stack frame of {row['stack_bytes']} bytes")
        if arch == 90 and row["sm90_max_registers"] and row["registers"] > row["sm90_max_registers"]:
            problems.append(f"{where}: the {row['sm90_max_registers']}-register cap dropped (ptxas gave the kernel "
                            f"local memory under it; uncapped {row['registers']} registers)")
        if row["unwritten_dots"]:
            problems.append(f"{where}: tensor-core products no tl.dot wrote (tf32, any length): {row['unwritten_dots']}")
        if row["coalescing_work"] > COALESCING_WORK_LIMIT:
            problems.append(f"{where}: coalescing work {row['coalescing_work']:,} > {COALESCING_WORK_LIMIT:,} "
                            "(slow to compile: kernels._launch.coalescing_work)")
        if row["shared_bytes"] > ARCHS[arch]:
            problems.append(f"{where}: {row['shared_bytes']} B shared memory > {ARCHS[arch]}")
    assert not problems, "\n".join(problems)


# A staged involution forward that ptxas gives a stack frame under its 200-register sm_90 cap (K = 3,
# 56 x 56, 16 channels a group: 112-120 bytes on triton 3.6 and 3.9).
_CAP_PROBE = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from dynconv.kernels import involution
from dynconv.kernels._launch import cubin_dumps
x = torch.empty(32, 256, 56, 56, dtype=torch.bfloat16, device="meta").to(memory_format=torch.channels_last)
w = torch.empty(32, 16, 3, 3, 56, 56, dtype=torch.bfloat16, device="meta")
launch = involution.forward_launch(x, w, None, x, (1, 1), (1, 1), (1, 1))
capped = triton.compile(launch.source(), target=GPUTarget("cuda", 90, 32), options=launch.compile_options(90))
print(json.dumps([launch.sm90_max_registers, cubin_dumps(capped)[0], cubin_dumps(launch.compile(90))[0]]))
"""


def test_compile_drops_a_register_cap_the_kernel_spills_under(tmp_path):
    """What the AOT check and the static model compile is what runs: where the kernel has local
    memory under its sm_90 cap, uncapped (Launch.__call__ drops the cap so after a first run)."""
    script = tmp_path / "cap_probe.py"
    script.write_text(_CAP_PROBE)
    proc = run_without_interpreter([str(script)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cap, capped, compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cap == 200 and capped["STACK"] > 0, (cap, capped)  # the shape still loses the bet
    assert compiled["STACK"] == 0 and compiled["REG"] > cap, compiled


def test_every_kernel_module_lists_its_launches():
    from dynconv.kernels import catalogue

    names = {launch.name for launch in catalogue()}
    assert {"involution_fwd_kernel", "involution_bwd_input_kernel", "involution_bwd_weight_kernel"} <= names
    for module in KERNEL_MODULES:
        assert module.catalogue(), f"{module.__name__}.catalogue() is empty"


_MULTIPLY_REDUCE = '''
import torch, triton, triton.language as tl
from dynconv.kernels._launch import Launch, unwritten_dots

@triton.jit
def product(a_ptr, b_ptr, c_ptr, B_FIRST: tl.constexpr):
    m, k = tl.arange(0, 16), tl.arange(0, 4)
    a = tl.load(a_ptr + m[:, None] * 4 + k[None, :])
    b = tl.load(b_ptr + k[:, None] * 16 + m[None, :])
    if B_FIRST:
        c = tl.sum(b[None, :, :] * a[:, :, None], axis=1)
    else:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    written = tl.dot(tl.load(a_ptr + m[:, None] * 16 + m[None, :]), c)
    tl.store(c_ptr + m[:, None] * 16 + m[None, :], written)

for b_first in (False, True):
    tensors = {name: torch.empty(256, device="meta") for name in ("a_ptr", "b_ptr", "c_ptr")}
    launch = Launch(product, (1, 1, 1), tensors, {"B_FIRST": b_first}, 4, 1)
    print(b_first, unwritten_dots(launch.compile(90).asm["ttir"]))
'''


def test_unwritten_dots_finds_the_product_triton_makes_of_a_multiply_reduce(tmp_path):
    script = tmp_path / "multiply_reduce.py"
    script.write_text(_MULTIPLY_REDUCE)
    proc = run_without_interpreter([str(script)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert found["False"].startswith("['standard.py:"), found  # the rewritten sum, not the written tl.dot
    assert found["True"] == "[]", found


_TTIR = """#loc = loc("k.py":1:0)
module {
  tt.func public @k(%x: !tt.ptr<f32> loc("x"(#loc))) attributes {noinline = false} {
    %r = tt.make_range {end = 4 : i32, start = 0 : i32} : tensor<4xi32> loc(#loc)
    %p = tt.splat %x : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>> loc(#loc)
    %q = tt.addptr %p, %r : tensor<4x!tt.ptr<f32>>, tensor<4xi32> loc(#loc)
    %v = tt.load %q : tensor<4x!tt.ptr<f32>> loc(#loc)
    %s:2 = scf.for %i = %c0 to %c4 step %c1 iter_args(%a = %v, %b = %v) -> (tensor<4xf32>, tensor<4xf32>) {
      scf.yield %a, %b : tensor<4xf32>, tensor<4xf32> loc(#loc)
    } loc(#loc)
    tt.store %q, %s#0 : tensor<4x!tt.ptr<f32>> loc(#loc)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""


def test_coalescing_work_is_operations_times_memory_accesses():
    from dynconv.kernels._launch import coalescing_work

    # func, make_range, splat, addptr, load, for, yield, store, return: 9 operations, 2 accesses.
    assert coalescing_work(_TTIR) == 9 * 2
    assert coalescing_work(_TTIR.replace("    %v = tt.load", "    %w = tt.load %q : tensor<4x!tt.ptr<f32>>\n    %v = tt.load")) == 10 * 3


def test_float_arguments_have_an_fp64_twin():
    """The JIT passes a Python float to an undeclared parameter as fp32: float64 na2d was 1e-6 off
    on an H200. A kernel that takes float arguments also takes the scale they derive from as a
    parameter declared ``tl.float64`` (na2d: ``scale_f64``), which its float64 path reads."""
    import inspect

    import triton.language as tl

    from dynconv.kernels import catalogue

    missing, checked = set(), 0
    for launch in catalogue():
        if not any(isinstance(value, float) for value in launch.args.values()):
            continue
        fn = launch.kernel
        while hasattr(fn, "fn"):  # the JIT or interpreter wrapper around the Python function
            fn = fn.fn
        # A string under `from __future__ import annotations`, which the JIT reads as well.
        twins = [name for name, parameter in inspect.signature(fn).parameters.items()
                 if parameter.annotation in (tl.float64, "tl.float64") and isinstance(launch.args.get(name), float)]
        checked += 1
        if not twins:
            missing.add(launch.name)
    assert checked and not missing, sorted(missing)
