"""``fastmed.ops`` segmentation losses: MONAI 1.6 ``DiceLoss``, ``GeneralizedDiceLoss``, ``TverskyLoss``,
``FocalLoss``, ``DiceCELoss``, ``DiceFocalLoss`` and nnU-Net's ``DC_and_CE_loss`` / deep supervision.

Each loss is two steps, each one registered torch.library op with a body per backend (``triton`` on CUDA,
``cpp`` (``csrc/losses_cpu.cpp``, the finalize step ``csrc/losses_cpu_finalize.cpp``) for CPU tensors when
``fastmed._C`` is built, ``reference`` otherwise):

1. ``fastmed::loss_stats``: one fused pass over the logits and the targets yields per-(sample, class)
   statistics ``(B, K, C)``; its backward (``fastmed::loss_stats_bwd``) is one pass that recomputes the
   activation from the logits and writes d logits.  No probabilities, one-hot tensors or products are stored.
2. ``fastmed::loss_finalize``: MONAI's or nnU-Net's formula (a :class:`~fastmed.reference.loss_spec.LossSpec`)
   on that tiny tensor, in one launch: the loss and ``d loss / d stats``, so the backward of the formula is one
   multiplication by the output gradient.

Outside ``torch.compile`` the ops run on the direct path (``fastmed/ops/_direct.py``); there the cpp backend runs
both steps with their autograd nodes in C++ (``loss_stats_autograd_cpu``, ``loss_finalize_autograd_cpu``; two
Python autograd functions cost more per call than the whole C++ work on small inputs).  When the logits need a
gradient and the statistics need only their softmax (softmax activation with a region term, no BCE or focal term,
float32 / float64 logits), that node keeps the softmax from the forward in a logits-sized buffer, which its first
backward overwrites with d logits and returns (no second exp pass): the gradient's memory, taken at the forward
instead of the backward, and held while the graph lives.

Sums accumulate in float32 (float64 for float64 logits), so float16 logits over volumes of more than 65504
voxels per class give finite Dice values.

Inputs: logits ``(B, C, *spatial)`` (float16, bfloat16, float32, float64; any layout; no spatial dims, ``(B, C)``,
wherever MONAI accepts it: the focal, Dice, Tversky and combined losses); targets as integer labels
``(B, 1, *spatial)`` or ``(B, *spatial)`` (any integer dtype, or floats holding integers) with
``to_onehot_y=True``, or one-hot / soft targets ``(B, C, *spatial)``.

Fallback rule (what the fused steps do not do, and what runs instead, whatever the backend):
  * ``other_act``: the callable runs eagerly on the logits and the fused statistics (no activation) run on its
    output; cross-entropy / focal terms still run fused on the logits.
  * ``FocalLoss`` / ``DiceFocalLoss`` with ``reduction="none"`` return a per-voxel tensor: the focal part is the
    plain PyTorch composition ``fastmed.reference.losses.focal_loss_voxels`` (nothing to reduce, nothing to fuse).
  * a dense target that requires grad: the statistics are the differentiable plain PyTorch
    ``fastmed.reference.losses.loss_stats`` (the fused op gives gradients to the logits only), and the formula is
    the plain torch one (``fastmed.reference.losses.loss_from_stats``).
  * ``ddp_sync=True`` all-reduces the batch-summed statistics over the default process group
    (``torch.distributed.nn.functional.all_reduce``: differentiable, gradient = nnU-Net's ``AllGatherGrad``) in
    the plain torch formula.
  * ``(B, C)`` logits (no spatial dims) in the Dice family: MONAI sums over every axis there; the plain torch
    formula does that.
  * double backward (``create_graph=True``, e.g. a gradient penalty): the first-order gradients are the same
    closed forms run as plain differentiable PyTorch (``fastmed.reference.losses.loss_stats_backward`` and autograd
    through ``loss_from_stats``) on every backend, so torch differentiates them again; without ``create_graph``
    the fused backward runs.

A ``-inf`` logit on a class the target does not hold (how classes are masked) contributes nothing, as in
``F.cross_entropy`` with class indices; where MONAI's and torch's compositions compute ``0 * inf`` (probability
targets, BCE, focal terms) fastmed gives the limit instead of NaN.  NaN in the logits gives NaN.

Label check: the fused pass counts the voxels whose label is neither an integer in [0, C) nor ``ignore_index``
(float labels are checked in their own precision on every backend), and the finalize step turns the count into a
flag.  Nothing is read back to the host on CUDA: there the flag feeds a device-side assert
(``torch._assert_async``) whose message names ``target``; the error surfaces at the next synchronization (and, as
every device-side assert, leaves the CUDA context unusable: check labels in the data pipeline when that matters).
For CPU tensors the check runs at once and raises ``ValueError`` naming ``target``.  It is skipped while
``torch.compile`` traces, and for meta tensors (on which the losses only infer shapes).  Class weights on a GPU
(module buffers after ``.cuda()``) are checked the same way (``torch._assert_async``, no read-back); a weight or
per-class alpha given as a Python list to a function is copied to the logits' device on every call (the modules keep
them as buffers, so a module call copies nothing).  The Triton finalize step takes the hyper-parameters (smoothing,
scales, alpha, label smoothing) as float32 numbers.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed import _backend, _ext
from fastmed._tensors import traced
from fastmed._validate import (
    check_choice,
    check_class_weight,
    check_ddp_sync,
    check_int,
    check_loss_activation,
    check_number,
    check_number_sequence,
    check_reduction,
    check_same_device,
    check_tensor,
)
from fastmed.ops import _direct
from fastmed.reference import losses as ref
from fastmed.reference.loss_spec import BAD, COUNT, NLL, LossSpec, StatsSpec

__all__ = ["dice_loss", "generalized_dice_loss", "tversky_loss", "focal_loss", "dice_ce_loss", "dice_focal_loss",
           "nnunet_dice_ce_loss", "deep_supervision_loss", "deep_supervision_weights"]

_backend.register_op(
    "losses", ("triton", "cpp", "reference"),
    doc="segmentation-loss statistics (Dice/Tversky/GDL/CE/focal sums) in one pass, the loss formula in one "
        "step, backward in one pass; other_act, per-voxel focal outputs and differentiable targets use the plain "
        "PyTorch composition")

Weight = Union[Sequence[float], float, int, Tensor, None]


# ------------------------------------------------------------------------------------------------------------
# The fused ops
# ------------------------------------------------------------------------------------------------------------

def _reference_stats(logits: Tensor, target: Tensor, mask: Optional[Tensor], spec: StatsSpec) -> Tensor:
    with torch.no_grad():
        return ref.loss_stats(logits, target, mask, spec)


def _traced(*tensors: Optional[Tensor]) -> bool:
    """Whether any of ``tensors`` is one C++ cannot read (:func:`fastmed._tensors.traced`)."""
    return any(t is not None and traced(t) for t in tensors)


def _cpp_stats(logits: Tensor, target: Tensor, mask: Optional[Tensor], spec: StatsSpec) -> Tensor:
    """csrc/losses_cpu.cpp: the statistics in one pass (threads over fixed chunks of voxels, fixed-order combine);
    the (B, C, S) views and the label / target conversions are made in C++ (csrc/losses_cpu_finalize.cpp).  The
    tensors torch.compile traces with (fake, functional) trace the reference instead: C++ cannot read them."""
    if _traced(logits, target, mask):
        return _reference_stats(logits, target, mask, spec)
    return _ext.load().loss_stats_nd_cpu(logits, target, mask, *spec)


def _cpp_stats_backward(gstats: Tensor, logits: Tensor, target: Tensor, mask: Optional[Tensor],
                        spec: StatsSpec) -> Tensor:
    """csrc/losses_cpu.cpp: d logits in one pass, written in the logits' dtype and layout (traced tensors: the
    reference)."""
    if _traced(gstats, logits, target, mask):
        return ref.loss_stats_backward(gstats, logits, target, mask, spec)
    return _ext.load().loss_stats_backward_nd_cpu(gstats, logits, target, mask, *spec)


def _cpp_finalize(stats: Tensor, region_weight: Optional[Tensor], ce_weight: Optional[Tensor],
                  focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor],
                  spec: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
    """csrc/losses_cpu_finalize.cpp: ``ref.loss_finalize`` (loss, jac, valid) in closed form, in plain C++ loops on
    the tiny statistics (the reference's thirty-odd torch operations cost more than the whole pass on small
    inputs); traced tensors: the reference."""
    if _traced(stats, region_weight, ce_weight, focal_alpha, focal_weight):
        return ref.loss_finalize(stats, region_weight, ce_weight, focal_alpha, focal_weight, spec)
    loss, jac, valid = _ext.load().loss_finalize_cpu(stats, region_weight, ce_weight, focal_alpha, focal_weight,
                                                     *spec)
    return loss, jac, valid


_FORWARD = _backend.Implementations("losses", "fastmed::loss_stats",
                                    triton="fastmed.kernels.losses:loss_stats_forward", cpp=_cpp_stats,
                                    reference=_reference_stats)
_BACKWARD = _backend.Implementations("losses", "fastmed::loss_stats_bwd",
                                     triton="fastmed.kernels.losses:loss_stats_backward", cpp=_cpp_stats_backward,
                                     reference=ref.loss_stats_backward)
_FINALIZE = _backend.Implementations("losses", "fastmed::loss_finalize",
                                     triton="fastmed.kernels.losses:loss_finalize", cpp=_cpp_finalize,
                                     reference=ref.loss_finalize)


# The torch.library signatures are flat (what torch.library needs): the tensors, then the fields of a StatsSpec
# (LossSpec) in its order, then the backend.  Python code passes the specs; _op_inputs / _split_inputs convert.

@_direct.triton_op("fastmed::loss_stats", mutates_args=())
def _loss_stats_op(logits: Tensor, target: Tensor, mask: Optional[Tensor], act: str, pow_mode: str, ce_mode: str,
                   focal_mode: str, focal_c0: int, gamma: float, focal_pos: str, label_mode: bool,
                   has_ignore: bool, ignore_index: int, backend: str) -> Tensor:
    spec = StatsSpec(act, pow_mode, ce_mode, focal_mode, focal_c0, gamma, focal_pos, label_mode, has_ignore,
                     ignore_index)
    return _FORWARD[backend](logits, target, mask, spec)


@_direct.triton_op("fastmed::loss_stats_bwd", mutates_args=())
def _loss_stats_bwd_op(gstats: Tensor, logits: Tensor, target: Tensor, mask: Optional[Tensor], act: str,
                       pow_mode: str, ce_mode: str, focal_mode: str, focal_c0: int, gamma: float, focal_pos: str,
                       label_mode: bool, has_ignore: bool, ignore_index: int, backend: str) -> Tensor:
    spec = StatsSpec(act, pow_mode, ce_mode, focal_mode, focal_c0, gamma, focal_pos, label_mode, has_ignore,
                     ignore_index)
    return _BACKWARD[backend](gstats, logits, target, mask, spec)


def _op_inputs(logits: Tensor, target: Tensor, mask: Optional[Tensor], spec: StatsSpec, backend: str) -> tuple:
    """The flat arguments of ``fastmed::loss_stats``."""
    return (logits, target, mask, *spec, backend)


def _split_inputs(inputs: tuple) -> tuple[tuple, StatsSpec, str]:
    """``_op_inputs``'s inverse: ((logits, target, mask), spec, backend)."""
    return tuple(inputs[:3]), StatsSpec(*inputs[3:-1]), inputs[-1]


