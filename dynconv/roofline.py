"""The minimum-work model behind every throughput number in ``perf_reports/`` (docs/operators.md §3).

Pure arithmetic on shapes: no torch, no GPU, so the model is testable anywhere and the plotter
can use it on any machine.

**Bytes** are the fewest a pass can move through device memory: every input tensor read once and
every output tensor written once, all in the op's dtype. Intermediates (the unfold patch tensor,
a materialised mixed kernel, an activation saved for backward) are not counted: they are what a
provider chooses to move, not what the op must. A pass's tensors are:

=================  ==================================  ==============================================
op                 forward reads → writes              backward reads → writes
=================  ==================================  ==============================================
involution         x, weight → y                       dy, x, weight → dx, dweight
dynamic_dwconv2d   x, weight, bias → y                 dy, x, weight → dx, dweight, dbias
expert_conv2d      x, experts, routing, bias → y       dy, x, experts, routing, bias
                                                         → dx, dexperts, drouting, dbias
drconv             x, experts, routing, guide, bias    dy, x, experts, routing, guide, bias
                     → y                                 → dx, dexperts, drouting, dguide, dbias
involution_layer   x, z, span_weight, span_bias → y    dy, x, z, span_weight, span_bias
                                                         → dx, dz, dspan_weight, dspan_bias
=================  ==================================  ==============================================

``forward+backward`` is one unit of work: the union of both passes' inputs (read once) and
outputs (written once), so x and the weights are not counted twice and ``y`` is written but
``dy`` is still read (it comes from outside). Backward of ``expert_conv2d``/``drconv`` reads
``bias`` because ``drouting`` has a term ``Σ_o ∂bias_mixed[b,o] · bias[e,o]``.

``involution_layer`` is Involution2d from the reduced feature ``z`` ``(B, R, Ho, Wo)`` (R = C/r)
onwards: the span conv (1×1, R → K²·G, ``span_weight`` ``(K²G, R)`` and ``span_bias``) generates the
per-pixel weights, then the involution aggregates. The weights are an intermediate, so its minimum
is what the fused kernel (``dynconv.involution_fused``) moves; every provider of the layer (the
unfused ones write and read the weights) is measured against it. Its backward reads ``span_bias``
because ∂x needs the generated weights, bias included.

**FLOPs**: 2 per multiply-add of every contraction, 1 per plain addition (a bias add, the spatial
sum that gives ∂bias). Nonlinear elementwise maps (the softmax and argmax over DRConv's guide,
the softmax Jacobian in ∂guide) are not counted. With ``P = Cout·(Cin/groups)·kh·kw``,
``N = Ho·Wo`` and ``conv = 2·B·P·N`` (one conv, i.e. one kernel per output pixel):

* involution / dynamic_dwconv2d: forward ``2·B·C·N·K²`` (+ ``B·C·N`` bias adds); backward
  ``∂x`` and ``∂weight`` are one such contraction each: ``4·B·C·N·K²`` (+ ``B·C·N`` for ∂bias).
* involution_layer (``T = K²·G`` span rows): forward ``2·B·N·R·T`` (span GEMM) + ``B·N·T`` (its
  bias adds) + ``2·B·C·N·K²`` (aggregation). Backward: ∂x and ∂w (the weights' gradient, on-chip)
  are one aggregation each, ∂z = Sᵀ·∂w and ∂S = Σ ∂w·zᵀ one span GEMM each, ∂β = Σ ∂w the
  ``B·N·T`` additions: ``2×`` the forward. This is the minimum: the span GEMM a backward re-runs
  to regenerate w for ∂x (the fused kernel does, the unfused path keeps w) and the fused kernel's
  second ∂w (one in the ∂z kernel, one in the ∂S kernel) are recompute, not counted.
* expert_conv2d (CondConv, DynamicConv; routing ``(B, E)``): forward ``conv + mix`` with
  ``mix = 2·B·E·P`` (one mixed kernel per sample) + ``2·B·E·Cout`` (mixed bias) + ``B·Cout·N``
  (bias add). Backward: ``∂x`` and ``∂W`` are one conv each; ``∂experts = Σ_b routing·∂W`` and
  ``∂routing = Σ_p ∂W·experts`` are one mix each; likewise for the bias; plus the ∂bias sum.
  A backward that re-mixes W instead of keeping it does one more mix: not in the minimum.
* drconv (routing ``(B, m, E)``, guide ``(B, m, Ho, Wo)``): the forward is ONE conv per pixel
  (each pixel uses its region's kernel) + ``m`` mixes. The straight-through backward needs
  ``∂S[b,r,i,j] = Σ_o ∂y·y_r`` for every region r at every pixel: ``m`` convs' worth
  (``m·conv``) plus the reduction over o (``2·B·m·Cout·N``) and the bias inside ``y_r``
  (``B·m·Cout·N``); ``∂x`` and ``∂W`` stay one conv each (each pixel feeds one region's ∂W).

``na2d`` (neighbourhood attention, issue 15) reuses the fields: ``G`` heads, ``C = heads·D``,
``bias`` for the relative positional bias ``rpb`` ``(heads, 2K-1, 2K-1)``. Forward reads q, k, v
(and rpb), writes y; backward reads dy, q, k, v (and rpb), writes dq, dk, dv (and drpb). The
scores, the softmax and the log-sum-exp are intermediates. FLOPs: ``4·K²·D`` per query per head
forward (q·k and p·v), twice that backward (dp = dy·v, dv, dq, dk); the softmax, the rpb adds
and the recomputed scores of a flash-style backward are not counted.

The same model serves every provider of an op (the static cuDNN conv included): ``gbps`` and
``tflops`` in ``results.csv`` are the op's minimum divided by the provider's time, so within one
shape they rank exactly as the times do, and against the ceilings they say how far a provider is
from what the hardware could do for this op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

OPS = ("involution", "dynamic_dwconv2d", "expert_conv2d", "drconv", "involution_layer", "na2d")
FAMILY = {"involution": 1, "dynamic_dwconv2d": 1, "expert_conv2d": 2, "drconv": 2, "involution_layer": 1, "na2d": 1}
PASSES = ("forward", "backward", "forward+backward")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Problem:
    """One op at one shape. Family 1 uses C (channels) and G (weight groups), and
    ``involution_layer`` R (the reduced channels, the span conv's input) with ``bias`` for the span
    conv's bias; family 2 uses C as Cin, Cout, E experts, m regions (1 without guide) and
    ``groups`` of the conv."""

    op: str
    B: int
    C: int
    H: int
    W: int
    K: int
    G: int = 1
    Cout: int = 0
    E: int = 0
    m: int = 1
    groups: int = 1
    stride: int = 1
    dilation: int = 1
    bias: bool = False
    # How the module normalises routing logits (CondConv: sigmoid). The op takes routing as given,
    # so this only shapes the benchmark's inputs, not the model.
    routing: str = "softmax"
    R: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.op == "involution_layer" and self.R < 1:
            raise ValueError(f"involution_layer needs the reduced channels R >= 1, got {self.R}")
        if self.op == "na2d" and self.C % self.G:
            raise ValueError(f"na2d needs C = heads·D: C={self.C} is not a multiple of G={self.G} heads")

    @property
    def D(self) -> int:
        """na2d's head dimension."""
        return self.C // self.G

    @property
    def padding(self) -> int:
        """'same' padding for stride 1 and odd K, as docs/operators.md's default."""
        return self.dilation * (self.K - 1) // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        def size(n):
            return (n + 2 * self.padding - self.dilation * (self.K - 1) - 1) // self.stride + 1
        return size(self.H), size(self.W)

    def with_size(self, hw: int) -> "Problem":
        return replace(self, H=hw, W=hw)


# The reference shapes of issue 5, by the names the csv uses.
REFERENCE_SHAPES: dict[str, Problem] = {
    "R1": Problem("involution", B=32, C=256, H=56, W=56, K=7, G=16),
    "R2": Problem("involution", B=64, C=512, H=28, W=28, K=7, G=32),
    "R3": Problem("involution", B=32, C=128, H=56, W=56, K=7, G=128),  # inhomogeneous depth-wise
    "R4": Problem("dynamic_dwconv2d", B=64, C=256, H=56, W=56, K=7, G=256, bias=True),  # homogeneous
    "E1": Problem("expert_conv2d", B=64, C=256, H=28, W=28, K=3, Cout=256, E=4, bias=True,
                  routing="sigmoid"),  # CondConv
    "E2": Problem("expert_conv2d", B=128, C=128, H=56, W=56, K=3, Cout=128, E=4, bias=True),  # DynamicConv
    "D1": Problem("drconv", B=32, C=128, H=28, W=28, K=3, Cout=128, E=8, m=8, bias=True),  # DRConv
    # R1 as a whole Involution2d from the reduced feature on: span conv (R = C/4) + aggregation.
    "R1-layer": Problem("involution_layer", B=32, C=256, H=56, W=56, K=7, G=16, R=64, bias=True),
    # Issue 15's neighbourhood attention: a NAT-tiny stage (4 heads of 32) and a large K13 one
    # (8 heads of 64), without and with relative positional bias.
    "N1": Problem("na2d", B=8, C=128, H=56, W=56, K=7, G=4),
    "N2": Problem("na2d", B=2, C=512, H=128, W=128, K=13, G=8),
    "N1-rpb": Problem("na2d", B=8, C=128, H=56, W=56, K=7, G=4, bias=True),
    "N2-rpb": Problem("na2d", B=2, C=512, H=128, W=128, K=13, G=8, bias=True),
}

# The size sweep: one reference shape per op, its spatial size varied (H = W), the rest fixed.
SWEEPS: dict[str, tuple[int, ...]] = {
    "R1": (14, 28, 56, 112),
    "R4": (14, 28, 56, 112),
    "E1": (7, 14, 28, 56),
    "D1": (14, 28, 56),
    "R1-layer": (14, 28, 56, 112),
}

_SHAPE_NAME = re.compile(r"^(?P<base>[A-Z][0-9]+(?:-[a-z]+)?)(?:@H(?P<hw>[0-9]+))?$")


def sweep_shape_names() -> list[str]:
    """The sweep's extra shape names (the reference size itself is the plain name)."""
    names = []
    for base, sizes in SWEEPS.items():
        names += [shape_name(base, hw) for hw in sizes]
    return [n for n in names if n not in REFERENCE_SHAPES]


def shape_name(base: str, hw: int) -> str:
    """``R1`` at its own size, ``R1@H112`` for R1 with H = W = 112."""
    return base if REFERENCE_SHAPES[base].H == hw else f"{base}@H{hw}"


def split_shape_name(name: str) -> tuple[str, int]:
    """``"R1@H112"`` → ``("R1", 112)``; ``"R1"`` → ``("R1", 56)``."""
    match = _SHAPE_NAME.match(name)
    if not match or match["base"] not in REFERENCE_SHAPES:
        raise ValueError(f"unknown shape {name!r}: expected a reference name ({', '.join(REFERENCE_SHAPES)})"
                         " optionally followed by @H<size>")
    base = match["base"]
    return base, int(match["hw"]) if match["hw"] else REFERENCE_SHAPES[base].H


def resolve_shape(name: str) -> Problem:
    base, hw = split_shape_name(name)
    return REFERENCE_SHAPES[base].with_size(hw)


# ---------------------------------------------------------------------------------------------
# Tensor sizes (elements) and the two numbers
# ---------------------------------------------------------------------------------------------

def tensor_elements(p: Problem) -> dict[str, int]:
    """Element count of every tensor an op's forward or backward touches (gradients have the
    size of their tensor)."""
    Ho, Wo = p.out_hw
    if p.op == "na2d":
        qkv = p.B * p.H * p.W * p.C
        sizes = {"q": qkv, "k": qkv, "v": qkv, "y": qkv}
        if p.bias:
            sizes["rpb"] = p.G * (2 * p.K - 1) ** 2
        return sizes
    if p.op == "involution_layer":
        taps = p.K * p.K * p.G
        sizes = {"x": p.B * p.C * p.H * p.W, "z": p.B * p.R * Ho * Wo, "span_weight": taps * p.R,
                 "y": p.B * p.C * Ho * Wo}
        if p.bias:
            sizes["span_bias"] = taps
        return sizes
    if FAMILY[p.op] == 1:
        weight = p.B * p.G * p.K * p.K * (Ho * Wo if p.op == "involution" else 1)
        sizes = {"x": p.B * p.C * p.H * p.W, "weight": weight, "y": p.B * p.C * Ho * Wo}
        if p.bias:
            sizes["bias"] = p.B * p.C
        return sizes
    sizes = {
        "x": p.B * p.C * p.H * p.W,
        "experts": p.E * p.Cout * (p.C // p.groups) * p.K * p.K,
        "routing": p.B * p.m * p.E,
        "y": p.B * p.Cout * Ho * Wo,
    }
    if p.op == "drconv":
        sizes["guide"] = p.B * p.m * Ho * Wo
    if p.bias:
        sizes["bias"] = p.E * p.Cout
    return sizes


def pass_tensors(p: Problem, pass_: str) -> tuple[list[str], list[str]]:
    """(tensors read, tensors written) of a pass; ``d<name>`` is the gradient of ``<name>``."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    inputs = [name for name in tensor_elements(p) if name != "y"]
    # Per-sample dwconv's backward needs no bias (∂bias is a sum of dy); family 2 reads it for ∂routing.
    backward_reads = ["dy"] + [n for n in inputs if not (n == "bias" and FAMILY[p.op] == 1)]
    grads = ["d" + n for n in inputs]
    if pass_ == "forward":
        return inputs, ["y"]
    if pass_ == "backward":
        return backward_reads, grads
    return ["dy"] + inputs, ["y"] + grads


def minimum_bytes(p: Problem, pass_: str, dtype: str) -> int:
    """Each input read once plus each output written once, in bytes (module docstring)."""
    sizes = tensor_elements(p)
    reads, writes = pass_tensors(p, pass_)

    def elements(name):
        # "dy" is the size of y, "dweight" of weight; no tensor's own name starts with "d".
        return sizes[name[1:] if name.startswith("d") else name]

    return DTYPE_BYTES[dtype] * sum(elements(n) for n in reads + writes)


def mixing_flops(p: Problem) -> int:
    """The expert layers' routing @ experts: each sample's m kernels (and biases) mixed from E."""
    P = p.Cout * (p.C // p.groups) * p.K * p.K
    return 2 * p.B * p.m * p.E * P + (2 * p.B * p.m * p.E * p.Cout if p.bias else 0)


def minimum_flops(p: Problem, pass_: str) -> int:
    """2 per multiply-add, 1 per plain addition (module docstring)."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    Ho, Wo = p.out_hw
    N = Ho * Wo
    if p.op == "na2d":
        forward = 4 * p.B * N * p.C * p.K * p.K  # 4·K²·D per query and head
        backward = 2 * forward
    elif p.op == "involution_layer":
        taps = p.K * p.K * p.G
        aggregation = 2 * p.B * p.C * N * p.K * p.K
        span = 2 * p.B * N * p.R * taps
        bias_adds = p.B * N * taps if p.bias else 0
        forward = span + bias_adds + aggregation
        backward = 2 * aggregation + 2 * span + bias_adds  # ∂x, ∂w; ∂z, ∂S; ∂β sums ∂w (no recompute)
    elif FAMILY[p.op] == 1:
        contraction = 2 * p.B * p.C * N * p.K * p.K
        bias_adds = p.B * p.C * N if p.bias else 0
        forward = contraction + bias_adds
        backward = 2 * contraction + bias_adds  # ∂x, ∂weight; ∂bias sums dy over space
    else:
        P = p.Cout * (p.C // p.groups) * p.K * p.K
        conv = 2 * p.B * P * N
        mix = mixing_flops(p)
        bias_adds = p.B * p.Cout * N if p.bias else 0
        forward = conv + mix + bias_adds
        backward = 2 * conv + 2 * mix + bias_adds
        if p.op == "drconv":
            # ∂S needs every region's output y_r at every pixel, contracted with dy over Cout.
            backward += p.m * conv + 2 * p.B * p.m * p.Cout * N + (p.B * p.m * p.Cout * N if p.bias else 0)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def arithmetic_intensity(p: Problem, pass_: str, dtype: str) -> float:
    """FLOPs per byte of the minimum model."""
    return minimum_flops(p, pass_) / minimum_bytes(p, pass_, dtype)


def roof_tflops(intensity: float, hbm_gbps: float, peak_tflops: float) -> float:
    """The roofline: the attainable TFLOP/s at an arithmetic intensity (FLOP/byte)."""
    return min(peak_tflops, intensity * hbm_gbps / 1e3)
