"""MONAI's UNETR (Hatamizadeh et al. 2022) and its convolution blocks, with MONAI's module tree on fastmed ops.

The blocks keep the names of ``monai.networks.blocks`` (``dynunet_block`` / ``unetr_block``), so MONAI's
``UNETR`` and ``SwinUNETR`` state dicts load with ``load_state_dict(strict=True)`` unchanged:

=====================  ==========================================================================================
``UnetResBlock``       ``conv1.conv``, ``norm1``, ``conv2.conv``, ``norm2``, ``lrelu``; ``conv3.conv`` and ``norm3``
                       (1x1 projection of the residual) when the channels or the stride change:
                       ``lrelu(norm2(conv2(lrelu(norm1(conv1(x))))) + norm3(conv3(x)))``
``UnetBasicBlock``     ``conv1.conv``, ``norm1``, ``conv2.conv``, ``norm2``, ``lrelu``: two conv-norm-lrelu
``UnetrBasicBlock``    ``layer`` (one of the two above)
``UnetrUpBlock``       ``transp_conv.conv`` (kernel = stride = ``upsample_kernel_size``, no bias), then
                       ``conv_block(cat([up, skip], 1))``
``UnetrPrUpBlock``     ``transp_conv_init.conv``, ``blocks.<i>`` = ``(transposed conv, res/basic block)`` pairs
``UnetOutBlock``       ``conv.conv`` (1x1, with bias)
``UNETR``              ``vit.patch_embedding.{patch_embeddings, position_embeddings}``,
                       ``vit.blocks.<i>.{norm1, attn.qkv, attn.out_proj, norm2, norm_cross_attn, mlp.linear1,
                       mlp.linear2}``, ``vit.norm``, ``encoder1..4``, ``decoder5..2``, ``out``
=====================  ==========================================================================================

Every convolution of a block runs with its normalization, residual add and activation as one
:func:`fastmed.ops.conv_norm_act` (``fused=True``; a decoder's concatenation of the upsampled features and the skip
is read as two inputs, never written) or as MONAI's plain PyTorch composition (``fused=False``) on the same
parameters.  ``norm_name`` is MONAI's: ``"instance"`` (no affine parameters, MONAI's default), ``"batch"``,
``"group"`` (``("group", {"num_groups": g})``), or ``(name, kwargs)`` with ``affine``, ``eps``, ``momentum``,
``track_running_stats``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastmed._validate import check_int, check_per_axis, check_spatial_dims
from fastmed.models import _layers as L
from fastmed.nn.conv_block import conv_class
from fastmed.nn.norm_act import NormAct
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.window_attention import attention

__all__ = ["UNETR", "UnetResBlock", "UnetBasicBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetrPrUpBlock",
           "UnetOutBlock", "FusedModel"]

_NORM_KINDS = {"instance": "instance", "batch": "batch", "group": "group"}
_NORM_DEFAULTS = {"instance": {"affine": False}, "batch": {}, "group": {}}
NEGATIVE_SLOPE = 0.01  # MONAI's LeakyReLU in the UNETR blocks


def monai_norm(norm_name, channels: int) -> NormAct:
    """MONAI's ``get_norm_layer(norm_name, channels=channels)`` as a :class:`fastmed.nn.NormAct` (no activation),
    with the same parameter and buffer names."""
    if isinstance(norm_name, str):
        name, kwargs = norm_name, {}
    elif (isinstance(norm_name, tuple) and len(norm_name) == 2 and isinstance(norm_name[0], str)
          and isinstance(norm_name[1], dict)):
        name, kwargs = norm_name
    else:
        raise ValueError(f"norm_name must be one of {', '.join(_NORM_KINDS)} or a (name, kwargs) tuple, got "
                         f"{norm_name!r}")
    kind = _NORM_KINDS.get(name.lower())
    if kind is None:
        raise ValueError(f"norm_name must be one of {', '.join(_NORM_KINDS)}, got {name!r}")
    allowed = {"affine", "eps", "momentum", "track_running_stats", "num_groups"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"norm_name's arguments must be among {sorted(allowed)}, got {sorted(unknown)}")
    kwargs = {**_NORM_DEFAULTS[kind], **kwargs}
    if kind == "group" and "num_groups" not in kwargs:
        raise ValueError("norm_name 'group' needs num_groups: pass ('group', {'num_groups': g})")
    return NormAct(kind, channels, activation="identity", **kwargs)


class _Convolution(nn.Sequential):
    """MONAI's ``Convolution(conv_only=True)``: one child ``conv`` with MONAI's padding for (kernel, stride)."""

    def __init__(self, sd: int, cin: int, cout: int, kernel, stride, bias: bool = False, transposed: bool = False):
        super().__init__()
        kernel = check_per_axis(kernel, "kernel_size", sd, 1)
        stride = check_per_axis(stride, "stride", sd, 1)
        if any(k - s + 1 < 0 for k, s in zip(kernel, stride)):
            raise ValueError(f"kernel_size {kernel} must be >= stride - 1 {stride} on every axis (MONAI's padding)")
        pad = tuple((k - s + 1) // 2 for k, s in zip(kernel, stride))
        if transposed:
            out_pad = tuple(2 * p + s - k for p, s, k in zip(pad, stride, kernel))
            if min(out_pad) < 0:
                raise ValueError(f"upsample kernel_size {kernel} and stride {stride} give a negative output padding")
            conv = conv_class(sd, True)(cin, cout, kernel, stride, pad, output_padding=out_pad, bias=bias)
        else:
            conv = conv_class(sd)(cin, cout, kernel, stride, pad, bias=bias)
        self.add_module("conv", conv)


def _conv_norm(conv: _Convolution, norm: NormAct, x: torch.Tensor, fused: bool, act: bool,
               residual: Optional[torch.Tensor] = None, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lrelu?(norm(conv(cat([x, skip]))) + residual)``: one fastmed op, or MONAI's composition."""
    c = conv.conv
    if not fused:
        h = L.norm_eager(norm, c(x if skip is None else torch.cat([x, skip], dim=1)))
        if residual is not None:
            h = h + residual
        return F.leaky_relu(h, NEGATIVE_SLOPE) if act else h
    y = conv_norm_act(x, c.weight, c.bias, norm.weight, norm.bias, stride=c.stride, padding=c.padding,
                      dilation=c.dilation, norm=norm.kind, activation="leaky_relu" if act else "identity",
                      negative_slope=NEGATIVE_SLOPE, residual=residual, skip=skip, **norm.call_kwargs())
    norm.count_batch()
    return y


