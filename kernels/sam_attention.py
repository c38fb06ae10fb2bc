"""SAM attention with decomposed relative position: Triton kernels and launchers.

The token grid is ``qkv (B, H, W, 3C)``, contiguous.  Windows of ``(WH, WW)`` tokens (the grid itself for global
attention) tile the grid padded at the end of each axis to a multiple of the window; padding tokens are never
stored: their k and v are read from ``qkv_pad`` (the qkv Linear's bias) or are zero, and padding queries are
computed but never stored.  Window ``wi`` in ``[0, B * nWh * nWw)`` and token ``t`` in ``[0, WH * WW)`` (raster
order) address the grid by index: ``y = wy * WH + t // WW``, ``x = wx * WW + t % WW``.

The q-dependent bias (``q . R_h[...]``, ``q . R_w[...]``) is computed first by
:func:`fastmed.reference.sam_attention.decomposed_bias` (two small matmuls per token): ``rel_h (B, H, W, heads, WH)``
and ``rel_w (B, H, W, heads, WW)`` in fp32; the kernels add ``rel_h[query, key row] + rel_w[query, key column]``
to every score tile (flash attention with a decomposed bias, as segment-anything-fast does).

Forward ``_fwd_kernel``: one program per (window, block of BLOCK_M queries, head), keys in tiles of BLOCK_N with an
online softmax; it stores the per-row logsumexp.  Backward (P recomputed from the logsumexp, ``delta = rowsum(dO * O)``
computed by torch first):
  1. ``_bwd_dkdv_kernel``: per (window, key block, head), loop over query blocks -> dK, dV; padding keys sum their
     dK, dV into one partial per program (their total over programs, in a fixed order, is ``d qkv_pad``).
  2. ``_bwd_dq_kernel``: per (window, query block, head), loop over key blocks -> dQ and ``d rel_h`` / ``d rel_w``
     as ``dS @ onehot(key row)`` / ``dS @ onehot(key column)`` (each query owns its row: no atomics).
The tables' gradients (and the bias' share of dQ) follow from ``d rel_h`` / ``d rel_w`` by the matmuls of
``decomposed_bias``'s backward.  Deterministic: no atomics anywhere.

Arguments of the backward kernels (contiguous; fp32/fp64 where the forward's ``lse`` is):
  ``qkv_ptr (B, H, W, 3C)``, ``pad_ptr (3C,)`` (HAS_PAD), ``relh_ptr (B, H, W, heads, WH)``,
  ``relw_ptr (B, H, W, heads, WW)``, ``dout_ptr (B, H, W, C)``, ``lse_ptr``, ``delta_ptr (B, H, W, heads)``, then
  ``dqkv_ptr (B, H, W, 3C)``: ``_bwd_dkdv_kernel`` writes the k and v channels of real tokens, ``_bwd_dq_kernel``
  the q channels; ``_bwd_dkdv_kernel``'s ``ppad_ptr (programs, heads, 2, head_dim)``: padding keys' dK, dV per
  program (HAS_PAD); ``_bwd_dq_kernel``'s ``drelh_ptr``, ``drelw_ptr``: fp32/fp64, shaped as ``relh``, ``relw``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import accumulation_dtype, device_guard
from fastmed.reference import sam_attention as ref

from ._common import online_softmax_step


@triton.jit
def _tokens(wi, t, H, W, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr):
    """Tokens ``t`` of window ``wi``: grid index (int64), real (inside the grid), inside the window, row, column."""
    wx = wi % nWw
    r = wi // nWw
    wy = r % nWh
    b = r // nWh
    ly = t // WW
    lx = t % WW
    y = wy * WH + ly
    x = wx * WW + lx
    in_win = t < WH * WW
    real = in_win & (y < H) & (x < W)
    return (b * H + y) * W + x, real, in_win, ly, lx


@triton.jit
def _key_tile(qkv_ptr, pad_ptr, wi, cols, H, W, nWh, nWw, ch, d_ok, C, acc_ty, HAS_PAD: tl.constexpr,
              CAST: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr):
    """Keys ``cols`` of window ``wi``: ``(ktok, k_real, k_in, ly, lx, k, v)``; padding tokens' k, v from ``pad_ptr``
    (HAS_PAD) or zero; upcast to ``acc_ty`` with CAST."""
    ktok, real, k_in, ly, lx = _tokens(wi, cols, H, W, nWh, nWw, WH, WW)
    m = real[:, None] & d_ok[None, :]
    k = tl.load(qkv_ptr + ktok[:, None] * (3 * C) + C + ch[None, :], mask=m, other=0.0)
    v = tl.load(qkv_ptr + ktok[:, None] * (3 * C) + 2 * C + ch[None, :], mask=m, other=0.0)
    if HAS_PAD:
        k = tl.where(real[:, None], k, tl.load(pad_ptr + C + ch, mask=d_ok, other=0.0)[None, :])
        v = tl.where(real[:, None], v, tl.load(pad_ptr + 2 * C + ch, mask=d_ok, other=0.0)[None, :])
    if CAST:
        k = k.to(acc_ty)
        v = v.to(acc_ty)
    return ktok, real, k_in, ly, lx, k, v


@triton.jit
def _scores(q, k, rh, rw, ly, lx, k_in, scale, acc_ty, PREC: tl.constexpr, BLOCK_WH: tl.constexpr,
            BLOCK_WW: tl.constexpr):
    """``(q * scale) k^T + rel_h[query, key row] + rel_w[query, key column]`` of a (BLOCK_M, BLOCK_N) tile."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(acc_ty) * scale
    oh, ow = _onehots(ly, lx, k_in, q.dtype, BLOCK_WH, BLOCK_WW)
    return s + _bias(rh, rw, oh, ow, PREC), oh, ow


