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

from fastmed._validate import check_int, check_spatial_dims
from fastmed.models import _layers as L
from fastmed.nn.conv_block import ResidualBlock, conv_class
from fastmed.ops.window_attention import attention

__all__ = ["ViT", "ViTUNETR"]


class _PatchEmbed(nn.Module):
    def __init__(self, sd, in_chans, dim, patch):
        super().__init__()
        self.proj = conv_class(sd)(in_chans, dim, patch, patch)

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
        sd = check_spatial_dims(spatial_dims)
        self.spatial_dims = sd
        self.img_size = check_int(img_size, "img_size", 1)
        self.patch_size = check_int(patch_size, "patch_size", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        num_classes = check_int(num_classes, "num_classes", 0)  # 0: no head
        embed_dim = check_int(embed_dim, "embed_dim", 1)
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
    def b16(cls, num_classes: int = 1000, **kwargs) -> ViT:
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
        grid = L.patch_grid(x, self.spatial_dims, self.in_channels, self.patch_size, "ViT",
                            f"patch_size={self.patch_size}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self._pos_embed(grid)
        for blk in self.blocks:
            tokens = L.maybe_checkpoint(blk, tokens, enabled=self.checkpointing)
        return self.norm(tokens)

    def hidden_grids(self, x: torch.Tensor, layers) -> tuple[list, torch.Tensor]:
        """Patch tokens after the blocks with the given (0-based) indices, before the final norm, as feature
        maps ``(N, embed_dim, *sp / patch)`` (UNETR's skips), and the final normed map."""
        grid = L.patch_grid(x, self.spatial_dims, self.in_channels, self.patch_size, "ViT",
                            f"patch_size={self.patch_size}")

        def as_grid(t):
            return t[:, 1:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)

        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self._pos_embed(grid)
        hidden = []
        for i, blk in enumerate(self.blocks):
            tokens = L.maybe_checkpoint(blk, tokens, enabled=self.checkpointing)
            if i in layers:
                hidden.append(as_grid(tokens))
        return hidden, as_grid(self.norm(tokens))

    def feature_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final norm as a feature map ``(N, embed_dim, *sp / patch)``."""
        tokens = self.forward_features(x)[:, 1:]
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


class ViTUNETR(nn.Module):
    """UNETR-style model (Hatamizadeh et al. 2022) on fastmed's timm-compatible :class:`ViT` encoder (no class-token
    head) whose blocks 3, 6, 9 and 12 feed a convolutional decoder built from fastmed's residual conv blocks.

    Layout (``f = feature_size``, ``E = embed_dim``; every "res" is a :class:`fastmed.nn.ResidualBlock`,
    conv-norm-act, conv-norm, 1x1 skip, add, act):
        ``encoder1``  res(in -> f) on the image
        ``encoder2``  tokens of block 3: up(E -> 2f), then 2 x [up(2f -> 2f), res]   (image / 2)
        ``encoder3``  tokens of block 6: up(E -> 4f), then 1 x [up, res]             (image / 4)
        ``encoder4``  tokens of block 9: up(E -> 8f)                                 (image / 8)
        ``decoder5..2``  up(C -> C'), concatenate the skip, res(2C' -> C'), up to full resolution
        ``out``       1x1 convolution to ``out_channels``
    with ``up`` a 2x transposed convolution.  ``patch_size`` must be 16 (four 2x upsamplings back to the image).

    ``forward(x (N, in_channels, *sp))`` with sizes multiples of 16 -> ``(N, out_channels, *sp)``.
    ``fused=False`` runs the conv blocks and attention in plain PyTorch; ``checkpointing=True`` recomputes each
    transformer block in the backward pass.  MONAI's UNETR differs in details (no class token, LayerNorm eps
    1e-5, instance norm without affine), so its checkpoints do not load here: :class:`fastmed.models.UNETR` is
    MONAI's model (this class was ``UNETR`` before).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, img_size: int = 96,
                 patch_size: int = 16, feature_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, norm: str = "instance", act: str = "leaky_relu",
                 fused: bool = True, checkpointing: bool = False):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        if patch_size != 16:
            raise ValueError(f"UNETR's decoder upsamples 16x (four 2x steps): patch_size must be 16, "
                             f"got {patch_size!r}")
        if depth < 4 or depth % 4:
            raise ValueError(f"depth must be a positive multiple of 4 (skips after blocks depth/4, depth/2, "
                             f"3*depth/4), got {depth!r}")
        f = check_int(feature_size, "feature_size", 1)
        self.spatial_dims, self.in_channels, self.out_channels = sd, in_channels, out_channels
        self.skip_layers = (depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1)
        self.vit = ViT(sd, img_size, patch_size, in_channels, num_classes=0, embed_dim=embed_dim, depth=depth,
                       num_heads=num_heads, mlp_ratio=mlp_ratio, fused=fused)
        blk = dict(norm=norm, act=act, bias=False)

        def res(cin, cout):
            return ResidualBlock(sd, cin, cout, 3, 1, **blk)

        def up(cin, cout):  # 2x transposed convolution without bias
            return (nn.ConvTranspose3d if sd == 3 else nn.ConvTranspose2d)(cin, cout, 2, 2, bias=False)

        def pr_up(n_layers, cout):
            return nn.Sequential(up(embed_dim, cout), *[nn.Sequential(up(cout, cout), res(cout, cout))
                                                        for _ in range(n_layers)])

        self.encoder1 = res(in_channels, f)
        self.encoder2 = pr_up(2, 2 * f)
        self.encoder3 = pr_up(1, 4 * f)
        self.encoder4 = pr_up(0, 8 * f)
        self.decoder5 = nn.ModuleDict({"up": up(embed_dim, 8 * f), "res": res(16 * f, 8 * f)})
        self.decoder4 = nn.ModuleDict({"up": up(8 * f, 4 * f), "res": res(8 * f, 4 * f)})
        self.decoder3 = nn.ModuleDict({"up": up(4 * f, 2 * f), "res": res(4 * f, 2 * f)})
        self.decoder2 = nn.ModuleDict({"up": up(2 * f, f), "res": res(2 * f, f)})
        self.out = conv_class(sd)(f, out_channels, 1)
        self.fused, self.checkpointing = fused, checkpointing

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        self.vit.fused = value

    @property
    def checkpointing(self) -> bool:
        return self.vit.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self.vit.checkpointing = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L.patch_grid(x, self.spatial_dims, self.in_channels, 16, "UNETR", "16")
        fused = self._fused
        (z3, z6, z9), z12 = self.vit.hidden_grids(x, self.skip_layers)
        enc1 = L.run(self.encoder1, x, fused)
        enc2 = L.run(self.encoder2, z3, fused)
        enc3 = L.run(self.encoder3, z6, fused)
        enc4 = L.run(self.encoder4, z9, fused)
        d = z12
        for dec, skip in ((self.decoder5, enc4), (self.decoder4, enc3), (self.decoder3, enc2), (self.decoder2, enc1)):
            d = L.run(dec["res"], torch.cat([dec["up"](d), skip], dim=1), fused)
        return self.out(d)
