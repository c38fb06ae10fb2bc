"""Test configuration shared by every test file.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, unless a CUDA device is present (on
  a GPU machine the Triton kernels run natively) or the caller set it.  Under the interpreter the
  Triton backend runs on CPU tensors when forced (``fastmed.use_backend("triton")``).
* ``gpu`` marks tests that need CUDA; they are skipped here with that reason.
* ``ext`` marks tests (or parameters, e.g. the ``cpp`` backend) that need the compiled extension ``fastmed._C``.
  Without it they are skipped, unless ``FASTMED_REQUIRE_EXT=1`` (CI sets it where a C++ compiler is present):
  then they fail, so a build that silently lost the extension cannot pass.
* hypothesis: a ``ci`` profile (no deadline, few examples, derandomized) is the default.
"""
import os


def _cuda_present() -> bool:
    # Decide without importing triton; torch is safe to import first.
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if "TRITON_INTERPRET" not in os.environ and not _cuda_present():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=12, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
REQUIRE_EXT = os.environ.get("FASTMED_REQUIRE_EXT", "0") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    # third-party import-time noise (libcst via hypothesis' plugins)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:libcst.*")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "ext: needs the compiled extension fastmed._C (fails instead of skipping "
                                       "under FASTMED_REQUIRE_EXT=1)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if item.get_closest_marker("ext") is None:
        return
    from fastmed import _ext

    info = _ext.extension_info()
    if info["built"]:
        return
    reason = f"needs the compiled extension fastmed._C, which is not built ({info['error']})"
    if REQUIRE_EXT:
        pytest.fail(f"{reason}; FASTMED_REQUIRE_EXT=1 says it must be", pytrace=False)
    pytest.skip(reason)


def triton_device() -> str:
    """Device on which the Triton backend runs in this session: cuda, or cpu under the interpreter."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture
def tdevice() -> str:
    return triton_device()


# Tolerances per dtype ("Numerics" in ARCHITECTURE.md): compare against the reference upcast.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


@pytest.fixture(params=["band", "tiles"])
def blend_mode(request, monkeypatch) -> str:
    """Both ways ``fastmed.inference`` holds labels (and results in another dtype than the buffer): a window-deep
    band, or tiles freed as they complete (chosen by size; small test volumes would always get the band)."""
    import fastmed.inference as inference

    monkeypatch.setattr(inference, "TILES_MIN_BAND_BYTES", 0 if request.param == "tiles" else 1 << 62)
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (small models run several times faster on a busy 2-core machine);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_within_ulps(got, want, ulps: int = 1, scale=None) -> None:
    """``got`` equals ``want`` to within ``ulps`` units in the last place of their floating-point dtype, elementwise
    (numpy arrays or CPU tensors of the same float dtype; infinities and NaNs must match exactly).  ``scale``
    (default ``want``): the values whose ulp is the unit, for results derived from a rounded value of another
    magnitude (``1 - d`` inherits the ulp of ``d``).

    For results of vectorized math (torch's float64 ``sqrt`` is not correctly rounded on AVX-512): bit-equality with
    an oracle would pass on one CPU and fail on the next."""
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.dtype.kind == "f", (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    special = ~np.isfinite(want)
    np.testing.assert_array_equal(got[special], want[special])
    finite = ~special
    scale = want if scale is None else np.broadcast_to(np.asarray(scale, dtype=want.dtype), want.shape)
    err = np.abs(got[finite].astype(np.float64) - want[finite].astype(np.float64))
    tol = ulps * np.spacing(np.abs(scale[finite])).astype(np.float64)
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} values differ by more than {ulps} ulp; first: got "
                           f"{got[finite][bad][0]!r}, want {want[finite][bad][0]!r}")
