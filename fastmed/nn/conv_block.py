"""Convolution blocks for 2D/3D U-Nets on :func:`fastmed.ops.conv_norm_act`.

``ConvNormAct``   conv -> (dropout) -> norm -> act, nnU-Net's ``ConvDropoutNormReLU``.
``ResidualBlock`` nnU-Net's residual-encoder ``BasicBlockD``: conv-norm-act, conv-norm, skip, add, act
                  (the add and the final activation run inside the second block's normalization pass).
``UpBlock``       transposed convolution (kernel = stride), concatenation with the skip, convolution blocks.

Checkpoint compatibility
------------------------
nnU-Net (dynamic-network-architectures): the submodule names are the same, so state dicts load unchanged.

=====================================  =====================================
``ConvDropoutNormReLU`` key             ``ConvNormAct`` key
=====================================  =====================================
``conv.weight``, ``conv.bias``          ``conv.weight``, ``conv.bias``
``norm.weight``, ``norm.bias``          ``norm.weight``, ``norm.bias``
``norm.running_mean`` / ``running_var``  same (batch norm), and ``norm.num_batches_tracked``
``nonlin.weight`` (PReLU)               ``nonlin.weight``
``all_modules.<i>.*``                   dropped on load: the same tensors again (nnU-Net registers its
                                        layers twice, as attributes and in ``all_modules``)
=====================================  =====================================

``BasicBlockD``: ``conv1.*``, ``conv2.*``, ``skip.<i>.conv.*``/``skip.<i>.norm.*`` and ``nonlin2.*`` map
to the same names in ``ResidualBlock``.  ``StackedConvBlocks.convs.<i>.*`` maps to ``UpBlock.convs.<i>.*``.

MONAI (use :func:`convert_monai_state_dict`, which renames these prefixes):

==========================  =========================================  ==========================
MONAI block                 MONAI key                                  fastmed key
==========================  =========================================  ==========================
``Convolution`` (ADN "NDA")  ``conv.weight``, ``conv.bias``              ``conv.weight``, ``conv.bias``
                            ``adn.N.<p>``                              ``norm.<p>``
                            ``adn.A.weight`` (PReLU)                    ``nonlin.weight``
``UnetBasicBlock``          ``conv1.conv.weight``                      ``0.conv.weight``
(target: ``nn.Sequential(`` ``norm1.<p>``                              ``0.norm.<p>``
``ConvNormAct(stride=s),``  ``conv2.conv.weight``                      ``1.conv.weight``
``ConvNormAct())``)          ``norm2.<p>``                              ``1.norm.<p>``
                            ``lrelu.weight`` (PReLU, shared)            ``0.nonlin.weight`` and ``1.nonlin.weight``
==========================  =========================================  ==========================

MONAI's ``UnetBasicBlock`` convolutions have no bias (``bias=False``) and its ``Convolution`` uses
instance norm without affine parameters by default: build the fastmed blocks with the same options.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from fastmed._validate import check_batch_and_spatial, check_choice, check_int, check_per_axis
from fastmed.nn.norm_act import NormAct, activation_module, activation_of
from fastmed.ops.conv_block import IMPLEMENTATIONS, conv_norm_act, same_padding
from fastmed.ops.norm_act import norm_act
from fastmed.reference import norm_act as na_ref

__all__ = ["ConvNormAct", "ResidualBlock", "UpBlock", "convert_monai_state_dict", "conv_class"]

def conv_class(spatial_dims: int, transposed: bool = False):
    """``nn.Conv2d``/``nn.Conv3d`` (or the transposed ones) for ``spatial_dims`` 2 or 3."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if transposed:
        return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class ConvNormAct(nn.Module):
    """conv -> dropout -> norm -> act on ``(N, Cin, *spatial)`` inputs, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: Cin, Cout.
        kernel_size, stride, dilation: int or per-axis ints.
        padding: None for ``(k - 1) // 2 * dilation`` (nnU-Net's padding, 'same' for odd k), else ints.
        bias: convolution bias.
        norm: ``"instance"``, ``"group"``, ``"batch"`` or ``"none"``; ``norm_kwargs`` go to
            :class:`fastmed.nn.NormAct` (``eps``, ``affine``, ``momentum``, ``track_running_stats``,
            ``num_groups``); instance norm is affine by default, as in nnU-Net.
        act: ``leaky_relu``, ``relu``, ``prelu``, ``gelu``, ``gelu_tanh``, ``silu`` or ``identity``;
            ``act_kwargs`` go to the torch activation module (``negative_slope``, ``num_parameters``...).
        dropout: probability of elementwise dropout between the convolution and the norm (nnU-Net's
            position); while it is active (training, p > 0) the block runs unfused: conv, dropout, norm_act.
        implementation: ``"auto"``, ``"cudnn"`` or ``"implicit_gemm"`` (see :mod:`fastmed.ops.conv_block`).

    ``forward(x, residual=None, skip=None)``: ``(N, Cout, *spatial_out)``; ``residual`` (shaped like the
    output) is added after the normalization, before the activation; ``skip`` given, the convolution reads
    ``cat([x, skip], 1)`` (``in_channels`` counts both), without writing it with ``implementation="implicit_gemm"``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: Union[int, Sequence[int]] = 3, stride: Union[int, Sequence[int]] = 1,
                 padding: Union[None, int, Sequence[int]] = None, dilation: Union[int, Sequence[int]] = 1,
                 bias: bool = True, norm: Optional[str] = "instance", norm_kwargs: Optional[dict] = None,
                 act: Optional[str] = "leaky_relu", act_kwargs: Optional[dict] = None, dropout: float = 0.0,
                 implementation: str = "auto", device=None, dtype=None):
        super().__init__()
        conv_cls = conv_class(spatial_dims)
        kernel = check_per_axis(kernel_size, "kernel_size", spatial_dims, 1)
        dil = check_per_axis(dilation, "dilation", spatial_dims, 1)
        pad = same_padding(kernel, dil) if padding is None else check_per_axis(padding, "padding", spatial_dims, 0)
        check_choice(implementation, "implementation", IMPLEMENTATIONS)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.implementation = implementation
        self.conv = conv_cls(in_channels, out_channels, kernel, stride, pad, dil, bias=bias, **factory)
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else None
        kind = "none" if norm is None else norm.lower()
        if kind == "none":
            self.norm = None
        else:
            self.norm = NormAct(kind, out_channels, activation="identity", **(norm_kwargs or {}), **factory)
        self.nonlin = activation_module(act, act_kwargs)
        self._register_load_state_dict_pre_hook(_drop_nnunet_duplicates, with_module=True)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.run(x, residual, self.nonlin, skip)

    def run(self, x: torch.Tensor, residual: Optional[torch.Tensor], nonlin: nn.Module,
            skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block with the activation of ``nonlin`` (``ResidualBlock`` passes its final activation)."""
        act, slope, prelu = activation_of(nonlin)
        if prelu is not None:
            slope = prelu.weight
        conv = self.conv
        if self.dropout is not None and self.training:
            h = self.dropout(conv(x if skip is None else torch.cat([x, skip], 1)))
            if self.norm is None:
                z = h if residual is None else h + residual
                return na_ref.apply_activation(z, act, slope.to(z.dtype) if prelu is not None else slope)
            return self._unfused_norm_act(h, residual, act, slope)
        if self.norm is None:
            return conv_norm_act(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding,
                                 dilation=conv.dilation, norm="none", activation=act, negative_slope=slope,
                                 residual=residual, skip=skip, implementation=self.implementation)
        nrm = self.norm
        if nrm.kind != "batch":  # no running statistics: the arguments of call_kwargs() without building them
            return conv_norm_act(x, conv.weight, conv.bias, nrm.weight, nrm.bias, stride=conv.stride,
                                 padding=conv.padding, dilation=conv.dilation, norm=nrm.kind, num_groups=nrm.num_groups,
                                 eps=nrm.eps, activation=act, negative_slope=slope, residual=residual, skip=skip,
                                 implementation=self.implementation)
        y = conv_norm_act(x, conv.weight, conv.bias, nrm.weight, nrm.bias, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, norm=nrm.kind, activation=act, negative_slope=slope,
                          residual=residual, skip=skip, implementation=self.implementation, **nrm.call_kwargs())
        nrm.count_batch()
        return y

    def _unfused_norm_act(self, h, residual, act, slope):
        """norm + residual + act of a convolution output computed (and dropped out) separately."""
        nrm = self.norm
        y = norm_act(h, nrm.kind, nrm.weight, nrm.bias, activation=act, negative_slope=slope, residual=residual,
                     **nrm.call_kwargs())
        nrm.count_batch()
        return y


