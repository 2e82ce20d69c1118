"""Plain-PyTorch neighbourhood attention (docs/operators.md §1c).

Layout everywhere: ``q, k, v, y: (B, H, W, heads, D)``, scores ``(B, H, W, heads, K, K)``,
``rpb: (heads, 2K-1, 2K-1)``. Dilation is an (h, w) pair; ``window`` is ``"neighborhood"`` or
``"sliding"``.

* ``na2d_naive`` — the definition as loops, with NATTEN's own window-start rule: the float64
  reference the other paths are tested against (tiny shapes only).
* ``na2d_gather`` / ``na2d_qk_gather`` / ``na2d_av_gather`` — the plain PyTorch baseline that
  gathers every window, ``(B, H, W, K, K, heads, D)`` elements: differentiable by autograd.
* ``na2d_taps`` and the ``*_taps`` pairs — the ops' CPU path: a loop over the K² taps, each reading
  one ``(B, H, W, heads, D)`` gather of keys (rows and columns picked separately), with backward
  passes written out, so memory stays O(input + scores) and the ops need no autograd inside.
"""
from __future__ import annotations

import torch

WINDOWS = ("neighborhood", "sliding")


# ---------------------------------------------------------------------------------------------
# Windows along one axis
# ---------------------------------------------------------------------------------------------

def natten_window_start(index: int, length: int, K: int, dilation: int) -> int:
    """The first key of ``index``'s window, as NATTEN's ``get_window_start`` computes it."""
    nh = K // 2
    if dilation <= 1:
        return max(index - nh, 0) + (index + nh >= length) * (length - index - nh - 1)
    if index - nh * dilation < 0:
        return index % dilation
    if index + nh * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nh * dilation
        return a + imodd - K * dilation
    return index - nh * dilation


def window_indices(length: int, K: int, dilation: int, window: str, device=None):
    """Per query position along one axis and per tap u < K: the key position (clamped into the
    axis), whether the key exists (sliding windows leave the image), and the rpb index Δ + K - 1.
    Three ``(length, K)`` int64/bool tensors."""
    pos = torch.arange(length, device=device)
    group, t = pos % dilation, pos // dilation
    group_length = (length - group + dilation - 1) // dilation
    start = t - K // 2
    if window == "neighborhood":  # shifted, not cut, at the borders (needs K <= group_length)
        start = torch.minimum(start.clamp(min=0), group_length - K)
    key_t = start[:, None] + torch.arange(K, device=device)[None, :]
    valid = (key_t >= 0) & (key_t < group_length[:, None])
    keys = (group[:, None] + key_t * dilation).clamp(0, length - 1)
    return keys, valid, key_t - t[:, None] + K - 1


def _pair(dilation):
    return (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)


def check_window_fits(H: int, W: int, K: int, dilation, window: str) -> None:
    """A neighborhood window (shifted at the borders, never cut) needs K·dilation <= each side, as
    NATTEN's; past it the windows above read outside the image."""
    if window != "neighborhood":
        return
    for axis, size, d in (("H", H, _pair(dilation)[0]), ("W", W, _pair(dilation)[1])):
        if K * d > size:
            raise ValueError(
                f"kernel_size·dilation = {K}·{d} = {K * d} is larger than the image side {axis}={size}: a "
                f"neighborhood window must fit inside the image (use window='sliding' or a smaller K)")


def _tables(H, W, K, dilation, window, device):
    check_window_fits(H, W, K, dilation, window)
    dilation = _pair(dilation)
    return window_indices(H, K, dilation[0], window, device), window_indices(W, K, dilation[1], window, device)


# ---------------------------------------------------------------------------------------------
# The definition as loops (float64 reference)
# ---------------------------------------------------------------------------------------------

