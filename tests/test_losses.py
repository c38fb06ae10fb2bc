"""Fused segmentation losses: equivalence with MONAI 1.6 and nnU-Net, numerics, determinism, errors."""
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import fastmed
import fastmed.nn as FN
from fastmed import ops
from fastmed.reference import losses as ref

from conftest import TOL, triton_device

monai_losses = pytest.importorskip("monai.losses")

BACKENDS = ["reference", "triton"]


def _device(backend):
    return "cpu" if backend == "reference" else triton_device()


def _targets(kind, B, C, spatial, gen, device, label_dtype=torch.int64):
    if kind == "labels":
        return torch.randint(0, C, (B, 1) + spatial, generator=gen).to(device=device, dtype=label_dtype)
    if kind == "onehot":
        lab = torch.randint(0, C, (B,) + spatial, generator=gen)
        return torch.nn.functional.one_hot(lab, C).movedim(-1, 1).to(device=device, dtype=torch.float64)
    return torch.rand((B, C) + spatial, generator=gen, dtype=torch.float64).to(device)


@st.composite
def loss_cases(draw):
    """(class name, kwargs, B, C, spatial, target kind) over MONAI's option grid."""
    name = draw(st.sampled_from(["DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "FocalLoss", "DiceCELoss",
                                 "DiceFocalLoss"]))
    C = draw(st.integers(1, 4))
    B = draw(st.integers(1, 2))
    spatial = draw(st.sampled_from([(5, 7), (3, 4, 5), (9, 1)]))
    kw = {}
    target = draw(st.sampled_from(["labels", "onehot", "soft"] if C > 1 else ["onehot", "soft"]))
    if C == 1:
        target = "soft" if target == "soft" else "binary"
    if target == "labels":
        kw["to_onehot_y"] = True
    kw["include_background"] = draw(st.booleans()) if C > 1 else True
    if name != "FocalLoss":
        act = draw(st.sampled_from(["softmax", "sigmoid", "none"] if C > 1 else ["sigmoid", "none"]))
        if act != "none":
            kw[act] = True
        kw["batch"] = draw(st.booleans())
        kw["smooth_nr"] = draw(st.sampled_from([1e-5, 0.0, 0.5]))
        kw["smooth_dr"] = draw(st.sampled_from([1e-5, 1.0]))
    ncls = C if kw["include_background"] or C == 1 else C - 1
    if name in ("DiceLoss", "DiceCELoss", "DiceFocalLoss"):
        kw["squared_pred"] = draw(st.booleans())
        kw["jaccard"] = draw(st.booleans())
    if name in ("DiceLoss", "TverskyLoss", "GeneralizedDiceLoss") and target == "soft":
        kw["soft_label"] = draw(st.booleans())
    if name in ("DiceLoss", "TverskyLoss", "FocalLoss") and target in ("labels", "onehot"):
        ii = draw(st.sampled_from([None, 0, C - 1, -1, 255]))
        if ii is not None:
            kw["ignore_index"] = ii
    reductions = ["mean", "sum"] if name == "DiceCELoss" else ["mean", "sum", "none"]
    kw["reduction"] = draw(st.sampled_from(reductions))
    if name == "TverskyLoss":
        kw["alpha"], kw["beta"] = draw(st.sampled_from([(0.5, 0.5), (0.3, 0.7), (1.0, 0.0)]))
    if name == "GeneralizedDiceLoss":
        kw["w_type"] = draw(st.sampled_from(["square", "simple", "uniform"]))
    if name in ("DiceLoss", "FocalLoss", "DiceFocalLoss") and draw(st.booleans()):
        kw["weight"] = draw(st.sampled_from([0.5, [float(i + 1) for i in range(ncls)]])) if ncls > 1 else 0.5
    if name == "DiceCELoss":
        if draw(st.booleans()):
            kw["weight"] = torch.arange(1, C + 1, dtype=torch.float64)
        if C > 1:
            kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
        kw["lambda_dice"], kw["lambda_ce"] = draw(st.sampled_from([(1.0, 1.0), (0.3, 2.0)]))
    if name in ("FocalLoss", "DiceFocalLoss"):
        kw["gamma"] = draw(st.sampled_from([2.0, 0.0, 1.5]))
        use_softmax = name == "FocalLoss" and C > 1 and draw(st.booleans())
        if use_softmax:
            kw["use_softmax"] = True
        alphas = [None, 0.25] + ([[0.1 * (i + 1) for i in range(ncls)]] if name == "FocalLoss" else [])
        alpha = draw(st.sampled_from(alphas))
        if alpha is not None:
            kw["alpha"] = alpha
    return name, kw, B, C, spatial, target


