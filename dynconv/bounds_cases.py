"""The launches ``dynconv inspect --bounds`` models: every kernel at the reference shapes, with
each kernel's own minimum bytes and useful FLOPs.

Issue 12's family-1 rows (R1–R4 fwd/dx/dw, the stride-2 R1 dx), issue 13's expert-conv, DRConv
and fused-layer rows and issue 15's neighbourhood-attention rows (N1, N2, with and without rpb), fp32 and bf16, NCHW and channels_last. Launches are built on meta tensors by
the kernel modules' own launch builders, so they are exactly what the ops launch by default.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .roofline import DTYPE_BYTES, REFERENCE_SHAPES, Problem, minimum_bytes, minimum_flops, mixing_flops, tensor_elements


@dataclass(frozen=True)
class Case:
    case: str  # reference shape name (X1 and C256 are issue 13's extra shapes)
    kernel: str  # fwd, dx, dw, guide, dz, dspan
    dtype: str
    layout: str
    build: Callable  # () -> kernels._launch.Launch on meta tensors
    min_bytes: int  # the kernel's own minimum: its inputs read once, its outputs written once
    flops: int  # useful FLOPs (2 per multiply-add)
    # Useful FLOPs per compute ceiling: "fma" (CUDA cores) or a tensor-core rate of the model
    # ("gmma16", "gmmatf32"); kernels using both get both, and the slower pipe is the floor.
    compute: dict
    # () -> [(Launch, its minimum bytes)]: launches run before the kernel, whose output it reads: layout
    # copies (NCHW inputs copied to channels_last), DRConv's column product; the model adds their time.
    copies: Callable | None = None
    # Bytes the kernel moves through a workspace: reads back what such a launch wrote (DRConv's
    # columns), or writes for a step after it (the kernel gradient's fp32 per-sample partials, which
    # the mixing GEMMs read); on its HBM pipe (no L2 residency assumed), not in the pass's minimum.
    workspace_bytes: int = 0

    @property
    def name(self) -> str:
        return f"{self.case} {self.kernel} {self.dtype} {self.layout}"


# Issue 13's extra shapes: the 3x3 256-channel layer, and E1 at stride 2 for the strided dx.
EXTRA_SHAPES = {
    "C256": Problem("expert_conv2d", B=32, C=256, H=56, W=56, K=3, Cout=256, E=4, bias=True),
    "X1": replace(REFERENCE_SHAPES["E1"], stride=2),
    "R1s2": replace(REFERENCE_SHAPES["R1"], stride=2),
}


def _problem(name: str) -> Problem:
    return EXTRA_SHAPES.get(name) or REFERENCE_SHAPES[name]


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _empty(shape, dtype, channels_last=False):
    import torch

    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.to(memory_format=torch.channels_last) if channels_last and len(shape) == 4 else t


def _layout_copy(t, nb: int) -> tuple:
    """The launch copying meta tensor ``t`` to channels_last (kernels/layout.py), and its minimum
    bytes: ``t`` read once and written once, ``nb`` bytes an element."""
    from .kernels.layout import channels_last_empty, copy_launch

    return copy_launch(t, channels_last_empty(t, "meta")), 2 * t.numel() * nb


def _family1_cases(name: str, dtype: str, layout: str, kernels=("fwd", "dx", "dw")) -> list[Case]:
    from .kernels import involution as inv
    from .kernels import involution_weight_grad as weight_grad
    from .kernels.layout import channels_last_empty

    p = _problem(name)
    Ho, Wo = p.out_hw
    dt, cl, nb = _torch_dtype(dtype), layout == "NHWC", DTYPE_BYTES[dtype]
    per_pixel = p.op == "involution"
    geometry = ((p.stride, p.stride), (p.padding, p.padding), (p.dilation, p.dilation))
    sizes = tensor_elements(p)
    contraction = 2 * p.B * p.C * Ho * Wo * p.K * p.K
    wshape = (p.B, p.G, p.K, p.K, Ho, Wo) if per_pixel else (p.B, p.G, p.K, p.K)

    def tensors():
        x = _empty((p.B, p.C, p.H, p.W), dt, cl)
        y = _empty((p.B, p.C, Ho, Wo), dt, cl)
        return x, y, _empty(wshape, dt)

    def fwd():
        x, y, w = tensors()
        bias = _empty((p.B, p.C), dt) if p.bias else None
        return inv.forward_launch(x, w, bias, y, *geometry)

    def dx():
        x, y, w = tensors()
        return inv.backward_input_launch(y, w, x, *geometry)

    # The weight gradient's channels_last copies of NCHW dy and x, where it makes them.
    x0, y0, w0 = tensors()
    dw_copies = weight_grad.weight_grad_copies(y0, x0, w0, geometry[0])

    def dw():
        import torch

        x, y, w = tensors()
        if dw_copies:
            x, y = channels_last_empty(x, "meta"), channels_last_empty(y, "meta")
        if not per_pixel:
            cfg = weight_grad.weight_grad_config(x, p.G, p.K, (p.stride, p.stride), Ho, Wo, per_pixel=False)
            w = _empty(weight_grad.weight_grad_partials(p.B, p.G, p.K, Ho, Wo, cfg), torch.float32)
        return weight_grad.backward_weight_launch(y, x, w, *geometry, per_pixel)

    def copied():
        x, y, _ = tensors()
        return [_layout_copy(t, nb) for t in (y, x)]

    bias = sizes.get("bias", 0)
    table = {
        "fwd": (fwd, (sizes["x"] + sizes["weight"] + bias + sizes["y"]) * nb, contraction + (bias and p.B * p.C * Ho * Wo)),
        "dx": (dx, (sizes["y"] + sizes["weight"] + sizes["x"]) * nb, contraction),
        "dw": (dw, (sizes["y"] + sizes["x"] + sizes["weight"]) * nb, contraction),
    }
    copies = {"dw": copied} if dw_copies else {}
    return [Case(name, k, dtype, layout, table[k][0], table[k][1], table[k][2], {"fma": table[k][2]},
                 copies.get(k)) for k in kernels]


def _then(before: Callable | None, after: Callable) -> Callable:
    """A case's ``copies``: the launches of ``before`` (if any), then those of ``after``."""
    return lambda: (before() if before else []) + after()


