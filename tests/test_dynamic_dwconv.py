"""The per-sample depth-wise kernels (kernels/dynamic_dwconv.py) called directly, against float64 convs.

Outputs are NaN-poisoned first, so an element a kernel forgets to write fails. Shapes are tiny
(the interpreter); the cases reach both kernel forms (the row walk: row stride and dilation 1 in the
forward and weight gradient, a phase's rows one dy row apart in the input gradient; the unrolled tap
sum otherwise, as where some output row reads no source row), stride phases with a tap fewer or none,
K larger than the image, padding wider than the taps, runs split across programs, and several
persistent partials.
"""
import pytest
import torch
import torch.nn.functional as F

from dynconv.kernels import dynamic_dwconv as dwconv
from dynconv.kernels import dynamic_dwconv_weight_grad as dwconv_dw
from dynconv.kernels._launch import split_trips
from helpers import assert_close, run_without_interpreter

# (B, C, G, H, W, K, stride, padding, dilation)
CASES = [
    (2, 4, 4, 5, 6, 3, 1, 1, 1),   # the walk, odd sizes
    (1, 3, 3, 7, 5, 3, 3, 2, 1),   # stride 3, odd H: phases with a tap fewer; forward unrolled
    (1, 2, 2, 6, 7, 3, 2, 2, 2),   # stride 2, dilation 2: phases no tap reaches; unrolled dx
    (1, 2, 2, 3, 4, 7, 1, 3, 1),   # K > image
    (1, 4, 2, 4, 5, 3, 1, 4, 1),   # padding wider than the taps (bias-only rows), groups of two
    (1, 2, 2, 9, 9, 3, 4, 0, 1),   # stride 4: dx rows that read no dy row (unrolled dx)
    (1, 16, 16, 3, 24, 5, 1, 2, 1),  # NCHW fp32: a warp over 16 channel rows, two lanes along W
    (1, 72, 72, 5, 9, 5, 1, 2, 1),  # 16-bit channels_last: two channels a thread (all three walks), a part block
    (1, 64, 64, 4, 8, 7, 1, 3, 1),  # the same at K = 7 (forward and input gradient)
]
IDS = ["walk", "s3", "s2d2", "K7-3x4", "pad4-G2", "s4-unread", "warp-16-rows", "channel-pairs-K5", "channel-pairs-K7"]



def _walk_rows(launch) -> tuple:
    """The source rows of each of a forward's or input gradient's walks (its declared loops): the
    masked walk alone, or the interior programs' unmasked walk, then the masked one. A first loop
    of batches of ROWS_AHEAD rows leaves its rows left to a masked loop a row at a time (with
    INTERIOR, the masked walk's)."""
    ahead, loops = launch.meta["ROWS_AHEAD"], launch.loops
    if not launch.meta["INTERIOR"]:
        return (loops[0] * ahead + (loops[1] if ahead > 1 else 0),)
    unmasked, masked = loops
    return unmasked * ahead, masked


def _weight_walks(launch) -> tuple:
    """The weight gradient's row loops of a tile (below its persistent loop over tiles), each as its
    mean over the splits (one tree of loops a split where the splits' tiles differ)."""
    trees = launch.loops if isinstance(launch.loops, list) else [launch.loops]
    walks = [walk for ((_, walk),) in trees]
    return tuple(sum(trips) / len(walks) for trips in zip(*walks))


def test_the_nchw_walk_spreads_a_warp_over_channel_rows_where_sectors_bind():
    """Lanes P columns apart waste most of each sector, so the fp32 NCHW walk may take more channels
    than fill a warp along one row (the last case above runs such a tile)."""
    config = dwconv.taps_config(1, 16, 3, 24, 5, False, True, False, 4)
    assert (config["BLOCK_C"], config["BLOCK_W"], config["num_warps"]) == (16, 2, 1)
    # R4 itself (B = 64, C = 256, 56 x 56, K = 7): fp32 takes such a tile, bf16 (issue-bound) does not.
    assert dwconv.taps_config(64, 256, 56, 56, 7, False, True, False, 4)["BLOCK_C"] == 16
    assert dwconv.taps_config(64, 256, 56, 56, 7, False, True, False, 2)["BLOCK_C"] == 4
    # At unit column strides the NCHW walks read a lane's columns as vectors of four (P a multiple
    # of four), and L1 no longer binds: R4 fp32 takes 16 channels x 2 lanes of 4 columns, and so does
    # the 16-bit weight gradient; the 16-bit forward and input gradient take FLAT lanes of 8 columns.
    def tile(nbytes, weight_grad=False, input_grad=False):
        config = dwconv.taps_config(64, 256, 56, 56, 7, False, True, input_grad, nbytes, weight_grad,
                                    unit_columns=True)
        return config["BLOCK_C"], config["BLOCK_W"], config["P"], bool(config["FLAT"])

    assert tile(4) == tile(4, True) == tile(2, True) == (16, 2, 4, False)
    assert tile(2, input_grad=True) == tile(2) == (1, 32, 8, True)


