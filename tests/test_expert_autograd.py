"""dynconv.expert_conv2d beyond first-order reverse mode (issue 11): double backward, forward-mode
AD and torch.func transforms, empty problems, meta tensors, NaN guide logits.

Gradients of gradients are checked by torch.autograd.gradgradcheck (finite differences, float64)
on the plain PyTorch path and through the Triton interpreter, on the eager autograd.Function path
and on the custom ops (as torch.compile sees them). Shapes are tiny: the interpreter is slow.
"""
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import dynconv
from dynconv.kernels import _launch
from dynconv.kernels import expert_conv as kernels
from dynconv.kernels import expert_conv_guide as guide_kernels
from dynconv.kernels import expert_conv_input_grad as input_grad_kernels
from dynconv.kernels import expert_conv_weight_grad as weight_grad_kernels
from dynconv.ops import _eager
from dynconv.ops import expert_conv as ops
from dynconv.reference import expert_conv2d_grouped, expert_conv2d_loop
from helpers import assert_close

F64 = dict(dtype=torch.float64)


def _inputs(B=2, Cin=2, Cout=2, H=3, W=3, E=2, m=1, groups=1, bias=True, spatial=False, guide=False):
    """Float64 inputs of a tiny problem (3x3 kernel, padding 1): CondConv-like (m = 1), ODConv-like
    (spatial) or DRConv (m regions and a guide with well-separated logits)."""
    return {
        "x": torch.randn(B, Cin, H, W, **F64),
        "experts": torch.randn(E, Cout, Cin // groups, 3, 3, **F64),
        "routing": torch.rand(B, m, E, **F64) if guide else torch.rand(B, E, **F64),
        "bias": torch.randn(E, Cout, **F64) if bias else None,
        "spatial": torch.rand(B, 3, 3, **F64) + 0.5 if spatial else None,
        "guide": torch.randn(B, m, H, W, **F64) * 3 if guide else None,
    }


CASES = {  # (problem, groups)
    "condconv-groups1": (dict(), 1),
    "odconv-groups2": (dict(spatial=True, groups=2), 2),
    "drconv-groups1": (dict(m=2, guide=True), 1),
    "drconv-spatial-groups2": (dict(m=2, guide=True, spatial=True, groups=2), 2),
}


def _op(groups):
    return lambda **a: dynconv.expert_conv2d(**a, padding=1, groups=groups)


def _reference(groups):
    return lambda **a: expert_conv2d_grouped(**a, stride=1, padding=1, dilation=1, groups=groups)


def _positional(fn, names):
    return lambda *tensors: fn(**dict(zip(names, tensors)))


def _leaves(inputs):
    names = [k for k, v in inputs.items() if v is not None]
    return names, [inputs[k].clone().requires_grad_() for k in names]


@pytest.fixture(params=["eager", "custom_ops"])
def path(request, monkeypatch):
    if request.param == "custom_ops":
        monkeypatch.setattr(_eager, "eager", lambda *tensors: False)
    return request.param


@pytest.fixture
def plain(monkeypatch):
    """The plain PyTorch CPU path (no Triton interpreter)."""
    monkeypatch.setattr(_launch, "_INTERPRETED", False)


# --------------------------------------------------------------------------------------------
# 1. Double backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpreted", [False, True])
def test_gradient_penalty_reaches_the_weights(interpreted, path, monkeypatch):
    """R1-style penalty ‖∂y/∂x‖²: its gradient in every weight, against the float64 reference."""
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted and _launch._INTERPRETED)
    inputs = _inputs(**CASES["drconv-spatial-groups2"][0])
    names, leaves = _leaves(inputs)

    def penalty_grads(fn):
        tensors = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(**dict(zip(names, tensors)))
        gx, = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), **F64).reshape(y.shape)).sum(),
                                  tensors[0], create_graph=True)
        assert gx.requires_grad
        return torch.autograd.grad(gx.square().sum(), tensors[1:], allow_unused=True, materialize_grads=True)

    for name, got, want in zip(names[1:], penalty_grads(_op(2)), penalty_grads(_reference(2))):
        if name != "guide":  # the reference's straight-through surrogate has no second derivative
            assert_close(got, want, torch.float64, name)


# Each case on one path (both paths share every body but the dispatch; the penalty test runs both).
@pytest.mark.parametrize(("case", "path"), [("condconv-groups1", "eager"), ("odconv-groups2", "custom_ops"),
                                            ("drconv-groups1", "custom_ops"), ("drconv-spatial-groups2", "eager")],
                         indirect=["path"])
