"""Fused normalization + activation: Triton kernels and launchers.

The input ``x`` of shape ``(N, C, *spatial)`` is seen as an ``(N, C, S)`` strided view (a view, not a
copy, for both contiguous and channels-last layouts).  A statistics *row* is the set of elements
normalized together: ``(n, c)`` for instance norm, ``(n, group)`` for group norm, ``c`` over the whole
batch for batch norm.  The row of element ``(n, c, s)`` is ``n * rows_per_n + c // cg``.

Forward  (2 passes over x + 1 write):
  1. ``_norm_stats_kernel``: grid (P splits of S, channel blocks, N); each program folds its slice into
     per-channel (mean, M2) with Chan's parallel update (no cancellation when |mean| >> std) and writes
     fp32 partials of shape (N, C, P).  The partials are combined per row in a fixed order (deterministic).
  2. ``_norm_act_fwd_kernel``: y = act((x - mean) * rstd * w + b + residual).
Backward (2 passes over x and dy + 1 write), recomputing xhat from x, mean and rstd (nothing saved but x):
  1. ``_norm_act_bwd_reduce_kernel``: per (n, c, split) partial sums of g = dy * act'(z), g * xhat and, for
     prelu, dy * min(z, 0)-part; combined into dweight, dbias, dslope and the two per-row means.
  2. ``_norm_act_bwd_apply_kernel``: dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), dresidual = g.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import accumulation_dtype, device_guard, memory_format, target_programs
from fastmed._validate import flat_view
from fastmed.reference.norm_act import NormSpec, NormTensors

from ._common import act_grad, apply_act

# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_tile(C, S, s_per_split, BLOCK_C: tl.constexpr):
    """The channels and the slice of S of a reduce program on the grid (P splits, C blocks, N):
    (n, c, mc, s_start, s_end)."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_start = tl.program_id(0).to(tl.int64) * s_per_split
    return n, c, c < C, s_start, tl.minimum(s_start + s_per_split, S)


