"""Models from fastmed blocks: parameter counts, fused vs plain-PyTorch agreement, training, compile, errors."""
import copy

import pytest
import torch
from model_support import fused_and_plain, reference_then_checkpointing

from fastmed.models import AttentionUNet, UNet, plan_nnunet

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _agree(model, x, atol=1e-4, rtol=1e-4):
    """fused=True and fused=False give the same outputs and parameter gradients (same weights, train mode)."""
    outs, grads, _ = zip(*fused_and_plain(model, x))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=atol, rtol=rtol, msg=k)


# ---------------------------------------------------------------------------------------------- parameter counts
def test_unet_original_parameter_count():
    with torch.device("meta"):
        model = UNet.original(in_channels=1, out_channels=2)
    assert _count(model) == 31_030_658
    assert round(_count(model) / 1e6, 2) == 31.03


def test_unet_original_configuration_runs_both_paths():
    """Ronneberger's configuration (no norm, ReLU, max-pool, transposed conv) with fewer features."""
    torch.manual_seed(10)
    model = UNet.original(features=(4, 8, 16), strides=(1, 2, 2))
    assert isinstance(model.encoder.stages[1][0], torch.nn.MaxPool2d)
    _agree(model, torch.randn(2, 1, 16, 16))


def test_nnunet_plan_rules():
    plan = plan_nnunet((128, 128, 128), (1.0, 1.0, 1.0))
    assert plan["features"] == (32, 64, 128, 256, 320, 320)
    assert plan["strides"] == ((1, 1, 1),) + ((2, 2, 2),) * 5
    aniso = plan_nnunet((40, 160, 160), (3.0, 0.8, 0.8))
    assert aniso["strides"][1] == (1, 2, 2) and aniso["kernel_sizes"][0] == (1, 3, 3)
    assert plan_nnunet((512, 512))["features"][-1] == 512
    with pytest.raises(ValueError, match="divisible by the total stride"):
        plan_nnunet((100, 100, 100))
    with pytest.raises(ValueError, match="spacing"):
        plan_nnunet((64, 64, 64), (1.0, -1.0, 1.0))


def test_nnunet_preset_structure():
    with torch.device("meta"):
        model = UNet.nnunet((128, 128, 128), in_channels=1, out_channels=3)
    assert model.features == (32, 64, 128, 256, 320, 320)
    assert len(model.decoder.seg_layers) == 5 and model.deep_supervision
    assert "encoder.stages.0.0.convs.0.conv.weight" in model.state_dict()
    assert "decoder.transpconvs.0.weight" in model.state_dict()
    with torch.device("meta"):
        res = UNet.resenc((64, 64, 64))
    assert [len(s.blocks) for s in res.encoder.stages] == [1, 3, 4, 6, 6]
    assert "encoder.stem.convs.0.conv.weight" in res.state_dict()


# ------------------------------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("cfg", [
    dict(spatial_dims=2, residual=False, deep_supervision=True),
    dict(spatial_dims=3, residual=False, deep_supervision=False),
    dict(spatial_dims=3, residual=True, deep_supervision=True, blocks_per_stage=(1, 2, 1)),
    dict(spatial_dims=2, norm="batch", act="relu", downsample="maxpool"),
    dict(spatial_dims=2, norm="group", norm_kwargs={"num_groups": 2}, act="gelu"),
])
def test_unet_fused_matches_reference(cfg):
    torch.manual_seed(0)
    sd = cfg.pop("spatial_dims")
    model = UNet(sd, 2, 3, features=(4, 8, 8), strides=(1, 2, 2), **cfg)
    x = torch.randn(2, 2, *(8,) * sd)
    _agree(model, x)


def test_unet_deep_supervision_shapes():
    model = UNet(3, 1, 2, features=(4, 8, 8), strides=(1, 2, (1, 2, 2)), deep_supervision=True)
    out = model(torch.randn(1, 1, 8, 8, 8))
    assert [tuple(o.shape) for o in out] == [(1, 2, 8, 8, 8), (1, 2, 4, 4, 4)]


