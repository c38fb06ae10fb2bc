"""Fused segmentation losses: equivalence with MONAI 1.6 and nnU-Net, numerics, determinism, errors."""
import contextlib
import warnings

import pytest
import torch
from conftest import TOL, triton_device
from hypothesis import given
from hypothesis import strategies as st

import fastmed
import fastmed.nn as FN
from fastmed import ops
from fastmed.reference.loss_spec import COUNT, StatsSpec

monai_losses = pytest.importorskip("monai.losses")

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.ext), "triton"]  # cpp: csrc/losses_cpu.cpp


def _device(backend):
    return triton_device() if backend == "triton" else "cpu"


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
    if name in ("FocalLoss", "DiceFocalLoss"):
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


# -inf logits mask classes.  Oracle: MONAI with each -inf replaced by -1e30, where every product with a zero
# weight is an exact 0 (MONAI's own composition gives NaN from 0 * -inf on most of these paths).
NEG_INF_CASES = [
    ("DiceCELoss", dict(softmax=True, to_onehot_y=True), "labels"),
    ("DiceCELoss", dict(softmax=True), "onehot"),
    ("DiceCELoss", dict(sigmoid=True, to_onehot_y=True, weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)),
     "labels"),
    ("FocalLoss", dict(to_onehot_y=True, alpha=0.25), "labels"),
    ("FocalLoss", dict(alpha=[0.1, 0.2, 0.3, 0.4], gamma=0.0, ignore_index=0), "onehot"),
    ("FocalLoss", dict(use_softmax=True, to_onehot_y=True, include_background=False), "labels"),
    ("FocalLoss", dict(use_softmax=True, to_onehot_y=True, reduction="none"), "labels"),
    ("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True), "labels"),
    ("DiceFocalLoss", dict(softmax=True, to_onehot_y=True, reduction="none"), "labels"),
    ("DiceLoss", dict(softmax=True, to_onehot_y=True, ignore_index=2), "labels"),
    ("TverskyLoss", dict(sigmoid=True), "onehot"),
]


