"""(Shifted-)window attention: Triton kernels and launchers.

Everything works on the token grid ``(B, D, H, W, ...)`` (2D grids have ``D = 1``), contiguous.  Windows tile
the grid padded at the end of each axis up to a multiple of the window (``Dp, Hp, Wp``, MONAI's padding); padding
tokens are never stored: their k and v are read from a pad vector (the qkv Linear's bias) or are zero.  A
*window* ``wi`` in ``[0, B * nW)`` and a token ``t`` in ``[0, N)`` of that window (raster order inside the window,
``N = WD * WH * WW``) address the grid by index arithmetic alone:

* rolled-frame coordinate ``y = window_coord * w + local_coord``; the cyclic shift reads source
  ``(y + shift) mod S`` and the output is stored at that same source token, which undoes partition and
  roll together (no copies);
* shift-region id per axis ``(y >= S - w) + (y >= S - shift)``; scores between tokens of different regions
  get ``-100`` (the anchors' constant), so no mask tensor exists;
* relative position bias: gathered once per call into a dense ``(heads, N, N)`` tensor in the accumulation dtype
  (:func:`_bias_kernel`; the token index is unravelled over ``BD, BH, BW`` (the effective window, or the table's
  window for MONAI's ``index[:n, :n]`` when a window shrinks) and the table row is
  ``(dd + TWD - 1) * (2TWH - 1)(2TWW - 1) + (dh + TWH - 1)(2TWW - 1) + (dw + TWW - 1)``); the attention kernels
  read it as ``[BLOCK_M, BLOCK_N]`` blocks (it stays in L2: every window of a call shares it).

Grids: windows (or groups of windows, times tiles) always on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 stop at
65,535: 66 3D volumes of 64^3 tokens already have 66,000 windows of 7^3); heads on axis 1.  :func:`launch_plan`
computes every launch (grid, constexprs, warps) from the sizes alone, so tests check the grids at sizes no CPU
could run and compile exactly the specializations the launchers pick.

Argument groups of the device helpers (tuples; the kernels' own signatures stay flat):
  ``geo``   = ``(windows, grid, shift, padded)``: windows per axis ``(nWd, nWh, nWw)``, the real token grid
              ``(D, H, W)``, the cyclic shift ``(shd, shh, shw)`` and the padded grid ``(Dp, Hp, Wp)``;
  ``hs``    = ``(head, heads, ch, d_ok, C)``: this program's head, the head count, the head's channel offsets
              inside a C-wide row (``BLOCK_D`` of them), their mask, and C;
  ``attn``  = ``(bias_ptr, N, scale)``: this head's dense ``(N, N)`` bias, the window's tokens and the scale;
  ``rows`` / ``cols`` = ``(t, tok, valid, region)``: in-window indices, grid tokens, real (not padding) flags and
              shift regions of a block of queries / keys (:func:`_tokens`).

Kernels:
  ``_bias_kernel``         table ``(T, heads)`` -> dense bias ``(heads, N, N)``.
  ``_fwd_kernel``          per (window, block of BLOCK_M queries, head): keys in tiles of BLOCK_N with an online
                           softmax (16-bit inputs: 49 tokens are one 64-tile, 343 tokens 6; float32 tiles are
                           16 wide, float64 ones 32: see :func:`launch_plan`); out and the per-row
                           logsumexp.
  ``_bwd_tile_kernel``     one tile holds the window (N <= BLOCK): per (group of windows, head), for each window P is
                           recomputed from the logsumexp, dP = dO V^T, delta = rowsum(P * dP) (= rowsum(dO * O),
                           so the forward's output is not needed), dS = P * (dP - delta), then dV = P^T dO,
                           dK = dS^T Q, dQ = dS K: qkv and dO are read once, dqkv written once; dS summed over the
                           group's windows is the group's bias-gradient partial (registers).
  ``_bwd_tiled_kernel``    N > BLOCK: per (window, head): a first sweep over the tiles computes delta per query
                           row (stored per token); a second sweep, key blocks outer and query blocks inner,
                           accumulates dK, dV in registers and dQ in an fp32 buffer that only this program
                           touches (read-modify-write, no atomics).
  ``_bwd_dbias_kernel``    N > BLOCK with a table: per (group of windows, query block x key block, head), dS of
                           that tile summed over the group's windows (delta from ``_bwd_tiled_kernel``).
  ``_dbias_reduce_kernel`` the group partials summed in a fixed order, one program per BLOCK_E elements of
                           ``(heads, N, N)`` (a wide reduction).
  ``_dtable_kernel``       ``(heads, N, N)`` -> table gradient ``(T, heads)``: each table row sums the pairs with its
                           relative offset, in a fixed order.  Deterministic; no atomics anywhere.
  Padding keys (MONAI padding) collect dK, dV per program; their sum over programs is d(qkv_pad).

Pointer arguments of the attention kernels (contiguous; "acc": the accumulation dtype):
  ``qkv_ptr``, ``dqkv_ptr`` ``(B, D, H, W, 3C)``; ``out_ptr``, ``dout_ptr`` ``(B, D, H, W, C)``;
  ``lse_ptr``, ``delta_ptr`` ``(B, D, H, W, heads)``, acc (``_bwd_tiled_kernel`` writes delta = rowsum(P * dP));
  ``pad_ptr`` ``(3C,)``: qkv of a padding token (PAD == "vector");
  ``bias_ptr`` the dense bias (HAS_BIAS), acc: ``(classes, heads, NP, NP)`` (``_bwd_tile_kernel``: NP = BLOCK),
  ``(heads, NP, NP)`` for ``_bwd_tiled_kernel`` and ``_bwd_dbias_kernel``;
  ``part_ptr`` ``(G, heads, NP, NP)``, acc: dS summed over each group's windows (DBIAS);
  ``ppad_ptr`` ``(G or n_windows, heads, 2, HEAD_DIM)``, acc: dk, dv summed over padding keys (PAD == "vector");
  ``dq_ptr`` ``(B, D, H, W, C)`` with row stride ``dq_row``, acc: ``_bwd_tiled_kernel`` accumulates dQ there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import accumulation_dtype, device_guard, target_programs
from fastmed.reference import window_attention as ref

from ._common import online_softmax_step

MASK_VALUE = tl.constexpr(ref.MASK_VALUE)  # the anchors' constant between shift regions

# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _head(C, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``hs`` of this program's head (program axis 1): ``(head, heads, ch, d_ok, C)`` (in-sample offsets: int32)."""
    dd = tl.arange(0, BLOCK_D)
    head = tl.program_id(1)
    return head, tl.num_programs(1), head * HEAD_DIM + dd, dd < HEAD_DIM, C


