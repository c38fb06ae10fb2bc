"""fastmed: fused GPU kernels for deep learning on medical images.

    import fastmed
    y = fastmed.ops.norm_act(x, "instance", weight, bias)      # Triton on CUDA, reference on CPU
    model = fastmed.models.UNet.nnunet((128, 128, 128), (1.0, 1.0, 1.0), in_channels=1, out_channels=3)
    report = fastmed.patch(monai_model)                          # fuse someone else's model in place
    with fastmed.use_backend("reference"):                       # force a backend
        ...
    print(fastmed.info())                                        # what runs here, and why
"""
from fastmed import convert, inference, metrics, models, nn, ops, reference  # noqa: F401  (ops registers the ops)
from fastmed._backend import BackendUnavailableError, use_backend
from fastmed._version import __version__
from fastmed.patch import patch  # noqa: F401  (fastmed.patch(model))

__all__ = ["ops", "nn", "models", "metrics", "convert", "reference", "patch", "use_backend",
           "BackendUnavailableError", "info", "__version__"]


def info() -> str:
    """A report of versions, the compiled extension, and per op which backend runs here and why."""
    from fastmed._info import report

    return report()