def _setup_context(ctx, inputs, output):
    tensors, ctx.spec, ctx.backend = _split_inputs(inputs)
    ctx.save_for_backward(*tensors)
    ctx.num_inputs = len(inputs)


def _backward(ctx, gstats):
    logits, target, mask = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the same closed form as plain differentiable torch, whatever the
        # backend, so that torch can differentiate the gradient again (the kernels' output would have no graph).
        dlogits = _stats_double_backward(gstats, logits, target, mask, *ctx.spec)
    else:
        bwd = _direct.backward_op(ctx, _loss_stats_bwd_op)
        dlogits = bwd(gstats, *_op_inputs(logits, target, mask, ctx.spec, ctx.backend))
    return (dlogits,) + (None,) * (ctx.num_inputs - 1)  # only the logits get a gradient from the fused op


@functools.cache
def _native_autograd():
    """``fastmed._C`` with the loss autograd nodes in C++ (``loss_stats_autograd_cpu``, ``loss_finalize_autograd_cpu``,
    csrc/losses_cpu_finalize.cpp) and their double backwards registered; None where the built extension predates
    them."""
    ext = _ext.load()
    if not hasattr(ext, "loss_finalize_autograd_cpu"):
        return None
    ext.set_loss_double_backward(_stats_double_backward, _finalize_double_backward)
    return ext


