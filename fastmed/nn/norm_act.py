"""``NormAct`` modules: normalization + activation as one fused op.

Parameter names follow torch's norm modules (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) so a ``NormAct`` loads the state dict of the ``nn.InstanceNorm*d`` /
``nn.GroupNorm`` / ``nn.BatchNorm*d`` it replaces; a PReLU slope lives in ``act_weight``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from fastmed._validate import check_int, check_mode
from fastmed.ops.norm_act import KINDS, canonical_activation, check_groups, norm_act

__all__ = ["NormAct", "InstanceNormAct", "GroupNormAct", "BatchNormAct", "activation_of", "activation_module",
           "ACTIVATION_MODULES"]


class NormAct(nn.Module):
    """``act(norm(x) + residual)`` for inputs ``(N, C, *spatial)`` with 1 to 3 spatial dims.

    Args:
        kind: ``"instance"``, ``"group"`` or ``"batch"``.
        num_channels: C.
        num_groups: groups for ``kind="group"``.
        eps, momentum: as in torch's norm modules (``momentum=None``: cumulative average, batch norm).
        affine: learn ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
        track_running_stats: batch norm keeps ``running_mean``/``running_var`` and uses them in eval mode.
        activation: see :func:`fastmed.ops.norm_act`; ``negative_slope`` for leaky_relu;
            ``prelu_init``/``prelu_per_channel`` for prelu (``act_weight`` of shape ``(C,)`` or ``(1,)``).

    ``forward(x, residual=None)`` returns a tensor shaped like ``x``.
    """

    def __init__(self, kind: str, num_channels: int, *, num_groups: Optional[int] = None, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = "leaky_relu", negative_slope: float = 0.01, prelu_init: float = 0.25,
                 prelu_per_channel: bool = True, device=None, dtype=None):
        super().__init__()
        num_channels = check_int(num_channels, "num_channels", minimum=1)
        kind = check_mode(kind, "kind", KINDS)
        check_groups(kind, num_groups, num_channels, what="the module")
        factory = {"device": device, "dtype": dtype}
        self.kind = kind
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.activation = canonical_activation(activation)
        self.negative_slope = negative_slope
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.track_running_stats = kind == "batch" and track_running_stats
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, **factory))
            self.register_buffer("running_var", torch.ones(num_channels, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        if self.activation == "prelu":
            n = num_channels if prelu_per_channel else 1
            self.act_weight = nn.Parameter(torch.full((n,), float(prelu_init), **factory))
        else:
            self.register_parameter("act_weight", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        activation = self.activation
        slope = self.act_weight if activation == "prelu" else self.negative_slope
        if self.kind != "batch":  # no running statistics: the arguments of call_kwargs() without building them
            return norm_act(x, self.kind, self.weight, self.bias, num_groups=self.num_groups, eps=self.eps,
                            activation=activation, negative_slope=slope, residual=residual)
        y = norm_act(x, self.kind, self.weight, self.bias, activation=activation, negative_slope=slope,
                     residual=residual, **self.call_kwargs())
        self.count_batch()
        return y

    def counts_batches(self) -> bool:
        """True when a call counts in ``num_batches_tracked`` (batch norm, training, tracking statistics)."""
        return self.kind == "batch" and self.training and self.track_running_stats

    def call_kwargs(self) -> dict:
        """Keyword arguments of :func:`fastmed.ops.norm_act` / :func:`fastmed.ops.conv_norm_act` for one call
        (``num_groups``, ``eps``, ``running_mean``/``running_var``, ``momentum``, ``training``), like torch's norm
        modules; changes nothing: a call that fails leaves every buffer as it was.  After a successful call,
        :meth:`count_batch`."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.counts_batches() and self.momentum is None:  # cumulative average over the batches so far
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        track = self.track_running_stats
        return dict(num_groups=self.num_groups, eps=self.eps, momentum=momentum,
                    running_mean=self.running_mean if track else None, running_var=self.running_var if track else None,
                    training=self.training or not track)

    def count_batch(self) -> None:
        """``num_batches_tracked += 1`` after a successful training call, as torch's batch norm counts."""
        if self.counts_batches():
            self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        s = f"{self.kind}, {self.num_channels}"
        if self.kind == "group":
            s += f", num_groups={self.num_groups}"
        s += f", eps={self.eps}, affine={self.affine}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s

    @classmethod
    def from_modules(cls, norm: nn.Module, act: Optional[nn.Module] = None) -> NormAct:
        """Build a NormAct that shares the parameters and buffers of an existing torch norm module and
        activation module (used by ``fastmed.patch``).  Raises ``TypeError`` for unsupported modules."""
        if isinstance(norm, nn.GroupNorm):
            kind, channels, groups = "group", norm.num_channels, norm.num_groups
            track = False
        elif isinstance(norm, nn.modules.instancenorm._InstanceNorm):
            if norm.track_running_stats:
                raise TypeError("InstanceNorm with track_running_stats=True is not supported by NormAct")
            kind, channels, groups, track = "instance", norm.num_features, None, False
        elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
            kind, channels, groups, track = "batch", norm.num_features, None, norm.track_running_stats
        else:
            raise TypeError(f"norm must be an InstanceNorm, GroupNorm or BatchNorm module, got {type(norm).__name__}")
        activation, slope, prelu = activation_of(act)
        out = cls(kind, channels, num_groups=groups, eps=norm.eps, momentum=getattr(norm, "momentum", 0.1),
                  affine=norm.weight is not None, track_running_stats=track, activation=activation,
                  negative_slope=slope, device=None)
        out.weight, out.bias = norm.weight, norm.bias
        if track:
            out.running_mean, out.running_var = norm.running_mean, norm.running_var
            out.num_batches_tracked = norm.num_batches_tracked
        if prelu is not None:
            out.act_weight = prelu.weight
        return out


