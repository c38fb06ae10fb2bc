"""``fastmed.patch(model)``: put fastmed's fused ops under an existing PyTorch / MONAI / nnU-Net model.

    report = fastmed.patch(model)     # in place; returns what was replaced and what was not, and why
    print(report)

What is replaced (parameters and buffers are shared, never copied; ``state_dict()`` keys stay the same, so
checkpoints load before or after patching):

* **Conv -> [Dropout] -> Norm -> [Activation]** runs, found in execution order inside ``nn.Sequential``
  containers (nested ones flattened: MONAI's ``Convolution`` = ``Sequential(conv, ADN(N, D, A))``, nnU-Net's
  ``ConvDropoutNormReLU.all_modules``, plain ``nn.Sequential(Conv3d, InstanceNorm3d, LeakyReLU)``).  The
  convolution becomes a :class:`FusedConvNormAct` that computes the whole run with
  :func:`fastmed.ops.conv_norm_act` (or conv, dropout, then :func:`fastmed.ops.norm_act` while a dropout
  is active); the norm, dropout and activation modules become :class:`Absorbed` placeholders that hold
  the same parameters and return their input.  A module referenced twice (nnU-Net registers its layers both
  as attributes and in ``all_modules``) is replaced everywhere.
* **Norm -> [Activation]** runs without a preceding convolution (pre-activation blocks): the norm becomes a
  :class:`FusedNormAct` (:func:`fastmed.ops.norm_act`).
* **MONAI ``SwinTransformerBlock``** (SwinUNETR): replaced by :class:`fastmed.nn.SwinTransformerBlock` sharing
  its norms, qkv / proj / relative-position table and MLP (:func:`fastmed.ops.window_attention`).
* **Swin-Unet / timm ``SwinTransformerBlock``s** (recognized by their attributes: ``attn.qkv``, ``attn.proj``,
  ``attn.relative_position_bias_table``, ``attn.attn_drop`` (an ``nn.Dropout``), ``norm1``, ``norm2``, ``mlp``,
  ``window_size``, ``shift_size`` and ``input_resolution`` (Swin-Unet) or ``drop_path1``/``drop_path2``
  (timm)): replaced by a :class:`FusedSwinBlock` holding the same children.
* Swin blocks with attention dropout are replaced in either mode and keep the original's behaviour in both: in
  training (also after ``.train()`` on a model patched in eval mode) their attention runs unfused, with the
  dropout; in eval mode it is fused.

Supported pieces: ``Conv2d``/``Conv3d`` (groups 1, zero padding given as ints), ``InstanceNorm*d`` (without
running statistics), ``GroupNorm``, ``BatchNorm*d``, activations ``ReLU``, ``LeakyReLU``, ``PReLU``, ``GELU``,
``SiLU``, ``Identity``.  Anything else is left alone; convolutions that were not fused are listed in
``report.skipped`` with the reason (e.g. a custom ``forward`` whose order cannot be read off a Sequential).
timm is not installed in fastmed's CI: its block is checked against a reproduction of timm's code for grids
divisible by the window (other grids run timm's own forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastmed.nn.norm_act import NormAct, activation_of
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.norm_act import norm_act

__all__ = ["patch", "PatchReport", "FusedConvNormAct", "FusedNormAct", "FusedSwinBlock", "Absorbed"]

_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_ACTS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU)


@dataclass
class PatchReport:
    """``replaced``: (module name, description); ``skipped``: (module name, reason)."""
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastmed.patch: replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name}: {what}" for name, what in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


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


def _norm_config(norm: nn.Module) -> dict:
    """kind / groups / eps / momentum / running statistics of a torch norm module (checked by NormAct)."""
    NormAct.from_modules(norm, None)  # raises TypeError for what fastmed cannot run
    if isinstance(norm, nn.GroupNorm):
        return dict(kind="group", num_groups=norm.num_groups, eps=norm.eps, momentum=0.1, track=False)
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return dict(kind="instance", num_groups=None, eps=norm.eps, momentum=0.1, track=False)
    return dict(kind="batch", num_groups=None, eps=norm.eps, momentum=norm.momentum,
                track=norm.track_running_stats)


def _norm_args(cfg: dict, params: nn.Module, training_now: bool) -> dict:
    """Keyword arguments of norm_act / conv_norm_act for one call; counts batches like torch's batch norm.

    ``params`` holds ``weight``/``bias``/``running_*``/``num_batches_tracked`` (the registered module);
    ``training_now`` is the training flag of the registered (patched) module."""
    track = cfg["track"]
    momentum = 0.0 if cfg["momentum"] is None else cfg["momentum"]
    if cfg["kind"] == "batch" and training_now and track:
        params.num_batches_tracked.add_(1)
        if cfg["momentum"] is None:
            momentum = 1.0 / float(params.num_batches_tracked)
    return dict(num_groups=cfg["num_groups"], eps=cfg["eps"], momentum=momentum,
                running_mean=params.running_mean if track else None,
                running_var=params.running_var if track else None, training=training_now or not track)


class FusedConvNormAct(nn.Module):
    """A convolution that computes conv -> [dropout] -> norm -> [act] of a patched run in one fastmed op.

    Holds the convolution's ``weight``/``bias`` (same names as the ``nn.ConvNd`` it replaces) and reads the
    norm's and activation's parameters from their :class:`Absorbed` placeholders (registered in the model, so
    ``.to()``, ``.train()`` and ``load_state_dict`` reach them).  ``(N, Cin, *sp) -> (N, Cout, *sp_out)``."""

    def __init__(self, conv: nn.Module, norm: "Absorbed", act: Optional["Absorbed"], dropout: Optional[nn.Module],
                 norm_cfg: dict, act_module: Optional[nn.Module]):
        super().__init__()
        self._parameters = conv._parameters
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.training = conv.training
        self.norm_cfg = norm_cfg
        self.dropout_p = float(dropout.p) if dropout is not None else 0.0
        self.dropout_fn = {nn.Dropout2d: torch.nn.functional.dropout2d,
                           nn.Dropout3d: torch.nn.functional.dropout3d}.get(type(dropout),
                                                                             torch.nn.functional.dropout)
        self.activation, self.negative_slope, _ = activation_of(act_module)
        # references, not submodules: the placeholders are registered where the original modules were
        object.__setattr__(self, "_norm", norm)
        object.__setattr__(self, "_act", act)
        self.desc = (f"{type(conv).__name__} -> {type(dropout).__name__ + ' -> ' if dropout is not None else ''}"
                     f"{norm.original_type}{' -> ' + act.original_type if act is not None else ''}")

    def _slope(self):
        return self._act.weight if self.activation == "prelu" else self.negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nrm = self._norm
        kw = _norm_args(self.norm_cfg, nrm, self.training)
        kind = self.norm_cfg["kind"]
        if self.training and self.dropout_p > 0:
            conv = torch.nn.functional.conv3d if x.dim() == 5 else torch.nn.functional.conv2d
            h = conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            h = self.dropout_fn(h, self.dropout_p, training=True)
            return norm_act(h, kind, nrm.weight, nrm.bias, activation=self.activation,
                            negative_slope=self._slope(), **kw)
        return conv_norm_act(x, self.weight, self.bias, nrm.weight, nrm.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, norm=kind, activation=self.activation,
                             negative_slope=self._slope(), **kw)

    def extra_repr(self) -> str:
        return self.desc


class FusedNormAct(nn.Module):
    """Norm -> [act] of a patched run as one :func:`fastmed.ops.norm_act` (same parameter names as the norm)."""

    def __init__(self, norm: nn.Module, act: Optional["Absorbed"], act_module: Optional[nn.Module]):
        super().__init__()
        self.norm_cfg = _norm_config(norm)
        self._parameters = norm._parameters
        self._buffers = norm._buffers
        self._non_persistent_buffers_set = norm._non_persistent_buffers_set
        self.training = norm.training
        self.activation, self.negative_slope, _ = activation_of(act_module)
        object.__setattr__(self, "_act", act)
        self.desc = f"{type(norm).__name__}{' -> ' + type(act_module).__name__ if act_module is not None else ''}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self._act.weight if self.activation == "prelu" else self.negative_slope
        return norm_act(x, self.norm_cfg["kind"], self.weight, self.bias, activation=self.activation,
                        negative_slope=slope, **_norm_args(self.norm_cfg, self, self.training))

    def extra_repr(self) -> str:
        return self.desc


# ----------------------------------------------------------------------------------------------------------------
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
    if type(conv) not in (nn.Conv2d, nn.Conv3d):
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


def _find_runs(model: nn.Module):
    """Runs (conv name or None, conv, dropout, norm name, norm, act name or None, act) in Sequentials."""
    runs, fused_convs = [], set()
    for seq_name, seq in model.named_modules(remove_duplicate=False):
        if not _is_plain_sequential(seq):
            continue
        leaves = list(_leaves(seq, seq_name))
        i = 0
        while i < len(leaves):
            name, mod = leaves[i]
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)) or isinstance(mod, _NORMS):
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
                if conv is not None:
                    fused_convs.add(id(conv))
                i = k
            else:
                i += 1
    return runs, fused_convs


def _replace_everywhere(model: nn.Module, mapping: dict) -> None:
    """Point every reference (attribute or container entry) to a module in ``mapping`` at its replacement."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[name] = mapping[id(child)]


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


