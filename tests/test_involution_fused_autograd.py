"""dynconv.involution_fused beyond first-order eager autograd (issue 11): double backward,
forward-mode AD and torch.func, empty tensors and meta tensors, on every path.

The paths: "plain" (CPU tensors, span conv + shift-and-add), "triton" (the kernels; on CPU through
the interpreter) and "custom_op" (the torch.library ops torch.compile sees, forced here in eager
mode). Finite-difference checks (gradcheck, gradgradcheck) run on the plain and custom-op paths,
where an evaluation costs microseconds; the kernels, whose every interpreted launch costs a fraction
of a second, are compared term by term against the float64 reference's own autograd instead. Both
run the same derivative rules, which are built from the same four maps.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func
from torch.autograd import gradcheck, gradgradcheck

import dynconv
from dynconv.kernels import _launch
from dynconv.kernels import involution_fused as kernels
from dynconv.ops import _eager
from dynconv.reference import involution_fused_reference
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("nan_poison")

LAUNCHERS = ("forward_launch", "backward_input_launch", "backward_z_launch", "backward_span_launch")


def _take(path, monkeypatch):
    """Route dynconv.involution_fused through ``path``."""
    if path in ("plain", "custom_op"):
        monkeypatch.setattr(_launch, "_INTERPRETED", False)
        for name in LAUNCHERS:
            monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("a Triton kernel ran on the CPU path"))
    if path == "custom_op":
        monkeypatch.setattr(_eager, "eager", lambda *tensors: False)


def _problem(B=1, C=4, H=5, W=4, K=3, G=2, R=2, stride=1, device="cpu", dtype=torch.float64):
    """(x, z, span_weight, span_bias) and the op as a function of them."""
    padding = (K - 1) // 2
    Ho, Wo = (H + 2 * padding - K) // stride + 1, (W + 2 * padding - K) // stride + 1
    kw = dict(device=device, dtype=dtype)
    args = (torch.randn(B, C, H, W, **kw), torch.randn(B, R, Ho, Wo, **kw),
            torch.randn(K * K * G, R, **kw) / R ** 0.5, torch.randn(K * K * G, **kw))
    geometry = dict(kernel_size=K, groups=G, stride=stride, padding=padding)

    def op(x, z, span_weight, span_bias):
        return dynconv.involution_fused(x, z, span_weight, span_bias, **geometry)

    def reference(x, z, span_weight, span_bias):
        return involution_fused_reference(x, z, span_weight, span_bias, **geometry)

    return args, op, reference


def _leaves(args):
    return tuple(a.detach().clone().requires_grad_() for a in args)


# ---------------------------------------------------------------------------------------------
# 1. Double backward: every gradient is differentiable again, through the same four maps.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2-oddH"])
@pytest.mark.parametrize("path", ["plain", "custom_op"])
def test_gradcheck_and_gradgradcheck(path, stride, monkeypatch):
    _take(path, monkeypatch)
    args, op, _ = _problem(stride=stride)
    leaves = _leaves(args)
    forward_ad = path == "plain"  # the custom ops have no forward-mode rule; torch.func takes the Functions
    assert gradcheck(op, leaves, check_forward_ad=forward_ad)
    assert gradgradcheck(op, leaves, check_fwd_over_rev=forward_ad, fast_mode=True)


def test_gradgradcheck_through_the_interpreter():
    """The Triton kernels' derivatives of every order, by finite differences (fast mode; the
    smallest problem that still has border taps: one channel group, R = 1, a 3x3 image)."""
    if not _launch._INTERPRETED:
        pytest.skip("needs the Triton kernels (TRITON_INTERPRET=1 or a GPU)")
    args, op, _ = _problem(C=2, H=3, W=3, G=1, R=1)
    assert gradgradcheck(op, _leaves(args), fast_mode=True)


def _second_order(fn, args, directions):
    """Gradients of a gradient penalty ⟨∂⟨v, fn⟩/∂args, u⟩ with respect to args and v: each
    first-order map's derivative in every one of its inputs, weighted by random directions."""
    leaves = _leaves(args)
    y = fn(*leaves)
    v = directions[0].clone().requires_grad_()
    grads = torch.autograd.grad(y, leaves, v, create_graph=True)
    assert all(g.requires_grad for g in grads), "a first-order gradient was detached"
    penalty = sum((g * u).sum() for g, u in zip(grads, directions[1:]))
    return (y, *grads, *torch.autograd.grad(penalty, (*leaves, v)))


