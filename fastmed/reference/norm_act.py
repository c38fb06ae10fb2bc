"""Plain PyTorch reference for fused normalization + activation, and the op's vocabulary.

``y = act(norm(x) * weight + bias + residual)`` with per-(n, c) statistics (instance), per-(n, group)
statistics (group) or per-channel statistics over the batch (batch).  This module is the test
oracle and the CPU fallback of :func:`fastmed.ops.norm_act`, and it owns the names every layer shares:
:data:`KINDS`, :data:`ACTIVATIONS` (the Triton kernels take the same names as string constexprs) and the
specs :class:`NormSpec` / :class:`NormTensors` that travel between the Python layers.

Shapes: ``x`` is ``(N, C, *spatial)`` with 1 to 3 spatial dims; ``weight``/``bias`` ``(C,)``;
``residual`` like ``x``; the statistics are ``(N * G,)`` for instance (G = C) and group norm and
``(C,)`` for batch norm, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed._tensors import accumulation_dtype, memory_format

KINDS = ("instance", "group", "batch")
# The one list of activation names: reference, ops, modules, kernels (``ACT: tl.constexpr``) and tests use it.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "prelu")

# Constants of the GELU formulas (the Triton kernels use these values too).
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_CUBIC = 0.044715


class NormSpec(NamedTuple):
    """What the op computes, without tensors (all fields are primitives, as torch.library ops take them)."""
    kind: str              # one of KINDS
    num_groups: int        # statistics groups per sample: C for instance, G for group, 1 for batch
    eps: float             # added to the biased variance
    activation: str        # one of ACTIVATIONS
    negative_slope: float  # leaky_relu slope (the prelu slope is a tensor: NormTensors.slope)


class NormTensors(NamedTuple):
    """The optional tensors of the op beside ``x`` (None when absent); also the layout of their gradients."""
    weight: Optional[Tensor] = None    # (C,) affine scale
    bias: Optional[Tensor] = None      # (C,) affine shift
    residual: Optional[Tensor] = None  # like x, added before the activation
    slope: Optional[Tensor] = None     # (C,) or (1,) learned prelu slope


def num_stat_groups(kind: str, channels: int, num_groups: Optional[int]) -> int:
    if kind == "instance":
        return channels
    if kind == "group":
        return int(num_groups)
    return 1


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an (N, C, *spatial) tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel tensor in ``dtype``, contiguous: torch's native normalization kernels read their weight and
    bias as if contiguous (a strided or expanded parameter would be read wrongly)."""
    return t.to(dtype).contiguous() if t is not None else None


def activation_slope(activation: str, tensors: NormTensors, spec: NormSpec, dtype: torch.dtype):
    """The slope argument of :func:`apply_activation` / :func:`activation_grad`: the prelu slope tensor in
    ``dtype``, else the leaky_relu float."""
    return tensors.slope.to(dtype) if activation == "prelu" else spec.negative_slope


def apply_activation(z: Tensor, act: str, negative_slope: Union[float, Tensor] = 0.01) -> Tensor:
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


