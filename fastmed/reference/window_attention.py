"""Plain PyTorch reference for (shifted-)window attention (Swin, Swin-Unet, SwinUNETR).

Written the way timm / Swin-Unet / MONAI write it: cyclic roll, window partition, per-window
``softmax(q k^T * scale + B_rel + M_shift) v``, window reverse and roll back.  It is the test oracle
(run it in float64) and the CPU fallback of :func:`fastmed.ops.window_attention`.

Layout conventions (shared with the Triton kernels):

* ``qkv``: the qkv projection on the token grid, ``(B, D, H, W, 3C)`` (2D inputs are seen as ``D = 1``),
  channels ordered like timm/MONAI's ``qkv`` Linear: ``reshape(..., 3, heads, head_dim)``.
* :class:`WindowSpec`: everything a call computes apart from its tensors (heads, window, shift, scale, bias
  layout).  The ops build it; the reference and the Triton launchers take it; the torch.library ops carry its
  fields flat (:meth:`WindowSpec.flat`), in its field order.
* ``lse``: per token and head, the logsumexp of its (scaled, biased, masked) scores, ``(B, D, H, W, heads)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastmed._tensors import accumulation_dtype

MASK_VALUE = -100.0  # the constant timm / Swin-Unet / MONAI add between tokens of different shift regions


class WindowSpec(NamedTuple):
    """The non-tensor arguments of one window-attention call (3-tuples are ``(D, H, W)``; 2D calls have ``D = 1``).

    * ``window`` / ``shift``: already *effective* (shrunk on axes where the grid is not larger than the window,
      see :func:`effective_window`); windows tile the grid padded up to a multiple of ``window``.
    * ``table_window``: the window the relative position bias table was built for (``prod(2 w - 1)`` rows).
    * ``bias_coords``: the window dims used to turn a token's index inside its window into the coordinates that
      address the table.  ``window`` gives the geometric bias (the bias of a pair depends on their
      displacement); ``table_window`` reproduces MONAI, which slices ``relative_position_index[:n, :n]`` of the
      full window when the window shrinks.
    """
    num_heads: int
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    scale: float
    table_window: tuple[int, int, int]
    bias_coords: tuple[int, int, int]

    @classmethod
    def from_flat(cls, num_heads: int, window: Sequence[int], shift: Sequence[int], scale: float,
                  table_window: Sequence[int], bias_coords: Sequence[int]) -> WindowSpec:
        """The spec from the torch.library ops' flat arguments (lists arrive from the dispatcher)."""
        return cls(int(num_heads), tuple(window), tuple(shift), float(scale), tuple(table_window),
                   tuple(bias_coords))

    def flat(self) -> tuple:
        """The fields as the torch.library ops take them (``int[]`` as lists), in field order."""
        return tuple(list(f) if isinstance(f, tuple) else f for f in self)

    @property
    def tokens(self) -> int:
        """``N``: tokens per window."""
        return self.window[0] * self.window[1] * self.window[2]

    @property
    def shifted(self) -> bool:
        return any(s > 0 for s in self.shift)


