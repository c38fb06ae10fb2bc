"""Sliding-window inference: Triton kernels and launchers of the fused accumulation and normalization.

Shapes (see :mod:`fastmed.reference.sliding_window`): an accumulation buffer ``(N, C, R, Y, X)`` whose z axis is a
ring of ``R`` rows (image row ``z`` in buffer row ``z % R``), window predictions ``(K, C, wz, wy, wx)``, a weight
map ``(wz, wy, wx)``, and the normalizer table ``(wz, wy, X)`` with the covering windows of each image row.

``_accumulate_kernel``: one launch per window (windows of a batch overlap, and nothing may race: no atomics), a
program per (window row (dz, dy), block of x, block of channels): ``buffer += weight * patch`` read, computed in
the accumulation dtype and written once.

``_finalize_kernel``: a program per (image row (z, y), block of x, sample): the summed weights of the row block from
the table (a handful of covering windows, read from cache), then for every channel ``buffer / norm`` into the
result (``OUTPUT == "values"``) or the running argmax over channels (``OUTPUT == "labels"``, first maximum,
NaN counts as the maximum, as ``torch.argmax``); optionally zeroes the buffer rows it read (``ZERO``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import accumulation_dtype, device_guard
from fastmed.reference.sliding_window import WindowNormalizer

_TILE = 1024  # values per program (a [BLOCK_Y, BLOCK_X] tile),
_WARPS = 8    # 4 per thread: the 64-bit addresses of a wider share spill in the finalize kernel


@triton.jit
def _accumulate_kernel(
    buf_ptr,    # shape (N, C, R, Y, X), strides (sbn, sbc, sbz, sby, sbx); image row z in buffer row z % R
    patch_ptr,  # shape (C, wz, wy, wx), strides (spc, spz, spy, spx): one window
    w_ptr,      # shape (wz, wy, wx), strides (swz, swy, swx)
    n, z0, y0, x0, C, R, wy, wx, tiles_x,
    sbn, sbc, sbz, sby, sbx, spc, spz, spy, spx, swz, swy, swx,
    F64: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    ACC = tl.float64 if F64 else tl.float32  # the accumulation dtype: float64 for float64 buffers
    dz = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    dy = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    dx = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    m = (dy[:, None] < wy) & (dx[None, :] < wx)
    w = tl.load(w_ptr + dz * swz + dy[:, None] * swy + dx[None, :] * swx, mask=m, other=0.0).to(ACC)
    src = patch_ptr + dz * spz + dy[:, None] * spy + dx[None, :] * spx
    dst = buf_ptr + n * sbn + ((z0 + dz) % R) * sbz + (y0 + dy)[:, None] * sby + (x0 + dx)[None, :] * sbx
    for c in range(C):
        p = tl.load(src + c * spc, mask=m, other=0.0).to(ACC)
        old = tl.load(dst + c * sbc, mask=m, other=0.0).to(ACC)
        tl.store(dst + c * sbc, (old + w * p).to(buf_ptr.dtype.element_ty), mask=m)


@triton.jit
def _finalize_kernel(
    buf_ptr,    # shape (N, C, R, Y, X), strides (sbn, sbc, sbz, sby, sbx)
    out_ptr,    # shape (N, C or 1, Z, Y, X), strides (son, soc, soz, soy, sox); may be buf_ptr (in place)
    tab_ptr,    # shape (wz, wy, X), strides (stz, sty, stx), accumulation dtype: summed weights along x
    sz_ptr,     # shape (nz,) int32 window starts along z
    sy_ptr,     # shape (ny,) int32 window starts along y
    fz_ptr,     # shape (Z,) int32 first window covering each image row z
    cz_ptr,     # shape (Z,) int32 number of windows covering it
    fy_ptr,     # shape (Y,) int32
    cy_ptr,     # shape (Y,) int32
    z_lo, C, R, Y, X, max_cy, tiles_x,
    sbn, sbc, sbz, sby, sbx, son, soc, soz, soy, sox, stz, sty, stx,
    OUTPUT: tl.constexpr, ZERO: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    z = z_lo + tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    y = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    x = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    my = y < Y
    m = my[:, None] & (x[None, :] < X)
    acc_ty = tab_ptr.dtype.element_ty
    first_z = tl.load(fz_ptr + z).to(tl.int64)
    count_z = tl.load(cz_ptr + z)
    first_y = tl.load(fy_ptr + y, mask=my, other=0).to(tl.int64)
    count_y = tl.load(cy_ptr + y, mask=my, other=0)
    norm = tl.zeros((BLOCK_Y, BLOCK_X), dtype=acc_ty)
    for j in range(count_z):
        dz = z - tl.load(sz_ptr + first_z + j).to(tl.int64)
        for k in range(max_cy):  # rows of the tile are covered by up to max_cy windows along y
            mk = my & (k < count_y)
            dy = y - tl.load(sy_ptr + first_y + k, mask=mk, other=0).to(tl.int64)
            mt = mk[:, None] & (x[None, :] < X)
            norm += tl.load(tab_ptr + dz * stz + dy[:, None] * sty + x[None, :] * stx, mask=mt, other=0.0)
    norm = tl.where(m, norm, 1.0)
    src = buf_ptr + n * sbn + (z % R) * sbz + y[:, None] * sby + x[None, :] * sbx
    dst = out_ptr + n * son + z * soz + y[:, None] * soy + x[None, :] * sox
    if OUTPUT == "labels":
        best = tl.full((BLOCK_Y, BLOCK_X), float("-inf"), dtype=acc_ty)
        label = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.int32)
        for c in range(C):
            v = tl.load(src + c * sbc, mask=m, other=0.0).to(acc_ty) / norm
            take = (v > best) | ((v != v) & (best == best))  # NaN beats everything, and stays
            best = tl.where(take, v, best)
            label = tl.where(take, c, label)
            if ZERO:
                tl.store(src + c * sbc, tl.zeros((BLOCK_Y, BLOCK_X), dtype=buf_ptr.dtype.element_ty), mask=m)
        tl.store(dst, label.to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.static_assert(OUTPUT == "values", "OUTPUT must be a name of fastmed.reference.sliding_window.OUTPUTS")
        for c in range(C):
            v = tl.load(src + c * sbc, mask=m, other=0.0).to(acc_ty) / norm
            if ZERO:
                tl.store(src + c * sbc, tl.zeros((BLOCK_Y, BLOCK_X), dtype=buf_ptr.dtype.element_ty), mask=m)
            tl.store(dst + c * soc, v.to(out_ptr.dtype.element_ty), mask=m)


def _tile(y: int, x: int, elements: int) -> tuple[int, int]:
    """A (BLOCK_Y, BLOCK_X) tile of about ``elements`` values: x as wide as the rows (up to 128), then y."""
    bx = max(16, min(triton.next_power_of_2(x), 128))
    by = max(1, min(triton.next_power_of_2(y), elements // bx))
    return by, bx


def sliding_window_accumulate(buffer: torch.Tensor, patches: torch.Tensor, weight: torch.Tensor,
                              origins: Sequence[int]) -> None:
    """In place: window ``k`` of ``patches`` ``(K, C, wz, wy, wx)`` times ``weight`` ``(wz, wy, wx)`` added to
    ``buffer`` ``(N, C, R, Y, X)`` at ``origins[4k:4k+4] = (n, z, y, x)``, one launch per window in order."""
    K, C, wz, wy, wx = patches.shape
    R = buffer.shape[2]
    by, bx = _tile(wy, wx, _TILE)
    tiles_x = triton.cdiv(wx, bx)
    grid = (wz, triton.cdiv(wy, by) * tiles_x)
    f64 = accumulation_dtype(buffer.dtype) == torch.float64
    with device_guard(buffer):
        for k in range(K):
            n, z, y, x = origins[4 * k:4 * k + 4]
            p = patches[k]
            wrap_triton(_accumulate_kernel)[grid](
                buffer, p, weight, n, z, y, x, C, R, wy, wx, tiles_x, *buffer.stride(), *p.stride(),
                *weight.stride(), F64=f64, BLOCK_Y=by, BLOCK_X=bx, num_warps=_WARPS)


def sliding_window_finalize(buffer: torch.Tensor, norm: WindowNormalizer, window_zy: tuple[int, int], z_lo: int,
                            z_hi: int, result: Optional[torch.Tensor], output: str, zero_buffer: bool) -> None:
    """Image rows ``[z_lo, z_hi)`` of ``buffer`` divided by the summed weights (or their argmax over channels)
    into ``result`` (or into the buffer itself when ``result`` is None); see
    :func:`fastmed.reference.sliding_window.finalize`."""
    N, C, R, Y, X = buffer.shape
    out = buffer if result is None else result
    by, bx = _tile(Y, X, _TILE)
    tiles_x = triton.cdiv(X, bx)
    max_cy = norm.max_count_y  # a host int: no read-back of count_y
    grid = (z_hi - z_lo, triton.cdiv(Y, by) * tiles_x, N)
    with device_guard(buffer):
        wrap_triton(_finalize_kernel)[grid](
            buffer, out, norm.table, norm.starts_z, norm.starts_y, norm.first_z, norm.count_z, norm.first_y,
            norm.count_y, z_lo, C, R, Y, X, max_cy, tiles_x, *buffer.stride(), *out.stride(),
            *norm.table.stride(),
            OUTPUT=output, ZERO=zero_buffer, BLOCK_Y=by, BLOCK_X=bx, num_warps=_WARPS)
