"""``fastmed.ops.norm_act``: fused normalization + activation (instance, group, batch norm).

Registered as the torch.library ops ``fastmed::norm_act_fwd`` / ``fastmed::norm_act_bwd`` (``triton_op``,
so ``torch.compile(fullgraph=True)`` traces through them) with ``register_autograd``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.library import triton_op

from fastmed import _backend
from fastmed.ops import _direct
from fastmed._tensors import accumulation_dtype
from fastmed._validate import check_choice, check_per_channel, check_same_device, check_tensor
from fastmed.reference import norm_act as ref

__all__ = ["norm_act", "canonical_activation", "check_norm_args", "update_running_stats", "KINDS", "ACTIVATIONS"]

KINDS = ref.KINDS
ACTIVATIONS = ref.ACTIVATIONS
_ALIASES = {"leakyrelu": "leaky_relu", "lrelu": "leaky_relu", "swish": "silu", "linear": "identity",
            "none": "identity", "gelu_erf": "gelu", "gelu_approx": "gelu_tanh"}

_backend.register_op("norm_act", ("triton", "reference"),
                     doc="normalization (instance/group/batch) + residual + activation, forward and backward")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _reference_forward(x, weight, bias, residual, slope, mean_in, rstd_in, kind, num_groups, eps, activation,
                       negative_slope):
    return ref.norm_act_forward(x, kind, weight, bias, num_groups=num_groups, eps=eps, activation_name=activation,
                                negative_slope=slope if activation == "prelu" else negative_slope,
                                residual=residual, mean=mean_in, rstd=rstd_in)


def _reference_backward(dy, x, y, weight, bias, residual, slope, mean, rstd, kind, num_groups, activation,
                        negative_slope, input_stats):
    return ref.norm_act_backward(dy, x, kind, weight, bias, residual, slope, mean, rstd, num_groups=num_groups,
                                 activation_name=activation, negative_slope=negative_slope,
                                 input_stats=input_stats, y=y)


def _triton_backward(dy, x, y, weight, bias, residual, slope, mean, rstd, kind, num_groups, activation,
                     negative_slope, input_stats):
    from fastmed.kernels.norm_act import norm_act_backward  # recomputes from x: y is not needed

    return norm_act_backward(dy, x, weight, bias, residual, slope, mean, rstd, kind, num_groups, activation,
                             negative_slope, input_stats)


_FORWARD = _backend.Implementations("norm_act", "fastmed::norm_act_fwd",
                                    triton="fastmed.kernels.norm_act:norm_act_forward", reference=_reference_forward)
_BACKWARD = _backend.Implementations("norm_act", "fastmed::norm_act_bwd", triton=_triton_backward,
                                     reference=_reference_backward)


@triton_op("fastmed::norm_act_fwd", mutates_args=())
def _norm_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  slope: Optional[Tensor], mean_in: Optional[Tensor], rstd_in: Optional[Tensor], kind: str,
                  num_groups: int, eps: float, activation: str, negative_slope: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _FORWARD[backend](x, weight, bias, residual, slope, mean_in, rstd_in, kind, num_groups, eps,
                                      activation, negative_slope)
    if mean_in is not None:  # outputs of a custom op may not alias its inputs
        mean, rstd = mean.clone(), rstd.clone()
    return y, mean, rstd


@triton_op("fastmed::norm_act_bwd", mutates_args=())
def _norm_act_bwd(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  residual: Optional[Tensor], slope: Optional[Tensor], mean: Tensor, rstd: Tensor, kind: str,
                  num_groups: int, activation: str, negative_slope: float, input_stats: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _BACKWARD[backend](dy, x, y, weight, bias, residual, slope, mean, rstd, kind, num_groups, activation,
                               negative_slope, input_stats)
    # Absent gradients travel as empty tensors (custom ops return no None).
    return tuple(g if g is not None else _empty(x) for g in grads)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, slope, mean_in, _rstd_in, kind, num_groups, _eps, activation, negative_slope,
     backend) = inputs
    y, mean, rstd = output
    # The Triton backward recomputes everything from x, mean and rstd.  The reference backward reads
    # act'(z) off y when the activation keeps the sign, as torch's own leaky_relu does.
    keep_y = backend == "reference" and ref.keeps_sign(activation, negative_slope)
    ctx.save_for_backward(x, y if keep_y else None, weight, bias, residual, slope, mean, rstd)
    ctx.args = (kind, num_groups, activation, negative_slope, mean_in is None, backend)


def _backward(ctx, dy, _dmean, _drstd):
    x, y, weight, bias, residual, slope, mean, rstd = ctx.saved_tensors
    kind, num_groups, activation, negative_slope, input_stats, backend = ctx.args
    dx, dw, db, dres, dslope = _direct.backward_op(ctx, _norm_act_bwd)(
        dy, x, y, weight, bias, residual, slope, mean, rstd, kind, num_groups, activation, negative_slope,
        input_stats, backend)
    return (dx, dw if weight is not None else None, db if bias is not None else None,
            dres if residual is not None else None, dslope if slope is not None else None,
            None, None, None, None, None, None, None, None)


_norm_act_fwd.register_autograd(_backward, setup_context=_setup_context)
_NormActDirect = _direct.autograd_function("_NormActDirect", _norm_act_fwd, _setup_context, _backward)


def norm_act_call(*op_args) -> tuple[Tensor, Tensor, Tensor]:
    """``fastmed::norm_act_fwd(*op_args)`` with its autograd, through the direct path outside torch.compile."""
    return _direct.call(_norm_act_fwd, _NormActDirect, *op_args)


def canonical_activation(activation) -> str:
    """The canonical activation name (one of ``ACTIVATIONS``) for a name or MONAI-style alias; None -> identity."""
    if activation is None:
        return "identity"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string (one of {', '.join(ACTIVATIONS)}), "
                        f"got {type(activation).__name__}")
    name = activation.lower()
    return check_choice(_ALIASES.get(name, name), "activation", ACTIVATIONS)


class NormArgs(NamedTuple):
    """Validated normalization arguments, as the ``fastmed::norm_act_fwd`` op takes them."""
    groups: int                  # statistics groups per sample (C for instance, 1 for batch)
    activation: str              # canonical activation name
    slope_t: Optional[Tensor]    # prelu slope tensor, else None
    slope_f: float               # leaky_relu slope (0.0 for prelu)
    mean_in: Optional[Tensor]    # running statistics for batch norm in eval mode, else None
    rstd_in: Optional[Tensor]
    count: int                   # values per channel over the batch (for the unbiased running variance)


def check_norm_args(kind: str, shape: tuple, dtype: torch.dtype, *, num_groups, eps, activation, negative_slope,
                    running_mean, running_var, training, kind_arg: str = "kind", what: str = "x") -> NormArgs:
    """Checks the normalization arguments for an ``(N, C, *spatial)`` tensor ``what`` of ``shape``; shared by
    :func:`norm_act` and the convolution blocks (``kind_arg="norm"``, ``what="the convolution output"``)."""
    activation = canonical_activation(activation)
    C = shape[1]
    if kind == "group":
        if num_groups is None or isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise ValueError(f"num_groups must be a positive integer for {kind_arg}='group', got {num_groups!r}")
        if num_groups < 1 or C % num_groups != 0:
            raise ValueError(f"num_groups must divide the {C} channels of {what}, got num_groups={num_groups}")
        groups = int(num_groups)
    else:
        if num_groups is not None:
            raise ValueError(f"num_groups is only used with {kind_arg}='group', got num_groups={num_groups!r} "
                             f"with {kind_arg}={kind!r}")
        groups = C if kind == "instance" else 1
    if not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    slope_t: Optional[Tensor] = None
    if activation == "prelu":
        if not isinstance(negative_slope, Tensor):
            raise TypeError("negative_slope must be the learned prelu slope, a tensor of shape "
                            f"({C},) or (1,), for activation='prelu'; got {type(negative_slope).__name__}")
        check_per_channel(negative_slope, "negative_slope", C, allow_scalar=True)
        slope_t, slope_f = negative_slope, 0.0
    else:
        if isinstance(negative_slope, Tensor) or not isinstance(negative_slope, numbers.Real):
            raise TypeError(f"negative_slope must be a number for activation={activation!r}, "
                            f"got {type(negative_slope).__name__}")
        slope_f = float(negative_slope)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        if kind != "batch":
            raise ValueError(f"running_mean/running_var are only used with {kind_arg}='batch', "
                             f"got {kind_arg}={kind!r}")
        check_per_channel(running_mean, "running_mean", C)
        check_per_channel(running_var, "running_var", C)
    mean_in = rstd_in = None
    if kind == "batch" and not training:
        if running_mean is None:
            raise ValueError(f"{kind_arg}='batch' with training=False needs running_mean and running_var")
        mean_in = running_mean.detach().to(accumulation_dtype(dtype))
        rstd_in = torch.rsqrt(running_var.detach().to(mean_in.dtype) + eps)
    count = math.prod(shape) // C
    if kind == "batch" and training and count <= 1:
        raise ValueError(f"batch norm in training needs more than one value per channel, got {what} of shape "
                         f"{tuple(shape)}")
    if kind != "batch" and count // shape[0] * (C // groups) <= 1:
        raise ValueError(f"{kind} norm needs more than one value per normalized group (as torch requires), "
                         f"got {what} of shape {tuple(shape)}")
    return NormArgs(groups, activation, slope_t, slope_f, mean_in, rstd_in, count)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, rstd: Tensor, count: int,
                         eps: float, momentum: float) -> None:
    """In place, like ``F.batch_norm``: running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased variance (``count`` values per channel)."""
    with torch.no_grad():
        var = (rstd.double().pow(-2) - eps).clamp_min(0) * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def norm_act(x: Tensor, kind: str, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
             num_groups: Optional[int] = None, eps: float = 1e-5, activation: Optional[str] = "leaky_relu",
             negative_slope: Union[float, Tensor] = 0.01, residual: Optional[Tensor] = None,
             running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
             momentum: float = 0.1, training: bool = True) -> Tensor:
    """``act(norm(x) * weight + bias + residual)`` in one fused pass (Triton on CUDA, reference on CPU).

    Args:
        x: ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float16/bfloat16/float32/float64;
            contiguous or channels-last (no layout copies).  Statistics are accumulated in float32
            (float64 for float64 inputs).
        kind: ``"instance"`` (per sample and channel), ``"group"`` (per sample and group of
            ``C // num_groups`` channels) or ``"batch"`` (per channel over the batch).
        weight, bias: ``(C,)`` affine parameters, or None.
        num_groups: number of groups, required for ``kind="group"`` and must divide C.
        eps: added to the biased variance.
        activation: ``identity``, ``relu``, ``leaky_relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu`` or
            ``prelu``; MONAI-style aliases (``"LEAKYRELU"``, ``"swish"``...) are accepted.
        negative_slope: slope for ``leaky_relu``; for ``prelu`` the learned slope tensor, ``(C,)`` or ``(1,)``.
        residual: tensor shaped like ``x`` added after normalization and before the activation.
        running_mean, running_var: ``(C,)`` buffers for ``kind="batch"``.  With ``training=True`` they are
            updated in place exactly like ``F.batch_norm`` (unbiased variance, ``momentum``); with
            ``training=False`` they are used instead of batch statistics.
        momentum: running-statistics momentum for batch norm.
        training: batch norm only: batch statistics (True) or running statistics (False).

    Returns:
        Tensor shaped like ``x``, in ``x``'s dtype and memory format.  Differentiable with respect to
        ``x``, ``weight``, ``bias``, ``residual`` and the prelu slope.
    """
    check_tensor(x, "x", min_ndim=3, max_ndim=5)
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string (one of {', '.join(KINDS)}), got {type(kind).__name__}")
    kind = check_choice(kind.lower(), "kind", KINDS)
    C = x.shape[1]
    check_per_channel(weight, "weight", C)
    check_per_channel(bias, "bias", C)
    if residual is not None:
        check_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    args = check_norm_args(kind, tuple(x.shape), x.dtype, num_groups=num_groups, eps=eps, activation=activation,
                           negative_slope=negative_slope, running_mean=running_mean, running_var=running_var,
                           training=training)
    device = check_same_device(x=x, weight=weight, bias=bias, residual=residual, negative_slope=args.slope_t,
                               running_mean=running_mean, running_var=running_var)
    backend = _backend.choose("norm_act", device)
    y, mean, rstd = norm_act_call(x, weight, bias, residual, args.slope_t, args.mean_in, args.rstd_in, kind,
                                  args.groups, float(eps), args.activation, args.slope_f, backend)
    if kind == "batch" and training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, rstd, args.count, eps, momentum)
    return y
