"""The three window products neighbourhood attention is built from, differentiable to any order.

With ``n(i, t)`` the key of query ``i``'s tap ``t`` (docs/operators.md §1c), ``x, y`` of shape
``(B, H, W, heads, D)`` and ``w`` of shape ``(B, H, W, heads, K, K)``:

    dots(x, y)[i, t] = x_i · y_n(i,t)                        zero on taps outside the image
    tap_sum(w, y)[i] = Σ_t w[i, t] · y_n(i,t)                ``na2d_av``
    key_sum(w, x)[j] = Σ_{(i,t): n(i,t) = j} w[i, t] · x_i   tap_sum's adjoint in y

Each is bilinear and the three are closed under differentiation (g, h: incoming gradients):

    dots(x, y):     dx = tap_sum(g, y),  dy = key_sum(g, x)
    tap_sum(w, y):  dw = dots(g, y),     dy = key_sum(w, g)
    key_sum(w, x):  dw = dots(x, h),     dx = tap_sum(w, h)

and a tangent is the sum of the product with each operand's tangent in its place. ``na2d_qk`` is
``dots`` plus the gathered rpb, ``na2d_av`` is ``tap_sum`` and ``na2d`` puts a softmax between them,
so every derivative of the three ops past the first (and every tangent) is written here: as
autograd.Functions for eager calls and torch.func (with vmap rules that fold the vmapped dim into
the batch), and as custom ops whose autograd formulas use each other, for torch.compile. The
first-order backward of each op keeps its own fused kernels (ops/na2d.py).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from dynconv.kernels import na2d_pair as kernels
from dynconv.kernels._launch import runs_kernels

from . import _eager
from . import reference_na2d as reference
from ._eager import fold_vmapped, unfold_vmapped

# ---------------------------------------------------------------------------------------------
# Bodies. Empty operands launch nothing: every value of an empty product is zero.
# ---------------------------------------------------------------------------------------------

def _dots(x, y, K, dilation, window):
    if not runs_kernels(x):
        return reference.na2d_dots_taps(x, y, K, dilation, window).contiguous()
    out = torch.empty((*x.shape[:4], K, K), dtype=x.dtype, device=x.device)
    if out.numel() and not x.shape[-1]:  # D = 0: every dot is an empty sum
        return out.zero_()
    if out.numel():
        kernels.na2d_dots(x, y, out, K, dilation, window == "neighborhood")
    return out


def _tap_sum(w, y, K, dilation, window):
    if not runs_kernels(y):
        return reference.na2d_av_taps(w, y, K, dilation, window).contiguous()
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if out.numel():
        kernels.na2d_av_forward(w, y, out, K, dilation, window == "neighborhood")
    return out


def _key_sum(w, x, K, dilation, window):
    if not runs_kernels(x):
        return reference.na2d_key_sum_taps(w, x, K, dilation, window).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        kernels.na2d_key_sum(w, x, out, K, dilation, window == "neighborhood")
    return out


def _sum(*terms):
    present = [t for t in terms if t is not None]
    return functools.reduce(torch.add, present) if present else None


# The closure table of the module docstring: for each product, the two operands' gradients as
# (product, its two tensor arguments), given the operands a, b and the incoming gradient g.
ADJOINTS = {
    "dots": lambda x, y, g: (("tap_sum", g, y), ("key_sum", g, x)),
    "tap_sum": lambda w, y, g: (("dots", g, y), ("key_sum", w, g)),
    "key_sum": lambda w, x, h: (("dots", x, h), ("tap_sum", w, h)),
}
BODIES = {"dots": _dots, "tap_sum": _tap_sum, "key_sum": _key_sum}


def _run(name, a, b, geometry):
    """One product, through its Function when the result's own derivative may be wanted."""
    if _eager.graph_free():
        return BODIES[name](a, b, *geometry)
    return FUNCTIONS[name](a, b, *geometry)


def _product_function(name):
    """The autograd.Function of one product: backward and jvp from the closure table, a vmap rule
    that folds the vmapped dim into the batch."""
    body = BODIES[name]

    class Product(torch.autograd.Function):
        generate_vmap_rule = False

        @staticmethod
        def forward(a, b, K, dilation, window):
            return body(a, b, K, dilation, window)

        @staticmethod
        def setup_context(ctx, inputs, output):
            a, b, *geometry = inputs
            ctx.geometry = tuple(geometry)
            ctx.save_for_backward(a, b)
            ctx.save_for_forward(a, b)

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            grads = [_run(adjoint, x, y, ctx.geometry) if needed else None
                     for (adjoint, x, y), needed in zip(ADJOINTS[name](a, b, g), ctx.needs_input_grad)]
            return (*grads, None, None, None)

        @staticmethod
        def jvp(ctx, ta, tb, *_):
            a, b = ctx.saved_tensors
            return _sum(None if ta is None else _run(name, ta, b, ctx.geometry),
                        None if tb is None else _run(name, a, tb, ctx.geometry))

        @staticmethod
        def vmap(info, in_dims, a, b, K, dilation, window):
            n = info.batch_size
            out = Product.apply(fold_vmapped(a, in_dims[0], n), fold_vmapped(b, in_dims[1], n), K, dilation, window)
            return unfold_vmapped(out, n), 0

    Product.__name__ = Product.__qualname__ = "".join(part.title() for part in name.split("_"))
    return Product


Dots, TapSum, KeySum = (_product_function(name) for name in BODIES)
FUNCTIONS = {"dots": Dots.apply, "tap_sum": TapSum.apply, "key_sum": KeySum.apply}


