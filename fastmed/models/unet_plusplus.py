"""U-Net++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image Segmentation"), 2D and 3D.

Nodes ``X^{i,j}`` (``i`` the depth, ``j`` the column): ``X^{i,0}`` is the encoder (max-pool 2, then two
conv-norm-act), and for ``j > 0``::

    X^{i,j} = H(cat([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})], 1))

with ``Up`` a 2x transposed convolution (``features[i+1] -> features[i]``) and ``H`` two 3x3 conv-norm-act blocks
(:class:`fastmed.nn.ConvNormAct`, one fused :func:`fastmed.ops.conv_norm_act` each; the upsampled tensor is read
as the convolution's second input, not concatenated, where the implementation allows).  Heads are 1x1
convolutions on ``X^{0,1..n-1}`` (``n = len(features)``).

Module names: ``nodes["i_j"]`` (``nn.Sequential`` of two ConvNormAct), ``up["i_j"]`` (the transposed convolution
feeding ``X^{i,j}``), ``heads.<j-1>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from fastmed._validate import check_int
from fastmed.models import _layers as L
from fastmed.nn.conv_block import ConvNormAct, conv_class

__all__ = ["UNetPlusPlus"]


class UNetPlusPlus(nn.Module):
    """U-Net++ with deep supervision and pruning.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels, classes.
        features: channels per depth, default ``(32, 64, 128, 256, 512)`` (the paper's); at least 2 levels.
        deep_supervision: one head per column ``X^{0,1..n-1}``; ``forward`` then returns the list of their
            full-resolution logits (``n - 1`` = 4 by default), in training and evaluation.  Without it, one head on
            ``X^{0,n-1}`` and a tensor out.
        prune: ``None``, or ``k`` in ``1..n-1`` (needs ``deep_supervision``): in evaluation mode ``forward`` computes
            only the nodes of the sub-network ``L^k`` (``i + j <= k``) and returns head ``k``'s logits (a tensor),
            the paper's pruned inference; training always runs the whole network.
        norm: ``"instance"`` (default), ``"batch"``, ``"group"`` or ``"none"``; act: ``"leaky_relu"`` (default) or
            another :class:`fastmed.nn.ConvNormAct` activation; ``norm_kwargs``, ``act_kwargs`` as there.
        fused: fastmed ops (True) or the same parameters through plain PyTorch (False); settable later.
        checkpointing: recompute each node in the backward pass.

    ``forward(x (N, in_channels, *sp))`` with every size a multiple of ``2 ** (n - 1)`` (16 by default) ->
    ``(N, out_channels, *sp)`` or a list of them.

    Parameters with the default features, in 1, out 2, instance norm: 9,049,128 (2D; the paper's 9.04M) /
    26,205,800 (3D) with deep supervision; 9,048,930 / 26,205,602 without.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 512), deep_supervision: bool = False,
                 prune: Optional[int] = None, norm: str = "instance", norm_kwargs: Optional[dict] = None,
                 act: str = "leaky_relu", act_kwargs: Optional[dict] = None, fused: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        sd, feats = L.check_unet_args(self, spatial_dims, in_channels, out_channels, features)
        n = len(feats)
        self.features, self.deep_supervision = tuple(feats), bool(deep_supervision)
        if prune is not None:
            check_int(prune, "prune", 1)
            if prune > n - 1:
                raise ValueError(f"prune must be in 1..{n - 1} (the columns of {n} levels), got {prune}")
            if not deep_supervision:
                raise ValueError("prune needs deep_supervision=True (a head on every column)")
        self.prune = prune
        self.multiple = 2 ** (n - 1)
        self.fused, self.checkpointing = fused, checkpointing
        block = dict(kernel_size=3, norm=norm, norm_kwargs=norm_kwargs, act=act, act_kwargs=act_kwargs)

        def double_conv(cin, cout):
            return nn.Sequential(ConvNormAct(sd, cin, cout, **block), ConvNormAct(sd, cout, cout, **block))

        self.pool = (nn.MaxPool3d if sd == 3 else nn.MaxPool2d)(2)
        self.nodes = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for i in range(n):
            self.nodes[f"{i}_0"] = double_conv(in_channels if i == 0 else feats[i - 1], feats[i])
        for j in range(1, n):
            for i in range(n - j):
                self.up[f"{i}_{j}"] = conv_class(sd, transposed=True)(feats[i + 1], feats[i], 2, 2)
                self.nodes[f"{i}_{j}"] = double_conv((j + 1) * feats[i], feats[i])
        n_heads = n - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(conv_class(sd)(feats[0], out_channels, 1) for _ in range(n_heads))

    def _node(self, key: str, x: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
        convs = self.nodes[key]

        def run(x, up):
            h = L.conv_block(convs[0], x, self.fused, skip=up)
            return L.conv_block(convs[1], h, self.fused)

        if up is None:
            return L.maybe_checkpoint(lambda t: run(t, None), x, enabled=self.checkpointing)
        return L.maybe_checkpoint(run, x, up, enabled=self.checkpointing)

    def forward(self, x: torch.Tensor):
        L.check_input(x, self.spatial_dims, self.in_channels, "UNetPlusPlus")
        size = tuple(x.shape[2:])
        if any(s % self.multiple for s in size):
            raise ValueError(f"UNetPlusPlus: every spatial size must be a multiple of {self.multiple} "
                             f"(2 ** (levels - 1)), got {size}")
        n = len(self.features)
        last = self.prune if (self.prune is not None and not self.training) else n - 1
        grid = {}  # (i, j) -> X^{i,j}
        for i in range(last + 1):
            grid[i, 0] = self._node(f"{i}_0", x if i == 0 else self.pool(grid[i - 1, 0]))
        for j in range(1, last + 1):
            for i in range(last + 1 - j):
                up = self.up[f"{i}_{j}"](grid[i + 1, j - 1])
                prev = torch.cat([grid[i, k] for k in range(j)], dim=1) if j > 1 else grid[i, 0]
                grid[i, j] = self._node(f"{i}_{j}", prev, up)
        if last != n - 1:
            return self.heads[last - 1](grid[0, last])
        if self.deep_supervision:
            return [head(grid[0, j + 1]) for j, head in enumerate(self.heads)]
        return self.heads[0](grid[0, n - 1])
