"""Backend choice that explains itself.

Every op lists the backends that implement it, in order of preference.  Each backend has a
``can_run(device, forced)`` check that returns ``None`` when it can run or a sentence saying
why not.  ``auto`` picks the first backend that can run; ``FASTMED_BACKEND=<name>`` or
``with fastmed.use_backend(<name>):`` forces one, and forcing one that cannot run raises
:class:`BackendUnavailableError` with the reason.

Backends:

``triton``     Triton kernels from ``fastmed.kernels``.  ``auto`` uses them for CUDA tensors;
               for CPU tensors they run only when forced and ``TRITON_INTERPRET=1`` was set
               before triton was imported (that is how the CPU test suite exercises them).
``cuda``       hand-written CUDA in the compiled extension ``fastmed._C`` (ops that have it).
``cpp``        C++ CPU code in ``fastmed._C`` (ops that have it).
``aten``       fastmed's composition of torch's fused CPU kernels (e.g. its flash attention) for CPU tensors
               (ops that have it): faster than the reference, which stays the oracle.
``reference``  plain PyTorch from ``fastmed.reference``: the test oracle and CPU fallback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

BACKENDS = ("triton", "cuda", "cpp", "aten", "reference")
_CHOICES = ("auto",) + BACKENDS

# Stack of forced backends (innermost last).  A plain list rather than a ContextVar so that
# torch.compile can read it; the choice is process-wide, not per thread.
_forced: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given inputs."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every fastmed op called inside the block.

    >>> with fastmed.use_backend("reference"):
    ...     y = fastmed.ops.norm_act(x, "instance")

    ``"auto"`` restores automatic choice inside the block.  Overrides ``FASTMED_BACKEND``.
    """
    _check_name(name, "use_backend(name)")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def requested_backend() -> str:
    """The backend asked for here: the innermost ``use_backend`` block, else ``FASTMED_BACKEND``, else ``auto``."""
    if _forced:
        return _forced[-1]
    env = os.environ.get("FASTMED_BACKEND", "").strip() or "auto"
    return _check_name(env, "the FASTMED_BACKEND environment variable")


# --------------------------------------------------------------------------------------------
# Facts about this machine, cached.
# --------------------------------------------------------------------------------------------

def interpreter_active() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> Optional[str]:
    """None when triton imports, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fastmed[triton]' or pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton failed to import: {exc}"
    return None


def triton_version() -> Optional[str]:
    if triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


def _triton_can_run(device: torch.device, forced: bool) -> Optional[str]:
    err = triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        if interpreter_active():
            return "TRITON_INTERPRET=1 is set, so Triton runs on the CPU only; unset it for CUDA tensors"
        return None
    if device.type == "cpu":
        if not interpreter_active():
            return ("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 "
                    "(set before triton is imported)")
        if not forced:
            return "auto uses the reference for CPU tensors; force 'triton' to run the Triton interpreter"
        return None
    return f"Triton kernels do not run on {device.type} tensors"


def _ext_can_run(part: str) -> Callable[[torch.device, bool], Optional[str]]:
    def can_run(device: torch.device, forced: bool) -> Optional[str]:
        from fastmed import _ext

        info = _ext.extension_info()
        if not info["built"]:
            return f"fastmed._C is not built ({info['error']})"
        if part == "cuda":
            if device.type != "cuda":
                return f"the CUDA backend needs CUDA tensors, got {device.type} tensors"
            if not info["cuda"]:
                return "fastmed._C was built without its CUDA part (FASTMED_BUILD_CUDA=1 with nvcc to build it)"
            return None
        if device.type != "cpu":
            return f"the C++ backend needs CPU tensors, got {device.type} tensors"
        return None

    return can_run


def _aten_can_run(device: torch.device, forced: bool) -> Optional[str]:
    if device.type != "cpu":
        return f"the aten backend composes torch's CPU kernels and needs CPU tensors, got {device.type} tensors"
    return None


def _reference_can_run(device: torch.device, forced: bool) -> Optional[str]:
    return None


_BACKEND_CHECKS: dict[str, Callable[[torch.device, bool], Optional[str]]] = {
    "triton": _triton_can_run,
    "cuda": _ext_can_run("cuda"),
    "cpp": _ext_can_run("cpp"),
    "aten": _aten_can_run,
    "reference": _reference_can_run,
}


# --------------------------------------------------------------------------------------------
# Op registry
# --------------------------------------------------------------------------------------------

@dataclass
class OpInfo:
    name: str
    backends: Sequence[str]
    # Optional extra check per backend: (backend, device) -> reason or None.
    extra_check: Optional[Callable[[str, torch.device], Optional[str]]] = None
    doc: str = ""
    _extra: dict = field(default_factory=dict)


_OPS: dict[str, OpInfo] = {}


def register_op(name: str, backends: Sequence[str], doc: str = "",
                extra_check: Optional[Callable[[str, torch.device], Optional[str]]] = None) -> OpInfo:
    """Declare an op and its backends in order of preference (the reference last)."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"register_op({name!r}): unknown backend {b!r}")
    info = OpInfo(name, tuple(backends), extra_check, doc)
    _OPS[name] = info
    _CHOICES_MADE.clear()
    return info


