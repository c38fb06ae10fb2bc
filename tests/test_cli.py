"""``python -m fastmed info`` under a forced backend: it shows what a call would really run (or that it would
raise), and a bad FASTMED_BACKEND is one line, not a traceback."""
import os
import subprocess
import sys

import pytest
import torch

import fastmed
from fastmed import _backend


def _calls(op):
    """A small call of each op whose result decides what the info line must say."""
    x = torch.rand(1, 2, 4, 4)
    if op == "attention":
        q = torch.randn(1, 1, 4, 8)
        return lambda: fastmed.ops.attention(q, q, q)
    if op == "distance_transform":
        return lambda: fastmed.ops.distance_transform(x[0, 0] > 0.5)
    if op == "norm_act":
        return lambda: fastmed.ops.norm_act(x, "instance")
    return None


@pytest.mark.parametrize("op", ["attention", "distance_transform", "norm_act"])
def test_explain_under_forced_triton_matches_what_runs(monkeypatch, op):
    """Under FASTMED_BACKEND=triton each op's line names the backend the call runs, or '(none: ...)' with the
    reason exactly when the call raises BackendUnavailableError (ops with no Triton kernel: attention,
    distance_transform; on CPU tensors without TRITON_INTERPRET=1: all)."""
    monkeypatch.setenv("FASTMED_BACKEND", "triton")
    cpu = torch.device("cpu")
    picked, reasons = {name: (p, r) for name, p, r in _backend.explain(cpu)}[op]
    try:
        _calls(op)()
    except fastmed.BackendUnavailableError as exc:
        assert picked.startswith("(none: ") and str(exc).split(": ", 1)[1] in picked, (picked, exc)
        if "triton" in reasons:
            assert reasons["triton"] is not None
    else:
        assert picked == "triton" and reasons["triton"] is None
    if op != "norm_act":  # no Triton kernel: never '-> triton'
        assert picked.startswith("(none: ") and "has no triton implementation" in picked
    elif _backend.interpreter_active():
        assert picked == "triton"


def test_info_command_forced_triton():
    env = {**os.environ, "FASTMED_BACKEND": "triton", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "fastmed", "info"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    lines = {line.split("->")[0].strip(): line.split("->", 1)[1].strip()
             for line in out.stdout.splitlines() if "->" in line}
    assert lines["attention"].startswith("(none: ") and "no triton implementation" in lines["attention"]
    # without the interpreter Triton cannot run on CPU tensors at all: nothing claims it would
    assert all(not v.startswith("triton") for v in lines.values()), out.stdout
    assert "TRITON_INTERPRET=1" in lines["norm_act"]


def test_info_command_bad_backend_is_one_line():
    out = subprocess.run([sys.executable, "-m", "fastmed", "info"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FASTMED_BACKEND": "tritonn"})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "FASTMED_BACKEND" in out.stderr and "'tritonn'" in out.stderr
