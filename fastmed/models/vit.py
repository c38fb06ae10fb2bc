"""Vision Transformer (Dosovitskiy et al.) with timm's defaults and state-dict names, 2D or 3D patches.

Keys = timm's ``VisionTransformer`` (``timm.create_model("vit_base_patch16_224")`` loads after
:func:`fastmed.convert.from_timm_vit`, which only drops timm's parameter-free entries)::

    cls_token (1, 1, C), pos_embed (1, 1 + N, C), patch_embed.proj (Conv, kernel = stride = patch)
    blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
    norm, head

Attention runs :func:`fastmed.ops.attention` (``fused=True``: scaled_dot_product_attention, flash / cuDNN /
memory-efficient kernels on GPU) or the explicit ``softmax(q k^T / sqrt(d)) v`` (``fused=False``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmed.models import _layers as L
from fastmed.ops.window_attention import attention

__all__ = ["ViT"]


class _PatchEmbed(nn.Module):
    def __init__(self, sd, in_chans, dim, patch):
        super().__init__()
        self.proj = (nn.Conv3d if sd == 3 else nn.Conv2d)(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class _Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = attention(q, k, v)
        else:
            out = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT with a class token, learned position embeddings, pre-norm blocks (LayerNorm eps 1e-6).

    Args:
        spatial_dims: 2 or 3 (3D patches of ``patch_size``^3).
        img_size: design size per axis (position embeddings are built for it; other sizes that are multiples
            of ``patch_size`` interpolate them, as timm's ``dynamic_img_size``).
        patch_size, in_channels, num_classes (0: no head), embed_dim, depth, num_heads, mlp_ratio, qkv_bias.
        fused: fastmed attention (True) or the explicit softmax (False); settable later.
        checkpointing: recompute each block in the backward pass.

    ``forward(x (N, in_channels, *sp))``: logits ``(N, num_classes)``, or the class-token features
    ``(N, embed_dim)`` when ``num_classes=0``.  ``forward_features(x)``: all tokens ``(N, 1 + patches, embed_dim)``
    after the final norm; ``feature_grid(x)``: the patch tokens as ``(N, embed_dim, *sp / patch)`` (an encoder
    for UNETR-style decoders).
    """

    def __init__(self, spatial_dims: int = 2, img_size: int = 224, patch_size: int = 16, in_channels: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, fused: bool = True, checkpointing: bool = False):
        super().__init__()
        sd = L.check_spatial_dims(spatial_dims)
        self.spatial_dims = sd
        self.img_size = L.check_positive_int(img_size, "img_size")
        self.patch_size = L.check_positive_int(patch_size, "patch_size")
        self.in_channels = L.check_positive_int(in_channels, "in_channels")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head), got {num_classes!r}")
        embed_dim = L.check_positive_int(embed_dim, "embed_dim")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.grid = (img_size // patch_size,) * sd
        self.num_classes, self.embed_dim, self.checkpointing = num_classes, embed_dim, checkpointing
        self.patch_embed = _PatchEmbed(sd, in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio, qkv_bias, 1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.fused = fused

    @classmethod
    def b16(cls, num_classes: int = 1000, **kwargs) -> "ViT":
        """ViT-B/16 (timm ``vit_base_patch16_224``): 86,567,656 parameters with 1000 classes."""
        return cls(num_classes=num_classes, **kwargs)

    @property
    def fused(self) -> bool:
        return all(b.attn.fused for b in self.blocks)

    @fused.setter
    def fused(self, value: bool) -> None:
        for b in self.blocks:
            b.attn.fused = bool(value)

    def _pos_embed(self, grid) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.transpose(1, 2).reshape(1, self.embed_dim, *self.grid)
        mode = "bicubic" if self.spatial_dims == 2 else "trilinear"
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode=mode, align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        L.check_input(x, self.spatial_dims, self.in_channels, "ViT")
        size = tuple(x.shape[2:])
        if any(s % self.patch_size for s in size):
            raise ValueError(f"ViT: every spatial size must be a multiple of patch_size={self.patch_size}, got {size}")
        grid = tuple(s // self.patch_size for s in size)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self._pos_embed(grid)
        for blk in self.blocks:
            tokens = L.maybe_checkpoint(blk, tokens, enabled=self.checkpointing)
        return self.norm(tokens)

    def feature_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final norm as a feature map ``(N, embed_dim, *sp / patch)``."""
        tokens = self.forward_features(x)[:, 1:]
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])