def test_the_16_bit_nchw_walks_take_flat_lanes_where_vectors_fit():
    """FLAT (kernels/dynamic_dwconv.py, _row_walk): the 16-bit NCHW forward and input gradient at unit
    column strides, K <= 7 and a width a multiple of four; not fp32, channels_last, K = 9, a width of
    54, strided columns, the weight gradient. The launchers fall back where the widths or the strides
    do not fit (a valid conv's output width of 10, stride 2 rows)."""
    def flat(nbytes=2, K=7, width=56, channels_last=False, unit_columns=True, input_grad=False, weight_grad=False):
        return dwconv.taps_config(64, 256, 56, width, K, channels_last, True, input_grad, nbytes, weight_grad,
                                  unit_columns=unit_columns)["FLAT"]

    assert flat() and flat(K=3) and flat(width=12) and flat(input_grad=True)
    assert not (flat(nbytes=4) or flat(K=9) or flat(width=54) or flat(channels_last=True)
                or flat(unit_columns=False) or flat(weight_grad=True))
    assert dwconv.taps_config(64, 256, 56, 56, 7, False, True, False, 2, unit_columns=True, flat=False)["P"] == 7
    for shape, stride, padding, out in (((1, 4, 8, 12), 1, 0, (1, 4, 6, 10)), ((1, 4, 8, 12), 2, 1, (1, 4, 4, 6)),
                                        ((1, 4, 8, 12), 1, 1, (1, 4, 8, 12))):
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        w = torch.empty(1, 4, 3, 3, dtype=torch.bfloat16, device="meta")
        y = torch.empty(out, dtype=torch.bfloat16, device="meta")
        for launch in (dwconv.forward_launch(x, w, None, y, (stride, stride), (padding, padding), (1, 1)),
                       dwconv.backward_input_launch(y, w, x, (stride, 1), (padding, padding), (1, 1))):
            assert launch.meta["FLAT"] == (padding == 1 and stride == 1), (stride, padding, launch.meta)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    (2, 5, 5, 5, 12, 3, 1, 1, 1),   # two blocks a row (the second's last vector off the image), a part warp
    (1, 6, 3, 5, 8, 5, 1, 2, 1),    # groups of two, one block a row: both halo edges
    (1, 3, 3, 4, 16, 7, 1, 3, 1),   # K > H
    (1, 2, 2, 6, 12, 5, 1, 0, 1),   # a valid conv (output width 8): the vectors' lead of 0
    (1, 4, 4, 5, 64, 3, 1, 1, 1),   # a whole warp of lanes: the inner vectors unmasked (INSIDE_SRC/OUT)
    (1, 32, 16, 4, 8, 7, 1, 3, 1),  # the same at K = 7, one block a row
], ids=["W12-K3", "G3-K5", "K7-H4", "valid-K5", "inside-K3", "inside-K7"])
def test_the_flat_walks_against_float64(case, dtype):
    """The FLAT walks, masked a vector at a time, with lanes over (channel, column block): every
    output written (NaN-poisoned), equal to the float64 conv (with and without a bias) and to its
    input gradient (the fp16 forward's rows behind a fence, _fenced_halo, and on triton 3.6 the bf16
    input gradient's)."""
    x, w, bias, stride, padding, dilation = _problem(case, dtype, torch.contiguous_format)
    whole = x.shape[1] * -(-x.shape[3] // 8) % 32 == 0  # every lane a real (channel, block)
    for b in (bias, None):
        expected = _conv(x, w, b, stride, padding, dilation)
        y = torch.empty(expected.shape, dtype=dtype)
        launch = dwconv.forward_launch(x, w, b, y, stride, padding, dilation)
        B, C, _, W = x.shape
        assert launch.meta["FLAT"] and launch.meta["VEC"] == 4 and not launch.meta["INTERIOR"], launch.meta
        assert launch.grid[1] == -(-C * -(-y.shape[3] // 8) // 32), launch.grid
        assert (launch.meta["INSIDE_SRC"] == 0b0110 and launch.meta["INSIDE_OUT"] == 0b11) == whole, launch.meta
        assert launch.meta["FENCE_ROWS"] == (dtype == torch.float16), launch.meta  # FLAT_FENCED_ROWS
        launch()
        assert_close(y, expected, dtype, "y")
    dy = torch.randn(expected.shape).to(dtype)
    x64 = x.double().requires_grad_()
    _conv(x64, w.double(), None, stride, padding, dilation).backward(dy.double())
    dx = torch.empty_like(x)
    launch = dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation)
    assert launch.meta["FLAT"] and launch.meta["VEC"] == 4 and not launch.meta["INTERIOR"], launch.meta
    assert (launch.meta["INSIDE_SRC"] == 0b0110 and launch.meta["INSIDE_OUT"] == 0b11) == whole, launch.meta
    assert launch.meta["FENCE_ROWS"] == (dtype == torch.bfloat16 and dwconv.TRITON_VERSION <= (3, 6)), launch.meta
    launch()
    assert_close(dx, x64.grad, dtype, "dx")


def test_flat_walks_unmask_the_vectors_every_lane_reads_inside_the_image():
    """_flat_inside: bit j where vector j of every lane lies in the image and every lane is real.
    R4 (pad 3, 7 blocks of 8, 256 channels): source vectors 1 and 2 (columns 8b .. 8b + 7), both
    output vectors; a width of 52 leaves the last block half outside (output vector 1, source
    vector 2 masked); a part warp of lanes, or padding 5, masks more."""
    config = {"FLAT": 1, "P": 8, "BLOCK_W": 32}
    def inside(C=256, pad=3, width=56, K=7):
        bits = dwconv._flat_inside(config, C, 4, K, pad, width, width)
        return bits["INSIDE_SRC"], bits["INSIDE_OUT"]

    assert inside() == (0b0110, 0b11) and inside(K=3, pad=1) == (0b0110, 0b11)
    assert inside(width=52) == (0b0010, 0b01) and inside(C=3) == (0, 0)
    assert inside(pad=5, K=11) == (0b01100, 0b11)  # the lead vectors start two before the block
    assert dwconv._flat_inside({**config, "FLAT": 0}, 256, 4, 7, 3, 56, 56) == {"INSIDE_SRC": 0, "INSIDE_OUT": 0}


def test_the_16_bit_channels_last_walk_takes_two_channels_a_thread():
    """One 32-bit load for two adjacent channels where their weights and sums fit in registers: the
    forward and input gradient to K = 7, the weight gradient to K = 5; fp32 and NCHW keep one."""
    def block_c(K, channels_last=True, nbytes=2, C=256):
        return dwconv.taps_config(64, C, 56, 56, K, channels_last, True, False, nbytes)["BLOCK_C"]

    assert block_c(7) == block_c(3) == 64 and block_c(9) == 32 and block_c(7, C=48) == 32
    assert block_c(7, nbytes=4) == 32 and block_c(7, channels_last=False) == 4
    assert dwconv_dw.weight_grad_default(64, 256, 56, 56, 5, True, 2)["BLOCK_C"] == 64
    assert dwconv_dw.weight_grad_default(64, 256, 56, 56, 7, True, 2)["BLOCK_C"] == 32


def _conv(x, w, bias, stride, padding, dilation):
    """The float64 reference: each sample's own depth-wise conv."""
    B, C = x.shape[:2]
    K = w.shape[-1]
    filters = w.double().repeat_interleave(C // w.shape[1], 1).reshape(B * C, 1, K, K)
    y = F.conv2d(x.double().reshape(1, B * C, *x.shape[2:]), filters, None, stride, padding, dilation, groups=B * C)
    y = y.reshape(B, C, *y.shape[2:])
    return y if bias is None else y + bias.double()[:, :, None, None]


def _problem(case, dtype, memory_format):
    B, C, G, H, W, K, s, p, d = case
    x = torch.randn(B, C, H, W).to(dtype).contiguous(memory_format=memory_format)
    w = torch.randn(B, G, K, K).to(dtype)
    bias = torch.randn(B, C).to(dtype)
    return x, w, bias, (s, s), (p, p), (d, d)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format),
                                                  (torch.bfloat16, torch.channels_last)], ids=["fp32-nchw", "bf16-nhwc"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_input_and_weight_gradients(case, dtype, memory_format):
    x, w, bias, stride, padding, dilation = _problem(case, dtype, memory_format)
    expected = _conv(x, w, bias, stride, padding, dilation)
    y = torch.empty(expected.shape, dtype=dtype).contiguous(memory_format=memory_format)
    dwconv.forward_launch(x, w, bias, y, stride, padding, dilation)()
    assert_close(y, expected, dtype, "y")

    dy = torch.randn(expected.shape).to(dtype).contiguous(memory_format=memory_format)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    _conv(x64, w64, None, stride, padding, dilation).backward(dy.double())
    dx = torch.empty_like(x)
    dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation)()
    assert_close(dx, x64.grad, dtype, "dx")

    B, C, K = x.shape[0], x.shape[1], w.shape[-1]
    if dwconv_dw.handles_weight_grad(C, w.shape[1], K, stride, dilation, None):
        config = dwconv_dw.weight_grad_default(B, C, *y.shape[2:], K, memory_format == torch.channels_last,
                                            x.element_size())
        part = torch.empty(dwconv_dw.weight_grad_partials(B, C, K, *y.shape[2:], config))
        dwconv_dw.backward_weight_launch(dy, x, part, stride, padding, dilation, config)()
        assert_close(part.sum(-1), w64.grad, dtype, "dw")



@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("ahead", [2, 3, 4])
@pytest.mark.parametrize("case, dtype, memory_format", [
    (CASES[0], torch.float32, torch.contiguous_format),       # masked scalars, 5 and 7 rows a walk
    (CASES[6], torch.float32, torch.contiguous_format),       # vectors in the interior tiles; 3 rows: no batch of 4
    (CASES[8], torch.bfloat16, torch.channels_last),          # interior and edge channel blocks, K = 7; 4 rows
], ids=["walk", "nchw-vectors", "nhwc-K7"])
def test_walks_in_batches_of_rows_and_the_rows_left(case, dtype, memory_format, ahead, monkeypatch):
    """The interior programs' forward and input gradient walks load WALK_ROWS_AHEAD source rows a
    batch behind a fence (four by default), and leave the rows left to the masked walk: batches of
    two and three leave some here, and of four all of a walk's three rows or none of its four."""
    monkeypatch.setattr(dwconv, "WALK_ROWS_AHEAD", ahead)
    monkeypatch.setattr(dwconv, "BATCHES_16BIT_CHANNELS_LAST", True)  # the interpreter runs it on any triton
    x, w, bias, stride, padding, dilation = _problem(case, dtype, memory_format)
    expected = _conv(x, w, bias, stride, padding, dilation)
    y = torch.empty(expected.shape, dtype=dtype).contiguous(memory_format=memory_format)
    forward = dwconv.forward_launch(x, w, bias, y, stride, padding, dilation)
    dy = torch.randn(expected.shape).to(dtype).contiguous(memory_format=memory_format)
    dx = torch.empty_like(x)
    input_grad = dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation)
    for launch in (forward, input_grad):
        assert launch.meta["WALK"] and launch.meta["ROWS_AHEAD"] == ahead, launch.meta
    forward()
    assert_close(y, expected, dtype, f"y, batches of {ahead}")
    x64 = x.double().requires_grad_()
    _conv(x64, w.double(), None, stride, padding, dilation).backward(dy.double())
    input_grad()
    assert_close(dx, x64.grad, dtype, f"dx, batches of {ahead}")


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("ahead", [2, 3, 4])
@pytest.mark.parametrize("dtype, K, edge_batches", [(torch.float32, 3, True), (torch.bfloat16, 3, False),
                                                    (torch.bfloat16, 7, True)], ids=["fp32", "bf16", "bf16-k7"])
