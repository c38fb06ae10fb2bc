"""Plain PyTorch reference for the fused segmentation losses.

Every loss in :mod:`fastmed.ops.losses` (Dice, Jaccard, Tversky, generalized Dice, focal, cross entropy, their
MONAI combinations and nnU-Net's ``DC_and_CE_loss``) is a function of a small tensor of per-(sample, class)
sums, the *statistics*.  A loss is computed in two steps:

1. ``loss_stats``: one pass over ``logits (B, C, *spatial)`` and the target computes ``stats (B, NUM_SLOTS, C)``
   in float32 (float64 for float64 logits); what it computes is a :class:`~fastmed.reference.loss_spec.StatsSpec`
   and the slots are named in :mod:`fastmed.reference.loss_spec`.  This is the step the Triton kernels fuse;
   ``loss_stats_backward`` is its closed-form backward (d logits from d stats), mirrored by the Triton backward,
   and a differentiable torch composition itself (double backward runs through it).
2. ``*_from_stats``: plain differentiable torch on the tiny stats tensor reproduces MONAI's (or nnU-Net's) formulas,
   reductions and output shapes exactly; autograd through it gives the per-(sample, class) coefficients that the
   backward pass of step 1 consumes.  ``loss_from_stats`` composes them as a
   :class:`~fastmed.reference.loss_spec.LossSpec` says, and ``loss_finalize`` returns that loss with
   ``d loss / d stats`` (what the Triton and C++ finalize steps compute in one launch, in closed form).

Products with a zero weight are zero even when the other factor is infinite (:func:`weigh`): a ``-inf`` logit on a
class the target does not hold, or on an ignored voxel, adds nothing (where MONAI's and torch's compositions give
NaN from ``0 * inf``); NaN stays NaN.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed._tensors import accumulation_dtype
from fastmed.reference.loss_spec import (
    BAD,
    COUNT,
    DIFF,
    FOCAL,
    FOCAL_POS,
    GROUND,
    INTERSECT,
    LOGSUM,
    NLL,
    NUM_SLOTS,
    PRED,
    LossSpec,
    StatsSpec,
    check_loss_spec,
    check_spec,
)

# ------------------------------------------------------------------------------------------------------------
# Step 1: the statistics pass (what the Triton kernels fuse) and its closed-form backward
# ------------------------------------------------------------------------------------------------------------

def weigh(w: Union[Tensor, float], v: Tensor) -> Tensor:
    """``w * v`` (``w`` a tensor broadcast with ``v``, or a number), except that a zero weight times an infinite
    ``v`` is 0, not NaN; NaN stays NaN.

    The gradient with respect to ``w`` there is 0 (``v`` elsewhere), so no NaN leaks into the backward either as
    long as every factor that can be infinite is in ``v`` and ``w`` is finite.
    """
    return w * torch.where((w == 0) & torch.isinf(v), 0.0, v)


def softplus(z: Tensor) -> Tensor:
    """``log(1 + exp(z))`` for every z (+inf at +inf, 0 at -inf).  torch's softplus returns z past its threshold;
    40 is past the point (about 34) where ``log1p(exp(-z))`` falls below half an ulp of z in float64 (the default
    threshold 20 drops up to 2e-9)."""
    return F.softplus(z, threshold=40.0)


def bce_with_logits(z: Tensor, t: Tensor) -> Tensor:
    """Binary cross entropy of the logits ``z`` and the targets ``t``: ``(1 - t) softplus(z) + t softplus(-z)``
    (``nn.BCEWithLogitsLoss`` per voxel), finite at ``z = +-inf`` where the target agrees with the logit."""
    return weigh(1 - t, softplus(z)) + weigh(t, softplus(-z))


def sigmoid_focal_terms(z: Tensor, t: Tensor, gamma: float, hard: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The parts of MONAI's sigmoid focal term ``bce * mod`` on logits ``z`` and targets ``t``: (bce, mod =
    ``exp(gamma * logsigmoid(-s z))`` = ``(1 - p_t) ** gamma``, s = ``2 t - 1``, ``s z``).

    ``hard``: every target is 0 or 1, so s = +-1 and ``bce = softplus(-s z)``; ``bce * mod`` is then safe at
    ``z = +-inf`` (elsewhere use ``weigh(mod, bce)``).
    """
    s = t * 2 - 1
    if hard:
        sz = s * z
        bce = softplus(-sz)
    else:
        sz = weigh(s, z)
        bce = bce_with_logits(z, t)
    mod = torch.exp(-gamma * softplus(sz)) if gamma != 0 else torch.ones_like(sz)
    return bce, mod, s, sz


class _Operands(NamedTuple):
    """The per-voxel operands of a statistics pass, in the accumulation dtype."""
    z: Tensor                 # (B, C, S) logits
    g: Tensor                 # (B, C, S) one-hot or dense target ((B, 1, S): dense, C = 1)
    m: Optional[Tensor]       # (B, 1, S) 1 where the voxel counts; None when every voxel counts
    bad: Tensor               # (B,) voxels whose label is neither a class nor ignore_index
    label: Optional[Tensor]   # (B, 1, S) int64 label of each voxel, 0 where it is none (label targets only)
    hit: Optional[Tensor]     # (B, 1, S) 1 where the voxel counts and its label is a class (label targets only)


