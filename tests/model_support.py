"""Support for the model tests (test_swin_unetr.py, test_unetr.py, test_unet_plusplus.py): comparisons with MONAI's
models and of the Triton backend with the reference backend.

MONAI's ViT / UNETR / SwinUNETR need einops (an optional MONAI dependency not installed here): the few
``rearrange`` patterns MONAI uses are permutes and reshapes, implemented below.

``use_einops_shim(monkeypatch)`` does nothing when einops is importable; otherwise it patches the names MONAI
imported through ``optional_import`` (``Rearrange`` in the self-attention and patch-embedding blocks,
``rearrange`` in ``swin_unetr``) for the duration of one test.
"""
import copy
import importlib.util
import math
import re

import torch
from torch import nn


def _groups(side: str) -> list:
    """``"b h (qkv l d)"`` -> ``[["b"], ["h"], ["qkv", "l", "d"]]``."""
    return [g.split() if g.startswith("(") is False else g[1:-1].split()
            for g in re.findall(r"\([^)]*\)|\S+", side)]


def rearrange(x, pattern: str, **sizes):
    """``einops.rearrange`` for patterns whose sides are names and parenthesised groups (no ellipsis, no 1s)."""
    left, right = (_groups(s) for s in pattern.split("->"))
    if len(left) != x.dim():
        raise ValueError(f"pattern {pattern!r} does not fit a {x.dim()}-D tensor")
    dims = dict(sizes)
    for group, n in zip(left, x.shape):
        unknown = [a for a in group if a not in dims]
        if len(unknown) > 1:
            raise ValueError(f"pattern {pattern!r}: sizes of {unknown} are needed")
        if unknown:
            dims[unknown[0]] = n // math.prod(dims[a] for a in group if a in dims)
    flat = [a for g in left for a in g]
    x = x.reshape([dims[a] for a in flat])
    order = [a for g in right for a in g]
    x = x.permute([flat.index(a) for a in order])
    return x.reshape([math.prod(dims[a] for a in g) for g in right])


class Rearrange(nn.Module):
    """``einops.layers.torch.Rearrange`` for the patterns :func:`rearrange` supports."""

    def __init__(self, pattern: str, **sizes):
        super().__init__()
        self.pattern, self.sizes = pattern, sizes

    def forward(self, x):
        return rearrange(x, self.pattern, **self.sizes)


def use_einops_shim(monkeypatch) -> None:
    if importlib.util.find_spec("einops") is not None:
        return
    from monai.networks.blocks import patchembedding, selfattention
    from monai.networks.nets import swin_unetr

    monkeypatch.setattr(selfattention, "Rearrange", Rearrange)
    monkeypatch.setattr(patchembedding, "Rearrange", Rearrange)
    monkeypatch.setattr(swin_unetr, "rearrange", rearrange)


def grads(model) -> dict:
    """The parameter gradients of ``model`` by name (those that have one)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def weights(y):
    """Fixed weights for a loss ``(y * weights(y)).sum()`` whose gradient is never zero by symmetry (``y**2`` is:
    the sum of squares of a normalized output is constant)."""
    return torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)


def on_meta(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` built on the meta device (no memory, no initialization) and its parameter count."""
    with torch.device("meta"):
        model = cls(*args, **kwargs)
    return model, sum(p.numel() for p in model.parameters())


def fused_and_plain(model, x) -> list:
    """Copies of ``model`` run on ``x`` with ``fused`` True and then False, each backpropagating
    ``sum((y * weights(y)).sum())`` over its outputs: per run ``(outputs (a list, detached), parameter gradients,
    buffers)``."""
    runs = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        m.fused = fused
        y = m(x)
        ys = y if isinstance(y, list) else [y]
        sum((t * weights(t)).sum() for t in ys).backward()
        runs.append(([t.detach() for t in ys], grads(m), dict(m.named_buffers())))
    return runs


def reference_then_checkpointing(model, x, loss=lambda y: y.square().sum()):
    """``model(x)`` and the parameter gradients of ``loss`` of it; then the gradients are zeroed and
    checkpointing switched on, for a second run to compare with these."""
    ref = model(x)
    loss(ref).backward()
    g_ref = grads(model)
    model.zero_grad()
    model.checkpointing = True
    return ref, g_ref


