"""Plain PyTorch reference for the exact Euclidean distance transform and the Kervadec signed distance map.

``distance_transform(mask)`` follows ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)``: every
nonzero voxel gets the Euclidean distance to the nearest zero voxel, zeros get 0.  The last ``spatial_dims`` dims
of ``mask`` are the map; leading dims are a batch of independent maps.  A map with no zero voxel has no finite
distance and gets ``+inf`` everywhere (scipy measures to a virtual zero outside the array there, which depends on
the array's corner: not a useful convention).

Algorithm (separable and exact, vectorized over all lines of all maps at once):

* last axis: the distance to the nearest zero of each line, from running maxima/minima of the zero positions;
* each further axis: the min-plus convolution ``g(q) = min_p w (q - p)^2 + f(p)`` with ``w = spacing^2``,
  one vectorized step per position p (O(n) steps per axis, each over the whole volume).

With ``return_indices`` the passes also carry the flat index of each voxel's nearest zero (the feature transform,
scipy's ``return_indices``), keeping the smallest coordinate among exact minimizers at every pass: ties go to the
nearest zero that is smallest in lexicographic order, the rule the C++ and CUDA backends follow too.
:func:`chamfer_distance_transform` is ``scipy.ndimage.distance_transform_cdt`` for the chessboard and taxicab
metrics (used by the surface metrics' ``distance_metric``).

The squared distances are computed in float64, so for unit spacing they are exact integers.  The distances are
``torch.sqrt`` of them, which on some CPUs (AVX-512) is vectorized without correct rounding: they are within one
float64 ulp of scipy's, not always bit-equal (tests compare squared distances exactly, distances within 1 ulp).
This module is the test oracle and the fallback of
:func:`fastmed.ops.distance_transform` (the C++/CUDA envelope passes are linear per line; this one is not).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

CHAMFER_METRICS = ("chessboard", "taxicab")


def _map_positions(shape: Sequence[int], spatial_dims: int, device) -> Tensor:
    """int64 tensor broadcastable to ``shape``: each voxel's flat (C-order) index within its map."""
    spatial = tuple(shape[len(shape) - spatial_dims:])
    return torch.arange(math.prod(spatial), device=device).reshape(spatial)