def _operands(logits: Tensor, target: Tensor, mask: Optional[Tensor], spec: StatsSpec) -> _Operands:
    """The operands of ``loss_stats`` for ``spec`` (checked).  Float labels are checked in their own precision
    (``1 + 1e-9`` in float64 is not an integer)."""
    check_spec(spec)
    B, C = logits.shape[:2]
    acc = accumulation_dtype(logits.dtype)
    z = logits.reshape(B, C, -1).to(acc)
    S = z.shape[2]
    if not spec.label_mode:
        g = target.reshape(B, target.shape[1], S).to(acc)
        m = mask.reshape(B, 1, S).to(acc) if mask is not None else None
        return _Operands(z, g, m, z.new_zeros(B), None, None)
    lab = target.reshape(B, 1, S)
    if lab.is_floating_point():
        integral = (lab == lab.floor()) & (lab.abs() < 2.0 ** 31)  # NaN and inf fail, as in the kernel
        labi = torch.where(integral, lab, torch.zeros_like(lab)).long()
    else:
        integral = torch.ones_like(lab, dtype=torch.bool)
        labi = lab.long()
    inrange = integral & (labi >= 0) & (labi < C)
    if spec.has_ignore:
        valid = ~(integral & (labi == spec.ignore_index))
        bad = (valid & ~inrange).sum((1, 2)).to(acc)
        m, hit = valid.to(acc), (valid & inrange).to(acc)
    else:
        bad = (~inrange).sum((1, 2)).to(acc)
        m, hit = None, inrange.to(acc)
    classes = torch.arange(C, device=target.device).view(1, C, 1)
    g = ((labi == classes) & inrange).to(acc)
    return _Operands(z, g, m, bad, torch.where(inrange, labi, 0), hit)


def _counted(v: Tensor, m: Optional[Tensor], finite: bool = False) -> Tensor:
    """``v`` on the voxels that count (``m``; None: all of them), 0 on the others even where ``v`` is infinite.
    ``finite``: ``v`` has no infinities (a probability, a target), so a plain product does."""
    if m is None:
        return v
    return v * m if finite else weigh(m, v)


def _label_sums(v: Tensor, o: _Operands) -> Tensor:
    """``sum_s g[b, c, s] v[b, c, s]`` (B, C) for label targets, from ``v`` at each voxel's label only: a -inf of
    ``v`` on another class never meets a zero weight."""
    picked = weigh(o.hit, v.gather(1, o.label))
    return torch.zeros_like(v[:, :, 0]).scatter_add(1, o.label[:, 0], picked[:, 0])


def _activate(z: Tensor, act: str) -> Tensor:
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "softmax":
        return torch.softmax(z, 1)
    return z


