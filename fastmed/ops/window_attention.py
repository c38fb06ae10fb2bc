"""``fastmed.ops.window_attention`` (Swin (shifted-)window attention) and ``fastmed.ops.attention`` (global).

``window_attention`` is registered as the torch.library ops ``fastmed::window_attention_fwd`` /
``fastmed::window_attention_bwd`` (``triton_op``, so ``torch.compile(fullgraph=True)`` traces through them) with
``register_autograd``.  Backends: ``triton`` (CUDA), ``cpp`` (CPU, csrc/window_attention_cpu.cpp for windows of at
most 512 tokens), ``aten`` (CPU, torch's own kernels) and ``reference`` (the oracle).  ``attention`` routes to
``torch.nn.functional.scaled_dot_product_attention``, which picks
the flash / cuDNN / memory-efficient / math kernel itself.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from fastmed import _backend, _ext
from fastmed._tensors import accumulation_dtype, traced
from fastmed._validate import check_choice, check_int, check_number, check_per_axis, check_same_device, check_tensor
from fastmed.ops import _direct
from fastmed.reference import window_attention as ref

__all__ = ["window_attention", "attention", "BIAS_INDEX"]

BIAS_INDEX = ("coords", "monai")

_backend.register_op("window_attention", ("triton", "cpp", "aten", "reference"),
                     doc="(shifted-)window attention with relative position bias, forward and backward")
_backend.register_op("attention", ("reference",),
                     doc="global attention through torch scaled_dot_product_attention (torch picks the kernel)")


# What the ``aten`` forward keeps for its backward (the ``saves`` argument of the ops; the other backends keep what
# they always do): the flash kernel's logsumexp, or the probabilities of small windows that need a gradient.
SAVES = ("logsumexp", "probabilities")


def _reference_forward(qkv, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    return ref.window_attention_forward(qkv, table, qkv_pad, spec)


def _triton_forward(qkv, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    from fastmed.kernels.window_attention import window_attention_forward

    return window_attention_forward(qkv, table, qkv_pad, spec)


def _reference_backward(dout, qkv, lse, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    # The reference recomputes the attention from qkv: lse is not needed.
    return ref.window_attention_backward(dout, qkv, table, qkv_pad, spec)


def _triton_backward(dout, qkv, lse, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    from fastmed.kernels.window_attention import window_attention_backward

    return window_attention_backward(dout, qkv, lse, table, qkv_pad, spec)


class _Geometry(NamedTuple):
    """Everything the ``aten`` backend needs about one window layout, apart from the tensors.

    * ``order`` ``(B * Tp,)``: for each row of the windowed layout ``(B * nW * N, ...)``, the row of the padded
      grid ``(B * Tp, ...)`` it reads (roll and partition as one gather).  Windows are ordered by their shift-mask
      pattern first (all windows of one pattern, of every batch element, are consecutive), so each pattern is one
      slice with one ``(N, N)`` mask; ``inverse`` is the inverse permutation.
    * ``groups``: per pattern, ``(start, stop, mask)``: the slice of windows (in units of windows of the
      windowed layout) and its ``(1, 1, N, N)`` shift mask, or None for windows that the shift does not split.
    * ``index`` ``(N * N,)``: the table row of every (query, key) pair.
    """
    order: Tensor
    inverse: Tensor
    groups: tuple
    index: Tensor


def _patterns(spec: ref.WindowSpec, padded: tuple) -> list[int]:
    """The shift-mask pattern of each window of a ``padded`` grid, windows in raster order: bit ``a`` set when it is
    the last window along a shifted axis ``a``."""
    cells = [p // w for p, w in zip(padded, spec.window)]
    return [sum(1 << a for a in range(3) if spec.shift[a] and cell[a] == cells[a] - 1)
            for cell in itertools.product(*(range(c) for c in cells))]


def _table_rows(window: tuple, table_window: tuple, bias_coords: tuple) -> Tensor:
    """``(N * N,)`` the bias-table row of every (query, key) pair of a window (CPU)."""
    return ref.bias_index(window, table_window, bias_coords).reshape(-1)


# for the ``cpp`` kernel's calls, which take plain tensors only (traced calls build it fresh in :func:`_mask_parts`)
_cached_table_rows = functools.lru_cache(maxsize=16)(_table_rows)


def _pair_bias(table: Tensor, rows: Tensor, spec: ref.WindowSpec, dtype: torch.dtype) -> Tensor:
    """``(heads, N, N)`` the relative position bias of every (query, key) pair, contiguous: one ``index_select`` of
    the table's columns (a fraction of advanced indexing's fixed cost, ~10 against ~25 us at 49 tokens)."""
    n = spec.tokens
    return table.to(dtype).t().index_select(1, rows).view(-1, n, n)


def _table_grad(table: Tensor, rows: Tensor, dbias: Tensor) -> Tensor:
    """The bias table's gradient from ``dbias`` ``(heads, N, N)`` (dS summed over the windows): scattered to the
    table rows, in a fixed order."""
    heads = table.shape[1]
    grad = torch.zeros(table.shape, dtype=dbias.dtype, device=dbias.device)
    return grad.index_add_(0, rows, dbias.reshape(heads, -1).transpose(0, 1)).to(table.dtype)


def _mask_parts(spec: ref.WindowSpec, padded: tuple, batch: int, dtype: torch.dtype, device) -> _Geometry:
    """The :class:`_Geometry` of a ``(batch, *padded)`` grid (built on the CPU, moved to ``device``)."""
    n = spec.tokens
    tp = padded[0] * padded[1] * padded[2]
    tokens = torch.arange(tp).view(1, *padded, 1)
    if spec.shifted:
        tokens = torch.roll(tokens, shifts=tuple(-t for t in spec.shift), dims=(1, 2, 3))
    rows = ref.window_partition(tokens, spec.window).reshape(-1, n)  # (nW, N) grid rows of each window
    members: dict[int, list[int]] = {}
    for wid, bits in enumerate(_patterns(spec, padded)):
        members.setdefault(bits, []).append(wid)
    mask = ref.shift_mask(padded, spec.window, spec.shift, None, dtype)  # (nW, N, N) or None
    offsets = (torch.arange(batch) * tp).view(batch, 1, 1)
    order, groups, start = [], [], 0
    for bits in sorted(members):
        wins = torch.tensor(members[bits])
        order.append((offsets + rows[wins]).reshape(-1))
        stop = start + batch * len(members[bits])
        part = None if bits == 0 else mask[members[bits][0]].view(1, 1, n, n).to(device)
        groups.append((start, stop, part))
        start = stop
    order = torch.cat(order)
    index = _table_rows(spec.window, spec.table_window, spec.bias_coords)
    return _Geometry(order.to(device), torch.argsort(order).to(device), tuple(groups), index.to(device))


_cached_mask_parts = functools.lru_cache(maxsize=16)(_mask_parts)


def _geometry(spec: ref.WindowSpec, padded: tuple, batch: int, dtype, device, tensors) -> _Geometry:
    """:func:`_mask_parts`, reused across calls for plain tensors in eager mode (under tracing, fake or functional
    tensors must not meet tensors made outside)."""
    cache = all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
    return (_cached_mask_parts if cache else _mask_parts)(spec, padded, batch, dtype, device)


def _group_masks(table, geo: _Geometry, spec: ref.WindowSpec, dtype) -> list:
    """Per group of :class:`_Geometry`, the additive ``(1, heads, N, N)`` mask (bias plus the group's shift
    mask; None when there is neither)."""
    bias = None if table is None else _pair_bias(table, geo.index, spec, dtype).unsqueeze(0)
    out = []
    for _, _, mask in geo.groups:
        if bias is None:
            out.append(mask)
        else:
            out.append(bias.contiguous() if mask is None else bias + mask)
    return out


def _windowed(x: Tensor, spec: ref.WindowSpec, qkv_pad, tensors) -> tuple:
    """Pad ``x`` ``(B, D, H, W, ch)`` (with ``qkv_pad`` tokens) and gather it to the windowed layout
    ``(B * nW, N, ch)`` (one copy): returns it, the padded grid and the :class:`_Geometry`."""
    x = ref.pad_grid(x, spec.window, qkv_pad)
    padded = tuple(x.shape[1:4])
    geo = _geometry(spec, padded, x.shape[0], x.dtype, x.device, tensors)
    w = x.reshape(-1, x.shape[-1]).index_select(0, geo.order)
    return w.view(-1, spec.tokens, x.shape[-1]), padded, geo


def _unwindowed(w: Tensor, geo: _Geometry, batch: int, padded: tuple) -> Tensor:
    """Inverse of :func:`_windowed` (without the padding): ``(B * nW, N, ch)`` -> ``(B, Dp, Hp, Wp, ch)``."""
    return w.reshape(-1, w.shape[-1]).index_select(0, geo.inverse).view(batch, *padded, w.shape[-1])


def _heads(w: Tensor, part: int, heads: int) -> Tensor:
    """``(Bw, N, 3C)`` windows -> q (``part`` 0), k (1) or v (2) as a strided ``(Bw, heads, N, head_dim)`` view."""
    bw, n, ch = w.shape
    return w.view(bw, n, 3, heads, ch // (3 * heads))[:, :, part].transpose(1, 2)


class _Windows(NamedTuple):
    """Where the ``aten`` backend reads the windows of a tensor from (and writes them to), chunk by chunk.

    * ``in_place`` (no shift and no padding, a plain partition): ``source`` is the grid ``(B, D, H, W, ch)`` itself,
      read through a strided view, so each chunk is one copy from the grid (and written back with one copy);
      chunks hold whole batch elements (``per_batch`` windows each).
    * otherwise ``source`` is the gathered windowed layout ``(B * nW, N, ch)`` of :func:`_windowed`.
    """
    source: Tensor
    in_place: bool
    per_batch: int


def _grid_windows(t: Tensor, spec: ref.WindowSpec, parts: int) -> Tensor:
    """``(B, D, H, W, parts * heads * d)`` -> the strided view ``(parts, B, nD, nH, nW, heads, wd, wh, ww, d)``
    (window partition without a copy; windows in raster order, as :func:`_mask_parts` orders unshifted grids)."""
    B, D, H, W, _ = t.shape
    wd, wh, ww = spec.window
    v = t.view(B, D // wd, wd, H // wh, wh, W // ww, ww, parts, spec.num_heads, -1)
    return v.permute(7, 0, 1, 3, 5, 8, 2, 4, 6, 9)


def _read_chunk(win: _Windows, a: int, b: int, spec: ref.WindowSpec, parts: int) -> Tensor:
    """Windows ``a:b`` as a new ``(parts, windows * heads, N, d)`` tensor (one copy; q, k, v for ``parts`` 3)."""
    c, n, heads = b - a, spec.tokens, spec.num_heads
    if win.in_place:
        v = _grid_windows(win.source, spec, parts)[:, a // win.per_batch:b // win.per_batch]
    else:
        v = win.source[a:b].view(c, n, parts, heads, -1).permute(2, 0, 3, 1, 4)
    out = torch.empty((parts, c * heads, n, v.shape[-1]), dtype=v.dtype, device=v.device)
    out.view(v.shape).copy_(v)
    return out


def _write_chunk(win: _Windows, a: int, b: int, values: Tensor, spec: ref.WindowSpec, parts: int) -> None:
    """Inverse of :func:`_read_chunk`: ``values`` ``(parts, windows * heads, N, d)`` into windows ``a:b``."""
    c, n, heads = b - a, spec.tokens, spec.num_heads
    if win.in_place:
        v = _grid_windows(win.source, spec, parts)[:, a // win.per_batch:b // win.per_batch]
        v.copy_(values.view(v.shape))
    else:
        d = values.shape[-1]
        win.source[a:b].view(c, n, parts, heads, d).copy_(values.view(parts, c, heads, n, d).permute(1, 3, 0, 2, 4))


def _chunk_windows(spec: ref.WindowSpec) -> int:
    """Windows per chunk of the ``aten`` backend: about :data:`_CHUNK_ELEMENTS` score elements per thread."""
    return max(1, _CHUNK_ELEMENTS * torch.get_num_threads() // (spec.num_heads * spec.tokens * spec.tokens))


def _layout(x: Tensor, spec: ref.WindowSpec, qkv_pad, tensors) -> tuple:
    """``x`` ``(B, D, H, W, ch)`` as :class:`_Windows`, the padded grid and the :class:`_Geometry`.  Read in place
    when there is no shift and no padding and a chunk holds at least one batch element's windows (in-place chunks
    are whole batch elements: fewer would need a view per row of windows); gathered otherwise."""
    grid = tuple(x.shape[1:4])
    padded = tuple(-(-s // w) * w for s, w in zip(grid, spec.window))
    per_batch = math.prod(s // w for s, w in zip(padded, spec.window))
    if spec.shifted or padded != grid or _chunk_windows(spec) < per_batch:
        w, padded, geo = _windowed(x, spec, qkv_pad, tensors)
        return _Windows(w, False, 0), padded, geo
    geo = _geometry(spec, padded, x.shape[0], x.dtype, x.device, tensors)
    return _Windows(x.contiguous(), True, per_batch), padded, geo


def _chunks(geo: _Geometry, win: _Windows, spec: ref.WindowSpec):
    """``(group, a, b)``: the chunks of windows the ``aten`` backend works through, within one shift-mask pattern
    each, of about :data:`_CHUNK_ELEMENTS` score elements per thread (whole batch elements when in place)."""
    step = _chunk_windows(spec)
    if win.in_place:
        step = max(1, step // win.per_batch) * win.per_batch
    for group, (start, stop, _) in enumerate(geo.groups):
        for a in range(start, stop, step):
            yield group, a, min(a + step, stop)


# When a gradient is needed, windows of at most this many tokens go through batched matmuls with the
# probabilities kept for the backward (as the unfused composition does) instead of the flash kernel and a
# recomputation in the backward.  Measured on the 2-core CPU (fwd+bwd of the op at Swin-Unet's four stages, 7x7
# windows = 49 tokens, 1 thread, interleaved, the machine shared): 10-25% less time than the flash route, and no
# more than the unfused composition.  Without a gradient the flash kernel is ~10% faster at those shapes, so
# inference keeps it; SwinUNETR's 7x7x7 windows (343 tokens) keep it too (their probabilities would be 7x the
# size of q, k and v).  The ``cpp`` kernel keeps what this says too: at 343 tokens the log-sum-exp route was as fast
# (a (2, 28^3, C 48) block's training step 232 ms, 235 ms keeping the probabilities) and keeps ~180 MB less.
_PROBS_MAX_TOKENS = 64


def saves_for(spec: ref.WindowSpec, needs_grad: bool) -> str:
    """What the ``aten`` forward keeps for windows of ``spec`` (one of :data:`SAVES`; see
    :data:`_PROBS_MAX_TOKENS`)."""
    return "probabilities" if needs_grad and spec.tokens <= _PROBS_MAX_TOKENS else "logsumexp"


def _aten_forward(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec, saves: str) -> tuple[Tensor, Tensor]:
    """``aten`` backend (CPU): ``(out (B, D, H, W, C), saved)``, one shift-mask pattern of windows at a time (bias
    plus that pattern's mask as one additive mask, broadcast over its windows); roll and partition and their
    inverses are one gather each, or strided views when there is no shift and no padding.

    ``saves == "probabilities"``: chunk by chunk, q, k, v copied out head by head, scores by one
    batched matmul, the mask added in place, the softmax written into ``saved``, the probabilities
    ``(B * nW, heads, N, N)``, and one batched matmul with v.  ``"logsumexp"``: torch's fused CPU flash-attention
    kernel, one call per pattern, ``saved`` its logsumexp ``(B * nW, N, heads)``.  ``saved`` stays in the
    windowed layout: only this backend's backward reads it."""
    with torch.autocast(qkv.device.type, enabled=False):  # float32 (float64) throughout, also under autocast
        return _aten_forward_body(qkv, table, qkv_pad, spec, saves)


def _aten_forward_body(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec, saves: str) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(qkv.dtype)
    grid, batch, heads, n = tuple(qkv.shape[1:4]), qkv.shape[0], spec.num_heads, spec.tokens
    C = qkv.shape[-1] // 3
    if saves != "probabilities":
        w, padded, geo = _windowed(qkv.to(acc), spec, qkv_pad, (qkv, table, qkv_pad))
        outs, lses = [], []
        for (start, stop, _), mask in zip(geo.groups, _group_masks(table, geo, spec, acc)):
            part = w[start:stop]
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(_heads(part, i, heads) for i in range(3)), 0.0, False, attn_mask=mask, scale=spec.scale)
            outs.append(o.transpose(1, 2))  # (windows, N, heads, head_dim), contiguous
            lses.append(lse.transpose(1, 2))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        saved = (lses[0] if len(lses) == 1 else torch.cat(lses)).contiguous()
        out = _unwindowed(out.view(w.shape[0], n, C), geo, batch, padded)
        return ref.crop(out, grid).to(qkv.dtype), saved
    win, padded, geo = _layout(qkv.to(acc), spec, qkv_pad, (qkv, table, qkv_pad))
    masks = _group_masks(table, geo, spec, acc)
    bw = geo.order.shape[0] // n
    probs = torch.empty((bw, heads, n, n), dtype=acc, device=qkv.device)
    if win.in_place:
        out = _Windows(torch.empty(qkv.shape[:-1] + (C,), dtype=acc, device=qkv.device), True, win.per_batch)
    else:
        out = _Windows(torch.empty((bw, n, C), dtype=acc, device=qkv.device), False, 0)
    for group, a, b in _chunks(geo, win, spec):
        c = b - a
        x = _read_chunk(win, a, b, spec, 3)
        s = torch.bmm(x[0].mul_(spec.scale), x[1].transpose(1, 2)).view(c, heads, n, n)
        if masks[group] is not None:
            s.add_(masks[group])
        p = torch._softmax(s, -1, False, out=probs[a:b])
        _write_chunk(out, a, b, torch.bmm(p.view(c * heads, n, n), x[2]).unsqueeze(0), spec, 1)
    result = out.source if win.in_place else _unwindowed(out.source, geo, batch, padded)
    return ref.crop(result, grid).to(qkv.dtype), probs