def registered_ops() -> dict[str, OpInfo]:
    return dict(_OPS)


Body = Union[Callable, str]


class Implementations(Mapping[str, Callable]):
    """The bodies of one registered op, one per backend its op family lists in :func:`register_op`.

    ``Implementations("norm_act", "fastmed::norm_act_fwd", triton="fastmed.kernels.norm_act:norm_act_forward",
    reference=_reference_forward)`` maps each backend name to a callable, or to a ``"module:attribute"`` string
    imported on first use (Triton kernels are imported only when they run).  The keys must be exactly the
    backends registered for the op family, so a backend registered without a body fails at import time, and
    looking up any other name raises :class:`BackendUnavailableError`: nothing silently falls back to the
    reference.
    """

    def __init__(self, op: str, what: str, **bodies: Body):
        if op not in _OPS:
            raise ValueError(f"Implementations({op!r}): register_op({op!r}, ...) must come first")
        registered = tuple(_OPS[op].backends)
        if set(bodies) != set(registered):
            missing = [b for b in registered if b not in bodies]
            extra = [b for b in bodies if b not in registered]
            raise ValueError(f"{what}: the implementations must be exactly the backends registered for {op!r} "
                             f"({', '.join(registered)}); missing {missing or 'none'}, not registered "
                             f"{extra or 'none'}")
        self.op = op
        self.what = what
        self._bodies: dict[str, Body] = {b: bodies[b] for b in registered}

    def __getitem__(self, backend: str) -> Callable:
        body = self._bodies.get(backend) if isinstance(backend, str) else None
        if body is None:
            raise BackendUnavailableError(f"{self.what} has no {backend!r} implementation "
                                          f"(it has: {', '.join(self._bodies)})")
        if isinstance(body, str):
            module, _, attr = body.partition(":")
            body = getattr(importlib.import_module(module), attr)
            self._bodies[backend] = body
        return body

    def __iter__(self):
        return iter(self._bodies)

    def __len__(self) -> int:
        return len(self._bodies)


def triton_and_reference(op: str, name: str, kernel: str, reference: Body) -> Implementations:
    """The bodies of the op ``fastmed::<name>`` of a family registered with the backends ``("triton",
    "reference")``: the Triton function ``kernel`` of ``fastmed.kernels.<op>`` and ``reference``."""
    return Implementations(op, f"fastmed::{name}", triton=f"fastmed.kernels.{op}:{kernel}", reference=reference)


