"""fastmed.patch: replaces Conv/Norm/Act runs and MONAI Swin blocks, keeps state-dict keys, outputs, gradients."""
import copy

import pytest
import torch
from torch import nn

import fastmed
from fastmed.patch import Absorbed, FusedConvNormAct, FusedNormAct, patch

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_same(ref, model, x, atol=1e-5):
    """Same outputs and gradients (train mode), same outputs in eval mode, same state-dict keys."""
    assert list(model.state_dict()) == list(ref.state_dict())
    y_ref, y = ref(x), model(x)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    g_ref = dict(ref.named_parameters())
    scale = max(p.grad.abs().max().item() for p in g_ref.values() if p.grad is not None)
    for name, p in model.named_parameters():
        if g_ref[name].grad is None:  # unused by the forward (e.g. MONAI ViT's classification token)
            assert p.grad is None, name
            continue
        # conv biases in front of an instance norm have a zero gradient up to rounding: compare on the model scale
        torch.testing.assert_close(p.grad, g_ref[name].grad, atol=2e-5 * scale, rtol=1e-3, msg=name)
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=atol, rtol=1e-4)


class ConvDropoutNormReLU(nn.Module):
    """dynamic-network-architectures' block, written out: its layers are attributes AND in all_modules."""

    def __init__(self, cin, cout, stride=1, norm=nn.InstanceNorm3d, dropout=None):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride, 1, bias=True)
        ops = [self.conv]
        if dropout is not None:
            self.dropout = nn.Dropout3d(dropout)
            ops.append(self.dropout)
        self.norm = norm(cout, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)
        self.all_modules = nn.Sequential(*ops, self.norm, self.nonlin)

    def forward(self, x):
        return self.all_modules(x)


