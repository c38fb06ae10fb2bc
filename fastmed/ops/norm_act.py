"""``fastmed.ops.norm_act``: fused normalization + activation (instance, group, batch norm).

Registered as the torch.library ops ``fastmed::norm_act_fwd`` / ``fastmed::norm_act_bwd`` (``triton_op``,
so ``torch.compile(fullgraph=True)`` traces through them) with ``register_autograd``.  Between the Python layers
the arguments travel as the specs :class:`~fastmed.reference.norm_act.NormTensors` (the optional tensors) and
:class:`~fastmed.reference.norm_act.NormSpec` (the configuration); the ops take them flattened, in the order
:func:`op_inputs` gives.

Backends: ``triton`` (CUDA), ``cpp`` (CPU tensors, ``csrc/norm_act_cpu.cpp``: one statistics pass and one
apply pass, forward and backward; gelu/silu run torch's activation kernels around its normalization) and
``reference``.

Per call (what decides the speed on small tensors): the argument checks run once per call signature
(:class:`fastmed._validate.CheckedCalls`), the backend choice is a dictionary lookup, and on the cpp backend the
direct path runs the C++ kernels with their autograd node in C++ (``norm_act_autograd_cpu``; the smooth activations
and eval-mode batch norm take the Python ``autograd.Function``).

Backward: the backend's fused backward.  When the backward itself is differentiated (``create_graph=True``,
e.g. a gradient penalty), the first-order gradient is computed instead by torch's autograd of the op's torch
composition (:func:`fastmed.reference.norm_act.norm_act_reference`), so second-order gradients are exact on
every backend.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from fastmed import _backend, _ext
from fastmed._tensors import accumulation_dtype, traced
from fastmed._validate import (
    CheckedCalls,
    check_choice,
    check_mode,
    check_number,
    check_per_channel,
    check_same_device,
    check_shape,
    check_tensor,
    signature,
)
from fastmed.ops import _direct
from fastmed.reference import norm_act as ref
from fastmed.reference.norm_act import NormSpec, NormTensors

__all__ = ["norm_act", "canonical_activation", "check_groups", "check_norm_args", "update_running_stats",
           "double_backward", "present", "optional", "KINDS", "ACTIVATIONS"]

KINDS = ref.KINDS
ACTIVATIONS = ref.ACTIVATIONS
_ALIASES = {"leakyrelu": "leaky_relu", "lrelu": "leaky_relu", "swish": "silu", "linear": "identity",
            "none": "identity", "gelu_erf": "gelu", "gelu_approx": "gelu_tanh"}

_backend.register_op("norm_act", ("triton", "cpp", "reference"),
                     doc="normalization (instance/group/batch) + residual + activation, forward and backward")

# The activations the cpp backend leaves to torch's vectorized kernels: its C++ pass normalizes (identity), torch
# applies the activation to that pre-activation z (saved for the backward, as torch's composition saves it).
TORCH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def cpp_forward(x: Tensor, tensors: NormTensors, spec: NormSpec, mean: Optional[Tensor] = None,
                rstd: Optional[Tensor] = None):
    """The cpp backend's forward (``csrc/norm_act_cpu.cpp``): (y, mean, rstd, saved), saved = the float32 (float64)
    pre-activation for :data:`TORCH_ACTIVATIONS`, else None (the backward recomputes it from x and the statistics,
    so y may be modified in place and nothing but x is kept)."""
    smooth = spec.activation in TORCH_ACTIVATIONS
    if traced(x):
        y, mean, rstd, z = ref.norm_act_forward(x, tensors, spec, mean, rstd)
        return y, mean, rstd, (z if smooth else None)
    w, b, r, s = tensors
    if not smooth:
        y, mean, rstd = _ext.load().norm_act_forward_cpu(x, w, b, r, s, mean, rstd, spec.kind, spec.num_groups,
                                                         spec.eps, spec.activation, spec.negative_slope)
        return y, mean, rstd, None
    z, mean, rstd = _ext.load().norm_act_forward_cpu(x.to(accumulation_dtype(x.dtype)), w, b, r, s, mean, rstd,
                                                     spec.kind, spec.num_groups, spec.eps, "identity", 0.0)
    return ref.apply_activation(z, spec.activation).to(x.dtype), mean, rstd, z


def _smooth_activation_grad(dy: Tensor, z: Tensor, activation: str) -> Tensor:
    """dy * act'(z) for an activation of :data:`TORCH_ACTIVATIONS`, by torch's backward kernels."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(dy, z)
    return torch.ops.aten.gelu_backward(dy, z, approximate="tanh" if activation == "gelu_tanh" else "none")