def _expert_cases(name: str, dtype: str, layout: str, kernels=("fwd", "dx", "dw")) -> list[Case]:
    import torch

    from .kernels import expert_conv as ec
    from .kernels import expert_conv_rows as ecr
    from .kernels import expert_conv_guide as ecg
    from .kernels import expert_conv_input_grad as eci
    from .kernels import expert_conv_weight_grad as ecw
    from .kernels import region_conv as rc
    from .kernels import region_conv_input_grad as rcg
    from .kernels.region_tables import meta_region_tables, region_tables_launch

    p = _problem(name)
    Ho, Wo = p.out_hw
    dt, cl, nb = _torch_dtype(dtype), layout == "NHWC", DTYPE_BYTES[dtype]
    geometry = ((p.stride, p.stride), (p.padding, p.padding), (p.dilation, p.dilation))
    sizes = tensor_elements(p)
    N = Ho * Wo
    conv = 2 * p.B * p.Cout * (p.C // p.groups) * p.K * p.K * N
    guided = p.op == "drconv"
    # tf32 follows torch's switch in the launcher (on by default for convs), bf16/fp16 run as themselves.
    tensor_cores = "gmmatf32" if dtype == "fp32" else "gmma16"

    def tensors():
        x = _empty((p.B, p.C, p.H, p.W), dt, cl)
        y = _empty((p.B, p.Cout, Ho, Wo), dt, cl)
        experts = _empty((p.E, p.Cout, p.C // p.groups, p.K, p.K), dt)
        routing = _empty((p.B, p.m, p.E), dt)
        return x, y, experts, routing

    def regions(n=p.B):
        return meta_region_tables(n, N, p.m)

    def regions_built(n):  # the launch before the forward's region kernel that builds its tables, and its bytes
        guide = _empty((n, p.m, Ho, Wo), dt, cl)
        return [(region_tables_launch(guide, regions(n)), n * N * (p.m * nb + 8) + n * 2 * p.m * 4)]

    # A batch the op materialises in parts runs as equal launches: the cases model the first, with
    # their bytes and FLOPs scaled to its share of the batch (``part``).
    experts_like, routing_like = _empty((p.E, p.Cout, p.C // p.groups, p.K, p.K), dt), _empty((p.B, p.m, p.E), dt)
    parts = ec.batch_parts(experts_like, routing_like, N, None)
    samples, materialised = parts[0]
    part_size = len(range(p.B)[samples])
    part = part_size / p.B

    def source(experts, routing, innermost=ec.CIN_INNERMOST):
        return ec.weight_source(experts, routing[samples], materialised, innermost)

    # The input gradient's parts count dx's pixels (eci.input_grad_pixels).
    dx_samples, dx_materialised = ec.batch_parts(experts_like, routing_like, p.H * p.W, None)[0]
    dx_part = len(range(p.B)[dx_samples]) / p.B

    x0, y0, experts0, _ = tensors()
    region_fwd = guided and rc.supported(x0, experts0, y0, p.m)
    rc_part = rc.batch_part(p.B, p.m, experts0[0].numel(), nb) if guided else p.B

    def fwd():
        x, y, experts, routing = tensors()
        if region_fwd:  # DRConv: the first part of the batch, its mixed kernels materialised
            cfg = rc.forward_config(x, experts, p.m, p.groups, *geometry)
            if fwd_copies:
                x = ec.channels_last_stand_in(x)
            weight = _empty((rc_part, p.m, p.Cout, p.K, p.K, p.C // p.groups), dt).movedim(-1, 3)
            bias = _empty((rc_part, p.m, p.Cout), dt) if p.bias else None
            return rc.forward_launch(x[:rc_part], weight, bias, regions(rc_part), y[:rc_part],
                                     p.groups, *geometry, cfg)
        bias = _empty((p.B, p.m, p.Cout), dt)[samples] if p.bias else None
        if fwd_in_rows:  # NCHW read in place (expert_conv_rows)
            weight = source(experts, routing)
            return ecr.forward_launch(x[samples], weight.weight, ec._rows_strides(weight), bias, y[samples],
                                      (p.K, p.K), p.groups, *geometry[1:])
        if fwd_copies:
            x = ec.channels_last_stand_in(x)
        cfg = ec.forward_config(x, experts, p.m, p.groups, *geometry)
        tables = regions(part_size) if guided else None
        return ec.forward_launch(x[samples], source(experts, routing), None, bias, tables, y[samples], (p.K, p.K),
                                 p.groups, *geometry, cfg)

    def copied(t, whole=False):  # the channels_last copy a launch reads (of the first part of t), and its bytes
        return [_layout_copy(t if whole else t[samples], nb)]

    region_dx = guided and rc.backward_input_supported(y0, x0, p.m)
    # DRConv's input gradient by columns (a product launch, then the fold the case models).
    columns = region_dx and rcg.uses_columns(y0, x0, (p.K, p.K), p.groups)
    col_part = rcg.columns_part(y0, x0, experts0, p.m) if columns else rc_part
    col_bytes = col_part * rcg.sample_column_bytes(y0, x0, (p.K, p.K))
    fwd_copies = (rc.forward_copies_input(x0) if region_fwd
                  else ec.forward_copies_input(x0, experts0, p.m, p.groups, *geometry))
    fwd_in_rows = not region_fwd and ec.forward_in_rows(x0, experts0, p.m, p.groups, *geometry)
    dx_in_rows = not region_dx and eci.input_grad_in_rows(y0, x0, experts0, p.m, p.groups, *geometry)
    dx_copies = (not cl) if region_dx else eci.input_grad_copies_output_grad(y0, x0, experts0, p.m, p.groups,
                                                                             *geometry)

    def dx():
        x, y, experts, routing = tensors()
        if columns:  # the fold of the first part's columns
            return rcg.fold_launch(columns_workspace(), x[:col_part], (p.K, p.K), p.groups, *geometry,
                                   rcg.fold_config(p.C // p.groups))
        cfg = eci.input_grad_config(x, experts, p.m, p.groups, (p.stride, p.stride))
        if region_dx:  # DRConv: the first part of the batch, reading its materialised region kernels
            if dx_copies:  # and dy's channels_last copy
                y = ec.channels_last_stand_in(y)
            weight = _empty((rc_part, p.m, p.C // p.groups, p.K, p.K, p.Cout), dt).movedim(-1, 2)  # Cout innermost
            return eci.backward_input_launch(y[:rc_part], rc.materialised_source(weight), None,
                                             _empty((rc_part, N), torch.int32), x[:rc_part], (p.K, p.K), p.groups,
                                             *geometry, p.m, cfg)
        if dx_in_rows:  # NCHW dy read in place (expert_conv_rows)
            weight = ec.weight_source(experts, routing[dx_samples], dx_materialised, ec.COUT_INNERMOST)
            return ecr.input_grad_launch(y[dx_samples], weight.weight, ec._rows_strides(weight), x[dx_samples],
                                         (p.K, p.K), p.groups, *geometry[1:])
        region = _empty((p.B, N), torch.int32)[dx_samples] if guided else None
        if dx_copies:
            cfg = eci.input_grad_config(ec.channels_last_stand_in(x), experts, p.m, p.groups, (p.stride, p.stride))
            y = ec.channels_last_stand_in(y)
        weight = ec.weight_source(experts, routing[dx_samples], dx_materialised, ec.COUT_INNERMOST)
        return eci.backward_input_launch(y[dx_samples], weight, None, region, x[dx_samples], (p.K, p.K), p.groups,
                                         *geometry, p.m, cfg)

    def columns_workspace():
        return rcg.columns_empty(col_part, p.C, (p.K, p.K), Ho, Wo, dt, "meta")

    def column_product():  # the launch before the fold, with its bytes: dy's part in, the columns out
        y = ec.channels_last_stand_in(tensors()[1])[:col_part]
        weight = _empty((col_part, p.m, rcg.column_count((p.K, p.K), p.C), p.Cout // p.groups, 1, 1), dt)
        cfg = rcg.default_columns_config(dt)
        launch = rcg.columns_launch(y, weight, regions(col_part), columns_workspace(), p.groups, cfg)
        return [(launch, col_part * p.Cout * N * nb + col_bytes)]

    def dw():
        x, y, experts, routing = tensors()
        # A backward running both passes hands the kernel gradient the input gradient's copy of dy.
        if ecw.backward_shares_output_grad(y, x, experts, routing, p.groups, *geometry):
            y = ec.channels_last_stand_in(y)
        return ecw.default_launch(y, x, experts, p.m, p.groups, geometry)

    def guide():
        x, y, experts, routing = tensors()
        if ecg.uses_expert_bank(experts, routing):  # one launch for the batch: E plain convs' scores
            if bank_copies:
                x = ec.channels_last_stand_in(x)
            cfg = ecg.bank_config(x, experts, p.groups, *geometry)
            bias = _empty((p.E, p.Cout), dt).expand(p.B, p.E, p.Cout) if p.bias else None
            score = _empty((p.B, p.E, ecg.score_tiles(p.Cout, p.groups, cfg), N), torch.float32)
            return ecg.guide_score_launch(x, ecg.expert_bank_source(experts), None, bias, y, score, (p.K, p.K),
                                          p.groups, *geometry, cfg)
        cfg = ec.forward_config(x, experts, p.m, p.groups, *geometry)
        bias = _empty((p.B, p.m, p.Cout), dt)[samples] if p.bias else None
        score = _empty((p.B, p.m, ecg.score_tiles(p.Cout, p.groups, cfg), N), torch.float32)[samples]
        return ecg.guide_score_launch(x[samples], source(experts, routing), None, bias, y[samples], score,
                                      (p.K, p.K), p.groups, *geometry, cfg)

    weights = sizes["experts"] + sizes["routing"]
    extra = sizes.get("guide", 0)
    bias = sizes.get("bias", 0)
    # A forward on materialised kernels leaves the mixing (routing @ experts) to a matmul before it:
    # its useful FLOPs are the conv's; mixed on the fly, the kernel does the mixing too.
    own_mixing = not (region_fwd or materialised)
    table = {
        "fwd": (fwd, minimum_bytes(p, "forward", dtype), minimum_flops(p, "forward") - (0 if own_mixing else mixing_flops(p))),
        "dx": (dx, (sizes["y"] + weights + extra + sizes["x"]) * nb, conv),
        # dy and x in, the gradients the op returns out (experts, routing, bias: its reductions).
        "dw": (dw, (sizes["y"] + sizes["x"] + extra + weights + bias) * nb, conv),
        # ∂S needs every region's output at every pixel (roofline.py's drconv backward term).
        "guide": (guide, (sizes["x"] + weights + bias + sizes["y"] + 2 * extra) * nb,
                  p.m * conv + 2 * p.B * p.m * p.Cout * N),
    }
    bank = guided and ecg.uses_expert_bank(_empty((p.E, 1, 1, 1, 1), dt), _empty((p.B, p.m, p.E), dt))
    share = {"fwd": rc_part / p.B if region_fwd else part, "dx": col_part / p.B if region_dx else dx_part,
             "guide": 1.0 if bank else part, "dw": 1.0}
    # The forward's bias adds run on the CUDA cores, the rest on the tensor cores.
    cuda_cores = {"fwd": p.B * p.Cout * N if p.bias else 0}

    def compute(k: str) -> dict:
        fma = round(cuda_cores.get(k, 0) * share[k])
        return {tensor_cores: round(table[k][2] * share[k]) - fma, **({"fma": fma} if fma else {})}

    dw_copies = ecw.weight_grad_copies_inputs(y0, x0, p.m, p.groups, (p.stride, p.stride))
    bank_copies = ecg.bank_copies_input(x0, experts0, p.groups, *geometry)
    # The region forward copies the whole x once; its case models the copy of the part it reads.
    copies = {"fwd": (lambda: copied(tensors()[0][:rc_part] if region_fwd else tensors()[0], region_fwd))
              if fwd_copies else None,
              "dx": (lambda: (copied(tensors()[1][:col_part] if region_dx else tensors()[1][dx_samples], True)
                              if dx_copies else []) + (column_product() if columns else []))
              if dx_copies or columns else None,
              # x's: dy's copy, where there is one, is the input gradient's (a backward running both
              # makes one, ops' _grads); without one a 16-bit kernel gradient reads a flat NCHW dy in place.
              "dw": (lambda: copied(tensors()[0], True)) if dw_copies else None}
    if guided and p.m > 1:
        # The region tables the forward builds first (the backward reads the forward's), and the bias
        # gradient's own launch beside the kernel gradient (dy in, the (B, m, Cout) sums out).
        copies["fwd"] = _then(copies.get("fwd"), lambda: regions_built(rc_part if region_fwd else part_size))
        copies["dw"] = _then(copies.get("dw"), lambda: [(ecw.default_bias_launch(
            ec.channels_last_stand_in(tensors()[1]) if dw_copies else tensors()[1], p.m),
            sizes["y"] * nb + p.B * p.m * p.Cout * 4)])
    if bank and bank_copies:  # the expert-bank guide scores read x's copy (the whole batch: one launch)
        copies["guide"] = lambda: copied(tensors()[0], True)
    workspace = {"dx": col_bytes if columns else 0}  # the fold reads the columns back
    if "dw" in kernels:  # the kernel gradient's fp32 per-(sample, region) partials it writes
        partials = dw().args["dw_ptr"]
        workspace["dw"] = partials.numel() * partials.element_size()
    return [Case(name, k, dtype, layout, table[k][0], round(table[k][1] * share[k]), round(table[k][2] * share[k]),
                 compute(k), copies.get(k), workspace.get(k, 0))
            for k in kernels]


def _fused_cases(name: str, dtype: str, layout: str, kernels=("fwd", "dx", "dz", "dspan")) -> list[Case]:
    import torch

    from .kernels import involution_fused as fu
    from .kernels.layout import channels_last_empty

    p = _problem(name)
    Ho, Wo = p.out_hw
    dt, cl, nb = _torch_dtype(dtype), layout == "NHWC", DTYPE_BYTES[dtype]
    geometry = ((p.stride, p.stride), (p.padding, p.padding), (p.dilation, p.dilation))
    sizes = tensor_elements(p)
    N = Ho * Wo
    T = p.K * p.K * p.G
    aggregation = 2 * p.B * p.C * N * p.K * p.K
    span = 2 * p.B * N * p.R * T
    tensor_cores = "gmmatf32" if dtype == "fp32" else "gmma16"

    def tensors():
        x = _empty((p.B, p.C, p.H, p.W), dt, cl)
        y = _empty((p.B, p.C, Ho, Wo), dt, cl)
        z = _empty((p.B, p.R, Ho, Wo), dt, cl)
        return x, y, z, _empty((T, p.R), dt), _empty((T,), dt)

    x0, _, _, sw0, _ = tensors()
    fwd_copies = fu.forward_copies_input(x0, sw0, p.R, p.K, geometry[0], geometry[2])
    span_copies = fu.span_grad_copies_inputs(x0, p.G, p.R, p.K, geometry[0], geometry[2])

    def fwd():
        x, y, z, sw, sb = tensors()
        if fwd_copies:  # the forward reads x's channels_last copy
            x = channels_last_empty(x, "meta")
        return fu.forward_launch(x, z, sw, sb, y, p.K, *geometry)

    def dx():
        x, y, z, sw, sb = tensors()
        return fu.backward_input_launch(y, z, sw, sb, x, p.K, *geometry)

    def dz():
        x, y, z, sw, _ = tensors()
        return fu.backward_z_launch(y, x, sw, z, p.K, *geometry)

    def dspan():
        x, y, z, _, _ = tensors()
        if span_copies:  # dspan reads x's and z's channels_last copies
            x, z = channels_last_empty(x, "meta"), channels_last_empty(z, "meta")
        cfg = fu.span_grad_config(x, p.G, p.K, p.R, (p.stride, p.stride), Ho, Wo)
        slabs, _ = fu.span_grad_slabs(p.B, Ho, Wo, p.K, p.G, p.R, cfg)
        return fu.backward_span_launch(y, x, z, _empty((slabs, T, p.R), torch.float32),
                                       _empty((slabs, T), torch.float32), p.K, *geometry)

    weights = sizes["span_weight"] + sizes.get("span_bias", 0)
    table = {
        "fwd": (fwd, minimum_bytes(p, "forward", dtype)),
        "dx": (dx, (sizes["y"] + sizes["z"] + weights + sizes["x"]) * nb),
        "dz": (dz, (sizes["y"] + sizes["x"] + sizes["span_weight"] + sizes["z"]) * nb),
        "dspan": (dspan, (sizes["y"] + sizes["x"] + sizes["z"] + weights) * nb),
    }
    # The aggregation runs on CUDA cores, the span product on tensor cores.
    copies = {"fwd": lambda: [_layout_copy(tensors()[0], nb)]} if fwd_copies else {}
    if span_copies:
        copies["dspan"] = lambda: [_layout_copy(tensors()[0], nb), _layout_copy(tensors()[2], nb)]
    return [Case(name, k, dtype, layout, table[k][0], table[k][1], aggregation + span,
                 {"fma": aggregation, tensor_cores: span}, copies.get(k)) for k in kernels]


def _na2d_cases(name: str, dtype: str, layout: str = "BHWND", kernels=("fwd", "dq", "dkv")) -> list[Case]:
    """Issue 15's fused neighbourhood attention: the forward and the two backward kernels (dq with the
    rpb gradient's terms: ds per (query, tap) from the tiled kernel, written once, or the CUDA-core
    kernel's partials; dk and dv from the inverse neighbourhood), inputs heads last ("BHWND") or
    heads first ("BNHWD"). FLOPs are roofline.py's minimum
    (4·K²·D per query and head forward, 8·K²·D backward) split as dq + dp in the dq kernel and dv + dk
    in the key kernel: the recomputed scores (both) and dp (key kernel) are not counted."""
    import torch

    from .kernels import na2d as na

    p = _problem(name)
    dt, nb = _torch_dtype(dtype), DTYPE_BYTES[dtype]
    sizes = tensor_elements(p)
    qkv, rpb = sizes["q"], sizes.get("rpb", 0)
    stats = p.B * p.H * p.W * p.G * 4  # the fp32 log-sum-exp (and delta) per query and head
    geometry = (p.K, (p.dilation, p.dilation), p.D ** -0.5, True)
    half = minimum_flops(p, "forward")  # 4·K²·D per query and head: the forward, and each backward half

    def tensors():
        """Inputs (q, k, v, dy) in ``layout`` (heads first: views of (B, heads, H, W, D) storage, as
        ``heads_first=True`` passes them), outputs and the statistics heads last as the op makes them."""
        out = _empty((p.B, p.H, p.W, p.G, p.D), dt)
        q = _empty((p.B, p.G, p.H, p.W, p.D), dt).permute(0, 2, 3, 1, 4) if layout == "BNHWD" else out
        bias = _empty((p.G, 2 * p.K - 1, 2 * p.K - 1), dt) if p.bias else None
        return q, out, bias, _empty((p.B, p.H, p.W, p.G), torch.float32)

    def fwd():
        q, out, bias, lse = tensors()
        return na.forward_launch(q, q, q, bias, out, lse, *geometry)

    # With rpb, the tiled dq kernel (16-bit) stores ds per (query, tap) in q's dtype; the CUDA-core one
    # (fp32) one fp32 (R, R) partial per program.
    dq_tiled = na.query_kernel_is_tiled(_empty((1, 1, 1, 1, p.D), dt), geometry[2])
    rpb_terms = p.B * p.H * p.W * p.G * p.K * p.K * nb if dq_tiled else rpb * 4

    def dq():
        q, out, bias, lse = tensors()
        terms = None
        if p.bias and dq_tiled:
            terms = _empty((*na.window_ds_shape(q), p.K, p.K), dt)
        elif p.bias:
            terms = _empty(na.rpb_partial_shape(q, p.K, geometry[1]), torch.float32)
        return na.backward_query_launch(q, q, q, bias, q, lse, lse, out, terms, *geometry)

    def dkv():
        q, out, bias, lse = tensors()
        return na.backward_key_launch(q, q, q, bias, q, lse, lse, out, out, *geometry)

    table = {
        "fwd": (fwd, 4 * qkv * nb + rpb * nb + stats),
        "dq": (dq, 5 * qkv * nb + rpb * nb + 2 * stats + (rpb_terms if p.bias else 0)),
        "dkv": (dkv, 6 * qkv * nb + rpb * nb + 2 * stats),
    }
    ceiling = "gmma16" if dtype != "fp32" else "gmmatf32"
    return [Case(name, k, dtype, layout, table[k][0], table[k][1], half,
                 {ceiling if na.uses_tensor_cores(k, dt, p.D, p.bias) else "fma": half}) for k in kernels]


def all_cases() -> list[Case]:
    """Issue 12's family-1 rows and issue 13's expert-conv and fused rows, fp32 and bf16, both layouts."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for layout in ("NCHW", "NHWC"):
            for name in ("R1", "R2", "R3", "R4"):
                cases += _family1_cases(name, dtype, layout)
            cases += _family1_cases("R1s2", dtype, layout, ("dx",))
            for name in ("C256", "E1", "E2"):
                cases += _expert_cases(name, dtype, layout)
            cases += _expert_cases("X1", dtype, layout, ("dx",))
            cases += _expert_cases("D1", dtype, layout, ("fwd", "dx", "dw", "guide"))
            cases += _fused_cases("R1-layer", dtype, layout)
        for name in ("N1", "N2", "N1-rpb", "N2-rpb"):
            cases += _na2d_cases(name, dtype)
        for name in ("N1", "N2"):
            cases += _na2d_cases(name, dtype, "BNHWD")
    return cases


def selected_cases(case_filters=(), kernel_filter: str = "") -> list[Case]:
    """The cases whose name ('shape kernel dtype layout') contains any of ``case_filters`` (all when
    none), of the comma-separated ``kernel_filter`` kernels (all when empty)."""
    filters = [case_filters] if isinstance(case_filters, str) else list(case_filters)
    filters = [f for f in filters if f] or [""]
    kernels = set(kernel_filter.split(",")) if kernel_filter else None
    return [c for c in all_cases()
            if any(f in c.name for f in filters) and (kernels is None or c.kernel in kernels)]
