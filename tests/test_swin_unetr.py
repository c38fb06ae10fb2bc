"""fastmed.models.SwinUNETR against MONAI's SwinUNETR (v1 and v2): keys, outputs, gradients; any input size;
the Triton backend (interpreter) on a tiny case."""
import pytest
import torch
import torch.nn.functional as F
from model_support import (
    assert_autocast_and_compile,
    assert_matches_monai,
    assert_triton_matches_reference,
    fused_and_plain,
    monai_pair,
    on_meta,
    reference_then_checkpointing,
)
from model_support import grads as _grads

from fastmed.models import SwinUNETR

monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr")
pytestmark = pytest.mark.usefixtures("one_thread")

# small but complete: every stage, a shifted block in the stages whose grid exceeds the window
SMALL = dict(feature_size=12, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)


def _pair(monkeypatch, seed=0, **kwargs):
    return monai_pair(monkeypatch, monai_swin.SwinUNETR, SwinUNETR, seed, **kwargs)


def test_swin_unetr_parameter_count_and_keys():
    _, n = on_meta(SwinUNETR, in_channels=1, out_channels=14, feature_size=48)
    assert n == 62_187_296 and round(n / 1e6, 2) == 62.19
    v2, _ = on_meta(SwinUNETR, 1, 14, feature_size=48, use_v2=True)
    keys = set(v2.state_dict())
    assert "swinViT.layers4c.0.layer.conv2.conv.weight" in keys and "decoder1.conv_block.conv3.conv.weight" in keys


@pytest.mark.parametrize("use_v2", [False, True])
def test_swin_unetr_matches_monai_3d(monkeypatch, use_v2):
    """MONAI's weights load strictly; fused and plain paths give MONAI's logits (float32 and float64) and parameter
    gradients (float64: at this size instance norm over the 2 x 2 x 1 bottleneck amplifies float32 rounding of
    either implementation, MONAI's included, far beyond 1e-4; see ``assert_matches_monai``)."""
    theirs, ours = _pair(monkeypatch, in_channels=2, out_channels=3, use_v2=use_v2, **SMALL)
    x = torch.randn(1, 2, 64, 64, 32)
    assert_matches_monai(theirs, ours, x)


@pytest.mark.parametrize("downsample", ["merging", "mergingv2"])
def test_swin_unetr_2d_any_size_pads_like_monai(monkeypatch, downsample):
    """A 2D input of any size = MONAI on the zero-padded (multiple of 32) input, cropped back."""
    theirs, ours = _pair(monkeypatch, seed=1, in_channels=1, out_channels=2, spatial_dims=2, downsample=downsample,
                         patch_norm=True, **SMALL)
    x = torch.randn(2, 1, 40, 50)
    with torch.no_grad():
        ref = theirs(F.pad(x, (0, 14, 0, 24)))[:, :, :40, :50]
        for fused in (True, False):
            ours.fused = fused
            torch.testing.assert_close(ours(x), ref, atol=2e-5, rtol=1e-4)
    ours.pad = False
    with pytest.raises(ValueError, match="multiple of 32"):
        ours(x)


@pytest.mark.parametrize("use_v2", [False, True])
def test_swin_unetr_2d_fused_equals_plain_float64(use_v2):
    torch.manual_seed(4)
    model = SwinUNETR(2, 3, spatial_dims=2, use_v2=use_v2, **SMALL).double()
    x = torch.randn(2, 2, 64, 32, dtype=torch.float64)
    (y, g_fused, _), (y_plain, g_plain, _) = fused_and_plain(model, x)
    torch.testing.assert_close(y[0], y_plain[0], atol=1e-12, rtol=1e-10)
    assert g_fused.keys() == g_plain.keys() and len(g_fused) == len(list(model.parameters()))
    for k, g in g_fused.items():
        torch.testing.assert_close(g, g_plain[k], atol=1e-10 * g.abs().max().item(), rtol=0, msg=k)


def test_swin_unetr_checkpointing_and_channels_last():
    torch.manual_seed(2)
    model = SwinUNETR(1, 2, spatial_dims=2, **SMALL)
    x = torch.randn(1, 1, 64, 32)
    ref, g_ref = reference_then_checkpointing(model, x)
    y = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_swin_unetr_bad_arguments():
    with pytest.raises(ValueError, match="divisible by 12"):
        SwinUNETR(1, 2, feature_size=16)
    with pytest.raises(ValueError, match="patch_size must be 2"):
        SwinUNETR(1, 2, patch_size=4)
    with pytest.raises(ValueError, match="4 stages"):
        SwinUNETR(1, 2, depths=(2, 2, 2))
    with pytest.raises(ValueError, match="HyenaND"):
        SwinUNETR(1, 2, use_hyena=True)
    with pytest.raises(ValueError, match="downsample"):
        SwinUNETR(1, 2, downsample="pooling")
    with pytest.raises(ValueError, match="norm_name"):
        SwinUNETR(1, 2, norm_name="layer")
    model = SwinUNETR(1, 2, spatial_dims=2, **SMALL)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 3, 32, 32))


def test_swin_unetr_on_the_triton_backend():
    """The fused path through the Triton kernels (interpreter on CPU) equals the reference backend: the Swin encoder
    (window attention, shifted and not, every stage) and a residual decoder block (transposed conv, the skip read
    as a second input, 1x1 residual projection); the whole model is too slow for the interpreter."""
    from fastmed.models.unetr import UnetrUpBlock

    torch.manual_seed(3)
    model = SwinUNETR(1, 2, spatial_dims=2, feature_size=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      window_size=4)
    assert_triton_matches_reference(model.swinViT, torch.randn(1, 1, 32, 32))
    up = UnetrUpBlock(2, 24, 12, 3, 2, "instance", res_block=True)
    assert_triton_matches_reference(up, torch.randn(1, 24, 4, 4), torch.randn(1, 12, 8, 8))


def test_swin_unetr_autocast_and_compile():
    torch.manual_seed(7)
    model = SwinUNETR(2, 2, spatial_dims=2, feature_size=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      window_size=4)
    assert_autocast_and_compile(model, torch.randn(1, 2, 56, 40))  # padded to 64 x 64 and cropped back
