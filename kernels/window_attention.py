"""(Shifted-)window attention: Triton kernels and launchers.

Everything works on the token grid ``(B, D, H, W, ...)`` (2D grids have ``D = 1``), contiguous.  Windows tile
the grid padded at the end of each axis up to a multiple of the window (``Dp, Hp, Wp``, MONAI's padding); padding
tokens are never stored: their q, k, v are read from a pad vector (the qkv Linear's bias) or are zero.  A
*window* ``wi`` in ``[0, B * nW)`` and a token ``t`` in ``[0, N)`` of that window (raster order inside the window,
``N = WD * WH * WW``) address the grid by index arithmetic alone:

* rolled-frame coordinate ``y = window_coord * w + local_coord``; the cyclic shift reads source
  ``(y + shift) mod S`` and the output is stored at that same source token, which undoes partition and
  roll together (no copies);
* shift-region id per axis ``(y >= S - w) + (y >= S - shift)``; scores between tokens of different regions
  get ``-100`` (the anchors' constant), so no mask tensor exists;
* relative position bias: the token index is unravelled over ``BD, BH, BW`` (the effective window, or the
  table's window for MONAI's ``index[:n, :n]`` when a window shrinks) and the table row is
  ``(dd + TWD - 1) * (2TWH - 1)(2TWW - 1) + (dh + TWH - 1)(2TWW - 1) + (dw + TWW - 1)``.

Grids: windows (times blocks) always on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 stop at 65,535: 66 3D
volumes of 64^3 tokens already have 66,000 windows of 7^3); heads on axis 1.  :func:`launch_plan` computes every
grid from the sizes alone, so tests check them at sizes no CPU could run.

Argument groups of the device helpers (tuples; the kernels' own signatures stay flat):
  ``geo``   = ``(windows, grid, shift, padded)``: windows per axis ``(nWd, nWh, nWw)``, the real token grid
              ``(D, H, W)``, the cyclic shift ``(shd, shh, shw)`` and the padded grid ``(Dp, Hp, Wp)`` (windows *
              window, passed rather than recomputed: fewer registers in the spilling backward kernels);
  ``hs``    = ``(head, heads, ch, d_ok, C)``: this program's head, the head count, the head's channel offsets
              inside a C-wide row (``BLOCK_D`` of them), their mask, and C;
  ``table`` = ``(table_ptr, st0, st1)``: the bias table and its strides;
  ``pos``   = ``(region, bd, bh, bw)``: a token's shift region and bias coordinates (from ``_tokens``);
  constexpr 3-tuples ``WINDOW = (WD, WH, WW)``, ``BIAS_DIMS = (BD, BH, BW)`` and ``TABLE_WINDOW = (TWD, TWH, TWW)``.

Forward: ``_fwd_kernel``, one program per (window, block of BLOCK_M queries, head), keys in tiles of BLOCK_N
with an online softmax (49 tokens are one 64-tile; 343 tokens are 6 tiles); saves the per-row logsumexp.
Backward (flash-style, P recomputed from the logsumexp; ``_delta_kernel`` computes ``delta = rowsum(dO * O)``):
  1. ``_bwd_dkdv_kernel``: per (window, key block, head), loop over query blocks -> dK, dV.
  2. ``_bwd_dq_kernel``: per (window, query block, head), loop over key blocks -> dQ.  With a single key
     block (N <= 64) each program takes a group of windows and also sums their dS into a private ``(N, N)``
     partial of the bias-table gradient.
  3. ``_bwd_dbias_kernel`` (more than one key block only): per (group of windows, query block x key block, head)
     -> the same partials.
  4. ``_dtable_reduce_kernel``: per (block of table rows, head), sum the partials of every (query, key) pair
     with that relative offset over the groups in a fixed order.  Deterministic; no atomics anywhere.
  Padding keys (MONAI padding) collect dK, dV per program; their sum over programs is d(qkv_pad).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from fastmed._tensors import accumulation_dtype, device_guard, target_programs
from fastmed.reference import window_attention as ref

MASK_VALUE = tl.constexpr(ref.MASK_VALUE)  # the anchors' constant between shift regions

# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _head(head_dim, C, BLOCK_D: tl.constexpr):
    """``hs`` of this program's head (program axis 1): ``(head, heads, ch, d_ok, C)``."""
    dd = tl.arange(0, BLOCK_D)
    head = tl.program_id(1).to(tl.int64)
    return head, tl.num_programs(1), head * head_dim + dd, dd < head_dim, C


