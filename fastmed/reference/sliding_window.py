"""Plain PyTorch reference for sliding-window inference, and the vocabulary of the op.

What lives here (the test oracle and the CPU path of :mod:`fastmed.ops.sliding_window`):

* the window grids of MONAI (:func:`monai_grid`: ``overlap`` -> scan interval -> ``dense_patch_slices``) and of
  nnU-Net v2 (:func:`nnunet_grid`: ``compute_steps_for_sliding_window`` with ``step_size``), as a
  :class:`WindowGrid`;
* their importance maps: MONAI's ``compute_importance_map`` (:func:`importance_map`) and nnU-Net's
  ``compute_gaussian`` (:func:`nnunet_gaussian`);
* the in-place accumulation of window predictions into a buffer (:func:`accumulate`) and the final division by
  the summed weights, or the argmax over channels (:func:`finalize`).

Geometry.  Internally there are always three spatial axes (z, y, x): 1D and 2D problems get axes of size 1
(:func:`lift_axes`: a 2D ``(A, B)`` becomes ``(A, 1, B)``).  The windows of a grid are the cartesian product of
per-axis starts, listed in lexicographic order (z slowest), the order of MONAI's ``dense_patch_slices`` and
nnU-Net's slicers.

Buffers.  An accumulation buffer is ``(N, C, R, Y, X)``; its z axis is a ring of ``R`` rows: image row ``z``
lives in buffer row ``z % R``.  With ``R = Z`` the buffer is the whole volume; with ``R`` = the window's z size
it is a band that slides down the volume (finalized rows are zeroed and reused), so that only labels, or a
result of another dtype, are kept at full size.

Normalizer.  The sum of the weights of the windows covering a voxel depends on the grid only, not on the
predictions.  The weight map need not be separable (MONAI clamps its Gaussian at 1e-3), but the grid is a
product, so ``norm(z, y, x) = sum_{sz covering z} sum_{sy covering y} T[z - sz, y - sy, x]`` with the table
``T[dz, dy, x] = sum_{sx} w[dz, dy, x - sx]`` of shape ``(wz, wy, X)``: computed once per geometry
(:func:`window_normalizer`), a few MB instead of a count map the size of the volume.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastmed._tensors import accumulation_dtype

__all__ = ["BLEND_MODES", "OUTPUTS", "PADDING_MODES", "WindowGrid", "WindowNormalizer", "monai_grid",
           "nnunet_grid", "importance_map", "nnunet_gaussian", "window_normalizer", "accumulate", "finalize",
           "ring_pieces", "lift", "lift_axes", "LABEL_DTYPE", "MAX_LABEL_CHANNELS"]

BLEND_MODES = ("constant", "gaussian")           # MONAI's BlendMode
OUTPUTS = ("values", "labels")                   # the blended predictions, or their argmax over channels
PADDING_MODES = ("constant", "reflect", "replicate", "circular")  # MONAI's PytorchPadMode
SPATIAL = 3                                      # spatial axes inside the op (1D/2D problems are lifted)
MONAI_MIN_WEIGHT = 1e-3                          # compute_importance_map's floor of the weights
GAUSSIAN_TRUNCATE = 4.0                          # scipy.ndimage.gaussian_filter's default truncate (nnU-Net)
LABEL_DTYPE = torch.uint8                        # output="labels": one byte a voxel
MAX_LABEL_CHANNELS = torch.iinfo(LABEL_DTYPE).max + 1


def lift_axes(nd: int) -> tuple[int, ...]:
    """Where the ``nd`` spatial axes of a 1D/2D/3D problem go among the op's three (z, y, x): a 2D image
    ``(A, B)`` becomes ``(A, 1, B)``, so that its first axis is the one a band slides along; 1D ``(A,)`` becomes
    ``(1, 1, A)``."""
    return {1: (2,), 2: (0, 2), 3: (0, 1, 2)}[nd]


def lift(t: Tensor, nd: int, lead: int) -> Tensor:
    """A view of ``t`` (``lead`` leading axes, then ``nd`` spatial axes) with three spatial axes
    (see :func:`lift_axes`)."""
    shape = [1] * SPATIAL
    for i, a in enumerate(lift_axes(nd)):
        shape[a] = t.shape[lead + i]
    return t.reshape(tuple(t.shape[:lead]) + tuple(shape))


class WindowGrid(NamedTuple):
    """Windows of size ``window`` at every combination of the per-axis ``starts`` in an image of ``image_size``
    (all per spatial axis; starts ascending, every voxel covered)."""
    image_size: tuple[int, ...]
    window: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def num_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def origin(self, index: int) -> tuple[int, ...]:
        """The start of window ``index`` (lexicographic order, the first axis slowest)."""
        out = []
        for s in reversed(self.starts):
            index, i = divmod(index, len(s))
            out.append(s[i])
        return tuple(reversed(out))

    def slices(self, index: int) -> tuple[slice, ...]:
        return tuple(slice(s, s + w) for s, w in zip(self.origin(index), self.window))

    def lifted(self) -> WindowGrid:
        """The same grid on three spatial axes, with axes of size 1 inserted where :func:`lift_axes` puts them."""
        keep = lift_axes(len(self.image_size))
        image, window, starts = [1] * SPATIAL, [1] * SPATIAL, [(0,)] * SPATIAL
        for i, a in enumerate(keep):
            image[a], window[a], starts[a] = self.image_size[i], self.window[i], tuple(self.starts[i])
        return WindowGrid(tuple(image), tuple(window), tuple(starts))

    def scaled(self, size: Sequence[int]) -> WindowGrid:
        """The grid of an output head whose windows have ``size`` instead of ``window`` voxels (MONAI's
        multi-resolution outputs): each slice ``[a, b)`` becomes ``[int(a * z), int(b * z)]`` with
        ``z = size / window`` and the image ``int(image_size * z)``, exactly as MONAI computes them.  Raises
        ``ValueError`` when a scaled slice does not have ``size`` voxels."""
        size = tuple(int(s) for s in size)
        if size == tuple(self.window):
            return self
        zoom = [o / float(i) for o, i in zip(size, self.window)]
        starts = []
        for axis, (z, w, n) in enumerate(zip(zoom, self.window, size)):
            axis_starts = tuple(int(s * z) for s in self.starts[axis])
            bad = [s for s in self.starts[axis] if int((s + w) * z) - int(s * z) != n]
            if bad:
                got = int((bad[0] + w) * z) - int(bad[0] * z)
                raise ValueError(f"an output of spatial size {size} for windows of {tuple(self.window)} scales the "
                                 f"window starting at {bad[0]} on axis {axis} to {got} "
                                 f"voxels, not {n}; choose roi_size and overlap so that overlap * roi_size * "
                                 f"output_size / roi_size is an integer (as MONAI requires)")
            starts.append(axis_starts)
        image = tuple(int(i * z) for i, z in zip(self.image_size, zoom))
        return WindowGrid(image, size, tuple(starts))


def monai_grid(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> WindowGrid:
    """MONAI's windows (``_get_scan_interval`` + ``dense_patch_slices``) over an image at least ``roi_size``
    large: interval ``max(int(roi * (1 - overlap)), 1)`` (the whole axis when roi equals it), starts
    ``i * interval`` with the last one moved back inside the image."""
    starts = []
    for size, roi, o in zip(image_size, roi_size, overlap):
        interval = roi if roi == size else max(int(roi * (1 - o)), 1)
        num = math.ceil(size / interval)
        count = next((d + 1 for d in range(num) if d * interval + roi >= size), 1)
        starts.append(tuple(i * interval - max(i * interval + roi - size, 0) for i in range(count)))
    return WindowGrid(tuple(image_size), tuple(roi_size), tuple(starts))


def nnunet_grid(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> WindowGrid:
    """nnU-Net v2's windows (``compute_steps_for_sliding_window``) over an image at least ``patch_size`` large:
    ``ceil((size - patch) / (patch * step_size)) + 1`` steps per axis, evenly spread from 0 to ``size - patch``
    and rounded half to even (``np.round``)."""
    starts = []
    for size, patch in zip(image_size, patch_size):
        n = math.ceil((size - patch) / (patch * step_size)) + 1
        step = (size - patch) / (n - 1) if n > 1 else 0.0
        starts.append(tuple(int(round(step * i)) for i in range(n)))
    return WindowGrid(tuple(image_size), tuple(patch_size), tuple(starts))


def importance_map(window: Sequence[int], mode: str, sigma_scale: Sequence[float], dtype: torch.dtype,
                   device=None) -> Tensor:
    """MONAI's ``compute_importance_map``: ones (``"constant"``) or the product of 1D Gaussians
    ``exp(-x^2 / (2 (sigma_scale * n)^2))`` centred at ``(n - 1) / 2`` (``"gaussian"``), computed in float32,
    floored at ``max(min, 1e-3)``, returned in ``dtype``; shape ``window``."""
    if mode == "constant":
        weights = torch.ones(tuple(window), device=device, dtype=torch.float)
    else:
        weights = None
        for i, (n, s) in enumerate(zip(window, sigma_scale)):
            sigma = n * s
            x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float, device=device)
            x = torch.exp(x ** 2 / (-2 * sigma ** 2))
            weights = x if weights is None else weights.unsqueeze(-1) * x[(None,) * i]
    floor = max(torch.min(weights).item(), MONAI_MIN_WEIGHT)
    return torch.clamp_(weights.to(torch.float), min=floor).to(dtype)


def nnunet_gaussian(window: Sequence[int], sigma_scale: float, value_scaling_factor: float, dtype: torch.dtype,
                    device=None) -> Tensor:
    """nnU-Net v2's ``compute_gaussian``: a unit impulse at ``n // 2`` smoothed by ``gaussian_filter`` with
    ``sigma = sigma_scale * n`` (truncated at ``int(4 sigma + 0.5)``), divided by its maximum and multiplied by
    ``value_scaling_factor`` in float64, cast to ``dtype``; zeros (truncation, underflow) are replaced by the
    smallest nonzero value.  Written from the separable kernel instead of calling scipy; shape ``window``."""
    weights = None
    for n in window:
        sigma = n * sigma_scale
        radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
        x = torch.arange(n, dtype=torch.float64) - n // 2
        g = torch.exp(-0.5 / (sigma * sigma) * x ** 2)
        g = torch.where(x.abs() <= radius, g, torch.zeros((), dtype=torch.float64))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    weights = (weights / weights.max() * value_scaling_factor).to(dtype)
    nonzero = weights != 0
    weights[~nonzero] = weights[nonzero].min()
    return weights.to(device)


class WindowNormalizer(NamedTuple):
    """The summed weights of a grid (see the module docstring), on the buffer's device.

    ``table`` ``(wz, wy, X)`` in the accumulation dtype; ``starts_z`` / ``starts_y`` int32 window starts; and per
    image row the covering windows ``first_z[z] .. first_z[z] + count_z[z]`` (likewise for y), int32;
    ``max_count_y`` = ``count_y.max()`` as a Python int, known on the host without reading the device."""
    table: Tensor
    starts_z: Tensor
    starts_y: Tensor
    first_z: Tensor
    count_z: Tensor
    first_y: Tensor
    count_y: Tensor
    max_count_y: int


def _covering(starts: Sequence[int], window: int, size: int, device) -> tuple[Tensor, Tensor, int]:
    """Per image row the first covering window and the count, on ``device``, and the largest count (computed on
    the host, before the copy)."""
    s = torch.tensor(starts, dtype=torch.int64)
    v = torch.arange(size, dtype=torch.int64)
    first = torch.searchsorted(s + window, v, right=True)  # windows that end at or before v
    last = torch.searchsorted(s, v, right=True)            # windows that start at or before v
    count = last - first
    return (first.to(device=device, dtype=torch.int32), count.to(device=device, dtype=torch.int32),
            int(count.max()) if size else 0)


def window_normalizer(grid: WindowGrid, weight: Tensor, dtype: torch.dtype) -> WindowNormalizer:
    """The normalizer of a 3-axis ``grid`` whose windows all carry ``weight`` (shape ``grid.window``), computed
    in ``dtype`` on ``weight``'s device."""
    wz, wy, wx = grid.window
    table = torch.zeros((wz, wy, grid.image_size[2]), dtype=dtype, device=weight.device)
    w = weight.to(dtype)
    for sx in grid.starts[2]:
        table[:, :, sx:sx + wx] += w
    dev = weight.device
    first_z, count_z, _ = _covering(grid.starts[0], wz, grid.image_size[0], dev)
    first_y, count_y, max_count_y = _covering(grid.starts[1], wy, grid.image_size[1], dev)
    return WindowNormalizer(table, torch.tensor(grid.starts[0], dtype=torch.int32, device=dev),
                            torch.tensor(grid.starts[1], dtype=torch.int32, device=dev),
                            first_z, count_z, first_y, count_y, max_count_y)


