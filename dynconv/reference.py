"""Plain-PyTorch baselines and references (SPEC.md §3), for tests and benchmarks."""
from dynconv.ops.reference_involution_fused import involution_fused_reference
from dynconv.ops.reference_involution import (
    involution_naive,
    involution_shift_add,
    involution_unfold,
)
from dynconv.ops.reference_expert import (
    drconv_all_regions,
    expert_conv2d_grouped,
    expert_conv2d_loop,
)

__all__ = ["involution_fused_reference", "expert_conv2d_grouped", "drconv_all_regions", "expert_conv2d_loop", "involution_unfold", "involution_shift_add", "involution_naive"]
