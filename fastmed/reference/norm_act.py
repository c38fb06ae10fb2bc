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


def apply_activation_into(z: Tensor, act: str, negative_slope: Union[float, Tensor], out: Tensor) -> Tensor:
    """act(z) written into ``out`` (a tensor like z) where torch has an out= kernel, else a new tensor."""
    if act == "relu":
        return torch.clamp_min(z, 0.0, out=out)  # NaN stays NaN
    if act == "leaky_relu":
        return torch.ops.aten.leaky_relu.out(z, float(negative_slope), out=out)
    if act in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu.out(z, approximate="tanh" if act == "gelu_tanh" else "none", out=out)
    if act == "silu":
        return torch.ops.aten.silu.out(z, out=out)
    return apply_activation(z, act, negative_slope)


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


def _combine(per_channel: Tensor, spec: NormSpec) -> Tensor:
    """Means over the (n, c) pairs of each statistics row of per-(n, c) means (N, C) (each counts the same S values):
    (N*G,), or (C,) for batch norm."""
    if spec.kind == "batch":
        return per_channel.mean(0)
    return per_channel.view(per_channel.shape[0], spec.num_groups, -1).mean(2).reshape(-1)


def _row_means(t: Tensor, spec: NormSpec) -> Tensor:
    """The mean of t (N, C, *spatial) over each statistics row: per-(n, c) means over the spatial dims (one fast
    reduction in either layout), then :func:`_combine`."""
    return _combine(t.flatten(2).mean(2), spec)