def cpp_backward(dy: Tensor, x: Tensor, saved: Optional[Tensor], tensors: NormTensors, spec: NormSpec, mean: Tensor,
                 rstd: Tensor, input_stats: bool = True) -> tuple[Tensor, NormTensors]:
    """The cpp backend's backward: (dx, NormTensors of gradients), None where absent."""
    if traced(x) or traced(dy):
        return ref.norm_act_backward(dy, x, saved, tensors, spec, mean, rstd, input_stats)
    activation = spec.activation
    if activation in TORCH_ACTIVATIONS:  # the C++ pass then runs the identity on g = dy * act'(z)
        dy, activation = _smooth_activation_grad(dy.to(saved.dtype), saved, activation), "identity"
    dx, *grads = _ext.load().norm_act_backward_cpu(dy, x, *tensors, mean, rstd, spec.kind, spec.num_groups,
                                                   activation, spec.negative_slope, input_stats)
    return dx, NormTensors(*grads)


# Bodies: forward(x, NormTensors, NormSpec, mean_in, rstd_in) -> (y, mean, rstd, saved or None);
# backward(dy, x, saved, NormTensors, NormSpec, mean, rstd, input_stats) -> (dx, NormTensors of gradients).
_FORWARD = _backend.Implementations("norm_act", "fastmed::norm_act_fwd",
                                    triton="fastmed.kernels.norm_act:norm_act_forward", cpp=cpp_forward,
                                    reference=ref.norm_act_forward)
_BACKWARD = _backend.Implementations("norm_act", "fastmed::norm_act_bwd",
                                     triton="fastmed.kernels.norm_act:norm_act_backward", cpp=cpp_backward,
                                     reference=ref.norm_act_backward)


