"""Issue 11 for the family-1 ops (involution, dynamic_dwconv2d): derivatives of every order and
forward mode (autograd and torch.func), empty and meta tensors, on every path: the plain CPU path
(shift-and-add), the Triton kernels (interpreter), and the custom ops that torch.compile sees.

Everything is checked in float64 against the unfold formulation, which plain autograd
differentiates to any order. The interpreter runs ~0.1 s per launch, so its cases are the few
that reach different kernel calls; the plain path covers the rest."""
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwad

import dynconv
from dynconv.kernels import _launch
from dynconv.ops import _eager
from dynconv.reference import involution_unfold
from helpers import assert_close

F64 = torch.float64

# path -> (kernels through the interpreter, eager path allowed)
PATHS = {"plain": (False, True), "plain-custom-op": (False, False),
         "interpreter": (True, True), "interpreter-custom-op": (True, False)}


def _take(path, monkeypatch):
    interpreted, eager = PATHS[path]
    monkeypatch.setattr(_launch, "_INTERPRETED", interpreted)
    if not eager:
        monkeypatch.setattr(_eager, "eager", lambda *tensors: False)


def _problem(op, device, B=1, C=2, H=3, W=4, K=2):
    """(function, unfold reference, float64 inputs, output size) for a small problem with uneven
    geometry."""
    def t(*shape):
        return torch.randn(*shape, dtype=F64, device=device)

    if op == "involution":
        kwargs = dict(stride=(1, 2), padding=(1, 0))
        out = (H + 2 - K + 1, (W - K) // 2 + 1)
        inputs = dict(x=t(B, C, H, W), weight=t(B, 1, K, K, *out))
    else:
        kwargs = dict(dilation=(2, 1))  # the default padding is (K - 1, (K - 1) // 2)
        out = (H, W + 2 * ((K - 1) // 2) - K + 1)
        inputs = dict(x=t(B, C, H, W), weight=t(B, C or 1, K, K), bias=t(B, C))
    fn = getattr(dynconv, op)
    return (lambda *a: fn(*a, **kwargs)), (lambda *a: involution_unfold(*a, **kwargs)), inputs, out


def _leaves(inputs):
    return [v.detach().clone().requires_grad_() for v in inputs.values()]


def _penalty_grads(fn, leaves):
    """Gradients of a gradient penalty (WGAN-GP, R1): first derivatives kept in the graph, then
    differentiated again."""
    y = fn(*leaves)
    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    firsts = torch.autograd.grad(y, leaves, dy, create_graph=True)
    penalty = sum(g.square().sum() for g in firsts) + y.square().sum()
    return torch.autograd.grad(penalty, leaves, allow_unused=True)


# 1. Second and higher-order derivatives -------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_a_gradient_penalty_reaches_every_input(op, path, device, monkeypatch, nan_poison):
    fn, reference, inputs, _ = _problem(op, device)
    expected = _penalty_grads(reference, _leaves(inputs))
    _take(path, monkeypatch)
    actual = _penalty_grads(fn, _leaves(inputs))
    for name, a, e in zip(inputs, actual, expected):
        assert_close(a, e, F64, f"penalty grad {name}")


@pytest.mark.parametrize("path", ["plain", "plain-custom-op", "interpreter"])
@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_gradgradcheck(op, path, device, monkeypatch):
    fn, _, inputs, _ = _problem(op, device)
    _take(path, monkeypatch)
    assert torch.autograd.gradgradcheck(fn, tuple(_leaves(inputs)), fast_mode=path.startswith("interpreter"))


@pytest.mark.parametrize("path", ["plain", "plain-custom-op"])
def test_third_derivatives(path, device, monkeypatch):
    fn, _, inputs, _ = _problem("dynamic_dwconv2d", device)
    _take(path, monkeypatch)

    def first_derivatives(*leaves):
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, torch.ones_like(y).cumsum(-1), create_graph=True)

    assert torch.autograd.gradgradcheck(first_derivatives, tuple(_leaves(inputs)), fast_mode=True)


# 2. Forward mode and torch.func --------------------------------------------------------------

@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_forward_mode_and_batched_gradients_agree_with_finite_differences(op, device, monkeypatch):
    fn, _, inputs, _ = _problem(op, device)
    _take("plain", monkeypatch)
    assert torch.autograd.gradcheck(fn, tuple(_leaves(inputs)), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("strategy", ["reverse-mode", "forward-mode"])
def test_vectorized_jacobians_and_hessians(strategy, device, monkeypatch, nan_poison):
    fn, reference, inputs, _ = _problem("dynamic_dwconv2d", device)
    primals = tuple(inputs.values())
    _take("plain", monkeypatch)
    jacobian = torch.autograd.functional.jacobian(fn, primals, vectorize=True, strategy=strategy)
    for a, e in zip(jacobian, torch.autograd.functional.jacobian(reference, primals)):
        assert_close(a, e, F64, "jacobian")
    hessian = torch.autograd.functional.hessian(lambda *a: fn(*a).square().sum(), primals, vectorize=True,
                                                outer_jacobian_strategy=strategy)
    expected = torch.autograd.functional.hessian(lambda *a: reference(*a).square().sum(), primals)
    for a, e in zip(torch.utils._pytree.tree_leaves(hessian), torch.utils._pytree.tree_leaves(expected)):
        assert_close(a, e, F64, "hessian")


@pytest.mark.parametrize("path", ["plain", "interpreter"])
@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_jvp_gives_the_tangent(op, path, device, monkeypatch, nan_poison):
    fn, reference, inputs, _ = _problem(op, device)
    primals = tuple(inputs.values())
    tangents = tuple(torch.randn_like(v) for v in primals)
    expected = torch.func.jvp(reference, primals, tangents)
    expected_x_alone = torch.func.jvp(reference, primals, (tangents[0], *map(torch.zeros_like, primals[1:])))[1]
    _take(path, monkeypatch)
    y, ty = torch.func.jvp(fn, primals, tangents)
    assert_close(y, expected[0], F64, "y")
    assert_close(ty, expected[1], F64, "tangent")
    with fwad.dual_level():  # forward AD outside torch.func, one tangent at a time
        dual = fwad.unpack_dual(fn(fwad.make_dual(primals[0], tangents[0]), *primals[1:]))
    assert_close(dual.tangent, expected_x_alone, F64, "tangent of x alone")


@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_a_tangent_the_custom_ops_would_drop_is_refused(op, device, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    fn, _, inputs, _ = _problem(op, device)
    _take("plain", monkeypatch)
    primals = list(inputs.values())
    with fwad.dual_level():
        dual = fwad.make_dual(primals[0], torch.ones_like(primals[0]))
        with PassThrough(), pytest.raises(NotImplementedError, match="forward-mode AD under a dispatch mode"):
            fn(dual, *primals[1:])
        with PassThrough():
            fn(*primals)  # no tangent: nothing to refuse


def _func_transforms(fn, inputs):
    """Every torch.func transform of ``fn`` on ``inputs`` (float64), as a flat dict of tensors."""
    primals = tuple(inputs.values())
    argnums = tuple(range(len(primals)))
    loss = lambda *a: fn(*a).square().sum()  # noqa: E731
    results = {"grad": torch.func.grad(loss, argnums)(*primals)}
    y, vjp_fn = torch.func.vjp(fn, *primals)
    results["vjp"] = vjp_fn(torch.ones_like(y).cumsum(-1))
    results["jacrev"] = torch.func.jacrev(fn, argnums)(*primals)
    results["jacfwd"] = torch.func.jacfwd(fn, argnums)(*primals)
    results["hessian"] = torch.func.hessian(loss, argnums[:2])(*primals)
    stacked = [torch.stack([v, v.flip(0).cos()], 1) for v in primals]  # vmapped along dim 1
    results["vmap"] = torch.func.vmap(fn, in_dims=(1, *[None] * (len(primals) - 1)))(stacked[0], *primals[1:])
    results["vmap-all"] = torch.func.vmap(fn, in_dims=1)(*stacked)
    results["vmap-of-grad"] = torch.func.vmap(torch.func.grad(loss), in_dims=(1, *[None] * (len(primals) - 1)))(
        stacked[0], *primals[1:])
    return dict(torch.utils._pytree.tree_flatten_with_path(results)[0])


@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_torch_func_transforms_agree_with_the_reference(op, device, monkeypatch, nan_poison):
    fn, reference, inputs, _ = _problem(op, device, B=2)
    expected = _func_transforms(reference, inputs)
    _take("plain", monkeypatch)
    actual = _func_transforms(fn, inputs)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key], expected[key], F64, torch.utils._pytree.keystr(key))


def test_torch_func_on_the_kernels(device, monkeypatch, nan_poison):
    """Each Function's vmap rule through the kernels: a vmapped vjp (backward ops) and a vmapped
    jvp (forward op), two cotangents / tangents each."""
    fn, reference, inputs, _ = _problem("dynamic_dwconv2d", device)
    primals = tuple(inputs.values())
    y = reference(*primals)
    cotangents = torch.randn(2, *y.shape, dtype=F64, device=device)
    tangents = [torch.randn(2, *v.shape, dtype=F64, device=device) for v in primals]

    def vmapped(f):
        return (torch.func.vmap(torch.func.vjp(f, *primals)[1])(cotangents),
                torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t)[1])(*tangents))

    expected = vmapped(reference)
    _take("interpreter", monkeypatch)
    actual = vmapped(fn)
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        assert_close(a, e, F64, "vmapped")


