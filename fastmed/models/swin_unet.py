"""Swin-Unet (Cao et al. 2021, ``SwinTransformerSys``) from fastmed's Swin blocks, 2D and 3D.

Module tree = the official Swin-Unet's, so its checkpoints load through
:func:`fastmed.convert.from_swin_unet` (only ``mlp.fc1/fc2`` -> ``mlp.linear1/linear2`` are renamed)::

    patch_embed.proj (Conv, kernel = stride = patch), patch_embed.norm (LayerNorm)
    layers.<i>.blocks.<j>.{norm1, attn.{qkv, proj, relative_position_bias_table}, norm2, mlp.{linear1, linear2}}
    layers.<i>.downsample.{norm, reduction}                       (i < len(depths) - 1: PatchMerging)
    norm                                                           (LayerNorm of the bottleneck)
    layers_up.0.{expand, norm}                                     (PatchExpand)
    layers_up.<i>.blocks.<j>..., layers_up.<i>.upsample.{expand, norm}   (i > 0)
    concat_back_dim.<i> (Linear 2C -> C; i = 0 is the identity)
    norm_up, up.{expand, norm} (final x4 expand), output (1x1 conv, no bias)

The window attention runs :func:`fastmed.ops.window_attention` (``fused=True``) or the eager timm/MONAI
composition (``fused=False``), with the same parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastmed._validate import check_int, check_per_axis
from fastmed.models import _layers as L
from fastmed.nn.conv_block import conv_class
from fastmed.nn.swin import FinalPatchExpandX4, PatchExpand, PatchMerging, SwinTransformerBlock, WindowAttention

__all__ = ["SwinUNet"]


class _PatchEmbed(nn.Module):
    def __init__(self, sd, in_chans, embed_dim, patch):
        super().__init__()
        self.proj = conv_class(sd)(in_chans, embed_dim, patch, patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.movedim(1, -1))  # (B, *grid, C)


class _Expand3d(nn.Module):
    """3D patch expanding: Linear(C -> s^3 * C_out, no bias) -> s x s x s shuffle -> LayerNorm(C_out)."""

    def __init__(self, dim: int, scale: int, out_dim: int):
        super().__init__()
        self.dim, self.scale, self.out_dim = dim, scale, out_dim
        self.expand = nn.Linear(dim, scale ** 3 * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        B, D, H, W, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).view(B, D, H, W, s, s, s, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return self.norm(x.reshape(B, D * s, H * s, W * s, c))


class _Layer(nn.Module):
    """Swin stage: blocks (shift every second), then an optional down/up-sampling module."""

    def __init__(self, dim, depth, heads, window, mlp_ratio, drop_path, resample_name, resample, fused):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, heads, window, shift if j % 2 else (0,) * len(window), mlp_ratio=mlp_ratio,
                                 qkv_bias=True, drop_path=drop_path[j], fused=fused, bias_index="coords")
            for j in range(depth))
        setattr(self, resample_name, resample)
        self._resample_name = resample_name

    def forward(self, x, checkpointing: bool):
        for blk in self.blocks:
            x = L.maybe_checkpoint(blk, x, enabled=checkpointing)
        resample = getattr(self, self._resample_name)
        return x if resample is None else resample(x)


class SwinUNet(nn.Module):
    """Swin-Unet: a Swin Transformer encoder, a symmetric Swin decoder with patch expanding, skip connections.

    Args:
        spatial_dims: 2 (Swin-Unet) or 3 (the same design with 3D windows, merging and expanding).
        in_channels, out_channels: image channels, classes.
        img_size: the design size (224), recorded as ``img_size``; any input size works (see ``pad``).
        patch_size: 4; embed_dim: 96; depths: (2, 2, 2, 2) (the decoder reuses them); num_heads: (3, 6, 12, 24);
        window_size: 7 (int or per axis); mlp_ratio: 4; drop_path_rate: 0.1 (stochastic depth, linear).
        pad: pad inputs whose size is not a multiple of ``patch_size * 2**(len(depths) - 1)`` (zeros at the end)
            and crop the logits back; with ``pad=False`` such inputs raise ``ValueError``.
        fused: fastmed window attention (True) or the eager composition (False); settable later.
        checkpointing: recompute each Swin block in the backward pass.

    Windows follow Swin-Unet: an axis whose token grid is not larger than the window uses the whole axis with no
    shift; other grids not divisible by the window are padded inside the attention (MONAI's rule).

    ``forward(x (N, in_channels, *sp)) -> (N, out_channels, *sp)``.  27.17M parameters with the defaults and 9
    classes (Synapse).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 9,
                 img_size: int = 224, patch_size: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size=7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, pad: bool = True,
                 fused: bool = True, checkpointing: bool = False):
        super().__init__()
        sd = L.check_model_args(self, spatial_dims, in_channels, out_channels)
        self.patch_size = check_int(patch_size, "patch_size", 1)
        embed_dim = check_int(embed_dim, "embed_dim", 1)
        if len(depths) != len(num_heads) or len(depths) < 2:
            raise ValueError(f"depths and num_heads must have the same length, at least 2 stages, got {depths!r} "
                             f"and {num_heads!r}")
        n = len(depths)
        for i, h in enumerate(num_heads):
            if (embed_dim * 2 ** i) % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage's channels {embed_dim * 2 ** i}")
        window = check_per_axis(window_size, "window_size", sd, 1)
        self.window_size = window
        self.multiple = patch_size * 2 ** (n - 1)
        self.pad, self.checkpointing = pad, checkpointing
        self.img_size = img_size
        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # torch.linspace(0, rate, total)

        self.patch_embed = _PatchEmbed(sd, in_channels, embed_dim, patch_size)
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = embed_dim * 2 ** i
            down = PatchMerging(dim, spatial_dims=sd) if i < n - 1 else None
            self.layers.append(_Layer(dim, depths[i], num_heads[i], window, mlp_ratio,
                                      dpr[sum(depths[:i]):sum(depths[:i + 1])], "downsample", down, fused))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (n - 1))

        def expand(dim):
            return PatchExpand(dim) if sd == 2 else _Expand3d(dim, 2, dim // 2)

        self.layers_up = nn.ModuleList()
        self.concat_back_dim = nn.ModuleList()
        for i in range(n):
            dim = embed_dim * 2 ** (n - 1 - i)
            if i == 0:
                self.layers_up.append(expand(dim))
                self.concat_back_dim.append(nn.Identity())
                continue
            s = n - 1 - i
            self.layers_up.append(_Layer(dim, depths[s], num_heads[s], window, mlp_ratio,
                                         dpr[sum(depths[:s]):sum(depths[:s + 1])], "upsample",
                                         expand(dim) if i < n - 1 else None, fused))
            self.concat_back_dim.append(nn.Linear(2 * dim, dim))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = FinalPatchExpandX4(embed_dim) if sd == 2 and patch_size == 4 else _final_expand(
            sd, embed_dim, patch_size)
        self.output = conv_class(sd)(embed_dim, out_channels, 1, bias=False)
        self.apply(_init_weights)

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.modules() if isinstance(m, WindowAttention))

    @fused.setter
    def fused(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L.check_input(x, self.spatial_dims, self.in_channels, "SwinUNet")
        size = tuple(x.shape[2:])
        x = L.pad_to_multiple(x, self.multiple, self.pad, "SwinUNet", "patch_size * 2**(stages - 1)")
        ckpt = self.checkpointing
        x = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x, ckpt)
        x = self.norm(x)
        n = len(self.layers_up)
        for i, layer_up in enumerate(self.layers_up):
            if i == 0:
                x = layer_up(x)
            else:
                x = self.concat_back_dim[i](torch.cat([x, skips[n - 1 - i]], dim=-1))
                x = layer_up(x, ckpt)
        x = self.up(self.norm_up(x))
        logits = self.output(x.movedim(-1, 1))
        return L.crop_to(logits, size)


def _final_expand(sd: int, dim: int, scale: int) -> nn.Module:
    if sd == 3:
        return _Expand3d(dim, scale, dim)
    raise ValueError(f"the 2D Swin-Unet's final expanding is x4: patch_size must be 4, got {scale}")


def _init_weights(m: nn.Module) -> None:
    """Swin-Unet's initialization: truncated normal (std 0.02) Linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
