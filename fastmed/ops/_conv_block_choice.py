"""Which implementation ``conv_norm_act(..., implementation="auto")`` runs, per shape and dtype.

This file is data: ``python bench/bench_conv_block.py --write-choice`` regenerates it from a GPU run of
the benchmark (the fastest implementation of forward+backward per benchmarked case).  Keys are
``(spatial_dims, dtype, in_channels, out_channels, spatial_in, stride, kernel, channels_last)``; a shape
not in the table gets ``DEFAULT``.

Status: UNMEASURED.  No GPU run has produced this table yet, so every shape uses ``DEFAULT = "cudnn"``
(cuDNN convolution + the fused norm-act op: the established path, never slower than eager by more than
the norm-act launch).  There is no principled reason to prefer the Triton implicit GEMM at any shape
before it has been measured.
"""

MEASURED = False
SOURCE = None  # the results file the table came from: device, versions, commit
DEFAULT = "cudnn"
TABLE: dict = {}
