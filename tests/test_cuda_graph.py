"""Every op, forward and backward, on the eager path and through the custom ops, can be captured
in a CUDA graph and replayed on new values (issue 7). A host sync (.item(), nonzero, a copy to the
CPU) or an autotuning benchmark inside the capture would make the capture raise; a value baked in
at capture time (a DRConv region table, a mixed kernel) would make the replay disagree with eager.
GPU only: ``make gpu-test``."""
import os

import pytest
import torch
from test_eager_path import CASES, _cases

from dynconv.ops import _eager

pytestmark = pytest.mark.skipif(
    os.environ.get("DYNCONV_TEST_DEVICE") != "cuda" or not torch.cuda.is_available(),
    reason="needs a GPU and the compiled kernels (DYNCONV_TEST_DEVICE=cuda, as make gpu-test sets)")


def _step(fn, inputs, dy):
    y = fn(inputs)
    if dy is None:
        return (y,)
    return (y, *torch.autograd.grad(y, list(inputs.values()), dy))


@pytest.mark.parametrize("path", ["eager", "inference", "custom ops"])
@pytest.mark.parametrize("name", CASES)
def test_capture_and_replay_match_eager(name, path, monkeypatch):
    if path == "custom ops":
        monkeypatch.setattr(_eager, "eager", lambda *tensors: False)
    fn, inputs = _cases("cuda")[name]
    training = path != "inference"
    inputs = {k: v.detach().clone().requires_grad_(training) for k, v in inputs.items()}
    dy = torch.randn_like(fn(inputs)) if training else None

    # Warm up on a side stream (torch.cuda.graphs' recipe): kernels compile and configs are looked
    # up outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(fn, inputs, dy)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(fn, inputs, dy)

    # New values in the same tensors (new DRConv regions too): the replay must follow them.
    with torch.no_grad():
        for t in (*inputs.values(), *([dy] if training else [])):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = _step(fn, inputs, dy)
    assert len(captured) == len(expected)
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want)
