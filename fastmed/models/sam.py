"""SAM (Segment Anything) / MedSAM: ViT image encoder, prompt encoder, two-way-transformer mask decoder.

The module tree and parameter names are ``segment_anything``'s (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``), so SAM and MedSAM checkpoints load with ``load_state_dict(strict=True)``.  With ``fused=True``
the encoder's attention (windowed and global, decomposed relative position) runs through
:func:`fastmed.ops.sam_attention` and the decoder's through :func:`fastmed.ops.attention`; with ``fused=False`` the
same parameters run through plain PyTorch (segment_anything's composition).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmed.models import _layers as L
from fastmed.ops.sam_attention import sam_attention
from fastmed.ops.window_attention import attention
from fastmed.reference import sam_attention as ref

__all__ = ["SAM", "segment_anything_modeling"]


def segment_anything_modeling():
    """The official ``segment_anything.modeling`` module (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``,
    ``Sam``, ``image_encoder.Attention``, ...), imported without running ``segment_anything/__init__.py``, which
    imports torchvision for its automatic mask generator: a bare parent package is registered first.  For
    comparisons (tests, ``bench/bench_sam_attention.py``); ``ImportError`` when segment_anything is not installed."""
    import importlib
    import importlib.machinery
    import sys
    import types

    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    spec = importlib.machinery.PathFinder.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment_anything is not installed (pip install segment_anything; pure Python)")
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(N, C, H, W)`` (segment_anything's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class _MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class _EncoderAttention(nn.Module):
    """qkv / proj / rel_pos_h / rel_pos_w; ``forward`` takes the whole ``(B, H, W, C)`` grid (window partition and
    padding happen inside the op)."""

    def __init__(self, dim: int, heads: int, window: int, grid: int, fused: bool):
        super().__init__()
        self.num_heads, self.window, self.fused = heads, window, fused
        hd = dim // heads
        side = grid if window == 0 else window
        self.scale = hd ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, hd))

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        th, tw = self.rel_pos_h.to(qkv.dtype), self.rel_pos_w.to(qkv.dtype)
        pad = self.qkv.bias.to(qkv.dtype)  # SAM pads the normalized tokens with zeros before the qkv Linear
        if self.fused:
            out = sam_attention(qkv, self.num_heads, th, tw, self.window, self.scale, qkv_pad=pad)
        else:
            window = (x.shape[1], x.shape[2]) if self.window == ref.GLOBAL else (self.window, self.window)
            out, _ = ref.sam_attention_forward(qkv, th, tw, pad, ref.SamAttentionSpec(self.num_heads, window,
                                                                                      self.scale))
        return self.proj(out)


class _EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, window, grid, fused):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _EncoderAttention(dim, heads, window, grid, fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """``(B, in_chans, img_size, img_size)`` -> ``(B, out_chans, img_size / patch, img_size / patch)``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, out_chans,
                 window_size, global_attn_indexes, fused, checkpointing=False):
        super().__init__()
        self.img_size, self.checkpointing = img_size, checkpointing
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            _EncoderBlock(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid,
                          fused) for i in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(embed_dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = L.maybe_checkpoint(blk, x, enabled=self.checkpointing)
        return self.neck(x.permute(0, 3, 1, 2))


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size) -> Tensor:
        """``(C, h, w)`` encoding of the pixel centres of an ``h x w`` grid."""
        h, w = size
        m = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=m.device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=m.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size) -> Tensor:
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding((coords * scale).float())


class PromptEncoder(nn.Module):
    """Points ``((B, N, 2) xy, (B, N) labels 1/0/-1)``, boxes ``(B, 4)`` xyxy, masks ``(B, 1, 4h, 4w)`` ->
    ``(sparse (B, n, C), dense (B, C, h, w))``; coordinates in the encoder's input pixels."""

    def __init__(self, embed_dim: int, image_embedding_size, input_image_size, mask_in_chans: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, 2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, 2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        emb = self.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), self.input_image_size)
        corners = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corners

    def forward(self, points=None, boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None):
        bs = points[0].shape[0] if points is not None else (
            boxes.shape[0] if boxes is not None else (masks.shape[0] if masks is not None else 1))
        weight = self.point_embeddings[0].weight
        sparse = [weight.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return torch.cat(sparse, dim=1), dense


class _DecoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int, downsample_rate: int = 1, fused: bool = True):
        super().__init__()
        self.num_heads, self.fused = heads, fused
        inner = dim // downsample_rate
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (p(t).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for p, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        if self.fused:
            out = attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).flatten(-2))


