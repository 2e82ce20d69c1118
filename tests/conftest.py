"""Tests run the Triton kernels through the interpreter on CPU tensors. The switch is read when
the kernels are decorated, so it must be set before anything imports dynconv."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import nan_poisoned_empty  # noqa: E402

# The suite runs on CPU by default; DYNCONV_TEST_DEVICE=cuda runs the same tests on a GPU
# (there TRITON_INTERPRET must be 0 so the compiled kernels run).
DEVICE = os.environ.get("DYNCONV_TEST_DEVICE", "cpu")
if DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("DYNCONV_AUTOTUNE", "0")  # no run-time tuning sweeps inside the tests

if os.environ["TRITON_INTERPRET"] == "1":
    # The interpreter's bf16 dot, casts and arithmetic are wrong (interpreter_bf16.py): give them the
    # GPU's semantics, so bf16 paths are tested on CPU too. Harness only; the library never sees it.
    import interpreter_bf16  # noqa: E402

    interpreter_bf16.install()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def nan_poison():
    """Every torch.empty* allocation during the test is filled with NaN (integers with -1), so an
    output element a kernel forgets to write fails the comparison instead of passing by luck."""
    with nan_poisoned_empty():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)