def activation_grad(z: Tensor, act: str, negative_slope: Union[float, Tensor] = 0.01) -> Tensor:
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
        cdf = 0.5 * (1.0 + torch.erf(z * INV_SQRT_2))
        return cdf + z * torch.exp(-0.5 * z * z) * INV_SQRT_2PI
    if act == "gelu_tanh":
        u = SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z * z * z)
        t = torch.tanh(u)
        du = SQRT_2_OVER_PI * (1.0 + 3 * GELU_TANH_CUBIC * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def compute_stats(x: Tensor, kind: str, num_groups: Optional[int], eps: float) -> tuple[Tensor, Tensor]:
    """Biased mean and 1/sqrt(var + eps) of x (already in the stats dtype): (N*G,), or (C,) for batch norm.

    ``torch.var_mean`` (Welford: no cancellation when |mean| >> std) over the view (N, G, C // G, S) of x (a view
    for contiguous and channels-last layouts alike, so no copy)."""
    c = x.shape[1]
    g = c if kind == "batch" else num_stat_groups(kind, c, num_groups)
    v = x.flatten(2).unflatten(1, (g, c // g))
    var, mean = torch.var_mean(v, dim=(0, 2, 3) if kind == "batch" else (2, 3), unbiased=False)
    return mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)


def _expand_stats(stat: Tensor, x: Tensor, kind: str, num_groups: Optional[int]) -> Tensor:
    """Per-row statistics -> broadcastable against x: (1, C, 1..) for batch, (N, C, 1..) otherwise."""
    n, c = x.shape[:2]
    shape = (1,) * (x.dim() - 2)
    if kind == "batch":
        return stat.reshape((1, c) + shape)
    g = num_stat_groups(kind, c, num_groups)
    return stat.reshape(n, g, 1).expand(n, g, c // g).reshape((n, c) + shape)


def normalize_affine(x: Tensor, mean: Tensor, rstd: Tensor, spec: NormSpec, weight: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tensor:
    """(x - mean) * (rstd * weight) + bias in x's dtype and layout (a new tensor), in two passes: x - mean first,
    which is exact when |mean| >> std, so the result is as exact as torch's own normalization kernels."""
    scale = _expand_stats(rstd, x, spec.kind, spec.num_groups)
    if weight is not None:
        scale = scale * _bcast(weight, x.dim())
    z = torch.sub(x, _expand_stats(mean, x, spec.kind, spec.num_groups), out=torch.empty_like(x))
    if bias is None:
        return z.mul_(scale)
    return torch.addcmul(_bcast(bias, x.dim()), z, scale, out=z)


def pre_activation(x, mean, rstd, spec: NormSpec, weight, bias, residual) -> Tensor:
    """z = (x - mean) * rstd * weight + bias + residual, in the stats dtype (differentiable)."""
    acc = mean.dtype
    z = (x.to(acc) - _expand_stats(mean, x, spec.kind, spec.num_groups)) * _expand_stats(rstd, x, spec.kind,
                                                                                        spec.num_groups)
    if weight is not None:
        z = z * _bcast(weight.to(acc), x.dim())
    if bias is not None:
        z = z + _bcast(bias.to(acc), x.dim())
    if residual is not None:
        z = z + residual.to(acc)
    return z


def _flat_rows(t: Tensor) -> Tensor:
    """Contiguous (N, C, *spatial) -> the view (1, N * C, S): instance norm is batch norm over these rows."""
    return t.view(1, t.shape[0] * t.shape[1], -1)


def norm_act_forward(x: Tensor, tensors: NormTensors, spec: NormSpec, mean: Optional[Tensor] = None,
                     rstd: Optional[Tensor] = None):
    """Forward on the reference backend: returns ``(y, mean, rstd, z)``.

    ``z`` is the pre-activation the backward needs (a tensor of its own, so that the caller may modify ``y`` in
    place), None for the identity.  ``mean``/``rstd`` given (batch norm in eval mode) are used instead of input
    statistics.  Contiguous inputs run torch's own normalization kernels (so the CPU fallback costs what the torch
    composition costs); channels-last inputs take exact statistics from ``torch.var_mean`` and one fused apply
    pass, because torch's channels-last CPU kernels sum x and x^2 (wrong when |mean| >> std).  Low-precision
    inputs are computed in float32.
    """
    orig = x.dtype
    acc = accumulation_dtype(orig)
    xf = x.to(acc)
    w, b = _to(tensors.weight, acc), _to(tensors.bias, acc)
    if mean is None and memory_format(x) != torch.contiguous_format:
        mean, rstd = compute_stats(xf, spec.kind, spec.num_groups, spec.eps)
    if mean is not None:
        z = normalize_affine(xf, mean, rstd, spec, w, b)
    elif spec.kind == "batch":
        z, mean, rstd = torch.ops.aten._native_batch_norm_legit.no_stats(xf, w, b, True, 0.0, spec.eps)
    else:
        n, c = x.shape[:2]
        z, mean, rstd = torch.ops.aten.native_group_norm(xf, w, b, n, c, x[0, 0].numel(), spec.num_groups, spec.eps)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    if tensors.residual is not None:
        z = z.add_(tensors.residual.to(acc))  # z is a fresh tensor here
    if spec.activation == "identity":
        return z.to(orig), mean, rstd, None
    y = apply_activation(z, spec.activation, activation_slope(spec.activation, tensors, spec, acc))
    return y.to(orig), mean, rstd, z


def norm_act_backward(dy: Tensor, x: Tensor, z: Optional[Tensor], tensors: NormTensors, spec: NormSpec,
                      mean: Tensor, rstd: Tensor, input_stats: bool = True) -> tuple[Tensor, NormTensors]:
    """Backward on the reference backend: returns ``(dx, NormTensors(dweight, dbias, dresidual, dslope))``, None
    where absent.

    ``z``: the pre-activation saved by :func:`norm_act_forward` (None: recomputed from x, mean and rstd).
    g = dy * act'(z), then the normalization backward: torch's batch-norm backward (exact: it reduces
    g * (x - mean)) for batch norm and for instance norm (batch norm over the (N * C) rows, as torch's instance
    norm does), torch's group-norm backward for group norm; channels-last inputs go through contiguous copies,
    as in torch's instance norm, because torch's channels-last group-norm backward is inexact.
    ``input_stats=False`` treats mean/rstd as constants (batch norm in eval mode).
    """
    acc = mean.dtype
    act = spec.activation
    xf, dyf = x.to(acc), dy.to(acc)
    w = _to(tensors.weight, acc)
    if z is None and act != "identity":
        z = pre_activation(xf, mean, rstd, spec, w, tensors.bias, tensors.residual)
    if act == "identity":
        g = dyf.clone()  # the op's outputs may not alias its inputs (dresidual = g)
    elif act in ("relu", "leaky_relu"):
        g = torch.ops.aten.leaky_relu_backward(dyf, z, 0.0 if act == "relu" else spec.negative_slope, False)
    else:
        g = dyf * activation_grad(z, act, activation_slope(act, tensors, spec, acc))
    dslope = None
    if act == "prelu":
        red = [0] + list(range(2, x.dim()))
        neg = torch.where(z > 0, torch.zeros_like(z), dyf * z)
        dslope = (neg.sum(red) if tensors.slope.numel() > 1 else neg.sum().reshape(1)).to(tensors.slope.dtype)
    mask = [True, w is not None, tensors.bias is not None]
    n, c = x.shape[:2]
    if spec.kind == "batch":
        # torch's native backward kernels assume dY and X share one memory format (autograd arranges that).
        # training: the saved batch statistics; eval (input_stats=False): constant statistics, which the
        # native backward reads as invstd = 1 / sqrt(running_var + eps) with running_var = rstd^-2, eps = 0.
        fmt = memory_format(x)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(memory_format=fmt), xf.contiguous(memory_format=fmt), w,
            None if input_stats else mean, None if input_stats else rstd.pow(-2),
            mean if input_stats else None, rstd if input_stats else None, input_stats, 0.0, mask)
    elif spec.kind == "instance":
        gc, xc = g.contiguous(), xf.contiguous()
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            _flat_rows(gc), _flat_rows(xc), w.repeat(n) if w is not None else None, None, None, mean, rstd, True,
            0.0, mask)
        dx = dx.view(x.shape)
        dw = dw.view(n, c).sum(0) if dw is not None else None
        db = db.view(n, c).sum(0) if db is not None else None
    else:
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), xf.contiguous(), mean.reshape(n, -1), rstd.reshape(n, -1), w, n, c, x[0, 0].numel(),
            spec.num_groups, mask)
    grads = NormTensors(weight=_to(dw, tensors.weight.dtype) if tensors.weight is not None else None,
                        bias=_to(db, tensors.bias.dtype) if tensors.bias is not None else None,
                        residual=g.to(tensors.residual.dtype) if tensors.residual is not None else None,
                        slope=dslope)
    return dx.to(x.dtype), grads


def norm_act_reference(x, kind, weight=None, bias=None, *, num_groups=None, eps=1e-5, activation="leaky_relu",
                       negative_slope=0.01, residual=None, running_mean=None, running_var=None, momentum=0.1,
                       training=True):
    """The same op composed from torch.nn.functional, differentiable by autograd (twice): the oracle.

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


def composition_arguments(tensors: NormTensors, spec: NormSpec, mean_in: Optional[Tensor],
                          rstd_in: Optional[Tensor]) -> dict:
    """Keyword arguments of :func:`norm_act_reference` that compute what the op computes with these arguments
    (given statistics -> eval-mode batch norm with running_var = rstd^-2 and eps = 0)."""
    kw = dict(num_groups=spec.num_groups if spec.kind == "group" else None, eps=spec.eps,
              activation=spec.activation, residual=tensors.residual,
              negative_slope=tensors.slope if spec.activation == "prelu" else spec.negative_slope)
    if mean_in is not None:
        kw.update(running_mean=mean_in, running_var=rstd_in.pow(-2), eps=0.0, training=False)
    return kw
