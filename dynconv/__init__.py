"""dynconv: Triton GPU kernels for dynamic convolutions, as torch ops and nn modules.

>>> import dynconv
>>> y = dynconv.involution(x, weight)            # docs/operators.md §1a
>>> y = dynconv.dynamic_dwconv2d(x, weight)      # docs/operators.md §1b
>>> y = dynconv.expert_conv2d(x, experts, routing)  # docs/operators.md §2
>>> y = dynconv.involution_fused(x, z, span_weight, span_bias, 7, 16)  # fused kernel generation
>>> y = dynconv.na2d(q, k, v, 7, rpb=rpb)          # docs/operators.md §1c
>>> layer = dynconv.nn.Involution2d(64)
"""
from dynconv.ops.expert_conv import expert_conv2d
from dynconv.ops.involution import dynamic_dwconv2d, involution
from dynconv.ops.involution_fused import involution_fused
from dynconv.ops.na2d import na2d, na2d_av, na2d_qk

from . import nn, reference

__version__ = "0.1.0"

__all__ = ["na2d", "na2d_qk", "na2d_av", "involution_fused", "expert_conv2d", "involution", "dynamic_dwconv2d", "nn", "reference", "__version__"]
