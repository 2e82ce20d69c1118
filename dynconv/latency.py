"""The latency term of the static model: how long one warp takes when nothing else competes, and
how many programs an SM holds at once.

The throughput pipes of ``bounds.py`` assume that enough warps are ready to fill every issue slot.
The first GPU lease measured a kernel at 4.4x the time those pipes allowed: its warps were mostly
waiting for memory. Every Volta-and-later instruction carries the scheduling controls ptxas chose
(``sass.Instruction``: a stall count, the scoreboard a variable-latency result sets, the scoreboards
an instruction waits on), so the waits are in the compiled code. Walking a warp's instructions in
order, each waiting for the scoreboards it names, gives its critical path: issue and fixed-latency
stalls, plus every round trip to memory that the compiler could not overlap. Loads issued back to
back before their first use overlap; a load whose address needs an earlier load's value does not.

A launch then takes at least ``waves x that path``, a wave being every SM holding as many programs
as its registers, shared memory and warp slots allow. All PREDICTED: the latencies are the model's
(``bounds.MODEL``), loads are taken to miss to memory alike, and queueing is left to the HBM pipe.
"""
from __future__ import annotations

import math
import re

from .sass import Instruction, mma_flops

GLOBAL = {"LDG", "LD", "LDL", "ATOMG", "ATOM", "LDGSTS", "RED", "REDG", "STL"}
SHARED = {"LDS", "LDSM", "ATOMS", "SHFL"}
CONSTANT = {"LDC", "S2R", "S2UR", "CS2R"}
_DEPBAR = re.compile(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)")
_GROUP_DEPBAR = re.compile(r"gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


def latency_class(ins: Instruction) -> str:
    """Which of the model's latencies a scoreboard set by ``ins`` waits for."""
    if ins.base in GLOBAL:
        return "global"
    if ins.base in SHARED:
        return "shared"
    if ins.base in CONSTANT:
        return "constant"
    return "other"  # conversions, special functions: the short variable-latency pipes


def _pending(groups: list[float], allowed: int) -> float:
    """When all but the ``allowed`` most recent asynchronous groups have landed."""
    done = groups[:len(groups) - allowed] if allowed else groups
    return max(done, default=0.0)


class _Warp:
    """One warp's clock and scoreboards as it issues."""

    def __init__(self, latency: dict[str, float], mma_flop_per_clock: float):
        self.latency = latency
        self.mma_rate = mma_flop_per_clock
        self.clock = 0.0
        self.ready = [0.0] * 6
        self.copy_groups: list[float] = []  # cp.async groups committed (LDGDEPBAR), landing times
        self.copy_open = 0.0
        self.mma_groups: list[float] = []  # wgmma groups, finishing times
        self.mma_busy = 0.0
        self.waited: dict[int, float] = {}  # by address: cycles spent waiting before issue, walked trips
        self.walked: dict[int, int] = {}  # by address: executions walked

    def issue(self, ins: Instruction) -> None:
        clock = self.clock
        for barrier in range(6):
            if ins.wait_mask >> barrier & 1:
                clock = max(clock, self.ready[barrier])
        if ins.base == "DEPBAR" and (match := _DEPBAR.search(ins.args)):
            clock = max(clock, _pending(self.copy_groups, int(match[1], 0)))
        elif ins.opcode.startswith("WARPGROUP.DEPBAR") and (match := _GROUP_DEPBAR.search(ins.args)):
            clock = max(clock, _pending(self.mma_groups, int(match[1], 0)))
        if ins.write_barrier is not None:
            landed = clock + self.latency[latency_class(ins)]
            self.ready[ins.write_barrier] = max(self.ready[ins.write_barrier], landed)
        if ins.read_barrier is not None:
            self.ready[ins.read_barrier] = max(self.ready[ins.read_barrier], clock + self.latency["operands"])
        if ins.base == "LDGSTS":
            self.copy_open = max(self.copy_open, clock + self.latency["global"])
        elif ins.base == "LDGDEPBAR":
            self.copy_groups.append(self.copy_open)
        elif ins.base.endswith("GMMA"):
            # The warp's quarter of a warpgroup product runs on its own sub-partition's tensor core.
            self.mma_busy = max(self.mma_busy, clock) + mma_flops(ins) / self.mma_rate
            if "gsb0" in ins.args:
                self.mma_groups.append(self.mma_busy)
        self.waited[ins.addr] = self.waited.get(ins.addr, 0.0) + clock - self.clock
        self.walked[ins.addr] = self.walked.get(ins.addr, 0) + 1
        self.clock = clock + max(ins.stall, 1)


def warp_cycles(instructions: list[Instruction], counts: list[float], loops: list, latency: dict[str, float],
                mma_flop_per_clock: float, waits: dict | None = None) -> float:
    """One warp's critical path in cycles, alone on its scheduler.

    ``counts`` are the executions per warp of ``sass.execution_counts`` (a loop's trip count is its
    backward branch's count over its parent's); ``loops`` the forest of ``sass.loops``. Each loop
    body is walked up to three times, the scoreboards carried over, and the last trip's time stands
    for the remaining ones (a software-pipelined loop reaches its steady state on the second).
    """
    index = {ins.addr: k for k, ins in enumerate(instructions)}
    warp = _Warp(latency, mma_flop_per_clock)

    def walk(first: int, last: int, level: list, outer: float) -> None:
        # ``level``: the loops that start inside [first, last] and are not the one being walked.
        starts = {loop.start: loop for loop in level}
        k = first
        while k <= last:
            loop = starts.get(instructions[k].addr)
            if loop is None:
                if counts[k] > 0:
                    warp.issue(instructions[k])
                k += 1
                continue
            end = index[loop.end]
            trips = counts[end] / outer if outer else 0.0
            walked, step = 0, 0.0
            while walked < min(math.ceil(trips), 3):
                before = warp.clock
                walk(k, end, loop.children, counts[end])
                step, walked = warp.clock - before, walked + 1
            warp.clock += (trips - walked) * step
            k = end + 1

    walk(0, len(instructions) - 1, loops, 1.0)
    if waits is not None:
        # Where the warp waits: each instruction's mean wait over the trips walked, times its
        # executions (the trips extrapolated wait as the walked ones did).
        for k, ins in enumerate(instructions):
            if warp.walked.get(ins.addr) and warp.waited[ins.addr] > 0:
                waits[ins.addr] = warp.waited[ins.addr] / warp.walked[ins.addr] * counts[k]
    return warp.clock


def wait_profile(instructions: list[Instruction], waits: dict, total: float, top: int) -> list[dict]:
    """The ``top`` instructions the warp waits longest before issuing: cycles a warp, share of its
    path, and the scoreboards they wait on."""
    by_addr = {ins.addr: ins for ins in instructions}
    out = []
    for addr, cycles in sorted(waits.items(), key=lambda item: -item[1])[:top]:
        ins = by_addr[addr]
        out.append({"addr": f"{addr:#06x}", "instruction": f"{ins.predicate} {ins.opcode} {ins.args}".strip()[:72],
                    "waits_on": [b for b in range(6) if ins.wait_mask >> b & 1], "cycles": round(cycles),
                    "share": round(cycles / total, 3) if total else 0.0})
    return out


def resident_programs(registers: int, shared_bytes: int, num_warps: int, limits: dict) -> int:
    """Programs an SM holds at once: the fewest its registers, shared memory, warp slots and block
    slots allow (registers are allocated per warp in units of 256, shared memory with 1 KB reserved
    per block on Hopper)."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = limits["registers"] // (per_warp * num_warps)
    by_warps = limits["warps"] // num_warps
    by_shared = (limits["shared_bytes"] // (shared_bytes + limits["shared_reserved"]) if shared_bytes
                 else limits["programs"])
    return max(0, min(by_registers, by_warps, by_shared, limits["programs"]))
