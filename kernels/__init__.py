"""Triton kernels and the functions that launch them. No autograd, no modules (see ops/)."""
from . import (expert_conv, expert_conv_guide, expert_conv_input_grad, expert_conv_weight_grad, involution,
               involution_fused, involution_weight_grad, layout, na2d, na2d_pair, region_conv,
               region_conv_input_grad, region_tables)
# Each tuning module registers its kernels' tuning spaces with configs (run-time tuning and
# `dynconv autotune` read them there); importing them here makes them present wherever a kernel is.
from . import involution_tuning, expert_conv_tuning, involution_fused_tuning  # noqa: F401  isort: skip

# Every kernel module lists its default launches at representative shapes in `catalogue()`;
# the AOT compile test and `dynconv inspect` walk this tuple.
KERNEL_MODULES = (involution, involution_weight_grad, expert_conv, expert_conv_guide, expert_conv_input_grad,
                  expert_conv_weight_grad, involution_fused, na2d, na2d_pair, region_conv, region_conv_input_grad, layout,
                  region_tables)


def catalogue():
    return [launch for module in KERNEL_MODULES for launch in module.catalogue()]