def effective_window(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[tuple, tuple]:
    """Swin's rule: on an axis where ``grid <= window`` the window becomes the grid size and the shift 0."""
    win, sh = list(window), list(shift)
    for a, s in enumerate(grid):
        if s <= win[a]:
            win[a], sh[a] = s, 0
    return tuple(win), tuple(sh)


def relative_position_index(window: Sequence[int]) -> Tensor:
    """``(N, N)`` long: row of the bias table for each (query, key) pair, as timm/MONAI build it."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = torch.zeros(rel.shape[:2], dtype=torch.long)
    stride = 1
    for a in reversed(range(len(window))):
        index += (rel[:, :, a] + window[a] - 1) * stride
        stride *= 2 * window[a] - 1
    return index


def bias_index(window: Sequence[int], table_window: Sequence[int], bias_coords: Sequence[int]) -> Tensor:
    """``(N, N)`` rows of the table (built for ``table_window``) used by a window of shape ``window`` (CPU)."""
    n = 1
    for w in window:
        n *= w
    ar = torch.arange(n)
    coords = []
    for a in reversed(range(len(bias_coords))):  # unravel the in-window index over bias_coords
        coords.append(ar % bias_coords[a])
        ar = ar // bias_coords[a]
    coords = torch.stack(coords[::-1])  # (ndim, N)
    index = torch.zeros(n, n, dtype=torch.long)
    stride = 1
    for a in reversed(range(len(table_window))):
        index += (coords[a][:, None] - coords[a][None, :] + table_window[a] - 1) * stride
        stride *= 2 * table_window[a] - 1
    return index


def window_partition(x: Tensor, window: Sequence[int]) -> Tensor:
    """``(B, D, H, W, C) -> (B * nW, N, C)``, windows in raster order."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)


def window_reverse(windows: Tensor, window: Sequence[int], grid: Sequence[int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, N, C) -> (B, D, H, W, C)``."""
    D, H, W = grid
    wd, wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, D // wd, H // wh, W // ww, wd, wh, ww, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, D, H, W, C)


def shift_mask(grid: Sequence[int], window: Sequence[int], shift: Sequence[int], device=None,
               dtype=torch.float32) -> Optional[Tensor]:
    """``(nW, N, N)`` additive mask of shifted windows (-100 between regions), or None without shift.

    Regions, per axis in the rolled frame: ``[0, S - w)``, ``[S - w, S - shift)``, ``[S - shift, S)``.
    """
    if not any(shift):
        return None
    mw = _window_regions(grid, window, shift).to(device)  # (nW, N)
    differ = mw[:, None, :] != mw[:, :, None]
    return torch.where(differ, torch.full(differ.shape, MASK_VALUE, dtype=dtype, device=device),
                       torch.zeros(differ.shape, dtype=dtype, device=device))


def _window_regions(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> Tensor:
    """``(nW, N)`` shift-region id of every token of every window (CPU)."""
    ids = []
    for s, w, sh in zip(grid, window, shift):
        y = torch.arange(s)
        ids.append((y >= s - w).long() + (y >= s - sh).long() if sh > 0 else torch.zeros(s, dtype=torch.long))
    rid = ids[0][:, None, None] * 9 + ids[1][None, :, None] * 3 + ids[2][None, None, :]
    return window_partition(rid[None, ..., None], window).squeeze(-1)


def _scores(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor], mask: Optional[Tensor], batch: int) -> Tensor:
    """q, k: (B*nW, h, N, d) -> scores (B*nW, h, N, N) with bias (h, N, N) and mask (nW, N, N)."""
    s = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        s = (s.view(batch, nw, *s.shape[1:]) + mask[None, :, None]).view(s.shape)
    return s


def split_qkv(qkv: Tensor, num_heads: int, window: Sequence[int], shift: Sequence[int]):
    """Rolled, partitioned q, k, v: each (B*nW, heads, N, head_dim)."""
    C = qkv.shape[-1] // 3
    if any(shift):
        qkv = torch.roll(qkv, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    win = window_partition(qkv, window)
    bw, n, _ = win.shape
    win = win.view(bw, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    return win[0], win[1], win[2]


def merge_windows(x: Tensor, window: Sequence[int], shift: Sequence[int], grid: Sequence[int]) -> Tensor:
    """(B*nW, heads, N, d) -> (B, D, H, W, heads*d), window reverse and roll back."""
    bw, h, n, d = x.shape
    out = window_reverse(x.transpose(1, 2).reshape(bw, n, h * d), window, grid)
    if any(shift):
        out = torch.roll(out, shifts=tuple(shift), dims=(1, 2, 3))
    return out


def dense_bias(table: Optional[Tensor], window, table_window, bias_coords) -> Optional[Tensor]:
    """The ``(heads, N, N)`` relative position bias gathered from ``table`` ``(T, heads)`` (None without a table)."""
    if table is None:
        return None
    idx = bias_index(window, table_window, bias_coords).to(table.device)
    n = idx.shape[0]
    return table[idx.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


def pad_grid(qkv: Tensor, window: Sequence[int], pad_value: Optional[Tensor]) -> Tensor:
    """Pad ``(B, D, H, W, 3C)`` at the end of each spatial axis up to a multiple of ``window`` with tokens equal
    to ``pad_value`` ``(3C,)`` (zeros when None): MONAI's zero-padding of the tokens before the qkv Linear."""
    for a, w in enumerate(window):
        axis = a + 1
        extra = -qkv.shape[axis] % w
        if extra:
            shape = list(qkv.shape)
            shape[axis] = extra
            fill = qkv.new_zeros(shape) if pad_value is None else pad_value.to(qkv.dtype).expand(shape)
            qkv = torch.cat([qkv, fill], dim=axis)
    return qkv


def crop(x: Tensor, grid: Sequence[int]) -> Tensor:
    """The real ``grid`` ``(D, H, W)`` of a padded ``(B, Dp, Hp, Wp, ...)`` tensor (a view)."""
    return x[:, :grid[0], :grid[1], :grid[2]]


def _padded_scores(qkv: Tensor, table: Optional[Tensor], qkv_pad: Optional[Tensor], spec: WindowSpec):
    """The padded grid's q, k, v ``(B*nW, heads, N, head_dim)`` and scores ``(B*nW, heads, N, N)`` in the
    accumulation dtype, and the padded grid's spatial shape."""
    acc = accumulation_dtype(qkv.dtype)
    x = pad_grid(qkv.to(acc), spec.window, qkv_pad)
    padded = tuple(x.shape[1:4])
    q, k, v = split_qkv(x, spec.num_heads, spec.window, spec.shift)
    bias = dense_bias(None if table is None else table.to(acc), spec.window, spec.table_window, spec.bias_coords)
    mask = shift_mask(padded, spec.window, spec.shift, qkv.device, acc)
    return q, k, v, _scores(q, k, spec.scale, bias, mask, x.shape[0]), padded


def window_attention_forward(qkv: Tensor, table: Optional[Tensor], qkv_pad: Optional[Tensor],
                             spec: WindowSpec) -> tuple[Tensor, Tensor]:
    """Window attention on a ``(B, D, H, W, 3C)`` grid: returns ``(out (B, D, H, W, C), lse (B, D, H, W, heads))``.

    The grid is padded up to a multiple of ``spec.window`` with ``qkv_pad`` ``(3C,)`` tokens (zeros when None,
    :func:`pad_grid`) and cropped back; ``table`` is ``(T, heads)`` or None.  Computes in float32 (float64 for
    float64 inputs); ``out`` has ``qkv``'s dtype, ``lse`` the compute dtype.
    """
    grid = tuple(qkv.shape[1:4])
    _, _, v, s, padded = _padded_scores(qkv, table, qkv_pad, spec)
    lse = merge_windows(torch.logsumexp(s, dim=-1).unsqueeze(-1), spec.window, spec.shift, padded)
    out = merge_windows(torch.softmax(s, dim=-1) @ v, spec.window, spec.shift, padded)
    return crop(out, grid).to(qkv.dtype), crop(lse, grid).contiguous()


def window_attention_backward(dout: Tensor, qkv: Tensor, table: Optional[Tensor], qkv_pad: Optional[Tensor],
                              spec: WindowSpec) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dqkv (B, D, H, W, 3C), dtable (T, heads) or None, dqkv_pad (3C,) or None)`` by the explicit
    softmax backward on the padded grid.

    Written with differentiable torch ops only, so autograd can differentiate it again: the ops run it for the
    first-order gradient when that gradient needs a graph (double backward, ``create_graph=True``)."""
    acc = accumulation_dtype(qkv.dtype)
    grid = tuple(qkv.shape[1:4])
    window, shift = spec.window, spec.shift
    q, k, v, s, padded = _padded_scores(qkv, table, qkv_pad, spec)
    p = torch.softmax(s, dim=-1)
    do = pad_grid(torch.cat([dout.to(acc)] * 3, dim=-1), window, None)  # cropped outputs: zero gradient
    do = split_qkv(do, spec.num_heads, window, shift)[0]
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ k) * spec.scale
    dk = (ds.transpose(-2, -1) @ q) * spec.scale
    dx = torch.cat([merge_windows(g, window, shift, padded) for g in (dq, dk, dv)], dim=-1)
    dpad = None
    if qkv_pad is not None:
        real = torch.zeros(padded, dtype=torch.bool, device=qkv.device)
        real[:grid[0], :grid[1], :grid[2]] = True
        dpad = dx[:, ~real].sum(dim=(0, 1)).to(qkv_pad.dtype)
    dtable = None
    if table is not None:
        idx = bias_index(window, spec.table_window, spec.bias_coords).to(qkv.device).reshape(-1)
        dsum = ds.sum(0).reshape(spec.num_heads, -1).transpose(0, 1)  # (N*N, heads)
        dtable = torch.zeros(table.shape, dtype=acc, device=qkv.device).index_add(0, idx, dsum).to(table.dtype)
    return crop(dx, grid).to(qkv.dtype), dtable, dpad


def window_attention_eager(qkv: Tensor, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int],
                           table: Optional[Tensor], scale: float, index: Optional[Tensor] = None) -> Tensor:
    """Differentiable eager composition exactly as timm / Swin-Unet / MONAI write it (for tests and benchmarks).

    ``qkv``: ``(B, *S, 3C)`` with ``S`` divisible by ``window_size`` (effective); ``index``: the ``(N, N)`` table
    rows (defaults to :func:`relative_position_index` of ``window_size``).  Computes in ``qkv``'s dtype.
    """
    nd = qkv.dim() - 2
    grid = tuple(qkv.shape[1:-1])
    C = qkv.shape[-1] // 3
    x = qkv
    if any(shift_size):
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=tuple(range(1, nd + 1)))
    x3 = x if nd == 3 else x.unsqueeze(1)
    win3 = tuple(window_size) if nd == 3 else (1,) + tuple(window_size)
    xw = window_partition(x3, win3)
    bw, n, _ = xw.shape
    q, k, v = xw.reshape(bw, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1)
    if table is not None:
        if index is None:
            index = relative_position_index(window_size).to(qkv.device)
        attn = attn + table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    mask = shift_mask(grid if nd == 3 else (1,) + grid, win3, (0,) * (3 - nd) + tuple(shift_size), qkv.device,
                      attn.dtype)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads, n, n)
    attn = torch.softmax(attn, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(bw, n, C)
    out = window_reverse(out, win3, grid if nd == 3 else (1,) + grid)
    if nd == 2:
        out = out.squeeze(1)
    if any(shift_size):
        out = torch.roll(out, shifts=tuple(shift_size), dims=tuple(range(1, nd + 1)))
    return out


def attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                        scale: Optional[float] = None) -> Tensor:
    """Global attention ``softmax(q k^T * scale + bias) v`` written out: q ``(B, h, Lq, d)``, k/v ``(B, h, Lk, d)``."""
    acc = accumulation_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.to(acc) * scale) @ k.to(acc).transpose(-2, -1)
    if bias is not None:
        s = s + bias.to(acc)
    return (torch.softmax(s, dim=-1) @ v.to(acc)).to(q.dtype)
