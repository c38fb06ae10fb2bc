"""MONAI's ``monai.networks.nets.UNet`` (Kerfoot et al. 2018) with the same module tree, on fastmed ops.

The modules and their names are MONAI's, so a MONAI ``UNet`` state dict loads unchanged
(:func:`fastmed.convert.from_monai_unet` only checks the keys).  With ``c = channels``, ``s = strides`` and
``P(i) = "model." + "1.submodule." * i`` the prefix of level ``i`` (0 = top):

=========================================  =====================================================================
``P(i)0``        down layer of level i      ``Convolution(stride s[i])``, or ``ResidualUnit(stride s[i],
                                            subunits=num_res_units)`` when ``num_res_units > 0``
``P(n-1)``       bottom layer (n = len(c))  the same block with stride 1, ``c[n-2] -> c[n-1]``
``P(i)2``        up layer of level i        transposed ``Convolution(stride s[i], up_kernel_size)`` of
                                            ``cat([down, below])``; with ``num_res_units > 0`` followed by a
                                            ``ResidualUnit(subunits=1)`` (``P(i)2.0`` and ``P(i)2.1``)
=========================================  =====================================================================

Level 0's up layer is ``conv_only`` (no norm or activation; with residual units its residual unit's
convolution is).  A ``Convolution`` holds ``conv`` (``nn.Conv*d`` / ``nn.ConvTranspose*d``) and ``adn``
(``N`` norm, ``D`` dropout, ``A`` activation, in MONAI's "NDA" order); a ``ResidualUnit`` holds
``conv.unit<k>`` (Convolutions, the first strided) and ``residual`` (identity, or a convolution with
kernel ``kernel_size`` when strided, 1x1 when only the channels change) and returns
``conv(x) + residual(x)``.

``fused=True`` runs every convolution -> norm -> activation as one :func:`fastmed.ops.conv_norm_act` and every
transposed convolution's norm -> activation (PReLU included) as one :func:`fastmed.ops.norm_act`;
``fused=False`` runs the same modules as plain PyTorch, i.e. exactly MONAI's computation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from fastmed._validate import check_int, check_per_axis
from fastmed.models import _layers as L
from fastmed.nn.conv_block import conv_class
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.norm_act import norm_act

__all__ = ["MonaiUNet"]

_ACTS = {"PRELU": nn.PReLU, "RELU": nn.ReLU, "LEAKYRELU": nn.LeakyReLU}
_NORMS = {"INSTANCE": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}, "BATCH": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}


def _split_args(value, name: str, choices) -> tuple[str, dict]:
    """MONAI's ``"NAME"`` or ``("NAME", {kwargs})`` -> (upper-case name, kwargs); ValueError naming ``name``."""
    if isinstance(value, str):
        key, kwargs = value, {}
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
        key, kwargs = value
    else:
        raise ValueError(f"{name} must be one of {', '.join(choices)} or a (name, kwargs) tuple, got {value!r}")
    if key.upper() not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (MonaiUNet supports these), got {key!r}")
    return key.upper(), dict(kwargs)


def _norm_call_args(norm: nn.Module) -> dict:
    """The ``fastmed.ops`` normalization arguments of a torch InstanceNorm / BatchNorm module for one call,
    counting ``num_batches_tracked`` as the module's own forward would."""
    batch = isinstance(norm, nn.modules.batchnorm._BatchNorm)
    track = norm.track_running_stats
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if batch and norm.training and track:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    return dict(eps=norm.eps, running_mean=norm.running_mean if track else None,
                running_var=norm.running_var if track else None, momentum=momentum,
                training=norm.training or not track)


def _act_args(act: nn.Module) -> dict:
    if isinstance(act, nn.PReLU):
        return dict(activation="prelu", negative_slope=act.weight)
    if isinstance(act, nn.LeakyReLU):
        return dict(activation="leaky_relu", negative_slope=act.negative_slope)
    return dict(activation="relu")


class _ADN(nn.Sequential):
    """MONAI's ``ADN`` in "NDA" order: ``N`` (torch norm module), ``D`` (``nn.Dropout(0.0)``), ``A``."""

    def __init__(self, norm: nn.Module, act: nn.Module, dropout: float):
        super().__init__()
        self.add_module("N", norm)
        self.add_module("D", nn.Dropout(dropout))
        self.add_module("A", act)


