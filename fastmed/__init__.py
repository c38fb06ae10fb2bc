"""fastmed: fused GPU kernels for deep learning on medical images.

    import fastmed
    y = fastmed.ops.norm_act(x, "instance", weight, bias)      # Triton on CUDA, reference on CPU
    with fastmed.use_backend("reference"):                       # force a backend
        ...
    print(fastmed.info())                                        # what runs here, and why
"""
from fastmed._backend import BackendUnavailableError, use_backend
from fastmed import ops, nn, reference  # noqa: F401  (registers the ops)
from fastmed.patch import patch  # noqa: F401  (fastmed.patch(model))

__version__ = "0.1.0"

__all__ = ["ops", "nn", "reference", "use_backend", "BackendUnavailableError", "info", "__version__"]


def info() -> str:
    """A report of versions, the compiled extension, and per op which backend runs here and why."""
    from fastmed._info import report

    return report()