def _stats_double_backward(gstats: Tensor, logits: Tensor, target: Tensor, mask: Optional[Tensor], *spec) -> Tensor:
    """What ``loss_stats_autograd_cpu``'s backward returns under ``create_graph=True``: d logits with its graph."""
    return ref.loss_stats_backward(gstats, logits, target, mask, StatsSpec(*spec))


def _native_stats(grad: bool, logits: Tensor, target: Tensor, mask: Optional[Tensor], *rest):
    """The direct path's ``native`` implementation of ``fastmed::loss_stats`` (see
    :func:`fastmed.ops._direct.autograd_function`): on the cpp backend with a gradient, the statistics with their
    autograd node in C++; None otherwise (the op's body runs)."""
    if not grad or rest[-1] != "cpp":
        return None
    native = _native_autograd()
    return None if native is None else native.loss_stats_autograd_cpu(logits, target, mask, *rest[:-1])


_loss_stats_op.register_autograd(_backward, setup_context=_setup_context)
_LossStatsDirect = _direct.autograd_function("_LossStatsDirect", _loss_stats_op, _setup_context, _backward,
                                             native=_native_stats)


class _Weights(NamedTuple):
    """The per-class tensors of a :class:`LossSpec` (each None or 1-D, on the statistics' device and dtype)."""
    region: Optional[Tensor] = None
    ce: Optional[Tensor] = None
    focal_alpha: Optional[Tensor] = None
    focal: Optional[Tensor] = None


@_direct.triton_op("fastmed::loss_finalize", mutates_args=())
def _loss_finalize_op(stats: Tensor, region_weight: Optional[Tensor], ce_weight: Optional[Tensor],
                      focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor], num_voxels: int, region: str,
                      region_c0: int, pow_mode: str, batch: bool, smooth_nr: float, smooth_dr: float,
                      tversky_alpha: float, tversky_beta: float, w_type: str, region_reduction: str,
                      region_scale: float, ce: str, ce_reduction: str, label_smoothing: float, ce_scale: float,
                      focal: str, focal_c0: int, alpha_mode: str, alpha: float, focal_reduction: str,
                      focal_masked: bool, focal_scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    spec = LossSpec(num_voxels, region, region_c0, pow_mode, batch, smooth_nr, smooth_dr, tversky_alpha,
                    tversky_beta, w_type, region_reduction, region_scale, ce, ce_reduction, label_smoothing,
                    ce_scale, focal, focal_c0, alpha_mode, alpha, focal_reduction, focal_masked, focal_scale)
    return _FINALIZE[backend](stats, region_weight, ce_weight, focal_alpha, focal_weight, spec)


def _finalize_inputs(stats: Tensor, weights: _Weights, spec: LossSpec, backend: str) -> tuple:
    """The flat arguments of ``fastmed::loss_finalize``."""
    return (stats, *weights, *spec, backend)


def _finalize_setup_context(ctx, inputs, output):
    _loss, jac, valid = output
    ctx.spec, ctx.weights = LossSpec(*inputs[5:-1]), _Weights(*inputs[1:5])
    ctx.save_for_backward(inputs[0], jac)
    ctx.mark_non_differentiable(jac, valid)
    ctx.set_materialize_grads(False)  # no zero gradients built for jac and valid: the backward reads gloss only
    ctx.num_inputs = len(inputs)


def _finalize_backward(ctx, gloss, _gjac, _gvalid):
    if gloss is None:  # grads are not materialized (jac and valid never carry one)
        return (None,) * ctx.num_inputs
    stats, jac = ctx.saved_tensors
    B, _, C = stats.shape
    if torch.is_grad_enabled():
        gstats = _differentiable_gstats(gloss, stats, *ctx.weights, *ctx.spec)
    else:
        gstats = jac * ref.finalize_output_grad(gloss, ctx.spec, B, C)
    return (gstats,) + (None,) * (ctx.num_inputs - 1)


def _differentiable_gstats(gloss: Tensor, stats: Tensor, region_weight: Optional[Tensor], ce_weight: Optional[Tensor],
                           focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor], *spec) -> Tensor:
    """d objective / d stats with its graph (``create_graph=True``): autograd through the plain torch formula."""
    with torch.enable_grad():
        loss = ref.loss_from_stats(stats, region_weight, ce_weight, focal_alpha, focal_weight, LossSpec(*spec))
        (gstats,) = torch.autograd.grad(loss, stats, gloss, create_graph=True)
    return gstats


#: what ``loss_finalize_autograd_cpu``'s backward calls under ``create_graph=True``
_finalize_double_backward = _differentiable_gstats


def _native_finalize(grad: bool, stats: Tensor, *rest):
    """The direct path's ``native`` implementation of ``fastmed::loss_finalize``: on the cpp backend with a
    gradient, (loss, jac, valid) with the autograd node in C++; None otherwise."""
    if not grad or rest[-1] != "cpp":
        return None
    native = _native_autograd()
    return None if native is None else tuple(native.loss_finalize_autograd_cpu(stats, *rest[:-1]))


_loss_finalize_op.register_autograd(_finalize_backward, setup_context=_finalize_setup_context)
_LossFinalizeDirect = _direct.autograd_function("_LossFinalizeDirect", _loss_finalize_op, _finalize_setup_context,
                                                _finalize_backward, native=_native_finalize)


class _Target(NamedTuple):
    """A validated target: labels ``(B, 1, *sp)`` (label_mode) or dense ``(B, C|1, *sp)``, and its ignore mask."""
    target: Tensor
    label_mode: bool
    mask: Optional[Tensor]
    has_ignore: bool
    ignore_index: int


def _run_stats(logits: Tensor, tgt: _Target, spec: StatsSpec, backend: str) -> Tensor:
    spec = spec._replace(gamma=float(spec.gamma), label_mode=tgt.label_mode, has_ignore=tgt.has_ignore,
                         ignore_index=tgt.ignore_index)
    if tgt.target.requires_grad:
        return ref.loss_stats(logits, tgt.target, tgt.mask, spec)
    return _direct.call(_loss_stats_op, _LossStatsDirect, *_op_inputs(logits, tgt.target, tgt.mask, spec, backend))


