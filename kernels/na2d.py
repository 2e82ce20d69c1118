"""Fused 2-D neighbourhood attention (docs/operators.md §1c): forward and backward.

Layout ``(B, H, W, heads, D)`` for q, k, v and the output, any strides; the window geometry is
``na2d_common.py``'s. A program owns one sample, one head and a ``BLOCK_H x BLOCK_W`` tile of pixels
(flattened to ``BLOCK_Q`` lanes), with the head dimension ``BLOCK_D`` as the second tile axis.

Kernels (deterministic: every element and every partial has exactly one writer, no atomics):

* ``na2d_fwd_kernel`` — per query lane, a loop over the K² taps with an online softmax (running
  max and sum, fp32 accumulation), gathering each tap's key and value row; writes the output and
  the log-sum-exp. The K² scores never reach memory.
* ``na2d_bwd_query_kernel`` — dq, recomputing ``p = exp(s - lse)`` per tap, and the rpb gradient:
  per tap, ``P += onehot(rel_i)ᵀ · diag(ds) · onehot(rel_j)`` (a ``[R, Q] x [Q, R]`` product) into
  one ``(2K-1)²`` partial per program, which the launcher sums over programs in a fixed order.
* ``na2d_bwd_key_kernel`` — dk and dv from the queries whose windows hold each key (the inverse
  neighbourhood): along each axis those form the contiguous range ``[lo, hi]`` of subsequence
  indices, at most ``2K-1`` long near a border and ``K`` inside; the loop runs to the tile's
  longest range, masked per lane.

``delta = Σ_d dy·y`` per query comes from the caller (one fused torch reduction).

Tensor cores (fp16/bf16, D >= 16): the launchers here dispatch to the tiled kernels of
``na2d_tiled.py``; fp32 stays on the kernels here (exact products, no silent TF32), as does D < 16.
The unfused pair (``na2d_qk``, ``na2d_av``) has its own kernels in ``na2d_pair.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, cacheable, config_key, layout, needs_int64, planned
from .na2d_common import (CATALOGUE_SHAPES, _HOLDER_LOOPS, _acc_dtype, _axis, _common, _fp64_scales, _holders,
                          _reduce_rpb_partials, _rpb_block, _strides, _tile, rpb_partial_shape)
from .na2d_tiled import (_backward_key_tiled_launch, _backward_query_tiled_launch, _forward_tiled_launch,
                         window_penalty)


@triton.jit
def na2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, y_ptr, lse_ptr,
    H, W, HEADS, D, K, DH, DW, scale, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    syb, syh, syw, syn, syd,
    slb, slh, slw, sln,
    srn, sri, srj,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y = softmax(scale·q·k + rpb) · v over each query's window; lse = log Σ exp(scores)."""
    if ACC_DTYPE == tl.float64:
        scale, _, _, _, _ = _fp64_scales(scale_f64)
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    gi, ti, li, si = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, sj = _axis(j, W, K, DW, NEIGHBORHOOD)

    q = tl.load(q_ptr + b * sqb + h * sqn + (i * sqh + j * sqw)[:, None] + dd[None, :] * sqd,
                mask=inside[:, None] & dmask, other=0.0).to(ACC_DTYPE) * scale
    k_head = k_ptr + b * skb + h * skn + dd[None, :] * skd
    v_head = v_ptr + b * svb + h * svn + dd[None, :] * svd
    m = tl.full((BLOCK_H * BLOCK_W,), float("-inf"), ACC_DTYPE)
    total = tl.zeros((BLOCK_H * BLOCK_W,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for tap in range(K * K):
        ki = si + tap // K
        kj = sj + tap % K
        ok = inside & (ki >= 0) & (ki < li) & (kj >= 0) & (kj < lj)
        row = gi + ki * DH
        col = gj + kj * DW
        key = tl.load(k_head + (row * skh + col * skw)[:, None], mask=ok[:, None] & dmask, other=0.0)
        s = tl.sum(q * key.to(ACC_DTYPE), axis=1)
        if HAS_RPB:
            s += tl.load(rpb_ptr + h * srn + (ki - ti + K - 1) * sri + (kj - tj + K - 1) * srj,
                         mask=ok, other=0.0).to(ACC_DTYPE)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, s)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp() finite
        alpha = tl.exp(m - base)
        p = tl.exp(s - base)
        value = tl.load(v_head + (row * svh + col * svw)[:, None], mask=ok[:, None] & dmask, other=0.0)
        total = total * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * value.to(ACC_DTYPE)
        m = m_new
    safe = tl.where(total > 0, total, 1.0)  # lanes outside the image
    y = acc / safe[:, None]
    tl.store(y_ptr + b * syb + h * syn + (i * syh + j * syw)[:, None] + dd[None, :] * syd,
             y.to(y_ptr.dtype.element_ty), mask=inside[:, None] & dmask)
    tl.store(lse_ptr + b * slb + h * sln + i * slh + j * slw, m + tl.log(safe), mask=inside)

@triton.jit
def na2d_bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, dy_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr,
    H, W, HEADS, D, K, DH, DW, scale, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    slb, slh, slw, sln,
    srn, sri, srj,
    sdqb, sdqh, sdqw, sdqn, sdqd,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, RPB_DOT: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dq = scale · Σ_taps ds·k, ds = p·(dy·v - delta); per program an rpb-gradient partial
    ``drpb[b, h, tile, BLOCK_R, BLOCK_R]`` (lse and delta share one layout)."""
    if ACC_DTYPE == tl.float64:
        scale, _, _, _, _ = _fp64_scales(scale_f64)
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    mask2 = inside[:, None] & dmask
    gi, ti, li, si = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, sj = _axis(j, W, K, DW, NEIGHBORHOOD)

    pix = (i * sqh + j * sqw)[:, None]
    q = tl.load(q_ptr + b * sqb + h * sqn + pix + dd[None, :] * sqd, mask=mask2, other=0.0).to(ACC_DTYPE)
    dy = tl.load(dy_ptr + b * sgb + h * sgn + (i * sgh + j * sgw)[:, None] + dd[None, :] * sgd,
                 mask=mask2, other=0.0).to(ACC_DTYPE)
    stat = b * slb + h * sln + i * slh + j * slw
    lse = tl.load(lse_ptr + stat, mask=inside, other=0.0).to(ACC_DTYPE)
    delta = tl.load(delta_ptr + stat, mask=inside, other=0.0).to(ACC_DTYPE)
    k_head = k_ptr + b * skb + h * skn + dd[None, :] * skd
    v_head = v_ptr + b * svb + h * svn + dd[None, :] * svd
    dq = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    r = tl.arange(0, BLOCK_R)
    partial = tl.zeros((BLOCK_R, BLOCK_R), ACC_DTYPE)
    for tap in range(K * K):
        ki = si + tap // K
        kj = sj + tap % K
        ok = inside & (ki >= 0) & (ki < li) & (kj >= 0) & (kj < lj)
        row = gi + ki * DH
        col = gj + kj * DW
        key = tl.load(k_head + (row * skh + col * skw)[:, None], mask=ok[:, None] & dmask, other=0.0).to(ACC_DTYPE)
        value = tl.load(v_head + (row * svh + col * svw)[:, None], mask=ok[:, None] & dmask, other=0.0)
        s = tl.sum(q * key, axis=1) * scale
        rel_i = ki - ti + K - 1
        rel_j = kj - tj + K - 1
        if HAS_RPB:
            s += tl.load(rpb_ptr + h * srn + rel_i * sri + rel_j * srj, mask=ok, other=0.0).to(ACC_DTYPE)
        p = tl.where(ok, tl.exp(s - lse), 0.0)
        ds = p * (tl.sum(dy * value.to(ACC_DTYPE), axis=1) - delta)
        dq += ds[:, None] * key
        if HAS_RPB:
            rows = tl.where(rel_i[:, None] == r[None, :], ds[:, None], 0.0)
            cols = tl.where(rel_j[:, None] == r[None, :], 1.0, 0.0).to(ACC_DTYPE)
            if RPB_DOT:
                partial += tl.dot(tl.trans(rows), cols, input_precision="ieee")
            else:
                partial += tl.sum(rows[:, :, None] * cols[:, None, :], axis=0)
    tl.store(dq_ptr + b * sdqb + h * sdqn + (i * sdqh + j * sdqw)[:, None] + dd[None, :] * sdqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask2)
    if HAS_RPB:
        out = drpb_ptr + tl.program_id(0) * (BLOCK_R * BLOCK_R)
        tl.store(out + r[:, None] * BLOCK_R + r[None, :], partial)

@triton.jit
def na2d_bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, dy_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, W, HEADS, D, K, DH, DW, scale, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    slb, slh, slw, sln,
    srn, sri, srj,
    sdkb, sdkh, sdkw, sdkn, sdkd,
    sdvb, sdvh, sdvw, sdvn, sdvd,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dv = Σ_holders p·dy, dk = scale · Σ_holders ds·q over the queries whose windows hold the key."""
    if ACC_DTYPE == tl.float64:
        scale, _, _, _, _ = _fp64_scales(scale_f64)
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    mask2 = inside[:, None] & dmask
    gi, ti, li, _ = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, _ = _axis(j, W, K, DW, NEIGHBORHOOD)
    lo_i, hi_i = _holders(ti, li, K, NEIGHBORHOOD)
    lo_j, hi_j = _holders(tj, lj, K, NEIGHBORHOOD)
    span_i = tl.max(tl.where(inside, hi_i - lo_i + 1, 0), axis=0)
    span_j = tl.max(tl.where(inside, hi_j - lo_j + 1, 0), axis=0)

    key = tl.load(k_ptr + b * skb + h * skn + (i * skh + j * skw)[:, None] + dd[None, :] * skd,
                  mask=mask2, other=0.0).to(ACC_DTYPE)
    value = tl.load(v_ptr + b * svb + h * svn + (i * svh + j * svw)[:, None] + dd[None, :] * svd,
                    mask=mask2, other=0.0).to(ACC_DTYPE)
    q_head = q_ptr + b * sqb + h * sqn + dd[None, :] * sqd
    dy_head = dy_ptr + b * sgb + h * sgn + dd[None, :] * sgd
    stat_head = b * slb + h * sln
    dk = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for ei in range(0, span_i):
        qi = lo_i + ei
        ok_i = inside & (qi <= hi_i)
        row = gi + qi * DH
        for ej in range(0, span_j):
            qj = lo_j + ej
            ok = ok_i & (qj <= hi_j)
            col = gj + qj * DW
            okd = ok[:, None] & dmask
            query = tl.load(q_head + (row * sqh + col * sqw)[:, None], mask=okd, other=0.0).to(ACC_DTYPE)
            dy = tl.load(dy_head + (row * sgh + col * sgw)[:, None], mask=okd, other=0.0).to(ACC_DTYPE)
            stat = stat_head + row * slh + col * slw
            lse = tl.load(lse_ptr + stat, mask=ok, other=0.0).to(ACC_DTYPE)
            delta = tl.load(delta_ptr + stat, mask=ok, other=0.0).to(ACC_DTYPE)
            s = tl.sum(query * key, axis=1) * scale
            if HAS_RPB:
                s += tl.load(rpb_ptr + h * srn + (ti - qi + K - 1) * sri + (tj - qj + K - 1) * srj,
                             mask=ok, other=0.0).to(ACC_DTYPE)
            p = tl.where(ok, tl.exp(s - lse), 0.0)
            dv += p[:, None] * dy
            ds = p * (tl.sum(dy * value, axis=1) - delta)
            dk += ds[:, None] * query
    tl.store(dk_ptr + b * sdkb + h * sdkn + (i * sdkh + j * sdkw)[:, None] + dd[None, :] * sdkd,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask2)
    tl.store(dv_ptr + b * sdvb + h * sdvn + (i * sdvh + j * sdvw)[:, None] + dd[None, :] * sdvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask2)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def uses_tensor_cores(kernel: str, dtype: torch.dtype, D: int, rpb: bool = False) -> bool:
    """Whether ``kernel`` ("fwd", "dq", "dkv") runs its score and aggregation products as ``tl.dot``
    (the static model's MMA ceiling) or as per-lane multiply-reduces (CUDA cores). fp32 stays on CUDA
    cores: exact fp32 products, never a silent TF32. With a learnt rpb the tiled dq kernel also
    stores ds in window order for the rpb gradient (``rpb`` is kept for the callers' symmetry)."""
    return dtype in (torch.float16, torch.bfloat16) and D >= 16

def query_kernel_is_tiled(q: torch.Tensor, scale: float, config=None) -> bool:
    """Whether the dq launch takes the tensor-core kernel: then the rpb gradient goes through ds in
    window order (``window_ds_shape``), else through per-program partials (``rpb_partial_shape``)."""
    tiled = (config or {}).get("tiled", uses_tensor_cores("dq", q.dtype, q.shape[-1]))
    return bool(tiled) and window_penalty(q.dtype, scale) is not None

def window_ds_shape(q) -> tuple[int, ...]:
    """ds of the tiled dq kernel per query and tap: (B, H, W, heads, K, K) (K from the caller)."""
    return tuple(q.shape[:4])

def rpb_grad_buffer(q, K, dilation, scale, neighborhood, config=None) -> torch.Tensor:
    """What the dq launch writes the rpb gradient's terms into: ds per (query, tap) for the tiled
    kernel (in q's dtype for 16-bit inputs: half the bytes, summed in fp32 afterwards; zeroed for a
    sliding window, whose taps outside the image are never stored), else fp32 per-program partials."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if query_kernel_is_tiled(q, scale, config):
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
        allocate = torch.empty if neighborhood else torch.zeros
        return allocate((*window_ds_shape(q), K, K), dtype=dtype, device=q.device)
    return torch.empty(rpb_partial_shape(q, K, dilation, config), dtype=acc, device=q.device)

def forward_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config=None) -> Launch:
    if not cacheable(q):
        return _forward_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config)
    key = ("na2d_fwd", layout(q), layout(k), layout(v), layout(rpb), layout(y), layout(lse), K, *dilation, scale,
           neighborhood, config_key(config))
    return planned(key, ("q_ptr", "k_ptr", "v_ptr", "rpb_ptr", "y_ptr", "lse_ptr"), (q, k, v, rpb, y, lse),
                   lambda: _forward_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config))

def _forward_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config=None) -> Launch:
    tiled = (config or {}).get("tiled", uses_tensor_cores("fwd", q.dtype, q.shape[-1]))
    if tiled and window_penalty(q.dtype, scale) is not None:
        return _forward_tiled_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config)
    meta, scalars, grid, num_warps, num_stages = _common("na2d_fwd", q, K, dilation, config)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, y_ptr=y, lse_ptr=lse, **scalars, scale=float(scale),
                scale_f64=float(scale),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("y", y, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3))
    meta.update(NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, INDEX_64=needs_int64(q, k, v, y),
                ACC_DTYPE=_acc_dtype(q.dtype))
    return Launch(na2d_fwd_kernel, grid, args, meta, num_warps, num_stages, loops=(K * K,))

def backward_query_launch(q, k, v, rpb, dy, lse, delta, dq, partials, K, dilation, scale, neighborhood,
                          config=None) -> Launch:
    """``partials``: ``rpb_grad_buffer``'s tensor (None: no rpb gradient)."""
    if query_kernel_is_tiled(q, scale, config):
        return _backward_query_tiled_launch(q, k, v, rpb, dy, lse, delta, dq, partials, K, dilation, scale,
                                            neighborhood, config)
    meta, scalars, grid, num_warps, num_stages = _common("na2d_bwd_query", q, K, dilation, config)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, dy_ptr=dy, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
                drpb_ptr=partials, **scalars, scale=float(scale), scale_f64=float(scale),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("g", dy, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3), **_strides("dq", dq, 5))
    meta.update(BLOCK_R=_rpb_block(K), NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None,
                RPB_DOT=q.dtype != torch.float64, INDEX_64=needs_int64(q, k, v, dy, dq),
                ACC_DTYPE=_acc_dtype(q.dtype))
    return Launch(na2d_bwd_query_kernel, grid, args, meta, num_warps, num_stages, loops=(K * K,))

