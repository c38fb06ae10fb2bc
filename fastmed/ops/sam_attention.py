"""``fastmed.ops.sam_attention``: SAM's windowed / global attention with decomposed relative position.

Registered as the torch.library ops ``fastmed::sam_attention_fwd`` / ``fastmed::sam_attention_bwd`` (``triton_op``,
so ``torch.compile(fullgraph=True)`` traces through them) with ``register_autograd``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from fastmed import _backend
from fastmed._validate import check_int, check_number, check_same_device, check_tensor
from fastmed.ops import _direct
from fastmed.reference import sam_attention as ref

__all__ = ["sam_attention"]

_backend.register_op("sam_attention", ("triton", "reference"),
                     doc="SAM windowed/global attention with decomposed relative position, forward and backward")


def _reference_backward(dout, qkv, out, probs, rel_pos_h, rel_pos_w, qkv_pad, spec: ref.SamAttentionSpec):
    # The reference's forward returns its softmax probabilities in the lse slot; out is not needed.
    return ref.sam_attention_backward(dout, qkv, rel_pos_h, rel_pos_w, qkv_pad, spec, probs)


_FORWARD = _backend.triton_and_reference("sam_attention", "sam_attention_fwd", "sam_attention_forward",
                                         ref.sam_attention_forward)
_BACKWARD = _backend.triton_and_reference("sam_attention", "sam_attention_bwd", "sam_attention_backward",
                                          _reference_backward)

_NON_TENSOR_GRADS = (None,) * (len(ref.SamAttentionSpec._fields) + 1)  # the spec's fields and the backend name


@triton_op("fastmed::sam_attention_fwd", mutates_args=())
def _sam_attention_fwd(qkv: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, qkv_pad: Optional[Tensor],
                       num_heads: int, window: list[int], scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """``qkv (B, H, W, 3C)`` -> ``(out (B, H, W, C), lse (B, H, W, heads))``; the reference returns its softmax
    probabilities ``(B * nW, heads, L, L)`` in place of ``lse`` (its backward reuses them)."""
    spec = ref.SamAttentionSpec.from_flat(num_heads, window, scale)
    return _FORWARD[backend](qkv, rel_pos_h, rel_pos_w, qkv_pad, spec)


@triton_op("fastmed::sam_attention_bwd", mutates_args=())
def _sam_attention_bwd(dout: Tensor, qkv: Tensor, out: Optional[Tensor], lse: Optional[Tensor], rel_pos_h: Tensor,
                       rel_pos_w: Tensor, qkv_pad: Optional[Tensor], num_heads: int, window: list[int], scale: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dqkv, drel_pos_h, drel_pos_w, dqkv_pad or empty)``; ``out`` is None for the reference, ``lse`` its
    probabilities."""
    spec = ref.SamAttentionSpec.from_flat(num_heads, window, scale)
    dqkv, dh, dw, dpad = _BACKWARD[backend](dout, qkv, out, lse, rel_pos_h, rel_pos_w, qkv_pad, spec)
    return dqkv, dh, dw, dpad if dpad is not None else qkv.new_empty(0)


def _setup_context(ctx, inputs, output):
    qkv, rel_pos_h, rel_pos_w, qkv_pad, *spec_fields, backend = inputs
    out, lse = output
    # The reference keeps its softmax probabilities (returned in the lse slot, never to the caller); the Triton
    # backward reads out (delta = rowsum(dO * O)) and keeps a copy of its own, so that the caller may modify the
    # returned output in place, as with torch modules.
    keep = backend != "reference"
    ctx.save_for_backward(qkv, out.detach().clone() if keep else None, lse, rel_pos_h, rel_pos_w, qkv_pad)
    ctx.spec = ref.SamAttentionSpec.from_flat(*spec_fields)
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    qkv, out, lse, rel_pos_h, rel_pos_w, qkv_pad = ctx.saved_tensors
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (dout, qkv, rel_pos_h, rel_pos_w, qkv_pad)):
        # Double backward (create_graph=True): the first-order gradient must itself be differentiable, so it is
        # the reference's plain torch composition, which autograd differentiates again, on every backend.
        dqkv, dh, dw, dpad = ref.sam_attention_backward(dout, qkv, rel_pos_h, rel_pos_w, qkv_pad, ctx.spec)
    else:
        dqkv, dh, dw, dpad = _direct.backward_op(ctx, _sam_attention_bwd)(
            dout.contiguous(), qkv, out, lse, rel_pos_h, rel_pos_w, qkv_pad, *ctx.spec.flat(), ctx.backend)
    return (dqkv, dh, dw, dpad if qkv_pad is not None else None) + _NON_TENSOR_GRADS


