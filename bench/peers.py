"""Plain-PyTorch peers the benchmarks compare with where the peer library is not a dependency (nnU-Net), or where a
loss must run inside a model benchmark without fastmed.

* :func:`nnunet_dc_and_ce`: nnU-Net v2 ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` (no ignore label),
  written out from nnU-Net's source as ``tests/test_losses.py`` does (REFERENCE.md section 2).
* :func:`nnunet_deep_supervision`: nnU-Net's ``DeepSupervisionWrapper`` around it (weights 1/2^i, the lowest
  resolution 0, normalized; targets downsampled nearest-exact).
* :func:`dice_ce`: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nnunet_dc_and_ce(x, y, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5):
    """nnU-Net's loss of logits ``x`` (B, C, *sp) and labels ``y`` (B, 1, *sp): CE + (-mean soft Dice)."""
    p = torch.softmax(x, 1)
    axes = tuple(range(2, x.ndim))
    with torch.no_grad():
        y_onehot = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(1, y.long(), 1)
        if not do_bg:
            y_onehot = y_onehot[:, 1:]
        sum_gt = y_onehot.sum(axes)
    if not do_bg:
        p = p[:, 1:]
    intersect, sum_pred = (p * y_onehot).sum(axes), p.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)
    return F.cross_entropy(x, y[:, 0].long()) - dc.mean()


def nnunet_deep_supervision(outputs, labels):
    """nnU-Net's deep-supervision loss of ``outputs`` (full resolution first) against full-resolution labels."""
    n = len(outputs)
    w = [1 / 2 ** i for i in range(n)]
    w[-1] = 0.0
    total_w = sum(w)
    total = 0.0
    for wi, out in zip(w, outputs):
        if wi == 0:
            continue
        t = labels if out.shape[2:] == labels.shape[2:] else F.interpolate(labels.float(), out.shape[2:],
                                                                          mode="nearest-exact")
        total = total + wi / total_w * nnunet_dc_and_ce(out.float(), t)
    return total


def dice_ce(logits, labels):
    """MONAI DiceCELoss(to_onehot_y=True, softmax=True) of logits (B, C, *sp) and labels (B, 1, *sp)."""
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, labels.long(), 1.0)
    dims = tuple(range(2, logits.dim()))
    inter, ps, ts = (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (ps + ts + 1e-5)
    return dice.mean() + F.cross_entropy(logits.float(), labels[:, 0].long())