def test_second_order_kernels_match_the_reference(device):
    args, op, reference = _problem(C=2, H=4, W=4, G=1, device=device)
    y = reference(*args)
    directions = [torch.randn_like(t) for t in (y, *args)]
    names = ["y", "dx", "dz", "dspan_w", "dspan_b", "d2x", "d2z", "d2span_w", "d2span_b", "d2v"]
    expected = _second_order(reference, [a.cpu() for a in args], [d.cpu() for d in directions])
    for name, actual, want in zip(names, _second_order(op, args, directions), expected):
        assert_close(actual, want, torch.float64, name)


def test_gradient_penalty_reaches_the_span_weight(device):
    """The WGAN-GP pattern of the issue: a penalty on dL/dx trains span_weight."""
    args, op, reference = _problem(C=2, H=4, W=4, G=1, device=device)
    results = []
    for fn, tensors in ((op, args), (reference, [a.cpu() for a in args])):
        x, z, span_w, span_b = _leaves(tensors)
        gx, = torch.autograd.grad(fn(x, z, span_w, span_b).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), span_w)[0])
    assert results[1].abs().max() > 0
    assert_close(results[0], results[1], torch.float64, "penalty gradient")


HALO_KERNELS = {"fused_fwd_halo_kernel", "fused_bwd_input_halo_kernel", "fused_bwd_z_halo_kernel",
                "fused_bwd_span_halo_kernel"}


def test_fp32_on_the_halo_kernels_at_second_order_and_in_forward_mode(device, monkeypatch):
    """fp32 with torch's tf32 switch on runs every derivative, of every order and in forward mode,
    on the tensor-core halo kernels (in plain tf32 on a GPU; the interpreter multiplies exactly)."""
    launched = []
    launch = _launch.Launch.__call__
    monkeypatch.setattr(_launch.Launch, "__call__", lambda self, *a, **k: (launched.append(self.name),
                                                                           launch(self, *a, **k))[1])
    args, op, reference = _problem(B=2, C=32, H=6, W=7, K=3, G=2, R=20, device=device)
    cpu = [a.cpu() for a in args]
    args = [a.float() for a in args]
    tolerance = torch.float16 if device == "cuda" else torch.float32
    directions = [torch.randn_like(t) for t in (reference(*cpu), *cpu)]
    names = ["y", "dx", "dz", "dspan_w", "dspan_b", "d2x", "d2z", "d2span_w", "d2span_b", "d2v"]
    expected = _second_order(reference, cpu, directions)
    tangents = [torch.randn_like(a) for a in cpu]
    with _launch.conv_tf32(True):
        actual = _second_order(op, args, [d.float().to(device) for d in directions])
        _, tangent = func.jvp(op, tuple(args), tuple(t.float().to(device) for t in tangents))
    for name, got, want in zip(names, actual, expected):
        assert_close(got, want, tolerance, name)
    assert_close(tangent, func.jvp(reference, tuple(cpu), tuple(tangents))[1], tolerance, "jvp")
    assert HALO_KERNELS <= set(launched), launched
    assert not {name for name in launched if name.startswith("fused_") and "halo" not in name}, launched


# ---------------------------------------------------------------------------------------------
# 2. Forward-mode AD and torch.func
# ---------------------------------------------------------------------------------------------

def _assert_all_close(actual, expected, name):
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_all_close(a, e, f"{name}[{i}]")
    else:
        assert_close(actual, expected, torch.float64, name)


