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

Forward: ``_fwd_kernel``, one program per (window, block of BLOCK_M queries, head), keys in tiles of BLOCK_N
with an online softmax (49 tokens are one 64-tile; 343 tokens are 6 tiles); saves the per-row logsumexp.
Backward (flash-style, P recomputed from the logsumexp; ``_delta_kernel`` computes ``delta = rowsum(dO * O)``):
  1. ``_bwd_dkdv_kernel``: per (window, key block, head), loop over query blocks -> dK, dV.
  2. ``_bwd_dq_kernel``: per (query block, head, window), loop over key blocks -> dQ.  With a single key
     block (N <= 64) each program takes a group of windows and also sums their dS into a private ``(N, N)``
     partial of the bias-table gradient.
  3. ``_bwd_dbias_kernel`` (more than one key block only): per (query block x key block, head, group of
     windows) -> the same partials.
  4. ``_dtable_reduce_kernel``: per (block of table rows, head), sum the partials of every (query, key) pair
     with that relative offset over the groups in a fixed order.  Deterministic; no atomics anywhere.
  Padding keys (MONAI padding) collect dK, dV per program; their sum over programs is d(qkv_pad).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from fastmed._tensors import accumulation_dtype, target_programs

MASK_VALUE = tl.constexpr(-100.0)  # the anchors' constant between shift regions

# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tokens(wi, t, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
            WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
            BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Tokens ``t`` of window ``wi``: grid index (int64), inside the real grid (not padding), shift-region id
    and bias coordinates.  Windows tile the padded grid ``(Dp, Hp, Wp)``; the data is the real ``(D, H, W)``."""
    nw = nWd * nWh * nWw
    b = wi // nw
    r = wi % nw
    wdi = r // (nWh * nWw)
    whi = (r // nWw) % nWh
    wwi = r % nWw
    yd = wdi * WD + t // (WH * WW)
    yh = whi * WH + (t // WW) % WH
    yw = wwi * WW + t % WW
    sd = (yd + shd) % Dp
    sh = (yh + shh) % Hp
    sw = (yw + shw) % Wp
    valid = (sd < D) & (sh < H) & (sw < W)
    tok = ((b * D + sd) * H + sh) * W + sw
    region = (((yd >= Dp - WD).to(tl.int32) + (yd >= Dp - shd).to(tl.int32)) * 9
              + ((yh >= Hp - WH).to(tl.int32) + (yh >= Hp - shh).to(tl.int32)) * 3
              + ((yw >= Wp - WW).to(tl.int32) + (yw >= Wp - shw).to(tl.int32)))
    bd = t // (BH * BW)
    bh = (t // BW) % BH
    bw = t % BW
    return tok, valid, region, bd, bh, bw


@triton.jit
def _scores(q, k, scale, head, table_ptr, st0, st1, row_ok, col_ok,
            qreg, kreg, qbd, qbh, qbw, kbd, kbh, kbw,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scores q k^T * scale + bias + shift mask; padded keys are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_BIAS:
        idx = ((qbd[:, None] - kbd[None, :] + TWD - 1) * ((2 * TWH - 1) * (2 * TWW - 1))
               + (qbh[:, None] - kbh[None, :] + TWH - 1) * (2 * TWW - 1)
               + (qbw[:, None] - kbw[None, :] + TWW - 1))
        bias = tl.load(table_ptr + idx.to(tl.int64) * st0 + head * st1,
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
    pid = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    n_mb = tl.cdiv(N, BLOCK_M)
    wi = pid // n_mb
    rows = (pid % n_mb) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_win = rows < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    qtok, qval, qreg, qbd, qbh, qbw = _tokens(wi, rows, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                              WD, WH, WW, BD, BH, BW)
    ch = head * head_dim + dd
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
        ktok, kval, kreg, kbd, kbh, kbw = _tokens(wi, cols, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                  WD, WH, WW, BD, BH, BW)
        k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, ch, d_ok, C, HAS_PAD, CAST, acc_ty)
        s = _scores(q, k, scale, head, table_ptr, st0, st1, in_win, col_ok, qreg, kreg, qbd, qbh, qbw,
                    kbd, kbh, kbw, HAS_BIAS, HAS_MASK, TWD, TWH, TWW, PREC).to(acc_ty)
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
def _load_rows(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, tok, row_ok, ch, d_ok, head, heads, C,
               CAST: tl.constexpr, ACC: tl.constexpr):
    """q, dO, lse and delta of a block of query rows."""
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
def _load_cols(qkv_ptr, pad_ptr, tok, valid, col_ok, ch, d_ok, C, HAS_PAD: tl.constexpr, CAST: tl.constexpr,
               ACC: tl.constexpr):
    """k and v of a block of key columns (padding tokens read the pad vector, or zeros)."""
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
def _p_ds(q, k, v, do, lse, delta, scale, head, table_ptr, st0, st1, row_ok, col_ok,
          qreg, kreg, qbd, qbh, qbw, kbd, kbh, kbw,
          HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
          TWD: tl.constexpr, TWH: tl.constexpr, TWW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Recomputed P and dS = P * (dO V^T - delta) of one [BLOCK_M, BLOCK_N] tile (zero outside the window)."""
    s = _scores(q, k, scale, head, table_ptr, st0, st1, row_ok, col_ok, qreg, kreg, qbd, qbh, qbw,
                kbd, kbh, kbw, HAS_BIAS, HAS_MASK, TWD, TWH, TWW, PREC).to(ACC)
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
    head = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    dd = tl.arange(0, BLOCK_D)
    m = (tok < M)[:, None] & (dd < head_dim)[None, :]
    off = tok[:, None] * C + head * head_dim + dd[None, :]
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
    pid = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    n_nb = tl.cdiv(N, BLOCK_N)
    wi = pid // n_nb
    cols = (pid % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    ch = head * head_dim + dd
    ktok, kval, kreg, kbd, kbh, kbw = _tokens(wi, cols, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                              WD, WH, WW, BD, BH, BW)
    k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, ch, d_ok, C, HAS_PAD, CAST, acc_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        qtok, qval, qreg, qbd, qbh, qbw = _tokens(wi, rows, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                  WD, WH, WW, BD, BH, BW)
        row_ok = (rows < N) & qval  # padding queries get no gradient (their outputs are cropped)
        q, do, lse, delta = _load_rows(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, qtok, row_ok, ch, d_ok, head, heads,
                                       C, CAST, acc_ty)
        p, ds = _p_ds(q, k, v, do, lse, delta, scale, head, table_ptr, st0, st1, row_ok, col_ok, qreg, kreg,
                      qbd, qbh, qbw, kbd, kbh, kbw, HAS_BIAS, HAS_MASK, TWD, TWH, TWW, PREC, acc_ty)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(acc_ty)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(acc_ty)
    m = (col_ok & kval)[:, None] & d_ok[None, :]
    base = dqkv_ptr + ktok[:, None] * (3 * C) + ch[None, :]
    out_ty = dqkv_ptr.dtype.element_ty
    tl.store(base + C, (dk * scale).to(out_ty), mask=m)
    tl.store(base + 2 * C, dv.to(out_ty), mask=m)
    if HAS_PAD:
        is_pad = (col_ok & (kval == 0))[:, None]
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    g = tl.program_id(2).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    ch = head * head_dim + dd
    dbias = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    w_end = tl.minimum(g * per_group + per_group, n_windows)
    for wi in range(g * per_group, w_end):
        qtok, qval, qreg, qbd, qbh, qbw = _tokens(wi, rows, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                  WD, WH, WW, BD, BH, BW)
        row_ok = (rows < N) & qval
        q, do, lse, delta = _load_rows(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, qtok, row_ok, ch, d_ok, head, heads,
                                       C, CAST, acc_ty)
        dq = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ktok, kval, kreg, kbd, kbh, kbw = _tokens(wi, cols, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                      WD, WH, WW, BD, BH, BW)
            k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, ch, d_ok, C, HAS_PAD, CAST, acc_ty)
            p, ds = _p_ds(q, k, v, do, lse, delta, scale, head, table_ptr, st0, st1, row_ok, col_ok, qreg, kreg,
                          qbd, qbh, qbw, kbd, kbh, kbw, HAS_BIAS, HAS_MASK, TWD, TWH, TWW, PREC, acc_ty)
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
    n_nb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // n_nb) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    head = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    g = tl.program_id(2).to(tl.int64)
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    ch = head * head_dim + dd
    dbias = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    w_end = tl.minimum(g * per_group + per_group, n_windows)
    for wi in range(g * per_group, w_end):
        qtok, qval, qreg, qbd, qbh, qbw = _tokens(wi, rows, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                  WD, WH, WW, BD, BH, BW)
        ktok, kval, kreg, kbd, kbh, kbw = _tokens(wi, cols, nWd, nWh, nWw, Dp, Hp, Wp, D, H, W, shd, shh, shw,
                                                  WD, WH, WW, BD, BH, BW)
        row_ok = (rows < N) & qval
        q, do, lse, delta = _load_rows(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, qtok, row_ok, ch, d_ok, head, heads,
                                       C, CAST, acc_ty)
        k, v = _load_cols(qkv_ptr, pad_ptr, ktok, kval, col_ok, ch, d_ok, C, HAS_PAD, CAST, acc_ty)
        p, ds = _p_ds(q, k, v, do, lse, delta, scale, head, table_ptr, st0, st1, row_ok, col_ok, qreg, kreg,
                      qbd, qbh, qbw, kbd, kbh, kbw, True, HAS_MASK, TWD, TWH, TWW, PREC, acc_ty)
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

