"""The expert conv's kernel gradient (docs/operators.md §2): ``dW[b,r] = Σ_{p in region r} dy[b,:,p] ⊗
patch[b,p,:]`` per (sample, region), as an implicit GEMM whose reduction runs over the pixels, and
the bias gradient of regions ``dbias[b,r] = Σ_{p in region r} dy[b,:,p]``.

Summed over pixels inside a program, optionally split over ``SPLITS`` pixel chunks whose fp32
partials the caller adds in a fixed order: deterministic, no float atomics. The bias gradient per
(sample, region) is a launch of its own (``region_bias_grad_kernel``): summed in the kernel
gradient's programs it cost every one of them a row sum a step, though a ninth stored it
(PREDICTED, triton 3.6, D1 dw: bf16 NHWC 40.7 -> 35.8 us without it, fp32 NCHW 108.5 -> 57.1 us:
the sums' registers had halved the programs an SM holds). ``dW`` is fp32 ``(SPLITS, B, m, Cout, Cin/g, kh, kw)``
laid out with Cin/g innermost (``kernel_grad_buffer``); the contraction down to experts, routing
and spatial is a few small GEMMs left to the caller (ops/).

The forward, input gradient and guide scores, and what they share with this pass (region tables,
problem keys, the catalogue's layers), are ``kernels/expert_conv.py``'s. Kernels here know nothing
of autograd: ``ops/expert_conv.py`` wires them into torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._indexing import widen
from ._launch import (Launch, cacheable, cdiv, config_key, is_channels_last, layout, needs_int64, next_power_of_2,
                      planned)
from .configs import get_config
from .expert_conv import (INT64_CATALOGUE_GEOMETRY, INT64_CATALOGUE_SHAPE, _acc_dtype, _acc_torch_dtype, _block_k,
                          _geometry_args, _input_precision, _pow2_between, _region_tensors, _per_kernel, _regions_key,
                          catalogue_problems, channels_last_stand_in, problem_key)
from . import region_conv
from .region_tables import RegionTables, meta_region_tables
from .expert_conv_input_grad import input_grad_copies_output_grad
from .layout import channels_last_copy

# Below this many programs the kernel-gradient pass splits each region's pixels (fills the GPU).
WEIGHT_GRAD_MIN_PROGRAMS = 264


@triton.jit
def _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, q0, hi, o_ok, k_ok, u, v,
                      H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                      BLOCK_K: tl.constexpr, TAP_LOOP: tl.constexpr, HAS_GUIDE: tl.constexpr, INDEX_64: tl.constexpr,
                      DY_FLAT: tl.constexpr):
    """The kernel gradient's gathered pixel step from ``q0``: (dy tile (o x pixels), patch tile (pixels x k)).

    Pixel q of the (sample, region) is its q-th in region order (HAS_GUIDE) or in raster order;
    a pixel past ``hi`` reads zeros. DY_FLAT (raster order, dy's pixels one unit-stride axis): dy's
    tile is read at its flat pixel offsets, in 16-byte vectors along the pixels."""
    q = q0 + tl.arange(0, BLOCK_K)
    q_ok = q < hi
    if HAS_GUIDE:
        p = tl.load(perm_ptr + b * P + start + q, mask=q_ok, other=0)
    else:
        p = q
    if INDEX_64:
        p = p.to(tl.int64)
    i = p // Wo
    j = p % Wo
    if DY_FLAT:
        grad = tl.load(dy_sample + (dy_row[:, None] + p[None, :]), mask=o_ok[:, None] & q_ok[None, :], other=0.0)
    else:
        grad = tl.load(dy_sample + (dy_row[:, None] + (i * sdyh + j * sdyw)[None, :]),
                       mask=o_ok[:, None] & q_ok[None, :], other=0.0)
    if TAP_LOOP:
        h = i * SH - PH + u * DH
        w = j * SW - PW + v * DW
        ok = q_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        patch = tl.load(x_sample + (x_col[None, :] + (h * sxh + w * sxw)[:, None]), mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
    else:
        h = (i * SH - PH)[:, None] + (u * DH)[None, :]
        w = (j * SW - PW)[:, None] + (v * DW)[None, :]
        ok = q_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        patch = tl.load(x_sample + (x_col[None, :] + h * sxh + w * sxw), mask=ok, other=0.0)
    return grad, patch


@triton.jit
def expert_conv_bwd_weight_kernel(
    dy_ptr, x_ptr, pixel_start_ptr, count_ptr, perm_ptr, dw_ptr,
    H, W, Ho, Wo, P, CIN_G, COUT_G, KH, KW, NUM_REGIONS, SPLITS, O_TILES, C_TILES,
    sdyb, sdyc, sdyh, sdyw,
    sxb, sxc, sxh, sxw,
    sdw_s, sdw_b, sdw_r, sdw_o, sdw_i, sdw_u, sdw_v,
    SH, SW, PH, PW, DH, DW,
    TAP_LOOP: tl.constexpr, FLAT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_GUIDE: tl.constexpr, PREFETCH: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DY_FLAT: tl.constexpr,
):
    """dw[s, b, r, o, k] = Σ_{p in chunk s of region r} dy[b, o, p] · patch[b, p, k]. Axis 0 is (b, r, s).
    The bias gradient is not summed here: a row sum per K-step (conversions, adds and shuffles on
    every program, though only the first k tile's would be stored) costs more issue slots than the MMA.

    TAP_LOOP: a program's k tile is BLOCK_N channels of one tap (axis 2 is (tap, channel tile)), so
    a pixel step forms the patch rows' positions and padding mask once per pixel, not per element.
    Otherwise the tile spans the flattened k = (u·kw + v)·CIN_G + c (fewer channels than BLOCK_N).

    FLAT (per tap, no guide, NCHW-like: both images pixel-contiguous, stride 1, Ho·Wo = H·W): a pixel
    step is BLOCK_K consecutive flat pixels, so dy is read with aligned vector loads and the patch as
    one shifted run per channel, both with lanes along the pixels (the reduction axis, K-major for
    wgmma); the per-element (i, j) split then only forms the padding mask.
    """
    pid = tl.program_id(0)
    s = pid % SPLITS
    br = pid // SPLITS
    b = br // NUM_REGIONS
    r = br % NUM_REGIONS
    pid_o = tl.program_id(1)
    pid_k = tl.program_id(2)
    g = pid_o // O_TILES
    on = (pid_o % O_TILES) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = on < COUT_G
    if TAP_LOOP:
        tap = pid_k // C_TILES
        c = (pid_k % C_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = c < CIN_G
    else:
        k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = k < CIN_G * KH * KW
        tap = k // CIN_G
        c = k % CIN_G
    if HAS_GUIDE:
        start = tl.load(pixel_start_ptr + b * NUM_REGIONS + r)
        count = tl.load(count_ptr + b * NUM_REGIONS + r)
    else:
        start = 0
        count = P
    chunk = tl.cdiv(tl.cdiv(count, SPLITS), BLOCK_K) * BLOCK_K
    lo = s * chunk
    hi = tl.minimum(lo + chunk, count)
    if INDEX_64:
        b = b.to(tl.int64)
        on = on.to(tl.int64)
        g = g.to(tl.int64)
        c = c.to(tl.int64)
        tap = tap.to(tl.int64)
        s = s.to(tl.int64)
        r = r.to(tl.int64)
    o = g * COUT_G + on
    u = tap // KW
    v = tap % KW
    # What the pixel loop reads is kept as offsets from per-sample base pointers, and the k part of the
    # dw offset is formed before the loop: c, u and v then die there instead of being held through it.
    dy_sample = dy_ptr + b * sdyb
    dy_row = o * sdyc
    x_sample = x_ptr + b * sxb
    x_col = (g * CIN_G + c) * sxc
    dw_col = c * sdw_i + u * sdw_u + v * sdw_v
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=ACC_DTYPE)
    if FLAT:
        # The tap's shift in flat pixels (x's rows are W = Wo apart): x[c, p + shift] is patch[p, c].
        rise = u * DH - PH
        run = v * DW - PW
        # Pointers stepped by BLOCK_K pixels: one 64-bit add an element a step, no address product.
        x_step = x_sample + ((x_col + rise * sxh + run)[None, :] + (lo + tl.arange(0, BLOCK_K))[:, None])
    if FLAT:
        for q0 in range(lo, hi, BLOCK_K):
            q = q0 + tl.arange(0, BLOCK_K)
            q_ok = q < hi
            if INDEX_64:
                q = q.to(tl.int64)
            grad = tl.load(dy_sample + (dy_row[:, None] + q[None, :]), mask=o_ok[:, None] & q_ok[None, :], other=0.0)
            i = q // Wo + rise
            j = q % Wo + run
            ok = q_ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)
            patch = tl.load(x_step, mask=ok[:, None] & k_ok[None, :], other=0.0)
            x_step += BLOCK_K
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    elif PREFETCH:
        # Register double buffering instead of triton's cp.async pipeline: the step after next is
        # loaded with vectors along the channels before this step's MMA, and the copy to shared
        # memory (transposed to K-major for tf32) is the compiler's. See default_weight_grad_config.
        grad, patch = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, lo, hi, o_ok,
                                        k_ok, u, v, H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                                        BLOCK_K, TAP_LOOP, HAS_GUIDE, INDEX_64, DY_FLAT)
        for q0 in range(lo, hi, BLOCK_K):
            grad_next, patch_next = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start,
                                                      q0 + BLOCK_K, hi, o_ok, k_ok, u, v, H, W, Wo, sdyh, sdyw,
                                                      sxh, sxw, SH, SW, PH, PW, DH, DW, BLOCK_K, TAP_LOOP,
                                                      HAS_GUIDE, INDEX_64, DY_FLAT)
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            grad = grad_next
            patch = patch_next
    else:
        for q0 in range(lo, hi, BLOCK_K):
            grad, patch = _weight_grad_step(dy_sample, dy_row, x_sample, x_col, perm_ptr, b, P, start, q0, hi, o_ok,
                                            k_ok, u, v, H, W, Wo, sdyh, sdyw, sxh, sxw, SH, SW, PH, PW, DH, DW,
                                            BLOCK_K, TAP_LOOP, HAS_GUIDE, INDEX_64, DY_FLAT)
            acc = tl.dot(grad, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dw_off = s * sdw_s + b * sdw_b + r * sdw_r + (o * sdw_o)[:, None] + dw_col[None, :]
    tl.store(dw_ptr + dw_off, acc, mask=o_ok[:, None] & k_ok[None, :])


@triton.jit
def region_bias_grad_kernel(dy_ptr, pixel_start_ptr, count_ptr, perm_ptr, dbias_ptr, P, Wo, COUT, NUM_REGIONS,
                            sdyb, sdyc, sdyh, sdyw, sdb_b, sdb_r,
                            BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
                            INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dbias[b, r, o] = Σ_{p in region r} dy[b, o, p] for BLOCK_O channels: a program per (sample,
    region, channel tile) walks the region's pixels (perm[start : start + count]) BLOCK_P at a time,
    in a fixed order. FLAT: a pixel's offset is p · sdyw (NCHW-contiguous or channels_last dy)."""
    br = tl.program_id(0)
    b = widen(br // NUM_REGIONS, INDEX_64)
    r = widen(br % NUM_REGIONS, INDEX_64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < COUT
    start = tl.load(pixel_start_ptr + b * NUM_REGIONS + r)
    count = tl.load(count_ptr + b * NUM_REGIONS + r)
    rows = dy_ptr + b * sdyb + widen(o, INDEX_64)[:, None] * sdyc
    acc = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    for q0 in range(0, count, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        q_ok = q < count
        p = widen(tl.load(perm_ptr + b * P + start + q, mask=q_ok, other=0), INDEX_64)
        if FLAT:
            offset = p * sdyw
        else:
            offset = (p // Wo) * sdyh + (p % Wo) * sdyw
        grad = tl.load(rows + offset[None, :], mask=o_ok[:, None] & q_ok[None, :], other=0.0)
        acc += tl.sum(grad.to(ACC_DTYPE), axis=1)
    tl.store(dbias_ptr + b * sdb_b + r * sdb_r + o, acc, mask=o_ok)


# --------------------------------------------------------------------------------------------
# Host side: configurations, buffers, launches
# --------------------------------------------------------------------------------------------

def default_weight_grad_config(cout_g: int, k_total: int, dtype: torch.dtype, cin_g: int = 0,
                               channels_last: bool = False, flat: bool = False, regions: bool = False) -> dict:
    """``flat``: NCHW at stride 1 with one region, where the kernel's FLAT pixel steps apply when the
    output is as large as the input (the usual padding; the key does not tell, else the gathered
    steps run these tiles)."""
    if regions and channels_last and dtype.itemsize in (2, 4) and cin_g >= 64 and cout_g >= 64:
        # DRConv: a (sample, region, tap) program sums a region's ~Ho·Wo/m pixels, a couple of steps
        # reached through the region's pixel list, so the kernel runs many short programs, each a
        # chain of round trips (counts, pixel ids, then the operands): 128-byte pixel steps in
        # triton's pipeline, five deep, fit two programs an SM where 64-pixel steps (or fp32's
        # register double buffer) fit one (PREDICTED, triton 3.6, D1 dw NHWC: bf16 10% -> 23%,
        # fp32 8.8% -> 18%).
        return {"BLOCK_O": _pow2_between(cout_g, 16, 128), "BLOCK_N": min(128, 1 << (cin_g.bit_length() - 1)),
                "BLOCK_K": 64 // dtype.itemsize, "num_warps": 8, "num_stages": 5}
    # Eight warps whatever the dtype: at four, a 4-byte 64 x 64 tile needs about 170 registers a
    # thread, and ptxas 12.8 (triton 3.6) spills a few to fit three blocks per SM on sm_80.
    # Columns: one tap's channels (a power of two within them, so the kernel loops per tap).
    block_n = min(64, 1 << (cin_g.bit_length() - 1)) if cin_g >= 16 else _pow2_between(k_total, 16, 64)
    if dtype.itemsize == 2 and cin_g >= 64 and cout_g >= 64 and (channels_last or flat):
        # 128 x 128 x 64 tiles, three stages: two 64 x 128 wgmma groups per pixel step. Not for the
        # gathered NCHW steps, whose 2-byte scalar loads of both operands then take over 255
        # registers on sm_80; FLAT steps load dy by cp.async (C256 dw bf16 NCHW PREDICTED on
        # triton 3.6: 64 x 64 x 32 25% -> 87%).
        return {"BLOCK_O": _pow2_between(cout_g, 16, 128), "BLOCK_N": min(128, 1 << (cin_g.bit_length() - 1)),
                "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    if dtype.itemsize == 4 and cin_g >= 64 and cout_g >= 64:
        # fp32, both layouts: 128 x 128 x 32. tf32 wgmma reads both operands K-major, and neither dy
        # nor the patch is pixel-contiguous in channels_last: triton's cp.async pipeline copied each
        # to shared memory four bytes at a time. One stage instead, where the kernel double-buffers
        # in registers (PREFETCH): 16-byte loads along the channels, transposed on the way to shared
        # memory (E1 dw fp32 NHWC PREDICTED on triton 3.6: 60% -> 98%, C256/E2 66% -> 100%). NCHW
        # steps 16 pixels: its scalar patch loads at 32 spill on sm_80 with triton 3.9; FLAT steps,
        # K-major already, take triton's cp.async pipeline, four stages deep, and 32 pixels (C256 dw
        # fp32 NCHW PREDICTED on triton 3.6 with the latency term: 2/3/4 stages 41/68/100%).
        return {"BLOCK_O": _pow2_between(cout_g, 16, 128), "BLOCK_N": min(128, 1 << (cin_g.bit_length() - 1)),
                "BLOCK_K": 32 if channels_last or flat else 16, "num_warps": 8, "num_stages": 4 if flat else 1}
    return {"BLOCK_O": _pow2_between(cout_g, 16, 64), "BLOCK_N": block_n,
            "BLOCK_K": _block_k(dtype), "num_warps": 8, "num_stages": 2}


def weight_grad_config(x, experts, m, groups, stride) -> dict:
    _, Cout, cin_g, kh, kw = experts.shape
    return get_config("expert_conv_bwd_weight", problem_key(x, experts, m, groups, stride),
                      default_weight_grad_config(Cout // groups, cin_g * kh * kw, x.dtype, cin_g,
                                                 is_channels_last(x), flat_capable(m, stride, is_channels_last(x)),
                                                 m > 1))


def weight_grad_copies_inputs(dy, x, m: int, groups: int, stride) -> bool:
    """Whether a kernel gradient on NCHW ``dy`` and ``x`` reads channels_last copies of them
    (``kernels/layout.py``): 64 or more channels a group on both sides, 2- or 4-byte operands,
    32-bit offsets, the tiles whose channels_last pipeline the NCHW steps do not match (PREDICTED on
    triton 3.6, sm_90, the copies counted: C256 dw bf16 NCHW 33% -> 86%; DRConv's region steps
    gather NCHW a scalar at a time, D1 dw bf16 NCHW 3.6% -> 20%). Not fp32 FLAT steps:
    pixel-contiguous operands are what tf32 reads (K-major), and 4-byte elements stream through
    cp.async at any shift (C256 dw fp32 NCHW 100% at four stages, no copy); 2-byte ones at odd
    shifts do not (with regions no step is FLAT)."""
    if is_channels_last(x) or x.element_size() not in (2, 4) or needs_int64(dy, x):
        return False
    if x.element_size() == 4 and m == 1 and flat_pixels(dy, x, stride):
        return False
    return min(x.shape[1], dy.shape[1]) // groups >= 64


def reads_output_grad_flat(dy, m: int) -> bool:
    """Whether the kernel gradient reads NCHW 16-bit ``dy`` in place beside x's channels_last copy
    (its DY_FLAT steps): one region, dy's pixels one unit-stride axis of a multiple of 16 (so the
    compiler sees every channel plane start 16-byte aligned). dy is the K-major operand, read along
    the pixels whatever the tap: only the patch's shifted runs need the copy (PREDICTED, triton 3.6:
    the same 149.8 us at E2 bf16 NCHW, where dy's copy cost a backward 47.8 us more)."""
    Ho, Wo = dy.shape[2:]
    return (m == 1 and dy.element_size() == 2 and tuple(dy.stride()[1:]) == (Ho * Wo, Wo, 1)
            and (Ho * Wo) % 16 == 0)


def weight_grad_copies_output_grad(dy, x, m: int, groups: int, stride) -> bool:
    """Whether a kernel gradient on NCHW ``dy`` reads a channels_last copy of it: where it copies x
    (:func:`weight_grad_copies_inputs`) and does not read dy in place (:func:`reads_output_grad_flat`)."""
    return (not is_channels_last(dy) and weight_grad_copies_inputs(dy, x, m, groups, stride)
            and not reads_output_grad_flat(dy, m))


def operands_read(dy, x, m: int, groups: int, stride, to_channels_last):
    """(dy, x) as a kernel gradient on them reads them: x through ``to_channels_last`` (a copy, or a
    meta stand-in for the catalogue and the static model) where it copies x, dy too where it copies dy."""
    if not weight_grad_copies_inputs(dy, x, m, groups, stride):
        return dy, x
    if weight_grad_copies_output_grad(dy, x, m, groups, stride):
        dy = to_channels_last(dy)
    return dy, to_channels_last(x)


def backward_shares_output_grad(dy, x, experts, routing, groups: int, stride, padding, dilation,
                                has_spatial: bool = False) -> bool:
    """Whether a backward that runs the input gradient and the kernel gradient on NCHW ``dy`` should
    copy dy to channels_last once for both: where the input gradient copies it and the kernel
    gradient copies x (given a channels_last dy both read it as it is). The kernel gradient then reads
    that copy even where it could read dy in place (:func:`reads_output_grad_flat`): the copy is made
    anyway, and its channels_last steps beat the flat ones (PREDICTED, triton 3.6: E1 dw bf16 NCHW
    91.5 us on the copy, 96.6 us flat). ``experts`` and ``routing`` as those passes' entry points
    take them."""
    shaped, m = _per_kernel(experts, routing)
    if is_channels_last(dy) or not weight_grad_copies_inputs(dy, x, m, groups, stride):
        return False
    # With regions the input gradient is region_conv's, which reads dy channels_last wherever it runs.
    if m > 1:
        return region_conv.backward_input_supported(dy, x, m)
    return input_grad_copies_output_grad(dy, x, shaped, m, groups, stride, padding, dilation, has_spatial)


def flat_capable(m: int, stride, channels_last: bool) -> bool:
    """What the problem key tells of ``flat_pixels``: NCHW, stride 1, no regions (padding not known)."""
    return m == 1 and tuple(stride) == (1, 1) and not channels_last


def weight_grad_splits(B: int, m: int, cout: int, groups: int, k_total: int, pixels: int, config: dict) -> int:
    """Pixel chunks per (sample, region): enough programs to fill a GPU, each chunk >= 4 K-steps."""
    programs = B * m * groups * cdiv(cout // groups, config["BLOCK_O"]) * cdiv(k_total, config["BLOCK_N"])
    wanted = cdiv(WEIGHT_GRAD_MIN_PROGRAMS, programs)
    return max(1, min(wanted, pixels // (m * 4 * config["BLOCK_K"])))


def kernel_grad_buffer(splits: int, B: int, m: int, cout: int, cin_g: int, kernel_hw, dtype: torch.dtype,
                       device) -> torch.Tensor:
    """The weight gradient's partials ``(splits, B, m, Cout, Cin/g, kh, kw)`` laid out with Cin/g
    innermost, as :func:`_channels_innermost` lays the experts: a program's tile (output channels x
    channels of one tap, or the flattened taps x channels) is then stored in contiguous 16-byte
    rows, not as fp32 scalars kh·kw apart (a sector each). D1 dw bf16 NHWC PREDICTED 11.5% -> 28.7%
    on triton 3.6, where each (sample, region) sums about a hundred pixels before its store."""
    kh, kw = kernel_hw
    buffer = torch.empty((splits, B, m, cout, kh, kw, cin_g), dtype=dtype, device=device)
    return buffer.movedim(-1, 4)


def backward_weight_launch(dy, x, regions: RegionTables | None, dw, kernel_hw, groups, stride, padding, dilation,
                           config: dict) -> Launch:
    """``dw``: (SPLITS, B, m, Cout, Cin/g, kh, kw), fp32/fp64."""
    if not cacheable(x):
        return _backward_weight_launch(dy, x, regions, dw, kernel_hw, groups, stride, padding, dilation, config)
    key = ("expert_conv_bwd_weight", layout(dy), layout(x), _regions_key(regions), layout(dw),
           tuple(kernel_hw), groups, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("dy_ptr", "x_ptr", "dw_ptr", "pixel_start_ptr", "count_ptr", "perm_ptr"),
                   (dy, x, dw, *_region_tensors(regions, ("pixel_start", "count", "perm"))),
                   lambda: _backward_weight_launch(dy, x, regions, dw, kernel_hw, groups, stride, padding,
                                                   dilation, config))


def flat_pixels(dy, x, stride) -> bool:
    """Whether dy's and x's pixels are one flat, unit-stride axis of the same size, tap by tap a
    shifted run of the other's (NCHW, stride 1, output as large as the input): the weight
    gradient's FLAT pixel steps."""
    (_, _, H, W), (Ho, Wo) = x.shape, dy.shape[2:]
    return (tuple(stride) == (1, 1) and (H, W) == (Ho, Wo) and x.stride()[2:] == (W, 1)
            and dy.stride()[2:] == (Wo, 1))


def _backward_weight_launch(dy, x, regions: RegionTables | None, dw, kernel_hw, groups, stride, padding, dilation,
                            config: dict) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    splits, m = dw.shape[0], dw.shape[2]
    kh, kw = kernel_hw
    meta = {k: config[k] for k in ("BLOCK_O", "BLOCK_N", "BLOCK_K")}
    o_tiles = cdiv(Cout // groups, meta["BLOCK_O"])
    # Per tap while a group's channels fill the column block (see the kernel), else flattened.
    tap_loop = Cin // groups >= meta["BLOCK_N"]
    c_tiles = cdiv(Cin // groups, meta["BLOCK_N"])
    k_tiles = kh * kw * c_tiles if tap_loop else cdiv((Cin // groups) * kh * kw, meta["BLOCK_N"])
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw,
        pixel_start_ptr=regions.pixel_start if regions is not None else None,
        count_ptr=regions.count if regions is not None else None,
        perm_ptr=regions.perm if regions is not None else None,
        H=H, W=W, Ho=Ho, Wo=Wo, P=Ho * Wo, CIN_G=Cin // groups, COUT_G=Cout // groups, KH=kh, KW=kw,
        NUM_REGIONS=m, SPLITS=splits, O_TILES=o_tiles, C_TILES=c_tiles,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sdw_s", "sdw_b", "sdw_r", "sdw_o", "sdw_i", "sdw_u", "sdw_v"), dw.stride())),
        **_geometry_args(stride, padding, dilation),
    )
    flat = tap_loop and regions is None and flat_pixels(dy, x, stride)
    index_64 = needs_int64(dy, x, dw)
    stages = config.get("num_stages", 2)
    # One stage: the gathered steps double-buffer in registers themselves (the kernel's PREFETCH).
    # Not the 64-bit variants, which take triton's two-stage pipeline instead: the register buffer
    # spilled a 64-bit fp32 DRConv on sm_80 (4 local loads and stores, triton 3.6).
    gathered_one_stage = not flat and stages == 1
    prefetch = gathered_one_stage and not index_64
    if gathered_one_stage and index_64:
        stages = 2
    # dy read in place beside x's channels_last copy (reads_output_grad_flat), by the pipelined steps.
    dy_flat = not flat and not prefetch and is_channels_last(x) and reads_output_grad_flat(dy, m)
    meta.update(TAP_LOOP=tap_loop, FLAT=flat, DY_FLAT=dy_flat, HAS_GUIDE=regions is not None, PREFETCH=prefetch,
                INDEX_64=index_64, ACC_DTYPE=_acc_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype))
    if groups * o_tiles > 65535 or k_tiles > 65535:
        raise ValueError("too many tiles for the grid; use larger BLOCK_O/BLOCK_N")
    # Pixels per (sample, region, split): the mean region size when a guide splits the pixels.
    chunk = cdiv(cdiv(cdiv(Ho * Wo, m), splits), meta["BLOCK_K"])
    return Launch(expert_conv_bwd_weight_kernel, (splits * B * m, groups * o_tiles, k_tiles), args, meta,
                  config.get("num_warps", 4), stages, loops=(chunk,))


def region_bias_grad_launch(dy, regions: RegionTables, dbias) -> Launch:
    """The bias gradient of regions into ``dbias`` (B, m, Cout), fp32/fp64, Cout contiguous: 16 channels
    by 128 pixels a step, two warps. A program's path is its chain of dependent loads (the counts, the
    pixel ids, dy), so most regions take one step: PREDICTED (triton 3.6, D1 dy, bf16 channels_last)
    3.0 us, 10.1 with 128 channels by 32 pixels (a round trip per step and four steps); NCHW 4.1 us."""
    B, Cout, Ho, Wo = dy.shape
    m = regions.num_regions
    block_o = min(16, next_power_of_2(Cout))
    block_p = 128
    sdyb, sdyc, sdyh, sdyw = dy.stride()
    if dbias.stride(2) != 1:
        raise ValueError("the bias gradient's channels must be contiguous")
    return Launch(region_bias_grad_kernel, (B * m, cdiv(Cout, block_o), 1),
                  dict(dy_ptr=dy, pixel_start_ptr=regions.pixel_start, count_ptr=regions.count, perm_ptr=regions.perm,
                       dbias_ptr=dbias, P=Ho * Wo, Wo=Wo, COUT=Cout, NUM_REGIONS=m, sdyb=sdyb, sdyc=sdyc, sdyh=sdyh,
                       sdyw=sdyw, sdb_b=dbias.stride(0), sdb_r=dbias.stride(1)),
                  dict(BLOCK_O=block_o, BLOCK_P=block_p, FLAT=sdyh == Wo * sdyw, INDEX_64=needs_int64(dy, dbias),
                       ACC_DTYPE=_acc_dtype(dy.dtype)), 2, 1,
                  loops=(cdiv(cdiv(Ho * Wo, m), block_p),))  # the mean region's pixels


# --------------------------------------------------------------------------------------------
# The entry point used by ops/: it allocates the partials and sums them.
# --------------------------------------------------------------------------------------------

def launch_with_partials(dy, x, regions: RegionTables | None, m: int, groups: int, kernel_hw, geometry,
                         config: dict, buffer=None) -> tuple[Launch, torch.Tensor]:
    """The kernel-gradient launch and the partials it writes, dW's pixel splits, on dy's device in the
    accumulation dtype. ``buffer(name, build)`` gives the partials tensor (the tuner's cache of
    them); by default ``build()``, a new one."""
    B, Cin = x.shape[:2]
    Cout, pixels = dy.shape[1], dy.shape[2] * dy.shape[3]
    splits = weight_grad_splits(B, m, Cout, groups, Cin // groups * kernel_hw[0] * kernel_hw[1], pixels, config)
    acc = dict(dtype=_acc_torch_dtype(x.dtype), device=dy.device)
    buffer = buffer or (lambda name, build: build())
    dw = buffer(("dw", splits), lambda: kernel_grad_buffer(splits, B, m, Cout, Cin // groups, kernel_hw, **acc))
    return backward_weight_launch(dy, x, regions, dw, kernel_hw, groups, *geometry, config), dw


def expert_conv_backward_kernel(dy, x, regions: RegionTables | None, num_regions: int, groups, kernel_hw, stride,
                                padding, dilation, config: dict | None = None):
    """Gradient of the per-(sample, region) kernels and biases: fp32 (fp64) ``dW (B, m, Cout, Cin/g, kh, kw)``,
    the fixed-order sum of the pixel-chunk partials, and ``dbias (B, m, Cout)`` (each region's pixel sum
    of dy; without regions dy's, a plain reduction); ``regions`` the tables of a DRConv guide of m > 1
    regions, else None."""
    B, Cin = x.shape[:2]
    Cout = dy.shape[1]
    m = num_regions
    if config is None:
        dy, x = operands_read(dy, x, m, groups, stride, channels_last_copy)
        experts_like = torch.empty((1, Cout, Cin // groups, *kernel_hw), device="meta")
        config = weight_grad_config(x, experts_like, m, groups, stride)
    launch, dw = launch_with_partials(dy, x, regions, m, groups, kernel_hw, (stride, padding, dilation), config)
    launch()
    if regions is None:
        dbias = dy.sum((2, 3), dtype=dw.dtype).reshape(B, 1, Cout)
    else:
        dbias = torch.empty((B, m, Cout), dtype=dw.dtype, device=dw.device)
        region_bias_grad_launch(dy, regions, dbias)()
    if dw.shape[0] == 1:
        return dw[0], dbias
    # Summed in storage order: a sum over the permuted view would return the standard layout.
    return dw.movedim(4, -1).sum(0).movedim(-1, 3), dbias


# --------------------------------------------------------------------------------------------
# AOT catalogue
# --------------------------------------------------------------------------------------------

def default_launch(dy, x, experts, m: int, groups: int, geometry) -> Launch:
    """The kernel-gradient launch an op makes by default for these meta tensors: its config, pixel
    splits and partials in the accumulation dtype (the catalogue's launches and the static model's)."""
    regions = meta_region_tables(x.shape[0], dy.shape[2] * dy.shape[3], m) if m > 1 else None
    dy, x = operands_read(dy, x, m, groups, geometry[0], channels_last_stand_in)
    config = weight_grad_config(x, experts, m, groups, geometry[0])
    return launch_with_partials(dy, x, regions, m, groups, tuple(experts.shape[3:]), geometry, config)[0]


def default_bias_launch(dy, m: int) -> Launch:
    """The bias gradient's launch of m > 1 regions for meta ``dy``, as the op reads it (the catalogue's
    launches and the static model's)."""
    regions = meta_region_tables(dy.shape[0], dy.shape[2] * dy.shape[3], m)
    dbias = torch.empty((dy.shape[0], m, dy.shape[1]), dtype=_acc_torch_dtype(dy.dtype), device="meta")
    return region_bias_grad_launch(dy, regions, dbias)


def catalogue() -> list[Launch]:
    """The kernel-gradient launches ops make by default at expert_conv's catalogue layers, and the
    64-bit variants over 2^31 elements, on meta tensors (for AOT checks)."""
    launches = []
    for problem in catalogue_problems():
        launch = default_launch(problem.y, problem.x, problem.experts, problem.m, problem.groups, problem.geometry)
        launch.label = problem.tag
        launches.append(launch)
        if problem.m > 1:
            bias = default_bias_launch(launch.args["dy_ptr"], problem.m)
            bias.label = problem.tag + " bias gradient"
            launches.append(bias)
    B, C, H, W, k, E = INT64_CATALOGUE_SHAPE
    experts = torch.empty((E, C, C, k, k), dtype=torch.bfloat16, device="meta")
    # bf16 NCHW as the other passes' 64-bit variants; fp32 channels_last: one-stage defaults, which
    # the 64-bit variants run on triton's two-stage pipeline instead of the register double buffer
    # (see _backward_weight_launch).
    for dtype, fmt, name in ((torch.bfloat16, torch.contiguous_format, "bfloat16 NCHW"),
                             (torch.float32, torch.channels_last, "float32 NHWC")):
        x = torch.empty((B, C, H, W), dtype=dtype, device="meta").to(memory_format=fmt)
        for m in (4, 1):
            launch = default_launch(x, x, experts, m, 1, INT64_CATALOGUE_GEOMETRY)
            assert launch.meta["INDEX_64"] and not launch.meta["PREFETCH"]
            launch.label = f"over 2^31 elements {'DRConv m=4' if m > 1 else 'CondConv'} {name}"
            launches.append(launch)
        bias = default_bias_launch(x, 4)
        assert bias.meta["INDEX_64"]
        bias.label = f"over 2^31 elements DRConv m=4 bias gradient {name}"
        launches.append(bias)
    return launches