class _Block(nn.Module):
    """A block with MONAI's names whose convolutions run fused (``fused=True``) or as MONAI's PyTorch."""

    fused: bool = True


class UnetBasicBlock(_Block):
    """MONAI's ``UnetBasicBlock``: two conv-norm-lrelu, ``(N, Cin, *s) -> (N, Cout, *s / stride)``;
    ``forward(x, skip=None)`` reads ``cat([x, skip], 1)`` (``in_channels`` counts both)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 norm_name: Union[tuple, str] = "instance"):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        self.conv1 = _Convolution(sd, in_channels, out_channels, kernel_size, stride)
        self.conv2 = _Convolution(sd, out_channels, out_channels, kernel_size, 1)
        self.lrelu = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.norm1 = monai_norm(norm_name, out_channels)
        self.norm2 = monai_norm(norm_name, out_channels)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = _conv_norm(self.conv1, self.norm1, x, self.fused, True, skip=skip)
        return _conv_norm(self.conv2, self.norm2, h, self.fused, True)


class UnetResBlock(UnetBasicBlock):
    """MONAI's ``UnetResBlock``: :class:`UnetBasicBlock` whose second activation follows the residual add, the
    residual projected by ``conv3``/``norm3`` (1x1) when the channels or the stride change."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 norm_name: Union[tuple, str] = "instance"):
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size, stride, norm_name)
        sd = spatial_dims
        self.downsample = in_channels != out_channels or any(s != 1 for s in check_per_axis(stride, "stride", sd, 1))
        if self.downsample:
            self.conv3 = _Convolution(sd, in_channels, out_channels, 1, stride)
            self.norm3 = monai_norm(norm_name, out_channels)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        fused = self.fused
        h = _conv_norm(self.conv1, self.norm1, x, fused, True, skip=skip)
        if self.downsample:
            res = _conv_norm(self.conv3, self.norm3, x, fused, False, skip=skip)
        else:
            res = x if skip is None else torch.cat([x, skip], dim=1)
        return _conv_norm(self.conv2, self.norm2, h, fused, True, residual=res)


def _res_or_basic(res_block: bool):
    return UnetResBlock if res_block else UnetBasicBlock


class UnetrBasicBlock(nn.Module):
    """MONAI's ``UnetrBasicBlock``: ``layer`` = :class:`UnetResBlock` (``res_block``) or :class:`UnetBasicBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 norm_name: Union[tuple, str] = "instance", res_block: bool = False):
        super().__init__()
        self.layer = _res_or_basic(res_block)(spatial_dims, in_channels, out_channels, kernel_size, stride,
                                              norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """MONAI's ``UnetrUpBlock``: ``conv_block(cat([transp_conv(x), skip], 1))``;
    ``forward(x (N, Cin, *s), skip (N, Cout, *s * up)) -> (N, Cout, *s * up)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3,
                 upsample_kernel_size=2, norm_name: Union[tuple, str] = "instance", res_block: bool = False):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        self.transp_conv = _Convolution(sd, in_channels, out_channels, upsample_kernel_size, upsample_kernel_size,
                                        transposed=True)
        self.conv_block = _res_or_basic(res_block)(sd, 2 * out_channels, out_channels, kernel_size, 1, norm_name)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(self.transp_conv(x), skip)