def why_not(op: str, backend: str, device: torch.device, forced: bool = False) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device``, else the reason."""
    info = _OPS[op]
    if backend not in info.backends:
        return f"{op} has no {backend} implementation (it has: {', '.join(info.backends)})"
    reason = _BACKEND_CHECKS[backend](device, forced)
    if reason is None and info.extra_check is not None:
        reason = info.extra_check(backend, device)
    return reason


# choose() results by (op, device type, innermost use_backend, FASTMED_BACKEND, TRITON_INTERPRET): everything a
# choice depends on for ops without an extra check (the backend checks read the device type only; whether triton
# imports and whether fastmed._C is built are fixed for the process).  Cleared when an op is registered.
_CHOICES_MADE: dict[tuple, str] = {}
_BACKEND_VAR, _INTERPRET_VAR = "FASTMED_BACKEND", "TRITON_INTERPRET"
# The two names as keys of the dictionary behind os.environ (CPython's os._Environ), where it has one.
_ENV_KEYS = tuple(map(os.environ.encodekey, (_BACKEND_VAR, _INTERPRET_VAR))) if hasattr(os.environ, "encodekey") \
    else None


def _environment_key() -> tuple:
    """(FASTMED_BACKEND, TRITON_INTERPRET), None where unset: what a choice reads from the environment.  Read from
    the dictionary behind ``os.environ`` where it has one (a plain lookup, ~20x cheaper than ``os.environ.get``,
    which encodes and decodes every key), else through ``os.environ.get``; either way it sees every change made
    through ``os.environ`` (``monkeypatch.setenv`` too)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if type(data) is dict and _ENV_KEYS is not None:
        return data.get(_ENV_KEYS[0]), data.get(_ENV_KEYS[1])
    return environ.get(_BACKEND_VAR), environ.get(_INTERPRET_VAR)


@torch.compiler.assume_constant_result
def choose(op: str, device: torch.device) -> str:
    """Pick the backend for ``op`` on ``device``, honouring a forced choice.

    Raises :class:`BackendUnavailableError` when a forced backend cannot run, with the reason.
    Under ``torch.compile`` the choice is made once, at trace time, and is a constant of the graph.
    A successful choice is remembered per (op, device type, forced backend, ``FASTMED_BACKEND``,
    ``TRITON_INTERPRET``), so a call costs a few dictionary lookups (errors are not remembered).
    """
    key = (op, device.type, _forced[-1] if _forced else None, _environment_key())
    picked = _CHOICES_MADE.get(key)
    if picked is not None:
        return picked
    picked = _choose(op, device)
    if _OPS[op].extra_check is None:
        _CHOICES_MADE[key] = picked
    return picked


def _choose(op: str, device: torch.device) -> str:
    requested = requested_backend()
    if requested != "auto":
        reason = why_not(op, requested, device, forced=True)
        if reason is not None:
            raise BackendUnavailableError(
                f"fastmed backend {requested!r} was forced (use_backend / FASTMED_BACKEND) but cannot run "
                f"{op} on {device.type} tensors: {reason}")
        return requested
    reasons = []
    for backend in _OPS[op].backends:
        reason = why_not(op, backend, device, forced=False)
        if reason is None:
            return backend
        reasons.append(f"{backend}: {reason}")
    raise BackendUnavailableError(f"no backend can run {op} on {device.type} tensors: " + "; ".join(reasons))


def explain(device: Optional[torch.device] = None) -> list[tuple[str, str, dict[str, Optional[str]]]]:
    """For each registered op: (op, the backend a call would run, as :func:`choose` picks it under the requested
    backend, or ``"(none: <why>)"`` when the call would raise, {backend: reason or None}); a forced backend's
    reason is the one for forcing it."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requested = requested_backend()
    rows = []
    for name, info in sorted(_OPS.items()):
        reasons = {b: why_not(name, b, device, forced=b == requested) for b in info.backends}
        try:
            picked = choose(name, device)
        except BackendUnavailableError as exc:
            picked = f"(none: {exc})"
        rows.append((name, picked, reasons))
    return rows