# 3. Empty tensors ------------------------------------------------------------------------------

EMPTY = {"B=0": dict(B=0), "C=0": dict(C=0), "H=0": dict(H=0, K=1), "W=0": dict(W=0, K=1)}


@pytest.mark.parametrize("path", ["plain", "interpreter", "interpreter-custom-op"])
@pytest.mark.parametrize("empty", EMPTY)
@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_empty_tensors_give_empty_outputs_and_zero_gradients(op, empty, path, device, monkeypatch, nan_poison):
    fn, _, inputs, out = _problem(op, device, **EMPTY[empty])
    if empty in ("H=0", "W=0"):
        inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    _take(path, monkeypatch)
    leaves = _leaves(inputs)
    y = fn(*leaves)
    assert y.shape == (*inputs["x"].shape[:2], *out) and y.dtype == F64
    assert not y.isnan().any() and (op == "dynamic_dwconv2d" or not y.any())
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y), create_graph=True)
    for name, leaf, g in zip(inputs, leaves, grads):
        assert g.shape == leaf.shape and not g.isnan().any() and not g.any(), name
    for name, g in zip(inputs, _penalty_grads(fn, leaves)):
        assert g is None or not g.any(), name
    ty = torch.func.jvp(fn, tuple(inputs.values()), tuple(torch.ones_like(v) for v in inputs.values()))[1]
    assert ty.shape == y.shape


