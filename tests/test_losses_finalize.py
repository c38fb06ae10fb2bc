"""The loss formula on the statistics (``fastmed::loss_finalize``): value against the plain torch formula
(``loss_from_stats``), ``jac = d loss / d stats`` against autograd, on every backend that has a body (``cpp``:
csrc/losses_cpu_finalize.cpp)."""
import itertools

import pytest
import torch
from conftest import triton_device

from fastmed.ops import losses as L
from fastmed.reference import losses as ref
from fastmed.reference.loss_spec import BAD, COUNT, GROUND, NLL, NON_LOGIT_SLOTS, NUM_SLOTS, LossSpec

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.ext), "triton"]


def _stats(B, C, seed, dtype=torch.float64, empty_class=False):
    """Plausible statistics: positive sums, a voxel count per sample, no bad label."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(B, NUM_SLOTS, C, generator=gen, dtype=torch.float64) * 10 + 0.1
    s[:, COUNT] = 50.0
    s[:, BAD] = 0.0
    if empty_class:
        s[0, GROUND, -1] = 0.0  # a class absent from sample 0 (generalized Dice: infinite weight)
    return s.to(dtype)


def _specs():
    """(LossSpec, has region weight, has ce weight, focal alpha / weight) over the formula's options."""
    out = []
    for region, pow_mode, batch, red, c0 in itertools.product(
            ["dice", "jaccard", "tversky", "generalized"], ["linear", "square", "abs"], [False, True],
            ["mean", "sum", "none"], [0, 1]):
        spec = LossSpec(64, region, c0, pow_mode, batch, 1e-5, 0.5, 0.3, 0.7, "square", red)
        out.append((spec, region in ("dice", "jaccard") and red != "none", False, None))
    out.append((LossSpec(64, "generalized", 0, "linear", False, w_type="simple"), False, False, None))
    out.append((LossSpec(64, "generalized", 0, "linear", True, w_type="uniform"), False, False, None))
    for batch in (False, True):
        out.append((LossSpec(64, "nnunet", 1, "linear", batch, 1e-5, 1e-5, region_scale=0.7, ce="nnunet",
                             ce_scale=1.3), False, False, None))
    for ce, red, eps, w in itertools.product(["labels", "dense"], ["mean", "sum"], [0.0, 0.1], [False, True]):
        out.append((LossSpec(64, "dice", 1, "linear", False, region_reduction=red, region_scale=0.5, ce=ce,
                             ce_reduction=red, label_smoothing=eps, ce_scale=2.0), w, w, None))
    for red, w in itertools.product(["mean", "sum"], [False, True]):
        out.append((LossSpec(64, "dice", 0, "linear", False, region_reduction=red, ce="bce", ce_reduction=red),
                    False, w, None))
    for focal, alpha_mode, red, masked, c0 in itertools.product(
            ["sigmoid", "softmax"], ["off", "scalar", "per_class"], ["mean", "sum"], [False, True], [0, 1]):
        spec = LossSpec(64, focal=focal, focal_c0=c0, alpha_mode=alpha_mode, alpha=0.25, focal_reduction=red,
                        focal_masked=masked, focal_scale=1.5)
        out.append((spec, False, False, "both" if alpha_mode == "per_class" else "weight"))
    out.append((LossSpec(64, "dice", 1, "square", True, region_scale=0.5, focal="sigmoid", focal_c0=1,
                         alpha_mode="scalar", alpha=0.25, focal_scale=2.0), False, False, None))
    return out


SPECS = _specs()


def _weights(spec, C, region_w, ce_w, focal, dtype, device):
    gen = torch.Generator().manual_seed(7)

    def rand(n):
        return (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)

    kept_r, kept_f = C - spec.region_c0, C - spec.focal_c0
    region = rand(kept_r) if region_w else None
    ce = (rand(1) if spec.ce == "bce" else rand(C)) if ce_w else None
    alpha = rand(kept_f) if focal == "both" else None
    fw = rand(kept_f) if focal in ("both", "weight") else None
    return L._Weights(region, ce, alpha, fw)


