"""Every kernel launch the ops make by default compiles for Hopper (sm_90) and Ampere (sm_80)
with the triton wheel's ptxas: no spills, no stack, shared memory within the architecture."""
import pytest

from dynconv.kernels import catalogue
from dynconv.kernels._launch import ARCHS, resource_usage


def _unique_launches():
    seen, unique = set(), []
    for launch in catalogue():
        key = (launch.name, str(launch.source().signature), str(launch.meta), launch.num_warps, launch.num_stages)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


LAUNCHES = _unique_launches()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("launch", LAUNCHES, ids=[f"{l.name}[{l.label}]" for l in LAUNCHES])
def test_compiles_without_spills(launch, arch):
    usage = resource_usage(launch, arch)
    assert usage["local_memory_ops"] == 0 and not usage["spilled"], f"spills: {usage}"
    assert usage["stack_bytes"] == 0, f"stack frame: {usage}"
    assert usage["shared_bytes"] <= ARCHS[arch], f"shared memory over the sm_{arch} limit: {usage}"
    assert usage["registers"] <= 255


def test_every_kernel_module_has_launches():
    from dynconv.kernels import KERNEL_MODULES

    names = {launch.name for launch in catalogue()}
    for module in KERNEL_MODULES:
        assert any(launch.kernel.__module__ == module.__name__ if hasattr(launch.kernel, "__module__") else True
                   for launch in catalogue()), module
    assert {"involution_fwd_kernel", "involution_bwd_input_kernel", "involution_bwd_weight_kernel"} <= names
