"""Segmentation metrics on one-hot ``(B, C, *spatial)`` tensors, batched on the tensors' device.

Values match MONAI's ``compute_dice``, ``compute_hausdorff_distance`` and ``compute_surface_dice`` (no subvoxels)
on the same inputs, including empty predictions and targets, but every ``(b, c)`` pair is computed in one call: the
surface distances come from :func:`fastmed.ops.distance_transform` of all edge maps at once (``distance_metric``
"euclidean"), or from the separable chessboard / taxicab transform
(:func:`fastmed.reference.distance_transform.chamfer_distance_transform`, scipy's ``distance_transform_cdt``, in
voxels: spacing does not apply, as in MONAI).  ``ignore_index`` follows MONAI's ``create_ignore_mask``
(:func:`ignore_mask`).  :mod:`fastmed.metrics.cumulative` holds MONAI-style metric classes built on these.

Edges follow MONAI: a voxel of the mask with a face neighbour outside it (voxels outside the image count as
outside), i.e. ``mask ^ binary_erosion(mask)``.  ``include_background=False`` drops channel 0 only when there is
more than one channel (MONAI's ``ignore_background``): a single-channel ``(B, 1, *spatial)`` mask keeps its channel.
``spacing`` is one number, one number per spatial dim, or (MONAI) one such entry per batch item.
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed._validate import check_choice, check_int, check_number, check_number_sequence
from fastmed.ops.distance_transform import distance_transform, normalize_spacing
from fastmed.reference.distance_transform import CHAMFER_METRICS, chamfer_distance_transform

__all__ = ["DISTANCE_METRICS", "dice", "hausdorff_distance", "ignore_mask", "surface_dice"]

DISTANCE_METRICS = ("euclidean",) + CHAMFER_METRICS

Spacing = Union[None, float, Sequence[float], Sequence[Union[float, Sequence[float]]], Tensor]


def _check_pair(y_pred: Tensor, y: Tensor, any_rank: bool = False) -> None:
    """Tensors of 4 or 5 dims (2D / 3D images); with ``any_rank`` (Dice, as MONAI's) any ``(B, C, *spatial)``."""
    for name, t in (("y_pred", y_pred), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if any_rank and t.dim() < 3:
            raise ValueError(f"{name} must be (B, C, *spatial) with at least one spatial dim, got shape "
                             f"{tuple(t.shape)}")
        if not any_rank and t.dim() not in (4, 5):
            raise ValueError(f"{name} must be one-hot (B, C, H, W) or (B, C, D, H, W), got shape {tuple(t.shape)}")


def ignore_mask(y: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """MONAI's ``create_ignore_mask``: ``(B, 1, *spatial)`` bool, False at the voxels ``ignore_index`` excludes;
    None without ``ignore_index``.

    ``y`` with one channel holds labels: voxels equal to ``ignore_index`` are excluded.  A one-hot ``y``
    (``C > 1`` channels): with ``0 <= ignore_index < C`` the voxels of that class, otherwise (a sentinel such as
    -1 or 255) the voxels where every channel is zero.
    """
    if ignore_index is None:
        return None
    check_int(ignore_index, "ignore_index")
    if y.shape[1] == 1:
        return y != ignore_index
    if 0 <= ignore_index < y.shape[1]:
        return y[:, ignore_index:ignore_index + 1] == 0
    return (y != 0).any(1, keepdim=True)


def _masked(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``t`` as a bool mask (nonzero = inside), restricted to ``mask`` (broadcast over channels) when given."""
    b = t != 0
    return b if mask is None else b & mask


def _pair(y_pred: Tensor, y: Tensor, include_background: bool,
          mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    _check_pair(y_pred, y)
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    p, g = _masked(y_pred, mask), _masked(y, mask)
    if not include_background and y_pred.shape[1] > 1:  # MONAI's ignore_background keeps a single channel
        p, g = p[:, 1:], g[:, 1:]
    return p, g


def _one_hot(t: Tensor, classes: int, name: str) -> Tensor:
    """A ``(B, 1, *spatial)`` label map (when ``classes > 1``) or ``(B, classes, *spatial)`` one-hot tensor as a
    bool one-hot ``(B, classes, *spatial)`` (MONAI ``DiceHelper``: labels are compared with each class index)."""
    if t.shape[1] == 1 and classes > 1:
        return t == torch.arange(classes, device=t.device).reshape((1, -1) + (1,) * (t.dim() - 2))
    if t.shape[1] != classes:
        raise ValueError(f"{name} must have 1 channel (class indices) or {classes} channels (one-hot, the number "
                         f"of classes), got shape {tuple(t.shape)}")
    return t != 0


def dice(y_pred: Tensor, y: Tensor, include_background: bool = True, ignore_empty: bool = True, *,
         num_classes: Optional[int] = None, ignore_index: Optional[int] = None) -> Tensor:
    """``2 |y & y_pred| / (|y| + |y_pred|)`` per ``(b, c)``: ``(B, C')`` float32 (MONAI ``compute_dice``).

    Args:
        y_pred, y: ``(B, C, *spatial)`` one-hot (nonzero = inside), or with ``num_classes`` (y_pred) / in any
            case (y) a ``(B, 1, *spatial)`` map of class indices.
        include_background: keep class 0 (dropped only when there is more than one class).
        ignore_empty: an empty ``y`` gives NaN; else 1 when ``y_pred`` is empty too and 0 otherwise.
        num_classes: the number of classes including the background; None means ``y_pred.shape[1]``.  Needed for
            class-index ``y_pred``.
        ignore_index: voxels to leave out of every class's score (:func:`ignore_mask`).

    Any number of spatial dims (as MONAI's), unlike the surface metrics (2D and 3D).
    """
    _check_pair(y_pred, y, any_rank=True)
    classes = y_pred.shape[1] if num_classes is None else check_int(num_classes, "num_classes", 1)
    mask = ignore_mask(y, ignore_index)
    p, g = _one_hot(y_pred, classes, "y_pred"), _one_hot(y, classes, "y")
    if p.shape != g.shape:
        raise ValueError(f"y_pred and y must have the same batch and spatial shape, got {tuple(y_pred.shape)} and "
                         f"{tuple(y.shape)}")
    if mask is not None:
        p, g = p & mask, g & mask
    if not include_background and classes > 1:
        p, g = p[:, 1:], g[:, 1:]
    inter = (p & g).flatten(2).sum(-1).float()
    sg, sp = g.flatten(2).sum(-1).float(), p.flatten(2).sum(-1).float()
    d = 2 * inter / (sg + sp).clamp_min(1)
    empty = sg == 0
    fill = torch.full_like(d, float("nan")) if ignore_empty else (sp == 0).float()
    return torch.where(empty, fill, d)


def _edges(m: Tensor) -> Tensor:
    """Voxels of the (B, C, *spatial) bool mask ``m`` with a face neighbour outside it (or outside the image)."""
    nd = m.dim() - 2
    padded = F.pad(m.to(torch.uint8), (1, 1) * nd)  # zeros outside the image
    interior = m.clone()
    for dim in range(2, m.dim()):
        for shift in (0, 2):
            index = [slice(None), slice(None)] + [slice(1, 1 + s) for s in m.shape[2:]]
            index[dim] = slice(shift, shift + m.shape[dim])
            interior &= padded[tuple(index)] != 0
    return m & ~interior


def _spacing_per_item(spacing: Spacing, batch: int, nd: int) -> list[Optional[list[float]]]:
    """One normalized spacing per batch item (MONAI ``prepare_spacing``): None or a number for all, ``nd`` numbers
    for all, or a sequence of ``batch`` entries (each a number or ``nd`` numbers), one per item."""
    items = spacing.tolist() if hasattr(spacing, "tolist") else spacing  # tensors and numpy arrays
    if items is None or isinstance(items, numbers.Real):
        return [normalize_spacing(items, nd)] * batch
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"spacing must be None, a number, {nd} numbers or one entry per batch item, got "
                        f"{type(spacing).__name__}")
    if items and all(isinstance(s, numbers.Real) for s in items):
        return [normalize_spacing(items, nd)] * batch
    if len(items) != batch:
        raise ValueError(f"spacing with one entry per batch item needs {batch} entries (the batch size), got "
                         f"{len(items)}: {spacing}")
    return [normalize_spacing(s, nd) for s in items]


def _spacing_groups(per_item: list[Optional[list[float]]]) -> dict[Optional[tuple[float, ...]], list[int]]:
    """Batch items by spacing."""
    groups: dict[Optional[tuple[float, ...]], list[int]] = {}
    for b, sp in enumerate(per_item):
        groups.setdefault(None if sp is None else tuple(sp), []).append(b)
    return groups


def _edge_distances(ep: Tensor, eg: Tensor, spacing: Spacing, distance_metric: str) -> tuple[Tensor, Tensor]:
    """On the edge maps ep and eg, the distance of every voxel to the other map's edges (+inf where it has none).

    Batch items that share a spacing go through one distance-transform call."""
    nd = ep.dim() - 2
    if distance_metric != "euclidean":  # voxel units: spacing does not apply (MONAI)
        d = chamfer_distance_transform(torch.stack([~eg, ~ep]), distance_metric, spatial_dims=nd)
        return d[0], d[1]
    per_item = _spacing_per_item(spacing, ep.shape[0], nd)
    groups = _spacing_groups(per_item)
    if len(groups) <= 1:
        d = distance_transform(torch.stack([~eg, ~ep]), per_item[0] if per_item else None, spatial_dims=nd)
    else:
        d = torch.empty((2,) + tuple(ep.shape), dtype=torch.float32, device=ep.device)
        for sp, items in groups.items():
            i = torch.tensor(items, device=ep.device)
            d[:, i] = distance_transform(torch.stack([~eg[i], ~ep[i]]), None if sp is None else list(sp),
                                         spatial_dims=nd)
    return d[0], d[1]


def _surface_distances(p: Tensor, g: Tensor, spacing: Spacing,
                       distance_metric: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Edges of p and g and, on them, the distance to the other mask's edges (+inf where it has none)."""
    ep, eg = _edges(p), _edges(g)
    return (ep, eg) + _edge_distances(ep, eg, spacing, distance_metric)


def _neighbour_codes(m: Tensor) -> Tensor:
    """Marching-squares/cubes codes of ``m`` ``(B, C, *spatial)`` bool padded by one outside voxel per side:
    int64 ``(B, C, *(spatial + 1))``, the cube at ``x`` made of the voxels ``x + offset`` for offsets in {0, 1}^nd,
    the k-th offset in C order setting bit ``2^(2^nd - 1 - k)`` when inside (MONAI's ``ENCODING_KERNEL``)."""
    nd = m.dim() - 2
    padded = F.pad(m.to(torch.int64), (1, 1) * nd)
    grid = tuple(s + 1 for s in m.shape[2:])
    code = torch.zeros(tuple(m.shape[:2]) + grid, dtype=torch.int64, device=m.device)
    offsets = list(itertools.product((0, 1), repeat=nd))
    for k, off in enumerate(offsets):
        window = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, grid))
        code += padded[window] << (len(offsets) - 1 - k)
    return code


def _contour_length_table(spacing: Sequence[float]) -> Tensor:
    """float64 ``(16,)``: the length of the marching-squares contour in a 2x2 cell of each code (spacing per
    axis): half a cell diagonal for one or three inside corners, a cell side for two adjacent ones (across the
    axis they differ on), two half diagonals for two opposite ones (as MONAI / DeepMind's surface-distance)."""
    first, second = spacing
    diag = 0.5 * math.hypot(first, second)
    corners = list(itertools.product((0, 1), repeat=2))
    table = []
    for code in range(16):
        inside = [c for k, c in enumerate(corners) if code >> (3 - k) & 1]
        if len(inside) in (1, 3):
            table.append(diag)
        elif len(inside) == 2:
            (a, b), (c, d) = inside
            table.append(second if a == c else first if b == d else 2 * diag)
        else:
            table.append(0.0)
    return torch.tensor(table, dtype=torch.float64)


def _surface_area_table(spacing: Sequence[float]) -> Tensor:
    """float64 ``(256,)``: the marching-cubes surface area in a 2x2x2 cube of each code.  The table of triangle
    normals is DeepMind's surface-distance table as MONAI ships it: taken from MONAI (a 256-entry literal not
    repeated here), so 3D subvoxel surface Dice needs MONAI installed."""
    try:
        from monai.metrics.utils import create_table_neighbour_code_to_surface_area
    except ImportError as exc:
        raise ImportError("use_subvoxels=True on 3D images needs MONAI's marching-cubes surface-area table "
                          "(pip install monai); 2D images do not") from exc
    table, _ = create_table_neighbour_code_to_surface_area(list(spacing))
    return table.to(torch.float64)


def _subvoxel_surface_dice(p: Tensor, g: Tensor, tol: Tensor, spacing: Spacing, distance_metric: str) -> Tensor:
    """MONAI's subvoxel normalized surface Dice: edges are the boundary cubes of the (padded) masks, each weighted
    by the area (3D) or length (2D) of the surface inside it for the item's spacing; distances between cube
    centres as without subvoxels."""
    nd = p.dim() - 2
    cp, cg = _neighbour_codes(p), _neighbour_codes(g)
    full = 2 ** (2 ** nd) - 1
    ep, eg = (cp != 0) & (cp != full), (cg != 0) & (cg != full)
    d_to_g, d_to_p = _edge_distances(ep, eg, spacing, distance_metric)
    area_p = torch.empty(cp.shape, dtype=torch.float64, device=p.device)
    area_g = torch.empty_like(area_p)
    for sp, items in _spacing_groups(_spacing_per_item(spacing, p.shape[0], nd)).items():
        sp = [1.0] * nd if sp is None else list(sp)
        table = (_contour_length_table(sp) if nd == 2 else _surface_area_table(sp)).to(p.device)
        i = torch.tensor(items, device=p.device)
        area_p[i], area_g[i] = table[cp[i]], table[cg[i]]
    t = tol.reshape((1, -1) + (1,) * nd)
    correct = (area_p * ((d_to_g <= t) & ep)).flatten(2).sum(-1) + (area_g * ((d_to_p <= t) & eg)).flatten(2).sum(-1)
    total = (area_p * ep).flatten(2).sum(-1) + (area_g * eg).flatten(2).sum(-1)
    return torch.where(total > 0, correct / torch.where(total > 0, total, 1.0),
                       torch.full(total.shape, float("nan"), dtype=torch.float64, device=p.device)).float()


def _reduce(values: Tensor, where: Tensor, percentile: Optional[float]) -> Tensor:
    """max (or percentile) of ``values`` over ``where`` per (b, c); NaN where ``where`` is empty."""
    flat = torch.where(where, values, torch.full_like(values, float("nan"))).flatten(2)
    if not percentile:  # None or 0: the maximum, as MONAI
        return torch.where(where.flatten(2).any(-1), flat.nan_to_num(nan=-1.0).amax(-1),
                           torch.full(flat.shape[:2], float("nan"), device=flat.device))
    return torch.nanquantile(flat, percentile / 100.0, dim=-1)


def _warn_empty(p: Tensor, g: Tensor, include_background: bool, ignore_index: Optional[int]) -> None:
    """MONAI's warnings for each (b, c) whose ground truth or prediction is empty (classes counted from 1 without
    the background, even for a single kept channel, as MONAI; none for the class ``ignore_index``).  Reads two
    (B, C') bool tensors back to the host; nothing on meta tensors."""
    if p.device.type == "meta":
        return
    first = 0 if include_background else 1
    empty_g, empty_p = (~g.flatten(2).any(-1)).tolist(), (~p.flatten(2).any(-1)).tolist()
    for row_g, row_p in zip(empty_g, empty_p):
        for c, (eg, ep) in enumerate(zip(row_g, row_p)):
            if c + first == ignore_index:
                continue
            if eg:
                warnings.warn(f"the ground truth of class {c + first} is all 0, this may result in nan/inf distance.",
                              stacklevel=3)
            if ep:
                warnings.warn(f"the prediction of class {c + first} is all 0, this may result in nan/inf distance.",
                              stacklevel=3)


def hausdorff_distance(y_pred: Tensor, y: Tensor, include_background: bool = False,
                       percentile: Optional[float] = None, directed: bool = False,
                       spacing: Spacing = None, *, distance_metric: str = "euclidean",
                       ignore_index: Optional[int] = None) -> Tensor:
    """Hausdorff distance between the edges of ``y_pred`` and ``y`` per ``(b, c)``: ``(B, C')`` float32.

    ``percentile`` (e.g. 95 for HD95) takes that percentile of each directed set of surface distances instead of
    the maximum (linear interpolation, as ``torch.quantile``); ``directed`` keeps the y_pred -> y direction only.
    Both masks empty gives NaN; exactly one empty gives +inf for the maximum and NaN with a percentile (MONAI
    ``compute_hausdorff_distance`` takes ``torch.quantile`` of infinite distances there, which is NaN).

    ``distance_metric``: "euclidean" (with ``spacing``), "chessboard" or "taxicab" (in voxels; ``spacing`` does not
    apply).  ``ignore_index``, as in MONAI's function: the class whose index (counted with the background) equals
    it gets NaN; no voxel is masked (:class:`fastmed.metrics.HausdorffDistanceMetric` masks them, as MONAI's class).
    An empty ground truth or prediction gives MONAI's warning for its class.
    """
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be None or in [0, 100], got {percentile}")
    check_choice(distance_metric, "distance_metric", DISTANCE_METRICS)
    if ignore_index is not None:
        check_int(ignore_index, "ignore_index")
    p, g = _pair(y_pred, y, include_background)
    ep, eg, d_to_g, d_to_p = _surface_distances(p, g, spacing, distance_metric)
    _warn_empty(p, g, include_background, ignore_index)  # after the checks, as MONAI
    hd = _reduce(d_to_g, ep, percentile)
    if not directed:
        hd = torch.maximum(hd, _reduce(d_to_p, eg, percentile))
    has_p, has_g = ep.flatten(2).any(-1), eg.flatten(2).any(-1)
    inf = torch.full_like(hd, float("nan" if percentile else "inf"))
    nan = torch.full_like(hd, float("nan"))
    hd = torch.where(has_p & has_g, hd, torch.where(has_p | has_g, inf, nan))
    first = 0 if include_background else 1  # MONAI counts from 1 even when a single channel is kept
    if ignore_index is not None and 0 <= ignore_index - first < hd.shape[1]:
        hd[:, ignore_index - first] = float("nan")
    return hd


def surface_dice(y_pred: Tensor, y: Tensor, tolerance: Union[float, Sequence[float]],
                 include_background: bool = False, spacing: Spacing = None, *, distance_metric: str = "euclidean",
                 use_subvoxels: bool = False, ignore_index: Optional[int] = None) -> Tensor:
    """Normalized surface Dice per ``(b, c)``: ``(B, C')`` float32.

    The fraction of edge voxels of both masks lying within ``tolerance`` (one number, or one per class kept) of
    the other mask's edges.  Both masks empty gives NaN; exactly one empty gives 0 (MONAI
    ``compute_surface_dice`` with ``class_thresholds``).  ``distance_metric`` as in :func:`hausdorff_distance`;
    ``ignore_index``: the voxels :func:`ignore_mask` excludes are removed from both masks first (MONAI).

    ``use_subvoxels`` (MONAI's): the edges are the boundary cells (2x2 / 2x2x2 voxels) of the masks, each counted
    with the length (2D) or area (3D) of the surface through it for the item's spacing, rather than edge voxels
    counted once; 3D needs MONAI installed for its surface-area table.  An empty ground truth or prediction
    gives MONAI's warning for its class.
    """
    check_choice(distance_metric, "distance_metric", DISTANCE_METRICS)
    p, g = _pair(y_pred, y, include_background, ignore_mask(y, ignore_index))
    # Checked on the host (tolerances are a few numbers), so no device value is read back.
    if isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool):
        tols = [check_number(tolerance, "tolerance", minimum=0.0)] * p.shape[1]
    else:
        tols = check_number_sequence(tolerance, "tolerance", minimum=0.0)
    if len(tols) == 1:
        tols = tols * p.shape[1]
    if len(tols) != p.shape[1]:
        raise ValueError(f"tolerance must be one number or one per class ({p.shape[1]}), got {len(tols)}")
    tol = torch.tensor(tols, dtype=torch.float32, device=p.device)
    _spacing_per_item(spacing, p.shape[0], p.dim() - 2)  # spacing errors come before the warnings, as in MONAI
    _warn_empty(p, g, include_background, ignore_index)
    if use_subvoxels:
        return _subvoxel_surface_dice(p, g, tol, spacing, distance_metric)
    ep, eg, d_to_g, d_to_p = _surface_distances(p, g, spacing, distance_metric)
    t = tol.reshape((1, -1) + (1,) * (p.dim() - 2))
    correct = ((d_to_g <= t) & ep).flatten(2).sum(-1) + ((d_to_p <= t) & eg).flatten(2).sum(-1)
    total = ep.flatten(2).sum(-1) + eg.flatten(2).sum(-1)
    return torch.where(total > 0, correct.float() / total.clamp_min(1).float(),
                       torch.full(total.shape, float("nan"), device=total.device))