def test_unet_channels_last_checkpointing_and_autocast():
    torch.manual_seed(1)
    model = UNet(3, 1, 2, features=(4, 8), strides=(1, 2))
    x = torch.randn(2, 1, 8, 8, 8)
    ref = model(x)
    cl = model(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    ref.sum().backward()
    g_ref = _grads(model)
    model.zero_grad()
    model.checkpointing = True
    xr = x.clone().requires_grad_(True)
    model(xr).sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5, rtol=1e-5, msg=k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), ref.detach(), atol=0.15, rtol=0.1)


def test_unet_torch_compile_fullgraph():
    torch.manual_seed(2)
    model = UNet(2, 1, 2, features=(4, 8), strides=(1, 2))
    x = torch.randn(1, 1, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_unet_training_reduces_loss():
    from fastmed.nn import DiceCELoss

    torch.manual_seed(3)
    model = UNet(2, 1, 2, features=(4, 8), strides=(1, 2))
    x = torch.randn(4, 1, 16, 16)
    y = (x > 0.3).long()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------------------------- errors
def test_unet_bad_input():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNet(1, 1, 2, features=(4, 8), strides=(1, 2))
    with pytest.raises(ValueError, match="strides must have one entry per stage"):
        UNet(2, 1, 2, features=(4, 8), strides=(1,))
    model = UNet(2, 1, 2, features=(4, 8), strides=(1, 2))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        model(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"divisible by the product of the strides \(2, 2\).*\(10, 8\)"):
        model(torch.randn(1, 1, 9, 8))


# ------------------------------------------------------------------------------------------------ AttentionUNet
@pytest.mark.parametrize("sd", [2, 3])
def test_attention_unet_matches_monai(sd):
    monai_nets = pytest.importorskip("monai.networks.nets")
    from fastmed.convert import from_monai_attention_unet

    torch.manual_seed(4)
    ref = monai_nets.AttentionUnet(sd, 2, 3, channels=(4, 8, 16), strides=(2, 2))
    model = AttentionUNet(sd, 2, 3, channels=(4, 8, 16), strides=(2, 2))
    assert _count(model) == _count(ref)
    model.load_state_dict(from_monai_attention_unet(ref.state_dict()))
    x = torch.randn(2, 2, *(8,) * sd)
    ref_eval, model_eval = copy.deepcopy(ref).eval(), copy.deepcopy(model).eval()
    torch.testing.assert_close(model_eval(x), ref_eval(x), atol=1e-5, rtol=1e-5)
    y_ref, y = ref(x), model(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    g_ref = {k: v.grad for k, v in ref.named_parameters()}
    mapped = from_monai_attention_unet(g_ref)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mapped[k], atol=1e-4, rtol=1e-4, msg=k)  # conv bias before BN: grad ~0
    _agree(model, x)


def test_attention_unet_kernel_size_5_is_monais_network():
    """MONAI's merge convolution is 3x3 whatever kernel_size: the issue's example has 3,534 parameters and loads."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    from fastmed.convert import from_monai_attention_unet

    torch.manual_seed(5)
    args = dict(channels=(3, 4, 5), strides=(1, 2), up_kernel_size=5, kernel_size=5)
    ref = monai_nets.AttentionUnet(2, 1, 2, **args)
    model = AttentionUNet(2, 1, 2, **args)
    assert _count(ref) == 3534
    assert _count(model) == 3534
    model.load_state_dict(from_monai_attention_unet(ref.state_dict()))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    _agree(model, x)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_unet_dropout_in_monais_place(fused):
    """dropout > 0 in training: MONAI's "NDA" order (norm, dropout, activation) in the level blocks and merge
    convs; with the same seed both models draw the same masks, so the outputs match."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    from fastmed.convert import from_monai_attention_unet

    torch.manual_seed(6)
    ref = monai_nets.AttentionUnet(2, 1, 2, channels=(4, 6, 8), strides=(2, 2), dropout=0.3)
    model = AttentionUNet(2, 1, 2, channels=(4, 6, 8), strides=(2, 2), dropout=0.3, fused=fused)
    model.load_state_dict(from_monai_attention_unet(ref.state_dict()))
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    y_ref = ref(x)
    torch.manual_seed(1)
    y = model(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    y2 = model(x)
    assert not torch.allclose(y2, y, atol=1e-3)  # the dropout is active (another seed, another output)
    torch.manual_seed(2)
    torch.testing.assert_close(y2, ref(x), atol=1e-5, rtol=1e-5)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_attention_unet_checkpointing_and_channels_last():
    torch.manual_seed(7)
    model = AttentionUNet(3, 1, 2, channels=(4, 8), strides=(2,))
    x = torch.randn(2, 1, 8, 8, 8)
    ref = model(x)
    ref.sum().backward()
    g_ref = _grads(model)
    model.zero_grad()
    model.checkpointing = True
    out = model(x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-4, rtol=1e-4, msg=k)


def _assert_value_errors(*cases):
    """Each ``(match, call)``: ``call()`` raises ``ValueError`` matching ``match``."""
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_attention_unet_bad_input():
    model = AttentionUNet(2, 1, 2, channels=(4, 8), strides=(2,))
    _assert_value_errors(
        ("attention gate halves", lambda: AttentionUNet(2, 1, 2, channels=(1, 8), strides=(2,))),
        ("strides needs", lambda: AttentionUNet(2, 1, 2, channels=(4, 8, 16), strides=(2,))),
        ("in_channels=1", lambda: model(torch.randn(1, 2, 8, 8))),
        ("divisible", lambda: model(torch.randn(1, 1, 7, 8))),
    )


# ----------------------------------------------------------------------------------------------------- SwinUNet
def test_swin_unet_parameter_count():
    from fastmed.models import SwinUNet

    with torch.device("meta"):
        model = SwinUNet(2, in_channels=3, out_channels=9)
    assert _count(model) == 27_168_900 and round(_count(model) / 1e6, 2) == 27.17


def _small_swin(sd, **kw):
    from fastmed.models import SwinUNet

    torch.manual_seed(5)
    return SwinUNet(sd, 1, 3, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=2 if sd == 3 else 4,
                    drop_path_rate=0.0, **kw)


@pytest.mark.parametrize("sd,size", [(2, (24, 20)), (3, (8, 12, 8))])
def test_swin_unet_fused_matches_reference_any_size(sd, size):
    model = _small_swin(sd)
    x = torch.randn(2, 1, *size)
    assert model(x).shape == (2, 3) + size  # padded to a multiple of 8 and cropped back
    _agree(model, x, atol=2e-4, rtol=2e-4)


def test_swin_unet_checkpointing_autocast_compile():
    model = _small_swin(2)
    x = torch.randn(1, 1, 16, 16)
    ref, g_ref = reference_then_checkpointing(model, x)
    model(x.requires_grad_(True)).square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5, rtol=1e-5, msg=k)
    model.checkpointing = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    torch.testing.assert_close(low.float(), ref.detach(), atol=0.1, rtol=0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), ref.detach(), atol=1e-5, rtol=1e-5)


