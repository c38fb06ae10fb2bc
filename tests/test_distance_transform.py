"""distance_transform / signed_distance: C++ and reference backends vs scipy, the CUDA line code on the host (nvcc),
boundary and Hausdorff losses vs MONAI, errors."""
import importlib
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from conftest import assert_within_ulps
from hypothesis import given
from hypothesis import strategies as st

import fastmed
from fastmed.nn import BoundaryLoss, HausdorffDTLoss, boundary_loss_weights
from fastmed.ops import distance_transform, signed_distance

# cpp needs fastmed._C: skipped without it, failed without it under FASTMED_REQUIRE_EXT=1 (tests/conftest.py)
BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.ext)]
CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")


@st.composite
def masks(draw):
    nd = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9 if nd == 3 else 17), min_size=nd, max_size=nd)))
    kind = draw(st.sampled_from(["random", "zeros", "ones", "single", "shell"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "random":
        m = rng.random(shape) < draw(st.sampled_from([0.3, 0.8, 0.97]))
    elif kind == "zeros":
        m = np.zeros(shape, bool)
    elif kind == "ones":
        m = np.ones(shape, bool)
    elif kind == "single":  # one zero voxel
        m = np.ones(shape, bool)
        m[tuple(rng.integers(0, s) for s in shape)] = False
    else:  # a thin shell of zeros around a box
        m = np.ones(shape, bool)
        sl = tuple(slice(s // 3, max(s // 3 + 1, 2 * s // 3)) for s in shape)
        m[sl] = False
        m[tuple(slice(a.start + 1, a.stop - 1) for a in sl)] = True
    spacing = draw(st.one_of(st.none(), st.lists(st.floats(0.25, 4.0), min_size=nd, max_size=nd)))
    return m, spacing


def _scipy(m, spacing):
    if m.all():
        return np.full(m.shape, np.inf)
    return ndi.distance_transform_edt(m, sampling=spacing)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=masks())
def test_matches_scipy(backend, case):
    m, spacing = case
    want = _scipy(m, spacing)
    with fastmed.use_backend(backend):
        d64 = distance_transform(torch.from_numpy(m), spacing, dtype=torch.float64).numpy()
        d32 = distance_transform(torch.from_numpy(m), spacing).numpy()
        sq = distance_transform(torch.from_numpy(m).to(torch.int32), spacing, squared=True,
                                dtype=torch.float64).numpy()
    if spacing is None:  # squared distances are exact integers; their sqrt is within 1 ulp of scipy's
        assert np.array_equal(sq, np.where(np.isinf(want), np.inf, np.round(want ** 2)))
        assert_within_ulps(d64, want)
        assert_within_ulps(d32, want.astype(np.float32))
    else:
        np.testing.assert_allclose(d64, want, rtol=1e-12)
        np.testing.assert_allclose(d32, want, rtol=1e-6)
        np.testing.assert_allclose(sq, want ** 2, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_spatial_dims(backend):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 6, 7, 5, generator=g) > 0.4
    m[1, 2] = True  # a map with no zero voxel: +inf everywhere
    with fastmed.use_backend(backend):
        d3 = distance_transform(m, (1.0, 2.0, 0.5))
        d2 = distance_transform(m, spatial_dims=2)
        d1 = distance_transform(m.float(), spatial_dims=1)
    assert torch.isinf(d3[1, 2]).all() and torch.isinf(d2[1, 2]).all()
    for idx in np.ndindex(2, 3):
        if idx != (1, 2):
            np.testing.assert_allclose(d3[idx].numpy(), ndi.distance_transform_edt(m[idx].numpy(),
                                                                                    sampling=(1, 2, 0.5)), rtol=1e-6)
        for k in range(6):
            assert_within_ulps(d2[idx][k].numpy(), _scipy(m[idx][k].numpy(), None).astype(np.float32))
            for j in range(7):
                assert_within_ulps(d1[idx][k, j].numpy(), _scipy(m[idx][k, j].numpy(), None).astype(np.float32))


def test_ulp_comparison_tolerates_an_unrounded_sqrt(monkeypatch):
    """The comparisons above hold when the float64 sqrt is off by one ulp (torch's vectorized sqrt on AVX-512,
    simulated here: it failed test_matches_scipy[reference] on such a machine), and still catch a 2-ulp error."""
    m = np.ones((7, 9), bool)
    m[3, 4] = False
    want = _scipy(m, None)
    real_sqrt = torch.Tensor.sqrt

    def sqrt_one_ulp_up(t):
        out = real_sqrt(t)
        return torch.where(out > 0, torch.nextafter(out, torch.full_like(out, float("inf"))), out)

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt_one_ulp_up)
    with fastmed.use_backend("reference"):
        d64 = distance_transform(torch.from_numpy(m), dtype=torch.float64).numpy()
    monkeypatch.undo()
    assert not np.array_equal(d64, want)  # what the old bit-equality check asserted, and why it failed there
    assert_within_ulps(d64, want)
    with pytest.raises(AssertionError, match="more than 1 ulp"):
        assert_within_ulps(np.nextafter(d64, np.inf), want)


@pytest.mark.ext
def test_backends_agree_on_blobs():
    g = torch.Generator().manual_seed(1)
    m = torch.nn.functional.avg_pool3d(torch.rand(2, 1, 24, 20, 22, generator=g), 5, 1, 2) > 0.52
    outs = {}
    for b in ("reference", "cpp"):
        with fastmed.use_backend(b):
            outs[b] = distance_transform(m, squared=True)
    assert torch.equal(outs["cpp"], outs["reference"])  # exact integers


@pytest.mark.ext
def test_cpp_work_buffer_in_chunks_of_maps():
    """float32 results with spacing go through a float64 work buffer of at most 2^22 voxels (whole maps) at a time
    (csrc/distance_transform_cpu.cpp, kWorkVoxels): 5 maps of 100^3 run as chunks of 4 and 1 maps and must give the
    float64 path's values rounded to float32, map for map."""
    g = torch.Generator().manual_seed(9)
    m = torch.nn.functional.avg_pool3d(torch.rand(5, 1, 100, 100, 100, generator=g), 5, 1, 2)[:, 0] > 0.52
    m[3] = True  # a map with no zero voxel
    with fastmed.use_backend("cpp"):
        d32 = distance_transform(m, (1.5, 1.0, 0.7))
        d64 = distance_transform(m, (1.5, 1.0, 0.7), dtype=torch.float64)
        last = distance_transform(m[4:], (1.5, 1.0, 0.7))
    assert torch.equal(d32, d64.float())
    assert torch.equal(d32[4:], last)
    assert torch.isinf(d32[3]).all() and not torch.isinf(d32[[0, 1, 2, 4]]).any()


def test_forced_backend_unavailable():
    with fastmed.use_backend("triton"):
        with pytest.raises(fastmed.BackendUnavailableError, match="no triton implementation"):
            distance_transform(torch.ones(3, 3, dtype=torch.bool))


def test_torch_compile_fullgraph():
    m = torch.rand(2, 5, 6) > 0.5
    f = torch.compile(lambda x: distance_transform(x, spatial_dims=2) + 1, fullgraph=True, backend="eager")
    assert torch.equal(f(m), distance_transform(m, spatial_dims=2) + 1)
    t = torch.randint(0, 3, (2, 1, 5, 6))
    s = torch.compile(lambda x: signed_distance(x, 3), fullgraph=True, backend="eager")
    assert torch.equal(s(t), signed_distance(t, 3))
    torch.library.opcheck(torch.ops.fastmed.distance_transform.default, (m, [1.0, 2.0], 2, False, False))


def _kervadec(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """Direct transcription of Kervadec's one_hot2dist (boundary-loss repo, utils.py), full classes -> 0."""
    res = np.zeros((num_classes,) + seg.shape, dtype=np.float64)
    for k in range(num_classes):
        posmask = seg == k
        if posmask.any() and not posmask.all():
            negmask = ~posmask
            res[k] = ndi.distance_transform_edt(negmask) * negmask - (ndi.distance_transform_edt(posmask) - 1) * posmask
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_signed_distance_is_kervadec(backend, shape):
    g = torch.Generator().manual_seed(2)
    lab = torch.randint(0, 3, (3, 1) + shape, generator=g)
    lab[0] = 1  # class 1 fills map 0, classes 0 and 2 are absent there
    lab[1, 0, 0] = 3
    want = np.stack([_kervadec(lab[i, 0].numpy(), 4) for i in range(3)])
    with fastmed.use_backend(backend):
        got = signed_distance(lab, 4, include_background=True, dtype=torch.float64)
        fg = signed_distance(lab, 4)
        onehot = signed_distance(torch.nn.functional.one_hot(lab[:, 0], 4).movedim(-1, 1).float(), dtype=torch.float64)
    # phi = d outside, 1 - d inside: within 1 ulp of the distance d it was computed from
    assert_within_ulps(got.numpy(), want, scale=np.abs(want) + 1)
    np.testing.assert_allclose(fg.numpy(), want[:, 1:], rtol=1e-6)
    assert_within_ulps(onehot.numpy(), want[:, 1:], scale=np.abs(want[:, 1:]) + 1)


def test_boundary_loss_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 1, 10, 12), generator=g)
    phi = torch.from_numpy(np.stack([_kervadec(lab[i, 0].numpy(), 3) for i in range(2)]))
    want = (torch.softmax(x, 1)[:, 1:] * phi[:, 1:]).mean()
    loss = BoundaryLoss(include_background=False, to_onehot_y=True, softmax=True)
    got = loss(x, lab)
    pre = loss(x, dist_maps=signed_distance(lab, 3, dtype=torch.float64))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pre, want)
    (gw,) = torch.autograd.grad(want, x)
    (gg,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(gg, gw)
    torch.autograd.gradcheck(lambda t: BoundaryLoss(to_onehot_y=True, softmax=True)(t, lab), (x,))


def test_boundary_loss_matches_monai():
    from monai.losses import BoundaryLoss as MonaiBoundaryLoss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 8, 9, generator=g, requires_grad=True)
    lab = torch.randint(0, 3, (2, 1, 7, 8, 9), generator=g)
    for ib in (True, False):
        a = BoundaryLoss(include_background=ib, softmax=True, to_onehot_y=True)(x, lab)
        b = MonaiBoundaryLoss(include_background=ib, softmax=True, to_onehot_y=True)(x, lab)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


@pytest.mark.parametrize("kw", [dict(), dict(include_background=True, sigmoid=True), dict(softmax=True, batch=True),
                                dict(softmax=True, reduction="none", alpha=1.5), dict(softmax=True, reduction="sum")])
def test_hausdorff_loss_matches_monai(kw):
    from monai.losses import HausdorffDTLoss as MonaiHD

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 9, 10, generator=g, requires_grad=True)
    lab = torch.randint(0, 3, (3, 1, 9, 10), generator=g)
    lab[0] = 0  # empty foreground classes
    y = torch.nn.functional.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = MonaiHD(**kw)(x, y)
    a = HausdorffDTLoss(**kw)(x, y)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])
    c = HausdorffDTLoss(to_onehot_y=True, **kw)(x, lab)
    torch.testing.assert_close(c, a)


