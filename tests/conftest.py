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


if DEVICE == "cuda":
    # Tests that build their tensors without naming a device (most kernel-level ones) run there too:
    # on the first GPU run, 67 of them handed CPU tensors to compiled kernels.
    torch.set_default_device("cuda")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    """fp32 is checked at fp32 tolerance: torch's convolutions (and the expert kernels, which follow
    ``cudnn.allow_tf32`` like cuDNN) would otherwise round fp32 operands to tf32 on a GPU."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture
def nan_poison():
    """Every torch.empty* allocation during the test is filled with NaN (integers with -1), so an
    output element a kernel forgets to write fails the comparison instead of passing by luck."""
    with nan_poisoned_empty():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)
