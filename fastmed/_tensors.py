"""Rules about tensors shared by the reference, the ops and the kernel launchers (one home for each).

* :func:`accumulation_dtype`: fastmed accumulates in float32, and in float64 for float64 inputs.
* :func:`memory_format`: the layout torch's kernels would keep for a tensor (channels-last or contiguous).
* :func:`target_programs`: how many programs a launcher aims for to fill the device.
* :func:`device_guard`: every kernel launch runs on the device of its tensors, not on the current device.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["accumulation_dtype", "memory_format", "target_programs", "device_guard", "traced"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (statistics, sums and softmax of every fastmed op)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` / ``channels_last_3d`` when ``t`` (4-D / 5-D) is laid out so and is not also plain
    contiguous (a tensor with size-1 dims can be both), else ``contiguous_format``."""
    if t.dim() in (4, 5) and not t.is_contiguous():
        fmt = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
        if t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def target_programs(device: torch.device, cpu: int) -> int:
    """Programs a launch should have to fill ``device``: 4 per SM on a GPU (several waves hide the tail); ``cpu``
    on the Triton interpreter, where few large programs run fastest."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return cpu


def device_guard(t: torch.Tensor):
    """A context in which CUDA launches go to ``t``'s GPU (``torch.cuda.device``); a no-op for CPU tensors.

    Triton launches on the *current* device: without this guard, inputs on ``cuda:1`` while the current device is
    ``cuda:0`` would run on GPU 0 (an illegal address, or a race).
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced(t: torch.Tensor) -> bool:
    """True for the tensors torch.compile, opcheck and meta-device shape inference run the op bodies with (fake,
    functional or meta tensors), and for any tensor off the CPU: C++ CPU kernels cannot read them, so a ``cpp``
    body traces the reference composition instead."""
    return type(t) not in _PLAIN_TENSORS or not t.is_cpu
