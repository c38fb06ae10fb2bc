"""Plain PyTorch reference for fused normalization + activation.

``y = act(norm(x) * weight + bias + residual)`` with per-(n, c) statistics (instance), per-(n, group)
statistics (group) or per-channel statistics over the batch (batch).  This module is the test
oracle and the CPU fallback of :func:`fastmed.ops.norm_act`.

Shapes: ``x`` is ``(N, C, *spatial)`` with 1 to 3 spatial dims; ``weight``/``bias`` ``(C,)``;
``residual`` like ``x``; the statistics are ``(N * G,)`` for instance (G = C) and group norm and
``(C,)`` for batch norm, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from fastmed._tensors import accumulation_dtype, memory_format

KINDS = ("instance", "group", "batch")
ACTIVATIONS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "prelu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def num_stat_groups(kind: str, channels: int, num_groups: Optional[int]) -> int:
    if kind == "instance":
        return channels
    if kind == "group":
        return int(num_groups)
    return 1


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an (N, C, *spatial) tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def apply_activation(z: torch.Tensor, act: str, negative_slope=0.01) -> torch.Tensor:
    """act(z); ``negative_slope`` is a float, or for ``prelu`` a (C,) or (1,) tensor."""
    if act == "identity":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, float(negative_slope))
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z)
    if act == "prelu":
        return F.prelu(z, negative_slope.to(z.dtype))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def apply_activation_(z: torch.Tensor, act: str, negative_slope=0.01) -> torch.Tensor:
    """act(z) written into z where torch has an in-place kernel (z must be a tensor the caller owns and no
    autograd graph needs): one allocation fewer than ``apply_activation``."""
    if act == "relu":
        return torch.relu_(z)
    if act == "leaky_relu":
        return F.leaky_relu_(z, float(negative_slope))
    if act == "silu":
        return F.silu(z, inplace=True)
    return apply_activation(z, act, negative_slope)


def activation_grad(z: torch.Tensor, act: str, negative_slope=0.01) -> torch.Tensor:
    """d act(z) / dz, elementwise, written out (the Triton kernels use the same formulas)."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "leaky_relu":
        return torch.where(z > 0, 1.0, float(negative_slope)).to(z.dtype)
    if act == "prelu":
        a = _bcast(negative_slope.to(z.dtype), z.dim()) if negative_slope.numel() > 1 else negative_slope.to(z.dtype)
        return torch.where(z > 0, torch.ones_like(z), a.expand_as(z))
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if act == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def compute_stats(x: torch.Tensor, kind: str, num_groups: Optional[int], eps: float):
    """Biased mean and 1/sqrt(var + eps) in the stats dtype: (N*G,) or (C,) for batch norm."""
    acc = accumulation_dtype(x.dtype)
    n, c = x.shape[:2]
    xf = x.to(acc)
    if kind == "batch":
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
    else:
        g = num_stat_groups(kind, c, num_groups)
        var, mean = torch.var_mean(xf.reshape(n, g, -1), dim=-1, unbiased=False)
        var, mean = var.reshape(-1), mean.reshape(-1)
    return mean, torch.rsqrt(var + eps)


