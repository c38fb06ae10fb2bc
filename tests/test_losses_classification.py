"""Classification-shaped inputs: ``(B, C)`` logits with ``(B, 1)`` labels or ``(B, C)`` one-hot targets, wherever
MONAI 1.6 accepts them (issue 13 item 2): values, shapes and gradients against MONAI, on every backend."""
import warnings

import pytest
import torch
from conftest import triton_device

import fastmed
import fastmed.nn as FN

monai_losses = pytest.importorskip("monai.losses")

CASES = [
    ("DiceLoss", dict(softmax=True, to_onehot_y=True)),
    ("DiceLoss", dict(sigmoid=True)),
    ("DiceLoss", dict(softmax=True, batch=True, to_onehot_y=True, squared_pred=True)),
    ("DiceLoss", dict(softmax=True, reduction="none", to_onehot_y=True)),
    ("DiceLoss", dict(softmax=True, include_background=False, to_onehot_y=True, jaccard=True)),
    ("TverskyLoss", dict(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)),
    ("TverskyLoss", dict(sigmoid=True, reduction="none")),
    ("FocalLoss", dict(to_onehot_y=True)),
    ("FocalLoss", dict(to_onehot_y=True, gamma=0.0, weight=1.0)),
    ("FocalLoss", dict(use_softmax=True, to_onehot_y=True, alpha=0.25)),
    ("FocalLoss", dict(reduction="sum", alpha=0.75)),
    ("FocalLoss", dict(reduction="none")),
    ("DiceCELoss", dict(softmax=True, to_onehot_y=True)),
    ("DiceCELoss", dict(sigmoid=True, lambda_ce=0.5)),
    ("DiceFocalLoss", dict(softmax=True, to_onehot_y=True)),
    ("DiceFocalLoss", dict(sigmoid=True, reduction="none")),
    ("DiceFocalLoss", dict(sigmoid=True, reduction="sum", gamma=1.5)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_classification_shapes_match_monai(name, kwargs, backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 1), generator=gen)
    target = labels if kwargs.get("to_onehot_y") else torch.nn.functional.one_hot(labels[:, 0], 4).double()
    xm = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = getattr(monai_losses, name)(**kwargs)(xm, target)
    device = "cpu" if backend == "reference" else triton_device()
    xf = x.to(device).requires_grad_()
    with fastmed.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = getattr(FN, name)(**kwargs)(xf, target.to(device))
    assert got.shape == want.shape
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=1e-6)
    (gw,) = torch.autograd.grad(want.sum(), xm)
    (gf,) = torch.autograd.grad(got.sum(), xf)
    torch.testing.assert_close(gf.cpu().double(), gw.double(), rtol=1e-5, atol=1e-6)


def test_focal_gamma0_is_bce_for_classification():
    """MONAI's own classification check: with gamma=0 the sigmoid focal loss of (B, C) logits and (B, 1) labels is
    BCE-with-logits against the one-hot target."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 10, generator=gen)
    labels = torch.randint(0, 10, (16, 1), generator=gen)
    got = FN.FocalLoss(to_onehot_y=True, gamma=0.0, reduction="mean", weight=1.0)(x, labels)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        x, torch.nn.functional.one_hot(labels[:, 0], 10).float())
    torch.testing.assert_close(got, want)


def test_generalized_dice_needs_a_spatial_axis():
    """MONAI's GeneralizedDiceLoss fails on (B, C) logits (an IndexError inside); fastmed says what it needs."""
    with pytest.raises(ValueError, match="input must have 3"):
        FN.GeneralizedDiceLoss(softmax=True, to_onehot_y=True)(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))
