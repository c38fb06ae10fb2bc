"""Distance-map losses with the maps computed on the fly, for the whole batch in one call, on the labels' device.

* :class:`BoundaryLoss`: Kervadec et al. (MIDL 2019), ``mean(probs[:, classes] * phi)`` with phi from
  :func:`fastmed.ops.signed_distance` (or passed precomputed).
* :class:`HausdorffDTLoss`: MONAI's ``HausdorffDTLoss`` (Karimi & Salcudean 2019),
  ``mean((p - g)^2 * (dt_p^alpha + dt_g^alpha))``.
* :func:`boundary_loss_weights`: the paper's schedule for ``region * GDL + boundary * BoundaryLoss``.

Distance maps carry no gradient: gradients flow to the logits only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastmed.ops.distance_transform import distance_transform, signed_distance

__all__ = ["BoundaryLoss", "HausdorffDTLoss", "boundary_loss_weights"]

_REDUCTIONS = ("mean", "sum", "none")


def _activate(x: Tensor, sigmoid: bool, softmax: bool) -> Tensor:
    if sigmoid and softmax:
        raise ValueError("sigmoid and softmax are mutually exclusive; got both True")
    if sigmoid:
        return torch.sigmoid(x)
    if softmax and x.shape[1] > 1:
        return torch.softmax(x, 1)
    return x


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}; got {reduction!r}")
    return reduction


def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits or probabilities, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")
    if input.dim() not in (4, 5):
        raise ValueError(f"input must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(input.shape)}")


class BoundaryLoss(nn.Module):
    """Kervadec's boundary loss ``mean(probs[:, classes] * phi[:, classes])`` (can be negative).

    Args:
        include_background: use class 0 too (the paper uses the foreground classes only).  Ignored, as in MONAI,
            when ``input`` has a single channel: that channel is the foreground and ``target`` its binary mask.
        softmax: apply softmax over channels to ``input`` (default; logits in).  ``sigmoid=True`` applies a
            sigmoid instead; with both False ``input`` holds probabilities.
        sigmoid: see ``softmax``.
        spacing: voxel size for the maps (one number per spatial dim), or None.
        reduction: ``"mean"`` (the paper's), ``"sum"``, or ``"none"`` (the ``(N, K, *spatial)`` product).

    Forward:
        ``input``: ``(N, C, *spatial)`` logits (or probabilities).  ``target``: ``(N, 1, *spatial)`` integer labels
        or ``(N, C, *spatial)`` one-hot; the maps are computed from it on its device, without gradient.
        Or ``dist_maps``: precomputed ``signed_distance(target, C, include_background=self.include_background)``,
        ``(N, K, *spatial)``.
    """

    def __init__(self, include_background: bool = False, softmax: bool = True, sigmoid: bool = False,
                 spacing: Union[None, float, Sequence[float]] = None, reduction: str = "mean"):
        super().__init__()
        if sigmoid and softmax:
            raise ValueError("sigmoid and softmax are mutually exclusive; got both True")
        self.include_background = include_background
        self.softmax = softmax
        self.sigmoid = sigmoid
        self.spacing = spacing
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Optional[Tensor] = None, dist_maps: Optional[Tensor] = None) -> Tensor:
        _check_input(input)
        if (target is None) == (dist_maps is None):
            raise ValueError("pass exactly one of target (labels or one-hot) and dist_maps (precomputed maps)")
        probs = _activate(input, self.sigmoid, self.softmax)
        single = input.shape[1] == 1  # one channel: kept whatever include_background (MONAI)
        first = 0 if self.include_background or single else 1
        if dist_maps is None:
            if single:  # target is the channel's binary mask: labels {0, 1} (class 1 = the channel) or one-hot
                labels = isinstance(target, Tensor) and not (target.is_floating_point() or target.dtype == torch.bool)
                dist_maps = signed_distance(target, 2 if labels else 1, self.spacing, include_background=not labels)
            else:
                dist_maps = signed_distance(target, input.shape[1], self.spacing, self.include_background)
        expected = (input.shape[0], input.shape[1] - first) + tuple(input.shape[2:])
        if tuple(dist_maps.shape) != expected:
            raise ValueError(f"dist_maps must have shape {expected} (the classes of input"
                             f"{'' if first == 0 else ' without the background'}), got "
                             f"{tuple(dist_maps.shape)}")
        loss = probs[:, first:] * dist_maps.detach().to(device=probs.device, dtype=probs.dtype)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class HausdorffDTLoss(nn.Module):
    """MONAI's ``HausdorffDTLoss``: per channel ``mean((p - g)^2 * (dt_p^alpha + dt_g^alpha))``.

    ``dt_x = edt(x > 0.5) + edt(x <= 0.5)`` per ``(n, c)`` map (the distance to the boundary of the thresholded
    map), all zeros when the map is empty or full.  Same arguments and results as
    ``monai.losses.HausdorffDTLoss`` (``other_act`` aside), but every map of the batch in one call on the
    input's device.

    Args:
        alpha, include_background, to_onehot_y, sigmoid, softmax, reduction, batch: as in MONAI.
    """

    def __init__(self, alpha: float = 2.0, include_background: bool = False, to_onehot_y: bool = False,
                 sigmoid: bool = False, softmax: bool = False, reduction: str = "mean", batch: bool = False):
        super().__init__()
        if sigmoid and softmax:
            raise ValueError("sigmoid and softmax are mutually exclusive; got both True")
        self.alpha = float(alpha)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.reduction = _check_reduction(reduction)
        self.batch = batch

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
        n_ch = input.shape[1]
        input = _activate(input, self.sigmoid, self.softmax)
        if self.to_onehot_y and n_ch > 1:
            if target.shape[1] != 1:
                raise ValueError(f"to_onehot_y=True needs target of shape (N, 1, *spatial), got {tuple(target.shape)}")
            target = (target == torch.arange(n_ch, device=target.device).reshape((1, -1) + (1,) * (target.dim() - 2)))
            target = target.to(input.dtype)
        if not self.include_background and n_ch > 1:
            input, target = input[:, 1:], target[:, 1:]
        if target.shape != input.shape:
            raise ValueError(f"target must have the shape of input {tuple(input.shape)} (after one-hot and "
                             f"background removal), got {tuple(target.shape)}")
        dist = self.distance_field(input.detach()) ** self.alpha + self.distance_field(target.detach()) ** self.alpha
        f = (input - target) ** 2 * dist.to(input.dtype)
        axes = ([0] if self.batch else []) + list(range(2, input.dim()))
        f = f.mean(dim=axes, keepdim=True)
        if self.reduction == "mean":
            return f.mean()
        if self.reduction == "sum":
            return f.sum()
        return f


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
