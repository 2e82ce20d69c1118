"""Neighbourhood attention on tensor cores (fp16/bf16, D >= 16): the tiled kernels ``na2d.py``'s
launchers dispatch to.

``na2d_fwd_tiled_kernel``, ``na2d_bwd_query_tiled_kernel`` (dq, and with a learnt rpb ds per
(query, tap), which ``na2d._reduce_window_ds`` sums by bin) and ``na2d_bwd_key_tiled_kernel`` (dk,
dv) take a tile of 8 x 8 queries (or keys), its union window (or its holders' union) flattened into
chunks, and mask the pairs outside each query's window through a one-hot feature product
accumulated under the scores (``_window_features``): no per-pair integer work. fp32 stays on the
CUDA-core kernels (exact products, no silent TF32), as does D < 16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import TRITON_VERSION, Launch, cdiv, needs_int64, next_power_of_2
from .configs import get_config
from .na2d_common import _acc_dtype, _fp64_scales, _holders, _strides, _window_start, problem_key


@triton.jit
def _query_tile(H, W, HEADS, DH, DW, TILES, TILES_W, K: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr, NEIGHBORHOOD: tl.constexpr, INDEX_64: tl.constexpr):
    """The tiled kernels' program: one (sample, head), one dilation group (gi, gj) and a
    ``BLOCK_H x BLOCK_W`` tile of that group's subsequence, so all its queries' windows lie in the
    group. Returns the sample, head, group, subsequence lengths, the queries' subsequence indices,
    whether they are in the image, their window starts, the union window's first row and column, and
    their image positions. Window starts are 1-Lipschitz in the query index, hence the union window
    along an axis starts at the first query's start and spans at most ``BLOCK + K - 1`` indices."""
    pid = tl.program_id(0)
    tile = pid % TILES
    rest = pid // TILES
    group = rest % (DH * DW)
    bh = rest // (DH * DW)
    b = bh // HEADS
    h = bh % HEADS
    gi = group // DW
    gj = group % DW
    li = (H - gi + DH - 1) // DH
    lj = (W - gj + DW - 1) // DW
    t0i = (tile // TILES_W) * BLOCK_H
    t0j = (tile % TILES_W) * BLOCK_W
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    ti = t0i + p // BLOCK_W
    tj = t0j + p % BLOCK_W
    inside = (ti < li) & (tj < lj)
    si = _window_start(ti, li, K, NEIGHBORHOOD)
    sj = _window_start(tj, lj, K, NEIGHBORHOOD)
    lo_i = _window_start(t0i, li, K, NEIGHBORHOOD)
    lo_j = _window_start(t0j, lj, K, NEIGHBORHOOD)
    i = gi + ti * DH
    j = gj + tj * DW
    if INDEX_64:
        b = b.to(tl.int64)
        h = h.to(tl.int64)
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return b, h, gi, gj, li, lj, ti, tj, inside, si, sj, lo_i, lo_j, i, j

@triton.jit
def _window_features(si, sj, lo_i, lo_j, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, ONE: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """The window mask as a product accumulated under the scores, its query side ``[Q, F]``: ONE on the
    slot of the query's window start row (``si - lo_i``, in ``[0, BLOCK_H)``: starts are monotone and
    1-Lipschitz in the query index) and on that of its start column (``BLOCK_H + sj - lo_j``). A key's
    features (``_union_keys``) are PENALTY on every start slot whose window misses it, so q_f·k_f is
    exactly 0 on the query's own keys and <= PENALTY·ONE elsewhere: -2^100 (-2^30 in fp16, whose
    operands stop at 2^15), which no score of finite inputs offsets and exp2 turns into exactly 0 next
    to any key of the window (every query in the image has one: its centre). Indexing the starts, not
    the union's rows and columns, keeps the product's depth at BLOCK_H + BLOCK_W, whatever K."""
    f = tl.arange(0, BLOCK_F)
    slot = (f[None, :] == (si - lo_i)[:, None]) | (f[None, :] == (BLOCK_H + sj - lo_j)[:, None])
    return tl.where(slot, ONE, 0.0).to(DOT_DTYPE)

@triton.jit
def _union_keys(n0, gi, gj, li, lj, lo_i, lo_j, DH, DW, K: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PENALTY: tl.constexpr,
                NEIGHBORHOOD: tl.constexpr, INDEX_64: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The ``BLOCK_N`` keys from ``n0`` on of the flattened union window: their subsequence rows and columns, the image
    row and column to load them from (clamped into the image: a key outside it, or past the union,
    loads a real row unmasked and its features drop it), and the keys' features ``[F, N]``: PENALTY on
    the start slots (``_window_features``) whose window misses the key; on every slot for a key past
    the union or, in a sliding window, outside the image. A neighbourhood window never leaves the
    image, so there the features depend on the chunk only."""
    union_h: tl.constexpr = BLOCK_H + K - 1
    union_w: tl.constexpr = BLOCK_W + K - 1
    n = n0 + tl.arange(0, BLOCK_N)
    nr = n // union_w
    nc = n % union_w
    kr = lo_i + nr
    kc = lo_j + nc
    row = gi + tl.minimum(tl.maximum(kr, 0), li - 1) * DH
    col = gj + tl.minimum(tl.maximum(kc, 0), lj - 1) * DW
    if INDEX_64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    # Slot f < BLOCK_H: window rows [lo_i + f, lo_i + f + K); then the columns likewise.
    offset = tl.where(f < BLOCK_H, f, f - BLOCK_H)[:, None]
    along = tl.where((f < BLOCK_H)[:, None], nr[None, :], nc[None, :])
    missed = ((along - offset).to(tl.uint32) >= K) | (n >= union_h * union_w)[None, :]
    if not NEIGHBORHOOD:
        missed |= ~((kr >= 0) & (kr < li) & (kc >= 0) & (kc < lj))[None, :]
    features = tl.where(missed & (f < BLOCK_H + BLOCK_W)[:, None], PENALTY, 0.0).to(DOT_DTYPE)
    return kr, kc, row, col, features

@triton.jit
def _load_rows(head, row, col, srow, scol, dmask, EVEN_D: tl.constexpr):
    """``[N, D]`` rows at (row, col), unmasked where D fills the block (rows are always in the image)."""
    if EVEN_D:
        return tl.load(head + (row * srow + col * scol)[:, None])
    return tl.load(head + (row * srow + col * scol)[:, None], mask=dmask, other=0.0)

# Heads of up to this many features read a chunk's rpb before its scores (``_pair_bias``).
EARLY_BIAS_FEATURES = tl.constexpr(64)

@triton.jit
def _pair_bias(rpb_head, key_i, key_j, query_i, query_j, sri, srj, mask, K: tl.constexpr):
    """The rpb of each (query, key) pair from their bins, read before the scores exist: the relative
    position key - query is clamped into the table, so a pair off the query's window reads some
    bin (in bounds) and its score, which the window's mask makes <= PENALTY·ONE, drops it. Masked by
    the score instead, the read waits for the products: a round trip more a chunk (PREDICTED,
    triton 3.6, bf16: N1-rpb fwd 12.5% -> 19.7%, N2-rpb dq 9.6% -> 19.4%). Up to
    ``EARLY_BIAS_FEATURES`` features a head: the [queries, keys] bias held through the products
    spilled the D = 128 forward and dq on sm_80."""
    rel_i = tl.minimum(tl.maximum(key_i - query_i, 1 - K), K - 1)
    rel_j = tl.minimum(tl.maximum(key_j - query_j, 1 - K), K - 1)
    return tl.load(rpb_head + rel_i * sri + rel_j * srj, mask=mask, other=0.0)

@triton.jit
def _raw_scores(q, q_features, key, k_features, rpb_head, query_bins, ti, tj, kr, kc, sri, srj, inside, inv_scale,
                K: tl.constexpr, PENALTY: tl.constexpr, ONE: tl.constexpr, HAS_RPB: tl.constexpr,
                EARLY_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """``q·k + rpb/scale`` on the query's own keys, ``<= PENALTY·ONE`` elsewhere ([Q, N], fp32). The
    rpb of a pair (query bins ti, tj; key bins kr, kc): EARLY_BIAS, read before the products
    (``_pair_bias``); else after them, masked by the score, at ``rpb_head + key bins - query_bins``
    (one subtraction per pair). Lanes outside the image read no rpb: their clamped window is no
    window of theirs, its offsets not bins."""
    if HAS_RPB and EARLY_BIAS:
        bias = _pair_bias(rpb_head, kr[None, :], kc[None, :], ti[:, None], tj[:, None], sri, srj, inside[:, None], K)
    s = tl.dot(q_features, k_features, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    s = tl.dot(q, tl.trans(key.to(DOT_DTYPE)), s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_RPB and EARLY_BIAS:
        s += tl.where(s > 0.5 * PENALTY * ONE, bias.to(ACC_DTYPE) * inv_scale, 0.0)
    elif HAS_RPB:
        s += tl.load(rpb_head + ((kr * sri + kc * srj)[None, :] - query_bins[:, None]),
                     mask=inside[:, None] & (s > 0.5 * PENALTY * ONE), other=0.0).to(ACC_DTYPE) * inv_scale
    return s

@triton.jit
def _bias_head(rpb_ptr, h, srn, sri, srj, K: tl.constexpr, HAS_RPB: tl.constexpr):
    """The rpb entry of relative position (0, 0) of head ``h``: a pair (query t, key u) per axis reads
    bin ``u - t + K - 1``, at ``_bias_head(...) + (u·sri + u'·srj) - (t·sri + t'·srj)``."""
    head = rpb_ptr
    if HAS_RPB:
        head = rpb_ptr + h * srn + (K - 1) * (sri + srj)
    return head

@triton.jit
def _forward_chunk(n0, q, q_features, m, total, acc, k_head, v_head, skh, skw, svh, svw, dmask, rpb_head,
                   query_bins, sri, srj, gi, gj, li, lj, lo_i, lo_j, ti, tj, inside, DH, DW, scale2, inv_scale, K: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                   PENALTY: tl.constexpr, ONE: tl.constexpr, NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr,
                   INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """One online-softmax step of the tiled forward over the union keys ``n0 .. n0 + BLOCK_N``."""
    kr, kc, row, col, k_features = _union_keys(n0, gi, gj, li, lj, lo_i, lo_j, DH, DW, K, BLOCK_H, BLOCK_W,
                                               BLOCK_N, BLOCK_F, PENALTY, NEIGHBORHOOD, INDEX_64, DOT_DTYPE)
    key = _load_rows(k_head, row, col, skh, skw, dmask, EVEN_D)
    # The values with the keys, before the scores' dot: after it their round trip came on top.
    value = _load_rows(v_head, row, col, svh, svw, dmask, EVEN_D)
    s = _raw_scores(q, q_features, key, k_features, rpb_head, query_bins, ti, tj, kr, kc, sri, srj, inside,
                    inv_scale, K, PENALTY, ONE, HAS_RPB, key.shape[1] <= EARLY_BIAS_FEATURES, ACC_DTYPE, DOT_DTYPE,
                    DOT_PRECISION)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2((m - m_new) * scale2)
    weights = tl.exp2(s * scale2 - (m_new * scale2)[:, None])
    total = total * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + tl.dot(weights.to(DOT_DTYPE), value.to(DOT_DTYPE), input_precision=DOT_PRECISION,
                                        out_dtype=ACC_DTYPE)
    return m_new, total, acc

@triton.jit
def na2d_fwd_tiled_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, y_ptr, lse_ptr,
    H, W, HEADS, D, DH, DW, scale2, inv_scale, ln2, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    syb, syh, syw, syn, syd,
    slb, slh, slw, sln,
    srn, sri, srj,
    TILES, TILES_W, CHUNKS,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr, BLOCK_F: tl.constexpr, PENALTY: tl.constexpr, ONE: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """The forward of ``na2d_fwd_kernel`` on tensor cores: the tile's union window (``_query_tile``),
    flattened and cut into ``CHUNKS`` chunks of ``BLOCK_N`` keys and a tail of ``TAIL_N`` (the rest,
    a power of two >= 16, or none: less padding than a last full chunk), each a ``[Q, D] x [D, N]``
    score product and a ``[Q, N] x [N, D]`` aggregation, the pairs outside a query's window masked by
    ``_window_features``.
    K is a compile-time constant here: the flattened union index splits into (row, column) by a
    constant divisor, a multiply and shift.

    Raw scores t = q·k (+ rpb / scale) and their running max m; the softmax in base 2, one fused
    multiply-add per score: exp2(t·scale2 - m·scale2), scale2 = scale·log2(e) > 0. The constants are
    arguments (in float64 derived from ``scale_f64``, ``_fp64_scales``)."""
    if ACC_DTYPE == tl.float64:
        _, scale2, inv_scale, _, ln2 = _fp64_scales(scale_f64)
    b, h, gi, gj, li, lj, ti, tj, inside, si, sj, lo_i, lo_j, i, j = _query_tile(
        H, W, HEADS, DH, DW, TILES, TILES_W, K, BLOCK_H, BLOCK_W, NEIGHBORHOOD, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    dmask = (dd < D)[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqn + (i * sqh + j * sqw)[:, None] + dd[None, :] * sqd,
                mask=inside[:, None] & dmask, other=0.0).to(DOT_DTYPE)
    k_head = k_ptr + b * skb + h * skn + dd[None, :] * skd
    v_head = v_ptr + b * svb + h * svn + dd[None, :] * svd
    q_features = _window_features(si, sj, lo_i, lo_j, BLOCK_H, BLOCK_F, ONE, DOT_DTYPE)
    rpb_head = _bias_head(rpb_ptr, h, srn, sri, srj, K, HAS_RPB)
    query_bins = ti * sri + tj * srj
    m = tl.full((BLOCK_H * BLOCK_W,), float("-inf"), ACC_DTYPE)
    total = tl.zeros((BLOCK_H * BLOCK_W,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for c in range(0, CHUNKS):
        m, total, acc = _forward_chunk(
            c * BLOCK_N, q, q_features, m, total, acc, k_head, v_head, skh, skw, svh, svw, dmask, rpb_head,
            query_bins, sri, srj, gi, gj, li, lj, lo_i, lo_j, ti, tj, inside, DH, DW, scale2, inv_scale, K, BLOCK_H, BLOCK_W,
            BLOCK_N, BLOCK_F, PENALTY, ONE, NEIGHBORHOOD, HAS_RPB, INDEX_64, ACC_DTYPE, DOT_DTYPE, DOT_PRECISION,
            EVEN_D)
    if TAIL_N > 0:
        m, total, acc = _forward_chunk(
            CHUNKS * BLOCK_N, q, q_features, m, total, acc, k_head, v_head, skh, skw, svh, svw, dmask, rpb_head,
            query_bins, sri, srj, gi, gj, li, lj, lo_i, lo_j, ti, tj, inside, DH, DW, scale2, inv_scale, K, BLOCK_H,
            BLOCK_W, TAIL_N, BLOCK_F, PENALTY, ONE, NEIGHBORHOOD, HAS_RPB, INDEX_64, ACC_DTYPE, DOT_DTYPE,
            DOT_PRECISION, EVEN_D)
    safe = tl.where(total > 0, total, 1.0)  # lanes outside the image
    # One reciprocal per query, not an IEEE division per element (~10 instructions each).
    y = acc * (1.0 / safe)[:, None]
    tl.store(y_ptr + b * syb + h * syn + (i * syh + j * syw)[:, None] + dd[None, :] * syd,
             y.to(y_ptr.dtype.element_ty), mask=inside[:, None] & dmask)
    tl.store(lse_ptr + b * slb + h * sln + i * slh + j * slw, (m * scale2 + tl.log2(safe)) * ln2, mask=inside)

@triton.jit
def na2d_bwd_query_tiled_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, dy_ptr, lse_ptr, delta_ptr, dq_ptr, ds_ptr,
    H, W, HEADS, D, DH, DW, scale, scale2, inv_scale, log2e, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    slb, slh, slw, sln,
    srn, sri, srj,
    sdqb, sdqh, sdqw, sdqn, sdqd,
    sdsb, sdsh, sdsw, sdsn, sdsu, sdsv,
    TILES, TILES_W, CHUNKS,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr, PENALTY: tl.constexpr, ONE: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dq of ``na2d_bwd_query_kernel`` on tensor cores, over the forward's tiles and chunks: per chunk
    p = exp2(t·scale2 - lse·log2e), dp = dy·vᵀ and dq += (p·(dp - delta))·k, three products.
    With RPB_GRAD, ds of every pair in a query's window (and in the image) is also stored, in window
    order ``ds[b, i, j, h, u, v]`` (tap (u, v) = key - window start): the bin of a pair depends on both
    query and key, so the tile cannot sum ds by bin; ``_reduce_window_ds`` does, by the queries' window
    shifts. Each (query, tap) is one pair of the union: one writer. The store address is a per-query
    base plus a per-key offset, one addition per pair; the in-window test is the score's own."""
    if ACC_DTYPE == tl.float64:
        scale, scale2, inv_scale, log2e, _ = _fp64_scales(scale_f64)
    b, h, gi, gj, li, lj, ti, tj, inside, si, sj, lo_i, lo_j, i, j = _query_tile(
        H, W, HEADS, DH, DW, TILES, TILES_W, K, BLOCK_H, BLOCK_W, NEIGHBORHOOD, INDEX_64)
    dd = tl.arange(0, BLOCK_D)
    dmask = (dd < D)[None, :]
    mask2 = inside[:, None] & dmask
    q = tl.load(q_ptr + b * sqb + h * sqn + (i * sqh + j * sqw)[:, None] + dd[None, :] * sqd,
                mask=mask2, other=0.0).to(DOT_DTYPE)
    dy = tl.load(dy_ptr + b * sgb + h * sgn + (i * sgh + j * sgw)[:, None] + dd[None, :] * sgd,
                 mask=mask2, other=0.0).to(DOT_DTYPE)
    stat = b * slb + h * sln + i * slh + j * slw
    # A lane outside the image gets lse = +inf: p = 0, no overflow in rows nobody stores.
    lse2 = tl.load(lse_ptr + stat, mask=inside, other=float("inf")).to(ACC_DTYPE) * log2e
    delta = tl.load(delta_ptr + stat, mask=inside, other=0.0).to(ACC_DTYPE)
    k_head = k_ptr + b * skb + h * skn + dd[None, :] * skd
    v_head = v_ptr + b * svb + h * svn + dd[None, :] * svd
    q_features = _window_features(si, sj, lo_i, lo_j, BLOCK_H, BLOCK_F, ONE, DOT_DTYPE)
    rpb_head = _bias_head(rpb_ptr, h, srn, sri, srj, K, HAS_RPB)
    query_bins = ti * sri + tj * srj
    ds_window = ds_ptr
    if RPB_GRAD:
        ds_window = ds_ptr + b * sdsb + h * sdsn + i * sdsh + j * sdsw - (si * sdsu + sj * sdsv)
    dq = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for c in range(0, CHUNKS):
        kr, kc, row, col, k_features = _union_keys(c * BLOCK_N, gi, gj, li, lj, lo_i, lo_j, DH, DW, K, BLOCK_H, BLOCK_W,
                                                   BLOCK_N, BLOCK_F, PENALTY, NEIGHBORHOOD, INDEX_64,
                                                   DOT_DTYPE)
        key = _load_rows(k_head, row, col, skh, skw, dmask, EVEN_D).to(DOT_DTYPE)
        value = _load_rows(v_head, row, col, svh, svw, dmask, EVEN_D).to(DOT_DTYPE)  # with the keys (forward)
        s = _raw_scores(q, q_features, key, k_features, rpb_head, query_bins, ti, tj, kr, kc, sri, srj, inside,
                        inv_scale, K, PENALTY, ONE, HAS_RPB, BLOCK_D <= EARLY_BIAS_FEATURES, ACC_DTYPE,
                        DOT_DTYPE, DOT_PRECISION)
        p = tl.exp2(s * scale2 - lse2[:, None])
        dp = tl.dot(dy, tl.trans(value), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), key, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if RPB_GRAD:
            tl.store(ds_window[:, None] + (kr * sdsu + kc * sdsv)[None, :], ds.to(ds_ptr.dtype.element_ty),
                     mask=inside[:, None] & (s > 0.5 * PENALTY * ONE))
    tl.store(dq_ptr + b * sdqb + h * sdqn + (i * sdqh + j * sdqw)[:, None] + dd[None, :] * sdqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask2)

@triton.jit
def na2d_bwd_key_tiled_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, dy_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, W, HEADS, D, DH, DW, scale, scale2, inv_scale, log2e, scale_f64: tl.float64,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    slb, slh, slw, sln,
    srn, sri, srj,
    sdkb, sdkh, sdkw, sdkn, sdkd,
    sdvb, sdvh, sdvw, sdvn, sdvd,
    TILES, TILES_W,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK_H: tl.constexpr, BLOCK_F: tl.constexpr, PENALTY: tl.constexpr, ONE: tl.constexpr,
    NEIGHBORHOOD: tl.constexpr, HAS_RPB: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dk and dv of ``na2d_bwd_key_kernel`` on tensor cores. A program owns a tile of keys (the
    forward's query tiling, ``_query_tile``); the queries whose windows hold them form, per axis, the
    range from the first key's first holder to the last key's last holder (holder ranges are monotone),
    at most ``BLOCK + 2K - 2`` long. That union is cut into ``CHUNK_H x CHUNK_W`` blocks of
    ``BLOCK_N`` queries (a run-time row loop around a column loop: no division per query); per
    chunk, keys as rows: sᵀ = k·qᵀ, pᵀ = exp2(sᵀ·scale2 - lse·log2e), dv += pᵀ·dy, dpᵀ = v·dyᵀ,
    dk += (pᵀ·(dpᵀ - delta))·q. The mask is ``_window_features``' product with the roles swapped: a
    key's features are ONE on its row's and its column's slot in the tile, a query's are PENALTY on
    every key row and column its window misses. Queries outside the image or past the union read
    lse = +inf (p = 0). Each key has one writer: deterministic, no atomics."""
    if ACC_DTYPE == tl.float64:
        scale, scale2, inv_scale, log2e, _ = _fp64_scales(scale_f64)
    CHUNK_W: tl.constexpr = BLOCK_N // CHUNK_H
    b, h, gi, gj, li, lj, ti, tj, inside, _, _, _, _, i, j = _query_tile(
        H, W, HEADS, DH, DW, TILES, TILES_W, K, BLOCK_H, BLOCK_W, NEIGHBORHOOD, INDEX_64)
    t0i = tl.min(ti, axis=0)
    t0j = tl.min(tj, axis=0)
    lo_i, _ = _holders(t0i, li, K, NEIGHBORHOOD)
    lo_j, _ = _holders(t0j, lj, K, NEIGHBORHOOD)
    _, hi_i = _holders(tl.minimum(t0i + BLOCK_H - 1, li - 1), li, K, NEIGHBORHOOD)
    _, hi_j = _holders(tl.minimum(t0j + BLOCK_W - 1, lj - 1), lj, K, NEIGHBORHOOD)
    dd = tl.arange(0, BLOCK_D)
    dmask = (dd < D)[None, :]
    mask2 = inside[:, None] & dmask
    key = tl.load(k_ptr + b * skb + h * skn + (i * skh + j * skw)[:, None] + dd[None, :] * skd,
                  mask=mask2, other=0.0).to(DOT_DTYPE)
    value = tl.load(v_ptr + b * svb + h * svn + (i * svh + j * svw)[:, None] + dd[None, :] * svd,
                    mask=mask2, other=0.0).to(DOT_DTYPE)
    f = tl.arange(0, BLOCK_F)
    k_features = tl.where((f[None, :] == (ti - t0i)[:, None]) | (f[None, :] == (BLOCK_H + tj - t0j)[:, None]),
                          ONE, 0.0).to(DOT_DTYPE)
    # Slot f < BLOCK_H: key row t0i + f; then the key columns likewise.
    slot_key = tl.where(f < BLOCK_H, t0i + f, t0j + f - BLOCK_H)[:, None]
    n = tl.arange(0, BLOCK_N)
    # Relative to the key, a holder sits at minus its offset: the bin of (query, key) is key - query.
    rpb_head = _bias_head(rpb_ptr, h, srn, sri, srj, K, HAS_RPB)
    key_bins = ti * sri + tj * srj
    q_head = q_ptr + b * sqb + h * sqn + dd[None, :] * sqd
    dy_head = dy_ptr + b * sgb + h * sgn + dd[None, :] * sgd
    stat_head = lse_ptr + b * slb + h * sln
    delta_head = delta_ptr + b * slb + h * sln
    dk = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), ACC_DTYPE)
    for r0 in range(lo_i, hi_i + 1, CHUNK_H):
        qr = r0 + n // CHUNK_W
        row = gi + tl.minimum(qr, li - 1) * DH
        if INDEX_64:
            row = row.to(tl.int64)
        start_i = _window_start(qr, li, K, NEIGHBORHOOD)
        for c0 in range(lo_j, hi_j + 1, CHUNK_W):
            qc = c0 + n % CHUNK_W
            valid = (qr <= hi_i) & (qc <= hi_j)
            col = gj + tl.minimum(qc, lj - 1) * DW
            if INDEX_64:
                col = col.to(tl.int64)
            query = _load_rows(q_head, row, col, sqh, sqw, dmask, EVEN_D).to(DOT_DTYPE)
            grad = _load_rows(dy_head, row, col, sgh, sgw, dmask, EVEN_D).to(DOT_DTYPE)
            lse2 = tl.load(stat_head + row * slh + col * slw, mask=valid, other=float("inf")).to(ACC_DTYPE) * log2e
            delta = tl.load(delta_head + row * slh + col * slw, mask=valid, other=0.0).to(ACC_DTYPE)
            start = tl.where((f < BLOCK_H)[:, None], start_i[None, :],
                             _window_start(qc, lj, K, NEIGHBORHOOD)[None, :])
            missed = ((slot_key - start).to(tl.uint32) >= K) & (f < BLOCK_H + BLOCK_W)[:, None]
            q_features = tl.where(missed, PENALTY, 0.0).to(DOT_DTYPE)
            early_bias: tl.constexpr = HAS_RPB and BLOCK_D <= EARLY_BIAS_FEATURES
            if early_bias:
                bias = _pair_bias(rpb_head, ti[:, None], tj[:, None], qr[None, :], qc[None, :], sri, srj,
                                  inside[:, None] & valid[None, :], K)
            s = tl.dot(k_features, q_features, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            s = tl.dot(key, tl.trans(query), s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if early_bias:
                s += tl.where(s > 0.5 * PENALTY * ONE, bias.to(ACC_DTYPE) * inv_scale, 0.0)
            elif HAS_RPB:
                s += tl.load(rpb_head + (key_bins[:, None] - (qr * sri + qc * srj)[None, :]),
                             mask=inside[:, None] & valid[None, :] & (s > 0.5 * PENALTY * ONE),
                             other=0.0).to(ACC_DTYPE) * inv_scale
            p = tl.exp2(s * scale2 - lse2[None, :])
            dv = tl.dot(p.to(DOT_DTYPE), grad, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dp = tl.dot(value, tl.trans(grad), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ds = p * (dp - delta[None, :])
            dk = tl.dot(ds.to(DOT_DTYPE), query, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(dk_ptr + b * sdkb + h * sdkn + (i * sdkh + j * sdkw)[:, None] + dd[None, :] * sdkd,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask2)
    tl.store(dv_ptr + b * sdvb + h * sdvn + (i * sdvh + j * sdvw)[:, None] + dd[None, :] * sdvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask2)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

def tiled_config(q, K: int, dilation, config=None, kernel: str = "na2d_fwd_tiled") -> dict:
    """The tile of the tensor-core kernels: 8 x 8 queries (the 64 rows one warpgroup's wgmma needs)
    and 32-key chunks of their union window, 64 in the forward (with its tail, the union's padding
    stays under 16 keys) up to D = 64, but for a gathered rpb at D <= 32; 16 at D = 128 (all spill on
    sm_80 otherwise). From `dynconv inspect --bounds` (triton 3.6, sm_90) at N1 and N2: 4 x 8 or
    4 x 4 tiles at 1-2 warps (mma.sync) waste fewer products but issue more per score; 16 x 8 or 8
    warps and 128-key chunks are slower; a second pipeline stage adds issue. The key-side kernel
    keeps six [Q, D] tiles live: 16-query chunks from D = 64 and 8 warps at D = 128 keep it from
    spilling."""
    default = {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if q.shape[-1] <= 64 and (kernel == "na2d_fwd_tiled" or (kernel == "na2d_fwd_tiled_rpb" and q.shape[-1] > 32)):
        default.update(BLOCK_N=64)
    if kernel.startswith("na2d_fwd_tiled") and q.shape[-1] > 64:
        default.update(BLOCK_N=16)
    if kernel == "na2d_bwd_key_tiled" and q.shape[-1] > 32:
        default.update(BLOCK_N=16, num_warps=8 if q.shape[-1] > 64 else 4)
    return config or get_config(kernel, problem_key(q, K, dilation), default)

def _tiled_common(q, K, dilation, config, kernel="na2d_fwd_tiled"):
    B, H, W, heads, D = q.shape
    cfg = tiled_config(q, K, dilation, config, kernel)
    bh, bw, bn = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    # Tiles cover the longest subsequence of each axis (group 0's); shorter groups mask their tail.
    tiles_w = cdiv(cdiv(W, dilation[1]), bw)
    tiles = cdiv(cdiv(H, dilation[0]), bh) * tiles_w
    chunks = cdiv((bh + K - 1) * (bw + K - 1), bn)
    meta = {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_D": max(16, next_power_of_2(D)), "BLOCK_N": bn}
    scalars = dict(H=H, W=W, HEADS=heads, D=D, DH=dilation[0], DW=dilation[1], TILES=tiles, TILES_W=tiles_w,
                   CHUNKS=chunks)
    # The query tile's window start rows, then its start columns (``_window_features``).
    meta.update(K=K, BLOCK_F=max(16, next_power_of_2(bh + bw)))
    grid = (tiles * dilation[0] * dilation[1] * B * heads, 1, 1)
    return meta, scalars, grid, cfg.get("num_warps", 4), cfg.get("num_stages", 1)

def _dot_types(dtype: torch.dtype) -> dict:
    """The tiled kernels' tl.dot operand type and precision. fp32 and fp64 reach them only when a
    test asks: exact products, not TF32. The interpreter multiplies bf16 tiles wrongly (triton 3.6
    and 3.9), so there bf16 operands are widened to fp32: exact, as the tensor cores' products are."""
    from ._launch import kernels_are_interpreted

    if dtype == torch.float16 or (dtype == torch.bfloat16 and not kernels_are_interpreted()):
        return {"DOT_DTYPE": {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "DOT_PRECISION": "tf32"}
    return {"DOT_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32, "DOT_PRECISION": "ieee"}

def window_penalty(dtype: torch.dtype, scale: float) -> dict | None:
    """The tiled kernels' mask features (``_window_features``): PENALTY on the query side, ONE on the
    key side, their product -2^100 (-2^30 in fp16, whose operands stop at 2^15). None where the
    softmax cannot be taken in base 2 by a positive factor (scale <= 0) or the product times
    scale·log2(e) would not reach -2^11 (exp2 of it exactly 0 in fp32): then the CUDA-core kernels run."""
    penalty, one = (-(2.0 ** 15), 2.0 ** 15) if dtype == torch.float16 else (-(2.0 ** 100), 1.0)
    if not scale > 0 or penalty * one * scale * math.log2(math.e) > -(2.0 ** 11):
        return None
    return {"PENALTY": penalty, "ONE": one}

# Register caps on sm_90 for 16-bit tiled launches, where triton 3.6's ptxas fits them a residency
# step lower without a spill (newer ptxas spill under each, 32-112 bytes): (kernel, with a learnt
# rpb) -> (registers, largest head). With an rpb the forward (heads of up to 64 features) and the
# key-side kernel (up to 32) take 149-166 registers, three four-warp programs an SM; at 128 four fit
# (PREDICTED, sm_90, bf16: N2-rpb fwd 21.3% -> 25.6%, N1-rpb fwd 19.7% -> 22.1%, N1-rpb dkv 23.9% ->
# 28.2%; N2-rpb dkv and the rpb dq kernels spill 40-48 bytes). dq without an rpb (up to 32 features)
# takes 82, five programs an SM; at 80 six fit (N1 dq bf16 42.0% -> 62.7%; 64 features spill).
SM90_REGISTER_CAPS = ({("fwd", True): (128, 64), ("dkv", True): (128, 32), ("dq", False): (80, 32)}
                      if TRITON_VERSION <= (3, 6) else {})


def _register_cap(kernel: str, rpb, q) -> int:
    """The sm_90 register cap of a tiled launch (0: none), from SM90_REGISTER_CAPS."""
    registers, max_d = SM90_REGISTER_CAPS.get((kernel, rpb is not None), (0, 0))
    return registers if q.element_size() == 2 and q.shape[-1] <= max_d else 0


def _forward_tiled_launch(q, k, v, rpb, y, lse, K, dilation, scale, neighborhood, config=None) -> Launch:
    kernel = "na2d_fwd_tiled" if rpb is None else "na2d_fwd_tiled_rpb"
    meta, scalars, grid, num_warps, num_stages = _tiled_common(q, K, dilation, config, kernel)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, y_ptr=y, lse_ptr=lse, **scalars,
                scale2=float(scale) * math.log2(math.e), inv_scale=1.0 / float(scale), ln2=math.log(2.0),
                scale_f64=float(scale),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("y", y, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3))
    meta.update(NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, INDEX_64=needs_int64(q, k, v, y),
                **window_penalty(q.dtype, scale), ACC_DTYPE=_acc_dtype(q.dtype), EVEN_D=meta["BLOCK_D"] == q.shape[-1], **_dot_types(q.dtype))
    # Full chunks, then the rest of the union in the smallest power-of-two tail tl.dot takes (16 keys).
    bn = meta["BLOCK_N"]
    union = (meta["BLOCK_H"] + K - 1) * (meta["BLOCK_W"] + K - 1)
    chunks, tail = divmod(union, bn)
    tail = 0 if tail == 0 else max(16, next_power_of_2(tail))
    if tail >= bn:
        chunks, tail = chunks + 1, 0
    args["CHUNKS"] = chunks
    meta["TAIL_N"] = tail
    return Launch(na2d_fwd_tiled_kernel, grid, args, meta, num_warps, num_stages, loops=(chunks,),
                  sm90_max_registers=_register_cap("fwd", rpb, q))

def _backward_query_tiled_launch(q, k, v, rpb, dy, lse, delta, dq, ds, K, dilation, scale, neighborhood,
                                 config=None) -> Launch:
    meta, scalars, grid, num_warps, num_stages = _tiled_common(q, K, dilation, config, "na2d_bwd_query_tiled")
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, dy_ptr=dy, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
                ds_ptr=ds, **_strides("ds", ds, 6), **scalars, scale=float(scale), scale_f64=float(scale),
                scale2=float(scale) * math.log2(math.e), inv_scale=1.0 / float(scale), log2e=math.log2(math.e),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("g", dy, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3), **_strides("dq", dq, 5))
    meta.update(NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, RPB_GRAD=ds is not None,
                INDEX_64=needs_int64(q, k, v, dy, dq, ds),
                **window_penalty(q.dtype, scale), ACC_DTYPE=_acc_dtype(q.dtype),
                EVEN_D=meta["BLOCK_D"] == q.shape[-1], **_dot_types(q.dtype))
    return Launch(na2d_bwd_query_tiled_kernel, grid, args, meta, num_warps, num_stages, loops=(scalars["CHUNKS"],),
                  sm90_max_registers=_register_cap("dq", rpb, q))

def _backward_key_tiled_launch(q, k, v, rpb, dy, lse, delta, dk, dv, K, dilation, scale, neighborhood,
                               config=None) -> Launch:
    meta, scalars, grid, num_warps, num_stages = _tiled_common(q, K, dilation, config, "na2d_bwd_key_tiled")
    # The holders' union spans BLOCK + K - 1 queries per axis away from the borders (up to BLOCK + 2K - 2
    # next to one): the chunk shape that wastes the fewest of them there, and its trip counts, which
    # the static model weights the loops by. The key features need one slot per key row and column.
    bh, bw, bn = meta["BLOCK_H"], meta["BLOCK_W"], meta["BLOCK_N"]
    del scalars["CHUNKS"]
    chunk_h = holder_chunk_rows(bh + K - 1, bw + K - 1, bn)
    meta["CHUNK_H"] = chunk_h
    loops = ((cdiv(bh + K - 1, chunk_h), (cdiv(bw + K - 1, bn // chunk_h),)),)
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, dy_ptr=dy, lse_ptr=lse, delta_ptr=delta, dk_ptr=dk,
                dv_ptr=dv, **scalars, scale=float(scale), scale_f64=float(scale),
                scale2=float(scale) * math.log2(math.e), inv_scale=1.0 / float(scale), log2e=math.log2(math.e),
                **_strides("q", q, 5), **_strides("k", k, 5), **_strides("v", v, 5), **_strides("g", dy, 5),
                **_strides("l", lse, 4), **_strides("r", rpb, 3), **_strides("dk", dk, 5),
                **_strides("dv", dv, 5))
    meta.update(NEIGHBORHOOD=neighborhood, HAS_RPB=rpb is not None, INDEX_64=needs_int64(q, k, v, dy, dk, dv),
                **window_penalty(q.dtype, scale), ACC_DTYPE=_acc_dtype(q.dtype),
                EVEN_D=meta["BLOCK_D"] == q.shape[-1], **_dot_types(q.dtype))
    return Launch(na2d_bwd_key_tiled_kernel, grid, args, meta, num_warps, num_stages, loops=loops,
                  sm90_max_registers=_register_cap("dkv", rpb, q))

def holder_chunk_rows(extent_h: int, extent_w: int, block_n: int) -> int:
    """Rows of the key-side kernel's ``CHUNK_H x (BLOCK_N / CHUNK_H)`` query chunks: the power of two
    whose chunks cover an ``extent_h x extent_w`` union with the fewest queries (the squarer on a tie)."""
    shapes = [(1 << e, block_n >> e) for e in range(block_n.bit_length()) if 1 << e <= block_n]
    return min(shapes, key=lambda hw: (cdiv(extent_h, hw[0]) * hw[0] * cdiv(extent_w, hw[1]) * hw[1],
                                       abs(hw[0] - hw[1])))[0]
