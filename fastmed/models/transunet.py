"""TransUNet (Chen et al. 2021, R50-ViT-B/16) with the official repository's module names, on fastmed ops.

State-dict keys = the TransUNet repository's ``VisionTransformer`` (``networks/vit_seg_modeling.py``)::

    transformer.embeddings.hybrid_model.root.{conv, gn}              StdConv 7x7/2 (weight standardized) + GroupNorm
    transformer.embeddings.hybrid_model.body.block<b>.unit<u>.{conv1, gn1, conv2, gn2, conv3, gn3, downsample,
                                                               gn_proj}  ResNetV2 bottlenecks (3, 4, 9)
    transformer.embeddings.{patch_embeddings, position_embeddings}   1x1 patches of the 1/16 feature map
    transformer.encoder.layer.<i>.{attention_norm, attn.{query, key, value, out}, ffn_norm, ffn.{fc1, fc2}}
    transformer.encoder.encoder_norm
    decoder.conv_more.{0 (conv), 1 (BatchNorm)}, decoder.blocks.<i>.{conv1, conv2}.{0, 1}
    segmentation_head.0                                               3x3 conv to the classes

``fused=True``: every conv -> norm -> activation (weight-standardized convs with GroupNorm, the bottlenecks' residual
add, the decoder's conv + BatchNorm + ReLU) is one :func:`fastmed.ops.conv_norm_act` and attention is
:func:`fastmed.ops.attention`; ``fused=False``: the repository's PyTorch composition on the same parameters.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmed._validate import check_int
from fastmed.models import _layers as L
from fastmed.models.unetr import FusedModel
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.window_attention import attention

__all__ = ["TransUNet", "convert_vit_r50_npz"]

WS_EPS = 1e-5  # StdConv2d's weight-standardization epsilon
GN_EPS = 1e-6  # the bottlenecks' GroupNorm epsilon


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardized per output channel (mean 0, variance 1) at every call."""

    def standardized_weight(self) -> torch.Tensor:
        v, m = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return (self.weight - m) / torch.sqrt(v + WS_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def _conv_gn(conv: nn.Conv2d, gn: nn.GroupNorm, x: torch.Tensor, fused: bool, relu: bool,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu?(gn(conv(x)) + residual)`` with torch's GroupNorm module ``gn``."""
    w = conv.standardized_weight() if isinstance(conv, StdConv2d) else conv.weight
    if fused:
        return conv_norm_act(x, w, conv.bias, gn.weight, gn.bias, stride=conv.stride, padding=conv.padding,
                             norm="group", num_groups=gn.num_groups, eps=gn.eps,
                             activation="relu" if relu else "identity", residual=residual)
    h = gn(F.conv2d(x, w, conv.bias, conv.stride, conv.padding))
    if residual is not None:
        h = h + residual
    return F.relu(h) if relu else h


class _Bottleneck(nn.Module):
    """The repository's ``PreActBottleneck`` (post-activation in fact): 1x1, 3x3 (stride), 1x1, GroupNorms, and a
    1x1 strided projection (``downsample`` + ``gn_proj``) when the shape changes."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=GN_EPS)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False)
            self.gn_proj = nn.GroupNorm(cout, cout)

    def run(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        residual = _conv_gn(self.downsample, self.gn_proj, x, fused, False) if hasattr(self, "downsample") else x
        y = _conv_gn(self.conv1, self.gn1, x, fused, True)
        y = _conv_gn(self.conv2, self.gn2, y, fused, True)
        return _conv_gn(self.conv3, self.gn3, y, fused, True, residual=residual)


class _ResNetV2(nn.Module):
    fused: bool = True  # fastmed conv_norm_act (True) or the repository's modules

    def __init__(self, block_units=(3, 4, 9), width: int = 64):
        super().__init__()
        self.width = width
        self.root = nn.Sequential(OrderedDict([("conv", StdConv2d(3, width, 7, stride=2, padding=3, bias=False)),
                                               ("gn", nn.GroupNorm(32, width, eps=GN_EPS)), ("relu", nn.ReLU())]))
        blocks = []
        cin = width
        for b, (units, mult) in enumerate(zip(block_units, (4, 8, 16))):
            cout, cmid = width * mult, width * mult // 4
            blocks.append((f"block{b + 1}", nn.Sequential(OrderedDict(
                (f"unit{u + 1}", _Bottleneck(cin if u == 0 else cout, cout, cmid, 2 if (u == 0 and b > 0) else 1))
                for u in range(units)))))
            cin = cout
        self.body = nn.Sequential(OrderedDict(blocks))

    def run(self, x: torch.Tensor, fused: bool, checkpointing: bool):
        in_size = x.shape[2]
        x = _conv_gn(self.root.conv, self.root.gn, x, fused, True)
        features = [x]
        x = F.max_pool2d(x, 3, 2, 0)
        for i, block in enumerate(self.body):
            for unit in block:
                x = L.maybe_checkpoint(lambda t, unit=unit: unit.run(t, fused), x, enabled=checkpointing)
            if i == len(self.body) - 1:
                break
            right = int(in_size / 4 / (i + 1))
            # the repository zero-pads the skip to (right, right) when the odd max-pool output is one short
            features.append(F.pad(x, (0, right - x.shape[3], 0, right - x.shape[2])) if x.shape[2] != right else x)
        return x, features[::-1]


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.num_attention_heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(dropout)
        self.proj_dropout = nn.Dropout(dropout)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_attention_heads

        def split(t):
            return t.view(B, N, h, C // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.fused and not (self.training and self.attn_dropout.p > 0):
            ctx = attention(q, k, v)
        else:
            probs = self.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // h), dim=-1))
            ctx = probs @ v
        return self.proj_dropout(self.out(ctx.transpose(1, 2).reshape(B, N, C)))


class _Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, mlp_dim), nn.Linear(mlp_dim, hidden)
        self.act_fn = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act_fn(self.fc1(x)))))


class _Block(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = _Mlp(hidden, mlp_dim, dropout)
        self.attn = _Attention(hidden, heads, attn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class _Embeddings(nn.Module):
    def __init__(self, img_size: int, hidden: int, dropout: float, block_units, width: int):
        super().__init__()
        self.hybrid_model = _ResNetV2(block_units, width)
        self.grid = img_size // 16
        self.patch_embeddings = nn.Conv2d(self.hybrid_model.width * 16, hidden, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid ** 2, hidden))
        self.dropout = nn.Dropout(dropout)


class _Encoder(nn.Module):
    def __init__(self, hidden, mlp_dim, heads, layers, dropout, attn_dropout):
        super().__init__()
        self.layer = nn.ModuleList(_Block(hidden, mlp_dim, heads, dropout, attn_dropout) for _ in range(layers))
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)


class _Transformer(nn.Module):
    def __init__(self, img_size, hidden, mlp_dim, heads, layers, dropout, attn_dropout, block_units, width):
        super().__init__()
        self.embeddings = _Embeddings(img_size, hidden, dropout, block_units, width)
        self.encoder = _Encoder(hidden, mlp_dim, heads, layers, dropout, attn_dropout)


class _Conv2dReLU(nn.Sequential):
    """The repository's ``Conv2dReLU(use_batchnorm=True)``: ``0`` 3x3 conv (no bias), ``1`` BatchNorm2d, ``2`` ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def run(self, x: torch.Tensor, fused: bool, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``relu(bn(conv(cat([x, skip], 1))))``: one :func:`fastmed.ops.conv_norm_act` (fused) or the modules."""
        if not fused:
            return self(x if skip is None else torch.cat([x, skip], dim=1))
        conv, bn = self[0], self[1]
        training = bn.training or not bn.track_running_stats
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return conv_norm_act(x, conv.weight, None, bn.weight, bn.bias, padding=conv.padding, norm="batch",
                             eps=bn.eps, activation="relu", running_mean=bn.running_mean,
                             running_var=bn.running_var, momentum=momentum, training=training, skip=skip)


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.conv1 = _Conv2dReLU(cin + skip, cout)
        self.conv2 = _Conv2dReLU(cout, cout)


class _DecoderCup(nn.Module):
    fused: bool = True  # fastmed conv_norm_act (True) or the repository's modules

    def __init__(self, hidden: int, decoder_channels, skip_channels):
        super().__init__()
        self.conv_more = _Conv2dReLU(hidden, 512)
        ins = [512] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(_DecoderBlock(i, o, s) for i, o, s in zip(ins, decoder_channels, skip_channels))


class TransUNet(FusedModel):
    """TransUNet R50-ViT-B/16: ResNetV2 (3, 4, 9) stem to 1/16, ViT-B/16 on its 1x1 patches, cascaded upsampler.

    Args:
        img_size: 224 (square; multiples of 16; the position embeddings' grid is ``img_size / 16``).
        num_classes: 9 (Synapse); in_channels: 3 (a 1-channel input is repeated to 3, as the repository does).
        hidden_size 768, mlp_dim 3072, num_heads 12, num_layers 12, dropout 0.1, attention_dropout 0.0 (ViT-B/16).
        decoder_channels (256, 128, 64, 16), skip_channels (512, 256, 64, 16), n_skip 3 (skips beyond n_skip are
        dropped, their channels 0), block_units (3, 4, 9), width 64 (the ResNet's root channels, a multiple of 32:
        GroupNorm(32, .)).
        fused: fastmed ops (True) or the repository's PyTorch (False); checkpointing: recompute each transformer block
        and bottleneck in the backward pass.

    ``forward(x (N, 1 or 3, img_size, img_size)) -> (N, num_classes, img_size, img_size)``.
    105,277,081 parameters at 224 x 224 with 9 classes (the paper's 105.28M).

    Weights: the repository's PyTorch state dicts load unchanged; the ImageNet-21k ``R50+ViT-B_16.npz`` through
    :func:`convert_vit_r50_npz`.
    """

    def __init__(self, img_size: int = 224, num_classes: int = 9, hidden_size: int = 768, mlp_dim: int = 3072,
                 num_heads: int = 12, num_layers: int = 12, dropout: float = 0.1, attention_dropout: float = 0.0,
                 decoder_channels=(256, 128, 64, 16), skip_channels=(512, 256, 64, 16), n_skip: int = 3,
                 block_units=(3, 4, 9), width: int = 64, fused: bool = True, checkpointing: bool = False):
        super().__init__()
        self.img_size = check_int(img_size, "img_size", 16)
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        self.num_classes = check_int(num_classes, "num_classes", 1)
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        n_skip = check_int(n_skip, "n_skip", 0)
        if n_skip > 3 or len(decoder_channels) != 4 or len(skip_channels) != 4:
            raise ValueError(f"n_skip must be 0..3 with 4 decoder and skip channels, got n_skip={n_skip}, "
                             f"{tuple(decoder_channels)}, {tuple(skip_channels)}")
        self.n_skip = n_skip
        width = check_int(width, "width", 32)
        features = (8 * width, 4 * width, width)  # the ResNet's 1/8, 1/4 and 1/2 feature maps
        if any(skip_channels[i] != features[i] for i in range(n_skip)):
            raise ValueError(f"skip_channels[:n_skip] must be the ResNet's feature channels {features[:n_skip]} "
                             f"(width={width}), got {tuple(skip_channels)}")
        skips = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        self.transformer = _Transformer(img_size, hidden_size, mlp_dim, num_heads, num_layers, dropout,
                                        attention_dropout, block_units, width)
        self.decoder = _DecoderCup(hidden_size, decoder_channels, skips)
        self.segmentation_head = nn.Sequential(nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1))
        self.fused, self.checkpointing = fused, checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        L.check_input(x, 2, 3, "TransUNet")
        if tuple(x.shape[2:]) != (self.img_size,) * 2:
            raise ValueError(f"TransUNet: x must be {self.img_size} x {self.img_size} (img_size), got "
                             f"{tuple(x.shape[2:])}")
        ckpt = self.checkpointing
        emb = self.transformer.embeddings
        h, features = emb.hybrid_model.run(x, emb.hybrid_model.fused, ckpt)
        tokens = emb.dropout(emb.patch_embeddings(h).flatten(2).transpose(1, 2) + emb.position_embeddings)
        for blk in self.transformer.encoder.layer:
            tokens = L.maybe_checkpoint(blk, tokens, enabled=ckpt)
        tokens = self.transformer.encoder.encoder_norm(tokens)
        B, n, C = tokens.shape
        g = emb.grid
        fused = self.decoder.fused
        d = self.decoder.conv_more.run(tokens.transpose(1, 2).reshape(B, C, g, g), fused)
        for i, block in enumerate(self.decoder.blocks):
            d = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=True)
            skip = features[i] if i < self.n_skip else None
            d = block.conv2.run(block.conv1.run(d, fused, skip), fused)
        return self.segmentation_head(d)


