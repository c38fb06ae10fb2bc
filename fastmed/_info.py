"""``python -m fastmed info``: versions, build, and the backend each op would use here."""
from __future__ import annotations

import platform

import torch

from fastmed import _backend, _ext
from fastmed._version import __version__


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out = {
        "fastmed": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _backend.triton_version() or f"unavailable ({_backend.triton_import_error()})",
        "cuda (torch built with)": torch.version.cuda or "none (CPU build)",
        "cudnn": cudnn or "none",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "TRITON_INTERPRET": "1" if _backend.interpreter_active() else "0",
        "requested backend": _backend.requested_backend(),
    }
    return out


def report() -> str:
    lines = ["fastmed info", ""]
    for k, v in versions().items():
        lines.append(f"  {k:<24} {v}")
    ext = _ext.extension_info()
    lines.append("")
    if ext["built"]:
        lines.append(f"  fastmed._C               built (CUDA part: {'yes' if ext['cuda'] else 'no'}, "
                     f"OpenMP: {'yes' if ext.get('openmp') else 'no'})")
    else:
        lines.append(f"  fastmed._C               not built: {ext['error']}")
        lines.append(f"                           {_ext.BUILD_HINT}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append("")
        lines.append(f"  ops on {device} tensors:")
        for op, picked, reasons in _backend.explain(torch.device(device)):
            lines.append(f"    {op:<22} -> {picked}")
            for backend, reason in reasons.items():
                if backend != picked:
                    lines.append(f"        {backend:<10} {reason or 'can run (lower priority)'}")
    return "\n".join(lines)
