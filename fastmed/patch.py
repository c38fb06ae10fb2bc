"""``fastmed.patch(model)``: put fastmed's fused ops under an existing PyTorch / MONAI / nnU-Net model.

    report = fastmed.patch(model)     # in place; returns what was replaced and what was not, and why
    print(report)

What is replaced (parameters and buffers are shared, never copied; ``state_dict()`` keys stay the same, so
checkpoints load before or after patching):

* **MONAI's DynUNet / UNETR / SwinUNETR conv blocks**, recognised by their type (their forward order is MONAI's):
  ``UnetBasicBlock`` (conv -> norm -> act, twice) and ``UnetResBlock`` (conv -> norm -> act, conv -> norm, the
  residual path conv -> norm when the shape changes, add, act) become a :class:`FusedUnetBlock` whose every
  conv -> norm -> act (residual add included) is one :func:`fastmed.ops.conv_norm_act`; ``UnetUpBlock`` and
  ``UnetrUpBlock`` (transposed conv, concatenation with the skip, a basic or residual block) become a
  :class:`FusedUnetUpBlock` whose first convolution reads the upsampled features and the skip as two inputs (no
  concatenation written with the implicit-GEMM implementation).  ``UnetrBasicBlock`` (a wrapper around one of
  those blocks) and ``UnetrPrUpBlock`` (transposed convs, each followed by a block with ``conv_block=True``) are
  fused through the blocks they hold.  The block keeps its children (``conv1.conv``, ``norm1``, ``lrelu``, ...),
  so keys are unchanged; dropout (MONAI's ``dropout=``) runs between the convolution and the norm as in MONAI.
* **Conv -> [Dropout] -> Norm -> [Activation]** runs, found in execution order inside ``nn.Sequential``
  containers (nested ones flattened: MONAI's ``Convolution`` = ``Sequential(conv, ADN(N, D, A))``, nnU-Net's
  ``ConvDropoutNormReLU.all_modules``, plain ``nn.Sequential(Conv3d, InstanceNorm3d, LeakyReLU)``).  The
  convolution becomes a :class:`FusedConvNormAct` that computes the whole run with
  :func:`fastmed.ops.conv_norm_act` (or conv, dropout, then :func:`fastmed.ops.norm_act` while a dropout
  is active); the norm, dropout and activation modules become :class:`Absorbed` placeholders that hold
  the same parameters and return their input.  A module referenced twice (nnU-Net registers its layers both
  as attributes and in ``all_modules``) is replaced everywhere.
* **Norm -> [Activation]** runs without a preceding convolution (pre-activation blocks, the norm after a
  transposed convolution): the norm becomes a :class:`FusedNormAct` (:func:`fastmed.ops.norm_act`).
* **MONAI ``SwinTransformerBlock``** (SwinUNETR): replaced by :class:`fastmed.nn.SwinTransformerBlock` sharing
  its norms, qkv / proj / relative-position table and MLP (:func:`fastmed.ops.window_attention`).
* **Swin-Unet / timm ``SwinTransformerBlock``s** (recognized by their attributes: ``attn.qkv``, ``attn.proj``,
  ``attn.relative_position_bias_table``, ``attn.attn_drop`` (an ``nn.Dropout``), ``norm1``, ``norm2``, ``mlp``,
  ``window_size``, ``shift_size`` and ``input_resolution`` (Swin-Unet) or ``drop_path1``/``drop_path2``
  (timm)): replaced by a :class:`FusedSwinBlock` holding the same children.
* **segment_anything's image-encoder blocks** (``segment_anything.modeling.image_encoder.Block`` whose ``attn`` is
  its ``Attention`` with ``use_rel_pos=True``; SAM and MedSAM ViTs, windowed and global): replaced by a
  :class:`FusedSamBlock` holding the same ``norm1``/``norm2``/``mlp`` and a :class:`FusedSamAttention` over the
  original ``qkv``/``proj`` and ``rel_pos_h``/``rel_pos_w`` Parameters (the same objects: optimizer state and
  state-dict keys are unchanged).  The attention, window partition and padding included, is one
  :func:`fastmed.ops.sam_attention` on the token grid.  An ``Attention`` outside such a block (a ``Block``
  subclass, or on its own) becomes a :class:`FusedSamAttention` that attends over its whole input, as the
  original does.  ``use_rel_pos=False`` attention is left alone and reported.
* Swin blocks with attention dropout are replaced in either mode and keep the original's behaviour in both: in
  training (also after ``.train()`` on a model patched in eval mode) their attention runs unfused, with the
  dropout; in eval mode it is fused.

Supported pieces: ``Conv2d``/``Conv3d`` (groups 1, zero padding given as ints), ``InstanceNorm*d`` (without
running statistics), ``GroupNorm``, ``BatchNorm*d``, activations ``ReLU``, ``LeakyReLU``, ``PReLU``, ``GELU``,
``SiLU``, ``Identity``.  Anything else is left alone, and every convolution (transposed ones included) or MONAI
block that was not fused is listed in ``report.skipped`` as ``"<type> in <block type>: <reason>"`` (e.g. a
custom ``forward`` whose order cannot be read, an activation without a fused kernel, no normalization after it).
Batch-norm statistics (``running_*``, ``num_batches_tracked``) are updated as torch does, and only by calls that
succeed.  timm is not installed in fastmed's CI: its block is checked against a reproduction of timm's code for
grids divisible by the window (other grids run timm's own forward).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastmed.nn.norm_act import NormAct, activation_of
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.norm_act import norm_act

__all__ = ["patch", "PatchReport", "FusedConvNormAct", "FusedNormAct", "FusedSwinBlock", "FusedUnetBlock",
           "FusedUnetUpBlock", "FusedSamBlock", "FusedSamAttention", "Absorbed", "NormView", "fused_conv_norm_act",
           "activation_args"]

_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_ACTS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU)
_CONVS = (nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)
_FUSED_ACTS = "ReLU, LeakyReLU, PReLU, GELU, SiLU, Identity"


@dataclass
class PatchReport:
    """``replaced``: (module name, description); ``skipped``: (module name, ``"<type> in <block>: <reason>"``)."""
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastmed.patch: replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name}: {what}" for name, what in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class NormView(NormAct):
    """A :class:`fastmed.nn.NormAct` (identity activation) over a torch norm module's own parameters and buffers.

    ``NormView.of(norm)`` (``norm``: ``InstanceNorm*d`` without running statistics, ``GroupNorm`` or
    ``BatchNorm*d``; ``TypeError`` otherwise) shares ``norm``'s parameter and buffer *dicts*, so it follows
    ``.to()``, ``load_state_dict`` and in-place updates of ``norm``.  Before each call, ``view.sync(module)`` takes
    the training flag (and ``eps``/``momentum`` where ``module`` has them) from the module registered in the model;
    then :meth:`call_kwargs` gives the arguments of :func:`fastmed.ops.norm_act` / ``conv_norm_act`` and
    :meth:`count_batch`, called after the op succeeded, counts ``num_batches_tracked`` as torch's batch norm does.
    A view is never registered as a submodule (its tensors are the module's)."""

    @classmethod
    def of(cls, norm: nn.Module) -> NormView:
        with torch.device("meta"):  # the tensors NormAct allocates are replaced by the module's own below
            view = cls.from_modules(norm, None)
        view._parameters, view._buffers = norm._parameters, norm._buffers
        view._non_persistent_buffers_set = norm._non_persistent_buffers_set
        view.training = norm.training
        return view

    def sync(self, module: nn.Module) -> NormView:
        self.training = module.training
        self.eps = getattr(module, "eps", self.eps)
        if self.kind == "batch":
            self.momentum = getattr(module, "momentum", self.momentum)
        return self


def activation_args(act: Optional[nn.Module]) -> tuple[str, object]:
    """(activation, negative_slope) arguments of the fastmed ops for a torch activation module (None: identity;
    PReLU: its weight); ``TypeError`` for an activation fastmed does not fuse."""
    activation, slope, prelu = activation_of(act)
    return activation, (prelu.weight if prelu is not None else slope)


def fused_conv_norm_act(x: torch.Tensor, conv: nn.Module, view: NormView, activation: str = "identity",
                        negative_slope=0.01, *, dropout: Optional[Callable] = None,
                        residual: Optional[torch.Tensor] = None, skip: Optional[torch.Tensor] = None,
                        conv_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(norm(dropout(conv(cat([x, skip], 1)))) + residual)`` of torch modules as fastmed ops.

    ``conv``: an ``nn.Conv2d``/``nn.Conv3d`` (or a module with its ``weight``/``bias``/``stride``/``padding``/
    ``dilation``); ``view``: the :class:`NormView` of the norm, synced; ``activation``/``negative_slope``: as in
    :func:`fastmed.ops.conv_norm_act` (:func:`activation_args` of a torch module).  Without ``dropout`` (None:
    none, or inactive) the run is one
    :func:`fastmed.ops.conv_norm_act`; with it (a callable applied to the convolution output), or given the
    convolution output ``conv_out`` already computed (and dropped out), the norm, residual and activation are one
    :func:`fastmed.ops.norm_act`.  ``(N, Cin, *sp) -> (N, Cout, *sp_out)``; batch norm counts after success."""
    kw = view.call_kwargs()
    if conv_out is None and dropout is not None:
        xin = x if skip is None else torch.cat([x, skip], 1)
        conv_fn = torch.nn.functional.conv3d if conv.weight.dim() == 5 else torch.nn.functional.conv2d
        conv_out = dropout(conv_fn(xin, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))
    if conv_out is not None:
        y = norm_act(conv_out, view.kind, view.weight, view.bias, activation=activation,
                     negative_slope=negative_slope, residual=residual, **kw)
    else:
        y = conv_norm_act(x, conv.weight, conv.bias, view.weight, view.bias, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, norm=view.kind, activation=activation,
                          negative_slope=negative_slope, residual=residual, skip=skip, **kw)
    view.count_batch()
    return y


class Absorbed(nn.Module):
    """A module whose computation moved into a fused neighbour: holds the original parameters and buffers
    under the same names (so state dicts are unchanged) and returns its input."""

    def __init__(self, original: nn.Module, into: str):
        super().__init__()
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self.original_type, self.into = type(original).__name__, into
        self.training = original.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.original_type}, computed by {self.into}"


class FusedConvNormAct(nn.Module):
    """A convolution that computes conv -> [dropout] -> norm -> [act] of a patched run in one fastmed op.

    Holds the convolution's ``weight``/``bias`` (same names as the ``nn.ConvNd`` it replaces) and reads the
    norm's and activation's parameters from their :class:`Absorbed` placeholders (registered in the model, so
    ``.to()``, ``.train()`` and ``load_state_dict`` reach them).  ``(N, Cin, *sp) -> (N, Cout, *sp_out)``."""

    def __init__(self, conv: nn.Module, norm: Absorbed, act: Optional[Absorbed], dropout: Optional[nn.Module],
                 view: NormView, act_module: Optional[nn.Module]):
        super().__init__()
        self._parameters = conv._parameters
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.training = conv.training
        self.dropout_p = float(dropout.p) if dropout is not None else 0.0
        self.dropout_fn = {nn.Dropout2d: torch.nn.functional.dropout2d,
                           nn.Dropout3d: torch.nn.functional.dropout3d}.get(type(dropout),
                                                                             torch.nn.functional.dropout)
        self.activation, self.negative_slope, _ = activation_of(act_module)
        # references, not submodules: the placeholders are registered where the original modules were
        object.__setattr__(self, "_norm", norm)
        object.__setattr__(self, "_act", act)
        object.__setattr__(self, "_view", view)
        self.desc = (f"{type(conv).__name__} -> {type(dropout).__name__ + ' -> ' if dropout is not None else ''}"
                     f"{norm.original_type}{' -> ' + act.original_type if act is not None else ''}")

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout_fn(h, self.dropout_p, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self._view.sync(self._norm)
        slope = self._act.weight if self.activation == "prelu" else self.negative_slope
        active = self._norm.training and self.dropout_p > 0
        return fused_conv_norm_act(x, self, view, self.activation, slope, dropout=self._dropout if active else None)

    def extra_repr(self) -> str:
        return self.desc


class FusedNormAct(nn.Module):
    """Norm -> [act] of a patched run as one :func:`fastmed.ops.norm_act` (same parameter names as the norm)."""

    def __init__(self, norm: nn.Module, act: Optional[Absorbed], act_module: Optional[nn.Module]):
        super().__init__()
        view = NormView.of(norm)
        self._parameters = norm._parameters
        self._buffers = norm._buffers
        self._non_persistent_buffers_set = norm._non_persistent_buffers_set
        self.training = norm.training
        self.activation, self.negative_slope, _ = activation_of(act_module)
        object.__setattr__(self, "_act", act)
        object.__setattr__(self, "_view", view)
        self.desc = f"{type(norm).__name__}{' -> ' + type(act_module).__name__ if act_module is not None else ''}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self._view.sync(self)
        slope = self._act.weight if self.activation == "prelu" else self.negative_slope
        y = norm_act(x, view.kind, view.weight, view.bias, activation=self.activation, negative_slope=slope,
                     **view.call_kwargs())
        view.count_batch()
        return y

    def extra_repr(self) -> str:
        return self.desc


# ------------------------------------------------------------------------------------- MONAI DynUNet / UNETR blocks
def _monai_block_kinds() -> dict:
    """{MONAI block class: kind} for the DynUNet / UNETR blocks, if MONAI's modules are loaded (a model holding
    one of these blocks has loaded them; nothing is imported here)."""
    kinds = {}
    dyn = sys.modules.get("monai.networks.blocks.dynunet_block")
    if dyn is not None:
        kinds.update({dyn.UnetBasicBlock: "basic", dyn.UnetResBlock: "res", dyn.UnetUpBlock: "up"})
    unetr = sys.modules.get("monai.networks.blocks.unetr_block")
    if unetr is not None:
        kinds.update({unetr.UnetrUpBlock: "up"})
    return kinds


_MONAI_WRAPPERS = ("UnetrBasicBlock", "UnetrPrUpBlock")  # fused through the blocks they hold


def _monai_conv_parts(convolution: nn.Module, what: str) -> tuple[Optional[nn.Module], Optional[nn.Module], str]:
    """(conv, dropout or None, problem or '') of a MONAI ``Convolution`` built by ``get_conv_layer(act=None,
    norm=None)``: ``conv`` and, with MONAI's ``dropout=``, ``adn.D``."""
    children = dict(convolution.named_children())
    conv = children.pop("conv", None)
    adn = children.pop("adn", None)
    if conv is None or children:
        return None, None, f"{what} is a {type(convolution).__name__} without MONAI's conv / adn layout"
    problem = _conv_problem(conv)
    if problem is not None:
        return None, None, f"{what}.conv: {problem}"
    dropout = None
    if adn is not None:
        parts = dict(adn.named_children())
        dropout = parts.pop("D", None)
        if parts or (dropout is not None and not isinstance(dropout, nn.modules.dropout._DropoutNd)):
            kinds = ", ".join(type(m).__name__ for m in adn.children())
            return None, None, (f"{what}.adn holds {kinds}; fastmed fuses the block when its convolutions are "
                                f"followed by nothing or a Dropout only (MONAI's get_conv_layer(act=None, norm=None))")
    return conv, dropout, ""


def _unet_block_problem(block: nn.Module) -> str:
    """'' when a UnetBasicBlock / UnetResBlock can be fused, else the exact reason."""
    names = ["1", "2"] + (["3"] if hasattr(block, "conv3") else [])
    for i in names:
        _, _, problem = _monai_conv_parts(getattr(block, f"conv{i}"), f"conv{i}")
        if problem:
            return problem
        norm = getattr(block, f"norm{i}", None)
        problem = _norm_problem(norm) if norm is not None else f"conv{i} has no norm{i}"
        if problem is not None:
            return f"norm{i}: {problem}"
    try:
        activation_args(block.lrelu)
    except TypeError:
        return (f"its activation (lrelu) is {type(block.lrelu).__name__}; fastmed fuses {_FUSED_ACTS} "
                f"(the block runs as MONAI's)")
    return ""


class FusedUnetBlock(nn.Module):
    """MONAI's ``UnetBasicBlock`` or ``UnetResBlock`` (DynUNet, UNETR, SwinUNETR) on fastmed ops.

    Keeps the block's children (``conv1``/``conv2``/``conv3`` MONAI ``Convolution`` s, ``norm1``/``norm2``/``norm3``,
    ``lrelu``), so state dicts are unchanged.  Basic: ``act(norm2(conv2(act(norm1(conv1(x))))))``, each
    conv -> norm -> act one :func:`fastmed.ops.conv_norm_act`; residual: ``act(norm2(conv2(act(norm1(conv1(x)))))
    + r)`` with ``r = norm3(conv3(x))`` (when the shape changes) or ``x``, the add and the final activation inside
    the second op.  With MONAI's ``dropout=`` active (training) each convolution's dropout runs between the
    convolution and the norm, in MONAI's order.  ``forward(x, skip=None)``: ``(N, Cin, *sp) -> (N, Cout,
    *sp // stride)``; ``skip`` given, the block reads ``cat([x, skip], 1)`` without writing it (the up blocks)."""

    def __init__(self, block: nn.Module, kind: str):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        self.kind, self.original_type = kind, type(block).__name__
        self.training = block.training
        object.__setattr__(self, "_views", {})

    def _view(self, i: str) -> NormView:
        """The synced :class:`NormView` of ``norm<i>`` (rebuilt if the module was replaced)."""
        norm = getattr(self, f"norm{i}")
        cached = self._views.get(i)
        if cached is None or cached[0] is not norm:
            cached = self._views[i] = (norm, NormView.of(norm))
        return cached[1].sync(norm)

    def _active_dropout(self, i: str) -> Optional[nn.Module]:
        adn = getattr(getattr(self, f"conv{i}"), "adn", None)
        drop = getattr(adn, "D", None) if adn is not None else None
        return drop if drop is not None and drop.training and drop.p > 0 else None

    def _run(self, i: str, x: torch.Tensor, act: Optional[nn.Module], residual=None, skip=None,
             conv_out=None) -> torch.Tensor:
        activation, slope = activation_args(act)
        return fused_conv_norm_act(x, getattr(self, f"conv{i}").conv, self._view(i), activation, slope,
                                   dropout=self._active_dropout(i), residual=residual, skip=skip, conv_out=conv_out)

    def _conv_dropout(self, i: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """conv<i> then its active dropout (MONAI's order of random draws), or None when no dropout is active."""
        drop = self._active_dropout(i)
        return drop(getattr(self, f"conv{i}").conv(x)) if drop is not None else None

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self._run("1", x, self.lrelu, skip=skip)
        if self.kind == "basic":
            return self._run("2", h, self.lrelu)
        h2 = self._conv_dropout("2", h)  # drawn before conv3's dropout, as MONAI draws them
        if hasattr(self, "conv3"):
            residual = self._run("3", x, None, skip=skip)
        else:
            residual = x if skip is None else torch.cat([x, skip], 1)
        return self._run("2", h, self.lrelu, residual=residual, conv_out=h2)

    def extra_repr(self) -> str:
        return f"{self.original_type}, fused"


class FusedUnetUpBlock(nn.Module):
    """MONAI's ``UnetUpBlock`` / ``UnetrUpBlock``: ``conv_block(cat([transp_conv(x), skip], 1))`` with the
    transposed convolution in torch and ``conv_block`` (a :class:`FusedUnetBlock` once patched) reading the
    upsampled features and the skip as two inputs.  Same children and keys as the original.
    ``forward(x (N, Cin, *s), skip (N, Cout, *s * up)) -> (N, Cout, *s * up)``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        self.original_type = type(block).__name__
        self.training = block.training

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = self.transp_conv(x)
        if isinstance(self.conv_block, FusedUnetBlock):
            return self.conv_block(out, skip=skip)
        return self.conv_block(torch.cat((out, skip), dim=1))

    def extra_repr(self) -> str:
        return f"{self.original_type}, fused"


def _describe_unet_block(block: nn.Module, kind: str) -> str:
    """What a fused UnetBasicBlock / UnetResBlock computes, for the report."""
    norm, act = type(block.norm1).__name__, type(block.lrelu).__name__
    drop = " (dropout between conv and norm)" if _monai_conv_parts(block.conv1, "conv1")[1] is not None else ""
    if kind == "basic":
        return f"2 x (Conv -> {norm} -> {act}){drop}"
    res = f"Conv -> {type(block.norm3).__name__}" if hasattr(block, "conv3") else "identity"
    return f"Conv -> {norm} -> {act}, Conv -> {norm} + residual ({res}) -> {act}{drop}"


def _patch_monai_blocks(model: nn.Module, report: PatchReport, mapping: dict, handled: set, parents: dict) -> None:
    """Fuse MONAI's DynUNet / UNETR conv blocks (see the module docstring); unfusable ones are reported."""
    kinds = _monai_block_kinds()
    if not kinds:
        return
    for name, blk in model.named_modules():
        kind = kinds.get(type(blk))
        if kind is None:
            continue
        if blk is model:
            report.skipped.append(("", f"{type(blk).__name__}: the model itself is the block; patch replaces blocks "
                                       f"inside a model (wrap it: nn.Sequential(block))"))
            handled.update(id(m) for m in blk.modules())
            continue
        owner = _owner(name, parents)
        where = f" (in {type(owner).__name__})" if owner is not None and \
            type(owner).__name__ in _MONAI_WRAPPERS + ("UnetUpBlock", "UnetrUpBlock") else ""
        if kind == "up":
            handled.update(id(m) for m in blk.transp_conv.modules())
            inner = kinds.get(type(blk.conv_block))
            if inner is None or _unet_block_problem(blk.conv_block):
                continue  # its conv block is reported (skipped, with the reason) or runs as it is
            mapping[id(blk)] = FusedUnetUpBlock(blk)
            report.replaced.append((name, f"{type(blk).__name__} -> FusedUnetUpBlock (transposed conv in torch; its "
                                          f"conv block reads the upsampled features and the skip without a "
                                          f"concatenation)"))
            continue
        problem = _unet_block_problem(blk)
        handled.update(id(m) for m in blk.modules())
        if problem:
            report.skipped.append((name, f"{type(blk).__name__}{where}: {problem}"))
            continue
        mapping[id(blk)] = FusedUnetBlock(blk, kind)
        report.replaced.append((name, f"{type(blk).__name__}{where} -> FusedUnetBlock "
                                      f"({_describe_unet_block(blk, kind)})"))


# ----------------------------------------------------------------------------------------- runs in nn.Sequential
def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _leaves(seq: nn.Sequential, prefix: str):
    """(qualified name, module) in execution order, flattening nested plain Sequentials."""
    for name, child in seq.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if _is_plain_sequential(child):
            yield from _leaves(child, qual)
        else:
            yield qual, child


def _conv_problem(conv: nn.Module) -> Optional[str]:
    if type(conv) not in _CONVS:
        return f"{type(conv).__name__} is not a plain Conv2d/Conv3d"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not fused"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r}: only explicit zero padding is fused"
    return None


def _norm_problem(norm: nn.Module) -> Optional[str]:
    if not isinstance(norm, _NORMS):
        return f"followed by {type(norm).__name__}, not an InstanceNorm/GroupNorm/BatchNorm"
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm) and norm.track_running_stats:
        return "InstanceNorm with track_running_stats=True is not fused"
    return None


def _is_noop(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)


def _find_runs(model: nn.Module, exclude: set):
    """Runs (conv name or None, conv, dropout, norm name, norm, act name or None, act) in Sequentials that are
    not inside an already handled block (``exclude``: module ids)."""
    runs = []
    for seq_name, seq in model.named_modules(remove_duplicate=False):
        if not _is_plain_sequential(seq) or id(seq) in exclude:
            continue
        leaves = list(_leaves(seq, seq_name))
        i = 0
        while i < len(leaves):
            name, mod = leaves[i]
            if isinstance(mod, _CONVS) or isinstance(mod, _NORMS):
                j = i  # index of the norm
                conv = dropout = None
                if not isinstance(mod, _NORMS):
                    j = i + 1
                    conv = mod
                    problem = _conv_problem(conv)
                    if problem is None and j < len(leaves) and isinstance(leaves[j][1], nn.modules.dropout._DropoutNd):
                        dropout = leaves[j][1]
                        j += 1
                    if problem is None and j < len(leaves):
                        problem = _norm_problem(leaves[j][1])
                    elif problem is None:
                        problem = "not followed by a normalization"
                    if problem is not None:
                        i += 1
                        continue
                norm_name, norm = leaves[j]
                if _norm_problem(norm) is not None:
                    i += 1
                    continue
                k = j + 1
                while k < len(leaves) and _is_noop(leaves[k][1]):
                    k += 1
                act_name = act = None
                if k < len(leaves) and isinstance(leaves[k][1], _ACTS):
                    act_name, act = leaves[k]
                    k += 1
                elif k != j + 1:  # only no-ops followed the norm: fuse the norm alone
                    k = j + 1
                runs.append((name if conv is not None else None, conv, dropout, norm_name, norm, act_name, act))
                i = k
            else:
                i += 1
    return runs


def _replace_everywhere(model: nn.Module, mapping: dict) -> None:
    """Point every reference (attribute or container entry) to a module in ``mapping`` at its replacement."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[name] = mapping[id(child)]


def _parents(model: nn.Module) -> dict:
    """{qualified name: parent module} (first name of each module)."""
    out = {}
    for name, mod in model.named_modules():
        for child_name, _ in mod.named_children():
            out.setdefault(f"{name}.{child_name}" if name else child_name, mod)
    return out


_NO_NORM_BLOCKS = {"UnetOutBlock": "the output convolution: no normalization follows, nothing to fuse",
                   "ResidualUnit": "the residual path's convolution: no normalization follows, nothing to fuse"}


def _is_container(m: nn.Module) -> bool:
    return _is_plain_sequential(m) or isinstance(m, (nn.ModuleList, nn.ModuleDict))


def _owner(name: str, parents: dict) -> Optional[nn.Module]:
    """The first ancestor of module ``name`` that is not a container (plain Sequential, ModuleList/Dict)."""
    while name in parents:
        parent = parents[name]
        if not _is_container(parent):
            return parent
        name = name.rpartition(".")[0]
    return None


def _block_of(name: str, parents: dict) -> str:
    """'<parent type>' or '<parent type> (in <owner type>)' when the parent is a container."""
    parent = parents.get(name)
    if parent is None:
        return "the model"
    owner = _owner(name, parents)
    if owner is None or owner is parent:
        return type(parent).__name__
    return f"{type(parent).__name__} (in {type(owner).__name__})"


def _skip_reason(name: str, conv: nn.Module, model: nn.Module, parents: dict) -> str:
    """``"<conv type> in <block>: <reason>"`` for a convolution that was not fused."""
    head = f"{type(conv).__name__} in {_block_of(name, parents)}"
    transposed = isinstance(conv, _TRANSPOSED)
    problem = None if transposed else _conv_problem(conv)
    if problem is not None:
        return f"{head}: {problem}"
    owner = _owner(name, parents)
    known = _NO_NORM_BLOCKS.get(type(owner).__name__) if owner is not None else None
    if known is not None and not transposed:
        return f"{head}: {known}"
    parent = parents.get(name)
    if parent is not None and not _is_plain_sequential(parent):
        return (f"{head}: {type(parent).__name__}.forward is its own code; fastmed fuses only runs whose order it "
                f"can read (nn.Sequential, MONAI's DynUNet/UNETR blocks), so it leaves the convolution as it is")
    top = name.rpartition(".")[0]  # the outermost plain Sequential holding the convolution
    while top in parents and _is_plain_sequential(parents[top]):
        top = top.rpartition(".")[0]
    seq = model.get_submodule(top) if top or _is_plain_sequential(model) else parent
    leaves = list(_leaves(seq, top))
    index = next(i for i, (n, m) in enumerate(leaves) if m is conv)
    following = [m for _, m in leaves[index + 1:] if not _is_noop(m)]
    nxt = following[0] if following else None
    if transposed:
        if isinstance(nxt, FusedNormAct):
            return (f"{head}: transposed convolutions run in torch (fastmed fuses Conv2d/Conv3d); the "
                    f"{nxt.desc} after it is fused")
        return f"{head}: transposed convolutions run in torch (fastmed fuses Conv2d/Conv3d), and no norm follows"
    if nxt is None:
        return f"{head}: the last module of its Sequential: no normalization follows, nothing to fuse"
    return f"{head}: followed by {type(nxt).__name__}, not a normalization: nothing to fuse"


class FusedSwinBlock(nn.Module):
    """A timm-style or Swin-Unet-style Swin block whose (shifted-)window attention runs as one
    :func:`fastmed.ops.window_attention`.

    Keeps the original children under their names (``norm1``, ``attn`` with ``qkv``/``proj``/
    ``relative_position_bias_table``/``relative_position_index``, ``norm2``, ``mlp``, ``drop_path`` or
    ``drop_path1``/``drop_path2``) and the ``attn_mask`` buffer, so state dicts are unchanged.
    Swin-Unet layout: ``forward(x (B, H*W, C))`` with ``input_resolution = (H, W)``; timm layout:
    ``forward(x (B, H, W, C))``.  The original block's own forward runs (on the same children) where the fused op
    would compute something else: in training with attention dropout (the fused op has none; whatever the mode
    at patching time, so ``.train()`` after patching keeps the dropout), and on a timm grid not divisible by the
    window (timm pads after the shift there, which the fused op does not reproduce)."""

    def __init__(self, block: nn.Module, layout: str):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        self.register_buffer("attn_mask", getattr(block, "attn_mask", None),
                             persistent="attn_mask" not in getattr(block, "_non_persistent_buffers_set", ()))
        self.layout = layout
        self.training = block.training
        ws, ss = block.window_size, block.shift_size
        self.window = (ws, ws) if isinstance(ws, int) else tuple(ws)
        self.shift = (ss, ss) if isinstance(ss, int) else tuple(ss)
        self.input_resolution = tuple(getattr(block, "input_resolution", ())) or None
        object.__setattr__(self, "_original", block)

    def _window_attention(self, h: torch.Tensor) -> torch.Tensor:
        from fastmed.ops.window_attention import window_attention

        attn = self.attn
        out = window_attention(attn.qkv(h), attn.num_heads, self.window, self.shift,
                               attn.relative_position_bias_table, float(attn.scale), qkv_pad=attn.qkv.bias)
        return attn.proj_drop(attn.proj(out))

    def _run_original(self, x: torch.Tensor) -> torch.Tensor:
        """The original block's forward, with this module's mask buffer (moved by ``.to()``) and mode."""
        original = self._original
        original.attn_mask = self.attn_mask
        original.training = self.training
        return type(original).forward(original, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn.attn_drop.p > 0:
            return self._run_original(x)
        if self.layout == "swin_unet":
            H, W = self.input_resolution
            B, L, C = x.shape
            if L != H * W:
                raise ValueError(f"input feature has wrong size: {L} tokens for input_resolution {(H, W)}")
            y = self._window_attention(self.norm1(x).view(B, H, W, C)).view(B, L, C)
            x = x + self.drop_path(y)
            return x + self.drop_path(self.mlp(self.norm2(x)))
        B, H, W, C = x.shape
        if H % self.window[0] or W % self.window[1]:
            return self._run_original(x)
        x = x + self.drop_path1(self._window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _swin_layout(blk: nn.Module) -> Optional[str]:
    """'swin_unet' / 'timm' for a duck-typed Swin block this module can fuse, else None."""
    attn = getattr(blk, "attn", None)
    needed = ("qkv", "proj", "proj_drop", "relative_position_bias_table", "relative_position_index", "num_heads",
              "scale")
    if attn is None or not all(hasattr(attn, a) for a in needed) or not all(
            hasattr(blk, a) for a in ("norm1", "norm2", "mlp", "window_size", "shift_size")):
        return None
    if not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):  # read in training, where dropout is kept
        return None
    if hasattr(blk, "input_resolution") and isinstance(blk.window_size, int) and hasattr(blk, "drop_path"):
        return "swin_unet"
    if hasattr(blk, "drop_path1") and hasattr(blk, "drop_path2") and not isinstance(blk.window_size, int):
        return "timm"
    return None


_DROPOUT_NOTE = "; in training, with attention dropout, the unfused composition"


def _patch_swin_blocks(model: nn.Module, report: PatchReport, mapping: dict) -> None:
    try:
        from monai.networks.nets.swin_unetr import SwinTransformerBlock as MonaiBlock
    except ImportError:
        MonaiBlock = None
    from fastmed.nn.swin import SwinTransformerBlock

    for name, blk in model.named_modules():
        if blk is model:  # a module cannot replace itself in place
            continue
        if type(blk) is not MonaiBlock:
            layout = _swin_layout(blk)
            if layout is not None:
                mapping[id(blk)] = FusedSwinBlock(blk, layout)
                report.replaced.append((name, f"{'Swin-Unet' if layout == 'swin_unet' else 'timm'} "
                                              f"SwinTransformerBlock -> FusedSwinBlock (fused window attention"
                                              f"{_DROPOUT_NOTE if blk.attn.attn_drop.p > 0 else ''})"))
            continue
        attn = blk.attn
        # fastmed's block runs MONAI's composition in training when attention dropout is on (any mode now)
        with torch.device("meta"):
            new = SwinTransformerBlock(blk.dim, blk.num_heads, tuple(blk.window_size), tuple(blk.shift_size),
                                       mlp_ratio=blk.mlp_ratio, qkv_bias=attn.qkv.bias is not None,
                                       attn_drop=attn.attn_drop.p, bias_index="monai")
        new.norm1, new.norm2, new.mlp, new.drop_path = blk.norm1, blk.norm2, blk.mlp, blk.drop_path
        new.attn.qkv, new.attn.proj, new.attn.proj_drop = attn.qkv, attn.proj, attn.proj_drop
        new.attn.attn_drop = attn.attn_drop
        new.attn.relative_position_bias_table = attn.relative_position_bias_table
        new.attn.relative_position_index = attn.relative_position_index
        new.train(blk.training)
        mapping[id(blk)] = new
        report.replaced.append((name, "MONAI SwinTransformerBlock -> fastmed.nn.SwinTransformerBlock "
                                      f"(fused window attention{_DROPOUT_NOTE if attn.attn_drop.p > 0 else ''})"))


# ------------------------------------------------------------------- segment_anything image-encoder attention
def _sam_encoder_classes() -> tuple:
    """(Block, Attention) of segment_anything's image encoder if its module is loaded (a model holding them has
    loaded it; nothing is imported here), else (None, None)."""
    mod = sys.modules.get("segment_anything.modeling.image_encoder")
    return (getattr(mod, "Block", None), getattr(mod, "Attention", None)) if mod is not None else (None, None)


class FusedSamAttention(nn.Module):
    """segment_anything's image-encoder ``Attention`` (decomposed relative position) as one
    :func:`fastmed.ops.sam_attention`.

    Holds the original's ``qkv`` and ``proj`` Linears and its ``rel_pos_h``/``rel_pos_w`` Parameters (the same
    objects under the same names).  ``forward(x (B, H, W, C)) -> (B, H, W, C)``: attention in ``window x window``
    windows of the grid, padded at the end by index (the padding tokens' qkv is the qkv bias, as segment_anything
    pads the normalized tokens with zeros), or over the whole grid for ``window=0``.  A global attention whose
    tables do not match the grid (segment_anything interpolates them for another input size) runs the original
    forward on the same parameters."""

    def __init__(self, attn: nn.Module, window: int):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self._parameters = attn._parameters  # rel_pos_h, rel_pos_w
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, float(attn.scale), attn.use_rel_pos
        self.window = int(window)
        self.training = attn.training
        object.__setattr__(self, "_original", attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fastmed.ops.sam_attention import sam_attention

        side = (x.shape[1], x.shape[2]) if self.window == 0 else (self.window, self.window)
        th, tw = self.rel_pos_h, self.rel_pos_w
        if self.window == 0 and (th.shape[0] != 2 * side[0] - 1 or tw.shape[0] != 2 * side[1] - 1):
            return type(self._original).forward(self, x)  # interpolated tables: segment_anything's own code
        qkv = self.qkv(x)
        bias = self.qkv.bias
        out = sam_attention(qkv, self.num_heads, th.to(qkv.dtype), tw.to(qkv.dtype), self.window, self.scale,
                            qkv_pad=None if bias is None else bias.to(qkv.dtype))
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, " + ("global" if self.window == 0 else f"window={self.window}")


class FusedSamBlock(nn.Module):
    """segment_anything's image-encoder ``Block`` with its attention (window partition and padding included) as one
    :func:`fastmed.ops.sam_attention`: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` on ``(B, H, W, C)``.
    Keeps the original's ``norm1``, ``norm2``, ``mlp`` and (as a :class:`FusedSamAttention`) ``attn``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.window_size = int(block.window_size)
        self.norm1 = block.norm1  # children in the original's order: same parameter and state-dict order
        self.attn = FusedSamAttention(block.attn, self.window_size)
        self.norm2, self.mlp = block.norm2, block.mlp
        self.training = block.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _sam_attention_desc(window: int) -> str:
    kind = "global attention" if window == 0 else f"{window}x{window} windowed attention"
    return f"{kind} with decomposed relative position -> fastmed.ops.sam_attention"


def _patch_sam_blocks(model: nn.Module, report: PatchReport, mapping: dict) -> None:
    block_cls, attn_cls = _sam_encoder_classes()
    if attn_cls is None:
        return
    inside = set()  # attention modules of replaced blocks
    for name, blk in model.named_modules():
        if block_cls is None or type(blk) is not block_cls or type(blk.attn) is not attn_cls:
            continue
        ws, attn = int(blk.window_size), blk.attn
        if not attn.use_rel_pos:
            continue  # reported with the attention below
        if ws > 0 and (attn.rel_pos_h.shape[0] != 2 * ws - 1 or attn.rel_pos_w.shape[0] != 2 * ws - 1):
            report.skipped.append((name, f"segment_anything Block: rel-pos tables of {attn.rel_pos_h.shape[0]} x "
                                         f"{attn.rel_pos_w.shape[0]} rows for window {ws} (interpolated by "
                                         f"segment_anything; fastmed needs 2 * window - 1)"))
            inside.add(id(attn))
            continue
        if blk is model:
            report.skipped.append((name, "segment_anything Block: the model itself (patch the model holding it)"))
            inside.add(id(attn))
            continue
        mapping[id(blk)] = FusedSamBlock(blk)
        inside.add(id(attn))
        report.replaced.append((name, f"segment_anything Block ({_sam_attention_desc(ws)}, window partition and "
                                      f"padding by index) -> FusedSamBlock"))
    for name, attn in model.named_modules():
        if type(attn) is not attn_cls or id(attn) in inside:
            continue
        if not attn.use_rel_pos:
            report.skipped.append((name, "segment_anything Attention: use_rel_pos=False; fastmed.ops.sam_attention "
                                         "fuses SAM's attention with decomposed relative position"))
        elif attn is model:
            report.skipped.append((name, "segment_anything Attention: the model itself (patch the model holding "
                                         "it)"))
        else:
            mapping[id(attn)] = FusedSamAttention(attn, 0)
            report.replaced.append((name, f"segment_anything Attention ({_sam_attention_desc(0)} over its input) "
                                          f"-> FusedSamAttention"))


def patch(model: nn.Module, *, conv: bool = True, attention: bool = True) -> PatchReport:
    """Replace, in place, the patterns fastmed accelerates (see the module docstring) and report.

    Args:
        model: any ``nn.Module``.
        conv: fuse MONAI's DynUNet/UNETR conv blocks and Conv/Norm/Activation runs.
        attention: replace Swin blocks (MONAI, Swin-Unet, timm) by fastmed's window-attention blocks and
            segment_anything's image-encoder blocks by :class:`FusedSamBlock`.

    Returns a :class:`PatchReport`: every replacement, and every convolution or MONAI block left alone with its
    block type and the reason.  Outputs and gradients are those of the original model (within the dtype's
    rounding), and ``model.state_dict()`` keeps its keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    mapping: dict = {}
    if attention:
        _patch_swin_blocks(model, report, mapping)
        _patch_sam_blocks(model, report, mapping)
        _replace_everywhere(model, mapping)
        mapping = {}
    if not conv:
        return report
    canonical = {id(m): n for n, m in model.named_modules()}  # first (attribute) name of each module
    handled: set = set()  # ids of modules inside fused (or reported) blocks
    for mod in model.modules():  # blocks fused by an earlier patch()
        if isinstance(mod, (FusedUnetBlock, FusedUnetUpBlock, FusedConvNormAct)):
            handled.update(id(m) for m in mod.modules())
    _patch_monai_blocks(model, report, mapping, handled, _parents(model))
    _replace_everywhere(model, mapping)
    mapping = {}
    fused_convs = set()
    done = set()
    for conv_name, cv, dropout, norm_name, norm, _act_name, act in _find_runs(model, handled):
        members = {id(m) for m in (cv, dropout, norm, act) if m is not None}
        if members & done:  # seen through a second container (nnU-Net's all_modules, MONAI's ADN)
            continue
        done |= members
        try:
            view = NormView.of(norm)
            activation_of(act)
        except TypeError as exc:
            what = canonical.get(id(cv if cv is not None else norm))
            report.skipped.append((what, f"{type(cv if cv is not None else norm).__name__}: {exc}"))
            if cv is not None:
                handled.add(id(cv))
            continue
        conv_name = canonical.get(id(cv), conv_name) if cv is not None else None
        norm_name = canonical.get(id(norm), norm_name)
        owner = conv_name or norm_name
        act_ph = Absorbed(act, owner) if act is not None else None
        if act is not None:
            mapping[id(act)] = act_ph
        if cv is not None:
            norm_ph = Absorbed(norm, owner)
            head = FusedConvNormAct(cv, norm_ph, act_ph, dropout, view, act)
            mapping[id(cv)], mapping[id(norm)] = head, norm_ph
            if dropout is not None:
                mapping[id(dropout)] = Absorbed(dropout, owner)
            fused_convs.add(id(cv))
            report.replaced.append((conv_name, f"{head.desc} -> FusedConvNormAct"))
        else:
            head = FusedNormAct(norm, act_ph, act)
            mapping[id(norm)] = head
            report.replaced.append((norm_name, f"{head.desc} -> FusedNormAct"))
    _replace_everywhere(model, mapping)
    parents = _parents(model)
    for name, mod in model.named_modules():
        if isinstance(mod, _CONVS + _TRANSPOSED) and id(mod) not in fused_convs and id(mod) not in handled:
            report.skipped.append((name, _skip_reason(name, mod, model, parents)))
    return report
