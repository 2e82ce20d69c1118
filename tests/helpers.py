"""Shared test machinery: NaN-poisoned allocation, float64 references, per-dtype tolerances."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch

# (atol, rtol) for outputs and gradients that sum up to a few hundred products.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1)
    return t


@contextlib.contextmanager
def nan_poisoned_empty():
    real = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)

    def empty(*args, **kwargs):
        return _poison(real[0](*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real[1](*args, **kwargs))

    def empty_strided(*args, **kwargs):
        return _poison(real[2](*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real[3](self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = empty, empty_like, empty_strided, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = real


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare against a float64 reference with the tolerance of ``dtype``; NaN always fails."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result (an element was never written?)"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def check_against_reference(fn, reference, inputs: dict, dtype: torch.dtype, device: str = "cpu",
                            memory_format=None, tolerance: torch.dtype | None = None, **kwargs):
    """Run ``fn`` on ``inputs`` cast to ``dtype`` and ``reference`` on float64 copies; compare the
    output and the gradient of every floating input against a random output gradient.

    ``inputs`` maps argument names to float64 CPU tensors (or None); 4-D tensors are converted to
    ``memory_format`` when given. ``tolerance`` names another dtype whose tolerance applies (fp32
    with tf32 products: fp16's). Returns the output of ``fn``.
    """
    tolerance = tolerance or dtype
    # The reference sees the same rounded values as the kernel: only the kernel's error is measured.
    ref_in = {k: (v.detach().to(dtype).double().requires_grad_() if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    test_in = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().to(device=device, dtype=dtype)
            if memory_format is not None and t.dim() == 4:
                t = t.contiguous(memory_format=memory_format)
            test_in[k] = t.requires_grad_()
        else:
            test_in[k] = v
    expected = reference(**ref_in, **kwargs)
    actual = fn(**test_in, **kwargs)
    assert actual.dtype == dtype, f"output dtype {actual.dtype} != input dtype {dtype}"
    assert_close(actual, expected, tolerance, "output")
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad.to(device=device, dtype=dtype))
    for k, v in ref_in.items():
        if isinstance(v, torch.Tensor):
            assert test_in[k].grad is not None, f"no gradient reached {k}"
            assert_close(test_in[k].grad, v.grad, tolerance, f"grad {k}")
    return actual


def run_without_interpreter(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process without TRITON_INTERPRET, captured as text: this suite runs
    the interpreter (read at import), which replaces the kernels that are to be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def idle_tuning_spaces() -> set[str]:
    """Tuning spaces with nothing to time on the installed triton: the NCHW input gradient's pair
    kernel runs on triton 3.6 or older only (involution_nchw.DX_PAIRS); the NCHW weight gradient's
    pair kernel not at the sweep's shapes, whose NCHW bf16 inputs the entry point copies to
    channels_last (involution_weight_grad.weight_grad_copies)."""
    from dynconv.kernels import involution_nchw

    idle = {"involution_nchw_bwd_weight_pairs"}
    return idle if involution_nchw.DX_PAIRS else idle | {"involution_nchw_bwd_input_pairs"}
