"""DRConv's region tables: every sample's output pixels sorted by region, in one launch.

The region kernels walk a sample's pixels region by region (``expert_conv``, ``region_conv``,
``region_conv_input_grad``, ``expert_conv_weight_grad``), so each tile of BLOCK_P pixels reads one
region's kernel; the input gradients that walk dx's pixels read the region map. The tables are the
region of each pixel (the guide's argmax), the pixels in region order (a stable sort), each region's
count and first slot. None of it depends on a kernel's tile size (``region_tile`` finds a tile's
region from the counts), so one build serves a forward and its backward (``ops/expert_conv.py``).
By torch ops they were eleven launches (an argmax, a segmented sort and a scatter among them),
three times a training step, beside kernels of a few microseconds at D1 (PREDICTED: the region
forward 5.6 us in bf16; nothing here has been timed on a GPU). ``region_tables_kernel`` builds them
in one launch, a program per sample: a counting sort, one pass to count each region's pixels, one
to place them. The torch ops stay as ``region_tables_torch``: the path without kernels, and the
kernel's reference in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._fence import fence
from ._indexing import widen
from ._launch import Launch, cdiv, needs_int64, next_power_of_2, runs_kernels

# Regions whose guide values a thread loads at once (for each of its pixels) before it compares them.
REGIONS_A_BATCH = tl.constexpr(8)
# The kernel unrolls its regions (a count and a scan each): guides of more regions (64 spilled
# thousands of words on sm_90 with triton 3.6) take the torch ops.
MAX_REGIONS = 16


@dataclass
class RegionTables:
    """Pixels of every sample sorted by DRConv region, built on the device without a host sync.

    region: (B, Ho·Wo) int32 region of each output pixel (argmax of the guide);
    perm: (B, Ho·Wo) int32 pixel ids in region order (stable); count, pixel_start: (B, m) int32.
    packed: the one flat int32 tensor the four are views of, in that order, where they are (the
    kernel's tables): what ``packed_tables`` hands the custom ops without a copy.
    """

    region: torch.Tensor
    perm: torch.Tensor
    count: torch.Tensor
    pixel_start: torch.Tensor
    packed: torch.Tensor | None = None

    @property
    def num_regions(self) -> int:
        return self.count.shape[1]

    def part(self, samples: slice) -> RegionTables:
        """The tables of a part of the batch."""
        return RegionTables(self.region[samples], self.perm[samples], self.count[samples],
                            self.pixel_start[samples])


@triton.jit
def region_tile(pixel_start_ptr, count_ptr, perm_ptr, b, t, NUM_REGIONS, P, BLOCK_P: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """(region, pixel ids, pixel mask, valid) of the t-th tile of BLOCK_P pixels of sample b in region
    order: region r's pixels fill ceil(count_r / BLOCK_P) tiles, after the earlier regions' tiles.
    Tiles past the last one are invalid (no pixels). Counts and starts are loaded together and the
    region's picked from them: loaded after the region was known, they cost a round trip more on
    every tile's path (PREDICTED, D1 fwd bf16 NHWC: three before the first operand load)."""
    rr = tl.arange(0, BLOCK_R)
    counts = tl.load(count_ptr + b * NUM_REGIONS + rr, mask=rr < NUM_REGIONS, other=0)
    starts = tl.load(pixel_start_ptr + b * NUM_REGIONS + rr, mask=rr < NUM_REGIONS, other=0)
    tiles = (counts + BLOCK_P - 1) // BLOCK_P
    ends = tl.cumsum(tiles, axis=0)  # the tiles of regions 0..r
    r = tl.sum(((rr < NUM_REGIONS) & (ends <= t)).to(tl.int32), axis=0)  # the regions wholly before tile t
    valid = r < NUM_REGIONS
    r = tl.minimum(r, NUM_REGIONS - 1)
    first_tile = tl.sum(tl.where(rr == r, ends - tiles, 0), axis=0)
    count = tl.sum(tl.where(rr == r, counts, 0), axis=0)
    start = tl.sum(tl.where(rr == r, starts, 0), axis=0)
    q = (t - first_tile) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = q < tl.where(valid, count, 0)
    p = tl.load(perm_ptr + b * P + start + q, mask=pix_ok, other=0)
    return r, p, pix_ok, valid


@triton.jit
def _regions(guide, p, ok, Wo, sgr, sgh, sgw, fence_ptr, P, M: tl.constexpr, FLAT: tl.constexpr,
             VALUE_DTYPE: tl.constexpr):
    """The guide's argmax over its M regions at pixels ``p``, as torch.argmax: the first maximum, and
    a NaN beats every number (the first NaN wins). Compared in VALUE_DTYPE, which holds the guide's
    values exactly. The regions' values are loaded REGIONS_A_BATCH at a time before their first
    compare, then a fence (see _fence) at ``fence_ptr`` (an output's address): ptxas otherwise waited
    a round trip per region."""
    if FLAT:  # the pixels of a region's map back to back: p is the offset (contiguity the compiler sees)
        offset = p
    else:
        offset = (p // Wo) * sgh + (p % Wo) * sgw
    region = tl.zeros(p.shape, dtype=tl.int32)
    for r0 in tl.static_range(0, M, REGIONS_A_BATCH):
        values = ()
        for r in tl.static_range(r0, min(r0 + REGIONS_A_BATCH, M)):
            values = values + (tl.load(guide + (r * sgr + offset), mask=ok, other=0.0),)
        after = fence(fence_ptr, P).to(VALUE_DTYPE)
        for r in tl.static_range(r0, min(r0 + REGIONS_A_BATCH, M)):
            value = values[r - r0].to(VALUE_DTYPE) + after
            if r == 0:
                best = value
            else:
                take = (value > best) | ((value != value) & (best == best))
                best = tl.where(take, value, best)
                region = tl.where(take, r, region)
    return region


@triton.jit
def region_tables_kernel(guide_ptr, region_ptr, perm_ptr, count_ptr, start_ptr,
                         P, Wo, sgb, sgr, sgh, sgw, M: tl.constexpr, BLOCK_P: tl.constexpr,
                         ONE_BLOCK: tl.constexpr, FLAT: tl.constexpr, INDEX_64: tl.constexpr,
                         VALUE_DTYPE: tl.constexpr):
    """The RegionTables of sample ``program_id(0)`` (P pixels, M regions): its
    pixels' regions and each region's count, then each pixel placed at its region's first slot plus
    the pixels of its region before it (a running count per region across the blocks of BLOCK_P
    pixels). The regions are unrolled, each a 1-D pass over the block's pixels: no (pixels x regions)
    tile whose layout conversions and scans the compiler spreads over shuffles. ONE_BLOCK: the
    sample's pixels fit one block, whose regions the second pass keeps from the first."""
    b = tl.cast(tl.program_id(0), tl.int64)
    guide = guide_ptr + b * sgb
    # INDEX_64: the guide's offsets (a region's stride times its index, a row's) past 2^31.
    pixels = widen(tl.arange(0, BLOCK_P), INDEX_64)
    sgr = widen(sgr, INDEX_64)
    fence_ptr = region_ptr + b * P + tl.arange(0, BLOCK_P)
    zero = tl.full((), 0, dtype=tl.int32)
    counts = ()
    for r in tl.static_range(M):
        counts = counts + (zero,)
    region = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + pixels
        ok = p < P
        region = _regions(guide, p, ok, Wo, sgr, sgh, sgw, fence_ptr, P, M, FLAT, VALUE_DTYPE)
        tl.store(region_ptr + b * P + p, region, mask=ok)
        new = ()
        for r in tl.static_range(M):
            new = new + (counts[r] + tl.sum(((region == r) & ok).to(tl.int32), axis=0),)
        counts = new
    starts = ()
    start = zero
    for r in tl.static_range(M):
        starts = starts + (start,)
        tl.store(count_ptr + (b * M + r), counts[r])
        tl.store(start_ptr + (b * M + r), start)
        start += counts[r]
    placed = starts
    for p0 in range(0, P, BLOCK_P):
        p = p0 + pixels
        ok = p < P
        if not ONE_BLOCK:  # the regions again, not read back: other threads stored them, with no barrier
            region = _regions(guide, p, ok, Wo, sgr, sgh, sgw, fence_ptr, P, M, FLAT, VALUE_DTYPE)
        slot = tl.zeros((BLOCK_P,), dtype=tl.int32)
        new = ()
        for r in tl.static_range(M):
            hits = ((region == r) & ok).to(tl.int32)
            # The block's pixels of region r before each, after the earlier blocks' (placed[r]).
            slot += hits * (placed[r] + tl.cumsum(hits, axis=0) - 1)
            if not ONE_BLOCK:  # one block: no block after it needs the running counts
                new = new + (placed[r] + tl.sum(hits, axis=0),)
        if not ONE_BLOCK:
            placed = new
        tl.store(perm_ptr + b * P + slot, p.to(tl.int32), mask=ok)


def _block_pixels(pixels: int, m: int, index_64: bool) -> int:
    """Pixels a block of the kernel's passes (4 warps): D1's 28 x 28 in one block of 1024 (8 a
    thread); past 8 regions or with 64-bit offsets blocks of 256. The sizes the AOT check passes on
    sm_80 and sm_90 with both tritons: blocks of 512 (4 pixels a thread) put a stack frame on sm_90
    with triton 3.9, blocks of 1024 of 16 regions or 64-bit offsets spilled."""
    if pixels <= 256:
        return max(128, next_power_of_2(pixels))
    return 1024 if m <= 8 and not index_64 else 256


def region_tables_launch(guide: torch.Tensor, tables: RegionTables) -> Launch:
    """The launch filling ``tables`` (of ``guide``'s shape) from ``guide``."""
    B, m, Ho, Wo = guide.shape
    block_pixels = _block_pixels(Ho * Wo, m, needs_int64(guide))
    blocks = cdiv(Ho * Wo, block_pixels)
    sgb, sgr, sgh, sgw = guide.stride()
    return Launch(region_tables_kernel, (B, 1, 1),
                  dict(guide_ptr=guide, region_ptr=tables.region, perm_ptr=tables.perm, count_ptr=tables.count,
                       start_ptr=tables.pixel_start, P=Ho * Wo, Wo=Wo, sgb=sgb, sgr=sgr, sgh=sgh, sgw=sgw),
                  dict(M=m, BLOCK_P=block_pixels, ONE_BLOCK=blocks == 1,
                       FLAT=sgw == 1 and sgh == Wo, INDEX_64=needs_int64(guide),
                       VALUE_DTYPE=tl.float64 if guide.dtype == torch.float64 else tl.float32), 4, 1,
                  loops=(blocks, blocks))  # the counting pass and the placing pass


def packed_size(B: int, pixels: int, m: int) -> int:
    """Elements of the tables of B samples of ``pixels`` pixels in m regions, packed."""
    return B * 2 * (pixels + m)


def unpacked_tables(packed: torch.Tensor, B: int, pixels: int, m: int) -> RegionTables:
    """The RegionTables whose fields are views of ``packed`` (``packed_tables``)."""
    region, perm, count, start = torch.split(packed, (B * pixels, B * pixels, B * m, B * m))
    return RegionTables(region.view(B, pixels), perm.view(B, pixels), count.view(B, m), start.view(B, m), packed)


def packed_tables(tables: RegionTables) -> torch.Tensor:
    """The tables as one flat int32 tensor, region, perm, count and pixel_start back to back: how a
    forward hands its tables to its backward. The kernel's are built packed; the torch path's are
    copied."""
    if tables.packed is not None:
        return tables.packed
    return torch.cat([t.reshape(-1) for t in (tables.region, tables.perm, tables.count, tables.pixel_start)])


def _empty_tables(B: int, pixels: int, m: int, device) -> RegionTables:
    return unpacked_tables(torch.empty(packed_size(B, pixels, m), dtype=torch.int32, device=device), B, pixels, m)


def region_tables(guide: torch.Tensor) -> RegionTables:
    """The RegionTables of ``guide`` (B, m, Ho, Wo): one launch where the ops run kernels (up to
    MAX_REGIONS regions), else region_tables_torch."""
    B, m, Ho, Wo = guide.shape
    if not runs_kernels(guide) or guide.numel() == 0 or m > MAX_REGIONS:
        return region_tables_torch(guide)
    tables = _empty_tables(B, Ho * Wo, m, guide.device)
    region_tables_launch(guide, tables)()
    return tables


def region_tables_torch(guide: torch.Tensor) -> RegionTables:
    """The same tables by torch ops: the CPU path, and the kernel's reference."""
    B, m, Ho, Wo = guide.shape
    region = guide.argmax(dim=1).reshape(B, Ho * Wo)
    perm = torch.argsort(region, dim=1, stable=True).to(torch.int32)
    count = torch.zeros((B, m), dtype=torch.int32, device=guide.device)
    count.scatter_add_(1, region, torch.ones_like(region, dtype=torch.int32))
    pixel_start = (torch.cumsum(count, dim=1, dtype=torch.int32) - count).contiguous()
    return RegionTables(region.to(torch.int32).contiguous(), perm.contiguous(), count.contiguous(), pixel_start)


def region_tile_bound(pixels: int, m: int, block_p: int) -> int:
    """Upper bound on Σ_r ceil(count_r / block_p) over any split of ``pixels`` into m regions."""
    return cdiv(pixels, block_p) + m - 1 if m > 1 else cdiv(pixels, block_p)


def meta_region_tables(n: int, pixels: int, m: int) -> RegionTables:
    """Region tables of ``n`` samples of ``pixels`` pixels in ``m`` regions, on the meta device: what
    the AOT catalogues' and the static model's launches read."""
    return _empty_tables(n, pixels, m, "meta")


def catalogue() -> list[Launch]:
    """The tables of D1's guide (8 regions of 28 x 28 pixels, both layouts), of a 16-region one in
    blocks, and of one past 2^31 elements."""
    launches = []
    for shape, dtype, channels_last, label in (((32, 8, 28, 28), torch.float32, False, "DRConv D1 float32"),
                                               ((32, 8, 28, 28), torch.bfloat16, True, "DRConv D1 bfloat16 NHWC"),
                                               ((4, 16, 56, 56), torch.float16, False, "16 regions float16"),
                                               ((2, 16, 8192, 8200), torch.bfloat16, False, "past int32")):
        guide = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            guide = guide.to(memory_format=torch.channels_last)
        launch = region_tables_launch(guide, meta_region_tables(shape[0], shape[2] * shape[3], shape[1]))
        launch.label = label
        launches.append(launch)
    return launches


__all__ = ["RegionTables", "region_tile", "region_tables", "region_tables_torch", "region_tables_launch",
           "region_tile_bound", "meta_region_tables", "packed_tables", "unpacked_tables", "packed_size", "catalogue"]
