"""Checkpoint converters: state dicts of nnU-Net, MONAI and timm models -> the matching fastmed model.

Every converter takes a state dict (``model.state_dict()`` or a loaded checkpoint's weights) and returns a new
dict keyed for the fastmed model; the tensors are shared, not copied.  Keys that have no counterpart raise
``ValueError`` naming them (nothing is dropped silently, except the documented duplicates).  ``load_*``
helpers build nothing: call ``model.load_state_dict(convert(...))`` on a model built with the same config.

nnU-Net v2 ``PlainConvUNet`` / ``ResidualEncoderUNet`` -> :class:`fastmed.models.UNet` (``UNet.nnunet``)
    Same module tree (see :mod:`fastmed.models.unet`), keys unchanged except:
      ``decoder.encoder.*``             dropped (nnU-Net's decoder holds a second reference to the encoder)
      ``*.all_modules.<i>.*``           dropped (ConvDropoutNormReLU registers its layers twice)
      ``decoder.seg_layers.<i>.*``      kept when the fastmed model has deep supervision; without it only
                                        the last head is kept, as ``decoder.seg_layers.0.*``

MONAI ``AttentionUnet(channels=(c0..cn), strides)`` -> :class:`fastmed.models.AttentionUNet`
    with ``P(i) = "model.1." + "submodule.1." * i`` the prefix of level i (0 = top):
      ``model.0.conv.<j>.conv.*`` / ``.adn.N.*``        ``head.convs.<j>.conv.*`` / ``.norm.*``
      ``P(i)submodule.0.conv.<j>...`` (bottom level:     ``down.<i>.convs.<j>.conv.*`` / ``.norm.*``
      ``P(i)submodule.conv.<j>...``)
      ``P(i)upconv.up.conv.*`` / ``.adn.N.*``           ``up.<i>.conv.*`` / ``up.<i>.norm.*``
      ``P(i)attention.W_g.0.conv.*`` / ``W_g.1.*``      ``gates.<i>.W_g.conv.*`` / ``gates.<i>.W_g.norm.*``
      (likewise ``W_x`` and ``psi``)
      ``P(i)merge.conv.*`` / ``merge.adn.A.weight``     ``merge.<i>.conv.*`` / ``merge.<i>.nonlin.weight``
      ``model.2.conv.*``                                ``out.*``
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

__all__ = ["from_nnunet", "from_monai_attention_unet"]


def _check_state(state_dict, name: str = "state_dict") -> Mapping[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} must be a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        raise ValueError(f"{name} looks like a checkpoint wrapper (it has a 'state_dict' entry); pass "
                         f"checkpoint['state_dict'] (or nnU-Net's checkpoint['network_weights'])")
    return state_dict


def _rename(state_dict: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]], source: str) -> dict:
    """Rename by the longest matching prefix; a key no rule matches raises ValueError."""
    rules = sorted(rules, key=lambda r: -len(r[0]))
    out = {}
    for key, value in state_dict.items():
        for old, new in rules:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"{source} key {key!r} has no fastmed counterpart")
    return out


# ----------------------------------------------------------------------------------------------------------------
def from_nnunet(state_dict: Mapping[str, torch.Tensor], deep_supervision: bool = True) -> dict:
    """nnU-Net v2 ``PlainConvUNet`` / ``ResidualEncoderUNet`` weights (``checkpoint["network_weights"]``) for
    :class:`fastmed.models.UNet` built by ``UNet.nnunet(...)`` with the plan's configuration.

    ``deep_supervision``: whether the fastmed model has all segmentation heads (True) or only the final one."""
    state_dict = _check_state(state_dict)
    heads = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.seg_layers.")})
    out = {}
    for key, value in state_dict.items():
        if key.startswith("decoder.encoder.") or ".all_modules." in key:
            continue
        if not (key.startswith("encoder.") or key.startswith("decoder.")):
            raise ValueError(f"nnU-Net key {key!r} is neither encoder.* nor decoder.*: not a PlainConvUNet / "
                             f"ResidualEncoderUNet state dict")
        if key.startswith("decoder.seg_layers.") and not deep_supervision:
            idx = int(key.split(".")[2])
            if idx != heads[-1]:
                continue
            key = "decoder.seg_layers.0." + key.split(".", 3)[3]
        out[key] = value
    return out


def from_monai_attention_unet(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """MONAI ``AttentionUnet`` weights for :class:`fastmed.models.AttentionUNet` (same constructor arguments)."""
    state_dict = _check_state(state_dict)
    depth = 0
    while any(k.startswith("model.1." + "submodule.1." * depth + "attention.") for k in state_dict):
        depth += 1
    if depth == 0:
        raise ValueError("state_dict has no model.1.attention.* keys: not a MONAI AttentionUnet state dict")
    rules = [("model.2.conv.", "out.")]
    for j in range(2):
        rules += [(f"model.0.conv.{j}.conv.", f"head.convs.{j}.conv."), (f"model.0.conv.{j}.adn.N.", f"head.convs.{j}.norm.")]
    for i in range(depth):
        p = "model.1." + "submodule.1." * i
        down = p + ("submodule.0.conv." if i < depth - 1 else "submodule.conv.")
        for j in range(2):
            rules += [(f"{down}{j}.conv.", f"down.{i}.convs.{j}.conv."), (f"{down}{j}.adn.N.", f"down.{i}.convs.{j}.norm.")]
        rules += [(p + "upconv.up.conv.", f"up.{i}.conv."), (p + "upconv.up.adn.N.", f"up.{i}.norm."),
                  (p + "merge.conv.", f"merge.{i}.conv."), (p + "merge.adn.A.", f"merge.{i}.nonlin.")]
        for branch in ("W_g", "W_x", "psi"):
            rules += [(f"{p}attention.{branch}.0.conv.", f"gates.{i}.{branch}.conv."),
                      (f"{p}attention.{branch}.1.", f"gates.{i}.{branch}.norm.")]
    return _rename(state_dict, rules, "MONAI AttentionUnet")
