"""Machinery of the edge-case suite (tests/test_edge_cases.py): memory layouts, the generic checks, and the
independent float64 oracles that fastmed's own reference does not provide (window attention written as dense
masked attention, Kervadec maps from scipy, nnU-Net's DC_and_CE loss).

A case builds a :class:`Call`: the fastmed call, its oracle, and the tensors passed (possibly strided views of
buffers whose gaps hold NaN or an invalid label, so a kernel that ignores strides reads garbage).  The checks:

* :func:`check_against_oracle`: value and gradients agree with the oracle (run on float64 contiguous copies) within
  ``TOL`` of the input dtype; two runs are bit-equal; no passed tensor (nor the buffer under a view) changed.
* :func:`check_error`: ``ValueError``/``TypeError`` whose message names one of the given arguments, inputs
  unchanged.
* :func:`check_grad_mode`, :func:`check_double_backward`, :func:`check_meta`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, triton_device
from scipy import ndimage

import fastmed

LAYOUTS_ND = ("noncontiguous", "expanded", "offset", "flipped", "permuted", "channels_last")
LAYOUTS_1D = ("noncontiguous", "expanded", "offset", "flipped", "permuted")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def device_of(backend: str) -> str:
    """The device a backend's cases run on: Triton on CUDA, or on the CPU under the interpreter."""
    return triton_device() if backend == "triton" else "cpu"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ layouts
def _gap_value(t: torch.Tensor):
    """What fills the bytes a strided view skips: NaN for floats, an impossible label for integers."""
    if t.dtype == torch.bool:
        return True
    if t.is_floating_point():
        return float("nan")
    return 77 if t.dtype == torch.uint8 else -77


def lay(t: torch.Tensor, layout: Optional[str], requires_grad: bool = False) -> torch.Tensor:
    """A tensor shaped like ``t`` in ``layout``; its values are ``t``'s except for ``expanded`` (stride 0 on dim 0,
    every slice a copy of the first).  Gaps, the bytes before an offset view and the rest of an expanded view's
    buffer hold NaN (an impossible label for integers), so a kernel that ignores the strides reads junk.  With
    ``requires_grad`` the buffer under the view is the autograd leaf and the returned view is a non-leaf tensor that
    gradients can be taken with respect to."""
    layout = layout or "contiguous"
    nd = t.dim()
    if layout == "contiguous":
        base, view = t.clone(), (lambda b: b)
    elif layout == "noncontiguous":  # every other element of the last dim
        base = t.new_full(t.shape[:-1] + (2 * t.shape[-1],), _gap_value(t))
        base[..., ::2] = t
        view = lambda b: b[..., ::2]  # noqa: E731
    elif layout == "expanded":  # stride 0 on dim 0, junk after the first slice (reading past it is deterministic)
        base = t.new_full(t.shape, _gap_value(t))
        base[:1] = t[:1]
        view = lambda b: b[:1].expand(t.shape)  # noqa: E731
    elif layout == "offset":  # storage_offset 3, junk before
        base = t.new_full((t.numel() + 3,), _gap_value(t))
        base[3:] = t.flatten()
        view = lambda b: b[3:].view(t.shape)  # noqa: E731
    elif layout == "flipped":  # a flip of the reversed data (torch has no negative strides: .flip() copies)
        base = t.flip(-1).clone()
        view = lambda b: b.flip(-1)  # noqa: E731
    elif layout == "permuted":  # strides increasing along the dims (a permuted view); 1-D: a column of a matrix
        if nd == 1:
            base = t.new_full((t.shape[0], 3), _gap_value(t))
            base[:, 1] = t
            view = lambda b: b[:, 1]  # noqa: E731
        else:
            perm = tuple(reversed(range(nd)))
            base = t.permute(perm).contiguous()
            view = lambda b: b.permute(perm)  # noqa: E731
    elif layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[nd]
        base, view = t.contiguous(memory_format=fmt), (lambda b: b)
    else:
        raise AssertionError(f"unknown layout {layout}")
    if requires_grad:
        base.requires_grad_()
    out = view(base)
    assert out.shape == t.shape
    return out


# ------------------------------------------------------------------------------------------------ comparison
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (a contiguous integer tensor), for bit-equality."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8).clone()
    return t.view(_INT_VIEW[t.element_size()]).clone()


