"""Who computes an op in ``dynconv bench``: a small registry of providers.

A provider is a name, a label for the plots, the ops it serves, and ``resolve(op)`` which returns
``fn(t, p) -> y`` (``t``: the dict of input tensors from :func:`make_inputs`, ``p``: the
:class:`~dynconv.roofline.Problem`). ``resolve`` imports what it needs only when called and
raises :class:`ProviderUnavailable` when that is not there (a family-2 op not merged yet, say),
so the benchmark skips the provider with a note instead of failing. Adding a provider (a fused
kernel, another baseline) is one :func:`register_provider` call::

    register_provider(Provider("my_kernel", "my kernel", ("involution",), lambda op: my_fn))

Every provider of a measurement gets the same input dict, in the layout the measurement asks for
(:data:`LAYOUTS`; :func:`make_inputs`): a provider that wants another memory format converts inside
its own call and pays for it there, as it would in a network of that layout.

``involution_layer`` (Involution2d from the reduced feature z on) is served by every family-1
provider as span conv (``F.conv2d``, 1x1) + that provider's aggregation, by ``dynconv_fused``
(``dynconv.involution_fused``: one kernel, no per-pixel weights in memory) and by the depth-wise
static conv of x.

torch is imported inside functions only: :mod:`dynconv.plot` reads the labels without it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from dynconv.roofline import FAMILY, Problem


class ProviderUnavailable(Exception):
    """The provider's implementation cannot be imported here; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str                      # the csv's ``provider`` value; never rename one that has data
    label: str                     # legend text
    ops: tuple[str, ...]
    resolve: Callable[[str], Callable]
    # Computes a different function (the static conv): not checked against the reference output.
    static: bool = False


PROVIDERS: dict[str, Provider] = {}


def register_provider(provider: Provider) -> None:
    PROVIDERS[provider.name] = provider


def providers_for(op: str) -> list[Provider]:
    return [p for p in PROVIDERS.values() if op in p.ops]


def label(name: str) -> str:
    return PROVIDERS[name].label if name in PROVIDERS else name


# The baseline each op's speedup bars divide by: docs/operators.md §3's unfold where it exists; family 2
# has no unfold formulation, so its bars use the per-sample batch-as-groups conv.
SPEEDUP_BASELINE = {"involution": "unfold", "dynamic_dwconv2d": "unfold",
                    "expert_conv2d": "batch_groups", "drconv": "batch_groups", "involution_layer": "unfold"}
# Whose forward output every other provider is checked against before it is timed: the
# lowest-memory exact formulation, so the check itself does not run out of memory.
CHECK_REFERENCE = {"involution": "shift_add", "dynamic_dwconv2d": "shift_add",
                   "expert_conv2d": "batch_groups", "drconv": "batch_groups", "involution_layer": "shift_add"}
# The provider the summary table and the roofline plot report for an op (the others are its
# baselines): dynconv's best implementation of it.
HEADLINE = {"involution_layer": "dynconv_fused"}


def headline(op: str) -> str:
    return HEADLINE.get(op, "dynconv")