#: float64 statistics: the reference is exact to rounding; the Triton kernel takes the hyper-parameters (smoothing,
#: scales, alpha) as float32 numbers, which moves the result at float32's relative precision
F64_TOL = {"reference": dict(rtol=1e-10, atol=1e-12), "cpp": dict(rtol=1e-10, atol=1e-12),
           "triton": dict(rtol=1e-6, atol=1e-9)}


def _device(backend):
    return "cpu" if backend in ("reference", "cpp") else triton_device()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(SPECS)))
def test_finalize_value_and_jacobian(backend, case):
    spec, region_w, ce_w, focal = SPECS[case]
    B, C = 2, 1 if spec.ce == "bce" else 3
    device = _device(backend)
    stats = _stats(B, C, case, empty_class=spec.region == "generalized").to(device)
    weights = _weights(spec, C, region_w, ce_w, focal, stats.dtype, device)
    loss, jac, valid = L._FINALIZE[backend](stats, *weights, spec)
    s = stats.detach().cpu().clone().requires_grad_()
    want = ref.loss_from_stats(s, *(None if w is None else w.cpu() for w in weights), spec)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss.cpu(), want.detach(), **F64_TOL[backend])
    gout = torch.linspace(0.5, 1.5, want.numel(), dtype=want.dtype).reshape(want.shape)
    (g,) = torch.autograd.grad(want, s, gout)
    got = jac.cpu() * ref.finalize_output_grad(gout, spec, B, C)
    keep = [k for k in range(NUM_SLOTS) if k not in NON_LOGIT_SLOTS]  # GROUND/COUNT/BAD: jac is 0 by contract
    torch.testing.assert_close(got[:, keep], g[:, keep], **F64_TOL[backend])
    assert torch.count_nonzero(jac[:, list(NON_LOGIT_SLOTS)]) == 0
    assert valid.item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_flags_bad_labels(backend):
    stats = _stats(2, 3, 0).to(_device(backend))
    stats[1, BAD, 0] = 3.0
    _, _, valid = L._FINALIZE[backend](stats, None, None, None, None, LossSpec(8, "dice"))
    assert valid.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_float32(backend):
    """float32 statistics: the loss and jac in float32, close to the float64 formula."""
    spec = LossSpec(64, "dice", 1, "linear", False, region_scale=0.5, ce="labels", ce_scale=2.0)
    stats = _stats(2, 4, 3)
    loss, jac, _ = L._FINALIZE[backend](stats.float().to(_device(backend)), None, None, None, None, spec)
    loss64, jac64, _ = ref.loss_finalize(stats, None, None, None, None, spec)
    assert loss.dtype == jac.dtype == torch.float32
    torch.testing.assert_close(loss.cpu().double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jac.cpu().double(), jac64, rtol=1e-5, atol=1e-6)


@pytest.mark.ext
@pytest.mark.parametrize("case", range(len(SPECS)))
def test_cpp_finalize_nonfinite(case):
    """NaN / inf statistics (a NaN logit, an empty class with square weights): the C++ closed form gives what the
    reference's does, NaN where it gives NaN."""
    spec, region_w, ce_w, focal = SPECS[case]
    B, C = 2, 1 if spec.ce == "bce" else 3
    stats = _stats(B, C, case, dtype=torch.float32, empty_class=True)
    stats[1, :, C - 1] = float("nan")
    stats[0, NLL, 0] = float("inf")
    weights = _weights(spec, C, region_w, ce_w, focal, stats.dtype, "cpu")
    got = L._FINALIZE["cpp"](stats, *weights, spec)
    want = ref.loss_finalize(stats, *weights, spec)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.ext
def test_cpp_finalize_rejects_bad_spec():
    stats = _stats(2, 3, 0)
    with pytest.raises(ValueError, match="region"):
        L._FINALIZE["cpp"](stats, None, None, None, None, LossSpec(8, "dices"))
    with pytest.raises(ValueError, match="none"):
        L._FINALIZE["cpp"](stats, None, None, None, None, LossSpec(8, "dice", region_reduction="none", ce="labels"))