@triton.jit
def _rel_rows(relh_ptr, relw_ptr, qtok, q_ok, head, heads, acc_ty, WH: tl.constexpr, WW: tl.constexpr,
              BLOCK_WH: tl.constexpr, BLOCK_WW: tl.constexpr):
    """The queries' ``rel_h`` ``(BLOCK_M, BLOCK_WH)`` and ``rel_w`` ``(BLOCK_M, BLOCK_WW)`` rows (zero past WH/WW),
    as ``acc_ty``: q's tile dtype, so on 16-bit tiles the bias rounds to qkv's dtype as q and k do."""
    jh = tl.arange(0, BLOCK_WH)
    jw = tl.arange(0, BLOCK_WW)
    base = qtok * heads + head
    rh = tl.load(relh_ptr + (base * WH)[:, None] + jh[None, :], mask=q_ok[:, None] & (jh < WH)[None, :], other=0.0)
    rw = tl.load(relw_ptr + (base * WW)[:, None] + jw[None, :], mask=q_ok[:, None] & (jw < WW)[None, :], other=0.0)
    return rh.to(acc_ty), rw.to(acc_ty)


@triton.jit
def _onehots(ly, lx, k_in, acc_ty, BLOCK_WH: tl.constexpr, BLOCK_WW: tl.constexpr):
    """``(BLOCK_WH, BLOCK_N)`` / ``(BLOCK_WW, BLOCK_N)``: one where key ``n`` lies in window row / column ``j``."""
    oh = (tl.arange(0, BLOCK_WH)[:, None] == ly[None, :]) & k_in[None, :]
    ow = (tl.arange(0, BLOCK_WW)[:, None] == lx[None, :]) & k_in[None, :]
    return oh.to(acc_ty), ow.to(acc_ty)


@triton.jit
def _bias(rh, rw, oh, ow, PREC: tl.constexpr):  # fp32 (fp64) result
    """``rel_h[query, key row] + rel_w[query, key column]`` of a (BLOCK_M, BLOCK_N) tile, as one-hot matmuls
    (no per-element gather: the tile's addresses would not fit in registers)."""
    return tl.dot(rh, oh, input_precision=PREC) + tl.dot(rw, ow, input_precision=PREC)


@triton.jit
def _program_block(head_dim, N: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of a window's ``N`` tokens and head (program axis 0: window x block of BLOCK tokens;
    axis 1: head): ``(pid, wi, idx, head, dd, d_ok, ch)``, ``idx`` the block's in-window token indices, ``ch`` the
    head's channels (``dd < head_dim``: ``d_ok``)."""
    pid = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    n_blocks: tl.constexpr = (N + BLOCK - 1) // BLOCK
    dd = tl.arange(0, BLOCK_D)
    return (pid, pid // n_blocks, (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK), head, dd, dd < head_dim,
            head * head_dim + dd)