def _values_readable(t: Tensor) -> bool:
    """Whether a value of ``t`` can be read back on the host: not while torch.compile traces, not for meta tensors
    (shape inference), where the checks that need one are skipped."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _check_labels(valid: Tensor, stats: Tensor, tgt: _Target, C: int) -> None:
    """The label check (see the module docstring): ``valid`` is the finalize step's flag (1: no bad label)."""
    if not tgt.label_mode or not _values_readable(valid):
        return
    extra = f" or ignore_index={tgt.ignore_index}" if tgt.has_ignore else ""
    expect = f"target must hold integer labels in [0, {C}){extra} for logits with {C} channels"
    if valid.device.type == "cpu":  # read at once: a ValueError here and now
        if not valid:
            bad = int(stats[:, BAD, 0].sum())
            raise ValueError(f"{expect}; {bad} voxels hold other values (negative, >= {C}, or not integers)")
    else:  # no read-back on a GPU: a device-side assert, raised at the next synchronization
        torch._assert_async(valid, f"{expect}; some voxels hold other values (negative, >= {C}, or not integers)")


def loss_stats(logits: Tensor, tgt: _Target, spec: StatsSpec, other_act: Optional[Callable] = None,
               backend: Optional[str] = None) -> Tensor:
    """Statistics ``(B, NUM_SLOTS, C)``; with ``other_act`` the Dice slots come from ``other_act(logits)``."""
    backend = backend or _backend.choose("losses", logits.device)
    if other_act is not None and spec.pow_mode != "off":
        dice = _run_stats(other_act(logits), tgt, spec._replace(act="none", ce_mode="off", focal_mode="off"),
                          backend)
        if spec.ce_mode == "off" and spec.focal_mode == "off":
            return dice
        rest = _run_stats(logits, tgt, spec._replace(pow_mode="off"), backend)
        return torch.cat([dice[:, :NLL], rest[:, NLL:COUNT], dice[:, COUNT:]], 1)
    return _run_stats(logits, tgt, spec, backend)


def _weights_like(weights: _Weights, stats: Tensor) -> _Weights:
    """Every per-class tensor on the statistics' device and in their dtype (no copy when it already is)."""
    return _Weights(*(None if w is None else w.to(device=stats.device, dtype=stats.dtype) for w in weights))


def _fused_loss(input: Tensor, tgt: _Target, stats_spec: StatsSpec, loss_spec: LossSpec,
                weights: Optional[_Weights] = None, other_act: Optional[Callable] = None,
                ddp_sync: bool = False) -> Tensor:
    """The loss of ``loss_spec`` on the statistics of ``stats_spec`` (labels checked, see the module docstring)."""
    backend = _backend.choose("losses", input.device)
    stats = loss_stats(input, tgt, stats_spec, other_act, backend)
    weights = _weights_like(weights or _Weights(), stats)
    plain = ddp_sync or tgt.target.requires_grad or (input.dim() == 2 and loss_spec.region != "off")
    if plain:
        loss = _plain_loss(stats, weights, loss_spec, input.dim(), ddp_sync)
        if tgt.label_mode and _values_readable(stats):
            _check_labels((stats[:, BAD, 0].sum() == 0).to(stats.dtype), stats, tgt, input.shape[1])
        return loss
    loss, _jac, valid = _direct.call(_loss_finalize_op, _LossFinalizeDirect,
                                     *_finalize_inputs(stats, weights, loss_spec, backend))
    _check_labels(valid, stats, tgt, input.shape[1])
    return loss


def _plain_loss(stats: Tensor, weights: _Weights, spec: LossSpec, ndim: int, ddp_sync: bool) -> Tensor:
    """The formula as plain differentiable torch (the fallbacks of the module docstring)."""
    if ndim == 2 and spec.region in ("dice", "jaccard", "tversky"):
        # (B, C) logits: MONAI's sums over the (absent) spatial axes reduce every axis
        if spec.region == "tversky":
            region = ref.tversky_from_stats(stats, pow_mode=spec.pow_mode, include_background=spec.region_c0 == 0,
                                            alpha=spec.tversky_alpha, beta=spec.tversky_beta,
                                            reduction=spec.region_reduction, smooth_nr=spec.smooth_nr,
                                            smooth_dr=spec.smooth_dr, batch=spec.batch, whole=True)
        else:
            region = ref.dice_from_stats(stats, ndim=2, pow_mode=spec.pow_mode,
                                         include_background=spec.region_c0 == 0, jaccard=spec.region == "jaccard",
                                         reduction=spec.region_reduction, smooth_nr=spec.smooth_nr,
                                         smooth_dr=spec.smooth_dr, batch=spec.batch, weight=weights.region,
                                         whole=True)
        if spec.region_scale != 1.0:
            region = spec.region_scale * region
        if spec.ce == "off" and spec.focal == "off":
            return region
        return region + ref.loss_from_stats(stats, *weights, spec._replace(region="off"))
    return ref.loss_from_stats(stats, *weights, spec, ddp_sync=ddp_sync)


# ------------------------------------------------------------------------------------------------------------
# Validation shared by the losses
# ------------------------------------------------------------------------------------------------------------

def _check_input(input, min_ndim: int = 2) -> None:
    """Logits ``(B, C, *spatial)``: any number of spatial dims (none: ``(B, C)``, where MONAI accepts it)."""
    check_tensor(input, "input", min_ndim=min_ndim)


def _dice_act(C: int, sigmoid: bool, softmax: bool) -> str:
    if sigmoid:
        return "sigmoid"
    if softmax:
        if C == 1:
            ref.warn_single_channel("softmax=True")
            return "none"
        return "softmax"
    return "none"


def _pow_mode(squared_pred: bool, soft_label: bool) -> str:
    if squared_pred:
        return "square"
    return "abs" if soft_label else "linear"


def _ignore_mask(target: Tensor, ignore_index: int) -> Tensor:
    """MONAI ``create_ignore_mask`` for a dense target: (B, 1, *spatial), 1 where the voxel counts."""
    if target.shape[1] == 1:
        return (target != ignore_index).float()
    if 0 <= ignore_index < target.shape[1]:
        return 1.0 - target[:, ignore_index:ignore_index + 1].float()
    return (target.sum(dim=1, keepdim=True) > 0).float()


