"""``fastmed.ops.window_attention`` (Swin (shifted-)window attention) and ``fastmed.ops.attention`` (global).

``window_attention`` is registered as the torch.library ops ``fastmed::window_attention_fwd`` /
``fastmed::window_attention_bwd`` (``triton_op``, so ``torch.compile(fullgraph=True)`` traces through them) with
``register_autograd``.  ``attention`` routes to ``torch.nn.functional.scaled_dot_product_attention``, which picks
the flash / cuDNN / memory-efficient / math kernel itself.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from fastmed import _backend
from fastmed._tensors import accumulation_dtype
from fastmed._validate import check_choice, check_int, check_number, check_per_axis, check_same_device, check_tensor
from fastmed.ops import _direct
from fastmed.reference import window_attention as ref

__all__ = ["window_attention", "attention", "BIAS_INDEX"]

BIAS_INDEX = ("coords", "monai")

_backend.register_op("window_attention", ("triton", "aten", "reference"),
                     doc="(shifted-)window attention with relative position bias, forward and backward")
_backend.register_op("attention", ("reference",),
                     doc="global attention through torch scaled_dot_product_attention (torch picks the kernel)")


def _reference_backward(dout, qkv, lse, table, qkv_pad, spec: ref.WindowSpec):
    # The reference recomputes the attention from qkv: lse is not needed.
    return ref.window_attention_backward(dout, qkv, table, qkv_pad, spec)


def _window_order(padded: tuple, window: tuple, shift: tuple, device) -> tuple[Tensor, Tensor]:
    """``(order, inverse)``: the padded grid's flat token indices in rolled-window order (window-major, raster
    inside a window: roll and partition as one gather) and the inverse permutation (reverse and roll back).
    Built per call (one small integer tensor per token; nothing cached, so tracing sees no outside tensors)."""
    tokens = torch.arange(padded[0] * padded[1] * padded[2], device=device).view(1, *padded, 1)
    if any(shift):
        tokens = torch.roll(tokens, shifts=tuple(-t for t in shift), dims=(1, 2, 3))
    order = ref.window_partition(tokens, window).reshape(-1)
    return order, torch.argsort(order)


def _mask_parts(spec: ref.WindowSpec, padded: tuple, dtype: torch.dtype, device) -> tuple:
    """The table rows of the bias ``(N * N,)`` and the shift mask ``(nW, 1, N, N)`` (None without shift)."""
    mask = ref.shift_mask(padded, spec.window, spec.shift, device, dtype)
    index = ref.bias_index(spec.window, spec.table_window, spec.bias_coords).to(device).reshape(-1)
    return index, None if mask is None else mask.unsqueeze(1)


_cached_mask_parts = functools.lru_cache(maxsize=8)(_mask_parts)


def _additive_mask(table, spec: ref.WindowSpec, padded, dtype, device, cache: bool) -> Optional[Tensor]:
    """Bias plus shift mask as one additive ``(nW, heads, N, N)`` mask (``(1, heads, N, N)`` without shift), or
    None when there is neither.  ``cache``: reuse the index and shift mask of earlier calls (plain CPU tensors in
    eager mode only: under tracing, fake or functional tensors must not meet tensors made outside)."""
    index, mask = (_cached_mask_parts if cache else _mask_parts)(spec, padded, dtype, device)
    if table is None:
        return mask
    n = spec.tokens
    bias = table.to(dtype)[index].view(1, n, n, -1).permute(0, 3, 1, 2)
    return bias if mask is None else bias + mask


def _to_windows(x: Tensor, spec: ref.WindowSpec, width: int) -> Tensor:
    """Padded grid ``(B, Dp, Hp, Wp, width * heads * d)`` -> ``(width, B*nW, heads, N, d)`` (contiguous) by one
    gather."""
    B, padded = x.shape[0], tuple(x.shape[1:4])
    order, _ = _window_order(padded, spec.window, spec.shift, x.device)
    n, heads = spec.tokens, spec.num_heads
    w = x.reshape(B, -1, x.shape[-1]).index_select(1, order)
    # one copy into the batched matmuls' layout (each of q, k, v, dO is read by two of them)
    return w.view(-1, n, width, heads, x.shape[-1] // (width * heads)).permute(2, 0, 3, 1, 4).contiguous()


def _from_windows(w: Tensor, spec: ref.WindowSpec, padded: tuple) -> Tensor:
    """``(width, B*nW, heads, N, d)`` -> the padded grid ``(B, Dp, Hp, Wp, width * heads * d)`` by one gather."""
    width, bw, heads, n, d = w.shape
    _, inverse = _window_order(padded, spec.window, spec.shift, w.device)
    x = w.permute(1, 3, 0, 2, 4).reshape(-1, inverse.numel(), width * heads * d)
    return x.index_select(1, inverse).view(-1, *padded, width * heads * d)


def _aten_windows(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec):
    """q, k, v ``(B*nW, heads, N, head_dim)`` of the padded grid in the accumulation dtype, the additive mask
    (:func:`_additive_mask`) and the padded grid."""
    acc = accumulation_dtype(qkv.dtype)
    x = ref.pad_grid(qkv.to(acc), spec.window, qkv_pad)
    padded = tuple(x.shape[1:4])
    q, k, v = _to_windows(x, spec, 3)
    cache = type(qkv) is torch.Tensor and (table is None or type(table) in (torch.Tensor, torch.nn.Parameter))
    return q, k, v, _additive_mask(table, spec, padded, acc, qkv.device, cache), padded


def _aten_forward(qkv: Tensor, table, qkv_pad, spec: ref.WindowSpec) -> tuple[Tensor, Tensor]:
    """``aten`` backend (CPU): ``(out (B, D, H, W, C), lse (B, D, H, W, heads))`` through torch's fused CPU
    flash-attention kernel over the windows, bias and shift mask as its additive mask; roll, partition and
    their inverses are one gather each."""
    grid = tuple(qkv.shape[1:4])
    q, k, v, mask, padded = _aten_windows(qkv, table, qkv_pad, spec)
    bw, heads, n, d = q.shape
    nw = 1 if mask is None else mask.shape[0]
    flat = [t.reshape(bw // nw, nw * heads, n, d) for t in (q, k, v)]
    if mask is not None:
        mask = mask.expand(nw, heads, n, n).reshape(1, nw * heads, n, n)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*flat, 0.0, False, attn_mask=mask,
                                                                           scale=spec.scale)
    out = _from_windows(out.reshape(1, bw, heads, n, d), spec, padded)
    lse = _from_windows(lse.reshape(1, bw, heads, n, 1), spec, padded)
    return ref.crop(out, grid).to(qkv.dtype), ref.crop(lse, grid).contiguous()


def _aten_backward(dout: Tensor, qkv: Tensor, lse, table, qkv_pad, spec: ref.WindowSpec):
    """``aten`` backend (CPU) backward: the scores recomputed (one batched matmul, the mask added in place),
    softmax, and the gradients with in-place element-wise steps; dq, dk, dv go back to the grid in one gather.
    ``lse`` is not needed."""
    acc = accumulation_dtype(qkv.dtype)
    grid = tuple(qkv.shape[1:4])
    q, k, v, mask, padded = _aten_windows(qkv, table, qkv_pad, spec)
    bw, heads, n, d = q.shape
    s = q @ k.transpose(-2, -1)
    s.mul_(spec.scale)
    if mask is not None:
        s.view(-1, mask.shape[0], heads, n, n).add_(mask)
    p = torch.softmax(s, dim=-1)
    do = _to_windows(ref.pad_grid(dout.to(acc), spec.window, None), spec, 1)[0]  # cropped outputs: zero gradient
    grads = torch.empty((3, bw, heads, n, d), dtype=acc, device=qkv.device)
    torch.matmul(p.transpose(-2, -1), do, out=grads[2])
    ds = do @ v.transpose(-2, -1)
    # delta = rowsum(P * dP) = rowsum(dO * O) with O = P V recomputed: no (N, N)-sized temporary
    ds.sub_((do * (p @ v)).sum(-1, keepdim=True)).mul_(p)
    torch.matmul(ds, k, out=grads[0])
    torch.matmul(ds.transpose(-2, -1), q, out=grads[1])
    grads[:2].mul_(spec.scale)
    dx = _from_windows(grads, spec, padded)
    dpad = None
    if qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        real = torch.zeros(padded, dtype=torch.bool, device=qkv.device)
        real[:grid[0], :grid[1], :grid[2]] = True
        dpad = dx[:, ~real].sum(dim=(0, 1)).to(qkv_pad.dtype)
    dtable = None
    if table is not None:  # the bias is shared by every window: dS summed over them, scattered to table rows
        idx = ref.bias_index(spec.window, spec.table_window, spec.bias_coords).to(qkv.device).reshape(-1)
        dsum = ds.sum(0).reshape(heads, -1).transpose(0, 1)
        dtable = torch.zeros(table.shape, dtype=acc, device=qkv.device).index_add_(0, idx, dsum).to(table.dtype)
    return ref.crop(dx, grid).to(qkv.dtype), dtable, dpad


_ATTENTION = _backend.Implementations("attention", "fastmed.ops.attention",
                                      reference=F.scaled_dot_product_attention)
_FORWARD = _backend.Implementations("window_attention", "fastmed::window_attention_fwd",
                                    triton="fastmed.kernels.window_attention:window_attention_forward",
                                    aten=_aten_forward, reference=ref.window_attention_forward)
_BACKWARD = _backend.Implementations("window_attention", "fastmed::window_attention_bwd",
                                     triton="fastmed.kernels.window_attention:window_attention_backward",
                                     aten=_aten_backward, reference=_reference_backward)

# The torch.library ops take the tensors, then the WindowSpec's fields flat (its field order), then the backend.
_NON_TENSOR_GRADS = (None,) * (len(ref.WindowSpec._fields) + 1)  # the spec's fields and the backend name


def _grid5(t: Tensor) -> Tensor:
    """A 2D token grid ``(B, H, W, ...)`` as the 3D grid ``(B, 1, H, W, ...)`` the implementations take."""
    return t.unsqueeze(1) if t.dim() == 4 else t


@triton_op("fastmed::window_attention_fwd", mutates_args=())
def _window_attention_fwd(qkv: Tensor, table: Optional[Tensor], qkv_pad: Optional[Tensor], num_heads: int,
                          window: list[int], shift: list[int], scale: float, table_window: list[int],
                          bias_coords: list[int], backend: str) -> tuple[Tensor, Tensor]:
    """``qkv`` ``(B, H, W, 3C)`` or ``(B, D, H, W, 3C)`` -> ``(out, lse)``, ``out`` of ``qkv``'s rank (a tensor of its
    own, not a view, so that callers may modify it in place)."""
    spec = ref.WindowSpec.from_flat(num_heads, window, shift, scale, table_window, bias_coords)
    out, lse = _FORWARD[backend](_grid5(qkv), table, qkv_pad, spec)
    # detach(): the squeezed output must not be a view (autograd forbids modifying views of a multi-output node).
    return (out.squeeze(1).detach() if qkv.dim() == 4 else out), lse


@triton_op("fastmed::window_attention_bwd", mutates_args=())
def _window_attention_bwd(dout: Tensor, qkv: Tensor, lse: Optional[Tensor], table: Optional[Tensor],
                          qkv_pad: Optional[Tensor], num_heads: int, window: list[int], shift: list[int],
                          scale: float, table_window: list[int], bias_coords: list[int],
                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``lse``: the forward's logsumexp where the backend's backward reads it (None for the reference, which
    recomputes the attention from ``qkv``).  No backend reads the forward's output."""
    spec = ref.WindowSpec.from_flat(num_heads, window, shift, scale, table_window, bias_coords)
    dqkv, dtable, dpad = _BACKWARD[backend](_grid5(dout), _grid5(qkv), lse, table, qkv_pad, spec)
    # Absent gradients travel as empty tensors (custom ops return no None).
    return (dqkv.squeeze(1).detach() if qkv.dim() == 4 else dqkv, dtable if dtable is not None else qkv.new_empty(0),
            dpad if dpad is not None else qkv.new_empty(0))