def test_torch_func_transforms_match_the_reference(monkeypatch):
    """grad, vjp, jvp, jacrev, jacfwd (every argument), vmap (batched per-sample tensors, a batched
    span weight, a batched dimension other than 0) and second-order compositions."""
    _take("plain", monkeypatch)
    args, op, reference = _problem(C=2, H=3, W=3, G=1)
    every = (0, 1, 2, 3)

    def loss(fn):
        return lambda *a: fn(*a).square().sum()

    checks = {
        "grad": lambda fn: func.grad(loss(fn), argnums=every)(*args),
        "jvp": lambda fn: func.jvp(fn, args, tangents),
        "vjp": lambda fn: func.vjp(fn, *args)[1](cotangent),
        "jacrev": lambda fn: func.jacrev(fn, argnums=every)(*args),
        "jacfwd": lambda fn: func.jacfwd(fn, argnums=every)(*args),
        "vmap x, z": lambda fn: func.vmap(fn, (0, 1, None, None))(stacked[0], stacked[1].movedim(0, 1), *args[2:]),
        "vmap span": lambda fn: func.vmap(fn, (None, None, 2, 0))(*args[:2], stacked[2].movedim(0, 2), stacked[3]),
        "hessian span_w": lambda fn: func.hessian(lambda w: loss(fn)(args[0], args[1], w, args[3]))(args[2]),
        "jvp of grad": lambda fn: func.jvp(func.grad(loss(fn), argnums=every), args, tangents),
        "vmap of grad": lambda fn: func.vmap(func.grad(loss(lambda x, *a: fn(x[None], *a))), (0, None, None, None))(
            args[0].expand(3, *args[0].shape[1:]), *args[1:]),
    }
    tangents = tuple(torch.randn_like(a) for a in args)
    cotangent = torch.randn_like(reference(*args))
    stacked = [torch.randn(3, *a.shape, dtype=a.dtype) for a in args]
    for name, check in checks.items():
        _assert_all_close(check(op), check(reference), name)


def test_forward_ad_agrees_with_finite_differences(monkeypatch):
    _take("plain", monkeypatch)
    args, op, _ = _problem(C=2, H=3, W=4, G=1, stride=2)
    assert gradcheck(op, _leaves(args), check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("path", ["triton", "plain"])
def test_forward_ad_and_torch_func_on_every_path(path, device, monkeypatch):
    """jvp (torch.func and torch.autograd.forward_ad), grad and vmap through the kernels."""
    if path == "plain":
        if device != "cpu":
            pytest.skip("the plain path is the CPU path")
        _take(path, monkeypatch)
    args, op, reference = _problem(C=2, H=4, W=4, G=1, device=device)
    cpu = [a.cpu() for a in args]
    tangents = [torch.randn_like(a) for a in args]
    _, tangent = func.jvp(op, tuple(args), tuple(tangents))
    assert tangent.abs().max() > 0
    assert_close(tangent, func.jvp(reference, tuple(cpu), tuple(t.cpu() for t in tangents))[1], torch.float64,
                 "jvp")
    with fwAD.dual_level():
        dual = op(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))
        assert_close(fwAD.unpack_dual(dual).tangent, tangent.cpu(), torch.float64, "forward_ad")
    grads = func.grad(lambda *a: op(*a).square().sum(), argnums=(0, 1, 2, 3))(*args)
    expected = func.grad(lambda *a: reference(*a).square().sum(), argnums=(0, 1, 2, 3))(*cpu)
    _assert_all_close(grads, expected, "grad")
    xs, zs = torch.randn(2, *args[0].shape, device=device, dtype=args[0].dtype), torch.randn_like(args[1])
    _assert_all_close(func.vmap(op, (0, None, None, None))(xs, zs, *args[2:]),
                      func.vmap(reference, (0, None, None, None))(xs.cpu(), zs.cpu(), *cpu[2:]), "vmap")


