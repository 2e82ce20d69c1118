"""One device helper shared by kernel modules: the fence that keeps a batch of loads together.
Kernels here know nothing of autograd."""
import triton
import triton.language as tl


@triton.jit
def fence(ptr, size):
    """A store no lane makes to ``ptr`` (int32 pointers, any shape), then a load no lane makes from it
    (a zero a lane). Neither moves memory, but ptxas moves no load below a store that may alias it,
    where it otherwise issues each load just before its first use, one round trip each: the loads
    before the fence go out as one batch, and sums that add the zero cannot start before it. ``ptr``
    should be an output's address, which ptxas cannot tell from the loads' (at an address it can
    relate to them, it proves them apart and sinks them again). ``size`` is a run-time size (>= 0),
    so that the compiler cannot see that no lane stores (a constant-false mask drops the store)."""
    off = (tl.zeros(ptr.shape, dtype=tl.int32) + size) < 0
    tl.store(ptr, off.to(tl.int32), mask=off)
    return tl.load(ptr, mask=off, other=0)
