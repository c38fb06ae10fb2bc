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

The squared distances are computed in float64, so for unit spacing they are exact integers.  The distances are
``torch.sqrt`` of them, which on some CPUs (AVX-512) is vectorized without correct rounding: they are within one
float64 ulp of scipy's, not always bit-equal (tests compare squared distances exactly, distances within 1 ulp).
This module is the test oracle and the fallback of
:func:`fastmed.ops.distance_transform` (the C++/CUDA envelope passes are linear per line; this one is not).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


def _line_pass(mask: Tensor, spacing: float) -> Tensor:
    """Squared distance along the last axis to the nearest zero of each line (float64, +inf when none)."""
    n = mask.shape[-1]
    pos = torch.arange(n, device=mask.device, dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=mask.device)
    zero_left = torch.where(mask, -inf, pos).cummax(dim=-1).values            # last zero at or before q
    zero_right = torch.where(mask, inf, pos).flip(-1).cummin(dim=-1).values.flip(-1)  # first zero at or after q
    d = torch.minimum(pos - zero_left, zero_right - pos) * spacing
    return d * d


def _envelope_pass(f: Tensor, dim: int, w: float) -> Tensor:
    """min over p of w (q - p)^2 + f[..., p, ...] along ``dim`` (float64)."""
    n = f.shape[dim]
    f = f.movedim(dim, -1)
    q = torch.arange(n, device=f.device, dtype=torch.float64)
    g = torch.full_like(f, float("inf"))
    for p in range(n):
        torch.minimum(g, f[..., p:p + 1] + w * (q - p) ** 2, out=g)
    return g.movedim(-1, dim)


def distance_transform(mask: Tensor, spacing: Optional[Sequence[float]] = None, *, spatial_dims: int,
                       squared: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact Euclidean distance transform of the last ``spatial_dims`` dims of ``mask``.

    Args:
        mask: ``(*batch, *spatial)`` tensor, nonzero = foreground (bool or any dtype).
        spacing: voxel size per spatial dim (``spatial_dims`` positive numbers), or None for unit spacing.
        spatial_dims: 1, 2 or 3.
        squared: return squared distances.
        dtype: result dtype (float32 or float64).

    Returns:
        ``dtype`` tensor shaped like ``mask``: 0 on zeros, the distance to the nearest zero elsewhere, ``+inf``
        throughout a map with no zero.
    """
    m = mask != 0
    sp = [1.0] * spatial_dims if spacing is None else [float(s) for s in spacing]
    d2 = _line_pass(m, sp[-1])
    for k in range(spatial_dims - 2, -1, -1):
        d2 = _envelope_pass(d2, m.dim() - spatial_dims + k, sp[k] * sp[k])
    return (d2 if squared else d2.sqrt()).to(dtype)


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