def backward_key_launch(q, k, v, rpb, dy, lse, delta, dk, dv, K, dilation, scale, neighborhood,
                        config=None) -> Launch:
    tiled = (config or {}).get("tiled", uses_tensor_cores("dkv", q.dtype, q.shape[-1], rpb is not None))
    if tiled and window_penalty(q.dtype, scale) is not None:
        return _backward_key_tiled_launch(q, k, v, rpb, dy, lse, delta, dk, dv, K, dilation, scale, neighborhood,
                                          config)
    meta, scalars, grid, num_warps, num_stages = _common("na2d_bwd_key", q, K, dilation, config)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, dy_ptr=dy, lse_ptr=lse, delta_ptr=delta, dk_ptr=dk,
                dv_ptr=dv, **scalars, scale=float(scale), scale_f64=float(scale),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("g", dy, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3), **_strides("dk", dk, 5),
                **_strides("dv", dv, 5))
    meta.update(NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, INDEX_64=needs_int64(q, k, v, dy, dk, dv),
                ACC_DTYPE=_acc_dtype(q.dtype))
    return Launch(na2d_bwd_key_kernel, grid, args, meta, num_warps, num_stages, loops=_HOLDER_LOOPS(K))


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated.
# --------------------------------------------------------------------------------------------

def na2d_forward(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config=None) -> None:
    forward_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config)()

