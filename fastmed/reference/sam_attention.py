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


def _windows(t: Tensor, window) -> Tensor:
    """``(B, Hp, Wp, heads, d)`` -> ``(B * nW, heads, WH * WW, d)`` (SAM's ``window_partition`` order)."""
    B, Hp, Wp, n, d = t.shape
    WH, WW = window
    t = t.view(B, Hp // WH, WH, Wp // WW, WW, n, d).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(-1, n, WH * WW, d)


def _unwindows(t: Tensor, B: int, padded, window) -> Tensor:
    """Inverse of :func:`_windows`: ``(B * nW, heads, WH * WW, d)`` -> ``(B, Hp, Wp, heads * d)``."""
    Hp, Wp = padded
    WH, WW = window
    n, d = t.shape[1], t.shape[3]
    t = t.view(B, Hp // WH, Wp // WW, n, WH, WW, d).permute(0, 1, 4, 2, 5, 3, 6)
    return t.reshape(B, Hp, Wp, n * d)


def sam_attention_forward(qkv: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, qkv_pad: Optional[Tensor],
                          spec: SamAttentionSpec) -> tuple[Tensor, Tensor]:
    """SAM's windowed / global attention with decomposed relative position, as SAM computes it.

    Args:
        qkv: ``(B, H, W, 3C)``, channels ``reshape(3, heads, head_dim)``.
        rel_pos_h, rel_pos_w: ``(2 * WH - 1, head_dim)``, ``(2 * WW - 1, head_dim)``.
        qkv_pad: ``(3C,)`` qkv of a padding token (the qkv Linear's bias) or None (zeros).
        spec: :class:`SamAttentionSpec`.

    Returns:
        ``(out (B, H, W, C) in qkv's dtype, an empty lse)``: the reference keeps no logsumexp.
    """
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    heads = spec.num_heads
    hd = C // heads
    WH, WW = spec.window
    Hp, Wp = -(-H // WH) * WH, -(-W // WW) * WW
    x = _padded(qkv, qkv_pad, spec)
    q, k, v = x.view(B, Hp, Wp, 3, heads, hd).unbind(3)
    rel_h, rel_w = decomposed_bias(q, rel_pos_h, rel_pos_w, spec.window)  # (B, Hp, Wp, heads, WH / WW)
    qw, kw, vw = (_windows(t, spec.window) for t in (q, k, v))
    s = (qw * spec.scale) @ kw.transpose(-2, -1)
    rh, rw = _windows(rel_h, spec.window), _windows(rel_w, spec.window)  # (B*nW, heads, L, WH / WW)
    s = (s.view(*s.shape[:3], WH, WW) + rh[..., :, None] + rw[..., None, :]).flatten(-2)
    out = _unwindows(torch.softmax(s, dim=-1) @ vw, B, (Hp, Wp), spec.window)[:, :H, :W]
    return out.to(qkv.dtype).contiguous(), qkv.new_empty(0)


def _padded(qkv: Tensor, qkv_pad: Optional[Tensor], spec: SamAttentionSpec) -> Tensor:
    """``qkv`` upcast and padded at the end of H and W to a multiple of the window with ``qkv_pad`` (or zeros)."""
    B, H, W, C3 = qkv.shape
    WH, WW = spec.window
    Hp, Wp = -(-H // WH) * WH, -(-W // WW) * WW
    acc = accumulation_dtype(qkv.dtype)
    x = qkv.to(acc)
    if (Hp, Wp) == (H, W):
        return x
    pad = torch.zeros(C3, dtype=acc, device=qkv.device) if qkv_pad is None else qkv_pad.to(acc)
    return torch.cat([torch.cat([x, pad.expand(B, H, Wp - W, C3)], dim=2), pad.expand(B, Hp - H, Wp, C3)], dim=1)


def sam_attention_backward(dout: Tensor, qkv: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                           qkv_pad: Optional[Tensor], spec: SamAttentionSpec):
    """Gradients ``(dqkv (B, H, W, 3C), drel_pos_h, drel_pos_w, dqkv_pad (3C,) or None)`` by the explicit softmax
    backward on the padded grid (plain differentiable torch ops, so autograd can differentiate it again;
    deterministic)."""
    B, H, W, C3 = qkv.shape
    heads = spec.num_heads
    hd = C3 // 3 // heads
    WH, WW = spec.window
    x = _padded(qkv, qkv_pad, spec)
    Hp, Wp = x.shape[1], x.shape[2]
    q, k, v = x.view(B, Hp, Wp, 3, heads, hd).unbind(3)
    rel_h, rel_w = decomposed_bias(q, rel_pos_h, rel_pos_w, spec.window)
    qw, kw, vw = (_windows(t, spec.window) for t in (q, k, v))
    s = (qw * spec.scale) @ kw.transpose(-2, -1)
    rh, rw = _windows(rel_h, spec.window), _windows(rel_w, spec.window)
    s = (s.view(*s.shape[:3], WH, WW) + rh[..., :, None] + rw[..., None, :]).flatten(-2)
    p = torch.softmax(s, dim=-1)
    do = torch.zeros(B, Hp, Wp, heads, hd, dtype=x.dtype, device=x.device)
    do[:, :H, :W] = dout.to(x.dtype).view(B, H, W, heads, hd)  # cropped (padding) outputs: zero gradient
    do = _windows(do, spec.window)
    dv = p.transpose(-2, -1) @ do
    dp = do @ vw.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kw) * spec.scale
    dk = (ds.transpose(-2, -1) @ qw) * spec.scale
    ds5 = ds.view(*ds.shape[:3], WH, WW)
    unw = lambda t: _unwindows(t, B, (Hp, Wp), spec.window).view(B, Hp, Wp, heads, -1)  # noqa: E731
    dq_rel, dth, dtw = decomposed_bias_backward(q, unw(ds5.sum(-1)), unw(ds5.sum(-2)), rel_pos_h, rel_pos_w,
                                                spec.window)
    dx = torch.cat([(unw(dq) + dq_rel).flatten(-2), unw(dk).flatten(-2), unw(dv).flatten(-2)], dim=-1)
    dpad = None
    if qkv_pad is not None:
        real = torch.zeros(Hp, Wp, dtype=torch.bool, device=qkv.device)
        real[:H, :W] = True
        dpad = dx[:, ~real].sum(dim=(0, 1)).to(qkv_pad.dtype)
    return (dx[:, :H, :W].to(qkv.dtype).contiguous(), dth.to(rel_pos_h.dtype), dtw.to(rel_pos_w.dtype), dpad)
