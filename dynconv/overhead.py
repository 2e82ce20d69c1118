"""``dynconv overhead``: host (CPU) time per call of every public op at a small shape.

    dynconv overhead [--device cpu|cuda] [--launch noop|real] [--calls N] [--repeats R]

With ``--launch noop`` (the only choice on CPU) every Triton launch is replaced by a no-op and the
ops take their GPU code path on whatever tensors they get, so the time is the Python, dispatcher
and autograd work a call pays on top of the launch itself. ``--launch real`` on CUDA times the
whole call as the host sees it: the loop is timed without synchronising, so it is CPU time as long
as the GPU keeps up (at these shapes it does). On CPU the clock is this thread's CPU time, so
other processes on a shared machine do not inflate it. Each figure is the best of ``R`` loops of
``N`` calls. ``fwd`` runs on inputs that need no gradient, ``fwd(grad)`` on inputs that do (autograd
records the call), ``fwd+bwd`` adds ``torch.autograd.grad`` (no ``.grad`` accumulation in the loop).
The floors are an empty ``torch.library.custom_op`` with registered autograd and an empty
``torch.autograd.Function``.
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable

import torch

import dynconv
from dynconv.console import EXIT_NO_GPU, Progress, add_quiet, command_parser, fail
from dynconv.kernels._launch import Launch
from dynconv.kernels.configs import ConfigWarning

def _inputs(device: str) -> dict[str, tuple[Callable, dict]]:
    """op name -> (function, tensor arguments): small shapes, where only host time matters."""
    B, C, H, K = 2, 16, 8, 3

    def t(*shape):
        return torch.randn(*shape, device=device)

    return {
        "involution": (dynconv.involution, dict(x=t(B, C, H, H), weight=t(B, 4, K, K, H, H))),
        "dynamic_dwconv2d": (dynconv.dynamic_dwconv2d, dict(x=t(B, C, H, H), weight=t(B, C, K, K), bias=t(B, C))),
        "expert_conv2d": (functools.partial(dynconv.expert_conv2d, padding=1),
                          dict(x=t(B, C, H, H), experts=t(4, C, C, K, K), routing=t(B, 4), bias=t(4, C))),
        "involution_fused": (functools.partial(dynconv.involution_fused, kernel_size=K, groups=4),
                             dict(x=t(B, C, H, H), z=t(B, 4, H, H), span_weight=t(K * K * 4, 4),
                                  span_bias=t(K * K * 4))),
        "floor: custom_op": (_empty_custom_op(), dict(x=t(B, C, H, H), weight=t(B, C, H, H))),
        "floor: autograd.Function": (lambda x, weight: _EmptyFunction.apply(x, weight),
                                     dict(x=t(B, C, H, H), weight=t(B, C, H, H))),
    }


@functools.cache
def _empty_custom_op():
    @torch.library.custom_op("dynconv_overhead::empty", mutates_args=())
    def empty(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    empty.register_fake(lambda x, weight: torch.empty_like(x))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    empty.register_autograd(lambda ctx, grad: (grad, grad), setup_context=setup_context)
    return empty


class _EmptyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


@contextlib.contextmanager
def noop_launches():
    """Every kernel launch does nothing, and CPU tensors take the launch path (not plain PyTorch).
    Without a GPU the config lookup takes its GPU path too, as on an untuned H100."""
    from dynconv.kernels import _launch, configs

    saved = _launch._INTERPRETED, Launch.__call__, torch.get_num_threads()
    saved_configs = configs._active_device, configs._run_time_tuning_enabled
    if not torch.cuda.is_available():
        configs._active_device = lambda: "NVIDIA H100 80GB HBM3"
        configs._run_time_tuning_enabled = lambda: False
    Launch.__call__ = lambda self: None
    _launch._INTERPRETED = True
    # The small torch ops around the launches (sums, matmuls) stand in for GPU launches: one
    # thread keeps them from waiting on busy cores, and flushing denormals keeps the garbage in
    # unwritten outputs from running at a hundredth of the speed.
    torch.set_num_threads(1)
    denormals = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if denormals:
            torch.set_flush_denormal(False)
        torch.set_num_threads(saved[2])
        _launch._INTERPRETED = saved[0]
        Launch.__call__ = saved[1]
        configs._active_device, configs._run_time_tuning_enabled = saved_configs


def _best_us(step: Callable[[], object], calls: int, repeats: int, sync: Callable[[], None],
             clock: Callable[[], float]) -> float:
    for _ in range(3):  # warm-up: compilation, config lookup, caches
        step()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            step()
        best = min(best, clock() - start)
        sync()
    return best / calls * 1e6


def measure(device: str = "cpu", calls: int = 500, repeats: int = 10,
            quiet: bool = True) -> dict[str, tuple[float, float, float]]:
    """op name -> µs per call (fwd, fwd(grad), fwd+bwd) on ``device``, with whatever launch is installed."""
    cuda = device == "cuda"
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else ((lambda: None), time.thread_time)
    results = {}
    cases = _inputs(device)
    progress = Progress(len(cases), "overhead", quiet)
    for name, (fn, tensors) in cases.items():
        progress.update(name, n=0)
        fwd = _best_us(lambda: fn(**tensors), calls, repeats, sync, clock)
        leaves = {k: v.requires_grad_() for k, v in tensors.items()}
        recorded = _best_us(lambda: fn(**leaves), calls, repeats, sync, clock)
        grad = torch.ones_like(fn(**leaves))
        inputs = tuple(leaves.values())
        both = _best_us(lambda: torch.autograd.grad(fn(**leaves), inputs, grad), calls, repeats, sync, clock)
        results[name] = (fwd, recorded, both)
        progress.update(name)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("dynconv overhead", __doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--launch", choices=("noop", "real"), default=None,
                        help="real kernel launches (CUDA only; the default there) or none (the default on CPU)")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    add_quiet(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("dynconv overhead", "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is "
                                        "False); use --device cpu", EXIT_NO_GPU)
    launch = args.launch or ("real" if args.device == "cuda" else "noop")
    if launch == "real" and args.device != "cuda":
        parser.error("--launch real needs --device cuda")
    with noop_launches() if launch == "noop" else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # "no tuned configs" says nothing about host time
        results = measure(args.device, args.calls, args.repeats, args.quiet)
    print(f"host µs per call, device {args.device}, launch {launch}, torch {torch.__version__}, "
          f"best of {args.repeats} x {args.calls} calls")
    print(f"{'op':<26} {'fwd':>9} {'fwd(grad)':>9} {'fwd+bwd':>9}")
    for name, times in results.items():
        print(f"{name:<26} " + " ".join(f"{t:>9.1f}" for t in times))
    return 0