def assert_bit_equal(a, b, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(bits(a), bits(b)), f"{what}: two runs of the same call differ (max |diff| " \
                                              f"{(a.double() - b.double()).abs().nan_to_num(0).max().item():.3g})"
    else:
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            if x is None or y is None:
                assert x is None and y is None, f"{what}[{i}]: None in one run only"
            else:
                assert_bit_equal(x, y, f"{what}[{i}]")


def tolerance(*dtypes: torch.dtype) -> dict:
    """TOL of the least precise floating dtype among ``dtypes``."""
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    fl = [d for d in dtypes if d in order]
    return TOL[min(fl, key=order.index)] if fl else dict(atol=0.0, rtol=0.0)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, oracle {tuple(want.shape)}"
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    assert torch.equal(nan_g, nan_w), (f"{what}: NaN at {int(nan_g.sum())} places, oracle at {int(nan_w.sum())} "
                                       f"({int((nan_g & ~nan_w).sum())} NaN where the oracle is not)")
    diff = (g - w).abs().nan_to_num(0.0)
    diff = torch.where(torch.isinf(w) & (g == w), torch.zeros_like(diff), diff)
    torch.testing.assert_close(g, w, equal_nan=True, **tol,
                               msg=lambda m: f"{what}: max |got - oracle| = {diff.max().item():.4g}\n{m}")


def _snapshot(tensors: dict) -> list:
    """(name, tensor whose storage must not change, its bits) for every tensor passed and the buffer under it."""
    out = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            for obj in (t, t._base) if t._base is not None else (t,):
                out.append((name, obj, bits(obj)))
    return out


def assert_unchanged(snap: list, except_names: Sequence[str] = ()) -> None:
    for name, obj, before in snap:
        if name in except_names:
            continue
        assert torch.equal(bits(obj), before), f"the call modified its input {name!r}"


# ------------------------------------------------------------------------------------------------ the call
@dataclass
class Call:
    """One fastmed call: ``fn(t)`` with the tensors ``t`` and its oracle ``oracle(t64)`` on float64 contiguous CPU
    copies; ``diff`` names the tensors whose gradients are compared, ``dtype`` picks the tolerance."""
    fn: Callable[[dict], torch.Tensor]
    oracle: Optional[Callable[[dict], torch.Tensor]]
    t: dict
    diff: tuple = ()
    dtype: torch.dtype = torch.float32
    mutable: tuple = ()          # tensors the API updates in place (batch-norm running statistics)
    tol: Optional[dict] = None   # overrides TOL[dtype] (e.g. exact integer results)
    lowp: bool = False           # ill-conditioned input: also allow 2x the error of the oracle run in the input dtype
    nonfinite: bool = False      # compare non-finite places as a set (NaN or inf alike), see _finite_part
    oracle_dtype: Optional[torch.dtype] = None  # the oracle computes in this precision (MONAI's focal: float32)


def _upstream(out: torch.Tensor) -> torch.Tensor:
    g = torch.randn(out.shape, generator=gen(123), dtype=torch.float64)
    return g.to(device=out.device, dtype=out.dtype)


def _grads(out: torch.Tensor, inputs: list, upstream: torch.Tensor, create_graph: bool = False):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True, create_graph=create_graph)


def oracle_inputs(t: dict, diff: Sequence[str]) -> dict:
    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().clone().contiguous()  # a copy: the oracle may update buffers in place
            if v.is_floating_point():
                v = v.double().requires_grad_(k in diff)
        out[k] = v
    return out


def _run(call: Call, backend: str, grad: bool):
    with fastmed.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = call.fn(call.t)
        grads = None
        if grad and call.diff:
            grads = _grads(out, [call.t[k] for k in call.diff], _upstream(out))
    return out, grads


