"""Where one warp's global loads and stores land: a tiny PTX simulator for the static model.

The sector efficiency of a load depends on how the compiler laid the tile over the warp's lanes
and on the tensor's strides, neither of which the SASS shows. So ``simulate`` runs the integer
part of a kernel's PTX for the 32 lanes of warp 0 of one program (in lockstep, as the hardware
would for triton's uniform control flow), with the launch's real scalar arguments and a distinct
base address per pointer, and records for every global access the bytes its active lanes ask
for and the 32-byte sectors they touch. Floating-point values, loaded data and shared memory are
not modelled (they read as zero): addresses in these kernels come from integer arithmetic on
program ids, thread ids and arguments. A gather whose addresses come from loaded data (DRConv's
pixel permutation) therefore reads as a broadcast of pixel 0: its efficiency is not meaningful.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

LANES = 32
POINTER_SPACING = 1 << 40  # distinct, 2^40-aligned base address per pointer argument
MAX_STEPS = 200_000

_INSTRUCTION = re.compile(r"^(?:(@!?%[\w]+)\s+)?([a-z][\w.:]*)\s*(.*?);?\s*$")
_LABEL = re.compile(r"^(\$?[\w$]+):\s*$")
_SPECIAL = {"%tid.x", "%tid.y", "%tid.z", "%ctaid.x", "%ctaid.y", "%ctaid.z", "%nctaid.x", "%nctaid.y",
            "%nctaid.z", "%laneid", "%ntid.x", "%ntid.y", "%ntid.z"}


@dataclass
class Access:
    text: str  # the PTX instruction
    width: int  # bytes per lane
    store: bool
    instances: int = 0
    useful_bytes: int = 0  # distinct bytes the active lanes ask for
    sector_bytes: int = 0  # distinct 32-byte sectors touched x 32
    ideal_bytes: int = 0  # what the coalesced count assumes: max(32, 32 lanes x width) per instance

    @property
    def efficiency(self) -> float:
        return self.useful_bytes / self.sector_bytes if self.sector_bytes else 1.0


@dataclass
class Result:
    accesses: dict[int, Access] = field(default_factory=dict)
    steps: int = 0
    complete: bool = False  # ran to the end (False: stopped after MAX_STEPS)

    def totals(self) -> tuple[int, int, int]:
        useful = sum(a.useful_bytes for a in self.accesses.values())
        sectors = sum(a.sector_bytes for a in self.accesses.values())
        ideal = sum(a.ideal_bytes for a in self.accesses.values())
        return useful, sectors, ideal


def _split_operands(text: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return out


def _parse(ptx: str, kernel: str | None = None):
    """(instructions, labels, param names) of the entry function's body."""
    params = re.findall(r"\.param\s+\.\w+(?:\s+\.ptr\s+\.\w+\s+\.align\s+\d+)?\s+(\w+)", ptx)
    body = ptx[ptx.index(".entry"):]
    body = body[body.index("{", body.index(")")) + 1:]
    instructions, labels = [], {}
    for raw in body.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line or line.startswith(".") or line in ("{", "}"):
            continue
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _INSTRUCTION.match(line)
        if match:
            predicate, opcode, operands = match.groups()
            instructions.append((predicate, opcode, _split_operands(operands), line))
    return instructions, labels, params


def _bits(opcode: str) -> int:
    for part in reversed(opcode.split(".")):
        if part[:1] in "subf" and part[1:].isdigit():
            return int(part[1:])
    return 32


def _signed(opcode: str) -> bool:
    return any(p.startswith("s") and p[1:].isdigit() for p in opcode.split(".")[1:])


def _wrap(values: np.ndarray, bits: int) -> np.ndarray:
    if bits >= 64:
        return values.astype(np.int64)
    mask = (1 << bits) - 1
    v = values.astype(np.int64) & mask
    return np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)