class UnetrPrUpBlock(nn.Module):
    """MONAI's ``UnetrPrUpBlock``: ``transp_conv_init`` then ``num_layer`` x (transposed conv, conv block)
    (transposed convs only with ``conv_block=False``); ``(N, Cin, *s) -> (N, Cout, *s * up^(num_layer + 1))``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_layer: int, kernel_size=3,
                 stride=1, upsample_kernel_size=2, norm_name: Union[tuple, str] = "instance",
                 conv_block: bool = False, res_block: bool = False):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        up = upsample_kernel_size
        self.transp_conv_init = _Convolution(sd, in_channels, out_channels, up, up, transposed=True)

        def upconv():
            return _Convolution(sd, out_channels, out_channels, up, up, transposed=True)

        if conv_block:
            block = _res_or_basic(res_block)
            self.blocks = nn.ModuleList(
                nn.Sequential(upconv(), block(sd, out_channels, out_channels, kernel_size, stride, norm_name))
                for _ in range(num_layer))
        else:
            self.blocks = nn.ModuleList(upconv() for _ in range(num_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class UnetOutBlock(nn.Module):
    """MONAI's ``UnetOutBlock``: a 1x1 convolution with bias, ``conv.conv``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _Convolution(check_spatial_dims(spatial_dims), in_channels, out_channels, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ----------------------------------------------------------------------------------------------- MONAI's ViT
class _SABlock(nn.Module):
    """MONAI's ``SABlock`` (``qkv``, ``out_proj``): fastmed attention (fused) or the explicit softmax."""

    fused: bool = True

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_weights = nn.Dropout(dropout_rate)
        self.drop_output = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused and not (self.training and self.drop_weights.p > 0):
            out = attention(q, k, v, scale=self.scale)
        else:
            out = self.drop_weights(torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)) @ v
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(B, N, C)))


class _MLPBlock(nn.Module):
    """MONAI's ``MLPBlock`` (``dropout_mode="vit"``): ``drop2(linear2(drop1(gelu(linear1(x)))))``."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(dropout_rate)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class _TransformerBlock(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float, qkv_bias: bool):
        super().__init__()
        self.mlp = _MLPBlock(hidden_size, mlp_dim, dropout_rate)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = _SABlock(hidden_size, num_heads, dropout_rate, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm_cross_attn = nn.LayerNorm(hidden_size)  # unused (no cross attention): kept for MONAI's keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbedding(nn.Module):
    """MONAI's ``PatchEmbeddingBlock(proj_type="conv", pos_embed_type="learnable")``."""

    def __init__(self, sd: int, in_channels: int, img_size, patch: int, hidden_size: int, dropout_rate: float):
        super().__init__()
        self.grid = tuple(s // patch for s in img_size)
        self.patch_embeddings = conv_class(sd)(in_channels, hidden_size, patch, patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(self.grid), hidden_size))
        self.dropout = nn.Dropout(dropout_rate)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embeddings(x)
        grid = tuple(h.shape[2:])
        pos = self.position_embeddings
        if grid != self.grid:  # another input size: interpolate the learned embeddings (timm's dynamic size)
            pos = pos.transpose(1, 2).reshape(1, -1, *self.grid)
            pos = F.interpolate(pos, size=grid, mode="bilinear" if len(grid) == 2 else "trilinear",
                                align_corners=False).flatten(2).transpose(1, 2)
        return self.dropout(h.flatten(2).transpose(1, 2) + pos)


class _ViT(nn.Module):
    def __init__(self, sd, in_channels, img_size, patch, hidden_size, mlp_dim, num_layers, num_heads, dropout_rate,
                 qkv_bias):
        super().__init__()
        self.patch_embedding = _PatchEmbedding(sd, in_channels, img_size, patch, hidden_size, dropout_rate)
        self.blocks = nn.ModuleList(_TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)


class FusedModel(nn.Module):
    """``fused`` of a model: True when every submodule that has a boolean ``fused`` flag (conv blocks, attention,
    window attention) runs fastmed ops; setting it sets them all."""

    def _switches(self):
        return [m for m in self.modules() if m is not self and isinstance(getattr(m, "fused", None), bool)]

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self._switches())

    @fused.setter
    def fused(self, value: bool) -> None:
        for m in self._switches():
            m.fused = bool(value)