@triton.jit
def _query_block(qkv_ptr, H, W, nWh, nWw, C, head_dim, WH: tl.constexpr, WW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """This program's window, head and block of queries (program axis 0: window x query block; axis 1: head):
    ``(wi, head, heads, ch, d_ok, qtok, q_ok, qm, q)``, ``q`` as stored (zero on padding rows)."""
    _, wi, rows, head, _, d_ok, ch = _program_block(head_dim, WH * WW, BLOCK_M, BLOCK_D)
    qtok, q_ok, qm, q = _query_rows(qkv_ptr, wi, rows, H, W, nWh, nWw, ch, d_ok, C, WH, WW)
    return wi, head, tl.num_programs(1), ch, d_ok, qtok, q_ok, qm, q


@triton.jit
def _query_rows(qkv_ptr, wi, rows, H, W, nWh, nWw, ch, d_ok, C, WH: tl.constexpr, WW: tl.constexpr):
    """Queries ``rows`` of window ``wi``: ``(qtok, q_ok, qm, q)``, ``q`` as stored (zero on padding rows)."""
    qtok, q_ok, _, _, _ = _tokens(wi, rows, H, W, nWh, nWw, WH, WW)
    qm = q_ok[:, None] & d_ok[None, :]
    q = tl.load(qkv_ptr + qtok[:, None] * (3 * C) + ch[None, :], mask=qm, other=0.0)
    return qtok, q_ok, qm, q


@triton.jit
def _grad_rows(q, dout_ptr, lse_ptr, delta_ptr, relh_ptr, relw_ptr, qtok, q_ok, qm, ch, head, heads, C, acc_ty,
               CAST: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_WH: tl.constexpr,
               BLOCK_WW: tl.constexpr):
    """What the backward kernels read per block of queries ``q`` (as stored): ``(q, do, lse, delta, rh, rw)``,
    ``q`` and ``dO`` upcast to ``acc_ty`` with CAST."""
    do = tl.load(dout_ptr + qtok[:, None] * C + ch[None, :], mask=qm, other=0.0)
    if CAST:
        q = q.to(acc_ty)
        do = do.to(acc_ty)
    lse = tl.load(lse_ptr + qtok * heads + head, mask=q_ok, other=0.0)
    delta = tl.load(delta_ptr + qtok * heads + head, mask=q_ok, other=0.0)
    rh, rw = _rel_rows(relh_ptr, relw_ptr, qtok, q_ok, head, heads, q.dtype, WH, WW, BLOCK_WH, BLOCK_WW)
    return q, do, lse, delta, rh, rw


@triton.jit
def _probs_dscores(q, k, v, do, lse, delta, rh, rw, ly, lx, q_ok, k_in, scale, acc_ty, PREC: tl.constexpr,
                   BLOCK_WH: tl.constexpr, BLOCK_WW: tl.constexpr):
    """Recomputed ``P`` (zero for padding queries, which are never stored, and keys outside the window) and
    ``dS = P * (dO V^T - delta)`` of a (BLOCK_M, BLOCK_N) tile, with the one-hot matrices of :func:`_scores`:
    ``(p, ds, oh, ow)``."""
    s, oh, ow = _scores(q, k, rh, rw, ly, lx, k_in, scale, acc_ty, PREC, BLOCK_WH, BLOCK_WW)
    p = tl.where(q_ok[:, None] & k_in[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(acc_ty)
    return p, p * (dp - delta[:, None]), oh, ow


@triton.jit
def _fwd_kernel(
    qkv_ptr,    # shape (B, H, W, 3C)
    pad_ptr,    # shape (3C,): qkv of a padding token (HAS_PAD)
    relh_ptr,   # shape (B, H, W, heads, WH), fp32/fp64
    relw_ptr,   # shape (B, H, W, heads, WW)
    out_ptr,    # shape (B, H, W, C)
    lse_ptr,    # shape (B, H, W, heads), fp32/fp64
    H, W, nWh, nWw, C, head_dim, scale,
    WH: tl.constexpr, WW: tl.constexpr, HAS_PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_WH: tl.constexpr,
    BLOCK_WW: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    wi, head, heads, ch, d_ok, qtok, q_ok, qm, q = _query_block(qkv_ptr, H, W, nWh, nWw, C, head_dim, WH, WW,
                                                                 BLOCK_M, BLOCK_D)
    if CAST:
        q = q.to(acc_ty)
    rh, rw = _rel_rows(relh_ptr, relw_ptr, qtok, q_ok, head, heads, q.dtype, WH, WW, BLOCK_WH, BLOCK_WW)
    m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)
    l_i = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    for n0 in range(0, WH * WW, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ktok, k_real, k_in, ly, lx, k, v = _key_tile(qkv_ptr, pad_ptr, wi, cols, H, W, nWh, nWw, ch, d_ok, C,
                                                      acc_ty, HAS_PAD, CAST, WH, WW)
        s, _, _ = _scores(q, k, rh, rw, ly, lx, k_in, scale, acc_ty, PREC, BLOCK_WH, BLOCK_WW)
        s = tl.where(k_in[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PREC)
    out = acc / l_i[:, None]
    tl.store(out_ptr + qtok[:, None] * C + ch[None, :], out.to(out_ptr.dtype.element_ty), mask=qm)
    tl.store(lse_ptr + qtok * heads + head, m_i + tl.log(l_i), mask=q_ok)


@triton.jit
def _bwd_dkdv_kernel(qkv_ptr, pad_ptr, relh_ptr, relw_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, ppad_ptr,
                     H, W, nWh, nWw, C, head_dim, scale, WH: tl.constexpr, WW: tl.constexpr, HAS_PAD: tl.constexpr,
                     CAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_WH: tl.constexpr, BLOCK_WW: tl.constexpr):
    """Arguments: see the module's docstring."""
    acc_ty = lse_ptr.dtype.element_ty
    pid, wi, cols, head, dd, d_ok, ch = _program_block(head_dim, WH * WW, BLOCK_N, BLOCK_D)
    heads = tl.num_programs(1)
    ktok, k_real, k_in, ly, lx, k, v = _key_tile(qkv_ptr, pad_ptr, wi, cols, H, W, nWh, nWw, ch, d_ok, C, acc_ty,
                                                  HAS_PAD, CAST, WH, WW)
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    for m0 in range(0, WH * WW, BLOCK_M):
        qtok, q_ok, qm, q = _query_rows(qkv_ptr, wi, m0 + tl.arange(0, BLOCK_M), H, W, nWh, nWw, ch, d_ok, C, WH, WW)
        q, do, lse, delta, rh, rw = _grad_rows(q, dout_ptr, lse_ptr, delta_ptr, relh_ptr, relw_ptr, qtok, q_ok, qm,
                                               ch, head, heads, C, acc_ty, CAST, WH, WW, BLOCK_WH, BLOCK_WW)
        p, ds, _, _ = _probs_dscores(q, k, v, do, lse, delta, rh, rw, ly, lx, q_ok, k_in, scale, acc_ty, PREC,
                                     BLOCK_WH, BLOCK_WW)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(acc_ty)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(acc_ty)
    dk = dk * scale
    km = k_real[:, None] & d_ok[None, :]
    out_ty = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptr + ktok[:, None] * (3 * C) + C + ch[None, :], dk.to(out_ty), mask=km)
    tl.store(dqkv_ptr + ktok[:, None] * (3 * C) + 2 * C + ch[None, :], dv.to(out_ty), mask=km)
    if HAS_PAD:
        is_pad = (k_in & (k_real == 0))[:, None]
        base = ppad_ptr + ((pid * heads + head) * 2) * head_dim + dd
        tl.store(base, tl.sum(tl.where(is_pad, dk, 0.0), axis=0), mask=d_ok)
        tl.store(base + head_dim, tl.sum(tl.where(is_pad, dv, 0.0), axis=0), mask=d_ok)


@triton.jit
def _bwd_dq_kernel(qkv_ptr, pad_ptr, relh_ptr, relw_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, drelh_ptr,
                   drelw_ptr, H, W, nWh, nWw, C, head_dim, scale, WH: tl.constexpr, WW: tl.constexpr,
                   HAS_PAD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_WH: tl.constexpr, BLOCK_WW: tl.constexpr):
    """Arguments: see the module's docstring."""
    acc_ty = lse_ptr.dtype.element_ty
    wi, head, heads, ch, d_ok, qtok, q_ok, qm, q = _query_block(qkv_ptr, H, W, nWh, nWw, C, head_dim, WH, WW,
                                                                 BLOCK_M, BLOCK_D)
    q, do, lse, delta, rh, rw = _grad_rows(q, dout_ptr, lse_ptr, delta_ptr, relh_ptr, relw_ptr, qtok, q_ok, qm, ch,
                                           head, heads, C, acc_ty, CAST, WH, WW, BLOCK_WH, BLOCK_WW)
    jh = tl.arange(0, BLOCK_WH)
    jw = tl.arange(0, BLOCK_WW)
    dq = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    drh = tl.zeros([BLOCK_M, BLOCK_WH], acc_ty)
    drw = tl.zeros([BLOCK_M, BLOCK_WW], acc_ty)
    for n0 in range(0, WH * WW, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ktok, k_real, k_in, ly, lx, k, v = _key_tile(qkv_ptr, pad_ptr, wi, cols, H, W, nWh, nWw, ch, d_ok, C,
                                                      acc_ty, HAS_PAD, CAST, WH, WW)
        _, ds, oh, ow = _probs_dscores(q, k, v, do, lse, delta, rh, rw, ly, lx, q_ok, k_in, scale, acc_ty, PREC,
                                       BLOCK_WH, BLOCK_WW)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(acc_ty)
        # d rel_h[m, j] = sum over keys n in window row j of dS[m, n] (the same one-hot matrices, transposed)
        drh += tl.dot(ds.to(q.dtype), tl.trans(oh), input_precision=PREC).to(acc_ty)
        drw += tl.dot(ds.to(q.dtype), tl.trans(ow), input_precision=PREC).to(acc_ty)
    dq = dq * scale
    tl.store(dqkv_ptr + qtok[:, None] * (3 * C) + ch[None, :], dq.to(dqkv_ptr.dtype.element_ty), mask=qm)
    base = qtok * heads + head
    tl.store(drelh_ptr + (base * WH)[:, None] + jh[None, :], drh, mask=q_ok[:, None] & (jh < WH)[None, :])
    tl.store(drelw_ptr + (base * WW)[:, None] + jw[None, :], drw, mask=q_ok[:, None] & (jw < WW)[None, :])


def _blocks(spec: ref.SamAttentionSpec, dtype: torch.dtype) -> int:
    """Query and key tile: 64 for 16-bit inputs, 32 for float32/float64 (64-wide fp32 tiles spill on sm_90)."""
    tokens = spec.window[0] * spec.window[1]
    block = 16 if tokens <= 16 else (32 if tokens <= 32 else 64)
    return min(block, 32) if dtype in (torch.float32, torch.float64) else block


def _launch_args(qkv: torch.Tensor, spec: ref.SamAttentionSpec):
    """``(grid, scalars, constexprs, padded)`` shared by the three kernels; constexprs include ``num_warps`` (8 for
    64-tiles) and ``DKDV_BLOCK_M``, the query tile of ``_bwd_dkdv_kernel`` (half the key tile: it keeps K, V, dK,
    dV in registers).  Without spills on sm_90 at SAM ViT-B's shapes (``tests/test_sam_attention.py``)."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    WH, WW = spec.window
    nWh, nWw = triton.cdiv(H, WH), triton.cdiv(W, WW)
    block = _blocks(spec, qkv.dtype)
    wide = qkv.dtype in (torch.float32, torch.float64)
    grid = query_grid(qkv, spec, block)  # also _bwd_dkdv_kernel's: key blocks of the same size
    scalars = (H, W, nWh, nWw, C, C // spec.num_heads, float(spec.scale))
    consts = dict(WH=WH, WW=WW, CAST=qkv.device.type == "cpu" or wide, PREC="ieee" if wide else "tf32",
                  BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(C // spec.num_heads)),
                  BLOCK_WH=max(16, triton.next_power_of_2(WH)), BLOCK_WW=max(16, triton.next_power_of_2(WW)),
                  num_warps=8 if block == 64 else 4)
    return grid, scalars, consts, (nWh * WH, nWw * WW) != (H, W)


def half_query_tile(consts: dict) -> dict:
    """The constexprs of the backward kernels: a query tile of half the key tile (at least 16), as they hold
    more accumulators (dK, dV; or dQ, d rel_h, d rel_w) than the forward."""
    return {**consts, "BLOCK_M": max(16, consts["BLOCK_N"] // 2)}


def query_grid(qkv: torch.Tensor, spec: ref.SamAttentionSpec, block_m: int) -> tuple[int, int]:
    """Grid of the kernels with one program per (window, query block of ``block_m``, head)."""
    B, H, W, _ = qkv.shape
    WH, WW = spec.window
    return B * triton.cdiv(H, WH) * triton.cdiv(W, WW) * triton.cdiv(WH * WW, block_m), spec.num_heads


def _bias_of(qkv: torch.Tensor, rel_pos_h, rel_pos_w, spec: ref.SamAttentionSpec):
    B, H, W, C3 = qkv.shape
    q = qkv[..., : C3 // 3].unflatten(-1, (spec.num_heads, -1))
    return tuple(t.contiguous() for t in ref.decomposed_bias(q, rel_pos_h, rel_pos_w, spec.window))


def sam_attention_forward(qkv: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, qkv_pad,
                          spec: ref.SamAttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, W, C), lse (B, H, W, heads))`` for ``qkv (B, H, W, 3C)``; tables ``(2 * WH - 1, head_dim)``,
    ``(2 * WW - 1, head_dim)``; ``qkv_pad (3C,)`` or None (zeros)."""
    qkv = qkv.contiguous()
    grid, scalars, consts, padded = _launch_args(qkv, spec)
    relh, relw = _bias_of(qkv, rel_pos_h, rel_pos_w, spec)
    out = torch.empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(qkv.shape[:-1] + (spec.num_heads,), dtype=accumulation_dtype(qkv.dtype), device=qkv.device)
    has_pad = padded and qkv_pad is not None
    with device_guard(qkv):
        wrap_triton(_fwd_kernel)[grid](qkv, qkv_pad.contiguous() if has_pad else lse, relh, relw, out, lse,
                                       *scalars, HAS_PAD=has_pad, **consts)
    return out, lse


def sam_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, qkv_pad, spec: ref.SamAttentionSpec):
    """``(dqkv (B, H, W, 3C), drel_pos_h, drel_pos_w, dqkv_pad (3C,) or None)``; deterministic."""
    qkv, dout = qkv.contiguous(), dout.contiguous()
    grid, scalars, consts, padded = _launch_args(qkv, spec)
    heads, C = spec.num_heads, qkv.shape[-1] // 3
    hd = C // heads
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).unflatten(-1, (heads, hd)).sum(-1).contiguous()
    has_pad = padded and qkv_pad is not None
    pad = qkv_pad.contiguous() if has_pad else lse
    q = qkv[..., :C].unflatten(-1, (heads, hd))
    rh, rw = _bias_of(qkv, rel_pos_h, rel_pos_w, spec)
    dqkv = torch.empty_like(qkv)
    drelh, drelw = (torch.empty_like(t) for t in (rh, rw))  # contiguous, as rh and rw
    ppad = torch.empty((grid[0], heads, 2, hd) if has_pad else (0,), dtype=acc, device=qkv.device)
    with device_guard(qkv):
        wrap_triton(_bwd_dkdv_kernel)[grid](qkv, pad, rh, rw, dout, lse, delta, dqkv, ppad, *scalars,
                                            HAS_PAD=has_pad, **half_query_tile(consts))
        dq_consts = half_query_tile(consts)
        wrap_triton(_bwd_dq_kernel)[query_grid(qkv, spec, dq_consts["BLOCK_M"])](qkv, pad, rh, rw, dout,
                                          lse, delta, dqkv, drelh, drelw, *scalars, HAS_PAD=has_pad, **dq_consts)
    # the bias' share of dQ and the tables' gradients (matmuls and fixed-order sums: deterministic)
    dq_rel, dth, dtw = ref.decomposed_bias_backward(q, drelh, drelw, rel_pos_h, rel_pos_w, spec.window)
    dqkv[..., :C] += dq_rel.flatten(-2).to(dqkv.dtype)
    dpad = None
    if qkv_pad is not None:  # padding queries get no gradient; padding keys and values collect theirs here
        dpad = torch.zeros(3, heads, hd, dtype=acc, device=qkv.device)
        if has_pad:
            dpad[1:] = ppad.sum(0).transpose(0, 1)
        dpad = dpad.reshape(3 * C).to(qkv_pad.dtype)
    return dqkv, dth.to(rel_pos_h.dtype), dtw.to(rel_pos_w.dtype), dpad