def _line_pass(mask: Tensor, spacing: float, flat: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Squared distance along the last axis to the nearest zero of each line (float64, +inf when none), and with
    ``flat`` (each voxel's flat index within its map) that zero's flat index (-1 when none; the left zero on a
    tie, i.e. the smaller index)."""
    n = mask.shape[-1]
    pos = torch.arange(n, device=mask.device, dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=mask.device)
    zero_left = torch.where(mask, -inf, pos).cummax(dim=-1).values            # last zero at or before q
    zero_right = torch.where(mask, inf, pos).flip(-1).cummin(dim=-1).values.flip(-1)  # first zero at or after q
    left = pos - zero_left <= zero_right - pos
    d = torch.where(left, pos - zero_left, zero_right - pos) * spacing
    if flat is None:
        return d * d, None
    zero = torch.where(left, zero_left, zero_right)
    index = torch.where(torch.isfinite(zero), flat + (zero.nan_to_num(posinf=0, neginf=0) - pos).long(), -1)
    return d * d, index


def _envelope_pass(f: Tensor, dim: int, w: float, index: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """min over p of w (q - p)^2 + f[..., p, ...] along ``dim`` (float64), and with ``index`` (the nearest zero's
    flat index per voxel so far) the index carried from the minimizing p (the smallest p on a tie)."""
    n = f.shape[dim]
    f = f.movedim(dim, -1)
    q = torch.arange(n, device=f.device, dtype=torch.float64)
    g = torch.full_like(f, float("inf"))
    if index is None:
        for p in range(n):
            torch.minimum(g, f[..., p:p + 1] + w * (q - p) ** 2, out=g)
        return g.movedim(-1, dim), None
    index = index.movedim(dim, -1)
    out = torch.full_like(index, -1)
    for p in range(n):
        candidate = f[..., p:p + 1] + w * (q - p) ** 2
        better = candidate < g  # strict: an earlier (smaller) p keeps a tie
        g = torch.where(better, candidate, g)
        out = torch.where(better, index[..., p:p + 1], out)
    return g.movedim(-1, dim), out.movedim(-1, dim)


def distance_transform(mask: Tensor, spacing: Optional[Sequence[float]] = None, *, spatial_dims: int,
                       squared: bool = False, dtype: torch.dtype = torch.float32,
                       return_indices: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact Euclidean distance transform of the last ``spatial_dims`` dims of ``mask``.

    Args:
        mask: ``(*batch, *spatial)`` tensor, nonzero = foreground (bool or any dtype).
        spacing: voxel size per spatial dim (``spatial_dims`` positive numbers), or None for unit spacing.
        spatial_dims: 1, 2 or 3.
        squared: return squared distances.
        dtype: result dtype (float32 or float64).
        return_indices: also return the feature transform.

    Returns:
        ``dtype`` tensor shaped like ``mask``: 0 on zeros, the distance to the nearest zero elsewhere, ``+inf``
        throughout a map with no zero.  With ``return_indices``, also an int64 tensor shaped like ``mask``: the
        flat (C-order) index within its map of the nearest zero voxel (the voxel itself on zeros, -1 throughout
        a map with no zero).  Ties go to the nearest zero whose coordinates are smallest in lexicographic order
        (first spatial dim first): every pass keeps the smallest coordinate among exact minimizers (exact for
        unit spacing, whose squared distances are integers; with spacing a tie is decided on float64 values).
    """
    m = mask != 0
    sp = [1.0] * spatial_dims if spacing is None else [float(s) for s in spacing]
    flat = _map_positions(m.shape, spatial_dims, m.device) if return_indices else None
    d2, index = _line_pass(m, sp[-1], flat)
    for k in range(spatial_dims - 2, -1, -1):
        d2, index = _envelope_pass(d2, m.dim() - spatial_dims + k, sp[k] * sp[k], index)
    d = (d2 if squared else d2.sqrt()).to(dtype)
    return (d, index) if return_indices else d


def _chamfer_pass(f: Tensor, dim: int, metric: str) -> Tensor:
    """One axis of a separable chamfer transform (float32 holding integers, +inf = no zero yet): ``taxicab``
    g(q) = min_p |q - p| + f(p); ``chessboard`` g(q) = min_p max(|q - p|, f(p))."""
    f = f.movedim(dim, -1)
    n = f.shape[-1]
    if metric == "taxicab":  # min over p <= q of (q - p) + f(p) = q + cummin(f - p); the same from the right
        q = torch.arange(n, device=f.device, dtype=f.dtype)
        left = q + (f - q).cummin(-1).values
        right = ((f + q).flip(-1).cummin(-1).values.flip(-1)) - q
        return torch.minimum(left, right).movedim(-1, dim)
    g = f.clone()
    reachable = torch.isfinite(f).any(-1, keepdim=True)  # lines that have any finite value to spread
    for s in range(1, n):  # offsets s give values >= s: stop once no voxel can still improve
        if not bool(((g > s) & reachable).any()):
            break
        g[..., s:] = torch.minimum(g[..., s:], f[..., :-s].clamp_min(s))
        g[..., :-s] = torch.minimum(g[..., :-s], f[..., s:].clamp_min(s))
    return g.movedim(-1, dim)


def chamfer_distance_transform(mask: Tensor, metric: str, *, spatial_dims: int) -> Tensor:
    """``scipy.ndimage.distance_transform_cdt(mask, metric)`` for ``metric`` "chessboard" (L-infinity: 8/26
    neighbours at distance 1) or "taxicab" (L1), of the last ``spatial_dims`` dims of ``mask`` (leading dims are a
    batch of maps).  Exact integer distances in voxels (no spacing, as scipy's and MONAI's), float32; +inf
    throughout a map with no zero (scipy returns -1 there).

    Both metrics are separable: one pass per axis, each vectorized over all lines (taxicab: two running minima;
    chessboard: one step per offset, stopping once no voxel can improve, so it costs the largest distance).
    Used by the surface metrics (``distance_metric``), on the mask's device."""
    if metric not in CHAMFER_METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, CHAMFER_METRICS))}, got {metric!r}")
    f = torch.where(mask != 0, float("inf"), 0.0).to(torch.float32)
    for k in range(spatial_dims - 1, -1, -1):
        f = _chamfer_pass(f, mask.dim() - spatial_dims + k, metric)
    return f


def signed_distance(onehot: Tensor, spacing: Optional[Sequence[float]] = None, *,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Kervadec's boundary-loss map of each ``(n, c)`` mask of a one-hot ``(N, C, *spatial)`` tensor.

    ``phi = edt(~m) * ~m - (edt(m) - 1) * m``: positive outside (the distance to the mask), 0 on the mask's inner
    boundary, negative deeper inside.  A class absent from a map, and a class covering the whole map (it has no
    boundary), gets all zeros.
    """
    m = onehot != 0
    spatial_dims = m.dim() - 2
    both = torch.stack([~m, m])
    d = distance_transform(both, spacing, spatial_dims=spatial_dims, dtype=torch.float64)
    phi = d[0] * (~m) - (d[1] - 1) * m
    flat = m.flatten(2)
    has_boundary = flat.any(-1) & ~flat.all(-1)
    phi = torch.where(has_boundary.reshape(has_boundary.shape + (1,) * spatial_dims), phi, torch.zeros_like(phi))
    return phi.to(dtype)