class _TwoWayBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, downsample, skip_first_layer_pe, fused):
        super().__init__()
        self.self_attn = _DecoderAttention(dim, heads, fused=fused)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _DecoderAttention(dim, heads, downsample, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _DecoderAttention(dim, heads, downsample, fused)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth, dim, heads, mlp_dim, downsample=2, fused=True):
        super().__init__()
        self.layers = nn.ModuleList(_TwoWayBlock(dim, heads, mlp_dim, downsample, i == 0, fused)
                                    for i in range(depth))
        self.final_attn_token_to_image = _DecoderAttention(dim, heads, downsample, fused)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor):
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class _MLP(nn.Module):
    def __init__(self, in_dim, hidden, out_dim, layers):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, dim: int, transformer: nn.Module, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256):
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(_MLP(dim, dim, dim // 8, 3)
                                                       for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = _MLP(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                multimask_output: bool) -> tuple[Tensor, Tensor]:
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).unsqueeze(0)
        tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        # one image with N prompt sets (SAM), or N images with one prompt set each (MedSAM's training batches)
        paired = image_embeddings.shape[0] == tokens.shape[0]
        src = (image_embeddings if paired else torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0))
        src = src + dense
        pos = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]


class SAM(nn.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` with segment_anything's names.

    Args:
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, window_size, global_attn_indexes: the
            image encoder (ViT-B: 1024, 16, 768, 12, 12, 4, 14, (2, 5, 8, 11)).
        prompt_dim: prompt / decoder width (256); mask_in_chans: 16; decoder_depth / decoder_heads / decoder_mlp:
            the two-way transformer (2, 8, 2048).
        fused: fastmed ops (True) or the same parameters through plain PyTorch.
        checkpointing: recompute each encoder block in the backward pass.

    ``forward(images, points=None, boxes=None, masks=None, multimask_output=False)``: ``images`` already
    normalized and padded to ``(B, 3, img_size, img_size)``; one prompt set per image (``points``:
    ``((B, N, 2), (B, N))``; ``boxes``: ``(B, 4)`` in input pixels; ``masks``: ``(B, 1, 4h, 4w)`` logits) ->
    ``(low-res mask logits (B, 1 or 3, 4h, 4w), iou predictions (B, 1 or 3))``.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), prompt_dim: int = 256, mask_in_chans: int = 16,
                 decoder_depth: int = 2, decoder_heads: int = 8, decoder_mlp: int = 2048, fused: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        grid = img_size // patch_size
        self.image_encoder = ImageEncoderViT(img_size, patch_size, 3, embed_dim, depth, num_heads, mlp_ratio,
                                             prompt_dim, window_size, tuple(global_attn_indexes), fused,
                                             checkpointing)
        self.prompt_encoder = PromptEncoder(prompt_dim, (grid, grid), (img_size, img_size), mask_in_chans)
        self.mask_decoder = MaskDecoder(prompt_dim, TwoWayTransformer(decoder_depth, prompt_dim, decoder_heads,
                                                                      decoder_mlp, fused=fused))
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1), False)

    @classmethod
    def vit_b(cls, fused: bool = True, checkpointing: bool = False) -> SAM:
        """SAM ViT-B (MedSAM's backbone): 93.74M parameters."""
        return cls(fused=fused, checkpointing=checkpointing)

    def decode(self, image_embeddings: Tensor, points=None, boxes: Optional[Tensor] = None,
               masks: Optional[Tensor] = None, multimask_output: bool = False) -> tuple[Tensor, Tensor]:
        """Prompts -> ``(low-res mask logits, iou)`` for precomputed ``image_embeddings``: ``(1, C, h, w)`` with
        ``N`` prompt sets (SAM), or ``(N, C, h, w)`` with one prompt set per embedding (MedSAM's batches)."""
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output)

    def forward(self, images: Tensor, points=None, boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                multimask_output: bool = False) -> tuple[Tensor, Tensor]:
        emb = self.image_encoder(images)
        outs = [self.decode(emb[i:i + 1], None if points is None else (points[0][i:i + 1], points[1][i:i + 1]),
                            None if boxes is None else boxes[i:i + 1], None if masks is None else masks[i:i + 1],
                            multimask_output) for i in range(images.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
