"""The direct path (fastmed/ops/_direct.py) against the registered torch.library ops.

Outside torch.compile every fused op runs its registered body through a plain autograd.Function; forcing the route
through the registered op (what torch.compile traces) must give bit-identical values and gradients, for every op and
both backends.
"""
import pytest
import torch
from conftest import triton_device

import fastmed
from fastmed.ops import _direct


def _through_registered_ops(monkeypatch):
    monkeypatch.setattr(_direct, "call", lambda op, function, *inputs: op(*inputs))


def _norm_act(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=dtype).to(device).requires_grad_()
    w = torch.rand(4, generator=g, dtype=dtype).to(device).requires_grad_()
    return (x, w), lambda: fastmed.ops.norm_act(x, "group", w, num_groups=2, activation="silu")


def _conv(implementation):
    def case(device, dtype):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, 3, 5, 6, 7, generator=g, dtype=dtype).to(device).requires_grad_()
        w = (torch.randn(4, 3, 3, 3, 3, generator=g, dtype=dtype) / 9).to(device).requires_grad_()
        nw = torch.rand(4, generator=g, dtype=dtype).to(device).requires_grad_()
        return (x, w, nw), lambda: fastmed.ops.conv_norm_act(x, w, None, nw, None, stride=2,
                                                             implementation=implementation)
    return case


def _loss(device, dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 7, generator=g, dtype=dtype).to(device).requires_grad_()
    labels = torch.randint(0, 3, (2, 1, 6, 7), generator=g).to(device)
    return (logits,), lambda: fastmed.ops.dice_ce_loss(logits, labels, to_onehot_y=True, softmax=True)


def _window_attention(device, dtype):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(1, 9, 9, 24, generator=g, dtype=dtype).to(device).requires_grad_()
    table = torch.randn(25, 2, generator=g, dtype=dtype).to(device).requires_grad_()
    return (qkv, table), lambda: fastmed.ops.window_attention(qkv, 2, 3, 1, table)


def _sam_attention(device, dtype):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 5, 4, 24, generator=g, dtype=dtype).to(device).requires_grad_()
    th, tw = (torch.randn(5, 4, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(2))
    pad = torch.randn(24, generator=g, dtype=dtype).to(device).requires_grad_()
    return (qkv, th, tw, pad), lambda: fastmed.ops.sam_attention(qkv, 2, th, tw, 3, qkv_pad=pad)


CASES = {"norm_act": _norm_act, "conv_cudnn": _conv("cudnn"), "conv_implicit_gemm": _conv("implicit_gemm"),
         "losses": _loss, "window_attention": _window_attention, "sam_attention": _sam_attention}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_direct_path_equals_registered_op(name, backend, monkeypatch):
    device = triton_device() if backend == "triton" else "cpu"
    results = []
    for route in ("direct", "op"):
        if route == "op":
            _through_registered_ops(monkeypatch)
        leaves, fn = CASES[name](device, torch.float32)
        with fastmed.use_backend(backend):
            out = fn()
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out.detach(), grads))
    (out_e, g_e), (out_o, g_o) = results
    assert torch.equal(out_e, out_o)
    for a, b in zip(g_e, g_o):
        assert torch.equal(a, b)