def test_gradgradcheck_plain_path(case, path, plain):
    kwargs, groups = CASES[case]
    names, leaves = _leaves(_inputs(B=1, **kwargs))
    assert torch.autograd.gradgradcheck(_positional(_op(groups), names), leaves, fast_mode=True)


# One case per path: the interpreter is slow, and the plain path checks every case on both.
@pytest.mark.parametrize(("case", "path"), [("condconv-groups1", "custom_ops"), ("drconv-spatial-groups2", "eager")],
                         indirect=["path"])
def test_gradgradcheck_interpreter(case, path):
    if not _launch._INTERPRETED:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=0)")
    kwargs, groups = CASES[case]
    names, leaves = _leaves(_inputs(B=1, **kwargs))
    assert torch.autograd.gradgradcheck(_positional(_op(groups), names), leaves, fast_mode=True)


# --------------------------------------------------------------------------------------------
# 2. Forward-mode AD and torch.func
# --------------------------------------------------------------------------------------------

def test_forward_and_reverse_ad_agree_with_finite_differences(plain):
    """gradcheck's forward-mode check exercises the jvp rule (no guide: its gradient is an estimator).
    Batched gradients are torch.func's business (below): gradcheck's own batching is the legacy vmap."""
    kwargs, groups = CASES["odconv-groups2"]
    names, leaves = _leaves(_inputs(**kwargs))
    assert torch.autograd.gradcheck(_positional(_op(groups), names), leaves, check_forward_ad=True,
                                    check_batched_grad=False, check_batched_forward_grad=False, fast_mode=True)


def _positional_only(step):
    def call(*args, **kwargs):
        assert not kwargs, f"keywords {sorted(kwargs)} reach a Function.apply: torch 2.11's functorch rejects them"
        return step(*args)
    return call


@pytest.mark.parametrize("interpreted", [False, True])
def test_torch_func_transforms_match_the_reference(interpreted, monkeypatch):
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted and _launch._INTERPRETED)
    # torch 2.13 passes keywords through Function.apply under the transforms; the GPU machines'
    # torch 2.11 raised TypeError there (first GPU run): hold the steps to 2.11's rule.
    monkeypatch.setattr(ops, "_EAGER_STEPS", ops._EAGER_STEPS._replace(
        **{name: _positional_only(step) for name, step in ops._EAGER_STEPS._asdict().items()}))
    kwargs, groups = CASES["drconv-spatial-groups2"]
    inputs = _inputs(B=1, **kwargs)
    names = [k for k, v in inputs.items() if v is not None]
    args = tuple(inputs[k] for k in names)
    op, ref = _positional(_op(groups), names), _positional(_reference(groups), names)
    argnums = tuple(range(len(args)))
    tangents = tuple(torch.randn_like(a) for a in args)

    y, tangent = jvp(op, args, tangents)
    y_ref, tangent_ref = jvp(ref, args, tangents)
    assert tangent.abs().max() > 0
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(tangent, tangent_ref, torch.float64, "jvp")

    cotangent = torch.randn_like(y)
    for name, got, want in zip(names, vjp(op, *args)[1](cotangent), vjp(ref, *args)[1](cotangent)):
        assert_close(got, want, torch.float64, f"vjp {name}")
    for name, got, want in zip(names, grad(lambda *a: op(*a).square().sum(), argnums)(*args),
                               grad(lambda *a: ref(*a).square().sum(), argnums)(*args)):
        assert_close(got, want, torch.float64, f"grad {name}")
    if interpreted:
        return  # full Jacobians are many kernel launches: the plain path checks them
    for name, got, want in zip(names, jacrev(op, argnums)(*args), jacrev(ref, argnums)(*args)):
        assert_close(got, want, torch.float64, f"jacrev {name}")
    for name, got, want in zip(names, jacfwd(op, argnums)(*args), jacfwd(ref, argnums)(*args)):
        assert_close(got, want, torch.float64, f"jacfwd {name}")
    # Second order through transforms: the Hessian of a scalar in x.
    hessian = jacfwd(jacrev(lambda x: op(x, *args[1:]).square().sum()))(args[0])
    hessian_ref = jacfwd(jacrev(lambda x: ref(x, *args[1:]).square().sum()))(args[0])
    assert_close(hessian, hessian_ref, torch.float64, "hessian")


@pytest.mark.parametrize("vmapped", ["x", "experts", "routing", "bias", "spatial", "guide"])
def test_vmap_over_any_argument(vmapped, plain):
    """A vmapped per-sample tensor folds into the batch; vmapped experts or bias loop."""
    kwargs, groups = CASES["drconv-spatial-groups2"]
    inputs = _inputs(**kwargs)
    names = [k for k, v in inputs.items() if v is not None]
    stacked = torch.stack([torch.randn_like(inputs[vmapped]) for _ in range(3)])
    in_dims = tuple(0 if k == vmapped else None for k in names)
    args = tuple(stacked if k == vmapped else inputs[k] for k in names)
    got = vmap(_positional(_op(groups), names), in_dims)(*args)
    want = torch.stack([_op(groups)(**{**inputs, vmapped: s}) for s in stacked])
    assert_close(got, want, torch.float64, f"vmap over {vmapped}")


