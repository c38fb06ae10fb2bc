"""Fused segmentation-loss statistics: Triton kernels and launchers.

``logits (B, C, *spatial)`` is seen as a strided ``(B, C, S)`` view (a view for contiguous and channels-last
layouts); label targets as ``(B, S)``; dense targets as ``(B, C, S)`` (``(B, 1, S)`` when C = 1); a dense target's
ignore mask as ``(B, S)``.  What a pass computes is a :class:`~fastmed.reference.loss_spec.StatsSpec`; its string
modes become string constexprs (``ACTIVATION``, ``POW_MODE``, ``CE_MODE``, ``FOCAL_MODE``, ``FOCAL_POS_MODE``) and
the statistics slots are the named constants of :mod:`fastmed.reference.loss_spec`, which documents them.

Forward (one pass over logits and targets): grid ``(NSPLIT, B)``.  Each program walks its slice of S in
``[C_PAD, BLOCK]`` tiles, computes the activation (softmax over the C rows of the tile, or sigmoid) in registers,
builds the one-hot by comparing ``tl.arange(C_PAD)`` with the labels, and accumulates the enabled statistics in fp32
(fp64 for fp64 logits) tiles; at the end it writes ``partials[b, split, k, c]``.  ``partials.sum(1)`` combines the
splits in a fixed order: the same inputs give bit-identical statistics run to run (no atomics).

Backward (one pass): grid ``(cdiv(S, BLOCK), B)``.  Each program reloads its tile, recomputes the activation and
writes ``d logits`` from the per-(b, k, c) coefficients ``d loss / d stats`` in closed form (see
``fastmed.reference.losses.loss_stats_backward``: the same closed form).  Nothing is saved
between the passes but the logits, the targets and the ``(B, NUM_SLOTS, C)`` statistics.

Every launch runs inside ``device_guard(logits)`` (the logits' GPU, not the current device).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import accumulation_dtype, device_guard, target_programs
from fastmed._validate import flat_view
from fastmed.reference import loss_spec
from fastmed.reference import losses as ref
from fastmed.reference.loss_spec import LossSpec, StatsSpec, check_loss_spec, check_spec

# The statistics slots of fastmed.reference.loss_spec, as constexprs the kernels can read.
INTERSECT = tl.constexpr(loss_spec.INTERSECT)
PRED = tl.constexpr(loss_spec.PRED)
GROUND = tl.constexpr(loss_spec.GROUND)
DIFF = tl.constexpr(loss_spec.DIFF)
NLL = tl.constexpr(loss_spec.NLL)
LOGSUM = tl.constexpr(loss_spec.LOGSUM)
FOCAL = tl.constexpr(loss_spec.FOCAL)
FOCAL_POS = tl.constexpr(loss_spec.FOCAL_POS)
COUNT = tl.constexpr(loss_spec.COUNT)
BAD = tl.constexpr(loss_spec.BAD)
NUM_SLOTS = tl.constexpr(loss_spec.NUM_SLOTS)


# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    # log(1 + exp(x)), stable for large |x|, +inf at +inf and 0 at -inf
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _weigh(w, v):
    """w * v, except that a zero weight times an infinite v is 0 (fastmed.reference.losses.weigh); NaN stays NaN."""
    return w * tl.where((w == 0.0) & (tl.abs(v) == float("inf")), 0.0, v)


@triton.jit
def _bce_with_logits(z, t):
    """(1 - t) softplus(z) + t softplus(-z), finite at z = +-inf where the target agrees with the logit."""
    return _weigh(1.0 - t, _softplus(z)) + _weigh(t, _softplus(-z))


@triton.jit
def _sigmoid_focal_terms(zz, tt, gamma):
    """(BCE, modulator (1 - p_t) ** gamma, 2 t - 1) of MONAI's sigmoid focal term on masked logits and targets."""
    sg = tt * 2.0 - 1.0
    mod = tl.exp(-_weigh(gamma, _softplus(_weigh(sg, zz))))
    return _bce_with_logits(zz, tt), mod, sg


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
def _classes(C, C_PAD: tl.constexpr):
    """(sample b as int64, class indices c [C_PAD] as int64, class mask [C_PAD]) of this program."""
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_PAD).to(tl.int64)
    return b, c, c < C


