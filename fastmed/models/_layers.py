"""Shared pieces of the fastmed models: the plain-PyTorch (``fused=False``) path of the conv blocks, the
models' shared argument checks (built on :mod:`fastmed._validate`) and gradient checkpointing.

Every model keeps ONE set of modules and parameters; ``fused`` only selects how a block computes:

* ``fused=True``  the block's own forward (``fastmed.ops.conv_norm_act`` / ``norm_act`` / ``window_attention``).
* ``fused=False`` the same parameters through ``torch.nn.functional`` (conv, then ``instance_norm`` /
  ``group_norm`` / ``batch_norm``, then the torch activation module), i.e. what MONAI / nnU-Net run.

So the two paths of one model are directly comparable, and a state dict serves both.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmed._validate import check_int, check_spatial_dims
from fastmed.nn.conv_block import ConvNormAct, ResidualBlock
from fastmed.nn.norm_act import NormAct
from fastmed.reference.norm_act import apply_activation


def check_model_args(model: nn.Module, spatial_dims, in_channels, out_channels) -> int:
    """The arguments every segmentation model has: checks them, sets ``model.spatial_dims/in_channels/out_channels``
    and returns the spatial dims."""
    model.spatial_dims = sd = check_spatial_dims(spatial_dims)
    model.in_channels = check_int(in_channels, "in_channels", 1)
    model.out_channels = check_int(out_channels, "out_channels", 1)
    return sd


def check_unet_args(model: nn.Module, spatial_dims, in_channels, out_channels, channels) -> tuple[int, list[int]]:
    """The arguments MONAI-style U-Nets share: sets ``model.spatial_dims/in_channels/out_channels`` and returns
    (spatial dims, the per-level channels, at least 2 levels)."""
    sd = check_model_args(model, spatial_dims, in_channels, out_channels)
    channels = [check_int(c, "channels[i]", 1) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"channels must list at least 2 levels, got {channels!r}")
    return sd, channels


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, model: str) -> None:
    """``x`` must be a floating tensor ``(N, in_channels, *spatial)`` with ``spatial_dims`` spatial axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"{model}: x must have shape (N, C, {', '.join('DHW'[3 - spatial_dims:])}) for "
                         f"spatial_dims={spatial_dims}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model}: x must have in_channels={in_channels} channels (dim 1), got {x.shape[1]} "
                         f"(x of shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{model}: x must be a floating-point tensor, got {x.dtype}")


