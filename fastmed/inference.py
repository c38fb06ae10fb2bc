"""``fastmed.inference``: whole-volume prediction by sliding windows, with bounded memory.

    from fastmed.inference import sliding_window_inference, nnunet_sliding_window_inference
    probs = sliding_window_inference(image, (96, 96, 96), 4, model, overlap=0.5, mode="gaussian")   # MONAI's API
    labels = sliding_window_inference(image, (96, 96, 96), 4, model, 0.5, "gaussian", output="labels")
    logits = nnunet_sliding_window_inference(image, (128, 128, 128), network, mirror_axes=(0, 1, 2))

:func:`sliding_window_inference` takes MONAI 1.6's arguments, in MONAI's order and with its defaults, and returns
MONAI's results (same windows, importance map, padding, cropping, multi-head and multi-resolution outputs).  What
differs is the blending (:mod:`fastmed.ops.sliding_window`):

* one fused pass per window adds ``weight * prediction`` into the buffer (MONAI: a multiply, a copy and an add),
  in float32 (float64 for float64 inputs) whatever the input dtype, or in ``buffer_dtype`` on request;
* no count map: the sum of the weights depends only on the window grid, so it is computed once per geometry as a
  small table (window depth x window height x image width, cached between calls) and applied while normalizing;
* ``output="labels"``: the argmax over channels, taken on the fly as rows of the volume become complete, so only
  one byte per voxel is kept at full size, plus the tiles still open (about one window step of rows across the
  volume: tiles cut at every window start and end, each finalized and freed after the last window that meets it);
* a result in another dtype than the accumulation (float16 inputs) is written tile by tile, without a second
  full-size buffer.

:func:`nnunet_sliding_window_inference` is nnU-Net v2's predictor (``predict_sliding_window_return_logits``):
nnU-Net's tiling (``step_size``), Gaussian (sigma 1/8, scaled by 10, zeros replaced by the smallest weight),
float16 buffers by default, and test-time mirroring (:func:`mirrored`).

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) and ``python -m fastmed predict`` (:func:`main`)
apply a fastmed model to a NIfTI volume.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed import _backend
from fastmed._tensors import accumulation_dtype
from fastmed._validate import FLOAT_DTYPES, check_int, check_mode, check_number, check_tensor
from fastmed.ops.sliding_window import _accumulate_unchecked, _finalize_unchecked
from fastmed.reference import sliding_window as ref
from fastmed.reference.sliding_window import BLEND_MODES, OUTPUTS, PADDING_MODES, WindowGrid

__all__ = ["sliding_window_inference", "nnunet_sliding_window_inference", "mirrored", "tile_order", "save_checkpoint",
           "load_checkpoint", "predict_volume", "main", "BLEND_MODES", "OUTPUTS", "CHECKPOINT_FORMAT"]

NNUNET_SIGMA_SCALE = 1.0 / 8      # nnU-Net's compute_gaussian(sigma_scale=1/8)
NNUNET_VALUE_SCALING = 10.0       # and value_scaling_factor=10 (its float16 buffers stay in range)
_NEAREST = "nearest-exact"        # MONAI resizes the weight map of a head at another resolution so
_NORMALIZERS_CACHED = 4           # geometries whose normalizer tables are kept between calls
TILES_MIN_BAND_BYTES = 16 << 20   # labels / other-dtype results: tiles instead of a window-deep band from this size


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _enum_value(v):
    """MONAI passes modes as str-enums (BlendMode.GAUSSIAN): their value."""
    return getattr(v, "value", v)


def _per_axis_numbers(value, name: str, nd: int, *, minimum: Optional[float] = None,
                      below: Optional[float] = None) -> tuple[float, ...]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [value] * nd
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == nd:
        values = list(value)
    else:
        raise ValueError(f"{name} must be a number or a sequence of {nd} numbers (one per spatial axis), got {value!r}")
    out = tuple(check_number(v, name, minimum=minimum) for v in values)
    if below is not None and any(v >= below for v in out):
        raise ValueError(f"{name} must be >= {minimum} and < {below} on every axis, got {value!r}")
    return out


def _roi(roi_size, image_size: Sequence[int]) -> tuple[int, ...]:
    """MONAI's ``fall_back_tuple``: an int for every axis, or one entry per axis; None or <= 0 -> the image's size."""
    nd = len(image_size)
    if isinstance(roi_size, numbers.Integral) and not isinstance(roi_size, bool):
        values = [roi_size] * nd
    elif isinstance(roi_size, Sequence) and not isinstance(roi_size, str):
        if len(roi_size) != nd:
            raise ValueError(f"roi_size has {len(roi_size)} entries but inputs have {nd} spatial dims "
                             f"(inputs must be (N, C, *spatial), channel first), got roi_size={roi_size!r}")
        values = list(roi_size)
    else:
        raise ValueError(f"roi_size must be an int or a sequence of {nd} ints, got {roi_size!r}")
    out = []
    for v, size in zip(values, image_size):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise ValueError(f"roi_size entries must be ints or None, got roi_size={roi_size!r}")
        out.append(int(size) if v is None or v <= 0 else int(v))
    return tuple(out)


def _device(value, name: str) -> Optional[torch.device]:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{name} must be None, a torch.device or a device string, got {value!r}") from exc


def _buffer_dtype(value) -> Optional[torch.dtype]:
    if value is not None and value not in FLOAT_DTYPES:
        raise TypeError(f"buffer_dtype must be None or one of {', '.join(map(str, FLOAT_DTYPES))}, got {value!r}")
    return value


def _plain_input(inputs, name: str = "inputs") -> Tensor:
    """The tensor of ``inputs`` (a MONAI MetaTensor's data), checked: ``(N, C, *spatial)``, floating point."""
    if isinstance(inputs, Tensor) and hasattr(inputs, "as_tensor"):
        inputs = inputs.as_tensor()
    check_tensor(inputs, name, min_ndim=3, max_ndim=5)
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# Output structures (MONAI's _flatten_struct / _pack_struct)
# ----------------------------------------------------------------------------------------------------------------

def _flatten(out) -> tuple[Optional[list], tuple[Tensor, ...]]:
    if isinstance(out, Tensor):
        return None, (out,)
    if isinstance(out, Mapping):
        keys = sorted(out.keys())
        return keys, tuple(out[k] for k in keys)
    if isinstance(out, (list, tuple)):
        return None, tuple(out)
    raise TypeError(f"predictor must return a tensor, a tuple/list of tensors or a dict of tensors, got "
                    f"{type(out).__name__}")


def _pack(outputs: list, keys: Optional[list]):
    if keys is not None:
        return dict(zip(keys, outputs))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _first(out) -> Tensor:
    """A network's full-resolution output: the tensor, or the first of a deep-supervision list."""
    return out[0] if isinstance(out, (list, tuple)) else out


# ----------------------------------------------------------------------------------------------------------------
# The engine: windows -> predictor -> fused accumulation -> normalization / argmax
# ----------------------------------------------------------------------------------------------------------------

class _Plan(NamedTuple):
    """How one call blends: the window grid, what comes out, the buffer and result dtypes, and the devices."""
    grid: WindowGrid           # over the padded image, ``nd`` axes
    output: str                # one of OUTPUTS
    buffer_dtype: torch.dtype  # the accumulation buffer
    result_dtype: torch.dtype  # values: the returned tensors (labels: uint8)
    device: torch.device       # buffers and results
    sw_device: torch.device    # windows and predictor


_normalizer_cache: collections.OrderedDict[tuple, ref.WindowNormalizer] = collections.OrderedDict()
_weight_cache: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()


def _cached(cache: collections.OrderedDict, key: Optional[tuple], make: Callable[[], Any]) -> Any:
    """``make()``, kept in ``cache`` under ``key`` (None: not cached) for the next calls; the least recently used
    of more than ``_NORMALIZERS_CACHED`` entries is dropped."""
    if key is None:
        return make()
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        while len(cache) > _NORMALIZERS_CACHED:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


def _normalizer(grid3: WindowGrid, weight3: Tensor, dtype: torch.dtype, key: Optional[tuple]) -> ref.WindowNormalizer:
    """The normalizer of a (lifted) grid, from the cache when ``key`` names a weight map seen before."""
    return _cached(_normalizer_cache, None if key is None else (key, grid3, dtype, weight3.device),
                   lambda: ref.window_normalizer(grid3, weight3, dtype))


def _weight_map(key: Optional[tuple], window: Sequence[int], device: torch.device,
                make: Callable[[], Tensor]) -> Tensor:
    """The importance map named by ``key`` for windows of ``window`` on ``device``, computed once (None: every
    call, e.g. when a ``process_fn`` may edit it).  Only read by the blending: never handed to the predictor."""
    return _cached(_weight_cache, None if key is None else (key, tuple(window), device), make)


class _AxisTiles(NamedTuple):
    """One axis of a grid cut into cells at every window start and end: cell ``t`` is ``bounds[t]`` ``[a, b)``, met
    by one set of windows.  Per window row ``r`` (its start's place in the grid's ``starts``): ``pieces[r]``, the
    cells the window meets as ``(cell, first voxel in the window, end in the window, first voxel in the cell)``.
    ``rows[t]``: the rows whose windows meet cell ``t``."""
    bounds: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[tuple[int, int, int, int], ...], ...]
    rows: tuple[tuple[int, ...], ...]