def test_schedule():
    assert boundary_loss_weights(0) == (1.0, 0.01)
    r, b = boundary_loss_weights(10)
    assert abs(r - 0.9) < 1e-12 and abs(b - 0.11) < 1e-12
    assert boundary_loss_weights(500)[0] == 0.1
    with pytest.raises(ValueError, match="epoch"):
        boundary_loss_weights(-1)


def test_errors():
    m = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="only 0 and 1"):
        distance_transform(torch.tensor([[0.0, 0.5], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="spacing must be one number or 2 numbers"):
        distance_transform(m, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="finite and positive"):
        distance_transform(m, (1.0, 0.0))
    with pytest.raises(ValueError, match="spatial_dims"):
        distance_transform(m, spatial_dims=3)
    with pytest.raises(TypeError, match="dtype"):
        distance_transform(m, dtype=torch.float16)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        distance_transform(np.zeros((3, 3)))
    lab = torch.tensor([[[[0, 1], [2, 3]]]])
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=3\)"):
        signed_distance(lab, 3)
    with pytest.raises(ValueError, match="num_classes is required"):
        signed_distance(lab)
    with pytest.raises(ValueError, match="does not match"):
        signed_distance(torch.zeros(1, 2, 4, 4), 3)
    with pytest.raises(ValueError, match="dist_maps must have shape"):
        BoundaryLoss(include_background=False)(torch.zeros(1, 3, 4, 4), dist_maps=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"integer class labels, which must be shaped \(N, 1, \*spatial\); got shape "
                                         r"\(2, 5, 6, 7\)"):
        signed_distance(torch.randint(0, 3, (2, 5, 6, 7)), 3)  # (N, D, H, W) labels without the channel dim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 1, 5, 6), (2, 1, 0, 6), (0, 1, 3, 4, 5), (2, 1, 3, 0, 5)])
def test_signed_distance_of_empty_target(backend, shape):
    with fastmed.use_backend(backend):
        labels = signed_distance(torch.zeros(shape, dtype=torch.long), 3)
        onehot = signed_distance(torch.zeros(shape[:1] + (3,) + shape[2:]), dtype=torch.float64)
        d = distance_transform(torch.zeros(shape, dtype=torch.bool), spatial_dims=len(shape) - 2)
    assert labels.shape == (shape[0], 2) + shape[2:] and labels.dtype == torch.float32
    assert onehot.shape == (shape[0], 2) + shape[2:] and onehot.dtype == torch.float64
    assert d.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_maps_of_a_mask_that_requires_grad_do_not(backend):
    """A distance map is piecewise constant in the mask: no gradient, so the map must not require one (it did, and
    backward then failed on the op)."""
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(2, 3, 6, 7, generator=g) > 0.5).float().requires_grad_()
    x = torch.randn(2, 3, 6, 7, generator=g, requires_grad=True)
    with fastmed.use_backend(backend):
        d = distance_transform(mask, spatial_dims=2)
        phi = signed_distance(mask)
        want = distance_transform(mask.detach(), spatial_dims=2)
    assert not d.requires_grad and not phi.requires_grad
    assert torch.equal(d, want)
    (x * d).sum().backward()  # gradients flow to what multiplies the map
    torch.testing.assert_close(x.grad, d)
    assert mask.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_channel_boundary_loss_matches_monai(backend):
    """One channel: include_background=False is ignored (MONAI) and the target is that channel's binary mask."""
    from monai.losses import BoundaryLoss as MonaiBoundaryLoss

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 7, 9, generator=g, requires_grad=True)
    mask = (torch.rand(2, 1, 7, 9, generator=g) > 0.6).long()
    mask[1] = 1  # a map covered by its class: no boundary, zero map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns that it ignores include_background for one channel
        want = MonaiBoundaryLoss(include_background=False, sigmoid=True)(x, mask.float())
    with fastmed.use_backend(backend):
        for target in (mask, mask.float(), mask.bool()):
            with pytest.warns(UserWarning, match="single channel prediction, `include_background=False` ignored"):
                got = BoundaryLoss(include_background=False, sigmoid=True)(x, target)
            torch.testing.assert_close(got, want)
            want_grad = torch.autograd.grad(want, x, retain_graph=True)[0]
            torch.testing.assert_close(torch.autograd.grad(got, x)[0], want_grad)


