"""Build script for fastmed.

The Python package (``fastmed``) and the Triton kernels (``kernels/``, installed as
``fastmed.kernels``) always install.  The compiled extension ``fastmed._C`` is optional:

* its CPU part (C++, pybind11 through torch's extension tooling) builds wherever a C++
  compiler and torch are present at build time;
* its CUDA part (``csrc/*.cu``) builds only when torch was built with CUDA and ``nvcc`` is
  found, unless ``FASTMED_BUILD_CUDA=0|1`` says otherwise;
* ``FASTMED_BUILD_EXT=0`` skips the extension entirely.

Without the extension fastmed still imports and runs through Triton and the reference
implementations; ``python -m fastmed info`` reports what was built.

torch is needed at build time, so install with ``--no-build-isolation`` (an isolated build
environment would download a second, CUDA, build of torch).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _extensions():
    """Return (ext_modules, cmdclass) for fastmed._C, or empty ones with a message."""
    if _flag("FASTMED_BUILD_EXT") is False:
        print("fastmed: FASTMED_BUILD_EXT=0, building without fastmed._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing in the build environment
        print(f"fastmed: torch is not importable at build time ({exc}); building without fastmed._C. "
              "Install torch first and use `pip install --no-build-isolation .` to build it.")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        print("fastmed: no C++ compiler found, building without fastmed._C")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = _flag("FASTMED_BUILD_CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    cuda_possible = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if want_cuda is None:
        with_cuda = cuda_possible
        if not with_cuda:
            why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found"
            print(f"fastmed: building fastmed._C without its CUDA part ({why}); FASTMED_BUILD_CUDA=1 forces it")
    elif want_cuda and not cuda_possible:
        sys.exit("setup.py: FASTMED_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
    else:
        with_cuda = want_cuda

    cxx_flags = ["-O3", "-std=c++20"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    extra_link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "fastmed._C",
            cpp_sources + cu_sources,
            define_macros=[("FASTMED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension("fastmed._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=extra_link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="fastmed",
    version=VERSION,
    description="Fused GPU kernels (Triton, CUDA) for deep learning on medical images",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "fastmed",
        "fastmed.ops",
        "fastmed.nn",
        "fastmed.reference",
        "fastmed.models",
        "fastmed.metrics",
        "fastmed.kernels",
    ],
    package_dir={"fastmed.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is deliberately loose: pin the build you want (CPU or CUDA) before installing fastmed,
    # so that installing fastmed never swaps your torch for another build.
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=7", "hypothesis>=6", "scipy>=1.10", "monai>=1.4", "edt>=2.4", "triton>=3.8", "pybind11",
                 "tqdm", "matplotlib", "nibabel"],
        "demo": ["tqdm", "matplotlib", "nibabel"],
    },
    entry_points={"console_scripts": ["fastmed=fastmed.__main__:main"]},
    zip_safe=False,
)