def _expand_stats(stat: torch.Tensor, x: torch.Tensor, kind: str, num_groups: Optional[int]) -> torch.Tensor:
    """Per-row statistics -> broadcastable against x: (1, C, 1..) for batch, (N, C, 1..) otherwise."""
    n, c = x.shape[:2]
    shape = (1,) * (x.dim() - 2)
    if kind == "batch":
        return stat.reshape((1, c) + shape)
    g = num_stat_groups(kind, c, num_groups)
    return stat.reshape(n, g, 1).expand(n, g, c // g).reshape((n, c) + shape)


def pre_activation(x, mean, rstd, kind, num_groups, weight, bias, residual):
    """z = (x - mean) * rstd * weight + bias + residual, in the stats dtype; also returns xhat."""
    acc = mean.dtype
    xhat = (x.to(acc) - _expand_stats(mean, x, kind, num_groups)) * _expand_stats(rstd, x, kind, num_groups)
    z = xhat
    if weight is not None:
        z = z * _bcast(weight.to(acc), x.dim())
    if bias is not None:
        z = z + _bcast(bias.to(acc), x.dim())
    if residual is not None:
        z = z + residual.to(acc)
    return z, xhat


def _native_stats_layout(x: torch.Tensor, kind: str, num_groups: Optional[int]):
    n, c = x.shape[:2]
    hxw = x.numel() // max(n * c, 1)
    return n, c, hxw, num_stat_groups(kind, c, num_groups)


def norm_act_forward(x, kind, weight=None, bias=None, *, num_groups=None, eps=1e-5, activation_name="leaky_relu",
                     negative_slope=0.01, residual=None, mean=None, rstd=None):
    """Forward of the op on the reference backend: returns (y, mean, rstd).

    Built on torch's own normalization kernels (so the CPU fallback costs what the plain torch
    composition costs); low-precision inputs are computed in float32.  ``mean``/``rstd`` given
    (batch norm in eval mode) are used instead of input statistics.
    """
    orig = x.dtype
    acc = accumulation_dtype(orig)
    xf = x.to(acc)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    if mean is not None:
        z, _ = pre_activation(xf, mean, rstd, kind, num_groups, w, b, None)
    elif kind == "batch":
        z, mean, rstd = torch.ops.aten._native_batch_norm_legit.no_stats(xf, w, b, True, 0.0, eps)
    else:
        n, c, hxw, g = _native_stats_layout(x, kind, num_groups)
        z, mean, rstd = torch.ops.aten.native_group_norm(xf, w, b, n, c, hxw, g, eps)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    if residual is not None:
        z = z.add_(residual.to(acc))  # z is a fresh tensor here
    slope = negative_slope.to(acc) if activation_name == "prelu" else negative_slope
    y = apply_activation_(z, activation_name, slope).to(orig)
    return y, mean, rstd



def keeps_sign(activation_name: str, negative_slope) -> bool:
    """True when act'(z) can be read off y = act(z) (identity, relu, leaky_relu with slope > 0)."""
    if activation_name in ("identity", "relu"):
        return True
    return activation_name == "leaky_relu" and float(negative_slope) > 0


def norm_act_backward(dy, x, kind, weight, bias, residual, prelu_weight, mean, rstd, *, num_groups=None,
                      activation_name="leaky_relu", negative_slope=0.01, input_stats=True, y=None):
    """Backward on the reference backend: returns (dx, dweight, dbias, dresidual, dprelu), None where absent.

    g = dy * act'(z) (read off ``y`` when the activation keeps the sign, else from z recomputed from x,
    mean and rstd), then torch's native normalization backward.  ``input_stats=False`` treats mean/rstd as
    constants (batch norm in eval mode).
    """
    acc = mean.dtype
    nd = x.dim()
    xf, dyf = x.to(acc), dy.to(acc)
    w = weight.to(acc) if weight is not None else None
    z = None
    if y is not None and keeps_sign(activation_name, negative_slope):
        if activation_name == "identity":
            g = dyf.clone()  # the op's outputs may not alias its inputs (dresidual = g)
        else:
            slope = 0.0 if activation_name == "relu" else float(negative_slope)
            g = torch.ops.aten.leaky_relu_backward(dyf, y.to(acc), slope, True)
    else:
        z, _ = pre_activation(xf, mean, rstd, kind, num_groups, w, bias, residual)
        slope = prelu_weight.to(acc) if activation_name == "prelu" else negative_slope
        g = dyf * activation_grad(z, activation_name, slope)
    red = [0] + list(range(2, nd))
    dprelu = None
    if activation_name == "prelu":
        neg = torch.where(z > 0, torch.zeros_like(z), dyf * z)
        dprelu = (neg.sum(red) if prelu_weight.numel() > 1 else neg.sum().reshape(1)).to(prelu_weight.dtype)
    mask = [True, weight is not None, bias is not None]
    # torch's native backward kernels assume dY and X share one memory format (autograd arranges that).
    fmt = memory_format(x)
    g, xf = g.contiguous(memory_format=fmt), xf.contiguous(memory_format=fmt)
    if kind == "batch":
        # training: the saved batch statistics; eval (input_stats=False): constant statistics, which the
        # native backward reads as invstd = 1 / sqrt(running_var + eps) with running_var = rstd^-2, eps = 0.
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            g, xf, w, None if input_stats else mean, None if input_stats else rstd.pow(-2),
            mean if input_stats else None, rstd if input_stats else None, input_stats, 0.0, mask)
    else:
        n, c, hxw, gcount = _native_stats_layout(x, kind, num_groups)
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            g, xf, mean.reshape(n, gcount), rstd.reshape(n, gcount), w, n, c, hxw, gcount, mask)
    dweight = dw.to(weight.dtype) if weight is not None else None
    dbias = db.to(bias.dtype) if bias is not None else None
    dresidual = g.to(residual.dtype) if residual is not None else None
    return dx.to(x.dtype), dweight, dbias, dresidual, dprelu


def norm_act_reference(x, kind, weight=None, bias=None, *, num_groups=None, eps=1e-5, activation="leaky_relu",
                       negative_slope=0.01, residual=None, running_mean=None, running_var=None, momentum=0.1,
                       training=True):
    """The same op composed from torch.nn.functional, differentiable by autograd: the oracle.

    Mutates running_mean/running_var exactly like ``F.batch_norm`` for ``kind="batch"``.
    """
    orig = x.dtype
    acc = accumulation_dtype(orig)
    xf = x.to(acc)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    if kind == "instance":
        z = F.group_norm(xf, x.shape[1], w, b, eps)
    elif kind == "group":
        z = F.group_norm(xf, num_groups, w, b, eps)
    else:
        z = F.batch_norm(xf, running_mean, running_var, w, b, training, momentum, eps)
    if residual is not None:
        z = z + residual.to(acc)
    slope = negative_slope.to(acc) if activation == "prelu" else negative_slope
    return apply_activation(z, activation, slope).to(orig)
