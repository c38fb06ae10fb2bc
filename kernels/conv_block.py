"""Fused convolution block: Triton implicit-GEMM convolution with normalization statistics in the epilogue.

Every tensor is seen as 3D: a 2D input ``(N, C, H, W)`` is the view ``(N, C, 1, H, W)`` (no copy).  Strides
are explicit, so contiguous (NCDHW) and channels-last (NDHWC) tensors run without copies; channels-last is
the layout the loads are laid out for (a row of the GEMM's A tile is ``BLOCK_K`` consecutive channels).

Forward (``conv_block_forward``):
  1. ``_conv_fwd_kernel``: implicit GEMM with M = output voxels of one sample, N = output channels,
     K = Cin * KD * KH * KW (one flat loop over (kernel tap, channel block), so loads pipeline across taps;
     the input tile is gathered with the zero-padding mask at load time).  The input may come from two
     tensors, a decoder's upsampled features and its skip (channels ``[0, C1)`` from x, ``[C1, C1 + C2)``
     from x2): the concatenation is never written.  ``tl.dot`` takes fp16/bf16 tiles with fp32 accumulation
     (tf32 for fp32 when ``torch.backends.cudnn.allow_tf32``; fp32 under the interpreter).  The epilogue adds the
     bias, stores the output tile and, for each output channel, the tile's mean and sum of squared
     deviations (M2) over its voxels: fp32 partials ``(N, Cout, P)``, one per M tile (a tile never
     straddles two samples).  The partials are combined per statistics row with Chan's update in a fixed
     order (deterministic, no cancellation when |mean| >> std).
  2. normalize + residual + activation in one pass: ``kernels/norm_act.py``'s apply kernel with these
     statistics (no statistics pass over the convolution output).
Backward (``conv_block_backward``):
  1. the norm-act backward of ``kernels/norm_act.py`` (two passes: reduce, apply) gives d conv_out, the
     norm affine gradients, d residual and the prelu slope gradient, recomputing the normalized activation;
  2. ``_conv_dgrad_kernel``: d x by the gather form of the transposed convolution, an implicit GEMM with
     M = input voxels of one sample, N = Cin, K = Cout * taps; output voxel ``o = (i + p - k d) / s`` per
     axis.  Strided convolutions are decomposed by sub-pixel residue class (programs own voxels with one
     ``(i + p) mod s``), so each program loops only over the taps whose division is exact;
  3. ``_conv_wgrad_kernel``: d weight as GEMMs (Cout x Cin per tap) over K = N * output voxels, split into
     ``SPLITS`` ranges whose fp32 partials are summed in a fixed order (deterministic);
  4. d bias: a torch sum of d conv_out over (N, spatial) in fp32.

Limits: groups = 1; float16/bfloat16/float32 (fp64 runs on the cuDNN implementation).  Tile sizes are fixed
heuristics, not autotuned, and no timing of these kernels on a GPU exists yet (see
fastmed/ops/_conv_block_choice.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmed._tensors import device_guard, memory_format, target_programs
from fastmed.reference.conv_block import ConvSpec, ConvTensors
from fastmed.reference.norm_act import NormSpec, NormTensors

from .norm_act import finalize_stats, norm_act_backward, norm_act_forward

# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tap_coords(tap, KH: tl.constexpr, KW: tl.constexpr):
    """Flat kernel tap (kd * KH + kh) * KW + kw -> (kd, kh, kw)."""
    return tap // (KH * KW), (tap // KW) % KH, tap % KW


@triton.jit
def _accumulate_input(
    acc, x_n, C, c_first, w_ptr, CinT, Cout, co, mco, mm,
    x_strides,  # (sxc, sxd, sxh, sxw) of this input
    out_pos,    # (od, oh, ow): the [BLOCK_M] output voxels
    in_size,    # (D, H, W)
    stride, pad, dil,  # (d, h, w) each
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc += sum over taps and the C channels of one input of x[n, c, o * s - p + k * d] @ w[k, c_first + c, co].

    One flat loop over (tap, channel block), so the compiler pipelines the loads across taps even when the
    channels fit one block (Cin = 32)."""
    cblocks = tl.cdiv(C, BLOCK_K)
    for kk in range(0, KD * KH * KW * cblocks):
        tap = kk // cblocks
        c = (kk % cblocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        kd, kh, kw = _tap_coords(tap, KH, KW)
        idd = out_pos[0] * stride[0] - pad[0] + kd * dil[0]
        ihh = out_pos[1] * stride[1] - pad[1] + kh * dil[1]
        iww = out_pos[2] * stride[2] - pad[2] + kw * dil[2]
        valid = (mm & (idd >= 0) & (idd < in_size[0]) & (ihh >= 0) & (ihh < in_size[1]) & (iww >= 0)
                 & (iww < in_size[2]))
        mc = c < C
        a_row = x_n + idd * x_strides[1] + ihh * x_strides[2] + iww * x_strides[3]  # [BLOCK_M] pointers
        a = tl.load(a_row[:, None] + c[None, :] * x_strides[0], mask=valid[:, None] & mc[None, :], other=0.0)
        w_tap = w_ptr + tap * (CinT * Cout)
        b = tl.load(w_tap + (c_first + c)[:, None] * Cout + co[None, :], mask=mc[:, None] & mco[None, :],
                    other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


# The sizes are not specialized (Triton would compile a kernel per pattern of "== 1" / "divisible by 16" over a
# dozen size arguments, i.e. nearly one per benchmark shape); strides, paddings and dilations still are (stride 1
# gives contiguous, vectorizable loads).
@triton.jit(do_not_specialize=["C1", "C2", "Cout", "D", "H", "W", "Do", "Ho", "Wo", "P"])
def _conv_fwd_kernel(
    x_ptr,      # shape (N, C1, D, H, W), strides (sxn, sxc, sxd, sxh, sxw)
    x2_ptr,     # shape (N, C2, D, H, W), strides (s2n, s2c, s2d, s2h, s2w): the second input (channels
                #   C1..C1+C2 of the convolution input, a decoder's skip); unused unless HAS_X2
    w_ptr,      # shape (KD, KH, KW, C1 + C2, Cout), contiguous
    b_ptr,      # shape (Cout,), stride sb; unused unless HAS_BIAS
    y_ptr,      # shape (N, Cout, Do, Ho, Wo), strides (syn, syc, syd, syh, syw)
    pmean_ptr,  # shape (N, Cout, P) fp32 contiguous: per M-tile mean of y; unused unless STATS
    pm2_ptr,    # shape (N, Cout, P) fp32 contiguous: per M-tile sum of squared deviations; unused unless STATS
    C1, C2, Cout, D, H, W, Do, Ho, Wo, P,
    str_d, str_h, str_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    sxn, sxc, sxd, sxh, sxw, s2n, s2c, s2d, s2h, s2w, syn, syc, syd, syh, syw, sb,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_X2: tl.constexpr,
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    Mo = Do * Ho * Wo
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = m < Mo
    ow = m % Wo
    oh = (m // Wo) % Ho
    od = m // (Wo * Ho)
    co = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mco = co < Cout
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    out_pos, in_size = (od, oh, ow), (D, H, W)
    stride, pad, dil = (str_d, str_h, str_w), (pad_d, pad_h, pad_w), (dil_d, dil_h, dil_w)
    acc = _accumulate_input(acc, x_ptr + n * sxn, C1, 0, w_ptr, C1 + C2, Cout, co, mco, mm, (sxc, sxd, sxh, sxw),
                            out_pos, in_size, stride, pad, dil, KD, KH, KW, DOT_FP32, INPUT_PRECISION, BLOCK_K)
    if HAS_X2:
        acc = _accumulate_input(acc, x2_ptr + n * s2n, C2, C1, w_ptr, C1 + C2, Cout, co, mco, mm,
                                (s2c, s2d, s2h, s2w), out_pos, in_size, stride, pad, dil, KD, KH, KW, DOT_FP32,
                                INPUT_PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co * sb, mask=mco, other=0.0).to(tl.float32)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    mask = mm[:, None] & mco[None, :]
    y_off = n * syn + (od * syd + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(y_ptr + y_off, out, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values: exactly what the normalization pass reads.
        v = tl.where(mask, out.to(tl.float32), 0.0)
        cnt = tl.sum(mm.to(tl.float32), axis=0)
        tmean = tl.sum(v, axis=0) / cnt
        dev = tl.where(mask, v - tmean[None, :], 0.0)
        tm2 = tl.sum(dev * dev, axis=0)
        p_off = (n * Cout + co) * P + pid_m
        tl.store(pmean_ptr + p_off, tmean, mask=mco)
        tl.store(pm2_ptr + p_off, tm2, mask=mco)


@triton.jit(do_not_specialize=["Cin", "Cout", "D", "H", "W", "Do", "Ho", "Wo", "QD", "QH", "QW", "blocks_per_class"])
def _conv_dgrad_kernel(
    dy_ptr,     # shape (N, Cout, Do, Ho, Wo), strides (sdn, sdc, sdd, sdh, sdw): gradient of the conv output
    w_ptr,      # shape (KD, KH, KW, Cout, Cin), contiguous
    taps_ptr,   # shape (classes, TAPS) int32: the taps that reach each residue class, padded
    ntaps_ptr,  # shape (classes,) int32: how many
    dx_ptr,     # shape (N, Cin, D, H, W), strides (sxn, sxc, sxd, sxh, sxw)
    Cin, Cout, D, H, W, Do, Ho, Wo, QD, QH, QW, blocks_per_class,
    str_d, str_h, str_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    sdn, sdc, sdd, sdh, sdw, sxn, sxc, sxd, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sub-pixel decomposition: input voxels are grouped by their residue class r = (i + p) mod s per axis;
    # a tap k reaches a class only when k * d = r (mod s) (the launcher lists those taps), so each program
    # loops over contributing taps only.  Class (rd, rh, rw) holds i = i0 + s * q, i0 = (r - p) mod s,
    # q < (QD, QH, QW) = ceil(size / s) (masked where i is past the end).
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    cls = pid // blocks_per_class
    rw = cls % str_w
    rh = (cls // str_w) % str_h
    rd = cls // (str_w * str_h)
    i0d = ((rd - pad_d) % str_d + str_d) % str_d
    i0h = ((rh - pad_h) % str_h + str_h) % str_h
    i0w = ((rw - pad_w) % str_w + str_w) % str_w
    q = (pid % blocks_per_class).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    iw = i0w + (q % QW) * str_w
    ih = i0h + ((q // QW) % QH) * str_h
    idd = i0d + (q // (QW * QH)) * str_d
    mm = (q < QD * QH * QW) & (idd < D) & (ih < H) & (iw < W)
    ci = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mci = ci < Cin
    dy_n = dy_ptr + n * sdn
    n_taps = tl.load(ntaps_ptr + cls)
    cblocks = tl.cdiv(Cout, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, n_taps * cblocks):
        tap = tl.load(taps_ptr + cls * TAPS + kk // cblocks)
        c = (kk % cblocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        kd, kh, kw = _tap_coords(tap, KH, KW)
        # i + p - k d is a multiple of s for every voxel of this class, so o = (i + p - k d) / s exactly
        # (negative numerators are masked; the shift by s * k d keeps the integer division exact anyway).
        td = idd + pad_d - kd * dil_d
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        od = (td + str_d * kd * dil_d) // str_d - kd * dil_d
        oh = (th + str_h * kh * dil_h) // str_h - kh * dil_h
        ow = (tw + str_w * kw * dil_w) // str_w - kw * dil_w
        valid = mm & (td >= 0) & (th >= 0) & (tw >= 0) & (od < Do) & (oh < Ho) & (ow < Wo)
        mc = c < Cout
        a_row = dy_n + od * sdd + oh * sdh + ow * sdw
        a = tl.load(a_row[:, None] + c[None, :] * sdc, mask=valid[:, None] & mc[None, :], other=0.0)
        w_tap = w_ptr + tap * (Cout * Cin)
        b = tl.load(w_tap + c[:, None] * Cin + ci[None, :], mask=mc[:, None] & mci[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    x_off = n * sxn + (idd * sxd + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=mm[:, None] & mci[None, :])


@triton.jit(do_not_specialize=["Cin", "Cout", "D", "H", "W", "Do", "Ho", "Wo", "k_total", "k_per_split"])
def _conv_wgrad_kernel(
    dy_ptr,     # shape (N, Cout, Do, Ho, Wo), strides (sdn, sdc, sdd, sdh, sdw)
    x_ptr,      # shape (N, Cin, D, H, W), strides (sxn, sxc, sxd, sxh, sxw)
    pw_ptr,     # shape (SPLITS, KD * KH * KW, Cout, Cin) fp32 contiguous: partial weight gradients
    Cin, Cout, D, H, W, Do, Ho, Wo, k_total, k_per_split,
    str_d, str_h, str_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    sdn, sdc, sdd, sdh, sdw, sxn, sxc, sxd, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    n_blocks = tl.cdiv(Cin, BLOCK_N)
    co = (pid_mn // n_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = (pid_mn % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mco = co < Cout
    mci = ci < Cin
    kd, kh, kw = _tap_coords(tap, KH, KW)
    Mo = Do * Ho * Wo
    k_start = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_total)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                       # flat (sample, output voxel) index
        mk = k < k_end
        nn = k // Mo
        m = k % Mo
        ow = m % Wo
        oh = (m // Wo) % Ho
        od = m // (Wo * Ho)
        idd = od * str_d - pad_d + kd * dil_d
        ihh = oh * str_h - pad_h + kh * dil_h
        iww = ow * str_w - pad_w + kw * dil_w
        valid = mk & (idd >= 0) & (idd < D) & (ihh >= 0) & (ihh < H) & (iww >= 0) & (iww < W)
        dy_col = nn * sdn + od * sdd + oh * sdh + ow * sdw   # [BLOCK_K]
        x_row = nn * sxn + idd * sxd + ihh * sxh + iww * sxw
        a = tl.load(dy_ptr + co[:, None] * sdc + dy_col[None, :], mask=mco[:, None] & mk[None, :], other=0.0)
        b = tl.load(x_ptr + x_row[:, None] + ci[None, :] * sxc, mask=valid[:, None] & mci[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out = ((split.to(tl.int64) * TAPS + tap) * Cout + co[:, None]) * Cin + ci[None, :]
    tl.store(pw_ptr + out, acc, mask=mco[:, None] & mci[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> the view (N, C, 1, H, W); 5D tensors unchanged."""
    return t.unsqueeze(2) if t.dim() == 4 else t


def _params_3d(stride, padding, dilation, nd: int):
    if nd == 4:
        return (1, *stride), (0, *padding), (1, *dilation)
    return tuple(stride), tuple(padding), tuple(dilation)



def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _dot_options(t: torch.Tensor) -> dict:
    """DOT_FP32 (tiles cast to fp32 before tl.dot) and INPUT_PRECISION for tensors like t."""
    if _interpreting(t):
        return dict(DOT_FP32=True, INPUT_PRECISION="ieee")
    if t.dtype == torch.float32:
        return dict(DOT_FP32=False, INPUT_PRECISION="tf32" if torch.backends.cudnn.allow_tf32 else "ieee")
    return dict(DOT_FP32=False, INPUT_PRECISION="ieee")


# GPU tiles.  On sm_90 the gathered A tile's 64-bit addresses dominate the registers: BLOCK_M * BLOCK_K / threads
# values per thread must stay at 8 (64 x 32 tiles at 8 warps: 168-246 registers, no spills; the former 128 x 64 x 64
# tiles at 8 warps and 128 x 32 x 32 at 4 warps spilled 2.3-2.6 KB, 64 x 32 x 32 at 4 warps 0.5 KB;
# tests/test_conv_block.py::test_kernels_compile_for_sm90 checks the tiles picked at the benchmark shapes).
# The small tiles also give the 16^3 and 8^3 stages 4x the programs of the former 128-row tiles.
GEMM_BLOCK_M = 64
GEMM_MAX_BLOCK_N = 64
GEMM_BLOCK_K = 32
GEMM_WARPS = 8


def gemm_blocks(interpreting: bool, m: int, n_cols: int, k_cols: int) -> dict:
    """Tile sizes and warps of an implicit GEMM (forward, data gradient) with M rows, N = n_cols, inner channel
    loop over k_cols, on a GPU or (``interpreting``) under the Triton interpreter."""
    if interpreting:  # the interpreter runs few, large programs fastest; tl.dot needs >= 16
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(m))),
                    BLOCK_N=max(16, min(64, triton.next_power_of_2(n_cols))),
                    BLOCK_K=max(16, min(64, triton.next_power_of_2(k_cols))), num_warps=4)
    # BLOCK_N 32 is not smaller in registers: the fp32 (tf32) data gradient at 64 x 32 x 32 spills, at 64 x 64 x 32
    # it needs 212 registers; a 32-channel layer computes a half-masked tile instead.
    return dict(BLOCK_M=GEMM_BLOCK_M, BLOCK_N=16 if n_cols <= 16 else GEMM_MAX_BLOCK_N,
                BLOCK_K=max(16, min(GEMM_BLOCK_K, triton.next_power_of_2(k_cols))), num_warps=GEMM_WARPS,
                num_stages=3)


def wgrad_blocks(interpreting: bool, cout: int, cin: int, k_total: int) -> dict:
    """Tile sizes and warps of the weight-gradient GEMM (Cout x Cin per tap over K = k_total voxels)."""
    if interpreting:
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(cout))),
                    BLOCK_N=max(16, min(64, triton.next_power_of_2(cin))),
                    BLOCK_K=max(16, min(128, triton.next_power_of_2(k_total))), num_warps=4)
    return dict(BLOCK_M=max(16, min(GEMM_MAX_BLOCK_N, triton.next_power_of_2(cout))),
                BLOCK_N=max(16, min(GEMM_MAX_BLOCK_N, triton.next_power_of_2(cin))),
                BLOCK_K=GEMM_BLOCK_K, num_warps=GEMM_WARPS, num_stages=3)


def conv_forward_stats(x: torch.Tensor, conv: ConvTensors, cspec: ConvSpec, stats: bool):
    """Convolution (groups = 1) of ``cat([x, x2], 1)`` (x2 may be None; the concatenation is never
    materialized) and, with ``stats``, its per-(n, c, M tile) partial (mean, M2).

    x ``(N, C1, *s)``, x2 ``(N, C2, *s)``, weight ``(Cout, C1 + C2, *k)``, bias ``(Cout,)`` (any strides) ->
    conv_out ``(N, Cout, *s_out)`` in x's memory format, pmean/pm2 ``(N, Cout, P)`` fp32 and the M tile size
    (None without ``stats``).
    """
    x2, weight, bias = conv
    nd = x.dim()
    st, pd, dl = _params_3d(*cspec, nd)
    N, C1 = x.shape[:2]
    C2 = x2.shape[1] if x2 is not None else 0
    Cout = weight.shape[0]
    out_sp = tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                   for i, k, s, p, d in zip(x.shape[2:], weight.shape[2:], *cspec))
    y = torch.empty((N, Cout) + out_sp, device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    x5, y5 = _as_3d(x), _as_3d(y)
    x25 = _as_3d(x2) if x2 is not None else x5
    w5 = _as_3d(weight)
    KD, KH, KW = w5.shape[2:]
    w_t = w5.permute(2, 3, 4, 1, 0).contiguous()  # (KD, KH, KW, Cin, Cout): small, coalesced along Cout
    Do, Ho, Wo = y5.shape[2:]
    Mo = Do * Ho * Wo
    blocks = gemm_blocks(_interpreting(x), Mo, Cout, max(C1, C2))
    P = triton.cdiv(Mo, blocks["BLOCK_M"])
    pmean = torch.empty((N, Cout, P) if stats else (1,), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    grid = (P, triton.cdiv(Cout, blocks["BLOCK_N"]), N)
    with device_guard(x):
        wrap_triton(_conv_fwd_kernel)[grid](
            x5, x25, w_t, bias if bias is not None else w_t, y5, pmean, pm2,
            C1, C2, Cout, *x5.shape[2:], Do, Ho, Wo, P, *st, *pd, *dl, *x5.stride(), *x25.stride(), *y5.stride(),
            bias.stride(0) if bias is not None else 0,
            KD=KD, KH=KH, KW=KW, HAS_X2=x2 is not None, HAS_BIAS=bias is not None, STATS=stats,
            **_dot_options(x), **blocks)
    if not stats:
        return y, None, None, None
    return y, pmean, pm2, blocks["BLOCK_M"]


def _class_taps_host(kernel, stride, dilation) -> tuple[torch.Tensor, torch.Tensor]:
    """For each residue class (rd, rh, rw) of the data gradient (row-major over the strides), the flat taps
    ``(kd * KH + kh) * KW + kw`` with ``k * d = r (mod s)`` on every axis: (classes, taps) int32 padded, and
    their counts (classes,) int32, on the host."""
    (KD, KH, KW), (sd, sh, sw), (dd, dh, dw) = kernel, stride, dilation
    rows = []
    for rd in range(sd):
        for rh in range(sh):
            for rw in range(sw):
                rows.append([(kd * KH + kh) * KW + kw for kd in range(KD) for kh in range(KH) for kw in range(KW)
                             if (kd * dd) % sd == rd and (kh * dh) % sh == rh and (kw * dw) % sw == rw])
    taps = torch.zeros((len(rows), KD * KH * KW), dtype=torch.int32)
    for i, r in enumerate(rows):
        taps[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return taps, torch.tensor([len(r) for r in rows], dtype=torch.int32)


@functools.lru_cache(maxsize=256)
def _class_taps_cached(kernel, stride, dilation, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in _class_taps_host(kernel, stride, dilation))


def class_taps(kernel, stride, dilation, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_class_taps_host` on ``device``, copied there once per (device, configuration) and cached (the
    kernels only read them); built afresh while torch.compile traces (a graph may not capture a real tensor)."""
    if torch.compiler.is_compiling():
        return tuple(t.to(device) for t in _class_taps_host(kernel, stride, dilation))
    return _class_taps_cached(tuple(kernel), tuple(stride), tuple(dilation), torch.device(device))


def conv_input_grad(dconv: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, cspec: ConvSpec):
    """d x ``(N, Cin, *s)`` (x's dtype and memory format) from d conv_out ``(N, Cout, *s_out)``."""
    st, pd, dl = _params_3d(*cspec, x.dim())
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    dy5, dx5, w5 = _as_3d(dconv), _as_3d(dx), _as_3d(weight)
    KD, KH, KW = w5.shape[2:]
    N, Cin = x.shape[:2]
    Cout = weight.shape[0]
    w_t = w5.permute(2, 3, 4, 0, 1).contiguous()  # (KD, KH, KW, Cout, Cin)
    D, H, W = dx5.shape[2:]
    q = [triton.cdiv(size, s) for size, s in zip((D, H, W), st)]  # voxels per residue class, per axis
    per_class = q[0] * q[1] * q[2]
    blocks = gemm_blocks(_interpreting(x), per_class, Cin, Cout)
    blocks_per_class = triton.cdiv(per_class, blocks["BLOCK_M"])
    taps, ntaps = class_taps((KD, KH, KW), st, dl, x.device)
    grid = (taps.shape[0] * blocks_per_class, triton.cdiv(Cin, blocks["BLOCK_N"]), N)
    with device_guard(x):
        wrap_triton(_conv_dgrad_kernel)[grid](
            dy5, w_t, taps, ntaps, dx5, Cin, Cout, D, H, W, *dy5.shape[2:], *q, blocks_per_class, *st, *pd, *dl,
            *dy5.stride(), *dx5.stride(), KH=KH, KW=KW, TAPS=KD * KH * KW, **_dot_options(x), **blocks)
    return dx


def conv_weight_grad(dconv: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cspec: ConvSpec):
    """d weight ``(Cout, Cin, *k)`` in weight's dtype: per-split fp32 partials summed in a fixed order."""
    st, pd, dl = _params_3d(*cspec, x.dim())
    dy5, x5, w5 = _as_3d(dconv), _as_3d(x), _as_3d(weight)
    KD, KH, KW = w5.shape[2:]
    taps = KD * KH * KW
    N, Cin = x.shape[:2]
    Cout = weight.shape[0]
    Do, Ho, Wo = dy5.shape[2:]
    k_total = N * Do * Ho * Wo
    blocks = wgrad_blocks(_interpreting(x), Cout, Cin, k_total)
    target = 2 if _interpreting(x) else target_programs(x.device, cpu=4)
    tiles = triton.cdiv(Cout, blocks["BLOCK_M"]) * triton.cdiv(Cin, blocks["BLOCK_N"])
    splits = max(1, min(triton.cdiv(target, tiles * taps), triton.cdiv(k_total, blocks["BLOCK_K"])))
    k_per = triton.cdiv(triton.cdiv(k_total, splits), blocks["BLOCK_K"]) * blocks["BLOCK_K"]
    splits = triton.cdiv(k_total, k_per)
    pw = torch.empty((splits, taps, Cout, Cin), device=x.device, dtype=torch.float32)
    with device_guard(x):
        wrap_triton(_conv_wgrad_kernel)[(tiles, taps, splits)](
            dy5, x5, pw, Cin, Cout, *x5.shape[2:], Do, Ho, Wo, k_total, k_per, *st, *pd, *dl,
            *dy5.stride(), *x5.stride(), KH=KH, KW=KW, TAPS=taps, **_dot_options(x), **blocks)
    dw = pw.sum(0).reshape((KD, KH, KW, Cout, Cin)).permute(3, 4, 0, 1, 2)
    return dw.reshape(weight.shape).to(weight.dtype).contiguous(memory_format=memory_format(weight))


def conv_block_forward(x: torch.Tensor, conv: ConvTensors, norm: NormTensors, cspec: ConvSpec, nspec: NormSpec,
                       mean_in: Optional[torch.Tensor], rstd_in: Optional[torch.Tensor]):
    """y = act(norm(conv(cat([x, x2], 1))) * norm_weight + norm_bias + residual); returns (y, conv_out, mean, rstd).

    x ``(N, C1, *s)`` float16/bfloat16/float32, any strides; conv: x2 ``(N, C2, *s)`` or None, weight
    ``(Cout, C1 + C2, *k)``, bias ``(Cout,)`` or None; norm: weight, bias ``(Cout,)`` or None, residual like conv_out
    or None, slope: prelu ``(Cout,)``/``(1,)`` or None (any strides); mean_in/rstd_in: given statistics (batch norm
    in eval mode) or None.  Statistics are fp32.
    """
    stats = mean_in is None
    conv_out, pmean, pm2, tile = conv_forward_stats(x, conv, cspec, stats)
    if stats:
        mean, rstd = finalize_stats(pmean, pm2, conv_out[0, 0].numel(), tile, nspec.kind, nspec.num_groups,
                                    nspec.eps)
    else:
        mean, rstd = mean_in, rstd_in
    y, mean, rstd, _ = norm_act_forward(conv_out, norm, nspec, mean, rstd)
    return y, conv_out, mean, rstd


def conv_block_backward(dy: torch.Tensor, x: torch.Tensor, conv_out: torch.Tensor, conv: ConvTensors,
                        norm: NormTensors, cspec: ConvSpec, nspec: NormSpec, mean: torch.Tensor, rstd: torch.Tensor,
                        input_stats: bool):
    """Returns (dx, ConvTensors(dx2, dweight, dbias), NormTensors(dnorm_weight, dnorm_bias, dresidual, dslope)),
    None where absent.  With a second input the data and weight gradients run once per input on its slice of
    the weight."""
    dconv, norm_grads = norm_act_backward(dy, conv_out, None, norm, nspec, mean, rstd, input_stats)
    x2, weight, bias = conv
    c1 = x.shape[1]
    w1 = weight[:, :c1] if x2 is not None else weight
    dx = conv_input_grad(dconv, w1, x, cspec)
    dw = conv_weight_grad(dconv, x, w1, cspec)
    dx2 = None
    if x2 is not None:
        w2 = weight[:, c1:]
        dx2 = conv_input_grad(dconv, w2, x2, cspec)
        dw = torch.cat([dw, conv_weight_grad(dconv, x2, w2, cspec)], 1)
    db = None
    if bias is not None:
        red = [0] + list(range(2, dconv.dim()))
        db = dconv.sum(red, dtype=torch.float32).to(bias.dtype)
    return dx, ConvTensors(dx2, dw, db), norm_grads
