"""U-Nets from fastmed blocks: the configurable :class:`UNet` with the Ronneberger, nnU-Net (plain and
residual-encoder) presets.

Module layout = dynamic-network-architectures' ``PlainConvUNet`` / ``ResidualEncoderUNet`` (nnU-Net v2), so the
state-dict keys are nnU-Net's (see :func:`fastmed.convert.from_nnunet`)::

    encoder.stem.convs.0.{conv,norm}.*                       (residual encoder only)
    encoder.stages.<s>.0.convs.<j>.{conv,norm}.*              (plain, strided-conv downsampling)
    encoder.stages.<s>.{0: pool, 1: StackedConvBlocks}...     (plain, max-pool downsampling: stage s > 0
                                                                has the pool at .0 and the convs at .1)
    encoder.stages.<s>.blocks.<j>.{conv1,conv2,skip}.*        (residual encoder)
    decoder.transpconvs.<s>.{weight,bias}                    (s = 0 is the deepest)
    decoder.stages.<s>.convs.<j>.{conv,norm}.*
    decoder.seg_layers.<s>.{weight,bias}                     (one per decoder stage with deep supervision,
                                                              else only the final head, at index 0)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from fastmed._validate import check_int, check_per_axis, check_spatial_dims
from fastmed.models import _layers as L
from fastmed.models import nnunet_plan
from fastmed.nn.conv_block import ConvNormAct, ResidualBlock, conv_class

__all__ = ["UNet", "plan_nnunet"]

IntOrSeq = Union[int, Sequence[int]]


class _StackedConvs(nn.Module):
    """nnU-Net's ``StackedConvBlocks``: ``convs`` = ConvNormAct(stride on the first) x n."""

    def __init__(self, n: int, spatial_dims: int, cin: int, cout: int, kernel, stride, **block):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(spatial_dims, cin, cout, kernel, stride, **block),
            *[ConvNormAct(spatial_dims, cout, cout, kernel, 1, **block) for _ in range(n - 1)])


class _StackedResidual(nn.Module):
    """nnU-Net's ``StackedResidualBlocks``: ``blocks`` = ResidualBlock(stride on the first) x n."""

    def __init__(self, n: int, spatial_dims: int, cin: int, cout: int, kernel, stride, **block):
        super().__init__()
        self.blocks = nn.Sequential(
            ResidualBlock(spatial_dims, cin, cout, kernel, stride, **block),
            *[ResidualBlock(spatial_dims, cout, cout, kernel, 1, **block) for _ in range(n - 1)])


class _Encoder(nn.Module):
    def __init__(self, stem: Optional[nn.Module], stages: Sequence[nn.Module]):
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)


class _Decoder(nn.Module):
    def __init__(self, transpconvs, stages, seg_layers):
        super().__init__()
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)


