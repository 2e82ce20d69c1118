"""nn modules for local attention (docs/operators.md §1c): ``NeighborhoodAttention2d``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops.na2d import na2d, na2d_av, na2d_qk


class NeighborhoodAttention2d(nn.Module):
    """Neighbourhood attention (NAT, Hassani et al. 2023; DiNAT with ``dilation > 1``) on ``(B, H, W, dim)``.

    Parameters are named as in NAT/DiNAT's ``NeighborhoodAttention`` (``qkv``, ``rpb``, ``proj``),
    so their checkpoints load with ``load_state_dict``; ``rel_pos_bias=False`` registers ``rpb``
    as None, as NATTEN does. Like NAT, an image smaller than the window ``K·dilation`` is padded
    with zeros at the bottom and right before ``qkv`` and cropped after the attention
    (``window="neighborhood"`` only: a sliding window needs no padding).

    The attention runs fused (``dynconv.na2d``: the K² scores never reach memory on the GPU) unless
    attention dropout is active (``attn_drop > 0`` in training): dropout needs the probabilities,
    so that case runs the unfused ``na2d_qk`` → softmax → dropout → ``na2d_av``, which writes and
    reads the ``(B, H, W, heads, K, K)`` scores (K²/D times the memory traffic of q, in each
    direction) and launches four kernels plus the softmax and dropout instead of one.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, qkv_bias: bool = True,
                 qk_scale: float | None = None, rel_pos_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, window: str = "neighborhood"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size, self.dilation, self.window = kernel_size, dilation, window
        self.window_size = kernel_size * dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"input must be (B, H, W, dim={self.dim}), got {tuple(x.shape)}")
        B, H0, W0, _ = x.shape
        pad_h = pad_w = 0
        if self.window == "neighborhood":
            pad_h, pad_w = max(0, self.window_size - H0), max(0, self.window_size - W0)
            if pad_h or pad_w:
                x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        B, H, W, _ = x.shape
        # Views of the packed projection: the ops take strides, so q, k and v are never copied.
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        if self.training and self.attn_drop_rate > 0:
            scores = na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, rpb=self.rpb, window=self.window)
            attn = self.attn_drop(scores.flatten(-2).softmax(-1)).view(scores.shape)
            y = na2d_av(attn, v, self.kernel_size, self.dilation, window=self.window)
        else:
            y = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale, window=self.window)
        y = y.reshape(B, H, W, self.dim)
        if pad_h or pad_w:
            y = y[:, :H0, :W0]
        return self.proj_drop(self.proj(y))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, window={self.window!r}")
