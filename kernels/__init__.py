"""Triton device code for fastmed, installed as ``fastmed.kernels``.

One file per op family: ``@triton.jit`` kernels and their launchers (``<op>_forward`` /
``<op>_backward``) that validate layouts, allocate, pick the grid and launch through
``torch.library.wrap_triton`` so that ``torch.compile`` sees the kernels.  Importing this package
needs triton; ``fastmed`` itself imports it lazily.
"""
