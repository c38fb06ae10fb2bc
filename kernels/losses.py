"""Fused segmentation-loss statistics: Triton kernels and launchers.

``logits (B, C, *spatial)`` is seen as a strided ``(B, C, S)`` view (a view for contiguous and channels-last
layouts); label targets as ``(B, S)``; dense targets as ``(B, C, S)`` (``(B, 1, S)`` when C = 1); a dense target's
ignore mask as ``(B, S)``.  The statistics and their meaning are documented in :mod:`fastmed.reference.losses`.

Forward (one pass over logits and targets): grid ``(NSPLIT, B)``.  Each program walks its slice of S in
``[C_PAD, BLOCK]`` tiles, computes the activation (softmax over the C rows of the tile, or sigmoid) in registers,
builds the one-hot by comparing ``tl.arange(C_PAD)`` with the labels, and accumulates the enabled statistics in fp32
(fp64 for fp64 logits) tiles; at the end it writes ``partials[b, split, k, c]``.  ``partials.sum(1)`` combines the
splits in a fixed order: the same inputs give bit-identical statistics run to run (no atomics).

Backward (one pass): grid ``(cdiv(S, BLOCK), B)``.  Each program reloads its tile, recomputes the activation and
writes ``d logits`` from the per-(b, k, c) coefficients ``d loss / d stats`` in closed form (see
``fastmed.reference.losses.loss_stats_backward``, which these kernels mirror line by line).  Nothing is saved
between the passes but the logits, the targets and the ``(B, K, C)`` statistics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from fastmed._tensors import accumulation_dtype, target_programs

K_STATS = 10  # fastmed.reference.losses.K


# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    # log(1 + exp(x)), stable for large |x|
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _softmax_rows(z, rows):
    """Softmax and log-softmax over axis 0 of a [C_PAD, BLOCK] tile, restricted to the rows where ``rows``."""
    zf = tl.where(rows, z, float("-inf"))
    mx = tl.max(zf, axis=0)
    e = tl.exp(zf - mx[None, :])
    den = tl.sum(e, axis=0)
    q = e / den[None, :]
    lq = tl.where(rows, z - mx[None, :] - tl.log(den)[None, :], 0.0)
    return q, lq


@triton.jit
def _load_tile(
    z_ptr, t_ptr, m_ptr, b, c, cm, s, sm, C, ignore_index,
    szb, szc, szs, stb, stc, sts, smb, sms,
    LABEL: tl.constexpr, LABEL_FLOAT: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Loads one tile: logits z [C_PAD, BLOCK], targets g [C_PAD, BLOCK], mask m [BLOCK], bad-label flags [BLOCK]."""
    mask2 = cm[:, None] & sm[None, :]
    z = tl.load(z_ptr + b * szb + c[:, None] * szc + s[None, :] * szs, mask=mask2, other=0.0).to(ACC)
    if LABEL:
        raw = tl.load(t_ptr + b * stb + s * sts, mask=sm, other=0)
        if LABEL_FLOAT:
            lf = raw.to(ACC)
            integral = (lf == tl.floor(lf)) & (tl.abs(lf) < 2147483648.0)
            lab = tl.where(integral, lf, 0.0).to(tl.int64)
        else:
            lab = raw.to(tl.int64)
            integral = sm
        if HAS_IGNORE:
            valid = sm & ~(integral & (lab == ignore_index))
        else:
            valid = sm
        inrange = integral & (lab >= 0) & (lab < C)
        bad = (valid & ~inrange).to(ACC)
        m = valid.to(ACC)
        g = ((c[:, None] == lab[None, :]) & inrange[None, :]).to(ACC)
    else:
        g = tl.load(t_ptr + b * stb + c[:, None] * stc + s[None, :] * sts, mask=mask2, other=0).to(ACC)
        if HAS_MASK:
            m = tl.load(m_ptr + b * smb + s * sms, mask=sm, other=0).to(ACC)
        else:
            m = sm.to(ACC)
        bad = tl.zeros(m.shape, ACC)
    return z, g, m, bad