def _run_stage(stage: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    if isinstance(stage, _StackedConvs):
        return L.run(stage.convs, x, fused)
    if isinstance(stage, _StackedResidual):
        return L.run(stage.blocks, x, fused)
    if isinstance(stage, nn.Sequential):
        for m in stage:
            x = _run_stage(m, x, fused)
        return x
    return stage(x)


class UNet(nn.Module):
    """A 2D/3D U-Net: encoder stages, transposed-convolution decoder with concatenated skips, 1x1 heads.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: input channels and classes.
        features: channels per resolution stage, e.g. ``(32, 64, 128, 256, 320)``.
        strides: downsampling stride per stage (int or per-axis ints); the first is usually 1.
        kernel_sizes: one kernel for all stages (an int, or ``spatial_dims`` ints), or one kernel per stage
            (a sequence of ``len(features)`` ints or per-axis tuples).
        convs_per_stage: ConvNormAct blocks per encoder stage (plain encoder).
        decoder_convs_per_stage: ConvNormAct blocks per decoder stage (default: ``convs_per_stage``).
        norm, norm_kwargs, act, act_kwargs, bias, dropout: as in :class:`fastmed.nn.ConvNormAct`
            (``norm=None`` for no normalization).
        residual: residual encoder (nnU-Net ``ResidualEncoderUNet``): a stem ConvNormAct, then per stage
            ``blocks_per_stage[s]`` :class:`fastmed.nn.ResidualBlock` (BasicBlockD).
        blocks_per_stage: residual blocks per stage (default ``(1, 3, 4, 6, 6, 6, ...)``, nnU-Net ResEnc M).
        downsample: ``"conv"`` (strided convolution, nnU-Net) or ``"maxpool"`` (Ronneberger).
        deep_supervision: return a list of logits, full resolution first, one per decoder stage (nnU-Net).
        fused: fastmed ops (True) or the same parameters through plain PyTorch (False).
        checkpointing: recompute each stage in the backward pass (gradient checkpointing).

    ``forward(x)``: x ``(N, in_channels, *spatial)`` with every spatial size divisible by the product of the
    strides on that axis -> logits ``(N, out_channels, *spatial)`` (a list with ``deep_supervision``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320),
                 strides: Sequence[IntOrSeq] = (1, 2, 2, 2, 2),
                 kernel_sizes: Union[IntOrSeq, Sequence[IntOrSeq]] = 3, convs_per_stage: int = 2,
                 decoder_convs_per_stage: Optional[int] = None, norm: Optional[str] = "instance",
                 norm_kwargs: Optional[dict] = None, act: str = "leaky_relu", act_kwargs: Optional[dict] = None,
                 bias: bool = True, dropout: float = 0.0, residual: bool = False,
                 blocks_per_stage: Optional[Sequence[int]] = None, downsample: str = "conv",
                 deep_supervision: bool = False, fused: bool = True, checkpointing: bool = False,
                 device=None, dtype=None):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        in_channels = check_int(in_channels, "in_channels", 1)
        out_channels = check_int(out_channels, "out_channels", 1)
        features = [check_int(f, "features[i]", 1) for f in features]
        n = len(features)
        if n < 2:
            raise ValueError(f"features must list at least 2 stages, got {features!r}")
        if len(strides) != n:
            raise ValueError(f"strides must have one entry per stage (len(features) = {n}), got {strides!r}")
        strides = [check_per_axis(s, f"strides[{i}]", sd, 1) for i, s in enumerate(strides)]
        if isinstance(kernel_sizes, int) or (isinstance(kernel_sizes, Sequence) and len(kernel_sizes) == sd
                                             and all(isinstance(k, int) for k in kernel_sizes)):
            kernel_sizes = [kernel_sizes] * n  # one kernel (int, or spatial_dims ints) for every stage
        if len(kernel_sizes) != n:
            raise ValueError(f"kernel_sizes must be one kernel or one per stage ({n}), got {kernel_sizes!r}")
        kernels = [check_per_axis(k, f"kernel_sizes[{i}]", sd, 1) for i, k in enumerate(kernel_sizes)]
        convs_per_stage = check_int(convs_per_stage, "convs_per_stage", 1)
        dec_convs = check_int(decoder_convs_per_stage or convs_per_stage, "decoder_convs_per_stage", 1)
        if downsample not in ("conv", "maxpool"):
            raise ValueError(f"downsample must be 'conv' or 'maxpool', got {downsample!r}")
        if blocks_per_stage is None:
            blocks_per_stage = [(1, 3, 4, 6)[i] if i < 4 else 6 for i in range(n)]
        if residual and len(blocks_per_stage) != n:
            raise ValueError(f"blocks_per_stage must have {n} entries, got {blocks_per_stage!r}")

        self.spatial_dims, self.in_channels, self.out_channels = sd, in_channels, out_channels
        self.features, self.strides, self.kernel_sizes = tuple(features), tuple(strides), tuple(kernels)
        # per axis, the product of the strides: every input size must be a multiple of it
        self.total_stride = tuple(math.prod(s[a] for s in strides) for a in range(sd))
        self.deep_supervision, self.fused, self.checkpointing = deep_supervision, fused, checkpointing
        self.residual, self.downsample = residual, downsample
        block = dict(bias=bias, norm=norm, norm_kwargs=norm_kwargs, act=act, act_kwargs=act_kwargs,
                     dropout=dropout, device=device, dtype=dtype)
        factory = dict(device=device, dtype=dtype)
        pool_cls = nn.MaxPool3d if sd == 3 else nn.MaxPool2d

        stem = None
        cin = in_channels
        if residual:
            stem = _StackedConvs(1, sd, in_channels, features[0], kernels[0], 1, **block)
            cin = features[0]
        stages = []
        for s in range(n):
            pooled = downsample == "maxpool" and any(v != 1 for v in strides[s])
            conv_stride = 1 if downsample == "maxpool" else strides[s]
            if residual:
                body = _StackedResidual(blocks_per_stage[s], sd, cin, features[s], kernels[s], conv_stride, **block)
            else:
                body = _StackedConvs(convs_per_stage, sd, cin, features[s], kernels[s], conv_stride, **block)
            mods = ([pool_cls(strides[s], strides[s])] if pooled else []) + [body]
            stages.append(body if residual and not pooled else nn.Sequential(*mods))
            cin = features[s]
        self.encoder = _Encoder(stem, stages)

        tconv = conv_class(sd, transposed=True)
        transpconvs, dec_stages, heads = [], [], []
        for s in range(1, n):
            below, skip = features[-s], features[-(s + 1)]
            transpconvs.append(tconv(below, skip, strides[-s], strides[-s], bias=bias, **factory))
            dec_stages.append(_StackedConvs(dec_convs, sd, 2 * skip, skip, kernels[-(s + 1)], 1, **block))
            if deep_supervision or s == n - 1:
                heads.append(conv_class(sd)(skip, out_channels, 1, 1, 0, bias=True, **factory))
        self.decoder = _Decoder(transpconvs, dec_stages, heads)

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        L.check_input(x, self.spatial_dims, self.in_channels, "UNet")
        total = self.total_stride
        if any(size % t for size, t in zip(x.shape[2:], total)):
            raise ValueError(f"UNet: every spatial size of x must be divisible by the product of the strides "
                             f"{total}, got spatial size {tuple(x.shape[2:])}; pad the input (e.g. to "
                             f"{tuple(-(-size // t) * t for size, t in zip(x.shape[2:], total))})")
        fused, ckpt = self.fused, self.checkpointing
        if self.encoder.stem is not None:
            x = L.maybe_checkpoint(lambda t: _run_stage(self.encoder.stem, t, fused), x, enabled=ckpt)
        skips = []
        for stage in self.encoder.stages:
            x = L.maybe_checkpoint(lambda t, st=stage: _run_stage(st, t, fused), x, enabled=ckpt)
            skips.append(x)
        dec = self.decoder
        outputs = []
        n_dec = len(dec.stages)
        for s in range(n_dec):
            def step(low, skip, s=s):
                convs = dec.stages[s].convs
                h = L.conv_block(convs[0], dec.transpconvs[s](low), fused, skip=skip)  # reads cat([up, skip])
                for block in convs[1:]:
                    h = L.conv_block(block, h, fused)
                return h

            x = L.maybe_checkpoint(step, x, skips[-(s + 2)], enabled=ckpt)
            if self.deep_supervision:
                outputs.append(dec.seg_layers[s](x))
            elif s == n_dec - 1:
                outputs.append(dec.seg_layers[-1](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def original(cls, in_channels: int = 1, out_channels: int = 2, spatial_dims: int = 2, **kwargs) -> UNet:
        """Ronneberger et al. 2015: features 64..1024, two 3x3 convs (bias, no normalization, ReLU) per level,
        2x2 max-pool down, 2x2 transposed-conv up (C -> C/2), concatenation, 1x1 head.

        31,030,658 parameters for 1 input channel and 2 classes (the published 31.03M).  The convolutions are
        padded ("same"), so outputs have the input size; the original valid convolutions change sizes, not
        parameter counts.  Pass ``norm="batch"`` for the common BatchNorm variant (+11,776 parameters).
        """
        cfg = dict(features=(64, 128, 256, 512, 1024), strides=(1, 2, 2, 2, 2), kernel_sizes=3, convs_per_stage=2,
                   norm=None, act="relu", bias=True, downsample="maxpool", deep_supervision=False)
        cfg.update(kwargs)
        return cls(spatial_dims, in_channels, out_channels, **cfg)

    @classmethod
    def nnunet(cls, patch_size: Sequence[int], spacing: Optional[Sequence[float]] = None, in_channels: int = 1,
               out_channels: int = 2, deep_supervision: bool = True, residual: bool = False, **kwargs) -> UNet:
        """nnU-Net v2's ``PlainConvUNet`` (or ``ResidualEncoderUNet`` with ``residual=True``) for a patch size.

        Topology from :func:`plan_nnunet` (features ``min(32 * 2**s, 320)`` in 3D / ``512`` in 2D, strides and
        kernels from the spacing); instance norm (affine, eps 1e-5), LeakyReLU(0.01), conv bias, strided-conv
        downsampling, transposed-conv upsampling, 2 convs per stage (residual: ResEnc-M blocks
        ``(1, 3, 4, 6, 6, 6, ...)`` and 1 decoder conv per stage), deep-supervision heads.
        """
        plan = plan_nnunet(patch_size, spacing)
        cfg = dict(features=plan["features"], strides=plan["strides"], kernel_sizes=plan["kernel_sizes"],
                   convs_per_stage=2, norm="instance", norm_kwargs={"eps": 1e-5, "affine": True}, act="leaky_relu",
                   act_kwargs={"negative_slope": 0.01}, bias=True, deep_supervision=deep_supervision,
                   residual=residual)
        if residual:
            cfg["decoder_convs_per_stage"] = 1
        cfg.update(kwargs)
        return cls(len(plan["patch_size"]), in_channels, out_channels, **cfg)

    @classmethod
    def resenc(cls, patch_size: Sequence[int], spacing: Optional[Sequence[float]] = None, **kwargs) -> UNet:
        """nnU-Net's residual-encoder U-Net (ResEnc M block counts): ``UNet.nnunet(..., residual=True)``."""
        return cls.nnunet(patch_size, spacing, residual=True, **kwargs)


def plan_nnunet(patch_size: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None,
                min_feature_map: int = 4, max_stages: Optional[int] = None, base_features: int = 32, *,
                fingerprint: Optional[dict] = None, num_classes: int = 2, gpu_memory_gb: float = 8.0) -> dict:
    """nnU-Net v2's planning (:mod:`fastmed.models.nnunet_plan`).

    ``plan_nnunet(patch_size, spacing)``: the U-Net topology for a given patch, nnU-Net's
    ``get_pool_and_conv_props``: an axis is pooled while its feature map is ``>= 2 * min_feature_map`` and its
    spacing within 2x of the finest (a lone axis needs ``3 * min_feature_map``); an axis' kernel becomes 3 once its
    spacing is within 2x of the finest, and the bottleneck's kernel is 3; ``max_stages`` (default: no limit, as
    nnU-Net v2) caps the stages; features ``min(base_features * 2**s, 320 in 3D / 512 in 2D)``.  The patch must
    be divisible by the total stride (nnU-Net would pad it).  Returns ``{"patch_size", "features", "strides",
    "kernel_sizes"}`` (``strides[0]`` all 1).

    ``plan_nnunet(fingerprint={...}, num_classes=..., gpu_memory_gb=8)``: nnU-Net v2's ExperimentPlanner for the
    ``3d_fullres`` and ``2d`` configurations (target spacing, patch size shrunk to the VRAM estimate, batch size);
    see :func:`fastmed.models.nnunet_plan.plan_from_fingerprint`.
    """
    if fingerprint is not None:
        if patch_size is not None or spacing is not None:
            raise ValueError("plan_nnunet: pass either patch_size (and spacing) or fingerprint, not both")
        return nnunet_plan.plan_from_fingerprint(fingerprint, num_classes, gpu_memory_gb)
    if patch_size is None:
        raise ValueError("plan_nnunet: patch_size (2 or 3 ints) or fingerprint (a dict) is required")
    nd = len(patch_size)
    if nd not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries (the spatial_dims), got {patch_size!r}")
    size = [check_int(p, "patch_size[i]", 1) for p in patch_size]
    sp = [1.0] * nd if spacing is None else [float(s) for s in spacing]
    if len(sp) != nd or any(not math.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be {nd} positive numbers, got {spacing!r}")
    check_int(min_feature_map, "min_feature_map", 1)
    topo = nnunet_plan.pool_and_conv_props(sp, size, min_feature_map)
    strides, kernels = topo["strides"], topo["kernel_sizes"]
    if max_stages is not None and len(strides) > check_int(max_stages, "max_stages", 1):
        strides, kernels = strides[:max_stages], kernels[:max_stages - 1] + ((3,) * nd,)
    total = [math.prod(s[a] for s in strides) for a in range(nd)]
    if any(p % t for p, t in zip(size, total)):
        raise ValueError(f"patch_size {tuple(patch_size)} must be divisible by the total stride {tuple(total)} "
                         f"of the planned network")
    cap = nnunet_plan.MAX_FEATURES[nd]
    features = tuple(min(base_features * 2 ** s, cap) for s in range(len(strides)))
    return {"patch_size": tuple(size), "features": features, "strides": tuple(strides),
            "kernel_sizes": tuple(kernels)}
