"""Plain PyTorch reference for the fused segmentation losses.

Every loss in :mod:`fastmed.ops.losses` (Dice, Jaccard, Tversky, generalized Dice, focal, cross entropy, their
MONAI combinations and nnU-Net's ``DC_and_CE_loss``) is a function of a small tensor of per-(sample, class)
sums, the *statistics*.  A loss is computed in two steps:

1. ``loss_stats``: one pass over ``logits (B, C, *spatial)`` and the target computes ``stats (B, K, C)`` (K = 10
   slots, see ``SLOTS``) in float32 (float64 for float64 logits).  This is the step the Triton kernels fuse;
   ``loss_stats_backward`` is its closed-form backward (d logits from d stats), mirrored by the Triton backward.
2. ``*_from_stats``: plain differentiable torch on the tiny stats tensor reproduces MONAI's (or nnU-Net's) formulas,
   reductions and output shapes exactly; autograd through it gives the per-(sample, class) coefficients that the
   backward pass of step 1 consumes.

Per voxel, with ``m`` the ignore mask (1 where the voxel counts), ``p`` the Dice activation of the logits ``z``
(none / sigmoid / softmax over C), ``g`` the one-hot (label targets) or dense target, ``p' = m p``, ``g' = m g``:

====  ==========  ==================================================================================
slot  name        sum over the voxels of ...
====  ==========  ==================================================================================
0     intersect   ``p' g'``
1     pred        ``p'`` (pow_mode 1), ``p'^2`` (2), ``|p'|`` (3)
2     ground      the same of ``g'``
3     diff        ``|p' - g'|`` (pow_mode 3 only: MONAI's soft-label formulation)
4     nll         softmax CE: ``-m g log q`` (q = softmax(z)); BCE: ``m ((1 - g) z + softplus(-z))``
5     logsum      softmax CE: ``-m log q`` (label smoothing); BCE: ``m g softplus(-z)`` (pos_weight)
6     focal       focal term ``l`` of MONAI's sigmoid / softmax focal loss on (m z, m g), times m
7     focal_pos   ``l g'`` (focal_pos 1, scalar alpha) or ``l [g' == 1]`` (focal_pos 2, per-class alpha)
8     count       ``m`` (same value in every class column)
9     bad         label targets: voxels whose label is neither an integer in [0, C) nor ignore_index
====  ==========  ==================================================================================
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from fastmed._tensors import accumulation_dtype

SLOTS = ("intersect", "pred", "ground", "diff", "nll", "logsum", "focal", "focal_pos", "count", "bad")
K = len(SLOTS)
I, P, G, D, NLL, LOGSUM, FOCAL, FOCAL_POS, COUNT, BAD = range(K)

ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX = 0, 1, 2
POW_OFF, POW_LINEAR, POW_SQUARE, POW_ABS = 0, 1, 2, 3
CE_OFF, CE_SOFTMAX, CE_SOFTMAX_SMOOTH, CE_BCE = 0, 1, 2, 3
FOCAL_OFF, FOCAL_SIGMOID, FOCAL_SOFTMAX = 0, 1, 2
FPOS_OFF, FPOS_LINEAR, FPOS_HARD = 0, 1, 2


# ------------------------------------------------------------------------------------------------------------
# Step 1: the statistics pass (what the Triton kernels fuse) and its closed-form backward
# ------------------------------------------------------------------------------------------------------------

def _targets(target: Tensor, mask: Optional[Tensor], B: int, C: int, S: int, acc: torch.dtype, label_mode: bool,
             has_ignore: bool, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(g (B, C, S) or (B, 1, S), m (B, 1, S), bad (B,)) in the accumulation dtype."""
    if label_mode:
        lab = target.reshape(B, S)
        if lab.is_floating_point():
            integral = (lab == lab.floor()) & (lab.abs() < 2.0 ** 31)  # NaN and inf fail, as in the kernel
            labi = torch.where(integral, lab, torch.zeros_like(lab)).long()
        else:
            integral = torch.ones_like(lab, dtype=torch.bool)
            labi = lab.long()
        valid = ~(integral & (labi == ignore_index)) if has_ignore else torch.ones_like(integral)
        inrange = integral & (labi >= 0) & (labi < C)
        bad = (valid & ~inrange).sum(1).to(acc)
        classes = torch.arange(C, device=target.device).view(1, C, 1)
        g = ((labi.unsqueeze(1) == classes) & inrange.unsqueeze(1)).to(acc)
        m = valid.unsqueeze(1).to(acc)
        return g, m, bad
    g = target.reshape(B, target.shape[1], S).to(acc)
    m = mask.reshape(B, 1, S).to(acc) if mask is not None else torch.ones(B, 1, S, dtype=acc, device=target.device)
    return g, m, torch.zeros(B, dtype=acc, device=target.device)