def _neg_inf_inputs(seed=5):
    """Logits (2, 4, 5, 6) with about 30% of the classes no voxel's target holds set to -inf, labels, one-hot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    lab = torch.randint(0, 4, (2, 1, 5, 6), generator=gen)
    onehot = torch.nn.functional.one_hot(lab[:, 0], 4).movedim(-1, 1).double()
    masked = (torch.rand(x.shape, generator=gen) < 0.3) & (onehot == 0)
    return x.masked_fill(masked, float("-inf")), lab, onehot


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw,target", NEG_INF_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(NEG_INF_CASES)])
def test_neg_inf_logits_mask_classes(backend, name, kw, target):
    x, lab, onehot = _neg_inf_inputs()
    t = lab if target == "labels" else onehot
    xf = x.clone().to(_device(backend)).requires_grad_()
    xm = x.masked_fill(torch.isinf(x), -1e30).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastmed.use_backend(backend):
            got = getattr(FN, name)(**kw)(xf, t.to(xf.device))
        expected = getattr(monai_losses, name)(**kw)(xm, t)
    (gf,) = torch.autograd.grad(got.sum(), xf)
    (gm,) = torch.autograd.grad(expected.sum(), xm)
    assert torch.isfinite(got).all() and torch.isfinite(gf).all()
    tol = TOL[torch.float32] if "Focal" in name else TOL[torch.float64]  # MONAI's focal term runs in float32
    torch.testing.assert_close(got.double().cpu(), expected.double(), **tol)
    torch.testing.assert_close(gf.cpu(), gm, **tol)
    assert (gf[torch.isinf(x)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_cross_entropy(backend):
    # F.cross_entropy with class indices handles -inf on the other classes (the issue: 1.408 where fastmed gave
    # NaN); with label smoothing the -inf classes enter every voxel's loss: +inf, as in torch.
    x, lab, _ = _neg_inf_inputs(seed=6)
    device = _device(backend)
    for smoothing in (0.0, 0.1):
        xf, xt = x.clone().to(device).requires_grad_(), x.clone().requires_grad_()
        with fastmed.use_backend(backend):
            got = ops.dice_ce_loss(xf, lab.to(device), softmax=True, to_onehot_y=True, lambda_dice=0.0,
                                   label_smoothing=smoothing)
        expected = torch.nn.functional.cross_entropy(xt, lab[:, 0], label_smoothing=smoothing)
        torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float64])
        if smoothing == 0.0:
            (gf,), (gt,) = torch.autograd.grad(got, xf), torch.autograd.grad(expected, xt)
            torch.testing.assert_close(gf.cpu(), gt, **TOL[torch.float64])
    # nnU-Net DC+CE, written out from its source with F.cross_entropy, -inf on ignored voxels too
    y = torch.where(torch.rand(lab.shape, generator=torch.Generator().manual_seed(7)) < 0.2, 4, lab)
    ignored = (y == 4).expand_as(x) & (torch.rand(x.shape, generator=torch.Generator().manual_seed(8)) < 0.5)
    ignored[:, 0] = False  # a voxel with every logit -inf has no softmax: NaN, as in torch
    x = x.masked_fill(ignored, float("-inf"))
    xm, xf = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    expected = _nnunet_dc_and_ce(xm, y, False, False, 1e-5, 4)
    with fastmed.use_backend(backend):
        got = FN.NNUNetDiceCELoss(ignore_label=4)(xf, y.to(device))
    assert torch.isfinite(got)
    torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float64])
    (gf,), (gm,) = torch.autograd.grad(got, xf), torch.autograd.grad(expected, xm)
    torch.testing.assert_close(gf.cpu(), torch.nan_to_num(gm), **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_logits_bce_and_softmax_focal_limits(backend):
    # BCE with logits at z = -inf / +inf agreeing with the target is 0 (torch's composition gives NaN); the softmax
    # focal term with gamma < 1 has a finite gradient where a voxel's other classes are all -inf (q = 1).
    device = _device(backend)
    x = torch.tensor([[[[-float("inf"), float("inf"), 0.5, -2.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]]], dtype=torch.float64)
    xf = x.clone().to(device).requires_grad_()
    with fastmed.use_backend(backend):
        got = ops.dice_ce_loss(xf, t.to(device), sigmoid=True, lambda_dice=0.0)
    finite = torch.nn.functional.binary_cross_entropy_with_logits(x[..., 2:], t[..., 2:], reduction="sum") / 4
    torch.testing.assert_close(got.cpu(), finite, **TOL[torch.float64])
    (g,) = torch.autograd.grad(got, xf)
    assert torch.equal(g[..., :2].cpu(), torch.zeros(1, 1, 1, 2, dtype=torch.float64))
    z = torch.tensor([[[[0.3, 1.0]], [[-float("inf"), 0.2]], [[-float("inf"), -1.0]]]], dtype=torch.float64)
    lab = torch.tensor([[[[0, 1]]]])
    zf = z.clone().to(device).requires_grad_()
    with fastmed.use_backend(backend):
        loss = ops.focal_loss(zf, lab.to(device), to_onehot_y=True, use_softmax=True, gamma=0.5)
    (g,) = torch.autograd.grad(loss, zf)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw,target", [
    ("DiceCELoss", dict(sigmoid=True), "binary"),
    ("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True), "labels"),
    ("FocalLoss", dict(use_softmax=True, to_onehot_y=True), "labels"),
    ("FocalLoss", dict(ignore_index=0), "onehot"),
    ("NNUNetDiceCELoss", dict(ignore_label=0), "labels"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_nan_propagates_every_path(backend, name, kw, target):
    # One NaN logit, on voxel (0, 0): a voxel that the ignore mask drops where there is one. NaN in, NaN out.
    gen = torch.Generator().manual_seed(8)
    C = 1 if target == "binary" else 3
    x = torch.randn(1, C, 4, 4, generator=gen, dtype=torch.float64)
    x[0, C - 1, 0, 0] = float("nan")
    if target == "binary":
        t = torch.randint(0, 2, (1, 1, 4, 4), generator=gen).double()
    else:
        t = torch.randint(0, C, (1, 1, 4, 4), generator=gen)
        t[0, 0, 0, 0] = 0
        if target == "onehot":
            t = torch.nn.functional.one_hot(t[:, 0], C).movedim(-1, 1).double()
    with fastmed.use_backend(backend):
        loss = getattr(FN, name)(**kw)(x.to(_device(backend)), t.to(_device(backend)))
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_labels_checked_in_their_precision(backend):
    # 1 + 1e-9 is not an integer in float64; the Triton kernel used to round it to 1.0 in float32 and accept it.
    device = _device(backend)
    x = torch.randn(1, 3, 4, 4).to(device)
    for logits_dtype in (torch.float32, torch.float64):
        y = torch.ones(1, 1, 4, 4, dtype=torch.float64)
        with fastmed.use_backend(backend):
            ops.dice_ce_loss(x.to(logits_dtype), y.to(device), softmax=True, to_onehot_y=True)  # integral: fine
            y[0, 0, 1, 2] = 1 + 1e-9
            with pytest.raises(ValueError, match="target.*1 voxels hold other values"):
                ops.dice_ce_loss(x.to(logits_dtype), y.to(device), softmax=True, to_onehot_y=True)
    y = torch.ones(1, 1, 4, 4, dtype=torch.float16)
    y[0, 0, 0, 0] = 2.5
    with fastmed.use_backend(backend), pytest.raises(ValueError, match="target.*not integers"):
        ops.nnunet_dice_ce_loss(x, y.to(device))


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


# ----------------------------------------------------------------------------------------------- double backward

def _tiny(seed=9, C=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, 3, 4, generator=gen, dtype=torch.float64)
    lab = torch.randint(0, C, (1, 1, 3, 4), generator=gen)
    return x, lab, gen


DOUBLE_BACKWARD_CASES = {
    "dice_ce": lambda x, y, t: ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True, label_smoothing=0.1),
    "dice_focal": lambda x, y, t: ops.dice_focal_loss(x, y, sigmoid=True, to_onehot_y=True, alpha=0.25,
                                                      squared_pred=True),
    "nnunet": lambda x, y, t: ops.nnunet_dice_ce_loss(x, y, batch_dice=True, ignore_label=2),
    "dice_soft": lambda x, y, t: ops.dice_loss(x, t, sigmoid=True, soft_label=True, ignore_index=0),
    "tversky": lambda x, y, t: ops.tversky_loss(x, y, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD_CASES))
def test_double_backward(backend, name):
    # create_graph=True (a gradient penalty): second-order terms must be there on every backend (the Triton
    # backward used to return a gradient without a graph, so they silently vanished).
    x, lab, gen = _tiny()
    t = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    device = _device(backend)
    x, lab, t = x.to(device).requires_grad_(), lab.to(device), t.to(device)
    fn = DOUBLE_BACKWARD_CASES[name]
    with fastmed.use_backend(backend):
        torch.autograd.gradgradcheck(lambda x: fn(x, lab, t), (x,), fast_mode=True)
        (g_graph,) = torch.autograd.grad(fn(x, lab, t), x, create_graph=True)
        (g_fused,) = torch.autograd.grad(fn(x, lab, t), x)
    torch.testing.assert_close(g_graph.detach(), g_fused, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_focal(backend):
    # FocalLoss returns float32 (MONAI's rule), too coarse for gradgradcheck: the gradient penalty's gradient is
    # checked against MONAI's own composition instead, for the sigmoid (per-class alpha) and softmax terms.
    x, lab, _ = _tiny(seed=10)
    for kw in (dict(alpha=[0.2, 0.5, 0.7], ignore_index=1), dict(use_softmax=True, include_background=False,
                                                                 gamma=1.5)):
        xf = x.clone().to(_device(backend)).requires_grad_()
        xm = x.clone().requires_grad_()
        with fastmed.use_backend(backend):
            loss = FN.FocalLoss(to_onehot_y=True, **kw)(xf, lab.to(xf.device))
        expected = monai_losses.FocalLoss(to_onehot_y=True, **kw)(xm, lab)
        penalties = []
        for value, leaf in ((loss, xf), (expected, xm)):
            (g,) = torch.autograd.grad(value, leaf, create_graph=True)
            (gg,) = torch.autograd.grad(g.square().sum(), leaf)
            penalties.append(gg.double().cpu())
        assert penalties[0].abs().max() > 0
        torch.testing.assert_close(penalties[0], penalties[1], **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_stats_op(backend):
    # The op itself, in the modes no float64 loss reaches: softmax focal without background, hard focal split.
    x, lab, gen = _tiny(seed=11)
    m = (torch.rand(1, 1, 3, 4, generator=gen) > 0.3).double()
    t = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    device = _device(backend)
    x = x.to(device).requires_grad_()
    cases = [(lab, None, StatsSpec(act="softmax", pow_mode="square", focal_mode="softmax", focal_c0=1, gamma=0.5,
                                   label_mode=True, has_ignore=True, ignore_index=2)),
             (t, m, StatsSpec(act="sigmoid", pow_mode="abs", focal_mode="sigmoid", focal_pos="hard", gamma=2.0))]
    for target, mask, spec in cases:
        mask = None if mask is None else mask.to(device)
        target = target.to(device)

        def stats(x, target=target, mask=mask, spec=spec):
            return torch.ops.fastmed.loss_stats(*_op_args(x, target, mask, spec, backend))[:, :COUNT]

        torch.autograd.gradgradcheck(stats, (x,), fast_mode=True)


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


def test_argument_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 1, 4, 4))
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        ops.dice_loss(x, y, to_onehot_y=True, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_label must be an int or None"):
        ops.nnunet_dice_ce_loss(x, y, ignore_label="255")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.dice_ce_loss(x, y, to_onehot_y=True, label_smoothing=1.5)
    with pytest.raises(ValueError, match="lambda_dice"):
        ops.dice_focal_loss(x, y, to_onehot_y=True, lambda_dice=float("nan"))
    with pytest.raises(ValueError, match="weight values must be no less than 0"):
        ops.dice_loss(x, y, to_onehot_y=True, weight=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weight must be a number or have one value per class \\(2 classes"):
        ops.focal_loss(x, y, to_onehot_y=True, include_background=False, weight=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="weight must be a number"):
        ops.dice_loss(x, y, to_onehot_y=True, weight="heavy")
    with pytest.raises(ValueError, match="reduction"):
        FN.TverskyLoss(reduction="max")


def test_deep_supervision_errors():
    outs = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    y = torch.randint(0, 3, (1, 1, 4, 4))
    base = FN.NNUNetDiceCELoss()
    with pytest.raises(ValueError, match="weights\\[1\\] must be a finite real number in \\[0.0, inf\\]"):
        ops.deep_supervision_loss(base, outs, y, weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        FN.DeepSupervisionLoss(base, weights=[float("nan"), 1.0])
    with pytest.raises(TypeError, match="weights must be a sequence of numbers"):
        ops.deep_supervision_loss(base, outs, y, weights=0.5)
    for n in (2.5, True, "3"):
        with pytest.raises(TypeError, match="n \\(the number of deep-supervision outputs\\) must be an int"):
            ops.deep_supervision_weights(n)
    with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
        ops.deep_supervision_weights(0)
    weights = torch.tensor([0.75, 0.25])  # a tensor of weights is fine
    torch.testing.assert_close(ops.deep_supervision_loss(base, outs, y, weights=weights),
                               0.75 * base(outs[0], y) + 0.25 * base(outs[1], y[:, :, 1::2, 1::2]))


def test_stats_spec_modes_are_checked():
    x = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 1, 4, 4))
    from fastmed.kernels.losses import loss_stats_forward
    from fastmed.reference.losses import loss_stats

    for fn in (loss_stats, loss_stats_forward):
        with pytest.raises(ValueError, match="StatsSpec.act must be one of 'none', 'sigmoid', 'softmax'; got 'relu'"):
            fn(x, y, None, StatsSpec(act="relu", pow_mode="linear", label_mode=True))
        with pytest.raises(ValueError, match="StatsSpec.ce_mode"):
            fn(x, y, None, StatsSpec(ce_mode="softmax_smoothed", label_mode=True))


@pytest.mark.parametrize("name,kw,target", [
    ("dice_ce_loss", dict(softmax=True, to_onehot_y=True), "labels"),
    ("dice_loss", dict(sigmoid=True, reduction="none", ignore_index=1), "onehot"),
    ("focal_loss", dict(to_onehot_y=True, reduction="none"), "labels"),
    ("dice_focal_loss", dict(softmax=True, to_onehot_y=True), "labels"),
    ("nnunet_dice_ce_loss", dict(ignore_label=2, batch_dice=True), "labels"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_meta_tensors_infer_shapes(name, kw, target):
    # Meta tensors: the loss and its gradient get their shapes (the label check, which reads a count back from the
    # device, is skipped); forcing Triton says it cannot run on meta tensors.
    x = torch.empty(2, 3, 4, 5, device="meta", requires_grad=True)
    t = (torch.empty(2, 1, 4, 5, dtype=torch.int64, device="meta") if target == "labels"
         else torch.empty(2, 3, 4, 5, device="meta"))
    cpu = getattr(ops, name)(torch.zeros(2, 3, 4, 5), torch.zeros(t.shape, dtype=t.dtype), **kw)
    loss = getattr(ops, name)(x, t, **kw)
    assert loss.device.type == "meta" and loss.shape == cpu.shape and loss.dtype == cpu.dtype
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.device.type == "meta" and g.shape == x.shape
    if kw.get("reduction") == "none" and name == "focal_loss":
        return  # the per-voxel focal loss is the plain composition on every backend (nothing to fuse)
    with fastmed.use_backend("triton"), pytest.raises(fastmed.BackendUnavailableError, match="meta tensors"):
        getattr(ops, name)(x, t, **kw)


def test_every_launch_is_device_guarded(monkeypatch):
    # Triton launches go to the current CUDA device; each one must run inside device_guard(<its tensors>).
    kl = pytest.importorskip("fastmed.kernels.losses")
    guarded, launches = [], []

    @contextlib.contextmanager
    def guard(t):
        guarded.append(t.device)
        yield
        guarded.pop()

    real_wrap = kl.wrap_triton

    def wrap(kernel):
        def grid_of(grid):
            def launch(*args, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                assert guarded and all(t.device == guarded[-1] for t in tensors), kernel
                launches.append(kernel)
                return real_wrap(kernel)[grid](*args, **kwargs)
            return launch
        return type("Launcher", (), {"__getitem__": lambda self, grid: grid_of(grid)})()

    monkeypatch.setattr(kl, "device_guard", guard)
    monkeypatch.setattr(kl, "wrap_triton", wrap)
    x = torch.randn(1, 3, 4, 5, device=triton_device(), requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 4, 5), device=x.device)
    with fastmed.use_backend("triton"):
        ops.dice_focal_loss(x, y, softmax=True, to_onehot_y=True).backward()
    assert launches == [kl._loss_stats_fwd_kernel, kl._loss_finalize_kernel, kl._loss_stats_bwd_kernel]


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


# ---------------------------------------------------------------------------------------------- torch.library / compile

def _op_args(x, target, mask, spec, backend="reference"):
    """The flat arguments of torch.ops.fastmed.loss_stats: tensors, the StatsSpec fields, the backend."""
    return (x, target, mask, *spec, backend)


def test_opcheck_reference():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5))
    spec = StatsSpec(act="softmax", pow_mode="linear", ce_mode="softmax_smooth", gamma=2.0, label_mode=True,
                     has_ignore=True, ignore_index=2)
    torch.library.opcheck(torch.ops.fastmed.loss_stats.default, _op_args(x, y, None, spec))
    t = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    m = (torch.rand(2, 1, 4, 5) > 0.3).double()
    spec = StatsSpec(act="sigmoid", pow_mode="abs", focal_mode="sigmoid", gamma=2.0, focal_pos="linear")
    torch.library.opcheck(torch.ops.fastmed.loss_stats.default, _op_args(x, t, m, spec))


def test_gradcheck_reference_stats():
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 3, 4))
    spec = StatsSpec(act="softmax", pow_mode="square", ce_mode="softmax_smooth", focal_mode="softmax", focal_c0=1,
                     gamma=1.5, label_mode=True)

    def f(x):
        return torch.ops.fastmed.loss_stats(*_op_args(x, y, None, spec))[:, :COUNT]

    torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.ext)])
@pytest.mark.parametrize("loss", ["DiceCELoss", "DiceFocalLoss", "GeneralizedDiceLoss"])
def test_compile_fullgraph(backend, loss):
    """torch.compile traces the op bodies with fake tensors: the cpp bodies trace the reference then (C++ cannot read
    fake tensors; it raised before).  Same loss and gradient as eager."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 4, 5))
    loss_fn = getattr(FN, loss)(softmax=True, to_onehot_y=True)
    torch._dynamo.reset()  # the backend is a constant of a traced graph: trace again for this one
    with fastmed.use_backend(backend):
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


