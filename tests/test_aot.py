"""Every kernel launch the ops make by default compiles for Hopper (sm_90) and Ampere (sm_80)
with the triton wheel's ptxas: no spills, no stack, shared memory within the architecture.

The compiles run in a subprocess through ``dynconv inspect`` because this test process has the
interpreter switched on, and the interpreter replaces the kernels that are to be compiled.
"""
import json

import pytest

from dynconv.kernels import KERNEL_MODULES
from dynconv.kernels._launch import ARCHS
from helpers import run_without_interpreter

MODULES = [module.__name__.rsplit(".", 1)[-1] for module in KERNEL_MODULES]


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
        if row["shared_bytes"] > ARCHS[arch]:
            problems.append(f"{where}: {row['shared_bytes']} B shared memory > {ARCHS[arch]}")
    assert not problems, "\n".join(problems)


def test_every_kernel_module_lists_its_launches():
    from dynconv.kernels import catalogue

    names = {launch.name for launch in catalogue()}
    assert {"involution_fwd_kernel", "involution_bwd_input_kernel", "involution_bwd_weight_kernel"} <= names
    for module in KERNEL_MODULES:
        assert module.catalogue(), f"{module.__name__}.catalogue() is empty"