def _naive_keys(index, length, K, d, window):
    """[(key position or None, Δ)] for one query position along one axis."""
    if window == "neighborhood":
        start = natten_window_start(index, length, K, d)
        return [(start + u * d, (start + u * d - index) // d) for u in range(K)]
    keys = [index + (u - K // 2) * d for u in range(K)]
    return [(key if 0 <= key < length else None, u - K // 2) for u, key in enumerate(keys)]


def na2d_naive(q, k, v, kernel_size, dilation=(1, 1), rpb=None, scale=None, window="neighborhood"):
    """``y[b,i,j,h] = Σ_n softmax_n(scale·q·k[n] + rpb[h, Δi+K-1, Δj+K-1]) · v[n]``, loop by loop."""
    B, H, W, heads, D = q.shape
    K, dilation = kernel_size, _pair(dilation)
    check_window_fits(H, W, K, dilation, window)
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    y = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(H):
        rows = _naive_keys(i, H, K, dilation[0], window)
        for j in range(W):
            cols = _naive_keys(j, W, K, dilation[1], window)
            keys = [(r, c, dr, dc) for r, dr in rows for c, dc in cols if r is not None and c is not None]
            for h in range(heads):
                scores = []
                for r, c, dr, dc in keys:
                    s = scale * (q[:, i, j, h] * k[:, r, c, h]).sum(-1)
                    if rpb is not None:
                        s = s + float(rpb[h, dr + K - 1, dc + K - 1])
                    scores.append(s)
                p = torch.stack(scores, -1).softmax(-1)
                y[:, i, j, h] = sum(p[:, n, None] * v[:, r, c, h] for n, (r, c, _, _) in enumerate(keys))
    return y


# ---------------------------------------------------------------------------------------------
# The gathering baseline (differentiable by autograd)
# ---------------------------------------------------------------------------------------------

def _gathered(t, rows, cols):
    """(B, H, W, K, K, heads, D): every window of ``t``."""
    return t[:, rows[:, None, :, None], cols[None, :, None, :]]


def na2d_qk_gather(q, k, kernel_size, dilation=(1, 1), rpb=None, window="neighborhood"):
    """Scores ``q·k`` (+ rpb) in window order, ``-inf`` where a sliding window leaves the image."""
    (rows, rvalid, rrel), (cols, cvalid, crel) = _tables(q.shape[1], q.shape[2], kernel_size, dilation, window,
                                                       q.device)
    s = torch.einsum("bijhd,bijuvhd->bijhuv", q, _gathered(k, rows, cols))
    if rpb is not None:
        s = s + rpb[:, rrel[:, None, :, None], crel[None, :, None, :]].permute(1, 2, 0, 3, 4)
    valid = (rvalid[:, None, :, None] & cvalid[None, :, None, :])[:, :, None]
    return s.masked_fill(~valid, float("-inf"))


def na2d_av_gather(attn, v, kernel_size, dilation=(1, 1), window="neighborhood"):
    (rows, rvalid, _), (cols, cvalid, _) = _tables(v.shape[1], v.shape[2], kernel_size, dilation, window, v.device)
    valid = (rvalid[:, None, :, None] & cvalid[None, :, None, :])[:, :, None]
    return torch.einsum("bijhuv,bijuvhd->bijhd", attn.masked_fill(~valid, 0), _gathered(v, rows, cols))


def na2d_gather(q, k, v, kernel_size, dilation=(1, 1), rpb=None, scale=None, window="neighborhood"):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = na2d_qk_gather(q * scale, k, kernel_size, dilation, rpb, window)
    attn = s.flatten(-2).softmax(-1).view(s.shape)
    return na2d_av_gather(attn, v, kernel_size, dilation, window)


# ---------------------------------------------------------------------------------------------
# The CPU path: one tap at a time, backward written out
# ---------------------------------------------------------------------------------------------

def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)


def _taps(H, W, K, dilation, window, device):
    """For every tap (u, v): (row keys (H,), column keys (W,), valid (H, W, 1), row rel (H,), column rel (W,))."""
    (rows, rvalid, rrel), (cols, cvalid, crel) = _tables(H, W, K, dilation, window, device)
    for u in range(K):
        for v in range(K):
            valid = (rvalid[:, u, None] & cvalid[None, :, v])[:, :, None]
            yield u, v, rows[:, u], cols[:, v], valid, rrel[:, u], crel[:, v]


def _at(t, rows, cols):
    return t.index_select(1, rows).index_select(2, cols)


def _scatter(target, rows, cols, values):
    """``target[:, rows[i], cols[j]] += values[:, i, j]`` (repeated keys add up)."""
    by_col = torch.zeros_like(target).index_add_(2, cols, values)
    return target.index_add_(1, rows, by_col)


def _rpb_scatter(drpb, rrel, crel, values):
    """``drpb[h, rrel[i], crel[j]] += values[i, j, h]``."""
    heads, R = drpb.shape[0], drpb.shape[1]
    by_col = torch.zeros((values.shape[0], R, heads), dtype=drpb.dtype, device=drpb.device).index_add_(1, crel, values)
    full = torch.zeros((R, R, heads), dtype=drpb.dtype, device=drpb.device).index_add_(0, rrel, by_col)
    return drpb.add_(full.permute(2, 0, 1))


def na2d_qk_taps(q, k, kernel_size, dilation, rpb=None, window="neighborhood"):
    B, H, W, heads, _ = q.shape
    K = kernel_size
    acc = _acc(q)
    s = torch.empty((B, H, W, heads, K, K), dtype=acc, device=q.device)
    qa = q.to(acc)
    for u, v, rows, cols, valid, rrel, crel in _taps(H, W, K, dilation, window, q.device):
        tap = (qa * _at(k, rows, cols).to(acc)).sum(-1)
        if rpb is not None:
            tap = tap + rpb[:, rrel[:, None], crel[None, :]].permute(1, 2, 0).to(acc)
        s[..., u, v] = tap.masked_fill(~valid, float("-inf"))
    return s.to(q.dtype)


def na2d_qk_taps_backward(grad, q, k, kernel_size, dilation, window="neighborhood"):
    """(dq, dk, drpb) of ``na2d_qk``; masked (-inf) scores pass no gradient."""
    B, H, W, heads, _ = q.shape
    K = kernel_size
    acc = _acc(q)
    qa, ka, grad = q.to(acc), k.to(acc), grad.to(acc)
    dq, dk = torch.zeros_like(qa), torch.zeros_like(ka)
    drpb = torch.zeros((heads, 2 * K - 1, 2 * K - 1), dtype=acc, device=q.device)
    for u, v, rows, cols, valid, rrel, crel in _taps(H, W, K, dilation, window, q.device):
        g = grad[..., u, v].masked_fill(~valid, 0)
        dq += g[..., None] * _at(ka, rows, cols)
        _scatter(dk, rows, cols, g[..., None] * qa)
        _rpb_scatter(drpb, rrel, crel, g.sum(0))
    return dq.to(q.dtype), dk.to(k.dtype), drpb.to(q.dtype)


def na2d_av_taps(attn, v, kernel_size, dilation, window="neighborhood"):
    B, H, W, heads, D = v.shape
    acc = _acc(v)
    y = torch.zeros((B, H, W, heads, D), dtype=acc, device=v.device)
    for u, w, rows, cols, valid, _, _ in _taps(H, W, kernel_size, dilation, window, v.device):
        a = attn[..., u, w].to(acc).masked_fill(~valid, 0)
        y += a[..., None] * _at(v, rows, cols).to(acc)
    return y.to(v.dtype)


def na2d_dots_taps(x, y, kernel_size, dilation, window="neighborhood"):
    """``out[b,i,j,h,u,v] = x[b,i,j,h] · y[b,key(u,v),h]``, zero on taps outside the image."""
    B, H, W, heads, _ = x.shape
    K = kernel_size
    acc = _acc(x)
    xa, ya = x.to(acc), y.to(acc)
    out = torch.empty((B, H, W, heads, K, K), dtype=acc, device=x.device)
    for u, w, rows, cols, valid, _, _ in _taps(H, W, K, dilation, window, x.device):
        out[..., u, w] = (xa * _at(ya, rows, cols)).sum(-1).masked_fill(~valid, 0)
    return out.to(x.dtype)


def na2d_key_sum_taps(attn, x, kernel_size, dilation, window="neighborhood"):
    """``out[b,key] = Σ over the (query, tap) pairs that reach key of attn · x[query]``: the adjoint
    of ``na2d_av_taps`` in its values."""
    B, H, W, heads, D = x.shape
    acc = _acc(x)
    xa = x.to(acc)
    out = torch.zeros_like(xa)
    for u, w, rows, cols, valid, _, _ in _taps(H, W, kernel_size, dilation, window, x.device):
        a = attn[..., u, w].to(acc).masked_fill(~valid, 0)
        _scatter(out, rows, cols, a[..., None] * xa)
    return out.to(x.dtype)


def na2d_av_taps_backward(grad, attn, v, kernel_size, dilation, window="neighborhood"):
    """(dattn, dv) of ``na2d_av``; weights on keys outside the image get a zero gradient."""
    return (na2d_dots_taps(grad.to(v.dtype), v, kernel_size, dilation, window).to(attn.dtype),
            na2d_key_sum_taps(attn, grad, kernel_size, dilation, window).to(v.dtype))


def na2d_taps(q, k, v, kernel_size, dilation, rpb=None, scale=None, window="neighborhood"):
    """(y, lse): the fused op's CPU path; the scores live as (B, H, W, heads, K²) in fp32, never
    as a window gather of keys or values. ``lse`` is the log-sum-exp of the scaled scores."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = na2d_qk_taps(q.to(_acc(q)) * scale, k.to(_acc(q)), kernel_size, dilation, rpb, window)
    lse = torch.logsumexp(s.flatten(-2), -1)
    attn = torch.exp(s - lse[..., None, None])
    return na2d_av_taps(attn, v.to(_acc(v)), kernel_size, dilation, window).to(v.dtype), lse


def na2d_taps_backward(grad, q, k, v, rpb, y, lse, kernel_size, dilation, scale, window="neighborhood"):
    """(dq, dk, dv, drpb) from the forward's output and log-sum-exp (scores recomputed)."""
    acc = _acc(q)
    qa, ka, va, grad = q.to(acc), k.to(acc), v.to(acc), grad.to(acc)
    s = na2d_qk_taps(qa * scale, ka, kernel_size, dilation, rpb, window)
    attn = torch.exp(s - lse[..., None, None])
    dattn, dv = na2d_av_taps_backward(grad, attn, va, kernel_size, dilation, window)
    delta = (grad * y.to(acc)).sum(-1)
    ds = attn * (dattn - delta[..., None, None])
    dqs, dk, drpb = na2d_qk_taps_backward(ds, qa, ka, kernel_size, dilation, window)
    return (dqs * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype), drpb.to(q.dtype)

