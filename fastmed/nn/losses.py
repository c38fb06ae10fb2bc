"""Loss modules: drop-in replacements for MONAI 1.6's losses and nnU-Net's ``DC_and_CE_loss`` /
``DeepSupervisionWrapper``, with the same constructor arguments, defaults and results.

``DiceLoss`` and ``FocalLoss`` keep MONAI's ``class_weight`` buffer, so their state dicts match.  Every module
takes ``ddp_sync`` (Dice family, with ``batch=True``) to sum the batch statistics across the ranks of the default
process group.  The computation is :mod:`fastmed.ops.losses` (one fused pass forward, one backward).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from fastmed._validate import (
    check_ddp_sync,
    check_loss_activation,
    check_number,
    check_number_sequence,
    check_reduction,
)
from fastmed.ops import losses as F

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "FocalLoss", "DiceCELoss", "DiceFocalLoss",
           "NNUNetDiceCELoss", "DeepSupervisionLoss"]


class DiceLoss(nn.Module):
    """MONAI ``DiceLoss``; ``forward(input (B, C, *sp), target)``, see :func:`fastmed.ops.dice_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
                 jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False, weight=None, soft_label: bool = False, ignore_index: Optional[int] = None,
                 ddp_sync: bool = False) -> None:
        super().__init__()
        check_loss_activation(sigmoid, softmax, other_act)
        check_ddp_sync(ddp_sync, batch)
        self.reduction = check_reduction(reduction)
        self.include_background, self.to_onehot_y = include_background, to_onehot_y
        self.sigmoid, self.softmax, self.other_act = sigmoid, softmax, other_act
        self.squared_pred, self.jaccard, self.batch = squared_pred, jaccard, batch
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.soft_label, self.ignore_index, self.ddp_sync = soft_label, ignore_index, ddp_sync
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_loss(input, target, include_background=self.include_background, to_onehot_y=self.to_onehot_y,
                           sigmoid=self.sigmoid, softmax=self.softmax, other_act=self.other_act,
                           squared_pred=self.squared_pred, jaccard=self.jaccard, reduction=self.reduction,
                           smooth_nr=self.smooth_nr, smooth_dr=self.smooth_dr, batch=self.batch,
                           weight=self.class_weight, soft_label=self.soft_label, ignore_index=self.ignore_index,
                           ddp_sync=self.ddp_sync)


class GeneralizedDiceLoss(nn.Module):
    """MONAI ``GeneralizedDiceLoss``, see :func:`fastmed.ops.generalized_dice_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, w_type: str = "square",
                 reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 soft_label: bool = False, ddp_sync: bool = False) -> None:
        super().__init__()
        check_loss_activation(sigmoid, softmax, other_act)
        check_ddp_sync(ddp_sync, batch)
        self.reduction = check_reduction(reduction)
        self.kwargs = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
                           softmax=softmax, other_act=other_act, w_type=getattr(w_type, "value", w_type),
                           smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=batch,
                           soft_label=soft_label, ddp_sync=ddp_sync)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.generalized_dice_loss(input, target, reduction=self.reduction, **self.kwargs)


