"""The direct path: fastmed's torch.library ops without torch.library's dispatch, outside ``torch.compile``.

A call through a Python-defined ``torch.library`` op costs on the order of 100 µs of dispatch (argument
normalization, the autograd wrapper, redispatch): more than a whole kernel at small shapes on a GPU, and the
difference between 1.0x and 1.5x the plain torch composition on small CPU tensors.  Outside ``torch.compile``
fastmed therefore runs the very bodies registered for the op through a plain ``torch.autograd.Function`` with the
op's own ``setup_context`` and ``backward`` (the *direct path*); while ``torch.compile`` traces, the registered ops
are used, so the graph has no breaks.  ``tests/test_direct_path.py`` checks both routes give bit-identical values
and gradients.  ("Eager" in fastmed means unfused PyTorch, the baseline of the benchmarks, never this path.)

Ops declared with :func:`triton_op` here (instead of ``torch.library.triton_op``) take the backend name as their
last argument; on the direct path their function then runs as written for every backend but ``"triton"``, without
the wrapper torch puts around a ``triton_op`` body (a context manager that disables ``wrap_triton``, a few
microseconds a call: a visible part of a C++ CPU kernel's whole cost on small tensors).

An op may also give :func:`autograd_function` a ``native`` implementation: its forward body in compiled code with
the autograd node in C++ (``fastmed::norm_act`` on the cpp backend: ``norm_act_autograd_cpu``), tried first on the
direct path; a Python ``autograd.Function`` costs tens of microseconds a call forward and backward, a C++ node what a
native torch op costs.  The direct-path tests compare it bit for bit with the registered op.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

# What the direct path runs for the ops declared with triton_op below: their functions as written (torch keeps them
# wrapped), or the ``direct`` variant given.
_PLAIN: dict = {}


def triton_op(name: str, mutates_args=(), direct: Optional[Callable] = None) -> Callable:
    """``torch.library.triton_op(name, mutates_args=...)`` for a function whose last argument is the backend name;
    the direct path runs the function itself when that backend is not ``"triton"`` (see the module docstring), or
    ``direct``: the same function without the op's output conventions (None where the op returns an empty
    placeholder tensor, which the op's ``setup_context`` and ``backward`` then take as well)."""
    def register(fn: Callable):
        op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        _PLAIN[op] = fn if direct is None else direct
        return op

    return register


def body(op, backend=None) -> Callable:
    """The Python function registered as the implementation of a ``torch.library`` custom op (the op itself
    where torch keeps it elsewhere, which only costs the dispatch); for an op of :func:`triton_op` and a
    ``backend`` other than ``"triton"``, the function without torch's wrapper."""
    if backend != "triton":
        plain = _PLAIN.get(op)
        if plain is not None:
            return plain
    return getattr(op, "_init_fn", op)


def backward_op(ctx, op) -> Callable:
    """What a registered backward should call for the op ``op``: its body on the direct path (for the backend
    the forward ran, ``ctx.backend``, where the op records it), else the op."""
    return body(op, getattr(ctx, "backend", None)) if getattr(ctx, "direct", False) else op


def autograd_function(name: str, op, setup_context: Callable, backward: Callable,
                      native: Optional[Callable] = None) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` that runs the body of ``op`` with the op's ``setup_context`` and ``backward``
    (``ctx.direct`` is True for them).

    ``native(grad, *inputs)``, given, is tried first: the op's outputs computed by the same forward body in compiled
    code, with an autograd node in compiled code when ``grad`` (a gradient is needed; a C++ node costs what a native
    torch op costs per call, a Python ``autograd.Function`` tens of microseconds more), or None for the inputs it
    does not take, which then run through the Python function (or the op's body, without a gradient)."""
    def forward(ctx, *inputs):
        outputs = body(op, inputs[-1])(*inputs)
        ctx.direct = True
        setup_context(ctx, inputs, outputs)
        return outputs

    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward)})
    _BASE_APPLY[function] = super(torch.autograd.Function, function).apply
    if native is not None:
        _NATIVE[function] = native
    return function


# The C++ ``apply`` of each class built by autograd_function (torch._C._FunctionBase.apply bound to it), and the
# ``native`` implementations given to it.
_BASE_APPLY: dict = {}
_NATIVE: dict = {}
_functorch_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def apply(function: type[torch.autograd.Function], inputs: tuple):
    """``function.apply(*inputs)`` for a class built by :func:`autograd_function`: its ``native`` implementation
    where it takes the inputs, else the C++ ``apply`` without the Python layer of ``torch.autograd.Function.apply``
    where that does nothing (no functorch transform active; these classes define no ``setup_context``): the same
    call after the same unwrapping of dead functorch wrappers, a few microseconds less.  Under a functorch
    transform, ``function.apply``."""
    if _functorch_active():
        return function.apply(*inputs)
    native = _NATIVE.get(function)
    if native is not None:
        outputs = native(True, *inputs)
        if outputs is not None:
            return outputs
    return _BASE_APPLY[function](*[_unwrap_if_dead(t) if isinstance(t, torch.Tensor) else t for t in inputs])


def call(op, function: type[torch.autograd.Function], *inputs):
    """``op(*inputs)`` under torch.compile; else the direct ``function`` when a tensor input needs a gradient;
    else the op's body alone (first the function's ``native`` implementation, either way, where it has one)."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if torch.is_grad_enabled():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return apply(function, inputs)
    native = _NATIVE.get(function)
    if native is not None:
        outputs = native(False, *inputs)
        if outputs is not None:
            return outputs
    return body(op, inputs[-1])(*inputs)