def _make(name, kw, B, C, spatial, target, device, dtype, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((B, C) + spatial, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if target == "binary":
        t = torch.randint(0, 2, (B, 1) + spatial, generator=gen).double()
    else:
        t = _targets(target, B, C, spatial, gen, "cpu")
    ii = kw.get("ignore_index")
    if ii is not None and target == "labels":
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, torch.full_like(t, ii), t)
    if channels_last and len(spatial) == 2:
        x = x.to(memory_format=torch.channels_last)
    elif channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    return x.to(device), t.to(device)


def _compare(name, kw, B, C, spatial, target, backend, dtype, channels_last=False, seed=0):
    x, t = _make(name, kw, B, C, spatial, target, _device(backend), dtype, channels_last, seed)
    xm = x.detach().cpu().double().requires_grad_()
    xf = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = getattr(monai_losses, name)(**kw)(xm, t.cpu())
        with fastmed.use_backend(backend):
            got = getattr(FN, name)(**kw)(xf, t)
    assert got.shape == expected.shape, (name, kw)
    (gm,) = torch.autograd.grad(expected.sum(), xm)
    (gf,) = torch.autograd.grad(got.sum(), xf)
    assert gf.dtype == x.dtype and gf.shape == x.shape
    tol = TOL[dtype]
    if name == "FocalLoss" or (name == "DiceFocalLoss" and kw.get("reduction") == "none"):
        tol = TOL[torch.float32] if dtype == torch.float64 else tol  # MONAI's focal runs in float32
    torch.testing.assert_close(got.double().cpu(), expected.double(), **tol, msg=lambda m: f"{name} {kw}: {m}")
    torch.testing.assert_close(gf.double().cpu(), gm, **tol, msg=lambda m: f"{name} {kw} grad: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(), dtype=st.sampled_from([torch.float64, torch.float32]), channels_last=st.booleans())
def test_matches_monai(backend, case, dtype, channels_last):
    _compare(*case, backend=backend, dtype=dtype, channels_last=channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_logits(backend):
    # bf16 / fp16 logits: statistics in fp32, gradient in the logits dtype.
    for dtype in (torch.bfloat16, torch.float16):
        _compare("DiceCELoss", dict(softmax=True, to_onehot_y=True), 2, 3, (6, 9), "labels", backend, dtype)
        _compare("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True), 1, 3, (4, 4, 4), "labels", backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_act_and_label_dtypes(backend):
    device = _device(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 5, 6), generator=gen)
    expected = monai_losses.DiceCELoss(other_act=torch.tanh, to_onehot_y=True)(x, lab[:, None])
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32):
        with fastmed.use_backend(backend):
            got = FN.DiceCELoss(other_act=torch.tanh, to_onehot_y=True)(x.to(device), lab.to(device, dtype))
        torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------- nnU-Net

def _nnunet_dc_and_ce(x, y, batch_dice, do_bg, smooth, ignore_label):
    """nnU-Net v2 DC_and_CE_loss(MemoryEfficientSoftDiceLoss) written out from its source (REFERENCE.md section 2)."""
    if ignore_label is not None:
        mask = (y != ignore_label)
        y_dice = torch.where(mask, y, torch.zeros_like(y))
        num_fg = mask.sum()
        mask = mask.to(x.dtype)
    else:
        y_dice, mask, num_fg = y, None, None
    p = torch.softmax(x, 1)
    axes = tuple(range(2, x.ndim))
    with torch.no_grad():
        y_onehot = torch.zeros(x.shape, dtype=torch.bool).scatter_(1, y_dice.long(), 1)
        if not do_bg:
            y_onehot = y_onehot[:, 1:]
        sum_gt = y_onehot.sum(axes) if mask is None else (y_onehot * mask).sum(axes)
    if not do_bg:
        p = p[:, 1:]
    if mask is None:
        intersect, sum_pred = (p * y_onehot).sum(axes), p.sum(axes)
    else:
        intersect, sum_pred = (p * y_onehot * mask).sum(axes), (p * mask).sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)
    dc_loss = -dc.mean()
    ce_target = y[:, 0].long()
    if ignore_label is not None and num_fg == 0:
        ce = 0
    else:
        ce = torch.nn.functional.cross_entropy(x, ce_target, ignore_index=ignore_label if ignore_label is not None
                                               else -100)
    return ce + dc_loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_dice,do_bg,ignore_label", [(False, False, None), (True, False, None),
                                                           (True, True, 3), (False, False, 3)])