@triton.jit
def _load_tile(
    z_ptr, t_ptr, m_ptr, b, c, cm, s, sm, C, ignore_index,
    szb, szc, szs, stb, stc, sts, smb, sms,
    LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
):
    """Loads one tile: logits z [C_PAD, BLOCK], targets g [C_PAD, BLOCK], mask m [BLOCK], bad-label flags [BLOCK]."""
    mask2 = cm[:, None] & sm[None, :]
    z = tl.load(z_ptr + b * szb + c[:, None] * szc + s[None, :] * szs, mask=mask2, other=0.0).to(ACC)
    if LABELS == "dense":
        g = tl.load(t_ptr + b * stb + c[:, None] * stc + s[None, :] * sts, mask=mask2, other=0).to(ACC)
        if HAS_MASK:
            m = tl.load(m_ptr + b * smb + s * sms, mask=sm, other=0).to(ACC)
        else:
            m = sm.to(ACC)
        bad = tl.zeros(m.shape, ACC)
    else:
        raw = tl.load(t_ptr + b * stb + s * sts, mask=sm, other=0)
        if LABELS == "integer":
            lab = raw.to(tl.int64)
            integral = sm
        else:
            if LABELS == "float64":
                lf = raw.to(tl.float64)
            else:
                lf = raw.to(tl.float32)
            integral = (lf == tl.floor(lf)) & (tl.abs(lf) < 2147483648.0)
            lab = tl.where(integral, lf, 0.0).to(tl.int64)
        if HAS_IGNORE:
            valid = sm & ~(integral & (lab == ignore_index))
        else:
            valid = sm
        inrange = integral & (lab >= 0) & (lab < C)
        bad = (valid & ~inrange).to(ACC)
        m = valid.to(ACC)
        g = ((c[:, None] == lab[None, :]) & inrange[None, :]).to(ACC)
    return z, g, m, bad


@triton.jit
def _activate(z, cm, ACTIVATION: tl.constexpr):
    if ACTIVATION == "softmax":
        p, _ = _softmax_rows(z, cm[:, None])
    elif ACTIVATION == "sigmoid":
        p = _sigmoid(z)
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
    part_ptr,  # shape (B, NSPLIT, NUM_SLOTS, C), contiguous, accumulation dtype
    C, S, NSPLIT, s_per_split, ignore_index, gamma,
    szb, szc, szs, stb, stc, sts, smb, sms,
    ACTIVATION: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_MASK: tl.constexpr,
    POW_MODE: tl.constexpr, CE_MODE: tl.constexpr, FOCAL_MODE: tl.constexpr, FOCAL_C0: tl.constexpr,
    FOCAL_POS_MODE: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, c, cm = _classes(C, C_PAD)
    ACC: tl.constexpr = part_ptr.dtype.element_ty
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
                                  szb, szc, szs, stb, stc, sts, smb, sms, LABELS, HAS_IGNORE, HAS_MASK, ACC)
        acc_cnt += m
        acc_bad += bad
        mm = m[None, :]
        if POW_MODE != "off":
            pm = _weigh(mm, _activate(z, cm, ACTIVATION))
            gm = g * mm
            acc_i += _weigh(gm, pm)
            if POW_MODE == "linear":
                acc_p += pm
                acc_g += gm
            elif POW_MODE == "square":
                acc_p += pm * pm
                acc_g += gm * gm
            else:
                acc_p += tl.abs(pm)
                acc_g += tl.abs(gm)
                acc_d += tl.abs(pm - gm)
        if CE_MODE == "softmax" or CE_MODE == "softmax_smooth":
            _, lq = _softmax_rows(z, cm[:, None])
            acc_n -= _weigh(g * mm, lq)
            if CE_MODE == "softmax_smooth":
                acc_l -= _weigh(mm, lq)
        elif CE_MODE == "bce":
            acc_n += tl.where(cm[:, None], _weigh(mm, _bce_with_logits(z, g)), 0.0)
            acc_l += tl.where(cm[:, None], _weigh(g * mm, _softplus(-z)), 0.0)
        if FOCAL_MODE == "sigmoid":
            zz = _weigh(mm, z)
            tt = g * mm
            bce, mod, _ = _sigmoid_focal_terms(zz, tt, gamma)
            lf = tl.where(cm[:, None], _weigh(mm, _weigh(mod, bce)), 0.0)
            acc_f += lf
            if FOCAL_POS_MODE == "linear":
                acc_fp += _weigh(tt, lf)
            elif FOCAL_POS_MODE == "hard":
                acc_fp += tl.where(tt == 1.0, lf, 0.0)
        elif FOCAL_MODE == "softmax":
            zz = _weigh(mm, z)
            tt = g * mm
            rows = cm[:, None] & (c >= FOCAL_C0)[:, None]
            q, lq = _softmax_rows(zz, rows)
            powg, _ = _focal_pow(1.0 - q, gamma)
            acc_f -= tl.where(rows, _weigh(tt * mm * powg, lq), 0.0)
    row = part_ptr + ((b * NSPLIT + pid) * NUM_SLOTS) * C + c
    if POW_MODE != "off":
        tl.store(row + INTERSECT * C, tl.sum(acc_i, axis=1), mask=cm)
        tl.store(row + PRED * C, tl.sum(acc_p, axis=1), mask=cm)
        tl.store(row + GROUND * C, tl.sum(acc_g, axis=1), mask=cm)
        if POW_MODE == "abs":
            tl.store(row + DIFF * C, tl.sum(acc_d, axis=1), mask=cm)
    if CE_MODE != "off":
        tl.store(row + NLL * C, tl.sum(acc_n, axis=1), mask=cm)
        if CE_MODE != "softmax":
            tl.store(row + LOGSUM * C, tl.sum(acc_l, axis=1), mask=cm)
    if FOCAL_MODE != "off":
        tl.store(row + FOCAL * C, tl.sum(acc_f, axis=1), mask=cm)
        if FOCAL_POS_MODE != "off":
            tl.store(row + FOCAL_POS * C, tl.sum(acc_fp, axis=1), mask=cm)
    zc = tl.zeros([C_PAD], ACC)
    tl.store(row + COUNT * C, zc + tl.sum(acc_cnt, axis=0), mask=cm)
    tl.store(row + BAD * C, zc + tl.sum(acc_bad, axis=0), mask=cm)


