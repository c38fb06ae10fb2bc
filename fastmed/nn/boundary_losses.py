"""Distance-map losses with the maps computed on the fly, for the whole batch in one call, on the labels' device.

* :class:`BoundaryLoss`: MONAI 1.6's ``BoundaryLoss`` (Kervadec et al., MIDL 2019), ``mean(probs * phi)`` per
  ``(n, c)`` with phi from :func:`fastmed.ops.signed_distance` (or passed precomputed).
* :class:`HausdorffDTLoss`: MONAI's ``HausdorffDTLoss`` (Karimi & Salcudean 2019),
  ``mean((p - g)^2 * (dt_p^alpha + dt_g^alpha))``, and :class:`LogHausdorffDTLoss`, its ``log(1 + loss)``.
* :func:`boundary_loss_weights`: the paper's schedule for ``region * GDL + boundary * BoundaryLoss``.

Distance maps carry no gradient: gradients flow to the logits only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastmed._validate import check_loss_activation, check_reduction
from fastmed.ops.distance_transform import distance_transform, signed_distance
from fastmed.reference.losses import warn_single_channel

__all__ = ["BoundaryLoss", "HausdorffDTLoss", "LogHausdorffDTLoss", "boundary_loss_weights"]


def _activate(x: Tensor, sigmoid: bool, softmax: bool, other_act: Optional[Callable]) -> Tensor:
    """MONAI's order: sigmoid, softmax (ignored with a warning for one channel), other_act."""
    if sigmoid:
        x = torch.sigmoid(x)
    if softmax:
        if x.shape[1] == 1:
            warn_single_channel("softmax=True")
        else:
            x = torch.softmax(x, 1)
    if other_act is not None:
        x = other_act(x)
    return x


def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits or probabilities, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")
    if input.dim() not in (4, 5):
        raise ValueError(f"input must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(input.shape)}")


def _one_hot_target(input: Tensor, target: Tensor, to_onehot_y: bool) -> tuple[Tensor, bool]:
    """``(target, labels)``: with ``to_onehot_y`` (and more than one channel) a ``(N, 1, *spatial)`` label map
    (``(N, *spatial)`` is given its channel dim, as MONAI's BoundaryLoss does) whose one-hot has the shape of
    ``input``, ``labels`` True; else ``target`` itself, which must have the shape of ``input``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    n = input.shape[1]
    if to_onehot_y:
        if n == 1:
            warn_single_channel("to_onehot_y=True")
        else:
            if target.dim() == input.dim() - 1:
                target = target.unsqueeze(1)
            want = (input.shape[0], 1) + tuple(input.shape[2:])
            if tuple(target.shape) != want:
                raise ValueError(f"target must have shape {want} (class labels; to_onehot_y=True), got "
                                 f"{tuple(target.shape)}")
            return target, True
    if target.shape != input.shape:
        hint = " (class labels need to_onehot_y=True)" if target.dim() > 1 and target.shape[1] == 1 else ""
        raise ValueError(f"target must have the shape of input {tuple(input.shape)}{hint}, got "
                         f"{tuple(target.shape)}")
    return target, False


def _warn_background(n: int, include_background: bool) -> int:
    """The first channel kept: 1 without the background, unless there is a single channel (MONAI warns)."""
    if include_background:
        return 0
    if n == 1:
        warn_single_channel("include_background=False")
        return 0
    return 1


def _store_options(module: nn.Module, include_background: bool, to_onehot_y: bool, sigmoid: bool, softmax: bool,
                   other_act: Optional[Callable], reduction: str, batch: bool) -> None:
    """Check MONAI's common loss options and store them on ``module`` under their own names."""
    check_loss_activation(sigmoid, softmax, other_act)
    options = {"include_background": include_background, "to_onehot_y": to_onehot_y, "sigmoid": sigmoid,
               "softmax": softmax, "other_act": other_act, "reduction": check_reduction(reduction), "batch": batch}
    for name, value in options.items():
        setattr(module, name, value)  # (nn.Module's setattr: an ``other_act`` module is registered as a child)