@triton.jit
def _tokens(wi, t, geo, WINDOW: tl.constexpr, BIAS_DIMS: tl.constexpr):
    """Tokens ``t`` of window ``wi``: grid index (int64), inside the real grid (not padding), and ``pos`` (shift
    region, bias coordinates).  Windows tile the padded grid; the data is the real grid."""
    windows, grid, shift, padded = geo
    nWd, nWh, nWw = windows
    Dp, Hp, Wp = padded
    D, H, W = grid
    shd, shh, shw = shift
    WD, WH, WW = WINDOW
    BD, BH, BW = BIAS_DIMS
    nw = nWd * nWh * nWw
    b = wi // nw
    r = wi % nw
    yd = (r // (nWh * nWw)) * WD + t // (WH * WW)
    yh = ((r // nWw) % nWh) * WH + (t // WW) % WH
    yw = (r % nWw) * WW + t % WW
    sd = (yd + shd) % Dp
    sh = (yh + shh) % Hp
    sw = (yw + shw) % Wp
    valid = (sd < D) & (sh < H) & (sw < W)
    tok = ((b * D + sd) * H + sh) * W + sw
    region = (((yd >= Dp - WD).to(tl.int32) + (yd >= Dp - shd).to(tl.int32)) * 9
              + ((yh >= Hp - WH).to(tl.int32) + (yh >= Hp - shh).to(tl.int32)) * 3
              + ((yw >= Wp - WW).to(tl.int32) + (yw >= Wp - shw).to(tl.int32)))
    return tok, valid, (region, t // (BH * BW), (t // BW) % BH, t % BW)


@triton.jit
def _scores(q, k, scale, hs, table, qpos, kpos, row_ok, col_ok,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, TABLE_WINDOW: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scores q k^T * scale + bias + shift mask; padded keys are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    qreg, qbd, qbh, qbw = qpos
    kreg, kbd, kbh, kbw = kpos
    if HAS_BIAS:
        table_ptr, st0, st1 = table
        TWD, TWH, TWW = TABLE_WINDOW
        idx = ((qbd[:, None] - kbd[None, :] + TWD - 1) * ((2 * TWH - 1) * (2 * TWW - 1))
               + (qbh[:, None] - kbh[None, :] + TWH - 1) * (2 * TWW - 1)
               + (qbw[:, None] - kbw[None, :] + TWW - 1))
        bias = tl.load(table_ptr + idx.to(tl.int64) * st0 + hs[0] * st1,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s = s + bias.to(s.dtype)
    if HAS_MASK:
        s = tl.where(qreg[:, None] == kreg[None, :], s, s + MASK_VALUE)
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _fwd_kernel(
    qkv_ptr,    # shape (B, D, H, W, 3C), contiguous
    out_ptr,    # shape (B, D, H, W, C), contiguous
    lse_ptr,    # shape (B, D, H, W, heads), contiguous, accumulation dtype
    table_ptr,  # shape (T, heads), strides (st0, st1)
    pad_ptr,    # shape (3C,): qkv of a padding token (HAS_PAD)
    st0, st1, Dp, Hp, Wp, D, H, W, C, head_dim, N, nWd, nWh, nWw, shd, shh, shw, scale,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    geo = ((nWd, nWh, nWw), (D, H, W), (shd, shh, shw), (Dp, Hp, Wp))
    hs = _head(head_dim, C, BLOCK_D)
    head, heads, ch, d_ok, _ = hs
    pid = tl.program_id(0).to(tl.int64)
    n_mb = tl.cdiv(N, BLOCK_M)
    wi = pid // n_mb
    rows = (pid % n_mb) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_win = rows < N
    qtok, qval, qpos = _tokens(wi, rows, geo, (WD, WH, WW), (BD, BH, BW))
    row_ok = in_win & qval  # rows stored: real tokens (padding queries are computed, never stored)
    qm = row_ok[:, None] & d_ok[None, :]
    q = tl.load(qkv_ptr + qtok[:, None] * (3 * C) + ch[None, :], mask=qm, other=0.0)
    if HAS_PAD:
        q = tl.where(qval[:, None], q, tl.load(pad_ptr + ch, mask=d_ok, other=0.0)[None, :])
    if CAST:
        q = q.to(acc_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)
    l_i = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ktok, kval, kpos = _tokens(wi, cols, geo, (WD, WH, WW), (BD, BH, BW))
        k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, hs, HAS_PAD, CAST, acc_ty)
        s = _scores(q, k, scale, hs, (table_ptr, st0, st1), qpos, kpos, in_win, col_ok, HAS_BIAS, HAS_MASK,
                    (TWD, TWH, TWW), PREC).to(acc_ty)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(acc_ty)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + qtok[:, None] * C + ch[None, :], out.to(out_ptr.dtype.element_ty), mask=qm)
    tl.store(lse_ptr + qtok * heads + head, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _load_rows(qkv_ptr, grads_in, tok, row_ok, hs, CAST: tl.constexpr, ACC: tl.constexpr):
    """q, dO, lse and delta of a block of query rows; ``grads_in = (dout_ptr, lse_ptr, delta_ptr)``."""
    dout_ptr, lse_ptr, delta_ptr = grads_in
    head, heads, ch, d_ok, C = hs
    m = row_ok[:, None] & d_ok[None, :]
    q = tl.load(qkv_ptr + tok[:, None] * (3 * C) + ch[None, :], mask=m, other=0.0)
    do = tl.load(dout_ptr + tok[:, None] * C + ch[None, :], mask=m, other=0.0)
    if CAST:
        q = q.to(ACC)
        do = do.to(ACC)
    lse = tl.load(lse_ptr + tok * heads + head, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + tok * heads + head, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _load_cols(qkv_ptr, pad_ptr, tok, valid, col_ok, hs, HAS_PAD: tl.constexpr, CAST: tl.constexpr,
               ACC: tl.constexpr):
    """k and v of a block of key columns (padding tokens read the pad vector, or zeros)."""
    head, heads, ch, d_ok, C = hs
    m = (col_ok & valid)[:, None] & d_ok[None, :]
    base = qkv_ptr + tok[:, None] * (3 * C) + ch[None, :]
    k = tl.load(base + C, mask=m, other=0.0)
    v = tl.load(base + 2 * C, mask=m, other=0.0)
    if HAS_PAD:
        k = tl.where(valid[:, None], k, tl.load(pad_ptr + C + ch, mask=d_ok, other=0.0)[None, :])
        v = tl.where(valid[:, None], v, tl.load(pad_ptr + 2 * C + ch, mask=d_ok, other=0.0)[None, :])
    if CAST:
        k = k.to(ACC)
        v = v.to(ACC)
    return k, v


@triton.jit
def _p_ds(rows, cols, scale, hs, table, qpos, kpos, row_ok, col_ok,
          HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, TABLE_WINDOW: tl.constexpr, PREC: tl.constexpr,
          ACC: tl.constexpr):
    """Recomputed P and dS = P * (dO V^T - delta) of one [BLOCK_M, BLOCK_N] tile (zero outside the window);
    ``rows = (q, dO, lse, delta)`` (:func:`_load_rows`), ``cols = (k, v)`` (:func:`_load_cols`)."""
    q, do, lse, delta = rows
    k, v = cols
    s = _scores(q, k, scale, hs, table, qpos, kpos, row_ok, col_ok, HAS_BIAS, HAS_MASK, TABLE_WINDOW,
                PREC).to(ACC)
    p = tl.exp(s - lse[:, None])
    p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _delta_kernel(
    dout_ptr,   # shape (M, C), contiguous: the token grid flattened
    out_ptr,    # shape (M, C), contiguous
    delta_ptr,  # shape (M, heads), contiguous, accumulation dtype: rowsum over head_dim of dO * O
    M, C, head_dim,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head, heads, ch, d_ok, _ = _head(head_dim, C, BLOCK_D)
    m = (tok < M)[:, None] & d_ok[None, :]
    off = tok[:, None] * C + ch[None, :]
    acc_ty = delta_ptr.dtype.element_ty
    do = tl.load(dout_ptr + off, mask=m, other=0.0).to(acc_ty)
    o = tl.load(out_ptr + off, mask=m, other=0.0).to(acc_ty)
    tl.store(delta_ptr + tok * heads + head, tl.sum(do * o, axis=1), mask=tok < M)


@triton.jit
def _bwd_dkdv_kernel(
    qkv_ptr,    # shape (B, D, H, W, 3C), contiguous
    dout_ptr,   # shape (B, D, H, W, C), contiguous
    lse_ptr,    # shape (B, D, H, W, heads), contiguous, accumulation dtype
    delta_ptr,  # shape (B, D, H, W, heads), contiguous, accumulation dtype: rowsum(dO * O)
    table_ptr,  # shape (T, heads), strides (st0, st1)
    pad_ptr,    # shape (3C,): qkv of a padding token (HAS_PAD)
    dqkv_ptr,   # shape (B, D, H, W, 3C), contiguous: this kernel writes the k and v parts
    ppad_ptr,   # shape (programs, heads, 2, head_dim), accumulation dtype: dk, dv summed over padding keys
    st0, st1, Dp, Hp, Wp, D, H, W, C, head_dim, N, nWd, nWh, nWw, shd, shh, shw, scale,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    geo = ((nWd, nWh, nWw), (D, H, W), (shd, shh, shw), (Dp, Hp, Wp))
    hs = _head(head_dim, C, BLOCK_D)
    head, heads, ch, d_ok, _ = hs
    pid = tl.program_id(0).to(tl.int64)
    n_nb = tl.cdiv(N, BLOCK_N)
    wi = pid // n_nb
    cols = (pid % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ktok, kval, kpos = _tokens(wi, cols, geo, (WD, WH, WW), (BD, BH, BW))
    kv = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, hs, HAS_PAD, CAST, acc_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        qtok, qval, qpos = _tokens(wi, rows, geo, (WD, WH, WW), (BD, BH, BW))
        row_ok = (rows < N) & qval  # padding queries get no gradient (their outputs are cropped)
        qrows = _load_rows(qkv_ptr, (dout_ptr, lse_ptr, delta_ptr), qtok, row_ok, hs, CAST, acc_ty)
        q, do, lse, delta = qrows
        p, ds = _p_ds(qrows, kv, scale, hs, (table_ptr, st0, st1), qpos, kpos, row_ok, col_ok, HAS_BIAS, HAS_MASK,
                      (TWD, TWH, TWW), PREC, acc_ty)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(acc_ty)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(acc_ty)
    m = (col_ok & kval)[:, None] & d_ok[None, :]
    base = dqkv_ptr + ktok[:, None] * (3 * C) + ch[None, :]
    out_ty = dqkv_ptr.dtype.element_ty
    tl.store(base + C, (dk * scale).to(out_ty), mask=m)
    tl.store(base + 2 * C, dv.to(out_ty), mask=m)
    if HAS_PAD:
        is_pad = (col_ok & (kval == 0))[:, None]
        dd = tl.arange(0, BLOCK_D)
        pbase = ppad_ptr + (pid * heads + head) * 2 * head_dim
        tl.store(pbase + dd, tl.sum(tl.where(is_pad, dk, 0.0), axis=0) * scale, mask=d_ok)
        tl.store(pbase + head_dim + dd, tl.sum(tl.where(is_pad, dv, 0.0), axis=0), mask=d_ok)


@triton.jit
def _bwd_dq_kernel(
    qkv_ptr,    # shape (B, D, H, W, 3C), contiguous
    dout_ptr,   # shape (B, D, H, W, C), contiguous
    lse_ptr,    # shape (B, D, H, W, heads), contiguous, accumulation dtype
    delta_ptr,  # shape (B, D, H, W, heads), contiguous, accumulation dtype
    table_ptr,  # shape (T, heads), strides (st0, st1)
    pad_ptr,    # shape (3C,): qkv of a padding token (HAS_PAD)
    dqkv_ptr,   # shape (B, D, H, W, 3C), contiguous: this kernel writes the q part
    part_ptr,   # shape (G, heads, N, N), contiguous, accumulation dtype: dS summed over each group's windows
    st0, st1, Dp, Hp, Wp, D, H, W, C, head_dim, N, nWd, nWh, nWw, shd, shh, shw, scale, n_windows, per_group,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, FUSE_DBIAS: tl.constexpr,
    CAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    geo = ((nWd, nWh, nWw), (D, H, W), (shd, shh, shw), (Dp, Hp, Wp))
    hs = _head(head_dim, C, BLOCK_D)
    head, heads, ch, d_ok, _ = hs
    pid = tl.program_id(0)
    n_mb = tl.cdiv(N, BLOCK_M)
    g = (pid // n_mb).to(tl.int64)  # group of windows
    rows = (pid % n_mb) * BLOCK_M + tl.arange(0, BLOCK_M)
    dbias = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    w_end = tl.minimum(g * per_group + per_group, n_windows)
    for wi in range(g * per_group, w_end):
        qtok, qval, qpos = _tokens(wi, rows, geo, (WD, WH, WW), (BD, BH, BW))
        row_ok = (rows < N) & qval
        qrows = _load_rows(qkv_ptr, (dout_ptr, lse_ptr, delta_ptr), qtok, row_ok, hs, CAST, acc_ty)
        dq = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ktok, kval, kpos = _tokens(wi, cols, geo, (WD, WH, WW), (BD, BH, BW))
            k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, hs, HAS_PAD, CAST, acc_ty)
            p, ds = _p_ds(qrows, (k, v), scale, hs, (table_ptr, st0, st1), qpos, kpos, row_ok, col_ok, HAS_BIAS,
                          HAS_MASK, (TWD, TWH, TWW), PREC, acc_ty)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(acc_ty)
            if FUSE_DBIAS:
                dbias += ds
        tl.store(dqkv_ptr + qtok[:, None] * (3 * C) + ch[None, :], (dq * scale).to(dqkv_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    if FUSE_DBIAS:
        cols = tl.arange(0, BLOCK_N)
        base = part_ptr + (g * heads + head) * N * N
        tl.store(base + rows[:, None] * N + cols[None, :], dbias, mask=(rows < N)[:, None] & (cols < N)[None, :])


@triton.jit
def _bwd_dbias_kernel(
    qkv_ptr,    # shape (B, D, H, W, 3C), contiguous
    dout_ptr,   # shape (B, D, H, W, C), contiguous
    lse_ptr,    # shape (B, D, H, W, heads), contiguous, accumulation dtype
    delta_ptr,  # shape (B, D, H, W, heads), contiguous, accumulation dtype
    table_ptr,  # shape (T, heads), strides (st0, st1)
    pad_ptr,    # shape (3C,): qkv of a padding token (HAS_PAD)
    part_ptr,   # shape (G, heads, N, N), contiguous, accumulation dtype: dS summed over each group's windows
    st0, st1, Dp, Hp, Wp, D, H, W, C, head_dim, N, nWd, nWh, nWw, shd, shh, shw, scale, n_windows, per_group,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    geo = ((nWd, nWh, nWw), (D, H, W), (shd, shh, shw), (Dp, Hp, Wp))
    hs = _head(head_dim, C, BLOCK_D)
    head, heads, ch, d_ok, _ = hs
    n_nb = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(N, BLOCK_M) * n_nb
    pid = tl.program_id(0)
    g = (pid // n_tiles).to(tl.int64)  # group of windows
    tile = pid % n_tiles
    rows = (tile // n_nb) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dbias = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    w_end = tl.minimum(g * per_group + per_group, n_windows)
    for wi in range(g * per_group, w_end):
        qtok, qval, qpos = _tokens(wi, rows, geo, (WD, WH, WW), (BD, BH, BW))
        ktok, kval, kpos = _tokens(wi, cols, geo, (WD, WH, WW), (BD, BH, BW))
        row_ok = (rows < N) & qval
        qrows = _load_rows(qkv_ptr, (dout_ptr, lse_ptr, delta_ptr), qtok, row_ok, hs, CAST, acc_ty)
        kv = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, hs, HAS_PAD, CAST, acc_ty)
        p, ds = _p_ds(qrows, kv, scale, hs, (table_ptr, st0, st1), qpos, kpos, row_ok, col_ok, True, HAS_MASK,
                      (TWD, TWH, TWW), PREC, acc_ty)
        dbias += ds
    base = part_ptr + (g * heads + head) * N * N
    tl.store(base + rows[:, None] * N + cols[None, :], dbias, mask=(rows < N)[:, None] & col_ok[None, :])


@triton.jit
def _dtable_reduce_kernel(
    part_ptr,    # shape (G, heads, N, N), contiguous, accumulation dtype
    dtable_ptr,  # shape (T, heads), contiguous, accumulation dtype
    G, heads, N, T,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1)
    r_ok = r < T
    # relative offset (query - key) of each table row
    od = r // ((2 * TWH - 1) * (2 * TWW - 1)) - (TWD - 1)
    oh = (r // (2 * TWW - 1)) % (2 * TWH - 1) - (TWH - 1)
    ow = r % (2 * TWW - 1) - (TWW - 1)
    acc = tl.zeros([BLOCK_R, BLOCK_I], dtable_ptr.dtype.element_ty)
    for g in range(0, G):
        base = part_ptr + (g * heads + h).to(tl.int64) * N * N
        for i0 in range(0, N, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            kd = (i // (BH * BW))[None, :] - od[:, None]
            kh = ((i // BW) % BH)[None, :] - oh[:, None]
            kw = (i % BW)[None, :] - ow[:, None]
            j = (kd * BH + kh) * BW + kw
            ok = (r_ok[:, None] & (i < N)[None, :] & (kd >= 0) & (kd < BD) & (kh >= 0) & (kh < BH)
                  & (kw >= 0) & (kw < BW) & (j < N))
            acc += tl.load(base + i[None, :].to(tl.int64) * N + j, mask=ok, other=0.0)
    tl.store(dtable_ptr + r * heads + h, tl.sum(acc, axis=1), mask=r_ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # CUDA: most programs of one launch along grid axes 0, 1, 2
BLOCK_T = 64  # tokens per program of _delta_kernel
BLOCK_R = 32  # table rows per program of _dtable_reduce_kernel
PARTIAL_BYTES = 256 << 20  # at most this many bytes of bias-gradient partials


class LaunchPlan(NamedTuple):
    """What the launchers decide for one call (:func:`launch_plan`)."""
    C: int
    head_dim: int
    block: int          # BLOCK_M = BLOCK_N: query and key tile
    block_d: int        # BLOCK_D: head_dim padded to a power of two
    cast: bool          # compute on upcast tiles (the interpreter, fp32, fp64)
    prec: str           # tl.dot input precision
    padded: bool        # the grid is not divisible by the window: padding tokens exist
    n_windows: int      # B * windows per sample
    groups: int         # groups of windows, one bias-gradient partial each (0 without a table)
    per_group: int      # windows per group
    fuse_dbias: bool    # one key block: _bwd_dq_kernel also writes the partials (no _bwd_dbias_kernel)
    scalars: tuple      # Dp, Hp, Wp, D, H, W, C, head_dim, N, nWd, nWh, nWw, shd, shh, shw, scale (kernel args)
    constexprs: dict    # WD..WW, BD..BW, TWD..TWW
    grids: dict         # kernel -> grid; windows (times tiles) on axis 0, heads on axis 1

    @property
    def dq_per_group(self) -> int:
        return self.per_group if self.fuse_dbias else 1


def _groups(n_windows: int, programs_per_group: int, part_bytes_per_group: int, programs: int) -> tuple[int, int]:
    """(groups, windows per group) for the dQ / bias kernels; each group writes one partial."""
    groups = max(1, min(n_windows, triton.cdiv(programs, programs_per_group)))
    groups = max(1, min(groups, PARTIAL_BYTES // max(1, part_bytes_per_group)))
    per_group = triton.cdiv(n_windows, groups)
    return triton.cdiv(n_windows, per_group), per_group


def launch_plan(shape, dtype: torch.dtype, spec: ref.WindowSpec, *, has_table: bool, programs: int,
                interpreted: bool) -> LaunchPlan:
    """Sizes, tiles, flags, window groups and every kernel's grid for a ``(B, D, H, W, 3C)`` qkv grid of
    ``dtype``, from the sizes alone (no tensor, no launch).  ``programs``: how many programs fill the device
    (:func:`fastmed._tensors.target_programs`); ``interpreted``: the Triton CPU interpreter runs the kernels.
    Raises ValueError when a grid would exceed CUDA's limits (:data:`GRID_LIMITS`)."""
    B, D, H, W, C3 = shape
    C = C3 // 3
    heads, N = spec.num_heads, spec.tokens
    head_dim = C // heads
    block = 16 if N <= 16 else (32 if N <= 32 else 64)
    if dtype == torch.float64:  # 64-wide float64 tiles overflow the 227 KB of shared memory of an H100
        block = min(block, 32)
    windows = tuple(triton.cdiv(s, w) for s, w in zip((D, H, W), spec.window))
    padded = tuple(n * w for n, w in zip(windows, spec.window))
    n_windows = B * windows[0] * windows[1] * windows[2]
    n_b = triton.cdiv(N, block)
    fuse = has_table and n_b == 1
    groups = per_group = 0
    if has_table:
        part_bytes = heads * N * N * (torch.finfo(accumulation_dtype(dtype)).bits // 8)
        groups, per_group = _groups(n_windows, n_b * (1 if fuse else n_b) * heads, part_bytes, programs)
    grids = {"fwd": (n_windows * n_b, heads), "delta": (triton.cdiv(B * D * H * W, BLOCK_T), heads),
             "dkdv": (n_windows * n_b, heads), "dq": ((groups if fuse else n_windows) * n_b, heads)}
    if has_table:
        rows = 1
        for tw in spec.table_window:
            rows *= 2 * tw - 1
        grids["dtable"] = (triton.cdiv(rows, BLOCK_R), heads)
        if not fuse:
            grids["dbias"] = (groups * n_b * n_b, heads)
    for name, grid in grids.items():
        if any(n > limit for n, limit in zip(grid, GRID_LIMITS)):
            raise ValueError(f"window_attention: the {name} kernel's grid {grid} for qkv of shape {tuple(shape)} "
                             f"exceeds CUDA's grid limits {GRID_LIMITS}; split the batch")
    wide = dtype in (torch.float32, torch.float64)
    (WD, WH, WW), (BD, BH, BW), (TWD, TWH, TWW) = spec.window, spec.bias_coords, spec.table_window
    return LaunchPlan(
        C=C, head_dim=head_dim, block=block, block_d=max(16, triton.next_power_of_2(head_dim)),
        cast=interpreted or wide, prec="ieee" if wide else "tf32",
        padded=padded != (D, H, W), n_windows=n_windows, groups=groups, per_group=per_group, fuse_dbias=fuse,
        scalars=(*padded, D, H, W, C, head_dim, N, *windows, *spec.shift, float(spec.scale)),
        constexprs=dict(WD=WD, WH=WH, WW=WW, BD=BD, BH=BH, BW=BW, TWD=TWD, TWH=TWH, TWW=TWW), grids=grids)


def _plan(qkv: torch.Tensor, spec: ref.WindowSpec, table) -> LaunchPlan:
    return launch_plan(qkv.shape, qkv.dtype, spec, has_table=table is not None,
                       programs=target_programs(qkv.device, cpu=4), interpreted=qkv.device.type == "cpu")


def _table_args(table, dummy):
    if table is None:
        return dummy, 0, 0
    return table, table.stride(0), table.stride(1)


def window_attention_forward(qkv: torch.Tensor, table, qkv_pad,
                             spec: ref.WindowSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, D, H, W, C), lse (B, D, H, W, heads))`` for a ``(B, D, H, W, 3C)`` grid.

    Windows tile the grid padded up to a multiple of ``spec.window`` with tokens whose qkv is ``qkv_pad``
    ``(3C,)`` (zeros when None).  ``table`` is ``(T, heads)`` or None.
    """
    qkv = qkv.contiguous()
    plan = _plan(qkv, spec, table)
    out = torch.empty(qkv.shape[:-1] + (plan.C,), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(qkv.shape[:-1] + (spec.num_heads,), dtype=accumulation_dtype(qkv.dtype), device=qkv.device)
    tab, st0, st1 = _table_args(table, lse)
    has_pad = plan.padded and qkv_pad is not None
    with device_guard(qkv):
        wrap_triton(_fwd_kernel)[plan.grids["fwd"]](
            qkv, out, lse, tab, qkv_pad.contiguous() if has_pad else lse, st0, st1, *plan.scalars,
            **plan.constexprs, HAS_BIAS=table is not None, HAS_MASK=spec.shifted, HAS_PAD=has_pad, CAST=plan.cast,
            PREC=plan.prec, BLOCK_M=plan.block, BLOCK_N=plan.block, BLOCK_D=plan.block_d, num_warps=4)
    return out, lse


def window_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              table, qkv_pad, spec: ref.WindowSpec):
    """``(dqkv (B, D, H, W, 3C), dtable (T, heads) or None, dqkv_pad (3C,) or None)``; deterministic."""
    qkv, dout, out = qkv.contiguous(), dout.contiguous(), out.contiguous()
    plan = _plan(qkv, spec, table)
    heads, hd, C, N = spec.num_heads, plan.head_dim, plan.C, spec.tokens
    acc = lse.dtype
    delta = torch.empty(out.shape[:-1] + (heads,), dtype=acc, device=out.device)
    dqkv = torch.empty_like(qkv)
    tab, st0, st1 = _table_args(table, lse)
    has_pad = plan.padded and qkv_pad is not None
    pad = qkv_pad.contiguous() if has_pad else lse
    ppad = torch.empty((plan.grids["dkdv"][0], heads, 2, hd) if has_pad else (0,), dtype=acc, device=qkv.device)
    part = torch.empty((plan.groups, heads, N, N) if table is not None else (0,), dtype=acc, device=qkv.device)
    dtable = torch.empty((table.shape[0], heads) if table is not None else (0,), dtype=acc, device=qkv.device)
    common = dict(**plan.constexprs, HAS_MASK=spec.shifted, HAS_PAD=has_pad, CAST=plan.cast, PREC=plan.prec,
                  BLOCK_M=plan.block, BLOCK_N=plan.block, BLOCK_D=plan.block_d, num_warps=4)
    with device_guard(qkv):
        wrap_triton(_delta_kernel)[plan.grids["delta"]](dout, out, delta, out.numel() // C, C, hd, BLOCK_T=BLOCK_T,
                                                        BLOCK_D=plan.block_d, num_warps=4)
        wrap_triton(_bwd_dkdv_kernel)[plan.grids["dkdv"]](
            qkv, dout, lse, delta, tab, pad, dqkv, ppad, st0, st1, *plan.scalars, HAS_BIAS=table is not None,
            **common)
        # dQ; with a single key block it also sums dS over each group of windows (the bias-table partials),
        # otherwise _bwd_dbias_kernel does that over the same groups.
        wrap_triton(_bwd_dq_kernel)[plan.grids["dq"]](
            qkv, dout, lse, delta, tab, pad, dqkv, part, st0, st1, *plan.scalars, plan.n_windows,
            plan.dq_per_group, HAS_BIAS=table is not None, FUSE_DBIAS=plan.fuse_dbias, **common)
        if "dbias" in plan.grids:
            wrap_triton(_bwd_dbias_kernel)[plan.grids["dbias"]](
                qkv, dout, lse, delta, tab, pad, part, st0, st1, *plan.scalars, plan.n_windows, plan.per_group,
                **common)
        if table is not None:
            c = plan.constexprs
            wrap_triton(_dtable_reduce_kernel)[plan.grids["dtable"]](
                part, dtable, plan.groups, heads, N, table.shape[0], BD=c["BD"], BH=c["BH"], BW=c["BW"],
                TWD=c["TWD"], TWH=c["TWH"], TWW=c["TWW"], BLOCK_R=BLOCK_R, BLOCK_I=min(64, triton.next_power_of_2(N)),
                num_warps=4)
    dpad = None
    if qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        dpad = torch.zeros(3, heads, hd, dtype=acc, device=qkv.device)
        if has_pad:
            dpad[1:] = ppad.sum(0).transpose(0, 1)
        dpad = dpad.reshape(3 * C).to(qkv_pad.dtype)
    return dqkv, (dtable.to(table.dtype) if table is not None else None), dpad