# The torch module of each name in fastmed.reference.norm_act.ACTIVATIONS (what nnU-Net stores as ``nonlin``).
ACTIVATION_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
                      "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "silu": nn.SiLU,
                      "prelu": nn.PReLU}


def activation_module(act: Optional[str], act_kwargs: Optional[dict] = None) -> nn.Module:
    """A torch activation module from an activation name (or alias) and its keyword arguments (``inplace`` is
    dropped for the modules that have none)."""
    name = canonical_activation(act)
    kwargs = dict(act_kwargs or {})
    if name in ("identity", "prelu", "gelu", "gelu_tanh"):
        kwargs.pop("inplace", None)
    return ACTIVATION_MODULES[name](**kwargs)


def activation_of(act: Optional[nn.Module]):
    """(activation name, negative_slope, prelu module or None) for a torch activation module (None: identity)."""
    if act is None or isinstance(act, nn.Identity):
        return "identity", 0.01, None
    if isinstance(act, nn.ReLU):
        return "relu", 0.01, None
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", act.negative_slope, None
    if isinstance(act, nn.PReLU):
        return "prelu", 0.01, act
    if isinstance(act, nn.GELU):
        return ("gelu_tanh" if act.approximate == "tanh" else "gelu"), 0.01, None
    if isinstance(act, nn.SiLU):
        return "silu", 0.01, None
    raise TypeError(f"act must be Identity, ReLU, LeakyReLU, PReLU, GELU or SiLU, got {type(act).__name__}")


class InstanceNormAct(NormAct):
    """Instance norm (affine, eps 1e-5) + activation; nnU-Net's default is LeakyReLU(0.01)."""

    def __init__(self, num_channels: int, **kwargs):
        super().__init__("instance", num_channels, **kwargs)


class GroupNormAct(NormAct):
    """Group norm + activation."""

    def __init__(self, num_groups: int, num_channels: int, **kwargs):
        super().__init__("group", num_channels, num_groups=num_groups, **kwargs)


class BatchNormAct(NormAct):
    """Batch norm (running statistics like nn.BatchNorm*d) + activation."""

    def __init__(self, num_channels: int, **kwargs):
        super().__init__("batch", num_channels, **kwargs)
