"""BoundaryLoss, HausdorffDTLoss and LogHausdorffDTLoss as drop-ins for MONAI 1.6's: constructors (order and
defaults), activations (other_act), single-channel warnings, reductions and shapes, values and gradients."""
import inspect
import warnings

import monai.losses as ml
import pytest
import torch

import fastmed
import fastmed.nn as fn

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.ext)]
LOSSES = ["BoundaryLoss", "HausdorffDTLoss", "LogHausdorffDTLoss"]


def _data(shape, C, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, C) + shape, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, C, (2, 1) + shape, generator=g)
    lab[0, 0, 0] = 0  # item 0 has some background
    lab[1] = C - 1   # item 1: one class covers the map (no boundary), the others are absent
    onehot = torch.nn.functional.one_hot(lab[:, 0], C).movedim(-1, 1).double()
    return x, lab, onehot


def _compare(name, kw, x, target, backend="reference"):
    """Same value, shape, gradient and warnings as MONAI."""
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        want = getattr(ml, name)(**kw)(x, target)
    with warnings.catch_warnings(record=True) as ours, fastmed.use_backend(backend):
        warnings.simplefilter("always")
        got = getattr(fn, name)(**kw)(x, target)
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want)
    g_want = torch.autograd.grad(want.sum(), x)[0]
    g_got = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(g_got, g_want)
    key = lambda ws: sorted(str(w.message) for w in ws if "single channel" in str(w.message))  # noqa: E731
    assert key(ours) == key(theirs)


@pytest.mark.parametrize("name", LOSSES)
def test_constructor_matches_monai(name):
    ours = inspect.signature(getattr(fn, name)).parameters
    theirs = inspect.signature(getattr(ml, name)).parameters
    positional = [k for k, p in ours.items() if p.kind != p.KEYWORD_ONLY]
    assert positional == list(theirs)
    for k in theirs:
        want = theirs[k].default
        assert ours[k].default == getattr(want, "value", want), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 9), (4, 5, 6)])
@pytest.mark.parametrize("kw", [dict(), dict(softmax=True, to_onehot_y=True),
                                dict(include_background=False, softmax=True, to_onehot_y=True),
                                dict(sigmoid=True, reduction="sum"),
                                dict(softmax=True, to_onehot_y=True, reduction="none"),
                                dict(other_act=torch.tanh, reduction="none", batch=True),
                                dict(softmax=True, to_onehot_y=True, reduction="sum", batch=True)])
def test_boundary_loss_matches_monai(backend, shape, kw):
    x, lab, onehot = _data(shape, 3, seed=len(shape))
    target = lab if kw.get("to_onehot_y") else onehot
    _compare("BoundaryLoss", kw, x, target, backend)
    if kw.get("to_onehot_y"):  # (N, *spatial) labels: MONAI's BoundaryLoss adds the channel dim
        _compare("BoundaryLoss", kw, x, lab[:, 0], backend)


def test_boundary_loss_sum_and_none_were_per_voxel():
    """Regression: reduction "sum" summed the per-voxel products (571104 vs MONAI's 17.43 on this size) and "none"
    returned them, (N, C, *spatial) instead of MONAI's (N, C)."""
    x, lab, _ = _data((32, 32, 32), 2, seed=3)
    for reduction, shape in (("sum", ()), ("none", (2, 2))):
        kw = dict(softmax=True, to_onehot_y=True, reduction=reduction)
        got = fn.BoundaryLoss(**kw)(x, lab)
        assert got.shape == shape
        torch.testing.assert_close(got, ml.BoundaryLoss(**kw)(x, lab))


def test_boundary_loss_soft_onehot_is_thresholded_as_monai():
    """A soft one-hot target (label smoothing) is thresholded at 0.5, as MONAI does."""
    x, _, onehot = _data((6, 7), 3, seed=5)
    soft = onehot * 0.8 + 0.1
    _compare("BoundaryLoss", dict(softmax=True), x, soft)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("kw", [dict(softmax=True), dict(to_onehot_y=True, sigmoid=True),
                                dict(include_background=False, sigmoid=True),
                                dict(include_background=True, softmax=True, to_onehot_y=True)])
def test_single_channel_warnings_match_monai(name, kw):
    """One channel: softmax / to_onehot_y / include_background=False are ignored with MONAI's warnings."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 1, 6, 7, generator=g) > 0.5).double()
    kw = dict(kw)
    if name == "BoundaryLoss":
        kw.setdefault("include_background", True)
    _compare(name, kw, x, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["HausdorffDTLoss", "LogHausdorffDTLoss"])
@pytest.mark.parametrize("kw", [dict(), dict(other_act=torch.sigmoid), dict(other_act=lambda t: t.softmax(1),
                                                                             include_background=True),
                                dict(softmax=True, to_onehot_y=True, reduction="none", alpha=1.5),
                                dict(sigmoid=True, batch=True, reduction="sum")])
def test_hausdorff_losses_match_monai(backend, name, kw):
    x, lab, onehot = _data((7, 8), 3, seed=7)
    probs = x if kw.get("other_act") or kw.get("softmax") or kw.get("sigmoid") else torch.sigmoid(x)
    _compare(name, kw, probs, lab if kw.get("to_onehot_y") else onehot, backend)


@pytest.mark.parametrize("name", LOSSES)
def test_activation_errors_match_monai(name):
    for kw, exc in ((dict(sigmoid=True, softmax=True), ValueError), (dict(softmax=True, other_act=torch.tanh),
                                                                     ValueError),
                    (dict(other_act="tanh"), TypeError)):
        with pytest.raises(exc):
            getattr(ml, name)(**kw)
        with pytest.raises(exc, match="other_act|sigmoid=True, softmax=True"):
            getattr(fn, name)(**kw)


def test_shape_errors_name_the_argument():
    """MONAI raises AssertionError on a shape mismatch; fastmed raises ValueError naming target (#13 §9)."""
    x = torch.randn(2, 3, 5, 6)
    with pytest.raises(ValueError, match=r"target must have the shape of input .*class labels need to_onehot_y"):
        fn.BoundaryLoss()(x, torch.zeros(2, 1, 5, 6))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 1, 5, 6\)"):
        fn.HausdorffDTLoss(to_onehot_y=True)(x, torch.zeros(2, 3, 5, 6))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_boundary_loss_nan_target_gives_nan(reduction):
    """The target enters only through the maps, where a threshold would turn NaN into background silently: a NaN
    in the target makes the loss NaN (NaN in, NaN out; checked without a host sync)."""
    x, _, onehot = _data((5, 6), 3, seed=9)
    clean = fn.BoundaryLoss(reduction=reduction)(x, onehot)
    assert clean.isfinite().all()
    onehot[0, 1, 2, 2] = float("nan")
    assert fn.BoundaryLoss(reduction=reduction)(x, onehot).isnan().all()