@triton.jit
def _geo_head(Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(geo, hs)`` of the attention kernels from their flat scalar arguments (see the module's docstring)."""
    return ((nWd, nWh, nWw), (D, H, W), (shd, shh, shw), (Dp, Hp, Wp)), _head(C, HEAD_DIM, BLOCK_D)


@triton.jit
def _tokens(wi, t, geo, WINDOW: tl.constexpr, PAD: tl.constexpr, MASK: tl.constexpr):
    """Tokens ``t`` (int32) of window ``wi`` (int64): ``(t, token index inside the sample (int32), real (inside the
    window and the real grid, not padding), shift region, first token of the sample (int64))``.  Windows tile the
    padded grid; the data is the real grid."""
    windows, grid, shift, padded = geo
    nWd, nWh, nWw = windows
    Dp, Hp, Wp = padded
    D, H, W = grid
    shd, shh, shw = shift
    WD, WH, WW = WINDOW
    nw = nWd * nWh * nWw
    b = wi // nw
    r = (wi % nw).to(tl.int32)
    yd = (r // (nWh * nWw)) * WD + t // (WH * WW)
    yh = ((r // nWw) % nWh) * WH + (t // WW) % WH
    yw = (r % nWw) * WW + t % WW
    region = 0
    if MASK == "region":
        region = (((yd >= Dp - WD).to(tl.int32) + (yd >= Dp - shd).to(tl.int32)) * 9
                  + ((yh >= Hp - WH).to(tl.int32) + (yh >= Hp - shh).to(tl.int32)) * 3
                  + ((yw >= Wp - WW).to(tl.int32) + (yw >= Wp - shw).to(tl.int32)))
    if MASK != "none":
        yd = yd + shd  # (y + shift) mod S without a division: y < S and shift < S
        yh = yh + shh
        yw = yw + shw
        yd = tl.where(yd >= Dp, yd - Dp, yd)
        yh = tl.where(yh >= Hp, yh - Hp, yh)
        yw = tl.where(yw >= Wp, yw - Wp, yw)
    real = t < WD * WH * WW
    if PAD != "none":
        real = real & (yd < D) & (yh < H) & (yw < W)
    return t, (yd * H + yh) * W + yw, real, region, b * (D * H * W)


@triton.jit
def _window_class(wi, geo):
    """Shift class of window ``wi``: bit 2 / 1 / 0 set when it is the last window along D / H / W of a shifted
    axis (the only windows whose tokens come from two shift regions along that axis)."""
    windows, shift = geo[0], geo[2]
    nWd, nWh, nWw = windows
    shd, shh, shw = shift
    r = (wi % (nWd * nWh * nWw)).to(tl.int32)
    return ((((r // (nWh * nWw)) == nWd - 1) & (shd > 0)).to(tl.int32) * 4
            + ((((r // nWw) % nWh) == nWh - 1) & (shh > 0)).to(tl.int32) * 2
            + (((r % nWw) == nWw - 1) & (shw > 0)).to(tl.int32))


@triton.jit
def _load_part(qkv_ptr, pad_ptr, blk, hs, PART: tl.constexpr, N: tl.constexpr, FILL: tl.constexpr,
               CAST: tl.constexpr, ACC: tl.constexpr):
    """Part ``PART`` (0: q, 1: k, 2: v) of a block of tokens ``blk`` (:func:`_tokens`), ``[len(t), BLOCK_D]``.
    Padding tokens read the pad vector (FILL) or zeros; indices past the window read zeros."""
    t, tok, real, sb = blk[0], blk[1], blk[2], blk[4]
    ch, d_ok, C = hs[2], hs[3], hs[4]
    x = tl.load(qkv_ptr + sb * (3 * C) + (tok[:, None] * (3 * C) + PART * C + ch[None, :]),
                mask=real[:, None] & d_ok[None, :], other=0.0)
    if FILL:
        pad = tl.load(pad_ptr + PART * C + ch, mask=d_ok, other=0.0)
        x = tl.where(((t < N) & (real == 0))[:, None], pad[None, :], x)
    if CAST:
        x = x.to(ACC)
    return x


@triton.jit
def _row_ptrs(ptr, blk, hs, width):
    """Pointers ``[len(t), BLOCK_D]`` to this head's channels of rows ``width`` wide (C for dO, 3C for dqkv)."""
    tok, sb = blk[1], blk[4]
    ch = hs[2]
    return ptr + sb * width + (tok[:, None] * width + ch[None, :])


@triton.jit
def _stat_ptrs(ptr, blk, hs):
    """Pointers ``[len(t)]`` to this head's per-token statistic (lse, delta: ``heads`` per token)."""
    tok, sb = blk[1], blk[4]
    head, heads = hs[0], hs[1]
    return ptr + sb * heads + (tok * heads + head)


@triton.jit
def _load_grad_rows(dout_ptr, lse_ptr, blk, hs, CAST: tl.constexpr, ACC: tl.constexpr):
    """dO and the logsumexp of a block of query rows (zeros for padding and out-of-window rows)."""
    real = blk[2]
    d_ok, C = hs[3], hs[4]
    do = tl.load(_row_ptrs(dout_ptr, blk, hs, C), mask=real[:, None] & d_ok[None, :], other=0.0)
    if CAST:
        do = do.to(ACC)
    lse = tl.load(_stat_ptrs(lse_ptr, blk, hs), mask=real, other=0.0)
    return do, lse


@triton.jit
def _bias_tile(bias_ptr, tq, tk, NP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This head's dense bias ``(NP, NP)`` (zero-padded: no mask) at queries ``tq`` x keys ``tk``, or 0."""
    if HAS_BIAS:
        return tl.load(bias_ptr + (tq[:, None] * NP + tk[None, :]))
    else:
        return 0.0


@triton.jit
def _scores(q, k, bias, rows, cols, scale, N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
            ACC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scores q k^T * scale + bias (:func:`_bias_tile`, with the shift mask when MASK is
    "folded") + the shift mask from region ids (MASK "region") in ACC; keys past the window are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale + bias
    if MASK == "region":
        s = tl.where(rows[3][:, None] == cols[3][None, :], s, s + MASK_VALUE)
    return tl.where((cols[0] < N)[None, :], s, float("-inf"))


@triton.jit
def _p_dp(q, k, v, do, lse, bias, rows, cols, scale, N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
          ACC: tl.constexpr):
    """Recomputed P (zero for padding / out-of-window queries and out-of-window keys) and dP = dO V^T."""
    s = _scores(q, k, bias, rows, cols, scale, N, MASK, PREC, ACC)
    p = tl.where(rows[2][:, None], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
    return p, dp


@triton.jit
def _bias_kernel(
    table_ptr,  # shape (T, heads), strides (st0, st1) (HAS_TABLE)
    bias_ptr,   # shape (classes, heads, NP, NP), contiguous, accumulation dtype: zero outside (N, N)
    st0, st1, shd, shh, shw,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr, HAS_TABLE: tl.constexpr, MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    N: tl.constexpr = WD * WH * WW
    NP: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    head = tl.program_id(1)
    cls = tl.program_id(2)  # window shift class (:func:`_window_class`; one class unless MASK is "folded")
    i = e // NP
    j = e % NP
    ok = (i < N) & (j < N)
    b = tl.zeros([BLOCK_E], bias_ptr.dtype.element_ty)
    if HAS_TABLE:
        row = (((i // (BH * BW)) - (j // (BH * BW)) + TWD - 1) * ((2 * TWH - 1) * (2 * TWW - 1))
               + (((i // BW) % BH) - ((j // BW) % BH) + TWH - 1) * (2 * TWW - 1)
               + ((i % BW) - (j % BW) + TWW - 1))
        b += tl.load(table_ptr + row.to(tl.int64) * st0 + head * st1, mask=ok, other=0.0).to(b.dtype)
    if MASK == "folded":
        # inside the last window along a shifted axis, tokens at local coordinate >= w - shift come from the other
        # shift region: -100 between tokens on different sides, along any axis whose class bit is set
        differ = ((cls // 4 == 1) & (((i // (WH * WW)) >= WD - shd) != ((j // (WH * WW)) >= WD - shd))
                  | ((cls // 2) % 2 == 1) & ((((i // WW) % WH) >= WH - shh) != (((j // WW) % WH) >= WH - shh))
                  | (cls % 2 == 1) & (((i % WW) >= WW - shw) != ((j % WW) >= WW - shw)))
        b = tl.where(differ & ok, b + MASK_VALUE, b)
    tl.store(bias_ptr + (cls * tl.num_programs(1) + head) * NP * NP + e, b, mask=e < NP * NP)


@triton.jit
def _fwd_kernel(qkv_ptr, out_ptr, lse_ptr, bias_ptr, pad_ptr, Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw,
                scale, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr,
                HAS_BIAS: tl.constexpr, MASK: tl.constexpr, PAD: tl.constexpr, CAST: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointer arguments: see the module's docstring."""
    N: tl.constexpr = WD * WH * WW
    NP: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    acc_ty = lse_ptr.dtype.element_ty
    geo, hs = _geo_head(Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, HEAD_DIM, BLOCK_D)
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(N, BLOCK_M)
    wi = pid // n_mb
    cls = 0
    if MASK == "folded":
        cls = _window_class(wi, geo)
    bias_ptr += (cls * hs[1] + hs[0]) * NP * NP
    rows = _tokens(wi, (pid % n_mb).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M), geo, (WD, WH, WW), PAD,
                   MASK)
    q = _load_part(qkv_ptr, pad_ptr, rows, hs, 0, N, PAD == "vector", CAST, acc_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)
    l_i = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    for n0 in range(0, N, BLOCK_N):
        cols = _tokens(wi, n0 + tl.arange(0, BLOCK_N), geo, (WD, WH, WW), PAD, MASK)
        k = _load_part(qkv_ptr, pad_ptr, cols, hs, 1, N, PAD == "vector", CAST, acc_ty)
        v = _load_part(qkv_ptr, pad_ptr, cols, hs, 2, N, PAD == "vector", CAST, acc_ty)
        s = _scores(q, k, _bias_tile(bias_ptr, rows[0], cols[0], NP, HAS_BIAS), rows, cols, scale, N, MASK,
                    PREC, acc_ty)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PREC)
    real = rows[2]  # rows stored: real tokens (padding queries are computed, never stored)
    out = acc / l_i[:, None]
    tl.store(_row_ptrs(out_ptr, rows, hs, C), out.to(out_ptr.dtype.element_ty), mask=real[:, None] & hs[3][None, :])
    tl.store(_stat_ptrs(lse_ptr, rows, hs), m_i + tl.log(l_i), mask=real)


@triton.jit
def _bwd_tile_kernel(qkv_ptr, dout_ptr, lse_ptr, bias_ptr, pad_ptr, dqkv_ptr, part_ptr, ppad_ptr, Dp, Hp, Wp, D, H,
                     W, C, nWd, nWh, nWw, shd, shh, shw, scale, n_windows, per_group, WD: tl.constexpr,
                     WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DBIAS: tl.constexpr, MASK: tl.constexpr, PAD: tl.constexpr, CAST: tl.constexpr,
                     PREC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointer arguments: see the module's docstring (``ppad_ptr``: one slot per group)."""
    N: tl.constexpr = WD * WH * WW
    acc_ty = lse_ptr.dtype.element_ty
    out_ty = dqkv_ptr.dtype.element_ty
    geo, hs = _geo_head(Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, HEAD_DIM, BLOCK_D)
    head, heads, d_ok = hs[0], hs[1], hs[3]
    g = tl.program_id(0).to(tl.int64)  # group of windows
    t = tl.arange(0, BLOCK)
    dbias = tl.zeros([BLOCK, BLOCK], acc_ty)
    pk = tl.zeros([BLOCK_D], acc_ty)
    pv = tl.zeros([BLOCK_D], acc_ty)
    for wi in range(g * per_group, tl.minimum(g * per_group + per_group, n_windows)):
        blk = _tokens(wi, t, geo, (WD, WH, WW), PAD, MASK)  # the window's tokens: the rows and the columns
        real = blk[2]
        q = _load_part(qkv_ptr, pad_ptr, blk, hs, 0, N, False, CAST, acc_ty)  # padding queries get no gradient
        k = _load_part(qkv_ptr, pad_ptr, blk, hs, 1, N, PAD == "vector", CAST, acc_ty)
        v = _load_part(qkv_ptr, pad_ptr, blk, hs, 2, N, PAD == "vector", CAST, acc_ty)
        do, lse = _load_grad_rows(dout_ptr, lse_ptr, blk, hs, CAST, acc_ty)
        cls = 0
        if MASK == "folded":
            cls = _window_class(wi, geo)
        bias = _bias_tile(bias_ptr + (cls * heads + head) * BLOCK * BLOCK, t, t, BLOCK, HAS_BIAS)  # an L2 hit
        p, dp = _p_dp(q, k, v, do, lse, bias, blk, blk, scale, N, MASK, PREC, acc_ty)
        base = _row_ptrs(dqkv_ptr, blk, hs, 3 * C)
        m = real[:, None] & d_ok[None, :]
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(acc_ty)
        tl.store(base + 2 * C, dv.to(out_ty), mask=m)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # delta = rowsum(P * dP) = rowsum(dO * O)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(acc_ty) * scale
        tl.store(base + C, dk.to(out_ty), mask=m)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(acc_ty) * scale
        tl.store(base, dq.to(out_ty), mask=m)
        if PAD == "vector":
            is_pad = ((t < N) & (real == 0))[:, None]
            pk += tl.sum(tl.where(is_pad, dk, 0.0), axis=0)
            pv += tl.sum(tl.where(is_pad, dv, 0.0), axis=0)
        if DBIAS:
            dbias += ds
    if DBIAS:
        tl.store(part_ptr + (g * heads + head) * BLOCK * BLOCK + (t[:, None] * BLOCK + t[None, :]), dbias)
    if PAD == "vector":
        dd = tl.arange(0, BLOCK_D)
        pbase = ppad_ptr + (g * heads + head) * 2 * HEAD_DIM
        tl.store(pbase + dd, pk, mask=d_ok)
        tl.store(pbase + HEAD_DIM + dd, pv, mask=d_ok)


@triton.jit
def _bwd_tiled_kernel(qkv_ptr, dout_ptr, lse_ptr, bias_ptr, pad_ptr, dqkv_ptr, delta_ptr, dq_ptr, ppad_ptr, Dp, Hp,
                      Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, scale, dq_row, WD: tl.constexpr,
                      WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      MASK: tl.constexpr, PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
                      DQ_COPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointer arguments: see the module's docstring (``ppad_ptr``: one slot per window)."""
    N: tl.constexpr = WD * WH * WW
    NP: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    acc_ty = lse_ptr.dtype.element_ty
    out_ty = dqkv_ptr.dtype.element_ty
    geo, hs = _geo_head(Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, HEAD_DIM, BLOCK_D)
    head, heads, d_ok = hs[0], hs[1], hs[3]
    bias_ptr += head * NP * NP
    wi = tl.program_id(0).to(tl.int64)
    # sweep 1: delta = rowsum(P * dP) per query row (this needs whole rows, hence its own sweep)
    for m0 in range(0, N, BLOCK_M):
        rows = _tokens(wi, m0 + tl.arange(0, BLOCK_M), geo, (WD, WH, WW), PAD, MASK)
        q = _load_part(qkv_ptr, pad_ptr, rows, hs, 0, N, False, CAST, acc_ty)
        do, lse = _load_grad_rows(dout_ptr, lse_ptr, rows, hs, CAST, acc_ty)
        delta = tl.zeros([BLOCK_M], acc_ty)
        for n0 in range(0, N, BLOCK_N):
            cols = _tokens(wi, n0 + tl.arange(0, BLOCK_N), geo, (WD, WH, WW), PAD, MASK)
            k = _load_part(qkv_ptr, pad_ptr, cols, hs, 1, N, PAD == "vector", CAST, acc_ty)
            v = _load_part(qkv_ptr, pad_ptr, cols, hs, 2, N, PAD == "vector", CAST, acc_ty)
            p, dp = _p_dp(q, k, v, do, lse, _bias_tile(bias_ptr, rows[0], cols[0], NP, HAS_BIAS), rows, cols, scale,
                          N, MASK, PREC, acc_ty)
            delta += tl.sum(p * dp, axis=1)
        tl.store(_stat_ptrs(delta_ptr, rows, hs), delta, mask=rows[2])
    tl.debug_barrier()
    # sweep 2: key blocks outer (dK, dV in registers), query blocks inner (dQ read-modify-written by this program)
    for n0 in range(0, N, BLOCK_N):
        cols = _tokens(wi, n0 + tl.arange(0, BLOCK_N), geo, (WD, WH, WW), PAD, MASK)
        k = _load_part(qkv_ptr, pad_ptr, cols, hs, 1, N, PAD == "vector", CAST, acc_ty)
        v = _load_part(qkv_ptr, pad_ptr, cols, hs, 2, N, PAD == "vector", CAST, acc_ty)
        dk = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        dv = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        for m0 in range(0, N, BLOCK_M):
            rows = _tokens(wi, m0 + tl.arange(0, BLOCK_M), geo, (WD, WH, WW), PAD, MASK)
            q = _load_part(qkv_ptr, pad_ptr, rows, hs, 0, N, False, CAST, acc_ty)
            do, lse = _load_grad_rows(dout_ptr, lse_ptr, rows, hs, CAST, acc_ty)
            real = rows[2]
            delta = tl.load(_stat_ptrs(delta_ptr, rows, hs), mask=real, other=0.0)
            p, dp = _p_dp(q, k, v, do, lse, _bias_tile(bias_ptr, rows[0], cols[0], NP, HAS_BIAS), rows, cols, scale,
                          N, MASK, PREC, acc_ty)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(acc_ty)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(acc_ty)
            dq_ptrs = _row_ptrs(dq_ptr, rows, hs, dq_row)
            m = real[:, None] & d_ok[None, :]
            dq = tl.load(dq_ptrs, mask=m & (n0 > 0), other=0.0).to(acc_ty)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(acc_ty) * scale
            tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=m)
        dk = dk * scale
        tk, kreal = cols[0], cols[2]
        m = kreal[:, None] & d_ok[None, :]
        base = _row_ptrs(dqkv_ptr, cols, hs, 3 * C)
        tl.store(base + C, dk.to(out_ty), mask=m)
        tl.store(base + 2 * C, dv.to(out_ty), mask=m)
        if PAD == "vector":  # padding keys of this block: summed into this program's slot (zero in the first block)
            is_pad = ((tk < N) & (kreal == 0))[:, None]
            dd = tl.arange(0, BLOCK_D)
            pbase = ppad_ptr + (wi * heads + head) * 2 * HEAD_DIM
            sk = tl.sum(tl.where(is_pad, dk, 0.0), axis=0)
            sv = tl.sum(tl.where(is_pad, dv, 0.0), axis=0)
            sk += tl.load(pbase + dd, mask=d_ok & (n0 > 0), other=0.0)
            sv += tl.load(pbase + HEAD_DIM + dd, mask=d_ok & (n0 > 0), other=0.0)
            tl.store(pbase + dd, sk, mask=d_ok)
            tl.store(pbase + HEAD_DIM + dd, sv, mask=d_ok)
        tl.debug_barrier()
    if DQ_COPY:  # dQ was accumulated in a separate fp32 buffer: convert it into dqkv
        for m0 in range(0, N, BLOCK_M):
            rows = _tokens(wi, m0 + tl.arange(0, BLOCK_M), geo, (WD, WH, WW), PAD, MASK)
            m = rows[2][:, None] & d_ok[None, :]
            dq = tl.load(_row_ptrs(dq_ptr, rows, hs, dq_row), mask=m, other=0.0)
            tl.store(_row_ptrs(dqkv_ptr, rows, hs, 3 * C), dq.to(out_ty), mask=m)


@triton.jit
def _bwd_dbias_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, bias_ptr, pad_ptr, part_ptr, Dp, Hp, Wp, D, H, W, C,
                      nWd, nWh, nWw, shd, shh, shw, scale, n_windows, per_group, WD: tl.constexpr, WH: tl.constexpr,
                      WW: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, PAD: tl.constexpr,
                      CAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Pointer arguments: see the module's docstring (``bias_ptr`` always holds a bias here)."""
    N: tl.constexpr = WD * WH * WW
    NP: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    acc_ty = lse_ptr.dtype.element_ty
    geo, hs = _geo_head(Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, HEAD_DIM, BLOCK_D)
    head, heads = hs[0], hs[1]
    n_nb: tl.constexpr = NP // BLOCK_N
    pid = tl.program_id(0)
    g = (pid // (n_nb * n_nb)).to(tl.int64)  # group of windows
    tile = pid % (n_nb * n_nb)
    tq = (tile // n_nb) * BLOCK_M + tl.arange(0, BLOCK_M)
    tk = (tile % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    dbias = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    bias = _bias_tile(bias_ptr + head * NP * NP, tq, tk, NP, True)  # shared by every window
    for wi in range(g * per_group, tl.minimum(g * per_group + per_group, n_windows)):
        rows = _tokens(wi, tq, geo, (WD, WH, WW), PAD, MASK)
        cols = _tokens(wi, tk, geo, (WD, WH, WW), PAD, MASK)
        q = _load_part(qkv_ptr, pad_ptr, rows, hs, 0, N, False, CAST, acc_ty)
        k = _load_part(qkv_ptr, pad_ptr, cols, hs, 1, N, PAD == "vector", CAST, acc_ty)
        v = _load_part(qkv_ptr, pad_ptr, cols, hs, 2, N, PAD == "vector", CAST, acc_ty)
        do, lse = _load_grad_rows(dout_ptr, lse_ptr, rows, hs, CAST, acc_ty)
        delta = tl.load(_stat_ptrs(delta_ptr, rows, hs), mask=rows[2], other=0.0)
        p, dp = _p_dp(q, k, v, do, lse, bias, rows, cols, scale, N, MASK, PREC, acc_ty)
        dbias += p * (dp - delta[:, None])
    tl.store(part_ptr + (g * heads + head) * NP * NP + (tq[:, None] * NP + tk[None, :]), dbias)


@triton.jit
def _dbias_reduce_kernel(
    part_ptr,   # shape (G, E), contiguous, accumulation dtype: E = heads * N * N
    dbias_ptr,  # shape (E,), accumulation dtype
    G, E,
    BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    gg = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_E], dbias_ptr.dtype.element_ty)
    for g0 in range(0, G, BLOCK_G):  # fixed order: BLOCK_G interleaved running sums, then one tree sum
        rows = (g0 + gg).to(tl.int64)
        acc += tl.load(part_ptr + rows[:, None] * E + e[None, :], mask=(rows < G)[:, None] & (e < E)[None, :],
                       other=0.0)
    tl.store(dbias_ptr + e, tl.sum(acc, axis=0), mask=e < E)


@triton.jit
def _dtable_kernel(
    dbias_ptr,   # shape (heads, NP, NP), contiguous, accumulation dtype (the (N, N) corner is used)
    dtable_ptr,  # shape (T, heads), contiguous, accumulation dtype
    heads, N, NP, T,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64)
    r_ok = r < T
    # relative offset (query - key) of each table row
    od = r // ((2 * TWH - 1) * (2 * TWW - 1)) - (TWD - 1)
    oh = (r // (2 * TWW - 1)) % (2 * TWH - 1) - (TWH - 1)
    ow = r % (2 * TWW - 1) - (TWW - 1)
    acc = tl.zeros([BLOCK_R, BLOCK_I], dtable_ptr.dtype.element_ty)
    base = dbias_ptr + h * NP * NP
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        kd = (i // (BH * BW))[None, :] - od[:, None]
        kh = ((i // BW) % BH)[None, :] - oh[:, None]
        kw = (i % BW)[None, :] - ow[:, None]
        j = (kd * BH + kh) * BW + kw
        ok = (r_ok[:, None] & (i < N)[None, :] & (kd >= 0) & (kd < BD) & (kh >= 0) & (kh < BH)
              & (kw >= 0) & (kw < BW) & (j < N))
        acc += tl.load(base + i[None, :] * NP + j, mask=ok, other=0.0)
    tl.store(dtable_ptr + r * heads + h, tl.sum(acc, axis=1), mask=r_ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # CUDA: most programs of one launch along grid axes 0, 1, 2
BLOCK_E = 128   # elements per program of _bias_kernel and _dbias_reduce_kernel
BLOCK_G = 16    # partials summed side by side per step of _dbias_reduce_kernel
BLOCK_R = 32    # table rows per program of _dtable_kernel
PARTIAL_BYTES = 256 << 20  # at most this many bytes of bias-gradient partials

KERNELS = {"bias": _bias_kernel, "fwd": _fwd_kernel, "bwd_tile": _bwd_tile_kernel, "bwd_tiled": _bwd_tiled_kernel,
           "dbias": _bwd_dbias_kernel, "dbias_reduce": _dbias_reduce_kernel, "dtable": _dtable_kernel}


class Launch(NamedTuple):
    """One kernel launch of a call: its grid, constexpr arguments and warps."""
    grid: tuple
    constexprs: dict
    num_warps: int


class LaunchPlan(NamedTuple):
    """What the launchers decide for one call (:func:`launch_plan`)."""
    C: int
    head_dim: int
    tokens: int         # N: tokens per window
    padded_tokens: int  # NP: N rounded up to a multiple of the tile (rows and columns of the dense bias, partials)
    block: int          # BLOCK_M = BLOCK_N: query and key tile
    single_tile: bool   # N <= block: the backward is _bwd_tile_kernel (else _bwd_tiled_kernel)
    pad: str            # PAD mode: "none" (the grid is divisible by the window), "zeros" or "vector" (qkv_pad)
    mask: str           # MASK mode: "none" (no shift), "folded" (into a dense bias per window class: one tile) or
                        # "region" (from region ids in the kernels: the (8, heads, NP, NP) tensor would not fit L2)
    classes: int        # window shift classes of the dense bias (8 with MASK "folded", else 1)
    dense: bool         # a dense bias (the table's and/or the folded mask) is gathered and added
    n_windows: int      # B * windows per sample
    groups: int         # groups of windows, one bias-gradient partial each (0 without a table)
    per_group: int      # windows per group
    scalars: tuple      # Dp, Hp, Wp, D, H, W, C, nWd, nWh, nWw, shd, shh, shw, scale (the kernels' leading scalars)
    launches: dict      # KERNELS name -> Launch: "bias" and "fwd" run forward, the others backward


def _groups(n_windows: int, programs_per_group: int, part_bytes_per_group: int, programs: int) -> tuple[int, int]:
    """(groups, windows per group); each group writes one bias-gradient partial."""
    groups = max(1, min(n_windows, triton.cdiv(programs, programs_per_group)))
    groups = max(1, min(groups, PARTIAL_BYTES // max(1, part_bytes_per_group)))
    per_group = triton.cdiv(n_windows, groups)
    return triton.cdiv(n_windows, per_group), per_group


def launch_plan(shape, dtype: torch.dtype, spec: ref.WindowSpec, *, has_table: bool, has_pad: bool, programs: int,
                interpreted: bool) -> LaunchPlan:
    """Every launch of a call on a ``(B, D, H, W, 3C)`` qkv grid of ``dtype``, from the sizes alone (no tensor, no
    launch).  ``has_table``: a bias table is given; ``has_pad``: a ``qkv_pad`` vector is given; ``programs``: how
    many programs fill the device (:func:`fastmed._tensors.target_programs`); ``interpreted``: the Triton CPU
    interpreter runs the kernels.  Raises ValueError when a grid would exceed CUDA's limits (:data:`GRID_LIMITS`)
    or one sample would not fit the kernels' 32-bit in-sample offsets."""
    B, D, H, W, C3 = shape
    if D * H * W * C3 >= 2 ** 31:
        raise ValueError(f"window_attention: one sample of qkv of shape {tuple(shape)} has {D * H * W * C3} elements; "
                         f"the Triton kernels address a sample with 32-bit offsets (at most 2^31 - 1 elements)")
    C = C3 // 3
    heads, N = spec.num_heads, spec.tokens
    head_dim = C // heads
    # windows of more than 64 tokens (3D, 343) take the tiled backward, whose 64-wide bf16 tiles hit 255 registers
    # and spill on sm_90 with triton 3.6 (4 B): 32-wide tiles there
    block = 16 if N <= 16 else (32 if N <= 32 or N > 64 else 64)
    if dtype == torch.float64:  # 64-wide float64 tiles overflow the 227 KB of shared memory of an H100
        block = min(block, 32)
    if dtype == torch.float32:
        # float32 dots run on the FMA units ("ieee": torch's float32 matmul precision), which hold whole operand
        # rows in registers: 32- and 64-wide tiles spill on sm_90, 16-wide ones do not
        block = 16
    n_b = triton.cdiv(N, block)
    NP = n_b * block
    windows = tuple(triton.cdiv(s, w) for s, w in zip((D, H, W), spec.window))
    padded_grid = tuple(n * w for n, w in zip(windows, spec.window))
    pad = "none" if padded_grid == (D, H, W) else ("vector" if has_pad else "zeros")
    n_windows = B * windows[0] * windows[1] * windows[2]
    single = n_b == 1
    wide = dtype in (torch.float32, torch.float64)
    acc_bytes = torch.finfo(accumulation_dtype(dtype)).bits // 8
    groups = per_group = 0
    if has_table:
        groups, per_group = _groups(n_windows, heads * (1 if single else n_b * n_b), heads * NP * NP * acc_bytes,
                                    programs)
    mask = "none" if not spec.shifted else ("folded" if single else "region")
    classes = 8 if mask == "folded" else 1
    dense = has_table or mask == "folded"
    window = dict(WD=spec.window[0], WH=spec.window[1], WW=spec.window[2])
    flags = dict(window, HEAD_DIM=head_dim, HAS_BIAS=dense, MASK=mask, PAD=pad, CAST=interpreted or wide,
                 PREC="ieee" if wide else "tf32")
    tiles = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    warps = 8 if block == 64 else 4  # [64, 64] fp32 score tiles: 8 warps halve their registers per thread
    (BD, BH, BW), (TWD, TWH, TWW) = spec.bias_coords, spec.table_window
    coords = dict(BD=BD, BH=BH, BW=BW, TWD=TWD, TWH=TWH, TWW=TWW)
    launches = {}
    if dense:
        launches["bias"] = Launch((triton.cdiv(NP * NP, BLOCK_E), heads, classes),
                                  dict(window, **coords, HAS_TABLE=has_table, MASK=mask, BLOCK_N=block,
                                       BLOCK_E=BLOCK_E), 4)
    launches["fwd"] = Launch((n_windows * n_b, heads), dict(flags, **tiles), warps)
    if single:
        launches["bwd_tile"] = Launch(((groups if has_table else n_windows), heads),
                                      dict(flags, DBIAS=has_table, BLOCK=block, BLOCK_D=tiles["BLOCK_D"]), warps)
    else:
        launches["bwd_tiled"] = Launch((n_windows, heads), dict(flags, DQ_COPY=not wide, **tiles), warps)
        if has_table:
            launches["dbias"] = Launch((groups * n_b * n_b, heads),
                                       {k: v for k, v in dict(flags, **tiles).items() if k != "HAS_BIAS"}, warps)
    if has_table:
        table_rows = (2 * TWD - 1) * (2 * TWH - 1) * (2 * TWW - 1)
        if groups > 1:
            launches["dbias_reduce"] = Launch((triton.cdiv(heads * NP * NP, BLOCK_E),),
                                              dict(BLOCK_G=BLOCK_G, BLOCK_E=BLOCK_E), 4)
        launches["dtable"] = Launch((triton.cdiv(table_rows, BLOCK_R), heads),
                                    dict(coords, BLOCK_R=BLOCK_R, BLOCK_I=min(64, triton.next_power_of_2(N))), 4)
    for name, launch in launches.items():
        if any(n > limit for n, limit in zip(launch.grid, GRID_LIMITS)):
            raise ValueError(f"window_attention: the {name} kernel's grid {launch.grid} for qkv of shape "
                             f"{tuple(shape)} exceeds CUDA's grid limits {GRID_LIMITS}; split the batch")
    return LaunchPlan(
        C=C, head_dim=head_dim, tokens=N, padded_tokens=NP, block=block, single_tile=single, pad=pad, mask=mask,
        classes=classes, dense=dense, n_windows=n_windows, groups=groups, per_group=per_group,
        scalars=(*padded_grid, D, H, W, C, *windows, *spec.shift, float(spec.scale)), launches=launches)


def traffic(plan: LaunchPlan, shape, itemsize: int, acc_bytes: int = 4) -> dict:
    """Bytes each launch of ``plan`` moves to and from device memory, ``{launch name: bytes}``, for a qkv grid of
    ``shape`` with elements of ``itemsize`` bytes and accumulators of ``acc_bytes`` (the model is written out in
    :func:`window_attention_backward`'s docstring)."""
    B, D, H, W, C3 = shape
    tokens = B * D * H * W
    C, NP = plan.C, plan.padded_tokens
    heads = C // plan.head_dim
    qkv, row, stat = tokens * C3 * itemsize, tokens * C * itemsize, tokens * heads * acc_bytes
    part = plan.groups * heads * NP * NP * acc_bytes
    dense = plan.classes * heads * NP * NP * acc_bytes if plan.dense else 0
    out = {}
    if plan.dense:
        out["bias"] = dense
    out["fwd"] = qkv + row + stat + dense
    if plan.single_tile:
        out["bwd_tile"] = qkv + row + stat + qkv + part + dense
    else:
        dq = 0 if itemsize == acc_bytes else 2 * tokens * C * acc_bytes
        out["bwd_tiled"] = qkv + row + stat + 2 * stat + qkv + dq + dense
        if "dbias" in plan.launches:
            out["dbias"] = qkv + row + 2 * stat + part + dense
    bias = heads * NP * NP * acc_bytes
    if "dbias_reduce" in plan.launches:
        out["dbias_reduce"] = part + bias
    if "dtable" in plan.launches:
        out["dtable"] = bias
    return out


def _plan(qkv: torch.Tensor, spec: ref.WindowSpec, table, qkv_pad) -> LaunchPlan:
    return launch_plan(qkv.shape, qkv.dtype, spec, has_table=table is not None, has_pad=qkv_pad is not None,
                       programs=target_programs(qkv.device, cpu=4), interpreted=qkv.device.type == "cpu")


def _launch(name: str, plan: LaunchPlan, *args):
    """Launch ``KERNELS[name]`` as ``plan`` says (callers hold the device guard)."""
    launch = plan.launches[name]
    wrap_triton(KERNELS[name])[launch.grid](*args, **launch.constexprs, num_warps=launch.num_warps)


def _dense_bias(qkv: torch.Tensor, table, plan: LaunchPlan, spec: ref.WindowSpec) -> torch.Tensor:
    """The ``(classes, heads, NP, NP)`` dense bias in the accumulation dtype: the table's bias gathered (when
    ``table`` is given) plus the shift mask of each window class (MASK "folded"), zero outside ``(N, N)``; a
    placeholder when the plan has none."""
    acc = accumulation_dtype(qkv.dtype)
    if not plan.dense:
        return torch.empty(0, dtype=acc, device=qkv.device)
    NP = plan.padded_tokens
    bias = torch.empty((plan.classes, spec.num_heads, NP, NP), dtype=acc, device=qkv.device)
    with device_guard(qkv):
        _launch("bias", plan, bias if table is None else table, bias, 0 if table is None else table.stride(0),
                0 if table is None else table.stride(1), *spec.shift)
    return bias


def window_attention_forward(qkv: torch.Tensor, table, qkv_pad,
                             spec: ref.WindowSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, D, H, W, C), lse (B, D, H, W, heads))`` for a ``(B, D, H, W, 3C)`` grid.

    Windows tile the grid padded up to a multiple of ``spec.window`` with tokens whose qkv is ``qkv_pad``
    ``(3C,)`` (zeros when None).  ``table`` is ``(T, heads)`` or None.  Launches ``_bias_kernel`` (with a table)
    and ``_fwd_kernel``; the bytes they move are :func:`traffic`'s ``bias`` and ``fwd``.
    """
    qkv = qkv.contiguous()
    plan = _plan(qkv, spec, table, qkv_pad)
    acc = accumulation_dtype(qkv.dtype)
    out = torch.empty(qkv.shape[:-1] + (plan.C,), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(qkv.shape[:-1] + (spec.num_heads,), dtype=acc, device=qkv.device)
    pad = qkv_pad.contiguous() if plan.pad == "vector" else lse
    bias = _dense_bias(qkv, table, plan, spec)
    with device_guard(qkv):
        _launch("fwd", plan, qkv, out, lse, bias, pad, *plan.scalars)
    return out, lse


def window_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, table, qkv_pad,
                              spec: ref.WindowSpec):
    """``(dqkv (B, D, H, W, 3C), dtable (T, heads) or None, dqkv_pad (3C,) or None)``; deterministic.

    Needs the forward's logsumexp, not its output (delta = rowsum(P * dP) is computed in the kernels), so the
    caller may modify the output in place before the backward.

    Memory traffic model (:func:`traffic`): bytes to and from device memory, with ``e`` the element size,
    ``tokens = B * D * H * W``, ``NP`` the tokens of a window rounded up to the tile, ``G`` bias-gradient groups,
    ``bias = heads * NP^2 * 4`` (the dense bias, fp32), ``stat = tokens * heads * 4`` (lse or delta):
      ``bias``          writes the dense bias (the table reads are negligible);
      ``fwd``           reads qkv (``tokens * 3C * e``) and the bias once (it stays in L2: every window of a call
                        shares it), writes out (``tokens * C * e``) and lse (``stat``);
      ``bwd_tile``      reads qkv, dO, lse and the bias once, writes dqkv once and ``G`` partials of ``bias`` bytes;
      ``bwd_tiled``     as ``bwd_tile`` without partials, plus delta written and read (``2 * stat``) and, for 16-bit
                        inputs, the fp32 dQ buffer written and read once (``2 * tokens * C * 4``: its updates per key
                        block stay in L2, one window's rows are ``N * head_dim * 4`` bytes); the repeated reads of a
                        window's q, k, v, dO hit L2;
      ``dbias``         reads qkv, dO, lse, delta once more, writes the ``G`` partials;
      ``dbias_reduce``  reads the partials, writes ``bias`` bytes; ``dtable`` reads those.
    At Swin-UNet stage 1 (B 24, 56^2 tokens, C 96, 3 heads, window 7, bf16, 132 SMs) the model gives 59 MB forward
    and 120 MB backward (``bwd_tile`` 111 MB, the bias-gradient reduction 8.5 MB); the previous kernels moved
    203 MB backward (qkv read twice, dO three times and the saved output once).
    """
    qkv, dout = qkv.contiguous(), dout.contiguous()
    plan = _plan(qkv, spec, table, qkv_pad)
    heads, hd, C, NP = spec.num_heads, plan.head_dim, plan.C, plan.padded_tokens
    acc = lse.dtype
    dev = qkv.device
    dqkv = torch.empty_like(qkv)
    main = plan.launches["bwd_tile" if plan.single_tile else "bwd_tiled"]
    pad = qkv_pad.contiguous() if plan.pad == "vector" else lse
    ppad = torch.empty((main.grid[0], heads, 2, hd) if plan.pad == "vector" else (0,), dtype=acc, device=dev)
    part = torch.empty((plan.groups, heads, NP, NP) if table is not None else (0,), dtype=acc, device=dev)
    bias = _dense_bias(qkv, table, plan, spec)
    dtable = None
    with device_guard(qkv):
        if plan.single_tile:
            _launch("bwd_tile", plan, qkv, dout, lse, bias, pad, dqkv, part, ppad, *plan.scalars, plan.n_windows,
                    plan.per_group if table is not None else 1)
        else:
            delta = torch.empty_like(lse)
            copy = main.constexprs["DQ_COPY"]
            dq = torch.empty(qkv.shape[:-1] + (C,), dtype=acc, device=dev) if copy else dqkv
            _launch("bwd_tiled", plan, qkv, dout, lse, bias, pad, dqkv, delta, dq, ppad, *plan.scalars,
                    C if copy else 3 * C)
            if table is not None:
                _launch("dbias", plan, qkv, dout, lse, delta, bias, pad, part, *plan.scalars, plan.n_windows,
                        plan.per_group)
        if table is not None:
            dbias = part
            if "dbias_reduce" in plan.launches:
                dbias = torch.empty((heads, NP, NP), dtype=acc, device=dev)
                _launch("dbias_reduce", plan, part, dbias, plan.groups, heads * NP * NP)
            dtable = torch.empty((table.shape[0], heads), dtype=acc, device=dev)
            _launch("dtable", plan, dbias, dtable, heads, plan.tokens, NP, table.shape[0])
    dpad = None
    if qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        dpad = torch.zeros(3, heads, hd, dtype=acc, device=dev)
        if plan.pad == "vector":
            dpad[1:] = ppad.sum(0).transpose(0, 1)
        dpad = dpad.reshape(3 * C).to(qkv_pad.dtype)
    return dqkv, (dtable.to(table.dtype) if table is not None else None), dpad
