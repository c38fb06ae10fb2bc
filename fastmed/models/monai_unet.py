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
(``N`` norm, ``D`` dropout, ``A`` activation, in ``adn_ordering``, MONAI's default "NDA"); a ``ResidualUnit`` holds
``conv.unit<k>`` (Convolutions, the first strided) and ``residual`` (identity, or a convolution with
kernel ``kernel_size`` when strided, 1x1 when only the channels change) and returns
``conv(x) + residual(x)``.

``fused=True`` runs every convolution -> norm -> activation as one :func:`fastmed.ops.conv_norm_act` and every
transposed convolution's norm -> activation (PReLU included) as one :func:`fastmed.ops.norm_act` (what follows
the norm in another order, or active dropout, runs after the fused op as the torch modules);
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
from fastmed.nn.norm_act import activation_of
from fastmed.patch import NormView, activation_args, fused_conv_norm_act

__all__ = ["MonaiUNet"]

# MONAI's activation and norm factory names that are torch modules (``monai.networks.layers.Act`` / ``Norm``)
_ACTS = {"PRELU": nn.PReLU, "RELU": nn.ReLU, "LEAKYRELU": nn.LeakyReLU, "ELU": nn.ELU, "RELU6": nn.ReLU6,
         "SELU": nn.SELU, "CELU": nn.CELU, "GELU": nn.GELU, "SIGMOID": nn.Sigmoid, "TANH": nn.Tanh}
_NORMS = {"INSTANCE": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}, "BATCH": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
          "GROUP": {2: nn.GroupNorm, 3: nn.GroupNorm}}
_ADN_LETTERS = "NDA"


def _split_args(value, name: str, choices, classes: bool = False) -> tuple[object, dict]:
    """MONAI's ``"NAME"`` or ``("NAME", {kwargs})`` (with ``classes``, also an ``nn.Module`` subclass or
    ``(class, {kwargs})``) -> (upper-case name or the class, kwargs); ValueError naming ``name``."""
    key, kwargs = value, {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        key, kwargs = value
    is_class = classes and isinstance(key, type) and issubclass(key, nn.Module)
    if not (isinstance(key, str) or is_class):
        form = "a name, an nn.Module class or a (name or class, kwargs) tuple" if classes else \
            "a name or a (name, kwargs) tuple"
        raise ValueError(f"{name} must be {form} (names: {', '.join(choices)}), got {value!r}")
    if is_class:
        return key, dict(kwargs)
    if key.upper() not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (MonaiUNet supports these), got {key!r}")
    return key.upper(), dict(kwargs)


def _adn_order(adn_ordering) -> str:
    """MONAI's ADN ordering: letters N, D, A in any case and order; a repeated letter keeps its first place (MONAI
    re-adds the same module)."""
    if not isinstance(adn_ordering, str):
        raise TypeError(f"adn_ordering must be a string of the letters N, D, A, got {type(adn_ordering).__name__}")
    bad = [c for c in adn_ordering.upper() if c not in _ADN_LETTERS]
    if bad:
        raise ValueError(f"adn_ordering must be a string of the letters N, D, A (norm, dropout, activation), "
                         f"got {adn_ordering!r}")
    return "".join(dict.fromkeys(adn_ordering.upper()))


def _factory(value, name: str, table: dict, spatial_dims):
    """A constructor ``make(channels)`` (norms, ``spatial_dims`` given) or ``make()`` (activations) for MONAI's
    ``act`` / ``norm`` argument, as ``monai.networks.layers.get_act_layer`` / ``get_norm_layer`` build them."""
    key, kwargs = _split_args(value, name, table, classes=spatial_dims is None)
    if spatial_dims is None:
        cls = table[key] if isinstance(key, str) else key
        return lambda: cls(**kwargs)
    if key == "GROUP" and "num_groups" not in kwargs:
        raise ValueError(f"norm: GROUP needs num_groups, e.g. ('GROUP', {{'num_groups': 2}}), got {value!r}")
    cls = table[key][spatial_dims]
    channels_arg = "num_channels" if key == "GROUP" else "num_features"
    return lambda c: cls(**{channels_arg: c, **kwargs})


def _inactive_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.Dropout) and not (m.training and m.p > 0)


def _fusable_act(m: nn.Module) -> bool:
    try:
        activation_of(m)
    except TypeError:
        return False
    return True


class _ADN(nn.Sequential):
    """MONAI's ``ADN``: ``N`` (torch norm module), ``D`` (``nn.Dropout``), ``A`` (activation), those that exist,
    in the given order."""

    def __init__(self, order: str, norm, act, dropout):
        super().__init__()
        made = {"N": norm, "D": dropout, "A": act}
        for letter in order:
            if made[letter] is not None:
                self.add_module(letter, made[letter])