def _pow_and_grad(base: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """base ** gamma and its derivative, with torch's conventions at base = 0."""
    powg = base.pow(gamma)
    dpow = torch.zeros_like(base) if gamma == 0 else gamma * base.pow(gamma - 1)
    return powg, dpow


def _focal_pos_weight(tt: Tensor, focal_pos: str) -> Tensor:
    """The FOCAL_POS weight of a voxel's focal term: the target (scalar alpha) or [target == 1] (per-class)."""
    return tt if focal_pos == "linear" else (tt == 1).to(tt.dtype)


def loss_stats(logits: Tensor, target: Tensor, mask: Optional[Tensor], spec: StatsSpec) -> Tensor:
    """Per-(sample, class) statistics ``(B, NUM_SLOTS, C)`` of ``logits (B, C, *spatial)`` (see loss_spec).

    ``target`` is ``(B, 1, *spatial)`` labels (``spec.label_mode``; any integer dtype, or integral floats) or a
    dense ``(B, C, *spatial)`` target (``(B, 1, *spatial)`` when C = 1); ``mask`` ``(B, 1, *spatial)`` or None is
    the ignore mask of a dense target.  Differentiable with respect to ``logits`` (and a dense ``target``).
    """
    o = _operands(logits, target, mask, spec)
    z, m = o.z, o.m
    B, C, S = z.shape
    gm = _counted(o.g, m, finite=True)
    zero = z.new_zeros(B, C)
    cols = [zero] * NUM_SLOTS
    if spec.pow_mode != "off":
        bounded = spec.act != "none"  # a probability: no infinity to guard
        pm = _counted(_activate(z, spec.act), m, finite=bounded)
        cols[INTERSECT] = (pm * gm if bounded else weigh(gm, pm)).sum(2)
        if spec.pow_mode == "linear":
            cols[PRED], cols[GROUND] = pm.sum(2), gm.sum(2)
        elif spec.pow_mode == "square":
            cols[PRED], cols[GROUND] = pm.square().sum(2), gm.square().sum(2)
        else:
            cols[PRED], cols[GROUND], cols[DIFF] = pm.abs().sum(2), gm.abs().sum(2), (pm - gm).abs().sum(2)
    if spec.ce_mode in ("softmax", "softmax_smooth"):
        lq = torch.log_softmax(z, 1)
        cols[NLL] = -(_label_sums(lq, o) if spec.label_mode else weigh(gm, lq).sum(2))
        if spec.ce_mode == "softmax_smooth":
            cols[LOGSUM] = -_counted(lq, m).sum(2)
    elif spec.ce_mode == "bce":
        cols[NLL] = _counted(bce_with_logits(z, o.g), m).sum(2)
        cols[LOGSUM] = weigh(gm, softplus(-z)).sum(2)
    if spec.focal_mode == "sigmoid":
        bce, mod, _, _ = sigmoid_focal_terms(_counted(z, m), gm, spec.gamma, spec.label_mode)
        loss = _counted(mod * bce if spec.label_mode else weigh(mod, bce), m)
        cols[FOCAL] = loss.sum(2)
        if spec.focal_pos != "off":
            cols[FOCAL_POS] = weigh(_focal_pos_weight(gm, spec.focal_pos), loss).sum(2)
    elif spec.focal_mode == "softmax":
        c0 = spec.focal_c0
        zz, tt = _counted(z, m)[:, c0:], gm[:, c0:]
        lq = torch.log_softmax(zz, 1)
        loss = -weigh(_counted(tt * (1 - lq.exp()).pow(spec.gamma), m, finite=True), lq)
        cols[FOCAL] = torch.cat([zero[:, :c0], loss.sum(2)], 1)
    cols[COUNT] = (m.sum(2) if m is not None else z.new_full((B, 1), S)).expand(B, C)
    cols[BAD] = o.bad.unsqueeze(1).expand(B, C)
    return torch.stack(cols, 1)


def loss_stats_backward(gstats: Tensor, logits: Tensor, target: Tensor, mask: Optional[Tensor],
                        spec: StatsSpec) -> Tensor:
    """d logits from ``gstats`` = d loss / d stats ``(B, NUM_SLOTS, C)``, in closed form (the Triton backward's
    formulas).  Plain differentiable torch: with grad mode on, torch differentiates it again (double backward).

    Returns a tensor shaped like ``logits``, in its dtype and memory format.
    """
    o = _operands(logits, target, mask, spec)
    z, g, m = o.z, o.g, o.m
    gm = _counted(g, m, finite=True)
    gs = gstats.to(z.dtype).unsqueeze(3)  # (B, NUM_SLOTS, C, 1)
    dz = torch.zeros_like(z)
    if spec.pow_mode != "off":
        p = _activate(z, spec.act)
        pm = _counted(p, m, finite=spec.act != "none")
        u = gs[:, INTERSECT] * gm
        if spec.pow_mode == "linear":
            u = u + gs[:, PRED]
        elif spec.pow_mode == "square":
            u = u + gs[:, PRED] * 2 * pm
        else:
            u = u + gs[:, PRED] * torch.sign(pm) + gs[:, DIFF] * torch.sign(pm - gm)
        u = _counted(u, m, finite=True)
        if spec.act == "softmax":
            dz = dz + p * (u - (p * u).sum(1, keepdim=True))
        elif spec.act == "sigmoid":
            dz = dz + u * p * (1 - p)
        else:
            dz = dz + u
    if spec.ce_mode in ("softmax", "softmax_smooth"):
        q = torch.softmax(z, 1)
        w = gs[:, NLL] * gm
        if spec.ce_mode == "softmax_smooth":
            w = w + _counted(gs[:, LOGSUM], m, finite=True)
        dz = dz + q * w.sum(1, keepdim=True) - w
    elif spec.ce_mode == "bce":
        sneg = torch.sigmoid(-z)
        dz = dz + _counted(gs[:, NLL] * ((1 - g) - sneg) - gs[:, LOGSUM] * g * sneg, m, finite=True)
    if spec.focal_mode == "sigmoid":
        zz = _counted(z, m)
        bce, mod, s, sz = sigmoid_focal_terms(zz, gm, spec.gamma, spec.label_mode)
        dl = (torch.sigmoid(zz) - gm) * mod - weigh(spec.gamma * mod * torch.sigmoid(sz) * s, bce)
        coef = gs[:, FOCAL]
        if spec.focal_pos != "off":
            coef = coef + gs[:, FOCAL_POS] * _focal_pos_weight(gm, spec.focal_pos)
        dz = dz + (coef * dl if m is None else coef * dl * m * m)  # the loss and zz are both masked
    elif spec.focal_mode == "softmax":
        c0 = spec.focal_c0
        zz, tt = _counted(z, m)[:, c0:], gm[:, c0:]
        lq = torch.log_softmax(zz, 1)
        q = lq.exp()
        powg, dpow = _pow_and_grad(1 - q, spec.gamma)
        v = _counted(gs[:, FOCAL, c0:] * (-tt * (powg - weigh(weigh(q, lq), dpow))), m, finite=True)
        dzz = _counted(v - q * v.sum(1, keepdim=True), m, finite=True)
        dz = dz + torch.cat([torch.zeros_like(z[:, :c0]), dzz], 1)
    out = torch.empty_like(logits)
    out.copy_(dz.reshape(logits.shape))
    return out


# ------------------------------------------------------------------------------------------------------------
# Step 2: losses from the statistics (MONAI 1.6 / nnU-Net formulas on the tiny (B, K, C) tensor)
# ------------------------------------------------------------------------------------------------------------

def _sum_batch(x: Tensor, ddp_sync: bool) -> Tensor:
    """Sum over the batch axis, then (ddp_sync) over the ranks of the default process group, differentiably."""
    x = x.sum(0)
    if ddp_sync:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_fn

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = dist_fn.all_reduce(x)
    return x


def _reduce(f: Tensor, reduction: str, ndim: int, broadcast_none: bool = True) -> Tensor:
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    if broadcast_none:
        return f.view(list(f.shape[0:2]) + [1] * (ndim - 2))
    return f


def _drop_background(x: Tensor, include_background: bool) -> Tensor:
    """(B, C) -> (B, C - 1) without channel 0 unless include_background (or C == 1)."""
    return x if include_background or x.shape[1] == 1 else x[:, 1:]


def _class_weight(weight: Optional[Tensor], num_classes: int, like: Tensor) -> Optional[Tensor]:
    """MONAI DiceLoss's class weight (checked by the caller: a number or one value per class): a number is
    repeated; no weight for a single class."""
    if weight is None or num_classes == 1:
        return None
    w = torch.as_tensor(weight)
    return (w.repeat(num_classes) if w.ndim == 0 else w).to(like)


def tp_fp_fn(stats: Tensor, pow_mode: str, include_background: bool, batch: bool, ddp_sync: bool,
             whole: bool = False):
    """MONAI ``compute_tp_fp_fn`` from the stats: (tp, fp, fn), each (B, C') or (C',) with batch.

    ``whole``: the input had no spatial dims (``(B, C)`` logits), where MONAI's sums over the spatial axes reduce
    every axis (``torch.sum(x, dim=[])``): one value each (0-d) unless ``batch``."""
    cols = [_drop_background(stats[:, k], include_background) for k in (INTERSECT, PRED, GROUND, DIFF)]
    if batch:
        cols = list(_sum_batch(torch.stack(cols, 1), ddp_sync).unbind(0))
    elif whole:
        cols = [c.sum() for c in cols]
    inter, pred, ground, diff = cols
    if pow_mode == "abs":
        tp = (pred + ground - diff) / 2
    else:
        tp = inter
    return tp, pred - tp, ground - tp


def dice_from_stats(stats: Tensor, *, ndim: int, pow_mode: str, include_background: bool, jaccard: bool,
                    reduction: str, smooth_nr: float, smooth_dr: float, batch: bool, weight: Optional[Tensor],
                    ddp_sync: bool = False, whole: bool = False) -> Tensor:
    """MONAI ``DiceLoss.forward`` after ``compute_tp_fp_fn`` (``whole``: ``(B, C)`` logits, see ``tp_fp_fn``)."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync, whole)
    if not jaccard:
        fp = fp * 0.5
        fn = fn * 0.5
    f = 1 - (2 * tp + smooth_nr) / (2 * (tp + fp + fn) + smooth_dr)
    w = _class_weight(weight, _drop_background(stats[:, 0], include_background).shape[1], f)
    if w is not None:
        f = f * w
    return _reduce(f, reduction, ndim)


def tversky_from_stats(stats: Tensor, *, pow_mode: str, include_background: bool, alpha: float, beta: float,
                       reduction: str, smooth_nr: float, smooth_dr: float, batch: bool,
                       ddp_sync: bool = False, whole: bool = False) -> Tensor:
    """MONAI ``TverskyLoss.forward``; reduction ``"none"`` returns (B, C) (or (C,) with batch) like MONAI
    (``whole``: ``(B, C)`` logits, see ``tp_fp_fn``)."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync, whole)
    score = 1.0 - (tp + smooth_nr) / (tp + fp * alpha + fn * beta + smooth_dr)
    return _reduce(score, reduction, 0, broadcast_none=False)


def generalized_dice_from_stats(stats: Tensor, *, ndim: int, pow_mode: str, include_background: bool,
                                w_type: str, reduction: str, smooth_nr: float, smooth_dr: float, batch: bool,
                                ddp_sync: bool = False) -> Tensor:
    """MONAI ``GeneralizedDiceLoss.forward`` (infinite class weights replaced by the largest finite one)."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync)
    denominator = 2 * (tp + fp * 0.5 + fn * 0.5)
    ground = _drop_background(stats[:, GROUND], include_background)
    ground = _sum_batch(ground, ddp_sync) if batch else ground
    ground = ground.detach().float()
    if w_type == "simple":
        w = torch.reciprocal(ground)
    elif w_type == "square":
        w = torch.reciprocal(ground * ground)
    else:
        w = torch.ones_like(ground)
    infs = torch.isinf(w)
    w = torch.where(infs, torch.zeros_like(w), w)
    if batch:
        w = w + infs * torch.max(w)
    else:
        w = w + infs * torch.max(w, dim=1)[0].unsqueeze(dim=1)
    w = w.to(tp.dtype)
    dim = 0 if batch else 1
    numer = 2.0 * (tp * w).sum(dim, keepdim=True) + smooth_nr
    denom = (denominator * w).sum(dim, keepdim=True) + smooth_dr
    return _reduce(1.0 - numer / denom, reduction, ndim)


def focal_from_stats(stats: Tensor, *, use_softmax: bool, include_background: bool, alpha, weight,
                     reduction: str, num_voxels: int, masked: bool) -> Tensor:
    """MONAI ``FocalLoss.forward`` with reduction ``"mean"`` or ``"sum"`` (``"none"``: see ``focal_loss_voxels``).

    ``alpha``: None, a float, or a per-class tensor (already checked); ``weight`` None, scalar or per-class tensor.
    """
    loss = _drop_background(stats[:, FOCAL], include_background)  # (B, C')
    pos = _drop_background(stats[:, FOCAL_POS], include_background)
    B, Cp = loss.shape
    if alpha is not None:
        if use_softmax:
            fac = (torch.tensor([1 - alpha] + [alpha] * (Cp - 1)) if isinstance(alpha, float) else alpha)
            loss = loss * fac.to(loss)
        elif isinstance(alpha, float):
            loss = (1 - alpha) * loss + (2 * alpha - 1) * pos
        else:
            loss = loss + (alpha.to(loss) - 1) * pos
    if weight is not None:
        loss = loss * torch.as_tensor(weight).to(loss)
    count = stats[:, COUNT, 0]
    eps = torch.finfo(torch.float32).eps
    if reduction == "sum":
        if masked:
            return (loss / count.clamp(min=eps).unsqueeze(1)).sum()
        return (loss / num_voxels).sum()
    if masked:
        return loss.sum() / count.sum().clamp(min=eps)
    return loss.sum() / (B * Cp * num_voxels)


def ce_from_stats(stats: Tensor, *, label_targets: bool, weight: Optional[Tensor], reduction: str,
                  label_smoothing: float, num_voxels: int) -> Tensor:
    """``nn.CrossEntropyLoss(weight, reduction, label_smoothing)`` on class indices or probability targets."""
    nll, lsum = stats[:, NLL], stats[:, LOGSUM]  # (B, C)
    B, C = nll.shape
    w = torch.ones(C, dtype=nll.dtype, device=nll.device) if weight is None else weight.to(nll)
    eps = label_smoothing
    if label_targets:
        nll_sum = (nll * w).sum()
        smooth_sum = (lsum * w).sum() if eps > 0 else nll_sum * 0
        if reduction == "mean":
            denom = (stats[:, GROUND] * w).sum() if weight is not None else B * num_voxels
            nll_sum, smooth_sum = nll_sum / denom, smooth_sum / denom
        return (1 - eps) * nll_sum + eps / C * smooth_sum if eps > 0 else nll_sum
    total = ((1 - eps) * nll * w).sum()
    if eps > 0:
        total = total + (eps / C) * (lsum * w).sum()
    return total / (B * num_voxels) if reduction == "mean" else total


def bce_from_stats(stats: Tensor, *, pos_weight: Optional[Tensor], reduction: str, num_voxels: int) -> Tensor:
    """``nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction)`` for one channel."""
    total = stats[:, NLL, 0].sum()
    if pos_weight is not None:
        total = total + ((pos_weight.to(total).reshape(-1)[0]) - 1) * stats[:, LOGSUM, 0].sum()
    return total / (stats.shape[0] * num_voxels) if reduction == "mean" else total


def nnunet_ce_from_stats(stats: Tensor) -> Tensor:
    """nnU-Net's ``RobustCrossEntropyLoss``: the mean CE over the voxels that are not ignored (0 if none are)."""
    return stats[:, NLL].sum() / stats[:, COUNT, 0].sum().clamp(min=1)


