"""Swin building blocks on the token grid (Swin Transformer, Swin-Unet, SwinUNETR).

Every module takes and returns channels-last token grids ``(B, H, W, C)`` / ``(B, D, H, W, C)``.
Parameter and buffer names follow MONAI's ``monai.networks.nets.swin_unetr`` (``norm1``, ``attn.qkv``,
``attn.proj``, ``attn.relative_position_bias_table``, ``attn.relative_position_index``, ``norm2``,
``mlp.linear1``, ``mlp.linear2``; ``reduction``/``norm`` for patch merging) and Swin-Unet (``expand``/``norm``
for patch expanding), so their state dicts load with ``load_state_dict``.

``WindowAttention`` and ``SwinTransformerBlock`` have two paths that agree: ``fused=True`` runs
:func:`fastmed.ops.window_attention` (shift, partition, bias, mask, softmax, reverse in one kernel);
``fused=False`` runs the eager composition exactly as MONAI writes it (pad, roll, partition, explicit bias
and mask, softmax, reverse, roll back).  In float32 CPU inference the fused path also runs the block's Linears as
oneDNN GEMMs with the MLP's GELU in the first one's epilogue (:func:`fused_linear`); its LayerNorms run in C++
(:func:`_layer_norm`, float32 CPU, inference and training); in float32 CPU training the
MLP is one autograd node whose backward applies the GELU's derivative, kept from the forward, in a GEMM's
epilogue (:class:`_OneDnnMlp`).  The patch merging/expanding layers are reshapes around a LayerNorm and a Linear
and have one path.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from fastmed import _ext
from fastmed._validate import check_choice, check_int, check_per_axis, check_spatial_dims, check_token_grid
from fastmed.ops.window_attention import BIAS_INDEX, cpu_inference, window_attention
from fastmed.reference import window_attention as ref

__all__ = ["WindowAttention", "SwinTransformerBlock", "Mlp", "DropPath", "PatchMerging", "PatchExpand",
           "FinalPatchExpandX4"]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, on the token grid.

    Args:
        dim: channels C.
        num_heads: heads; must divide ``dim``.
        window_size: window per spatial axis; its length (2 or 3) fixes the dimensionality.
        qkv_bias: bias in the qkv Linear.
        attn_drop: dropout on the attention probabilities; when > 0 in training the eager path runs
            (the fused kernel has no attention dropout).
        proj_drop: dropout after the output projection.
        fused: use :func:`fastmed.ops.window_attention` (True) or the eager MONAI composition (False).
        bias_index: ``"monai"`` (default) reproduces MONAI's ``relative_position_index[:n, :n]`` when the window
            shrinks on a small grid; ``"coords"`` looks the bias up by displacement (see the op).

    Shapes: ``forward(x (B, *S, C), shift_size=0, residual=None) -> (B, *S, C)``; with ``residual`` (``(B, *S, C)``)
    the result is ``residual + attention(x)`` (on the fused path the add is in the output projection's GEMM
    epilogue where oneDNN runs it).  Any grid: windows shrink on axes not larger than the window, and grids not
    divisible by the window are zero-padded before the qkv Linear and cropped after (MONAI's
    ``SwinTransformerBlock`` semantics).
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True, bias_index: str = "monai"):
        super().__init__()
        dim, num_heads = check_int(dim, "dim", 1), check_int(num_heads, "num_heads", 1)
        if dim % num_heads != 0:
            raise ValueError(f"num_heads must divide dim={dim}, got num_heads={num_heads}")
        check_choice(bias_index, "bias_index", BIAS_INDEX)
        if not isinstance(window_size, Sequence) or isinstance(window_size, str) or len(window_size) not in (2, 3):
            raise ValueError(f"window_size must be 2 or 3 integers >= 1 (one per spatial axis), got {window_size!r}")
        self.window_size = check_per_axis(window_size, "window_size", len(window_size), 1)
        self.dim, self.num_heads = dim, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused, self.bias_index = fused, bias_index
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window_size), num_heads))
        self.register_buffer("relative_position_index", ref.relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, shift_size: Union[int, Sequence[int]] = 0,
                residual: Optional[Tensor] = None) -> Tensor:
        nd = len(self.window_size)
        check_token_grid(x, "x", nd, self.dim)
        shift = check_per_axis(shift_size, "shift_size", nd, 0)
        _check_residual(residual, x)
        if self.fused and not (self.training and self.attn_drop.p > 0):
            out = self._fused_attention(fused_linear(x, self.qkv), shift)
            if residual is not None and _inactive(self.proj_drop):
                return fused_linear(out, self.proj, residual=residual)
            y = self.proj_drop(fused_linear(out, self.proj))
        else:
            y = self.proj_drop(self.proj(self._eager(x, shift)))
        return y if residual is None else residual + y

    def _fused_attention(self, qkv: Tensor, shift: tuple[int, ...]) -> Tensor:
        """The window-attention op on the qkv grid (without autograd on the CPU straight into its C++ kernel)."""
        table, pad = self.relative_position_bias_table, self.qkv.bias
        out = cpu_inference(qkv, self.num_heads, self.window_size, shift, table, self.scale, pad, self.bias_index)
        if out is None:  # grad mode, or a call the C++ kernel does not take
            out = window_attention(qkv, self.num_heads, self.window_size, shift, table, self.scale, qkv_pad=pad,
                                   bias_index=self.bias_index)
        return out

    def _eager(self, x: Tensor, shift: tuple[int, ...]) -> Tensor:
        """MONAI's composition: pad the tokens, qkv, roll, partition, bias + mask, softmax, reverse, crop."""
        grid = tuple(x.shape[1:-1])
        window, shift = ref.effective_window(grid, self.window_size, shift)
        pads = []
        for s, w in zip(reversed(grid), reversed(window)):
            pads += [0, -s % w]
        xp = F.pad(x, [0, 0] + pads)
        n = math.prod(window)
        if self.bias_index == "monai":
            index = self.relative_position_index[:n, :n]
        else:
            index = ref.bias_index(window, self.window_size, window).to(x.device)
        qkv = self.qkv(xp)
        out = _eager_attention(qkv, self.num_heads, window, shift, self.relative_position_bias_table, self.scale,
                               index, self.attn_drop)
        if out.shape[1:-1] != grid:
            out = out[(slice(None),) + tuple(slice(0, s) for s in grid)]
        return out