class _Convolution(nn.Sequential):
    """MONAI's ``Convolution``: ``conv`` then (unless ``conv_only``) ``adn``.  ``forward`` is plain PyTorch;
    ``run(x, fused=True)`` fuses the convolution with what follows it in the ADN order once inactive dropout
    (eval mode or p = 0) is left out: a norm fastmed fuses, then an activation fastmed fuses, are one
    :func:`fastmed.ops.conv_norm_act` (after a transposed convolution, one :func:`fastmed.ops.norm_act`); the
    rest runs as the torch modules."""

    def __init__(self, sd, cin, cout, stride, kernel, norm, act, dropout, bias, order, conv_only=False,
                 transposed=False):
        super().__init__()
        pad = tuple((k - 1) // 2 for k in kernel)
        if transposed:
            conv = conv_class(sd, True)(cin, cout, kernel, stride, pad, output_padding=tuple(s - 1 for s in stride),
                                       bias=bias)
        else:
            conv = conv_class(sd)(cin, cout, kernel, stride, pad, bias=bias)
        self.add_module("conv", conv)
        if not conv_only and not (norm is None and act is None and dropout is None):
            self.add_module("adn", _ADN(order, norm and norm(cout), act and act(),
                                        None if dropout is None else nn.Dropout(dropout)))

    def _norm_view(self):
        """The :class:`fastmed.patch.NormView` of ``adn.N`` (kept, it shares the module's tensors), None when
        there is no norm or fastmed does not fuse it."""
        n = getattr(self.adn, "N", None)
        if n is None:
            return None
        view = self.__dict__.get("_view")
        if view is None or view._parameters is not n._parameters:
            try:
                view = NormView.of(n)
            except TypeError:  # e.g. instance norm with running statistics: runs as the torch module
                return None
            self.__dict__["_view"] = view
        return view.sync(n)

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        if not fused or not hasattr(self, "adn"):
            return self(x)
        mods = [m for m in self.adn if not _inactive_dropout(m)]
        view = self._norm_view()
        if view is None or not mods or mods[0] is not self.adn.N:
            return self(x)
        act = mods[1] if len(mods) > 1 and _fusable_act(mods[1]) else None
        activation, slope = activation_args(act)
        conv = self.conv
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        h = fused_conv_norm_act(x, conv, view, activation, slope, conv_out=conv(x) if transposed else None)
        for m in mods[1 + (act is not None):]:
            h = m(h)
        return h


class _ResidualUnit(nn.Module):
    """MONAI's ``ResidualUnit``: ``conv(x) + residual(x)``, ``conv`` = Sequential of ``unit<k>`` Convolutions."""

    def __init__(self, sd, cin, cout, stride, kernel, subunits, norm, act, dropout, bias, order,
                 last_conv_only=False):
        super().__init__()
        self.conv = nn.Sequential()
        c, s = cin, stride
        for k in range(max(1, subunits)):
            self.conv.add_module(f"unit{k}", _Convolution(sd, c, cout, s, kernel, norm, act, dropout, bias, order,
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
        act: a name of MONAI's ``Act`` factory that is a torch module (``"PRELU"``: ``nn.PReLU()``, one slope;
            ``"RELU"``, ``"LEAKYRELU"`` (slope 0.01), ``"ELU"``, ``"RELU6"``, ``"SELU"``, ``"CELU"``,
            ``"GELU"``, ``"SIGMOID"``, ``"TANH"``), either with kwargs as ``(name, {kwargs})``, an ``nn.Module``
            class as ``(class, {kwargs})`` or alone (MONAI needs the tuple), or None (no activation).  ReLU,
            LeakyReLU, PReLU, GELU and SiLU are fused; other activations run as their module after the fused
            conv + norm.
        norm: ``"INSTANCE"`` (``nn.InstanceNorm*d()``: no affine parameters, no running statistics),
            ``"BATCH"``, ``("GROUP", {"num_groups": g})``, each also as ``(name, kwargs)``, or None.  An instance
            norm with ``track_running_stats=True`` runs as its torch module (not fused).
        dropout: probability of MONAI's ``nn.Dropout`` in each ADN (None: no dropout module).  While it is
            active (training, p > 0) the fused op stops at the dropout.
        bias: convolution bias.
        adn_ordering: MONAI's order of ``N``, ``D``, ``A`` (e.g. ``"NDA"``, ``"NA"``, ``"AN"``); a letter left
            out drops that module.  The convolution fuses with the norm when the norm comes first (after
            inactive dropout), and with the activation right after it.
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
        make_act = None if act is None else _factory(act, "act", _ACTS, None)
        make_norm = None if norm is None else _factory(norm, "norm", _NORMS, sd)
        if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                    or not 0.0 <= dropout <= 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1] (or None: no dropout module), got "
                             f"{dropout!r}")
        order = _adn_order(adn_ordering)
        self.channels, self.num_res_units, self.fused = tuple(channels), int(num_res_units), fused
        self.adn_ordering = order
        self.total_stride = tuple(math.prod(s[a] for s in self.strides) for a in range(sd))

        common = dict(norm=make_norm, act=make_act, dropout=None if dropout is None else float(dropout), bias=bias,
                      order=order)
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