def test_swin_unet_bad_input():
    from fastmed.models import SwinUNet

    model = _small_swin(2, pad=False)
    _assert_value_errors(
        ("spatial_dims must be 2 or 3", lambda: SwinUNet(4)),
        ("num_heads", lambda: SwinUNet(2, embed_dim=10, num_heads=(3, 6, 12, 24))),
        ("at least 2 stages", lambda: SwinUNet(2, depths=(2,), num_heads=(3,))),
        ("multiple of 8", lambda: model(torch.randn(1, 1, 12, 16))),
        ("in_channels=1", lambda: model(torch.randn(1, 2, 16, 16))),
    )


# ---------------------------------------------------------------------------------------------------------- ViT
def test_vit_b16_parameter_count():
    from fastmed.models import ViT

    with torch.device("meta"):
        assert _count(ViT.b16()) == 86_567_656
        assert _count(ViT.b16(num_classes=0)) == 85_798_656


@pytest.mark.parametrize("sd", [2, 3])
def test_vit_fused_matches_reference(sd):
    from fastmed.models import ViT

    torch.manual_seed(6)
    model = ViT(sd, img_size=16, patch_size=8, in_channels=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    x = torch.randn(2, 1, *(16,) * sd)
    _agree(model, x)
    # another size: interpolated position embeddings; the patch-token grid as an encoder feature map
    assert model.feature_grid(torch.randn(1, 1, *(8,) * (sd - 1), 24)).shape == (1, 16) + (1,) * (sd - 1) + (3,)
    with pytest.raises(ValueError, match="multiple of patch_size=8"):
        model(torch.randn(1, 1, *(12,) * sd))


# ------------------------------------------------------------------------- every model: the same four features
def _tiny(name):
    from fastmed.models import SwinUNet, ViT

    torch.manual_seed(8)
    if name == "unet-resenc":
        return UNet(3, 1, 2, features=(4, 8), strides=(1, 2), residual=True, blocks_per_stage=(1, 1)), (1, 1, 8, 8, 8)
    if name == "attention-unet":
        return AttentionUNet(2, 1, 2, channels=(4, 8), strides=(2,)), (2, 1, 8, 8)
    if name == "swin-unet-3d":
        return SwinUNet(3, 1, 2, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=2,
                        drop_path_rate=0.0), (1, 1, 8, 8, 8)
    if name == "unetr":
        from fastmed.models import ViTUNETR

        return ViTUNETR(3, 1, 2, img_size=16, feature_size=4, embed_dim=16, depth=4, num_heads=2), (1, 1, 16, 16, 16)
    return ViT(2, img_size=16, patch_size=8, in_channels=1, num_classes=2, embed_dim=16, depth=2,
               num_heads=2), (2, 1, 16, 16)


@pytest.mark.parametrize("name", ["unet-resenc", "attention-unet", "swin-unet-3d", "vit", "unetr"])
def test_every_model_autocast_channels_last_checkpointing_compile(name):
    model, shape = _tiny(name)
    model.eval()  # batch-norm statistics stay fixed, so every variant sees the same function
    x = torch.randn(shape)
    ref = model(x)
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    torch.testing.assert_close(model(x.contiguous(memory_format=fmt)), ref, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), ref, atol=0.1 * ref.abs().max().item() + 0.05, rtol=0.1)
    ref.square().sum().backward()
    g_ref = _grads(model)
    model.zero_grad()
    model.checkpointing = True
    model(x.clone().requires_grad_(True)).square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5, rtol=1e-4, msg=k)
    model.checkpointing = False
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref.detach(), atol=1e-5, rtol=1e-5)


