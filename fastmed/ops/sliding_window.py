"""``fastmed.ops.sliding_window_accumulate`` / ``sliding_window_finalize``: the blending step of sliding-window
inference (:mod:`fastmed.inference` runs the windows), fused.

* accumulate: ``buffer += weight * patch`` for each window, in one pass over the window (read patch, weight and
  buffer, write buffer), in the accumulation dtype; the buffer may be float32, float64, bfloat16 or float16, and
  its z axis is a ring (a band of rows that slides down the volume).
* finalize: for a range of image rows, the summed weights from the normalizer table (computed once per geometry,
  :func:`fastmed.reference.sliding_window.window_normalizer`), then ``buffer / norm`` in place or into a result of
  another dtype, or the argmax over channels into ``uint8`` labels; optionally zeroing the rows read.

Registered as the torch.library ops ``fastmed::sliding_window_accumulate`` (``triton_op``; outside torch.compile the
body runs directly, :mod:`fastmed.ops._direct`) and
``fastmed::sliding_window_finalize`` (``custom_op`` with a fake implementation: its reference body reads the
window starts as Python ints), mutating their buffers, returning nothing.  Inference only: no autograd.
Backends: ``triton`` (kernels/sliding_window.py), ``cpp`` (csrc/sliding_window_cpu.cpp: the CPU path when
``fastmed._C`` is built, one pass per window and one per finalized row, threaded, bit-identical for any number of
threads; traced calls run the reference) and ``reference`` (fastmed/reference/sliding_window.py, in-place torch: one
``addcmul_`` per window).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from fastmed import _backend, _ext
from fastmed._tensors import accumulation_dtype, traced
from fastmed._validate import check_mode, check_same_device, check_tensor
from fastmed.ops import _direct
from fastmed.reference import sliding_window as ref
from fastmed.reference.sliding_window import OUTPUTS, WindowNormalizer

__all__ = ["sliding_window_accumulate", "sliding_window_finalize", "OUTPUTS"]

_backend.register_op("sliding_window", ("triton", "cpp", "reference"),
                     doc="sliding-window inference: fused weighted accumulation and normalization / argmax")


def _cpp_accumulate(buffer: Tensor, patches: Tensor, weight: Tensor, origins: Sequence[int]) -> None:
    """``cpp`` backend (CPU): csrc/sliding_window_cpu.cpp, the windows in order, each in one threaded pass; traced
    calls run :func:`fastmed.reference.sliding_window.accumulate`."""
    if any(traced(t) for t in (buffer, patches, weight)):
        ref.accumulate(buffer, patches, weight, origins)
        return
    _ext.load().sliding_window_accumulate_cpu(buffer, patches, weight.to(accumulation_dtype(buffer.dtype)),
                                              list(origins))


def _cpp_finalize(buffer: Tensor, norm: WindowNormalizer, window_zy: tuple[int, int], z_lo: int, z_hi: int,
                  result: Optional[Tensor], output: str, zero_buffer: bool) -> None:
    """``cpp`` backend (CPU): csrc/sliding_window_cpu.cpp, one threaded pass over the rows (the normalizer row
    summed once per (n, z, y) row, as the reference sums it); traced calls run the reference."""
    if any(traced(t) for t in (buffer, result, norm.table) if t is not None):
        ref.finalize(buffer, norm, window_zy, z_lo, z_hi, result, output, zero_buffer)
        return
    index = [t.to(torch.int32).contiguous() for t in (norm.starts_z, norm.starts_y, norm.first_z, norm.count_z,
                                                       norm.first_y, norm.count_y)]
    _ext.load().sliding_window_finalize_cpu(buffer, result, norm.table, *index, z_lo, z_hi, output, zero_buffer)


# Bodies: accumulate(buffer, patches, weight, origins) -> None;
# finalize(buffer, WindowNormalizer, (wz, wy), z_lo, z_hi, result or None, output, zero_buffer) -> None.
_ACCUMULATE = _backend.Implementations("sliding_window", "fastmed::sliding_window_accumulate",
                                       triton="fastmed.kernels.sliding_window:sliding_window_accumulate",
                                       cpp=_cpp_accumulate, reference=ref.accumulate)
_FINALIZE = _backend.Implementations("sliding_window", "fastmed::sliding_window_finalize",
                                     triton="fastmed.kernels.sliding_window:sliding_window_finalize",
                                     cpp=_cpp_finalize, reference=ref.finalize)


@_direct.triton_op("fastmed::sliding_window_accumulate", mutates_args=("buffer",))
def _accumulate_op(buffer: Tensor, patches: Tensor, weight: Tensor, origins: list[int], backend: str) -> None:
    _ACCUMULATE[backend](buffer, patches, weight, origins)


@torch.library.custom_op("fastmed::sliding_window_finalize", mutates_args=("buffer", "result"))
def _finalize_op(buffer: Tensor, result: Optional[Tensor], table: Tensor, starts_z: Tensor, starts_y: Tensor,
                 first_z: Tensor, count_z: Tensor, first_y: Tensor, count_y: Tensor, max_count_y: int, window_z: int,
                 window_y: int, z_lo: int, z_hi: int, output: str, zero_buffer: bool, backend: str) -> None:
    norm = WindowNormalizer(table, starts_z, starts_y, first_z, count_z, first_y, count_y, max_count_y)
    _FINALIZE[backend](buffer, norm, (window_z, window_y), z_lo, z_hi, result, output, zero_buffer)


@_finalize_op.register_fake
def _(buffer, result, table, starts_z, starts_y, first_z, count_z, first_y, count_y, max_count_y, window_z, window_y,
      z_lo, z_hi, output, zero_buffer, backend) -> None:
    """Nothing to compute on fake tensors: the op only writes into its arguments.  (A ``custom_op``, opaque to
    torch.compile, rather than a ``triton_op``: the reference body reads the window starts as Python ints, which
    traced tensors do not have.)"""


def _call(op, *args) -> None:
    """The op under torch.compile, else its body for the backend named by the last argument (no torch.library
    dispatch; there is no autograd to route)."""
    (op if torch.compiler.is_compiling() else _direct.body(op, args[-1]))(*args)


def _accumulate_unchecked(buffer: Tensor, patches: Tensor, weight: Tensor, origins: list[int], backend: str) -> None:
    """:func:`sliding_window_accumulate` with ``backend`` chosen by the caller and no argument checks: for
    :mod:`fastmed.inference`, whose engine builds the windows itself (one call per window batch, or per tile piece
    of a window, where the checks would cost more than the blending at small windows)."""
    _call(_accumulate_op, buffer, patches, weight, origins, backend)


def _finalize_unchecked(buffer: Tensor, normalizer: WindowNormalizer, window: Sequence[int], z_lo: int, z_hi: int,
                        result: Optional[Tensor], output: str, zero_buffer: bool, backend: str) -> None:
    """:func:`sliding_window_finalize` likewise, for :mod:`fastmed.inference`."""
    _call(_finalize_op, buffer, result, *normalizer, int(window[0]), int(window[1]), int(z_lo), int(z_hi), output,
          bool(zero_buffer), backend)


def _check_buffer(buffer) -> None:
    check_tensor(buffer, "buffer", min_ndim=5, max_ndim=5)


def sliding_window_accumulate(buffer: Tensor, patches: Tensor, weight: Tensor, origins: Sequence[int]) -> None:
    """In place: ``buffer[n, :, (z + dz) % R, y + dy, x + dx] += weight[dz, dy, dx] * patches[k, :, dz, dy, dx]`` for
    each window ``k`` in order, with ``(n, z, y, x) = origins[4k:4k+4]``; computed in float32 (float64 for a
    float64 buffer) and stored in the buffer's dtype.

    Args:
        buffer: ``(N, C, R, Y, X)`` accumulation buffer, float16/bfloat16/float32/float64, any strides; its z axis
            is a ring of ``R`` rows (image row z in buffer row ``z % R``; ``R`` = the image depth for a whole
            volume).
        patches: ``(K, C, wz, wy, wx)`` window predictions, any float dtype and strides, on the buffer's device.
        weight: ``(wz, wy, wx)`` importance map, any float dtype.
        origins: ``4 K`` ints, per window the sample ``n`` and the image coordinates of its first voxel.  Windows
            must lie inside the buffer (``0 <= z``, ``wz <= R``, ``y + wy <= Y``, ``x + wx <= X``).
    """
    _check_buffer(buffer)
    check_tensor(patches, "patches", min_ndim=5, max_ndim=5)
    check_tensor(weight, "weight", min_ndim=3, max_ndim=3)
    N, C, R, Y, X = buffer.shape
    K, Cp, wz, wy, wx = patches.shape
    if Cp != C:
        raise ValueError(f"patches must have the {C} channels of buffer, got patches of shape {tuple(patches.shape)}")
    if tuple(weight.shape) != (wz, wy, wx):
        raise ValueError(f"weight must have the window shape {(wz, wy, wx)} of patches, got {tuple(weight.shape)}")
    if wz > R:
        raise ValueError(f"windows of {wz} rows do not fit the {R} rows of buffer (shape {tuple(buffer.shape)})")
    if (isinstance(origins, (str, bytes)) or not isinstance(origins, Sequence) or len(origins) != 4 * K
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in origins)):
        raise ValueError(f"origins must be 4 ints (n, z, y, x) per window, {4 * K} ints for {K} windows, "
                         f"got {origins!r}")
    origins = [int(v) for v in origins]
    for k in range(K):
        n, z, y, x = origins[4 * k:4 * k + 4]
        if not (0 <= n < N and z >= 0 and 0 <= y <= Y - wy and 0 <= x <= X - wx):
            raise ValueError(f"origins: window {k} at (n, z, y, x) = {(n, z, y, x)} of size {(wz, wy, wx)} is not "
                             f"inside buffer of shape {tuple(buffer.shape)}")
    device = check_same_device(buffer=buffer, patches=patches, weight=weight)
    if K == 0:
        return
    _accumulate_unchecked(buffer, patches, weight, origins, _backend.choose("sliding_window", device))


def sliding_window_finalize(buffer: Tensor, normalizer: WindowNormalizer, window: Sequence[int], z_lo: int,
                            z_hi: int, *, result: Optional[Tensor] = None, output: str = "values",
                            zero_buffer: bool = False) -> None:
    """Finish image rows ``[z_lo, z_hi)`` of an accumulation buffer: divide by the summed window weights (in
    place, or into ``result``), or take the argmax over channels into ``result``.

    Args:
        buffer: ``(N, C, R, Y, X)`` accumulation buffer (ring of ``R`` rows, see
            :func:`sliding_window_accumulate`).
        normalizer: :func:`fastmed.reference.sliding_window.window_normalizer` of the window grid, on the buffer's
            device; its table is in the buffer's accumulation dtype.
        window: ``(wz, wy)``, the window size along z and y (the table's first two sizes).
        z_lo, z_hi: image rows, ``0 <= z_lo < z_hi <= Z`` (the grid's depth), at most ``R`` rows.
        result: None (``output="values"`` only: normalize the buffer in place), or ``(N, C, Z, Y, X)`` float
            (``"values"``, any float dtype) / ``(N, 1, Z, Y, X)`` uint8 (``"labels"``).
        output: ``"values"`` (blended predictions) or ``"labels"`` (argmax over channels: the first maximum, NaN
            counts as the maximum, as ``torch.argmax``).
        zero_buffer: zero the buffer rows read, so that the band can take the next rows.
    """
    _check_buffer(buffer)
    output = check_mode(output, "output", OUTPUTS)
    if not isinstance(normalizer, WindowNormalizer):
        raise TypeError(f"normalizer must be a WindowNormalizer (fastmed.reference.sliding_window."
                        f"window_normalizer), got {type(normalizer).__name__}")
    N, C, R, Y, X = buffer.shape
    table = normalizer.table
    Z = normalizer.first_z.shape[0]
    wz, wy = (int(v) for v in window)
    if table.dim() != 3 or tuple(table.shape) != (wz, wy, X) or normalizer.first_y.shape[0] != Y:
        raise ValueError(f"normalizer (table {tuple(table.shape)}, {Z} x {normalizer.first_y.shape[0]} rows) does "
                         f"not fit window {(wz, wy)} and buffer of shape {tuple(buffer.shape)}")
    if table.dtype != accumulation_dtype(buffer.dtype):
        raise TypeError(f"normalizer.table must be in the accumulation dtype {accumulation_dtype(buffer.dtype)} of "
                        f"buffer, got {table.dtype}")
    if not (isinstance(z_lo, numbers.Integral) and isinstance(z_hi, numbers.Integral)
            and 0 <= z_lo < z_hi <= Z and z_hi - z_lo <= R):
        raise ValueError(f"z_lo, z_hi must be image rows with 0 <= z_lo < z_hi <= {Z} and at most {R} rows (the "
                         f"buffer's ring), got {z_lo}, {z_hi}")
    if result is None:
        if output == "labels":
            raise ValueError("output='labels' needs a result tensor (N, 1, Z, Y, X) of dtype uint8")
        if R != Z:
            raise ValueError(f"result=None normalizes the buffer in place, which needs a whole-volume buffer "
                             f"({Z} rows), got {R} rows")
    else:
        channels, dtype = (1, ref.LABEL_DTYPE) if output == "labels" else (C, None)
        check_tensor(result, "result", floating=output == "values", min_ndim=5, max_ndim=5)
        if tuple(result.shape) != (N, channels, Z, Y, X):
            raise ValueError(f"result must have shape {(N, channels, Z, Y, X)} for output={output!r}, got "
                             f"{tuple(result.shape)}")
        if dtype is not None and result.dtype != dtype:
            raise TypeError(f"result must be {dtype} for output='labels', got {result.dtype}")
        if output == "labels" and C > ref.MAX_LABEL_CHANNELS:
            raise ValueError(f"output='labels' stores labels in {ref.LABEL_DTYPE}, at most {ref.MAX_LABEL_CHANNELS} "
                             f"channels; buffer has {C}")
    device = check_same_device(buffer=buffer, result=result, **normalizer._asdict())
    _finalize_unchecked(buffer, normalizer, (wz, wy), z_lo, z_hi, result, output, zero_buffer,
                        _backend.choose("sliding_window", device))
