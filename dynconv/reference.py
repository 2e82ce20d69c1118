"""Plain-PyTorch baselines and references (SPEC.md §3), for tests and benchmarks."""
from dynconv.ops.reference_involution import (
    involution_naive,
    involution_shift_add,
    involution_unfold,
)

__all__ = ["involution_unfold", "involution_shift_add", "involution_naive"]