@triton.jit
def _loss_stats_bwd_kernel(
    gs_ptr,    # shape (B, NUM_SLOTS, C), contiguous, accumulation dtype: d loss / d stats
    z_ptr,     # shape (B, C, S), strides (szb, szc, szs)
    t_ptr,     # as in the forward kernel
    m_ptr,     # shape (B, S), strides (smb, sms), unused unless HAS_MASK
    dz_ptr,    # shape (B, C, S), strides (sdb, sdc, sds): d logits, logits dtype
    C, S, ignore_index, gamma,
    szb, szc, szs, stb, stc, sts, smb, sms, sdb, sdc, sds,
    ACTIVATION: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_MASK: tl.constexpr,
    POW_MODE: tl.constexpr, CE_MODE: tl.constexpr, FOCAL_MODE: tl.constexpr, FOCAL_C0: tl.constexpr,
    FOCAL_POS_MODE: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b, c, cm = _classes(C, C_PAD)
    ACC: tl.constexpr = gs_ptr.dtype.element_ty
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sm = s < S
    z, g, m, _ = _load_tile(z_ptr, t_ptr, m_ptr, b, c, cm, s, sm, C, ignore_index,
                            szb, szc, szs, stb, stc, sts, smb, sms, LABELS, HAS_IGNORE, HAS_MASK, ACC)
    mm = m[None, :]
    gsb = gs_ptr + b * NUM_SLOTS * C + c
    dz = tl.zeros([C_PAD, BLOCK], ACC)
    if POW_MODE != "off":
        p = _activate(z, cm, ACTIVATION)
        pm = _weigh(mm, p)
        gm = g * mm
        c_i = tl.load(gsb + INTERSECT * C, mask=cm, other=0.0)[:, None]
        c_p = tl.load(gsb + PRED * C, mask=cm, other=0.0)[:, None]
        u = c_i * gm
        if POW_MODE == "linear":
            u += c_p
        elif POW_MODE == "square":
            u += c_p * 2.0 * pm
        else:
            c_d = tl.load(gsb + DIFF * C, mask=cm, other=0.0)[:, None]
            u += c_p * _sign(pm) + c_d * _sign(pm - gm)
        u = tl.where(cm[:, None], u * mm, 0.0)
        if ACTIVATION == "softmax":
            dz += p * (u - tl.sum(p * u, axis=0)[None, :])
        elif ACTIVATION == "sigmoid":
            dz += u * p * (1.0 - p)
        else:
            dz += u
    if CE_MODE == "softmax" or CE_MODE == "softmax_smooth":
        q, _ = _softmax_rows(z, cm[:, None])
        w = tl.load(gsb + NLL * C, mask=cm, other=0.0)[:, None] * g * mm
        if CE_MODE == "softmax_smooth":
            w += tl.load(gsb + LOGSUM * C, mask=cm, other=0.0)[:, None] * mm
        w = tl.where(cm[:, None], w, 0.0)
        dz += q * tl.sum(w, axis=0)[None, :] - w
    elif CE_MODE == "bce":
        sneg = _sigmoid(-z)
        c_n = tl.load(gsb + NLL * C, mask=cm, other=0.0)[:, None]
        c_l = tl.load(gsb + LOGSUM * C, mask=cm, other=0.0)[:, None]
        dz += (c_n * ((1.0 - g) - sneg) - c_l * g * sneg) * mm
    if FOCAL_MODE == "sigmoid":
        zz = _weigh(mm, z)
        tt = g * mm
        bce, mod, sg = _sigmoid_focal_terms(zz, tt, gamma)
        dl = (_sigmoid(zz) - tt) * mod - _weigh(gamma * mod * _sigmoid(_weigh(sg, zz)) * sg, bce)
        coef = tl.load(gsb + FOCAL * C, mask=cm, other=0.0)[:, None]
        if FOCAL_POS_MODE == "linear":
            coef = coef + tl.load(gsb + FOCAL_POS * C, mask=cm, other=0.0)[:, None] * tt
        elif FOCAL_POS_MODE == "hard":
            coef = coef + tl.load(gsb + FOCAL_POS * C, mask=cm, other=0.0)[:, None] * tl.where(tt == 1.0, 1.0, 0.0)
        dz += tl.where(cm[:, None], coef * dl * mm * mm, 0.0)
    elif FOCAL_MODE == "softmax":
        zz = _weigh(mm, z)
        tt = g * mm
        rows = cm[:, None] & (c >= FOCAL_C0)[:, None]
        q, lq = _softmax_rows(zz, rows)
        q = tl.where(rows, q, 0.0)
        powg, dpow = _focal_pow(1.0 - q, gamma)
        coef = tl.load(gsb + FOCAL * C, mask=cm, other=0.0)[:, None]
        v = tl.where(rows, coef * (-tt * mm * (powg - _weigh(_weigh(q, lq), dpow))), 0.0)
        dz += (v - q * tl.sum(v, axis=0)[None, :]) * mm
    tl.store(dz_ptr + b * sdb + c[:, None] * sdc + s[None, :] * sds, dz.to(dz_ptr.dtype.element_ty),
             mask=cm[:, None] & sm[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _label_kind(spec: StatsSpec, target: torch.Tensor) -> str:
    """The ``LABELS`` constexpr, how the kernels read ``target``: ``"dense"``, or one label per voxel held as
    ``"integer"``, or as floats checked for integrality in ``"float32"`` (float16/bfloat16/float32 labels, exact
    there) or in ``"float64"`` (float64 labels: ``1 + 1e-9`` is not an integer), never below their own precision."""
    if not spec.label_mode:
        return "dense"
    if not target.is_floating_point():
        return "integer"
    return "float64" if target.dtype == torch.float64 else "float32"


def _target_views(target: torch.Tensor, mask: Optional[torch.Tensor], spec: StatsSpec):
    """(target view, its strides (b, c, s), mask view, mask strides (b, s))."""
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    if spec.label_mode:
        t = flat_view(target)[:, 0]
        t_strides = (t.stride(0), 0, t.stride(1))
    else:
        t = flat_view(target)
        t_strides = t.stride()
    if mask is not None:
        m = flat_view(mask)[:, 0]
        m_strides = m.stride()
    else:
        m, m_strides = t, (0, 0)
    return t, t_strides, m, m_strides


#: values of one [C_PAD, BLOCK] tile per GPU thread: the forward keeps up to eight such accumulators, the backward
#: their coefficients; 4 keeps every specialization from 2 to 128 classes under ~100 registers without spills at
#: sm_90 (tests/test_losses.py::test_no_spills_at_sm90), so that 4-8 programs fit on an SM
TILE_VALUES_PER_THREAD = 4


def _tile(C: int, S: int, device: torch.device) -> tuple[int, int, int]:
    """(C_PAD, BLOCK, num_warps): on a GPU 4 warps up to 16 classes, 8 above, and TILE_VALUES_PER_THREAD values
    per thread (14 classes: [16, 32] tiles; 105 classes: [128, 8]); bigger tiles under the interpreter."""
    c_pad = max(triton.next_power_of_2(C), 2)
    if device.type == "cuda":
        num_warps = 4 if c_pad <= 16 else 8
        block = max(2, min(TILE_VALUES_PER_THREAD * 32 * num_warps // c_pad, triton.next_power_of_2(S)))
    else:
        num_warps = 4
        block = max(16, min(16384 // c_pad, triton.next_power_of_2(S)))
    return c_pad, block, num_warps


def _flags(spec: StatsSpec, target: torch.Tensor, has_mask: bool, C: int, S: int, device: torch.device) -> dict:
    """The constexprs and launch options shared by the forward and backward kernels."""
    c_pad, block, num_warps = _tile(C, S, device)
    return dict(ACTIVATION=spec.act, LABELS=_label_kind(spec, target), HAS_IGNORE=spec.has_ignore,
                HAS_MASK=has_mask, POW_MODE=spec.pow_mode, CE_MODE=spec.ce_mode, FOCAL_MODE=spec.focal_mode,
                FOCAL_C0=spec.focal_c0, FOCAL_POS_MODE=spec.focal_pos, C_PAD=c_pad, BLOCK=block,
                num_warps=num_warps)


def loss_stats_forward(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                       spec: StatsSpec) -> torch.Tensor:
    """Statistics ``(B, NUM_SLOTS, C)`` (see fastmed.reference.losses.loss_stats) in one pass over logits and
    targets; ``logits (B, C, *spatial)``, ``target`` and ``mask`` as there."""
    check_spec(spec)
    B, C = logits.shape[:2]
    z = flat_view(logits)
    S = z.shape[2]
    t, ts, m, ms = _target_views(target, mask, spec)
    flags = _flags(spec, target, mask is not None, C, S, logits.device)
    block = flags["BLOCK"]
    want = target_programs(logits.device, cpu=1)
    nsplit = max(1, min(triton.cdiv(S, block), triton.cdiv(want, B)))
    s_per = triton.cdiv(triton.cdiv(S, nsplit), block) * block
    nsplit = triton.cdiv(S, s_per)
    part = torch.zeros((B, nsplit, loss_spec.NUM_SLOTS, C), device=logits.device,
                       dtype=accumulation_dtype(logits.dtype))
    with device_guard(logits):
        wrap_triton(_loss_stats_fwd_kernel)[(nsplit, B)](
            z, t, m, part, C, S, nsplit, s_per, int(spec.ignore_index), float(spec.gamma),
            *z.stride(), *ts, *ms, **flags)
    return part.sum(1)


def loss_stats_backward(gstats: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                        mask: Optional[torch.Tensor], spec: StatsSpec) -> torch.Tensor:
    """d logits (shaped, typed and laid out like ``logits``) from ``gstats`` = d loss / d stats
    ``(B, NUM_SLOTS, C)``, in one pass."""
    check_spec(spec)
    B, C = logits.shape[:2]
    z = flat_view(logits)
    S = z.shape[2]
    t, ts, m, ms = _target_views(target, mask, spec)
    gs = gstats.to(accumulation_dtype(logits.dtype)).contiguous()
    dlogits = torch.empty_like(logits)
    dz = flat_view(dlogits)
    flags = _flags(spec, target, mask is not None, C, S, logits.device)
    with device_guard(logits):
        wrap_triton(_loss_stats_bwd_kernel)[(triton.cdiv(S, flags["BLOCK"]), B)](
            gs, z, t, m, dz, C, S, int(spec.ignore_index), float(spec.gamma),
            *z.stride(), *ts, *ms, *dz.stride(), **flags)
    if dz.data_ptr() != dlogits.data_ptr():  # empty_like kept a layout whose spatial dims do not collapse
        dlogits.copy_(dz.view(dlogits.shape))
    return dlogits


# --------------------------------------------------------------------------------------------------
# The formula on the statistics (fastmed::loss_finalize): one program, one launch
# --------------------------------------------------------------------------------------------------

#: float32's machine epsilon, MONAI's floor of the focal means' denominators
FP32_EPS = tl.constexpr(torch.finfo(torch.float32).eps)
#: nnU-Net's floor of the soft-Dice denominator
NNUNET_CLIP = tl.constexpr(1e-8)


@triton.jit
def _slot(stats_ptr, k, r, c, m, C):
    """The ``[B_PAD, C_PAD]`` tile ``stats[r, k, c]`` (0 outside ``m``)."""
    return tl.load(stats_ptr + (r * NUM_SLOTS + k) * C + c, mask=m, other=0.0)


@triton.jit
def _total(x, m):
    """The sum of ``x`` over ``m`` (a 0-d tensor)."""
    return tl.sum(tl.sum(tl.where(m, x, 0.0), axis=1), axis=0)


@triton.jit
def _loss_finalize_kernel(
    stats_ptr,  # shape (B, NUM_SLOTS, C), contiguous
    rw_ptr,     # shape (C - REGION_C0,): the overlap term's class weight (HAS_RW)
    cew_ptr,    # shape (C,) (CE class weight) or (1,) (BCE pos_weight) (HAS_CEW)
    fa_ptr,     # shape (C - FOCAL_C0,): focal alpha per class (ALPHA_MODE "per_class")
    fw_ptr,     # shape (C - FOCAL_C0,): focal class weight (HAS_FW)
    loss_ptr,   # shape (): the loss; REGION_REDUCTION "none": (B | 1, C - REGION_C0), generalized (B | 1, 1)
    jac_ptr,    # shape (B, NUM_SLOTS, C): d loss / d stats (per output value for "none")
    valid_ptr,  # shape (): 1 when no voxel holds a bad label, else 0
    B, C, num_voxels,
    smooth_nr, smooth_dr, a_n, a_t, a_fp, a_fn, region_scale, label_smoothing, ce_scale, alpha, focal_scale,
    REGION: tl.constexpr, REGION_C0: tl.constexpr, POW_MODE: tl.constexpr, BATCH: tl.constexpr,
    W_TYPE: tl.constexpr, REGION_REDUCTION: tl.constexpr, CE: tl.constexpr, CE_REDUCTION: tl.constexpr,
    SMOOTHING: tl.constexpr, FOCAL_TERM: tl.constexpr, FOCAL_C0: tl.constexpr, ALPHA_MODE: tl.constexpr,
    FOCAL_REDUCTION: tl.constexpr, FOCAL_MASKED: tl.constexpr, HAS_RW: tl.constexpr, HAS_CEW: tl.constexpr,
    HAS_FW: tl.constexpr, B_PAD: tl.constexpr, C_PAD: tl.constexpr,
):
    r = tl.arange(0, B_PAD).to(tl.int64)[:, None]
    c = tl.arange(0, C_PAD).to(tl.int64)[None, :]
    m = (r < B) & (c < C)
    col0 = m & (c == 0)
    dtype = stats_ptr.dtype.element_ty
    zero = tl.zeros([B_PAD, C_PAD], dtype=dtype)
    j_int, j_pred, j_diff, j_nll, j_lsum, j_focal, j_fpos = zero, zero, zero, zero, zero, zero, zero
    row = tl.zeros([1, C_PAD], dtype=dtype)
    z0 = tl.sum(tl.sum(zero, axis=1), axis=0)  # a 0-d zero of the statistics' dtype
    total = z0
    # the sizes as numbers of the statistics' dtype (B or C may arrive as the constexpr 1)
    fB, fC, nvox = z0 + B, z0 + C, z0 + num_voxels
    if REGION != "off":
        rm = m & (c >= REGION_C0)
        vm = (c >= REGION_C0) & (c < C)  # [1, C_PAD] with BATCH (one row), else [B_PAD, C_PAD]
        ground = _slot(stats_ptr, GROUND, r, c, rm, C)
        if POW_MODE == "abs":
            pred = _slot(stats_ptr, PRED, r, c, rm, C)
            diff = _slot(stats_ptr, DIFF, r, c, rm, C)
            if BATCH:
                pred, ground, diff = tl.sum(pred, 0)[None, :], tl.sum(ground, 0)[None, :], tl.sum(diff, 0)[None, :]
            tp = (pred + ground - diff) * 0.5
        else:
            tp = _slot(stats_ptr, INTERSECT, r, c, rm, C)
            pred = _slot(stats_ptr, PRED, r, c, rm, C)
            if BATCH:
                tp, pred, ground = tl.sum(tp, 0)[None, :], tl.sum(pred, 0)[None, :], tl.sum(ground, 0)[None, :]
        if BATCH:
            nrows = z0 + 1.0
            rr = tl.arange(0, 1).to(tl.int64)[:, None]
            row_ok = rr < 1
        else:
            nrows = fB
            rr = r
            vm = vm & (r < B)
            row_ok = r < B
        fp = pred - tp
        fn = ground - tp
        if REGION == "generalized":
            g = ground.to(tl.float32)  # MONAI computes the class weights in float32
            if W_TYPE == "square":
                w = 1.0 / (g * g)
            elif W_TYPE == "simple":
                w = 1.0 / g
            else:
                w = g * 0.0 + 1.0
            infs = vm & (w == float("inf"))
            w = tl.where(vm & (w != float("inf")), w, 0.0)
            w = (w + tl.where(infs, tl.max(w, axis=1)[:, None], 0.0)).to(dtype)
            numer = 2.0 * tl.sum(tl.where(vm, tp * w, 0.0), axis=1)[:, None] + smooth_nr
            denom = tl.sum(tl.where(vm, (2.0 * tp + fp + fn) * w, 0.0), axis=1)[:, None] + smooth_dr
            f = 1.0 - numer / denom  # [rows, 1]
            if REGION_REDUCTION == "mean":
                unit = 1.0 / nrows
            else:
                unit = 1.0
            if REGION_REDUCTION == "none":
                tl.store(loss_ptr + rr, f * region_scale, mask=row_ok)
            else:
                total += tl.sum(tl.sum(tl.where(row_ok, f, 0.0), axis=1), axis=0) * unit * region_scale
            d_fp = numer / (denom * denom) * w * (unit * region_scale)
            d_tp = 2.0 * d_fp - 2.0 * w / denom * (unit * region_scale)
            d_fn = d_fp
        else:
            numer = a_n * tp + smooth_nr
            denom = a_t * tp + a_fp * fp + a_fn * fn + smooth_dr
            if REGION == "nnunet":  # -(2 tp + s) / clip(2 tp + fp + fn + s, 1e-8)
                live = (denom >= NNUNET_CLIP).to(dtype)
                denom = tl.maximum(denom, NNUNET_CLIP)
                f = -numer / denom
            else:
                live = 1.0
                f = 1.0 - numer / denom
            scale = region_scale + row
            if HAS_RW:
                rw = tl.load(rw_ptr + (c - REGION_C0), mask=(c >= REGION_C0) & (c < C), other=0.0)
                f = f * rw
                scale = scale * rw
            if REGION_REDUCTION == "mean":
                unit = 1.0 / (nrows * (fC - REGION_C0))
            else:
                unit = 1.0
            if REGION_REDUCTION == "none":
                tl.store(loss_ptr + rr * (C - REGION_C0) + (c - REGION_C0), f * region_scale, mask=vm)
            else:
                total += _total(f, vm) * unit * region_scale
            scale = scale * unit
            q = numer / (denom * denom) * live * scale
            d_tp = -a_n / denom * scale + a_t * q
            d_fp = a_fp * q
            d_fn = a_fn * q
        if POW_MODE == "abs":  # tp = (P + G - D) / 2, fp = P - tp, fn = G - tp
            j_pred += tl.where(rm, (d_tp + d_fp - d_fn) * 0.5, 0.0)
            j_diff += tl.where(rm, (d_fp + d_fn - d_tp) * 0.5, 0.0)
        else:  # tp = I, fp = P - I, fn = G - I
            j_int += tl.where(rm, d_tp - d_fp - d_fn, 0.0)
            j_pred += tl.where(rm, d_fp, 0.0)
    if CE != "off":
        nll = _slot(stats_ptr, NLL, r, c, m, C)
        if CE == "nnunet":  # the mean over the voxels that are not ignored (0 if there are none)
            denom = tl.maximum(_total(_slot(stats_ptr, COUNT, r, c, col0, C), col0), 1.0)
            j_nll += tl.where(m, ce_scale / denom, 0.0)
            total += ce_scale * _total(nll, m) / denom
        else:
            if CE_REDUCTION == "sum":
                denom = z0 + 1.0
            else:
                denom = fB * nvox
            if CE == "bce":
                lsum = _slot(stats_ptr, LOGSUM, r, c, col0, C)
                j_nll += tl.where(col0, ce_scale / denom, 0.0)
                total += ce_scale * _total(nll, col0) / denom
                if HAS_CEW:
                    pw1 = tl.load(cew_ptr) - 1.0
                    j_lsum += tl.where(col0, ce_scale * pw1 / denom, 0.0)
                    total += ce_scale * pw1 * _total(lsum, col0) / denom
            else:
                if HAS_CEW:
                    w = tl.load(cew_ptr + c, mask=c < C, other=0.0)
                    if CE == "labels" and CE_REDUCTION == "mean":  # nn.CrossEntropyLoss: the weighted voxel count
                        denom = _total(_slot(stats_ptr, GROUND, r, c, m, C) * w, m)
                else:
                    w = 1.0
                keep = 1.0 - label_smoothing
                j_nll += tl.where(m, ce_scale * keep * w / denom, 0.0)
                total += ce_scale * keep * _total(nll * w, m) / denom
                if SMOOTHING:
                    lsum = _slot(stats_ptr, LOGSUM, r, c, m, C)
                    share = label_smoothing / fC
                    j_lsum += tl.where(m, ce_scale * share * w / denom, 0.0)
                    total += ce_scale * share * _total(lsum * w, m) / denom
    if FOCAL_TERM != "off":
        fm = m & (c >= FOCAL_C0)
        cm = (c >= FOCAL_C0) & (c < C)
        loss = _slot(stats_ptr, FOCAL, r, c, fm, C)
        pos = _slot(stats_ptr, FOCAL_POS, r, c, fm, C)
        coef_l = row + 1.0
        coef_p = row
        if FOCAL_TERM == "softmax":
            if ALPHA_MODE == "scalar":  # MONAI: [1 - alpha, alpha, alpha, ...] over the classes kept
                coef_l = tl.where(c == FOCAL_C0, 1.0 - alpha, alpha) + coef_p
            elif ALPHA_MODE == "per_class":
                coef_l = tl.load(fa_ptr + (c - FOCAL_C0), mask=cm, other=0.0) + coef_p
        elif ALPHA_MODE == "scalar":
            coef_l = coef_l * (1.0 - alpha)
            coef_p = coef_p + (2.0 * alpha - 1.0)
        elif ALPHA_MODE == "per_class":
            coef_p = tl.load(fa_ptr + (c - FOCAL_C0), mask=cm, other=0.0) - 1.0 + coef_p
        if HAS_FW:
            fw = tl.load(fw_ptr + (c - FOCAL_C0), mask=cm, other=0.0)
            coef_l = coef_l * fw
            coef_p = coef_p * fw
        count = tl.sum(_slot(stats_ptr, COUNT, r, c, col0, C), axis=1)[:, None]  # [B_PAD, 1]
        if FOCAL_REDUCTION == "sum":  # MONAI: the mean over the voxels, summed over samples and classes
            if FOCAL_MASKED:
                unit = focal_scale / tl.maximum(count, FP32_EPS)
            else:
                unit = focal_scale / nvox + count * 0.0
        else:
            if FOCAL_MASKED:
                unit = focal_scale / tl.maximum(_total(count, r < B), FP32_EPS) + count * 0.0
            else:
                unit = focal_scale / (fB * (fC - FOCAL_C0) * nvox) + count * 0.0
        j_focal += tl.where(fm, coef_l * unit, 0.0)
        j_fpos += tl.where(fm, coef_p * unit, 0.0)
        total += _total((coef_l * loss + coef_p * pos) * unit, fm)
    if REGION_REDUCTION != "none":
        tl.store(loss_ptr, total)
    bad = _total(_slot(stats_ptr, BAD, r, c, col0, C), col0)
    tl.store(valid_ptr, (bad == 0).to(dtype))
    base = jac_ptr + r * NUM_SLOTS * C + c
    tl.store(base + INTERSECT * C, j_int, mask=m)
    tl.store(base + PRED * C, j_pred, mask=m)
    tl.store(base + GROUND * C, zero, mask=m)
    tl.store(base + DIFF * C, j_diff, mask=m)
    tl.store(base + NLL * C, j_nll, mask=m)
    tl.store(base + LOGSUM * C, j_lsum, mask=m)
    tl.store(base + FOCAL * C, j_focal, mask=m)
    tl.store(base + FOCAL_POS * C, j_fpos, mask=m)
    tl.store(base + COUNT * C, zero, mask=m)
    tl.store(base + BAD * C, zero, mask=m)


def _finalize_shape(spec: LossSpec, B: int, C: int) -> tuple[int, ...]:
    """The loss's shape: () or, with ``region_reduction="none"``, MONAI's per-(sample, class) shape."""
    if spec.region_reduction != "none":
        return ()
    cols = 1 if spec.region == "generalized" else C - spec.region_c0
    if spec.batch:
        return (cols,)
    return (B, cols)


def loss_finalize(stats: torch.Tensor, region_weight: Optional[torch.Tensor], ce_weight: Optional[torch.Tensor],
                  focal_alpha: Optional[torch.Tensor], focal_weight: Optional[torch.Tensor],
                  spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, jac, valid) of :func:`fastmed.reference.losses.loss_finalize` from ``stats (B, NUM_SLOTS, C)`` in
    one launch of one program (the per-class tensors: 1-D, on the statistics' device, in their dtype).

    The hyper-parameters (smoothing, scales, alpha, ...) enter the kernel as float32 numbers."""
    check_loss_spec(spec)
    B, _, C = stats.shape
    stats = stats.contiguous()
    jac = torch.empty_like(stats)
    valid = torch.empty((), dtype=stats.dtype, device=stats.device)
    loss = torch.empty(_finalize_shape(spec, B, C), dtype=stats.dtype, device=stats.device)
    a_n, a_t, a_fp, a_fn = ref.overlap_coefficients(spec)
    smooth_dr = spec.smooth_nr if spec.region == "nnunet" else spec.smooth_dr  # nnU-Net: one smooth
    b_pad, c_pad = triton.next_power_of_2(B), max(triton.next_power_of_2(C), 2)

    def ptr(t: Optional[torch.Tensor]) -> torch.Tensor:
        return stats if t is None else t.contiguous()

    with device_guard(stats):
        wrap_triton(_loss_finalize_kernel)[(1,)](
            stats, ptr(region_weight), ptr(ce_weight), ptr(focal_alpha), ptr(focal_weight), loss, jac, valid,
            B, C, spec.num_voxels, spec.smooth_nr, smooth_dr, a_n, a_t, a_fp, a_fn, spec.region_scale,
            spec.label_smoothing, spec.ce_scale, spec.alpha, spec.focal_scale,
            REGION=spec.region, REGION_C0=spec.region_c0, POW_MODE=spec.pow_mode, BATCH=spec.batch,
            W_TYPE=spec.w_type, REGION_REDUCTION=spec.region_reduction, CE=spec.ce, CE_REDUCTION=spec.ce_reduction,
            SMOOTHING=spec.label_smoothing > 0, FOCAL_TERM=spec.focal, FOCAL_C0=spec.focal_c0,
            ALPHA_MODE=spec.alpha_mode, FOCAL_REDUCTION=spec.focal_reduction, FOCAL_MASKED=spec.focal_masked,
            HAS_RW=region_weight is not None, HAS_CEW=ce_weight is not None, HAS_FW=focal_weight is not None,
            B_PAD=b_pad, C_PAD=c_pad, num_warps=4 if b_pad * c_pad <= 1024 else 8)
    return loss, jac, valid