def na2d_backward(dy, q, k, v, rpb, y, lse, dq, dk, dv, drpb, K, dilation, scale, neighborhood, config=None):
    """dq, dk, dv and (when ``rpb`` is given) drpb, from the forward's output and log-sum-exp."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (dy.to(acc) * y.to(acc)).sum(-1)
    if delta.stride() != lse.stride():  # the kernels read both through lse's strides
        lse = lse.contiguous()
        delta = delta.contiguous()
    partials = None if rpb is None else rpb_grad_buffer(q, K, dilation, scale, neighborhood, config)
    backward_query_launch(q, k, v, rpb, dy, lse, delta, dq, partials, K, dilation, scale, neighborhood, config)()
    backward_key_launch(q, k, v, rpb, dy, lse, delta, dk, dv, K, dilation, scale, neighborhood, config)()
    if rpb is None:
        drpb.zero_()
    elif partials.dim() == 6:
        _reduce_window_ds(partials, drpb, K, dilation, neighborhood)
    else:
        _reduce_rpb_partials(partials, drpb, K)

def _window_shifts(L: int, K: int, d: int, neighborhood: bool, device) -> torch.Tensor:
    """Per position along an axis: its window start minus its subsequence index, plus K - 1 (in
    [0, K); the rpb bin of its tap u is this plus u)."""
    pos = torch.arange(L)
    t, g = pos // d, pos % d
    start = t - K // 2
    if neighborhood:
        start = torch.minimum(start.clamp(min=0), (L - g + d - 1) // d - K)
    return (start - t + K - 1).to(device)

def _reduce_window_ds(ds, drpb, K, dilation, neighborhood) -> None:
    """drpb[h, a + u, c + v] = Σ ds[b, i, j, h, u, v] over the queries of window shifts (a, c): a sum
    over samples, then one-hot products (the shifts of rows, of columns, then the placement of each
    (shift, tap) on its bin). Fixed-order reductions and matmuls: deterministic, no atomics."""
    _, H, W, _, _, _ = ds.shape
    acc = torch.float64 if ds.dtype == torch.float64 else torch.float32
    total = ds.sum(0, dtype=acc)  # (H, W, heads, K, K)
    rows = torch.nn.functional.one_hot(_window_shifts(H, K, dilation[0], neighborhood, ds.device), K).to(acc)
    cols = torch.nn.functional.one_hot(_window_shifts(W, K, dilation[1], neighborhood, ds.device), K).to(acc)
    by_shift = torch.einsum("ia,jc,ijhuv->hacuv", rows, cols, total)
    tap = torch.arange(K, device=ds.device)
    place = torch.nn.functional.one_hot(tap[:, None] + tap[None, :], 2 * K - 1).to(acc)  # (shift, tap, bin)
    drpb.copy_(torch.einsum("hacuv,aur,cvs->hrs", by_shift, place, place))

def catalogue() -> list[Launch]:
    """The launches the op makes by default at representative shapes, on meta tensors (AOT checks)."""
    launches = []
    # fp16 compiles as bf16 does (same layouts, same registers): two dtypes keep the AOT test short.
    for B, H, W, heads, D, K, d, label in CATALOGUE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for neighborhood in (True, False):
                meta = dict(dtype=dtype, device="meta")
                q = torch.empty((B, H, W, heads, D), **meta)
                rpb = torch.empty((heads, 2 * K - 1, 2 * K - 1), **meta)
                acc = dict(dtype=torch.float32, device="meta")
                lse = torch.empty((B, H, W, heads), **acc)
                partials = torch.empty(rpb_partial_shape(q, K, (d, d)), **acc)
                if query_kernel_is_tiled(q, D ** -0.5):
                    partials = torch.empty((*window_ds_shape(q), K, K), dtype=dtype, device="meta")
                geometry = (K, (d, d), D ** -0.5, neighborhood)
                tag = f"{label} {dtype} {'neighborhood' if neighborhood else 'sliding'}"
                batch = [forward_launch(q, q, q, rpb, q, lse, *geometry),
                         backward_query_launch(q, q, q, rpb, q, lse, lse, q, partials, *geometry),
                         backward_key_launch(q, q, q, rpb, q, lse, lse, q, q, *geometry)]
                if uses_tensor_cores("dq", dtype, D):  # the tiled dq kernel without rpb too
                    batch.append(backward_query_launch(q, q, q, None, q, lse, lse, q, None, *geometry))
                for launch in batch:
                    launch.label = tag
                launches += batch
    return launches
