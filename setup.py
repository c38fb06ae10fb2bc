"""Build logic of the optional compiled extension ``fastmed._C``.

The project's metadata (name, version, dependencies, extras, console script, packages) lives in
``pyproject.toml``; this file only decides what goes into ``fastmed._C`` and how it is compiled:

* its CPU part (``csrc/*.cpp``, C++ and pybind11 through torch's extension tooling) builds wherever a C++
  compiler and torch are present at build time;
* its CUDA part (``csrc/*.cu``) builds only when torch was built with CUDA and a CUDA toolkit is found
  (``CUDA_HOME``/``CUDA_PATH``, else the toolkit of the ``nvcc`` on PATH, else ``/usr/local/cuda*``; a toolkit
  counts when it holds ``bin/nvcc`` and ``include/cuda_runtime.h``), unless ``FASTMED_BUILD_CUDA=0|1`` says
  otherwise; ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX`` (PTX so newer GPUs can run it);
* ``FASTMED_BUILD_EXT=0`` skips the extension entirely.

Without the extension fastmed still imports and runs through Triton and the reference implementations;
``python -m fastmed info`` reports what was built.

torch is needed at build time, so install with ``--no-build-isolation`` (an isolated build environment would
download a second, CUDA, build of torch): ``pip install --no-build-isolation -e .`` builds ``fastmed._C`` in place.
"""
import collections
import glob
import os
import re
import shutil
import sys

from setuptools import setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.access(
        os.path.join(path, "bin", "nvcc"), os.X_OK)


def _cuda_home():
    """The CUDA toolkit to build with, or None.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when the ``nvcc`` on PATH is a link or a wrapper
    script outside the toolkit (``/usr/local/bin/nvcc`` -> ``/usr/local``, where ``cuda_runtime.h`` is not).  So:
    ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the toolkit of the ``nvcc`` on PATH with links resolved, else
    ``/usr/local/cuda`` and then ``/usr/local/cuda-<version>``, newest first; the first that holds ``bin/nvcc`` and
    ``include/cuda_runtime.h``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if _is_toolkit(path):
                return path
            print(f"fastmed: {var}={path} holds no bin/nvcc and include/cuda_runtime.h; looking elsewhere")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))

    def version(path):
        return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))

    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _sources():
    """csrc/*.cpp and csrc/*.cu; no two may share a stem (both would compile to <stem>.o: ninja refuses,
    plain setuptools silently overwrites one object with the other)."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    stems = collections.Counter(os.path.splitext(os.path.basename(s))[0] for s in cpp + cu)
    clash = sorted(s for s, n in stems.items() if n > 1)
    if clash:
        sys.exit(f"setup.py: csrc sources share the stem(s) {clash}; their object files would collide. Name them "
                 "<op>_cpu.cpp and <op>_cuda.cu.")
    return cpp, cu


def _extensions():
    """Return (ext_modules, cmdclass) for fastmed._C, or empty ones with a message."""
    if _flag("FASTMED_BUILD_EXT") is False:
        print("fastmed: FASTMED_BUILD_EXT=0, building without fastmed._C")
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it when first imported
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing in the build environment
        print(f"fastmed: torch is not importable at build time ({exc}); building without fastmed._C. "
              "Install torch first and use `pip install --no-build-isolation .` to build it.")
        return [], {}
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case something imported it before the environment was set
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        print("fastmed: no C++ compiler found, building without fastmed._C")
        return [], {}

    cpp_sources, cu_sources = _sources()
    want_cuda = _flag("FASTMED_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cuda_home is not None
    why_not = "torch has no CUDA" if torch.version.cuda is None else (
        "no CUDA toolkit found (bin/nvcc and include/cuda_runtime.h under CUDA_HOME, the nvcc on PATH, or "
        "/usr/local/cuda*)")
    if want_cuda is None:
        with_cuda = cuda_possible
        if not with_cuda:
            print(f"fastmed: building fastmed._C without its CUDA part ({why_not}); FASTMED_BUILD_CUDA=1 forces it")
    elif want_cuda and not cuda_possible:
        sys.exit(f"setup.py: FASTMED_BUILD_CUDA=1 but {why_not}")
    else:
        with_cuda = want_cuda

    cxx_flags = ["-O3", "-std=c++20"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    extra_link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"fastmed: building fastmed._C with its CUDA part (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            "fastmed._C",
            cpp_sources + cu_sources,
            define_macros=[("FASTMED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=extra_link,
        )
    else:
        ext = cpp_extension.CppExtension("fastmed._C", cpp_sources, extra_compile_args=cxx_flags,
                                         extra_link_args=extra_link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