def test_an_empty_image_under_padding_gives_the_bias(device, monkeypatch, nan_poison):
    x, weight, bias = torch.randn(1, 2, 0, 3, dtype=F64), torch.randn(1, 2, 1, 1, dtype=F64), torch.randn(1, 2, dtype=F64)
    for path in ("plain", "interpreter"):
        _take(path, monkeypatch)
        y = dynconv.dynamic_dwconv2d(x, weight, bias, padding=1)
        assert y.shape == (1, 2, 2, 5)
        assert torch.equal(y, bias[:, :, None, None].expand(1, 2, 2, 5))


# 6. Meta tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["involution", "dynamic_dwconv2d"])
def test_meta_tensors_give_shapes_on_every_path(op, path, device, monkeypatch):
    fn, _, inputs, _ = _problem(op, device)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    real = fn(*inputs.values())
    _take(path, monkeypatch)
    leaves = [v.to("meta").requires_grad_() for v in inputs.values()]
    y = fn(*leaves)
    assert (y.device.type, y.shape, y.stride()) == ("meta", real.shape, real.stride())
    grads = torch.autograd.grad(y, leaves, torch.empty_like(y), create_graph=True)
    assert [g.shape for g in grads] == [v.shape for v in leaves]
    assert all(g.is_meta for g in grads)


# 9. Small ones ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["plain", "plain-custom-op"])
def test_a_weight_with_no_taps_is_named_as_such(path, monkeypatch):
    _take(path, monkeypatch)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"kernel size K must be >= 1, got a weight of shape \(1, 2, 0, 0\)"):
        dynconv.dynamic_dwconv2d(x, torch.randn(1, 2, 0, 0))
    with pytest.raises(ValueError, match=r"kernel size K must be >= 1"):
        dynconv.involution(x, torch.randn(1, 1, 0, 0, 4, 4))
    with pytest.raises(ValueError, match=r"kernel size K must be >= 1"):
        dynconv.dynamic_dwconv2d(x, torch.randn(1, 2, 0, 0), padding=0)


@pytest.mark.parametrize("path", ["plain", "plain-custom-op"])
def test_numpy_integers_are_integers(path, monkeypatch):
    _take(path, monkeypatch)
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 3, 3)
    expected = dynconv.dynamic_dwconv2d(x, weight, stride=2, padding=1, dilation=(1, 2))
    for kind in (np.int64, np.int32, np.uint8):
        actual = dynconv.dynamic_dwconv2d(x, weight, stride=kind(2), padding=(kind(1), 1),
                                          dilation=(np.int16(1), kind(2)))
        assert torch.equal(actual, expected)
    w6 = torch.randn(1, 1, 3, 3, 3, 3)
    assert torch.equal(dynconv.involution(x, w6, stride=np.int64(2), padding=np.int8(1)),
                       dynconv.involution(x, w6, stride=2, padding=1))
    for bad in (True, np.bool_(True), 2.0, np.float64(2), (1, True), (1, np.bool_(False))):
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            dynconv.dynamic_dwconv2d(x, weight, stride=bad)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        dynconv.dynamic_dwconv2d(x, weight, padding=np.int64(-1))
