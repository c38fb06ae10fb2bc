"""MONAI's SwinUNETR (Hatamizadeh et al. 2022; ``use_v2``: SwinUNETR-V2, He et al. 2023) on fastmed blocks.

Module tree and state-dict keys = ``monai.networks.nets.SwinUNETR`` (MONAI 1.6), so MONAI checkpoints load with
``load_state_dict(strict=True)``::

    swinViT.patch_embed.proj (Conv, kernel = stride = patch_size), swinViT.patch_embed.norm (patch_norm=True)
    swinViT.layers<k>.0.blocks.<j>.{norm1, attn.{qkv, proj, relative_position_bias_table,
                                    relative_position_index}, norm2, mlp.{linear1, linear2}}     (k = 1..4)
    swinViT.layers<k>.0.downsample.{norm, reduction}                                          (PatchMerging)
    swinViT.layers<k>c.0.layer.*   (use_v2: a residual conv block before each stage)
    encoder1, encoder2, encoder3, encoder4, encoder10 (UnetrBasicBlock, residual),
    decoder5 .. decoder1 (UnetrUpBlock, residual), out.conv.conv (1x1)

The Swin blocks are :class:`fastmed.nn.SwinTransformerBlock` (window attention by
:func:`fastmed.ops.window_attention`, the shifted-window mask computed in the kernel); the convolution blocks are
:mod:`fastmed.models.unetr`'s (conv + norm + residual + LeakyReLU in one :func:`fastmed.ops.conv_norm_act`).
``fused=False`` runs the same parameters through MONAI's PyTorch composition.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastmed._validate import check_int, check_per_axis
from fastmed.models import _layers as L
from fastmed.models.unetr import FusedModel, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from fastmed.nn.conv_block import conv_class
from fastmed.nn.swin import PatchMerging, SwinTransformerBlock

__all__ = ["SwinUNETR"]

MERGING_MODES = ("merging", "mergingv2")
STAGES = 4  # MONAI's SwinTransformer has layers1..layers4


class _PatchEmbed(nn.Module):
    """MONAI's ``PatchEmbed``: conv with kernel = stride = patch (channels first), optional LayerNorm."""

    def __init__(self, sd: int, patch, in_chans: int, embed_dim: int, norm_layer):
        super().__init__()
        self.patch = patch
        self.proj = conv_class(sd)(in_chans, embed_dim, patch, patch)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for s, p in zip(reversed(x.shape[2:]), reversed(self.patch)):
            pads += [0, -s % p]
        if any(pads):
            x = F.pad(x, pads)
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return x


class _BasicLayer(nn.Module):
    """MONAI's ``BasicLayer``: Swin blocks (every second one shifted by window // 2), then ``downsample``;
    channels-first in and out."""

    def __init__(self, dim, depth, num_heads, window, drop_path, mlp_ratio, qkv_bias, drop, attn_drop, norm_layer,
                 downsample, fused):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window, shift if j % 2 else (0,) * len(window), mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[j],
                                 norm_layer=norm_layer, fused=fused)
            for j in range(depth))
        self.downsample = downsample(dim=dim, norm_layer=norm_layer, spatial_dims=len(window)) if downsample else None

    def forward(self, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
        x = x.movedim(1, -1)
        for blk in self.blocks:
            x = L.maybe_checkpoint(blk, x, enabled=checkpointing)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.movedim(-1, 1)


def _merging(mode: str):
    def make(dim, norm_layer, spatial_dims):
        return PatchMerging(dim, norm_layer=norm_layer, spatial_dims=spatial_dims, mode=mode)

    return make


class _SwinTransformer(nn.Module):
    """MONAI's ``SwinTransformer`` (``swinViT``): returns the five LayerNorm-ed feature maps, channels first."""

    def __init__(self, sd, in_chans, embed_dim, window, patch, depths, num_heads, mlp_ratio, qkv_bias, drop_rate,
                 attn_drop_rate, drop_path_rate, norm_layer, patch_norm, downsample, use_v2, fused):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = _PatchEmbed(sd, patch, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # torch.linspace(0, rate, total)
        self.use_v2 = use_v2
        for i in range(STAGES):
            dim = embed_dim * 2 ** i
            layer = _BasicLayer(dim, depths[i], num_heads[i], window, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, norm_layer, downsample, fused)
            setattr(self, f"layers{i + 1}", nn.ModuleList([layer]))
            if use_v2:
                setattr(self, f"layers{i + 1}c",
                        nn.ModuleList([UnetrBasicBlock(sd, dim, dim, 3, 1, "instance", res_block=True)]))

    def forward(self, x: torch.Tensor, normalize: bool = True, checkpointing: bool = False) -> list:
        x = self.pos_drop(self.patch_embed(x))
        outs = [_proj_out(x, normalize)]
        for i in range(1, STAGES + 1):
            if self.use_v2:
                x = getattr(self, f"layers{i}c")[0](x)
            x = getattr(self, f"layers{i}")[0](x, checkpointing)
            outs.append(_proj_out(x, normalize))
        return outs


def _proj_out(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """LayerNorm over the channels without parameters (MONAI's ``proj_out``)."""
    if not normalize:
        return x
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],)).movedim(-1, 1)