# ---------------------------------------------------------------------------------------------
# Custom ops: the same closure for torch.compile. ``na2d_av`` (ops/na2d.py) is tap_sum.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dynconv::na2d_dots", mutates_args=())
def dots_op(x: Tensor, y: Tensor, kernel_size: int, dilation: Sequence[int], window: str) -> Tensor:
    return _dots(x, y, kernel_size, tuple(dilation), window)


@dots_op.register_fake
def _(x, y, kernel_size, dilation, window):
    return x.new_empty((*x.shape[:4], kernel_size, kernel_size))


@torch.library.custom_op("dynconv::na2d_key_sum", mutates_args=())
def key_sum_op(w: Tensor, x: Tensor, kernel_size: int, dilation: Sequence[int], window: str) -> Tensor:
    return _key_sum(w, x, kernel_size, tuple(dilation), window)


@key_sum_op.register_fake
def _(w, x, kernel_size, dilation, window):
    return x.new_empty(x.shape)


OPS = {"dots": lambda x, y, K, dilation, window: dots_op(x, y, K, list(dilation), window),
       "tap_sum": lambda w, y, K, dilation, window: torch.ops.dynconv.na2d_av(w, y, K, list(dilation), window),
       "key_sum": lambda w, x, K, dilation, window: key_sum_op(w, x, K, list(dilation), window)}


def _op_autograd(name):
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        grads = [OPS[adjoint](x, y, *ctx.geometry) if needed else None
                 for (adjoint, x, y), needed in zip(ADJOINTS[name](a, b, g), ctx.needs_input_grad)]
        return (*grads, None, None, None)
    return backward


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.geometry = (inputs[2], tuple(inputs[3]), inputs[4])


for _name in ("dots", "key_sum"):
    torch.library.register_autograd(f"dynconv::na2d_{_name}", _op_autograd(_name), setup_context=_save)


# ---------------------------------------------------------------------------------------------
# The rpb as a score-shaped tensor and back (plain torch: autograd differentiates it to any order)
# ---------------------------------------------------------------------------------------------

def _tables(H, W, K, dilation, window, device):
    (_, rvalid, rrel), (_, cvalid, crel) = reference._tables(H, W, K, dilation, window, device)
    valid = (rvalid[:, None, :, None] & cvalid[None, :, None, :])[:, :, None]  # (H, W, 1, K, K)
    return valid, rrel, crel


def bias(rpb, H, W, K, dilation, window):
    """``rpb[h, Δi + K - 1, Δj + K - 1]`` at every (query, tap): ``(H, W, heads, K, K)``."""
    _, rrel, crel = _tables(H, W, K, dilation, window, rpb.device)
    return rpb[:, rrel[:, None, :, None], crel[None, :, None, :]].permute(1, 2, 0, 3, 4)


def bias_grad(g, K, dilation, window):
    """The rpb gradient of score gradients ``g``: summed by relative position in a fixed order (one
    einsum against one-hot tables), taps outside the image left out."""
    B, H, W, heads = g.shape[:4]
    valid, rrel, crel = _tables(H, W, K, dilation, window, g.device)
    R = 2 * K - 1
    rows = torch.nn.functional.one_hot(rrel, R).to(g.dtype)  # (H, K, R)
    cols = torch.nn.functional.one_hot(crel, R).to(g.dtype)  # (W, K, R)
    summed = g.masked_fill(~valid, 0).sum(0)  # (H, W, heads, K, K)
    return torch.einsum("ijhuv,iua,jvc->hac", summed, rows, cols)


def scores(products, q, k, rpb, K, dilation, scale, window):
    """Scaled scores with rpb, ``-inf`` on taps outside the image, differentiable to any order."""
    s = products["dots"](q, k, K, dilation, window) * scale
    H, W = q.shape[1:3]
    if rpb is not None:
        s = s + bias(rpb, H, W, K, dilation, window)
    if window == "sliding":
        s = s.masked_fill(~_tables(H, W, K, dilation, window, q.device)[0], float("-inf"))
    return s


def na2d(products, q, k, v, rpb, K, dilation, scale, window):
    """na2d as its three products and a softmax: the path that carries tangents and higher
    derivatives (it holds the ``(B, H, W, heads, K, K)`` probabilities, which the fused kernels never
    write)."""
    s = scores(products, q, k, rpb, K, dilation, scale, window)
    p = s.flatten(-2).softmax(-1).view(s.shape)
    return products["tap_sum"](p.to(v.dtype), v, K, dilation, window)


def na2d_backward(products, grad, q, k, v, rpb, K, dilation, scale, window):
    """(dq, dk, dv, drpb) of na2d written with the products, so it is itself differentiable."""
    s = scores(products, q, k, rpb, K, dilation, scale, window)
    p = s.flatten(-2).softmax(-1).view(s.shape)
    dp = products["dots"](grad, v, K, dilation, window)
    dv = products["key_sum"](p.to(grad.dtype), grad, K, dilation, window)
    ds = p * (dp - (p * dp).sum(dim=(-2, -1), keepdim=True))
    dq = products["tap_sum"](ds, k, K, dilation, window) * scale
    dk = products["key_sum"](ds, q, K, dilation, window) * scale
    drpb = None if rpb is None else bias_grad(ds, K, dilation, window)
    return dq, dk, dv, drpb


def qk_backward(products, grad, q, k, K, dilation, window, rpb_grad: bool):
    """(dq, dk, drpb or None) of na2d_qk, differentiable; the -inf taps pass no gradient."""
    if window == "sliding":
        grad = grad.masked_fill(~_tables(q.shape[1], q.shape[2], K, dilation, window, q.device)[0], 0)
    return (products["tap_sum"](grad, k, K, dilation, window), products["key_sum"](grad, q, K, dilation, window),
            bias_grad(grad, K, dilation, window) if rpb_grad else None)