def run_oracle(call: Call, grad: bool):
    t64 = oracle_inputs(call.t, call.diff if grad else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = call.oracle(t64)
        wgrads = None
        if grad and call.diff:
            up = _upstream(want).double() if want.is_floating_point() else None
            wgrads = _grads(want, [t64[k] for k in call.diff], up)
    return want, wgrads, t64


def check_against_oracle(call: Call, backend: str, grad: bool = True) -> None:
    """Values and gradients vs the oracle; two runs bit-equal; inputs unchanged (except ``mutable``, whose in-place
    update must equal the oracle's)."""
    grad = grad and bool(call.diff)
    snap = _snapshot(call.t)
    initial = {k: call.t[k].detach().clone() for k in call.mutable}

    def restore():
        with torch.no_grad():
            for k, v in initial.items():
                call.t[k].copy_(v)

    out, grads = _run(call, backend, grad)
    assert_unchanged(snap, call.mutable)
    updated = {k: call.t[k].detach().clone() for k in call.mutable}
    restore()
    out2, grads2 = _run(call, backend, grad)
    assert_bit_equal(out, out2, "output")
    if grad:
        assert_bit_equal(grads, grads2, "gradients")
    for k in call.mutable:
        assert_bit_equal(updated[k], call.t[k], f"in-place update of {k!r}")
    restore()
    want, wgrads, t64 = run_oracle(call, grad)
    tols = _tolerances(call, out, want, wgrads, grad)
    if call.nonfinite:
        assert_close(*_finite_part(out, want, "output", superset=False), tols[0], "output")
    else:
        assert_close(out, want, tols[0], "output")
    if grad:
        for k, g, w, tol in zip(call.diff, grads, wgrads, tols[1:]):
            if w is None:
                assert g is None or not g.abs().nan_to_num(1.0).any(), f"gradient of {k!r}: oracle has none"
                continue
            if g is None:  # not in the graph (a term with weight 0): the oracle's gradient must be zero
                assert not w.abs().nan_to_num(1.0).any(), f"gradient of {k!r} is missing"
                continue
            assert g.shape == call.t[k].shape, f"gradient of {k!r} has shape {tuple(g.shape)}"
            if call.nonfinite:
                g, w = _finite_part(g, w, f"gradient of {k!r}", superset=True)
            assert_close(g, w, tol, f"gradient of {k!r}")
    for k in call.mutable:  # the oracle (torch's own op) updated its copy in place
        assert_close(updated[k], t64[k], tolerance(call.t[k].dtype), f"in-place update of {k!r}")


def _finite_part(got: torch.Tensor, want: torch.Tensor, what: str, superset: bool):
    """For non-finite inputs: ``got`` non-finite wherever the oracle is (NaN and inf alike; never a finite value
    hiding a NaN), and exactly there unless ``superset`` (gradients: where the loss is already NaN, a NaN spreading
    further than the oracle's derivative formula spreads it is no error); then the finite values."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    bad_g, bad_w = ~torch.isfinite(g), ~torch.isfinite(w)
    hidden = int((bad_w & ~bad_g).sum())
    assert hidden == 0, f"{what}: finite at {hidden} places where the oracle is NaN/inf"
    if not superset:
        assert torch.equal(bad_g, bad_w), (f"{what}: non-finite at {int(bad_g.sum())} places, oracle at "
                                           f"{int(bad_w.sum())}")
    both = bad_g | bad_w
    return g.masked_fill(both, 0.0), w.masked_fill(both, 0.0)


def _tolerances(call: Call, out, want, wgrads, grad: bool) -> list:
    """TOL of the dtypes for the output and each gradient; with ``call.lowp`` at least twice the error of the same
    oracle run in the input dtype (the flash-attention rule of ARCHITECTURE.md) plus a floor."""
    od = (call.oracle_dtype,) if call.oracle_dtype else ()
    tols = [call.tol or tolerance(call.dtype, out.dtype, *od)] + [tolerance(call.t[k].dtype, *od) for k in call.diff]
    if not call.lowp:
        return tols
    native = {k: (v.detach().cpu().clone().contiguous().requires_grad_(k in call.diff and v.is_floating_point())
                  if isinstance(v, torch.Tensor) else v) for k, v in call.t.items()}
    lp = call.oracle(native)
    lgrads = _grads(lp, [native[k] for k in call.diff], _upstream(want).to(lp.dtype)) if grad and call.diff else ()
    pairs = [(lp, want)] + list(zip(lgrads, wgrads or ()))
    out = []
    for tol, (a, b) in zip(tols, pairs):
        err = 0.0 if a is None or b is None else (a.double() - b.double()).abs().nan_to_num(0).max().item()
        out.append(dict(atol=max(tol["atol"], 2 * err + 1e-6), rtol=tol["rtol"]))
    return out


def _names_in(message: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def check_error(call: Call, backend: str, names: Sequence[str], *, types=(ValueError, TypeError)) -> None:
    """The call raises ``types`` with a message naming one of ``names``; nothing passed is modified."""
    snap = _snapshot(call.t)
    with fastmed.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            call.fn(call.t)
    exc = info.value
    assert isinstance(exc, types), f"expected {'/'.join(t.__name__ for t in types)} naming {names}, got " \
                                   f"{type(exc).__name__}: {exc}"
    assert _names_in(str(exc), names), f"the error does not name {' or '.join(names)}: {exc}"
    assert_unchanged(snap)


def check_error_or_oracle(call: Call, backend: str, names: Sequence[str]) -> None:
    """Either a clear error naming ``names`` or agreement with the oracle (for "raise or work" items)."""
    try:
        with fastmed.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call.fn(call.t)
    except (ValueError, TypeError) as exc:
        if _names_in(str(exc), names):
            return check_error(call, backend, names)
        raise
    check_against_oracle(call, backend)


def check_grad_mode(call: Call, backend: str, mode: str) -> None:
    """Under ``torch.no_grad`` / ``torch.inference_mode`` the value equals the oracle and needs no gradient."""
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    snap = _snapshot(call.t)
    with ctx():
        out = _run(call, backend, grad=False)[0]
        out2 = _run(call, backend, grad=False)[0]
    assert not out.requires_grad, f"output requires grad under {mode}"
    assert_unchanged(snap, call.mutable)
    assert_bit_equal(out, out2, "output")
    want = run_oracle(call, grad=False)[0]
    assert_close(out, want, _tolerances(call, out, want, None, grad=False)[0], "output")


_NO_DOUBLE = re.compile(r"double backward|twice|once_differentiable|second.order|higher.order|not implemented|"
                        r"does not support", re.I)


def check_double_backward(call: Call, backend: str) -> None:
    """create_graph=True: either a clear RuntimeError that double backward is unsupported, or first-order gradients
    that carry a graph wherever the oracle's do, and second-order gradients equal to the oracle's.  Never
    first-order gradients that silently carry no graph (second-order terms would vanish)."""
    t64 = oracle_inputs(call.t, call.diff)
    want = call.oracle(t64)
    w1 = _grads(want, [t64[k] for k in call.diff], _upstream(want).double(), create_graph=True)
    inputs = [call.t[k] for k in call.diff]
    with fastmed.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = call.fn(call.t)
            g1 = _grads(out, inputs, _upstream(out), create_graph=True)
            silent = [k for k, g, w in zip(call.diff, g1, w1)
                      if w is not None and w.requires_grad and (g is None or not g.requires_grad)]
            assert not silent, f"create_graph=True returned gradients of {silent} without a graph: second-order " \
                               f"terms silently vanish"
            live = [(g, w) for g, w in zip(g1, w1) if g is not None and w is not None and w.requires_grad]
            if not live:  # the oracle's gradients are constants: no second order to compare
                return
            v = [torch.randn(g.shape, generator=gen(7), dtype=torch.float64) for g, _ in live]
            g2 = torch.autograd.grad(sum((g * r.to(g)).sum() for (g, _), r in zip(live, v)), inputs,
                                     allow_unused=True)
        except RuntimeError as exc:
            assert _NO_DOUBLE.search(str(exc)), f"unclear error for double backward: {exc}"
            return
    w2 = torch.autograd.grad(sum((w * r).sum() for (_, w), r in zip(live, v)), [t64[k] for k in call.diff],
                             allow_unused=True)
    for k, a, b in zip(call.diff, g2, w2):
        if b is None or not b.abs().any():
            continue
        assert a is not None, f"second-order gradient of {k!r} is missing"
        assert_close(a, b, tolerance(call.t[k].dtype), f"second-order gradient of {k!r}")


def check_meta(call: Call, names: Sequence[str]) -> None:
    """On meta tensors: a meta output of the CPU call's shape and dtype, or a clear error naming a tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastmed.use_backend("reference"):
            want = call.fn(call.t)
        meta = {k: (v.detach().to("meta").requires_grad_(v.requires_grad and v.is_floating_point())
                    if isinstance(v, torch.Tensor) else v) for k, v in call.t.items()}
        try:
            out = call.fn(meta)
        except (ValueError, TypeError) as exc:
            assert _names_in(str(exc), names) and "meta" in str(exc), f"unclear error on meta tensors: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - any other error is the finding
            raise AssertionError(f"meta tensors: {type(exc).__name__}: {exc}") from exc
    assert out.device.type == "meta", f"output on {out.device}"
    assert out.shape == want.shape and out.dtype == want.dtype, \
        f"meta output {tuple(out.shape)}/{out.dtype}, CPU output {tuple(want.shape)}/{want.dtype}"


# ------------------------------------------------------------------------------------------------ oracles
#: name -> act(z, slope): the activations of fastmed.ops.norm_act written with torch.nn.functional
ACTIVATION_ORACLES = {
    "identity": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": F.leaky_relu,
    "prelu": F.prelu,
    "gelu": lambda z, slope: F.gelu(z),
    "gelu_tanh": lambda z, slope: F.gelu(z, approximate="tanh"),
    "silu": lambda z, slope: F.silu(z),
}


def activation(z: torch.Tensor, name: str, slope) -> torch.Tensor:
    """The activations of fastmed.ops.norm_act written with torch.nn.functional."""
    if name not in ACTIVATION_ORACLES:
        raise AssertionError(name)
    return ACTIVATION_ORACLES[name](z, slope)


def normalize(z, kind, weight=None, bias=None, num_groups=None, eps=1e-5, running_mean=None, running_var=None,
              training=True, momentum=0.1):
    if kind == "instance":
        return F.instance_norm(z, weight=weight, bias=bias, eps=eps)
    if kind == "group":
        return F.group_norm(z, num_groups, weight, bias, eps)
    if kind == "batch":
        return F.batch_norm(z, running_mean, running_var, weight, bias, training, momentum, eps)
    assert kind == "none"
    return z


def window_attention_oracle(qkv, heads, window, shift=0, table=None, scale=None, qkv_pad=None,
                            bias_index="coords"):
    """Attention within windows of the padded (``qkv_pad`` tokens), rolled token grid, the tokens grouped by window
    id (no partition/reverse reshapes); bias by the pair's in-window displacement (``coords``) or by MONAI's sliced
    full-window index (``monai``); -100 between shift regions."""
    nd = qkv.dim() - 2
    grid = tuple(qkv.shape[1:-1])
    B, C3 = qkv.shape[0], qkv.shape[-1]
    C = C3 // 3
    hd = C // heads
    window = (window,) * nd if isinstance(window, int) else tuple(window)
    shift = (shift,) * nd if isinstance(shift, int) else tuple(shift)
    win = tuple(g if g <= w else w for g, w in zip(grid, window))
    sh = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
    P = tuple(math.ceil(g / w) * w for g, w in zip(grid, win))
    fill = qkv.new_zeros(C3) if qkv_pad is None else qkv_pad
    xp = fill.expand(B, *P, C3).clone()
    xp[(slice(None),) + tuple(slice(0, g) for g in grid)] = qkv
    xr = torch.roll(xp, [-s for s in sh], list(range(1, nd + 1)))
    coords = torch.stack(torch.meshgrid(*[torch.arange(p) for p in P], indexing="ij"), -1).reshape(-1, nd)
    L = coords.shape[0]
    wc = torch.tensor(win)
    n = math.prod(win)
    wid = torch.zeros(L, dtype=torch.long)
    for ax in range(nd):
        wid = wid * (P[ax] // win[ax]) + coords[:, ax] // win[ax]
    order = torch.argsort(wid * L + torch.arange(L))  # tokens grouped by window
    c = coords[order].reshape(-1, n, nd)
    q, k, v = xr.reshape(B, L, C3)[:, order].reshape(B, -1, n, 3, heads, hd).unbind(3)
    scale = hd ** -0.5 if scale is None else scale
    s = torch.einsum("bwihd,bwjhd->bwhij", q * scale, k)
    if table is not None:
        inwin = c % wc
        if bias_index == "coords":
            a, b = inwin[:, :, None], inwin[:, None]
        else:  # MONAI: the flat in-window index, unravelled over the full window
            flat = torch.zeros(inwin.shape[:2], dtype=torch.long)
            for ax in range(nd):
                flat = flat * win[ax] + inwin[..., ax]
            full = []
            for ax in reversed(range(nd)):
                full.append(flat % window[ax])
                flat = flat // window[ax]
            full = torch.stack(full[::-1], -1)
            a, b = full[:, :, None], full[:, None]
        idx = torch.zeros(a.shape[0], n, n, dtype=torch.long)
        for ax in range(nd):
            idx = idx * (2 * window[ax] - 1) + (a[..., ax] - b[..., ax] + window[ax] - 1)
        s = s + table[idx].permute(0, 3, 1, 2)[None]
    region = torch.zeros(c.shape[:2], dtype=torch.long)
    for ax in range(nd):
        x = c[..., ax]
        r = ((x >= P[ax] - win[ax]).long() + (x >= P[ax] - sh[ax]).long()) if sh[ax] else torch.zeros_like(x)
        region = region * 3 + r
    s = s + torch.where(region[:, :, None] != region[:, None], -100.0, 0.0).to(s)[None, :, None]
    o = torch.einsum("bwhij,bwjhd->bwihd", torch.softmax(s, -1), v).reshape(B, L, C)
    out = torch.empty_like(o).index_copy(1, order, o).reshape(B, *P, C)
    out = torch.roll(out, list(sh), list(range(1, nd + 1)))
    return out[(slice(None),) + tuple(slice(0, g) for g in grid)]


def edt(mask: np.ndarray, spacing=None) -> np.ndarray:
    """scipy's exact Euclidean distance transform of one map; +inf when the map has no zero."""
    if mask.all():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_edt(mask, sampling=spacing)


def edt_batch(mask: torch.Tensor, spatial_dims: int, spacing=None) -> torch.Tensor:
    m = mask.detach().cpu().numpy() != 0
    if m.size == 0:
        return torch.zeros(m.shape, dtype=torch.float64)
    flat = m.reshape((-1,) + m.shape[m.ndim - spatial_dims:])
    return torch.from_numpy(np.stack([edt(x, spacing) for x in flat]).reshape(m.shape))


def kervadec(onehot: torch.Tensor, spacing=None) -> torch.Tensor:
    """Kervadec et al.'s one_hot2dist per (n, k) map with scipy: zeros for absent or full classes."""
    m = onehot.detach().cpu().numpy().astype(bool)
    out = np.zeros(m.shape)
    for n, k in itertools.product(range(m.shape[0]), range(m.shape[1])):
        pos = m[n, k]
        if pos.any() and not pos.all():
            neg = ~pos
            out[n, k] = (ndimage.distance_transform_edt(neg, sampling=spacing) * neg
                         - (ndimage.distance_transform_edt(pos, sampling=spacing) - 1) * pos)
    return torch.from_numpy(out)


def one_hot(labels: torch.Tensor, C: int) -> torch.Tensor:
    """(B, 1, *sp) integer labels -> (B, C, *sp) float64."""
    return F.one_hot(labels[:, 0].long(), C).movedim(-1, 1).double()


def nnunet_dc_ce(logits, target, batch_dice=False, do_bg=False, smooth=1e-5, weight_ce=1.0, weight_dice=1.0,
                 ignore_label=None):
    """nnU-Net v2 ``DC_and_CE_loss(MemoryEfficientSoftDiceLoss, RobustCrossEntropyLoss)`` written out."""
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    target = target.long()
    C = logits.shape[1]
    mask = None
    tdice = target
    if ignore_label is not None:
        mask = (target != ignore_label)
        tdice = torch.where(mask, target, torch.zeros_like(target))
    x = torch.softmax(logits, 1)
    y = one_hot(tdice, C).to(x)
    if not do_bg:
        x, y = x[:, 1:], y[:, 1:]
    axes = list(range(2, logits.dim()))
    if mask is not None:
        x, y = x * mask, y * mask
    inter, sp, sg = (x * y).sum(axes), x.sum(axes), y.sum(axes)
    if batch_dice:
        inter, sp, sg = inter.sum(0), sp.sum(0), sg.sum(0)
    dc = -((2 * inter + smooth) / torch.clip(sg + sp + smooth, 1e-8)).mean()
    ce_target = target[:, 0]
    if ignore_label is not None and not bool(mask.any()):
        ce = logits.sum() * 0
    else:
        ce = F.cross_entropy(logits, ce_target, ignore_index=-100 if ignore_label is None else ignore_label)
    return weight_ce * ce + weight_dice * dc


def nnunet_ds_weights(n: int) -> list:
    """nnU-Net v2's deep-supervision weights (nnUNetTrainer._build_loss)."""
    w = np.array([1 / (2 ** i) for i in range(n)])
    if n > 1:
        w[-1] = 0
    return list(w / w.sum())


@contextlib.contextmanager
def seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
