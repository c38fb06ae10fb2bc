"""``fastmed.ops.distance_transform`` and ``fastmed.ops.signed_distance``: exact Euclidean distance maps (and, with
``return_indices``, the feature transform) of whole batches in one call, on the device that holds the mask.

Backends, in order: ``cuda`` (csrc/distance_transform_cuda.cu, one thread per line, one launch per axis for the whole
batch), ``cpp`` (csrc/distance_transform_cpu.cpp, threads over blocks of lines), ``reference``
(fastmed/reference/distance_transform.py).  Distance maps carry no gradient (they are piecewise constant in the
mask): the public functions detach their input, so a result never requires grad, and the ops are plain
torch.library custom ops (``fastmed::distance_transform``, ``fastmed::feature_transform``,
``fastmed::signed_distance``) with fake implementations:
``torch.compile(fullgraph=True)`` keeps them as single opaque nodes.  The backend is chosen inside the op body, at
run time (``use_backend`` blocks and ``FASTMED_BACKEND`` apply to compiled code too).  Checks that need the mask's
values (a float mask must hold only 0 and 1, labels must lie in ``[0, num_classes)``) run there as well.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from fastmed import _backend, _ext
from fastmed._validate import device_assert
from fastmed.reference import distance_transform as ref

__all__ = ["distance_transform", "signed_distance"]

_backend.register_op("distance_transform", ("cuda", "cpp", "reference"),
                     doc="exact Euclidean distance transform (scipy distance_transform_edt) and signed maps")

_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)  # torch implements few ops on them (`!=` it does)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + _UNSIGNED_WIDE + (
    torch.float16, torch.bfloat16, torch.float32, torch.float64)
# signed_distance runs the one-hot maps through the backend at most this many voxels at a time (whole maps; one map
# when a map is larger), so its memory beyond the output stays bounded whatever the number of classes.
SIGNED_DISTANCE_GROUP_VOXELS = 1 << 24

Spacing = Union[None, float, Sequence[float]]


def _check_binary(x: Tensor, name: str) -> None:
    """A floating-point mask must hold only 0 and 1: ``ValueError`` at once for CPU tensors, a device-side assert
    (no host read-back) for the others."""
    if not x.is_floating_point():
        return
    bad = (x != 0) & (x != 1)
    hint = f"Threshold it first (e.g. {name} > 0.5)."
    if x.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{name} is a floating-point tensor, so it must hold only 0 and 1 (it is used as a "
                             f"binary mask); got a value {x[bad].flatten()[0].item()}. {hint}")
        return
    device_assert(~bad.any(), f"{name} is a floating-point tensor, so it must hold only 0 and 1. {hint}")


def _reference_transform(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool,
                         float64: bool) -> Tensor:
    return ref.distance_transform(mask, spacing, spatial_dims=spatial_dims, squared=squared,
                                  dtype=torch.float64 if float64 else torch.float32)


def _extension_transform(entry: str):
    def transform(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool,
                  float64: bool) -> Tensor:
        m = mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0
        return getattr(_ext.load(), entry)(m, spatial_dims, [] if spacing is None else list(spacing), squared,
                                           float64)

    return transform


_TRANSFORM = _backend.Implementations("distance_transform", "fastmed::distance_transform",
                                      cuda=_extension_transform("distance_transform_cuda"),
                                      cpp=_extension_transform("distance_transform_cpu"),
                                      reference=_reference_transform)


def _transform(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool, float64: bool,
               backend: str) -> Tensor:
    """Distance transform of a bool/integer/binary-float mask on the given backend."""
    return _TRANSFORM[backend](mask, spacing, spatial_dims, squared, float64)


@torch.library.custom_op("fastmed::distance_transform", mutates_args=())
def _distance_transform_op(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool,
                           float64: bool) -> Tensor:
    _check_binary(mask, "mask")
    backend = _backend.choose("distance_transform", mask.device)
    return _transform(mask, spacing, spatial_dims, squared, float64, backend)


@_distance_transform_op.register_fake
def _(mask, spacing, spatial_dims, squared, float64):
    return mask.new_empty(mask.shape, dtype=torch.float64 if float64 else torch.float32)


def _reference_features(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool,
                        float64: bool) -> tuple[Tensor, Tensor]:
    return ref.distance_transform(mask, spacing, spatial_dims=spatial_dims, squared=squared,
                                  dtype=torch.float64 if float64 else torch.float32, return_indices=True)


_FEATURES = _backend.Implementations("distance_transform", "fastmed::feature_transform",
                                     cuda=_extension_transform("feature_transform_cuda"),
                                     cpp=_extension_transform("feature_transform_cpu"),
                                     reference=_reference_features)


def _coordinates(flat: Tensor, sizes: Sequence[int]) -> Tensor:
    """``(len(sizes), *flat.shape)`` int64 coordinates of flat (C-order) indices within maps of ``sizes``; -1
    where ``flat`` is -1."""
    out = torch.stack(torch.unravel_index(flat, tuple(sizes)))
    return out.masked_fill_((flat < 0).unsqueeze(0), -1)


@torch.library.custom_op("fastmed::feature_transform", mutates_args=())
def _feature_transform_op(mask: Tensor, spacing: Optional[list[float]], spatial_dims: int, squared: bool,
                          float64: bool) -> tuple[Tensor, Tensor]:
    _check_binary(mask, "mask")
    backend = _backend.choose("distance_transform", mask.device)
    d, flat = _FEATURES[backend](mask, spacing, spatial_dims, squared, float64)
    return d, _coordinates(flat, mask.shape[mask.dim() - spatial_dims:])


@_feature_transform_op.register_fake
def _(mask, spacing, spatial_dims, squared, float64):
    return (mask.new_empty(mask.shape, dtype=torch.float64 if float64 else torch.float32),
            mask.new_empty((spatial_dims,) + tuple(mask.shape), dtype=torch.int64))


def _reference_signed(onehot: Tensor, spacing: Optional[list[float]], float64: bool) -> Tensor:
    return ref.signed_distance(onehot, spacing, dtype=torch.float64 if float64 else torch.float32)


def _extension_signed(backend: str):
    def signed(onehot: Tensor, spacing: Optional[list[float]], float64: bool) -> Tensor:
        spatial_dims = onehot.dim() - 2
        d = _TRANSFORM[backend](torch.stack([~onehot, onehot]), spacing, spatial_dims, False, float64)
        phi = torch.where(onehot, 1 - d[1], d[0])
        flat = onehot.flatten(2)
        has_boundary = (flat.any(-1) & ~flat.all(-1)).reshape(flat.shape[:2] + (1,) * spatial_dims)
        return torch.where(has_boundary, phi, torch.zeros((), dtype=phi.dtype, device=phi.device))

    return signed


_SIGNED = _backend.Implementations("distance_transform", "fastmed::signed_distance", cuda=_extension_signed("cuda"),
                                   cpp=_extension_signed("cpp"), reference=_reference_signed)


def _signed(onehot: Tensor, spacing: Optional[list[float]], float64: bool, backend: str) -> Tensor:
    """Kervadec maps of a bool (N, K, *spatial) one-hot tensor (see ref.signed_distance)."""
    return _SIGNED[backend](onehot, spacing, float64)


def _map_groups(batch: int, classes: int, map_voxels: int) -> list[tuple[slice, slice]]:
    """(items, classes) blocks covering a (batch, classes) stack of maps of ``map_voxels`` voxels, each of at most
    SIGNED_DISTANCE_GROUP_VOXELS voxels (or one map): whole items when they fit, else classes of one item."""
    maps = max(1, SIGNED_DISTANCE_GROUP_VOXELS // max(map_voxels, 1))
    if maps >= classes:
        items = maps // classes
        return [(slice(n, n + items), slice(0, classes)) for n in range(0, batch, items)]
    return [(slice(n, n + 1), slice(c, c + maps)) for n in range(batch) for c in range(0, classes, maps)]


@torch.library.custom_op("fastmed::signed_distance", mutates_args=())
def _signed_distance_op(target: Tensor, labels: bool, num_classes: int, first_class: int,
                        spacing: Optional[list[float]], float64: bool) -> Tensor:
    backend = _backend.choose("distance_transform", target.device)
    if labels:
        expect = f"target holds integer labels, which must lie in [0, num_classes={num_classes})"
        if target.dtype in _UNSIGNED_WIDE:  # no min/max/comparisons on them in torch; their labels fit in int64
            wrapped = (target.view(torch.int64) < 0).any() if target.dtype == torch.uint64 else None
            target = target.to(torch.int64)
            if wrapped is not None and target.device.type == "cpu" and bool(wrapped):
                raise ValueError(f"{expect}; got values of 2^63 and above")
        if target.device.type == "cpu":
            if target.numel():
                lo, hi = int(target.min()), int(target.max())
                if lo < 0 or hi >= num_classes:
                    raise ValueError(f"{expect}; got values from {lo} to {hi}")
        elif target.numel():  # no read-back off the CPU: a device-side assert
            device_assert(((target >= 0) & (target < num_classes)).all(), expect)
    else:
        _check_binary(target, "target")
    classes = num_classes - first_class
    out = torch.empty((target.shape[0], classes) + tuple(target.shape[2:]),
                      dtype=torch.float64 if float64 else torch.float32, device=target.device)
    class_ids = torch.arange(first_class, num_classes, device=target.device).reshape((-1,) + (1,) * (target.dim() - 2))
    for items, cls in _map_groups(target.shape[0], classes, math.prod(target.shape[2:])):
        if labels:
            onehot = target[items] == class_ids[cls]
        else:
            onehot = target[items, first_class + cls.start:first_class + cls.stop] != 0
        out[items, cls] = _signed(onehot, spacing, float64, backend)
    return out


@_signed_distance_op.register_fake
def _(target, labels, num_classes, first_class, spacing, float64):
    shape = (target.shape[0], num_classes - first_class) + tuple(target.shape[2:])
    return target.new_empty(shape, dtype=torch.float64 if float64 else torch.float32)


def normalize_spacing(spacing: Spacing, spatial_dims: int) -> Optional[list[float]]:
    """``spacing`` (None, one number, or ``spatial_dims`` numbers) as None or a list of ``spatial_dims`` floats;
    ValueError/TypeError naming ``spacing`` otherwise."""
    if spacing is None:
        return None
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        values = [float(spacing)] * spatial_dims
    elif isinstance(spacing, (Sequence, Tensor)) and not isinstance(spacing, str):
        values = [float(s) for s in spacing]
        if len(values) != spatial_dims:
            raise ValueError(f"spacing must be one number or {spatial_dims} numbers (one per spatial dim), "
                             f"got {len(values)}: {list(spacing)}")
    else:
        raise TypeError(f"spacing must be None, a number or a sequence of {spatial_dims} numbers, "
                        f"got {type(spacing).__name__}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing entries must be finite and positive, got {values}")
    return values


def _check_dtype(dtype) -> bool:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype == torch.float64


def distance_transform(mask: Tensor, spacing: Spacing = None, *, squared: bool = False,
                       spatial_dims: Optional[int] = None, dtype: torch.dtype = torch.float32,
                       return_indices: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact Euclidean distance transform: ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)`` for
    every map of a batch, in one call.

    Args:
        mask: ``(*batch, *spatial)``; bool, integer (signed, uint8 or uint16/32/64), or floating point holding only
            0 and 1.  Nonzero voxels are foreground.  The last ``spatial_dims`` dims form each map; all leading dims
            are a batch of independent maps (e.g. ``(N, C, D, H, W)`` with ``spatial_dims=3``).  A 0-d mask is a
            one-voxel 1D map, as in scipy (which makes it 1-d with ``atleast_1d``): the results have shape ``(1,)``.
        spacing: voxel size, one positive number per spatial dim (first spatial dim first, like scipy's
            ``sampling``), a single number for all, or None (unit spacing).
        squared: return squared distances (exact integers for unit spacing).
        spatial_dims: 1, 2 or 3.  None means ``min(mask.dim(), 3)``: a 2D mask is one 2D map, a 3D or higher mask
            is a batch of 3D maps.  Pass ``spatial_dims=2`` for batches of 2D maps such as ``(N, C, H, W)``.
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        return_indices: also return the feature transform (scipy's ``return_indices=True``).

    Returns:
        ``dtype`` tensor shaped like ``mask``: 0 at zero voxels, the distance to the nearest zero voxel of the
        same map elsewhere.  A map with no zero voxel has no finite distance and is ``+inf`` everywhere (scipy
        measures to a virtual zero outside the array there).  For unit spacing the squared distances are exact
        integers and the distances are their square roots (within one float64 ulp of scipy's on the reference
        backend, whose vectorized sqrt need not be correctly rounded; the C++ and CUDA backends round correctly);
        with spacing the envelope arithmetic is float64.  The result never requires grad: a mask that requires
        grad is detached (a distance map is piecewise constant in the mask and has no gradient).

        With ``return_indices``, ``(distances, indices)``: ``indices`` is int64 of shape
        ``(spatial_dims, *mask.shape)``, the coordinates within its map of each voxel's nearest zero voxel (a zero
        voxel's own coordinates; -1 throughout a map with no zero voxel, where scipy's are meaningless).  For one
        map (``spatial_dims == mask.dim()``) this is scipy's layout: ``mask[tuple(indices)] == 0``.  Where several
        zero voxels are nearest, the one whose coordinates are smallest in lexicographic order (first spatial dim
        first) is returned, on every backend; scipy may return another of them.  The rule is exact for unit
        spacing (integer arithmetic); with spacing, ties are decided on the float64 distances, so zero voxels whose
        distances differ only by rounding may be taken either way.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    mask = mask.detach()
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"mask must be a bool, integer or floating-point tensor, got dtype {mask.dtype}")
    if mask.dim() == 0:  # scipy: np.atleast_1d
        mask = mask.reshape(1)
    if spatial_dims is None:
        spatial_dims = min(mask.dim(), 3)
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or not 1 <= spatial_dims <= 3:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if mask.dim() < spatial_dims:
        raise ValueError(f"mask must have at least spatial_dims={spatial_dims} dimensions, got shape "
                         f"{tuple(mask.shape)}")
    sp = normalize_spacing(spacing, spatial_dims)
    float64 = _check_dtype(dtype)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    if mask.numel() == 0:
        d = mask.new_empty(mask.shape, dtype=dtype)
        return (d, mask.new_empty((spatial_dims,) + tuple(mask.shape), dtype=torch.int64)) if return_indices else d
    if return_indices:
        return torch.ops.fastmed.feature_transform(mask, sp, spatial_dims, bool(squared), float64)
    return torch.ops.fastmed.distance_transform(mask, sp, spatial_dims, bool(squared), float64)


def signed_distance(target: Tensor, num_classes: Optional[int] = None, spacing: Spacing = None,
                    include_background: bool = False, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kervadec's boundary-loss map per class: ``phi = edt(~m) * ~m - (edt(m) - 1) * m``.

    Positive outside the class (the distance to it), 0 on its inner boundary, negative deeper inside.  A class
    absent from a map gets all zeros, and so does a class covering the whole map (it has no boundary; MONAI's
    ``BoundaryLoss`` does the same).

    Memory: besides the output, the maps go through the backend in groups of whole maps of at most
    ``SIGNED_DISTANCE_GROUP_VOXELS`` voxels (one map when a map is larger), so 105 classes of a 512x512x300 volume
    need the 33 GB float32 output and about one map's worth of work buffers, not a one-hot and float maps of
    every class at once.  The groups do not change any value.

    Args:
        target: ``(N, 1, *spatial)`` integer class labels (any integer dtype; ``num_classes`` required; an integer
            target must have the channel dim of size 1), or a ``(N, C, *spatial)`` one-hot tensor (bool, or
            floating point holding 0 and 1).  1 to 3 spatial dims.  Empty batches and empty spatial dims give an
            empty result.  A target that requires grad is detached (the maps carry no gradient).
        num_classes: number of classes; for a one-hot target it must equal C when given.
        spacing: voxel size per spatial dim, one number for all, or None.
        include_background: keep class 0 (else the result starts at class 1).
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        ``(N, K, *spatial)`` maps, K = num_classes (or num_classes - 1 without the background).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _MASK_DTYPES:
        raise TypeError(f"target must hold integer labels or a bool/float one-hot encoding, got dtype {target.dtype}")
    if not 3 <= target.dim() <= 5:
        raise ValueError(f"target must be (N, 1, *spatial) labels or (N, C, *spatial) one-hot with 1 to 3 spatial "
                         f"dims, got shape {tuple(target.shape)}")
    target = target.detach()
    labels = not target.is_floating_point() and target.dtype != torch.bool
    if labels and target.shape[1] != 1:
        raise ValueError(f"target holds integer class labels, which must be shaped (N, 1, *spatial); got shape "
                         f"{tuple(target.shape)}. Add the channel dim (target.unsqueeze(1)) to (N, *spatial) labels, "
                         "or pass a one-hot target as bool or float.")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if labels:
        if num_classes is None:
            raise ValueError("num_classes is required when target holds integer labels of shape (N, 1, *spatial)")
    elif num_classes is None:
        num_classes = target.shape[1]
    elif num_classes != target.shape[1]:
        raise ValueError(f"num_classes={num_classes} does not match the {target.shape[1]} channels of the one-hot "
                         f"target of shape {tuple(target.shape)}")
    first = 0 if include_background else 1
    if num_classes - first < 1:
        raise ValueError(f"no class left: num_classes={num_classes} with include_background=False")
    sp = normalize_spacing(spacing, target.dim() - 2)
    float64 = _check_dtype(dtype)
    if target.numel() == 0:
        return target.new_zeros((target.shape[0], num_classes - first) + tuple(target.shape[2:]), dtype=dtype)
    return torch.ops.fastmed.signed_distance(target, labels, int(num_classes), first, sp, float64)
