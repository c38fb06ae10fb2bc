"""Plain PyTorch reference of SAM's attention with decomposed relative position (``fastmed.ops.sam_attention``).

SAM's image encoder (``segment_anything.modeling.image_encoder``) runs, per block, multi-head attention on a
``(B, H, W, C)`` token grid, either in ``window x window`` windows (the grid zero-padded at the end of each axis to a
multiple of the window *before* the qkv Linear, so padding tokens carry the qkv bias) or globally (the window is the
whole grid).  Inside a window of ``(WH, WW)`` tokens the score of query ``(qh, qw)`` and key ``(kh, kw)`` is

    ``(q * scale) . k + q . R_h[qh - kh + WH - 1] + q . R_w[qw - kw + WW - 1]``

(``add_decomposed_rel_pos`` with ``q_size == k_size``; ``q`` unscaled in the bias), ``R_h`` of shape
``(2 * WH - 1, head_dim)`` and ``R_w`` of ``(2 * WW - 1, head_dim)``, shared by the heads.  SAM interpolates a table
whose length differs from ``2 * size - 1``; fastmed supports only the exact lengths (what SAM's checkpoints hold).

The helpers :func:`rel_pos_rows` and :func:`decomposed_bias` build the q-dependent bias from the tables with
matmuls only (no gather, no scatter in the backward), so their gradients are deterministic; the Triton launchers use
them too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastmed._tensors import accumulation_dtype

GLOBAL = 0  # window_size of a global-attention block


class SamAttentionSpec(NamedTuple):
    """``num_heads``; ``window``: ``(WH, WW)`` tokens per window (the grid itself for global attention);
    ``scale``: the score scale (``head_dim ** -0.5`` in SAM)."""
    num_heads: int
    window: tuple
    scale: float

    def flat(self) -> tuple:
        return self.num_heads, list(self.window), self.scale

    @classmethod
    def from_flat(cls, num_heads: int, window, scale: float) -> SamAttentionSpec:
        return cls(int(num_heads), tuple(int(w) for w in window), float(scale))


def rel_pos_onehot(size: int, dtype: torch.dtype, device) -> Tensor:
    """``(size * size, 2 * size - 1)``: row ``i * size + j`` is one at column ``i - j + size - 1``."""
    i = torch.arange(size, device=device)
    index = (i[:, None] - i[None, :] + size - 1).reshape(-1)
    return (index[:, None] == torch.arange(2 * size - 1, device=device)[None, :]).to(dtype)


def rel_pos_rows(rel_pos: Tensor, size: int) -> Tensor:
    """``(2 * size - 1, head_dim)`` table -> ``(size, size, head_dim)`` with ``[i, j] = rel_pos[i - j + size - 1]``
    (``get_rel_pos(size, size, rel_pos)``), built as a one-hot matmul so its backward is a matmul too."""
    return (rel_pos_onehot(size, rel_pos.dtype, rel_pos.device) @ rel_pos).view(size, size, -1)


def decomposed_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, window) -> tuple[Tensor, Tensor]:
    """The decomposed bias of every token on the real grid.

    Args:
        q: ``(B, H, W, heads, head_dim)`` unscaled queries.
        rel_pos_h, rel_pos_w: ``(2 * WH - 1, head_dim)``, ``(2 * WW - 1, head_dim)``.
        window: ``(WH, WW)``.

    Returns:
        ``rel_h (B, H, W, heads, WH)`` with ``rel_h[b, y, x, n, j] = q[b, y, x, n] . R_h[y % WH - j + WH - 1]``
        (the bias towards keys in window row ``j``) and ``rel_w (B, H, W, heads, WW)`` likewise over columns, in
        the accumulation dtype.
    """
    WH, WW = window
    H, W = q.shape[1], q.shape[2]
    acc = accumulation_dtype(q.dtype)
    rh = rel_pos_rows(rel_pos_h.to(acc), WH).repeat(-(-H // WH), 1, 1)[:H]  # (H, WH, hd), row y -> y % WH
    rw = rel_pos_rows(rel_pos_w.to(acc), WW).repeat(-(-W // WW), 1, 1)[:W]
    qa = q.to(acc)
    return torch.einsum("byxnc,ykc->byxnk", qa, rh), torch.einsum("byxnc,xkc->byxnk", qa, rw)


def decomposed_bias_backward(q: Tensor, drel_h: Tensor, drel_w: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                             window) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`decomposed_bias`, explicitly (matmuls and fixed-order sums only: deterministic).

    Args:
        q: ``(B, H, W, heads, head_dim)``; drel_h, drel_w: gradients of ``rel_h``, ``rel_w``.

    Returns:
        ``(dq (B, H, W, heads, head_dim), drel_pos_h, drel_pos_w)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    qa = q.to(acc)
    grads = [None, None]
    dq = None
    for axis, (d, table, side) in enumerate(((drel_h, rel_pos_h, window[0]), (drel_w, rel_pos_w, window[1]))):
        n = q.shape[1 + axis]
        reps = -(-n // side)
        onehot = rel_pos_onehot(side, acc, q.device)
        rows = (onehot @ table.to(acc)).view(side, side, -1).repeat(reps, 1, 1)[:n]
        eq = "byxnk,ykc->byxnc" if axis == 0 else "byxnk,xkc->byxnc"
        dq_axis = torch.einsum(eq, d.to(acc), rows)
        dq = dq_axis if dq is None else dq + dq_axis
        drows = torch.einsum("byxnk,byxnc->ykc" if axis == 0 else "byxnk,byxnc->xkc", d.to(acc), qa)
        drows = torch.cat([drows, drows.new_zeros(reps * side - n, side, drows.shape[-1])]).view(reps, side, side, -1)
        grads[axis] = onehot.t() @ drows.sum(0).reshape(side * side, -1)
    return dq, grads[0], grads[1]


def _pieces(n: int, w: int) -> list[tuple[slice, slice, slice]]:
    """``n`` grid positions cut into windows of ``w``: ``(grid slice, window-index slice, in-window slice)`` for the
    full windows and, if ``w`` does not divide ``n``, the last (partly padding) one."""
    full, rest = divmod(n, w)
    parts = [(slice(0, full * w), slice(0, full), slice(0, w))] if full else []
    if rest:
        parts.append((slice(full * w, n), slice(full, full + 1), slice(0, rest)))
    return parts


def _windowed(t: Tensor, pad: Optional[Tensor], spec: SamAttentionSpec, groups: int = 3) -> Tensor:
    """``t (B, H, W, groups * C)`` (qkv: ``groups=3``) -> ``(groups, B * nW, heads, L, head_dim)`` in the
    accumulation dtype, window by window (SAM's ``window_partition`` order), the grid padded at the end of each
    axis with the token ``pad (groups * C,)`` (zeros when None), written in one strided copy (no padded grid in
    between)."""
    B, H, W, CG = t.shape
    heads = spec.num_heads
    hd = CG // groups // heads
    WH, WW = spec.window
    nh, nw = -(-H // WH), -(-W // WW)
    acc = accumulation_dtype(t.dtype)
    out = torch.empty(groups, B, nh, nw, heads, WH, WW, hd, dtype=acc, device=t.device)
    grid = out.permute(1, 2, 5, 3, 6, 0, 4, 7)  # (B, nh, WH, nw, WW, groups, heads, hd)
    src = t.view(B, H, W, groups, heads, hd)
    for gh, ih, jh in _pieces(H, WH):
        for gw, iw, jw in _pieces(W, WW):
            grid[:, ih, jh, iw, jw] = src[:, gh, gw].reshape(B, ih.stop - ih.start, jh.stop, iw.stop - iw.start,
                                                             jw.stop, groups, heads, hd)
    if H % WH or W % WW:
        pad = (torch.zeros(groups, heads, hd, dtype=acc, device=t.device) if pad is None
               else pad.to(acc).view(groups, heads, hd))
        if H % WH:
            grid[:, nh - 1, H % WH:] = pad
        if W % WW:
            grid[:, :, :, nw - 1, W % WW:] = pad
    return out.view(groups, B * nh * nw, heads, WH * WW, hd)


def _grid_view(t: Tensor, B: int, size, window) -> Tensor:
    """``(k, B * nW, heads, L, d)`` windows seen as the padded grid ``(B, nWh, WH, nWw, WW, k, heads, d)``."""
    k, _, heads, _, d = t.shape
    WH, WW = window
    nh, nw = -(-size[0] // WH), -(-size[1] // WW)
    return t.view(k, B, nh, nw, heads, WH, WW, d).permute(1, 2, 5, 3, 6, 0, 4, 7)


def _to_grid(t: Tensor, B: int, size, window) -> Tensor:
    """``(k, B * nW, heads, L, d)`` windows -> ``(B, H, W, k * heads * d)`` cropped to ``size = (H, W)``, in one
    strided copy."""
    k, _, heads, _, d = t.shape
    H, W = size
    grid = _grid_view(t, B, size, window)
    out = t.new_empty(B, H, W, k * heads * d)  # returned itself (not a view: the op's output may be modified)
    dst = out.view(B, H, W, k, heads, d)
    for gh, ih, jh in _pieces(H, window[0]):
        for gw, iw, jw in _pieces(W, window[1]):
            dst[:, gh, gw].view(B, ih.stop - ih.start, jh.stop, iw.stop - iw.start, jw.stop, k, heads, d).copy_(
                grid[:, ih, jh, iw, jw])
    return out


def _padding_sum(t: Tensor, B: int, size, window) -> Tensor:
    """``(k * heads * d,)``: the sum of the windows ``t (k, B * nW, heads, L, d)`` over the padding positions."""
    H, W = size
    WH, WW = window
    grid = _grid_view(t, B, size, window)
    nh, nw = grid.shape[1], grid.shape[3]
    total = t.new_zeros(grid.shape[5:])
    if H % WH:
        total = total + grid[:, nh - 1, H % WH:].sum(dim=(0, 1, 2, 3))
    if W % WW:
        total = total + grid[:, :, :, nw - 1, W % WW:].sum(dim=(0, 1, 2, 3))
    if H % WH and W % WW:  # the corner was counted twice
        total = total - grid[:, nh - 1, H % WH:, nw - 1, W % WW:].sum(dim=(0, 1, 2))
    return total.reshape(-1)


def _bias_rows(rel_pos_h: Tensor, rel_pos_w: Tensor, window, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(WH, WH, head_dim)`` and ``(WW, WW, head_dim)``: ``get_rel_pos`` of both tables, in ``dtype``."""
    return rel_pos_rows(rel_pos_h.to(dtype), window[0]), rel_pos_rows(rel_pos_w.to(dtype), window[1])


def _scores(qkvw: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, spec: SamAttentionSpec) -> Tensor:
    """Scores with the decomposed bias ``(B * nW, heads, L, L)`` of the windows ``qkvw (3, B * nW, heads, L, d)``
    (``add_decomposed_rel_pos`` per window: the bias depends on the position inside the window only)."""
    WH, WW = spec.window
    qw, kw = qkvw[0], qkvw[1]
    rh_rows, rw_rows = _bias_rows(rel_pos_h, rel_pos_w, spec.window, qw.dtype)
    q5 = qw.view(*qw.shape[:2], WH, WW, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q5, rh_rows)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q5, rw_rows)
    s = (qw * spec.scale) @ kw.transpose(-2, -1)
    # in place on the fresh scores (the matmul's backward does not read its output; the adds' neither)
    s.view(*s.shape[:2], WH, WW, WH, WW).add_(rel_h[..., :, None]).add_(rel_w[..., None, :])
    return s


