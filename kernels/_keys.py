"""The problem key of the family-1 kernels (involution.py and dynamic_dwconv.py share it: the tuning
tables of both modules are keyed by it, and neither module can import the other's for it without a
cycle)."""
from __future__ import annotations

import torch

from ._launch import is_channels_last


def problem_key(x: torch.Tensor, G: int, K: int, stride) -> dict:
    """What the tuned configuration depends on (the autotuner buckets these)."""
    B, C, H, W = x.shape
    # Both stride components: a (1, 2) layer must not take a (1, 1) layer's tiles.
    return {"B": B, "C": C, "G": G, "H": H, "W": W, "K": K, "stride_h": stride[0], "stride_w": stride[1],
            "channels_last": int(is_channels_last(x)), "dtype_bytes": x.element_size()}
