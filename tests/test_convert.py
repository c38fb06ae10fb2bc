"""fastmed.convert: nnU-Net / MONAI / timm / Swin-Unet state dicts load into the fastmed models with equal outputs.

nnU-Net and timm are not installed here (they pull a CUDA torch): their layouts are rebuilt below from their
sources (dynamic-network-architectures' PlainConvUNet; timm's VisionTransformer), keys and computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmed import convert
from fastmed.models import SwinUNet, UNet, ViT

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ nnU-Net PlainConvUNet
class _ConvDropoutNormReLU(nn.Module):
    def __init__(self, cin, cout, k, stride, bias=True, nonlin=True, dropout=False):
        super().__init__()
        k = (k,) * 3 if isinstance(k, int) else k
        self.conv = nn.Conv3d(cin, cout, k, stride, [(i - 1) // 2 for i in k], bias=bias)
        ops = [self.conv]
        if dropout:  # a plan's dropout_op
            self.dropout = nn.Dropout3d(0.2)
            ops.append(self.dropout)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        ops.append(self.norm)
        if nonlin:
            self.nonlin = nn.LeakyReLU(0.01, inplace=True)
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x):
        return self.all_modules(x)


class _Stacked(nn.Module):
    def __init__(self, n, cin, cout, k, stride, dropout=False):
        super().__init__()
        self.convs = nn.Sequential(_ConvDropoutNormReLU(cin, cout, k, stride, dropout=dropout),
                                   *[_ConvDropoutNormReLU(cout, cout, k, 1, dropout=dropout) for _ in range(n - 1)])

    def forward(self, x):
        return self.convs(x)


class _BasicBlockD(nn.Module):
    """dynamic_network_architectures' BasicBlockD (no stochastic depth, no squeeze-excitation)."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv1 = _ConvDropoutNormReLU(cin, cout, k, stride)
        self.conv2 = _ConvDropoutNormReLU(cout, cout, k, 1, nonlin=False)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)
        ops = [nn.AvgPool3d(stride, stride)] if any(v != 1 for v in stride) else []
        if cin != cout:
            ops.append(_ConvDropoutNormReLU(cin, cout, 1, 1, bias=False, nonlin=False))
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class _StackedResidual(nn.Module):
    def __init__(self, n, cin, cout, k, stride):
        super().__init__()
        self.blocks = nn.Sequential(_BasicBlockD(cin, cout, k, stride),
                                    *[_BasicBlockD(cout, cout, k, (1, 1, 1)) for _ in range(n - 1)])

    def forward(self, x):
        return self.blocks(x)


