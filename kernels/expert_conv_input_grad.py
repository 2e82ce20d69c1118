"""The expert conv's input gradient (CondConv, DynamicConv, ODConv; DRConv past 32-bit offsets or
where its columns do not fit): ``dx = Σ_taps W[b, r]ᵀ · dy`` in gather form, each ``dx`` element
written once, no atomics.

A program's pixels share one stride phase, so a strided conv's taps that none of them reads cost
no MMA work: one loop runs over the phase's live taps' channel blocks (``_live_taps_tile``), a
row's in-image taps bits of a mask formed before it. With regions the weight depends on the
*output* pixel a tap reads, so a tap's K-steps run once per region, the other regions' rows masked
off (m times a conv's MMA; ``region_conv_input_grad`` runs DRConv by columns wherever they fit).
Below 16 channels a group one loop over the flattened reduction skips the regions a K-step's
pixels lack. The weights come as ``expert_conv.weight_source`` gives them (mixed on the fly or
materialised, Cout innermost); region tables, keys and the shared tile helpers are
``expert_conv``'s.

Kernels here know nothing of autograd: ``ops/expert_conv.py`` calls ``expert_conv_backward_input``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import expert_conv as ec
from . import expert_conv_rows
from ._launch import Launch, cacheable, cdiv, config_key, is_channels_last, layout, planned
from .configs import get_config
from .expert_conv import (COUT_INNERMOST, INT64_CATALOGUE_GEOMETRY, INT64_CATALOGUE_SHAPE, WeightSource,
                          _acc_dtype, _channel_block, _check_grid, _geometry_args, _input_precision, _mixing_args,
                          _nchw_tiles, _num_warps, _out_meta, _part, _past_int32, _per_kernel, _pow2_between,
                          _routed_config, _rows_tile, _source_key, _split_k, _store_tile, _streamed_tiles, _streams,
                          _tap_meta, _weight_tile, catalogue_problems, channels_last_stand_in, is_plain_conv,
                          problem_key)
from ._indexing import gather_source, widen
from .layout import channels_last_copy
from .region_tables import RegionTables

# weight_source, batch_parts, materialise_part and needs_int64 are read through the module
# (``ec.<name>``), so that one replaced on expert_conv (as the tests do) reaches every pass.


@triton.jit
def _live_taps(q, phase, PAD, DIL, STRIDE, OUT, K: tl.constexpr):
    """Along one axis, the kernel taps that reach stride phase ``phase`` (pixels phase + q·STRIDE):
    the first and second such tap (-1 where none), how many there are, and per pixel the bits of
    the taps whose source, q + (phase + PAD - t·DIL) / STRIDE, lies in [0, OUT) (dead taps' bits
    are never read)."""
    first = -1
    second = -1
    count = 0
    inside = tl.zeros_like(q)
    for t in tl.static_range(K):
        rise = phase + PAD - t * DIL
        live = rise % STRIDE == 0
        second = tl.where(live & (first >= 0) & (second < 0), t, second)
        first = tl.where(live & (first < 0), t, first)
        count += live.to(tl.int32)
        source = q + rise // STRIDE
        inside |= ((source >= 0) & (source < OUT)).to(inside.dtype) << t
    return first, second, count, inside


@triton.jit
def _live_taps_tile(dy_group, w_ptr, coef_ptr, spatial_ptr, region_rows, b, g, cn, c_ok, qi, qj, pix_ok, ph, pw,
                    Ho, Wo, COUT_G, NUM_MIX, NUM_REGIONS, sdyc, sdyh, sdyw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
                    sc_b, sc_r, sc_e, ssb, ssu, ssv, SH, SW, PH, PW, DH, DW,
                    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_GUIDE: tl.constexpr,
                    REGION_BITS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr):
    """acc[p, n] = Σ_{u, v, o} dy[b, o, i_p(u), j_p(v)] · W[b, r(i_p(u), j_p(v)), o, c_n, u, v] over the
    taps that reach the stride phase (ph, pw), whose pixels are (ph + qi·SH, pw + qj·SW).

    One loop over (live tap, region, output-channel block), as the forward's: the pipeline runs
    ahead across the taps. A live tap row u reads output row qi + (ph + PH - u·DH) / SH (exact), so
    its offset is a scalar, and whether a pixel's row is inside is bit u of i_inside. The live rows
    are evenly spaced (the solutions of u·DH = ph + PH mod SH): u0, u1, 2·u1 - u0, ...; the columns
    alike. HAS_GUIDE: the kernel depends on the region of the output pixel a tap reads
    (``region_rows``, the (qi, qj) rows of the region map), so a tap's rows are multiplied once per
    region with the other regions' rows masked off; every region is visited (NUM_REGIONS steps a
    tap), which keeps the loop one pipelined run whatever the map. REGION_BITS > 0: each row's
    regions of all the taps are gathered before the loop into one 64-bit word, REGION_BITS a tap
    (a region read in the loop would feed the dy tile's mask, and triton's pipeliner leaves such
    loads unpipelined: every K-step waited a round trip); 0: read in the loop (too many taps or
    regions for 64 bits).
    """
    u0, u1, n_u, i_inside = _live_taps(qi, ph, PH, DH, SH, Ho, KH)
    v0, v1, n_v, j_inside = _live_taps(qj, pw, PW, DW, SW, Wo, KW)
    i_inside = tl.where(pix_ok, i_inside, 0)
    dy_rows = dy_group + qi * sdyh + qj * sdyw
    w_cols = (cn * sw_i)[None, :]
    oc = tl.arange(0, BLOCK_K)
    if INDEX_64:
        oc = oc.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC_DTYPE)
    if HAS_GUIDE and REGION_BITS > 0:
        tap_regions = tl.zeros((BLOCK_P,), dtype=tl.int64)
        for tu in tl.static_range(KH):
            for tv in tl.static_range(KW):
                rise = ph + PH - tu * DH
                run = pw + PW - tv * DW
                # tl.where, not &: the interpreter makes a scalar bool & a bool tensor an integer mask.
                live = tl.where((rise % SH == 0) & (run % SW == 0), ((i_inside >> tu) & (j_inside >> tv) & 1) != 0,
                                False)
                read = tl.load(region_rows + widen(rise // SH, INDEX_64) * Wo + run // SW, mask=live, other=0)
                tap_regions |= read.to(tl.int64) << (REGION_BITS * (tu * KW + tv))
    u = u0
    v = v0
    o0 = 0
    rgn = 0
    for _ in range(0, n_u * n_v * NUM_REGIONS * tl.cdiv(COUT_G, BLOCK_K)):
        oo = o0 + oc
        o_ok = oo < COUT_G
        row_ok = ((i_inside >> u) & (j_inside >> v) & 1) != 0
        di = (ph + PH - u * DH) // SH
        dj = (pw + PW - v * DW) // SW
        dy_tap = widen(di, INDEX_64) * sdyh + widen(dj, INDEX_64) * sdyw
        w_tap = widen(u, INDEX_64) * sw_u + widen(v, INDEX_64) * sw_v
        sp_tap = widen(u, INDEX_64) * ssu + widen(v, INDEX_64) * ssv
        if HAS_GUIDE and REGION_BITS > 0:
            region = (tap_regions >> (REGION_BITS * (u * KW + v))) & ((1 << REGION_BITS) - 1)
            row_ok = row_ok & (region == rgn)
        elif HAS_GUIDE:
            region = tl.load(region_rows + widen(di, INDEX_64) * Wo + dj, mask=row_ok, other=-1)
            row_ok = region == rgn
        grad = _rows_tile(dy_rows + dy_tap, oo * sdyc, row_ok, o_ok, CHANNEL_ROWS)
        # Without regions the kernel's r is a constant 0 (a mixing tile's routing row is fixed).
        weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, widen(rgn, INDEX_64) if HAS_GUIDE else 0,
                              ((g * COUT_G + oo) * sw_o + w_tap)[:, None] + w_cols, sp_tap, None,
                              o_ok[:, None] & c_ok[None, :], NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb, MIX,
                              HAS_SPATIAL, ACC_DTYPE, INDEX_64)
        acc = tl.dot(grad, weight.to(grad.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        o0 += BLOCK_K
        tap_done = o0 >= COUT_G
        o0 = tl.where(tap_done, 0, o0)
        if HAS_GUIDE:  # the tap is done when its last region is
            rgn = tl.where(tap_done, rgn + 1, rgn)
            tap_done = rgn >= NUM_REGIONS
            rgn = tl.where(tap_done, 0, rgn)
        v = tl.where(tap_done, v + (v1 - v0), v)
        row_done = tap_done & ((v >= KW) | (v1 < 0))
        v = tl.where(row_done, v0, v)
        u = tl.where(row_done, u + (u1 - u0), u)
    return acc


@triton.jit
def expert_conv_bwd_input_kernel(
    dy_ptr, w_ptr, coef_ptr, spatial_ptr, region_ptr, dx_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX: tl.constexpr, NUM_REGIONS, TILES, N_TILES,
    sdyb, sdyc, sdyh, sdyw,
    sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
    sc_b, sc_r, sc_e,
    ssb, ssu, ssv,
    sdxb, sdxc, sdxh, sdxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_GUIDE: tl.constexpr,
    REGION_BITS: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHANNEL_ROWS: tl.constexpr, CHANNEL_ROWS_OUT: tl.constexpr,
):
    """dx[b, c, h, w] = Σ_{o, u, v} W[b, r(i,j), o, c, u, v] · dy[b, o, i, j], (i, j) the output pixel
    that reads (h, w) through tap (u, v).

    A program's pixels share one stride phase (h mod SH, w mod SW): a tap then reaches either all of
    them or none, so the taps no output pixel reads cost no MMA (no stride² waste). Axis 0 is
    (b, phase, tile of the phase's pixels). TAP_LOOP: K-steps of BLOCK_K output channels of one tap,
    one loop over the live taps' steps (``_live_taps_tile``; with regions, a loop per tap and region);
    otherwise one loop over k = (u·kw + v)·COUT_G + o, gathered per element.
    """
    pid = tl.program_id(0)
    b = pid // (TILES * SH * SW)
    t = pid % TILES
    phase = (pid // TILES) % (SH * SW)
    ph = phase // SW
    pw = phase % SW
    pid_n = tl.program_id(1)
    g = pid_n // N_TILES
    cn = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cn < CIN_G
    # The phase's pixels: an (Hp, Wp) grid with steps (SH, SW) from (ph, pw).
    Hp = (H - ph + SH - 1) // SH
    Wp = (W - pw + SW - 1) // SW
    q = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = q < Hp * Wp
    if INDEX_64:
        b = b.to(tl.int64)
        q = q.to(tl.int64)
        cn = cn.to(tl.int64)
        g = g.to(tl.int64)
    h = ph + (q // Wp) * SH
    w = pw + (q % Wp) * SW
    dy_group = dy_ptr + b * sdyb + (g * COUT_G) * sdyc
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC_DTYPE)
    if TAP_LOOP:
        region_rows = region_ptr + b * Ho * Wo + (q // Wp) * Wo + q % Wp if HAS_GUIDE else region_ptr
        acc = _live_taps_tile(dy_group, w_ptr, coef_ptr, spatial_ptr, region_rows, b, g, cn, c_ok, q // Wp, q % Wp,
                              pix_ok, ph, pw, Ho, Wo, COUT_G, NUM_MIX, NUM_REGIONS if HAS_GUIDE else 1, sdyc, sdyh,
                              sdyw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
                              SH, SW, PH, PW, DH, DW, KH, KW, BLOCK_P, BLOCK_N, BLOCK_K, MIX, HAS_SPATIAL, HAS_GUIDE,
                              REGION_BITS, INDEX_64, ACC_DTYPE, INPUT_PRECISION, CHANNEL_ROWS)
    else:
        K_TOTAL = COUT_G * KH * KW
        for k0 in range(0, K_TOTAL, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                k = k.to(tl.int64)
            k_ok = k < K_TOTAL
            oo, u, v = _split_k(k, COUT_G, KW)
            i, ok = gather_source(h[:, None], PH, u[None, :], DH, SH, Ho, pix_ok[:, None] & k_ok[None, :])
            j, ok = gather_source(w[:, None], PW, v[None, :], DW, SW, Wo, ok)
            grad = tl.load(dy_group + (oo * sdyc)[None, :] + i * sdyh + j * sdyw, mask=ok, other=0.0)
            w_off = ((g * COUT_G + oo) * sw_o + u * sw_u + v * sw_v)[:, None] + (cn * sw_i)[None, :]
            sp_off = (u * ssu + v * ssv)[:, None]
            w_mask = k_ok[:, None] & c_ok[None, :]
            if HAS_GUIDE:
                region = tl.load(region_ptr + b * Ho * Wo + i * Wo + j, mask=ok, other=-1)
                for rgn in range(NUM_REGIONS):
                    selected = ok & (region == rgn)
                    # Coherent regions: most K-steps see one or two of them; skip the others' MMA.
                    if tl.max(tl.max(selected.to(tl.int32), axis=1), axis=0) > 0:
                        weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, widen(rgn, INDEX_64), w_off, sp_off,
                                              k_ok[:, None], w_mask, NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb,
                                              MIX, HAS_SPATIAL, ACC_DTYPE, INDEX_64)
                        acc = tl.dot(tl.where(selected, grad, 0.0).to(grad.dtype), weight.to(grad.dtype), acc,
                                     input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                weight = _weight_tile(w_ptr, coef_ptr, spatial_ptr, b, 0, w_off, sp_off, k_ok[:, None], w_mask,
                                      NUM_MIX, sw_b, sw_r, sw_e, sc_b, sc_r, sc_e, ssb, MIX, HAS_SPATIAL, ACC_DTYPE,
                                      INDEX_64)
                acc = tl.dot(grad, weight.to(grad.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dx_off = b * sdxb + ((g * CIN_G + cn) * sdxc)[None, :] + (h * sdxh + w * sdxw)[:, None]
    _store_tile(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), pix_ok[:, None] & c_ok[None, :], CHANNEL_ROWS_OUT)


def default_input_grad_config(cin_g: int, dtype: torch.dtype, cout_g: int = 0, mixing: bool = False,
                              regions: bool = False, channels_last: bool = True, plain: bool = False,
                              index_64: bool = False) -> dict:
    # As the forward's (the reduction runs over output channels here); one stage for 4-byte 64-row
    # operands.
    if regions and not mixing and not index_64:
        # DRConv's materialised region kernels (region_conv.region_backward_input, dy channels_last;
        # the fallback of region_conv_input_grad's columns, where one sample's do not fit):
        # a tap's K-steps run once per region (m times a plain conv's MMA), so the loop is long and a
        # part of the batch about one wave: four stages keep its loads ahead (PREDICTED, triton 3.6,
        # D1 dx bf16 NHWC: 64 x 64 x 32 at one stage 0.9%, 64 x 128 x 64 at four 7.9%; m-fold MMA caps
        # it at 11.8%).
        return {"BLOCK_P": 64, "BLOCK_N": _pow2_between(cin_g, 16, 128), "BLOCK_K": _channel_block(cout_g, dtype),
                "num_warps": 8, "num_stages": 4}
    # Regions past 32-bit offsets (the expert kernels' region path, mixed on the fly or not) keep the
    # small tiles checked spill-free with 64-bit offsets, one stage (two spill 2-byte NHWC on sm_80).
    if regions:  # NCHW: columns up to 32 (64 spill an INDEX_64 variant on sm_80 with triton 3.9)
        config = {"BLOCK_P": 64, "BLOCK_N": _pow2_between(cin_g, 16, 64 if channels_last else 32),
                  "BLOCK_K": _channel_block(cout_g, dtype, True), "num_warps": _num_warps(dtype, 64, True),
                  "num_stages": 1}
        return config if channels_last else _nchw_tiles(config, cin_g, cout_g, dtype, True)
    if channels_last and _streams(cout_g, dtype, mixing, index_64):
        if plain:
            return _streamed_tiles(cin_g, dtype)
        # At a stride a program's pixels are one stride phase's (a quarter of dx's at 2) and its taps
        # the phase's live ones: 128 x 128 tiles stepping 128 bytes of output channels, three stages
        # (PREDICTED, triton 3.6, X1 dx NHWC: bf16 62% -> 77%, fp32 70% -> 77%, the phase's 196 pixels
        # in 128-pixel tiles bounding both; four stages fit one program an SM in fp32, 62%).
        return {"BLOCK_P": 128, "BLOCK_N": _pow2_between(cin_g, 16, 128), "BLOCK_K": 128 // dtype.itemsize,
                "num_warps": 8, "num_stages": 3}
    if dtype.itemsize <= 4 and cout_g >= 64 and not mixing:
        # 128 x 128 tiles for fp32 too: at 64 x 64 its tf32 operands' L1 traffic bounds it (E2 dx fp32
        # NHWC PREDICTED 65% -> 81% on triton 3.6); two stages (three would not fit sm_80's registers).
        # K-steps of 64 bytes a row: 128 bytes spilled channels_last on sm_80 (16-bit: 10 local loads
        # and stores on triton 3.6, 91 on 3.9; fp32: 36 on 3.9), and sm_90's PREDICTED rows keep 98%.
        config = {"BLOCK_P": 128, "BLOCK_N": _pow2_between(cin_g, 16, 128),
                  "BLOCK_K": min(64 // dtype.itemsize, _channel_block(cout_g, dtype)),
                  "num_warps": 8, "num_stages": 3 if dtype.itemsize == 2 else 2}
    elif dtype.itemsize in (2, 4) and cout_g >= 64 and cin_g >= 64 and channels_last:
        # Mixing on the fly (E FMAs per weight element a K-step): 128 pixels share each mixed weight
        # tile, twice as many as at 64, halving the mixing per MMA (X1 dx bf16 NHWC PREDICTED 17.5% ->
        # 34% on triton 3.6; fp32, with the taps in one loop, 2.2% -> 5.8%). Two stages: the mixed
        # tile is held in fp32 registers. channels_last only: NCHW's scalar gathers on top spill on
        # sm_80 with triton 3.6.
        config = {"BLOCK_P": 128, "BLOCK_N": _pow2_between(cin_g, 16, 128),
                  "BLOCK_K": _channel_block(cout_g, dtype, mixing), "num_warps": 8, "num_stages": 2}
    else:
        config = {"BLOCK_P": 64, "BLOCK_N": _pow2_between(cin_g, 16, 64),
                  "BLOCK_K": _channel_block(cout_g, dtype, mixing), "num_warps": _num_warps(dtype, 64, mixing),
                  "num_stages": 2 if dtype.itemsize == 2 else 1}
    return config if channels_last else _nchw_tiles(config, cin_g, cout_g, dtype, mixing, plain, index_64)


def _input_grad_problem(dx, experts, m, groups, stride) -> dict:
    """:func:`default_input_grad_config`'s arguments for an input gradient into ``dx``."""
    pixels = input_grad_pixels(dx)
    # The offsets' bound takes dy's size up to padding.
    index_64 = _past_int32(dx, experts.shape[1], cdiv(dx.shape[2], stride[0]) * cdiv(dx.shape[3], stride[1]))
    return dict(cin_g=dx.shape[1] // groups, dtype=dx.dtype, cout_g=experts.shape[1] // groups,
                mixing=input_grad_mixes(experts[0].numel() // experts.shape[1], dx.shape[0], m, pixels, index_64),
                regions=m > 1, channels_last=is_channels_last(dx), plain=is_plain_conv(m, stride),
                index_64=index_64)


def input_grad_pixels(dx: torch.Tensor) -> int:
    """The pixels an input gradient materialises for (``batch_parts``): dx's, its tiles' own. At a
    stride, dy's are fewer (a quarter at 2), and counting them had the experts mixed on the fly in
    every dx tile (PREDICTED, triton 3.6, X1 dx bf16 NHWC: mixed 30%, materialised in 4 parts 62%)."""
    return dx.shape[2] * dx.shape[3]


def input_grad_mixes(filter_size: int, B: int, m: int, pixels: int, index_64: bool) -> bool:
    """Whether the input gradient mixes the experts on the fly: where the op does not materialise;
    with regions, only past 32-bit offsets (below, ``region_conv.region_backward_input`` reads the
    region kernels materialised)."""
    return (m == 1 or index_64) and ec.materialise_part(filter_size, B, m, pixels) == 0


def input_grad_config(dx, experts, m, groups, stride) -> dict:
    return get_config("expert_conv_bwd_input", problem_key(dx, experts, m, groups, stride),
                      default_input_grad_config(**_input_grad_problem(dx, experts, m, groups, stride)))


def _input_grad_copies(problem: dict) -> bool:
    return (not problem["channels_last"] and not problem["regions"]
            and _streams(problem["cout_g"], problem["dtype"], problem["mixing"], problem["index_64"]))


def input_grad_copies_output_grad(dy, dx, experts, m, groups, stride, padding, dilation,
                                  has_spatial: bool = False) -> bool:
    """Whether an input gradient into NCHW ``dx`` reads a channels_last copy of NCHW ``dy``
    (``kernels/layout.py``): where that copy's input gradient takes the streamed tiles (no regions:
    theirs are their own) and dy is not read in place in row boxes (:func:`input_grad_in_rows`);
    :func:`input_grad_route`'s verdict without its config lookup (a backward asks it first)."""
    problem = _input_grad_problem(dx, experts, m, groups, stride)
    return (not is_channels_last(dy) and _input_grad_copies(problem)
            and not _in_rows(problem, dy, dx, experts, m, groups, stride, padding, dilation, has_spatial))


def input_grad_in_rows(dy, dx, experts, m, groups, stride, padding, dilation, has_spatial: bool = False) -> bool:
    """Whether an input gradient reads NCHW ``dy`` in place: at stride 1, as the row-box forward of dy
    (``expert_conv_rows.input_grad_launch``) where that forward's conditions hold for dy; ``experts``
    as :func:`_per_kernel` shapes them."""
    return _in_rows(_input_grad_problem(dx, experts, m, groups, stride), dy, dx, experts, m, groups, stride, padding,
                    dilation, has_spatial)


def _in_rows(problem: dict, dy, dx, experts, m, groups, stride, padding, dilation, has_spatial: bool) -> bool:
    kernel_hw = tuple(experts.shape[3:])
    padding = expert_conv_rows.transposed_padding(kernel_hw, padding, dilation)
    if tuple(stride) != (1, 1) or min(padding) < 0:
        return False
    return expert_conv_rows.supported(dy, dx.shape[1], dx.shape[3], problem["mixing"], has_spatial, m, kernel_hw,
                                      groups, stride, padding, dilation, problem["index_64"])


def input_grad_route(dy, dx, experts, m, groups, stride, padding, dilation,
                     has_spatial: bool = False) -> tuple[bool, bool, dict | None]:
    """(whether the input gradient reads ``dy`` in row boxes, whether it reads a channels_last copy
    of it, the config it otherwise runs), from one look at the problem: the op's host path per call."""
    problem = _input_grad_problem(dx, experts, m, groups, stride)
    if _in_rows(problem, dy, dx, experts, m, groups, stride, padding, dilation, has_spatial):
        return True, False, None
    # Where the streamed tiles read dy channels_last: its copy, or dy as it is.
    reads_channels_last = _input_grad_copies(problem)
    config = _routed_config("expert_conv_bwd_input", problem_key(dx, experts, m, groups, stride), problem,
                            reads_channels_last, default_input_grad_config)
    return False, reads_channels_last and not is_channels_last(dy), config


def backward_input_launch(dy, source: WeightSource, spatial, region, dx, kernel_hw, groups, stride, padding,
                          dilation, num_regions: int, config: dict) -> Launch:
    """``region`` is the (B, Ho·Wo) int32 region map, or None without a guide."""
    if not cacheable(dy):
        return _backward_input_launch(dy, source, spatial, region, dx, kernel_hw, groups, stride, padding,
                                      dilation, num_regions, config)
    key = ("expert_conv_bwd_input", layout(dy), _source_key(source), layout(spatial), layout(region), layout(dx),
           tuple(kernel_hw), groups, *stride, *padding, *dilation, num_regions, config_key(config))
    return planned(key, ("dy_ptr", "dx_ptr", "region_ptr", "w_ptr", "coef_ptr", "spatial_ptr"),
                   (dy, dx, region, source.weight, source.coef, spatial),
                   lambda: _backward_input_launch(dy, source, spatial, region, dx, kernel_hw, groups, stride,
                                                  padding, dilation, num_regions, config))


def _backward_input_launch(dy, source: WeightSource, spatial, region, dx, kernel_hw, groups, stride, padding,
                           dilation, num_regions: int, config: dict) -> Launch:
    B, Cin, H, W = dx.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    n_tiles = cdiv(Cin // groups, meta["BLOCK_N"])
    phases = stride[0] * stride[1]
    # Tiles per stride phase: enough for the largest phase (the first), the others mask the rest.
    tiles = cdiv(cdiv(H, stride[0]) * cdiv(W, stride[1]), meta["BLOCK_P"])
    args = dict(
        dy_ptr=dy, dx_ptr=dx, region_ptr=region, **_mixing_args(source, spatial),
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups,
        NUM_REGIONS=num_regions, TILES=tiles, N_TILES=n_tiles,
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        **dict(zip(("sdxb", "sdxc", "sdxh", "sdxw"), dx.stride())),
        **_geometry_args(stride, padding, dilation),
    )
    index_64 = ec.needs_int64(dy, dx, source.weight, source.coef, spatial, region)
    meta.update(_tap_meta(Cout // groups, kernel_hw, meta["BLOCK_K"], dy, index_64), **_out_meta(dx))
    meta.update(MIX=source.mix, NUM_MIX=source.num_mix, HAS_SPATIAL=spatial is not None, HAS_GUIDE=region is not None,
                REGION_BITS=region_bits(kernel_hw, num_regions) if region is not None else 0, INDEX_64=index_64,
                ACC_DTYPE=_acc_dtype(dy.dtype),
                INPUT_PRECISION=_input_precision(dy.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_bwd_input_kernel, (B * phases * tiles, groups * n_tiles, 1), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_input_grad_loops(Cout // groups, meta, num_regions if region is not None else 0, phases))


def region_bits(kernel_hw, num_regions: int) -> int:
    """Bits a tap's region takes when the input gradient packs every tap's region of a row into one
    64-bit word before its loop; 0 where they do not fit (the loop then reads them)."""
    bits = max(1, (num_regions - 1).bit_length())
    return bits if bits * kernel_hw[0] * kernel_hw[1] <= 64 else 0


def _input_grad_loops(cout_g: int, meta: dict, num_regions: int, phases: int) -> tuple:
    """The input-gradient kernel's loops (the experts of on-the-fly mixing are unrolled inside a
    step). A tap reaches the pixels of one stride phase in ``phases``, so averaged over the programs
    its channel blocks run 1/phases of their steps. With regions, every region's loop is counted on
    every tap (present or not): an upper bound."""
    taps = meta["KH"] * meta["KW"]
    if meta["TAP_LOOP"]:  # one loop over the live taps' (regions' and) channel blocks
        return (cdiv(cout_g, meta["BLOCK_K"]) * taps * max(1, num_regions) / phases,)
    # Flattened: every K-step runs (the phase's dead taps are masked lanes).
    k_steps = cdiv(cout_g * taps, meta["BLOCK_K"])
    return ((k_steps, (num_regions,)) if num_regions else k_steps,)


def expert_conv_backward_input(dy, experts, routing, spatial, regions: RegionTables | None, dx, groups, stride,
                               padding, dilation, materialise: bool | None = None, config: dict | None = None) -> None:
    """``regions``: the tables of a DRConv guide of m > 1 regions (their region map), else None."""
    shaped, m = _per_kernel(experts, routing)
    in_rows = False
    if config is None:
        in_rows, copies, config = input_grad_route(dy, dx, shaped, m, groups, stride, padding, dilation,
                                                   spatial is not None)
        dy = channels_last_copy(dy) if copies else dy
    for samples, materialised in ec.batch_parts(experts, routing, input_grad_pixels(dx), materialise):
        source = ec.weight_source(experts, _part(routing, samples), materialised, COUT_INNERMOST)
        if in_rows and not source.mix:
            expert_conv_rows.input_grad_launch(dy[samples], source.weight, ec._rows_strides(source), dx[samples],
                                               shaped.shape[3:], groups, padding, dilation)()
            continue
        if in_rows:  # a part that mixes on the fly after all (an explicit ``materialise=False``)
            config = input_grad_config(dx, shaped, m, groups, stride)
        region = regions.region[samples] if regions is not None else None
        backward_input_launch(dy[samples], source, _part(spatial, samples), region, dx[samples], shaped.shape[3:],
                              groups, stride, padding, dilation, m, config)()


def catalogue() -> list[Launch]:
    """The input gradient's default launches at the expert catalogue's layers (the first part of the
    batch, dy as the op reads it) and over 2^31 elements, on meta tensors (AOT checks)."""
    launches = []
    for problem in catalogue_problems():
        x, y, experts, routing, spatial = problem.x, problem.y, problem.experts, problem.routing, problem.spatial
        m, groups, geometry = problem.m, problem.groups, problem.geometry
        Ho, Wo = y.shape[2:]
        in_rows, dx_copies, config = input_grad_route(y, x, experts, m, groups, *geometry, spatial is not None)
        dy = channels_last_stand_in(y) if dx_copies else y
        # Its parts count dx's pixels (input_grad_pixels).
        samples, materialised = ec.batch_parts(experts, routing, input_grad_pixels(x), None)[0]
        dx = _part(x, samples)
        if in_rows:
            source = ec.weight_source(experts, _part(routing, samples), materialised, COUT_INNERMOST)
            launch = expert_conv_rows.input_grad_launch(_part(dy, samples), source.weight, ec._rows_strides(source),
                                                        dx, experts.shape[3:], groups, *geometry[1:])
            launch.label = problem.tag + (" materialised" if materialised else "") + " in rows"
            launches.append(launch)
            continue
        region_map = torch.empty((dx.shape[0], Ho * Wo), dtype=torch.int32, device="meta") if m > 1 else None
        launch = backward_input_launch(_part(dy, samples),
                                       ec.weight_source(experts, _part(routing, samples), materialised, COUT_INNERMOST),
                                       _part(spatial, samples), region_map, dx, experts.shape[3:], groups, *geometry,
                                       m, config)
        launch.label = problem.tag + (" materialised" if materialised else "")
        launches.append(launch)
    return launches + _int64_catalogue()


def _int64_catalogue() -> list[Launch]:
    """Over 2^31 elements: DRConv mixing on the fly with spatial attention, and materialised kernels
    without a guide (``expert_conv``'s 64-bit layers)."""
    launches = []
    B, C, H, W, k, E = INT64_CATALOGUE_SHAPE
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty((B, C, H, W), **meta)
    experts = torch.empty((E, C, C, k, k), **meta)
    for m, materialised in ((4, False), (1, True)):
        routing = torch.empty((B, m, E), **meta)
        spatial = None if materialised else torch.empty((B, k, k), **meta)
        region_map = torch.empty((B, H * W), dtype=torch.int32, device="meta") if m > 1 else None
        launch = backward_input_launch(x, ec.weight_source(experts, routing, materialised, COUT_INNERMOST), spatial,
                                       region_map, x, (k, k), 1, *INT64_CATALOGUE_GEOMETRY, m,
                                       input_grad_config(x, experts, m, 1, (1, 1)))
        assert launch.meta["INDEX_64"]
        launch.label = (f"over 2^31 elements {'DRConv m=4 spatial' if m > 1 else 'CondConv'} bfloat16 NCHW"
                        + (" materialised" if materialised else ""))
        launches.append(launch)
    return launches
