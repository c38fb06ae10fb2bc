"""Attention U-Net (Oktay et al. 2018) as MONAI's ``AttentionUnet`` builds it, from fastmed blocks.

Per level: two conv -> BatchNorm -> ReLU blocks (kernel ``kernel_size``); decoder: transposed conv (kernel
``up_kernel_size``) -> BatchNorm -> ReLU, an attention gate ``x * sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))``
on the skip, then a merge conv (always 3x3(x3), whatever ``kernel_size``, as MONAI builds it) -> InstanceNorm (no
affine) -> PReLU on ``cat(gated skip, upsampled)``; a final 1x1 convolution.  ``dropout`` acts where MONAI's
"NDA" ``Convolution`` puts it (after the norm, before the activation) in the level blocks and the merge convs;
the transposed convs and the gates have none (MONAI does not pass it to them).
The gate's ``relu(BN(W_g g) + BN(W_x x))`` runs as one fused conv + norm + residual + ReLU.

Load MONAI weights with :func:`fastmed.convert.from_monai_attention_unet` (same parameter count, same outputs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from fastmed._validate import check_per_axis
from fastmed.models import _layers as L
from fastmed.nn.conv_block import ConvNormAct, conv_class
from fastmed.nn.norm_act import NormAct

__all__ = ["AttentionUNet", "AttentionGate"]

_BN_RELU = dict(norm="batch", act="relu")
_MERGE_KERNEL = 3  # MONAI's AttentionLayer builds its merge Convolution with the default kernel_size


class _DoubleConv(nn.Module):
    """MONAI's ``ConvBlock``: two conv -> BatchNorm -> ReLU blocks (the first strided); their dropout is the
    model's, applied in MONAI's "NDA" place (after the norm, before the activation)."""

    def __init__(self, sd, cin, cout, kernel, stride, factory):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(sd, cin, cout, kernel, stride, **_BN_RELU, **factory),
            ConvNormAct(sd, cout, cout, kernel, 1, **_BN_RELU, **factory))

    def forward(self, x: torch.Tensor, dropout: nn.Module, fused: bool = True) -> torch.Tensor:
        for block in self.convs:
            x = L.conv_norm_dropout_act(block, x, fused, dropout)
        return x


class _UpConv(nn.Module):
    """Transposed conv (stride s, kernel k, 'same'-style padding, output_padding s - 1) -> BatchNorm -> ReLU."""

    def __init__(self, sd, cin, cout, kernel, stride, factory):
        super().__init__()
        k = check_per_axis(kernel, "up_kernel_size", sd, 1)
        s = check_per_axis(stride, "strides[i]", sd, 1)
        self.conv = conv_class(sd, transposed=True)(cin, cout, k, s, padding=tuple((v - 1) // 2 for v in k),
                                                   output_padding=tuple(v - 1 for v in s), **factory)
        self.norm = NormAct("batch", cout, activation="relu", **factory)

    def forward(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        return L.run(self.norm, self.conv(x), fused)


class AttentionGate(nn.Module):
    """``x * sigmoid(psi(relu(W_g(g) + W_x(x))))`` with 1x1 conv + BatchNorm branches (MONAI ``AttentionBlock``).

    g: gating signal ``(N, f_g, *sp)``; x: skip ``(N, f_l, *sp)`` -> ``(N, f_l, *sp)``."""

    def __init__(self, spatial_dims: int, f_int: int, f_g: int, f_l: int, dropout: float = 0.0, device=None,
                 dtype=None):
        super().__init__()
        one = dict(kernel_size=1, padding=0, norm="batch", dropout=dropout, device=device, dtype=dtype)
        self.W_g = ConvNormAct(spatial_dims, f_g, f_int, act="identity", **one)
        self.W_x = ConvNormAct(spatial_dims, f_l, f_int, act="relu", **one)
        self.psi = ConvNormAct(spatial_dims, f_int, 1, act="identity", **one)

    def forward(self, g: torch.Tensor, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        g1 = L.conv_block(self.W_g, g, fused)
        a = L.conv_block(self.W_x, x, fused, residual=g1)  # relu(BN(W_x x) + BN(W_g g)), fused
        return x * torch.sigmoid(L.conv_block(self.psi, a, fused))


class AttentionUNet(nn.Module):
    """MONAI ``AttentionUnet(spatial_dims, in_channels, out_channels, channels, strides, kernel_size=3,
    up_kernel_size=3, dropout=0.0)`` from fastmed blocks.

    ``channels``: features per level, top first (at least 2); ``strides``: one per downsampling
    (``len(channels) - 1`` entries; MONAI accepts extra ones and ignores them).  ``fused=False`` runs the same
    parameters through plain PyTorch; ``checkpointing=True`` recomputes each level in the backward pass.

    ``forward(x)``: ``(N, in_channels, *sp)`` with sizes divisible by the product of the strides ->
    ``(N, out_channels, *sp)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[Union[int, Sequence[int]]], kernel_size: Union[int, Sequence[int]] = 3,
                 up_kernel_size: Union[int, Sequence[int]] = 3, dropout: float = 0.0, fused: bool = True,
                 checkpointing: bool = False, device=None, dtype=None):
        super().__init__()
        sd, channels = L.check_unet_args(self, spatial_dims, in_channels, out_channels, channels)
        if any(c < 2 for c in channels[:-1]):
            raise ValueError(f"channels of every level but the last must be >= 2 (the attention gate halves them), "
                             f"got {channels!r}")
        if len(strides) < len(channels) - 1:
            raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {strides!r}")
        self.strides = tuple(check_per_axis(s, f"strides[{i}]", sd, 1)
                             for i, s in enumerate(strides[:len(channels) - 1]))
        self.total_stride = tuple(math.prod(s[a] for s in self.strides) for a in range(sd))
        self.fused, self.checkpointing = fused, checkpointing
        factory = dict(device=device, dtype=dtype)
        n = len(channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = nn.Dropout(float(dropout))
        self.head = _DoubleConv(sd, in_channels, channels[0], kernel_size, 1, factory)
        self.down = nn.ModuleList(_DoubleConv(sd, channels[i], channels[i + 1], kernel_size, self.strides[i],
                                              factory) for i in range(n - 1))
        self.up = nn.ModuleList(_UpConv(sd, channels[i + 1], channels[i], up_kernel_size, self.strides[i], factory)
                                for i in range(n - 1))
        self.gates = nn.ModuleList(AttentionGate(sd, channels[i] // 2, channels[i], channels[i], **factory)
                                   for i in range(n - 1))
        self.merge = nn.ModuleList(
            ConvNormAct(sd, 2 * channels[i], channels[i], _MERGE_KERNEL, norm="instance",
                        norm_kwargs={"affine": False}, act="prelu", **factory) for i in range(n - 1))
        self.out = conv_class(sd)(channels[0], out_channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L.check_input(x, self.spatial_dims, self.in_channels, "AttentionUNet")
        total = self.total_stride
        if any(size % t for size, t in zip(x.shape[2:], total)):
            raise ValueError(f"AttentionUNet: every spatial size of x must be divisible by the product of the "
                             f"strides {tuple(total)}, got {tuple(x.shape[2:])}")
        fused, ckpt = self.fused, self.checkpointing
        drop = self.dropout
        x = L.maybe_checkpoint(lambda t: self.head(t, drop, fused), x, enabled=ckpt)
        skips = [x]
        for block in self.down:
            x = L.maybe_checkpoint(lambda t, b=block: b(t, drop, fused), x, enabled=ckpt)
            skips.append(x)
        for i in reversed(range(len(self.down))):
            def level(low, skip, i=i):
                up = self.up[i](low, fused)
                return L.conv_norm_dropout_act(self.merge[i], self.gates[i](up, skip, fused), fused, drop,
                                               skip=up)  # cat([att, up])

            x = L.maybe_checkpoint(level, x, skips[i], enabled=ckpt)
        return self.out(x)