def _axis_tiles(starts: Sequence[int], window: int, size: int) -> _AxisTiles:
    cuts = sorted({0, *starts, *(s + window for s in starts if s + window < size)})
    bounds = tuple(zip(cuts, cuts[1:] + [size]))
    pieces = []
    for s in starts:
        row = []
        for t, (a, b) in enumerate(bounds):
            lo, hi = max(s, a), min(s + window, b)
            if lo < hi:
                row.append((t, lo - s, hi - s, lo - a))
        pieces.append(tuple(row))
    rows = tuple(tuple(r for r, s in enumerate(starts) if s < b and s + window > a) for a, b in bounds)
    return _AxisTiles(bounds, tuple(pieces), rows)


def _start_groups(starts: Sequence[int]) -> list[list[int]]:
    """The rows of one axis in groups: a start closer to the previous one than 3/4 of the axis's largest gap joins
    its group (MONAI's last window, moved back to end at the image's edge, joins the one before it; nnU-Net's
    starts, spread evenly, differ by a voxel at most and stay apart).  Taking such rows together holds less open
    (simulated at 96^3 windows, step 48: up to a gap of 3/4 of the step; at larger gaps it gains nothing)."""
    gap = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    groups = [[0]]
    for r in range(1, len(starts)):
        if 4 * (starts[r] - starts[r - 1]) < 3 * gap:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def tile_order(grid3: WindowGrid) -> list[int]:
    """The order in which the ``"tiles"`` engine takes the windows of a (lifted, 3-axis) grid: by groups of z rows,
    then groups of y rows, then x, and inside that the group's z and y rows, so that the windows of rows closer
    than a step (the last, moved-back window of each axis) meet each place one after the other.  A tile stays open
    (allocated, not yet final) from the first to the last window that meets it; with MONAI's grid of 96^3 windows,
    overlap 0.5, on 256 x 256 x 192 the raster order keeps at most 33 % of the volume open (while the last two z
    rows, 16 voxels apart, pass), this order 24 % (about one window step of z rows)."""
    gz, gy = _start_groups(grid3.starts[0]), _start_groups(grid3.starts[1])
    ny, nx = len(grid3.starts[1]), len(grid3.starts[2])
    return [(z * ny + y) * nx + x for z_rows in gz for y_rows in gy for x in range(nx) for z in z_rows
            for y in y_rows]