def _config(qkv: torch.Tensor, num_heads: int, window, table_window, bias_coords):
    """Shared launch parameters: sizes (the grid padded up to a multiple of the window), tiles, constexpr flags."""
    B, D, H, W, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    N = window[0] * window[1] * window[2]
    block = 16 if N <= 16 else (32 if N <= 32 else 64)
    if qkv.dtype == torch.float64:  # 64-wide float64 tiles overflow the 227 KB of shared memory of an H100
        block = min(block, 32)
    nW = (triton.cdiv(D, window[0]), triton.cdiv(H, window[1]), triton.cdiv(W, window[2]))
    padded = (nW[0] * window[0], nW[1] * window[1], nW[2] * window[2])
    interp = qkv.device.type == "cpu"
    return dict(
        B=B, C=C, head_dim=head_dim, N=N, n_windows=B * nW[0] * nW[1] * nW[2], block=block,
        cast=interp or qkv.dtype in (torch.float32, torch.float64),
        prec="ieee" if qkv.dtype in (torch.float32, torch.float64) else "tf32",
        block_d=max(16, triton.next_power_of_2(head_dim)),
        nW=nW, grids=padded + (D, H, W), has_pad=padded != (D, H, W),
        consts=dict(WD=window[0], WH=window[1], WW=window[2], BD=bias_coords[0], BH=bias_coords[1],
                    BW=bias_coords[2], TWD=table_window[0], TWH=table_window[1], TWW=table_window[2]),
    )


def _table_args(table, dummy):
    if table is None:
        return dummy, 0, 0
    return table, table.stride(0), table.stride(1)


