"""Backend choice, `python -m fastmed info`, and the optional compiled extension."""
import os
import subprocess
import sys

import pytest
import torch

import fastmed
from fastmed import _backend, _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_picks_reference_on_cpu():
    assert _backend.choose("conv_block", torch.device("cpu")) == "reference"


def test_auto_picks_cpp_on_cpu_where_an_op_has_it():
    """norm_act has a C++ CPU backend: auto runs it when fastmed._C is built, else the reference."""
    built = _ext.extension_info()["built"]
    assert _backend.choose("norm_act", torch.device("cpu")) == ("cpp" if built else "reference")


def test_use_backend_nests_and_restores():
    assert _backend.requested_backend() == "auto"
    with fastmed.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with fastmed.use_backend("auto"):
            assert _backend.requested_backend() == "auto"
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == "auto"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTMED_BACKEND", "reference")
    assert _backend.choose("norm_act", torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTMED_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTMED_BACKEND environment variable must be one of"):
        _backend.requested_backend()


def test_remembered_choices_follow_every_change_of_the_environment(monkeypatch):
    """choose() remembers its choices, keyed by what they read from the environment (read without
    os.environ.get): setting, changing and removing FASTMED_BACKEND after a remembered choice each take effect."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTMED_BACKEND", raising=False)
    auto = _backend.choose("norm_act", cpu)
    assert _backend.choose("norm_act", cpu) == auto
    monkeypatch.setenv("FASTMED_BACKEND", "reference")
    assert _backend.choose("norm_act", cpu) == "reference"
    monkeypatch.setenv("FASTMED_BACKEND", "triton")
    if not _backend.interpreter_active():
        with pytest.raises(fastmed.BackendUnavailableError):
            _backend.choose("norm_act", cpu)
    else:
        assert _backend.choose("norm_act", cpu) == "triton"
    monkeypatch.delenv("FASTMED_BACKEND")
    assert _backend.choose("norm_act", cpu) == auto


def test_forcing_a_backend_that_cannot_run_says_why():
    x = torch.randn(2, 3, 4)
    with fastmed.use_backend("cuda"):
        with pytest.raises(fastmed.BackendUnavailableError, match="norm_act has no cuda implementation"):
            fastmed.ops.norm_act(x, "instance")
    with pytest.raises(ValueError, match="use_backend\\(name\\) must be one of"):
        with fastmed.use_backend("gpu"):
            pass


def test_triton_on_cpu_needs_the_interpreter():
    reason = _backend.why_not("norm_act", "triton", torch.device("cpu"), forced=True)
    if _backend.triton_import_error() is not None:
        assert "triton" in reason
    elif _backend.interpreter_active():
        assert reason is None
    else:
        assert "TRITON_INTERPRET=1" in reason
    # auto never picks the interpreter for CPU tensors
    assert _backend.why_not("norm_act", "triton", torch.device("cpu"), forced=False) is not None


def test_info_reports_versions_extension_and_ops():
    text = fastmed.info()
    for needle in ("torch", "triton", "cudnn", "fastmed._C", "norm_act", "ops on cpu tensors"):
        assert needle in text
    out = subprocess.run([sys.executable, "-m", "fastmed", "info"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert "norm_act" in out.stdout and "-> reference" in out.stdout


def test_extension_info_is_consistent():
    info = _ext.extension_info()
    assert set(info) >= {"built", "cuda", "error"}
    if info["built"]:
        assert info["error"] is None
        assert "build_info" in info["functions"]
        assert info["cuda"] == ("cuda_selftest" in info["functions"])
        assert _ext.load().num_threads() >= 1
    else:
        assert info["error"]


def test_missing_extension_stub_says_how_to_build():
    stub = _ext._MissingExtension("ImportError: no module named fastmed._C")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _ = stub.edt_cpu
    with pytest.raises(AttributeError):
        _ = stub.__wrapped__


@pytest.mark.gpu
def test_cuda_part_of_extension_runs():
    info = _ext.extension_info()
    if not info["cuda"]:
        pytest.fail("fastmed._C was built without its CUDA part on a CUDA machine: " + str(info))
    out = _ext.load().cuda_selftest(1000)
    assert out.is_cuda and torch.equal(out.cpu(), torch.arange(1000, dtype=torch.int32))


@pytest.mark.ext
def test_auto_runs_the_compiled_distance_transform_on_cpu():
    """With fastmed._C built, auto picks it for CPU tensors (under FASTMED_REQUIRE_EXT=1 a missing build fails)."""
    assert _ext.extension_info()["built"]
    assert _backend.choose("distance_transform", torch.device("cpu")) == "cpp"


def test_extension_sources_have_distinct_stems():
    """csrc/x.cpp and csrc/x.cu both compile to x.o: ninja refused ('multiple rules generate .../x.o'), plain
    setuptools overwrote one object with the other (setup.py refuses such a tree too)."""
    csrc = os.path.join(ROOT, "csrc")
    stems = [os.path.splitext(f)[0] for f in os.listdir(csrc) if f.endswith((".cpp", ".cu"))]
    assert stems and len(stems) == len(set(stems)), sorted(stems)


def test_one_source_for_the_version():
    tomllib = pytest.importorskip("tomllib")
    from importlib import metadata

    from fastmed import _version

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastmed._version.__version__"}
    assert fastmed.__version__ == _version.__version__
    assert metadata.version("fastmed") == fastmed.__version__  # what the installed metadata says


def test_ci_runs_the_readme_test_command_verbatim():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        ci = fh.read()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    begin, end = "# --- begin README test command (keep identical to README.md) ---\n", "# --- end README test command"
    command = ci[ci.index(begin) + len(begin):ci.index(end)].strip()
    assert command.endswith("python -m pytest tests -q") and f"```bash\n{command}\n```" in readme, command


def test_implementation_tables_cover_exactly_the_registered_backends():
    """Every op body dispatches through a table whose keys are the registered backends: a backend registered
    without a body cannot silently run the reference, and an unknown name is an error."""
    _backend.register_op("_test_op", ("triton", "reference"))
    try:
        with pytest.raises(ValueError, match=r"missing \['triton'\]"):
            _backend.Implementations("_test_op", "fastmed::_test_op", reference=lambda: "ref")
        with pytest.raises(ValueError, match=r"not registered \['cpp'\]"):
            _backend.Implementations("_test_op", "fastmed::_test_op", triton=lambda: 1, reference=lambda: 2,
                                     cpp=lambda: 3)
        table = _backend.Implementations("_test_op", "fastmed::_test_op", triton="math:sqrt",
                                         reference=lambda x: -x)
        assert table["triton"](4.0) == 2.0 and table["reference"](4.0) == -4.0
        assert list(table) == ["triton", "reference"]
        with pytest.raises(fastmed.BackendUnavailableError, match="fastmed::_test_op has no 'cuda' implementation"):
            table["cuda"]
    finally:
        _backend._OPS.pop("_test_op")
    import importlib

    for name in ("conv_block", "distance_transform", "losses", "norm_act", "window_attention", "sam_attention"):
        module = importlib.import_module(f"fastmed.ops.{name}")
        tables = [v for v in vars(module).values() if isinstance(v, _backend.Implementations)]
        assert tables, module.__name__
        for table in tables:
            assert tuple(table) == tuple(_backend.registered_ops()[table.op].backends)