def _eager_attention(qkv: Tensor, num_heads: int, window, shift, table: Tensor, scale: float, index: Tensor,
                     attn_drop: nn.Module) -> Tensor:
    """timm / MONAI eager window attention on a divisible grid, with attention dropout."""
    nd = qkv.dim() - 2
    grid = tuple(qkv.shape[1:-1])
    C = qkv.shape[-1] // 3
    lead = (1,) * (3 - nd)
    x = torch.roll(qkv, tuple(-s for s in shift), tuple(range(1, nd + 1))) if any(shift) else qkv
    x = x.reshape((x.shape[0],) + lead + grid + (3 * C,))
    xw = ref.window_partition(x, lead + tuple(window))
    bw, n, _ = xw.shape
    q, k, v = xw.reshape(bw, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    mask = ref.shift_mask(lead + grid, lead + tuple(window), (0,) * (3 - nd) + tuple(shift), qkv.device, attn.dtype)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads, n, n)
    attn = attn_drop(torch.softmax(attn, dim=-1)).to(v.dtype)
    out = (attn @ v).transpose(1, 2).reshape(bw, n, C)
    out = ref.window_reverse(out, lead + tuple(window), lead + grid).reshape(qkv.shape[:-1] + (C,))
    return torch.roll(out, tuple(shift), tuple(range(1, nd + 1))) if any(shift) else out


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples with probability ``drop_prob`` in training, rescale the rest."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _onednn_linear():
    """torch's oneDNN linear with a fused epilogue (``torch.ops.mkldnn._linear_pointwise``: bias and an activation
    applied to the GEMM's output tile while it is in the cache), or None where this torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear()


def _weight_grad(dy: Tensor, inp: Tensor) -> Tensor:
    """``dy^T inp`` ``(out, in)`` from ``dy`` ``(tokens, out)`` and ``inp`` ``(tokens, in)``: when ``out < in``, as the
    transpose of ``inp^T dy`` (the same products and sums; a view, made contiguous where autograd accumulates it).
    Measured here (2 threads, torch 2.13 CPU, 6272 tokens): the GEMM with the taller output runs faster, e.g. an MLP's
    second Linear (384 -> 96) 2.72 ms against 3.10 ms for ``dy^T inp``, while for the first (96 -> 384) ``dy^T inp``
    is the faster one."""
    if dy.shape[1] < inp.shape[1]:
        return inp.t().mm(dy).t()
    return dy.t().mm(inp)


def _input_grad(dy: Tensor, w: Tensor) -> Tensor:
    """``dy w``, a Linear's input gradient, from ``dy`` ``(tokens, out)`` and the weight ``(out, in)``: by oneDNN's
    linear on the transposed weight (a copy of at most ``(in, out)`` values) for a float32 ``dy`` of at least
    ``_ONEDNN_MIN_ROWS`` rows outside grad mode, else ``mm``.  Measured here (2 threads, torch 2.13 CPU, 6272 tokens,
    medians of 120 interleaved calls, three runs): the 384 -> 96 input gradient of an MLP's first Linear 2.94-2.95 ms
    against 3.81-3.89 ms (``mm`` into a given output), the qkv Linear's (288 -> 96) 2.16-2.34 against 2.83-3.07 ms,
    the projection's (96 -> 96) 0.84-0.97 against 0.89-1.05 ms.  Under ``create_graph=True`` (grad mode on) ``mm``,
    which autograd can differentiate."""
    if (_ONEDNN_LINEAR is not None and dy.shape[0] >= _ONEDNN_MIN_ROWS and dy.dtype == torch.float32
            and w.dtype == torch.float32 and dy.is_contiguous() and not torch.is_grad_enabled()):
        return _ONEDNN_LINEAR(dy, w.t().contiguous(), None, "none", [], "")
    return dy.mm(w)


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear(gelu(x) if gelu_input else x, w, b)`` (plus ``residual`` when given) with the GEMM by oneDNN (the
    bias, and the residual, in its epilogue: no broadcast copy of the bias into the output first, as ``addmm``
    makes, and no pass of its own for the residual add) and the backward's GEMMs (``d in = dy w``, by oneDNN too,
    see :func:`_input_grad`; ``d w = dy^T in``, ``d b = sum dy``, ``d residual = dy``).  With ``gelu_input`` the
    GELU's backward is written into the buffer of ``d gelu(x)``, which this backward allocated itself (one
    ``(tokens, 4C)`` tensor fewer per MLP); under ``create_graph=True`` the same formulas run out of place,
    differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], gelu_input: bool,
                residual: Optional[Tensor] = None) -> Tensor:
        inp = F.gelu(x) if gelu_input else x
        ctx.gelu_input, ctx.has_bias = gelu_input, b is not None
        ctx.save_for_backward(x, inp if gelu_input else None, w)
        if residual is not None:
            return _ONEDNN_LINEAR.binary(inp, residual, w, b, "add")
        return _ONEDNN_LINEAR(inp, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, g, w = ctx.saved_tensors
        graph = torch.is_grad_enabled()  # create_graph=True: every term differentiable, GELU(x) with its graph
        inp = (F.gelu(x) if graph else g) if ctx.gelu_input else x
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = _weight_grad(dy2, inp.reshape(-1, inp.shape[-1])) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy2, w)
            if ctx.gelu_input:
                x2 = x.reshape(-1, x.shape[-1])
                if graph:
                    dx = torch.ops.aten.gelu_backward(dx, x2)
                else:
                    torch.ops.aten.gelu_backward.grad_input(dx, x2, grad_input=dx)
            dx = dx.view(x.shape)
        return dx, dw, db, None, dy if ctx.needs_input_grad[4] else None


@functools.cache
def _ext_function(name: str):
    """``fastmed._C.<name>``, or None where the extension is not built (or lacks it)."""
    if not _ext.extension_info()["built"]:
        return None
    return getattr(_ext.load(), name, None)


def _gelu_kernel():
    """``fastmed._C.gelu_and_derivative_cpu_`` (csrc/gelu_cpu.cpp: returns GELU(x), overwrites x with GELU'(x)), or
    None (torch's GELU and its backward then)."""
    return _ext_function("gelu_and_derivative_cpu_")


def _mul_sums_kernel():
    """``fastmed._C.mul_and_column_sums_cpu_`` (csrc/gelu_cpu.cpp: ``a *= b`` in place and the column sums of the
    product, in a fixed order), or None."""
    return _ext_function("mul_and_column_sums_cpu_")


def _layer_norm_kernel():
    """``fastmed._C.layer_norm_cpu`` (csrc/layer_norm_cpu.cpp), or None."""
    return _ext_function("layer_norm_cpu")


class _LayerNorm(torch.autograd.Function):
    """``F.layer_norm(x, (C,), w, b, eps)`` over the last dimension of a contiguous float32 CPU tensor with
    fastmed._C's forward (which also returns each row's mean and rstd) and backward (a row's gradient from its two
    sums; the weight and bias gradients summed per fixed block of rows, in block order).  Saves x, the weight and
    the row statistics, as torch's LayerNorm does.  Under ``create_graph=True`` the backward runs torch's
    differentiable formulas on the recomputed statistics.

    With ``residual=True`` it returns ``(y, x)``, the second an alias of ``x`` for a residual connection to use in
    x's place: the gradient that alias receives is then added to x's in the backward kernel's pass (the engine
    would otherwise add the two gradients of x in a pass of its own)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float, residual: bool = False):
        y, mean, rstd = _layer_norm_kernel()(x, w, b, eps, True)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.eps, ctx.has_w, ctx.has_b = eps, w is not None, b is not None
        if residual:
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no tensor of zeros)
            return y, x.view_as(x)
        return y

    @staticmethod
    def backward(ctx, dy: Optional[Tensor], dres: Optional[Tensor] = None):
        x, w, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        C = x.shape[-1]
        if dy is None:  # only the alias was used
            return dres if need[0] else None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas
            mu = x.mean(-1, keepdim=True)
            rs = (x.var(-1, unbiased=False, keepdim=True) + ctx.eps).rsqrt()
            xh = (x - mu) * rs
            g = dy * w if ctx.has_w else dy
            dx = rs * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
            if dres is not None:
                dx = dx + dres
            return (dx if need[0] else None, (dy * xh).reshape(-1, C).sum(0) if ctx.has_w and need[1] else None,
                    dy.reshape(-1, C).sum(0) if ctx.has_b and need[2] else None, None, None)
        add = None  # the alias's gradient, added in the kernel's pass where it is a plain tensor like x
        if dres is not None and need[0] and type(dres) is Tensor and dres.dtype == x.dtype and dres.shape == x.shape:
            add = dres.contiguous()
        dx, dw, db = _ext.load().layer_norm_backward_cpu(dy.contiguous(), x, mean, rstd, w, need[0],
                                                         ctx.has_w and need[1], ctx.has_b and need[2], add)
        if dres is not None and need[0] and add is None:
            dx = dx + dres
        return dx, dw, db, None, None


def _layer_norm(norm: nn.Module, x: Tensor, residual: bool = False):
    """``norm(x)``.  For a plain ``nn.LayerNorm`` over the last dimension of a contiguous float32 CPU tensor with
    float32 CPU parameters, outside autocast and torch.compile and where ``fastmed._C`` is built: the C++ LayerNorm
    (csrc/layer_norm_cpu.cpp; measured here, 2 threads, (1, 56^2, 96): ~0.05 ms against ~0.13 ms for torch's
    forward), as one autograd node (:class:`_LayerNorm`) when a gradient is recorded.  The same two-pass formula as
    torch's, float32 rounding apart.  With ``residual=True``: ``(norm(x), r)``, ``r`` what a residual connection
    should add in place of ``x`` (an alias of ``x`` from the node, whose backward then adds its gradient; else
    ``x``)."""
    y = _layer_norm_or_none(norm, x, residual)
    if y is None:
        y = norm(x)
        return (y, x) if residual else y
    return y


def _layer_norm_or_none(norm: nn.Module, x: Tensor, residual: bool):
    """:func:`_layer_norm`'s C++ path, None where it does not apply."""
    if (torch.compiler.is_compiling() or type(norm) is not nn.LayerNorm or type(x) is not Tensor
            or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous()
            or norm.normalized_shape != (x.shape[-1],) or norm._forward_hooks or norm._forward_pre_hooks
            or torch.is_autocast_enabled("cpu")):
        return None
    kernel = _layer_norm_kernel()
    if kernel is None:
        return None
    w, b = norm.weight, norm.bias
    params = [t for t in (w, b) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or type(t.data) is not Tensor
           or not t.is_contiguous() for t in params):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
        return _LayerNorm.apply(x, w, b, norm.eps, residual)
    y = kernel(x, None if w is None else w.detach(), None if b is None else b.detach(), norm.eps)[0]
    return (y, x) if residual else y


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): then a node's saved tensors may be
    read again and must not be overwritten.  True where this torch cannot tell."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


class _OneDnnMlp(torch.autograd.Function):
    """``residual + linear2(gelu(linear1(x)))`` (the exact GELU; ``residual`` optional) for training on the CPU in
    float32, as one autograd node.  The forward's GEMMs are oneDNN's (the biases, and the residual, in their
    epilogues); between them, where ``fastmed._C`` is built, one pass over the hidden activation computes the GELU
    and overwrites the pre-activation with the GELU's derivative (csrc/gelu_cpu.cpp: one erf and one exponential a
    value).  The backward's GELU is then a product, ``(dy w2) * gelu'``, with no erf or exponential (torch's GELU
    backward reads the pre-activation and computes both): written into the GELU output's buffer, which nothing
    reads after ``d w2``, and multiplied in place where the graph is freed after the backward (no ``(tokens, 4C)``
    tensor of its own), else (``retain_graph=True``) in the epilogue of a oneDNN GEMM.  Without the extension,
    torch's GELU and its backward (in place).  Saves ``x``, the GELU's output and the derivative (or the
    pre-activation), as the two Linears' and the GELU's nodes save.  Under ``create_graph=True`` the backward
    recomputes the pre-activation and runs torch's differentiable formulas."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                residual: Optional[Tensor]) -> Tensor:
        pre = _ONEDNN_LINEAR(x, w1, b1, "none", [], "")
        kernel = _gelu_kernel()
        ctx.derivative = kernel is not None
        g = kernel(pre) if ctx.derivative else F.gelu(pre)  # with the kernel, pre now holds GELU'(pre)
        ctx.save_for_backward(x, w1, b1, g, pre, w2)
        ctx.has_b2, ctx.has_residual = b2 is not None, residual is not None
        if residual is not None:
            return _ONEDNN_LINEAR.binary(g, residual, w2, b2, "add")
        return _ONEDNN_LINEAR(g, w2, b2, "none", [], "")

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w1, b1, g, saved, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dres = dy if ctx.has_residual and need[5] else None
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas on the recomputed pre-activation
            pre = F.linear(x2, w1, b1)
            dpre = torch.ops.aten.gelu_backward(dy2.mm(w2), pre)
            return (dpre.mm(w1).view(x.shape) if need[0] else None, dpre.t().mm(x2) if need[1] else None,
                    dpre.sum(0) if b1 is not None and need[2] else None,
                    dy2.t().mm(F.gelu(pre)) if need[3] else None, dy2.sum(0) if ctx.has_b2 and need[4] else None,
                    dres)
        g2 = g.reshape(-1, g.shape[-1])
        dw2 = _weight_grad(dy2, g2) if need[3] else None
        db2 = dy2.sum(0) if ctx.has_b2 and need[4] else None
        dx = dw1 = db1 = None
        if need[0] or need[1] or need[2]:
            s2 = saved.reshape(g2.shape)
            if ctx.derivative and not _graph_kept():
                # d pre = (dy w2) * GELU'(pre) into the GELU output's buffer, which nothing reads after d w2
                # (the graph is freed after this backward): no (tokens, 4C) tensor of its own, ~10 MB less at the
                # peak of a Swin-Unet stage-1 training step; the product and d b1 (its column sums) in one C++ pass
                dpre = torch.mm(dy2, w2, out=g2)
                product = _mul_sums_kernel()
                if product is not None and b1 is not None and need[2]:
                    db1 = product(dpre, s2)[1]
                else:
                    dpre.mul_(s2)
            elif ctx.derivative:  # the product in the epilogue of oneDNN's GEMM
                dpre = _ONEDNN_LINEAR.binary(dy2, s2, w2.t().contiguous(), None, "mul")
            else:
                dpre = dy2.mm(w2)
                torch.ops.aten.gelu_backward.grad_input(dpre, s2, grad_input=dpre)
            dw1 = _weight_grad(dpre, x2) if need[1] else None
            if db1 is None and b1 is not None and need[2]:
                db1 = dpre.sum(0)
            dx = _input_grad(dpre, w1).view(x.shape) if need[0] else None
        return dx, dw1, db1, dw2, db2, dres


# oneDNN's linear costs ~10-25 us more per call than torch's addmm; from about this many rows (tokens) on, its
# epilogues (bias, GELU, residual) win it back.  Measured here (2 threads, a 2D Swin-Unet block, C = 96, inference):
# 441 tokens 1.15 ms with torch's Linears against 1.21 ms with oneDNN's, 784 tokens 2.19 against 1.93 ms.
_ONEDNN_MIN_ROWS = 576


def _plain_linear(layer: nn.Linear) -> bool:
    """A plain ``nn.Linear`` (not a subclass) with float32 CPU weights and no hooks."""
    w = layer.weight
    return (type(layer) is nn.Linear and w.dtype == torch.float32 and w.device.type == "cpu"
            and not layer._forward_hooks and not layer._forward_pre_hooks)


def _onednn_applies(x: Tensor, layer: nn.Linear) -> bool:
    """Whether :func:`fused_linear` may run ``layer`` on ``x`` with oneDNN: a plain float32 CPU tensor of at least
    ``_ONEDNN_MIN_ROWS`` rows and a plain ``nn.Linear`` without hooks, outside autocast and torch.compile."""
    return (_ONEDNN_LINEAR is not None and type(x) is Tensor and _plain_linear(layer) and x.device.type == "cpu"
            and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1] and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _residual_applies(residual: Optional[Tensor], x: Tensor, layer: nn.Linear) -> bool:
    """Whether ``residual`` can be added in the oneDNN GEMM's epilogue: a plain float32 CPU tensor of the output's
    shape (``x``'s with ``out_features`` last)."""
    return (residual is not None and type(residual) is Tensor and residual.device.type == "cpu"
            and residual.dtype == torch.float32 and residual.shape == x.shape[:-1] + (layer.out_features,))


def _inactive(drop: nn.Module) -> bool:
    """Whether a dropout (or drop-path) module is the identity now: evaluation mode or probability 0."""
    p = getattr(drop, "p", getattr(drop, "drop_prob", None))
    return type(drop) is nn.Identity or (p is not None and (not drop.training or p == 0.0))


def _forward_hooked(*modules: nn.Module) -> bool:
    """Whether calling ``modules`` would run forward hooks (their own or global ones)."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _check_residual(residual: Optional[Tensor], x: Tensor) -> None:
    """A module's ``residual`` argument: None or a tensor of ``x``'s shape."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def _needs_grad(x: Tensor, *layers: nn.Linear, residual: Optional[Tensor] = None) -> bool:
    """Whether autograd records a call on ``x`` (and ``residual``) through ``layers``: grad mode on and a tensor
    requiring grad."""
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad) or any(
        t is not None and t.requires_grad for layer in layers for t in (layer.weight, layer.bias)))


