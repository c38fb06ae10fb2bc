"""fastmed.models.UNETR against MONAI's UNETR: keys, outputs and gradients (2D and 3D, residual and plain blocks,
instance and batch norm), other input sizes, the Triton backend (interpreter) on the conv blocks."""

import pytest
import torch
from model_support import assert_autocast_and_compile, assert_matches_monai, assert_triton_matches_reference, monai_pair
from model_support import grads as _grads

from fastmed.models import UNETR

monai_nets = pytest.importorskip("monai.networks.nets")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(feature_size=4, hidden_size=24, mlp_dim=32, num_heads=2)


def _pair(monkeypatch, seed=0, **kwargs):
    return monai_pair(monkeypatch, monai_nets.UNETR, UNETR, seed, **kwargs)


def test_unetr_parameter_count_and_keys():
    with torch.device("meta"):
        model = UNETR(in_channels=1, out_channels=14, img_size=96)
    n = sum(p.numel() for p in model.parameters())
    assert n == 92_802_478 and round(n / 1e6, 2) == 92.80
    keys = set(model.state_dict())
    assert {"vit.patch_embedding.position_embeddings", "vit.blocks.11.attn.out_proj.weight",
            "encoder2.blocks.1.1.conv2.conv.weight", "decoder5.conv_block.conv3.conv.weight"} <= keys
    assert "encoder2.blocks.1.1.conv3.conv.weight" not in keys  # same channels, stride 1: identity residual


CASES = {
    "3d-res-instance": dict(spatial_dims=3, img_size=32, in_channels=2, out_channels=3),
    "3d-basic-batch-qkvbias": dict(spatial_dims=3, img_size=(32, 16, 32), in_channels=1, out_channels=2,
                                   res_block=False, norm_name="batch", qkv_bias=True),
    "2d-res-noconv": dict(spatial_dims=2, img_size=(32, 48), in_channels=2, out_channels=2, conv_block=False,
                          norm_name=("instance", {"affine": True})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unetr_matches_monai(monkeypatch, case):
    """MONAI's weights load strictly; fused and plain paths give MONAI's logits and parameter gradients (train mode:
    batch norm updates its running statistics like MONAI's)."""
    kw = CASES[case]
    theirs, ours = _pair(monkeypatch, **kw, **SMALL)
    size = (kw["img_size"],) * kw["spatial_dims"] if isinstance(kw["img_size"], int) else kw["img_size"]
    x = torch.randn(2, kw["in_channels"], *size)
    assert_matches_monai(theirs, ours, x, unused=2 * 12)  # norm_cross_attn


def test_unetr_other_sizes_checkpointing_and_errors():
    torch.manual_seed(5)
    model = UNETR(2, 2, 32, spatial_dims=2, **SMALL)  # not 1 channel: norm3(conv3(x)) ignores conv3's scale
    x = torch.randn(1, 2, 48, 32)  # another size than img_size: interpolated position embeddings
    ref = model(x)
    assert ref.shape == (1, 2, 48, 32)
    ref.square().sum().backward()
    g_ref = _grads(model)
    model.zero_grad()
    model.checkpointing = True
    model.fused = False
    y = model(x)
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-4 * g_ref[k].abs().max().item(), rtol=0, msg=k)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 2, 24, 32))
    with pytest.raises(ValueError, match="img_size must be a multiple of 16"):
        UNETR(1, 2, 24)
    with pytest.raises(ValueError, match="perceptron"):
        UNETR(1, 2, 32, proj_type="perceptron")
    with pytest.raises(ValueError, match="num_heads=5 must divide"):
        UNETR(1, 2, 32, num_heads=5)
    with pytest.raises(ValueError, match="num_groups"):
        UNETR(1, 2, 32, norm_name="group")


def test_unetr_on_the_triton_backend():
    """The fused conv blocks through the Triton kernels (interpreter on CPU) equal the reference backend."""
    torch.manual_seed(6)
    model = UNETR(2, 2, 16, spatial_dims=2, feature_size=2, hidden_size=8, mlp_dim=8, num_heads=2)
    for blk in model.vit.blocks:  # fastmed.ops.attention is scaled_dot_product_attention: no Triton kernel
        blk.attn.fused = False
    assert_triton_matches_reference(model, torch.randn(1, 2, 16, 16))


def test_unetr_autocast_and_compile():
    torch.manual_seed(7)
    model = UNETR(2, 2, 32, spatial_dims=2, **SMALL)
    assert_autocast_and_compile(model, torch.randn(1, 2, 32, 32))
