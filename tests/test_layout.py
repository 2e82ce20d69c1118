"""kernels.layout.channels_last_copy against torch's own copy: every element, bit for bit.

Outputs are NaN-poisoned (an element no program writes fails); the interpreter runs the kernel.
"""
import pytest
import torch

from dynconv.kernels import layout

pytestmark = pytest.mark.usefixtures("nan_poison")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 70, 9, 11), (1, 3, 1, 130), (3, 130, 2, 2)], ids=str)
def test_copy_equals_torch(shape, dtype, device):
    """Channel and pixel counts off the 64 x 64 tiles on both axes, a single row, a 2 x 2 image."""
    x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    out = layout.channels_last_copy(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == x.shape
    assert torch.equal(out, x)


def test_any_strides(device):
    """A strided view (every other channel, a column window) and a channels_last input."""
    base = torch.randn((2, 40, 7, 12), device=device)
    for x in (base[:, ::2, :, 3:10], base.to(memory_format=torch.channels_last)[:, :, 1:]):
        assert torch.equal(layout.channels_last_copy(x), x)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)], ids=str)
def test_empty(shape, device):
    x = torch.empty(shape, device=device)
    out = layout.channels_last_copy(x)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)


def test_opcheck(device):
    """torch.ops.dynconv.channels_last_copy, which expert_conv2d's backward makes between its two
    backward ops (it must trace under torch.compile)."""
    from dynconv.ops.layout import channels_last_copy_op

    x = torch.randn((2, 5, 3, 4), device=device)
    torch.library.opcheck(channels_last_copy_op, (x,))
    torch.library.opcheck(channels_last_copy_op, (x.clone().requires_grad_(),))
    out = channels_last_copy_op(x)
    assert torch.equal(out, x) and out.is_contiguous(memory_format=torch.channels_last)


def test_vmap(device):
    from dynconv.ops.layout import channels_last_copy_op

    x = torch.randn((3, 2, 5, 3, 4), device=device)
    for dim in (0, 2):
        assert torch.equal(torch.vmap(channels_last_copy_op, in_dims=dim)(x.movedim(0, dim)), x)