@triton.jit
def _activate(z, cm, ACT: tl.constexpr):
    if ACT == 2:
        p, _ = _softmax_rows(z, cm[:, None])
    elif ACT == 1:
        p = 1.0 / (1.0 + tl.exp(-z))
    else:
        p = z
    return tl.where(cm[:, None], p, 0.0)


@triton.jit
def _focal_pow(base, gamma):
    """(base ** gamma, d/dbase) for base >= 0, with torch's pow conventions at base = 0."""
    pos = base > 0
    lb = tl.log(tl.where(pos, base, 1.0))
    powg = tl.where(pos, tl.exp(gamma * lb), tl.where(gamma == 0, 1.0, 0.0))
    at0 = tl.where(gamma > 1, 0.0, tl.where(gamma == 1, 1.0, float("inf")))
    dpow = tl.where(gamma == 0, 0.0, tl.where(pos, gamma * tl.exp((gamma - 1) * lb), at0))
    return powg, dpow


@triton.jit
def _loss_stats_fwd_kernel(
    z_ptr,     # shape (B, C, S), strides (szb, szc, szs): logits
    t_ptr,     # shape (B, S) labels, strides (stb, -, sts); or (B, C, S) dense targets, strides (stb, stc, sts)
    m_ptr,     # shape (B, S), strides (smb, sms): dense-target ignore mask, unused unless HAS_MASK
    part_ptr,  # shape (B, NSPLIT, K, C), contiguous, accumulation dtype
    C, S, NSPLIT, s_per_split, ignore_index, gamma,
    szb, szc, szs, stb, stc, sts, smb, sms,
    ACT: tl.constexpr, LABEL: tl.constexpr, LABEL_FLOAT: tl.constexpr, HAS_IGNORE: tl.constexpr,
    HAS_MASK: tl.constexpr, POW: tl.constexpr, CE: tl.constexpr, FOCAL: tl.constexpr, FOCAL_C0: tl.constexpr,
    FPOS: tl.constexpr, K: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    c = tl.arange(0, C_PAD).to(tl.int64)
    cm = c < C
    s_start = pid.to(tl.int64) * s_per_split
    s_end = tl.minimum(s_start + s_per_split, S)
    acc_i = tl.zeros([C_PAD, BLOCK], ACC)
    acc_p = tl.zeros([C_PAD, BLOCK], ACC)
    acc_g = tl.zeros([C_PAD, BLOCK], ACC)
    acc_d = tl.zeros([C_PAD, BLOCK], ACC)
    acc_n = tl.zeros([C_PAD, BLOCK], ACC)
    acc_l = tl.zeros([C_PAD, BLOCK], ACC)
    acc_f = tl.zeros([C_PAD, BLOCK], ACC)
    acc_fp = tl.zeros([C_PAD, BLOCK], ACC)
    acc_cnt = tl.zeros([BLOCK], ACC)
    acc_bad = tl.zeros([BLOCK], ACC)
    for s0 in range(s_start, s_end, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        sm = s < s_end
        z, g, m, bad = _load_tile(z_ptr, t_ptr, m_ptr, b, c, cm, s, sm, C, ignore_index,
                                  szb, szc, szs, stb, stc, sts, smb, sms,
                                  LABEL, LABEL_FLOAT, HAS_IGNORE, HAS_MASK, ACC)
        acc_cnt += m
        acc_bad += bad
        mm = m[None, :]
        if POW != 0:
            pm = _activate(z, cm, ACT) * mm
            gm = g * mm
            acc_i += pm * gm
            if POW == 1:
                acc_p += pm
                acc_g += gm
            elif POW == 2:
                acc_p += pm * pm
                acc_g += gm * gm
            else:
                acc_p += tl.abs(pm)
                acc_g += tl.abs(gm)
                acc_d += tl.abs(pm - gm)
        if CE == 1 or CE == 2:
            _, lq = _softmax_rows(z, cm[:, None])
            nlq = -lq * mm
            acc_n += nlq * g
            if CE == 2:
                acc_l += nlq
        elif CE == 3:
            sp = _softplus(-z)
            acc_n += tl.where(cm[:, None], ((1.0 - g) * z + sp) * mm, 0.0)
            acc_l += tl.where(cm[:, None], g * sp * mm, 0.0)
        if FOCAL == 1:
            zz = z * mm
            tt = g * mm
            bce = zz - zz * tt + _softplus(-zz)
            mod = tl.exp(-gamma * _softplus(zz * (tt * 2.0 - 1.0)))
            lf = tl.where(cm[:, None], bce * mod * mm, 0.0)
            acc_f += lf
            if FPOS == 1:
                acc_fp += lf * tt
            elif FPOS == 2:
                acc_fp += tl.where(tt == 1.0, lf, 0.0)
        elif FOCAL == 2:
            zz = z * mm
            tt = g * mm
            rows = cm[:, None] & (c >= FOCAL_C0)[:, None]
            q, lq = _softmax_rows(zz, rows)
            powg, _ = _focal_pow(1.0 - q, gamma)
            acc_f += tl.where(rows, -powg * lq * tt * mm, 0.0)
    row = part_ptr + ((b * NSPLIT + pid) * K) * C + c
    if POW != 0:
        tl.store(row + 0 * C, tl.sum(acc_i, axis=1), mask=cm)
        tl.store(row + 1 * C, tl.sum(acc_p, axis=1), mask=cm)
        tl.store(row + 2 * C, tl.sum(acc_g, axis=1), mask=cm)
        if POW == 3:
            tl.store(row + 3 * C, tl.sum(acc_d, axis=1), mask=cm)
    if CE != 0:
        tl.store(row + 4 * C, tl.sum(acc_n, axis=1), mask=cm)
        if CE != 1:
            tl.store(row + 5 * C, tl.sum(acc_l, axis=1), mask=cm)
    if FOCAL != 0:
        tl.store(row + 6 * C, tl.sum(acc_f, axis=1), mask=cm)
        if FPOS != 0:
            tl.store(row + 7 * C, tl.sum(acc_fp, axis=1), mask=cm)
    zc = tl.zeros([C_PAD], ACC)
    tl.store(row + 8 * C, zc + tl.sum(acc_cnt, axis=0), mask=cm)
    tl.store(row + 9 * C, zc + tl.sum(acc_bad, axis=0), mask=cm)


@triton.jit
def _loss_stats_bwd_kernel(
    gs_ptr,    # shape (B, K, C), contiguous, accumulation dtype: d loss / d stats
    z_ptr,     # shape (B, C, S), strides (szb, szc, szs)
    t_ptr,     # as in the forward kernel
    m_ptr,     # shape (B, S), strides (smb, sms), unused unless HAS_MASK
    dz_ptr,    # shape (B, C, S), strides (sdb, sdc, sds): d logits, logits dtype
    C, S, ignore_index, gamma,
    szb, szc, szs, stb, stc, sts, smb, sms, sdb, sdc, sds,
    ACT: tl.constexpr, LABEL: tl.constexpr, LABEL_FLOAT: tl.constexpr, HAS_IGNORE: tl.constexpr,
    HAS_MASK: tl.constexpr, POW: tl.constexpr, CE: tl.constexpr, FOCAL: tl.constexpr, FOCAL_C0: tl.constexpr,
    FPOS: tl.constexpr, K: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = gs_ptr.dtype.element_ty
    c = tl.arange(0, C_PAD).to(tl.int64)
    cm = c < C
    s = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sm = s < S
    z, g, m, _ = _load_tile(z_ptr, t_ptr, m_ptr, b, c, cm, s, sm, C, ignore_index,
                            szb, szc, szs, stb, stc, sts, smb, sms,
                            LABEL, LABEL_FLOAT, HAS_IGNORE, HAS_MASK, ACC)
    mm = m[None, :]
    gsb = gs_ptr + b * K * C + c
    dz = tl.zeros([C_PAD, BLOCK], ACC)
    if POW != 0:
        p = _activate(z, cm, ACT)
        pm = p * mm
        gm = g * mm
        c_i = tl.load(gsb + 0 * C, mask=cm, other=0.0)[:, None]
        c_p = tl.load(gsb + 1 * C, mask=cm, other=0.0)[:, None]
        u = c_i * gm
        if POW == 1:
            u += c_p
        elif POW == 2:
            u += c_p * 2.0 * pm
        else:
            c_d = tl.load(gsb + 3 * C, mask=cm, other=0.0)[:, None]
            u += c_p * _sign(pm) + c_d * _sign(pm - gm)
        u = tl.where(cm[:, None], u * mm, 0.0)
        if ACT == 2:
            dz += p * (u - tl.sum(p * u, axis=0)[None, :])
        elif ACT == 1:
            dz += u * p * (1.0 - p)
        else:
            dz += u
    if CE == 1 or CE == 2:
        q, _ = _softmax_rows(z, cm[:, None])
        w = tl.load(gsb + 4 * C, mask=cm, other=0.0)[:, None] * g * mm
        if CE == 2:
            w += tl.load(gsb + 5 * C, mask=cm, other=0.0)[:, None] * mm
        w = tl.where(cm[:, None], w, 0.0)
        dz += q * tl.sum(w, axis=0)[None, :] - w
    elif CE == 3:
        sneg = 1.0 / (1.0 + tl.exp(z))
        c_n = tl.load(gsb + 4 * C, mask=cm, other=0.0)[:, None]
        c_l = tl.load(gsb + 5 * C, mask=cm, other=0.0)[:, None]
        dz += (c_n * ((1.0 - g) - sneg) - c_l * g * sneg) * mm
    if FOCAL == 1:
        zz = z * mm
        tt = g * mm
        sg = tt * 2.0 - 1.0
        bce = zz - zz * tt + _softplus(-zz)
        mod = tl.exp(-gamma * _softplus(zz * sg))
        sig_zs = 1.0 / (1.0 + tl.exp(-zz * sg))
        dl = (1.0 / (1.0 + tl.exp(-zz)) - tt) * mod - bce * gamma * mod * sig_zs * sg
        coef = tl.load(gsb + 6 * C, mask=cm, other=0.0)[:, None]
        if FPOS == 1:
            coef = coef + tl.load(gsb + 7 * C, mask=cm, other=0.0)[:, None] * tt
        elif FPOS == 2:
            coef = coef + tl.load(gsb + 7 * C, mask=cm, other=0.0)[:, None] * tl.where(tt == 1.0, 1.0, 0.0)
        dz += tl.where(cm[:, None], coef * dl * mm * mm, 0.0)
    elif FOCAL == 2:
        zz = z * mm
        tt = g * mm
        rows = cm[:, None] & (c >= FOCAL_C0)[:, None]
        q, lq = _softmax_rows(zz, rows)
        q = tl.where(rows, q, 0.0)
        powg, dpow = _focal_pow(1.0 - q, gamma)
        coef = tl.load(gsb + 6 * C, mask=cm, other=0.0)[:, None]
        v = tl.where(rows, coef * (-tt * mm * (powg - lq * dpow * q)), 0.0)
        dz += (v - q * tl.sum(v, axis=0)[None, :]) * mm
    tl.store(dz_ptr + b * sdb + c[:, None] * sdc + s[None, :] * sds, dz.to(dz_ptr.dtype.element_ty),
             mask=cm[:, None] & sm[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _flat(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, ch, *spatial) -> (B, ch, S): a view for contiguous and channels-last layouts, else a contiguous copy."""
    B = t.shape[0]
    try:
        return t.view(B, channels, -1)
    except RuntimeError:
        return t.contiguous().view(B, channels, -1)


def _target_views(target: torch.Tensor, mask, label_mode: bool, C: int):
    """(target view, its strides (b, c, s), mask view, mask strides (b, s), label is float)."""
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    if label_mode:
        t = _flat(target, 1)[:, 0]
        t_strides = (t.stride(0), 0, t.stride(1))
    else:
        t = _flat(target, target.shape[1])
        t_strides = t.stride()
    if mask is not None:
        m = _flat(mask, 1)[:, 0]
        m_strides = m.stride()
    else:
        m, m_strides = t, (0, 0)
    return t, t_strides, m, m_strides, target.is_floating_point()


def _tile(C: int, S: int, device: torch.device) -> tuple[int, int, int]:
    """(C_PAD, BLOCK, num_warps): about 1024 elements per tile on a GPU, bigger tiles under the interpreter."""
    c_pad = max(triton.next_power_of_2(C), 2)
    elems = 1024 if device.type == "cuda" else 16384
    block = max(16, min(elems // c_pad, triton.next_power_of_2(S)))
    num_warps = 4 if c_pad * block <= 2048 else 8
    return c_pad, block, num_warps


def _flags(act, label_mode, label_float, has_ignore, has_mask, pow_mode, ce_mode, focal_mode, focal_c0, focal_pos,
           c_pad, block, num_warps):
    return dict(ACT=act, LABEL=label_mode, LABEL_FLOAT=label_float, HAS_IGNORE=has_ignore, HAS_MASK=has_mask,
                POW=pow_mode, CE=ce_mode, FOCAL=focal_mode, FOCAL_C0=focal_c0, FPOS=focal_pos, K=K_STATS,
                C_PAD=c_pad, BLOCK=block, num_warps=num_warps)


def loss_stats_forward(logits, target, mask, act, label_mode, has_ignore, ignore_index, pow_mode, ce_mode,
                       focal_mode, focal_c0, gamma, focal_pos) -> torch.Tensor:
    """Statistics ``(B, K, C)`` (see fastmed.reference.losses.loss_stats) in one pass over logits and targets."""
    B, C = logits.shape[:2]
    z = _flat(logits, C)
    S = z.shape[2]
    t, ts, m, ms, label_float = _target_views(target, mask, label_mode, C)
    acc = accumulation_dtype(logits.dtype)
    c_pad, block, num_warps = _tile(C, S, logits.device)
    want = target_programs(logits.device, cpu=1)
    nsplit = max(1, min(triton.cdiv(S, block), triton.cdiv(want, B)))
    s_per = triton.cdiv(triton.cdiv(S, nsplit), block) * block
    nsplit = triton.cdiv(S, s_per)
    part = torch.zeros((B, nsplit, K_STATS, C), device=logits.device, dtype=acc)
    wrap_triton(_loss_stats_fwd_kernel)[(nsplit, B)](
        z, t, m, part, C, S, nsplit, s_per, int(ignore_index), float(gamma),
        *z.stride(), *ts, *ms,
        **_flags(act, label_mode, label_float, has_ignore, mask is not None, pow_mode, ce_mode, focal_mode,
                 focal_c0, focal_pos, c_pad, block, num_warps))
    return part.sum(1)


def loss_stats_backward(gstats, logits, target, mask, act, label_mode, has_ignore, ignore_index, pow_mode, ce_mode,
                        focal_mode, focal_c0, gamma, focal_pos) -> torch.Tensor:
    """d logits (shaped, typed and laid out like ``logits``) from d loss / d stats, in one pass."""
    B, C = logits.shape[:2]
    z = _flat(logits, C)
    S = z.shape[2]
    t, ts, m, ms, label_float = _target_views(target, mask, label_mode, C)
    acc = accumulation_dtype(logits.dtype)
    gs = gstats.to(acc).contiguous()
    dlogits = torch.empty_like(logits)
    dz = _flat(dlogits, C)
    c_pad, block, num_warps = _tile(C, S, logits.device)
    wrap_triton(_loss_stats_bwd_kernel)[(triton.cdiv(S, block), B)](
        gs, z, t, m, dz, C, S, int(ignore_index), float(gamma),
        *z.stride(), *ts, *ms, *dz.stride(),
        **_flags(act, label_mode, label_float, has_ignore, mask is not None, pow_mode, ce_mode, focal_mode,
                 focal_c0, focal_pos, c_pad, block, num_warps))
    if dz.data_ptr() != dlogits.data_ptr():  # empty_like kept a layout whose spatial dims do not collapse
        dlogits.copy_(dz.view(dlogits.shape))
    return dlogits