def _setup_context(ctx, inputs, output):
    qkv, table, qkv_pad, *spec_fields, backend = inputs
    _out, lse = output
    # No backward reads the output (the kernels compute rowsum(dO * O) as rowsum(P * dP); the reference recomputes
    # everything from qkv), so the caller may modify it in place (as with the unfused composition).
    ctx.save_for_backward(qkv, lse if backend != "reference" else None, table, qkv_pad)
    ctx.spec = ref.WindowSpec.from_flat(*spec_fields)
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    qkv, lse, table, qkv_pad = ctx.saved_tensors
    spec = ctx.spec
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dout, qkv, table, qkv_pad)):
        # Double backward (create_graph=True): the first-order gradient must itself be differentiable, so it is
        # computed by the reference's plain torch composition, which autograd differentiates again, on every
        # backend (the kernels' gradients would carry no graph).
        dqkv, dtable, dpad = ref.window_attention_backward(_grid5(dout), _grid5(qkv), table, qkv_pad, spec)
        dqkv = dqkv.squeeze(1) if qkv.dim() == 4 else dqkv
    else:
        dqkv, dtable, dpad = _direct.backward_op(ctx, _window_attention_bwd)(
            dout, qkv, lse, table, qkv_pad, *spec.flat(), ctx.backend)
    return (dqkv, dtable if table is not None else None, dpad if qkv_pad is not None else None) + _NON_TENSOR_GRADS


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_WindowAttentionDirect = _direct.autograd_function("_WindowAttentionDirect", _window_attention_fwd, _setup_context,
                                                   _backward)


