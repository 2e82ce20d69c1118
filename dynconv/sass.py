"""Read Hopper/Ampere SASS as ``cuobjdump -sass`` prints it: instructions, loops, pipes, load widths.

Pure text processing (no GPU, no triton): the static performance model (``dynconv/bounds.py``)
feeds it the dump of a kernel compiled ahead of time and weights what it finds by the loop trip
counts the launcher declares.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Za-z0-9_.]*)(?P<args>[^;]*);")
# The second 64-bit word of a Volta-and-later instruction, printed alone on the next line: its top
# bits are the scheduling controls ptxas chose (stall count, scoreboards set and waited on).
_CONTROL_WORD = re.compile(r"^\s*/\*\s*0x(?P<hex>[0-9a-f]{16})\s*\*/\s*$")
NO_BARRIER = 7
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")

# Pipes of the model. "int" is the integer/logic ALU (compares, selects, shifts, adds, moves), at half
# the warp rate; IMAD and IMUL run on the FMA-heavy half of the fp32 datapath ("imad": they cost two
# of its issue cycles, an FFMA one).
INT_OPS = {
    "IADD3", "IADD", "IADD32I", "IMNMX", "VIMNMX", "VIMNMX3", "VIADD", "VIADDMNMX", "IABS", "ISETP", "LOP3",
    "LOP", "LOP32I", "SHF", "SHL", "SHR", "LEA", "SEL", "PRMT", "SGXT", "BMSK", "BREV", "FLO", "POPC", "ISCADD",
    "MOV", "MOV32I", "PLOP3", "P2R", "R2P", "CS2R", "FSEL", "FSETP", "FMNMX", "HSETP2", "HMNMX2", "BFE", "BFI",
    "ICMP", "IDP", "I2IP",
}
IMAD_OPS = {"IMAD", "IMUL", "IMAD32I", "IMUL32I", "IMADSP", "XMAD"}
FMA_OPS = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2", "FSWZADD",
           "FCHK", "DFMA", "DADD", "DMUL"}
# Multi-function / conversion unit: a quarter of the warp rate.
XU_OPS = {"MUFU", "I2F", "F2I", "F2F", "I2I", "F2FP", "FRND", "I2FP", "F2IP"}
MEMORY_OPS = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "LDL", "STL", "ATOM", "ATOMS",
              "ATOMG", "RED", "REDG", "LDGDEPBAR", "UBLKCP", "UTMALDG", "UTMASTG", "SHFL"}
MMA_OPS = {"HGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "IGMMA", "QGMMA"}


@dataclass(frozen=True)
class Instruction:
    addr: int
    predicate: str  # "" when unpredicated
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    args: str
    # Scheduling controls (``Controls``); a dump without the control words reads as one cycle a
    # step and no scoreboards.
    stall: int = 1  # cycles before the warp's next instruction may issue
    write_barrier: int | None = None  # scoreboard set when a variable-latency result lands
    read_barrier: int | None = None  # scoreboard set when the source registers have been read
    wait_mask: int = 0  # scoreboards (bit per index, 6 of them) that must clear before issue

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def never_runs(self) -> bool:
        """``@!PT`` guards padding that never executes (ptxas's scheduling fillers)."""
        return self.predicate.startswith("@!PT")

    @property
    def branch_target(self) -> int | None:
        if self.base not in ("BRA", "BRX", "JMP") or "`" in self.args:
            return None
        match = _BRANCH_TARGET.search(self.args)
        return int(match.group(1), 16) if match else None


def controls(word: int) -> dict:
    """The scheduling controls in an instruction's high 64-bit word (bits 105-121 of the 128):
    4 bits of stall, a yield bit, 3 bits of write scoreboard, 3 of read scoreboard, 6 of wait mask."""
    write, read = (word >> 46) & 7, (word >> 49) & 7
    return {"stall": (word >> 41) & 0xF, "write_barrier": None if write == NO_BARRIER else write,
            "read_barrier": None if read == NO_BARRIER else read, "wait_mask": (word >> 52) & 0x3F}


def parse(text: str) -> list[Instruction]:
    """The instructions of the (single) function in a ``cuobjdump -sass`` dump, in address order,
    with their scheduling controls where the dump prints the instruction's second word."""
    instructions = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = _LINE.search(line)
        if not match:
            continue
        word = _CONTROL_WORD.match(lines[number + 1]) if number + 1 < len(lines) else None
        instructions.append(Instruction(int(match["addr"], 16), (match["pred"] or "").strip(), match["op"],
                                        match["args"].strip(), **(controls(int(word["hex"], 16)) if word else {})))
    return instructions


def pipe(ins: Instruction) -> str:
    """The model's pipe for one instruction: int, imad, fma, xu, mem, mma, or other (branches, barriers,
    uniform datapath, special registers, constant loads: they only take an issue slot)."""
    base = ins.base
    if base in MMA_OPS:
        return "mma"
    if base in MEMORY_OPS:
        return "mem"
    if base in FMA_OPS:
        return "fma"
    if base in XU_OPS:
        return "xu"
    if base in INT_OPS:
        return "int"
    if base in IMAD_OPS:
        return "imad"
    return "other"


def access_bytes(ins: Instruction) -> int:
    """Bytes one lane moves in a global/shared load or store (its vector width)."""
    for part in ins.opcode.split(".")[1:]:
        if part in ("128", "64", "32"):
            return int(part) // 8
        if part in ("U16", "S16"):
            return 2
        if part in ("U8", "S8"):
            return 1
    return 4


def is_global_load(ins: Instruction) -> bool:
    return ins.base in ("LDG", "LDGSTS") or (ins.base == "LD" and ".E" in ins.opcode)


def is_global_store(ins: Instruction) -> bool:
    return ins.base in ("STG", "REDG", "ATOMG", "RED") or (ins.base == "ST" and ".E" in ins.opcode)


_GMMA_SHAPE = re.compile(r"^[A-Z]+GMMA\.(\d+)x(\d+)x(\d+)")
# mma.sync shapes run their digits together: m is 16 or 8, n always 8, k the rest (HMMA.16816 is
# m16n8k16, HMMA.1688 m16n8k8, DMMA.884 m8n8k4).
_HMMA_SHAPE = re.compile(r"^[A-Z]MMA\.(16|8)(8)(\d+)")


def mma_flops(ins: Instruction) -> int:
    """Floating-point operations of one warp's share of a matrix instruction (0 for others).

    A warpgroup MMA (HGMMA m×n×k) is issued by each of the warpgroup's four warps: a quarter each.
    """
    gmma = _GMMA_SHAPE.match(ins.opcode)
    if gmma:
        m, n, k = (int(v) for v in gmma.groups())
        return 2 * m * n * k // 4
    mma = _HMMA_SHAPE.match(ins.opcode)
    if mma and ins.base in ("HMMA", "IMMA", "DMMA"):
        m, n, k = (int(v) for v in mma.groups())
        return 2 * m * n * k
    return 0


@dataclass
class Loop:
    """Instructions in [start, end] (the backward branch's target and the branch itself)."""

    start: int
    end: int
    children: list["Loop"] = field(default_factory=list)

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


def loops(instructions: list[Instruction]) -> list[Loop]:
    """The loop forest: every backward branch closes a loop; nesting by address containment.

    Top-level loops and each loop's children come in address order, which is the source order of
    the ``for`` statements for the straight-line code triton emits.
    """
    # Only an unconditional EXIT ends the straight-line code: a loop's tail may hold ``@!P EXIT``.
    last_exit = max((ins.addr for ins in instructions if ins.base == "EXIT" and ins.predicate in ("", "@PT")),
                    default=None)

    def returns_from_cold_code(ins: Instruction) -> bool:
        # ptxas places the divergent slow path of a warp reduction (reached by ``BRA.DIV``) after
        # the function's last EXIT; it jumps back into the loop body it left. That jump closes no loop.
        return last_exit is not None and ins.addr > last_exit and ins.branch_target < last_exit

    found = sorted({(ins.branch_target, ins.addr) for ins in instructions
                    # A branch to itself is the end-of-function padding (``BRA`` after the last EXIT).
                    if ins.branch_target is not None and ins.branch_target < ins.addr and not ins.never_runs
                    and not returns_from_cold_code(ins)},
                   key=lambda se: (se[0], -se[1]))
    # Two branches back to one header (a `continue`-like edge) are one loop: keep the widest.
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and merged[-1][0] == start:
            continue
        merged.append((start, end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for start, end in merged:
        loop = Loop(start, end)
        while stack and not stack[-1].contains(start):
            stack.pop()
        if stack:
            if end > stack[-1].end:
                raise ValueError(f"overlapping loops at {start:#x}-{end:#x} and {stack[-1].start:#x}-{stack[-1].end:#x}")
            stack[-1].children.append(loop)
        else:
            roots.append(loop)
        stack.append(loop)
    return roots


def loop_shape(forest: list[Loop]) -> tuple:
    """A loop forest as nested tuples of child shapes, e.g. ``((),)`` for one loop without children."""
    return tuple(loop_shape(loop.children) for loop in forest)


def declared_shape(trips: tuple) -> tuple:
    """The same shape for a launch's declared trip counts (see ``kernels._launch.Launch.loops``)."""
    return tuple(declared_shape(item[1]) if isinstance(item, tuple) else () for item in trips)


def _work(instructions: list[Instruction], loop: Loop) -> int:
    """Memory and arithmetic instructions in a loop: what unrolling copies."""
    return sum(1 for ins in instructions if loop.contains(ins.addr) and pipe(ins) in ("mem", "fma", "mma"))


def _match(instructions: list[Instruction], level: list[Loop], declared: tuple, outer: float,
           spans: list[tuple[int, int, float]], longest: bool = False) -> bool:
    """Pair SASS loops with declared trip counts, outermost first, recording each loop's count.

    A declared loop without inner loops may appear as two: ptxas unrolled it U times and left a
    remainder loop. U is the ratio of their bodies' work; the main loop then runs trips // U
    times and the remainder trips % U (its peeled copies outside any loop count once).
    A list of trip counts declares equally many programs running each (a loop whose bounds differ
    by stride phase, a persistent program's share of the tiles): the loop counts their mean, or with
    ``longest`` their largest (the slowest programs' path).
    """
    sass_index = 0
    for position, item in enumerate(declared):
        count, children = (item, ()) if not isinstance(item, tuple) else item
        classes = count if isinstance(count, list) else [count]
        if longest:
            classes = [max(classes)]
        count = sum(classes) / len(classes)
        if sass_index >= len(level):
            return False
        loop = level[sass_index]
        spare = (len(level) - sass_index) - (len(declared) - position)
        following = level[sass_index + 1] if sass_index + 1 < len(level) else None
        if (not children and spare > 0 and not loop.children and following is not None and not following.children
                and _work(instructions, following)):
            unroll = max(1, round(_work(instructions, loop) / _work(instructions, following)))
            spans.append((loop.start, loop.end, outer * sum(c // unroll for c in classes) / len(classes)))
            spans.append((following.start, following.end, outer * sum(c % unroll for c in classes) / len(classes)))
            sass_index += 2
            continue
        if len(loop.children) and not children or children and not _match(instructions, loop.children, children,
                                                                          outer * count, spans, longest):
            return False
        spans.append((loop.start, loop.end, outer * count))
        sass_index += 1
    return sass_index == len(level)


def execution_counts(instructions: list[Instruction], forest: list[Loop], trips: tuple,
                     longest: bool = False) -> list[float]:
    """How many times each instruction runs per warp: the product of its enclosing loops' trips.

    ``trips`` mirrors ``forest``: an int (or a list of ints, one per class of programs, see ``_match``:
    their mean, or with ``longest`` their largest) per loop without children, ``(trips, children)``
    otherwise (a loop ptxas unrolled into a main and a remainder loop is recognised, see ``_match``).
    Everything outside loops runs once; the trailing padding after the last EXIT never runs.
    """
    spans: list[tuple[int, int, float]] = []
    if not _match(instructions, forest, trips, 1.0, spans, longest):
        raise ValueError(f"the SASS has loops shaped {loop_shape(forest)}, the launch declares {declared_shape(trips)}"
                         f" ({trips}): update the launch's loops")
    last_exit = max((ins.addr for ins in instructions if ins.base == "EXIT"), default=None)
    counts = []
    for ins in instructions:
        if ins.never_runs or ins.base == "NOP" or (last_exit is not None and ins.addr > last_exit and
                                                   not any(s <= ins.addr <= e for s, e, _ in spans)):
            counts.append(0.0)
            continue
        # The innermost enclosing loop has the largest start among those containing the address.
        enclosing = [(s, c) for s, e, c in spans if s <= ins.addr <= e]
        counts.append(max(enclosing)[1] if enclosing else 1.0)
    return counts
