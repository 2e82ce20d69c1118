"""When a public function may skip the torch.library dispatcher.

A custom op costs about as much host time per call as the whole launch budget (schema binding,
the autograd and backend redispatch, the dynamo guard around its body), so in plain eager mode
the public functions call an ``autograd.Function`` that runs the same forward and backward bodies.
The registered ops serve everything that must see an op: torch.compile and export, torch.jit.trace,
the profiler (its traces keep the op names), fake tensors and dispatch modes (make_fx,
FlopCounterMode), tensor subclasses and torch-function modes. Functorch transforms and forward-mode
AD, which the custom ops do not carry, take the autograd.Functions (``needs_function``).
"""
from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_function_apply = torch._C._FunctionBase.__dict__["apply"]


def eager(*tensors) -> bool:
    """Whether a call on ``tensors`` (None allowed) can take the autograd.Function path."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state()
            or torch._C._autograd._profiler_enabled() or torch._C._are_functorch_transforms_active()
            or torch._C._has_torch_function(tensors)):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:  # e.g. FakeTensor outside its mode
            return False
    return True


def applier(function: type[torch.autograd.Function]):
    """``function.apply`` without its Python wrapper, which binds default arguments and unwraps
    dead functorch wrappers: neither can arise on the eager path, and the wrapper costs microseconds."""
    return _function_apply.__get__(None, function)


def records_grad(*tensors) -> bool:
    """Whether autograd records a call on ``tensors``; if not, the forward body runs without the
    autograd.Function around it. Inside a forward-AD level inputs may carry tangents, which only
    the Function can see (its jvp rule, or its refusal where it has none)."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def needs_function(*tensors) -> bool:
    """Whether a call that may not take the eager path must still run an autograd.Function rather
    than a custom op: the custom ops carry no forward-mode or functorch rules (a dual tensor would
    lose its tangent silently), so under functorch transforms or forward AD the Functions run,
    unless something must see an op (torch.compile, tracing, dispatch modes, tensor subclasses)."""
    if not (torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
        return False
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state()
            or torch._C._has_torch_function(tensors)):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def graph_free() -> bool:
    """Whether a backward or jvp rule may run the bare kernels: nothing records the derivative of
    the derivative (no create_graph, no forward AD, no functorch transform)."""
    return not (torch.is_grad_enabled() or torch.autograd.forward_ad._current_level >= 0
                or torch._C._are_functorch_transforms_active())


def refuse_tangents(op: str, *tensors) -> None:
    """Before a custom op runs: a tangent on an input would be dropped without a word (the ops
    carry no forward-mode rule), so it is refused. Forward AD reaches the ops only where
    ``needs_function`` cannot route it to the Functions (dispatch modes, tracing)."""
    if torch.autograd.forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD under a dispatch mode or tracer is not supported (the tangent "
                "would be lost); call it outside the mode, or use torch.func.jvp")


def forward_mode_active() -> bool:
    """Whether a tangent may be riding on the inputs: forward AD, or a torch.func jvp / jacfwd."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def fold_vmapped(t, in_dim, n: int):
    """A vmap rule's operand with the vmapped dim (size ``n``) folded into its batch dim, expanded
    first if it is not vmapped; None stays None. The ops' kernels then see one larger batch."""
    if t is None:
        return None
    t = t.expand(n, *t.shape) if in_dim is None else t.movedim(in_dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def unfold_vmapped(t, n: int):
    """The inverse of ``fold_vmapped`` on a result: the vmapped dim split back out in front."""
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])
