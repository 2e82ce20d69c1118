"""DRConv's region tables: the one-launch counting sort against the torch ops it replaces."""
import pytest
import torch
import triton
import triton.language as tl

from dynconv.kernels import region_tables as rt

FIELDS = ("region", "perm", "count", "pixel_start")


def _guide(B, m, H, W, dtype, layout="contiguous", seed=0):
    """Logits with ties (small integers), and NaNs and infinities at some pixels."""
    g = torch.Generator().manual_seed(seed)
    guide = torch.randint(-2, 3, (B, m, H, W), generator=g).to(dtype)
    guide += torch.rand((B, m, H, W), generator=g).to(dtype) * (torch.rand((B, m, H, W), generator=g) < 0.5)
    guide[0, :, 0, 0] = 1.0  # a tie of every region: region 0
    guide[-1, m // 2, -1, -1] = float("inf")
    if m > 2:
        guide[0, m - 1, 0, -1] = float("nan")
        guide[0, 1, 0, -1] = float("nan")  # two NaNs: the first wins, as in torch.argmax
        guide[-1, 1, -1, 0] = float("-inf")
    if layout == "channels_last":
        guide = guide.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider map
        wide = torch.zeros((B, m, H, 2 * W), dtype=dtype)
        wide[..., ::2] = guide
        guide = wide[..., ::2]
    return guide


def _filled_by_kernel(guide, index_64=False):
    """The kernel's tables, every element poisoned first: one it does not write stays -7."""
    B, m, H, W = guide.shape
    tables = rt.RegionTables(*(torch.full((B, n), -7, dtype=torch.int32) for n in (H * W, H * W, m, m)))
    launch = rt.region_tables_launch(guide, tables)
    launch.meta["INDEX_64"] = index_64
    launch()
    return tables


@pytest.mark.parametrize("B, m, H, W, dtype, layout", [
    (3, 5, 7, 9, torch.float32, "contiguous"),
    (2, 8, 6, 7, torch.bfloat16, "channels_last"),
    (2, 3, 5, 6, torch.float64, "strided"),
    (1, 3, 33, 34, torch.float16, "contiguous"),  # 1122 pixels: two blocks of 1024
    (2, 16, 25, 23, torch.float32, "channels_last"),  # 575 pixels, 16 regions: three blocks of 256
    (2, 1, 4, 5, torch.float32, "contiguous"),  # one region
])
def test_kernel_tables_equal_the_torch_ops(B, m, H, W, dtype, layout):
    guide = _guide(B, m, H, W, dtype, layout)
    expected = rt.region_tables_torch(guide)
    got = _filled_by_kernel(guide)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_kernel_tables_in_64_bit_offsets():
    guide = _guide(2, 6, 9, 11, torch.float32, "strided", seed=1)
    expected = rt.region_tables_torch(guide)
    got = _filled_by_kernel(guide, index_64=True)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_region_tables_take_one_launch(monkeypatch):
    """Where the ops run kernels, no torch sort (or argmax) runs: the tables are the kernel's."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch path ran")

    guide = _guide(2, 4, 5, 6, torch.float32, seed=2)
    expected = rt.region_tables_torch(guide)
    monkeypatch.setattr(torch, "argsort", refuse)
    monkeypatch.setattr(torch.Tensor, "argmax", refuse)
    got = rt.region_tables(guide)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5)])
def test_region_tables_of_empty_guides(shape):
    tables = rt.region_tables(torch.zeros(shape))
    B, m, H, W = shape
    assert tables.perm.shape == (B, H * W) and tables.count.shape == (B, m)
    assert tables.pixel_start.shape == (B, m) and not tables.count.any()


@triton.jit
def _tiles_kernel(start_ptr, count_ptr, perm_ptr, region_ptr, pixels_ptr, M, P, TILES, BLOCK_P: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    r, p, ok, valid = rt.region_tile(start_ptr, count_ptr, perm_ptr, b, t, M, P, BLOCK_P, BLOCK_R)
    tile = b * TILES + t
    tl.store(region_ptr + tile, tl.where(valid, r, -1))
    tl.store(pixels_ptr + tile * BLOCK_P + tl.arange(0, BLOCK_P), tl.where(ok, p, -1))


@pytest.mark.parametrize("block_p", [1, 4, 8])
def test_region_tile_walks_every_region_s_pixels_in_order(block_p):
    """Each region's pixels in tiles of block_p, region after region, empty regions skipped, the
    tiles up to region_tile_bound past the last one invalid: what the region kernels read."""
    B, m, H, W = 2, 5, 4, 6
    guide = torch.randn(B, m, H, W, generator=torch.Generator().manual_seed(3))
    guide[0, 1] = -10.0  # region 1 of sample 0 empty
    guide[1, :, :2] = 0.0
    guide[1, 3, :2] = 1.0
    guide[1, 3, 2:] = -10.0  # 12 pixels of region 3 in sample 1: whole tiles of 4
    tables = rt.region_tables_torch(guide)
    P = H * W
    tiles = rt.region_tile_bound(P, m, block_p)
    region = torch.full((B, tiles), -7, dtype=torch.int32)
    pixels = torch.full((B, tiles, block_p), -7, dtype=torch.int32)
    _tiles_kernel[(B, tiles)](tables.pixel_start, tables.count, tables.perm, region, pixels, m, P, tiles,
                              BLOCK_P=block_p, BLOCK_R=triton.next_power_of_2(m))
    for b in range(B):
        expected_regions, expected_pixels = [], []
        for r in range(m):
            start, count = tables.pixel_start[b, r].item(), tables.count[b, r].item()
            ids = tables.perm[b, start:start + count].tolist()
            for first in range(0, count, block_p):
                chunk = ids[first:first + block_p]
                expected_regions.append(r)
                expected_pixels.append(chunk + [-1] * (block_p - len(chunk)))
        past = tiles - len(expected_regions)
        assert past >= 0
        assert region[b].tolist() == expected_regions + [-1] * past
        assert pixels[b].tolist() == expected_pixels + [[-1] * block_p] * past
