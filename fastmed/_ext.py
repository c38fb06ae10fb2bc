"""Loader for the optional compiled extension ``fastmed._C``.

``load()`` returns the real module when it was built, else a stub whose every attribute raises
an error that says how to build it.  ``extension_info()`` reports what is there.
"""
from __future__ import annotations

import functools
from typing import Any

BUILD_HINT = ("build it with a C++ compiler present: `pip install --no-build-isolation -e .` "
              "(add FASTMED_BUILD_CUDA=1 and nvcc for the CUDA part)")


class _MissingExtension:
    """Stands in for fastmed._C when it was not built."""

    def __init__(self, error: str):
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"fastmed._C.{name} is unavailable: the compiled extension is not built "
                           f"({self._error}); {BUILD_HINT}")


@functools.cache
def _load() -> tuple[Any, str | None]:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from fastmed import _C  # type: ignore[attr-defined]
    except Exception as exc:
        return _MissingExtension(str(exc)), f"{type(exc).__name__}: {exc}"
    return _C, None


def load() -> Any:
    """The compiled extension, or a stub that raises a helpful error on use."""
    return _load()[0]


def extension_info() -> dict:
    """{'built': bool, 'cuda': bool, 'error': str | None, 'functions': [...]}"""
    mod, err = _load()
    if err is not None:
        return {"built": False, "cuda": False, "error": err, "functions": []}
    info = dict(mod.build_info())
    return {"built": True, "cuda": bool(info.get("cuda", False)), "error": None,
            "functions": sorted(n for n in dir(mod) if not n.startswith("_")), **info}