class CustomOrder(nn.Module):
    """A block whose order patch cannot read off a Sequential: must be reported and left alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def test_patch_nnunet_style_blocks():
    torch.manual_seed(0)
    ref = nn.Sequential(ConvDropoutNormReLU(1, 4), ConvDropoutNormReLU(4, 4, stride=2, norm=nn.BatchNorm3d),
                        CustomOrder())
    model = copy.deepcopy(ref)
    report = fastmed.patch(model)
    assert [name for name, _ in report.replaced] == ["0.conv", "1.conv"]
    assert [name for name, _ in report.skipped] == ["2.conv"]
    assert report.skipped[0][1].startswith("Conv3d in CustomOrder: CustomOrder.forward is its own code")
    # the duplicate references (attribute and all_modules entry) point at the same replacement
    assert model[0].conv is model[0].all_modules[0] and isinstance(model[0].conv, FusedConvNormAct)
    assert isinstance(model[0].norm, Absorbed) and model[0].norm is model[0].all_modules[1]
    assert isinstance(model[2].conv, nn.Conv3d)
    _check_same(ref, model, torch.randn(2, 1, 8, 8, 8))
    # batch-norm running statistics were updated identically in the training pass
    torch.testing.assert_close(model[1].norm.running_mean, ref[1].norm.running_mean)
    assert int(model[1].norm.num_batches_tracked) == int(ref[1].norm.num_batches_tracked) == 1
    # checkpoints load into the patched model
    model.load_state_dict(ref.state_dict())


def test_patch_with_active_dropout_matches_under_the_same_seed():
    torch.manual_seed(1)
    ref = ConvDropoutNormReLU(2, 4, dropout=0.3)
    model = copy.deepcopy(ref)
    patch(model)
    x = torch.randn(2, 2, 6, 6, 6)
    torch.manual_seed(5)
    y_ref = ref(x)
    torch.manual_seed(5)
    torch.testing.assert_close(model(x), y_ref, atol=1e-5, rtol=1e-4)


def test_patch_norm_act_without_conv_and_plain_sequential():
    torch.manual_seed(2)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.PReLU(), nn.Dropout(0.0),
                        nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 2, 1, groups=2))
    model = copy.deepcopy(ref)
    report = patch(model)
    kinds = [what for _, what in report.replaced]
    assert kinds == ["Conv2d -> GroupNorm -> PReLU -> FusedConvNormAct", "BatchNorm2d -> GELU -> FusedNormAct"]
    assert isinstance(model[4], FusedNormAct)
    assert report.skipped == [("6", "Conv2d in Sequential: grouped convolution (groups=2) is not fused")]
    _check_same(ref, model, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("which", ["unet", "basic_unet"])
def test_patch_monai_unets(which):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(3)
    if which == "unet":
        ref = nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
        x = torch.randn(2, 1, 16, 16, 16)
    else:
        ref = nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))
        x = torch.randn(2, 1, 32, 32)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert len(report.replaced) >= 7
    assert all(what.endswith(("FusedConvNormAct", "FusedNormAct")) for _, what in report.replaced)
    if which == "unet":  # the up path's transposed convolutions keep torch; their norm + PReLU are fused
        assert any(what == "InstanceNorm3d -> PReLU -> FusedNormAct" for _, what in report.replaced)
    # what was left alone is reported with a reason (residual 1x1 convs, the conv-only output layer)
    assert report.skipped and all(reason for _, reason in report.skipped)
    _check_same(ref, model, x)


class _MonaiSwinStage(nn.Module):
    """Two MONAI Swin blocks (plain, shifted) driven like MONAI's BasicLayer, on (B, D, H, W, C) grids."""

    def __init__(self, swin_unetr, dim=12, heads=3, window=(4, 4, 4), attn_drop=0.0):
        super().__init__()
        self.window, self.shift = window, tuple(w // 2 for w in window)
        self.compute_mask = swin_unetr.compute_mask
        self.blocks = nn.ModuleList([
            swin_unetr.SwinTransformerBlock(dim, heads, window, (0, 0, 0), attn_drop=attn_drop),
            swin_unetr.SwinTransformerBlock(dim, heads, window, self.shift, attn_drop=attn_drop)])

    def forward(self, x):
        mask = self.compute_mask(list(x.shape[1:4]), self.window, self.shift, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return x


def test_patch_monai_swin_blocks():
    swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
    from fastmed.nn import SwinTransformerBlock

    torch.manual_seed(4)
    ref = _MonaiSwinStage(swin_unetr)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert [n for n, _ in report.replaced] == ["blocks.0", "blocks.1"]
    assert all(isinstance(b, SwinTransformerBlock) for b in model.blocks)
    _check_same(ref, model, torch.randn(2, 8, 8, 8, 12), atol=1e-4)


def test_patch_report_and_bad_input():
    report = patch(nn.Sequential(nn.Linear(3, 3)))
    assert report.replaced == [] and report.skipped == []
    assert "replaced 0" in str(report)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch("not a model")


# ------------------------------------------------------- Swin-Unet and timm Swin blocks (their code, written out)
def _partition(x, ws):
    B, H, W, C = x.shape
    return x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws[0] * ws[1], C)


def _reverse(w, ws, H, W):
    C = w.shape[-1]
    return w.view(-1, H // ws[0], W // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class _RefWindowAttention(nn.Module):
    """Swin-Unet's / timm's WindowAttention (windows in, additive 0/-100 mask)."""

    def __init__(self, dim, ws, heads, attn_drop=0.0):
        super().__init__()
        self.num_heads, self.scale, self.ws = heads, (dim // heads) ** -0.5, ws
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += ws[0] - 1
        rel[:, :, 1] += ws[1] - 1
        rel[:, :, 0] *= 2 * ws[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.attn_drop(attn.softmax(-1)) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


def _shift_mask(H, W, ws, ss):
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in (slice(0, -ws[0]), slice(-ws[0], -ss[0]), slice(-ss[0], None)):
        for w in (slice(0, -ws[1]), slice(-ws[1], -ss[1]), slice(-ss[1], None)):
            img[:, h, w, :] = cnt
            cnt += 1
    mw = _partition(img, ws)[..., 0]
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinUnetBlock(nn.Module):
    """Swin-Unet's SwinTransformerBlock: tokens (B, H*W, C), int window/shift, attn_mask buffer."""

    def __init__(self, dim, input_resolution, heads, window_size, shift_size, attn_drop=0.0):
        super().__init__()
        self.input_resolution, self.window_size, self.shift_size = input_resolution, window_size, shift_size
        if min(input_resolution) <= window_size:
            self.shift_size, self.window_size = 0, min(input_resolution)
        ws = (self.window_size,) * 2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _RefWindowAttention(dim, ws, heads, attn_drop)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim)
        mask = _shift_mask(*input_resolution, ws, (self.shift_size,) * 2) if self.shift_size else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        shortcut, x = x, self.norm1(x).view(B, H, W, C)
        s, ws = self.shift_size, (self.window_size,) * 2
        if s:
            x = torch.roll(x, (-s, -s), (1, 2))
        x = _reverse(self.attn(_partition(x, ws), mask=self.attn_mask), ws, H, W)
        if s:
            x = torch.roll(x, (s, s), (1, 2))
        x = shortcut + self.drop_path(x.reshape(B, H * W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimmBlock(nn.Module):
    """timm's SwinTransformerBlock: grids (B, H, W, C), tuple window/shift, drop_path1/2."""

    def __init__(self, dim, input_resolution, heads, window_size, shift_size, attn_drop=0.0):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size, self.shift_size = window_size, shift_size
        self.window_area = window_size[0] * window_size[1]
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _RefWindowAttention(dim, window_size, heads, attn_drop)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim)
        self.drop_path2 = nn.Identity()
        mask = _shift_mask(*input_resolution, window_size, shift_size) if any(shift_size) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attn(self, x):
        B, H, W, C = x.shape
        if any(self.shift_size):
            x = torch.roll(x, (-self.shift_size[0], -self.shift_size[1]), (1, 2))
        x = _reverse(self.attn(_partition(x, self.window_size), mask=self.attn_mask), self.window_size, H, W)
        if any(self.shift_size):
            x = torch.roll(x, self.shift_size, (1, 2))
        return x

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


@pytest.mark.parametrize("kind", ["swin_unet", "timm"])
def test_patch_swin_unet_and_timm_blocks(kind):
    from fastmed.patch import FusedSwinBlock

    torch.manual_seed(6)
    if kind == "swin_unet":
        ref = nn.Sequential(SwinUnetBlock(16, (8, 8), 2, 4, 0), SwinUnetBlock(16, (8, 8), 2, 4, 2),
                            SwinUnetBlock(16, (8, 8), 2, 8, 4))  # the last: window = grid, no shift
        x = torch.randn(2, 64, 16)
    else:
        ref = nn.Sequential(TimmBlock(16, (8, 12), 2, (4, 4), (0, 0)), TimmBlock(16, (8, 12), 2, (4, 4), (2, 2)))
        x = torch.randn(2, 8, 12, 16)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert [n for n, _ in report.replaced] == [str(i) for i in range(len(ref))]
    assert all(isinstance(b, FusedSwinBlock) for b in model)
    _check_same(ref, model, x, atol=1e-4)


def _check_same_dropout(ref, model, x):
    """Training outputs equal under the same seed (and differ between seeds: the dropout is active); eval equal."""
    outs = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        y_ref = ref(x)
        torch.manual_seed(seed)
        outs.append(model(x))
        torch.testing.assert_close(outs[-1], y_ref, atol=1e-5, rtol=1e-4)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the dropout is active
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def _swin_stage(kind, attn_drop):
    """Two Swin blocks (plain, shifted) of one kind and an input for them."""
    if kind == "monai":
        return _MonaiSwinStage(pytest.importorskip("monai.networks.nets.swin_unetr"), attn_drop=attn_drop), \
            torch.randn(2, 8, 8, 8, 12)
    if kind == "swin_unet":
        return nn.Sequential(SwinUnetBlock(16, (8, 8), 2, 4, 0, attn_drop),
                             SwinUnetBlock(16, (8, 8), 2, 4, 2, attn_drop)), torch.randn(2, 64, 16)
    return nn.Sequential(TimmBlock(16, (8, 12), 2, (4, 4), (0, 0), attn_drop),
                         TimmBlock(16, (8, 12), 2, (4, 4), (2, 2), attn_drop)), torch.randn(2, 8, 12, 16)


@pytest.mark.parametrize("mode_at_patching", ["eval", "train"])
@pytest.mark.parametrize("kind", ["swin_unet", "timm", "monai"])
def test_patched_swin_blocks_keep_attention_dropout(kind, mode_at_patching):
    """A Swin block with attention dropout behaves as the original in both modes, whichever mode it was patched
    in: patching an eval-mode model used to drop the dropout silently after ``.train()``."""
    torch.manual_seed(8)
    ref, x = _swin_stage(kind, attn_drop=0.5)
    model = copy.deepcopy(ref)
    model.train(mode_at_patching == "train")
    report = patch(model)
    ref.train()
    model.train()
    _check_same_dropout(ref, model, x)
    assert len(report.replaced) == 2 and all("attention dropout" in what for _, what in report.replaced)


# ------------------------------------------------------------------- MONAI DynUNet / UNETR / SwinUNETR conv blocks
def _monai_blocks():
    return pytest.importorskip("monai.networks.blocks")


@pytest.mark.parametrize("res_block,norm", [(False, ("INSTANCE", {"affine": True})), (True, "batch"),
                                            (True, ("group", {"num_groups": 2}))])
def test_patch_dynunet_with_deep_supervision(res_block, norm):
    nets = pytest.importorskip("monai.networks.nets")
    from fastmed.patch import FusedUnetBlock, FusedUnetUpBlock

    torch.manual_seed(10)
    ref = nets.DynUNet(2, 2, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 16], norm_name=norm, deep_supervision=True, deep_supr_num=1,
                       res_block=res_block)
    model = copy.deepcopy(ref)
    report = patch(model)
    block = "UnetResBlock" if res_block else "UnetBasicBlock"
    assert [n for n, _ in report.replaced] == ["input_block", "downsamples.0", "bottleneck", "upsamples.0",
                                               "upsamples.0.conv_block", "upsamples.1", "upsamples.1.conv_block"]
    assert report.replaced[0][1].startswith(f"{block} -> FusedUnetBlock")
    assert report.replaced[4][1].startswith("UnetBasicBlock (in UnetUpBlock) -> FusedUnetBlock")
    # only the 1x1 output heads are left, each with its block type and reason
    assert report.skipped == [(name, "Conv2d in Convolution (in UnetOutBlock): the output convolution: no "
                                     "normalization follows, nothing to fuse")
                              for name in ("output_block.conv.conv", "deep_supervision_heads.0.conv.conv")]
    # the blocks are replaced everywhere DynUNet references them (its skip layers hold them a second time)
    assert isinstance(model.input_block, FusedUnetBlock) and model.skip_layers.downsample is model.input_block
    assert isinstance(model.upsamples[0], FusedUnetUpBlock)
    assert model.skip_layers.upsample is model.upsamples[1]
    assert model.skip_layers.next_layer.upsample is model.upsamples[0]
    _check_same(ref, model, torch.randn(2, 2, 16, 16), atol=2e-5)
    if norm == "batch":
        for k, v in ref.state_dict().items():  # running statistics updated alike in the training pass
            torch.testing.assert_close(model.state_dict()[k], v, msg=k)


def test_patch_dynunet_dropout_matches_under_the_same_seed():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(11)
    ref = nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[3, 4, 5], dropout=0.3, res_block=True)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert len(report.replaced) == 7 and all("dropout between conv and norm" in w for n, w in report.replaced
                                             if "FusedUnetBlock" in w)
    x = torch.randn(2, 1, 8, 8, 8)
    _check_same_dropout(ref, model, x)


class _UnetrDecoder(nn.Module):
    """UNETR's conv path from MONAI's blocks (UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock, UnetOutBlock) on a
    feature map standing for the ViT tokens: the whole UNETR needs einops."""

    def __init__(self, blocks, res_block, conv_block, c=4, hidden=8):
        super().__init__()
        self.encoder1 = blocks.UnetrBasicBlock(2, 1, c, 3, 1, "instance", res_block=res_block)
        self.encoder2 = blocks.UnetrPrUpBlock(2, hidden, 2 * c, num_layer=1, kernel_size=3, stride=1,
                                              upsample_kernel_size=2, norm_name=("batch", {}),
                                              conv_block=conv_block, res_block=res_block)
        self.decoder = blocks.UnetrUpBlock(2, 2 * c, c, 3, 2, "instance", res_block=res_block)
        self.decoder2 = blocks.UnetrUpBlock(2, hidden, 2 * c, 3, 4, ("group", {"num_groups": 2}),
                                            res_block=not res_block)
        self.out = blocks.UnetOutBlock(2, c, 2)
        self.proj = nn.Conv2d(1, hidden, 8, 8)

    def forward(self, x):
        tokens = self.proj(x)                       # (N, hidden, H/8, W/8)
        enc1 = self.encoder1(x)                     # (N, c, H, W)
        enc2 = self.encoder2(tokens)                # (N, 2c, H/2, W/2)
        dec = self.decoder2(tokens, enc2)           # (N, 2c, H/2, W/2)
        return self.out(self.decoder(dec, enc1))    # (N, 2, H, W)


@pytest.mark.parametrize("res_block,conv_block", [(True, True), (False, True), (True, False)])
def test_patch_unetr_blocks(res_block, conv_block):
    torch.manual_seed(12)
    ref = _UnetrDecoder(_monai_blocks(), res_block, conv_block)
    model = copy.deepcopy(ref)
    report = patch(model)
    names = dict(report.replaced)
    assert names["encoder1.layer"].startswith(f"{'UnetResBlock' if res_block else 'UnetBasicBlock'} "
                                              f"(in UnetrBasicBlock) -> FusedUnetBlock")
    assert names["decoder"].startswith("UnetrUpBlock -> FusedUnetUpBlock")
    assert ("encoder2.blocks.0.1" in names) == conv_block
    skipped = dict(report.skipped)
    assert skipped["encoder2.transp_conv_init.conv"] == (
        "ConvTranspose2d in Convolution (in UnetrPrUpBlock): transposed convolutions run in torch (fastmed fuses "
        "Conv2d/Conv3d), and no norm follows")
    assert skipped["proj"].startswith("Conv2d in _UnetrDecoder: _UnetrDecoder.forward is its own code")
    _check_same(ref, model, torch.randn(2, 1, 16, 16), atol=2e-5)


@pytest.mark.parametrize("which", ["UNETR", "SwinUNETR"])
def test_patch_whole_unetr_and_swinunetr(which):
    pytest.importorskip("einops")  # MONAI's ViT / SwinUNETR need it
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(13)
    if which == "UNETR":
        ref = nets.UNETR(1, 2, img_size=(16, 16), feature_size=4, hidden_size=16, mlp_dim=16, num_heads=2,
                         spatial_dims=2)
    else:
        ref = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), spatial_dims=2)
    model = copy.deepcopy(ref)
    report = patch(model)
    fused = [n for n, w in report.replaced if "FusedUnet" in w]
    assert len(fused) >= (9 if which == "UNETR" else 15), str(report)
    # nothing that MONAI builds from conv -> norm blocks is left: the skips are the patch embedding, transposed
    # convolutions without a norm, and the output convolution
    for name, why in report.skipped:
        assert ("PatchEmbed" in why or "transposed convolutions run in torch" in why
                or "UnetOutBlock" in why), (name, why)
    size = 16 if which == "UNETR" else 64  # SwinUNETR: 2 x 2 at the bottom (instance norm needs > 1 value)
    _check_same(ref, model, torch.randn(2, 1, size, size),
                atol=1e-4)


