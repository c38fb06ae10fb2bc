"""Plain PyTorch reference for the fused convolution block ``act(norm(conv(x)) * w + b + residual)``.

This is the test oracle and the CPU fallback of :func:`fastmed.ops.conv_norm_act`.  The convolution is
``F.conv2d`` / ``F.conv3d`` (groups = 1), the normalization and activation come from
:mod:`fastmed.reference.norm_act`.

Shapes (``sd`` = 2 or 3 spatial dims):
    x          ``(N, Cin, *spatial_in)``, or ``(N, C1, ...)`` plus a second input ``x2``/``skip`` ``(N, C2, ...)``
               with Cin = C1 + C2 (the convolution reads their concatenation along channels)
    weight     ``(Cout, Cin, *kernel)``
    bias       ``(Cout,)`` or None
    conv_out   ``(N, Cout, *spatial_out)`` with ``out = (in + 2 p - d (k - 1) - 1) // s + 1`` per axis
    norm_weight, norm_bias ``(Cout,)`` or None
    residual   like conv_out or None
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastmed._tensors import accumulation_dtype, memory_format
from fastmed.reference import norm_act as na

NORM_KINDS = na.KINDS + ("none",)


def conv_nd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """F.conv2d / F.conv3d by the number of spatial dims of x."""
    fn = F.conv3d if x.dim() == 5 else F.conv2d
    return fn(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


def output_size(in_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of the convolution, per axis."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(in_size, kernel, stride, padding, dilation))


def conv_weight_grad(x: torch.Tensor, weight_shape, dout: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """d loss / d weight of the convolution, ``(Cout, Cin, *kernel)``."""
    fn = torch.nn.grad.conv3d_weight if x.dim() == 5 else torch.nn.grad.conv2d_weight
    return fn(x, weight_shape, dout, tuple(stride), tuple(padding), tuple(dilation))


def conv_input_grad(x_shape, weight: torch.Tensor, dout: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """d loss / d x of the convolution, ``(N, Cin, *spatial_in)``."""
    fn = torch.nn.grad.conv3d_input if len(x_shape) == 5 else torch.nn.grad.conv2d_input
    return fn(x_shape, weight, dout, tuple(stride), tuple(padding), tuple(dilation))



class ConvSpec(NamedTuple):
    """The convolution's geometry, one int per spatial axis (lists, as torch.library ops take them)."""
    stride: list
    padding: list
    dilation: list


class ConvTensors(NamedTuple):
    """The convolution's tensors beside ``x``; also the layout of their gradients."""
    x2: Optional[torch.Tensor]      # (N, C2, *spatial_in) or None: channels C1.. of the convolution input (skip)
    weight: torch.Tensor            # (Cout, C1 + C2, *kernel)
    bias: Optional[torch.Tensor]    # (Cout,) or None


def conv_block_forward(x: torch.Tensor, conv: ConvTensors, norm: na.NormTensors, cspec: ConvSpec,
                       nspec: na.NormSpec, mean_in: Optional[torch.Tensor], rstd_in: Optional[torch.Tensor]):
    """Forward on the reference backend: returns ``(y, conv_out, mean, rstd)``.

    The convolution input is ``x``, or ``cat([x, x2], 1)`` when a second input ``x2`` (a decoder's skip) is given.
    ``conv_out`` is the convolution output (saved for the backward); ``mean``/``rstd`` the statistics of
    the normalization, ``(N * G,)`` (instance: G = Cout) or ``(Cout,)`` (batch).
    """
    xin = x if conv.x2 is None else torch.cat([x, conv.x2], 1)
    conv_out = conv_nd(xin, conv.weight, conv.bias, *cspec)
    y, mean, rstd, _z = na.norm_act_forward(conv_out, norm, nspec, mean_in, rstd_in)
    return y, conv_out, mean, rstd


def conv_block_backward(dy: torch.Tensor, x: torch.Tensor, conv_out: torch.Tensor, conv: ConvTensors,
                        norm: na.NormTensors, cspec: ConvSpec, nspec: na.NormSpec, mean: torch.Tensor,
                        rstd: torch.Tensor, input_stats: bool):
    """Backward on the reference backend: ``(dx, ConvTensors(dx2, dweight, dbias), NormTensors(dnorm_weight,
    dnorm_bias, dresidual, dslope))``, None where absent."""
    dconv, norm_grads = na.norm_act_backward(dy, conv_out, None, norm, nspec, mean, rstd, input_stats)
    acc = accumulation_dtype(x.dtype)
    x2, weight = conv.x2, conv.weight
    xin = x if x2 is None else torch.cat([x, x2], 1)
    dxin = conv_input_grad(xin.shape, weight, dconv, *cspec).to(x.dtype)
    if x2 is None:
        dx, dx2 = dxin, None
    else:  # two outputs that may not alias each other: copies in the layouts of x and x2
        dx = dxin[:, :x.shape[1]].clone(memory_format=memory_format(x))
        dx2 = dxin[:, x.shape[1]:].clone(memory_format=memory_format(x2))
    dw = conv_weight_grad(xin.to(acc), weight.shape, dconv.to(acc), *cspec).to(weight.dtype)
    red = [0] + list(range(2, dconv.dim()))
    db = dconv.to(acc).sum(red).to(conv.bias.dtype) if conv.bias is not None else None
    return dx, ConvTensors(dx2, dw, db), norm_grads


def conv_norm_act_reference(x, weight, bias=None, norm_weight=None, norm_bias=None, *, stride=1, padding=0,
                            dilation=1, norm="instance", num_groups=None, eps=1e-5, activation="leaky_relu",
                            negative_slope=0.01, residual=None, running_mean=None, running_var=None, momentum=0.1,
                            training=True, skip=None):
    """The block composed from torch.nn.functional, differentiable by autograd: the oracle.

    ``norm="none"`` skips normalization (then ``residual`` is added to the convolution output); ``skip``
    given: the convolution input is ``cat([x, skip], 1)``.
    """
    if skip is not None:
        x = torch.cat([x, skip], 1)
    sd = x.dim() - 2

    def expand(v):
        return (v,) * sd if isinstance(v, int) else tuple(v)

    conv_out = conv_nd(x, weight, bias, expand(stride), expand(padding), expand(dilation))
    if norm == "none":
        acc = accumulation_dtype(x.dtype)
        z = conv_out.to(acc)
        if residual is not None:
            z = z + residual.to(acc)
        slope = negative_slope.to(acc) if activation == "prelu" else negative_slope
        return na.apply_activation(z, activation, slope).to(x.dtype)
    return na.norm_act_reference(conv_out, norm, norm_weight, norm_bias, num_groups=num_groups, eps=eps,
                                 activation=activation, negative_slope=negative_slope, residual=residual,
                                 running_mean=running_mean, running_var=running_var, momentum=momentum,
                                 training=training)