def ring_pieces(z0: int, z1: int, rows: int) -> list[tuple[int, int, int]]:
    """Image rows ``[z0, z1)`` as runs that do not wrap around a ring of ``rows`` buffer rows:
    ``(image row start, image row end, buffer row start)`` each."""
    out = []
    z = z0
    while z < z1:
        r = z % rows
        end = min(z1, z + rows - r)
        out.append((z, end, r))
        z = end
    return out


def accumulate(buffer: Tensor, patches: Tensor, weight: Tensor, origins: Sequence[int]) -> None:
    """In place, window after window: ``buffer[n, :, (z + dz) % R, y + dy, x + dx] += weight[dz, dy, dx] *
    patches[k, :, dz, dy, dx]`` for window ``k`` with origin ``origins[4k:4k+4] = (n, z, y, x)``, computed in
    the accumulation dtype of ``buffer`` and stored in its dtype.

    buffer ``(N, C, R, Y, X)``; patches ``(K, C, wz, wy, wx)``; weight ``(wz, wy, wx)``."""
    acc = accumulation_dtype(buffer.dtype)
    rows = buffer.shape[2]
    w_all = weight.to(acc)
    _, _, wz, wy, wx = patches.shape
    for k in range(patches.shape[0]):
        n, z, y, x = origins[4 * k:4 * k + 4]
        p = patches[k].to(acc)
        for a, b, r in ring_pieces(z, z + wz, rows):
            dst = buffer[n, :, r:r + b - a, y:y + wy, x:x + wx]
            dst.addcmul_(p[:, a - z:b - z], w_all[a - z:b - z])