class _Convolution(nn.Sequential):
    """MONAI's ``Convolution``: ``conv`` then (unless ``conv_only``) ``adn``.  ``forward`` is plain PyTorch;
    ``run(x, fused=True)`` is one fastmed op (conv + norm + act, or norm + act after a transposed conv)."""

    def __init__(self, sd, cin, cout, stride, kernel, norm, act, dropout, bias, conv_only=False,
                 transposed=False):
        super().__init__()
        pad = tuple((k - 1) // 2 for k in kernel)
        if transposed:
            conv = conv_class(sd, True)(cin, cout, kernel, stride, pad, output_padding=tuple(s - 1 for s in stride),
                                       bias=bias)
        else:
            conv = conv_class(sd)(cin, cout, kernel, stride, pad, bias=bias)
        self.add_module("conv", conv)
        if not conv_only:
            self.add_module("adn", _ADN(norm(cout), act(), dropout))

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        if not fused:
            return self(x)
        conv = self.conv
        if not hasattr(self, "adn"):
            return conv(x)
        n, a = self.adn.N, self.adn.A
        kind = "batch" if isinstance(n, nn.modules.batchnorm._BatchNorm) else "instance"
        args = dict(_act_args(a), **_norm_call_args(n))
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            return norm_act(conv(x), kind, n.weight, n.bias, **args)
        return conv_norm_act(x, conv.weight, conv.bias, n.weight, n.bias, stride=conv.stride, padding=conv.padding,
                             norm=kind, **args)


class _ResidualUnit(nn.Module):
    """MONAI's ``ResidualUnit``: ``conv(x) + residual(x)``, ``conv`` = Sequential of ``unit<k>`` Convolutions."""

    def __init__(self, sd, cin, cout, stride, kernel, subunits, norm, act, dropout, bias, last_conv_only=False):
        super().__init__()
        self.conv = nn.Sequential()
        c, s = cin, stride
        for k in range(max(1, subunits)):
            self.conv.add_module(f"unit{k}", _Convolution(sd, c, cout, s, kernel, norm, act, dropout, bias,
                                                          conv_only=last_conv_only and k == max(1, subunits) - 1))
            c, s = cout, (1,) * sd
        self.residual = nn.Identity()
        if math.prod(stride) != 1:
            self.residual = conv_class(sd)(cin, cout, kernel, stride, tuple((k - 1) // 2 for k in kernel), bias=bias)
        elif cin != cout:
            self.residual = conv_class(sd)(cin, cout, 1, stride, 0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, fused=False)

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        res = self.residual(x)
        for unit in self.conv:
            x = unit.run(x, fused)
        return x + res


class _SkipConnection(nn.Module):
    """MONAI's ``SkipConnection`` (mode "cat"): ``cat([x, submodule(x)], dim=1)``."""

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, fused=False)

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        return torch.cat([x, self.submodule.run(x, fused)], dim=1)


class _Sequential(nn.Sequential):
    """``nn.Sequential`` whose ``run(x, fused)`` runs each child's ``run``."""

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        for m in self:
            x = m.run(x, fused)
        return x


class MonaiUNet(nn.Module):
    """MONAI ``UNet(spatial_dims, in_channels, out_channels, channels, strides, kernel_size=3, up_kernel_size=3,
    num_res_units=0, act="PRELU", norm="INSTANCE", dropout=0.0, bias=True, adn_ordering="NDA")`` with the same
    parameters and parameter names; see the module docstring for the layout.

    Args:
        spatial_dims: 2 or 3.
        channels: features per level, top first (at least 2 entries).
        strides: one per downsampling, ``len(channels) - 1`` entries, each an int or per-axis ints
            (MONAI ignores extra entries with a warning; here they are an error).
        kernel_size, up_kernel_size: odd int or per-axis odd ints (convolutions / transposed convolutions).
        num_res_units: 0 for plain Convolutions, else residual units with that many subunits (down path).
        act: ``"PRELU"`` (``nn.PReLU()``: one slope), ``"RELU"`` or ``"LEAKYRELU"`` (slope 0.01), or MONAI's
            ``(name, kwargs)`` form with the torch module's keyword arguments.
        norm: ``"INSTANCE"`` (``nn.InstanceNorm*d()``: no affine parameters, no running statistics) or
            ``"BATCH"``, or ``(name, kwargs)``; instance norm with ``track_running_stats=True`` is not supported.
        dropout: must be 0.0 (the fused blocks have no dropout between norm and activation).
        bias: convolution bias.
        adn_ordering: must be ``"NDA"``.
        fused: fastmed ops (True) or plain PyTorch (False) on the same parameters; may be changed at any time.

    ``forward(x)``: ``(N, in_channels, *sp)`` with every size divisible by the product of the strides ->
    ``(N, out_channels, *sp)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[Union[int, Sequence[int]]], kernel_size: Union[int, Sequence[int]] = 3,
                 up_kernel_size: Union[int, Sequence[int]] = 3, num_res_units: int = 0,
                 act: Union[str, tuple] = "PRELU", norm: Union[str, tuple] = "INSTANCE", dropout: float = 0.0,
                 bias: bool = True, adn_ordering: str = "NDA", fused: bool = True):
        super().__init__()
        sd, channels = L.check_unet_args(self, spatial_dims, in_channels, out_channels, channels)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries (one per "
                             f"downsampling), got {len(strides)}: {strides!r}")
        self.strides = tuple(check_per_axis(s, f"strides[{i}]", sd, 1) for i, s in enumerate(strides))
        kernel = check_per_axis(kernel_size, "kernel_size", sd, 1)
        up_kernel = check_per_axis(up_kernel_size, "up_kernel_size", sd, 1)
        for name, k in (("kernel_size", kernel), ("up_kernel_size", up_kernel)):
            if any(v % 2 == 0 for v in k):
                raise ValueError(f"{name} must be odd (MONAI's 'same' padding), got {k}")
        num_res_units = check_int(num_res_units, "num_res_units", 0)
        act_name, act_kwargs = _split_args(act, "act", _ACTS)
        norm_name, norm_kwargs = _split_args(norm, "norm", _NORMS)
        if norm_name == "INSTANCE" and norm_kwargs.get("track_running_stats", False):
            raise ValueError("norm: instance norm with track_running_stats=True is not supported by MonaiUNet")
        if dropout != 0:
            raise ValueError(f"dropout must be 0.0 (MonaiUNet has no dropout between norm and activation), "
                             f"got {dropout!r}")
        if not isinstance(adn_ordering, str) or adn_ordering.upper() != "NDA":
            raise ValueError(f"adn_ordering must be 'NDA' (norm, dropout, activation), got {adn_ordering!r}")
        self.channels, self.num_res_units, self.fused = tuple(channels), int(num_res_units), fused
        self.total_stride = tuple(math.prod(s[a] for s in self.strides) for a in range(sd))

        def make_norm(c):
            return _NORMS[norm_name][sd](c, **norm_kwargs)

        def make_act():
            return _ACTS[act_name](**act_kwargs)

        common = dict(norm=make_norm, act=make_act, dropout=0.0, bias=bias)
        res = self.num_res_units

        def down(cin, cout, stride):
            if res > 0:
                return _ResidualUnit(sd, cin, cout, stride, kernel, res, **common)
            return _Convolution(sd, cin, cout, stride, kernel, **common)

        def up(cin, cout, stride, is_top):
            conv = _Convolution(sd, cin, cout, stride, up_kernel, conv_only=is_top and res == 0, transposed=True,
                                **common)
            if res == 0:
                return conv
            return _Sequential(conv, _ResidualUnit(sd, cout, cout, (1,) * sd, kernel, 1, last_conv_only=is_top,
                                                   **common))

        def level(i, cin, cout):
            c, s = channels[i], self.strides[i]
            if i + 2 < len(channels):
                sub, upc = level(i + 1, c, c), 2 * c
            else:
                sub, upc = down(c, channels[i + 1], (1,) * sd), c + channels[i + 1]
            return _Sequential(down(cin, c, s), _SkipConnection(sub), up(upc, cout, s, i == 0))

        self.model = level(0, self.in_channels, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L.check_input(x, self.spatial_dims, self.in_channels, "MonaiUNet")
        if any(size % t for size, t in zip(x.shape[2:], self.total_stride)):
            raise ValueError(f"MonaiUNet: every spatial size of x must be divisible by the product of the strides "
                             f"{self.total_stride}, got {tuple(x.shape[2:])}")
        return self.model.run(x, self.fused)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.strides}, num_res_units={self.num_res_units}, " \
               f"fused={self.fused}"