def present(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or an empty tensor in its place: the outputs of a custom op are tensors, never None."""
    return t if t is not None else like.new_empty(0)


def optional(t: Optional[Tensor]) -> Optional[Tensor]:
    """The inverse of :func:`present`: None for an empty placeholder (and for None: what the direct path passes)."""
    return t if t is not None and t.numel() > 0 else None


def op_inputs(x, tensors: NormTensors, mean_in, rstd_in, spec: NormSpec, backend) -> tuple:
    """The flat argument list of ``fastmed::norm_act_fwd``; with gradients in place of the tensors (and None for
    the rest) it is also the gradient tuple its autograd returns."""
    return (x, *tensors, mean_in, rstd_in, *spec, backend)


def _split_inputs(inputs: Sequence):
    """The inverse of :func:`op_inputs`: (x, NormTensors, mean_in, rstd_in, NormSpec, backend)."""
    nt = len(NormTensors._fields)
    return (inputs[0], NormTensors(*inputs[1:1 + nt]), inputs[1 + nt], inputs[2 + nt],
            NormSpec(*inputs[3 + nt:-1]), inputs[-1])


_NO_SPEC = NormSpec(*(None,) * len(NormSpec._fields))


def _forward_body(x, weight, bias, residual, slope, mean_in, rstd_in, kind, num_groups, eps, activation,
                  negative_slope, backend):
    """``fastmed::norm_act_fwd`` with None for an absent ``saved`` (what the direct path runs)."""
    y, mean, rstd, saved = _FORWARD[backend](x, NormTensors(weight, bias, residual, slope),
                                             NormSpec(kind, num_groups, eps, activation, negative_slope), mean_in,
                                             rstd_in)
    if mean_in is not None:  # outputs of a custom op may not alias its inputs
        mean, rstd = mean.clone(), rstd.clone()
    return y, mean, rstd, saved


def _backward_body(dy, x, saved, weight, bias, residual, slope, mean, rstd, kind, num_groups, eps, activation,
                   negative_slope, input_stats, backend):
    """``fastmed::norm_act_bwd`` with None for the absent gradients (what the direct path runs)."""
    dx, grads = _BACKWARD[backend](dy, x, optional(saved), NormTensors(weight, bias, residual, slope),
                                   NormSpec(kind, num_groups, eps, activation, negative_slope), mean, rstd,
                                   input_stats)
    return (dx, *grads)


@_direct.triton_op("fastmed::norm_act_fwd", mutates_args=(), direct=_forward_body)
def _norm_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  slope: Optional[Tensor], mean_in: Optional[Tensor], rstd_in: Optional[Tensor], kind: str,
                  num_groups: int, eps: float, activation: str, negative_slope: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd, saved): ``saved`` is what the backend's backward needs besides the inputs (the
    reference's pre-activation), empty when nothing."""
    y, mean, rstd, saved = _forward_body(x, weight, bias, residual, slope, mean_in, rstd_in, kind, num_groups, eps,
                                         activation, negative_slope, backend)
    return y, mean, rstd, present(saved, mean)


@_direct.triton_op("fastmed::norm_act_bwd", mutates_args=(), direct=_backward_body)
def _norm_act_bwd(dy: Tensor, x: Tensor, saved: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  residual: Optional[Tensor], slope: Optional[Tensor], mean: Tensor, rstd: Tensor, kind: str,
                  num_groups: int, eps: float, activation: str, negative_slope: float, input_stats: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, *grads = _backward_body(dy, x, saved, weight, bias, residual, slope, mean, rstd, kind, num_groups, eps,
                                activation, negative_slope, input_stats, backend)
    return (dx, *(present(g, x) for g in grads))


def double_backward(compose: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]], dy: Tensor) -> list:
    """Gradients of ``compose(*inputs)`` (the op as a twice-differentiable torch composition) against ``dy``, with
    their graph, for the inputs that require a gradient (None for the others): the first-order gradient when the
    backward is itself differentiated (``create_graph=True``)."""
    needed = [t is not None and t.requires_grad for t in inputs]
    with torch.enable_grad():
        y = compose(*inputs)
        grads = iter(torch.autograd.grad(y, [t for t, need in zip(inputs, needed) if need], dy,
                                         create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needed]


def _setup_context(ctx, inputs, output):
    x, tensors, mean_in, _rstd_in, spec, backend = _split_inputs(inputs)
    _y, mean, rstd, saved = output
    # The output y is not saved (the caller may modify it in place, as with torch's own norms): the Triton
    # backward recomputes everything from x, mean and rstd, the reference reads act'(z) off its saved z.
    ctx.save_for_backward(x, saved, mean, rstd, *tensors)
    if saved is None:  # the direct path's body
        ctx.mark_non_differentiable(mean, rstd)
    else:
        ctx.mark_non_differentiable(mean, rstd, saved)  # no gradient flows back through them,
    ctx.set_materialize_grads(False)  # and none is filled with zeros for them
    ctx.spec, ctx.input_stats, ctx.backend = spec, mean_in is None, backend


def _differentiable_grads(dy: Tensor, x: Tensor, tensors: NormTensors, spec: NormSpec, mean_in: Optional[Tensor],
                          rstd_in: Optional[Tensor]) -> list:
    """[dx, *gradients of the NormTensors] (None where absent or not needed) with their graph, by torch's autograd
    of the op's composition: the first-order gradient of a backward that is itself differentiated."""
    def compose(x, *rest):
        t = NormTensors(*rest)
        return ref.norm_act_reference(x, spec.kind, t.weight, t.bias,
                                      **ref.composition_arguments(t, spec, mean_in, rstd_in))

    return double_backward(compose, (x, *tensors), dy)


def _backward(ctx, dy, _dmean, _drstd, _dsaved):
    if dy is None:  # no gradient reached y (grads are not materialized): nothing flows back
        return op_inputs(None, NormTensors(), None, None, _NO_SPEC, None)
    x, saved, mean, rstd, *rest = ctx.saved_tensors
    tensors, spec = NormTensors(*rest), ctx.spec
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        stats = (None, None) if ctx.input_stats else (mean.detach(), rstd.detach())
        dx, *grads = _differentiable_grads(dy, x, tensors, spec, *stats)
        grads = NormTensors(*grads)
    else:
        dx, *grads = _direct.backward_op(ctx, _norm_act_bwd)(dy, x, saved, *tensors, mean, rstd, *spec,
                                                              ctx.input_stats, ctx.backend)
        grads = NormTensors(*(optional(g) if t is not None else None for g, t in zip(grads, tensors)))
    return op_inputs(dx, grads, None, None, _NO_SPEC, None)


def _native_forward(grad, x, weight, bias, residual, slope, mean_in, rstd_in, kind, num_groups, eps, activation,
                    negative_slope, backend):
    """The direct path's ``native`` implementation (see :func:`fastmed.ops._direct.autograd_function`): the cpp
    backend's forward and backward with their autograd node in C++ (``norm_act_autograd_cpu``) when ``grad``,
    else its forward alone, for input statistics and the activations the C++ pass applies itself; None for
    anything else (and for an extension built without the node)."""
    if backend != "cpp" or mean_in is not None or activation in TORCH_ACTIVATIONS or traced(x):
        return None
    native = _native_autograd()
    if native is None:
        return None
    if grad:
        y, mean, rstd = native(x, weight, bias, residual, slope, kind, num_groups, eps, activation, negative_slope)
    else:  # what cpp_forward runs, without the layers in between
        y, mean, rstd = _ext.load().norm_act_forward_cpu(x, weight, bias, residual, slope, None, None, kind,
                                                         num_groups, eps, activation, negative_slope)
    return y, mean, rstd, None


@functools.cache
def _native_autograd() -> Optional[Callable]:
    """``fastmed._C.norm_act_autograd_cpu`` with its double backward registered (None where the built extension
    predates it)."""
    ext = _ext.load()
    native = getattr(ext, "norm_act_autograd_cpu", None)
    if native is not None:
        ext.set_norm_act_double_backward(_native_double_backward)
    return native


def _native_double_backward(dy, x, weight, bias, residual, slope, kind, num_groups, eps, activation,
                            negative_slope) -> list:
    """What ``norm_act_autograd_cpu``'s backward returns under ``create_graph=True``: (dx, dweight, dbias,
    dresidual, dslope) with their graph, None where absent."""
    return _differentiable_grads(dy, x, NormTensors(weight, bias, residual, slope),
                                 NormSpec(kind, num_groups, eps, activation, negative_slope), None, None)


_norm_act_fwd.register_autograd(_backward, setup_context=_setup_context)
_NormActDirect = _direct.autograd_function("_NormActDirect", _norm_act_fwd, _setup_context, _backward,
                                           native=_native_forward)


def norm_act_call(x: Tensor, tensors: NormTensors, spec: NormSpec, mean_in: Optional[Tensor],
                  rstd_in: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``fastmed::norm_act_fwd`` with its autograd (through the direct path outside torch.compile):
    (y, mean, rstd)."""
    y, mean, rstd, _saved = _direct.call(_norm_act_fwd, _NormActDirect,
                                         *op_inputs(x, tensors, mean_in, rstd_in, spec, backend))
    return y, mean, rstd


def canonical_activation(activation) -> str:
    """The canonical activation name (one of ``ACTIVATIONS``) for a name or MONAI-style alias; None -> identity."""
    if activation is None:
        return "identity"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string (one of {', '.join(ACTIVATIONS)}), "
                        f"got {type(activation).__name__}")
    name = activation.lower()
    return check_choice(_ALIASES.get(name, name), "activation", ACTIVATIONS)


def check_groups(kind: str, num_groups, channels: int, *, kind_arg: str = "kind", what: str = "x") -> int:
    """The statistics groups per sample for ``kind``: C (instance), ``num_groups`` (group: a positive integer
    dividing C), 1 (batch); ``num_groups`` must be None unless ``kind == "group"``."""
    if kind == "group":
        if num_groups is None or isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise ValueError(f"num_groups must be a positive integer for {kind_arg}='group', got {num_groups!r}")
        if num_groups < 1 or channels % num_groups != 0:
            raise ValueError(f"num_groups must divide the {channels} channels of {what}, got num_groups={num_groups}")
        return int(num_groups)
    if num_groups is not None:
        raise ValueError(f"num_groups is only used with {kind_arg}='group', got num_groups={num_groups!r} "
                         f"with {kind_arg}={kind!r}")
    return channels if kind == "instance" else 1


class NormArgs(NamedTuple):
    """Validated normalization arguments."""
    spec: NormSpec
    slope: Optional[Tensor]      # prelu slope tensor, else None
    mean_in: Optional[Tensor]    # statistics from the running buffers (batch norm in eval mode), else None
    rstd_in: Optional[Tensor]
    count: int                   # values per channel over the batch (for the unbiased running variance)


def check_norm_args(kind: str, shape: tuple, dtype: torch.dtype, *, num_groups, eps, activation, negative_slope,
                    running_mean, running_var, training, kind_arg: str = "kind", what: str = "x",
                    statistics: bool = True) -> NormArgs:
    """Checks the normalization arguments for an ``(N, C, *spatial)`` tensor ``what`` of ``shape``; shared by
    :func:`norm_act` and the convolution blocks (``kind_arg="norm"``, ``what="the convolution output"``).
    ``statistics=False`` leaves ``mean_in``/``rstd_in`` None (the checks then read no tensor values; see
    :func:`running_statistics`)."""
    activation = canonical_activation(activation)
    C = shape[1]
    groups = check_groups(kind, num_groups, C, kind_arg=kind_arg, what=what)
    eps = check_number(eps, "eps", minimum=0.0)
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
        if statistics:
            mean_in, rstd_in = running_statistics(running_mean, running_var, dtype, eps)
    count = math.prod(shape) // C
    if kind == "batch" and training and count <= 1:
        raise ValueError(f"batch norm in training needs more than one value per channel, got {what} of shape "
                         f"{tuple(shape)}")
    if kind != "batch" and count // shape[0] * (C // groups) <= 1:
        raise ValueError(f"{kind} norm needs more than one value per normalized group (as torch requires), "
                         f"got {what} of shape {tuple(shape)}")
    return NormArgs(NormSpec(kind, groups, eps, activation, slope_f), slope_t, mean_in, rstd_in, count)


def running_statistics(running_mean: Tensor, running_var: Tensor, dtype: torch.dtype,
                       eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) for batch norm in eval mode from the running buffers, in the accumulation dtype of ``dtype``."""
    mean = running_mean.detach().to(accumulation_dtype(dtype)).contiguous()
    return mean, torch.rsqrt(running_var.detach().to(mean.dtype) + eps)


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
    """``act(norm(x) * weight + bias + residual)`` in one fused pass (Triton on CUDA; on the CPU the C++ kernels of
    ``csrc/norm_act_cpu.cpp`` when ``fastmed._C`` is built, else the reference).

    Args:
        x: ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float16/bfloat16/float32/float64;
            contiguous or channels-last (no layout copies).  Statistics are accumulated in float32
            (float64 for float64 inputs).
        kind: ``"instance"`` (per sample and channel), ``"group"`` (per sample and group of
            ``C // num_groups`` channels) or ``"batch"`` (per channel over the batch).
        weight, bias: ``(C,)`` affine parameters, or None (any strides).
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
        Tensor shaped like ``x``, in ``x``'s dtype and memory format.  Differentiable (twice) with respect to
        ``x``, ``weight``, ``bias``, ``residual`` and the prelu slope; the output may be modified in place.
    """
    key = None
    if not torch.compiler.is_compiling():  # while torch.compile traces, the checks run (and are traced) each time
        key = (kind, activation, not training, type(x), x.shape, x.dtype, x.device,
               None if weight is None else signature(weight), None if bias is None else signature(bias),
               num_groups if num_groups is None or type(num_groups) is int else signature(num_groups),
               eps if type(eps) is float else signature(eps),
               negative_slope if type(negative_slope) is float else signature(negative_slope),
               None if residual is None else signature(residual),
               None if running_mean is None else signature(running_mean),
               None if running_var is None else signature(running_var)) if isinstance(x, Tensor) else None
        checked = None if key is None else _CHECKED.get(key)
    if key is None or checked is None:
        checked = _check_norm_act(x, kind, weight, bias, num_groups, eps, activation, negative_slope, residual,
                                  running_mean, running_var, training)
        if key is not None:
            _CHECKED.remember(key, checked)
    spec, count, device = checked
    slope = negative_slope if spec.activation == "prelu" else None
    mean_in = rstd_in = None
    if spec.kind == "batch" and not training:
        mean_in, rstd_in = running_statistics(running_mean, running_var, x.dtype, spec.eps)
    backend = _backend.choose("norm_act", device)
    # norm_act_call(x, NormTensors(weight, bias, residual, slope), spec, mean_in, rstd_in, backend), inlined
    y, mean, rstd, _saved = _direct.call(_norm_act_fwd, _NormActDirect, x, weight, bias, residual, slope, mean_in,
                                         rstd_in, *spec, backend)
    if spec.kind == "batch" and training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, rstd, count, eps, momentum)
    return y


# The checks of norm_act per call signature: (NormSpec, count, device) by the key norm_act builds.
_CHECKED = CheckedCalls()


def _check_norm_act(x, kind, weight, bias, num_groups, eps, activation, negative_slope, residual, running_mean,
                    running_var, training) -> tuple[NormSpec, int, torch.device]:
    """Every check of :func:`norm_act`'s arguments (they read no tensor values) -> (NormSpec, count, device)."""
    check_tensor(x, "x", min_ndim=3, max_ndim=5)
    kind = check_mode(kind, "kind", KINDS)
    C = x.shape[1]
    check_per_channel(weight, "weight", C)
    check_per_channel(bias, "bias", C)
    if residual is not None:
        check_tensor(residual, "residual")
        check_shape(residual, "residual", x.shape, "x")
    args = check_norm_args(kind, tuple(x.shape), x.dtype, num_groups=num_groups, eps=eps, activation=activation,
                           negative_slope=negative_slope, running_mean=running_mean, running_var=running_var,
                           training=training, statistics=False)
    device = check_same_device(x=x, weight=weight, bias=bias, residual=residual, negative_slope=args.slope,
                               running_mean=running_mean, running_var=running_var)
    return args.spec, args.count, device