def _prepare_target(input: Tensor, target, to_onehot_y: bool, ignore_index: Optional[int], *,
                    warn_onehot: bool = True, ignore_name: str = "ignore_index") -> _Target:
    """Validates ``target`` against ``input (B, C, *sp)``; labels (B, *sp) become (B, 1, *sp)."""
    check_tensor(target, "target", floating=False, allow_empty=True)
    if target.is_complex():
        raise TypeError(f"target must be a real tensor, got dtype {target.dtype}")
    ignore_index = check_int(ignore_index, ignore_name, allow_none=True)
    B, C = input.shape[:2]
    spatial = tuple(input.shape[2:])
    if target.dim() == input.dim() - 1 and tuple(target.shape) == (B,) + spatial:
        target = target.unsqueeze(1)
    if target.dim() != input.dim() or target.shape[0] != B or tuple(target.shape[2:]) != spatial:
        raise ValueError(f"target must have shape (B, 1, *spatial), (B, *spatial) or (B, C, *spatial) matching input "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    check_same_device(input=input, target=target)
    if to_onehot_y and C > 1:
        if target.shape[1] != 1:
            raise ValueError(f"target must hold one label per voxel, shape (B, 1, *spatial) or (B, *spatial), when "
                             f"to_onehot_y=True; got shape {tuple(target.shape)} (a one-hot target needs "
                             "to_onehot_y=False)")
        if target.requires_grad:
            raise ValueError("target holds labels (to_onehot_y=True) and cannot require grad")
        ii = 0 if ignore_index is None else ignore_index
        return _Target(target, True, None, ignore_index is not None, ii)
    if to_onehot_y and warn_onehot:
        ref.warn_single_channel("to_onehot_y=True")
    if target.shape[1] != C:
        raise ValueError(f"target must have the {C} channels of input (one-hot or soft targets), or hold labels "
                         f"with to_onehot_y=True; got shape {tuple(target.shape)} for input {tuple(input.shape)}")
    mask = _ignore_mask(target, ignore_index) if ignore_index is not None else None
    return _Target(target, False, mask, False, 0)


def _region_name(jaccard: bool) -> str:
    return "jaccard" if jaccard else "dice"


def _per_class(weight: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """A class weight (0-d or one value per class) as one value per class, a view (expanded) when it is 0-d;
    None for a single class (MONAI ignores a class weight there)."""
    if weight is None or channels == 1:
        return None
    w = torch.as_tensor(weight)
    return w.expand(channels) if w.ndim == 0 else w


def _num_voxels(input: Tensor) -> int:
    n = 1
    for d in input.shape[2:]:
        n *= d
    return n


def _warn_background(C: int, include_background: bool) -> None:
    if not include_background and C == 1:
        ref.warn_single_channel("include_background=False")


def _kept(C: int, include_background: bool) -> int:
    """The number of classes a loss keeps: C, or C - 1 without the background (never fewer than 1)."""
    return C if include_background or C == 1 else C - 1


# ------------------------------------------------------------------------------------------------------------
# MONAI losses
# ------------------------------------------------------------------------------------------------------------

def _region_setup(input, target, reduction, sigmoid, softmax, other_act, ddp_sync, batch, to_onehot_y, ignore_index,
                  include_background):
    """The checks and target preparation shared by the Dice-family losses: (reduction, activation code, target)."""
    _check_input(input)
    reduction = check_reduction(reduction)
    check_loss_activation(sigmoid, softmax, other_act)
    check_ddp_sync(ddp_sync, batch)
    C = input.shape[1]
    act = _dice_act(C, sigmoid, softmax)
    tgt = _prepare_target(input, target, to_onehot_y, ignore_index)
    _warn_background(C, include_background)
    return reduction, act, tgt


def dice_loss(input: Tensor, target: Tensor, *, include_background: bool = True, to_onehot_y: bool = False,
              sigmoid: bool = False, softmax: bool = False, other_act: Optional[Callable] = None,
              squared_pred: bool = False, jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5,
              smooth_dr: float = 1e-5, batch: bool = False, weight: Weight = None, soft_label: bool = False,
              ignore_index: Optional[int] = None, ddp_sync: bool = False) -> Tensor:
    """MONAI ``DiceLoss`` (same arguments, defaults and results), fused.

    Args:
        input: logits (or probabilities) ``(B, C, *spatial)``.
        target: labels ``(B, 1, *spatial)`` / ``(B, *spatial)`` with ``to_onehot_y``, else ``(B, C, *spatial)``.
        ddp_sync: with ``batch=True``, sum the statistics over the ranks of the default process group too.
        Other arguments: see ``monai.losses.DiceLoss``.

    Returns:
        ``"mean"``/``"sum"``: a scalar; ``"none"``: ``(B, C', 1, ...)`` (``(C', 1, ...)`` with ``batch``), C' the
        classes kept.  float32 (float64 for float64 logits).
    """
    reduction, act, tgt = _region_setup(input, target, reduction, sigmoid, softmax, other_act, ddp_sync, batch,
                                        to_onehot_y, ignore_index, include_background)
    C = input.shape[1]
    kept = _kept(C, include_background)
    weight = check_class_weight(weight, "weight", kept) if kept > 1 else None  # MONAI ignores it for one class
    pow_mode = _pow_mode(squared_pred, soft_label)
    spec = LossSpec(_num_voxels(input), _region_name(jaccard), C - kept, pow_mode, batch, float(smooth_nr),
                    float(smooth_dr), region_reduction=reduction)
    loss = _fused_loss(input, tgt, StatsSpec(act=act, pow_mode=pow_mode), spec, _Weights(_per_class(weight, kept)),
                       other_act, ddp_sync)
    return _none_view(loss, reduction, input.dim())


def _none_view(loss: Tensor, reduction: str, ndim: int) -> Tensor:
    """MONAI's broadcastable shape of a ``reduction="none"`` Dice value: ``(B, C', 1, ...)`` (one 1 per spatial
    dim)."""
    if reduction != "none" or ndim == 2:
        return loss
    return loss.view(list(loss.shape[0:2]) + [1] * (ndim - 2))


def tversky_loss(input: Tensor, target: Tensor, *, include_background: bool = True, to_onehot_y: bool = False,
                 sigmoid: bool = False, softmax: bool = False, other_act: Optional[Callable] = None,
                 alpha: float = 0.5, beta: float = 0.5, reduction: str = "mean", smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, soft_label: bool = False,
                 ignore_index: Optional[int] = None, ddp_sync: bool = False) -> Tensor:
    """MONAI ``TverskyLoss``, fused: ``1 - (tp + s_nr) / (tp + alpha fp + beta fn + s_dr)``.

    Returns a scalar, or with ``reduction="none"`` MONAI's ``(B, C')`` (``(C',)`` with ``batch``).
    """
    reduction, act, tgt = _region_setup(input, target, reduction, sigmoid, softmax, other_act, ddp_sync, batch,
                                        to_onehot_y, ignore_index, include_background)
    pow_mode = _pow_mode(False, soft_label)
    C = input.shape[1]
    spec = LossSpec(_num_voxels(input), "tversky", C - _kept(C, include_background), pow_mode, batch,
                    float(smooth_nr), float(smooth_dr), float(alpha), float(beta), region_reduction=reduction)
    return _fused_loss(input, tgt, StatsSpec(act=act, pow_mode=pow_mode), spec, _Weights(), other_act, ddp_sync)


def generalized_dice_loss(input: Tensor, target: Tensor, *, include_background: bool = True,
                          to_onehot_y: bool = False, sigmoid: bool = False, softmax: bool = False,
                          other_act: Optional[Callable] = None, w_type: str = "square", reduction: str = "mean",
                          smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                          soft_label: bool = False, ddp_sync: bool = False) -> Tensor:
    """MONAI ``GeneralizedDiceLoss``, fused (class weights 1/G_c^2, 1/G_c or 1 by ``w_type``).

    Returns a scalar, or with ``reduction="none"`` ``(B, 1, 1, ...)`` (``(1, 1, ...)`` with ``batch``).
    """
    _check_input(input, min_ndim=3)  # MONAI's class weights need a spatial axis to sum over
    reduction = check_reduction(reduction)
    check_loss_activation(sigmoid, softmax, other_act)
    check_ddp_sync(ddp_sync, batch)
    w_type = check_choice(getattr(w_type, "value", w_type), "w_type", ("square", "simple", "uniform"))
    C = input.shape[1]
    act = _dice_act(C, sigmoid, softmax)
    tgt = _prepare_target(input, target, to_onehot_y, None)
    _warn_background(C, include_background)
    pow_mode = _pow_mode(False, soft_label)
    spec = LossSpec(_num_voxels(input), "generalized", C - _kept(C, include_background), pow_mode, batch,
                    float(smooth_nr), float(smooth_dr), w_type=w_type, region_reduction=reduction)
    loss = _fused_loss(input, tgt, StatsSpec(act=act, pow_mode=pow_mode), spec, _Weights(), other_act, ddp_sync)
    return _none_view(loss, reduction, input.dim())


def _focal_alpha(alpha, channels: int, use_softmax: bool, include_background: bool, C: int):
    """MONAI FocalLoss's alpha: None, a float, or a per-class tensor of length ``channels``."""
    if alpha is None:
        return None
    if isinstance(alpha, (float, int)) and not isinstance(alpha, bool):
        if use_softmax and not include_background and C > 1:
            warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=4)
            return None
        return float(alpha)
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if a.ndim == 0:
        return float(a)
    if a.shape[0] != channels:
        raise ValueError(f"The length of alpha ({a.shape[0]}) must match the number of classes ({channels}).")
    return a


def _focal_weight(weight, channels: int) -> Optional[Tensor]:
    """MONAI FocalLoss's weight: a number, or one value per class kept (not for a single channel)."""
    w = check_class_weight(weight, "weight", channels)
    if w is not None and w.ndim > 0 and channels == 1:
        raise ValueError("weight: a per-class weight is not supported for single-channel outputs; pass a number")
    return w


def _focal_spec(C: int, use_softmax: bool, include_background: bool, gamma: float, alpha) -> StatsSpec:
    if use_softmax:
        first = C - _kept(C, include_background)  # 1 when the background class is dropped
        return StatsSpec(focal_mode="softmax", focal_c0=first, gamma=float(gamma))
    focal_pos = "off" if alpha is None else ("linear" if isinstance(alpha, float) else "hard")
    return StatsSpec(focal_mode="sigmoid", gamma=float(gamma), focal_pos=focal_pos)


def _focal_reduction(reduction: str, ndim: int) -> str:
    """MONAI FocalLoss's ``"sum"`` first averages over the spatial axes (``loss.mean(dim=[2, ...])``); without a
    spatial axis that is ``mean(dim=[])``, a mean over every axis, so ``"sum"`` of ``(B, C)`` logits is their mean."""
    return "mean" if reduction == "sum" and ndim == 2 else reduction


def _focal_terms(spec: LossSpec, C: int, use_softmax: bool, include_background: bool, alpha, weight,
                 reduction: str, masked: bool, scale: float) -> tuple[LossSpec, Optional[Tensor], Optional[Tensor]]:
    """``spec`` with MONAI FocalLoss's term, and its per-class (alpha, weight) tensors."""
    kept = _kept(C, include_background)
    if alpha is None:
        alpha_mode, alpha_v, alpha_t = "off", 0.0, None
    elif isinstance(alpha, float):
        alpha_mode, alpha_v, alpha_t = "scalar", alpha, None
    else:
        alpha_mode, alpha_v, alpha_t = "per_class", 0.0, alpha
    weight_t = None if weight is None else (weight.expand(kept) if weight.ndim == 0 else weight)
    spec = spec._replace(focal="softmax" if use_softmax else "sigmoid", focal_c0=C - kept, alpha_mode=alpha_mode,
                         alpha=alpha_v, focal_reduction=reduction, focal_masked=masked, focal_scale=scale)
    return spec, alpha_t, weight_t


def _dense(input: Tensor, tgt: _Target) -> tuple[Tensor, Optional[Tensor]]:
    """(dense target (B, C, *sp), mask) as MONAI builds them, for the per-voxel fallback."""
    if not tgt.label_mode:
        return tgt.target, tgt.mask
    C = input.shape[1]
    lab, mask = tgt.target, None
    if tgt.has_ignore:
        mask = (lab != tgt.ignore_index).float()
        if not 0 <= tgt.ignore_index < C:
            lab = torch.where(lab == tgt.ignore_index, torch.zeros_like(lab), lab)
    if not _values_readable(lab):
        return ref.one_hot(lab, C), mask
    if lab.is_floating_point() and not bool((lab == lab.floor()).all()):
        raise ValueError("target must hold integer labels when to_onehot_y=True, got non-integer values")
    if bool(((lab < 0) | (lab >= C)).any()):
        raise ValueError(f"target must hold integer labels in [0, {C}) for logits with {C} channels")
    return ref.one_hot(lab, C), mask


def focal_loss(input: Tensor, target: Tensor, *, include_background: bool = True, to_onehot_y: bool = False,
               gamma: float = 2.0, alpha=None, weight: Weight = None, reduction: str = "mean",
               use_softmax: bool = False, ignore_index: Optional[int] = None) -> Tensor:
    """MONAI ``FocalLoss`` (sigmoid, or softmax with ``use_softmax``), computed in float32, fused.

    Returns a scalar; ``reduction="none"`` returns MONAI's per-voxel ``(B, C', *spatial)`` tensor (plain PyTorch
    composition, see the module docstring).
    """
    _check_input(input)
    reduction = check_reduction(reduction)
    C = input.shape[1]
    tgt = _prepare_target(input, target, to_onehot_y, ignore_index)
    _warn_background(C, include_background)
    channels = _kept(C, include_background)
    alpha_v = _focal_alpha(alpha, channels, use_softmax, include_background, C)
    weight_v = _focal_weight(weight, channels)
    if reduction == "none":
        dense, mask = _dense(input, tgt)
        return ref.focal_loss_voxels(input, dense, mask, include_background=include_background,
                                     use_softmax=use_softmax, gamma=float(gamma), alpha=alpha_v, weight=weight_v)
    spec, alpha_t, weight_t = _focal_terms(LossSpec(_num_voxels(input)), C, use_softmax, include_background,
                                           alpha_v, weight_v, _focal_reduction(reduction, input.dim()),
                                           ignore_index is not None, 1.0)
    loss = _fused_loss(input, tgt, _focal_spec(C, use_softmax, include_background, gamma, alpha_v), spec,
                       _Weights(focal_alpha=alpha_t, focal=weight_t))
    return loss.float()  # MONAI's FocalLoss returns float32 whatever the input dtype


def _check_combo_target(input: Tensor, target) -> None:
    """DiceCELoss / DiceFocalLoss shape checks (labels (B, *sp) are accepted too)."""
    check_tensor(target, "target", floating=False, allow_empty=True)
    if target.dim() == input.dim() - 1:
        return
    if input.dim() != target.dim():
        raise ValueError(f"the number of dimensions for input and target should be the same, got shape "
                         f"{tuple(input.shape)} and {tuple(target.shape)}; a label target has shape (B, 1, *spatial)")
    if target.shape[1] != 1 and target.shape[1] != input.shape[1]:
        raise ValueError(f"number of channels for target is neither 1 (labels) nor the same as input, got shape "
                         f"{tuple(input.shape)} and {tuple(target.shape)}")


def dice_ce_loss(input: Tensor, target: Tensor, *, include_background: bool = True, to_onehot_y: bool = False,
                 sigmoid: bool = False, softmax: bool = False, other_act: Optional[Callable] = None,
                 squared_pred: bool = False, jaccard: bool = False, reduction: str = "mean",
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 weight: Optional[Tensor] = None, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 label_smoothing: float = 0.0, ddp_sync: bool = False) -> Tensor:
    """MONAI ``DiceCELoss``: ``lambda_dice * Dice + lambda_ce * CE`` (BCE-with-logits for one channel), one pass.

    ``weight`` ``(C,)`` weighs the classes of CE (``pos_weight`` of BCE for C = 1) and of Dice (without the
    background entry when ``include_background=False``).  Returns a scalar (``reduction`` "mean" or "sum").
    """
    _check_input(input)
    reduction = check_reduction(reduction, ("mean", "sum"))
    check_loss_activation(sigmoid, softmax, other_act)
    check_ddp_sync(ddp_sync, batch)
    lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
    lambda_ce = check_number(lambda_ce, "lambda_ce", minimum=0.0)
    label_smoothing = check_number(label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0)
    _check_combo_target(input, target)
    C = input.shape[1]
    w = check_class_weight(weight, "weight", C)
    if w is not None and w.ndim != 1:
        raise ValueError(f"weight must be a 1-D tensor with one value per class ({C}), got shape {tuple(w.shape)}")
    act = _dice_act(C, sigmoid, softmax)
    tgt = _prepare_target(input, target, to_onehot_y, None)
    _warn_background(C, include_background)
    pow_mode = _pow_mode(squared_pred, soft_label=False)
    if C == 1:
        ce_mode = "bce"
    else:
        ce_mode = "softmax_smooth" if label_smoothing > 0 else "softmax"
    kept = _kept(C, include_background)
    dice_w = w[1:] if w is not None and not include_background else w
    if C == 1:
        ce = "bce"
    else:
        ce = "labels" if tgt.label_mode else "dense"
    spec = LossSpec(_num_voxels(input), _region_name(jaccard), C - kept, pow_mode, batch, float(smooth_nr),
                    float(smooth_dr), region_reduction=reduction, region_scale=lambda_dice, ce=ce,
                    ce_reduction=reduction, label_smoothing=label_smoothing, ce_scale=lambda_ce)
    return _fused_loss(input, tgt, StatsSpec(act=act, pow_mode=pow_mode, ce_mode=ce_mode), spec,
                       _Weights(_per_class(dice_w, kept), w), other_act, ddp_sync)


def dice_focal_loss(input: Tensor, target: Tensor, *, include_background: bool = True, to_onehot_y: bool = False,
                    sigmoid: bool = False, softmax: bool = False, other_act: Optional[Callable] = None,
                    squared_pred: bool = False, jaccard: bool = False, reduction: str = "mean",
                    smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False, gamma: float = 2.0,
                    weight: Weight = None, lambda_dice: float = 1.0, lambda_focal: float = 1.0,
                    alpha: Optional[float] = None, ddp_sync: bool = False) -> Tensor:
    """MONAI ``DiceFocalLoss``: ``lambda_dice * Dice + lambda_focal * sigmoid focal``, one pass.

    Returns a scalar; ``reduction="none"`` returns MONAI's broadcast sum ``(B, C', *spatial)``.
    """
    _check_input(input)
    reduction = check_reduction(reduction)
    check_loss_activation(sigmoid, softmax, other_act)
    check_ddp_sync(ddp_sync, batch)
    lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
    lambda_focal = check_number(lambda_focal, "lambda_focal", minimum=0.0)
    _check_combo_target(input, target)
    C = input.shape[1]
    tgt = _prepare_target(input, target, to_onehot_y, None)
    act = _dice_act(C, sigmoid, softmax)
    _warn_background(C, include_background)
    channels = _kept(C, include_background)
    alpha_v = _focal_alpha(alpha, channels, False, include_background, C)
    weight_v = _focal_weight(weight, channels)
    pow_mode = _pow_mode(squared_pred, soft_label=False)
    spec = LossSpec(_num_voxels(input), _region_name(jaccard), C - channels, pow_mode, batch, float(smooth_nr),
                    float(smooth_dr), region_reduction=reduction, region_scale=lambda_dice)
    dice_w = _per_class(weight_v, channels)
    if reduction == "none":
        dice = _none_view(_fused_loss(input, tgt, StatsSpec(act=act, pow_mode=pow_mode), spec, _Weights(dice_w),
                                      other_act, ddp_sync), reduction, input.dim())
        dense, _ = _dense(input, tgt)
        focal = ref.focal_loss_voxels(input, dense, None, include_background=include_background, use_softmax=False,
                                      gamma=float(gamma), alpha=alpha_v, weight=weight_v)
        return dice + lambda_focal * focal
    spec, alpha_t, weight_t = _focal_terms(spec, C, False, include_background, alpha_v, weight_v,
                                           _focal_reduction(reduction, input.dim()), False,
                                           lambda_focal)
    stats_spec = _focal_spec(C, False, include_background, gamma, alpha_v)._replace(act=act, pow_mode=pow_mode)
    return _fused_loss(input, tgt, stats_spec, spec, _Weights(dice_w, None, alpha_t, weight_t), other_act, ddp_sync)


# ------------------------------------------------------------------------------------------------------------
# nnU-Net
# ------------------------------------------------------------------------------------------------------------

def nnunet_dice_ce_loss(input: Tensor, target: Tensor, *, batch_dice: bool = False, do_bg: bool = False,
                        smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0,
                        ignore_label: Optional[int] = None, ddp_sync: bool = False) -> Tensor:
    """nnU-Net ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` (softmax), fused.

    ``loss = weight_ce * CE + weight_dice * (-mean_c dc_c)`` with ``dc_c = (2 I_c + smooth) /
    clip(G_c + P_c + smooth, 1e-8)`` over the foreground classes (all with ``do_bg``), per sample or summed over
    the batch (``batch_dice``; ``ddp_sync`` sums over ranks too, like nnU-Net's ``AllGatherGrad``).  Voxels labelled
    ``ignore_label`` count in neither term; CE is the mean over the other voxels (0 if there are none).

    Args:
        input: logits ``(B, C, *spatial)``.
        target: labels ``(B, 1, *spatial)`` or ``(B, *spatial)``.
    """
    _check_input(input, min_ndim=3)
    check_ddp_sync(ddp_sync, batch_dice)
    C = input.shape[1]
    if C < 2:
        raise ValueError(f"input must have at least 2 channels (softmax over classes), got {C}")
    if isinstance(target, Tensor) and target.dim() == input.dim() and target.shape[1] != 1:
        raise ValueError(f"target must hold labels, shape (B, 1, *spatial) or (B, *spatial), got "
                         f"{tuple(target.shape)}")
    tgt = _prepare_target(input, target, True, ignore_label, ignore_name="ignore_label")
    spec = LossSpec(_num_voxels(input), "nnunet", 0 if do_bg else 1, "linear", batch_dice, float(smooth),
                    float(smooth), region_scale=float(weight_dice), ce="nnunet", ce_scale=float(weight_ce))
    return _fused_loss(input, tgt, StatsSpec(act="softmax", pow_mode="linear", ce_mode="softmax"), spec,
                       ddp_sync=ddp_sync)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights: 1 / 2^i, the lowest resolution set to 0, normalized to sum 1."""
    n = check_int(n, "n (the number of deep-supervision outputs)", minimum=1)
    if n == 1:
        return [1.0]
    w = [1.0 / 2 ** i for i in range(n)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def _downsample_target(target: Tensor, size, mode: str) -> Tensor:
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode=mode).to(target.dtype)


def deep_supervision_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Sequence[Tensor], target,
                          weights: Optional[Sequence[float]] = None, target_mode: str = "nearest-exact") -> Tensor:
    """nnU-Net ``DeepSupervisionWrapper``: ``sum_i w_i * loss_fn(outputs[i], target_i)``, terms with w_i = 0 skipped.

    Args:
        loss_fn: the loss of one output, e.g. ``fastmed.nn.NNUNetDiceCELoss()``.
        outputs: logits at decreasing resolution, the full resolution first.
        target: a list of targets (one per output), or one target ``(B, 1|C, *spatial)`` at full resolution that
            is downsampled to each output's size with ``F.interpolate(mode=target_mode)`` (nnU-Net v2 uses
            ``"nearest-exact"``; ``"nearest"`` is torch's legacy nearest neighbour).
        weights: one finite non-negative number per output; defaults to :func:`deep_supervision_weights`.
    """
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence) or len(outputs) == 0:
        raise TypeError("outputs must be a non-empty list or tuple of logits tensors, highest resolution first")
    n = len(outputs)
    if weights is None:
        weights = deep_supervision_weights(n)
    else:
        weights = check_number_sequence(weights, "weights", minimum=0.0)
    if len(weights) != n:
        raise ValueError(f"weights must have one value per output ({n}), got {len(weights)}")
    check_choice(target_mode, "target_mode", ("nearest-exact", "nearest"))
    if isinstance(target, Tensor):
        full = target.unsqueeze(1) if target.dim() == outputs[0].dim() - 1 else target
        targets = [_downsample_target(full, o.shape[2:], target_mode) for o in outputs]
    else:
        targets = list(target)
        if len(targets) != n:
            raise ValueError(f"target must be one tensor or one per output ({n}), got {len(targets)}")
    total = None
    for w, out, tgt in zip(weights, outputs, targets):
        if w == 0.0:
            continue
        term = w * loss_fn(out, tgt)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights are all zero: nothing to compute")
    return total