# --------------------------------------------------------------------------------------------
# 3. Empty problems, 6. meta tensors, 9. NaN guide logits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpreted", [False, True])
@pytest.mark.parametrize("shape", [dict(B=0), dict(B=0, m=2, guide=True, spatial=True), dict(Cin=0, groups=1),
                                   dict(Cin=0, m=2, guide=True, spatial=True)])
def test_empty_problems(shape, interpreted, path, monkeypatch, nan_poison):
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted and _launch._INTERPRETED)
    for module, entry in ((kernels, "expert_conv_forward"), (input_grad_kernels, "expert_conv_backward_input"),
                          (weight_grad_kernels, "expert_conv_backward_kernel"),
                          (guide_kernels, "expert_conv_guide_scores")):
        monkeypatch.setattr(module, entry, lambda *a, **k: pytest.fail("a kernel was launched for nothing"))
    inputs = _inputs(**shape)
    names, leaves = _leaves(inputs)
    y = _op(1)(**dict(zip(names, leaves)))
    assert y.shape == (shape.get("B", 2), 2, 3, 3)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    for name, g, leaf in zip(names, grads, leaves):
        assert g.shape == leaf.shape and not g.isnan().any(), name
        if g.numel() and shape.get("B", 2) == 0:
            assert (g == 0).all(), name
    if shape.get("B", 2) == 0:
        # The public references give the same empty output and zero gradients (the batch-as-groups
        # conv would take zero groups; the mixed bias's reshape could not infer its size).
        for reference in (expert_conv2d_grouped, expert_conv2d_loop):
            ref_leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
            ref_y = reference(**dict(zip(names, ref_leaves)), stride=1, padding=1, dilation=1, groups=1)
            assert ref_y.shape == y.shape, reference.__name__
            for name, g, want in zip(names, torch.autograd.grad(ref_y, ref_leaves, dy, allow_unused=True), grads):
                assert torch.equal(torch.zeros_like(want) if g is None else g, want), (reference.__name__, name)
        return
    # Cin = 0: the mixed bias alone. The reference cannot take zero channels; one zero channel of x
    # and the experts gives the same output and the same routing, bias and spatial gradients.
    padded = {**inputs, "x": torch.zeros(2, 1, 3, 3, **F64), "experts": torch.zeros(2, 2, 1, 3, 3, **F64)}
    ref_names, ref_leaves = _leaves(padded)
    ref_y = _reference(1)(**dict(zip(ref_names, ref_leaves)))
    assert_close(y, ref_y, torch.float64, "y")
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, dy)
    for name, g, want in zip(names, grads, ref_grads):
        if name in ("routing", "bias", "spatial"):
            assert_close(g, want, torch.float64, name)


def test_meta_tensors_give_shapes_on_every_path(monkeypatch):
    inputs = {k: (v.to("meta") if v is not None else None)
              for k, v in _inputs(B=2, Cin=4, Cout=6, H=5, W=4, m=2, groups=2, guide=True, spatial=True).items()}
    names, leaves = _leaves(inputs)
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(_eager, "eager", lambda *tensors: False)
        y = _op(2)(**dict(zip(names, leaves)))
        assert y.device.type == "meta" and y.shape == (2, 6, 5, 4)
        grads = torch.autograd.grad(y, leaves, torch.empty_like(y))
        assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("interpreted", [False, True])
def test_nan_guide_logit_follows_torch_argmax(interpreted, monkeypatch):
    """torch.argmax counts NaN as the maximum (first index wins): that pixel takes the NaN's region."""
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted and _launch._INTERPRETED)
    inputs = _inputs(m=2, guide=True)
    inputs["guide"][0, 1, 1, 1] = float("nan")
    inputs["guide"][1, :, 2, 0] = float("nan")
    y = _op(1)(**inputs)
    clean = {**inputs, "guide": torch.nan_to_num(inputs["guide"], nan=1e9)}  # the same argmax, no NaN
    assert torch.equal(inputs["guide"].argmax(1), clean["guide"].argmax(1))
    assert not y.isnan().any()
    assert_close(y, _reference(1)(**clean), torch.float64, "y")
    assert_close(_reference(1)(**inputs), _reference(1)(**clean), torch.float64, "reference")
