"""Checkpoint converters: state dicts of nnU-Net, MONAI and timm models -> the matching fastmed model.

Every converter takes a state dict (``model.state_dict()`` or a loaded checkpoint's weights) and returns a new
dict keyed for the fastmed model; the tensors are shared, not copied.  Keys that have no counterpart raise
``ValueError`` naming them (nothing is dropped silently, except the documented duplicates).  ``load_*``
helpers build nothing: call ``model.load_state_dict(convert(...))`` on a model built with the same config.

nnU-Net v2 ``PlainConvUNet`` / ``ResidualEncoderUNet`` -> :class:`fastmed.models.UNet` (``UNet.nnunet``); the
input is ``checkpoint["network_weights"]`` or the whole nnU-Net checkpoint; :func:`to_nnunet` goes back (adds the
duplicates below, and the heads nnU-Net has when the fastmed model was built without deep supervision)
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

timm ``vit_*`` (``VisionTransformer``, class token, no register tokens / layer scale / qk-norm) ->
:class:`fastmed.models.ViT`: identical keys (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``, ``head.*``); keys of timm
features fastmed's ViT does not have (``reg_token``, ``ls1.gamma``, ``attn.q_norm``, ``fc_norm`` with
parameters, ...) raise ``ValueError``.

Swin-Unet (Cao et al., ``SwinUnet`` / ``SwinTransformerSys``) and timm-style Swin keys ->
:class:`fastmed.models.SwinUNet`:
      ``swin_unet.`` prefix                              stripped (the ``SwinUnet`` wrapper)
      ``*.mlp.fc1.*`` / ``*.mlp.fc2.*``                  ``*.mlp.linear1.*`` / ``*.mlp.linear2.*``
      ``*.attn_mask``                                    dropped (fastmed builds the shift mask in the kernel)
      everything else                                    unchanged (see :mod:`fastmed.models.swin_unet`)

timm ``swin_*`` / official Swin Transformer classification weights (``swin_tiny_patch4_window7_224``) ->
the *encoder* of :class:`fastmed.models.SwinUNet` (and, with ``mirror_decoder=True``, its decoder blocks, as
Swin-Unet initializes them): :func:`from_timm_swin`
      ``model.`` wrapper / ``state_dict["model"]``       unwrapped
      ``*.mlp.fc1.*`` / ``*.mlp.fc2.*``                  ``*.mlp.linear1.*`` / ``*.mlp.linear2.*``
      ``layers.<i>.downsample.*`` (timm >= 0.9 puts       ``layers.<i-1>.downsample.*`` (merging at the end of
      the merging at the start of stage i)                stage i-1, as Swin-Unet)
      ``head.*``, ``*.attn_mask``                        dropped (classifier; masks are built in the kernel)
      ``layers.<i>.blocks.*`` (mirror_decoder)           also ``layers_up.<n-1-i>.blocks.*``

MONAI ``SwinTransformerBlock`` (SwinUNETR's blocks) -> :class:`fastmed.nn.SwinTransformerBlock`: identical keys
(``norm1``, ``attn.{qkv,proj,relative_position_bias_table,relative_position_index}``, ``norm2``,
``mlp.linear1``, ``mlp.linear2``); :func:`from_monai_swin_block` checks them.

MONAI U-Net blocks -> :class:`fastmed.nn.ConvNormAct`: :func:`from_monai_unet_block` (``Convolution``:
``conv.*`` stays, ``adn.N.*`` -> ``norm.*``, ``adn.A.*`` -> ``nonlin.*``; ``UnetBasicBlock``:
``conv1.conv``/``norm1`` -> ``0.conv``/``0.norm``, ``conv2.conv``/``norm2`` -> ``1.conv``/``1.norm``; the full
table is in :mod:`fastmed.nn.conv_block`).

MONAI ``UNet`` (``monai.networks.nets.UNet``) -> :class:`fastmed.models.MonaiUNet` (same constructor arguments):
identical keys, since MonaiUNet has MONAI's module tree (see :mod:`fastmed.models.monai_unet`); with
``P(i) = "model." + "1.submodule." * i``:
      ``P(i)0.<block>``                                 down layer of level i          (same key)
      ``P(n-1).<block>``                                bottom layer                   (same key)
      ``P(i)2.<block>`` / ``P(i)2.0.<block>``,          up layer (transposed conv,     (same key)
      ``P(i)2.1.<block>``                               then residual unit)
    where ``<block>`` is ``conv.*``, ``adn.N.*``, ``adn.A.weight`` (a ``Convolution``) or ``conv.unit<k>.``
    + those, ``residual.*`` (a ``ResidualUnit``).  :func:`from_monai_unet` checks the keys against this layout.

Whole MONAI ``BasicUNet`` / ``DynUNet`` models have no separate fastmed twin: :func:`fastmed.patch` fuses them
(and ``UNet``) in place with unchanged keys, so their checkpoints load as they are (tested on ``UNet`` and
``BasicUNet``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from fastmed._validate import check_state_dict
from fastmed.nn.conv_block import convert_monai_state_dict as from_monai_unet_block  # noqa: E402  (re-export)

__all__ = ["from_nnunet", "to_nnunet", "from_monai_attention_unet", "from_monai_unet", "from_monai_unet_block",
           "from_timm_vit", "from_swin_unet", "from_timm_swin", "from_monai_swin_block"]


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
_NNUNET_SEG_LAYER = re.compile(r"decoder\.seg_layers\.(\d+)\.(.+)")


def from_nnunet(state_dict: Mapping[str, torch.Tensor], deep_supervision: bool = True) -> dict:
    """nnU-Net v2 ``PlainConvUNet`` / ``ResidualEncoderUNet`` weights for :class:`fastmed.models.UNet` built by
    ``UNet.nnunet(...)`` with the plan's configuration.

    ``state_dict``: ``checkpoint["network_weights"]``, or the whole nnU-Net checkpoint (``torch.load`` of
    ``checkpoint_final.pth``), whose ``network_weights`` entry is used.
    ``deep_supervision``: whether the fastmed model has all segmentation heads (True) or only the final one."""
    state_dict = check_state_dict(state_dict)
    if "network_weights" in state_dict:  # a whole nnU-Net checkpoint
        state_dict = check_state_dict(state_dict["network_weights"], "checkpoint['network_weights']")
    heads = {}
    for key in state_dict:
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings (parameter names), got {key!r}")
        if key.startswith("decoder.seg_layers."):
            match = _NNUNET_SEG_LAYER.fullmatch(key)
            if match is None:
                raise ValueError(f"nnU-Net key {key!r} is not decoder.seg_layers.<i>.<parameter> with an integer "
                                 f"head index <i>: not a PlainConvUNet / ResidualEncoderUNet state dict")
            heads[key] = int(match.group(1))
    last = max(heads.values(), default=None)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("decoder.encoder.") or ".all_modules." in key:
            continue
        if not (key.startswith("encoder.") or key.startswith("decoder.")):
            raise ValueError(f"nnU-Net key {key!r} is neither encoder.* nor decoder.*: not a PlainConvUNet / "
                             f"ResidualEncoderUNet state dict (a whole checkpoint holds it as 'network_weights')")
        if key in heads and not deep_supervision:
            if heads[key] != last:
                continue
            key = "decoder.seg_layers.0." + _NNUNET_SEG_LAYER.fullmatch(key).group(2)
        out[key] = value
    return out


_CDNR_KEY = re.compile(r"(.+)\.(conv|norm|nonlin)\.([^.]+)")  # a ConvDropoutNormReLU's conv / norm / nonlin
_CDNR_PARTS = ("conv", "dropout", "norm", "nonlin")  # its all_modules order (dropout only with a dropout op)



def to_nnunet(state_dict: Mapping[str, torch.Tensor], *, dropout: bool = False, fill_heads: bool = False) -> dict:
    """:class:`fastmed.models.UNet` weights (``UNet.nnunet(...)``, plain or residual encoder) for nnU-Net v2's
    ``PlainConvUNet`` / ``ResidualEncoderUNet`` with the same configuration: the inverse of :func:`from_nnunet`;
    the result loads with ``network.load_state_dict(...)`` (strict) and is what nnU-Net saves as
    ``checkpoint["network_weights"]``.

    Adds what nnU-Net stores twice: ``decoder.encoder.*`` (its decoder's reference to the encoder) and each
    ``ConvDropoutNormReLU``'s ``all_modules.<i>.*`` (``conv``, [``dropout``], ``norm``, ``nonlin`` in that
    order; every block is taken to have a norm, as nnU-Net's plans build them).  The tensors are shared, not
    copied.

    Args:
        state_dict: the fastmed model's ``state_dict()`` (keys ``encoder.*`` / ``decoder.*``).
        dropout: whether the nnU-Net network has a dropout op in its blocks (``dropout_op`` set in the plan):
            it shifts the ``all_modules`` indices of the norm and the nonlinearity by one.
        fill_heads: a model built without deep supervision has only the final segmentation head
            (``decoder.seg_layers.0``) while nnU-Net always has one per decoder stage: it becomes the last head,
            and the others are missing (``ValueError``) unless ``fill_heads=True``, which makes them zero
            convolutions (nnU-Net runs them only with deep supervision on; inference uses the last head only).
    """
    state_dict = check_state_dict(state_dict)
    if not state_dict:
        raise ValueError("state_dict is empty: not a fastmed UNet state dict")
    stages, heads = set(), {}
    for key in state_dict:
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings (parameter names), got {key!r}")
        if not key.startswith(("encoder.", "decoder.")) or key.startswith("decoder.encoder."):
            raise ValueError(f"fastmed UNet key {key!r} is not encoder.* / decoder.* (a fastmed.models.UNet "
                             f"state dict; nnU-Net's own keys go through from_nnunet)")
        if ".all_modules." in key:
            raise ValueError(f"key {key!r} is already nnU-Net's (all_modules): not a fastmed UNet state dict")
        if key.startswith("decoder.seg_layers."):
            match = _NNUNET_SEG_LAYER.fullmatch(key)
            if match is None:
                raise ValueError(f"fastmed UNet key {key!r} is not decoder.seg_layers.<i>.<parameter>")
            heads[key] = int(match.group(1))
        elif key.startswith("decoder.stages."):
            stage = key.split(".")[2]
            if not stage.isdigit():
                raise ValueError(f"fastmed UNet key {key!r} is not decoder.stages.<i>.* with an integer stage <i>")
            stages.add(int(stage))
    if not heads:
        raise ValueError("state_dict has no decoder.seg_layers.* (segmentation heads): not a fastmed UNet state dict")
    n_dec = len(stages)
    out = {}
    for key, value in state_dict.items():
        if key in heads and len(set(heads.values())) == 1 and n_dec > 1:  # no deep supervision: the last head
            key = f"decoder.seg_layers.{n_dec - 1}." + _NNUNET_SEG_LAYER.fullmatch(key).group(2)
        out[key] = value
    present = {int(k.split(".")[2]) for k in out if k.startswith("decoder.seg_layers.")}
    missing = sorted(set(range(n_dec)) - present)
    if missing and not fill_heads:
        raise ValueError(f"nnU-Net has one segmentation head per decoder stage ({n_dec}); the state dict has "
                         f"decoder.seg_layers {sorted(present)} only (a model without deep supervision): pass "
                         f"fill_heads=True for zero heads {missing}, or build the fastmed UNet with "
                         f"deep_supervision=True")
    if missing:
        last = f"decoder.seg_layers.{n_dec - 1}."
        last_w, last_b = out[last + "weight"], out.get(last + "bias")
        for s in missing:
            channels = _decoder_stage_channels(out, s)
            out[f"decoder.seg_layers.{s}.weight"] = last_w.new_zeros((last_w.shape[0], channels, *last_w.shape[2:]))
            if last_b is not None:
                out[f"decoder.seg_layers.{s}.bias"] = torch.zeros_like(last_b)
    index = {part: i for i, part in enumerate(p for p in _CDNR_PARTS if dropout or p != "dropout")}
    for key, value in list(out.items()):
        match = _CDNR_KEY.fullmatch(key)
        if match is not None:
            prefix, part, name = match.groups()
            out[f"{prefix}.all_modules.{index[part]}.{name}"] = value
    for key, value in list(out.items()):
        if key.startswith("encoder."):
            out["decoder." + key] = value
    return out


def _decoder_stage_channels(state_dict: Mapping[str, torch.Tensor], stage: int) -> int:
    """Output channels of decoder stage ``stage`` (its last convolution's weight)."""
    prefix = f"decoder.stages.{stage}."
    convs = sorted((k for k in state_dict if k.startswith(prefix) and k.endswith(".conv.weight")),
                   key=lambda k: [int(t) if t.isdigit() else t for t in k.split(".")])
    if not convs:
        raise ValueError(f"state_dict has no {prefix}*.conv.weight: cannot size segmentation head {stage}")
    return state_dict[convs[-1]].shape[0]


def from_monai_attention_unet(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """MONAI ``AttentionUnet`` weights for :class:`fastmed.models.AttentionUNet` (same constructor arguments)."""
    state_dict = check_state_dict(state_dict)
    depth = 0
    while any(k.startswith("model.1." + "submodule.1." * depth + "attention.") for k in state_dict):
        depth += 1
    if depth == 0:
        raise ValueError("state_dict has no model.1.attention.* keys: not a MONAI AttentionUnet state dict")
    rules = [("model.2.conv.", "out.")]
    for j in range(2):
        rules += [(f"model.0.conv.{j}.conv.", f"head.convs.{j}.conv."),
                  (f"model.0.conv.{j}.adn.N.", f"head.convs.{j}.norm.")]
    for i in range(depth):
        p = "model.1." + "submodule.1." * i
        down = p + ("submodule.0.conv." if i < depth - 1 else "submodule.conv.")
        for j in range(2):
            rules += [(f"{down}{j}.conv.", f"down.{i}.convs.{j}.conv."),
                      (f"{down}{j}.adn.N.", f"down.{i}.convs.{j}.norm.")]
        rules += [(p + "upconv.up.conv.", f"up.{i}.conv."), (p + "upconv.up.adn.N.", f"up.{i}.norm."),
                  (p + "merge.conv.", f"merge.{i}.conv."), (p + "merge.adn.A.", f"merge.{i}.nonlin.")]
        for branch in ("W_g", "W_x", "psi"):
            rules += [(f"{p}attention.{branch}.0.conv.", f"gates.{i}.{branch}.conv."),
                      (f"{p}attention.{branch}.1.", f"gates.{i}.{branch}.norm.")]
    return _rename(state_dict, rules, "MONAI AttentionUnet")


_MONAI_UNET_KEY = re.compile(r"model\.(1\.submodule\.)*(0\.|2\.([01]\.)?)?(conv\.unit\d+\.)?"
                             r"(conv|residual|adn\.N|adn\.A)\.(weight|bias|running_mean|running_var|num_batches_tracked)")


def from_monai_unet(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """MONAI ``UNet`` weights for :class:`fastmed.models.MonaiUNet` (same constructor arguments): the keys are
    the same; each is checked against MONAI's ``model.<...>`` layout and anything else raises ``ValueError``
    (e.g. a ``module.`` prefix from DataParallel, or ``CheckpointUNet``'s wrapped blocks)."""
    state_dict = check_state_dict(state_dict)
    if not state_dict:
        raise ValueError("state_dict is empty: not a MONAI UNet state dict")
    for key in state_dict:
        if not _MONAI_UNET_KEY.fullmatch(key):
            raise ValueError(f"MONAI UNet key {key!r} does not fit the layout of monai.networks.nets.UNet "
                             f"(model.[1.submodule.]*[0.|2.[0.|1.]]<conv|adn.N|adn.A|conv.unit<k>.*|residual>.*)")
    return dict(state_dict)


_VIT_KEY_PARTS = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")


def from_timm_vit(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """timm ``VisionTransformer`` weights (``vit_base_patch16_224`` ...) for :class:`fastmed.models.ViT` built with
    the same ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` and ``num_classes``."""
    state_dict = check_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key in ("cls_token", "pos_embed") or key.startswith(("patch_embed.proj.", "norm.", "head.")):
            out[key] = value
        elif key.startswith("blocks.") and key.split(".", 2)[2].startswith(_VIT_KEY_PARTS):
            out[key] = value
        else:
            raise ValueError(f"timm ViT key {key!r} has no counterpart in fastmed.models.ViT (supported: class "
                             f"token, learned position embedding, plain pre-norm blocks, final norm, linear head)")
    return out


def from_swin_unet(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Swin-Unet (Cao et al.) weights for :class:`fastmed.models.SwinUNet` (same ``embed_dim``, ``depths``,
    ``num_heads``, ``window_size``, classes).  Accepts the ``SwinUnet`` wrapper's ``swin_unet.`` prefix."""
    state_dict = check_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        k = key[len("swin_unet."):] if key.startswith("swin_unet.") else key
        if k.endswith(".attn_mask"):
            continue
        k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        top = k.split(".", 1)[0]
        if top not in ("patch_embed", "layers", "norm", "layers_up", "concat_back_dim", "norm_up", "up", "output"):
            raise ValueError(f"Swin-Unet key {key!r} has no counterpart in fastmed.models.SwinUNet")
        out[k] = value
    return out


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """timm's ``adapt_input_conv``: an RGB patch-embedding filter ``(O, 3, p, p)`` for ``in_channels`` inputs
    (1: the RGB filters summed; more than 3: repeated and scaled by ``3 / in_channels``)."""
    w = weight.float()
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    elif in_channels != 3:
        w = w.repeat(1, -(-in_channels // 3), 1, 1)[:, :in_channels] * (3 / in_channels)
    return w.to(weight.dtype)


def from_timm_swin(state_dict: Mapping[str, torch.Tensor], num_stages: int = 4, mirror_decoder: bool = True,
                   in_channels: int = 3) -> dict:
    """Swin Transformer classification weights (timm ``swin_*`` or Microsoft's checkpoints) for the encoder of
    :class:`fastmed.models.SwinUNet` (same ``embed_dim``, ``depths``, ``num_heads``, ``window_size``).

    ``in_channels``: the model's input channels; an RGB patch embedding is adapted as timm does for other channel
    counts (1: the RGB filters summed; more: repeated and scaled by ``3 / in_channels``).  Blocks whose
    ``relative_position_index`` the checkpoint lacks (timm >= 0.9 keeps it out of the state dict) get it from
    their table's (square) window, so it is not reported missing.

    Load the result with ``model.load_state_dict(..., strict=False)``: the decoder's patch expanding, skip
    projections, final expanding and output convolution (and, without ``mirror_decoder``, the decoder blocks)
    are not in a classification checkpoint and keep their initialization, as in Swin-Unet's ``load_from``."""
    from fastmed.reference.window_attention import relative_position_index

    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    state_dict = check_state_dict(state_dict)
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    keys = set(state_dict)
    merging_at_start = "layers.0.downsample.reduction.weight" not in keys and any(
        k.startswith("layers.1.downsample.") for k in keys)
    out = {}
    for key, value in state_dict.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k == "absolute_pos_embed":
            raise ValueError("absolute position embeddings (ape=True) are not supported by fastmed.models.SwinUNet")
        if k.startswith("head.") or k.endswith("attn_mask"):
            continue
        k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        top = k.split(".", 1)[0]
        if top not in ("patch_embed", "layers", "norm"):
            raise ValueError(f"Swin key {key!r} has no counterpart in fastmed.models.SwinUNet's encoder")
        if top == "layers":
            _, idx, rest = k.split(".", 2)
            i = int(idx)
            if rest.startswith("downsample.") and merging_at_start:
                i -= 1
            if not 0 <= i < num_stages:
                raise ValueError(f"Swin key {key!r} addresses stage {i}, outside the {num_stages} stages")
            k = f"layers.{i}.{rest}"
            if mirror_decoder and rest.startswith("blocks.") and i < num_stages - 1:
                out[f"layers_up.{num_stages - 1 - i}.{rest}"] = value
        if k == "patch_embed.proj.weight" and value.dim() == 4 and value.shape[1] != in_channels:
            if value.shape[1] != 3:
                raise ValueError(f"in_channels={in_channels}: only an RGB patch embedding (3 input channels) can be "
                                 f"adapted, got {key!r} of shape {tuple(value.shape)}")
            value = _adapt_input_conv(value, in_channels)
        out[k] = value
    for k in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        index_key = k[:-len("relative_position_bias_table")] + "relative_position_index"
        side = round(((out[k].shape[0] ** 0.5) + 1) / 2)
        if index_key not in out and (2 * side - 1) ** 2 == out[k].shape[0]:
            out[index_key] = relative_position_index((side, side))
    return out


_SWIN_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.relative_position_index",
                    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
                    "norm2.bias", "mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias")


def from_monai_swin_block(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A MONAI ``SwinTransformerBlock`` state dict for :class:`fastmed.nn.SwinTransformerBlock` (same names;
    ``attn.qkv.bias`` is absent with ``qkv_bias=False``).  Raises ``ValueError`` on any other key."""
    state_dict = check_state_dict(state_dict)
    for key in state_dict:
        if key not in _SWIN_BLOCK_KEYS:
            raise ValueError(f"MONAI SwinTransformerBlock key {key!r} has no fastmed counterpart")
    return dict(state_dict)
