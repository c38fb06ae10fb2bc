"""MONAI-style metric classes: ``DiceMetric``, ``HausdorffDistanceMetric``, ``SurfaceDiceMetric``.

Same constructors (arguments, positional order, defaults), calls and ``aggregate()`` as MONAI 1.6's classes, for
code that uses the classes rather than the functions: each call computes the ``(B, C')`` values of a batch with
:mod:`fastmed.metrics.segmentation` (all ``(b, c)`` pairs at once, on the inputs' device), returns them and appends
them to a buffer; ``aggregate(reduction)`` reduces the buffer over its not-NaN values (:func:`metric_reduction`,
MONAI's ``do_metric_reduction``); ``reset()`` empties it.  A call takes a batch-first tensor or a list of
channel-first tensors (a decollated batch), as MONAI's.

Under ``torch.distributed`` (an initialized process group of more than one rank), ``get_buffer`` and so
``aggregate`` gather the buffers of all ranks first, rank order, as MONAI's do: every rank gets the global result.

Not supported: ``DiceMetric(per_component=True)`` (raises NotImplementedError).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from fastmed._validate import check_choice
from fastmed.metrics.segmentation import DISTANCE_METRICS, Spacing, dice, hausdorff_distance, ignore_mask, surface_dice

__all__ = ["METRIC_REDUCTIONS", "CumulativeMetric", "DiceMetric", "HausdorffDistanceMetric", "SurfaceDiceMetric",
           "all_gather_rows", "metric_reduction"]

METRIC_REDUCTIONS = ("none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel")


def _reduction_name(reduction) -> str:
    """A reduction name; MONAI's ``MetricReduction`` members (a str enum) give their value."""
    return check_choice(getattr(reduction, "value", reduction), "reduction", METRIC_REDUCTIONS)