def test_unetr_fused_matches_reference_and_errors():
    from fastmed.models import ViTUNETR

    torch.manual_seed(9)
    model = ViTUNETR(2, 1, 3, img_size=32, feature_size=4, embed_dim=16, depth=4, num_heads=2)
    x = torch.randn(2, 1, 32, 48)  # another size than img_size: interpolated position embeddings
    assert model(x).shape == (2, 3, 32, 48)
    _agree(model, x)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 1, 24, 32))
    with pytest.raises(ValueError, match="patch_size must be 16"):
        ViTUNETR(3, patch_size=8)


@pytest.mark.parametrize("name", ["unet", "swin-unet"])
def test_models_on_the_triton_backend(name):
    """The fused path through the Triton kernels (interpreter on CPU) equals the reference backend."""
    import fastmed
    from fastmed import _backend
    from fastmed.models import SwinUNet

    reason = _backend.why_not("norm_act", "triton", torch.device("cpu"), forced=True)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(11)
    if name == "unet":
        model, x = UNet(2, 1, 2, features=(4, 8), strides=(1, 2)), torch.randn(1, 1, 8, 8)
    else:
        model = SwinUNet(2, 1, 2, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=2, drop_path_rate=0.0)
        x = torch.randn(1, 1, 16, 16)
    ref = model(x)
    ref.square().sum().backward()
    g_ref = _grads(model)
    scale = max(g.abs().max().item() for g in g_ref.values())
    model.zero_grad()
    with fastmed.use_backend("triton"):
        y = model(x)
        y.square().sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5 * scale, rtol=1e-3, msg=k)
