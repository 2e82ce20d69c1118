"""Autotuning space of the family-1 kernels (``kernels/involution.py``, ``involution_weight_grad.py``;
contract in ``kernels/configs.py``).

Sweep shapes are RedNet-50's involutions (K = 7, 16 channels per group) and DWNet-T's dynamic
depth-wise convs (K = 7, G = C) at training batch size; candidates are the neighbourhood of the
launcher's default tile.
"""
from __future__ import annotations

import torch

from . import dynamic_dwconv as dwconv
from ._launch import Launch
from .configs import KernelSpace, Problem, neighbourhood, register_spaces
from . import involution_nchw as nchw
from .involution import backward_input_launch, forward_default, forward_launch, input_grad_default, problem_key
from .involution_weight_grad import (backward_weight_launch, weight_grad_config, weight_grad_copies,
                                     weight_grad_default, weight_grad_partials)

# (label, C, H = W, stride): RedNet-50's involutions (K = 7, 16 channels per group) and DWNet-T's
# dynamic depth-wise convs (K = 7, G = C), at training batch size.
_REDNET = [("RedNet-50 stage 1", 64, 56, 1), ("RedNet-50 stage 2", 128, 28, 1), ("RedNet-50 stage 3", 256, 14, 1),
           ("RedNet-50 stage 4", 512, 7, 1), ("RedNet-50 stage 2 stride 2", 128, 56, 2)]
_DWNET = [("DWNet-T stage 1", 96, 56, 1), ("DWNet-T stage 2", 192, 28, 1), ("DWNet-T stage 3", 384, 14, 1),
          ("DWNet-T stage 4", 768, 7, 1)]
# involution_* tune the per-pixel weights' kernels, dwconv_* the per-sample ones (kernels/dynamic_dwconv.py).
_TUNED_KERNELS = ("involution_fwd", "involution_bwd_input", "involution_bwd_weight", "dwconv_fwd", "dwconv_bwd_input",
                  "dwconv_bwd_weight")