def patch(model: nn.Module, *, conv: bool = True, attention: bool = True) -> PatchReport:
    """Replace, in place, the patterns fastmed accelerates (see the module docstring) and report.

    Args:
        model: any ``nn.Module``.
        conv: fuse Conv/Norm/Activation runs.
        attention: replace MONAI Swin blocks by fastmed's window-attention blocks.

    Returns a :class:`PatchReport`.  Outputs and gradients are those of the original model (within the dtype's
    rounding), and ``model.state_dict()`` keeps its keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    canonical = {id(m): n for n, m in model.named_modules()}  # first (attribute) name of each module
    mapping: dict = {}
    if attention:
        _patch_swin_blocks(model, report, mapping)
        _replace_everywhere(model, mapping)
        mapping = {}
    if conv:
        runs, fused_convs = _find_runs(model)
        done = set()
        for conv_name, cv, dropout, norm_name, norm, act_name, act in runs:
            members = {id(m) for m in (cv, dropout, norm, act) if m is not None}
            if members & done:  # seen through a second container (nnU-Net's all_modules, MONAI's ADN)
                continue
            done |= members
            try:
                cfg = _norm_config(norm)
                activation_of(act)
            except TypeError as exc:
                report.skipped.append((canonical.get(id(cv if cv is not None else norm)), str(exc)))
                fused_convs.discard(id(cv))
                continue
            conv_name = canonical.get(id(cv), conv_name) if cv is not None else None
            norm_name = canonical.get(id(norm), norm_name)
            owner = conv_name or norm_name
            act_ph = Absorbed(act, owner) if act is not None else None
            if act is not None:
                mapping[id(act)] = act_ph
            if cv is not None:
                norm_ph = Absorbed(norm, owner)
                head = FusedConvNormAct(cv, norm_ph, act_ph, dropout, cfg, act)
                mapping[id(cv)], mapping[id(norm)] = head, norm_ph
                if dropout is not None:
                    mapping[id(dropout)] = Absorbed(dropout, owner)
                report.replaced.append((conv_name, f"{head.desc} -> FusedConvNormAct"))
            else:
                head = FusedNormAct(norm, act_ph, act)
                mapping[id(norm)] = head
                report.replaced.append((norm_name, f"{head.desc} -> FusedNormAct"))
        _replace_everywhere(model, mapping)
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)) and id(mod) not in fused_convs:
                problem = _conv_problem(mod)
                if problem is None:
                    problem = ("not part of a Conv -> Norm run in an nn.Sequential (custom forward order "
                               "cannot be verified, or no normalization follows)")
                report.skipped.append((name, problem))
    return report
