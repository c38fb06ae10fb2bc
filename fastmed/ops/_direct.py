"""The direct path: fastmed's torch.library ops without torch.library's dispatch, outside ``torch.compile``.

A call through a Python-defined ``torch.library`` op costs on the order of 100 µs of dispatch (argument
normalization, the autograd wrapper, redispatch): more than a whole kernel at small shapes on a GPU, and the
difference between 1.0x and 1.5x the plain torch composition on small CPU tensors.  Outside ``torch.compile``
fastmed therefore runs the very bodies registered for the op through a plain ``torch.autograd.Function`` with the
op's own ``setup_context`` and ``backward`` (the *direct path*); while ``torch.compile`` traces, the registered ops
are used, so the graph has no breaks.  ``tests/test_direct_path.py`` checks both routes give bit-identical values
and gradients.  ("Eager" in fastmed means unfused PyTorch, the baseline of the benchmarks, never this path.)
"""
from __future__ import annotations

from typing import Callable

import torch


def body(op) -> Callable:
    """The Python function registered as the implementation of a ``torch.library`` custom op (the op itself
    where torch keeps it elsewhere, which only costs the dispatch)."""
    return getattr(op, "_init_fn", op)


def backward_op(ctx, op) -> Callable:
    """What a registered backward should call for the op ``op``: its body on the direct path, else the op."""
    return body(op) if getattr(ctx, "direct", False) else op


def autograd_function(name: str, op, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` that runs the body of ``op`` with the op's ``setup_context`` and ``backward``
    (``ctx.direct`` is True for them)."""
    impl = body(op)

    def forward(ctx, *inputs):
        outputs = impl(*inputs)
        ctx.direct = True
        setup_context(ctx, inputs, outputs)
        return outputs

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def call(op, function: type[torch.autograd.Function], *inputs):
    """``op(*inputs)`` under torch.compile; else the direct ``function`` when a tensor input needs a gradient;
    else the op's body alone."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return function.apply(*inputs)
    return body(op)(*inputs)