def _cells(lo: int, hi: int, starts: Sequence[int], window: int, extra: Sequence[int] = ()) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut at every window start and end (and at ``extra``): runs covered by one set of windows."""
    cuts = {lo, hi, *(c for s in starts for c in (s, s + window) if lo < c < hi), *(c for c in extra if lo < c < hi)}
    edges = sorted(cuts)
    return list(zip(edges[:-1], edges[1:]))


def argmax_channels(values: Tensor, norm: Tensor) -> Tensor:
    """``torch.argmax(values / norm, dim=1, keepdim=True)`` as ``LABEL_DTYPE`` (the first maximum; NaN counts as
    the maximum), the division in ``norm``'s dtype: a running maximum over the channels (torch's argmax over a
    short middle axis is several times slower on the CPU)."""
    best = values[:, :1].to(norm.dtype) / norm
    label = torch.zeros(best.shape, dtype=LABEL_DTYPE, device=values.device)
    for c in range(1, values.shape[1]):
        v = values[:, c:c + 1].to(norm.dtype) / norm
        label.masked_fill_(v > best, c)
        best = torch.maximum(best, v)  # NaN propagates: no later channel beats it
    nan = best.isnan()
    if bool(nan.any()):  # the first NaN channel wins (masked_fill above missed the channel that brought it)
        first = (values.to(norm.dtype) / norm).isnan().to(LABEL_DTYPE).argmax(dim=1, keepdim=True)
        label = torch.where(nan, first, label)
    return label


def finalize(buffer: Tensor, norm: WindowNormalizer, window_zy: tuple[int, int], z_lo: int, z_hi: int,
             result: Optional[Tensor] = None, output: str = "values", zero_buffer: bool = False) -> None:
    """Finish image rows ``[z_lo, z_hi)`` of an accumulation buffer ``(N, C, R, Y, X)``.

    ``output="values"``: ``buffer / norm``, in place (``result`` None) or into ``result`` ``(N, C, Z, Y, X)``
    (cast to its dtype); ``output="labels"``: ``argmax`` over channels of ``buffer / norm`` into ``result``
    ``(N, 1, Z, Y, X)`` (``torch.argmax``: the first maximum, NaN counts as the maximum).  The division is in the
    accumulation dtype.  ``zero_buffer``: the buffer rows read are zeroed afterwards (the band is reused)."""
    rows, Y = buffer.shape[2], buffer.shape[3]
    wz, wy = window_zy
    starts_z, starts_y = norm.starts_z.tolist(), norm.starts_y.tolist()
    acc = norm.table.dtype
    wraps = range(0, z_hi + rows, rows)
    for za, zb in _cells(z_lo, z_hi, starts_z, wz, wraps):
        cover_z = [s for s in starts_z if s <= za and zb <= s + wz]
        r = za % rows
        for ya, yb in _cells(0, Y, starts_y, wy):
            cover_y = [s for s in starts_y if s <= ya and yb <= s + wy]
            total = sum(norm.table[za - sz:zb - sz, ya - sy:yb - sy] for sz in cover_z for sy in cover_y)
            src = buffer[:, :, r:r + zb - za, ya:yb]
            if output == "labels":
                result[:, :, za:zb, ya:yb] = argmax_channels(src, total)
            elif result is None:
                src.div_(total)
            else:
                result[:, :, za:zb, ya:yb] = src.to(acc) / total
            if zero_buffer:
                src.zero_()
