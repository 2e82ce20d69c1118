"""Run inside a fresh venv holding only the dynconv wheel (tests/test_packaging.py): import dynconv,
run every op and module forward and backward on tiny CPU tensors against float64 references, and
fail if anything tried to import a bench-only package. Prints one JSON line on success."""
from __future__ import annotations

import json
import os
import sys

import torch

import dynconv
import dynconv.nn as dnn
from dynconv.kernels._launch import kernels_are_interpreted
from dynconv.reference import expert_conv2d_loop, involution_unfold

# Written by the venv's blocker (a .pth that installs a meta-path finder) when anything asks for
# matplotlib; a module that swallows the ImportError is caught here, not only one that crashes.
import _bench_extras_blocker as blocker  # noqa: E402

ATOL = 1e-5


def check(name, fn, reference, *inputs):
    """fn on float32 inputs against reference on float64 copies: output and every input gradient."""
    ours = [t.detach().float().requires_grad_() for t in inputs]
    ref = [t.detach().double().clone().requires_grad_() for t in inputs]
    y, y_ref = fn(*ours), reference(*ref)
    g = torch.randn_like(y_ref)
    (y.double() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=ATOL, rtol=ATOL, msg=lambda m: f"{name} grad {i}: {m}")


def run_ops():
    B, C, G, K, H = 2, 4, 2, 3, 5
    x = torch.randn(B, C, H, H, dtype=torch.float64)
    check("involution", dynconv.involution, involution_unfold, x, torch.randn(B, G, K, K, H, H, dtype=torch.float64))

    def dw_reference(x, w, bias):  # one kernel per sample and channel = per-pixel kernels, constant over pixels
        y = involution_unfold(x, w[..., None, None].expand(*w.shape, H, H))
        return y + bias[:, :, None, None]

    check("dynamic_dwconv2d", dynconv.dynamic_dwconv2d, dw_reference, x, torch.randn(B, C, K, K, dtype=torch.float64),
          torch.randn(B, C, dtype=torch.float64))

    R = 3

    def fused_reference(x, z, span_weight, span_bias):
        w = torch.einsum("kr,brij->bkij", span_weight, z) + span_bias[None, :, None, None]
        return involution_unfold(x, w.reshape(B, G, K, K, H, H))

    check("involution_fused", lambda x, z, sw, sb: dynconv.involution_fused(x, z, sw, sb, K, G), fused_reference,
          x, torch.randn(B, R, H, H, dtype=torch.float64), torch.randn(G * K * K, R, dtype=torch.float64),
          torch.randn(G * K * K, dtype=torch.float64))

    E = 3
    check("expert_conv2d", lambda *a: dynconv.expert_conv2d(*a, padding=1),
          lambda *a: expert_conv2d_loop(*a, padding=1),
          x, torch.randn(E, C, C, K, K, dtype=torch.float64), torch.rand(B, E, dtype=torch.float64),
          torch.randn(E, C, dtype=torch.float64))
    return ["involution", "dynamic_dwconv2d", "involution_fused", "expert_conv2d"]


def run_modules():
    modules = [dnn.CondConv2d(4, 4, 3, padding=1, num_experts=2), dnn.DynamicConv2d(4, 4, 3, padding=1, num_experts=2),
               dnn.ODConv2d(4, 4, 3, padding=1, num_experts=2, min_channels=4),
               dnn.DRConv2d(4, 4, 3, padding=1, region_num=2, num_experts=2),
               dnn.Involution2d(4, 3, group_channels=2, reduction_ratio=2, fused=False),
               dnn.Involution2d(4, 3, group_channels=2, reduction_ratio=2, fused=True),
               dnn.DynamicDWConv2d(4, 3, reduction_ratio=2),
               dnn.DynamicDWConv2d(4, 3, reduction_ratio=2, homogeneous=False)]
    for m in modules:
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        y = m(x)
        assert y.shape == (2, 4, 5, 5), f"{m}: output shape {tuple(y.shape)}"
        y.square().sum().backward()
        for name, t in [("x", x), *m.named_parameters()]:
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"{type(m).__name__}: gradient of {name}"
    return [type(m).__name__ for m in modules]


def main() -> int:
    torch.manual_seed(0)
    ops, modules = run_ops(), run_modules()
    assert not blocker.ATTEMPTS, f"the runtime tried to import bench-only packages: {blocker.ATTEMPTS}"
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in blocker.BLOCKED)
    assert not leaked, f"bench-only modules imported: {leaked}"
    print(json.dumps({"dynconv": dynconv.__file__, "version": dynconv.__version__, "prefix": sys.prefix,
                      "interpreted": kernels_are_interpreted(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                      "ops": ops, "modules": modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
