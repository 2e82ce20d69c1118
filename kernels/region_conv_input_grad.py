"""DRConv's input gradient by columns: one plain GEMM per region tile, then a fold.

``dx[b, c, q] = Σ_{u, v} Σ_o W[b, r(p), o, c, u, v] · dy[b, o, p]`` over the output pixels
``p = (q + pad - (u, v)·dilation) / stride`` that q feeds. The kernel a term uses is that of the
*output* pixel p's region, which changes with the tap: a tile of input pixels meets every region at
every tap, and a kernel that walks dx's pixels multiplies each tap's pixels once per region (m times
a plain conv's MMA: ``region_conv.region_backward_input``, kept where the columns would not fit).

Grouped by output pixel instead, the product is the forward's: the columns
``U[b, p, (g, u, v, c)] = Σ_o dy[b, o, p] · W[b, r(p), o, c, u, v]`` of a region tile share one kernel,
so ``region_conv_columns_kernel`` computes them as one GEMM per tile of dy's pixels sorted by region (the
forward's region tables) against the region kernels laid (g, u, v, c) x o: one conv's MMA, however
the regions lie. A fold then sums each input pixel's K² columns (``fold_columns_kernel``) in the
accumulator's precision, in a fixed order.
The columns are K² times dx's size (fp32): a part of the batch at a time (``COLUMNS_BYTES``).

Kernels here know nothing of autograd: ``ops/expert_conv.py`` calls ``region_backward_input``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import region_conv
from ._launch import Launch, cdiv, is_channels_last, needs_int64, next_power_of_2
from .configs import get_config
from .expert_conv import _acc_dtype, _acc_torch_dtype, _input_precision, problem_key
from .layout import channels_last_copy
from .region_tables import RegionTables, meta_region_tables, region_tile, region_tile_bound

# The columns of at most this many bytes exist at once; a sample whose columns alone pass it takes
# the m-region kernel instead, so the memory stays bounded whatever the image.
COLUMNS_BYTES = 64 << 20


@triton.jit
def region_conv_columns_kernel(
    dy_ptr, w_ptr, cols_ptr,
    pixel_start_ptr, count_ptr, perm_ptr,
    P, COUT_G, N_COLS, NUM_REGIONS, TILES, N_TILES,
    sdyb, sdyc, sdyp,
    sw_b, sw_r, sw_n,
    scb, scp,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """cols[b, p, g·N_COLS + n] = Σ_o dy[b, g·COUT_G + o, p] · W[b, r, g·N_COLS + n, o] for the pixels p
    of one region tile: acc (BLOCK_P x BLOCK_N) = dy rows (BLOCK_P x BLOCK_K) @ kernel columns
    (BLOCK_K x BLOCK_N), both read along o (contiguous)."""
    pid = tl.program_id(0)
    b = pid // TILES
    t = pid % TILES
    pid_n = tl.program_id(1)
    g = pid_n // N_TILES
    n = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_COLS
    r, p, pix_ok, valid = region_tile(pixel_start_ptr, count_ptr, perm_ptr, b, t, NUM_REGIONS, P, BLOCK_P, BLOCK_R)
    k_end = tl.where(valid, COUT_G, 0)  # tiles past the sample's last one run no step
    dy_rows = dy_ptr + b * sdyb + p * sdyp + (g * COUT_G) * sdyc
    w_cols = w_ptr + b * sw_b + r * sw_r + (g * N_COLS + n) * sw_n
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + kk
        k_ok = k < COUT_G
        rows = tl.load(dy_rows[:, None] + (k * sdyc)[None, :], mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        kernel = tl.load(w_cols[None, :] + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(rows, kernel, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    cols_off = b * scb + (p * scp)[:, None] + (g * N_COLS + n)[None, :]
    tl.store(cols_ptr + cols_off, acc.to(cols_ptr.dtype.element_ty), mask=pix_ok[:, None] & n_ok[None, :])


@triton.jit
def fold_columns_kernel(
    cols_ptr, dx_ptr,
    H, W, Ho, Wo, CIN_G, Q_TILES, C_TILES,
    scb, scp,
    sdxb, sdxc, sdxh, sdxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dx[b, g·CIN_G + c, q] = Σ_{u, v} cols[b, p(q, u, v), ((g·KH + u)·KW + v)·CIN_G + c] over the
    taps whose p lands on an output pixel: a tile of BLOCK_Q pixels of dx by BLOCK_C channels of one
    group, each tap's columns a channel-contiguous load."""
    pid = tl.program_id(0)
    b = pid // Q_TILES
    q = (pid % Q_TILES) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pid_c = tl.program_id(1)
    g = pid_c // C_TILES
    c = (pid_c % C_TILES) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = q < H * W
    c_ok = c < CIN_G
    h = q // W
    w = q % W
    cols = cols_ptr + b * scb + (g * (KH * KW) * CIN_G + c)[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC_DTYPE)
    for u in tl.static_range(KH):
        hs = h + PH - u * DH
        i = hs // SH
        h_ok = (hs >= 0) & (hs == i * SH) & (i < Ho)
        for v in tl.static_range(KW):
            ws = w + PW - v * DW
            j = ws // SW
            ok = q_ok & h_ok & (ws >= 0) & (ws == j * SW) & (j < Wo)
            part = tl.load(cols + ((i * Wo + j) * scp)[:, None] + (u * KW + v) * CIN_G,
                           mask=ok[:, None] & c_ok[None, :], other=0.0)
            acc += part.to(ACC_DTYPE)
    dx_off = b * sdxb + ((g * CIN_G + c) * sdxc)[None, :] + (h * sdxh + w * sdxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def columns_dtype(dtype: torch.dtype) -> torch.dtype:
    """The columns keep the product's accumulator (fp32, fp64 for fp64): dx is rounded once, as
    the m-region kernel and cuDNN round it."""
    return _acc_torch_dtype(dtype)


def column_count(kernel_hw, cin: int) -> int:
    return kernel_hw[0] * kernel_hw[1] * cin


def sample_column_bytes(dy: torch.Tensor, dx: torch.Tensor, kernel_hw) -> int:
    """Bytes of one sample's columns (the input gradient's workspace per sample)."""
    return column_count(kernel_hw, dx.shape[1]) * dy.shape[2] * dy.shape[3] * columns_dtype(dx.dtype).itemsize


def columns_part(dy: torch.Tensor, dx: torch.Tensor, experts: torch.Tensor, m: int) -> int:
    """Samples a part holds: their m region kernels fit ``region_conv``'s workspace and their columns
    ``COLUMNS_BYTES``."""
    column_bytes = max(1, sample_column_bytes(dy, dx, experts.shape[3:]))
    kernels_part = region_conv.batch_part(dx.shape[0], m, experts[0].numel(), dx.element_size())
    return max(1, min(kernels_part, COLUMNS_BYTES // column_bytes))


def uses_columns(dy: torch.Tensor, dx: torch.Tensor, kernel_hw, groups: int) -> bool:
    """Whether the input gradient runs by columns: one sample's columns fit ``COLUMNS_BYTES``, a
    group has the 16 output channels the product's reduction block needs, and offsets fit 32 bits."""
    return (sample_column_bytes(dy, dx, kernel_hw) <= COLUMNS_BYTES and dy.shape[1] // groups >= 16
            and not needs_int64(dy, dx))


def column_kernels(experts: torch.Tensor, routing: torch.Tensor, spatial: torch.Tensor | None,
                   groups: int) -> torch.Tensor:
    """The region kernels as the column product reads them, (b, m, g·kh·kw·Cin/g, Cout/g, 1, 1): a row
    per column (group, tap, input channel), the output channels of its group along it (contiguous).
    Mixed straight into that order: only the E experts are permuted."""
    E, Cout, cin_g, kh, kw = experts.shape
    B, m = routing.shape[:2]
    ordered = experts.reshape(E, groups, Cout // groups, cin_g, kh, kw).permute(0, 1, 4, 5, 3, 2)
    mixed = torch.matmul(routing.reshape(B * m, E), ordered.reshape(E, -1)).reshape(B, m, groups, kh, kw, -1)
    if spatial is not None:
        mixed.mul_(spatial.to(mixed.dtype)[:, None, None, :, :, None])
    return mixed.reshape(B, m, groups * kh * kw * cin_g, Cout // groups, 1, 1)


def default_columns_config(dtype: torch.dtype) -> dict:
    """The column product: 64 pixels x 128 columns, the reduction in 16-channel steps four deep. A
    program's path (tables, pixel ids, then its few steps) is most of its time, so the shortest steps
    with the deepest pipeline, three programs an SM (PREDICTED, triton 3.6, D1 part, bf16: 64-channel
    steps two deep 11.2 µs, 32 three deep 10.2, 16 four deep 8.4; fp32: 32 three deep 11.4, 16 four
    deep 9.2; 64 x 64 tiles or several column tiles a program slower)."""
    return {"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 4,
            "num_stages": 4 if dtype.itemsize <= 4 else 2}


def columns_config(dx, experts, m: int, groups: int, stride) -> dict:
    """The column product's config for the layer whose input gradient is ``dx`` (keyed as the expert
    kernels key it; tuned as ``region_conv_columns``)."""
    return get_config("region_conv_columns", problem_key(dx, experts, m, groups, stride),
                      default_columns_config(dx.dtype))


def fold_config(cin_g: int) -> dict:
    """32 pixels x 32 channels: nine or ten programs an SM keep the column reads in flight (PREDICTED,
    triton 3.6, D1 part: bf16 at 64 x 64, 112 registers, 7.2 µs NHWC and 16 NCHW against the 5.3 µs
    HBM floor, which 32 x 32 reaches with half the path; fp32 (three samples a part) 32 x 64 6.0/8.3
    µs, 32 x 32 4.9/3.9 µs)."""
    return {"BLOCK_Q": 32, "BLOCK_C": max(16, min(32, next_power_of_2(cin_g))), "num_warps": 4}


def columns_launch(dy, weight, regions, cols, groups: int, config: dict) -> Launch:
    """The columns ``cols`` (b, g·kh·kw·Cin/g, Ho, Wo) of dy, both channels_last, and the
    ``column_kernels`` ``weight``."""
    B, Cout, Ho, Wo = dy.shape
    m, n_cols = weight.shape[1], weight.shape[2] // groups
    for t in (dy, cols):  # a pixel is one stride apart from the next
        if t.stride(2) != Wo * t.stride(3):
            raise ValueError("the column product reads dy and writes the columns channels_last")
    meta = {k: config[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")}
    tiles = region_tile_bound(Ho * Wo, m, meta["BLOCK_P"])
    n_tiles = cdiv(n_cols, meta["BLOCK_N"])
    sw = weight.stride()
    args = dict(dy_ptr=dy, w_ptr=weight, cols_ptr=cols, pixel_start_ptr=regions.pixel_start, count_ptr=regions.count,
                perm_ptr=regions.perm,
                P=Ho * Wo, COUT_G=Cout // groups, N_COLS=n_cols, NUM_REGIONS=m, TILES=tiles, N_TILES=n_tiles,
                sdyb=dy.stride(0), sdyc=dy.stride(1), sdyp=dy.stride(3), sw_b=sw[0], sw_r=sw[1], sw_n=sw[2],
                scb=cols.stride(0), scp=cols.stride(3))
    meta.update(BLOCK_R=next_power_of_2(m), ACC_DTYPE=_acc_dtype(dy.dtype),
                INPUT_PRECISION=_input_precision(dy.dtype))
    if weight.stride(3) != 1:
        raise ValueError("the column kernels' output channels must be contiguous (column_kernels)")
    if groups * n_tiles > 65535:
        raise ValueError(f"too many column tiles for the grid ({groups * n_tiles}); use a larger BLOCK_N")
    return Launch(region_conv_columns_kernel, (B * tiles, groups * n_tiles, 1), args, meta, config["num_warps"],
                  config["num_stages"], loops=(cdiv(Cout // groups, meta["BLOCK_K"]),))


def fold_launch(cols, dx, kernel_hw, groups: int, stride, padding, dilation, config: dict) -> Launch:
    B, Cin, H, W = dx.shape
    Ho, Wo = cols.shape[2:]
    cin_g = Cin // groups
    q_tiles, c_tiles = cdiv(H * W, config["BLOCK_Q"]), cdiv(cin_g, config["BLOCK_C"])
    args = dict(cols_ptr=cols, dx_ptr=dx, H=H, W=W, Ho=Ho, Wo=Wo, CIN_G=cin_g, Q_TILES=q_tiles, C_TILES=c_tiles,
                scb=cols.stride(0), scp=cols.stride(3),
                **dict(zip(("sdxb", "sdxc", "sdxh", "sdxw"), dx.stride())),
                SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])
    meta = dict(KH=kernel_hw[0], KW=kernel_hw[1], BLOCK_Q=config["BLOCK_Q"], BLOCK_C=config["BLOCK_C"],
                ACC_DTYPE=_acc_dtype(dx.dtype))
    return Launch(fold_columns_kernel, (B * q_tiles, groups * c_tiles, 1), args, meta, config["num_warps"], 1)


def columns_empty(B: int, Cin: int, kernel_hw, Ho: int, Wo: int, dtype: torch.dtype, device) -> torch.Tensor:
    shape = (B, column_count(kernel_hw, Cin), Ho, Wo)
    return torch.empty(shape, dtype=columns_dtype(dtype), device=device, memory_format=torch.channels_last)


def region_backward_input(dy, experts, routing, spatial, regions: RegionTables, dx, groups, stride, padding,
                          dilation) -> None:
    """dx of a DRConv layer (``routing`` (B, m, E), ``regions`` its guide's tables): by columns where
    ``uses_columns``, else by ``region_conv``'s m-region kernel; dy read channels_last (a copy of an
    NCHW one) either way."""
    kernel_hw = tuple(experts.shape[3:])
    if not uses_columns(dy, dx, kernel_hw, groups):
        region_conv.region_backward_input(dy, experts, routing, spatial, regions, dx, groups, stride, padding,
                                          dilation)
        return
    B, m = routing.shape[:2]
    Cin = dx.shape[1]
    Ho, Wo = dy.shape[2:]
    if not is_channels_last(dy):
        dy = channels_last_copy(dy)
    config = columns_config(dx, experts, m, groups, stride)
    part = columns_part(dy, dx, experts, m)
    cols = columns_empty(min(part, B), Cin, kernel_hw, Ho, Wo, dx.dtype, dx.device)
    fold = fold_config(Cin // groups)
    for b0 in range(0, B, part):
        s = slice(b0, b0 + part)
        n = len(range(B)[s])
        weight = column_kernels(experts, routing[s], spatial[s] if spatial is not None else None, groups)
        columns_launch(dy[s], weight, regions.part(s), cols[:n], groups, config)()
        fold_launch(cols[:n], dx[s], kernel_hw, groups, stride, padding, dilation, fold)()


def catalogue() -> list[Launch]:
    """The column product and the fold at representative DRConv layers, on meta tensors (AOT checks)."""
    launches = []
    shapes = [  # (B, Cin, Cout, H, W, k, groups, m, stride, label)
        (32, 128, 128, 28, 28, 3, 1, 8, 1, "DRConv D1"),
        (4, 32, 48, 15, 17, 3, 2, 4, 2, "DRConv groups 2 stride 2"),
    ]
    for B, Cin, Cout, H, W, k, groups, m, s, label in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                meta = dict(dtype=dtype, device="meta")
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                Ho, Wo = ((n + 2 * (k // 2) - k) // s + 1 for n in (H, W))
                dy = torch.empty((B, Cout, Ho, Wo), **meta).to(memory_format=torch.channels_last)
                dx = torch.empty((B, Cin, H, W), **meta).to(memory_format=fmt)
                experts = torch.empty((1, Cout, Cin // groups, k, k), **meta)
                part = columns_part(dy, dx, experts, m)
                weight = torch.empty((part, m, column_count((k, k), Cin), Cout // groups, 1, 1), **meta)
                config = default_columns_config(dtype)
                cols = columns_empty(part, Cin, (k, k), Ho, Wo, dtype, "meta")
                tables = meta_region_tables(part, Ho * Wo, m)
                tag = f"{label} {str(dtype).removeprefix('torch.')} {'NHWC' if channels_last else 'NCHW'}"
                product = columns_launch(dy[:part], weight, tables, cols, groups, config)
                product.label = tag + " input-gradient columns"
                fold = fold_launch(cols, dx[:part], (k, k), groups, (s, s), (k // 2, k // 2), (1, 1),
                                   fold_config(Cin // groups))
                fold.label = tag + " input-gradient fold"
                launches += [product, fold]
    return launches


__all__ = ["region_backward_input", "uses_columns", "column_kernels", "columns_launch", "fold_launch", "catalogue",
           "COLUMNS_BYTES"]