def nnunet_dice_from_stats(stats: Tensor, *, do_bg: bool, batch_dice: bool, smooth: float,
                           ddp_sync: bool = False) -> Tensor:
    """nnU-Net ``MemoryEfficientSoftDiceLoss``: -mean((2 I + smooth) / clip(G + P + smooth, 1e-8))."""
    inter, pred, ground = (_drop_background(stats[:, k], do_bg) for k in (INTERSECT, PRED, GROUND))
    if batch_dice:
        inter, pred, ground = _sum_batch(torch.stack([inter, pred, ground], 1), ddp_sync).unbind(0)
    dc = (2 * inter + smooth) / torch.clip(ground + pred + smooth, 1e-8)
    return -dc.mean()


def loss_from_stats(stats: Tensor, region_weight: Optional[Tensor], ce_weight: Optional[Tensor],
                    focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor], spec: LossSpec,
                    ddp_sync: bool = False) -> Tensor:
    """The loss ``spec`` describes, from ``stats (B, NUM_SLOTS, C)``: ``region_scale * region + ce_scale * ce +
    focal_scale * focal`` with MONAI's / nnU-Net's formulas above.  Differentiable with respect to ``stats``.

    Returns a 0-d tensor, or with ``region_reduction="none"`` the overlap term per sample and class ``(B, C')``
    (``(C',)`` with ``batch``; generalized Dice ``(B, 1)`` / ``(1,)``).  ``ddp_sync``: the batch sums of the
    overlap term are summed over the ranks too (not a :class:`LossSpec` field: the fused finalize does not do it).
    """
    check_loss_spec(spec)
    include_bg = spec.region_c0 == 0
    terms = []
    if spec.region in ("dice", "jaccard"):
        terms.append((spec.region_scale, dice_from_stats(
            stats, ndim=2, pow_mode=spec.pow_mode, include_background=include_bg, jaccard=spec.region == "jaccard",
            reduction=spec.region_reduction, smooth_nr=spec.smooth_nr, smooth_dr=spec.smooth_dr, batch=spec.batch,
            weight=region_weight, ddp_sync=ddp_sync)))
    elif spec.region == "tversky":
        terms.append((spec.region_scale, tversky_from_stats(
            stats, pow_mode=spec.pow_mode, include_background=include_bg, alpha=spec.tversky_alpha,
            beta=spec.tversky_beta, reduction=spec.region_reduction, smooth_nr=spec.smooth_nr,
            smooth_dr=spec.smooth_dr, batch=spec.batch, ddp_sync=ddp_sync)))
    elif spec.region == "generalized":
        terms.append((spec.region_scale, generalized_dice_from_stats(
            stats, ndim=2, pow_mode=spec.pow_mode, include_background=include_bg, w_type=spec.w_type,
            reduction=spec.region_reduction, smooth_nr=spec.smooth_nr, smooth_dr=spec.smooth_dr, batch=spec.batch,
            ddp_sync=ddp_sync)))
    elif spec.region == "nnunet":
        terms.append((spec.region_scale, nnunet_dice_from_stats(stats, do_bg=include_bg, batch_dice=spec.batch,
                                                                smooth=spec.smooth_nr, ddp_sync=ddp_sync)))
    if spec.ce in ("labels", "dense"):
        terms.append((spec.ce_scale, ce_from_stats(stats, label_targets=spec.ce == "labels", weight=ce_weight,
                                                   reduction=spec.ce_reduction,
                                                   label_smoothing=spec.label_smoothing,
                                                   num_voxels=spec.num_voxels)))
    elif spec.ce == "bce":
        terms.append((spec.ce_scale, bce_from_stats(stats, pos_weight=ce_weight, reduction=spec.ce_reduction,
                                                    num_voxels=spec.num_voxels)))
    elif spec.ce == "nnunet":
        terms.append((spec.ce_scale, nnunet_ce_from_stats(stats)))
    if spec.focal != "off":
        alpha = {"off": None, "scalar": spec.alpha, "per_class": focal_alpha}[spec.alpha_mode]
        terms.append((spec.focal_scale, focal_from_stats(
            stats, use_softmax=spec.focal == "softmax", include_background=spec.focal_c0 == 0, alpha=alpha,
            weight=focal_weight, reduction=spec.focal_reduction, num_voxels=spec.num_voxels,
            masked=spec.focal_masked)))
    if not terms:
        raise ValueError("LossSpec: every term is off (region, ce and focal); nothing to compute")
    total = None
    for scale, term in terms:
        term = term if scale == 1.0 else scale * term
        total = term if total is None else total + term
    return total