class _PlainConvUNet(nn.Module):
    """dynamic_network_architectures' PlainConvUNet (or, residual=True, ResidualEncoderUNet with 1 decoder conv
    per stage), layout and forward, written out."""

    def __init__(self, cin, features, strides, kernels, ncls, residual=False, blocks=(1, 2, 2), dropout=False):
        super().__init__()
        enc = nn.Module()
        stages, c = [], cin
        if residual:
            enc.stem = _Stacked(1, cin, features[0], kernels[0], 1)
            c = features[0]
        for i, (f, s, k) in enumerate(zip(features, strides, kernels)):
            stages.append(_StackedResidual(blocks[i], c, f, k, s) if residual
                          else nn.Sequential(_Stacked(2, c, f, k, s, dropout)))
            c = f
        enc.stages = nn.Sequential(*stages)
        self.encoder = enc
        dec = nn.Module()
        dec.encoder = enc  # nnU-Net's decoder keeps a reference: its keys appear twice in the state dict
        n = len(features)
        dec.transpconvs = nn.ModuleList(nn.ConvTranspose3d(features[-s], features[-(s + 1)], strides[-s], strides[-s])
                                        for s in range(1, n))
        dec.stages = nn.ModuleList(_Stacked(1 if residual else 2, 2 * features[-(s + 1)], features[-(s + 1)],
                                            kernels[-(s + 1)], 1, dropout) for s in range(1, n))
        dec.seg_layers = nn.ModuleList(nn.Conv3d(features[-(s + 1)], ncls, 1, 1, 0, bias=True) for s in range(1, n))
        self.decoder = dec

    def forward(self, x):
        skips = []
        if hasattr(self.encoder, "stem"):
            x = self.encoder.stem(x)
        for st in self.encoder.stages:
            x = st(x)
            skips.append(x)
        lres, outs = skips[-1], []
        for s in range(len(self.decoder.stages)):
            x = self.decoder.transpconvs[s](lres)
            x = self.decoder.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
            outs.append(self.decoder.seg_layers[s](x))
            lres = x
        return outs[::-1]


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_from_nnunet_plain_conv_unet(deep_supervision):
    torch.manual_seed(0)
    plan = dict(features=(4, 8, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
    ref = _PlainConvUNet(1, plan["features"], plan["strides"], plan["kernel_sizes"], 3)
    sd = ref.state_dict()
    assert any(k.startswith("decoder.encoder.") for k in sd) and any(".all_modules." in k for k in sd)
    model = UNet(3, 1, 3, norm_kwargs={"eps": 1e-5, "affine": True}, act_kwargs={"negative_slope": 0.01},
                 deep_supervision=deep_supervision, **plan)
    model.load_state_dict(convert.from_nnunet(sd, deep_supervision=deep_supervision))
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        want, got = ref(x), model(x)
    if deep_supervision:
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)


def test_from_nnunet_residual_encoder_unet():
    torch.manual_seed(1)
    plan = dict(features=(4, 8, 16), strides=((1, 1, 1), (2, 2, 2), (1, 2, 2)), kernel_sizes=(3, 3, 3))
    ref = _PlainConvUNet(1, plan["features"], plan["strides"], [(3, 3, 3)] * 3, 2, residual=True)
    model = UNet(3, 1, 2, residual=True, blocks_per_stage=(1, 2, 2), decoder_convs_per_stage=1,
                 deep_supervision=True, **plan)
    model.load_state_dict(convert.from_nnunet(ref.state_dict()))
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_from_nnunet_errors():
    with pytest.raises(ValueError, match="network_weights"):
        convert.from_nnunet({"state_dict": {}})
    with pytest.raises(ValueError, match="neither encoder"):
        convert.from_nnunet({"stem.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="mapping"):
        convert.from_nnunet([1, 2])
    # malformed seg_layers keys are named (they used to fail in int() / with an IndexError)
    for bad in ("decoder.seg_layers.last.weight", "decoder.seg_layers.weight", "decoder.seg_layers.1"):
        with pytest.raises(ValueError, match=f"nnU-Net key '{bad}' is not decoder.seg_layers.<i>.<parameter>"):
            convert.from_nnunet({"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(1), bad: torch.zeros(1)},
                                deep_supervision=False)
    with pytest.raises(TypeError, match="checkpoint\\['network_weights'\\] must be a mapping"):
        convert.from_nnunet({"network_weights": [1, 2]})


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_from_nnunet_accepts_the_whole_checkpoint(deep_supervision):
    """``torch.load("checkpoint_final.pth")`` as it is: the weights are its ``network_weights`` entry."""
    torch.manual_seed(2)
    ref = _PlainConvUNet(1, (4, 8), ((1, 1, 1), (2, 2, 2)), ((3, 3, 3), (3, 3, 3)), 2)
    weights = ref.state_dict()
    checkpoint = {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": []},
                  "grad_scaler_state": None, "logging": {}, "_best_ema": 0.5, "current_epoch": 10,
                  "init_args": {}, "trainer_name": "nnUNetTrainer", "inference_allowed_architectures": None}
    got = convert.from_nnunet(checkpoint, deep_supervision=deep_supervision)
    want = convert.from_nnunet(weights, deep_supervision=deep_supervision)
    assert list(got) == list(want) and all(got[k] is want[k] for k in want)


# ------------------------------------------------------------------------------------ fastmed UNet -> nnU-Net
_PLAN = dict(features=(4, 8, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
             kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)))


def _randomized(model):
    """Weights no nnU-Net initialisation has (as after training), so that a wrong mapping shows."""
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _assert_nnunet_loads(sd, ref):
    """``sd`` loads strictly into the nnU-Net network ``ref`` and every tensor is the one of the same name there
    after loading (for the duplicates: all copies agree)."""
    assert set(sd) == set(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(t, sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dropout", [False, True])
def test_to_nnunet_round_trip_plain_conv_unet(dropout):
    """fastmed UNet -> to_nnunet -> nnU-Net PlainConvUNet (strict load) gives the fastmed model's outputs, and
    from_nnunet of that gives the fastmed state dict back."""
    model = _randomized(UNet(3, 1, 3, norm_kwargs={"eps": 1e-5, "affine": True},
                             act_kwargs={"negative_slope": 0.01}, deep_supervision=True,
                             dropout=0.2 if dropout else 0.0, **_PLAN)).eval()
    ref = _PlainConvUNet(1, _PLAN["features"], _PLAN["strides"], _PLAN["kernel_sizes"], 3, dropout=dropout).eval()
    mine = model.state_dict()
    sd = convert.to_nnunet(mine, dropout=dropout)
    _assert_nnunet_loads(sd, ref)
    norm_at = 2 if dropout else 1  # the norm's place in all_modules: conv, [dropout], norm
    assert any(f".all_modules.{norm_at}.weight" in k for k in sd) and any(k.startswith("decoder.encoder.") for k in sd)
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        for a, b in zip(ref(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    back = convert.from_nnunet(sd)
    assert list(back) == list(mine) and all(back[k] is v for k, v in mine.items())  # shared, not copied


def test_to_nnunet_round_trip_residual_encoder_unet():
    model = _randomized(UNet(3, 1, 2, residual=True, blocks_per_stage=(1, 2, 2), decoder_convs_per_stage=1,
                             deep_supervision=True, features=(4, 8, 16), strides=((1, 1, 1), (2, 2, 2), (1, 2, 2)),
                             kernel_sizes=(3, 3, 3))).eval()
    ref = _PlainConvUNet(1, (4, 8, 16), ((1, 1, 1), (2, 2, 2), (1, 2, 2)), [(3, 3, 3)] * 3, 2,
                         residual=True).eval()
    _assert_nnunet_loads(convert.to_nnunet(model.state_dict()), ref)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        for a, b in zip(ref(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_to_nnunet_without_deep_supervision():
    """Only the final head: it becomes nnU-Net's last head; the others are an error unless fill_heads=True (zero
    heads; nnU-Net's output at full resolution is the fastmed model's)."""
    model = _randomized(UNet(3, 1, 3, norm_kwargs={"eps": 1e-5, "affine": True},
                             act_kwargs={"negative_slope": 0.01}, deep_supervision=False, **_PLAN)).eval()
    with pytest.raises(ValueError, match=r"decoder.seg_layers \[1\] only .* fill_heads=True for zero heads \[0\]"):
        convert.to_nnunet(model.state_dict())
    sd = convert.to_nnunet(model.state_dict(), fill_heads=True)
    ref = _PlainConvUNet(1, _PLAN["features"], _PLAN["strides"], _PLAN["kernel_sizes"], 3).eval()
    _assert_nnunet_loads(sd, ref)
    assert not sd["decoder.seg_layers.0.weight"].any() and sd["decoder.seg_layers.0.weight"].shape == (3, 8, 1, 1, 1)
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ref(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_to_nnunet_errors():
    with pytest.raises(TypeError, match="mapping"):
        convert.to_nnunet([1])
    with pytest.raises(ValueError, match="empty"):
        convert.to_nnunet({})
    w = torch.zeros(1)
    with pytest.raises(ValueError, match="'model.0.conv.weight' is not encoder"):
        convert.to_nnunet({"model.0.conv.weight": w})
    with pytest.raises(ValueError, match="already nnU-Net's"):
        convert.to_nnunet({"encoder.stages.0.0.convs.0.all_modules.0.weight": w})
    with pytest.raises(ValueError, match="no decoder.seg_layers"):
        convert.to_nnunet({"encoder.stages.0.0.convs.0.conv.weight": w})


def test_from_monai_attention_unet_rejects_other_keys():
    with pytest.raises(ValueError, match="not a MONAI AttentionUnet"):
        convert.from_monai_attention_unet({"model.0.conv.0.conv.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------- timm ViT
def _timm_vit_state(dim=16, depth=2, patch=8, img=16, cin=1, ncls=3):
    """The keys and shapes of timm's VisionTransformer (vit_base_patch16_224 layout, small)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + (img // patch) ** 2, dim),
          "patch_embed.proj.weight": r(dim, cin, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    sd.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim), "head.weight": r(ncls, dim), "head.bias": r(ncls)})
    return sd


def _timm_vit_forward(sd, x, heads, depth):
    """timm VisionTransformer.forward written out with the state dict's tensors."""
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    dim = t.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        B, N, _ = h.shape
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            B, N, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, -1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, N, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


def test_from_timm_vit():
    sd = _timm_vit_state()
    model = ViT(2, img_size=16, patch_size=8, in_channels=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    model.load_state_dict(convert.from_timm_vit(sd))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _timm_vit_forward(sd, x, heads=2, depth=2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="blocks.0.ls1.gamma"):
        convert.from_timm_vit({**sd, "blocks.0.ls1.gamma": torch.ones(16)})


# -------------------------------------------------------------------------------------------------- Swin-Unet
def _to_swin_unet_keys(state):
    """fastmed SwinUNet keys -> the official Swin-Unet checkpoint's (SwinUnet wrapper prefix, fc1/fc2, masks)."""
    out = {}
    for k, v in state.items():
        out["swin_unet." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v
        if k.endswith("blocks.1.attn.relative_position_index"):  # shifted blocks carry their mask as a buffer
            out["swin_unet." + k.replace("attn.relative_position_index", "attn_mask")] = torch.zeros(4, 16, 16)
    return out


def test_from_swin_unet_layout():
    torch.manual_seed(1)
    kw = dict(embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4, drop_path_rate=0.0)
    src = SwinUNet(2, 1, 3, **kw)
    ckpt = _to_swin_unet_keys(src.state_dict())
    assert "swin_unet.layers.0.blocks.0.mlp.fc1.weight" in ckpt and "swin_unet.up.expand.weight" in ckpt
    converted = convert.from_swin_unet(ckpt)
    dst = SwinUNet(2, 1, 3, **kw)
    dst.load_state_dict(converted)  # strict: every key of the model is covered, no extra key
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(ValueError, match="head.weight"):
        convert.from_swin_unet({"head.weight": torch.zeros(1)})


def test_from_monai_swin_block():
    swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
    from fastmed.nn import SwinTransformerBlock

    torch.manual_seed(2)
    ref = swin_unetr.SwinTransformerBlock(12, 3, (4, 4, 4), (0, 0, 0))
    ours = SwinTransformerBlock(12, 3, (4, 4, 4), (0, 0, 0))
    ours.load_state_dict(convert.from_monai_swin_block(ref.state_dict()))
    x = torch.randn(2, 8, 8, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mlp.fc1.weight"):
        convert.from_monai_swin_block({"mlp.fc1.weight": torch.zeros(1)})


@pytest.mark.parametrize("merging_at_start", [False, True])
def test_from_timm_swin_initializes_encoder_and_mirrored_decoder(merging_at_start):
    """Classification Swin weights (official layout, or timm >= 0.9 with the merging at the start of a stage)."""
    torch.manual_seed(3)
    kw = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4, drop_path_rate=0.0)
    src = SwinUNet(2, 3, 5, **kw)
    ckpt = {}
    for k, v in src.state_dict().items():
        if not k.startswith(("patch_embed.", "layers.", "norm.")):
            continue  # decoder: not in a classification checkpoint
        k = k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        if merging_at_start and ".downsample." in k:
            i = int(k.split(".")[1])
            k = f"layers.{i + 1}." + k.split(".", 2)[2]
        ckpt[k] = v
    ckpt["head.fc.weight"] = torch.zeros(1000, 32)
    dst = SwinUNet(2, 3, 5, **kw)
    missing, unexpected = dst.load_state_dict(convert.from_timm_swin({"model": ckpt}, num_stages=3), strict=False)
    assert unexpected == []
    assert all(m.startswith(("layers_up.0.", "layers_up.1.upsample", "layers_up.2.upsample", "concat_back_dim",
                             "norm_up", "up.", "output")) for m in missing), missing
    for k, v in src.state_dict().items():
        if k.startswith(("patch_embed.", "layers.", "norm.")):
            torch.testing.assert_close(dst.state_dict()[k], v, msg=k)
    enc = src.layers[0].blocks[1].attn.qkv.weight
    torch.testing.assert_close(dst.layers_up[2].blocks[1].attn.qkv.weight, enc)  # mirrored, as Swin-Unet does
    with pytest.raises(ValueError, match="absolute position"):
        convert.from_timm_swin({"absolute_pos_embed": torch.zeros(1)})


def test_monai_unet_block_converter_is_exposed_in_convert():
    """fastmed.convert.from_monai_unet_block loads MONAI's UnetBasicBlock into ConvNormAct blocks, equal outputs."""
    from monai.networks.blocks import UnetBasicBlock

    from fastmed.nn import ConvNormAct

    torch.manual_seed(0)
    blk = UnetBasicBlock(3, 2, 4, kernel_size=3, stride=2, norm_name=("instance", {"affine": True}),
                         act_name=("leakyrelu", {"negative_slope": 0.01})).eval()
    ours = nn.Sequential(ConvNormAct(3, 2, 4, stride=2, bias=False), ConvNormAct(3, 4, 4, bias=False)).eval()
    ours.load_state_dict(convert.from_monai_unet_block(blk.state_dict(), "unet_basic_block"))
    x = torch.randn(1, 2, 8, 9, 10)
    torch.testing.assert_close(ours(x), blk(x), atol=1e-5, rtol=1e-5)


def test_from_timm_swin_in_channels_and_index():
    """timm >= 0.9 checkpoints lack relative_position_index (a non-persistent buffer): it is rebuilt, not
    reported missing; an RGB patch embedding is adapted to 1 channel by summing the filters (timm's
    adapt_input_conv) and to 5 by repeating them scaled by 3/5."""
    torch.manual_seed(4)
    kw = dict(embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4, drop_path_rate=0.0)
    src = SwinUNet(2, 3, 5, **kw)
    ckpt = {k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
            for k, v in src.state_dict().items()
            if k.startswith(("patch_embed.", "layers.", "norm.")) and not k.endswith("relative_position_index")}
    rgb = ckpt["patch_embed.proj.weight"]
    for cin, want in ((1, rgb.sum(1, keepdim=True)), (5, torch.cat([rgb, rgb], 1)[:, :5] * (3 / 5))):
        dst = SwinUNet(2, cin, 5, **kw)
        missing, unexpected = dst.load_state_dict(convert.from_timm_swin(ckpt, num_stages=2, in_channels=cin),
                                                  strict=False)
        assert unexpected == [] and not [m for m in missing if "relative_position_index" in m], missing
        torch.testing.assert_close(dst.patch_embed.proj.weight, want)
        for name, buf in src.named_buffers():
            if name.endswith("relative_position_index") and name.startswith("layers."):
                assert torch.equal(dst.get_buffer(name), buf), name
    with pytest.raises(ValueError, match="in_channels"):
        convert.from_timm_swin(ckpt, in_channels=0)