class BoundaryLoss(nn.Module):
    """MONAI 1.6's ``BoundaryLoss`` (Kervadec et al., MIDL 2019): per ``(n, c)`` the mean over the voxels of
    ``probs * phi``, phi the signed distance map of the target's class (negative inside, from
    :func:`fastmed.ops.signed_distance`: every map of the batch in one call, on the target's device; all zeros for
    a class absent from or covering the whole map).

    Args (MONAI's, in MONAI's order and with its defaults):
        include_background: keep channel 0 (ignored, with MONAI's warning, for a single channel).
        to_onehot_y: ``target`` holds class labels ``(N, 1, *spatial)`` (or ``(N, *spatial)``), one-hot encoded
            with ``input.shape[1]`` classes (ignored, with a warning, for a single channel).
        sigmoid, softmax, other_act: the activation of ``input`` (at most one; none: ``input`` holds
            probabilities).  ``softmax`` is ignored, with a warning, for a single channel.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``(N, C')`` values, ``(C',)`` with ``batch``).
        batch: average over the batch before the reduction.
        spacing: (fastmed) voxel size for the maps, one number per spatial dim; None = MONAI's unit spacing.

    Forward:
        ``input``: ``(N, C, *spatial)``.  ``target``: one-hot (or per-channel binary masks) with the shape of
        ``input``, thresholded at 0.5 as MONAI does; or labels with ``to_onehot_y``.  Or (fastmed) ``dist_maps``
        instead of ``target``: precomputed maps of the kept classes, ``(N, C', *spatial)``.
    """

    def __init__(self, include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Optional[Callable] = None, reduction: str = "mean",
                 batch: bool = False, *, spacing: Union[None, float, Sequence[float]] = None):
        super().__init__()
        _store_options(self, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, batch)
        self.spacing = spacing

    def forward(self, input: Tensor, target: Optional[Tensor] = None, dist_maps: Optional[Tensor] = None) -> Tensor:
        _check_input(input)
        if (target is None) == (dist_maps is None):
            raise ValueError("pass exactly one of target and dist_maps (precomputed maps)")
        n = input.shape[1]
        probs = _activate(input, self.sigmoid, self.softmax, self.other_act)
        if dist_maps is None:
            target, labels = _one_hot_target(input, target, self.to_onehot_y)
        first = _warn_background(n, self.include_background)
        target_nan = None
        if dist_maps is None:
            if labels:
                lab = target if not target.is_floating_point() else target.long()  # MONAI's one_hot casts too
                dist_maps = signed_distance(lab, n, self.spacing, include_background=first == 0)
            else:
                if target.is_floating_point():  # NaN would threshold to background: make it NaN out, no sync
                    target_nan = target.isnan().any()
                mask = target if target.dtype == torch.bool else target > 0.5
                dist_maps = signed_distance(mask[:, first:], spacing=self.spacing, include_background=True)
        expected = (input.shape[0], n - first) + tuple(input.shape[2:])
        if tuple(dist_maps.shape) != expected:
            raise ValueError(f"dist_maps must have shape {expected} (the classes of input"
                             f"{'' if first == 0 else ' without the background'}), got "
                             f"{tuple(dist_maps.shape)}")
        loss = (probs[:, first:] * dist_maps.detach().to(device=probs.device, dtype=probs.dtype)).flatten(2).mean(-1)
        if target_nan is not None:
            loss = torch.where(target_nan, torch.full_like(loss, float("nan")), loss)
        if self.batch:
            loss = loss.mean(0)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class HausdorffDTLoss(nn.Module):
    """MONAI's ``HausdorffDTLoss``: per channel ``mean((p - g)^2 * (dt_p^alpha + dt_g^alpha))``.

    ``dt_x = edt(x > 0.5) + edt(x <= 0.5)`` per ``(n, c)`` map (the distance to the boundary of the thresholded
    map), all zeros when the map is empty or full.  Same arguments (order and defaults), warnings and results as
    ``monai.losses.HausdorffDTLoss``, but every map of the batch in one call on the input's device.

    Args:
        alpha, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, batch: as in MONAI.
            For a single channel, ``softmax``, ``to_onehot_y`` and ``include_background=False`` are ignored with
            MONAI's warnings.  ``reduction="none"`` gives ``(N, C', 1, ...)`` (``(1, C', 1, ...)`` with ``batch``).
    """

    def __init__(self, alpha: float = 2.0, include_background: bool = False, to_onehot_y: bool = False,
                 sigmoid: bool = False, softmax: bool = False, other_act: Optional[Callable] = None,
                 reduction: str = "mean", batch: bool = False):
        super().__init__()
        _store_options(self, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, batch)
        self.alpha = float(alpha)

    @staticmethod
    @torch.no_grad()
    def distance_field(x: Tensor) -> Tensor:
        """``(N, C, *spatial)`` -> float32 ``edt(fg) + edt(~fg)`` per map with ``fg = x > 0.5``; zeros when the map
        is empty or full."""
        fg = x > 0.5
        d = distance_transform(torch.stack([fg, ~fg]), spatial_dims=x.dim() - 2)
        flat = fg.flatten(2)
        ok = (flat.any(-1) & ~flat.all(-1)).reshape(flat.shape[:2] + (1,) * (x.dim() - 2))
        return torch.where(ok, d[0] + d[1], torch.zeros((), device=d.device))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_input(input)
        n = input.shape[1]
        input = _activate(input, self.sigmoid, self.softmax, self.other_act)
        target, labels = _one_hot_target(input, target, self.to_onehot_y)
        if labels:
            target = (target == torch.arange(n, device=target.device).reshape((1, -1) + (1,) * (target.dim() - 2)))
            target = target.to(input.dtype)
        first = _warn_background(n, self.include_background)
        input, target = input[:, first:], target[:, first:]
        dist = self.distance_field(input.detach()) ** self.alpha + self.distance_field(target.detach()) ** self.alpha
        f = (input - target) ** 2 * dist.to(input.dtype)
        axes = ([0] if self.batch else []) + list(range(2, input.dim()))
        f = f.mean(dim=axes, keepdim=True)
        if self.reduction == "mean":
            return f.mean()
        if self.reduction == "sum":
            return f.sum()
        return f


class LogHausdorffDTLoss(HausdorffDTLoss):
    """MONAI's ``LogHausdorffDTLoss``: ``log(HausdorffDTLoss + 1)`` (same arguments)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return torch.log(super().forward(input, target) + 1)


def boundary_loss_weights(epoch: int, *, initial_boundary: float = 0.01, step: float = 0.01,
                          region_floor: float = 0.1) -> tuple[float, float]:
    """(region_weight, boundary_weight) for epoch ``epoch`` (0-based) of Kervadec's recipe.

    ``total = region_weight * GDL + boundary_weight * BoundaryLoss``; training starts at ``(1, initial_boundary)``
    and after each epoch ``step`` of weight moves from the region loss to the boundary loss, the region weight
    floored at ``region_floor`` (their ``StealWeight`` scheduler: ``(max(0.1, a - 0.01), b + 0.01)`` per epoch).
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return max(region_floor, 1.0 - step * epoch), initial_boundary + step * epoch