def finalize_output_grad(gout: Tensor, spec: LossSpec, B: int, C: int) -> Tensor:
    """``d objective / d loss`` broadcast to ``jac``'s ``(B, NUM_SLOTS, C)``: ``gstats = jac * this``.

    A 0-d loss gives a 0-d gradient; with ``region_reduction="none"`` each output value's gradient goes to the
    (sample, class) entries of ``jac`` that value depends on."""
    if gout.dim() == 0:
        return gout
    if spec.region == "generalized":  # (B, 1) or (1,): one value per sample (or for the batch)
        return gout.reshape(-1, 1, 1)
    g = gout.reshape(-1, gout.shape[-1])  # (B, C') or (1, C')
    if spec.region_c0:
        g = F.pad(g, (spec.region_c0, 0))
    return g.reshape(g.shape[0], 1, C)


def _tp_fp_fn_grad(d_tp: Tensor, d_fp: Tensor, d_fn: Tensor, pow_mode: str) -> dict:
    """d / d stats slots from d / d (tp, fp, fn) (the chain rule of ``tp_fp_fn``; GROUND omitted, see loss_spec)."""
    if pow_mode == "abs":  # tp = (P + G - D) / 2, fp = P - tp, fn = G - tp
        return {PRED: (d_tp + d_fp - d_fn) / 2, DIFF: (d_fp + d_fn - d_tp) / 2}
    return {INTERSECT: d_tp - d_fp - d_fn, PRED: d_fp}  # tp = I, fp = P - I, fn = G - I


