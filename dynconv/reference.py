"""Plain-PyTorch baselines and references (docs/operators.md §3), for tests and benchmarks."""
from dynconv.ops.reference_involution_fused import involution_fused_reference
from dynconv.ops.reference_involution import (
    involution_naive,
    involution_shift_add,
    involution_unfold,
)
from dynconv.ops.reference_na2d import na2d_av_gather, na2d_gather, na2d_naive, na2d_qk_gather, na2d_taps
from dynconv.ops.reference_expert import (
    drconv_all_regions,
    expert_conv2d_grouped,
    expert_conv2d_loop,
)

__all__ = ["na2d_naive", "na2d_gather", "na2d_qk_gather", "na2d_av_gather", "na2d_taps", "involution_fused_reference", "expert_conv2d_grouped", "drconv_all_regions", "expert_conv2d_loop", "involution_unfold", "involution_shift_add", "involution_naive"]
