"""Test configuration shared by every test file.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, unless a CUDA device is present (on
  a GPU machine the Triton kernels run natively) or the caller set it.  Under the interpreter the
  Triton backend runs on CPU tensors when forced (``fastmed.use_backend("triton")``).
* ``gpu`` marks tests that need CUDA; they are skipped here with that reason.
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    # third-party import-time noise (libcst via hypothesis' plugins)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:libcst.*")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def triton_device() -> str:
    """Device on which the Triton backend runs in this session: cuda, or cpu under the interpreter."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture
def tdevice() -> str:
    return triton_device()


# Tolerances per dtype (STYLE.md): compare against the reference upcast.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (small models run several times faster on a busy 2-core machine);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