def _drop_nnunet_duplicates(module, state_dict, prefix, *args):
    """nnU-Net's ConvDropoutNormReLU also saves its layers under ``all_modules.<i>``: drop those copies."""
    for key in [k for k in state_dict if k.startswith(prefix + "all_modules.")]:
        del state_dict[key]


class ResidualBlock(nn.Module):
    """nnU-Net's ``BasicBlockD``: ``act(norm(conv2(act(norm(conv1(x))))) + skip(x))``.

    ``skip`` is the identity, or (when ``stride != 1`` or ``in_channels != out_channels``) an average pool
    with kernel = stride (when strided) followed by a 1x1 convolution without bias and a norm (when the
    channels change).  ``conv1`` carries the stride; ``conv2`` has no activation of its own: the final
    activation ``nonlin2`` runs fused with the residual add in ``conv2``'s normalization pass.
    Input ``(N, Cin, *spatial)`` -> ``(N, Cout, *spatial // stride)``.  Arguments as in :class:`ConvNormAct`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: Union[int, Sequence[int]] = 3, stride: Union[int, Sequence[int]] = 1,
                 bias: bool = True, norm: str = "instance", norm_kwargs: Optional[dict] = None,
                 act: str = "leaky_relu", act_kwargs: Optional[dict] = None, dropout: float = 0.0,
                 implementation: str = "auto", device=None, dtype=None):
        super().__init__()
        common = dict(norm=norm, norm_kwargs=norm_kwargs, implementation=implementation, device=device, dtype=dtype)
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride, bias=bias, act=act,
                                 act_kwargs=act_kwargs, dropout=dropout, **common)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, 1, bias=bias,
                                 act="identity", **common)
        self.nonlin2 = activation_module(act, act_kwargs)
        stride_t = check_per_axis(stride, "stride", spatial_dims, 1)
        ops = []
        if any(s != 1 for s in stride_t):
            pool = nn.AvgPool3d if spatial_dims == 3 else nn.AvgPool2d
            ops.append(pool(stride_t, stride_t))
        if in_channels != out_channels:
            ops.append(ConvNormAct(spatial_dims, in_channels, out_channels, 1, 1, bias=False, act="identity",
                                   **common))
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        return self.conv2.run(self.conv1(x), residual, self.nonlin2)


class UpBlock(nn.Module):
    """Decoder stage: ``convs(cat([transpconv(x), skip], dim=1))`` (nnU-Net's decoder order).

    The first convolution reads the upsampled features and the skip as two inputs, so with
    ``implementation="implicit_gemm"`` the concatenated tensor is never materialized.

    ``transpconv`` is a transposed convolution with kernel = stride = ``upsample_stride`` from ``in_channels``
    to ``up_channels`` (default ``skip_channels``, as in nnU-Net); ``convs`` is ``num_convs`` ConvNormAct
    blocks, the first from ``up_channels + skip_channels`` to ``out_channels``.
    ``forward(x, skip)``: x ``(N, Cin, *s)``, skip ``(N, Cskip, *s * upsample_stride)`` ->
    ``(N, Cout, *s * upsample_stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 upsample_stride: Union[int, Sequence[int]] = 2, kernel_size: Union[int, Sequence[int]] = 3,
                 num_convs: int = 2, up_channels: Optional[int] = None, bias: bool = True, norm: str = "instance",
                 norm_kwargs: Optional[dict] = None, act: str = "leaky_relu", act_kwargs: Optional[dict] = None,
                 dropout: float = 0.0, implementation: str = "auto", device=None, dtype=None):
        super().__init__()
        check_int(num_convs, "num_convs", minimum=1)
        up_channels = skip_channels if up_channels is None else up_channels
        up = check_per_axis(upsample_stride, "upsample_stride", spatial_dims, 1)
        self.transpconv = conv_class(spatial_dims, transposed=True)(in_channels, up_channels, up, up, bias=bias,
                                                                   device=device, dtype=dtype)
        common = dict(kernel_size=kernel_size, bias=bias, norm=norm, norm_kwargs=norm_kwargs, act=act,
                      act_kwargs=act_kwargs, dropout=dropout, implementation=implementation, device=device,
                      dtype=dtype)
        self.convs = nn.Sequential(
            ConvNormAct(spatial_dims, up_channels + skip_channels, out_channels, **common),
            *[ConvNormAct(spatial_dims, out_channels, out_channels, **common) for _ in range(num_convs - 1)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.transpconv(x)
        check_batch_and_spatial(skip, "skip", up, "the upsampled x")
        h = self.convs[0](up, skip=skip)
        for block in self.convs[1:]:
            h = block(h)
        return h


_MONAI_RENAMES = {
    "convolution": (("conv.", "conv."), ("adn.N.", "norm."), ("adn.A.", "nonlin.")),
    "unet_basic_block": (("conv1.conv.", "0.conv."), ("norm1.", "0.norm."), ("conv2.conv.", "1.conv."),
                         ("norm2.", "1.norm."), ("lrelu.", "0.nonlin."), ("lrelu.", "1.nonlin.")),
}


def convert_monai_state_dict(state_dict: dict, block: str) -> dict:
    """Rename the keys of a MONAI block's state dict for the fastmed equivalent (see the module docstring).

    ``block="convolution"``: ``monai.networks.blocks.Convolution`` -> :class:`ConvNormAct`.
    ``block="unet_basic_block"``: ``monai.networks.blocks.UnetBasicBlock`` ->
    ``nn.Sequential(ConvNormAct(..., stride=s, bias=False), ConvNormAct(..., bias=False))``.
    Raises ``ValueError`` for a key that has no fastmed counterpart.
    """
    if block not in _MONAI_RENAMES:
        raise ValueError(f"block must be one of {', '.join(map(repr, _MONAI_RENAMES))}, got {block!r}")
    out = {}
    for key, value in state_dict.items():
        targets = [new + key[len(old):] for old, new in _MONAI_RENAMES[block] if key.startswith(old)]
        if not targets:
            raise ValueError(f"state_dict key {key!r} of a MONAI {block} has no fastmed counterpart")
        for t in targets:
            out[t] = value
    return out