def test_nnunet_dice_ce(backend, batch_dice, do_bg, ignore_label):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4 if ignore_label else 3, (2, 1, 4, 5, 6), generator=gen)
    xm, xf = x.clone().requires_grad_(), x.clone().to(_device(backend)).requires_grad_()
    expected = _nnunet_dc_and_ce(xm, y, batch_dice, do_bg, 1e-5, ignore_label)
    with fastmed.use_backend(backend):
        got = FN.NNUNetDiceCELoss(batch_dice=batch_dice, do_bg=do_bg, ignore_label=ignore_label)(xf, y.to(xf.device))
    (gm,), (gf,) = torch.autograd.grad(expected, xm), torch.autograd.grad(got, xf)
    torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float64])
    torch.testing.assert_close(gf.cpu(), gm, **TOL[torch.float64])


def test_nnunet_all_ignored_ce_is_zero():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.full((1, 1, 4, 4), 7)
    loss = FN.NNUNetDiceCELoss(ignore_label=7)(x, y)
    expected = _nnunet_dc_and_ce(x, y, False, False, 1e-5, 7)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()


def test_deep_supervision():
    gen = torch.Generator().manual_seed(3)
    assert ops.deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert ops.deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    outs = [torch.randn(2, 3, *s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in [(8, 8), (4, 4), (2, 2)]]
    y = torch.randint(0, 3, (2, 1, 8, 8), generator=gen)
    base = FN.NNUNetDiceCELoss()
    got = FN.DeepSupervisionLoss(base)(outs, y)
    y4 = torch.nn.functional.interpolate(y.float(), size=(4, 4), mode="nearest-exact").long()
    assert torch.equal(y4, y[:, :, 1::2, 1::2])  # nearest-exact at stride 2 picks the odd voxels
    expected = 2 / 3 * _nnunet_dc_and_ce(outs[0], y, False, False, 1e-5, None) + \
        1 / 3 * _nnunet_dc_and_ce(outs[1], y4, False, False, 1e-5, None)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert outs[2].grad is None  # weight 0: not computed, like nnU-Net
    explicit = FN.DeepSupervisionLoss(base, weights=[0.5, 0.5, 0.0])(outs, [y, y4, y[:, :, ::4, ::4]])
    torch.testing.assert_close(explicit, 0.5 * base(outs[0], y) + 0.5 * base(outs[1], y4))


# ----------------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_volume_finite(backend):
    # 67600 voxels of class 1: a float16 sum overflows (max 65504); the fused statistics are fp32.
    x = torch.zeros(1, 2, 260, 260)
    x[:, 1] = 3.0
    x = x.half().to(_device(backend)).requires_grad_()
    y = torch.ones(1, 1, 260, 260, dtype=torch.int64, device=x.device)
    assert not torch.isfinite(torch.ones(260 * 260, dtype=torch.float16).sum())  # the class count alone overflows
    with fastmed.use_backend(backend):
        loss = ops.dice_loss(x, y, softmax=True, to_onehot_y=True, include_background=False)
    p1 = torch.softmax(torch.tensor([0.0, 3.0], dtype=torch.float64), 0)[1]
    n = 260 * 260
    expected = 1 - (2 * p1 * n + 1e-5) / (p1 * n + n + 1e-5)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double().cpu(), expected, atol=1e-5, rtol=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 7, 8, generator=gen).to(_device(backend))
    y = torch.randint(0, 4, (2, 1, 6, 7, 8), generator=gen).to(x.device)
    runs = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        with fastmed.use_backend(backend):
            loss = ops.dice_ce_loss(xr, y, softmax=True, to_onehot_y=True)
        loss.backward()
        runs.append((loss.detach(), xr.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    x[0, 1, 2, 2] = float("nan")
    y = torch.randint(0, 3, (1, 1, 4, 4))
    with fastmed.use_backend(backend):
        assert torch.isnan(ops.dice_ce_loss(x.to(_device(backend)), y.to(_device(backend)), softmax=True,
                                            to_onehot_y=True))


def test_inputs_not_modified():
    x = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 1, 4, 4))
    x0, y0 = x.clone(), y.clone()
    ops.dice_focal_loss(x, y, softmax=True, to_onehot_y=True)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_soft_target_requires_grad():
    # Gradients w.r.t. a soft target: the differentiable plain-PyTorch statistics (documented fallback).
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    t = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    tm = t.detach().clone().requires_grad_()
    ops.dice_loss(x, t, softmax=True).backward()
    monai_losses.DiceLoss(softmax=True)(x, tm).backward()
    torch.testing.assert_close(t.grad, tm.grad)


# ----------------------------------------------------------------------------------------------- errors