def metric_reduction(f: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """MONAI's ``do_metric_reduction`` of ``(B, C)`` values over their not-NaN entries: ``(result, not_nans)``.

    "none": ``(f, not_nans)`` as float; "sum"/"sum_batch"/"sum_channel": sums over both dims / the batch / the
    channels (NaN counted as 0); "mean_batch"/"mean_channel": means over the not-NaN entries (0 where there are
    none); "mean": the mean over channels per item, then over the items that have one.  ``not_nans`` counts what
    went into each result (for "mean", the items).  ``f`` is not modified.
    """
    reduction = _reduction_name(reduction)
    nans = torch.isnan(f)
    not_nans = ~nans
    if reduction == "none":
        return f, not_nans.float()
    f = f.masked_fill(nans, 0)
    zero = torch.zeros(1, device=f.device, dtype=torch.float)
    if reduction == "mean":
        per_item = not_nans.sum(dim=1).float()
        f = torch.where(per_item > 0, f.sum(dim=1).float() / per_item, zero)
        items = (per_item > 0).sum(dim=0).float()
        return torch.where(items > 0, f.sum(dim=0).float() / items, zero), items
    if reduction == "sum":
        return f.sum(dim=[0, 1]), not_nans.sum(dim=[0, 1]).float()
    dim = 0 if reduction.endswith("_batch") else 1
    count = not_nans.sum(dim=dim).float()
    total = f.sum(dim=dim).float()
    if reduction.startswith("sum"):
        return total, count
    return torch.where(count > 0, total / count, zero), count


def all_gather_rows(data: Tensor) -> Tensor:
    """``data`` ``(n_rank, *rest)`` of every rank concatenated in rank order (MONAI's
    ``evenly_divisible_all_gather``: rows padded to the longest rank for the collective, then trimmed); ``data``
    itself outside an initialized process group of more than one rank.  Every rank must call it, with the same
    ``rest`` shape and dtype.  With the NCCL backend the collective runs on the current CUDA device."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return data
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = data.to(device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(n.item()) for n in lengths]
    longest = max(counts)
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0],) + tuple(local.shape[1:]))])
    gathered = [torch.empty_like(local) for _ in counts]
    dist.all_gather(gathered, local)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]).to(data.device)


class CumulativeMetric:
    """Buffer and reduction shared by the metric classes: subclasses implement ``_compute(y_pred, y, **kwargs)``
    -> ``(B, C')`` values of one batch-first batch.

    Args:
        reduction: the default of :meth:`aggregate` (one of :data:`METRIC_REDUCTIONS`, or MONAI's
            ``MetricReduction``).
        get_not_nans: :meth:`aggregate` returns ``(result, not_nans)``.
    """

    def __init__(self, reduction="mean", get_not_nans: bool = False):
        self.reduction = _reduction_name(reduction)
        self.get_not_nans = get_not_nans
        self._buffer: list[Tensor] = []

    def _compute(self, y_pred: Tensor, y: Tensor, **kwargs) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _compute")

    def __call__(self, y_pred: Union[Tensor, Sequence[Tensor]], y: Union[Tensor, Sequence[Tensor], None] = None,
                 **kwargs) -> Tensor:
        """Values of a batch, ``(B, C')``, also appended to the buffer.  ``y_pred``, ``y``: batch-first tensors,
        or lists of channel-first tensors (each computed as a batch of one).  ``kwargs`` go to the metric (e.g.
        ``spacing``)."""
        if isinstance(y_pred, (list, tuple)) or isinstance(y, (list, tuple)):
            if not isinstance(y_pred, (list, tuple)) or not isinstance(y, (list, tuple)) or len(y_pred) != len(y):
                raise ValueError("y_pred and y must both be batch-first tensors or both lists of channel-first "
                                 f"tensors of one length, got {type(y_pred).__name__} and {type(y).__name__}")
            ret = torch.cat([self._compute(p.detach().unsqueeze(0), t.detach().unsqueeze(0), **kwargs)
                             for p, t in zip(y_pred, y)])
        elif isinstance(y_pred, Tensor) and isinstance(y, Tensor):
            ret = self._compute(y_pred.detach(), y.detach(), **kwargs)
        else:
            raise TypeError(f"y_pred and y must be batch-first tensors or lists of channel-first tensors, got "
                            f"{type(y_pred).__name__} and {type(y).__name__}")
        self._buffer.extend(ret.unbind(0))
        return ret

    def reset(self) -> None:
        """Empty the buffer."""
        self._buffer = []

    def __len__(self) -> int:
        return len(self._buffer)

    def get_buffer(self) -> Optional[Tensor]:
        """Every value since the last reset, ``(total B, C')`` (a copy), or None when empty; under
        ``torch.distributed``, those of every rank (:func:`all_gather_rows`)."""
        return all_gather_rows(torch.stack(self._buffer)) if self._buffer else None

    def aggregate(self, reduction=None):
        """:func:`metric_reduction` of the buffer (``reduction`` defaults to the constructor's); with
        ``get_not_nans``, ``(result, not_nans)``."""
        data = self.get_buffer()
        if data is None:
            raise ValueError(f"{type(self).__name__}.aggregate: nothing to aggregate (no batch since the last "
                             "reset)")
        f, not_nans = metric_reduction(data, self.reduction if reduction is None else reduction)
        return (f, not_nans) if self.get_not_nans else f


def _check_supported(value: bool, name: str) -> None:
    if value:
        raise NotImplementedError(f"{name}=True is not supported by fastmed (MONAI's option); got {name}=True")


class DiceMetric(CumulativeMetric):
    """MONAI's ``DiceMetric``: per call :func:`fastmed.metrics.dice` of the batch.

    Args:
        include_background, reduction, get_not_nans, ignore_empty, num_classes, return_with_label, ignore_index:
            as MONAI's.  ``return_with_label`` (with reduction "mean_batch"): :meth:`aggregate` returns a dict
            ``{"label_i": value rounded to 4 places}`` (or the given names) when its result has one value per
            class.
        per_component: not supported (True raises NotImplementedError).
    """

    def __init__(self, include_background: bool = True, reduction="mean", get_not_nans: bool = False,
                 ignore_empty: bool = True, num_classes: Optional[int] = None,
                 return_with_label: Union[bool, list[str]] = False, per_component: bool = False,
                 ignore_index: Optional[int] = None):
        super().__init__(reduction, get_not_nans)
        _check_supported(per_component, "per_component")
        self.include_background = include_background
        self.ignore_empty = ignore_empty
        self.num_classes = num_classes
        self.return_with_label = return_with_label
        self.per_component = per_component
        self.ignore_index = ignore_index

    def _compute(self, y_pred: Tensor, y: Tensor, **kwargs) -> Tensor:
        return dice(y_pred, y, self.include_background, self.ignore_empty, num_classes=self.num_classes,
                    ignore_index=self.ignore_index)

    def aggregate(self, reduction=None):
        out = super().aggregate(reduction)
        f = out[0] if self.get_not_nans else out
        # MONAI labels whenever the constructor's reduction is "mean_batch" (and fails where the result is not
        # one value per class): here the per-class results of an aggregate(reduction) are labelled, others not.
        if self.reduction != "mean_batch" or not self.return_with_label or f.dim() != 1:
            return out
        if isinstance(self.return_with_label, bool):
            first = 0 if self.include_background else 1
            keys = [f"label_{i + first}" for i in range(len(f))]
        else:
            keys = list(self.return_with_label)
        labelled = {k: round(v.item(), 4) for k, v in zip(keys, f)}
        return (labelled, out[1]) if self.get_not_nans else labelled


class HausdorffDistanceMetric(CumulativeMetric):
    """MONAI's ``HausdorffDistanceMetric``: per call :func:`fastmed.metrics.hausdorff_distance` of the batch, with
    the voxels ``ignore_index`` excludes (:func:`fastmed.metrics.ignore_mask`) removed from both masks first.
    Call with ``spacing=`` as MONAI's (one number, one per spatial dim, or one entry per batch item)."""

    def __init__(self, include_background: bool = False, distance_metric: str = "euclidean",
                 percentile: Optional[float] = None, directed: bool = False, reduction="mean",
                 get_not_nans: bool = False, ignore_index: Optional[int] = None):
        super().__init__(reduction, get_not_nans)
        self.include_background = include_background
        self.distance_metric = check_choice(distance_metric, "distance_metric", DISTANCE_METRICS)
        self.percentile = percentile
        self.directed = directed
        self.ignore_index = ignore_index

    def _compute(self, y_pred: Tensor, y: Tensor, spacing: Spacing = None) -> Tensor:
        mask = ignore_mask(y, self.ignore_index)
        if mask is not None:
            y_pred, y = (y_pred != 0) & mask, (y != 0) & mask
        return hausdorff_distance(y_pred, y, self.include_background, self.percentile, self.directed, spacing,
                                  distance_metric=self.distance_metric, ignore_index=self.ignore_index)


class SurfaceDiceMetric(CumulativeMetric):
    """MONAI's ``SurfaceDiceMetric``: per call :func:`fastmed.metrics.surface_dice` of the batch with tolerances
    ``class_thresholds`` (one per class kept).  Call with ``spacing=`` as MONAI's."""

    def __init__(self, class_thresholds: Sequence[float], include_background: bool = False,
                 distance_metric: str = "euclidean", reduction="mean", get_not_nans: bool = False,
                 use_subvoxels: bool = False, ignore_index: Optional[int] = None):
        super().__init__(reduction, get_not_nans)
        self.class_thresholds = class_thresholds
        self.include_background = include_background
        self.distance_metric = check_choice(distance_metric, "distance_metric", DISTANCE_METRICS)
        self.use_subvoxels = use_subvoxels
        self.ignore_index = ignore_index

    def _compute(self, y_pred: Tensor, y: Tensor, spacing: Spacing = None) -> Tensor:
        return surface_dice(y_pred, y, list(self.class_thresholds), self.include_background, spacing,
                            distance_metric=self.distance_metric, use_subvoxels=self.use_subvoxels,
                            ignore_index=self.ignore_index)