def window_attention_forward(qkv: torch.Tensor, table, qkv_pad, num_heads: int, window, shift, scale: float,
                             table_window, bias_coords) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, D, H, W, C), lse (B, D, H, W, heads))`` for a ``(B, D, H, W, 3C)`` grid.

    ``window``/``shift`` are the effective 3-tuples; windows tile the grid padded up to a multiple of ``window``
    with tokens whose qkv is ``qkv_pad`` ``(3C,)`` (zeros when None).  ``table`` is ``(T, heads)`` or None.
    """
    qkv = qkv.contiguous()
    cfg = _config(qkv, num_heads, window, table_window, bias_coords)
    out = torch.empty(qkv.shape[:-1] + (cfg["C"],), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(qkv.shape[:-1] + (num_heads,), dtype=accumulation_dtype(qkv.dtype), device=qkv.device)
    tab, st0, st1 = _table_args(table, lse)
    has_pad = cfg["has_pad"] and qkv_pad is not None
    blk = cfg["block"]
    grid = (cfg["n_windows"] * triton.cdiv(cfg["N"], blk), num_heads)
    wrap_triton(_fwd_kernel)[grid](
        qkv, out, lse, tab, qkv_pad.contiguous() if has_pad else lse, st0, st1, *cfg["grids"], cfg["C"],
        cfg["head_dim"], cfg["N"], *cfg["nW"], *shift, float(scale), **cfg["consts"], HAS_BIAS=table is not None,
        HAS_MASK=any(s > 0 for s in shift), HAS_PAD=has_pad, CAST=cfg["cast"], PREC=cfg["prec"], BLOCK_M=blk,
        BLOCK_N=blk, BLOCK_D=cfg["block_d"], num_warps=4)
    return out, lse


def _groups(n_windows: int, programs_per_group: int, part_bytes_per_group: int,
            device: torch.device) -> tuple[int, int]:
    """(groups, windows per group) for the dQ / bias kernels; each group writes one partial."""
    target = target_programs(device, cpu=4)
    groups = max(1, min(n_windows, triton.cdiv(target, programs_per_group)))
    budget = 256 << 20  # at most this many bytes of partials
    groups = max(1, min(groups, budget // max(1, part_bytes_per_group)))
    per_group = triton.cdiv(n_windows, groups)
    return triton.cdiv(n_windows, per_group), per_group


def window_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              table, qkv_pad, num_heads: int, window, shift, scale: float, table_window, bias_coords):
    """``(dqkv (B, D, H, W, 3C), dtable (T, heads) or None, dqkv_pad (3C,) or None)``; deterministic."""
    qkv = qkv.contiguous()
    dout = dout.contiguous()
    cfg = _config(qkv, num_heads, window, table_window, bias_coords)
    C, hd, N = cfg["C"], cfg["head_dim"], cfg["N"]
    acc = lse.dtype
    out = out.contiguous()
    M = out.numel() // C
    delta = torch.empty(out.shape[:-1] + (num_heads,), dtype=acc, device=out.device)
    wrap_triton(_delta_kernel)[(triton.cdiv(M, 64), num_heads)](dout, out, delta, M, C, hd, BLOCK_T=64,
                                                                BLOCK_D=cfg["block_d"], num_warps=4)
    dqkv = torch.empty_like(qkv)
    tab, st0, st1 = _table_args(table, lse)
    has_pad = cfg["has_pad"] and qkv_pad is not None
    pad = qkv_pad.contiguous() if has_pad else lse
    blk = cfg["block"]
    n_b = triton.cdiv(N, blk)
    has_mask = any(s > 0 for s in shift)
    common = dict(**cfg["consts"], HAS_MASK=has_mask, HAS_PAD=has_pad, CAST=cfg["cast"], PREC=cfg["prec"],
                  BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=cfg["block_d"])
    sizes = (*cfg["grids"], C, hd, N, *cfg["nW"], *shift, float(scale))
    ppad = torch.empty((cfg["n_windows"] * n_b, num_heads, 2, hd) if has_pad else (0,), dtype=acc,
                       device=qkv.device)
    wrap_triton(_bwd_dkdv_kernel)[(cfg["n_windows"] * n_b, num_heads)](
        qkv, dout, lse, delta, tab, pad, dqkv, ppad, st0, st1, *sizes, HAS_BIAS=table is not None, **common,
        num_warps=4)
    dpad = None
    if qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        dpad = torch.zeros(3, num_heads, hd, dtype=acc, device=qkv.device)
        if has_pad:
            dpad[1:] = ppad.sum(0).transpose(0, 1)
        dpad = dpad.reshape(3 * C).to(qkv_pad.dtype)

    # dQ: one program per (query block, head, window); with a single key block it also sums dS over a group of
    # windows (the bias-table partial), otherwise _bwd_dbias_kernel does that over its own groups.
    fuse = table is not None and n_b == 1
    elem = torch.finfo(acc).bits // 8
    part_bytes = num_heads * N * N * elem
    if fuse:
        G, per_group = _groups(cfg["n_windows"], n_b * num_heads, part_bytes, qkv.device)
    elif table is not None:
        G, per_group = _groups(cfg["n_windows"], n_b * n_b * num_heads, part_bytes, qkv.device)
    part = torch.empty((G, num_heads, N, N) if table is not None else (0,), dtype=acc, device=qkv.device)
    dq_groups, dq_per_group = (G, per_group) if fuse else (cfg["n_windows"], 1)
    wrap_triton(_bwd_dq_kernel)[(n_b, num_heads, dq_groups)](
        qkv, dout, lse, delta, tab, pad, dqkv, part, st0, st1, *sizes, cfg["n_windows"], dq_per_group,
        HAS_BIAS=table is not None, FUSE_DBIAS=fuse, **common, num_warps=4)
    if table is None:
        return dqkv, None, dpad
    if not fuse:
        wrap_triton(_bwd_dbias_kernel)[(n_b * n_b, num_heads, G)](
            qkv, dout, lse, delta, tab, pad, part, st0, st1, *sizes, cfg["n_windows"], per_group, **common, num_warps=4)
    T = table.shape[0]
    dtable = torch.empty((T, num_heads), dtype=acc, device=qkv.device)
    c = cfg["consts"]
    block_r = 32
    wrap_triton(_dtable_reduce_kernel)[(triton.cdiv(T, block_r), num_heads)](
        part, dtable, G, num_heads, N, T, BD=c["BD"], BH=c["BH"], BW=c["BW"], TWD=c["TWD"], TWH=c["TWH"],
        TWW=c["TWW"], BLOCK_R=block_r, BLOCK_I=min(64, triton.next_power_of_2(N)), num_warps=4)
    return dqkv, dtable.to(table.dtype), dpad