@triton.jit
def _norm_stats_kernel(
    x_ptr,      # shape (N, C, S), strides (sxn, sxc, sxs)
    pmean_ptr,  # shape (N, C, P), contiguous, stats dtype: mean of each split
    pm2_ptr,    # shape (N, C, P), contiguous, stats dtype: sum of squared deviations of each split
    C, S, P, s_per_split,
    sxn, sxc, sxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, mc, s_start, s_end = _split_tile(C, S, s_per_split, BLOCK_C)
    acc_ty = pmean_ptr.dtype.element_ty
    base = x_ptr + n * sxn + c[:, None] * sxc
    count = tl.zeros([BLOCK_C], acc_ty)
    mean = tl.zeros([BLOCK_C], acc_ty)
    m2 = tl.zeros([BLOCK_C], acc_ty)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ms = s < s_end
        mask = mc[:, None] & ms[None, :]
        tile = tl.load(base + s[None, :] * sxs, mask=mask, other=0.0).to(acc_ty)
        nb = tl.sum(ms.to(acc_ty), axis=0)
        tmean = tl.sum(tile, axis=1) / nb
        d = tl.where(mask, tile - tmean[:, None], 0.0)
        tm2 = tl.sum(d * d, axis=1)
        new_count = count + nb
        delta = tmean - mean
        mean = mean + delta * (nb / new_count)
        m2 = m2 + tm2 + delta * delta * (count * nb / new_count)
        count = new_count
    out = (n * C + c) * P + tl.program_id(0)
    tl.store(pmean_ptr + out, mean, mask=mc)
    tl.store(pm2_ptr + out, m2, mask=mc)


@triton.jit
def _partial_offsets(r, e, C, P, outer, row_cg):
    """Element e of statistics row r -> (offset into an (N, C, P) partial tensor, channel).

    The row's elements are its (n, c) pairs times the P splits: instance/group rows own channels
    r*row_cg .. r*row_cg + row_cg - 1 of one sample (outer = 1); batch rows own channel r of every sample
    (outer = C, row_cg = 1).
    """
    nc = (e // P) * outer + r * row_cg
    return nc * P + e % P, nc % C


@triton.jit
def _load_row_partials(a_ptr, b_ptr, r, e0, E, C, P, outer, row_cg, BLOCK: tl.constexpr):
    """Elements e0 .. e0 + BLOCK - 1 of statistics row r of two (N, C, P) partial tensors:
    (a, b, element index, mask, channel)."""
    e = e0 + tl.arange(0, BLOCK).to(tl.int64)
    m = e < E
    off, c = _partial_offsets(r, e, C, P, outer, row_cg)
    return tl.load(a_ptr + off, mask=m, other=0.0), tl.load(b_ptr + off, mask=m, other=0.0), e, m, c


@triton.jit
def _norm_finalize_kernel(
    pmean_ptr,  # shape (N, C, P): mean of each split
    pm2_ptr,    # shape (N, C, P): sum of squared deviations of each split
    mean_ptr,   # shape (R,) out
    rstd_ptr,   # shape (R,) out
    C, S, P, s_per_split, E, outer, row_cg, eps,
    BLOCK: tl.constexpr,
):
    """Combines a row's E split partials with Chan's formula, lane by lane in a fixed order, then across lanes."""
    r = tl.program_id(0).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    cnt = tl.zeros([BLOCK], acc_ty)
    mean = tl.zeros([BLOCK], acc_ty)
    m2 = tl.zeros([BLOCK], acc_ty)
    for e0 in range(0, E, BLOCK):
        mu_e, m2_e, e, m, _c = _load_row_partials(pmean_ptr, pm2_ptr, r, e0, E, C, P, outer, row_cg, BLOCK)
        c_e = tl.where(m, tl.minimum(s_per_split, S - (e % P) * s_per_split), 0).to(acc_ty)
        new = cnt + c_e
        safe = tl.where(new > 0, new, 1.0)
        delta = mu_e - mean
        mean = mean + delta * (c_e / safe)
        m2 = m2 + m2_e + delta * delta * (cnt * c_e / safe)
        cnt = new
    total = tl.sum(cnt, axis=0)
    row_mean = tl.sum(cnt * mean, axis=0) / total
    d = mean - row_mean
    var = tl.sum(m2 + cnt * d * d, axis=0) / total
    tl.store(mean_ptr + r, row_mean)
    tl.store(rstd_ptr + r, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _row_sums_kernel(
    a_ptr,      # shape (N, C, P)
    b_ptr,      # shape (N, C, P)
    w_ptr,      # shape (C,), stride sw: per-channel factor, unused unless HAS_W
    out_a_ptr,  # shape (R,)  sum over the row of w_c * a, divided by `divisor`
    out_b_ptr,  # shape (R,)  sum over the row of w_c * b, divided by `divisor`
    C, P, E, outer, row_cg, divisor, sw,
    HAS_W: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    acc_ty = out_a_ptr.dtype.element_ty
    sa = tl.zeros([BLOCK], acc_ty)
    sb = tl.zeros([BLOCK], acc_ty)
    for e0 in range(0, E, BLOCK):
        a, b, _e, m, c = _load_row_partials(a_ptr, b_ptr, r, e0, E, C, P, outer, row_cg, BLOCK)
        if HAS_W:
            w = tl.load(w_ptr + c * sw, mask=m, other=0.0).to(acc_ty)
            a = a * w
            b = b * w
        sa += a
        sb += b
    tl.store(out_a_ptr + r, tl.sum(sa, axis=0) / divisor)
    tl.store(out_b_ptr + r, tl.sum(sb, axis=0) / divisor)


@triton.jit
def _offsets(n, c, s, strides):
    """Offsets of the [BLOCK_C, BLOCK_S] tile (n, c, s) of an (N, C, S) tensor with strides (sn, sc, ss)."""
    return n * strides[0] + c[:, None] * strides[1] + s[None, :] * strides[2]


@triton.jit
def _load_pre_activation(
    x_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
    n, c, s, mc, mask,
    rows,           # (rows_per_n, cg): statistics row of (n, c) = n * rows_per_n + c // cg
    x_strides,      # (sxn, sxc, sxs)
    res_strides,    # (srn, src, srs)
    param_strides,  # (sw, sb): strides of weight and bias
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
):
    """Loads a [BLOCK_C, BLOCK_S] tile and returns (xhat, z, rstd, w) in the stats dtype."""
    row = n * rows[0] + c // rows[1]
    mean = tl.load(mean_ptr + row, mask=mc, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=mc, other=0.0)
    acc_ty = mean.dtype
    x = tl.load(x_ptr + _offsets(n, c, s, x_strides), mask=mask, other=0.0).to(acc_ty)
    xhat = (x - mean[:, None]) * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + c * param_strides[0], mask=mc, other=0.0).to(acc_ty)
        z = xhat * w[:, None]
    else:
        w = tl.full([c.shape[0]], 1.0, acc_ty)
        z = xhat
    if HAS_B:
        z = z + tl.load(b_ptr + c * param_strides[1], mask=mc, other=0.0).to(acc_ty)[:, None]
    if HAS_RES:
        z = z + tl.load(res_ptr + _offsets(n, c, s, res_strides), mask=mask, other=0.0).to(acc_ty)
    return xhat, z, rstd, w


@triton.jit
def _load_slope(slope_ptr, c, mc, slope_stride, negative_slope, acc_ty, ACT: tl.constexpr):
    if ACT == "prelu":
        slope = tl.load(slope_ptr + c * slope_stride, mask=mc, other=0.0).to(acc_ty)[:, None]
    else:
        slope = negative_slope
    return slope


@triton.jit
def _apply_tile(C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The [BLOCK_C, BLOCK_S] tile of an apply program on the grid (S blocks, C blocks, N): (n, c, s, mc, mask)."""
    n = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    return n, c, s, mc, mc[:, None] & (s < S)[None, :]


@triton.jit
def _norm_act_fwd_kernel(
    x_ptr,      # shape (N, C, S), strides (sxn, sxc, sxs)
    y_ptr,      # shape (N, C, S), strides (syn, syc, sys)
    res_ptr,    # shape (N, C, S), strides (srn, src, srs); unused unless HAS_RES
    mean_ptr,   # shape (R,) stats dtype, R = rows
    rstd_ptr,   # shape (R,)
    w_ptr,      # shape (C,), stride sw; unused unless HAS_W
    b_ptr,      # shape (C,), stride sb; unused unless HAS_B
    slope_ptr,  # shape (C,) or (1,), stride slope_stride (0 for (1,)); prelu slope, unused unless ACT == "prelu"
    C, S, rows_per_n, cg, sw, sb, slope_stride, negative_slope,
    sxn, sxc, sxs, syn, syc, sys, srn, src, srs,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, s, mc, mask = _apply_tile(C, S, BLOCK_C, BLOCK_S)
    xhat, z, rstd, w = _load_pre_activation(x_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, s, mc, mask,
                                            (rows_per_n, cg), (sxn, sxc, sxs), (srn, src, srs), (sw, sb),
                                            HAS_W, HAS_B, HAS_RES)
    slope = _load_slope(slope_ptr, c, mc, slope_stride, negative_slope, z.dtype, ACT)
    y = apply_act(z, slope, ACT)
    tl.store(y_ptr + _offsets(n, c, s, (syn, syc, sys)), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_act_bwd_reduce_kernel(
    dy_ptr,     # shape (N, C, S), strides (sdn, sdc, sds)
    x_ptr,      # shape (N, C, S), strides (sxn, sxc, sxs)
    res_ptr,    # shape (N, C, S), strides (srn, src, srs); unused unless HAS_RES
    mean_ptr, rstd_ptr,  # shape (R,)
    w_ptr, b_ptr, slope_ptr,  # as in _norm_act_fwd_kernel
    psg_ptr,    # shape (N, C, P): sum of g = dy * act'(z)
    psgx_ptr,   # shape (N, C, P): sum of g * xhat
    psa_ptr,    # shape (N, C, P): sum of dy * z where z <= 0 (prelu slope gradient), unused unless ACT == "prelu"
    C, S, P, s_per_split, rows_per_n, cg, sw, sb, slope_stride, negative_slope,
    sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, mc, s_start, s_end = _split_tile(C, S, s_per_split, BLOCK_C)
    acc_ty = psg_ptr.dtype.element_ty
    sg = tl.zeros([BLOCK_C], acc_ty)
    sgx = tl.zeros([BLOCK_C], acc_ty)
    sa = tl.zeros([BLOCK_C], acc_ty)
    slope = _load_slope(slope_ptr, c, mc, slope_stride, negative_slope, acc_ty, ACT)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = mc[:, None] & (s < s_end)[None, :]
        xhat, z, rstd, w = _load_pre_activation(x_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, s, mc,
                                                mask, (rows_per_n, cg), (sxn, sxc, sxs), (srn, src, srs), (sw, sb),
                                                HAS_W, HAS_B, HAS_RES)
        dy = tl.load(dy_ptr + _offsets(n, c, s, (sdn, sdc, sds)), mask=mask, other=0.0).to(acc_ty)
        g = dy * act_grad(z, slope, ACT)
        sg += tl.sum(g, axis=1)
        sgx += tl.sum(g * xhat, axis=1)
        if ACT == "prelu":
            sa += tl.sum(tl.where(z > 0, 0.0, dy * z), axis=1)
    out = (n * C + c) * P + tl.program_id(0)
    tl.store(psg_ptr + out, sg, mask=mc)
    tl.store(psgx_ptr + out, sgx, mask=mc)
    if ACT == "prelu":
        tl.store(psa_ptr + out, sa, mask=mc)


@triton.jit
def _norm_act_bwd_apply_kernel(
    dy_ptr, x_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, slope_ptr,  # as in _norm_act_bwd_reduce_kernel
    m1_ptr,     # shape (R,): mean over the row of g * w
    m2_ptr,     # shape (R,): mean over the row of g * w * xhat
    dx_ptr,     # shape (N, C, S), strides (son, soc, sos)
    dres_ptr,   # shape (N, C, S), same strides as dx; unused unless HAS_RES
    C, S, rows_per_n, cg, sw, sb, slope_stride, negative_slope,
    sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs, son, soc, sos,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    INPUT_STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, s, mc, mask = _apply_tile(C, S, BLOCK_C, BLOCK_S)
    xhat, z, rstd, w = _load_pre_activation(x_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, c, s, mc, mask,
                                            (rows_per_n, cg), (sxn, sxc, sxs), (srn, src, srs), (sw, sb),
                                            HAS_W, HAS_B, HAS_RES)
    slope = _load_slope(slope_ptr, c, mc, slope_stride, negative_slope, z.dtype, ACT)
    dy = tl.load(dy_ptr + _offsets(n, c, s, (sdn, sdc, sds)), mask=mask, other=0.0).to(z.dtype)
    g = dy * act_grad(z, slope, ACT)
    dxhat = g * w[:, None]
    if INPUT_STATS:
        row = n * rows_per_n + c // cg
        m1 = tl.load(m1_ptr + row, mask=mc, other=0.0)
        m2 = tl.load(m2_ptr + row, mask=mc, other=0.0)
        dx = rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None])
    else:
        dx = rstd[:, None] * dxhat
    out = _offsets(n, c, s, (son, soc, sos))
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(dres_ptr + out, g.to(dres_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def launch_blocks(t3: torch.Tensor, channels: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps) for a tile of t3 = (N, C, S): channels fastest when C has stride 1."""
    if t3.stride(1) == 1 and t3.shape[2] > 1:  # channels-last
        block_c = min(triton.next_power_of_2(channels), 64)
        block_s = max(4096 // block_c, 16)
    else:
        block_c = min(triton.next_power_of_2(channels), 2)
        block_s = 2048
    block_s = min(block_s, max(triton.next_power_of_2(t3.shape[2]), 16))
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, num_warps


REDUCE_TILE_MAX = 4096  # values per tile of _norm_act_bwd_reduce_kernel at or above which its BLOCK_S is halved


def reduce_flags(flags: dict) -> dict:
    """The launch flags of ``_norm_act_bwd_reduce_kernel`` and ``_norm_act_fwd_kernel``: the apply tile, halved
    along S when it holds :data:`REDUCE_TILE_MAX` values or more.  The reduce kernel keeps three input tiles and
    their products live across the pipelined loop: at the channels-last 64 x 64 tile it spills 400-600 B on sm_90 at
    255 registers; 64 x 32 needs 240 and none.  The forward at 64 x 64 and 8 warps compiles to 64 registers with
    40 B of spills for fp16 gelu_tanh under triton 3.6; 64 x 32 to 45 and none.  ``s_per_split`` stays a multiple
    of the halved BLOCK_S."""
    if flags["BLOCK_C"] * flags["BLOCK_S"] < REDUCE_TILE_MAX or flags["BLOCK_S"] <= 16:
        return flags
    return dict(flags, BLOCK_S=flags["BLOCK_S"] // 2)


def _splits(n: int, cblocks: int, S: int, block_s: int, device: torch.device) -> tuple[int, int]:
    """(P, s_per_split): how many programs share one (n, channel-block) row of S."""
    max_p = triton.cdiv(S, block_s)
    want = triton.cdiv(target_programs(device, cpu=4), n * cblocks)
    p = max(1, min(max_p, want))
    s_per = triton.cdiv(triton.cdiv(S, p), block_s) * block_s
    return triton.cdiv(S, s_per), s_per


def _row_layout(kind: str, C: int, num_groups: int) -> tuple[int, int]:
    """(rows_per_n, cg): row of (n, c) = n * rows_per_n + c // cg."""
    if kind == "instance":
        return C, 1
    if kind == "group":
        return num_groups, C // num_groups
    return 0, 1


def _row_geometry(kind: str, N: int, C: int, P: int, num_groups: int) -> tuple[int, int, int, int]:
    """(rows R, elements per row E, outer, row_cg) of the (N, C, P) partials, see _partial_offsets."""
    if kind == "instance":
        return N * C, P, 1, 1
    if kind == "group":
        cg = C // num_groups
        return N * num_groups, cg * P, 1, cg
    return C, N * P, C, 1


def _finalize_block(E: int) -> int:
    return min(max(triton.next_power_of_2(E), 16), 1024)


def _param(t: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, stride) of an optional per-channel tensor ``(C,)`` or ``(1,)``, with its own stride (a strided,
    expanded or offset parameter is read where it lies); an absent one is a dummy pointer the kernel never reads,
    and a ``(1,)`` tensor has stride 0 (one value for every channel)."""
    if t is None:
        return dummy, 0
    return t, (0 if t.numel() == 1 else t.stride(0))


def norm_stats(x: torch.Tensor, kind: str, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased mean and rstd per row, (R,) in the stats dtype; two deterministic stages."""
    x3 = flat_view(x)
    N, C, S = x3.shape
    acc = accumulation_dtype(x.dtype)
    block_c, block_s, num_warps = launch_blocks(x3, C)
    cblocks = triton.cdiv(C, block_c)
    P, s_per = _splits(N, cblocks, S, block_s, x.device)
    pmean = torch.empty((N, C, P), device=x.device, dtype=acc)
    pm2 = torch.empty((N, C, P), device=x.device, dtype=acc)
    with device_guard(x):
        wrap_triton(_norm_stats_kernel)[(P, cblocks, N)](
            x3, pmean, pm2, C, S, P, s_per, *x3.stride(),
            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    return finalize_stats(pmean, pm2, S, s_per, kind, num_groups, eps)


def finalize_stats(pmean: torch.Tensor, pm2: torch.Tensor, S: int, s_per_split: int, kind: str, num_groups: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2) partials ``(N, C, P)`` of consecutive chunks of ``s_per_split`` of the S values of each
    (n, c) -> (mean, rstd) per statistics row, ``(R,)``, combined in a fixed order (also used by the convolution
    epilogue statistics)."""
    N, C, P = pmean.shape
    R, E, outer, row_cg = _row_geometry(kind, N, C, P, num_groups)
    mean = torch.empty(R, device=pmean.device, dtype=pmean.dtype)
    rstd = torch.empty(R, device=pmean.device, dtype=pmean.dtype)
    with device_guard(pmean):
        wrap_triton(_norm_finalize_kernel)[(R,)](
            pmean, pm2, mean, rstd, C, S, P, s_per_split, E, outer, row_cg, float(eps), BLOCK=_finalize_block(E))
    return mean, rstd


def _launch_common(x3: torch.Tensor, tensors: NormTensors, spec: NormSpec, dummy: torch.Tensor) -> tuple[list, dict]:
    """The arguments every norm-act apply/reduce kernel takes after its pointers: (per-channel pointers, the
    scalars from ``rows_per_n`` to ``negative_slope``) and the constexpr flags."""
    N, C, S = x3.shape
    rows_per_n, cg = _row_layout(spec.kind, C, spec.num_groups)
    (w, sw), (b, sb), (sl, ssl) = (_param(t, dummy) for t in (tensors.weight, tensors.bias, tensors.slope))
    block_c, block_s, num_warps = launch_blocks(x3, C)
    flags = dict(HAS_W=tensors.weight is not None, HAS_B=tensors.bias is not None,
                 HAS_RES=tensors.residual is not None, ACT=spec.activation, BLOCK_C=block_c, BLOCK_S=block_s,
                 num_warps=num_warps)
    return [w, b, sl], [rows_per_n, cg, sw, sb, ssl, float(spec.negative_slope)], flags


def norm_act_forward(x: torch.Tensor, tensors: NormTensors, spec: NormSpec, mean: Optional[torch.Tensor] = None,
                     rstd: Optional[torch.Tensor] = None):
    """y = act(norm(x) * weight + bias + residual); returns (y, mean, rstd, None) (the backward needs nothing but
    the inputs and the statistics).

    x: (N, C, *spatial), any dense layout; tensors: weight, bias, slope (C,) or None (slope (1,) allowed), any
    strides; residual like x or None; mean/rstd: (R,) to use given statistics (batch norm eval) or None.
    """
    if mean is None:
        mean, rstd = norm_stats(x, spec.kind, spec.num_groups, spec.eps)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    x3 = flat_view(x)
    y = torch.empty_like(x, memory_format=memory_format(x))  # contiguous or channels-last: flattens to a view
    y3 = flat_view(y)
    N, C, S = x3.shape
    r3 = flat_view(tensors.residual) if tensors.residual is not None else x3
    params, scalars, flags = _launch_common(x3, tensors, spec, mean)
    flags = reduce_flags(flags)  # the halved tile: at 64 x 64, triton 3.6 spills the fp16 gelu_tanh forward
    grid = (triton.cdiv(S, flags["BLOCK_S"]), triton.cdiv(C, flags["BLOCK_C"]), N)
    with device_guard(x):
        wrap_triton(_norm_act_fwd_kernel)[grid](
            x3, y3, r3, mean, rstd, *params, C, S, *scalars, *x3.stride(), *y3.stride(), *r3.stride(), **flags)
    return y, mean, rstd, None


def norm_act_backward(dy: torch.Tensor, x: torch.Tensor, saved, tensors: NormTensors, spec: NormSpec,
                      mean: torch.Tensor, rstd: torch.Tensor, input_stats: bool):
    """Returns (dx, NormTensors(dweight, dbias, dresidual, dslope)), None for absent inputs.  ``saved`` is unused
    (everything is recomputed from x, mean and rstd)."""
    x3, dy3 = flat_view(x), flat_view(dy)
    N, C, S = x3.shape
    weight, bias, residual, slope = tensors
    r3 = flat_view(residual) if residual is not None else x3
    acc = mean.dtype
    params, scalars, flags = _launch_common(x3, tensors, spec, mean)
    cblocks = triton.cdiv(C, flags["BLOCK_C"])
    P, s_per = _splits(N, cblocks, S, flags["BLOCK_S"], x.device)
    psg = torch.empty((N, C, P), device=x.device, dtype=acc)
    psgx = torch.empty_like(psg)
    psa = torch.empty_like(psg) if spec.activation == "prelu" else psg  # a dummy pointer unless prelu
    # per-channel sums over the batch (batch-style rows): dbias = sum g, dweight = sum g * xhat, dslope
    _, E_c, outer_c, cg_c = _row_geometry("batch", N, C, P, spec.num_groups)
    R, E, outer, row_cg = _row_geometry(spec.kind, N, C, P, spec.num_groups)
    sg_c, sgx_c, sa_c = (torch.empty(C, device=x.device, dtype=acc) for _ in range(3))  # sum g, g*xhat, prelu
    m1 = torch.empty(R, device=x.device, dtype=acc)
    m2 = torch.empty(R, device=x.device, dtype=acc)
    dx = torch.empty_like(x, memory_format=memory_format(x))
    dres = torch.empty_like(dx, dtype=residual.dtype) if residual is not None else dx
    dx3, dres3 = flat_view(dx), flat_view(dres)
    with device_guard(x):
        wrap_triton(_norm_act_bwd_reduce_kernel)[(P, cblocks, N)](
            dy3, x3, r3, mean, rstd, *params, psg, psgx, psa, C, S, P, s_per, *scalars,
            *dy3.stride(), *x3.stride(), *r3.stride(), **reduce_flags(flags))
        if weight is not None or bias is not None:
            wrap_triton(_row_sums_kernel)[(C,)](psg, psgx, mean, sg_c, sgx_c, C, P, E_c, outer_c, cg_c, 1, 0,
                                                HAS_W=False, BLOCK=_finalize_block(E_c))
        if spec.activation == "prelu":
            # one array to sum: it goes in as both a and b, and both results land in sa_c
            wrap_triton(_row_sums_kernel)[(C,)](psa, psa, mean, sa_c, sa_c, C, P, E_c, outer_c, cg_c, 1, 0,
                                                HAS_W=False, BLOCK=_finalize_block(E_c))
        if input_stats:
            # per statistics row: m1 = mean of g * w, m2 = mean of g * w * xhat
            wrap_triton(_row_sums_kernel)[(R,)](psg, psgx, params[0], m1, m2, C, P, E, outer, row_cg,
                                                (E // P) * S, scalars[2], HAS_W=weight is not None,
                                                BLOCK=_finalize_block(E))
        grid = (triton.cdiv(S, flags["BLOCK_S"]), cblocks, N)
        wrap_triton(_norm_act_bwd_apply_kernel)[grid](
            dy3, x3, r3, mean, rstd, *params, m1, m2, dx3, dres3, C, S, *scalars,
            *dy3.stride(), *x3.stride(), *r3.stride(), *dx3.stride(), INPUT_STATS=input_stats, **flags)
    grads = NormTensors(weight=sgx_c.to(weight.dtype) if weight is not None else None,
                        bias=sg_c.to(bias.dtype) if bias is not None else None,
                        residual=dres if residual is not None else None,
                        slope=(sa_c if slope.numel() > 1 else sa_c.sum().reshape(1)).to(slope.dtype)
                        if slope is not None else None)
    return dx, grads