# The ``aten`` backend works through the windows in chunks of about this many score elements (windows x heads x
# N x N) per CPU thread, so that each chunk's scores, probabilities and their gradients stay in the cache between
# its steps (smaller chunks: more, shorter parallel regions, which lose on a busy machine).
_CHUNK_ELEMENTS = 1 << 20
# The lowest log-probability the backward exponentiates, per compute dtype: below it exp() is subnormal, which
# costs the CPU's exp ~20x (the shift mask's -100 puts most masked pairs there).  The clamped probabilities,
# < 2e-38 instead of 0 to 2e-38, change no float32 result.
_EXP_FLOOR = {torch.float32: math.log(torch.finfo(torch.float32).tiny) + 0.5}


def _aten_backward(dout: Tensor, qkv: Tensor, saved, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    """``aten`` backend (CPU) backward, chunk by chunk of windows of one shift-mask pattern: the probabilities
    the forward kept in ``saved``, or recomputed from the logsumexp it kept there (one batched matmul, the mask
    added and ``exp(s - lse)`` in place), then dV, dP, dS (``P * (dP - rowsum(P * dP))`` in place) and dQ, dK with
    batched matmuls; the bias-table gradient is dS summed over the windows (a fixed order: deterministic).  dq, dk,
    dv go back to the grid in one gather (or one strided copy per chunk when there is no shift and no padding)."""
    with torch.autocast(qkv.device.type, enabled=False):  # float32 (float64) throughout, also under autocast
        return _aten_backward_body(dout, qkv, saved, table, qkv_pad, spec, saves)


def _aten_backward_body(dout: Tensor, qkv: Tensor, saved, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    acc = accumulation_dtype(qkv.dtype)
    grid, batch, heads, n = tuple(qkv.shape[1:4]), qkv.shape[0], spec.num_heads, spec.tokens
    tensors = (qkv, table, qkv_pad)
    win, padded, geo = _layout(qkv.to(acc), spec, qkv_pad, tensors)
    dwin, _, _ = _layout(dout.to(acc), spec, None, tensors)  # cropped outputs: zero gradient
    kept = saves == "probabilities"
    masks = None if kept else _group_masks(table, geo, spec, acc)
    grads = _Windows(torch.empty(win.source.shape, dtype=acc, device=qkv.device), win.in_place, win.per_batch)
    dbias = None if table is None else torch.zeros((heads, n, n), dtype=acc, device=qkv.device)
    floor = _EXP_FLOOR.get(acc)
    for group, a, b in _chunks(geo, win, spec):
        c = b - a
        x = _read_chunk(win, a, b, spec, 3)
        q, k, v = x[0].mul_(spec.scale), x[1], x[2]
        do = _read_chunk(dwin, a, b, spec, 1)[0]
        if kept:  # the forward's probabilities (read only: a second backward reads them again)
            p = saved[a:b].view(c * heads, n, n)
        else:  # recomputed from the forward's logsumexp
            p = torch.bmm(q, k.transpose(1, 2)).view(c, heads, n, n)
            if masks[group] is not None:
                p.add_(masks[group])
            p.sub_(saved[a:b].transpose(1, 2).unsqueeze(-1))
            if floor is not None:
                p.clamp_min_(floor)
            p.exp_()
            p = p.view(c * heads, n, n)
        g = torch.empty_like(x)
        torch.bmm(p.transpose(1, 2), do, out=g[2])
        ds = torch.bmm(do, v.transpose(1, 2)).mul_(p)
        ds.addcmul_(p, ds.sum(-1, keepdim=True), value=-1.0)
        torch.bmm(ds, k, out=g[0]).mul_(spec.scale)
        torch.bmm(ds.transpose(1, 2), q, out=g[1])
        _write_chunk(grads, a, b, g, spec, 3)
        if dbias is not None:
            dbias += ds.view(c, heads, n, n).sum(0)
    dx = grads.source if win.in_place else _unwindowed(grads.source, geo, batch, padded)
    dpad = None
    if qkv_pad is not None and padded == grid:  # nothing padded: no padding token to collect a gradient
        dpad = torch.zeros_like(qkv_pad)
    elif qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        real = torch.zeros(padded, dtype=torch.bool, device=qkv.device)
        real[:grid[0], :grid[1], :grid[2]] = True
        dpad = dx[:, ~real].sum(dim=(0, 1)).to(qkv_pad.dtype)
    dtable = None
    if table is not None:  # the bias is shared by every window: dS summed over them, scattered to table rows
        dtable = _table_grad(table, geo.index, dbias)
    return ref.crop(dx, grid).to(qkv.dtype), dtable, dpad


# The ``cpp`` backend runs csrc/window_attention_cpu.cpp for windows of at most this many tokens (Swin-Unet's 7x7
# = 49, SwinUNETR's 7x7x7 = 343, 8x8x8, Swin V2's 12x12 / 16x16) and the ``aten`` backend's code for larger ones
# (its scratch holds a few N x N matrices per thread).  Measured on the 2-core CPU (the op alone, 2 threads,
# interleaved, medians, fwd+bwd / forward): 7x7x7 on (2, 28^3, C 48, 3 heads) 1.61x / 1.48x the ``aten`` code
# (torch's flash-attention CPU kernel and the recomputing backward), 8x8x8 1.70x / 1.48x, 12x12 2.1x / 2.2x, 16x16
# 1.43x / 1.34x.
_CPP_MAX_TOKENS = 512


def _cpp_native(spec: ref.WindowSpec, *tensors) -> bool:
    """Whether the ``cpp`` backend runs its C++ kernel (else the ``aten`` code): windows of at most
    :data:`_CPP_MAX_TOKENS` tokens and real CPU tensors (under tracing, the traceable ``aten`` code)."""
    return spec.tokens <= _CPP_MAX_TOKENS and not any(t is not None and traced(t) for t in tensors)


@functools.lru_cache(maxsize=16)
def _saved_slots(spec: ref.WindowSpec, padded: tuple, batch: int) -> Tensor:
    """``(B * nW,)``: the row of the saved probabilities / log-sum-exp of each window (raster order: batch, then
    cells), in the ``aten`` backend's order (:func:`_mask_parts`: by shift-mask pattern, then batch, then cells), so
    that both backends, and traced calls of the ``cpp`` one, keep the same tensor."""
    bits = torch.tensor(_patterns(spec, padded), dtype=torch.long)
    raster = torch.arange(batch * bits.numel())
    order = torch.argsort(bits.repeat(batch) * raster.numel() + raster)
    return torch.empty_like(raster).index_copy_(0, order, raster)


def _cpp_operands(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec, with_bias: bool = True) -> tuple:
    """qkv, the ``(heads, N, N)`` bias of every pair (None when ``with_bias`` is False: a backward from the kept
    probabilities does not read it) and the padding token, contiguous in the compute dtype, and the windows'
    :func:`_saved_slots`."""
    acc = accumulation_dtype(qkv.dtype)
    padded = tuple(-(-s // w) * w for s, w in zip(qkv.shape[1:4], spec.window))
    slots = _saved_slots(spec, padded, qkv.shape[0])
    rows = _cached_table_rows(spec.window, spec.table_window, spec.bias_coords)
    bias = None if table is None or not with_bias else _pair_bias(table, rows, spec, acc)
    pad = None if qkv_pad is None else qkv_pad.to(acc).contiguous()
    return qkv.to(acc).contiguous(), bias, pad, slots


def _cpp_forward(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec, saves: str) -> tuple[Tensor, Tensor]:
    """``cpp`` backend (CPU): csrc/window_attention_cpu.cpp, one pass per (window, head) straight from the token
    grid (shift, partition and padding by index; no copies of the grid), keeping the probabilities
    ``(B * nW, heads, N, N)`` (``saves == "probabilities"``) or the log-sum-exp ``(B * nW, N, heads)``; windows
    of more than :data:`_CPP_MAX_TOKENS` tokens and traced calls run :func:`_aten_forward`."""
    if not _cpp_native(spec, qkv, table, qkv_pad):  # contiguous like the kernel's (traced: the same strides)
        out, saved = _aten_forward(qkv, table, qkv_pad, spec, saves)
        return out.contiguous(), saved
    x, bias, pad, slots = _cpp_operands(qkv, table, qkv_pad, spec)
    out, saved = _ext.load().window_attention_forward_cpu(x, bias, pad, slots, spec.num_heads, list(spec.window),
                                                          list(spec.shift), spec.scale, saves == "probabilities")
    return out.to(qkv.dtype), saved


def _cpp_backward(dout: Tensor, qkv: Tensor, saved, table, qkv_pad, spec: ref.WindowSpec, saves: str):
    """``cpp`` backend (CPU) backward: dq, dk, dv in one pass per (window, head) from the kept probabilities (or
    recomputed from the log-sum-exp), written straight to the grid; the bias-table and padding-token gradients
    summed per fixed block of windows, blocks added in order (deterministic for any number of threads)."""
    if not _cpp_native(spec, dout, qkv, saved, table, qkv_pad):
        dqkv, dtable, dpad = _aten_backward(dout, qkv, saved, table, qkv_pad, spec, saves)
        return dqkv.contiguous(), dtable, dpad
    x, bias, pad, slots = _cpp_operands(qkv, table, qkv_pad, spec, with_bias=saves != "probabilities")
    dqkv, dbias, dpad = _ext.load().window_attention_backward_cpu(
        dout.to(x.dtype).contiguous(), x, saved, bias, pad, slots, spec.num_heads, list(spec.window), list(spec.shift),
        spec.scale, saves == "probabilities", table is not None)
    rows = _cached_table_rows(spec.window, spec.table_window, spec.bias_coords)
    dtable = None if table is None else _table_grad(table, rows, dbias)
    return dqkv.to(qkv.dtype), dtable, None if qkv_pad is None else dpad.to(qkv_pad.dtype)


_ATTENTION = _backend.Implementations("attention", "fastmed.ops.attention",
                                      reference=F.scaled_dot_product_attention)
_FORWARD = _backend.Implementations("window_attention", "fastmed::window_attention_fwd",
                                    triton=_triton_forward, cpp=_cpp_forward, aten=_aten_forward,
                                    reference=_reference_forward)
_BACKWARD = _backend.Implementations("window_attention", "fastmed::window_attention_bwd",
                                     triton=_triton_backward, cpp=_cpp_backward, aten=_aten_backward,
                                     reference=_reference_backward)

# The torch.library ops take the tensors, then the WindowSpec's fields flat (its field order), then ``saves`` (one
# of SAVES) and the backend.
_NON_TENSOR_GRADS = (None,) * (len(ref.WindowSpec._fields) + 2)  # the spec's fields, saves and the backend name


def _grid5(t: Tensor) -> Tensor:
    """A 2D token grid ``(B, H, W, ...)`` as the 3D grid ``(B, 1, H, W, ...)`` the implementations take."""
    return t.unsqueeze(1) if t.dim() == 4 else t


@triton_op("fastmed::window_attention_fwd", mutates_args=())
def _window_attention_fwd(qkv: Tensor, table: Optional[Tensor], qkv_pad: Optional[Tensor], num_heads: int,
                          window: list[int], shift: list[int], scale: float, table_window: list[int],
                          bias_coords: list[int], saves: str, backend: str) -> tuple[Tensor, Tensor]:
    """``qkv`` ``(B, H, W, 3C)`` or ``(B, D, H, W, 3C)`` -> ``(out, lse)``, ``out`` of ``qkv``'s rank (a tensor of its
    own, not a view, so that callers may modify it in place); ``lse``: what the backend's backward reads (for the
    ``aten`` backend the logsumexp or the probabilities, as ``saves`` says)."""
    spec = ref.WindowSpec.from_flat(num_heads, window, shift, scale, table_window, bias_coords)
    out, lse = _FORWARD[backend](_grid5(qkv), table, qkv_pad, spec, saves)
    # detach(): the squeezed output must not be a view (autograd forbids modifying views of a multi-output node).
    return (out.squeeze(1).detach() if qkv.dim() == 4 else out), lse


@triton_op("fastmed::window_attention_bwd", mutates_args=())
def _window_attention_bwd(dout: Tensor, qkv: Tensor, lse: Optional[Tensor], table: Optional[Tensor],
                          qkv_pad: Optional[Tensor], num_heads: int, window: list[int], shift: list[int],
                          scale: float, table_window: list[int], bias_coords: list[int], saves: str,
                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``lse``: the forward's second output where the backend's backward reads it (None for the reference, which
    recomputes the attention from ``qkv``), ``saves`` the forward's.  No backend reads the forward's output."""
    spec = ref.WindowSpec.from_flat(num_heads, window, shift, scale, table_window, bias_coords)
    dqkv, dtable, dpad = _BACKWARD[backend](_grid5(dout), _grid5(qkv), lse, table, qkv_pad, spec, saves)
    # Absent gradients travel as empty tensors (custom ops return no None).
    return (dqkv.squeeze(1).detach() if qkv.dim() == 4 else dqkv, dtable if dtable is not None else qkv.new_empty(0),
            dpad if dpad is not None else qkv.new_empty(0))


def _setup_context(ctx, inputs, output):
    qkv, table, qkv_pad, *spec_fields, saves, backend = inputs
    _out, lse = output
    # No backward reads the output (the kernels compute rowsum(dO * O) as rowsum(P * dP); the reference recomputes
    # everything from qkv), so the caller may modify it in place (as with the unfused composition).
    ctx.save_for_backward(qkv, lse if backend != "reference" else None, table, qkv_pad)
    # What the backward reads gets no gradient, and none is filled with zeros for it (a (B * nW, heads, N, N)
    # tensor of zeros a call where the probabilities are kept).
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.spec = ref.WindowSpec.from_flat(*spec_fields)
    ctx.saves, ctx.backend = saves, backend


def _backward(ctx, dout, _dlse):
    qkv, lse, table, qkv_pad = ctx.saved_tensors
    spec = ctx.spec
    if dout is None:  # an undefined output gradient (not materialized as zeros): no gradient flows back
        return (None, None, None) + _NON_TENSOR_GRADS
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dout, qkv, table, qkv_pad)):
        # Double backward (create_graph=True): the first-order gradient must itself be differentiable, so it is
        # computed by the reference's plain torch composition, which autograd differentiates again, on every
        # backend (the kernels' gradients would carry no graph).
        dqkv, dtable, dpad = ref.window_attention_backward(_grid5(dout), _grid5(qkv), table, qkv_pad, spec)
        dqkv = dqkv.squeeze(1) if qkv.dim() == 4 else dqkv
    else:
        dqkv, dtable, dpad = _direct.backward_op(ctx, _window_attention_bwd)(
            dout, qkv, lse, table, qkv_pad, *spec.flat(), ctx.saves, ctx.backend)
    return (dqkv, dtable if table is not None else None, dpad if qkv_pad is not None else None) + _NON_TENSOR_GRADS


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_WindowAttentionDirect = _direct.autograd_function("_WindowAttentionDirect", _window_attention_fwd, _setup_context,
                                                   _backward)


def _call_spec(grid: tuple, heads: int, window: tuple, shift: tuple, scale: float, bias_index: str) -> ref.WindowSpec:
    """The kernels' view of a call on a token grid of spatial size ``grid`` (validated arguments): the window and
    shift after MONAI's shrinking, as 3D, and the table's window and the bias coordinates per ``bias_index``."""
    nd = len(grid)
    eff_window, eff_shift = ref.effective_window(grid, window, shift)
    lead = (1,) * (3 - nd)
    win3 = lead + eff_window
    table_window = lead + window
    return ref.WindowSpec(heads, win3, (0,) * (3 - nd) + eff_shift, scale, table_window,
                          win3 if bias_index == "coords" else table_window)


# for cpu_inference (not under torch.compile, where window_attention builds the spec each call: dynamo traces
# through an lru_cache and warns)
_cached_call_spec = functools.lru_cache(maxsize=256)(_call_spec)


def cpu_inference(qkv: Tensor, num_heads: int, window: tuple, shift: tuple, table: Optional[Tensor], scale: float,
                  qkv_pad: Optional[Tensor], bias_index: str) -> Optional[Tensor]:
    """:func:`window_attention` for a module's own, already-checked arguments (``window`` and ``shift`` tuples of
    ints per axis, ``0 <= shift < window``; ``scale`` a float), without autograd, straight into the ``cpp``
    backend's C++ kernel: no op dispatch and nothing kept for a backward (the kernel skips the log-sum-exp).  The
    same kernel and the same result as :func:`window_attention`; None where that call would not run this kernel
    (grad mode on, a backend other than ``cpp`` chosen or forced, not a contiguous float32 CPU ``qkv``,
    ``(B, *grid, 3C)`` with ``len(window)`` spatial axes, a table or padding token of another shape, dtype or
    device, windows of more than :data:`_CPP_MAX_TOKENS` tokens, torch.compile): call :func:`window_attention`
    then, which also raises the errors."""
    nd = len(window)
    if (torch.is_grad_enabled() or type(qkv) is not Tensor or qkv.device.type != "cpu" or qkv.dtype != torch.float32
            or qkv.dim() != nd + 2 or not 2 <= nd <= 3 or not qkv.is_contiguous() or torch.compiler.is_compiling()):
        return None
    C3 = qkv.shape[-1]
    if C3 % (3 * num_heads) != 0:
        return None
    for t, shape in ((table, (math.prod(2 * w - 1 for w in window), num_heads)), (qkv_pad, (C3,))):
        if t is not None and (type(t) not in (Tensor, torch.nn.Parameter) or t.device.type != "cpu"
                              or t.dtype != torch.float32 or tuple(t.shape) != shape):
            return None
    if _backend.choose("window_attention", qkv.device) != "cpp":  # (chosen only where fastmed._C is built)
        return None
    spec = _cached_call_spec(tuple(qkv.shape[1:-1]), num_heads, window, shift, scale, bias_index)
    if spec.tokens > _CPP_MAX_TOKENS:
        return None
    x, bias, pad, slots = _cpp_operands(_grid5(qkv), table, qkv_pad, spec)
    out, _ = _ext.load().window_attention_forward_cpu(x, bias, pad, slots, num_heads, list(spec.window),
                                                      list(spec.shift), spec.scale, False, save=False)
    return out.view(qkv.shape[:-1] + (C3 // 3,))


def window_attention(qkv: Tensor, num_heads: int, window_size: Union[int, Sequence[int]],
                     shift_size: Union[int, Sequence[int]] = 0, rel_pos_bias_table: Optional[Tensor] = None,
                     scale: Optional[float] = None, *, qkv_pad: Optional[Tensor] = None,
                     bias_index: str = "coords") -> Tensor:
    """Swin (shifted-)window multi-head self-attention, computed straight on the token grid.

    Per window of ``N = prod(window)`` tokens and per head: ``softmax(q k^T * scale + B_rel + M_shift) v``, with
    the cyclic shift, window partition, relative position bias, shifted-window mask (-100 between regions, as
    timm / Swin-Unet / MONAI), window reverse and roll back all inside the kernels on CUDA (Triton).  On CPU,
    ``auto`` uses the ``cpp`` backend when ``fastmed._C`` is built: for windows of at most 512 tokens one C++ pass
    per window straight on the token grid (shift, partition and padding by index), keeping the probabilities for
    the backward when a gradient is needed and windows have at most 64 tokens, else the log-sum-exp (the backward
    recomputes the probabilities); for larger windows (and under tracing) the ``aten`` backend's code:
    torch's fused flash-attention CPU kernel over the windows with bias and mask as its additive mask or, for
    windows of at most 64 tokens when a gradient is needed, batched matmuls keeping the probabilities; roll and
    partition as one gather, or strided views without shift and padding (the ``reference`` backend is the
    oracle).  The output projection is not included.

    Args:
        qkv: ``(B, H, W, 3C)`` or ``(B, D, H, W, 3C)``: the qkv Linear applied to the token grid, channels in
            its order ``reshape(..., 3, num_heads, C // num_heads)`` (timm / Swin-Unet / MONAI).
            float16/bfloat16/float32/float64; softmax and accumulation in float32 (float64 for float64).
        num_heads: number of heads; must divide ``C``.
        window_size: window per spatial axis (int or one per axis), each >= 1.
        shift_size: cyclic shift per axis, ``0 <= shift < window`` (``window // 2`` for SW-MSA blocks).
        rel_pos_bias_table: ``(prod(2 * window - 1), num_heads)`` relative position bias table, or None.
        scale: score scale (finite), default ``head_dim ** -0.5``.
        qkv_pad: ``(3C,)``: the qkv of a padding token (the qkv Linear's bias; None means zeros).  Used only
            when the grid is not divisible by the (shrunk) window.
        bias_index: which table row a pair uses when a window shrinks (see below): ``"coords"`` (default)
            looks the bias up by the pair's displacement; ``"monai"`` reproduces MONAI's
            ``relative_position_index[:n, :n]`` slice of the full window's index.  Identical otherwise.

    Window shrinking and padding (MONAI / Swin semantics):
        * on an axis where the grid is not larger than the window, the window becomes the grid size and the
          shift on that axis 0;
        * a grid not divisible by the (shrunk) window is padded at the end of each axis up to a multiple of it
          with tokens whose qkv is ``qkv_pad``.  This equals MONAI's ``SwinTransformerBlock``, which zero-pads
          the normalized tokens *before* the qkv Linear (so padded tokens take part through the qkv bias) and
          builds the shift mask on the padded grid; the padded rows are cropped from the result.  Pass the qkv
          Linear's bias as ``qkv_pad`` (its gradient then flows into that bias).  The Triton kernels never
          materialize the padded grid: padding tokens are read from ``qkv_pad`` by index.

    Returns:
        ``(B, H, W, C)`` / ``(B, D, H, W, C)`` in ``qkv``'s dtype.  Differentiable with respect to ``qkv``,
        ``rel_pos_bias_table`` and ``qkv_pad``; the backward is deterministic.  Twice differentiable on every
        backend: when the backward itself must be differentiated (``create_graph=True``, e.g. a gradient
        penalty), the first-order gradient comes from the reference's plain PyTorch composition.
    """
    check_tensor(qkv, "qkv", min_ndim=4, max_ndim=5)
    nd = qkv.dim() - 2
    heads = check_int(num_heads, "num_heads", 1)
    if qkv.shape[-1] % 3 != 0:
        raise ValueError(f"qkv's last dimension must be 3 * C (q, k and v of C channels each), got "
                         f"{qkv.shape[-1]}, which is not divisible by 3")
    C = qkv.shape[-1] // 3
    if C % heads != 0:
        raise ValueError(f"num_heads must divide the C={C} channels (qkv's last dimension {qkv.shape[-1]} = 3 * C), "
                         f"got num_heads={heads}")
    window = check_per_axis(window_size, "window_size", nd, 1)
    shift = check_per_axis(shift_size, "shift_size", nd, 0)
    for a, (w, s) in enumerate(zip(window, shift)):
        if s >= w:
            raise ValueError(f"shift_size must be smaller than window_size on every axis, got shift_size={shift} "
                             f"with window_size={window} (axis {a})")
    n_table = 1
    for w in window:
        n_table *= 2 * w - 1
    if rel_pos_bias_table is not None:
        check_tensor(rel_pos_bias_table, "rel_pos_bias_table")
        if tuple(rel_pos_bias_table.shape) != (n_table, heads):
            raise ValueError(f"rel_pos_bias_table must have shape (prod(2 * window_size - 1), num_heads) = "
                             f"({n_table}, {heads}) for window_size={window}, got {tuple(rel_pos_bias_table.shape)}")
    if qkv_pad is not None:
        check_tensor(qkv_pad, "qkv_pad")
        if tuple(qkv_pad.shape) != (3 * C,):
            raise ValueError(f"qkv_pad must have shape ({3 * C},) (the qkv of one padding token), "
                             f"got {tuple(qkv_pad.shape)}")
    scale = (C // heads) ** -0.5 if scale is None else check_number(scale, "scale")
    if not isinstance(bias_index, str):
        raise TypeError(f"bias_index must be a string ('coords' or 'monai'), got {type(bias_index).__name__}")
    check_choice(bias_index, "bias_index", BIAS_INDEX)
    device = check_same_device(qkv=qkv, rel_pos_bias_table=rel_pos_bias_table, qkv_pad=qkv_pad)

    spec = _call_spec(tuple(qkv.shape[1:-1]), heads, window, shift, float(scale), bias_index)
    backend = _backend.choose("window_attention", device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, rel_pos_bias_table, qkv_pad))
    out, _ = _direct.call(_window_attention_fwd, _WindowAttentionDirect, qkv, rel_pos_bias_table, qkv_pad,
                          *spec.flat(), saves_for(spec, needs_grad), backend)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Global multi-head attention ``softmax(q k^T * scale + bias) v`` (ViT, TransUNet, SAM's global blocks).

    Routed to ``torch.nn.functional.scaled_dot_product_attention``: torch picks the flash / cuDNN /
    memory-efficient kernel on CUDA (the flash kernel only without ``bias``) and the math kernel on CPU.

    Args:
        q: ``(B, heads, Lq, head_dim)``; k, v: ``(B, heads, Lk, head_dim)``, same dtype and device.
        bias: additive float bias broadcastable to ``(B, heads, Lq, Lk)``, or None.
        scale: finite, default ``head_dim ** -0.5``.

    Returns:
        ``(B, heads, Lq, head_dim)``; differentiable with respect to ``q``, ``k``, ``v`` and ``bias``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, min_ndim=4, max_ndim=4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, heads, Lq, head_dim) and k (B, heads, Lk, head_dim) must agree in B, heads and "
                         f"head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bias is not None:
        check_tensor(bias, "bias")
        try:
            torch.broadcast_shapes(bias.shape, target)
        except RuntimeError:
            raise ValueError(f"bias must broadcast to (B, heads, Lq, Lk) = {target}, got {tuple(bias.shape)}") from None
        bias = bias.to(q.dtype)
    if scale is not None:  # NaN / inf would give all-NaN or all-zero attention
        scale = check_number(scale, "scale")
    device = check_same_device(q=q, k=k, v=v, bias=bias)
    backend = _backend.choose("attention", device)  # raises if a forced backend cannot run attention
    return _ATTENTION[backend](q, k, v, attn_mask=bias, scale=scale)