def _attr(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ProviderUnavailable(f"{module}.{name} is not available yet ({exc})") from None


def _geometry(p: Problem) -> tuple[int, int, int]:
    return p.stride, p.padding, p.dilation


# ---------------------------------------------------------------------------------------------
# Family 1: involution (per-pixel weights), dynamic_dwconv2d (per-sample weights)
# ---------------------------------------------------------------------------------------------

def _span_conv(t: dict, p: Problem):
    """The unfused layer's kernel generation: the 1x1 span conv (R → K²·G) of z, viewed as the
    per-pixel weights ``(B, G, K, K, Ho, Wo)``."""
    import torch.nn.functional as F
    span = t["span_weight"]
    w = F.conv2d(t["z"], span.reshape(*span.shape, 1, 1), t.get("span_bias"))
    return w.reshape(p.B, p.G, p.K, p.K, *w.shape[2:])


def _dynconv(op: str):
    if op == "involution_layer":
        f = _attr("dynconv", "involution")
        return lambda t, p: f(t["x"], _span_conv(t, p), *_geometry(p))
    if op == "involution":
        f = _attr("dynconv", "involution")
        return lambda t, p: f(t["x"], t["weight"], *_geometry(p))
    if op == "dynamic_dwconv2d":
        f = _attr("dynconv", "dynamic_dwconv2d")
        return lambda t, p: f(t["x"], t["weight"], t.get("bias"), *_geometry(p))
    if op == "expert_conv2d":
        f = _attr("dynconv", "expert_conv2d")
        return lambda t, p: f(t["x"], t["experts"], t["routing"], t.get("bias"), *_geometry(p), p.groups)
    if op == "drconv":
        f = _attr("dynconv", "expert_conv2d")
        return lambda t, p: f(t["x"], t["experts"], t["routing"], t.get("bias"), *_geometry(p), p.groups,
                              guide=t["guide"])
    raise ProviderUnavailable(f"dynconv has no {op}")


def _dynconv_fused(op: str):
    f = _attr("dynconv", "involution_fused")
    return lambda t, p: f(t["x"], t["z"], t["span_weight"], t.get("span_bias"), p.K, p.G, *_geometry(p))


def _family1_reference(name: str):
    def resolve(op: str):
        f = _attr("dynconv.reference", name)
        if op == "involution_layer":
            return lambda t, p: f(t["x"], _span_conv(t, p), None, *_geometry(p))
        return lambda t, p: f(t["x"], t["weight"], t.get("bias"), *_geometry(p))
    return resolve


def _dwconv_batch_groups(op: str):
    """The timm / DWNet trick: the batch folded into channels, one grouped conv."""
    import torch.nn.functional as F

    def run(t, p):
        x, w = t["x"], t["weight"]
        B, C, H, W = x.shape
        # (B, G, K, K) → one filter per (sample, channel); a view when G == C.
        w = w.repeat_interleave(C // w.shape[1], dim=1) if w.shape[1] != C else w
        b = t["bias"].reshape(B * C) if "bias" in t else None
        y = F.conv2d(x.reshape(1, B * C, H, W), w.reshape(B * C, 1, *w.shape[2:]), b,
                     p.stride, p.padding, p.dilation, groups=B * C)
        return y.reshape(B, C, *y.shape[2:])
    return run


def _static_conv(op: str):
    """nn.Conv2d's function with fixed weights: depth-wise for family 1, dense for family 2."""
    import torch.nn.functional as F
    groups = (lambda p: p.C) if FAMILY[op] == 1 else (lambda p: p.groups)
    return lambda t, p: F.conv2d(t["x"], t["static_weight"], t.get("static_bias"),
                                 p.stride, p.padding, p.dilation, groups=groups(p))


# ---------------------------------------------------------------------------------------------
# Family 2: expert_conv2d (routing (B, E)), drconv (routing (B, m, E) + guide)
# ---------------------------------------------------------------------------------------------

def _family2_reference(name: str):
    def resolve(op: str):
        f = _attr("dynconv.reference", name)
        if op == "drconv":
            return lambda t, p: f(t["x"], t["experts"], t["routing"], t.get("bias"), *_geometry(p), p.groups,
                                  guide=t["guide"])
        return lambda t, p: f(t["x"], t["experts"], t["routing"], t.get("bias"), *_geometry(p), p.groups)
    return resolve


_FAMILY1 = ("involution", "dynamic_dwconv2d", "involution_layer")
_FAMILY2 = ("expert_conv2d", "drconv")

register_provider(Provider("dynconv", "dynconv (Triton)", _FAMILY1 + _FAMILY2, _dynconv))
register_provider(Provider("unfold", "unfold baseline", _FAMILY1, _family1_reference("involution_unfold")))
register_provider(Provider("shift_add", "shift-and-add", _FAMILY1, _family1_reference("involution_shift_add")))
register_provider(Provider("batch_groups", "batch-as-groups conv", ("dynamic_dwconv2d",) + _FAMILY2,
                           lambda op: (_dwconv_batch_groups(op) if op == "dynamic_dwconv2d"
                                       else _family2_reference("expert_conv2d_grouped")(op))))
register_provider(Provider("all_regions", "all regions, then select", ("drconv",),
                           _family2_reference("drconv_all_regions")))
register_provider(Provider("loop", "expert_conv2d_loop", _FAMILY2, _family2_reference("expert_conv2d_loop")))
register_provider(Provider("dynconv_fused", "dynconv fused", ("involution_layer",), _dynconv_fused))
register_provider(Provider("static_conv", "static cuDNN conv (floor)", _FAMILY1 + _FAMILY2, _static_conv,
                           static=True))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

# The csv's ``layout`` values: the memory format of the 4-D activations (make_inputs).
LAYOUTS = ("nchw", "nhwc")
# Activations a network of that layout hands the op in it: the input, DRConv's guide (a conv's
# output) and the layer's reduced feature z. Per-pixel and per-sample weights are not listed:
# they keep the op's own (B, G, K, K[, Ho, Wo]) order; a channels_last network's generated
# weights are what involution_layer's unfused providers measure (the span conv writes them
# from z in z's layout).
_ACTIVATIONS = ("x", "z", "guide")


def output_shape(p: Problem) -> tuple[int, int, int, int]:
    Ho, Wo = p.out_hw
    return (p.B, p.C if FAMILY[p.op] == 1 else p.Cout, Ho, Wo)


def make_inputs(p: Problem, dtype, device, requires_grad: bool = False, generator=None,
                layout: str = "nchw") -> dict:
    """Random inputs for every provider of ``p.op`` (the static conv's own weights included),
    scaled so outputs are O(1) in every dtype. Never zeros: they hide unwritten outputs and can
    run faster than real data. ``layout="nhwc"`` puts the activations (x, z, guide) and the
    static conv's weight in ``torch.channels_last``; the values do not depend on the layout."""
    import torch
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")

    def randn(*shape, scale=1.0):
        t = torch.randn(shape, device=device, dtype=torch.float32, generator=generator) * scale
        return t.to(dtype)

    Ho, Wo = p.out_hw
    if p.op == "na2d":
        t = na2d_inputs(p, randn)
    elif p.op == "involution_layer":
        taps = p.K * p.K * p.G
        # z ~ N(0, 1) and span ~ N(0, 1/(K²R)): generated weights ~ 1/K, as the involution's.
        t = {"x": randn(p.B, p.C, p.H, p.W), "z": randn(p.B, p.R, Ho, Wo),
             "span_weight": randn(taps, p.R, scale=1.0 / (p.K * p.R ** 0.5)),
             "static_weight": randn(p.C, 1, p.K, p.K, scale=1.0 / p.K)}
        if p.bias:
            t["span_bias"] = randn(taps, scale=0.1 / p.K)
    elif FAMILY[p.op] == 1:
        weight_shape = (p.B, p.G, p.K, p.K) + ((Ho, Wo) if p.op == "involution" else ())
        t = {"x": randn(p.B, p.C, p.H, p.W), "weight": randn(*weight_shape, scale=1.0 / p.K),
             "static_weight": randn(p.C, 1, p.K, p.K, scale=1.0 / p.K)}
        if p.bias:
            t["bias"] = randn(p.B, p.C, scale=0.1)
            t["static_bias"] = randn(p.C, scale=0.1)
    else:
        fan_in = (p.C // p.groups) * p.K * p.K
        logits = torch.randn((p.B, p.m, p.E) if p.op == "drconv" else (p.B, p.E),
                             device=device, generator=generator)
        routing = torch.sigmoid(logits) if p.routing == "sigmoid" else torch.softmax(logits, dim=-1)
        t = {"x": randn(p.B, p.C, p.H, p.W),
             "experts": randn(p.E, p.Cout, p.C // p.groups, p.K, p.K, scale=fan_in ** -0.5),
             "routing": routing.to(dtype),
             "static_weight": randn(p.Cout, p.C // p.groups, p.K, p.K, scale=fan_in ** -0.5)}
        if p.op == "drconv":
            t["guide"] = randn(p.B, p.m, Ho, Wo)
        if p.bias:
            t["bias"] = randn(p.E, p.Cout, scale=0.1)
            t["static_bias"] = randn(p.Cout, scale=0.1)
    if layout == "nhwc":
        # The static weight too: a channels_last model holds its conv weights so, and one in
        # NCHW would be re-laid out on every call, which the floor should not pay.
        for name in _ACTIVATIONS + ("static_weight",):
            if name in t:
                t[name] = t[name].contiguous(memory_format=torch.channels_last)
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


# ---------------------------------------------------------------------------------------------
# na2d (issue 15): neighbourhood attention, q/k/v (B, H, W, heads, D), layout-independent
# ---------------------------------------------------------------------------------------------

def na2d_inputs(p: Problem, randn) -> dict:
    """q, k, v ~ N(0, 1) (the scores then have unit variance after the D^-1/2 scale), rpb small."""
    shape = (p.B, p.H, p.W, p.G, p.D)
    t = {"q": randn(*shape), "k": randn(*shape), "v": randn(*shape)}
    if p.bias:
        t["rpb"] = randn(p.G, 2 * p.K - 1, 2 * p.K - 1, scale=0.1)
    return t


def _na2d_fused(op: str):
    f = _attr("dynconv", "na2d")
    return lambda t, p: f(t["q"], t["k"], t["v"], p.K, p.dilation, rpb=t.get("rpb"))


def _na2d_unfused(op: str):
    """na2d_qk, a softmax over the K² scores in memory, na2d_av (NATTEN 0.17's unfused pipeline)."""
    qk, av = _attr("dynconv", "na2d_qk"), _attr("dynconv", "na2d_av")

    def run(t, p):
        s = qk(t["q"] * p.D ** -0.5, t["k"], p.K, p.dilation, rpb=t.get("rpb"))
        return av(s.flatten(-2).softmax(-1).view(s.shape), t["v"], p.K, p.dilation)
    return run


def _na2d_gather(op: str):
    """Plain PyTorch: every window gathered as a (B, H, W, K, K, heads, D) tensor, einsum, softmax."""
    f = _attr("dynconv.reference", "na2d_gather")
    return lambda t, p: f(t["q"], t["k"], t["v"], p.K, (p.dilation, p.dilation), rpb=t.get("rpb"))


def _natten(op: str):
    """NATTEN's fused na2d where installed: ``natten.functional.na2d`` (0.17–0.19, takes rpb) or
    ``natten.na2d`` (0.20 on, no rpb: an rpb shape is then an error row, not a silent mismatch)."""
    try:
        natten = importlib.import_module("natten")
    except ImportError as exc:
        raise ProviderUnavailable(f"natten is not installed ({exc})") from None
    functional = getattr(natten, "functional", None)
    legacy = getattr(functional, "na2d", None) if functional is not None else None
    if legacy is not None:
        return lambda t, p: legacy(t["q"], t["k"], t["v"], p.K, dilation=p.dilation, rpb=t.get("rpb"))
    modern = getattr(natten, "na2d", None)
    if modern is None:
        raise ProviderUnavailable("natten has neither natten.functional.na2d nor natten.na2d")

    def run(t, p):
        if "rpb" in t:
            raise ValueError(f"natten {getattr(natten, '__version__', '?')} has no relative positional bias")
        return modern(t["q"], t["k"], t["v"], p.K, dilation=p.dilation)
    return run


register_provider(Provider("na2d_fused", "dynconv na2d (fused)", ("na2d",), _na2d_fused))
register_provider(Provider("na2d_unfused", "dynconv na2d_qk + softmax + na2d_av", ("na2d",), _na2d_unfused))
register_provider(Provider("na2d_gather", "PyTorch window gather", ("na2d",), _na2d_gather))
register_provider(Provider("natten", "NATTEN (fused)", ("na2d",), _natten))
SPEEDUP_BASELINE["na2d"] = "na2d_gather"
CHECK_REFERENCE["na2d"] = "na2d_unfused"  # the K² scores, not the K²·D gather: the smallest exact one
HEADLINE["na2d"] = "na2d_fused"
