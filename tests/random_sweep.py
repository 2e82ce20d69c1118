"""A randomised sweep of every op against the float64 references: not part of the suite (slow).

    python tests/random_sweep.py --cases 300 --seed 1          # Triton kernels, interpreter
    python tests/random_sweep.py --cases 300 --seed 1 --plain  # the plain CPU path

Each case draws shapes (empty sizes included), a layout (NCHW, channels_last, a strided view),
stride / padding / dilation of every accepted kind (int, tuple, list, numpy integer), a dtype,
then compares the output, every first-order gradient, a second-order gradient (a gradient
penalty: backward through ∂x) and a forward-mode tangent (torch.func.jvp) with the reference's,
all on NaN-poisoned allocations. Geometry the reference rejects must be rejected with a
ValueError / TypeError. Prints one line per failure and a summary; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import traceback

PLAIN = "--plain" in sys.argv
if not PLAIN:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import dynconv  # noqa: E402
from dynconv import reference  # noqa: E402
from helpers import TOLERANCES, nan_poisoned_empty  # noqa: E402


def _kind(rng, value):
    """The same geometry value as an int, a tuple, a list or a numpy integer."""
    pick = rng.randrange(4)
    if isinstance(value, tuple):
        return value if pick < 2 else list(value)
    return [value, (value, value), [value, value], np.int64(value)][pick]


def _layout(rng, t):
    pick = rng.randrange(3)
    if pick == 1 and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if pick == 2:  # a strided view: every other element of a tensor twice as wide
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    return t


def _out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _small_geometry(rng, kh, kw):
    """An image up to 6x6 with stride, padding and dilation drawn per axis (dilation along H
    only); the output size and whether the geometry is valid at all."""
    H, W = rng.randint(1, 6), rng.randint(1, 6)
    s = (rng.choice([1, 2]), rng.choice([1, 2]))
    d = (rng.choice([1, 2]), 1)
    p = (rng.randint(0, 2), rng.randint(0, 1))
    Ho, Wo = _out(H, kh, s[0], p[0], d[0]), _out(W, kw, s[1], p[1], d[1])
    return H, W, s, p, d, Ho, Wo, Ho > 0 and Wo > 0


def involution_case(rng):
    B, G, cg = rng.choice([0, 1, 2]), rng.choice([1, 2]), rng.choice([0, 1, 3]) if rng.random() < 0.15 else rng.choice([1, 3])
    K = rng.choice([1, 2, 3, 5])
    H, W = rng.randint(1, 7), rng.randint(1, 7)
    s = (rng.choice([1, 2]), rng.choice([1, 2]))
    d = (rng.choice([1, 2]), rng.choice([1, 2]))
    p = (rng.randint(0, 2), rng.randint(0, 2))
    Ho, Wo = _out(H, K, s[0], p[0], d[0]), _out(W, K, s[1], p[1], d[1])
    per_pixel = rng.random() < 0.6
    C = G * cg
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    if per_pixel:
        w = torch.randn(B, G, K, K, max(Ho, 0), max(Wo, 0), dtype=torch.float64)
        bias = None
        fn = dynconv.involution
    else:
        w = torch.randn(B, G, K, K, dtype=torch.float64)
        bias = torch.randn(B, C, dtype=torch.float64) if rng.random() < 0.5 else None
        fn = dynconv.dynamic_dwconv2d
    valid = Ho > 0 and Wo > 0
    kinds = dict(stride=_kind(rng, s), padding=_kind(rng, p), dilation=_kind(rng, d))
    inputs = dict(x=x, weight=w) if bias is None and per_pixel else dict(x=x, weight=w, bias=bias)
    if per_pixel:
        run = lambda a: fn(a["x"], a["weight"], **kinds)  # noqa: E731
    else:
        run = lambda a: fn(a["x"], a["weight"], a.get("bias"), **kinds)  # noqa: E731
    # unfold is independent of the plain path's shift-and-add; it refuses empty tensors
    ref = reference.involution_unfold if x.numel() else reference.involution_shift_add
    refrun = lambda a: ref(a["x"], a["weight"], a.get("bias"), s, p, d)  # noqa: E731
    return f"{fn.__name__} B{B} C{C} G{G} K{K} {H}x{W} s{s} p{p} d{d}", inputs, run, refrun, valid


def expert_case(rng):
    B = rng.choice([0, 1, 2])
    groups = rng.choice([1, 2])
    cin, cout = groups * rng.choice([1, 2]), groups * rng.choice([1, 2])
    E = rng.choice([1, 2, 3])
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3])
    H, W, s, p, d, Ho, Wo, valid = _small_geometry(rng, kh, kw)
    m = rng.choice([1, 1, 2, 3])
    inputs = dict(x=torch.randn(B, cin, H, W, dtype=torch.float64),
                  experts=torch.randn(E, cout, cin // groups, kh, kw, dtype=torch.float64),
                  routing=torch.randn(B, E, dtype=torch.float64) if m == 1 else torch.randn(B, m, E, dtype=torch.float64))
    if rng.random() < 0.5:
        inputs["bias"] = torch.randn(E, cout, dtype=torch.float64)
    if rng.random() < 0.3:
        inputs["spatial"] = torch.randn(B, kh, kw, dtype=torch.float64)
    if m > 1:
        inputs["guide"] = torch.randn(B, m, max(Ho, 0), max(Wo, 0), dtype=torch.float64)
    kinds = dict(stride=_kind(rng, s), padding=_kind(rng, p), dilation=_kind(rng, d), groups=groups)

    def run(a):
        return dynconv.expert_conv2d(a["x"], a["experts"], a["routing"], a.get("bias"), **kinds,
                                     spatial=a.get("spatial"), guide=a.get("guide"))

    def refrun(a):
        return reference.expert_conv2d_loop(a["x"], a["experts"], a["routing"], a.get("bias"), s, p, d, groups,
                                            spatial=a.get("spatial"), guide=a.get("guide"))
    return f"expert_conv2d B{B} {cin}->{cout} g{groups} E{E} m{m} {kh}x{kw} {H}x{W} s{s} p{p} d{d}", inputs, run, refrun, valid


def fused_case(rng):
    B, G, cg, R = rng.choice([0, 1, 2]), rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([1, 3])
    K = rng.choice([1, 3])
    H, W, s, p, d, Ho, Wo, valid = _small_geometry(rng, K, K)
    C = G * cg
    inputs = dict(x=torch.randn(B, C, H, W, dtype=torch.float64), z=torch.randn(B, R, max(Ho, 0), max(Wo, 0), dtype=torch.float64),
                  span_weight=torch.randn(K * K * G, R, dtype=torch.float64))
    if rng.random() < 0.6:
        inputs["span_bias"] = torch.randn(K * K * G, dtype=torch.float64)
    kinds = dict(stride=_kind(rng, s), padding=_kind(rng, p), dilation=_kind(rng, d))

    def run(a):
        return dynconv.involution_fused(a["x"], a["z"], a["span_weight"], a.get("span_bias"), K, G, **kinds)

    def refrun(a):
        return reference.involution_fused_reference(a["x"], a["z"], a["span_weight"], a.get("span_bias"), K, G, s, p, d)
    return f"involution_fused B{B} C{C} G{G} R{R} K{K} {H}x{W} s{s} p{p} d{d}", inputs, run, refrun, valid


def _close(name, actual, expected, dtype, failures):
    atol, rtol = TOLERANCES[dtype]
    if actual is None or expected is None:
        if (actual is None) != (expected is None):
            failures.append(f"{name}: one side is None")
        return
    if actual.shape != expected.shape:
        failures.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        return
    if actual.numel() == 0:
        return
    if torch.isnan(actual).any():
        failures.append(f"{name}: NaN")
        return
    scale = max(1.0, expected.abs().max().item())
    if not torch.allclose(actual.double(), expected.double(), atol=atol * scale * 4, rtol=rtol * 4):
        failures.append(f"{name}: max err {(actual.double() - expected.double()).abs().max().item():.3g}")


def check(rng, case):
    name, inputs, run, refrun, valid = case(rng)
    dtype = rng.choice([torch.float64, torch.float32])
    failures = []
    test_in = {k: _layout(rng, v.to(dtype)).requires_grad_() for k, v in inputs.items() if v is not None}
    ref_in = {k: v.detach().to(dtype).double().requires_grad_() for k, v in test_in.items()}
    if not valid:
        try:
            run(test_in)
        except (ValueError, TypeError):
            return name, []
        return name, ["invalid geometry was not rejected"]
    with nan_poisoned_empty():
        y = run(test_in)
    y_ref = refrun(ref_in)
    _close("y", y, y_ref, dtype, failures)
    r = torch.randn_like(y_ref)
    leaves = list(test_in)
    with nan_poisoned_empty():
        grads = torch.autograd.grad(y, [test_in[k] for k in leaves], r.to(dtype), create_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, [ref_in[k] for k in leaves], r, create_graph=True, allow_unused=True)
    for k, g, gr in zip(leaves, grads, ref_grads):
        if gr is None:
            gr = torch.zeros_like(ref_in[k])
        if g is None:
            g = torch.zeros_like(test_in[k])
        _close(f"d{k}", g, gr, dtype, failures)
    # Second order: a gradient penalty on ∂x (guide: the straight-through gradient has no second derivative here).
    first = leaves[0]
    if grads[0] is not None and grads[0].requires_grad and y.numel():
        q = torch.randn_like(ref_grads[0])
        targets = [k for k in leaves if k != "guide"]
        with nan_poisoned_empty():
            second = torch.autograd.grad(grads[0], [test_in[k] for k in targets], q.to(dtype), allow_unused=True)
        ref_second = torch.autograd.grad(ref_grads[0], [ref_in[k] for k in targets], q, allow_unused=True)
        for k, g, gr in zip(targets, second, ref_second):
            g = torch.zeros_like(test_in[k]) if g is None else g
            gr = torch.zeros_like(ref_in[k]) if gr is None else gr
            _close(f"d2/d{first}d{k}", g, gr, dtype, failures)
    elif y.numel() and dtype == torch.float64:
        failures.append(f"d{first} does not require grad under create_graph=True")
    # Forward mode.
    tangents = {k: torch.randn_like(v) for k, v in test_in.items() if k != "guide"}

    def f(*vals):
        return run({**{k: v.detach() for k, v in test_in.items()}, **dict(zip(tangents, vals))})

    def fr(*vals):
        return refrun({**{k: v.detach() for k, v in ref_in.items()}, **dict(zip(tangents, vals))})
    with nan_poisoned_empty():
        _, t = torch.func.jvp(f, tuple(test_in[k].detach() for k in tangents), tuple(tangents.values()))
    _, t_ref = torch.func.jvp(fr, tuple(ref_in[k].detach() for k in tangents), tuple(v.double() for v in tangents.values()))
    _close("jvp", t, t_ref, dtype, failures)
    return name, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="the plain CPU path instead of the interpreter")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    cases = [involution_case, expert_case, fused_case]
    bad = 0
    for i in range(args.cases):
        case = cases[i % len(cases)]
        try:
            name, failures = check(rng, case)
        except Exception:  # noqa: BLE001 - a crash is a failure to report, not to stop on
            name, failures = case.__name__, [traceback.format_exc(limit=3).strip().splitlines()[-1]]
        if failures:
            bad += 1
            print(f"FAIL {i} {name}: {'; '.join(failures)}", flush=True)
    print(f"{args.cases} cases ({'plain' if args.plain else 'interpreter'} path), {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