def monai_pair(monkeypatch, theirs_cls, ours_cls, seed: int = 0, **kwargs):
    """MONAI's model built with ``kwargs`` (seeded) and fastmed's with the same arguments, loaded strictly from
    MONAI's state dict."""
    use_einops_shim(monkeypatch)
    torch.manual_seed(seed)
    theirs = theirs_cls(**kwargs)
    ours = ours_cls(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_matches_monai(theirs, ours, x, unused: int = 0) -> None:
    """Train-mode forward and backward of MONAI's model and of fastmed's with ``fused`` True and False: the same
    logits in float32, and in float64 the same logits, parameter gradients (to 1e-9 of each tensor's largest
    gradient) and buffers (running statistics).  ``unused``: how many of fastmed's parameters get no gradient
    (MONAI's too).

    Gradients are compared in float64 because instance norm over the few voxels of a small test's bottleneck
    amplifies float32 rounding of either implementation by 1e4 or more: MONAI's own float32 gradients differ from
    its float64 ones by up to 8e-2 (relative) at 64 x 64 x 32, so float32 MONAI is no oracle for them."""
    ref32 = theirs(x)
    theirs64 = copy.deepcopy(theirs).double()
    ref = theirs64(x.double())
    (ref * weights(ref)).sum().backward()
    g_ref = grads(theirs64)
    for fused in (True, False):
        m = copy.deepcopy(ours)
        m.fused = fused
        torch.testing.assert_close(m(x), ref32, atol=2e-5, rtol=1e-4)
        m = m.double()
        y = m(x.double())
        torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-9)
        (y * weights(y)).sum().backward()
        g = grads(m)
        assert g.keys() == g_ref.keys() and len(g) == len(list(ours.parameters())) - unused
        for k in g:
            torch.testing.assert_close(g[k], g_ref[k], atol=1e-9 * g_ref[k].abs().max().item(), rtol=0,
                                       msg=lambda s, k=k, f=fused: f"{k} (fused={f}): {s}")
        theirs_buffers = dict(theirs64.named_buffers())
        for name, buf in m.named_buffers():
            torch.testing.assert_close(buf, theirs_buffers[name], msg=name)


def assert_triton_matches_reference(module, *args) -> None:
    """``module(*args)`` (a tensor or a list) and its parameter gradients on the Triton backend (the interpreter on
    CPU) equal those on the reference backend; skips with the reason when Triton cannot run here."""
    import fastmed
    from fastmed import _backend

    for op in ("conv_block", "norm_act", "window_attention"):
        reason = _backend.why_not(op, "triton", torch.device("cpu"), forced=True)
        if reason is not None:
            import pytest

            pytest.skip(reason)
    results = []
    for backend in ("reference", "triton"):
        module.zero_grad()
        with fastmed.use_backend(backend):
            out = module(*args)
            outs = out if isinstance(out, list) else [out]
            sum((o * weights(o)).sum() for o in outs).backward()
        results.append(([o.detach() for o in outs], grads(module)))
    (ref, g_ref), (got, g) = results
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    scale = max(t.abs().max().item() for t in g_ref.values())
    assert g.keys() == g_ref.keys() and g
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-5 * scale, rtol=1e-3, msg=k)


def assert_autocast_and_compile(model, x) -> None:
    """In eval mode: bf16 autocast stays finite and close to float32, and ``torch.compile(fullgraph=True)``
    (aot_eager: the graph is captured whole, with fastmed's ops in it) gives the eager output."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        outs = (low, ref) if isinstance(ref, list) else ([low], [ref])
        for lo, r in zip(*outs):
            assert torch.isfinite(lo.float()).all()
            torch.testing.assert_close(lo.float(), r, atol=0.1 * r.abs().max().item() + 0.05, rtol=0.1)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
        for g, r in zip(got if isinstance(got, list) else [got], ref if isinstance(ref, list) else [ref]):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
