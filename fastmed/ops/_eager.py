"""Eager fast path for fastmed's torch.library ops.

A call through a Python-defined ``torch.library`` op costs on the order of 100 µs of dispatch (argument
normalization, the autograd wrapper, redispatch) — more than a whole kernel at small shapes on a GPU, and the
difference between 1.0x and 1.5x the plain torch composition on small CPU tensors.  Outside ``torch.compile``
fastmed therefore runs the very same forward and backward bodies through a plain ``torch.autograd.Function``;
while ``torch.compile`` traces, the registered ops are used so the graph has no breaks.  ``call`` picks.
"""
from __future__ import annotations

from typing import Callable

import torch


def eager_function(name: str, forward_impl: Callable, setup_context: Callable,
                   backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function running ``forward_impl(*inputs)`` with the op's own ``setup_context`` and
    ``backward`` (``ctx.eager`` is True there, so the backward may call its implementation directly)."""

    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        ctx.eager = True
        setup_context(ctx, inputs, outputs)
        return outputs

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def call(op, eager_fn: type[torch.autograd.Function], forward_impl: Callable, *inputs):
    """The registered ``op`` under torch.compile; else the eager autograd.Function when a tensor input needs a
    gradient; else the forward implementation alone."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return eager_fn.apply(*inputs)
    return forward_impl(*inputs)