HOST_HARNESS = r"""
#include <algorithm>
#include <cstdio>
#include <vector>
#include "distance_transform.cuh"
// Runs the CUDA kernels' per-line code on the host with the kernels' index mapping and scratch chunking:
// stdin: nd, sizes, batch, spacing, scratch budget (entries; 0 = the kernels' own), 1 for the feature transform (or
// 0), then the mask bytes; stdout: squared distances (float64), then with the feature transform the nearest zeros'
// flat indices within their maps.
int main() {
  int nd, want_idx; long long batch, budget; std::scanf("%d", &nd);
  std::vector<long long> sizes(nd); for (auto& s : sizes) std::scanf("%lld", &s);
  std::scanf("%lld", &batch);
  std::vector<double> sp(nd); for (auto& s : sp) std::scanf("%lf", &s);
  std::scanf("%lld %d", &budget, &want_idx);
  if (budget == 0) budget = want_idx ? fastmed::kDtIndexScratchEntries : fastmed::kDtScratchEntries;
  long long total = batch; for (auto s : sizes) total *= s;
  const long long map_size = total / batch;
  std::vector<uint8_t> mask(total); for (auto& m : mask) { int v; std::scanf("%d", &v); m = v; }
  std::vector<double> work(total);
  std::vector<int64_t> idx(want_idx ? total : 0);
  long long last = sizes[nd - 1];
  for (long long l = 0; l < total / last; ++l)  // one "thread" of line_pass_kernel
    fastmed::dt_line_pass(&mask[l * last], &work[l * last], last, sp[nd - 1], false,
                          want_idx ? &idx[l * last] : nullptr, (l * last) % map_size);
  long long inner = last;
  for (int d = nd - 2; d >= 0; --d) {
    long long n = sizes[d], lines = total / n;
    long long per_launch = fastmed::dt_lines_per_launch(lines, n, budget);
    std::vector<int32_t> v(per_launch * n); std::vector<double> fv(per_launch * n);  // one launch's scratch
    std::vector<int64_t> iv(want_idx ? per_launch * n : 0);
    for (long long first = 0; first < lines; first += per_launch) {  // one "launch"
      long long count = std::min(per_launch, lines - first);
      for (long long t = 0; t < count; ++t) {  // one "thread" of envelope_kernel
        long long l = first + t, base = (l / inner) * n * inner + (l % inner);
        fastmed::dt_envelope_line(&work[base], &work[base], inner, n, &v[t], &fv[t], count, sp[d] * sp[d], false,
                                  true, want_idx ? &idx[base] : nullptr, want_idx ? &iv[t] : nullptr);
      }
    }
    inner *= n;
  }
  for (auto x : work) std::printf("%.17g\n", x);
  for (auto i : idx) std::printf("%lld\n", static_cast<long long>(i));
}
"""


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA line code cannot be compiled for the host check")
    d = tmp_path_factory.mktemp("dt_host")
    src = d / "harness.cu"
    src.write_text(HOST_HARNESS)
    exe = d / "harness"
    subprocess.run([nvcc, "-std=c++17", "-O2", "-I", os.path.abspath(CSRC), str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    return str(exe)


def _run_host(host_harness, batch, spacing, budget, want_idx):
    nd = batch.ndim - 1
    sp = spacing or [1.0] * nd
    stdin = " ".join(map(str, [nd, *batch.shape[1:], batch.shape[0], *sp, budget, int(want_idx),
                               *batch.astype(np.uint8).ravel()]))
    out = subprocess.run([host_harness], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    d2 = np.array([float(x) for x in out[:batch.size]]).reshape(batch.shape)
    idx = np.array([int(x) for x in out[batch.size:]], dtype=np.int64).reshape(batch.shape) if want_idx else None
    return d2, idx


@given(case=masks(), budget=st.sampled_from([0, 1, 13, 40]))
def test_cuda_line_code_on_host(host_harness, case, budget):
    """The CUDA kernels' line code and index mapping, with their bounded scratch: envelope passes in launches of
    dt_lines_per_launch lines (budget 0 = the kernels' own; small budgets split a pass into many launches)."""
    m, spacing = case
    batch = np.stack([m, ~m])
    got, _ = _run_host(host_harness, batch, spacing, budget, False)
    for i in range(2):
        want = _scipy(batch[i], spacing) ** 2
        if spacing is None:
            assert np.array_equal(got[i], np.where(np.isinf(want), np.inf, np.round(want)))
        else:
            np.testing.assert_allclose(got[i], want, rtol=1e-12)


@given(case=masks(), budget=st.sampled_from([0, 1, 13]))
def test_cuda_feature_transform_on_host(host_harness, case, budget):
    """The CUDA kernels' feature transform (feature_transform_cuda), replayed on the host: the same distances as
    without indices, and indices obeying the tie rule (checked as for the CPU backends)."""
    m, spacing = case
    batch = np.stack([m, ~m])
    plain, _ = _run_host(host_harness, batch, spacing, budget, False)
    d2, flat = _run_host(host_harness, batch, spacing, budget, True)
    assert np.array_equal(d2, plain)
    for i in range(2):
        idx = np.stack(np.unravel_index(np.maximum(flat[i], 0), m.shape)) if not batch[i].all() else None
        if idx is None:
            assert (flat[i] == -1).all()
            continue
        _check_feature_transform(batch[i], spacing, np.sqrt(d2[i]), idx)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=masks())
def test_feature_transform(backend, case):
    """return_indices=True: the indices of each voxel's nearest zero (scipy's feature transform)."""
    m, spacing = case
    with fastmed.use_backend(backend):
        d, idx = distance_transform(torch.from_numpy(m), spacing, dtype=torch.float64, return_indices=True)
        d32, idx32 = distance_transform(torch.from_numpy(m).to(torch.uint8), spacing, return_indices=True)
        plain = distance_transform(torch.from_numpy(m), spacing, dtype=torch.float64)
    assert idx.dtype == torch.int64 and idx.shape == (m.ndim,) + m.shape
    assert torch.equal(d, plain) and torch.equal(idx32, idx)  # the indices change nothing else
    if m.all():  # no zero voxel: no index (scipy's are meaningless there)
        assert (idx == -1).all() and torch.isinf(d).all()
        return
    _check_feature_transform(m, spacing, d.numpy(), idx.numpy())


def _nearest_zeros(m, spacing):
    """Brute force: per voxel (flattened), the squared distances to every zero voxel (zeros in C order, so the
    first minimizer is the lexicographically smallest)."""
    sp = np.asarray(spacing or [1.0] * m.ndim, dtype=np.float64)
    zeros = np.argwhere(~m)
    points = np.indices(m.shape).reshape(m.ndim, -1).T
    d2 = (((points[:, None, :] - zeros[None]) * sp) ** 2).sum(-1)
    return zeros, d2


def _check_feature_transform(m, spacing, d, idx):
    """idx (nd, *shape) points at a zero voxel at exactly the minimum distance d; for unit spacing it is the
    lexicographically smallest such zero (the documented tie rule); where the nearest zero is unique it is
    scipy's."""
    assert (~m[tuple(idx)]).all(), "an index points at a nonzero voxel"
    sp = np.asarray(spacing or [1.0] * m.ndim, dtype=np.float64).reshape((-1,) + (1,) * m.ndim)
    d2_from_idx = (((idx - np.indices(m.shape)) * sp) ** 2).sum(0)
    d_from_idx = np.sqrt(d2_from_idx)
    zeros, d2 = _nearest_zeros(m, spacing)
    best = d2.min(1)
    if spacing is None:  # integers: exact ties
        assert np.array_equal(d2_from_idx.ravel(), best)
        first = zeros[(d2 == best[:, None]).argmax(1)].T.reshape(idx.shape)
        assert np.array_equal(idx, first), "ties must go to the lexicographically smallest nearest zero"
        unique = ((d2 == best[:, None]).sum(1) == 1).reshape(m.shape)
    else:
        np.testing.assert_allclose(d2_from_idx.ravel(), best, rtol=1e-9)
        unique = ((d2 <= best[:, None] * (1 + 1e-9)).sum(1) == 1).reshape(m.shape)
    np.testing.assert_allclose(d, d_from_idx, rtol=1e-6)
    _, want = ndi.distance_transform_edt(m, sampling=spacing, return_indices=True)
    assert np.array_equal(idx[:, unique], want[:, unique]), "a unique nearest zero differs from scipy's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_transform_of_a_batch(backend):
    """(*batch, *spatial) with spatial_dims < mask.dim(): indices (spatial_dims, *mask.shape), per map; a map with
    no zero gets -1; the float32 path through the C++ float64 work buffer (spacing) gives the same indices."""
    g = torch.Generator().manual_seed(12)
    m = torch.rand(2, 3, 6, 7, generator=g) > 0.3
    m[1, 2] = True
    with fastmed.use_backend(backend):
        d, idx = distance_transform(m, spatial_dims=2, return_indices=True)
        _, idx_sp = distance_transform(m, (1.0, 1.0), spatial_dims=2, return_indices=True)
        d1, idx1 = distance_transform(m, spatial_dims=1, return_indices=True)
    assert idx.shape == (2, 2, 3, 6, 7) and idx1.shape == (1, 2, 3, 6, 7)
    assert torch.equal(idx_sp, idx)
    assert (idx[:, 1, 2] == -1).all() and torch.isinf(d[1, 2]).all()
    for n, c in np.ndindex(2, 3):
        if (n, c) != (1, 2):
            _check_feature_transform(m[n, c].numpy(), None, d[n, c].double().numpy(), idx[:, n, c].numpy())
        for r in range(6):
            line = m[n, c, r].numpy()
            if not line.all():
                _check_feature_transform(line, None, d1[n, c, r].double().numpy(), idx1[:, n, c, r].numpy())


def test_feature_transform_ties_with_scipy_example():
    """scipy's docstring example: distances equal, indices equal where the nearest zero is unique, and a zero at
    the same distance where scipy picks another."""
    a = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], bool)
    for backend in ("reference",) + (("cpp",) if fastmed._ext.extension_info()["built"] else ()):
        with fastmed.use_backend(backend):
            d, idx = distance_transform(torch.from_numpy(a), dtype=torch.float64, return_indices=True)
        _check_feature_transform(a, None, d.numpy(), idx.numpy())
        # (2, 1) is at distance 1 from the zeros (1, 1) and (2, 0): scipy returns (2, 0), fastmed the smaller (1, 1)
        assert idx[:, 2, 1].tolist() == [1, 1] and d[2, 1] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_masks(backend, dtype):
    """torch's uint16/32/64 (few ops implemented for them) are masks and labels like any integer dtype."""
    g = torch.Generator().manual_seed(13)
    m = (torch.rand(2, 5, 6, generator=g) > 0.4).long()
    m[:, 0, 0] = 0
    lab = torch.randint(0, 3, (2, 1, 5, 6), generator=g)
    with fastmed.use_backend(backend):
        assert torch.equal(distance_transform(m.to(dtype), spatial_dims=2), distance_transform(m, spatial_dims=2))
        d, idx = distance_transform(m.to(dtype), spatial_dims=2, return_indices=True)
        assert torch.equal(idx, distance_transform(m.bool(), spatial_dims=2, return_indices=True)[1])
        assert torch.equal(signed_distance(lab.to(dtype), 3), signed_distance(lab, 3))
        with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=2\)"):
            signed_distance(lab.to(dtype), 2)
    if dtype == torch.uint64:
        big = lab.to(dtype)
        big.view(torch.int64)[0, 0, 0, 0] = -1  # 2^64 - 1
        with pytest.raises(ValueError, match="2\\^63 and above"):
            signed_distance(big, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_mask_as_scipy(backend):
    """A 0-d mask is a one-voxel 1D map, as scipy's atleast_1d makes it (scipy's own test: edt(False) == [0.])."""
    with fastmed.use_backend(backend):
        for value in (False, 0, 0.0):
            d, idx = distance_transform(torch.tensor(value), return_indices=True)
            want_d, want_idx = ndi.distance_transform_edt(np.asarray(value), return_indices=True)
            assert d.shape == want_d.shape == (1,) and idx.shape == want_idx.shape == (1, 1)
            assert d.tolist() == want_d.tolist() and idx.tolist() == want_idx.tolist()
        d, idx = distance_transform(torch.tensor(True), return_indices=True)
        assert torch.isinf(d).all() and idx.tolist() == [[-1]]  # no zero voxel: +inf (scipy: 1 to a virtual zero)
        assert distance_transform(torch.tensor(0, dtype=torch.int32), squared=True).tolist() == [0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_distance_memory_is_bounded_by_groups(backend, monkeypatch):
    """signed_distance runs the one-hot maps through the backend in groups of at most SIGNED_DISTANCE_GROUP_VOXELS
    voxels (whole maps; one map when larger): the (1, 105, 512, 512, 300) case needed tens of GB of one-hot and
    float maps at once.  Groups of any size give bit-identical maps."""
    dt_ops = importlib.import_module("fastmed.ops.distance_transform")  # the module, not the function

    g = torch.Generator().manual_seed(14)
    lab = torch.randint(0, 6, (3, 1, 5, 6, 7), generator=g)
    onehot = torch.nn.functional.one_hot(lab[:, 0], 6).movedim(-1, 1).float()
    with fastmed.use_backend(backend):
        want = signed_distance(lab, 6, include_background=True)
        want_oh = signed_distance(onehot)
    seen = []
    real = dt_ops._SIGNED[backend]

    def spy(onehot, spacing, float64):
        seen.append(onehot.numel())
        return real(onehot, spacing, float64)

    monkeypatch.setattr(dt_ops._SIGNED, "_bodies", {**dt_ops._SIGNED._bodies, backend: spy})
    map_voxels = 5 * 6 * 7
    for budget in (1, map_voxels, 2 * map_voxels + 1, 7 * map_voxels, 13 * map_voxels, 10**6):
        monkeypatch.setattr(dt_ops, "SIGNED_DISTANCE_GROUP_VOXELS", budget)
        seen.clear()
        with fastmed.use_backend(backend):
            assert torch.equal(signed_distance(lab, 6, include_background=True), want)
            assert max(seen) <= max(budget, map_voxels) and sum(seen) == want.numel()
            seen.clear()
            assert torch.equal(signed_distance(onehot), want_oh)
            assert max(seen) <= max(budget, map_voxels) and sum(seen) == want_oh.numel()


def test_feature_transform_op_and_compile():
    m = torch.rand(2, 5, 6) > 0.4
    torch.library.opcheck(torch.ops.fastmed.feature_transform.default, (m, [1.0, 2.0], 2, False, False))
    f = torch.compile(lambda x: distance_transform(x, spatial_dims=2, return_indices=True), fullgraph=True,
                      backend="eager")
    got, want = f(m), distance_transform(m, spatial_dims=2, return_indices=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("spacing", [None, (1.0, 2.5, 0.7)])
def test_cuda_matches_cpp(spacing):
    g = torch.Generator().manual_seed(6)
    m = torch.nn.functional.avg_pool3d(torch.rand(2, 3, 33, 40, 37, generator=g), 5, 1, 2) > 0.52
    m[0, 1] = True
    with fastmed.use_backend("cpp"):
        want = distance_transform(m, spacing, squared=True, dtype=torch.float64)
        want_d, want_idx = distance_transform(m, spacing, dtype=torch.float64, return_indices=True)
    with fastmed.use_backend("cuda"):
        got = distance_transform(m.cuda(), spacing, squared=True, dtype=torch.float64).cpu()
        got32 = distance_transform(m.cuda(), spacing).cpu()
        got_d, got_idx = distance_transform(m.cuda(), spacing, dtype=torch.float64, return_indices=True)
    if spacing is None:
        assert torch.equal(got, want)
        assert torch.equal(got_idx.cpu(), want_idx)  # integer arithmetic: the same tie rule, the same indices
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got32, want.sqrt().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got_d.cpu(), want_d, rtol=1e-12, atol=0)
    zeros = ~m.cuda()[(torch.arange(2, device="cuda").view(2, 1, 1, 1, 1),
                       torch.arange(3, device="cuda").view(1, 3, 1, 1, 1)) + tuple(got_idx.clamp_min(0))]
    assert zeros[got_idx[0] >= 0].all()
