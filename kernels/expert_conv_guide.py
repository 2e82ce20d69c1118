"""DRConv's guide scores for the straight-through estimator: ``∂S[b, r, p] = Σ_o dy[b, o, p]·y_r[b, o, p]``.

The estimator needs every region's output at every pixel, so y_r is recomputed for every region by
the forward's tile (``expert_conv._conv_tile``) and reduced against dy in the epilogue, per
output-channel tile; the caller adds the tiles. Where the experts are no more than the regions
(``uses_expert_bank``), the scores are formed per expert (E plain convs, no mixing) and mixed by
the routing afterwards: ``∂S[b, r] = Σ_e routing[b, r, e]·(dy · z_e)``. Configs are the forward's
(``expert_conv_fwd``); weight sources, keys and tiles are ``expert_conv``'s.

Kernels here know nothing of autograd: ``ops/expert_conv.py`` calls ``expert_conv_guide_scores``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import expert_conv as ec
from ._launch import Launch, cacheable, cdiv, config_key, is_channels_last, layout, planned
from .configs import get_config
from .expert_conv import (INT64_CATALOGUE_GEOMETRY, INT64_CATALOGUE_SHAPE, WeightSource, _acc_dtype,
                          _acc_torch_dtype, _bias_args, _channels_innermost, _check_grid, _conv_tile,
                          _conv_tile_loops, _copies_for_streaming, _geometry_args, _input_precision, _mixing_args,
                          _part, _past_int32, _routed_config, _source_key, _tap_meta,
                          catalogue_problems, channels_last_stand_in, default_forward_config, output_pixels,
                          problem_key)
from ._indexing import widen
from .layout import channels_last_copy

# weight_source, batch_parts, forward_config and needs_int64 are read through the module
# (``ec.<name>``), so that one replaced on expert_conv (as the tests do) reaches every pass.


@triton.jit
def expert_conv_guide_score_kernel(
    x_ptr, w_ptr, coef_ptr, spatial_ptr, bias_ptr, dy_ptr, score_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_MIX: tl.constexpr, TILES, N_TILES,
    sxb, sxc, sxh, sxw,
    sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v,
    sc_b, sc_r, sc_e,
    ssb, ssu, ssv,
    sbias_b, sbias_r, sbias_o,
    sdyb, sdyc, sdyh, sdyw,
    s_score_b, s_score_r, s_score_n,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, TAP_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MIX: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_ROWS: tl.constexpr,
):
    """score[b, r, n, p] = Σ_{o in channel tile n} dy[b, o, p] · y_r[b, o, p] (region r on axis 2).

    The caller sums the N_TILES·groups channel tiles: ∂S[b, r, p] of the straight-through estimator.
    """
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    pid_n = tl.program_id(1)
    r = tl.program_id(2)
    g = pid_n // N_TILES
    on = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = on < COUT_G
    P = Ho * Wo
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = p < P
    if INDEX_64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
        on = on.to(tl.int64)
        g = g.to(tl.int64)
        r = r.to(tl.int64)
    o = g * COUT_G + on
    i = p // Wo
    j = p % Wo
    acc = _conv_tile(x_ptr, w_ptr, coef_ptr, spatial_ptr, b, r, g, o, o_ok, i, j, pix_ok, CIN_G,
                     H, W, CIN_G, NUM_MIX,
                     sxb, sxc, sxh, sxw, sw_b, sw_r, sw_e, sw_o, sw_i, sw_u, sw_v, sc_b, sc_r, sc_e, ssb, ssu, ssv,
                     SH, SW, PH, PW, DH, DW, KH, KW, TAP_LOOP, BLOCK_P, BLOCK_N, BLOCK_K, MIX, HAS_SPATIAL, INDEX_64,
                     ACC_DTYPE, INPUT_PRECISION, CHANNEL_ROWS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + b * sbias_b + r * sbias_r + o * sbias_o, mask=o_ok, other=0.0).to(ACC_DTYPE)[None, :]
    mask = pix_ok[:, None] & o_ok[None, :]
    grad = tl.load(dy_ptr + b * sdyb + (o * sdyc)[None, :] + (i * sdyh + j * sdyw)[:, None], mask=mask, other=0.0)
    score = tl.sum(acc * grad.to(ACC_DTYPE), axis=1)
    tl.store(score_ptr + b * s_score_b + r * s_score_r + widen(pid_n, INDEX_64) * s_score_n + p, score, mask=pix_ok)


def guide_score_launch(x, source: WeightSource, spatial, bias_mixed, dy, score, kernel_hw, groups,
                       stride, padding, dilation, config: dict) -> Launch:
    """``score`` is (B, m, groups·N_TILES, Ho·Wo) in the accumulation dtype."""
    if not cacheable(x):
        return _guide_score_launch(x, source, spatial, bias_mixed, dy, score, kernel_hw, groups, stride, padding,
                                   dilation, config)
    key = ("expert_conv_guide_score", layout(x), _source_key(source), layout(spatial), layout(bias_mixed),
           layout(dy), layout(score), tuple(kernel_hw), groups, *stride, *padding, *dilation, config_key(config))
    return planned(key, ("x_ptr", "dy_ptr", "score_ptr", "w_ptr", "coef_ptr", "spatial_ptr", "bias_ptr"),
                   (x, dy, score, source.weight, source.coef, spatial, bias_mixed),
                   lambda: _guide_score_launch(x, source, spatial, bias_mixed, dy, score, kernel_hw, groups, stride,
                                               padding, dilation, config))


def _guide_score_launch(x, source: WeightSource, spatial, bias_mixed, dy, score, kernel_hw, groups,
                        stride, padding, dilation, config: dict) -> Launch:
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    m = score.shape[1]
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    n_tiles = cdiv(Cout // groups, meta["BLOCK_N"])
    tiles = cdiv(Ho * Wo, meta["BLOCK_P"])
    args = dict(
        x_ptr=x, dy_ptr=dy, score_ptr=score, **_mixing_args(source, spatial), **_bias_args(bias_mixed),
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups,
        TILES=tiles, N_TILES=n_tiles,
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sdyb", "sdyc", "sdyh", "sdyw"), dy.stride())),
        s_score_b=score.stride(0), s_score_r=score.stride(1), s_score_n=score.stride(2),
        **_geometry_args(stride, padding, dilation),
    )
    index_64 = ec.needs_int64(x, dy, score, source.weight, source.coef, spatial, bias_mixed)
    meta.update(_tap_meta(Cin // groups, kernel_hw, meta["BLOCK_K"], x, index_64))
    meta.update(MIX=source.mix, NUM_MIX=source.num_mix, HAS_SPATIAL=spatial is not None,
                HAS_BIAS=bias_mixed is not None, INDEX_64=index_64, ACC_DTYPE=_acc_dtype(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype))
    _check_grid(groups * n_tiles)
    return Launch(expert_conv_guide_score_kernel, (B * tiles, groups * n_tiles, m), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=_conv_tile_loops(Cin // groups, meta))


def score_tiles(cout: int, groups: int, config: dict) -> int:
    return groups * cdiv(cout // groups, config["BLOCK_N"])


def expert_bank_source(experts: torch.Tensor) -> WeightSource:
    """The E experts read as E kernels every sample shares: ``W[b, e] = experts[e]`` (zero b stride)."""
    experts = _channels_innermost(experts)
    s = experts.stride()
    return WeightSource(experts, (0, s[0], 0, *s[1:]), None, 1)


def uses_expert_bank(experts: torch.Tensor, routing: torch.Tensor | None) -> bool:
    """Whether the guide scores come from the experts' outputs: y_r = Σ_e routing[b, r, e]·z_e, so
    ∂S[b, r] = Σ_e routing[b, r, e]·(dy · z_e) needs E plain convs with no mixing at all, against m
    convs of mixed kernels (each weight tile mixed from E expert tiles per K-step)."""
    return routing is not None and experts.shape[0] <= routing.shape[1]


def _bank_problem(x, experts, groups, stride, padding, dilation) -> dict:
    """:func:`default_forward_config`'s arguments for the expert-bank guide scores: one plain conv
    over every pixel of a sample, so 128-pixel tiles from 512 pixels on (D1 guide bf16 NHWC
    PREDICTED 62% at 64 -> 88% on triton 3.6)."""
    pixels = output_pixels(x.shape[2:], experts.shape[3:], stride, padding, dilation)
    return dict(cout_g=experts.shape[1] // groups, dtype=x.dtype, pixels_per_region=1024 if pixels >= 512 else pixels,
                index_64=_past_int32(x, experts.shape[0] * experts.shape[1], pixels),  # the E experts' outputs
                cin_g=experts.shape[2], mixing=False, channels_last=is_channels_last(x))


def bank_config(x, experts, groups, stride, padding, dilation) -> dict:
    return get_config("expert_conv_fwd", problem_key(x, experts, 1, groups, stride),
                      default_forward_config(**_bank_problem(x, experts, groups, stride, padding, dilation)))


def bank_copies_input(x, experts, groups, stride, padding, dilation) -> bool:
    """Whether the expert-bank guide scores on NCHW ``x`` read a channels_last copy of it, as the
    forward does (:func:`_copies_for_streaming`)."""
    return _copies_for_streaming(_bank_problem(x, experts, groups, stride, padding, dilation))


def bank_route(x, experts, groups, stride, padding, dilation) -> tuple[bool, dict]:
    """(whether it reads a channels_last copy of ``x``, its config): the forward's routing
    (:func:`forward_route`, no row boxes) for the expert-bank guide scores."""
    problem = _bank_problem(x, experts, groups, stride, padding, dilation)
    copies = _copies_for_streaming(problem)
    return copies, _routed_config("expert_conv_fwd", problem_key(x, experts, 1, groups, stride), problem, copies,
                                  default_forward_config)


def expert_conv_guide_scores(x, experts, routing, spatial, bias_mixed, dy, groups, stride, padding, dilation,
                             materialise: bool | None = None, config: dict | None = None,
                             expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """∂S[b, r, i, j] = Σ_o dy[b, o, i, j] · y_r[b, o, i, j], (B, m, Ho, Wo) in the accumulation dtype.

    ``expert_bias`` (E, Cout), the experts' own bias that ``bias_mixed`` mixes: with it (or without
    a bias) and ``uses_expert_bank``, the scores are formed per expert and mixed by ``routing``
    afterwards (a (m x E) @ (E x Ho·Wo) product per sample), unless ``materialise`` forces a mode.
    """
    B, m = routing.shape[:2]
    Cout, Ho, Wo = dy.shape[1:]
    if (materialise is None and uses_expert_bank(experts, routing)
            and (bias_mixed is None or expert_bias is not None)):
        E = experts.shape[0]
        if config is None:
            copies, config = bank_route(x, experts, groups, stride, padding, dilation)
            x = channels_last_copy(x) if copies else x
        score = torch.empty((B, E, score_tiles(Cout, groups, config), Ho * Wo), dtype=_acc_torch_dtype(x.dtype),
                            device=x.device)
        bias = expert_bias.expand(B, E, Cout) if bias_mixed is not None else None
        guide_score_launch(x, expert_bank_source(experts), spatial, bias, dy, score, experts.shape[3:], groups,
                           stride, padding, dilation, config)()
        return torch.matmul(routing.to(score.dtype), score.sum(2)).reshape(B, m, Ho, Wo)
    config = config or ec.forward_config(x, experts, m, groups, stride, padding, dilation)
    score = torch.empty((B, m, score_tiles(Cout, groups, config), Ho * Wo), dtype=_acc_torch_dtype(x.dtype),
                        device=x.device)
    for samples, materialised in ec.batch_parts(experts, routing, Ho * Wo, materialise):
        source = ec.weight_source(experts, routing[samples], materialised)
        guide_score_launch(x[samples], source, _part(spatial, samples), _part(bias_mixed, samples), dy[samples],
                           score[samples], experts.shape[3:], groups, stride, padding, dilation, config)()
    return score.sum(2).reshape(B, m, Ho, Wo)


def catalogue() -> list[Launch]:
    """The guide scores' default launches at the expert catalogue's DRConv layers (the first part of
    the batch; the expert bank's too where the op runs it) and over 2^31 elements, on meta tensors
    (AOT checks)."""
    launches = []
    for problem in catalogue_problems():
        if problem.m == 1:
            continue
        x, y, experts, routing, spatial, bias = (problem.x, problem.y, problem.experts, problem.routing,
                                                 problem.spatial, problem.bias)
        m, groups, geometry = problem.m, problem.groups, problem.geometry
        E, Cout = experts.shape[:2]
        B, Ho, Wo = y.shape[0], y.shape[2], y.shape[3]
        config = ec.forward_config(x, experts, m, groups, *geometry)
        samples, materialised = ec.batch_parts(experts, routing, Ho * Wo, None)[0]
        xp = _part(x, samples)
        score = torch.empty((xp.shape[0], m, score_tiles(Cout, groups, config), Ho * Wo), dtype=torch.float32,
                            device="meta")
        launch = guide_score_launch(xp, ec.weight_source(experts, _part(routing, samples), materialised),
                                    _part(spatial, samples), _part(bias, samples), _part(y, samples), score,
                                    experts.shape[3:], groups, *geometry, config)
        launch.label = problem.tag + (" materialised" if materialised else "")
        launches.append(launch)
        if uses_expert_bank(experts, routing):  # what the op runs; the above when E > m
            bank_x = channels_last_stand_in(x) if bank_copies_input(x, experts, groups, *geometry) else x
            bank_cfg = bank_config(bank_x, experts, groups, *geometry)
            bank_score = torch.empty((B, E, score_tiles(Cout, groups, bank_cfg), Ho * Wo), dtype=torch.float32,
                                     device="meta")
            launch = guide_score_launch(bank_x, expert_bank_source(experts), spatial,
                                        torch.empty((E, Cout), dtype=x.dtype, device="meta").expand(B, E, Cout), y,
                                        bank_score, experts.shape[3:], groups, *geometry, bank_cfg)
            launch.label = problem.tag + " expert bank"
            launches.append(launch)
    return launches + [_int64_launch()]


def _int64_launch() -> Launch:
    """Over 2^31 elements: DRConv mixing on the fly with spatial attention and bias."""
    B, C, H, W, k, E = INT64_CATALOGUE_SHAPE
    m = 4
    meta = dict(dtype=torch.bfloat16, device="meta")
    x = torch.empty((B, C, H, W), **meta)
    experts = torch.empty((E, C, C, k, k), **meta)
    routing = torch.empty((B, m, E), **meta)
    config = ec.forward_config(x, experts, m, 1, *INT64_CATALOGUE_GEOMETRY)
    score = torch.empty((B, m, score_tiles(C, 1, config), H * W), dtype=torch.float32, device="meta")
    launch = guide_score_launch(x, ec.weight_source(experts, routing, False), torch.empty((B, k, k), **meta),
                                torch.empty((B, m, C), **meta), x, score, (k, k), 1, *INT64_CATALOGUE_GEOMETRY,
                                config)
    assert launch.meta["INDEX_64"]
    launch.label = "over 2^31 elements DRConv m=4 spatial bfloat16 NCHW"
    return launch
