"""DRConv (docs/operators.md §2, ``guide``): the region forward as a grouped implicit GEMM on
materialised region kernels.

Each output pixel uses the kernel of its region, ``W[b, r] = spatial[b] ⊙ Σ_e routing[b, r, e]·experts[e]``.
The pixels of a sample are sorted by region (``region_tables.py``), so a tile of pixels
shares one kernel and the forward is one plain conv per pixel. Why not mix the kernels on the fly
as the expert kernels do: a region of a DRConv layer holds about Ho·Wo/m pixels (98 at D1), so
each mixed weight element (E FMAs on the CUDA cores) would feed fewer than a hundred MMAs, and
the mixing alone would take about as long as the product. So the m mixed kernels of a part of
the batch are written once by a GEMM (``routing (b·m, E) @ experts``), into a workspace of at
most ``WORKSPACE_BYTES`` (a few samples at a time: it stays in L2), and the kernel here reads them.

Tiles are transposed against the expert kernels': output channels are the MMA's M side and a
tile's pixels its N side, so a pixel tile may be narrower than wgmma's 64 rows (``BLOCK_P`` 64 by
default, 32 where tuned). A sample's tiles are ``Σ_r ceil(count_r / BLOCK_P)``, at most
``ceil(Ho·Wo / BLOCK_P) + m - 1``: the grid takes that bound (the model counts every program's
full loop), and a region's last, partial tile wastes under BLOCK_P columns.

The input gradient runs by columns (``region_conv_input_grad``: one conv's MMA). Where one
sample's columns would not fit its workspace, ``region_backward_input`` here reads the materialised
kernels through the expert kernels' input-gradient kernel, which multiplies a tap's pixels once per
region (the rows of the other regions masked off): m times a plain conv's MMA, in one pipelined loop.

Kernels here know nothing of autograd: ``ops/expert_conv.py`` calls ``region_forward``, and
``region_conv_input_grad.region_backward_input`` calls ``region_backward_input`` here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, cdiv, is_channels_last, needs_int64, next_power_of_2
from .configs import get_config
from .expert_conv import (CIN_INNERMOST, COUT_INNERMOST, WeightSource, _acc_dtype, _input_precision, _inside_bits,
                          mix_experts, problem_key)
from .expert_conv_input_grad import backward_input_launch, input_grad_config
from .layout import channels_last_copy
from .region_tables import RegionTables, meta_region_tables, region_tile, region_tile_bound

# The mixed kernels of at most this many bytes exist at once (a part of the batch at a time).
WORKSPACE_BYTES = 16 << 20


@triton.jit
def region_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    pixel_start_ptr, count_ptr, perm_ptr,
    H, W, Ho, Wo, CIN_G, COUT_G, NUM_REGIONS, TILES, O_TILES,
    sxb, sxc, sxh, sxw,
    sw_b, sw_r, sw_o, sw_i, sw_u, sw_v,
    sbias_b, sbias_r, sbias_o,
    syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y[b, o, p] = bias[b, r, o] + Σ_{u, v, c} W[b, r, o, c, u, v] · x[b, c, h(p, u), w(p, v)] for the
    pixels p of one region r: acc (BLOCK_O x BLOCK_P) = W tile (BLOCK_O x BLOCK_K) @ patch (BLOCK_K x BLOCK_P)."""
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    pid_o = tl.program_id(1)
    g = pid_o // O_TILES
    on = (pid_o % O_TILES) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = on < COUT_G
    o = g * COUT_G + on
    r, p, pix_ok, valid = region_tile(pixel_start_ptr, count_ptr, perm_ptr, b, t, NUM_REGIONS, Ho * Wo, BLOCK_P,
                                      BLOCK_R)
    # Tiles past the sample's last one (the grid's bound) run no K-step.
    c_end = tl.where(valid, CIN_G, 0)
    i = p // Wo
    j = p % Wo
    h_first = i * SH - PH
    w_first = j * SW - PW
    # One loop over (tap, channel block), as the expert kernels' ``_conv_tile``: the pipeline's loads
    # run ahead across the taps, where a channel loop per tap filled and drained it KH·KW times a
    # tile (D1: two K-steps a tap, each waiting a round trip). A tap's offset is a scalar and whether
    # a pixel reads inside the image bit u of h_inside and bit v of w_inside.
    h_inside = tl.where(pix_ok, _inside_bits(h_first, DH, H, KH), 0)
    w_inside = _inside_bits(w_first, DW, W, KW)
    x_cols = x_ptr + b * sxb + (g * CIN_G) * sxc + h_first * sxh + w_first * sxw
    w_rows = w_ptr + b * sw_b + r * sw_r + o * sw_o
    cc = tl.arange(0, BLOCK_K)
    if HAS_BIAS:  # loaded before the loop: after it, its round trip would end the tile's path
        bias = tl.load(bias_ptr + b * sbias_b + r * sbias_r + o * sbias_o, mask=o_ok, other=0.0)
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC_DTYPE)
    tap = 0
    c0 = 0
    for _ in range(0, KH * KW * tl.cdiv(c_end, BLOCK_K)):
        u = tap // KW
        v = tap - u * KW
        col_ok = ((h_inside >> u) & (w_inside >> v) & 1) != 0
        c = c0 + cc
        c_ok = c < c_end
        weight = tl.load((w_rows + u * sw_u + v * sw_v)[:, None] + (c * sw_i)[None, :],
                         mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        patch = tl.load((x_cols + (u * DH) * sxh + (v * DW) * sxw)[None, :] + (c * sxc)[:, None],
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        # out_dtype named: triton 3.6 asserts it equals acc's (fp64 accumulators).
        acc = tl.dot(weight, patch, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        c0 += BLOCK_K
        tap_done = c0 >= c_end
        tap += tap_done.to(tl.int32)
        c0 = tl.where(tap_done, 0, c0)
    if HAS_BIAS:
        acc += bias.to(ACC_DTYPE)[:, None]
    y_off = b * syb + (o * syc)[:, None] + (i * syh + j * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & pix_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def default_forward_config(cout_g: int, cin_g: int, dtype: torch.dtype, channels_last: bool = True) -> dict:
    """Output-channel tiles of up to 128 and 64-pixel tiles: at 32 the region kernels' tiles, read
    once per pixel tile, bound 2-byte NHWC on L1 traffic (PREDICTED on triton 3.6, D1 fwd bf16 NHWC:
    32 pixels 51%, 64 pixels 66% at four warps). Eight warps: at four, the 128 x 64 fp32
    accumulator spills on sm_80. Stages: a part of the batch is about one wave of tiles, so a
    tile's path is the kernel's time and every K-step's load must be in flight a few steps ahead
    (PREDICTED, D1 fwd bf16 NHWC, 3 stages 19%, 4 stages 34%; fp32, 32-channel steps: 2 stages 7%,
    4 15%, 6 20%). fp32 takes 64-channel output tiles four stages deep: its 4-byte region kernels
    leave a part half the samples of 16-bit's, so 128-channel tiles kept half the SMs idle
    (PREDICTED, triton 3.6, D1 fwd fp32 NHWC/NCHW: 128 x 64 six stages 20.8/16.1%, 64 x 64 four
    stages 25.0/19.5%; 3.9: 21.0/19.6% -> 25.6/23.5%).

    ``channels_last``: the layer's layout, which is the output's (the input is read channels_last
    either way: ``forward_copies_input``). An NCHW output is stored an element at a time, with an
    address each: 2-byte tiles of 64 output channels at four warps keep three programs an SM
    (PREDICTED, D1 fwd bf16 NCHW: 128 channels 12%, 64 25%)."""
    block_k = min({2: 64, 4: 32}.get(dtype.itemsize, 16), 1 << (cin_g.bit_length() - 1))
    block_o = max(16, min(128, next_power_of_2(cout_g)))
    narrow_out = not channels_last and dtype.itemsize == 2
    if narrow_out or dtype.itemsize == 4:
        block_o = min(block_o, 64)
    return {"BLOCK_O": block_o, "BLOCK_P": 64, "BLOCK_K": block_k,
            "num_warps": 4 if narrow_out or block_o < 64 else 8,
            "num_stages": {2: 4, 4: 4}.get(dtype.itemsize, 2)}


def forward_copies_input(x: torch.Tensor) -> bool:
    """Whether the region forward reads a channels_last copy of ``x``: an NCHW patch is gathered one
    2- or 4-byte channel at a time, a channels_last one streams (PREDICTED, triton 3.6, D1 fwd NCHW
    with the copy counted: bf16 2.2% -> 25%, fp32 3.5% -> 16%)."""
    return not is_channels_last(x)


def forward_config(x, experts, m, groups, stride, padding, dilation) -> dict:
    """The config for the layer of input ``x`` (keyed by its layout, the output's)."""
    cout_g = experts.shape[1] // groups
    return get_config("region_conv_fwd", problem_key(x, experts, m, groups, stride),
                      default_forward_config(cout_g, experts.shape[2], x.dtype, is_channels_last(x)))


def supported(x: torch.Tensor, experts_like: torch.Tensor, y: torch.Tensor, m: int) -> bool:
    """Whether ``region_forward`` takes the layer: regions, a reduction block of channels per tap
    (16 or more per group) and 32-bit offsets; the expert kernels' region path takes the rest."""
    return m > 1 and experts_like.shape[2] >= 16 and not needs_int64(x, y)


def batch_part(B: int, m: int, filter_elements: int, element_size: int) -> int:
    """Samples whose m mixed kernels (``filter_elements`` = Cout·Cin/g·kh·kw each) fit the workspace."""
    return max(1, min(B, WORKSPACE_BYTES // max(1, m * filter_elements * element_size)))


def mixed_kernels(experts: torch.Tensor, routing: torch.Tensor, spatial: torch.Tensor | None,
                  innermost: int = CIN_INNERMOST) -> torch.Tensor:
    """``spatial ⊙ routing @ experts`` as (b, m, Cout, Cin/g, kh, kw), the pass's reduction axis
    (``innermost``: Cin/g for the forward, Cout for the input gradient) innermost in memory."""
    mixed = mix_experts(experts, routing, innermost)
    if spatial is not None:
        mixed.mul_(spatial.to(mixed.dtype)[:, None, None, None, :, :])
    return mixed


def forward_launch(x, weight, bias_mixed, regions, y, groups, stride, padding, dilation, config: dict) -> Launch:
    """``weight`` (B, m, Cout, Cin/g, kh, kw) any strides."""
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = y.shape[1:]
    m, kh, kw = weight.shape[1], weight.shape[4], weight.shape[5]
    meta = {k: config[k] for k in ("BLOCK_O", "BLOCK_P", "BLOCK_K")}
    o_tiles = cdiv(Cout // groups, meta["BLOCK_O"])
    tiles = region_tile_bound(Ho * Wo, m, meta["BLOCK_P"])
    bias_strides = bias_mixed.stride() if bias_mixed is not None else (0, 0, 0)
    sw = weight.stride()
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias_mixed, y_ptr=y,
        pixel_start_ptr=regions.pixel_start, count_ptr=regions.count, perm_ptr=regions.perm,
        H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=Cin // groups, COUT_G=Cout // groups, NUM_REGIONS=m, TILES=tiles,
        O_TILES=o_tiles,
        **dict(zip(("sxb", "sxc", "sxh", "sxw"), x.stride())),
        **dict(zip(("sw_b", "sw_r", "sw_o", "sw_i", "sw_u", "sw_v"), sw)),
        **dict(zip(("sbias_b", "sbias_r", "sbias_o"), bias_strides)),
        **dict(zip(("syb", "syc", "syh", "syw"), y.stride())),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
    )
    meta.update(KH=kh, KW=kw, BLOCK_R=next_power_of_2(m), HAS_BIAS=bias_mixed is not None,
                ACC_DTYPE=_acc_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype))
    if groups * o_tiles > 65535:
        raise ValueError(f"too many channel tiles for the grid ({groups * o_tiles}); use a larger BLOCK_O")
    # Every program counted with the full K loop: tiles past a sample's last one are the bound's slack.
    return Launch(region_conv_fwd_kernel, (B * tiles, groups * o_tiles, 1), args, meta,
                  config.get("num_warps", 4), config.get("num_stages", 2),
                  loops=(kh * kw * cdiv(Cin // groups, meta["BLOCK_K"]),))


def region_forward(x, experts, routing, spatial, bias_mixed, regions: RegionTables, y, groups, stride, padding,
                   dilation, config: dict | None = None) -> None:
    """y of a DRConv layer: ``routing`` (B, m, E), ``bias_mixed`` (B, m, Cout) or None, ``regions`` the
    tables of its guide.

    Per part of the batch: its mixed kernels (``mixed_kernels``), then one launch over its region tiles
    (of x's channels_last copy where x is NCHW).
    """
    B, m = routing.shape[:2]
    config = config or forward_config(x, experts, m, groups, stride, padding, dilation)
    if forward_copies_input(x):
        x = channels_last_copy(x)
    part = batch_part(B, m, experts[0].numel(), x.element_size())
    for b0 in range(0, B, part):
        s = slice(b0, b0 + part)
        weight = mixed_kernels(experts, routing[s], spatial[s] if spatial is not None else None)
        forward_launch(x[s], weight, bias_mixed[s] if bias_mixed is not None else None, regions.part(s), y[s],
                       groups, stride, padding, dilation, config)()


def backward_input_supported(dy: torch.Tensor, dx: torch.Tensor, m: int) -> bool:
    return m > 1 and not needs_int64(dy, dx)


def region_backward_input(dy, experts, routing, spatial, regions: RegionTables, dx, groups, stride, padding,
                          dilation, config: dict | None = None) -> None:
    """dx of a DRConv layer by the expert kernels' input-gradient kernel (its loop over the regions a
    tap's pixels hold), reading the materialised region kernels of a part of the batch at a time
    instead of mixing E expert tiles per K-step (D1 dx bf16 NHWC PREDICTED 1.8% -> 7.7% on triton 3.6:
    the m-region loop, not the mixing, is what is left), and an NCHW dy through a channels_last copy;
    the region map is the tables' (``regions``)."""
    B, m = routing.shape[:2]
    config = config or input_grad_config(dx, experts, m, groups, stride)
    if not is_channels_last(dy):  # the kernel streams channel-contiguous dy tiles
        dy = channels_last_copy(dy)
    part = batch_part(B, m, experts[0].numel(), dx.element_size())
    for b0 in range(0, B, part):
        s = slice(b0, b0 + part)
        source = materialised_source(mixed_kernels(experts, routing[s], spatial[s] if spatial is not None else None,
                                                   COUT_INNERMOST))
        backward_input_launch(dy[s], source, None, regions.region[s], dx[s], experts.shape[3:], groups, stride, padding,
                              dilation, m, config)()


def materialised_source(weight: torch.Tensor) -> WeightSource:
    """``weight`` (b, m, Cout, Cin/g, kh, kw) as the expert kernels read materialised kernels."""
    s = weight.stride()
    return WeightSource(weight, (s[0], s[1], 0, *s[2:]), None, 1)


def catalogue() -> list[Launch]:
    """The region forward's and input gradient's default launches at representative shapes, on meta
    tensors (AOT checks)."""
    launches = []
    shapes = [  # (B, Cin, Cout, H, W, k, groups, E, m, stride, label)
        (32, 128, 128, 28, 28, 3, 1, 8, 8, 1, "DRConv D1"),
        (8, 64, 64, 64, 64, 3, 1, 8, 8, 1, "DRConv m=8"),
        (4, 32, 48, 15, 17, 3, 2, 4, 4, 2, "DRConv groups 2 stride 2"),
    ]
    for B, Cin, Cout, H, W, k, groups, E, m, s, label in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                meta = dict(dtype=dtype, device="meta")
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                geometry = ((s, s), (k // 2, k // 2), (1, 1))
                Ho, Wo = ((n + 2 * (k // 2) - k) // s + 1 for n in (H, W))
                x = torch.empty((B, Cin, H, W), **meta).to(memory_format=fmt)
                y = torch.empty((B, Cout, Ho, Wo), **meta).to(memory_format=fmt)
                experts = torch.empty((E, Cout, Cin // groups, k, k), **meta)
                part = batch_part(B, m, experts[0].numel(), dtype.itemsize)
                weight = torch.empty((part, m, Cout, k, k, Cin // groups), **meta).movedim(-1, 3)
                cfg = forward_config(x, experts, m, groups, *geometry)
                tables = meta_region_tables(part, Ho * Wo, m)
                # The kernel reads x channels_last (an NCHW input's copy), writes y in the layer's layout.
                x = x.contiguous(memory_format=torch.channels_last)
                launch = forward_launch(x[:part], weight, torch.empty((part, m, Cout), **meta), tables, y[:part],
                                        groups, *geometry, cfg)
                tag = f"{label} {str(dtype).removeprefix('torch.')} {'NHWC' if channels_last else 'NCHW'}"
                launch.label = tag
                launches.append(launch)
                # The input gradient as region_backward_input runs it: dy channels_last (an NCHW one's
                # copy), the region kernels Cout innermost, dx in the layer's layout.
                dx = torch.empty((B, Cin, H, W), **meta).to(memory_format=fmt)[:part]
                dx_weight = torch.empty((part, m, Cin // groups, k, k, Cout), **meta).movedim(-1, 2)
                launch = backward_input_launch(y.contiguous(memory_format=torch.channels_last)[:part],
                                               materialised_source(dx_weight), None,
                                               torch.empty((part, Ho * Wo), dtype=torch.int32, device="meta"), dx,
                                               (k, k), groups, *geometry, m,
                                               input_grad_config(dx, experts, m, groups, geometry[0]))
                launch.label = tag + " input gradient"
                launches.append(launch)
    return launches


__all__ = ["region_forward", "forward_launch", "forward_config", "forward_copies_input", "supported", "catalogue",
           "mixed_kernels", "batch_part", "WORKSPACE_BYTES"]