class _Head:
    """The blending state of one predictor output: its grid, buffer(s), result and normalizer.

    Three ways to hold the accumulation, by ``mode``:

    * ``"direct"``: ``output="values"`` in the buffer's dtype accumulates straight into the result;
    * ``"band"`` (labels, or a result in another dtype, when the band is small): a ring one window deep along the
      first axis; each z-row of windows is followed by the finalization of the image rows it completes;
    * ``"tiles"`` (the same when a window-deep band would hold at least ``TILES_MIN_BAND_BYTES``): the volume is cut
      at every window start and end along each axis; a tile is allocated when the first window reaches it and is
      finalized (normalized or argmaxed into the result) and freed after the last window that meets it, so that
      about one window step of rows across the volume is held instead of a window's depth.  More, smaller calls
      per window: the band is faster on small volumes, where the memory does not matter.
    """

    def __init__(self, plan: _Plan, batch: int, channels: int, grid: WindowGrid, weight: Tensor,
                 weight_key: Optional[tuple]):
        self.nd = len(grid.image_size)
        self.grid, self.grid3 = grid, grid.lifted()
        self.output, self.channels = plan.output, channels
        if plan.output == "labels":
            if channels < 2:
                raise ValueError(f"output='labels' takes the argmax over channels, but a predictor output has "
                                 f"{channels} channel; threshold it instead (output='values')")
            if channels > ref.MAX_LABEL_CHANNELS:
                raise ValueError(f"output='labels' keeps labels in {ref.LABEL_DTYPE}, at most "
                                 f"{ref.MAX_LABEL_CHANNELS} channels; a predictor output has {channels}")
        dev = plan.device
        # the blending ops without their argument checks: this engine builds every window and buffer itself
        self.backend = _backend.choose("sliding_window", dev)
        size = tuple(grid.image_size)
        band = (channels, self.grid3.window[0]) + self.grid3.image_size[1:]
        if plan.output == "values" and plan.result_dtype == plan.buffer_dtype:
            self.mode = "direct"
        elif math.prod(band) * plan.buffer_dtype.itemsize >= TILES_MIN_BAND_BYTES:
            self.mode = "tiles"
        else:
            self.mode = "band"
        if self.mode == "direct":
            self.result = torch.zeros((batch, channels) + size, dtype=plan.buffer_dtype, device=dev)
            self.buffer = ref.lift(self.result, self.nd, 2)
        else:
            res_channels, res_dtype = (1, ref.LABEL_DTYPE) if plan.output == "labels" else (channels, plan.result_dtype)
            self.result = torch.empty((batch, res_channels) + size, dtype=res_dtype, device=dev)
            self.buffer_dtype = plan.buffer_dtype
        if self.mode == "band":
            self.buffer = torch.zeros((1,) + band, dtype=plan.buffer_dtype, device=dev)
            self.rows_z = list(self.grid3.starts[0][1:]) + [self.grid3.image_size[0]]  # row i complete below
        elif self.mode == "tiles":
            self.axes = [_axis_tiles(s, w, n) for s, w, n in zip(self.grid3.starts, self.grid3.window,
                                                                  self.grid3.image_size)]
            self.tiles: dict[tuple[int, ...], Tensor] = {}
            self.tile_norms: dict[tuple[str, int], Any] = {}  # crops of the normalizer per axis and cell start
            self.set_order(range(self.grid3.num_windows))
        self.result3 = ref.lift(self.result, self.nd, 2)
        self.norm = _normalizer(self.grid3, ref.lift(weight.to(dev), self.nd, 0),
                                accumulation_dtype(plan.buffer_dtype), weight_key)
        self.per_row = math.prod(len(s) for s in self.grid3.starts[1:])
        self.num_windows = self.grid.num_windows

    def set_order(self, order: Sequence[int]) -> None:
        """Tiles: the grid's windows will come in ``order`` (each sample's, in turn): a tile is final after the last
        window of the order that meets it."""
        place = {w: i for i, w in enumerate(order)}
        counts = [len(s) for s in self.grid3.starts]
        # the tiles each window completes, by the window's index in the grid
        self.completes: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
        for cell in itertools.product(*(range(len(a.bounds)) for a in self.axes)):
            last = max(((z * counts[1] + y) * counts[2] + x
                        for z, y, x in itertools.product(*(a.rows[t] for a, t in zip(self.axes, cell)))),
                       key=place.__getitem__)
            self.completes[last].append(cell)

    def add(self, patches: Tensor, weight: Tensor, windows: Sequence[int]) -> None:
        """Accumulate ``patches`` ``(K, C, *window)`` of the global window indices ``windows``; finish every image
        row (band) or tile (tiles) that becomes complete."""
        patches3 = ref.lift(patches, self.nd, 2)
        weight3 = ref.lift(weight, self.nd, 0)
        if self.mode == "tiles":
            self._add_tiles(patches3, weight3, windows)
            return
        run_start = 0
        for j, idx in enumerate(windows):
            local = idx % self.num_windows
            row_done = self.mode == "band" and (local + 1) % self.per_row == 0
            if row_done or j == len(windows) - 1:
                origins = []
                for i in windows[run_start:j + 1]:
                    n, loc = divmod(i, self.num_windows)
                    origins += [n if self.mode == "direct" else 0, *self.grid3.origin(loc)]
                _accumulate_unchecked(self.buffer, patches3[run_start:j + 1], weight3, origins, self.backend)
                run_start = j + 1
            row = local // self.per_row
            if row_done and self.grid3.starts[0][row] < self.rows_z[row]:  # (a repeated start completes no row)
                _finalize_unchecked(self.buffer, self.norm, self.grid3.window[:2], self.grid3.starts[0][row],
                                    self.rows_z[row], self.result3[idx // self.num_windows:][:1], self.output, True,
                                    self.backend)

    def _add_tiles(self, patches3: Tensor, weight3: Tensor, windows: Sequence[int]) -> None:
        counts = [len(s) for s in self.grid3.starts]
        for j, idx in enumerate(windows):
            n, local = divmod(idx, self.num_windows)
            rows = (local // (counts[1] * counts[2]), local // counts[2] % counts[1], local % counts[2])
            for (tz, az, bz, oz), (ty, ay, by, oy), (tx, ax, bx, ox) in itertools.product(
                    *(a.pieces[r] for a, r in zip(self.axes, rows))):
                tile = self.tiles.get((n, tz, ty, tx))
                if tile is None:
                    shape = tuple(b - a for a, b in (self.axes[0].bounds[tz], self.axes[1].bounds[ty],
                                                     self.axes[2].bounds[tx]))
                    tile = torch.zeros((1, self.channels) + shape, dtype=self.buffer_dtype, device=self.result.device)
                    self.tiles[(n, tz, ty, tx)] = tile
                _accumulate_unchecked(tile, patches3[j:j + 1, :, az:bz, ay:by, ax:bx], weight3[az:bz, ay:by, ax:bx],
                                      [0, oz, oy, ox], self.backend)
            for cell in self.completes.get(local, ()):
                self._finish_tile(n, cell)

    def _tile_normalizer(self, cell: tuple[int, int, int]) -> ref.WindowNormalizer:
        """The normalizer cropped to a tile: window starts shifted to the tile's origin, the rows' covering
        windows sliced, the table cut to the tile's columns (a view)."""
        (za, zb), (ya, yb), (xa, xb) = (a.bounds[t] for a, t in zip(self.axes, cell))
        nm = self.norm
        parts = []
        for key, make in ((("x", xa), lambda: nm.table[:, :, xa:xb]),
                          (("z", za), lambda: (nm.starts_z - za, nm.first_z[za:zb], nm.count_z[za:zb])),
                          (("y", ya), lambda: (nm.starts_y - ya, nm.first_y[ya:yb], nm.count_y[ya:yb]))):
            if key not in self.tile_norms:
                self.tile_norms[key] = make()
            parts.append(self.tile_norms[key])
        table, (sz, fz, cz), (sy, fy, cy) = parts
        return ref.WindowNormalizer(table, sz, sy, fz, cz, fy, cy, nm.max_count_y)

    def _finish_tile(self, n: int, cell: tuple[int, int, int]) -> None:
        tile = self.tiles.pop((n,) + cell)
        (za, zb), (ya, yb), (xa, xb) = (a.bounds[t] for a, t in zip(self.axes, cell))
        _finalize_unchecked(tile, self._tile_normalizer(cell), self.grid3.window[:2], 0, zb - za,
                            self.result3[n:n + 1, :, za:zb, ya:yb, xa:xb], self.output, False, self.backend)

    def finish(self) -> Tensor:
        if self.mode == "direct":
            _finalize_unchecked(self.buffer, self.norm, self.grid3.window[:2], 0, self.grid3.image_size[0], None,
                                "values", False, self.backend)
        elif self.mode == "tiles" and self.tiles:
            raise RuntimeError(f"internal error: {len(self.tiles)} tiles were never completed")
        return self.result


def _progress(iterable, total: int, enabled: bool, desc: str = "sliding window"):
    """``iterable`` with a progress bar: tqdm when installed, else a plain one-line bar on stderr."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc)
        return
    width = 30
    for i, item in enumerate(iterable):
        yield item
        done = width * (i + 1) // max(total, 1)
        sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i + 1}/{total}")
        sys.stderr.flush()
    sys.stderr.write("\n")


def _run(inputs: Tensor, plan: _Plan, sw_batch_size: int, predictor: Callable, weight: Tensor,
         weight_key: Optional[tuple], *, process_fn: Optional[Callable] = None, with_coord: bool = False,
         condition: Optional[Tensor] = None, progress: bool = False, args: tuple = (), kwargs: Optional[dict] = None):
    """Every window of every sample through ``predictor``, blended; returns (dict keys or None, results)."""
    kwargs = dict(kwargs or {})
    grid = plan.grid
    batch = inputs.shape[0]
    num_win = grid.num_windows
    total = num_win * batch
    heads: list[_Head] = []
    keys = None
    roi = tuple(grid.window)
    order = list(range(total))  # raster (MONAI's); the tiles engine's order from the second call on
    for start in _progress(range(0, total, sw_batch_size), math.ceil(total / sw_batch_size), progress):
        windows = order[start:start + sw_batch_size]
        unravel = [[slice(i // num_win, i // num_win + 1), slice(None)] + list(grid.slices(i % num_win))
                   for i in windows]
        win_data = torch.cat([inputs[tuple(s)] for s in unravel]).to(plan.sw_device)
        if condition is not None:
            kwargs["condition"] = torch.cat([condition[tuple(s)] for s in unravel]).to(plan.sw_device)
        out = predictor(win_data, unravel, *args, **kwargs) if with_coord else predictor(win_data, *args, **kwargs)
        keys, seg = _flatten(out)
        w_t = weight
        if process_fn is not None:
            seg, w_t = process_fn(seg, win_data, weight)
            seg = tuple(seg)
        if not heads and not seg:
            raise ValueError("predictor returned no outputs")
        w_t = w_t.reshape(w_t.shape[-len(roi):]) if w_t.dim() > len(roi) else w_t
        w_head = w_t
        adds = []
        for h, p in enumerate(seg):
            if not isinstance(p, Tensor) or p.dim() != inputs.dim() or p.shape[0] != len(windows):
                raise ValueError(f"predictor output {h} must be a tensor (sw_batch, C, *spatial) with "
                                 f"{len(windows)} windows, got "
                                 f"{tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}")
            shape = tuple(p.shape[2:])
            if shape != roi:  # MONAI resizes the current weight map (nearest-exact) to each such head in turn
                w_head = F.interpolate(w_head[None, None].float(), shape, mode=_NEAREST)[0, 0].to(w_t.dtype)
            w_use = w_head if shape != roi else w_t
            if len(heads) <= h:
                head_key = None if weight_key is None or shape != roi else weight_key
                heads.append(_Head(plan, batch, p.shape[1], grid.scaled(shape), w_use, head_key))
            elif p.shape[1] != heads[h].channels:
                raise ValueError(f"predictor output {h} changed from {heads[h].channels} to {p.shape[1]} channels")
            adds.append((heads[h], p, w_use))
        if start == 0:
            order = _engine_order(heads, num_win, batch, windows)
        for head, p, w_use in adds:
            head.add(p.to(plan.device), w_use.to(plan.device), windows)
        # drop this call's windows and predictions before the predictor makes the next ones (else two calls'
        # worth are alive at once: the largest transient of the blending)
        del win_data, out, seg, p, adds
        kwargs.pop("condition", None)
    return keys, [h.finish() for h in heads]


def _engine_order(heads: list[_Head], num_win: int, batch: int, first: list[int]) -> list[int]:
    """The order of all windows, known once the first call made the heads: :func:`tile_order` (per sample, in turn)
    when every head holding tiles can take it (no head needs the raster order of the band) and the first call's
    windows all belong to the first sample; else the raster order.  The first call's windows come first either
    way (they are done)."""
    tiled = [h for h in heads if h.mode == "tiles"]
    if not tiled or any(h.mode == "band" for h in heads) or len(first) > num_win:
        return list(range(num_win * batch))
    done = set(first)
    local = first + [w for w in tile_order(tiled[0].grid3) if w not in done]
    for h in tiled:
        h.set_order(local)
    return [n * num_win + w for n in range(batch) for w in local]


def _symmetric_padding(image_size: Sequence[int], roi: Sequence[int]) -> list[int]:
    """F.pad's list (last axis first): each axis grown to the roi, half below and the rest above."""
    pad = []
    for size, r in zip(reversed(image_size), reversed(roi)):
        diff = max(r - size, 0)
        pad += [diff // 2, diff - diff // 2]
    return pad


def _crop(result: Tensor, pad: list[int], image_size: Sequence[int], roi: Sequence[int]) -> Tensor:
    """MONAI's crop of the padding, scaled to the result's resolution (rounded as MONAI rounds)."""
    nd = len(image_size)
    zoom = [s / r for s, r in zip(result.shape[2:], roi)]
    index = [slice(None), slice(None)]
    for axis in range(nd):
        lo = pad[2 * (nd - 1 - axis)]
        index.append(slice(int(round(lo * zoom[axis])), int(round((lo + image_size[axis]) * zoom[axis]))))
    return result[tuple(index)]


# ----------------------------------------------------------------------------------------------------------------
# MONAI's sliding_window_inference
# ----------------------------------------------------------------------------------------------------------------

def sliding_window_inference(inputs: Tensor, roi_size: Union[Sequence[int], int], sw_batch_size: int,
                             predictor: Callable[..., Any], overlap: Union[Sequence[float], float] = 0.25,
                             mode: str = "constant", sigma_scale: Union[Sequence[float], float] = 0.125,
                             padding_mode: str = "constant", cval: float = 0.0,
                             sw_device: Union[torch.device, str, None] = None,
                             device: Union[torch.device, str, None] = None, progress: bool = False,
                             roi_weight_map: Optional[Tensor] = None, process_fn: Optional[Callable] = None,
                             buffer_steps: Optional[int] = None, buffer_dim: int = -1, with_coord: bool = False,
                             *args: Any, output: str = "values", buffer_dtype: Optional[torch.dtype] = None,
                             **kwargs: Any):
    """Sliding-window inference on ``inputs`` with ``predictor``: MONAI 1.6's
    ``monai.inferers.sliding_window_inference`` (same arguments, order, defaults and results), blended with
    bounded memory.

    Args (MONAI's):
        inputs: ``(N, C, *spatial)`` with 1 to 3 spatial dims, floating point (a MONAI MetaTensor gives a
            MetaTensor result with its metadata, float32 values as in MONAI).
        roi_size: window size: an int, or one entry per spatial dim; None or <= 0 entries take the image's size.
        sw_batch_size: windows per predictor call.
        predictor: ``predictor(windows, *args, **kwargs)`` (``predictor(windows, coords, ...)`` with
            ``with_coord``) -> a tensor ``(sw_batch, C', *spatial')``, a tuple/list of them or a dict of them;
            each output may have its own resolution (``spatial' = roi_size * zoom``; choose ``overlap`` so that
            ``overlap * roi_size * zoom`` is an integer).
        overlap: fraction of overlap between windows per axis, in ``[0, 1)``.
        mode: ``"constant"`` (equal weights) or ``"gaussian"`` (``exp(-x^2 / (2 (sigma_scale * roi)^2))``,
            floored at 1e-3).
        sigma_scale: Gaussian sigma as a fraction of the window size, per axis or one number.
        padding_mode, cval: how inputs smaller than ``roi_size`` are padded (``F.pad``: ``"constant"``,
            ``"reflect"``, ``"replicate"``, ``"circular"``); the padding is cropped from the results.
        sw_device: device of the windows and the predictor (default: the inputs').
        device: device of the results and of the accumulation (default: the inputs').
        progress: a progress bar over the predictor calls (tqdm when installed, else a plain one).
        roi_weight_map: a precomputed weight map ``roi_size`` (used instead of ``mode``).
        process_fn: ``process_fn(outputs, windows, weight_map) -> (outputs, weight_map)`` per predictor call.
        buffer_steps, buffer_dim: MONAI's buffering of rows of windows on ``sw_device``; accepted and checked,
            and without effect on the results here (fastmed's accumulation is already bounded).  Unlike MONAI,
            every output head is returned with buffering too.
        with_coord: pass the window slices to ``predictor`` as its second argument.
        *args, **kwargs: passed to ``predictor`` (``condition=`` is windowed like ``inputs``, as in MONAI).

    fastmed's keyword-only arguments:
        output: ``"values"`` (MONAI's result) or ``"labels"``: the argmax over channels of each output, ``uint8``
            ``(N, 1, *spatial)``, computed tile by tile as parts of the volume complete (memory: one byte a voxel,
            plus the channels of about one window step of rows across the volume).  On volumes large enough for
            tiles, the windows reach the predictor in :func:`tile_order` (rows closer than a step taken together)
            rather than MONAI's raster order: the same windows, batched differently, so a predictor whose output
            for a window depends on the rest of its batch (batch norm in training mode) would differ.
        buffer_dtype: the accumulation dtype (default float32, float64 for float64 inputs); with
            ``output="values"`` a given ``buffer_dtype`` is also the dtype of the results (float16/bfloat16
            halve the memory), otherwise results have the dtype of ``inputs``, as in MONAI.

    Returns:
        Like the predictor's outputs: a tensor, a tuple, or a dict with the predictor's keys, each
        ``(N, C', *spatial')`` on ``device``, cropped to the unpadded image.  Float results equal MONAI's within
        float rounding (fastmed accumulates in float32 where MONAI accumulates in the input dtype).
    """
    meta = inputs if isinstance(inputs, Tensor) and hasattr(inputs, "as_tensor") else None
    x = _plain_input(inputs)
    nd = x.dim() - 2
    image_size = tuple(x.shape[2:])
    roi = _roi(roi_size, image_size)
    sw_batch_size = check_int(sw_batch_size, "sw_batch_size", 1)
    if not callable(predictor):
        raise TypeError(f"predictor must be callable, got {type(predictor).__name__}")
    overlap = _per_axis_numbers(overlap, "overlap", nd, minimum=0.0, below=1.0)
    mode = check_mode(_enum_value(mode), "mode", BLEND_MODES)
    sigma = _per_axis_numbers(sigma_scale, "sigma_scale", nd, minimum=0.0)
    if mode == "gaussian" and min(sigma) <= 0:
        raise ValueError(f"sigma_scale must be > 0 for mode='gaussian', got {sigma_scale!r}")
    padding_mode = check_mode(_enum_value(padding_mode), "padding_mode", PADDING_MODES)
    cval = check_number(cval, "cval")
    sw_dev = _device(sw_device, "sw_device") or x.device
    out_dev = _device(device, "device") or x.device
    output = check_mode(output, "output", OUTPUTS)
    requested = _buffer_dtype(buffer_dtype)
    if buffer_steps is not None:
        check_int(buffer_steps, "buffer_steps")
        check_int(buffer_dim, "buffer_dim")
        if buffer_steps > 0 and not -nd <= buffer_dim <= nd:
            raise ValueError(f"buffer_dim must be in [{-nd}, {nd}], got {buffer_dim}.")
    if process_fn is not None and not callable(process_fn):
        raise TypeError(f"process_fn must be None or callable, got {type(process_fn).__name__}")
    condition = kwargs.pop("condition", None)

    pad = _symmetric_padding(image_size, roi)
    if any(pad):
        x = F.pad(x, pad=pad, mode=padding_mode, value=cval)
        if condition is not None:
            condition = F.pad(condition, pad=pad, mode=padding_mode, value=cval)
    padded = tuple(x.shape[2:])
    compute_dtype = x.dtype
    if roi_weight_map is not None:
        check_tensor(roi_weight_map, "roi_weight_map")
        if roi_weight_map.numel() != math.prod(roi):
            raise ValueError(f"roi_weight_map must have the roi_size {roi}, got shape {tuple(roi_weight_map.shape)}")
        weight = roi_weight_map.reshape(roi).to(device=sw_dev, dtype=compute_dtype)
        key = None
    else:
        key = None if process_fn is not None else ("monai", mode, sigma, compute_dtype)
        weight = _weight_map(key, roi, sw_dev, lambda: ref.importance_map(roi, mode, sigma, compute_dtype, sw_dev))
    plan = _Plan(ref.monai_grid(padded, roi, overlap), output, requested or accumulation_dtype(compute_dtype),
                 requested or compute_dtype, out_dev, sw_dev)
    keys, results = _run(x, plan, sw_batch_size, predictor, weight, key, process_fn=process_fn,
                         with_coord=with_coord, condition=condition, progress=progress, args=args, kwargs=kwargs)
    if any(pad):
        results = [_crop(r, pad, image_size, roi) for r in results]
    final = _pack(results, keys)
    if meta is not None:  # as MONAI: the metadata of inputs on an empty MetaTensor, whose dtype (float32) wins
        from monai.data import MetaTensor
        from monai.utils import convert_to_dst_type

        template = MetaTensor([]).copy_meta_from(meta, copy_attr=False)
        final = convert_to_dst_type(final, template, device=out_dev, dtype=None if output == "values" else
                                    ref.LABEL_DTYPE)[0]
    return final


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net's predictor
# ----------------------------------------------------------------------------------------------------------------

def mirrored(predictor: Callable[..., Any], mirror_axes: Optional[Sequence[int]]) -> Callable[..., Tensor]:
    """nnU-Net's test-time mirroring (``_internal_maybe_mirror_and_predict``): the prediction averaged with
    ``flip(predictor(flip(x, axes)), axes)`` over every non-empty combination of ``mirror_axes`` (spatial axes,
    0-based), summed in the order nnU-Net sums them (in float32, float64 for float64 outputs).  ``predictor``
    returns a tensor or a deep-supervision list (its first, full-resolution entry is used)."""
    if mirror_axes is None or len(mirror_axes) == 0:
        return lambda x, *a, **k: _first(predictor(x, *a, **k))
    if isinstance(mirror_axes, (str, bytes)) or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) and a >= 0 for a in mirror_axes):
        raise ValueError(f"mirror_axes must be a sequence of spatial axes (ints >= 0), got {mirror_axes!r}")
    axes = [int(a) + 2 for a in mirror_axes]
    combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def predict(x: Tensor, *args, **kwargs) -> Tensor:
        if max(axes) >= x.dim():
            raise ValueError(f"mirror_axes {tuple(mirror_axes)} do not fit windows with {x.dim() - 2} spatial dims")
        first = _first(predictor(x, *args, **kwargs))
        total = first.to(accumulation_dtype(first.dtype), copy=True)
        for c in combinations:
            total += torch.flip(_first(predictor(torch.flip(x, c), *args, **kwargs)), c)
        total /= len(combinations) + 1
        return total.to(first.dtype)

    return predict


def nnunet_sliding_window_inference(inputs: Tensor, patch_size: Sequence[int], predictor: Callable[..., Any],
                                    step_size: float = 0.5, use_gaussian: bool = True,
                                    mirror_axes: Optional[Sequence[int]] = None, *, sw_batch_size: int = 1,
                                    sigma_scale: float = NNUNET_SIGMA_SCALE,
                                    value_scaling_factor: float = NNUNET_VALUE_SCALING,
                                    buffer_dtype: torch.dtype = torch.float16, output: str = "values",
                                    sw_device: Union[torch.device, str, None] = None,
                                    device: Union[torch.device, str, None] = None, progress: bool = False):
    """nnU-Net v2's sliding-window prediction (``nnUNetPredictor.predict_sliding_window_return_logits``).

    ``nnunet_sliding_window_inference(x[None], patch, network, 0.5, True, mirror_axes)[0]`` equals nnU-Net's
    ``predict_sliding_window_return_logits(x)`` for a network with deep supervision off (within float16
    rounding: nnU-Net also sums the weights in float16, fastmed in float32).

    Args:
        inputs: ``(N, C, *spatial)``, floating point; padded (zeros, centred) to at least ``patch_size``.
        patch_size: the window, one int per spatial axis; or, for a 2D network on 3D inputs, per in-plane axis
            (the volume is predicted slice by slice along its first spatial axis, as nnU-Net's 2d configuration).
        predictor: the network: ``(sw_batch, C, *patch)`` -> logits, or a deep-supervision list (the first entry).
        step_size: window step as a fraction of ``patch_size``, in ``(0, 1]``.
        use_gaussian: weight windows by nnU-Net's Gaussian (else equally).
        mirror_axes: test-time mirroring over these spatial axes (0-based), or None.
        sw_batch_size: windows per network call (nnU-Net: 1; results do not depend on it).
        sigma_scale, value_scaling_factor: nnU-Net's Gaussian (1/8 and 10).
        buffer_dtype: accumulation buffer and result dtype (nnU-Net: float16); the Gaussian is rounded to it.
        output: ``"values"`` (the blended logits) or ``"labels"`` (their argmax, uint8 ``(N, 1, *spatial)``).
        sw_device, device: devices of the windows and of the buffers/result (default: the inputs').
        progress: a progress bar.

    Returns:
        ``(N, C', *spatial)`` in ``buffer_dtype`` (or labels), on ``device``.
    """
    x = _plain_input(inputs)
    nd = x.dim() - 2
    if (isinstance(patch_size, (str, bytes)) or not isinstance(patch_size, Sequence)
            or len(patch_size) not in (nd, nd - 1) or len(patch_size) < 1):
        raise ValueError(f"patch_size must have one int per spatial axis ({nd}), or {nd - 1} for a 2D network on "
                         f"3D inputs, got {patch_size!r}")
    patch = tuple(check_int(p, "patch_size", 1) for p in patch_size)
    step_size = check_number(step_size, "step_size", maximum=1.0)
    if step_size <= 0:
        raise ValueError(f"step_size must be larger than 0 and smaller or equal to 1, got {step_size}")
    sw_batch_size = check_int(sw_batch_size, "sw_batch_size", 1)
    sigma_scale = check_number(sigma_scale, "sigma_scale")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    value_scaling_factor = check_number(value_scaling_factor, "value_scaling_factor")
    if value_scaling_factor <= 0:
        raise ValueError(f"value_scaling_factor must be > 0, got {value_scaling_factor}")
    dtype = _buffer_dtype(buffer_dtype)
    if dtype is None:
        raise TypeError("buffer_dtype must be a floating-point dtype (nnU-Net: torch.float16), got None")
    output = check_mode(output, "output", OUTPUTS)
    if not callable(predictor):
        raise TypeError(f"predictor must be callable, got {type(predictor).__name__}")
    sw_dev = _device(sw_device, "sw_device") or x.device
    out_dev = _device(device, "device") or x.device
    network = mirrored(predictor, mirror_axes)

    slices_2d = len(patch) == nd - 1
    if slices_2d:  # (N, C, D, H, W) -> (N * D, C, H, W): a 2D network slice by slice, nnU-Net's order
        n, c, depth = x.shape[:3]
        x = x.transpose(1, 2).reshape(n * depth, c, *x.shape[3:])
    image_size = tuple(x.shape[2:])
    pad = _symmetric_padding(image_size, patch)
    if any(pad):
        x = F.pad(x, pad=pad, mode="constant", value=0.0)
    padded = tuple(x.shape[2:])
    key = ("nnunet", use_gaussian, sigma_scale, value_scaling_factor, dtype)
    weight = _weight_map(key, patch, sw_dev, lambda: ref.nnunet_gaussian(patch, sigma_scale, value_scaling_factor,
                                                                         dtype, sw_dev) if use_gaussian else
                         torch.ones(patch, dtype=dtype, device=sw_dev))
    plan = _Plan(ref.nnunet_grid(padded, patch, step_size), output, dtype, dtype, out_dev, sw_dev)
    _keys, results = _run(x, plan, sw_batch_size, network, weight, key, progress=progress)
    if len(results) != 1:
        raise ValueError(f"the network must return one output (or a deep-supervision list), got {len(results)}")
    result = _crop(results[0], pad, image_size, patch) if any(pad) else results[0]
    if slices_2d:
        result = result.reshape(n, depth, *result.shape[1:]).transpose(1, 2).contiguous()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and `python -m fastmed predict`
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "fastmed-checkpoint"
CHECKPOINT_VERSION = 1
NORMALIZATIONS = ("none", "zscore")


def save_checkpoint(path: str, model: Union[str, torch.nn.Module], model_args: Sequence = (),
                    model_kwargs: Optional[Mapping] = None, *, state_dict: Optional[Mapping] = None,
                    classes: Optional[Sequence[str]] = None, roi_size: Optional[Sequence[int]] = None,
                    normalize: str = "none", resize: Optional[Sequence[int]] = None, overlap: float = 0.5,
                    mode: str = "gaussian") -> str:
    """Write a fastmed model checkpoint (``torch.save``; readable with ``torch.load(weights_only=True)``).

    The file is a dict::

        {"format": "fastmed-checkpoint", "version": 1,
         "model": {"class": "UNet", "args": [3, 1, 3], "kwargs": {...}},   # a class of fastmed.models
         "state_dict": {name: tensor},
         "classes": ["background", ...],
         "preprocessing": {"normalize": "none" | "zscore",              # z-score per channel and volume
                           "resize": None | [D, H, W]},                  # volumes resized (trilinear) to this
         "inference": {"roi_size": [..], "overlap": 0.5, "mode": "gaussian"}}

    ``model``: a module whose class is in :mod:`fastmed.models` (its ``state_dict`` is saved unless one is
    given), or the class name with ``state_dict`` (e.g. converted from nnU-Net or MONAI with
    :mod:`fastmed.convert`).  ``model_args``/``model_kwargs`` rebuild it: ``fastmed.models.<class>(*args,
    **kwargs)``, plain Python values only.  Returns ``path``."""
    import fastmed.models as models

    name = model if isinstance(model, str) else type(model).__name__
    if not isinstance(getattr(models, name, None), type) or name not in models.__all__:
        raise ValueError(f"model must be a class of fastmed.models ({', '.join(models.__all__)}) or an instance, "
                         f"got {name!r}")
    if state_dict is None:
        if isinstance(model, str):
            raise ValueError("state_dict is required when model is given by its class name")
        state_dict = model.state_dict()
    normalize = check_mode(normalize, "normalize", NORMALIZATIONS)
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": {"class": name, "args": list(model_args), "kwargs": dict(model_kwargs or {})},
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "classes": list(classes) if classes is not None else None,
            "preprocessing": {"normalize": normalize, "resize": list(resize) if resize is not None else None},
            "inference": {"roi_size": list(roi_size) if roi_size is not None else None, "overlap": float(overlap),
                          "mode": check_mode(mode, "mode", BLEND_MODES)}}
    torch.save(ckpt, path)
    return path


