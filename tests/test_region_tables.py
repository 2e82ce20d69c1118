"""DRConv's region tables: the one-launch counting sort against the torch ops it replaces."""
import pytest
import torch

from dynconv.kernels import region_tables as rt

FIELDS = ("region", "perm", "count", "pixel_start", "tile_offsets")


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


def _filled_by_kernel(guide, block_p, index_64=False):
    """The kernel's tables, every element poisoned first: one it does not write stays -7."""
    B, m, H, W = guide.shape
    tables = rt.RegionTables(*(torch.full((B, n), -7, dtype=torch.int32) for n in (H * W, H * W, m, m, m + 1)),
                             block_p)
    launch = rt.region_tables_launch(guide, tables)
    launch.meta["INDEX_64"] = index_64
    launch()
    return tables


@pytest.mark.parametrize("B, m, H, W, dtype, layout, block_p", [
    (3, 5, 7, 9, torch.float32, "contiguous", 4),
    (2, 8, 6, 7, torch.bfloat16, "channels_last", 64),
    (2, 3, 5, 6, torch.float64, "strided", 1),
    (1, 3, 33, 34, torch.float16, "contiguous", 16),  # 1122 pixels: two blocks of 1024
    (2, 16, 25, 23, torch.float32, "channels_last", 8),  # 575 pixels, 16 regions: three blocks of 256
    (2, 1, 4, 5, torch.float32, "contiguous", 4),  # one region
])
def test_kernel_tables_equal_the_torch_ops(B, m, H, W, dtype, layout, block_p):
    guide = _guide(B, m, H, W, dtype, layout)
    expected = rt.region_tables_torch(guide, block_p)
    got = _filled_by_kernel(guide, block_p)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_kernel_tables_in_64_bit_offsets():
    guide = _guide(2, 6, 9, 11, torch.float32, "strided", seed=1)
    expected = rt.region_tables_torch(guide, 4)
    got = _filled_by_kernel(guide, 4, index_64=True)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_region_tables_take_one_launch(monkeypatch):
    """Where the ops run kernels, no torch sort (or argmax) runs: the tables are the kernel's."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch path ran")

    guide = _guide(2, 4, 5, 6, torch.float32, seed=2)
    expected = rt.region_tables_torch(guide, 4)
    monkeypatch.setattr(torch, "argsort", refuse)
    monkeypatch.setattr(torch.Tensor, "argmax", refuse)
    got = rt.region_tables(guide, 4)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5)])
def test_region_tables_of_empty_guides(shape):
    tables = rt.region_tables(torch.zeros(shape), 4)
    B, m, H, W = shape
    assert tables.perm.shape == (B, H * W) and tables.count.shape == (B, m)
    assert tables.tile_offsets.shape == (B, m + 1) and not tables.tile_offsets.any()