def _expand_stats(stat: Tensor, x: Tensor, kind: str, num_groups: Optional[int]) -> Tensor:
    """Per-row statistics -> broadcastable against x: (1, C, 1..) for batch, (N, C, 1..) otherwise."""
    n, c = x.shape[:2]
    shape = (1,) * (x.dim() - 2)
    if kind == "batch":
        return stat.reshape((1, c) + shape)
    g = num_stat_groups(kind, c, num_groups)
    return stat.reshape(n, g, 1).expand(n, g, c // g).reshape((n, c) + shape)


def _centered(x: Tensor, mean: Tensor, spec: NormSpec) -> Tensor:
    """x - mean as a new tensor in x's layout: exact when |mean| >> std (the two are close)."""
    return torch.sub(x, _expand_stats(mean, x, spec.kind, spec.num_groups), out=torch.empty_like(x))


def _scale(rstd: Tensor, x: Tensor, spec: NormSpec, weight: Optional[Tensor]) -> Tensor:
    scale = _expand_stats(rstd, x, spec.kind, spec.num_groups)
    return scale * _bcast(weight, x.dim()) if weight is not None else scale


def normalize_affine(x: Tensor, mean: Tensor, rstd: Tensor, spec: NormSpec, weight: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tensor:
    """(x - mean) * (rstd * weight) + bias with given statistics, in x's dtype and layout (a new tensor)."""
    z = _centered(x, mean, spec).mul_(_scale(rstd, x, spec, weight))
    return z.add_(_bcast(bias, x.dim())) if bias is not None else z


def _native_normalize(x: Tensor, spec: NormSpec, weight: Optional[Tensor],
                      bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """torch's own normalization kernel (batch norm or group norm): (z, mean, rstd), statistics flat."""
    if spec.kind == "batch":
        return torch.ops.aten._native_batch_norm_legit.no_stats(x, weight, bias, True, 0.0, spec.eps)
    n, c = x.shape[:2]
    z, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), spec.num_groups,
                                                     spec.eps)
    return z, mean.reshape(-1), rstd.reshape(-1)


def normalize_with_stats(x: Tensor, spec: NormSpec, weight: Optional[Tensor], bias: Optional[Tensor],
                         scratch: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, rstd): x normalized with its own statistics, as exact as torch's instance norm in any layout.

    torch's CPU kernels for channels-last input sum x and x^2 (wrong when |mean| >> std), and its group-norm
    kernel applies ``x * scale + shift`` to a large x.  Here x is first centered on a per-row mean m0 (one fast
    reduction; x - m0 is exact when the two are close), then the deviation d and the variance come from
    xc = x - m0, which holds no large common value, and z = (xc - d) * rstd * weight + bias is computed in the
    buffer of xc: one new tensor, as for torch's own kernel.  ``scratch``: a tensor like x that may be
    overwritten (channels-last inputs square xc into it; a new one is allocated when None)."""
    m0 = _row_means(x, spec)
    z = _centered(x, m0, spec)
    d = _row_means(z, spec)
    flat = z.flatten(2)
    if flat.is_contiguous():  # the sum of squares without a temporary
        squares = torch.linalg.vector_norm(flat, dim=2).square_().div_(flat.shape[2])
    else:
        squares = torch.mul(z, z, out=torch.empty_like(z) if scratch is None else scratch).flatten(2).mean(2)
    rstd = torch.rsqrt(_combine(squares, spec) - d * d + spec.eps)
    scale = _scale(rstd, x, spec, weight)
    shift = -_expand_stats(d, x, spec.kind, spec.num_groups) * scale
    if bias is not None:
        shift = shift + _bcast(bias, x.dim())
    return z.mul_(scale).add_(shift), m0 + d, rstd


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


def _backward_centered(g: Tensor, xc: Tensor, rstd: Tensor, w: Optional[Tensor], spec: NormSpec):
    """(dx, dweight, dbias) of instance/group norm from g = dL/dz and the centered input xc = x - mean, in any
    layout: dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) per statistics group, xhat = xc * rstd.  Every
    sum is over g or g * xc, so nothing cancels when |mean| >> std.  dx is written into the buffer of xc."""
    n, c = g.shape[:2]
    cg = c // spec.num_groups
    count = cg * math.prod(g.shape[2:])
    dims = tuple(range(2, g.dim()))
    sg = g.sum(dims)                       # (N, C): sum of g
    sgx = (g * xc).sum(dims)               # (N, C): sum of g * xc
    wv = w if w is not None else torch.ones_like(sg[0])
    r = rstd.view(n, -1)                   # (N, G)

    def per_channel(t: Tensor) -> Tensor:  # (N, G) -> (N, C, 1, ...)
        return t.repeat_interleave(cg, 1).reshape((n, c) + (1,) * len(dims))

    m1 = (sg * wv).view(n, -1, cg).sum(2) * (r / count)               # rstd * mean of g*w
    m2 = (sgx * wv).view(n, -1, cg).sum(2) * (r * r * r / count)      # rstd^3 * mean of g*w*xc
    dx = xc.mul_(-per_channel(m2)).addcmul_(g, per_channel(r) * _bcast(wv, g.dim())).sub_(per_channel(m1))
    return dx, (sgx * per_channel(r).view(n, c)).sum(0), sg.sum(0)


def norm_act_forward(x: Tensor, tensors: NormTensors, spec: NormSpec, mean: Optional[Tensor] = None,
                     rstd: Optional[Tensor] = None):
    """Forward on the reference backend: returns ``(y, mean, rstd, z)``.

    ``z`` is the pre-activation the backward needs (a tensor of its own, so that the caller may modify ``y`` in
    place), None for the identity.  ``mean``/``rstd`` given (batch norm in eval mode) are used instead of input
    statistics.  Contiguous group and batch norm run torch's own kernels (so the CPU fallback costs what the torch
    composition costs, at torch's precision); instance norm (which torch computes as a slow batch norm over
    (N * C) rows) and channels-last inputs (whose torch CPU kernels sum x and x^2: wrong when |mean| >> std) run
    :func:`normalize_with_stats`, as exact as torch's instance norm.  Low-precision inputs are computed in
    float32.
    """
    orig = x.dtype
    acc = accumulation_dtype(orig)
    fmt = memory_format(x)
    xf = x.to(acc).contiguous(memory_format=fmt)  # torch's kernels take contiguous or channels-last tensors only
    w, b = _to(tensors.weight, acc), _to(tensors.bias, acc)
    y = torch.empty_like(xf) if spec.activation != "identity" else None  # the output, until then a scratch buffer
    if mean is not None:
        z = normalize_affine(xf, mean, rstd, spec, w, b)
    elif fmt == torch.contiguous_format and spec.kind != "instance":
        z, mean, rstd = _native_normalize(xf, spec, w, b)
    else:
        z, mean, rstd = normalize_with_stats(xf, spec, w, b, scratch=y)
    if tensors.residual is not None:
        z = z.add_(tensors.residual.to(acc))  # z is a fresh tensor here
    if y is None:
        return z.to(orig), mean, rstd, None
    y = apply_activation_into(z, spec.activation, activation_slope(spec.activation, tensors, spec, acc), y)
    return y.to(orig), mean, rstd, z


def norm_act_backward(dy: Tensor, x: Tensor, z: Optional[Tensor], tensors: NormTensors, spec: NormSpec,
                      mean: Tensor, rstd: Tensor, input_stats: bool = True) -> tuple[Tensor, NormTensors]:
    """Backward on the reference backend: returns ``(dx, NormTensors(dweight, dbias, dresidual, dslope))``, None
    where absent.

    ``z``: the pre-activation saved by :func:`norm_act_forward` (None: recomputed from x, mean and rstd).
    g = dy * act'(z), then the normalization backward, as exact as torch's instance norm (whose batch-norm backward
    reduces g * (x - mean)): torch's batch-norm backward for batch norm; torch's group-norm backward on the
    centered input x - mean for contiguous instance norm (torch's group-norm backward reduces g * x and subtracts:
    inexact when |mean| >> std); torch's group-norm backward itself for contiguous group norm (as exact as torch's
    group norm); :func:`_backward_centered` for channels-last instance and group norm (torch's channels-last
    group-norm backward is slow and inexact).  ``input_stats=False`` treats mean/rstd as constants (batch norm in
    eval mode).
    """
    acc = mean.dtype
    act = spec.activation
    fmt = memory_format(x)
    xf, dyf = x.to(acc).contiguous(memory_format=fmt), dy.to(acc)
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
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(memory_format=fmt), xf, w,
            None if input_stats else mean, None if input_stats else rstd.pow(-2),
            mean if input_stats else None, rstd if input_stats else None, input_stats, 0.0, mask)
    elif fmt != torch.contiguous_format:
        dx, dw, db = _backward_centered(g, _centered(xf, mean, spec), rstd, w, spec)
    else:
        centered = spec.kind == "instance"
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), _centered(xf, mean, spec) if centered else xf,
            torch.zeros_like(mean).view(n, -1) if centered else mean.view(n, -1), rstd.view(n, -1), w, n, c,
            math.prod(x.shape[2:]), spec.num_groups, mask)
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