def _reduce_grad(f: Tensor, reduction: str) -> tuple[Tensor, float]:
    """(reduced value, d reduced / d each entry of f); ``"none"``: f itself, 1 (per output value)."""
    if reduction == "mean":
        return f.mean(), 1.0 / f.numel()
    if reduction == "sum":
        return f.sum(), 1.0
    return f, 1.0


def overlap_coefficients(spec: LossSpec) -> tuple[float, float, float, float]:
    """(a_n, a_t, a_fp, a_fn) of the overlap term ``(a_n tp + s_nr) / (a_t tp + a_fp fp + a_fn fn + s_dr)`` of
    ``spec.region`` (Dice, Jaccard, Tversky, nnU-Net; not the generalized Dice, whose weights are per class)."""
    if spec.region == "tversky":
        return 1.0, 1.0, spec.tversky_alpha, spec.tversky_beta
    if spec.region == "jaccard":  # 2 tp / (2 (G + P - tp))
        return 2.0, 2.0, 2.0, 2.0
    return 2.0, 2.0, 1.0, 1.0  # Dice and nnU-Net: 2 tp / (G + P)


def _region_closed_form(stats: Tensor, region_weight: Optional[Tensor], spec: LossSpec, jac: Tensor) -> Tensor:
    """The overlap term of ``spec`` (value) and its derivative, added to ``jac``."""
    c0 = spec.region_c0
    cols = [stats[:, k, c0:] for k in (INTERSECT, PRED, GROUND, DIFF)]
    if spec.batch:
        cols = [c.sum(0, keepdim=True) for c in cols]
    inter, pred, ground, diff = cols
    tp = (pred + ground - diff) / 2 if spec.pow_mode == "abs" else inter
    fp, fn = pred - tp, ground - tp
    if spec.region == "generalized":
        g = ground.detach().float()
        w = {"square": lambda: torch.reciprocal(g * g), "simple": lambda: torch.reciprocal(g),
             "uniform": lambda: torch.ones_like(g)}[spec.w_type]()
        infs = torch.isinf(w)
        w = torch.where(infs, torch.zeros_like(w), w)
        w = (w + infs * torch.max(w, dim=1, keepdim=True)[0]).to(tp.dtype)  # one row with batch: max over all
        numer = 2 * (tp * w).sum(1, keepdim=True) + spec.smooth_nr
        denom = ((2 * tp + fp + fn) * w).sum(1, keepdim=True) + spec.smooth_dr
        value, unit = _reduce_grad(1 - numer / denom, spec.region_reduction)  # (B, 1), or (1, 1) with batch
        unit = unit * spec.region_scale
        d_fp = numer / denom.square() * w * unit
        d_tp = 2 * d_fp - 2 * w / denom * unit
        d_fn = d_fp
    else:
        a_n, a_t, a_fp, a_fn = overlap_coefficients(spec)
        smooth_dr = spec.smooth_nr if spec.region == "nnunet" else spec.smooth_dr  # nnU-Net: one smooth
        numer = a_n * tp + spec.smooth_nr
        denom = a_t * tp + a_fp * fp + a_fn * fn + smooth_dr
        live = torch.ones_like(denom)
        if spec.region == "nnunet":  # -(2 tp + s) / clip(2 tp + fp + fn + s, 1e-8)
            live = (denom >= 1e-8).to(denom.dtype)
            denom = torch.clip(denom, 1e-8)
            f = -numer / denom
        else:
            f = 1 - numer / denom
        scale = torch.full_like(f, spec.region_scale)
        if region_weight is not None:
            f = f * region_weight
            scale = scale * region_weight
        value, unit = _reduce_grad(f, spec.region_reduction)
        scale = scale * unit
        q = numer / denom.square() * live * scale
        d_tp = -a_n / denom * scale + a_t * q
        d_fp, d_fn = a_fp * q, a_fn * q
    for slot, d in _tp_fp_fn_grad(d_tp, d_fp, d_fn, spec.pow_mode).items():
        jac[:, slot, c0:] += d
    if spec.batch and value.dim():  # "none" with batch: MONAI's (C',) (generalized Dice: (1,))
        value = value.reshape(-1)
    return value * spec.region_scale if spec.region_scale != 1.0 else value