def gelu_linear(x: Tensor, layer: nn.Linear, residual: Optional[Tensor] = None) -> Tensor:
    """``layer(F.gelu(x))`` (the exact GELU), plus ``residual`` when given: when a gradient is needed on the CPU in
    float32, one autograd node whose GEMM is oneDNN's (the residual added in its epilogue) and whose backward writes
    the GELU's gradient in place (:class:`_OneDnnLinear`); without gradients :func:`fused_linear`'s path; else the
    torch calls."""
    if _onednn_applies(x, layer) and _needs_grad(x, layer, residual=residual):
        if residual is None or _residual_applies(residual, x, layer):
            return _OneDnnLinear.apply(x, layer.weight, layer.bias, True, residual)
    return fused_linear(F.gelu(x), layer, residual=residual)


def fused_linear(x: Tensor, layer: nn.Linear, gelu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """``layer(x)``, followed by the exact (erf) GELU when ``gelu``, or ``residual + layer(x)`` when ``residual``
    (``(..., out_features)``) is given (not both); ``x`` ``(..., in_features)`` -> ``(..., out_features)``.

    On the CPU, for float32 without autograd (inference, ``torch.no_grad``) and outside ``torch.compile``, one
    oneDNN GEMM with the bias and the GELU applied in its epilogue: the GELU costs no pass of its own over the
    ``(tokens, 4C)`` hidden activation and the bias no broadcast copy (``addmm`` writes it before the GEMM).  The
    same GEMM and the same exact GELU: equal to ``F.gelu(layer(x))`` up to the GEMM's summation order.  A residual
    is added in the same epilogue (a float32 CPU tensor of the output's shape; no pass of its own).  When a
    gradient is needed and ``gelu`` is False, the same oneDNN GEMM in an autograd node (:class:`_OneDnnLinear`:
    autograd's backward GEMMs).  Anything else (a GELU with gradients, autocast, other dtypes or devices, a subclass
    of ``nn.Linear``, hooks on it, tensor subclasses) runs ``layer``, ``F.gelu`` and the add.
    """
    if gelu and residual is not None:
        raise ValueError("fused_linear: gelu=True and a residual cannot be combined (the GELU would come first)")
    w, b = layer.weight, layer.bias
    if _onednn_applies(x, layer) and (residual is None or _residual_applies(residual, x, layer)):
        if not _needs_grad(x, layer, residual=residual):
            if residual is not None:
                return _ONEDNN_LINEAR.binary(x, residual, w, b, "add")
            return _ONEDNN_LINEAR(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
        if not gelu:  # training: the GEMM without addmm's bias copy, autograd's backward
            return _OneDnnLinear.apply(x, w, b, False, residual)
    y = layer(x)
    if residual is not None:
        return residual + y
    return F.gelu(y) if gelu else y


class Mlp(nn.Module):
    """``linear2(drop(act(linear1(x))))`` then dropout, MONAI's ``MLPBlock`` in ``dropout_mode="swin"``.

    ``forward(x (..., hidden_size), fused=False)``: with ``fused=True`` the Linears and the GELU go through
    :func:`fused_linear` (on the CPU in float32 without autograd: one oneDNN GEMM with the GELU fused) or, when a
    gradient is needed and the dropout is off, one autograd node (:class:`_OneDnnMlp`: oneDNN GEMMs, the GELU's
    derivative computed with the GELU and applied in the backward GEMM's epilogue; for plain ``nn.Linear`` layers
    and float32 CPU inputs of at least ``_ONEDNN_MIN_ROWS`` tokens, else :func:`fused_linear` and
    :func:`gelu_linear`); the same result.  ``residual`` (``x``'s shape): ``residual + mlp(x)``, added in the
    second GEMM's epilogue where oneDNN runs it.
    """

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()
        self.drop = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor, fused: bool = False, residual: Optional[Tensor] = None) -> Tensor:
        _check_residual(residual, x)
        if fused and type(self.fn) is nn.GELU and self.fn.approximate == "none":
            if _inactive(self.drop):  # the residual (if any) in the second GEMM's epilogue
                if _needs_grad(x, self.linear1, self.linear2, residual=residual):
                    if _onednn_applies(x, self.linear1) and _plain_linear(self.linear2) and (
                            residual is None or _residual_applies(residual, x, self.linear2)):
                        return _OneDnnMlp.apply(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                                self.linear2.bias, residual)
                    return gelu_linear(fused_linear(x, self.linear1), self.linear2, residual=residual)
                return fused_linear(fused_linear(x, self.linear1, gelu=True), self.linear2, residual=residual)
            y = self.drop(fused_linear(self.drop(fused_linear(x, self.linear1, gelu=True)), self.linear2))
        else:
            y = self.drop(self.linear2(self.drop(self.fn(self.linear1(x)))))
        return y if residual is None else residual + y


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: ``x + drop_path(W-MSA/SW-MSA(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    A drop-in for MONAI's ``SwinTransformerBlock`` (MONAI 1.6's constructor arguments in its positional order,
    then fastmed's ``fused`` and ``bias_index``; same state-dict names); the shifted-window mask is computed from
    region ids inside the kernel, so ``forward``'s ``mask_matrix`` (which MONAI's ``BasicLayer`` passes) is
    accepted and ignored.  ``act_layer``: MONAI's default ``"GELU"`` only.  ``use_checkpoint``: each half of the
    block is recomputed in the backward (``torch.utils.checkpoint``) while training, as MONAI does.
    ``use_flash_attention`` is accepted for MONAI's signature and changes nothing: the attention is always the
    fused window-attention op.

    Shapes: ``(B, H, W, C)`` or ``(B, D, H, W, C)`` (matching ``len(window_size)``) in and out.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: str = "GELU", norm_layer: type[nn.Module] = nn.LayerNorm,
                 use_checkpoint: bool = False, use_flash_attention: bool = False, fused: bool = True,
                 bias_index: str = "monai"):
        super().__init__()
        if not isinstance(act_layer, str) or act_layer.upper() != "GELU":
            raise ValueError(f"act_layer must be 'GELU' (MONAI's default; the only activation fastmed's Swin MLP "
                             f"has), got {act_layer!r}")
        self.use_checkpoint = bool(use_checkpoint)
        self.use_flash_attention = bool(use_flash_attention)
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = check_per_axis(shift_size, "shift_size", len(self.window_size), 0)
        for w, s in zip(self.window_size, self.shift_size):
            if not 0 <= s < w:
                raise ValueError(f"shift_size must satisfy 0 <= shift < window on every axis, got "
                                 f"shift_size={self.shift_size} with window_size={self.window_size}")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, fused=fused, bias_index=bias_index)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _norm(self, norm: nn.Module, x: Tensor, residual: bool = False):
        """``norm(x)``; on the fused path through :func:`_layer_norm` (a C++ LayerNorm for float32 CPU tensors).
        ``residual=True``: ``(norm(x), r)`` with ``r`` for the residual connection (see :func:`_layer_norm`)."""
        if getattr(self.attn, "fused", False):
            return _layer_norm(norm, x, residual)
        return (norm(x), x) if residual else norm(x)

    def _attention_part(self, x: Tensor) -> Tensor:
        return self.drop_path(self.attn(self._norm(self.norm1, x), self.shift_size))

    def _mlp_part(self, x: Tensor) -> Tensor:
        h = self._norm(self.norm2, x)
        # the MLP follows the attention's path (fastmed.patch may have put MONAI's MLPBlock here)
        return self.drop_path(self.mlp(h, fused=self.attn.fused) if type(self.mlp) is Mlp else self.mlp(h))

    def _cpu_inference(self, x: Tensor) -> Optional[Tensor]:
        """The block without autograd on a float32 CPU grid of at least ``_ONEDNN_MIN_ROWS`` tokens, as straight
        calls: the C++ LayerNorms, oneDNN's GEMMs (bias, GELU and residuals in their epilogues) and the C++ window
        attention, none of the submodules' calls, checks and dispatch in between (~0.2-0.3 ms of a ~5.5 ms
        Swin-Unet stage-1 block here).  The same kernels in the same order as the fused path through the
        submodules, so the same result.  None where that path would run something else (other submodule types,
        hooks on them, active dropout or drop path, the eager attention, other dtypes or devices, autocast,
        torch.compile): ``forward`` then takes it."""
        attn, mlp, norm1, norm2 = self.attn, self.mlp, self.norm1, self.norm2
        if (_ONEDNN_LINEAR is None or type(attn) is not WindowAttention or type(mlp) is not Mlp or not attn.fused
                or type(norm1) is not nn.LayerNorm or type(norm2) is not nn.LayerNorm or type(x) is not Tensor
                or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous()
                or x.dim() != len(attn.window_size) + 2 or x.shape[-1] != attn.dim
                or x.numel() < _ONEDNN_MIN_ROWS * attn.dim or type(mlp.fn) is not nn.GELU
                or mlp.fn.approximate != "none" or _forward_hooked(attn, mlp) or torch.is_autocast_enabled("cpu")
                or torch.compiler.is_compiling()):
            return None
        if not all(_inactive(d) for d in (self.drop_path, attn.attn_drop, attn.proj_drop, mlp.drop)):
            return None
        C, qkv, proj, lin1, lin2 = attn.dim, attn.qkv, attn.proj, mlp.linear1, mlp.linear2
        if not (all(_plain_linear(layer) for layer in (qkv, proj, lin1, lin2)) and qkv.in_features == C
                and qkv.out_features == 3 * C and proj.in_features == C and proj.out_features == C
                and lin1.in_features == C and lin2.in_features == lin1.out_features and lin2.out_features == C):
            return None
        # nested calls: each intermediate is freed as soon as the next call has read it (the peak of the path
        # through the submodules, no local name keeping the qkv grid alive into the MLP)
        x = _ONEDNN_LINEAR.binary(
            attn._fused_attention(_ONEDNN_LINEAR(_layer_norm(norm1, x), qkv.weight, qkv.bias, "none", [], ""),
                                  self.shift_size), x, proj.weight, proj.bias, "add")
        return _ONEDNN_LINEAR.binary(_ONEDNN_LINEAR(_layer_norm(norm2, x), lin1.weight, lin1.bias, "gelu", [], "none"),
                                     x, lin2.weight, lin2.bias, "add")

    def forward(self, x: Tensor, mask_matrix: Optional[Tensor] = None) -> Tensor:
        if not torch.is_grad_enabled():
            y = self._cpu_inference(x)
            if y is not None:
                return y
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            x = x + torch.utils.checkpoint.checkpoint(self._attention_part, x, use_reentrant=False)
            return x + torch.utils.checkpoint.checkpoint(self._mlp_part, x, use_reentrant=False)
        if type(self.attn) is WindowAttention and type(self.mlp) is Mlp and _inactive(self.drop_path):
            # the residual adds in the output GEMMs' epilogues (no pass of their own where oneDNN runs them); on
            # the fused path the residual is the LayerNorm node's alias of x, so that the C++ LayerNorm backward
            # adds the residual's gradient to x's in its own pass
            h, r = self._norm(self.norm1, x, residual=True)
            x = self.attn(h, self.shift_size, residual=r)
            h, r = self._norm(self.norm2, x, residual=True)
            return self.mlp(h, fused=self.attn.fused, residual=r)
        x = x + self._attention_part(x)
        return x + self._mlp_part(x)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 (2x2x2) neighbourhood -> LayerNorm(4C / 8C) -> Linear(-> 2C, no bias).

    ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)`` and the 3D analogue; odd sizes are zero-padded (MONAI).
    The concatenation order is Swin's / MONAI's: 2D ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``;
    3D ``mode="merging"`` is MONAI's ``PatchMerging`` (SwinUNETR's default), ``mode="mergingv2"`` its
    ``PatchMergingV2`` (``itertools.product`` order).
    """

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, spatial_dims: int = 3,
                 mode: str = "merging"):
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.dim, self.spatial_dims, self.mode = dim, spatial_dims, check_choice(mode, "mode", ("merging", "mergingv2"))
        k = 2 ** spatial_dims
        self.reduction = nn.Linear(k * dim, 2 * dim, bias=False)
        self.norm = norm_layer(k * dim)

    def forward(self, x: Tensor) -> Tensor:
        nd = self.spatial_dims
        check_token_grid(x, "x", nd, self.dim)
        pads = []
        for s in reversed(x.shape[1:-1]):
            pads += [0, s % 2]
        if any(pads):
            x = F.pad(x, [0, 0] + pads)
        if nd == 2:
            parts = [x[:, j::2, i::2] for i, j in itertools.product(range(2), range(2))]
        elif self.mode == "mergingv2":
            parts = [x[:, i::2, j::2, k::2] for i, j, k in itertools.product(range(2), range(2), range(2))]
        else:
            order = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
            parts = [x[:, i::2, j::2, k::2] for i, j, k in order]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


def _pixel_shuffle(x: Tensor, p: int) -> Tensor:
    """``(B, H, W, p*p*c) -> (B, H*p, W*p, c)`` as Swin-Unet's ``'b h w (p1 p2 c) -> b (h p1) (w p2) c'``."""
    B, H, W, C = x.shape
    c = C // (p * p)
    return x.view(B, H, W, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H * p, W * p, c)


class PatchExpand(nn.Module):
    """Swin-Unet's 2x up-sampling: Linear(C -> 2C, no bias) -> 2x2 pixel shuffle -> LayerNorm(C/2).

    ``(B, H, W, C) -> (B, 2H, 2W, C/2)``.
    """

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"dim must be even, got {dim}")
        self.dim = dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = norm_layer(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        check_token_grid(x, "x", 2, self.dim)
        return self.norm(_pixel_shuffle(self.expand(x), 2))


class FinalPatchExpandX4(nn.Module):
    """Swin-Unet's final 4x up-sampling: Linear(C -> 16C, no bias) -> 4x4 pixel shuffle -> LayerNorm(C).

    ``(B, H, W, C) -> (B, 4H, 4W, C)``.
    """

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.output_dim = dim
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        check_token_grid(x, "x", 2, self.dim)
        return self.norm(_pixel_shuffle(self.expand(x), 4))