class SwinUNETR(FusedModel):
    """SwinUNETR with MONAI's constructor, module names and computation.

    Args (MONAI's, same defaults):
        in_channels, out_channels: image channels, classes.
        patch_size: 2 (the only size MONAI's decoder fits); depths: (2, 2, 2, 2) (four stages);
            num_heads: (3, 6, 12, 24); window_size: 7 (int or per axis); qkv_bias: True; mlp_ratio: 4.0;
            feature_size: 24 (a multiple of 12).
        norm_name: the conv blocks' norm (see :mod:`fastmed.models.unetr`), default ``"instance"``.
        drop_rate, attn_drop_rate, dropout_path_rate: dropout, attention dropout (the fused kernel has none: with
            ``attn_drop_rate > 0`` training runs the eager attention), stochastic depth (linear up to the rate).
        normalize: LayerNorm the encoder's feature maps before the decoder; norm_layer: nn.LayerNorm;
        patch_norm: LayerNorm after the patch embedding; use_checkpoint: recompute each Swin block in the backward
            pass (also settable as ``checkpointing``); spatial_dims: 3 or 2;
        downsample: ``"merging"`` (default), ``"mergingv2"`` or a module class called as MONAI's
            (``downsample(dim=, norm_layer=, spatial_dims=)``); use_v2: SwinUNETR-V2's residual conv block before
            each stage.
        use_hyena, hyena_stages: only the defaults (MONAI's HyenaND blocks are not implemented: ValueError).
        use_flash_attention: accepted for MONAI's signature; fastmed's fused window attention runs either way.
        pad: pad inputs whose size is not a multiple of ``patch_size ** 5`` (zeros at the end) and crop the logits
            back (MONAI raises for them); with ``pad=False`` such inputs raise ``ValueError``.
        fused: fastmed ops (True) or MONAI's PyTorch (False) on the same parameters; settable later.

    ``forward(x (N, in_channels, *sp)) -> (N, out_channels, *sp)``.  62,187,296 parameters (62.19M) with
    feature_size 48, in 1, out 14 (MONAI's BTCV model).
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int = 2,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[Sequence[int], int] = 7, qkv_bias: bool = True, mlp_ratio: float = 4.0,
                 feature_size: int = 24, norm_name: Union[tuple, str] = "instance", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, dropout_path_rate: float = 0.0, normalize: bool = True,
                 norm_layer: type[nn.LayerNorm] = nn.LayerNorm, patch_norm: bool = False,
                 use_checkpoint: bool = False, spatial_dims: int = 3, downsample: Union[str, type] = "merging",
                 use_v2: bool = False, use_hyena: bool = False, hyena_stages: Optional[Sequence[bool]] = None,
                 use_flash_attention: bool = False, pad: bool = True, fused: bool = True):
        super().__init__()
        sd = L.check_model_args(self, spatial_dims, in_channels, out_channels)
        self.patch_size = check_int(patch_size, "patch_size", 1)
        if self.patch_size != 2:  # MONAI accepts others, then fails in forward: the decoder upsamples 2**5
            raise ValueError(f"patch_size must be 2 (the decoder's five 2x upsamplings return to the image), got "
                             f"{patch_size}")
        f = check_int(feature_size, "feature_size", 1)
        if f % 12:
            raise ValueError(f"feature_size must be divisible by 12, got {feature_size}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("dropout_path_rate", dropout_path_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
        if len(depths) != STAGES or len(num_heads) != STAGES:
            raise ValueError(f"depths and num_heads must list {STAGES} stages, got {tuple(depths)} and "
                             f"{tuple(num_heads)}")
        for i, h in enumerate(num_heads):
            if (f * 2 ** i) % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage's channels {f * 2 ** i}")
        if use_hyena or (hyena_stages is not None and any(hyena_stages)):
            raise ValueError("use_hyena / hyena_stages: MONAI's HyenaND blocks are not implemented in fastmed; "
                             "only windowed attention (use_hyena=False, hyena_stages=None)")
        if isinstance(downsample, str):
            if downsample not in MERGING_MODES:
                raise ValueError(f"downsample must be one of {MERGING_MODES} or a module class, got {downsample!r}")
            downsample = _merging(downsample)
        window = check_per_axis(window_size, "window_size", sd, 1)
        self.normalize, self.pad, self.checkpointing = normalize, pad, use_checkpoint
        self.use_flash_attention = use_flash_attention
        self.multiple = self.patch_size ** 5
        self.swinViT = _SwinTransformer(sd, in_channels, f, window, (self.patch_size,) * sd, depths, num_heads,
                                        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dropout_path_rate, norm_layer,
                                        patch_norm, downsample, use_v2, fused)

        def basic(c_in, c_out):
            return UnetrBasicBlock(sd, c_in, c_out, 3, 1, norm_name, res_block=True)

        def up(c_in, c_out):
            return UnetrUpBlock(sd, c_in, c_out, 3, 2, norm_name, res_block=True)

        self.encoder1 = basic(in_channels, f)
        self.encoder2 = basic(f, f)
        self.encoder3 = basic(2 * f, 2 * f)
        self.encoder4 = basic(4 * f, 4 * f)
        self.encoder10 = basic(16 * f, 16 * f)
        self.decoder5 = up(16 * f, 8 * f)
        self.decoder4 = up(8 * f, 4 * f)
        self.decoder3 = up(4 * f, 2 * f)
        self.decoder2 = up(2 * f, f)
        self.decoder1 = up(f, f)
        self.out = UnetOutBlock(sd, f, out_channels)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L.check_input(x, self.spatial_dims, self.in_channels, "SwinUNETR")
        size = tuple(x.shape[2:])
        x = L.pad_to_multiple(x, self.multiple, self.pad, "SwinUNETR", "patch_size ** 5")
        hidden = self.swinViT(x, self.normalize, self.checkpointing)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        logits = self.out(self.decoder1(dec0, enc0))
        return L.crop_to(logits, size)
