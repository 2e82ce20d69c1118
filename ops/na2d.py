"""torch ops for neighbourhood attention (docs/operators.md §1c): ``dynconv.na2d`` (fused) and the
unfused pair ``dynconv.na2d_qk`` / ``dynconv.na2d_av``.

Registered with torch.library as ``torch.ops.dynconv.na2d`` (returns the output and the
log-sum-exp the backward keeps), ``na2d_backward``, ``na2d_qk``, ``na2d_qk_backward``, ``na2d_av``
and ``na2d_av_backward``, each with a fake implementation and an autograd formula. First derivatives
run the fused backward kernels; derivatives of higher order, tangents (forward AD, torch.func) and
vmap go through the three window products of ``ops/na2d_linear.py``, which are closed under
differentiation. CUDA tensors run the Triton kernels of
``kernels/na2d.py`` (fused for ``na2d``, window gathers for the unfused pair); CPU tensors run the
tap loop of ``ops/reference_na2d.py``, or the Triton kernels through the interpreter when
TRITON_INTERPRET=1 was set before import. Plain eager calls go through autograd.Functions around
the same bodies (``ops/_eager.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from dynconv.kernels import na2d as kernels
from dynconv.kernels import na2d_pair as pair_kernels
from dynconv.kernels._launch import runs_kernels

from . import _eager
from . import na2d_linear as linear
from . import reference_na2d as reference
from ._checks import as_pair, autocast_inputs, check_dtypes_and_devices, check_tensor

WINDOWS = reference.WINDOWS
_LAYOUT = "(B, H, W, heads, D)"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Checks: every bad input is named before a kernel runs.
# ---------------------------------------------------------------------------------------------

def _check_kernel_size(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, torch.SymInt)):
        raise TypeError(f"kernel_size must be an int, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1 (the query needs a centre tap), got {kernel_size}")
    return kernel_size


def _check_window(window) -> str:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    return window


def _check_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if name == "rpb":
            if t is not None:
                check_tensor(t, "rpb", 3, "(heads, 2K-1, 2K-1)")
        elif name == "attn":
            check_tensor(t, "attn", 6, "(B, H, W, heads, K, K)")
        else:
            check_tensor(t, name, 5, _LAYOUT)
    check_dtypes_and_devices(**tensors)


def _geometry(shape, others: tuple, rpb_shape, attn_shape, K: int, dilation, window: str):
    """The checks that need only shapes (ranks checked); returns the dilation pair.

    ``others`` holds (name, shape) of the tensors that must match ``shape`` (q's, or v's for na2d_av)."""
    B, H, W, heads, D = shape
    for name, other in others:
        if tuple(other) != tuple(shape):
            raise ValueError(f"{name} must have the shape of q {tuple(shape)}, got {tuple(other)}")
    dilation = as_pair(dilation, "dilation", 1)
    reference.check_window_fits(H, W, K, dilation, window)
    if rpb_shape is not None and tuple(rpb_shape) != (heads, 2 * K - 1, 2 * K - 1):
        raise ValueError(f"rpb must have shape (heads, 2K-1, 2K-1) = {(heads, 2 * K - 1, 2 * K - 1)}, "
                         f"got {tuple(rpb_shape)}")
    if attn_shape is not None and tuple(attn_shape) != (B, H, W, heads, K, K):
        raise ValueError(f"attn must have shape (B, H, W, heads, K, K) = {(B, H, W, heads, K, K)} to match v "
                         f"and kernel_size, got {tuple(attn_shape)}")
    return dilation


_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry)


def _shape(t):
    return None if t is None else tuple(t.shape)


# ---------------------------------------------------------------------------------------------
# Bodies: the custom ops and the eager autograd.Functions run these.
# ---------------------------------------------------------------------------------------------

def _forward(q, k, v, rpb, K, dilation, scale, window):
    if runs_kernels(q):
        B, H, W, heads, _ = q.shape
        y = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        lse = torch.empty((B, H, W, heads), dtype=_lse_dtype(q.dtype), device=q.device)
        kernels.na2d_forward(q, k, v, rpb, y, lse, K, dilation, scale, window == "neighborhood")
        return y, lse
    y, lse = reference.na2d_taps(q, k, v, K, dilation, rpb, scale, window)
    return y.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


def _backward(grad, q, k, v, rpb, y, lse, K, dilation, scale, window):
    """(dq, dk, dv, drpb); drpb is (heads, 2K-1, 2K-1) even without rpb (then unused)."""
    heads = q.shape[3]
    if runs_kernels(q):
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        drpb = torch.empty((heads, 2 * K - 1, 2 * K - 1), dtype=q.dtype, device=q.device)
        kernels.na2d_backward(grad, q, k, v, rpb, y, lse, dq, dk, dv, drpb, K, dilation, scale,
                              window == "neighborhood")
        return dq, dk, dv, drpb
    grads = reference.na2d_taps_backward(grad, q, k, v, rpb, y, lse, K, dilation, scale, window)
    return tuple(g.contiguous() for g in grads)


def _qk(q, k, rpb, K, dilation, window):
    if runs_kernels(q):
        scores = torch.empty((*q.shape[:4], K, K), dtype=q.dtype, device=q.device)
        pair_kernels.na2d_qk_forward(q, k, rpb, scores, K, dilation, window == "neighborhood")
        return scores
    return reference.na2d_qk_taps(q, k, K, dilation, rpb, window).contiguous()


def _qk_backward(grad, q, k, K, dilation, window, rpb_grad):
    """(dq, dk, drpb); drpb is (heads, 2K-1, 2K-1) zeros unless ``rpb_grad``."""
    if runs_kernels(q):
        dq, dk = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
        drpb = torch.empty((q.shape[3], 2 * K - 1, 2 * K - 1), dtype=q.dtype, device=q.device)
        pair_kernels.na2d_qk_backward(grad, q, k, dq, dk, drpb if rpb_grad else None, K, dilation,
                                 window == "neighborhood")
        return dq, dk, drpb if rpb_grad else drpb.zero_()
    return tuple(g.contiguous() for g in reference.na2d_qk_taps_backward(grad, q, k, K, dilation, window))


def _av(attn, v, K, dilation, window):
    if runs_kernels(v):
        y = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        pair_kernels.na2d_av_forward(attn, v, y, K, dilation, window == "neighborhood")
        return y
    return reference.na2d_av_taps(attn, v, K, dilation, window).contiguous()


def _av_backward(grad, attn, v, K, dilation, window):
    if runs_kernels(v):
        dattn = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        pair_kernels.na2d_av_backward(grad, attn, v, dattn, dv, K, dilation, window == "neighborhood")
        return dattn, dv
    return tuple(g.contiguous() for g in reference.na2d_av_taps_backward(grad, attn, v, K, dilation, window))


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile, opcheck, fake tensors)
# ---------------------------------------------------------------------------------------------

def _op_check(q, k, v, rpb, kernel_size, dilation, window):
    _check_tensors(q=q, k=k, v=v, rpb=rpb)
    K = _check_kernel_size(kernel_size)
    return K, _geometry(q.shape, (("k", k.shape), ("v", v.shape)), _shape(rpb), None, K, dilation,
                        _check_window(window))


@torch.library.custom_op("dynconv::na2d", mutates_args=())
def na2d_op(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int, dilation: Sequence[int],
            scale: float, window: str) -> tuple[Tensor, Tensor]:
    K, dilation = _op_check(q, k, v, rpb, kernel_size, dilation, window)
    return _forward(q, k, v, rpb, K, dilation, scale, window)


@na2d_op.register_fake
def _(q, k, v, rpb, kernel_size, dilation, scale, window):
    _op_check(q, k, v, rpb, kernel_size, dilation, window)
    return q.new_empty(v.shape), q.new_empty(q.shape[:4], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("dynconv::na2d_backward", mutates_args=())
def na2d_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, y: Tensor, lse: Tensor,
                     kernel_size: int, dilation: Sequence[int], scale: float,
                     window: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad, q, k, v, rpb, y, lse, kernel_size, tuple(dilation), scale, window)


@na2d_backward_op.register_fake
def _(grad, q, k, v, rpb, y, lse, kernel_size, dilation, scale, window):
    R = 2 * kernel_size - 1
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty((q.shape[3], R, R))


@torch.library.custom_op("dynconv::na2d_qk", mutates_args=())
def na2d_qk_op(q: Tensor, k: Tensor, rpb: Tensor | None, kernel_size: int, dilation: Sequence[int],
               window: str) -> Tensor:
    K, dilation = _op_check(q, k, k, rpb, kernel_size, dilation, window)
    return _qk(q, k, rpb, K, dilation, window)


@na2d_qk_op.register_fake
def _(q, k, rpb, kernel_size, dilation, window):
    K, _ = _op_check(q, k, k, rpb, kernel_size, dilation, window)
    return q.new_empty((*q.shape[:4], K, K))


@torch.library.custom_op("dynconv::na2d_qk_backward", mutates_args=())
def na2d_qk_backward_op(grad: Tensor, q: Tensor, k: Tensor, kernel_size: int, dilation: Sequence[int],
                        window: str, rpb_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _qk_backward(grad, q, k, kernel_size, tuple(dilation), window, rpb_grad)


@na2d_qk_backward_op.register_fake
def _(grad, q, k, kernel_size, dilation, window, rpb_grad):
    R = 2 * kernel_size - 1
    return q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty((q.shape[3], R, R))


def _av_check(attn, v, kernel_size, dilation, window):
    _check_tensors(attn=attn, v=v)
    K = _check_kernel_size(kernel_size)
    return K, _geometry(v.shape, (), None, attn.shape, K, dilation, _check_window(window))


@torch.library.custom_op("dynconv::na2d_av", mutates_args=())
def na2d_av_op(attn: Tensor, v: Tensor, kernel_size: int, dilation: Sequence[int], window: str) -> Tensor:
    K, dilation = _av_check(attn, v, kernel_size, dilation, window)
    return _av(attn, v, K, dilation, window)


@na2d_av_op.register_fake
def _(attn, v, kernel_size, dilation, window):
    _av_check(attn, v, kernel_size, dilation, window)
    return v.new_empty(v.shape)


@torch.library.custom_op("dynconv::na2d_av_backward", mutates_args=())
def na2d_av_backward_op(grad: Tensor, attn: Tensor, v: Tensor, kernel_size: int, dilation: Sequence[int],
                        window: str) -> tuple[Tensor, Tensor]:
    return _av_backward(grad, attn, v, kernel_size, tuple(dilation), window)


@na2d_av_backward_op.register_fake
def _(grad, attn, v, kernel_size, dilation, window):
    return attn.new_empty(attn.shape), v.new_empty(v.shape)


def _na2d_setup(ctx, inputs, output):
    q, k, v, rpb, K, dilation, scale, window = inputs
    ctx.geometry = (K, tuple(dilation), scale, window)
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(q, k, v, rpb, *output)


def _na2d_grads(ctx, grad, backward):
    q, k, v, rpb, y, lse = ctx.saved_tensors
    dq, dk, dv, drpb = backward(grad, q, k, v, rpb, y, lse, *ctx.geometry)
    return dq, dk, dv, (drpb if ctx.has_rpb else None)


# A backward that must itself be differentiable (create_graph, or inside torch.func) is written
# with the window products of ops/na2d_linear.py, as Functions (eager) or custom ops (compile).

def _na2d_grads_differentiable(ctx, grad, products):
    q, k, v, rpb, _, _ = ctx.saved_tensors
    K, dilation, scale, window = ctx.geometry
    return linear.na2d_backward(products, grad, q, k, v, rpb, K, dilation, scale, window)


def _na2d_autograd(ctx, grad, grad_lse):
    if torch.is_grad_enabled():
        return (*_na2d_grads_differentiable(ctx, grad, linear.OPS), None, None, None, None)
    return (*_na2d_grads(ctx, grad, na2d_backward_op), None, None, None, None)


def _qk_setup(ctx, inputs, output):
    q, k, rpb, K, dilation, window = inputs
    ctx.geometry = (K, tuple(dilation), window)
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(q, k)


def _qk_grads(ctx, grad, backward):
    q, k = ctx.saved_tensors
    rpb_grad = ctx.has_rpb and ctx.needs_input_grad[2]
    dq, dk, drpb = backward(grad, q, k, *ctx.geometry, rpb_grad)
    return dq, dk, (drpb if rpb_grad else None)


def _qk_grads_differentiable(ctx, grad, products):
    q, k = ctx.saved_tensors
    return linear.qk_backward(products, grad, q, k, *ctx.geometry, ctx.has_rpb and ctx.needs_input_grad[2])


def _qk_autograd(ctx, grad):
    if torch.is_grad_enabled():
        return (*_qk_grads_differentiable(ctx, grad, linear.OPS), None, None, None)
    return (*_qk_grads(ctx, grad, na2d_qk_backward_op), None, None, None)


def _av_setup(ctx, inputs, output):
    attn, v, K, dilation, window = inputs
    ctx.geometry = (K, tuple(dilation), window)
    ctx.save_for_backward(attn, v)


def _av_grads(ctx, grad, backward):
    attn, v = ctx.saved_tensors
    return backward(grad, attn, v, *ctx.geometry)


def _av_grads_differentiable(ctx, grad, products):
    attn, v = ctx.saved_tensors
    return tuple(products[name](a, b, *ctx.geometry) if needed else None
                 for (name, a, b), needed in zip(linear.ADJOINTS["tap_sum"](attn, v, grad), ctx.needs_input_grad))


def _av_autograd(ctx, grad):
    if torch.is_grad_enabled():
        return (*_av_grads_differentiable(ctx, grad, linear.OPS), None, None, None)
    return (*_av_grads(ctx, grad, na2d_av_backward_op), None, None, None)


torch.library.register_autograd("dynconv::na2d", _na2d_autograd, setup_context=_na2d_setup)
torch.library.register_autograd("dynconv::na2d_qk", _qk_autograd, setup_context=_qk_setup)
torch.library.register_autograd("dynconv::na2d_av", _av_autograd, setup_context=_av_setup)


# ---------------------------------------------------------------------------------------------
# The eager path: the same bodies, no dispatcher
# ---------------------------------------------------------------------------------------------

class _NA2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, K, dilation, scale, window):
        y, lse = _forward(q, k, v, rpb, K, dilation, scale, window)
        _na2d_setup(ctx, (q, k, v, rpb, K, dilation, scale, window), (y, lse))
        ctx.mark_non_differentiable(lse)
        return y, lse

    @staticmethod
    def backward(ctx, grad, grad_lse):
        if not _eager.graph_free():
            return (*_na2d_grads_differentiable(ctx, grad, linear.FUNCTIONS), None, None, None, None)
        return (*_na2d_grads(ctx, grad, _backward), None, None, None, None)


class _QK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, rpb, K, dilation, window):
        _qk_setup(ctx, (q, k, rpb, K, dilation, window), None)
        return _qk(q, k, rpb, K, dilation, window)

    @staticmethod
    def backward(ctx, grad):
        if not _eager.graph_free():
            return (*_qk_grads_differentiable(ctx, grad, linear.FUNCTIONS), None, None, None)
        return (*_qk_grads(ctx, grad, _qk_backward), None, None, None)


class _AV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, v, K, dilation, window):
        _av_setup(ctx, (attn, v, K, dilation, window), None)
        return _av(attn, v, K, dilation, window)

    @staticmethod
    def backward(ctx, grad):
        if not _eager.graph_free():
            return (*_av_grads_differentiable(ctx, grad, linear.FUNCTIONS), None, None, None)
        return (*_av_grads(ctx, grad, _av_backward), None, None, None)


_apply_na2d, _apply_qk, _apply_av = (_eager.applier(f) for f in (_NA2d, _QK, _AV))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

_HEADS_FIRST = "(B, heads, H, W, D)"


def _heads_last(heads_first, **tensors):
    """With ``heads_first``, views of ``(B, heads, H, W, ...)`` tensors as ``(B, H, W, heads, ...)``: the
    kernels read any strides, so neither layout is copied. Ranks are checked first, against the
    layout the caller used."""
    if not isinstance(heads_first, bool):
        raise TypeError(f"heads_first must be a bool, got {heads_first!r}")
    if not heads_first:
        return tuple(tensors.values())
    for name, t in tensors.items():
        if name == "attn":
            check_tensor(t, "attn", 6, "(B, heads, H, W, K, K) (heads_first=True)")
        elif name != "rpb" or t is not None:
            check_tensor(t, name, 3 if name == "rpb" else 5,
                         "(heads, 2K-1, 2K-1)" if name == "rpb" else f"{_HEADS_FIRST} (heads_first=True)")
    return tuple(t if t is None or name == "rpb" else t.movedim(1, 3) for name, t in tensors.items())


def _heads_back(y: Tensor, heads_first: bool) -> Tensor:
    return y.movedim(3, 1) if heads_first else y


def _scale(scale, D) -> float:
    if scale is None:
        return float(D) ** -0.5 if D else 1.0  # D = 0: no score to scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation=1, *, rpb: Tensor | None = None,
         scale: float | None = None, window: str = "neighborhood", heads_first: bool = False) -> Tensor:
    """Fused 2-D neighbourhood attention (docs/operators.md §1c): the K² scores never reach memory on the GPU.

    ``y[b,i,j,h] = Σ_{n∈N(i,j)} softmax_n(scale·q[b,i,j,h]·k[b,n,h] + rpb[h, Δi+K-1, Δj+K-1]) · v[b,n,h]``

    Args:
        q, k, v: ``(B, H, W, heads, D)``, any strides (views of a packed qkv need no copy).
        kernel_size: odd K; dilation: int or (h, w) pair.
        rpb: ``(heads, 2K-1, 2K-1)`` relative positional bias (NAT/DiNAT) or None.
        scale: defaults to ``D^-1/2``.
        window: ``"neighborhood"`` (NATTEN: exactly K×K keys, the window shifted at the borders;
            needs ``K·dilation <=`` each image side) or ``"sliding"`` (zero-padded: keys outside the
            image are left out of the softmax).
        heads_first: q, k, v are ``(B, heads, H, W, D)`` (the layout of ``scaled_dot_product_attention``)
            and so is the result; read through their strides, no copy either way.
    Returns ``(B, H, W, heads, D)`` in the input dtype (with ``heads_first``, a ``(B, heads, H, W, D)``
    view of such a buffer). Gradients reach q, k, v and rpb.
    """
    K = _check_kernel_size(kernel_size)
    window = _check_window(window)
    q, k, v = _heads_last(heads_first, q=q, k=k, v=v)
    check_tensor(q, "q", 5, _LAYOUT)
    scale = _scale(scale, q.shape[-1])
    q, k, v, rpb = autocast_inputs(q, k, v, rpb)
    dilation = as_pair(dilation, "dilation", 1)
    if _eager.needs_function(q, k, v, rpb):  # tangents or torch.func: the window products carry them
        _check_tensors(q=q, k=k, v=v, rpb=rpb)
        dilation = _geometry(q.shape, (("k", k.shape), ("v", v.shape)), _shape(rpb), None, K, dilation, window)
        return _heads_back(linear.na2d(linear.FUNCTIONS, q, k, v, rpb, K, dilation, scale, window), heads_first)
    if not _eager.eager(q, k, v, rpb):
        _eager.refuse_tangents("na2d", q, k, v, rpb)
        return _heads_back(na2d_op(q, k, v, rpb, K, list(dilation), scale, window)[0], heads_first)
    _check_tensors(q=q, k=k, v=v, rpb=rpb)
    dilation = _cached_geometry(q.shape, (("k", k.shape), ("v", v.shape)), _shape(rpb), None, K, dilation, window)
    if _eager.records_grad(q, k, v, rpb):
        return _heads_back(_apply_na2d(q, k, v, rpb, K, dilation, scale, window)[0], heads_first)
    return _heads_back(_forward(q, k, v, rpb, K, dilation, scale, window)[0], heads_first)


def na2d_qk(q: Tensor, k: Tensor, kernel_size: int, dilation=1, *, rpb: Tensor | None = None,
            window: str = "neighborhood", heads_first: bool = False) -> Tensor:
    """Unfused scores (NATTEN 0.17 semantics): ``s[b,i,j,h,u,v] = q[b,i,j,h]·k[b,key(u,v),h] + rpb[h, Δ]``.

    Returns ``(B, H, W, heads, K, K)`` in window order, unscaled (scale q first); ``-inf`` where a
    sliding window leaves the image, so a softmax over the last two axes leaves those keys out.
    ``heads_first``: q, k are ``(B, heads, H, W, D)`` and the scores a ``(B, heads, H, W, K, K)`` view.
    """
    K = _check_kernel_size(kernel_size)
    window = _check_window(window)
    q, k = _heads_last(heads_first, q=q, k=k)
    q, k, rpb = autocast_inputs(q, k, rpb)
    dilation = as_pair(dilation, "dilation", 1)
    if _eager.needs_function(q, k, rpb):
        _check_tensors(q=q, k=k, rpb=rpb)
        dilation = _geometry(q.shape, (("k", k.shape),), _shape(rpb), None, K, dilation, window)
        return _heads_back(linear.scores(linear.FUNCTIONS, q, k, rpb, K, dilation, 1.0, window), heads_first)
    if not _eager.eager(q, k, rpb):
        _eager.refuse_tangents("na2d_qk", q, k, rpb)
        return _heads_back(na2d_qk_op(q, k, rpb, K, list(dilation), window), heads_first)
    _check_tensors(q=q, k=k, rpb=rpb)
    dilation = _cached_geometry(q.shape, (("k", k.shape),), _shape(rpb), None, K, dilation, window)
    if _eager.records_grad(q, k, rpb):
        return _heads_back(_apply_qk(q, k, rpb, K, dilation, window), heads_first)
    return _heads_back(_qk(q, k, rpb, K, dilation, window), heads_first)


def na2d_av(attn: Tensor, v: Tensor, kernel_size: int, dilation=1, *, window: str = "neighborhood",
            heads_first: bool = False) -> Tensor:
    """Unfused aggregation: ``y[b,i,j,h] = Σ_{u,v} attn[b,i,j,h,u,v] · v[b,key(u,v),h]`` for any
    attention-like weights ``(B, H, W, heads, K, K)`` (softmaxed or not); keys outside the image
    (sliding windows) contribute nothing. ``heads_first``: attn ``(B, heads, H, W, K, K)``, v and the
    result ``(B, heads, H, W, D)``."""
    K = _check_kernel_size(kernel_size)
    window = _check_window(window)
    attn, v = _heads_last(heads_first, attn=attn, v=v)
    attn, v = autocast_inputs(attn, v)
    dilation = as_pair(dilation, "dilation", 1)
    if _eager.needs_function(attn, v):
        _check_tensors(attn=attn, v=v)
        dilation = _geometry(v.shape, (), None, tuple(attn.shape), K, dilation, window)
        return _heads_back(linear.TapSum.apply(attn, v, K, dilation, window), heads_first)
    if not _eager.eager(attn, v):
        _eager.refuse_tangents("na2d_av", attn, v)
        return _heads_back(na2d_av_op(attn, v, K, list(dilation), window), heads_first)
    _check_tensors(attn=attn, v=v)
    dilation = _cached_geometry(v.shape, (), None, tuple(attn.shape), K, dilation, window)
    if _eager.records_grad(attn, v):
        return _heads_back(_apply_av(attn, v, K, dilation, window), heads_first)
    return _heads_back(_av(attn, v, K, dilation, window), heads_first)