def test_errors():
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 1, 4, 4))
    with pytest.raises(ValueError, match="target.*labels in \\[0, 3\\)"):
        ops.dice_loss(x, torch.full_like(y, 3), softmax=True, to_onehot_y=True)
    with pytest.raises(ValueError, match="target.*labels"):
        ops.dice_loss(x, torch.full_like(y, -1), softmax=True, to_onehot_y=True)
    ops.dice_loss(x, torch.where(y == 0, -1, y), softmax=True, to_onehot_y=True, ignore_index=-1)
    with pytest.raises(ValueError, match="target.*not integers"):
        ops.dice_ce_loss(x, y.float() + 0.5, softmax=True, to_onehot_y=True)
    with pytest.raises(ValueError, match="target must have shape"):
        ops.dice_loss(x, torch.randint(0, 3, (2, 1, 4, 5)), to_onehot_y=True)
    with pytest.raises(ValueError, match="target must hold one label per voxel"):
        ops.dice_loss(x, torch.rand(2, 3, 4, 4), to_onehot_y=True)
    with pytest.raises(ValueError, match="target must have the 3 channels"):
        ops.dice_loss(x, y)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        ops.dice_loss(y, y)
    with pytest.raises(ValueError, match="reduction"):
        ops.dice_loss(x, y, to_onehot_y=True, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ops.dice_ce_loss(x, y, to_onehot_y=True, reduction="none")
    with pytest.raises(ValueError, match="Incompatible values"):
        FN.DiceLoss(sigmoid=True, softmax=True)
    with pytest.raises(TypeError, match="other_act"):
        FN.DiceLoss(other_act=3)
    with pytest.raises(ValueError, match="weight"):
        ops.dice_loss(x, y, to_onehot_y=True, weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        ops.focal_loss(x, y, to_onehot_y=True, alpha=[0.1, 0.2])
    with pytest.raises(ValueError, match="lambda_ce"):
        FN.DiceCELoss(lambda_ce=-1.0)
    with pytest.raises(ValueError, match="ddp_sync.*batch=True"):
        FN.DiceLoss(ddp_sync=True)
    with pytest.raises(ValueError, match="w_type"):
        ops.generalized_dice_loss(x, y, to_onehot_y=True, w_type="cubic")


def test_single_channel_warnings_match_monai():
    x = torch.randn(2, 1, 4, 4)
    t = torch.randint(0, 2, (2, 1, 4, 4)).float()
    for kw in (dict(softmax=True), dict(to_onehot_y=True), dict(include_background=False)):
        with pytest.warns(UserWarning) as ours:
            got = FN.DiceLoss(**kw)(x, t)
        with pytest.warns(UserWarning) as theirs:
            expected = monai_losses.DiceLoss(**kw)(x, t)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------------------------- torch.library / compile

def test_opcheck_reference():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5))
    args = (x, y, None, ref.ACT_SOFTMAX, True, True, 2, ref.POW_LINEAR, ref.CE_SOFTMAX_SMOOTH, ref.FOCAL_OFF, 0,
            2.0, ref.FPOS_OFF, "reference")
    torch.library.opcheck(torch.ops.fastmed.loss_stats.default, args)
    t = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    m = (torch.rand(2, 1, 4, 5) > 0.3).double()
    args = (x, t, m, ref.ACT_SIGMOID, False, False, 0, ref.POW_ABS, ref.CE_OFF, ref.FOCAL_SIGMOID, 0, 2.0,
            ref.FPOS_LINEAR, "reference")
    torch.library.opcheck(torch.ops.fastmed.loss_stats.default, args)


def test_gradcheck_reference_stats():
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 3, 4))

    def f(x):
        return torch.ops.fastmed.loss_stats(x, y, None, ref.ACT_SOFTMAX, True, False, 0, ref.POW_SQUARE,
                                            ref.CE_SOFTMAX_SMOOTH, ref.FOCAL_SOFTMAX, 1, 1.5, ref.FPOS_OFF,
                                            "reference")[:, :8]

    torch.autograd.gradcheck(f, (x,))


def test_compile_fullgraph_reference():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5))
    loss_fn = FN.DiceCELoss(softmax=True, to_onehot_y=True)
    with fastmed.use_backend("reference"):
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = compiled(x, y)
        expected = loss_fn(x, y)
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got, x)
    (g2,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((2, 14, 128, 128, 128), torch.bfloat16),
                                         ((2, 14, 128, 128, 128), torch.float32),
                                         ((24, 9, 224, 224), torch.bfloat16)])
@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss", "DiceFocalLoss"])
def test_gpu_benchmark_shapes(shape, dtype, name):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], device="cuda", generator=gen)
    kw = dict(softmax=True, to_onehot_y=True)
    xr = x.detach().float().requires_grad_()
    expected = getattr(monai_losses, name)(**kw)(xr, y)
    got = getattr(FN, name)(**kw)(x, y)
    (gr,) = torch.autograd.grad(expected, xr)
    (g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.float(), gr, **TOL[dtype])