def test_patch_reports_a_monai_block_it_cannot_fuse():
    blocks = _monai_blocks()
    torch.manual_seed(14)
    ref = nn.Sequential(blocks.UnetBasicBlock(2, 1, 4, 3, 1, "instance", act_name="elu"),
                        blocks.UnetResBlock(2, 4, 4, 3, 1, ("instance", {"track_running_stats": True})))
    model = copy.deepcopy(ref)
    report = patch(model)
    assert report.replaced == []
    assert report.skipped == [
        ("0", "UnetBasicBlock: its activation (lrelu) is ELU; fastmed fuses ReLU, LeakyReLU, PReLU, GELU, SiLU, "
              "Identity (the block runs as MONAI's)"),
        ("1", "UnetResBlock: norm1: InstanceNorm with track_running_stats=True is not fused")]
    _check_same(ref, model, torch.randn(2, 1, 6, 6))


def test_patch_says_why_a_model_that_is_itself_a_block_is_left():
    block = _monai_blocks().UnetBasicBlock(2, 1, 2, 3, 1, "instance")
    report = patch(block)
    assert report.replaced == [] and report.skipped == [
        ("", "UnetBasicBlock: the model itself is the block; patch replaces blocks inside a model (wrap it: "
             "nn.Sequential(block))")]


