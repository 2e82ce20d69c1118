"""One data-parallel training step of each dynconv.nn module on 2 gloo processes, checked against
the single-process step on the concatenated batch. Run by tests/test_distributed.py as

    python tests/distributed_worker.py --out DIR --run ddp --run fsdp2/inductor=CondConv2d ...

Each ``--run WRAP[/COMPILE_BACKEND][=CASE+CASE]`` wraps the cases (default: all) in DDP or FSDP2
(``fully_shard``), compiled when a backend is named. One launch spawns 2 ranks on 127.0.0.1 for
all runs (importing torch is most of the cost) and leaves one JSON report per rank in DIR. The plain CPU path runs
(TRITON_INTERPRET=0, set before dynconv is imported; the report says which path ran), so the
check costs milliseconds per module and the same code runs on NCCL with CUDA tensors.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import sys
import traceback

# A decoration-time switch: it must be set before the kernels are imported, in every rank (spawn
# runs this file again as __mp_main__). Imported by the test for its constants, it leaves the
# test process's environment alone.
if __name__ in ("__main__", "__mp_main__"):
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import dynconv.nn as dnn  # noqa: E402
from dynconv.kernels._launch import kernels_are_interpreted  # noqa: E402

WORLD = 2
BATCH_PER_RANK, CHANNELS, SIZE = 2, 4, 6
DTYPE = torch.float64  # exact enough that only the summation order of the all-reduce differs
TOLERANCE = 1e-10
LR = 0.1

CASES = {
    "CondConv2d": lambda f: dnn.CondConv2d(CHANNELS, CHANNELS, 3, padding=1, num_experts=2, **f),
    "DynamicConv2d": lambda f: dnn.DynamicConv2d(CHANNELS, CHANNELS, 3, padding=1, num_experts=2, temperature=4.0, **f),
    "ODConv2d": lambda f: dnn.ODConv2d(CHANNELS, CHANNELS, 3, padding=1, num_experts=2, min_channels=4, **f),
    "DRConv2d": lambda f: dnn.DRConv2d(CHANNELS, CHANNELS, 3, padding=1, region_num=2, num_experts=2, **f),
    "Involution2d": lambda f: dnn.Involution2d(CHANNELS, 3, group_channels=2, reduction_ratio=2, fused=False, **f),
    "Involution2d-fused": lambda f: dnn.Involution2d(CHANNELS, 3, group_channels=2, reduction_ratio=2, fused=True, **f),
    "DynamicDWConv2d": lambda f: dnn.DynamicDWConv2d(CHANNELS, 3, reduction_ratio=2, **f),
    "DynamicDWConv2d-inhomogeneous": lambda f: dnn.DynamicDWConv2d(CHANNELS, 3, reduction_ratio=2, homogeneous=False,
                                                                    **f),
}


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _max_error(actual, expected) -> float:
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    actual = _full(actual).detach()
    if actual.shape != expected.shape or torch.isnan(actual).any():
        return float("inf")
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def one_case(name: str, wrap: str, backend: str | None, rank: int) -> dict:
    torch.manual_seed(0)
    # Eval mode: BatchNorm (ODConv's trunk, the involution bottlenecks) then treats samples
    # independently, so the split batch sees the same function as the whole one.
    reference = CASES[name]({"dtype": DTYPE}).eval()
    model = copy.deepcopy(reference)
    x = torch.randn(WORLD * BATCH_PER_RANK, CHANNELS, SIZE, SIZE, dtype=DTYPE)
    y_ref = reference(x)
    grad_out = torch.randn_like(y_ref)
    # Both engines average the ranks' gradients: the reference loss is the mean of the ranks' losses.
    (y_ref * grad_out).sum().div(WORLD).backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()

    if wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        if not all(isinstance(p, DTensor) for p in model.parameters()):
            raise AssertionError("fully_shard left a parameter unsharded")
    if backend is not None:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        wrapped = torch.compile(wrapped, backend=backend)
    mine = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    y = wrapped(x[mine])
    (y * grad_out[mine]).sum().backward()

    errors = {"output": _max_error(y, y_ref[mine].detach())}
    if backend is not None and not torch._dynamo.utils.counters["stats"]["unique_graphs"]:
        raise AssertionError(f"torch.compile(backend={backend!r}) captured no graph: the model ran eagerly")
    # full_tensor() is a collective: every rank walks the same parameters in the same order.
    for (pname, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        errors[f"grad {pname}"] = _max_error(p.grad, p_ref.grad)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    for (pname, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        errors[f"after step {pname}"] = _max_error(p, p_ref.detach())
    return errors


def parse_run(spec: str) -> tuple[str, str | None, list[str]]:
    head, _, cases = spec.partition("=")
    wrap, _, backend = head.partition("/")
    cases = cases.split("+") if cases else list(CASES)
    if wrap not in ("ddp", "fsdp2") or not set(cases) <= set(CASES):
        raise argparse.ArgumentTypeError(f"{spec!r}: want ddp|fsdp2[/BACKEND][=CASE+...], cases {sorted(CASES)}")
    return wrap, backend or None, cases


def rank_main(rank: int, args) -> None:
    report = {"rank": rank, "interpreted": kernels_are_interpreted(), "runs": {}}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=args.timeout))
        for wrap, backend, cases in args.run:
            results = report["runs"].setdefault(f"{wrap}/{backend or 'eager'}", {})
            for name in cases:
                try:
                    results[name] = {"errors": one_case(name, wrap, backend, rank)}
                except Exception:  # a failing module must not hide the others' results
                    results[name] = {"exception": traceback.format_exc()}
                dist.barrier()
        dist.destroy_process_group()
    finally:
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
    # Gloo's worker threads can still hold work objects when the interpreter finalises, and tearing
    # them down then may abort the process ("terminate called without an active exception", SIGABRT;
    # see pytorch/pytorch#179291): seen once in CI after both reports were complete. The report is
    # written and the group destroyed, so leave without the finalisation. An exception above skips
    # this and reaches mp.spawn as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True,
                        help="WRAP[/COMPILE_BACKEND][=CASE+CASE]: ddp or fsdp2, compiled with the backend if given")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=int, default=120, help="seconds a collective may wait")
    args = parser.parse_args(argv)
    args.port = free_port()
    mp.spawn(rank_main, args=(args,), nprocs=WORLD, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