def load_checkpoint(path: str, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs from the file);
    returns the model (eval mode) and the checkpoint dict."""
    import fastmed.models as models

    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fastmed checkpoint (a dict with format={CHECKPOINT_FORMAT!r}, as "
                         f"fastmed.inference.save_checkpoint and `python -m fastmed demo` write)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, this fastmed reads "
                         f"version {CHECKPOINT_VERSION}")
    name = ckpt["model"]["class"]
    if name not in models.__all__ or not isinstance(getattr(models, name), type):
        raise ValueError(f"{path}: model class {name!r} is not one of fastmed.models ({', '.join(models.__all__)})")
    model = getattr(models, name)(*ckpt["model"]["args"], **ckpt["model"]["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def predict_volume(model: Callable[[Tensor], Any], volume: Tensor, ckpt: Mapping, *, sw_batch_size: int = 1,
                   device: Optional[torch.device] = None, progress: bool = False,
                   overlap: Optional[float] = None) -> Tensor:
    """Labels ``(*spatial)`` uint8 of one volume ``(C, *spatial)`` with the checkpoint's preprocessing and
    window settings: normalize, resize (then the labels are resized back by nearest neighbour), sliding
    windows of ``roi_size`` (default: the whole volume), argmax on the fly."""
    prep, inf = ckpt["preprocessing"], ckpt["inference"]
    x = volume.float()
    if prep["normalize"] == "zscore":
        axes = tuple(range(1, x.dim()))
        x = (x - x.mean(dim=axes, keepdim=True)) / x.std(dim=axes, keepdim=True).clamp_min(1e-6)
    size = tuple(x.shape[1:])
    if prep["resize"] is not None:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 1]
        x = F.interpolate(x[None], size=tuple(prep["resize"]), mode=mode, align_corners=False)[0]
    dev = device or torch.device("cpu")
    roi = inf["roi_size"] or list(x.shape[1:])
    with torch.no_grad():
        labels = sliding_window_inference(x[None].to(dev), roi, sw_batch_size, lambda w: _first(model(w)),
                                          inf["overlap"] if overlap is None else overlap, inf["mode"],
                                          progress=progress, output="labels")[0, 0]
    if tuple(labels.shape) != size:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].to(ref.LABEL_DTYPE)
    return labels.cpu()


def main(argv: Optional[list] = None) -> int:
    """``python -m fastmed predict --model CKPT --input volume.nii.gz --out seg.nii.gz``."""
    parser = argparse.ArgumentParser(prog="python -m fastmed predict",
                                     description="Segment a NIfTI volume with a fastmed checkpoint (sliding "
                                                 "windows, Gaussian blending, argmax on the fly); the output keeps "
                                                 "the input's affine and header.")
    parser.add_argument("--model", required=True, help="checkpoint from `python -m fastmed demo` or "
                                                         "fastmed.inference.save_checkpoint")
    parser.add_argument("--input", required=True, help="NIfTI volume (3D, or 4D with channels on the last axis)")
    parser.add_argument("--out", required=True, help="output NIfTI label map (uint8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per network call (default 1)")
    parser.add_argument("--overlap", type=float, default=None, help="window overlap (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.sw_batch_size < 1:
        parser.error(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    try:
        import nibabel as nib
    except ImportError:
        parser.error("predict reads and writes NIfTI through nibabel: pip install nibabel")
    for flag, path in (("--model", args.model), ("--input", args.input)):
        if not os.path.isfile(path):
            parser.error(f"{flag}: no such file {path!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here")
    try:
        model, ckpt = load_checkpoint(args.model)
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    model = model.to(device)
    img = nib.load(args.input)
    data = torch.as_tensor(img.get_fdata(dtype="float32"))
    if data.dim() == 3:
        data = data[None]
    elif data.dim() == 4:
        data = data.permute(3, 0, 1, 2)
    else:
        parser.error(f"--input must be a 3D volume (or 4D with channels last), got shape {tuple(data.shape)}")
    labels = predict_volume(model, data, ckpt, sw_batch_size=args.sw_batch_size, device=device,
                            progress=not args.no_progress, overlap=args.overlap)
    header = img.header.copy()
    header.set_data_dtype("uint8")
    if data.shape[0] > 1:  # 4D input: the label map is 3D
        header.set_data_shape(labels.shape)
    out = nib.Nifti1Image(labels.numpy(), img.affine, header)
    nib.save(out, args.out)
    classes = ckpt.get("classes") or []
    counts = torch.bincount(labels.flatten().long(), minlength=len(classes)).tolist()
    summary = ", ".join(f"{classes[i] if i < len(classes) else i}: {n}" for i, n in enumerate(counts))
    print(f"wrote {args.out}: labels of shape {tuple(labels.shape)} ({summary} voxels)")
    return 0