def _ce_closed_form(stats: Tensor, ce_weight: Optional[Tensor], spec: LossSpec, jac: Tensor) -> Tensor:
    """The cross-entropy term of ``spec`` (value) and its derivative, added to ``jac``."""
    B, _, C = stats.shape
    nll, lsum = stats[:, NLL], stats[:, LOGSUM]
    if spec.ce == "nnunet":
        denom = stats[:, COUNT, 0].sum().clamp(min=1)
        jac[:, NLL] += spec.ce_scale / denom
        return spec.ce_scale * nll.sum() / denom
    if spec.ce == "bce":
        pw = None if ce_weight is None else ce_weight.reshape(-1)[0]
        total = nll[:, 0].sum() + ((pw - 1) * lsum[:, 0].sum() if pw is not None else 0)
        denom = B * spec.num_voxels if spec.ce_reduction == "mean" else 1
        jac[:, NLL, 0] += spec.ce_scale / denom
        if pw is not None:
            jac[:, LOGSUM, 0] += spec.ce_scale * (pw - 1) / denom
        return spec.ce_scale * total / denom
    w = torch.ones(C, dtype=stats.dtype, device=stats.device) if ce_weight is None else ce_weight
    eps = spec.label_smoothing
    if spec.ce_reduction == "sum":
        denom = 1
    elif spec.ce == "labels" and ce_weight is not None:
        denom = (stats[:, GROUND] * w).sum()
    else:
        denom = B * spec.num_voxels
    total = ((1 - eps) * nll * w).sum()
    jac[:, NLL] += spec.ce_scale * (1 - eps) * w / denom
    if eps > 0:
        total = total + eps / C * (lsum * w).sum()
        jac[:, LOGSUM] += spec.ce_scale * eps / C * w / denom
    return spec.ce_scale * total / denom