def test_kernels_compile_for_sm90():
    """The fused loss kernels compile for an H100 in the main option families (the interpreter is lenient)."""
    from sm90 import compile_for_sm90

    m = "fastmed.kernels.losses"
    base = dict(LABELS="integer", HAS_MASK=False, FOCAL_C0=0)
    families = [
        # softmax + integer labels + CE + Dice sums, ignore_index (DiceCE, nnU-Net)
        ("*bf16", "*i64", dict(ACTIVATION="softmax", HAS_IGNORE=True, POW_MODE="linear", CE_MODE="softmax",
                               FOCAL_MODE="off", FOCAL_POS_MODE="off", C_PAD=16, BLOCK=64)),
        # sigmoid + dense soft targets with an ignore mask + BCE + focal, squared predictions
        ("*fp16", "*fp16", dict(ACTIVATION="sigmoid", LABELS="dense", HAS_IGNORE=False, POW_MODE="square",
                                CE_MODE="bce", FOCAL_MODE="sigmoid", FOCAL_POS_MODE="linear", C_PAD=2, BLOCK=512,
                                HAS_MASK=True)),
        # softmax focal without background, label smoothing, uint8 labels, float32 logits
        ("*fp32", "*u8", dict(ACTIVATION="softmax", HAS_IGNORE=False, POW_MODE="linear", CE_MODE="softmax_smooth",
                              FOCAL_MODE="softmax", FOCAL_POS_MODE="hard", C_PAD=4, BLOCK=256, FOCAL_C0=1)),
        # float64 labels checked in float64, soft-label Dice sums, hard focal split
        ("*fp32", "*fp64", dict(ACTIVATION="none", LABELS="float64", HAS_IGNORE=True, POW_MODE="abs",
                                CE_MODE="off", FOCAL_MODE="sigmoid", FOCAL_POS_MODE="hard", C_PAD=8, BLOCK=128)),
    ]
    specs = []
    for zdt, tdt, flags in families:
        consts = {**base, **flags}
        ptrs = {"z_ptr": zdt, "t_ptr": tdt, "m_ptr": "*i1", "dz_ptr": zdt}
        warps = 4 if consts["C_PAD"] <= 16 else 8
        for kernel in ("_loss_stats_fwd_kernel", "_loss_stats_bwd_kernel"):
            specs.append(dict(module=m, kernel=kernel, ptr="*fp32", pointers=ptrs, floats=["gamma"],
                              constexprs=consts, num_warps=warps))
    compile_for_sm90(specs)