def test_patch_twice_changes_nothing_more():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(15)
    ref = nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 4, 4])
    model = copy.deepcopy(ref)
    patch(model)
    again = patch(model)
    assert again.replaced == [] and [n for n, _ in again.skipped] == ["output_block.conv.conv"]
    _check_same(ref, model, torch.randn(2, 1, 8, 8))


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("kind", ["sequential", "norm_only", "dynunet_block"])
def test_failed_call_leaves_batch_norm_statistics_unchanged(kind):
    """A call that raises (one value per channel in training) must not count a batch or touch running stats."""
    torch.manual_seed(16)
    if kind == "sequential":
        model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    elif kind == "norm_only":
        model = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())
    else:
        model = nn.Sequential(_monai_blocks().UnetResBlock(2, 2, 3, 3, 1, "batch"))
    report = patch(model)
    assert len(report.replaced) == 1, str(report)
    model(torch.randn(2, 2, 3, 3))  # a good call counts once
    before = _bn_state(model)
    assert before and all(int(v) == 1 for k, v in before.items() if "num_batches" in k)
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randn(1, 2, 1, 1))
    after = _bn_state(model)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ----------------------------------------------------------------------- segment_anything image-encoder attention
def _sam_vit(use_rel_pos=True):
    """segment_anything's ImageEncoderViT, small (8x8 tokens, windows of 3 padded to 9x9, block 1 global), random
    weights (rel-pos tables non-zero)."""
    from test_sam_attention import load_sam_modeling

    m = load_sam_modeling()
    torch.manual_seed(0)
    vit = m.ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4, out_chans=16,
                            qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), use_rel_pos=use_rel_pos,
                            window_size=3, global_attn_indexes=(1,))
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)
    return vit


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_patch_segment_anything_vit_shares_parameters_and_matches(backend):
    from fastmed.patch import FusedSamAttention, FusedSamBlock

    ref = _sam_vit()
    model = copy.deepcopy(ref)
    params = list(model.parameters())
    tables = [blk.attn.rel_pos_h for blk in model.blocks]
    report = patch(model)
    replaced = dict(report.replaced)
    assert set(replaced) >= {"blocks.0", "blocks.1", "blocks.2"}
    assert "3x3 windowed attention" in replaced["blocks.0"] and "global attention" in replaced["blocks.1"]
    assert all(isinstance(model.blocks[i], FusedSamBlock) for i in range(3))
    assert all(isinstance(model.blocks[i].attn, FusedSamAttention) for i in range(3))
    assert "blocks.0.attn" not in replaced  # the whole block, not its attention again
    # the same Parameter objects, in the same order (an optimizer built before patching keeps working)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [id(blk.attn.rel_pos_h) for blk in model.blocks] == [id(t) for t in tables]
    skipped = dict(report.skipped)
    assert "patch_embed.proj" in skipped  # the convolutions (no norm to fuse) are named with a reason
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with fastmed.use_backend(backend):
        _check_same(ref, model, x, atol=1e-4)


