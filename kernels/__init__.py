"""Triton kernels and the functions that launch them. No autograd, no modules (see ops/)."""
from . import expert_conv, involution, involution_fused, na2d

# Every kernel module lists its default launches at representative shapes in `catalogue()`;
# the AOT compile test and `dynconv inspect` walk this tuple.
KERNEL_MODULES = (involution, expert_conv, involution_fused, na2d)


def catalogue():
    return [launch for module in KERNEL_MODULES for launch in module.catalogue()]