def window_attention(qkv: Tensor, num_heads: int, window_size: Union[int, Sequence[int]],
                     shift_size: Union[int, Sequence[int]] = 0, rel_pos_bias_table: Optional[Tensor] = None,
                     scale: Optional[float] = None, *, qkv_pad: Optional[Tensor] = None,
                     bias_index: str = "coords") -> Tensor:
    """Swin (shifted-)window multi-head self-attention, computed straight on the token grid.

    Per window of ``N = prod(window)`` tokens and per head: ``softmax(q k^T * scale + B_rel + M_shift) v``, with
    the cyclic shift, window partition, relative position bias, shifted-window mask (-100 between regions, as
    timm / Swin-Unet / MONAI), window reverse and roll back all inside the kernels on CUDA (Triton).  On CPU,
    ``auto`` uses the ``aten`` backend: torch's fused flash-attention CPU kernel over the windows with bias and
    mask as its additive mask, roll and partition as one gather (the ``reference`` backend is the oracle).  The
    output projection is not included.

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

    grid = tuple(qkv.shape[1:-1])
    eff_window, eff_shift = ref.effective_window(grid, window, shift)
    lead = (1,) * (3 - nd)
    win3 = lead + eff_window
    table_window = lead + window
    spec = ref.WindowSpec(heads, win3, (0,) * (3 - nd) + eff_shift, float(scale), table_window,
                          win3 if bias_index == "coords" else table_window)

    backend = _backend.choose("window_attention", device)
    out, _ = _direct.call(_window_attention_fwd, _WindowAttentionDirect, qkv, rel_pos_bias_table, qkv_pad,
                          *spec.flat(), backend)
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