def sam_attention_forward(qkv: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, qkv_pad: Optional[Tensor],
                          spec: SamAttentionSpec) -> tuple[Tensor, Tensor]:
    """SAM's windowed / global attention with decomposed relative position, as SAM computes it.

    Args:
        qkv: ``(B, H, W, 3C)``, channels ``reshape(3, heads, head_dim)``.
        rel_pos_h, rel_pos_w: ``(2 * WH - 1, head_dim)``, ``(2 * WW - 1, head_dim)``.
        qkv_pad: ``(3C,)`` qkv of a padding token (the qkv Linear's bias) or None (zeros).
        spec: :class:`SamAttentionSpec`.

    Returns:
        ``(out (B, H, W, C) in qkv's dtype, probs (B * nW, heads, L, L))``: ``probs`` is the softmax (accumulation
        dtype, ``L = WH * WW``), which :func:`sam_attention_backward` reuses instead of recomputing it (the op keeps
        it for the backward, as autograd keeps segment_anything's).
    """
    B, H, W, _ = qkv.shape
    qkvw = _windowed(qkv, qkv_pad, spec)
    p = torch.softmax(_scores(qkvw, rel_pos_h, rel_pos_w, spec), dim=-1)
    out = _to_grid((p @ qkvw[2]).unsqueeze(0), B, (H, W), spec.window)
    return out.to(qkv.dtype), p