def _focal_closed_form(stats: Tensor, focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor],
                       spec: LossSpec, jac: Tensor) -> Tensor:
    """The focal term of ``spec`` (value) and its derivative, added to ``jac``."""
    c0 = spec.focal_c0
    loss, pos = stats[:, FOCAL, c0:], stats[:, FOCAL_POS, c0:]
    B, Cp = loss.shape
    coef_l, coef_p = torch.ones_like(loss[0]), torch.zeros_like(loss[0])
    if spec.focal == "softmax":
        if spec.alpha_mode == "scalar":  # MONAI's float32 [1 - alpha, alpha, alpha, ...]
            coef_l = torch.full_like(coef_l, spec.alpha)
            coef_l[0] = 1 - spec.alpha  # built on the statistics' device: no host-to-device copy
        elif spec.alpha_mode == "per_class":
            coef_l = focal_alpha.to(coef_l)
    elif spec.alpha_mode == "scalar":
        coef_l, coef_p = coef_l * (1 - spec.alpha), coef_p + (2 * spec.alpha - 1)
    elif spec.alpha_mode == "per_class":
        coef_p = focal_alpha.to(coef_p) - 1
    if focal_weight is not None:
        coef_l, coef_p = coef_l * focal_weight, coef_p * focal_weight
    count = stats[:, COUNT, 0]
    eps = torch.finfo(torch.float32).eps
    if spec.focal_reduction == "sum":
        per_sample = count.clamp(min=eps) if spec.focal_masked else torch.full_like(count, spec.num_voxels)
        unit = spec.focal_scale / per_sample.unsqueeze(1)  # (B, 1)
    else:
        denom = count.sum().clamp(min=eps) if spec.focal_masked else B * Cp * spec.num_voxels
        unit = spec.focal_scale / denom * torch.ones_like(count).unsqueeze(1)
    jac[:, FOCAL, c0:] += coef_l * unit
    jac[:, FOCAL_POS, c0:] += coef_p * unit
    return ((coef_l * loss + coef_p * pos) * unit).sum()


def loss_finalize(stats: Tensor, region_weight: Optional[Tensor], ce_weight: Optional[Tensor],
                  focal_alpha: Optional[Tensor], focal_weight: Optional[Tensor],
                  spec: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, jac, valid): the loss of :func:`loss_from_stats`, ``jac = d loss / d stats (B, NUM_SLOTS, C)`` (see
    loss_spec: 0 in the slots that do not depend on the logits; per output value for ``"none"``) in closed form,
    and ``valid``, a 0-d tensor that is 1 when no voxel holds a bad label (stats slot BAD), else 0.

    The formulas the Triton and C++ finalize steps implement; ``tests/test_losses.py`` checks ``jac`` against
    autograd through :func:`loss_from_stats`."""
    check_loss_spec(spec)
    stats = stats.detach()
    jac = torch.zeros_like(stats)
    terms = []
    if spec.region != "off":
        terms.append(_region_closed_form(stats, region_weight, spec, jac))
    if spec.ce != "off":
        terms.append(_ce_closed_form(stats, ce_weight, spec, jac))
    if spec.focal != "off":
        terms.append(_focal_closed_form(stats, focal_alpha, focal_weight, spec, jac))
    if not terms:
        raise ValueError("LossSpec: every term is off (region, ce and focal); nothing to compute")
    loss = terms[0]
    for term in terms[1:]:
        loss = loss + term
    valid = (stats[:, BAD, 0].sum() == 0).to(stats.dtype)
    return loss, jac, valid


# ------------------------------------------------------------------------------------------------------------
# Per-voxel focal loss (reduction="none"): the output is as large as the logits, so there is nothing to fuse.
# ------------------------------------------------------------------------------------------------------------

def focal_loss_voxels(logits: Tensor, target: Tensor, mask: Optional[Tensor], *, include_background: bool,
                      use_softmax: bool, gamma: float, alpha, weight) -> Tensor:
    """MONAI ``FocalLoss`` with reduction ``"none"``: ``(B, C', *spatial)`` float32.  ``target`` is dense."""
    x, t = logits, target
    if not include_background and x.shape[1] > 1:
        x, t = x[:, 1:], t[:, 1:]
    if mask is not None:
        x, t = weigh(mask, x), t * mask
    x, t = x.float(), t.float()
    if use_softmax:
        ls = x.log_softmax(1)
        loss = -weigh(t * (1 - ls.exp()).pow(gamma), ls)
        if alpha is not None:
            fac = torch.tensor([1 - alpha] + [alpha] * (t.shape[1] - 1)) if isinstance(alpha, float) else alpha
            loss = fac.to(loss).view([-1] + [1] * (t.dim() - 2)) * loss
    else:
        bce, mod, _, _ = sigmoid_focal_terms(x, t, gamma, hard=False)
        loss = weigh(mod, bce)
        if alpha is not None:
            if isinstance(alpha, float):
                loss = (t * alpha + (1 - t) * (1 - alpha)) * loss
            else:
                a = alpha.to(loss).view([-1] + [1] * (t.dim() - 2))
                loss = torch.where(t == 1, a, torch.ones_like(a)) * loss
    if mask is not None:
        loss = weigh(mask, loss)
    if weight is not None:
        w = torch.as_tensor(weight).to(loss)
        loss = loss * (w if w.ndim == 0 else w.view([1, -1] + [1] * (loss.dim() - 2)))
    return loss


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, 1, *spatial) integer labels -> (B, C, *spatial) one-hot (MONAI ``one_hot``)."""
    out = torch.zeros((labels.shape[0], num_classes) + tuple(labels.shape[2:]), dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long(), 1)


def warn_single_channel(option: str) -> None:
    """MONAI's warning when an option (``"softmax=True"``...) is ignored for single-channel predictions."""
    warnings.warn(f"single channel prediction, `{option}` ignored.", stacklevel=4)