@pytest.mark.parametrize("C", [14, 105])
def test_no_spills_at_sm90(C):
    """The tiles the launchers pick on a GPU for the benchmark class counts (14: BTCV/TotalSegmentator-like, 105:
    TotalSegmentator) compile for an H100 without register spills, forward, backward and the finalize step, in the
    losses' main option families (issue 11 item 6)."""
    from sm90 import assert_no_spills, compile_for_sm90

    from fastmed.kernels import losses as kl

    m = "fastmed.kernels.losses"
    c_pad, block, warps = kl._tile(C, 128 ** 3, torch.device("cuda"))
    base = dict(LABELS="integer", HAS_MASK=False, FOCAL_C0=0, C_PAD=c_pad, BLOCK=block, FOCAL_POS_MODE="off")
    families = [
        # DiceCE / nnU-Net: softmax, integer labels, CE, Dice sums, ignore index
        dict(ACTIVATION="softmax", HAS_IGNORE=True, POW_MODE="linear", CE_MODE="softmax", FOCAL_MODE="off"),
        # DiceFocal: softmax Dice, sigmoid focal
        dict(ACTIVATION="softmax", HAS_IGNORE=False, POW_MODE="linear", CE_MODE="off", FOCAL_MODE="sigmoid"),
        # FocalLoss(use_softmax=True) without background, label smoothing CE
        dict(ACTIVATION="none", HAS_IGNORE=False, POW_MODE="off", CE_MODE="softmax_smooth", FOCAL_MODE="softmax",
             FOCAL_C0=1),
    ]
    specs = []
    for zdt in ("*bf16", "*fp32"):
        ptrs = {"z_ptr": zdt, "t_ptr": "*i64", "m_ptr": "*i1", "dz_ptr": zdt}
        for flags in families:
            for kernel in ("_loss_stats_fwd_kernel", "_loss_stats_bwd_kernel"):
                specs.append(dict(module=m, kernel=kernel, ptr="*fp32", pointers=ptrs, floats=["gamma"],
                                  constexprs={**base, **flags}, num_warps=warps))
    fin = dict(REGION="dice", REGION_C0=1, POW_MODE="linear", BATCH=False, W_TYPE="square", REGION_REDUCTION="mean",
               CE="labels", CE_REDUCTION="mean", SMOOTHING=False, FOCAL_TERM="off", FOCAL_C0=0, ALPHA_MODE="off",
               FOCAL_REDUCTION="mean", FOCAL_MASKED=False, HAS_RW=False, HAS_CEW=True, HAS_FW=False, B_PAD=2,
               C_PAD=c_pad)
    floats = ["smooth_nr", "smooth_dr", "a_n", "a_t", "a_fp", "a_fn", "region_scale", "label_smoothing", "ce_scale",
              "alpha", "focal_scale"]
    for variant in (dict(), dict(REGION="generalized", CE="off", FOCAL_TERM="sigmoid", ALPHA_MODE="scalar"),
                    dict(REGION="nnunet", CE="nnunet", BATCH=True, HAS_CEW=False)):
        specs.append(dict(module=m, kernel="_loss_finalize_kernel", ptr="*fp32", floats=floats,
                          constexprs={**fin, **variant}, num_warps=4))
    reports = compile_for_sm90(specs)
    assert_no_spills(reports)
    assert max(r["registers"] for r in reports) <= 128, reports  # at least 2 programs of 8 warps per SM