def _wrap_int(value: int) -> int:
    """A 64-bit immediate such as 0xFFFFFFFFFFFFFFFF as the signed value numpy can hold."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(values: np.ndarray, bits: int) -> np.ndarray:
    return values.astype(np.int64) & ((1 << bits) - 1) if bits < 64 else values.astype(np.int64)


_COMPARE = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
            "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal}


class _Warp:
    def __init__(self, params: dict[str, int], special: dict[str, np.ndarray]):
        self.regs: dict[str, np.ndarray] = {}
        self.params = params
        self.special = special

    def value(self, operand: str) -> np.ndarray:
        operand = operand.strip()
        if operand in self.regs:
            return self.regs[operand]
        if operand in self.special:
            return self.special[operand]
        if operand.startswith("%"):
            return np.zeros(LANES, dtype=np.int64)
        if re.fullmatch(r"-?0[xX][0-9a-fA-F]+", operand):
            return np.full(LANES, _wrap_int(int(operand, 16)), dtype=np.int64)
        if re.fullmatch(r"-?\d+", operand):
            return np.full(LANES, int(operand), dtype=np.int64)
        return np.zeros(LANES, dtype=np.int64)  # float immediates and anything else: not an address

    def address(self, operand: str) -> np.ndarray:
        inner = operand.strip()[1:-1].replace(" ", "")
        match = re.fullmatch(r"([%\w$.]+)(?:\+(-?\w+))?", inner)
        if not match:
            return np.zeros(LANES, dtype=np.int64)
        base, offset = match.groups()
        start = (np.full(LANES, self.params.get(base, 0), dtype=np.int64) if base in self.params
                 else self.value(base))
        return start + (int(offset, 0) if offset else 0)


def simulate(ptx: str, args: list[int], program: tuple[int, int, int], grid: tuple[int, int, int],
             num_warps: int, max_steps: int = MAX_STEPS) -> Result:
    """Run warp 0 of ``program``. ``args`` are the values of the PTX parameters in order (pointers
    as base addresses); missing trailing parameters (triton's scratch pointers) read as zero."""
    instructions, labels, names = _parse(ptx)
    params = {name: (args[i] if i < len(args) else 0) for i, name in enumerate(names)}
    lane = np.arange(LANES, dtype=np.int64)
    special = {"%tid.x": lane, "%tid.y": lane * 0, "%tid.z": lane * 0, "%laneid": lane,
               "%ntid.x": lane * 0 + num_warps * LANES, "%ntid.y": lane * 0 + 1, "%ntid.z": lane * 0 + 1}
    for axis, (p, g) in zip("xyz", zip(program, grid)):
        special[f"%ctaid.{axis}"] = lane * 0 + p
        special[f"%nctaid.{axis}"] = lane * 0 + g
    warp = _Warp(params, special)
    result = Result()
    pc = 0
    while pc < len(instructions):
        if result.steps >= max_steps:
            return result
        result.steps += 1
        predicate, opcode, ops, text = instructions[pc]
        active = np.ones(LANES, dtype=bool)
        if predicate:
            active = warp.value(predicate.lstrip("@!")).astype(bool)
            if predicate.startswith("@!"):
                active = ~active
        pc += 1
        head = opcode.split(".")[0]
        if head == "bra":
            # triton's branches are uniform; a divergent one follows lane 0.
            if active[0]:
                pc = labels[ops[0]]
            continue
        if head in ("ret", "exit", "trap"):
            result.complete = True
            return result
        if not active.any():
            continue
        _step(warp, head, opcode, ops, active, pc - 1, text, result)
    result.complete = True
    return result


def _set(warp: _Warp, name: str, values: np.ndarray, active: np.ndarray) -> None:
    if not name.startswith("%"):
        return
    old = warp.regs.get(name)
    warp.regs[name] = values if old is None else np.where(active, values, old)


def _access(result: Result, index: int, text: str, width: int, store: bool, addresses: np.ndarray,
            active: np.ndarray) -> None:
    access = result.accesses.setdefault(index, Access(text, width, store))
    access.instances += 1
    # Distinct bytes: lanes reading one address (a broadcast) ask for it once.
    starts = np.unique(addresses[active])
    touched = np.unique((starts[:, None] + np.arange(width)[None, :]).ravel())
    access.useful_bytes += int(touched.size)
    sectors = np.unique(touched // 32)
    access.sector_bytes += 32 * len(sectors)
    access.ideal_bytes += max(32, LANES * width)


def _memory_width(opcode: str) -> int:
    parts = opcode.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    return vector * _bits(opcode) // 8


def _step(warp: _Warp, head: str, opcode: str, ops: list[str], active: np.ndarray, index: int, text: str,
          result: Result) -> None:
    bits = _bits(opcode)
    v = warp.value
    if head in ("ld", "st", "atom", "red") and ".global" in opcode:
        store = head != "ld"
        address = ops[0] if store and head == "st" else ops[1] if head != "red" else ops[0]
        _access(result, index, text, _memory_width(opcode), store, warp.address(address), active)
        if head == "ld" or head == "atom":
            for name in ops[0].strip("{} ").split(","):
                _set(warp, name.strip(), np.zeros(LANES, dtype=np.int64), active)
        return
    if head == "cp" and ".global" in opcode:
        width = int(ops[2], 0) if len(ops) > 2 else 16
        # A copy whose source size is 0 reads nothing (it zero-fills): the masked halo, and the
        # copies a pipelined loop issues for the trips past its end.
        reading = active & (v(ops[3]) != 0) if len(ops) > 3 else active
        _access(result, index, text, width, False, warp.address(ops[1]), reading)
        return
    if head == "ld" and ".param" in opcode:
        _set(warp, ops[0], np.full(LANES, warp.params.get(ops[1].strip("[] "), 0), dtype=np.int64), active)
        return
    if not ops or not ops[0].startswith("%"):
        return
    dest = ops[0]
    src = ops[1:]
    out = None
    if head == "mov" and len(src) == 1 and not src[0].startswith("{"):
        out = v(src[0])
    elif head in ("add", "sub", "mul", "mad", "div", "rem", "min", "max", "and", "or", "xor", "shl", "shr") and \
            ".f" not in opcode[len(head):] and not opcode.endswith(("f32", "f16", "bf16", "f64")):
        a = v(src[0])
        b = v(src[1]) if len(src) > 1 else None
        signed = _signed(opcode)
        if not signed and head in ("div", "rem", "min", "max", "shr", "mul"):
            a, b = _unsigned(a, bits), _unsigned(b, bits)
        if head == "add":
            out = a + b
        elif head == "sub":
            out = a - b
        elif head in ("mul", "mad"):
            out = a * b
            if ".hi" in opcode:
                out = out >> bits
            if head == "mad":
                out = out + v(src[2])
            if ".wide" in opcode:
                bits = 2 * bits
        elif head == "div":
            out = np.where(b != 0, np.trunc(a / np.where(b == 0, 1, b)), 0).astype(np.int64)
        elif head == "rem":
            out = np.where(b != 0, np.fmod(a, np.where(b == 0, 1, b)), 0).astype(np.int64)
        elif head == "min":
            out = np.minimum(a, b)
        elif head == "max":
            out = np.maximum(a, b)
        elif head == "and":
            out = a & b
        elif head == "or":
            out = a | b
        elif head == "xor":
            out = a ^ b
        elif head == "shl":
            out = a << np.minimum(b, 63)
        elif head == "shr":
            out = a >> np.minimum(b, 63)
        if ".pred" in opcode:
            out = out.astype(bool).astype(np.int64)
            bits = 64
        out = _wrap(out, bits)
    elif head in ("not", "neg", "abs") and ".f" not in opcode:
        a = v(src[0])
        out = {"not": lambda: ~a, "neg": lambda: -a, "abs": lambda: np.abs(a)}[head]()
        if ".pred" in opcode:
            out = (a == 0).astype(np.int64)
        else:
            out = _wrap(out, bits)
    elif head == "selp":
        out = np.where(v(src[2]).astype(bool), v(src[0]), v(src[1]))
    elif head == "setp":
        parts = opcode.split(".")
        kind = parts[1]
        a, b = v(src[0]), v(src[1])
        if parts[-1].startswith(("u", "b")):
            a, b = _unsigned(a, bits), _unsigned(b, bits)
        if kind in _COMPARE and not parts[-1].startswith("f"):
            out = _COMPARE[kind](a, b).astype(np.int64)
        else:
            out = np.zeros(LANES, dtype=np.int64)
        if len(src) > 2:  # setp.cmp.and/or.type p, a, b, c
            c = v(src[2].lstrip("!"))
            c = (c == 0) if src[2].startswith("!") else c.astype(bool)
            out = (out.astype(bool) & c if ".and" in opcode else out.astype(bool) | c).astype(np.int64)
        dest = dest.split("|")[0]
    elif head == "cvt" and not any(p.startswith(("f", "rn", "rz", "rm", "rp")) for p in opcode.split(".")[1:]):
        parts = opcode.split(".")
        to_bits, from_bits = _bits(".".join(parts[:2])), _bits(".".join([parts[0], parts[-1]]))
        a = v(src[0])
        a = _wrap(a, from_bits) if parts[-1].startswith("s") else _unsigned(a, from_bits)
        out = _wrap(a, to_bits) if parts[1].startswith("s") or to_bits < from_bits else a
    elif head == "bfe":
        a, pos, length = v(src[0]), v(src[1]), v(src[2])
        a = _wrap(a, bits) if _signed(opcode) else _unsigned(a, bits)
        field_ = (a >> pos) & ((1 << length) - 1)
        if _signed(opcode):
            sign = (field_ >> np.maximum(length - 1, 0)) & 1
            field_ = np.where((length > 0) & (sign == 1), field_ - (1 << length), field_)
        out = field_
    elif head == "shfl":
        a, b = v(src[0]), v(src[1])
        mode = opcode.split(".")[2]
        lane = np.arange(LANES)
        source = {"idx": b, "bfly": lane ^ b, "up": lane - b, "down": lane + b}.get(mode, lane)
        source = np.where((source >= 0) & (source < LANES), source, lane) & (LANES - 1)
        out = a[source.astype(np.int64)]
    elif head == "redux":
        a = v(src[0])[active]
        kind = opcode.split(".")[2]
        reduced = {"max": np.max, "min": np.min, "add": np.sum, "and": np.bitwise_and.reduce,
                   "or": np.bitwise_or.reduce, "xor": np.bitwise_xor.reduce}[kind](a) if a.size else 0
        out = np.full(LANES, reduced, dtype=np.int64)
    else:
        out = np.zeros(LANES, dtype=np.int64)  # floats, shared loads, matrix ops: not addresses
    _set(warp, dest, out.astype(np.int64), active)