def sam_attention_backward(dout: Tensor, qkv: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                           qkv_pad: Optional[Tensor], spec: SamAttentionSpec, probs: Optional[Tensor] = None):
    """Gradients ``(dqkv (B, H, W, 3C), drel_pos_h, drel_pos_w, dqkv_pad (3C,) or None)`` by the explicit softmax
    backward window by window (plain differentiable torch ops, so autograd can differentiate it again;
    deterministic: matmuls and fixed-order sums).  ``probs``: the forward's softmax
    (:func:`sam_attention_forward`), else it is recomputed."""
    B, H, W, C3 = qkv.shape
    WH, WW = spec.window
    qkvw = _windowed(qkv, qkv_pad, spec)
    qw, kw, vw = qkvw.unbind(0)
    p = torch.softmax(_scores(qkvw, rel_pos_h, rel_pos_w, spec), dim=-1) if probs is None else probs
    do = _windowed(dout, None, spec, groups=1)[0]  # cropped (padding) outputs: zero gradient
    differentiable = torch.is_grad_enabled()  # create_graph: no out= (autograd cannot differentiate it)
    dqkvw = None if differentiable else torch.empty_like(qkvw)
    dp = do @ vw.transpose(-2, -1)
    ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - rowsum(dp * p)), one kernel
    if differentiable:
        dv = p.transpose(-2, -1) @ do
        dk = (ds.transpose(-2, -1) @ qw).mul_(spec.scale)  # in place on fresh matmul outputs (not read by backward)
        dq = (ds @ kw).mul_(spec.scale)
    else:  # straight into one (3, B*nW, heads, L, d) buffer
        dq, dk, dv = dqkvw.unbind(0)
        torch.matmul(p.transpose(-2, -1), do, out=dv)
        torch.matmul(ds.transpose(-2, -1), qw, out=dk).mul_(spec.scale)
        torch.matmul(ds, kw, out=dq).mul_(spec.scale)
    # the decomposed bias: d rel_h = row sums of ds over key columns, d rel_w over key rows
    ds6 = ds.view(*ds.shape[:2], WH, WW, WH, WW)
    dh, dw = ds6.sum(-1), ds6.sum(-2)  # (B*nW, heads, WH, WW, WH), (..., WW)
    rh_rows, rw_rows = _bias_rows(rel_pos_h, rel_pos_w, spec.window, qw.dtype)
    q5 = qw.view(*qw.shape[:2], WH, WW, -1)
    dq.view_as(q5).add_(torch.einsum("bnhwk,hkc->bnhwc", dh, rh_rows)).add_(
        torch.einsum("bnhwk,wkc->bnhwc", dw, rw_rows))
    grads = []
    for d, eq, side, table in ((dh, "bnhwk,bnhwc->hkc", WH, rel_pos_h), (dw, "bnhwk,bnhwc->wkc", WW, rel_pos_w)):
        drows = torch.einsum(eq, d, q5).reshape(side * side, -1)
        grads.append((rel_pos_onehot(side, drows.dtype, drows.device).t() @ drows).to(table.dtype))
    if differentiable:
        dqkvw = torch.stack([dq, dk, dv])
    dx = _to_grid(dqkvw, B, (H, W), spec.window)
    dpad = None if qkv_pad is None else _padding_sum(dqkvw, B, (H, W), spec.window).to(qkv_pad.dtype)
    return dx.to(qkv.dtype), grads[0], grads[1], dpad