def patch_grid(x: torch.Tensor, spatial_dims: int, in_channels: int, patch: int, model: str, what: str) -> tuple:
    """:func:`check_input`, then every spatial size of ``x`` must be a multiple of ``patch`` (``what`` names it in
    the error); returns the patch grid ``size // patch``."""
    check_input(x, spatial_dims, in_channels, model)
    size = tuple(x.shape[2:])
    if any(s % patch for s in size):
        raise ValueError(f"{model}: every spatial size must be a multiple of {what}, got {size}")
    return tuple(s // patch for s in size)


def pad_to_multiple(x: torch.Tensor, multiple: int, pad: bool, model: str, rule: str) -> torch.Tensor:
    """``x`` zero-padded at the end of each spatial axis to a multiple of ``multiple``; with ``pad=False`` a size
    that is not such a multiple raises ``ValueError`` (``rule`` says where ``multiple`` comes from)."""
    size = tuple(x.shape[2:])
    if any(s % multiple for s in size):
        if not pad:
            raise ValueError(f"{model}: with pad=False every spatial size must be a multiple of {multiple} "
                             f"({rule}), got {size}")
        pads = []
        for s in reversed(size):
            pads += [0, -s % multiple]
        x = F.pad(x, pads)
    return x


def crop_to(logits: torch.Tensor, size: tuple) -> torch.Tensor:
    """``logits`` cut back to the spatial ``size`` (undoes :func:`pad_to_multiple`)."""
    if logits.shape[2:] != size:
        logits = logits[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
    return logits


def maybe_checkpoint(fn: Callable, *args, enabled: bool):
    """``fn(*args)``, recomputed in the backward pass when ``enabled`` and gradients are needed."""
    if enabled and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------------
# The plain-PyTorch path of fastmed's conv blocks
# ----------------------------------------------------------------------------------------------------------------

def norm_eager(nrm: NormAct, h: torch.Tensor) -> torch.Tensor:
    """``nrm`` (a :class:`fastmed.nn.NormAct`, activation ignored) through ``torch.nn.functional``; a batch norm
    counts the batch only after the call succeeded."""
    if nrm.kind == "instance":
        return F.instance_norm(h, weight=nrm.weight, bias=nrm.bias, eps=nrm.eps)
    if nrm.kind == "group":
        return F.group_norm(h, nrm.num_groups, nrm.weight, nrm.bias, nrm.eps)
    kw = nrm.call_kwargs()
    y = F.batch_norm(h, kw["running_mean"], kw["running_var"], nrm.weight, nrm.bias, kw["training"], kw["momentum"],
                     nrm.eps)
    nrm.count_batch()
    return y


def norm_act_eager(nrm: NormAct, h: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A NormAct (norm + its own activation) in plain PyTorch."""
    z = norm_eager(nrm, h)
    if residual is not None:
        z = z + residual
    return apply_activation(z, nrm.activation, nrm.act_weight if nrm.activation == "prelu" else nrm.negative_slope)


def conv_block(block: ConvNormAct, x: torch.Tensor, fused: bool, residual: Optional[torch.Tensor] = None,
               nonlin: Optional[nn.Module] = None, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(norm(dropout(conv(x))) + residual)`` of a :class:`fastmed.nn.ConvNormAct`.

    ``nonlin`` replaces the block's own activation (the residual block's final activation); ``skip`` makes the
    convolution read ``cat([x, skip], 1)`` (the fused path never writes the concatenation where the
    implementation allows it: a U-Net decoder's upsampled features and skip)."""
    nonlin = block.nonlin if nonlin is None else nonlin
    if fused:
        return block.run(x, residual, nonlin, skip)
    h = block.conv(x if skip is None else torch.cat([x, skip], dim=1))
    if block.dropout is not None:
        h = block.dropout(h)
    if block.norm is not None:
        h = norm_eager(block.norm, h)
    if residual is not None:
        h = h + residual
    return nonlin(h)


def conv_norm_dropout_act(block: ConvNormAct, x: torch.Tensor, fused: bool, dropout: nn.Module,
                          skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MONAI's ``Convolution`` in its "NDA" order, ``act(dropout(norm(conv(x))))``, on a :class:`ConvNormAct`
    built without dropout: one fused block while ``dropout`` is inactive (eval mode or p = 0), else the fused
    conv + norm, the dropout, then the block's activation module."""
    if not (dropout.training and dropout.p > 0):
        return conv_block(block, x, fused, skip=skip)
    return block.nonlin(dropout(conv_block(block, x, fused, nonlin=_IDENTITY, skip=skip)))


_IDENTITY = nn.Identity()


def residual_block(block: ResidualBlock, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """nnU-Net's BasicBlockD (:class:`fastmed.nn.ResidualBlock`)."""
    if fused:
        return block(x)
    skip = run(block.skip, x, fused=False)
    return conv_block(block.conv2, conv_block(block.conv1, x, False), False, residual=skip, nonlin=block.nonlin2)


def run(module: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """Run ``module`` (a conv block, residual block, or a Sequential of those and plain modules)."""
    if isinstance(module, ConvNormAct):
        return conv_block(module, x, fused)
    if isinstance(module, ResidualBlock):
        return residual_block(module, x, fused)
    if isinstance(module, NormAct):
        return module(x) if fused else norm_act_eager(module, x)
    if isinstance(module, nn.Sequential):
        for m in module:
            x = run(m, x, fused)
        return x
    return module(x)