def _activate(z: Tensor, act: int) -> Tensor:
    if act == ACT_SIGMOID:
        return torch.sigmoid(z)
    if act == ACT_SOFTMAX:
        return torch.softmax(z, 1)
    return z


def _pow_and_grad(base: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """base ** gamma and its derivative, with torch's conventions at base = 0."""
    powg = base.pow(gamma)
    dpow = torch.zeros_like(base) if gamma == 0 else gamma * base.pow(gamma - 1)
    return powg, dpow


def loss_stats(logits: Tensor, target: Tensor, mask: Optional[Tensor], act: int, label_mode: bool,
               has_ignore: bool, ignore_index: int, pow_mode: int, ce_mode: int, focal_mode: int, focal_c0: int,
               gamma: float, focal_pos: int) -> Tensor:
    """Per-(sample, class) statistics ``(B, K, C)`` of ``logits (B, C, *spatial)`` (see the module docstring).

    ``target`` is ``(B, 1, *spatial)`` labels (``label_mode``; any integer dtype, or integral floats) or a dense
    ``(B, C, *spatial)`` target (``(B, 1, *spatial)`` when C = 1); ``mask`` ``(B, 1, *spatial)`` or None is the
    ignore mask of a dense target.  Differentiable with respect to ``logits`` (and a dense ``target``).
    """
    B, C = logits.shape[:2]
    acc = accumulation_dtype(logits.dtype)
    z = logits.reshape(B, C, -1).to(acc)
    S = z.shape[2]
    g, m, bad = _targets(target, mask, B, C, S, acc, label_mode, has_ignore, ignore_index)
    zero = z.new_zeros(B, C)
    cols = [zero] * K
    if pow_mode != POW_OFF:
        pm, gm = _activate(z, act) * m, g * m
        cols[I] = (pm * gm).sum(2)
        if pow_mode == POW_LINEAR:
            cols[P], cols[G] = pm.sum(2), gm.sum(2)
        elif pow_mode == POW_SQUARE:
            cols[P], cols[G] = pm.square().sum(2), gm.square().sum(2)
        else:
            cols[P], cols[G], cols[D] = pm.abs().sum(2), gm.abs().sum(2), (pm - gm).abs().sum(2)
    if ce_mode in (CE_SOFTMAX, CE_SOFTMAX_SMOOTH):
        nlq = -torch.log_softmax(z, 1) * m
        cols[NLL] = (nlq * g).sum(2)
        if ce_mode == CE_SOFTMAX_SMOOTH:
            cols[LOGSUM] = nlq.sum(2)
    elif ce_mode == CE_BCE:
        sp = F.softplus(-z)
        cols[NLL] = (((1 - g) * z + sp) * m).sum(2)
        cols[LOGSUM] = (g * sp * m).sum(2)
    if focal_mode == FOCAL_SIGMOID:
        zz, tt = z * m, g * m
        loss = (zz - zz * tt - F.logsigmoid(zz)) * torch.exp(gamma * F.logsigmoid(-zz * (tt * 2 - 1))) * m
        cols[FOCAL] = loss.sum(2)
        if focal_pos != FPOS_OFF:
            cols[FOCAL_POS] = (loss * (tt if focal_pos == FPOS_LINEAR else (tt == 1).to(acc))).sum(2)
    elif focal_mode == FOCAL_SOFTMAX:
        zz, tt = (z * m)[:, focal_c0:], (g * m)[:, focal_c0:]
        lq = torch.log_softmax(zz, 1)
        loss = -(1 - lq.exp()).pow(gamma) * lq * tt * m
        cols[FOCAL] = torch.cat([zero[:, :focal_c0], loss.sum(2)], 1)
    cols[COUNT] = m.sum(2).expand(B, C)
    cols[BAD] = bad.unsqueeze(1).expand(B, C)
    return torch.stack(cols, 1)


def loss_stats_backward(gstats: Tensor, logits: Tensor, target: Tensor, mask: Optional[Tensor], act: int,
                        label_mode: bool, has_ignore: bool, ignore_index: int, pow_mode: int, ce_mode: int,
                        focal_mode: int, focal_c0: int, gamma: float, focal_pos: int) -> Tensor:
    """d logits from ``gstats`` = d loss / d stats ``(B, K, C)``, in closed form (the Triton backward's formulas).

    Returns a tensor shaped like ``logits``, in its dtype and memory format.
    """
    B, C = logits.shape[:2]
    acc = accumulation_dtype(logits.dtype)
    z = logits.reshape(B, C, -1).to(acc)
    S = z.shape[2]
    g, m, _ = _targets(target, mask, B, C, S, acc, label_mode, has_ignore, ignore_index)
    gs = gstats.to(acc).unsqueeze(3)  # (B, K, C, 1)
    dz = torch.zeros_like(z)
    if pow_mode != POW_OFF:
        p = _activate(z, act)
        pm, gm = p * m, g * m
        u = gs[:, I] * gm
        if pow_mode == POW_LINEAR:
            u = u + gs[:, P]
        elif pow_mode == POW_SQUARE:
            u = u + gs[:, P] * 2 * pm
        else:
            u = u + gs[:, P] * torch.sign(pm) + gs[:, D] * torch.sign(pm - gm)
        u = u * m
        if act == ACT_SOFTMAX:
            dz = dz + p * (u - (p * u).sum(1, keepdim=True))
        elif act == ACT_SIGMOID:
            dz = dz + u * p * (1 - p)
        else:
            dz = dz + u
    if ce_mode in (CE_SOFTMAX, CE_SOFTMAX_SMOOTH):
        q = torch.softmax(z, 1)
        w = gs[:, NLL] * g * m
        if ce_mode == CE_SOFTMAX_SMOOTH:
            w = w + gs[:, LOGSUM] * m
        dz = dz + q * w.sum(1, keepdim=True) - w
    elif ce_mode == CE_BCE:
        sneg = torch.sigmoid(-z)
        dz = dz + (gs[:, NLL] * ((1 - g) - sneg) - gs[:, LOGSUM] * g * sneg) * m
    if focal_mode == FOCAL_SIGMOID:
        zz, tt = z * m, g * m
        s = tt * 2 - 1
        bce = zz - zz * tt - F.logsigmoid(zz)
        mod = torch.exp(gamma * F.logsigmoid(-zz * s))
        dl = (torch.sigmoid(zz) - tt) * mod - bce * gamma * mod * torch.sigmoid(zz * s) * s
        coef = gs[:, FOCAL]
        if focal_pos != FPOS_OFF:
            coef = coef + gs[:, FOCAL_POS] * (tt if focal_pos == FPOS_LINEAR else (tt == 1).to(acc))
        dz = dz + coef * dl * m * m
    elif focal_mode == FOCAL_SOFTMAX:
        zz, tt = (z * m)[:, focal_c0:], (g * m)[:, focal_c0:]
        lq = torch.log_softmax(zz, 1)
        q = lq.exp()
        powg, dpow = _pow_and_grad(1 - q, gamma)
        v = gs[:, FOCAL, focal_c0:] * (-tt * m * (powg - lq * dpow * q))
        dzz = (v - q * v.sum(1, keepdim=True)) * m
        dz = dz + torch.cat([torch.zeros_like(z[:, :focal_c0]), dzz], 1)
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
    """MONAI DiceLoss's class weight: a scalar is repeated; a vector must have one value per class."""
    if weight is None or num_classes == 1:
        return None
    w = torch.as_tensor(weight)
    if w.ndim == 0:
        w = w.repeat(num_classes)
    elif w.shape[0] != num_classes:
        raise ValueError(f"weight must have one value per class ({num_classes} classes), got {w.shape[0]} values. "
                         "If include_background=False, the weight should not include the background class 0.")
    if bool((w < 0).any()):
        raise ValueError(f"weight values must be no less than 0, got {w.tolist()}")
    return w.to(like)


def tp_fp_fn(stats: Tensor, pow_mode: int, include_background: bool, batch: bool, ddp_sync: bool):
    """MONAI ``compute_tp_fp_fn`` from the stats: (tp, fp, fn), each (B, C') or (C',) with batch."""
    cols = [_drop_background(stats[:, k], include_background) for k in (I, P, G, D)]
    if batch:
        cols = list(_sum_batch(torch.stack(cols, 1), ddp_sync).unbind(0))
    inter, pred, ground, diff = cols
    if pow_mode == POW_ABS:
        tp = (pred + ground - diff) / 2
    else:
        tp = inter
    return tp, pred - tp, ground - tp


def dice_from_stats(stats: Tensor, *, ndim: int, pow_mode: int, include_background: bool, jaccard: bool,
                    reduction: str, smooth_nr: float, smooth_dr: float, batch: bool, weight: Optional[Tensor],
                    ddp_sync: bool = False) -> Tensor:
    """MONAI ``DiceLoss.forward`` after ``compute_tp_fp_fn``."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync)
    if not jaccard:
        fp = fp * 0.5
        fn = fn * 0.5
    f = 1 - (2 * tp + smooth_nr) / (2 * (tp + fp + fn) + smooth_dr)
    w = _class_weight(weight, tp.shape[-1], f)
    if w is not None:
        f = f * w
    return _reduce(f, reduction, ndim)


def tversky_from_stats(stats: Tensor, *, pow_mode: int, include_background: bool, alpha: float, beta: float,
                       reduction: str, smooth_nr: float, smooth_dr: float, batch: bool,
                       ddp_sync: bool = False) -> Tensor:
    """MONAI ``TverskyLoss.forward``; reduction ``"none"`` returns (B, C) (or (C,) with batch) like MONAI."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync)
    score = 1.0 - (tp + smooth_nr) / (tp + fp * alpha + fn * beta + smooth_dr)
    return _reduce(score, reduction, 0, broadcast_none=False)


def generalized_dice_from_stats(stats: Tensor, *, ndim: int, pow_mode: int, include_background: bool,
                                w_type: str, reduction: str, smooth_nr: float, smooth_dr: float, batch: bool,
                                ddp_sync: bool = False) -> Tensor:
    """MONAI ``GeneralizedDiceLoss.forward`` (infinite class weights replaced by the largest finite one)."""
    tp, fp, fn = tp_fp_fn(stats, pow_mode, include_background, batch, ddp_sync)
    denominator = 2 * (tp + fp * 0.5 + fn * 0.5)
    ground = _drop_background(stats[:, G], include_background)
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
            denom = (stats[:, G] * w).sum() if weight is not None else B * num_voxels
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


def nnunet_dice_from_stats(stats: Tensor, *, do_bg: bool, batch_dice: bool, smooth: float,
                           ddp_sync: bool = False) -> Tensor:
    """nnU-Net ``MemoryEfficientSoftDiceLoss``: -mean((2 I + smooth) / clip(G + P + smooth, 1e-8))."""
    inter, pred, ground = (_drop_background(stats[:, k], do_bg) for k in (I, P, G))
    if batch_dice:
        inter, pred, ground = _sum_batch(torch.stack([inter, pred, ground], 1), ddp_sync).unbind(0)
    dc = (2 * inter + smooth) / torch.clip(ground + pred + smooth, 1e-8)
    return -dc.mean()


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
        x, t = x * mask, t * mask
    x, t = x.float(), t.float()
    if use_softmax:
        ls = x.log_softmax(1)
        loss = -(1 - ls.exp()).pow(gamma) * ls * t
        if alpha is not None:
            fac = torch.tensor([1 - alpha] + [alpha] * (t.shape[1] - 1)) if isinstance(alpha, float) else alpha
            loss = fac.to(loss).view([-1] + [1] * (t.dim() - 2)) * loss
    else:
        loss = (x - x * t - F.logsigmoid(x)) * torch.exp(gamma * F.logsigmoid(-x * (t * 2 - 1)))
        if alpha is not None:
            if isinstance(alpha, float):
                loss = (t * alpha + (1 - t) * (1 - alpha)) * loss
            else:
                a = alpha.to(loss).view([-1] + [1] * (t.dim() - 2))
                loss = torch.where(t == 1, a, torch.ones_like(a)) * loss
    if mask is not None:
        loss = loss * mask
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