def _np2th(w, conv: bool = False) -> torch.Tensor:
    """The repository's ``np2th``: a JAX array as a torch tensor, conv kernels HWIO -> OIHW."""
    t = torch.as_tensor(w)
    return t.permute(3, 2, 0, 1) if conv else t


def convert_vit_r50_npz(weights, model: TransUNet) -> dict:
    """A TransUNet state dict from the ``R50+ViT-B_16.npz`` key layout (the repository's ``load_from``).

    ``weights``: a mapping from the npz names (``embedding/kernel``, ``Transformer/encoderblock_<i>/...``,
    ``conv_root/kernel``, ``gn_root/scale``, ``block<b>/unit<u>/{conv,gn}<k>/...``, ``.../conv_proj``,
    ``.../gn_proj``) to arrays.  The position embeddings drop the class token and are resized (scipy's linear
    ``zoom``, as the repository) when the grid differs.  Keys the npz does not hold (the decoder and the
    segmentation head, trained from scratch) are taken from ``model``; the result loads with
    ``model.load_state_dict(out, strict=True)``.  Raises ``KeyError`` naming a missing npz entry.
    """
    out = {k: v.clone() for k, v in model.state_dict().items()}
    emb = "transformer.embeddings."
    out[emb + "patch_embeddings.weight"] = _np2th(weights["embedding/kernel"], conv=True)
    out[emb + "patch_embeddings.bias"] = _np2th(weights["embedding/bias"])
    pos = _np2th(weights["Transformer/posembed_input/pos_embedding"])
    target = out[emb + "position_embeddings"]
    if pos.shape[1] - 1 == target.shape[1]:  # the class token's embedding goes
        pos = pos[:, 1:]
    elif pos.shape[1] != target.shape[1]:
        grid_old = int(math.isqrt(pos.shape[1] - 1))
        grid_new = int(math.isqrt(target.shape[1]))
        patch_pos = pos[0, 1:].reshape(grid_old, grid_old, -1).numpy()
        from scipy import ndimage

        zoom = (grid_new / grid_old, grid_new / grid_old, 1)
        pos = torch.as_tensor(ndimage.zoom(patch_pos, zoom, order=1)).reshape(1, grid_new ** 2, -1)
    out[emb + "position_embeddings"] = pos
    enc = "Transformer/encoder_norm/"
    out["transformer.encoder.encoder_norm.weight"] = _np2th(weights[enc + "scale"])
    out["transformer.encoder.encoder_norm.bias"] = _np2th(weights[enc + "bias"])
    hidden = target.shape[-1]
    for i in range(len(model.transformer.encoder.layer)):
        src, dst = f"Transformer/encoderblock_{i}/", f"transformer.encoder.layer.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value", "out"):
            out[dst + f"attn.{name}.weight"] = _np2th(weights[att + f"{name}/kernel"]).reshape(hidden, hidden).t()
            out[dst + f"attn.{name}.bias"] = _np2th(weights[att + f"{name}/bias"]).reshape(-1)
        for k, name in ((0, "fc1"), (1, "fc2")):
            out[dst + f"ffn.{name}.weight"] = _np2th(weights[src + f"MlpBlock_3/Dense_{k}/kernel"]).t()
            out[dst + f"ffn.{name}.bias"] = _np2th(weights[src + f"MlpBlock_3/Dense_{k}/bias"])
        for k, name in ((0, "attention_norm"), (2, "ffn_norm")):
            out[dst + f"{name}.weight"] = _np2th(weights[src + f"LayerNorm_{k}/scale"])
            out[dst + f"{name}.bias"] = _np2th(weights[src + f"LayerNorm_{k}/bias"])
    res = emb + "hybrid_model."
    out[res + "root.conv.weight"] = _np2th(weights["conv_root/kernel"], conv=True)
    out[res + "root.gn.weight"] = _np2th(weights["gn_root/scale"]).reshape(-1)
    out[res + "root.gn.bias"] = _np2th(weights["gn_root/bias"]).reshape(-1)
    for bname, block in model.transformer.embeddings.hybrid_model.body.named_children():
        for uname, unit in block.named_children():
            src, dst = f"{bname}/{uname}/", f"{res}body.{bname}.{uname}."
            names = [("conv1", "gn1"), ("conv2", "gn2"), ("conv3", "gn3")]
            if hasattr(unit, "downsample"):
                names.append(("conv_proj", "gn_proj"))
            for conv, gn in names:
                out[dst + ("downsample" if conv == "conv_proj" else conv) + ".weight"] = _np2th(
                    weights[src + conv + "/kernel"], conv=True)
                out[dst + gn + ".weight"] = _np2th(weights[src + gn + "/scale"]).reshape(-1)
                out[dst + gn + ".bias"] = _np2th(weights[src + gn + "/bias"]).reshape(-1)
    return {k: v.to(out[k].dtype) for k, v in out.items()}