# ---------------------------------------------------------------------------------------------
# 3. Empty tensors and 6. meta tensors: right shapes, zero gradients, no kernel launched.
# ---------------------------------------------------------------------------------------------

# (B, C, H, W, K, padding): no sample; no channel; no input row, but output rows of padding only.
EMPTY = {"B0": (0, 4, 5, 4, 3, 1), "C0": (2, 0, 5, 4, 3, 1), "H0-padded": (1, 2, 0, 3, 1, 1)}


@pytest.mark.parametrize("case", EMPTY)
@pytest.mark.parametrize("path", ["plain", "triton", "custom_op"])
def test_empty_tensors(path, case, device, monkeypatch):
    if path == "triton":
        for name in LAUNCHERS:
            monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("a kernel launched on an empty problem"))
    elif device != "cpu":
        pytest.skip("the plain path is the CPU path")
    else:
        _take(path, monkeypatch)
    B, C, H, W, K, padding = EMPTY[case]
    G, R = (2 if C else 1), 3
    Ho, Wo = H + 2 * padding - K + 1, W + 2 * padding - K + 1
    kw = dict(device=device, dtype=torch.float32)
    x, z, span_w, span_b = _leaves((torch.randn(B, C, H, W, **kw), torch.randn(B, R, Ho, Wo, **kw),
                                    torch.randn(K * K * G, R, **kw), torch.randn(K * K * G, **kw)))
    y = dynconv.involution_fused(x, z, span_w, span_b, K, G, padding=padding)
    assert y.shape == (B, C, Ho, Wo)
    grads = torch.autograd.grad(y, (x, z, span_w, span_b), torch.ones_like(y), create_graph=True)
    for grad, t in zip(grads, (x, z, span_w, span_b)):
        assert grad.shape == t.shape and torch.equal(grad, torch.zeros_like(t))
    penalty = sum(g.square().sum() for g in grads)
    if penalty.requires_grad:
        for grad, t in zip(torch.autograd.grad(penalty, (x, z, span_w, span_b), allow_unused=True,
                                               materialize_grads=True), (x, z, span_w, span_b)):
            assert grad.shape == t.shape and torch.equal(grad, torch.zeros_like(t))
    if path != "custom_op":
        primals = tuple(t.detach() for t in (x, z, span_w, span_b))

        def op(*a):
            return dynconv.involution_fused(*a, K, G, padding=padding)

        _, tangent = func.jvp(op, primals, tuple(torch.ones_like(t) for t in primals))
        assert tangent.shape == y.shape and torch.equal(tangent, torch.zeros_like(tangent))
        # An empty y makes jacrev vmap over nothing.
        for jacobian, t in zip(func.jacrev(op, argnums=(0, 1, 2, 3))(*primals), primals):
            assert jacobian.shape == (*y.shape, *t.shape) and not jacobian.ne(0).any()


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("path", ["plain", "triton", "custom_op"])
def test_meta_tensors_give_shapes(path, fmt, monkeypatch):
    if path != "triton":
        _take(path, monkeypatch)
    memory_format = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    kw = dict(device="meta", dtype=torch.float16)
    x = torch.empty(2, 8, 7, 6, **kw).to(memory_format=memory_format).requires_grad_()
    z = torch.empty(2, 3, 4, 3, **kw).to(memory_format=memory_format).requires_grad_()
    span_w = torch.empty(18, 3, **kw).requires_grad_()
    span_b = torch.empty(18, **kw).requires_grad_()
    y = dynconv.involution_fused(x, z, span_w, span_b, 3, 2, stride=2)
    assert y.shape == (2, 8, 4, 3) and y.is_meta and y.is_contiguous(memory_format=memory_format)
    grads = torch.autograd.grad(y, (x, z, span_w, span_b), torch.ones_like(y))
    assert [g.shape for g in grads] == [t.shape for t in (x, z, span_w, span_b)]
    assert grads[0].is_contiguous(memory_format=memory_format)
