"""The unfused neighbourhood-attention pair (``na2d_qk``, ``na2d_av``) and ``ops/na2d_linear.py``:
three gathers of the window geometry of ``na2d_common.py``, on CUDA cores.

* ``na2d_tap_dots_kernel`` — per query and tap, a dot with the tap's key row: the scores q·k + rpb,
  and av's weight gradient dy·v;
* ``na2d_tap_sum_kernel`` — per query, the taps' rows weighted and summed: av's Σ attn·v, and qk's
  dq with the rpb-gradient partials;
* ``na2d_key_sum_kernel`` — per key, the sum over the queries whose windows hold it (the inverse
  neighbourhood): qk's dk and av's dv.

Deterministic: every element and every partial has exactly one writer, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, needs_int64
from .na2d_common import (CATALOGUE_SHAPES, _HOLDER_LOOPS, _acc_dtype, _axis, _common, _holders, _reduce_rpb_partials,
                          _rpb_block, _strides, _tile, _window_start, rpb_partial_shape)


@triton.jit
def na2d_tap_dots_kernel(
    x_ptr, y_ptr, rpb_ptr, out_ptr,
    H, W, HEADS, D, K, DH, DW,
    sxb, sxh, sxw, sxn, sxd,
    syb, syh, syw, syn, syd,
    srn, sri, srj,
    sob, soh, sow, son, sou, sov,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[q, u, v] = x[q]·y[key(q, u, v)] (+ rpb), MASKED where a sliding window leaves the image:
    the scores of na2d_qk (x = q, y = k) and the weight gradient of na2d_av (x = dy, y = v)."""
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    gi, ti, li, si = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, sj = _axis(j, W, K, DW, NEIGHBORHOOD)
    x = tl.load(x_ptr + b * sxb + h * sxn + (i * sxh + j * sxw)[:, None] + dd[None, :] * sxd,
                mask=inside[:, None] & dmask, other=0.0).to(ACC_DTYPE)
    y_head = y_ptr + b * syb + h * syn + dd[None, :] * syd
    out_pix = out_ptr + b * sob + h * son + i * soh + j * sow
    for tap in range(K * K):
        u = tap // K
        v = tap % K
        ki = si + u
        kj = sj + v
        ok = inside & (ki >= 0) & (ki < li) & (kj >= 0) & (kj < lj)
        y = tl.load(y_head + ((gi + ki * DH) * syh + (gj + kj * DW) * syw)[:, None], mask=ok[:, None] & dmask,
                    other=0.0)
        s = tl.sum(x * y.to(ACC_DTYPE), axis=1)
        if HAS_RPB:
            s += tl.load(rpb_ptr + h * srn + (ki - ti + K - 1) * sri + (kj - tj + K - 1) * srj,
                         mask=ok, other=0.0).to(ACC_DTYPE)
        s = tl.where(ok, s, MASKED)
        tl.store(out_pix + u * sou + v * sov, s.to(out_ptr.dtype.element_ty), mask=inside)