class TverskyLoss(nn.Module):
    """MONAI ``TverskyLoss``, see :func:`fastmed.ops.tversky_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, alpha: float = 0.5, beta: float = 0.5,
                 reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 soft_label: bool = False, ignore_index: Optional[int] = None, ddp_sync: bool = False) -> None:
        super().__init__()
        check_loss_activation(sigmoid, softmax, other_act)
        check_ddp_sync(ddp_sync, batch)
        self.reduction = check_reduction(reduction)
        self.alpha, self.beta = alpha, beta
        self.kwargs = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
                           softmax=softmax, other_act=other_act, smooth_nr=float(smooth_nr),
                           smooth_dr=float(smooth_dr), batch=batch, soft_label=soft_label,
                           ignore_index=ignore_index, ddp_sync=ddp_sync)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.tversky_loss(input, target, alpha=self.alpha, beta=self.beta, reduction=self.reduction,
                              **self.kwargs)


class FocalLoss(nn.Module):
    """MONAI ``FocalLoss``, see :func:`fastmed.ops.focal_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, gamma: float = 2.0,
                 alpha=None, weight=None, reduction: str = "mean", use_softmax: bool = False,
                 ignore_index: Optional[int] = None) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.include_background, self.to_onehot_y = include_background, to_onehot_y
        self.gamma, self.use_softmax, self.ignore_index = gamma, use_softmax, ignore_index
        if alpha is None or isinstance(alpha, (int, float)):
            self.alpha = alpha
        else:  # per-class alpha: a (non-persistent) buffer, so that .cuda() moves it and no call copies it
            self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32), persistent=False)
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, include_background=self.include_background,
                            to_onehot_y=self.to_onehot_y, gamma=self.gamma, alpha=self.alpha,
                            weight=self.class_weight, reduction=self.reduction, use_softmax=self.use_softmax,
                            ignore_index=self.ignore_index)


class DiceCELoss(nn.Module):
    """MONAI ``DiceCELoss``, see :func:`fastmed.ops.dice_ce_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
                 jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False, weight: Optional[Tensor] = None, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0, label_smoothing: float = 0.0, ddp_sync: bool = False) -> None:
        super().__init__()
        check_loss_activation(sigmoid, softmax, other_act)
        check_ddp_sync(ddp_sync, batch)
        self.reduction = check_reduction(reduction, ("mean", "sum"))
        self.lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
        self.lambda_ce = check_number(lambda_ce, "lambda_ce", minimum=0.0)
        self.register_buffer("weight", torch.as_tensor(weight) if weight is not None else None)
        self.kwargs = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
                           softmax=softmax, other_act=other_act, squared_pred=squared_pred, jaccard=jaccard,
                           smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=batch,
                           label_smoothing=label_smoothing, ddp_sync=ddp_sync)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_ce_loss(input, target, reduction=self.reduction, weight=self.weight,
                              lambda_dice=self.lambda_dice, lambda_ce=self.lambda_ce, **self.kwargs)


class DiceFocalLoss(nn.Module):
    """MONAI ``DiceFocalLoss`` (sigmoid focal term), see :func:`fastmed.ops.dice_focal_loss`."""

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
                 jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False, gamma: float = 2.0, weight=None, lambda_dice: float = 1.0,
                 lambda_focal: float = 1.0, alpha: Optional[float] = None, ddp_sync: bool = False) -> None:
        super().__init__()
        check_loss_activation(sigmoid, softmax, other_act)
        check_ddp_sync(ddp_sync, batch)
        self.reduction = check_reduction(reduction)
        self.lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
        self.lambda_focal = check_number(lambda_focal, "lambda_focal", minimum=0.0)
        self.kwargs = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
                           softmax=softmax, other_act=other_act, squared_pred=squared_pred, jaccard=jaccard,
                           smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=batch, gamma=gamma,
                           weight=weight, alpha=alpha, ddp_sync=ddp_sync)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_focal_loss(input, target, reduction=self.reduction, lambda_dice=self.lambda_dice,
                                 lambda_focal=self.lambda_focal, **self.kwargs)


class NNUNetDiceCELoss(nn.Module):
    """nnU-Net's default loss ``DC_and_CE_loss`` (+ ``MemoryEfficientSoftDiceLoss``), see
    :func:`fastmed.ops.nnunet_dice_ce_loss`.  ``forward(logits (B, C, *sp), labels (B, 1, *sp))``."""

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5, weight_ce: float = 1.0,
                 weight_dice: float = 1.0, ignore_label: Optional[int] = None, ddp_sync: bool = False) -> None:
        super().__init__()
        check_ddp_sync(ddp_sync, batch_dice)
        self.batch_dice, self.do_bg, self.smooth = batch_dice, do_bg, float(smooth)
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.ignore_label, self.ddp_sync = ignore_label, ddp_sync

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nnunet_dice_ce_loss(input, target, batch_dice=self.batch_dice, do_bg=self.do_bg, smooth=self.smooth,
                                     weight_ce=self.weight_ce, weight_dice=self.weight_dice,
                                     ignore_label=self.ignore_label, ddp_sync=self.ddp_sync)


class DeepSupervisionLoss(nn.Module):
    """nnU-Net deep supervision around ``loss``: weights 1/2^i, the lowest resolution 0, normalized.

    ``forward(outputs, target)``: ``outputs`` a list of logits, full resolution first; ``target`` a list of
    targets or one full-resolution target downsampled with ``target_mode`` (see
    :func:`fastmed.ops.deep_supervision_loss`).  ``weights=None`` derives nnU-Net's weights from ``len(outputs)``.
    """

    def __init__(self, loss: nn.Module, weights: Optional[Sequence[float]] = None,
                 target_mode: str = "nearest-exact") -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else check_number_sequence(weights, "weights", minimum=0.0)
        self.target_mode = target_mode

    def forward(self, outputs: Sequence[Tensor], target) -> Tensor:
        return F.deep_supervision_loss(self.loss, outputs, target, weights=self.weights, target_mode=self.target_mode)