class UNETR(FusedModel):
    """MONAI's ``UNETR``: a ViT (patch 16, 12 blocks, no class token) whose blocks 3, 6 and 9 and final norm feed a
    convolutional decoder.  Same constructor and state-dict keys as ``monai.networks.nets.UNETR``, so MONAI
    checkpoints load strictly and the outputs agree.

    Args (MONAI's):
        in_channels, out_channels: image channels, classes.
        img_size: int or per-axis ints, multiples of 16 (the position embeddings' grid).
        feature_size: 16; hidden_size: 768; mlp_dim: 3072; num_heads: 12 (must divide hidden_size).
        proj_type: ``"conv"`` (MONAI's ``"perceptron"`` is not implemented: ValueError).
        norm_name: see the module docstring; conv_block, res_block: True (MONAI's decoder choices).
        dropout_rate: dropout in the ViT (embeddings, attention weights and output, MLP).
        spatial_dims: 3 or 2; qkv_bias: False; save_attn: only False (ValueError otherwise).
        fused: fastmed ops (True) or MONAI's plain PyTorch (False) on the same parameters; settable later.
        checkpointing: recompute each transformer block in the backward pass.

    ``forward(x (N, in_channels, *sp)) -> (N, out_channels, *sp)`` with every size a multiple of 16; sizes other
    than ``img_size`` interpolate the position embeddings (MONAI raises for them).  92,802,478 parameters with the
    defaults, in 1, out 14, img_size 96 (92.80M, as MONAI).
    """

    def __init__(self, in_channels: int, out_channels: int, img_size: Union[Sequence[int], int],
                 feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12,
                 proj_type: str = "conv", norm_name: Union[tuple, str] = "instance", conv_block: bool = True,
                 res_block: bool = True, dropout_rate: float = 0.0, spatial_dims: int = 3, qkv_bias: bool = False,
                 save_attn: bool = False, fused: bool = True, checkpointing: bool = False):
        super().__init__()
        sd = L.check_model_args(self, spatial_dims, in_channels, out_channels)
        f = check_int(feature_size, "feature_size", 1)
        hidden_size = check_int(hidden_size, "hidden_size", 1)
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate!r}")
        if hidden_size % check_int(num_heads, "num_heads", 1):
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if proj_type != "conv":
            raise ValueError(f"proj_type must be 'conv' (fastmed's UNETR has no 'perceptron' embedding), got "
                             f"{proj_type!r}")
        if save_attn:
            raise ValueError("save_attn=True is not supported (the fused attention never forms the matrix)")
        self.patch = 16
        img = check_per_axis(img_size, "img_size", sd, 1)
        if any(s % self.patch for s in img):
            raise ValueError(f"img_size must be a multiple of 16 on every axis, got {img}")
        self.img_size, self.hidden_size = img, hidden_size
        self.vit = _ViT(sd, in_channels, img, self.patch, hidden_size, mlp_dim, 12, num_heads, dropout_rate, qkv_bias)
        common = dict(kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(sd, in_channels, f, 3, 1, norm_name, res_block)
        self.encoder2 = UnetrPrUpBlock(sd, hidden_size, 2 * f, 2, stride=1, conv_block=conv_block, **common)
        self.encoder3 = UnetrPrUpBlock(sd, hidden_size, 4 * f, 1, stride=1, conv_block=conv_block, **common)
        self.encoder4 = UnetrPrUpBlock(sd, hidden_size, 8 * f, 0, stride=1, conv_block=conv_block, **common)
        self.decoder5 = UnetrUpBlock(sd, hidden_size, 8 * f, **common)
        self.decoder4 = UnetrUpBlock(sd, 8 * f, 4 * f, **common)
        self.decoder3 = UnetrUpBlock(sd, 4 * f, 2 * f, **common)
        self.decoder2 = UnetrUpBlock(sd, 2 * f, f, **common)
        self.out = UnetOutBlock(sd, f, out_channels)
        self.fused, self.checkpointing = fused, checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = L.patch_grid(x, self.spatial_dims, self.in_channels, self.patch, "UNETR", "16")

        def as_grid(t):
            return t.transpose(1, 2).reshape(x.shape[0], self.hidden_size, *grid)

        tokens = self.vit.patch_embedding(x)
        hidden = []
        for blk in self.vit.blocks:
            tokens = L.maybe_checkpoint(blk, tokens, enabled=self.checkpointing)
            hidden.append(tokens)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(as_grid(hidden[3]))
        enc3 = self.encoder3(as_grid(hidden[6]))
        enc4 = self.encoder4(as_grid(hidden[9]))
        d = self.decoder5(as_grid(self.vit.norm(tokens)), enc4)
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        return self.out(self.decoder2(d, enc1))