@triton.jit
def na2d_tap_sum_kernel(
    w_ptr, y_ptr, out_ptr, rpb_grad_ptr,
    H, W, HEADS, D, K, DH, DW,
    swb, swh, sww, swn, swu, swv,
    syb, syh, syw, syn, syd,
    sob, soh, sow, son, sod,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, RPB_GRAD: tl.constexpr, RPB_DOT: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """out[q] = Σ_taps w[q, u, v]·y[key(q, u, v)] over the taps inside the image: na2d_av (w = attn,
    y = v) and dq of na2d_qk (w = dscores, y = k, with the per-program rpb-gradient partial of w)."""
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    gi, ti, li, si = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, sj = _axis(j, W, K, DW, NEIGHBORHOOD)
    y_head = y_ptr + b * syb + h * syn + dd[None, :] * syd
    w_pix = w_ptr + b * swb + h * swn + i * swh + j * sww
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    r = tl.arange(0, BLOCK_R)
    partial = tl.zeros((BLOCK_R, BLOCK_R), ACC_DTYPE)
    for tap in range(K * K):
        u = tap // K
        v = tap % K
        ki = si + u
        kj = sj + v
        ok = inside & (ki >= 0) & (ki < li) & (kj >= 0) & (kj < lj)
        weight = tl.load(w_pix + u * swu + v * swv, mask=ok, other=0.0).to(ACC_DTYPE)
        y = tl.load(y_head + ((gi + ki * DH) * syh + (gj + kj * DW) * syw)[:, None], mask=ok[:, None] & dmask,
                    other=0.0)
        acc += weight[:, None] * y.to(ACC_DTYPE)
        if RPB_GRAD:
            rows = tl.where((ki - ti + K - 1)[:, None] == r[None, :], weight[:, None], 0.0)
            cols = tl.where((kj - tj + K - 1)[:, None] == r[None, :], 1.0, 0.0).to(ACC_DTYPE)
            if RPB_DOT:
                partial += tl.dot(tl.trans(rows), cols, input_precision="ieee")
            else:
                partial += tl.sum(rows[:, :, None] * cols[:, None, :], axis=0)
    tl.store(out_ptr + b * sob + h * son + (i * soh + j * sow)[:, None] + dd[None, :] * sod,
             acc.to(out_ptr.dtype.element_ty), mask=inside[:, None] & dmask)
    if RPB_GRAD:
        out = rpb_grad_ptr + tl.program_id(0) * (BLOCK_R * BLOCK_R)
        tl.store(out + r[:, None] * BLOCK_R + r[None, :], partial)

@triton.jit
def na2d_key_sum_kernel(
    w_ptr, x_ptr, out_ptr,
    H, W, HEADS, D, K, DH, DW,
    swb, swh, sww, swn, swu, swv,
    sxb, sxh, sxw, sxn, sxd,
    sob, soh, sow, son, sod,
    TILES, TILES_W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[key] = Σ_{q holding key} w[q, tap(q, key)]·x[q]: dk of na2d_qk (w = dscores, x = q) and dv
    of na2d_av (w = attn, x = dy), gathered from the inverse neighbourhood."""
    b, h, i, j = _tile(TILES, TILES_W, HEADS, BLOCK_H, BLOCK_W, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    inside = (i < H) & (j < W)
    dmask = (dd < D)[None, :]
    gi, ti, li, _ = _axis(i, H, K, DH, NEIGHBORHOOD)
    gj, tj, lj, _ = _axis(j, W, K, DW, NEIGHBORHOOD)
    lo_i, hi_i = _holders(ti, li, K, NEIGHBORHOOD)
    lo_j, hi_j = _holders(tj, lj, K, NEIGHBORHOOD)
    span_i = tl.max(tl.where(inside, hi_i - lo_i + 1, 0), axis=0)
    span_j = tl.max(tl.where(inside, hi_j - lo_j + 1, 0), axis=0)
    x_head = x_ptr + b * sxb + h * sxn + dd[None, :] * sxd
    w_head = w_ptr + b * swb + h * swn
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for ei in range(0, span_i):
        qi = lo_i + ei
        ok_i = inside & (qi <= hi_i)
        row = gi + qi * DH
        u = ti - _window_start(qi, li, K, NEIGHBORHOOD)
        for ej in range(0, span_j):
            qj = lo_j + ej
            ok = ok_i & (qj <= hi_j)
            col = gj + qj * DW
            v = tj - _window_start(qj, lj, K, NEIGHBORHOOD)
            weight = tl.load(w_head + row * swh + col * sww + u * swu + v * swv, mask=ok, other=0.0)
            x = tl.load(x_head + (row * sxh + col * sxw)[:, None], mask=ok[:, None] & dmask, other=0.0)
            acc += weight.to(ACC_DTYPE)[:, None] * x.to(ACC_DTYPE)
    tl.store(out_ptr + b * sob + h * son + (i * soh + j * sow)[:, None] + dd[None, :] * sod,
             acc.to(out_ptr.dtype.element_ty), mask=inside[:, None] & dmask)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def tap_dots_launch(x, y, rpb, out, K, dilation, neighborhood, masked: float, config=None) -> Launch:
    meta, scalars, grid, num_warps, num_stages = _common("na2d_tap_dots", x, K, dilation, config)
    args = dict(x_ptr=x, y_ptr=y, rpb_ptr=rpb, out_ptr=out, **scalars, **_strides("x", x, 5), **_strides("y", y, 5),
                **_strides("r", rpb, 3), **_strides("o", out, 6))
    meta.update(MASKED=masked, NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, INDEX_64=needs_int64(x, y, out),
                ACC_DTYPE=_acc_dtype(x.dtype))
    return Launch(na2d_tap_dots_kernel, grid, args, meta, num_warps, num_stages, loops=(K * K,))

def tap_sum_launch(w, y, out, partials, K, dilation, neighborhood, config=None) -> Launch:
    meta, scalars, grid, num_warps, num_stages = _common("na2d_tap_sum", y, K, dilation, config)
    args = dict(w_ptr=w, y_ptr=y, out_ptr=out, rpb_grad_ptr=partials, **scalars, **_strides("w", w, 6),
                **_strides("y", y, 5), **_strides("o", out, 5))
    meta.update(BLOCK_R=_rpb_block(K), NEIGHBORHOOD=neighborhood, RPB_GRAD=partials is not None,
                RPB_DOT=y.dtype != torch.float64, INDEX_64=needs_int64(w, y, out), ACC_DTYPE=_acc_dtype(y.dtype))
    return Launch(na2d_tap_sum_kernel, grid, args, meta, num_warps, num_stages, loops=(K * K,))

def key_sum_launch(w, x, out, K, dilation, neighborhood, config=None) -> Launch:
    meta, scalars, grid, num_warps, num_stages = _common("na2d_key_sum", x, K, dilation, config)
    args = dict(w_ptr=w, x_ptr=x, out_ptr=out, **scalars, **_strides("w", w, 6), **_strides("x", x, 5),
                **_strides("o", out, 5))
    meta.update(NEIGHBORHOOD=neighborhood, INDEX_64=needs_int64(w, x, out), ACC_DTYPE=_acc_dtype(x.dtype))
    return Launch(na2d_key_sum_kernel, grid, args, meta, num_warps, num_stages, loops=_HOLDER_LOOPS(K))


# --------------------------------------------------------------------------------------------
# Entry points used by ops/: they write into outputs the caller allocated.
# --------------------------------------------------------------------------------------------

def na2d_qk_forward(q, k, rpb, scores, K, dilation, neighborhood, config=None) -> None:
    tap_dots_launch(q, k, rpb, scores, K, dilation, neighborhood, float("-inf"), config)()

def na2d_qk_backward(grad, q, k, dq, dk, drpb, K, dilation, neighborhood, config=None) -> None:
    """dq and dk of the scores; drpb too unless it is None."""
    partials = None
    if drpb is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        partials = torch.empty(rpb_partial_shape(k, K, dilation, config, "na2d_tap_sum"), dtype=acc, device=q.device)
    tap_sum_launch(grad, k, dq, partials, K, dilation, neighborhood, config)()
    key_sum_launch(grad, q, dk, K, dilation, neighborhood, config)()
    if drpb is not None:
        _reduce_rpb_partials(partials, drpb, K)

def na2d_av_forward(attn, v, y, K, dilation, neighborhood, config=None) -> None:
    tap_sum_launch(attn, v, y, None, K, dilation, neighborhood, config)()

def na2d_av_backward(grad, attn, v, dattn, dv, K, dilation, neighborhood, config=None) -> None:
    """dattn (zero on taps outside the image) and dv."""
    tap_dots_launch(grad, v, None, dattn, K, dilation, neighborhood, 0.0, config)()
    key_sum_launch(attn, grad, dv, K, dilation, neighborhood, config)()

def na2d_dots(x, y, out, K, dilation, neighborhood, config=None) -> None:
    """``out[i, t] = x_i · y_n(i,t)``, zero on taps outside the image (ops/na2d_linear.py)."""
    tap_dots_launch(x, y, None, out, K, dilation, neighborhood, 0.0, config)()

def na2d_key_sum(w, x, out, K, dilation, neighborhood, config=None) -> None:
    """``out[j] = Σ_{(i,t): n(i,t) = j} w[i, t] · x_i`` (ops/na2d_linear.py)."""
    key_sum_launch(w, x, out, K, dilation, neighborhood, config)()

def catalogue() -> list[Launch]:
    """The launches the unfused pair makes by default at na2d's catalogue shapes, on meta tensors. The
    window kind changes two index lines: the shifted ("neighborhood") window stands for both."""
    launches = []
    for B, H, W, heads, D, K, d, label in CATALOGUE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            meta = dict(dtype=dtype, device="meta")
            q = torch.empty((B, H, W, heads, D), **meta)
            rpb = torch.empty((heads, 2 * K - 1, 2 * K - 1), **meta)
            scores = torch.empty((B, H, W, heads, K, K), **meta)
            window = (K, (d, d), True)
            partials = torch.empty(rpb_partial_shape(q, K, (d, d), kernel="na2d_tap_sum"), dtype=torch.float32,
                                   device="meta")
            batch = [tap_dots_launch(q, q, rpb, scores, *window, float("-inf")),
                     tap_sum_launch(scores, q, q, partials, *window),
                     key_sum_launch(scores, q, q, *window)]
            for launch in batch:
                launch.label = f"{label} {dtype} neighborhood"
            launches += batch
    return launches