def _tuning_problems(kernel: str, quick: bool) -> list:
    rednet, dwnet = (_REDNET[1:2], _DWNET[1:2]) if quick else (_REDNET, _DWNET)
    shapes = []
    if kernel.startswith("involution"):  # per-pixel weights
        shapes += [(f"{label} involution", "involution", C, C // 16, H, s, True) for label, C, H, s in rednet]
        shapes += [(f"{label} inhomogeneous", "dwconv", C, C, H, s, True) for label, C, H, s in dwnet]
    else:  # per-sample weights
        shapes += [(f"{label} homogeneous", "dwconv", C, C, H, s, False) for label, C, H, s in dwnet]
    # NCHW per-pixel calls take the kernels of involution_nchw.py (tuned below), not these.
    return [Problem(f"{label} {'NHWC' if cl else 'NCHW'}", op,
                    dict(B=32, C=C, G=G, H=H, W=H, K=7, stride=s, per_pixel=pp, bias=not pp, channels_last=cl))
            for label, op, C, G, H, s, pp in shapes for cl in (False, True) if cl or not pp]


# Table keys hold both stride components (a (1, 2) layer must not take a (1, 1) layer's tiles).
_EXACT = ("K", "stride_h", "stride_w", "channels_last", "dtype_bytes")


def _strides(spec: dict) -> tuple[int, int]:
    # The sweep's layers give one stride; a spec rebuilt from a key keeps both components.
    s = spec["stride"]
    return (s, s) if isinstance(s, int) else tuple(s)


def _out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # "same" padding (K - 1) // 2, odd K


def _tuning_inputs(spec: dict, dtype, device) -> dict:
    B, C, G, H, W, K = (spec[n] for n in ("B", "C", "G", "H", "W", "K"))
    sh, sw = _strides(spec)
    Ho, Wo = _out(H, sh), _out(W, sw)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format

    def t(*shape, fmt=torch.contiguous_format):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).normal_()

    w = t(B, G, K, K, Ho, Wo) if spec["per_pixel"] else t(B, G, K, K)
    return dict(x=t(B, C, H, W, fmt=fmt), w=w, bias=t(B, C) if spec["bias"] else None,
                y=t(B, C, Ho, Wo, fmt=fmt), dy=t(B, C, Ho, Wo, fmt=fmt), dx=t(B, C, H, W, fmt=fmt))


def _tuning_launch(kernel: str):
    def launch(spec: dict, ts: dict, config: dict) -> Launch:
        stride, p = _strides(spec), (spec["K"] - 1) // 2
        geometry = (stride, (p, p), (1, 1))
        if kernel in ("involution_fwd", "dwconv_fwd"):
            return forward_launch(ts["x"], ts["w"], ts["bias"], ts["y"], *geometry, config)
        if kernel in ("involution_bwd_input", "dwconv_bwd_input"):
            return backward_input_launch(ts["dy"], ts["w"], ts["dx"], *geometry, config)
        if kernel == "involution_bwd_weight":
            dw = ts.setdefault("dw", torch.empty_like(ts["w"]))
            return backward_weight_launch(ts["dy"], ts["x"], dw, *geometry, True, config)
        B, G, K = ts["w"].shape[:3]
        Ho, Wo = ts["dy"].shape[2], ts["dy"].shape[3]
        config = config or weight_grad_config(ts["x"], G, K, stride, Ho, Wo, per_pixel=False)
        shape = weight_grad_partials(B, G, K, Ho, Wo, config)
        partials = ts.setdefault(("partials", shape), torch.empty(shape, dtype=torch.float32, device=ts["x"].device))
        return backward_weight_launch(ts["dy"], ts["x"], partials, *geometry, False, config)
    return launch


def _tuning_key(spec: dict, ts: dict) -> dict:
    return problem_key(ts["x"], spec["G"], spec["K"], _strides(spec))


def _default_for(kernel: str, spec: dict, ts: dict) -> dict:
    """The launcher's default tile for ``kernel`` on tensors ``ts``."""
    if kernel in ("dwconv_fwd", "dwconv_bwd_input"):
        stride, K = _strides(spec), spec["K"]
        if kernel == "dwconv_fwd":
            return dwconv.forward_default(ts["x"], K, stride, (1, 1), ts["y"].shape[2], ts["y"].shape[3])
        return dwconv.input_grad_default(ts["dx"], K, stride, (1, 1))
    if kernel == "involution_fwd":
        return forward_default(ts["x"], ts["w"], ts["y"].shape[2], ts["y"].shape[3])
    if kernel == "involution_bwd_input":
        return input_grad_default(ts["dx"], ts["w"], _strides(spec))
    return weight_grad_default(spec["C"], spec["G"], spec["K"], ts["y"].shape[2], ts["y"].shape[3],
                               bool(spec["channels_last"]), kernel == "involution_bwd_weight", spec["B"], _strides(spec),
                               dtype_bytes=ts["x"].element_size())


def _tuning_default(kernel: str):
    def default(spec: dict, ts: dict) -> dict:
        return _default_for(kernel, spec, ts)
    return default


def _tuning_candidates(kernel: str):
    def candidates(key: dict, quick: bool) -> list[dict]:
        sh, sw = key["stride_h"], key["stride_w"]
        h, w = (key["H"], key["W"]) if kernel == "involution_bwd_input" else (_out(key["H"], sh), _out(key["W"], sw))
        spec, dtype = _tuning_spec_for_key(kernel)(key)
        default = _default_for(kernel, spec, _tuning_inputs(spec, dtype, "meta"))
        limits = {"BLOCK_G": key["G"], "BLOCK_CG": key["C"] // key["G"], "BLOCK_H": h, "BLOCK_W": w}
        if "P" in default:
            # dynamic_dwconv's tiles: one output block per lane, so the lanes are the threads.
            limits.update(BLOCK_C=key["C"])
            # The row walk has no row lanes (BLOCK_H unused); FLAT lanes no channel axis (BLOCK_C 1).
            vary = (["BLOCK_W"] if default.get("FLAT") else ["BLOCK_C", "BLOCK_W"]) if default["RUN"] else None
            return neighbourhood(default, limits, elements_per_thread=(1, 1), size=6 if quick else 10,
                                 vary=vary, warps=(1, 2, 4, 8), stages=(1,))
        # The weight-gradient kernels with RUN size their registers for the default's elements per thread.
        per_thread = (2, 64)
        if "RUN" in default:
            tile = default["BLOCK_G"] * default.get("BLOCK_H", 1) * default["BLOCK_W"]
            per_thread = (tile / (32 * default["num_warps"]),) * 2
        # No tl.dot here, so software pipelining only overlaps the tap loop's loads: worth a look, not a grid.
        return neighbourhood(default, limits, elements_per_thread=per_thread, size=6 if quick else 10,
                             warps=(1, 2, 4, 8), stages=(1,) if quick else (1, 2))
    return candidates


def _tuning_spec_for_key(kernel: str):
    def spec_for_key(key: dict):
        per_pixel = not kernel.startswith("dwconv")
        spec = dict(B=key["B"], C=key["C"], G=key["G"], H=key["H"], W=key["W"], K=key["K"],
                    stride=(key["stride_h"], key["stride_w"]), per_pixel=per_pixel, bias=False,
                    channels_last=bool(key["channels_last"]))
        return spec, {2: torch.float16, 4: torch.float32, 8: torch.float64}[key["dtype_bytes"]]
    return spec_for_key


# The NCHW per-pixel kernels (kernels/involution_nchw.py): tuned under their own names, on NCHW only.
# The key holds the element width, not the 16-bit format, and bf16 at even widths runs the pair
# kernels (two pixels a lane: the sums fill the registers at fewer channels or rows): those have
# their own tables, timed in bfloat16, and the single-pixel kernels are timed in float16 whatever the
# sweep's 16-bit dtype.
_NCHW_KERNELS = {"involution_nchw_fwd": "involution_fwd", "involution_nchw_fwd_pairs": "involution_fwd",
                 "involution_nchw_bwd_input": "involution_bwd_input",
                 "involution_nchw_bwd_input_pairs": "involution_bwd_input",
                 "involution_nchw_bwd_weight": "involution_bwd_weight",
                 "involution_nchw_bwd_weight_pairs": "involution_bwd_weight"}
_NCHW_KIND = {"involution_nchw_fwd": "fwd", "involution_nchw_fwd_pairs": "fwd", "involution_nchw_bwd_input": "dx",
              "involution_nchw_bwd_input_pairs": "dx", "involution_nchw_bwd_weight": "dw",
              "involution_nchw_bwd_weight_pairs": "dw"}
_NCHW_PAIRS = ("involution_nchw_fwd_pairs", "involution_nchw_bwd_input_pairs", "involution_nchw_bwd_weight_pairs")


def _nchw_problems(kernel: str):
    def problems(quick: bool) -> list:
        rednet, dwnet = (_REDNET[1:2], _DWNET[1:2]) if quick else (_REDNET, _DWNET)
        shapes = [(f"{label} involution", "involution", C, C // 16, H, s) for label, C, H, s in rednet]
        shapes += [(f"{label} inhomogeneous", "dwconv", C, C, H, s) for label, C, H, s in dwnet]
        out = [Problem(f"{label} NCHW", op, dict(B=32, C=C, G=G, H=H, W=H, K=7, stride=s, per_pixel=True,
                                                 bias=False, channels_last=False))
               for label, op, C, G, H, s in shapes]
        if kernel in _NCHW_PAIRS:  # only the shapes the launcher gives a pair kernel
            kind = _NCHW_KIND[kernel]
            out = [p for p in out if _runs_pair_kernel(kind, p.spec)]
        return out
    return problems


def _runs_pair_kernel(kind: str, spec: dict) -> bool:
    """Whether ops run a pair kernel on this problem in bf16: the launcher's rule (_nchw_pairs), and
    for the weight gradient no channels_last copies at its entry point (weight_grad_copies), on
    which the channels_last kernel runs instead."""
    ts = _tuning_inputs(spec, torch.bfloat16, "meta")
    if not _nchw_pairs(kind, spec, ts):
        return False
    return kind != "dw" or not weight_grad_copies(ts["y"], ts["x"], ts["w"], _strides(spec))


def _nchw_pairs(kind: str, spec: dict, ts: dict) -> bool:
    """Whether the launcher runs a pair kernel on these inputs (its own rule, asked of the tensors)."""
    if kind == "fwd":
        return nchw.fwd_pairs(ts["x"], ts["w"], ts["y"])
    if kind == "dx":
        p = (spec["K"] - 1) // 2  # _tuning_launch's padding
        return nchw.dx_pairs(ts["dy"], ts["w"], ts["dx"], _strides(spec), (p, p), (1, 1))
    return kind == "dw" and nchw.dw_pairs(ts["x"], ts["y"], spec["C"] // spec["G"], spec["K"], _strides(spec))


def _nchw_dtype(kernel: str, dtype):
    """The dtype a kernel is timed in: float16 for any 16-bit request (bf16 would run a pair
    kernel); the pair kernels run on bf16 only, so they are timed in bf16 whatever was asked (the sweep
    drops the repeated keys)."""
    if kernel in _NCHW_PAIRS:
        return torch.bfloat16
    return torch.float16 if dtype.itemsize == 2 else dtype


def _nchw_inputs(kernel: str):
    def inputs(spec: dict, dtype, device) -> dict:
        return _tuning_inputs(spec, _nchw_dtype(kernel, dtype), device)
    return inputs


def _nchw_spec_for_key(kernel: str):
    def spec_for_key(key: dict):
        spec, dtype = _tuning_spec_for_key(_NCHW_KERNELS[kernel])(key)
        return spec, _nchw_dtype(kernel, dtype)
    return spec_for_key


def _nchw_default(kernel: str):
    def default(spec: dict, ts: dict) -> dict:
        kind = _NCHW_KIND[kernel]
        rows = -(-ts["dx"].shape[2] // _strides(spec)[0]) if kind == "dx" else ts["y"].shape[2]
        # The launcher's own default: bf16 at even widths runs a pair kernel, whose sums fill the
        # registers sooner (and so bound the candidates).
        return nchw.nchw_config(spec["C"] // spec["G"], spec["K"], rows, ts["x"].element_size(), kind,
                                _nchw_pairs(kind, spec, ts))
    return default


def _nchw_candidates(kernel: str):
    def candidates(key: dict, quick: bool) -> list[dict]:
        spec, dtype = _nchw_spec_for_key(kernel)(key)
        default = _nchw_default(kernel)(spec, _tuning_inputs(spec, dtype, "meta"))
        CG = key["C"] // key["G"]
        chunks = [d for d in (1, 2, 3, 4, 6, 8, 12, 16) if CG % d == 0]
        out = [default]
        # Per-thread sums (CH x STRIP, or K x STRIP in dw; the dw pairs also hold 2 x CH x STRIP
        # gradients) kept near the default's: past it they spill.
        def load(ch: int, strip: int) -> int:
            if kernel == "involution_nchw_bwd_weight_pairs":
                return strip * (key["K"] + ch)
            return strip if "weight" in kernel else ch * strip
        budget = load(default["CH"], default["STRIP"])
        for ch in chunks:
            for strip in (2, 4, 6, 8):
                for warps in ((4,) if quick else (2, 4, 8)):
                    config = {"CH": ch, "STRIP": strip, "BLOCK_W": 32 * warps, "num_warps": warps, "num_stages": 1}
                    if load(ch, strip) <= budget and config not in out:
                        out.append(config)
        return out[:6 if quick else 16]
    return candidates


def autotune_space() -> dict:
    """What ``dynconv autotune`` sweeps for this module's kernels (see kernels/configs.py)."""
    spaces = {name: KernelSpace(
        problems=lambda quick, name=name: _tuning_problems(name, quick), inputs=_tuning_inputs, launch=_tuning_launch(name),
        key=_tuning_key, default=_tuning_default(name), candidates=_tuning_candidates(name),
        spec_for_key=_tuning_spec_for_key(name), exact=_EXACT,
        # the channels_last tap kernels take strips of any length (involution._strip splits BLOCK_H)
        free_blocks=("BLOCK_H",) if name in ("involution_fwd", "involution_bwd_input") else ())
        for name in _TUNED_KERNELS}
    for name, generic in _NCHW_KERNELS.items():
        spaces[name] = KernelSpace(
            problems=_nchw_problems(name), inputs=_nchw_inputs(name), launch=_tuning_launch(generic), key=_tuning_key,
            default=_nchw_default(name), candidates=_nchw_candidates(name),
            spec_for_key=_nchw_spec_for_key(name), exact=_EXACT)
    return spaces


register_spaces(autotune_space)
