"""The eager path (an autograd.Function around the ops' bodies, no dispatcher) and the registered
custom ops compute the same bits; whatever must see an op (torch.compile, fake tensors, dispatch
modes) still does, and bad input is named the same way on both paths."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import dynconv
from dynconv.ops import _eager
from dynconv.ops import expert_conv as expert_ops
from dynconv.ops import involution as involution_ops
from dynconv.ops import involution_fused as fused_ops


def _cases(device):
    def t(*shape):
        return torch.randn(*shape, device=device)

    nhwc = torch.channels_last
    return {
        "involution-stride2": (lambda a: dynconv.involution(**a, stride=2),
                               dict(x=t(2, 8, 7, 6), weight=t(2, 2, 3, 3, 4, 3))),
        "involution-nhwc": (lambda a: dynconv.involution(**a),
                            dict(x=t(2, 8, 5, 6).contiguous(memory_format=nhwc), weight=t(2, 4, 3, 3, 5, 6))),
        "dwconv-dilation2-bias": (lambda a: dynconv.dynamic_dwconv2d(**a, dilation=2),
                                  dict(x=t(2, 8, 6, 6), weight=t(2, 8, 3, 3), bias=t(2, 8))),
        "condconv-groups2-spatial": (lambda a: dynconv.expert_conv2d(**a, padding=1, groups=2),
                                     dict(x=t(2, 4, 5, 5), experts=t(3, 6, 2, 3, 3), routing=t(2, 3).softmax(-1),
                                          bias=t(3, 6), spatial=t(2, 3, 3).sigmoid())),
        "drconv-m2": (lambda a: dynconv.expert_conv2d(**a, padding=1),
                      dict(x=t(2, 4, 5, 5), experts=t(3, 6, 4, 3, 3), routing=t(2, 2, 3).softmax(-1),
                           guide=t(2, 2, 5, 5))),
        "involution_fused": (lambda a: dynconv.involution_fused(**a, kernel_size=3, groups=2),
                             dict(x=t(2, 8, 5, 6), z=t(2, 4, 5, 6), span_weight=t(18, 4), span_bias=t(18))),
    }


CASES = list(_cases("cpu"))


def _forward_backward(fn, inputs):
    """(y, gradient of every input) for a fixed output gradient."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(leaves)
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    return (y, *torch.autograd.grad(y, list(leaves.values()), dy))


def _custom_ops_only(monkeypatch):
    monkeypatch.setattr(_eager, "eager", lambda *tensors: False)


@pytest.mark.parametrize("name", CASES)
def test_eager_path_and_custom_ops_agree_bit_for_bit(name, device, monkeypatch):
    fn, inputs = _cases(device)[name]
    eager = _forward_backward(fn, inputs)
    inference = fn(inputs)  # no input needs a gradient: the forward body runs without the Function
    _custom_ops_only(monkeypatch)
    via_ops = _forward_backward(fn, inputs)
    assert eager[0].stride() == via_ops[0].stride() == inference.stride()
    assert torch.equal(inference, eager[0])
    for a, b in zip(eager, via_ops):
        assert torch.equal(a, b)


def test_the_eager_path_calls_no_custom_op(device, monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the eager path went through the dispatcher")

    for module, names in ((involution_ops, ("involution_op", "dynamic_dwconv2d_op", "backward_input_op",
                                             "backward_weight_op")),
                          (expert_ops, ("expert_conv2d_op", "region_tables_op", "backward_input_op",
                                        "backward_weight_op")),
                          (fused_ops, ("involution_fused_op", "backward_input_op", "backward_z_op",
                                       "backward_span_op"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    for fn, inputs in _cases(device).values():
        y, *grads = _forward_backward(fn, inputs)
        assert all(g is not None for g in grads)


@pytest.mark.parametrize("name", CASES)
def test_fake_tensors_take_the_custom_ops(name, device):
    fn, inputs = _cases(device)[name]
    with FakeTensorMode() as mode:
        y = fn({k: mode.from_tensor(v) for k, v in inputs.items()})
    real = fn(inputs)
    assert (y.shape, y.stride(), y.dtype) == (real.shape, real.stride(), real.dtype)


def test_dispatch_modes_see_the_ops(device):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    fn, inputs = _cases(device)["dwconv-dilation2-bias"]
    with Record():
        y = fn(inputs)
    assert torch.ops.dynconv.dynamic_dwconv2d.default in seen
    assert torch.equal(y, fn(inputs))


@pytest.mark.parametrize("name", ["involution-nhwc", "drconv-m2", "involution_fused"])
def test_torch_compile_traces_the_custom_ops_and_matches_eager(name, device):
    fn, inputs = _cases(device)[name]
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = _forward_backward(torch.compile(fn, fullgraph=True, backend=backend), inputs)
    assert any(target.startswith("dynconv.") for target in targets), targets
    for a, b in zip(compiled, _forward_backward(fn, inputs)):
        assert torch.equal(a, b)


def test_profiler_traces_name_the_ops(device):
    fn, inputs = _cases(device)["involution_fused"]
    with torch.profiler.profile() as profile:
        _forward_backward(fn, inputs)
    names = {event.name for event in profile.events()}
    assert {"dynconv::involution_fused", "dynconv::involution_fused_backward_span"} <= names


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_trace_records_the_custom_op(device):
    _, inputs = _cases(device)["involution-stride2"]

    def fn(x, weight):  # an explicit padding: the default one would be traced sizes
        return dynconv.involution(x, weight, stride=2, padding=1)

    traced = torch.jit.trace(fn, (inputs["x"], inputs["weight"]))
    assert "dynconv::involution" in str(traced.graph)
    x = torch.randn_like(inputs["x"])
    assert torch.equal(traced(x, inputs["weight"]), fn(x, inputs["weight"]))


# Bad input is named the same way when the custom ops run (torch.compile's path).

def _bad_cases():
    from test_expert_conv import BAD_INPUTS as BAD_EXPERT
    from test_expert_conv import _good
    from test_involution_api import BAD_DWCONV, BAD_INVOLUTION
    from test_involution_fused import BAD_INPUTS as BAD_FUSED
    from test_involution_fused import _bad

    for name, make, kwargs, error, match in BAD_INVOLUTION:
        yield f"involution-{name}", lambda make=make, kwargs=kwargs: dynconv.involution(*make(), **kwargs), error, match
    for name, make, error, match in BAD_DWCONV:
        yield f"dwconv-{name}", lambda make=make: dynconv.dynamic_dwconv2d(*make()), error, match
    for change, error, match in BAD_EXPERT:
        yield f"expert-{match}", lambda change=change: dynconv.expert_conv2d(**{**_good(), **change}), error, match
    for error, match, changes in BAD_FUSED:
        yield f"fused-{match}", lambda changes=changes: dynconv.involution_fused(**_bad(**changes)), error, match


BAD = list(_bad_cases())


@pytest.mark.parametrize("call, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_the_custom_op_path_names_bad_input_the_same_way(call, error, match, monkeypatch):
    _custom_ops_only(monkeypatch)
    with pytest.raises(error, match=match):
        call()