_sam_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_SamAttentionDirect = _direct.autograd_function("_SamAttentionDirect", _sam_attention_fwd, _setup_context, _backward)


def sam_attention(qkv: Tensor, num_heads: int, rel_pos_h: Tensor, rel_pos_w: Tensor, window_size: int = ref.GLOBAL,
                  scale: Optional[float] = None, *, qkv_pad: Optional[Tensor] = None) -> Tensor:
    """SAM's image-encoder attention with decomposed relative position, computed straight on the token grid.

    Per window of ``(WH, WW)`` tokens and per head: ``softmax((q * scale) k^T + rel_h + rel_w) v`` with
    ``rel_h[(qh, qw), (kh, kw)] = q . rel_pos_h[qh - kh + WH - 1]`` and ``rel_w`` likewise over columns
    (``segment_anything``'s ``add_decomposed_rel_pos``).  The window partition and the padding of the grid to a
    multiple of the window are done by index (Triton on CUDA, the reference on CPU).  No output projection.

    Args:
        qkv: ``(B, H, W, 3C)``: SAM's qkv Linear applied to the (normalized) token grid, channels
            ``reshape(3, num_heads, C // num_heads)``.  float16/bfloat16/float32/float64; accumulation in float32
            (float64 for float64).
        num_heads: number of heads; must divide ``C``.
        rel_pos_h, rel_pos_w: ``(2 * WH - 1, head_dim)`` and ``(2 * WW - 1, head_dim)`` tables.  SAM interpolates
            tables of other lengths; that is not supported (ValueError).
        window_size: ``0`` for global attention (the window is the whole ``H x W`` grid), else the window side
            (14 in SAM's windowed blocks); a grid not divisible by it is padded at the end of each axis.
        scale: score scale (finite), default ``head_dim ** -0.5``.
        qkv_pad: ``(3C,)`` the qkv of a padding token (SAM pads the normalized tokens with zeros before the qkv
            Linear, so pass the Linear's bias); None means zeros.

    Returns:
        ``(B, H, W, C)`` in ``qkv``'s dtype; differentiable with respect to ``qkv``, both tables and ``qkv_pad``;
        the backward is deterministic.  Twice differentiable on every backend: when the backward itself must be
        differentiated (``create_graph=True``), the first-order gradient comes from the reference's plain
        PyTorch composition.
    """
    check_tensor(qkv, "qkv", min_ndim=4, max_ndim=4)
    heads = check_int(num_heads, "num_heads", 1)
    if qkv.shape[-1] % 3 != 0:
        raise ValueError(f"qkv's last dimension must be 3 * C (q, k and v of C channels each), got {qkv.shape[-1]}")
    C = qkv.shape[-1] // 3
    if C % heads != 0:
        raise ValueError(f"num_heads must divide the C={C} channels (qkv's last dimension {qkv.shape[-1]} = 3 * C), "
                         f"got num_heads={heads}")
    hd = C // heads
    win = check_int(window_size, "window_size", 0)
    H, W = qkv.shape[1], qkv.shape[2]
    window = (H, W) if win == ref.GLOBAL else (win, win)
    for name, t, side in (("rel_pos_h", rel_pos_h, window[0]), ("rel_pos_w", rel_pos_w, window[1])):
        check_tensor(t, name, min_ndim=2, max_ndim=2)
        if tuple(t.shape) != (2 * side - 1, hd):
            raise ValueError(f"{name} must have shape (2 * {side} - 1, head_dim) = ({2 * side - 1}, {hd}) for "
                             f"window_size={win} on a {H}x{W} grid, got {tuple(t.shape)} (tables of other lengths, "
                             f"which segment_anything interpolates, are not supported)")
        if t.dtype != qkv.dtype:
            raise TypeError(f"{name} must have qkv's dtype {qkv.dtype}, got {t.dtype}")
    if qkv_pad is not None:
        check_tensor(qkv_pad, "qkv_pad")
        if tuple(qkv_pad.shape) != (3 * C,):
            raise ValueError(f"qkv_pad must have shape ({3 * C},) (the qkv of one padding token), "
                             f"got {tuple(qkv_pad.shape)}")
    scale = hd ** -0.5 if scale is None else check_number(scale, "scale")
    device = check_same_device(qkv=qkv, rel_pos_h=rel_pos_h, rel_pos_w=rel_pos_w, qkv_pad=qkv_pad)
    spec = ref.SamAttentionSpec(heads, window, float(scale))
    backend = _backend.choose("sam_attention", device)
    out, _ = _direct.call(_sam_attention_fwd, _SamAttentionDirect, qkv, rel_pos_h, rel_pos_w, qkv_pad,
                          *spec.flat(), backend)
    return out