def test_channels_last_weight_gradient_walks_rows_in_batches(ahead, dtype, K, edge_batches, monkeypatch):
    """The channels_last weight gradient's interior tiles walk their x rows WEIGHT_ROWS_AHEAD a batch
    behind a fence, then the rows the batches leave one at a time (batches of two, three and four each
    leave some of the 5 rows); the edge tiles walk masked, in batches alike under a register cap on
    sm_90, but a row at a time for 16-bit tiles of two channels a thread (K = 3 here; one at K = 7)."""
    monkeypatch.setattr(dwconv_dw, "WEIGHT_ROWS_AHEAD", ahead)
    monkeypatch.setattr(dwconv, "BATCHES_16BIT_CHANNELS_LAST", True)  # the interpreter runs it on any triton
    x, w, bias, stride, padding, dilation = _problem((1, 72, 72, 5, 26, K, 1, K // 2, 1), dtype, torch.channels_last)
    dy = torch.randn(_conv(x, w, bias, stride, padding, dilation).shape).to(dtype).contiguous(
        memory_format=torch.channels_last)
    B, C = x.shape[0], x.shape[1]
    config = dwconv_dw.weight_grad_default(B, C, *dy.shape[2:], K, True, x.element_size())
    part = torch.empty(dwconv_dw.weight_grad_partials(B, C, K, *dy.shape[2:], config))
    launch = dwconv_dw.backward_weight_launch(dy, x, part, stride, padding, dilation, config)
    # The interior tiles' batches and the rows they leave, then the edge tiles' batches and theirs.
    walks = _weight_walks(launch)
    edge_ahead = ahead if edge_batches else 1
    assert launch.meta["ROWS_AHEAD"] == ahead and launch.meta["EDGE_ROWS_AHEAD"] == edge_ahead, launch.meta
    assert len(walks) == (4 if edge_batches else 3) and min(walks) > 0, launch.loops
    assert launch.sm90_max_registers == (dwconv_dw.CHANNELS_LAST_EDGE_SM90_REGISTERS if edge_batches else 0)
    launch()
    w64 = w.double().requires_grad_()
    _conv(x.double(), w64, None, stride, padding, dilation).backward(dy.double())
    assert_close(part.sum(-1), w64.grad, dtype, f"dw, batches of {ahead}")


def test_16_bit_channels_last_weight_gradient_batches_rows_at_one_channel_a_thread(monkeypatch):
    """Where newer tritons' ptxas spills 16-bit channels_last batches (BATCHES_16BIT_CHANNELS_LAST
    off), the weight gradient walks a row at a time only in tiles of two channels a thread (K = 5);
    at one (K = 7) it keeps its batches of rows."""
    monkeypatch.setattr(dwconv, "BATCHES_16BIT_CHANNELS_LAST", False)
    x = torch.empty(16, 96, 28, 28, dtype=torch.bfloat16, device="meta").to(memory_format=torch.channels_last)
    for K, ahead in ((5, 1), (7, dwconv_dw.WEIGHT_ROWS_AHEAD)):
        config = dwconv_dw.weight_grad_default(16, 96, 28, 28, K, True, 2)
        part = torch.empty(dwconv_dw.weight_grad_partials(16, 96, K, 28, 28, config), device="meta")
        launch = dwconv_dw.backward_weight_launch(x, x, part, (1, 1), (K // 2, K // 2), (1, 1), config)
        assert launch.meta["ROWS_AHEAD"] == ahead, (K, config)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nchw_weight_gradient_walks_rows_in_pairs_under_a_register_cap(dtype):
    """NCHW: the interior tiles' x rows two a batch up to K = NCHW_BATCH_MAX_K, under a 128-register
    cap that reaches ptxas only on sm_90; K = 9 walks a row at a time, uncapped."""
    x, w, bias, stride, padding, dilation = _problem((1, 8, 8, 9, 72, 5, 1, 2, 1), dtype, torch.contiguous_format)
    dy = torch.randn(_conv(x, w, bias, stride, padding, dilation).shape).to(dtype)
    B, C, K = x.shape[0], x.shape[1], w.shape[-1]
    config = dwconv_dw.weight_grad_default(B, C, *dy.shape[2:], K, False, x.element_size())
    part = torch.empty(dwconv_dw.weight_grad_partials(B, C, K, *dy.shape[2:], config))
    launch = dwconv_dw.backward_weight_launch(dy, x, part, stride, padding, dilation, config)
    assert launch.meta["INTERIOR"] and launch.meta["ROWS_AHEAD"] == 2, launch.meta
    assert launch.compile_options(90).get("maxnreg") == dwconv_dw.NCHW_BATCH_SM90_REGISTERS
    assert "maxnreg" not in launch.compile_options(80)
    walks = _weight_walks(launch)  # the interior batches and the rows they leave, then the edges' (in 16 bits)
    assert len(walks) == 3 + (x.element_size() == 2) and min(walks) > 0, launch.loops
    launch()
    w64 = w.double().requires_grad_()
    _conv(x.double(), w64, None, stride, padding, dilation).backward(dy.double())
    assert_close(part.sum(-1), w64.grad, dtype, "dw, NCHW rows in pairs")
    meta = dict(device="meta", dtype=dtype)
    big_x, big_dy = torch.empty(2, 8, 40, 40, **meta), torch.empty(2, 8, 40, 40, **meta)
    config = dwconv_dw.weight_grad_default(2, 8, 40, 40, 9, False, x.element_size())
    part = torch.empty(dwconv_dw.weight_grad_partials(2, 8, 9, 40, 40, config), device="meta")
    launch = dwconv_dw.backward_weight_launch(big_dy, big_x, part, (1, 1), (4, 4), (1, 1), config)
    assert launch.meta["ROWS_AHEAD"] == 1 and launch.sm90_max_registers == 0


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("case", [(1, 72, 72, 5, 26, 3, 1, 1, 1), (1, 64, 64, 6, 29, 3, 2, 1, 1)], ids=["s1", "s2"])
def test_channels_last_walk_runs_interior_programs_unmasked(case, monkeypatch):
    """channels_last: programs (the weight gradient's tiles) whose channels and columns all lie inside
    walk without masks, the rest with them; both kinds run here (a part channel block, edge and middle
    column tiles, the input gradient's column phases at stride 2) and each declares its share of the
    walk's trips. A row at a time: in batches of four, the stride-2 runs are too short for one (the
    batches' own test walks them)."""
    monkeypatch.setattr(dwconv, "WALK_ROWS_AHEAD", 1)
    monkeypatch.setattr(dwconv, "BATCHES_16BIT_CHANNELS_LAST", True)  # the weight gradient's batches, on any triton
    x, w, bias, stride, padding, dilation = _problem(case, torch.bfloat16, torch.channels_last)
    expected = _conv(x, w, bias, stride, padding, dilation)
    y = torch.empty(expected.shape, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    forward = dwconv.forward_launch(x, w, bias, y, stride, padding, dilation)
    dy = torch.randn(expected.shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dx = torch.empty_like(x)
    input_grad = dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation)
    for launch in (forward, input_grad) if stride == (1, 1) else (input_grad,):
        assert launch.meta["WALK"] and launch.meta["INTERIOR"], launch.meta
        walks = _walk_rows(launch)
        assert len(walks) == 2 and min(walks) > 0, launch.loops
    if stride == (1, 1):
        forward()
        assert_close(y, expected, torch.bfloat16, "y")
    x64 = x.double().requires_grad_()
    _conv(x64, w.double(), None, stride, padding, dilation).backward(dy.double())
    input_grad()
    assert_close(dx, x64.grad, torch.bfloat16, "dx")
    if stride == (1, 1):
        B, C, K = x.shape[0], x.shape[1], w.shape[-1]
        config = dwconv_dw.weight_grad_default(B, C, *y.shape[2:], K, True, x.element_size())
        part = torch.empty(dwconv_dw.weight_grad_partials(B, C, K, *y.shape[2:], config))
        weight_grad = dwconv_dw.backward_weight_launch(dy, x, part, stride, padding, dilation, config)
        walks = _weight_walks(weight_grad)  # the unmasked walk's batches and the rows they leave, the masked walk
        assert weight_grad.meta["INTERIOR"] and len(walks) == 3 and min(walks) > 0, weight_grad.loops
        weight_grad()
        w64 = w.double().requires_grad_()
        _conv(x.double(), w64, None, stride, padding, dilation).backward(dy.double())
        assert_close(part.sum(-1), w64.grad, torch.bfloat16, "dw")

def test_the_weight_gradient_declares_each_splits_share_of_the_tiles():
    """The persistent programs of split s walk tiles s, s + splits, ... of a row of column tiles taken
    from both ends in turn, so that the splits share the (masked) edge tiles; the static model is told
    each split's tiles and rows (its pipes count their mean, its latency walk the slowest split)."""
    assert split_trips(7, 2) == [4, 3] and split_trips(8, 3) == [3, 3, 2] and split_trips(8, 4) == 2
    for tiles_w in range(1, 10):
        order = [dwconv_dw._tile_column(p, tiles_w) for p in range(tiles_w)]
        assert sorted(order) == list(range(tiles_w)) and order[:2] == [0, tiles_w - 1][:tiles_w], order
    x = torch.empty(64, 256, 56, 56, dtype=torch.float32, device="meta")  # R4: 7 tiles a sample, 2 splits
    config = dwconv_dw.weight_grad_default(64, 256, 56, 56, 7, False, 4)
    part = torch.empty(dwconv_dw.weight_grad_partials(64, 256, 7, 56, 56, config), device="meta")
    launch = dwconv_dw.backward_weight_launch(x, x, part, (1, 1), (3, 3), (1, 1), config)
    # Split 0 walks column tiles 0, 1, 2, 3, split 1 tiles 6, 5, 4: an edge each. fp32 NCHW walks the
    # interior's 56 rows in 28 batches of two, the edges' a row at a time.
    assert part.shape[-1] == 2 and launch.meta["EDGE_ROWS_AHEAD"] == 1, launch.meta
    (((tiles_0, walks_0),), ((tiles_1, walks_1),)) = launch.loops
    assert (tiles_0, tiles_1) == (4, 3), launch.loops
    assert walks_0 == pytest.approx((28 * 3 / 4, 0, 56 / 4)) and walks_1 == pytest.approx((28 * 2 / 3, 0, 56 / 3))


@pytest.mark.usefixtures("nan_poison")
def test_runs_split_across_programs_and_several_partials(monkeypatch):
    """Runs of two rows (each run's first and last rows read fewer taps) and three persistent partials."""
    monkeypatch.setattr(dwconv_dw, "PERSISTENT_PROGRAMS", 3)
    x, w, bias, stride, padding, dilation = _problem((1, 3, 3, 9, 6, 3, 1, 1, 1), torch.float32, torch.contiguous_format)
    config = dwconv.taps_config(1, 3, 9, 6, 3, False, True)
    config.update(RUN=2)
    expected = _conv(x, w, bias, stride, padding, dilation)
    y = torch.empty(expected.shape)
    dwconv.forward_launch(x, w, bias, y, stride, padding, dilation, config)()
    assert_close(y, expected, torch.float32, "y")
    dy = torch.randn(expected.shape)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    _conv(x64, w64, None, stride, padding, dilation).backward(dy.double())
    dx = torch.empty_like(x)
    dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation, config)()
    assert_close(dx, x64.grad, torch.float32, "dx")
    shape = dwconv_dw.weight_grad_partials(1, 3, 3, 9, 6, config)
    assert shape[-1] == 3, shape
    part = torch.empty(shape)
    dwconv_dw.backward_weight_launch(dy, x, part, stride, padding, dilation, config)()
    assert_close(part.sum(-1), w64.grad, torch.float32, "dw")


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K, padding", [(3, 1), (5, 2)])
@pytest.mark.parametrize("width", [28, 26], ids=["whole-vectors", "part-vectors"])
def test_nchw_walks_read_vectors_in_interior_tiles(dtype, K, padding, width):
    """NCHW at unit column strides: the forward's, input gradient's (fp32) and weight gradient's
    interior tiles read (and the first two write) each lane's columns as vectors of four from the
    aligned column before the halo; edge tiles and a part channel block walk masked scalars, but
    for the weight gradient's vectors with a mask a vector where a row holds whole vectors (a view of
    26 columns of rows 28 apart does not), in batches of rows in 16 bits."""
    B, C, H, W = 2, 24, 5, width
    x, w, bias, stride, padding, dilation = _problem((B, C, C, H, 28, K, 1, padding, 1), dtype, torch.contiguous_format)
    x = x[..., :W]
    dy = torch.randn(B, C, H, 28).to(dtype)[..., :W]
    geometry = stride, padding, dilation
    tile = {"BLOCK_C": 16, "BLOCK_W": 2, "P": 4, "num_warps": 1, "FLAT": 0}
    y = torch.empty(B, C, H, 28, dtype=dtype)[..., :W]
    forward = dwconv.forward_launch(x, w, bias, y, *geometry, {**dwconv.forward_default(x, K, *geometry[::2], H, W),
                                                               **tile})
    dx = torch.empty(B, C, H, 28, dtype=dtype)[..., :W]
    input_grad = dwconv.backward_input_launch(dy, w, dx, *geometry, {**dwconv.input_grad_default(x, K, *geometry[::2]),
                                                                     **tile})
    config = {**dwconv_dw.weight_grad_default(B, C, H, W, K, False, x.element_size()), **tile}
    part = torch.empty(dwconv_dw.weight_grad_partials(B, C, K, H, W, config))
    weight_grad = dwconv_dw.backward_weight_launch(dy, x, part, *geometry, config)
    weight_walks = _weight_walks(weight_grad)
    vectors = x.element_size() * 4 >= dwconv.WALK_VECTOR_BYTES
    for launch, walks in ((forward, _walk_rows(forward)), (input_grad, _walk_rows(input_grad)),
                          (weight_grad, weight_walks)):
        if vectors or launch is weight_grad:
            assert launch.meta["VEC"] == 4 and launch.meta["INTERIOR"], launch.meta
            # The weight gradient's interior walk in batches of rows, then the rows they leave, and
            # its edge walk so too with vectors in 16 bits.
            batched = launch is weight_grad and launch.meta["ROWS_AHEAD"] > 1
            edge_batched = launch is weight_grad and launch.meta["EDGE_ROWS_AHEAD"] > 1
            assert len(walks) == 2 + batched + edge_batched and min(walks) > 0, launch.loops
            if launch is weight_grad:
                assert launch.meta["EDGE_VECTORS"] == (W == 28), launch.meta
                assert edge_batched == (W == 28 and x.element_size() == 2), launch.meta
        else:
            assert launch.meta["VEC"] == 1 and not launch.meta["INTERIOR"] and len(walks) == 1, launch.meta
    forward()
    assert_close(y, _conv(x, w, bias, *geometry), dtype, "y")
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    _conv(x64, w64, None, *geometry).backward(dy.double())
    input_grad()
    assert_close(dx, x64.grad, dtype, "dx")
    weight_grad()
    assert_close(part.sum(-1), w64.grad, dtype, "dw")


@pytest.mark.usefixtures("nan_poison")
def test_the_vector_walk_stores_a_row_stride_phase_at_its_rows():
    """The fp32 NCHW input gradient at stride (2, 1) walks each row phase with vectors (unit column
    stride): phase ph's row i is dx row 2i + ph, where the vector store once wrote row i."""
    x, w, _, _, padding, dilation = _problem((1, 16, 16, 9, 24, 3, 1, 1, 1), torch.float32, torch.contiguous_format)
    stride = (2, 1)
    dy = torch.randn(_conv(x, w, None, stride, padding, dilation).shape)
    x64 = x.double().requires_grad_()
    _conv(x64, w.double(), None, stride, padding, dilation).backward(dy.double())
    dx = torch.empty_like(x)
    launch = dwconv.backward_input_launch(dy, w, dx, stride, padding, dilation)
    assert launch.meta["WALK"] and launch.meta["VEC"] == 4 and launch.meta["INTERIOR"], launch.meta
    launch()
    assert_close(dx, x64.grad, torch.float32, "dx")


def test_the_static_model_simulates_a_middle_tile_of_the_walks():
    """The grid's middle program of an even batch is a sample's first column tile (an edge, masked):
    the forward and input gradient name a middle one (Launch.typical_program), of the first phase;
    the walks (R4's geometry) have more than two column tiles, so it lies off both edges."""
    for stride in (1, 2):
        x = torch.empty(64, 256, 56, 56, device="meta")
        w = torch.empty(64, 256, 7, 7, device="meta")
        geometry = (stride, stride), (3, 3), (1, 1)
        y = torch.empty(64, 256, 56 // stride, 56 // stride, device="meta")
        for launch, phases in ((dwconv.forward_launch(x, w, None, y, *geometry), 1),
                               (dwconv.backward_input_launch(y, w, x, *geometry), stride * stride)):
            tiles, tiles_w = launch.args.get("TILES") or launch.args["TILES_PHASE"], launch.args["TILES_W"]
            block, tile = divmod(launch.typical_program[0], tiles)
            assert block == 32 * phases and tile % tiles_w == tiles_w // 2
            assert 0 < tiles_w // 2 < tiles_w - 1 or not launch.meta["WALK"], (tiles_w, launch.meta)
            assert launch.typical_program[1] == launch.grid[1] // 2


def test_16_bit_nchw_walks_cap_their_registers_on_sm90():
    """R4's 16-bit NCHW walks (forward and input gradient) compile for sm_90 at 128 registers a
    thread (16 one-warp programs an SM); fp32 and channels_last walks keep ptxas' own count."""
    for dtype, fmt, capped in ((torch.bfloat16, torch.contiguous_format, True),
                               (torch.float16, torch.contiguous_format, True),
                               (torch.float32, torch.contiguous_format, False),
                               (torch.bfloat16, torch.channels_last, False)):
        x = torch.empty(64, 256, 56, 56, device="meta", dtype=dtype).to(memory_format=fmt)
        w = torch.empty(64, 256, 7, 7, device="meta", dtype=dtype)
        geometry = (1, 1), (3, 3), (1, 1)
        for launch in (dwconv.forward_launch(x, w, None, torch.empty_like(x), *geometry),
                       dwconv.backward_input_launch(torch.empty_like(x), w, x, *geometry)):
            assert launch.meta["WALK"]
            assert launch.compile_options(90).get("maxnreg") == (128 if capped else None), (dtype, fmt)
            assert "maxnreg" not in launch.compile_options(80)


def test_weight_gradient_rejects_geometries_it_does_not_walk():
    x = torch.randn(1, 2, 5, 5)
    config = dwconv_dw.weight_grad_default(1, 2, 3, 3, 3, False)
    part = torch.empty(dwconv_dw.weight_grad_partials(1, 2, 3, 3, 3, config))
    with pytest.raises(ValueError, match="stride and dilation 1"):
        dwconv_dw.backward_weight_launch(torch.randn(1, 2, 3, 3), x, part, (2, 2), (1, 1), (1, 1), config)


@pytest.mark.usefixtures("nan_poison")
def test_a_walking_config_meets_a_dilated_layer():
    """Tuned tables key no dilation: a walking (RUN) config given a dilated layer takes the unrolled sum."""
    x, w, bias, stride, padding, dilation = _problem((1, 2, 2, 7, 6, 3, 1, 2, 2), torch.float32, torch.contiguous_format)
    config = dwconv.taps_config(1, 2, 7, 6, 3, False, True)
    expected = _conv(x, w, bias, stride, padding, dilation)
    y = torch.empty(expected.shape)
    launch = dwconv.forward_launch(x, w, bias, y, stride, padding, dilation, config)
    assert not launch.meta["WALK"]
    launch()
    assert_close(y, expected, torch.float32, "y")


def test_padding_wider_than_the_taps_takes_the_unrolled_sum():
    """The walk stores only rows that read a source row: a layer whose padding leaves bias-only rows
    (forward or input gradient) takes _tap_sums, so the walk keeps its one loop."""
    x = torch.empty(1, 4, 4, 5, device="meta")
    w = torch.empty(1, 2, 3, 3, device="meta")
    y = torch.empty(1, 4, 10, 11, device="meta")
    assert not dwconv.forward_launch(x, w, None, y, (1, 1), (4, 4), (1, 1)).meta["WALK"]
    # Stride 4, K = 3, H = 9: dy has two rows, and dx row 8 (phase 0, third row) reads none of them.
    x9, dy = torch.empty(1, 4, 9, 9, device="meta"), torch.empty(1, 4, 2, 2, device="meta")
    assert not dwconv.backward_input_launch(dy, w, x9, (4, 4), (0, 0), (1, 1)).meta["WALK"]
    assert dwconv.backward_input_launch(dy, w, torch.empty(1, 4, 8, 8, device="meta"), (4, 4), (0, 0), (1, 1)).meta["WALK"]
    same = torch.empty(1, 4, 4, 5, device="meta")
    for launch in (dwconv.forward_launch(x, w, None, same, (1, 1), (1, 1), (1, 1)),
                   dwconv.backward_input_launch(same, w, x, (1, 1), (1, 1), (1, 1))):
        assert launch.meta["WALK"] and len(_walk_rows(launch)) == 1


# Compiled in a subprocess (this process runs the interpreter): R4's input gradient, NCHW, with the
# default tile and with P = 4, BLOCK_W = 16, the tile whose two bias-only loops ptxas once unrolled
# into four, which the static model then read as an unrolled walk (a predicted 156%).
_LOOP_PROBE = """
import json, torch
from dynconv import bounds
from dynconv.kernels._launch import cubin_dumps
from dynconv.kernels import dynamic_dwconv as dwconv
B, C, H, K = 64, 256, 56, 7
dy = torch.empty(B, C, H, H, device="meta")
w = torch.empty(B, C, K, K, device="meta")
out = []
for tile in ({}, {"P": 4, "BLOCK_W": 16, "BLOCK_C": 2, "num_warps": 1}):
    config = dwconv.input_grad_default(dy, K, (1, 1), (1, 1))
    config.update(tile)
    launch = dwconv.backward_input_launch(dy, w, dy, (1, 1), (3, 3), (1, 1), config)
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    counts = bounds.count(cubin_dumps(launch.compile(90))[1], launch.loops, programs, launch.num_warps)
    out.append(counts["warp_instructions"]["fma"] * 32 / (B * C * H * H * K * K))
print(json.dumps(out))
"""


def test_the_static_model_reads_every_walk_tile(tmp_path):
    import json

    script = tmp_path / "loop_probe.py"
    script.write_text(_LOOP_PROBE)
    proc = run_without_interpreter([str(script)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # fp32 multiply-adds the model counts per useful one: at least all of them, padding lanes at most.
    for ratio in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert 1.0 <= ratio < 1.3, ratio