def test_patch_segment_anything_attention_alone_and_without_rel_pos():
    from test_sam_attention import load_sam_modeling

    from fastmed.patch import FusedSamAttention

    m = load_sam_modeling()
    torch.manual_seed(0)
    ref = nn.Sequential(m.image_encoder.Attention(16, 2, use_rel_pos=True, input_size=(4, 4)),
                        m.image_encoder.Attention(16, 2, use_rel_pos=False))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert [n for n, _ in report.replaced] == ["0"] and isinstance(model[0], FusedSamAttention)
    assert dict(report.skipped)["1"].startswith("segment_anything Attention: use_rel_pos=False")
    assert type(model[1]) is m.image_encoder.Attention
    _check_same(ref, model, torch.randn(2, 4, 4, 16))
    # another grid: segment_anything interpolates the 7-row tables; the patched module runs its code
    ref.train()
    model.train()
    _check_same(ref, model, torch.randn(1, 5, 6, 16))


def test_patch_segment_anything_vit_without_rel_pos_is_reported():
    model = _sam_vit(use_rel_pos=False)
    report = patch(model)
    skipped = dict(report.skipped)
    assert all(skipped[f"blocks.{i}.attn"].startswith("segment_anything Attention: use_rel_pos=False")
               for i in range(3))
    assert not any(n.startswith("blocks") for n, _ in report.replaced)
