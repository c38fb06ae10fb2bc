"""fastmed.models.TransUNet: parameter count, repository key layout, fused vs plain PyTorch, the npz converter on a
checkpoint written out in the R50+ViT-B_16 layout, the Triton backend (interpreter), bf16 autocast,
torch.compile(fullgraph=True), checkpointing with channels-last input, errors."""
import numpy as np
import pytest
import torch
from model_support import assert_autocast_and_compile, assert_triton_matches_reference, fused_and_plain

from fastmed.models import TransUNet
from fastmed.models.transunet import convert_vit_r50_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=32, num_classes=3, hidden_size=16, mlp_dim=16, num_heads=2, num_layers=2, block_units=(1, 2, 1),
            dropout=0.0)


def test_transunet_parameter_count_and_keys():
    with torch.device("meta"):
        model = TransUNet(img_size=224, num_classes=9)
    n = sum(p.numel() for p in model.parameters())
    assert n == 105_277_081 and round(n / 1e6, 2) == 105.28
    keys = set(model.state_dict())
    for k in ("transformer.embeddings.hybrid_model.root.conv.weight",
              "transformer.embeddings.hybrid_model.body.block3.unit9.gn3.bias",
              "transformer.embeddings.hybrid_model.body.block2.unit1.gn_proj.weight",
              "transformer.embeddings.position_embeddings", "transformer.encoder.layer.11.attn.query.weight",
              "transformer.encoder.encoder_norm.bias", "decoder.conv_more.1.running_var",
              "decoder.blocks.3.conv2.0.weight", "segmentation_head.0.weight"):
        assert k in keys, k
    assert model.state_dict()["decoder.blocks.2.conv1.0.weight"].shape == (64, 128 + 64, 3, 3)  # n_skip 3
    assert model.state_dict()["decoder.blocks.3.conv1.0.weight"].shape == (16, 64, 3, 3)  # no 4th skip


def test_transunet_fused_matches_plain():
    torch.manual_seed(0)
    model = TransUNet(**TINY)
    x = torch.randn(2, 1, 32, 32)  # one channel: repeated to three
    outs = fused_and_plain(model, x)
    torch.testing.assert_close(outs[0][0][0], outs[1][0][0], atol=1e-4, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) == len(list(model.parameters()))
    scale = max(g.abs().max().item() for g in outs[1][1].values())
    for k, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][k], atol=1e-5 * scale, rtol=1e-4, msg=k)
    for k, b in outs[0][2].items():  # batch-norm running statistics
        torch.testing.assert_close(b, outs[1][2][k], msg=k)


def _write_npz_layout(model):
    """The model's weights written out under the R50+ViT-B_16.npz names and layouts (JAX: conv HWIO, Dense (in, out),
    attention kernels (hidden, heads, head_dim) / (heads, head_dim, hidden), a class-token position embedding)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.transformer.encoder.layer[0].attn.num_attention_heads
    w = {}
    emb = "transformer.embeddings."
    w["embedding/kernel"] = sd[emb + "patch_embeddings.weight"].transpose(2, 3, 1, 0)
    w["embedding/bias"] = sd[emb + "patch_embeddings.bias"]
    pos = sd[emb + "position_embeddings"]
    w["Transformer/posembed_input/pos_embedding"] = np.concatenate([np.full_like(pos[:, :1], 7.0), pos], axis=1)
    w["Transformer/encoder_norm/scale"] = sd["transformer.encoder.encoder_norm.weight"]
    w["Transformer/encoder_norm/bias"] = sd["transformer.encoder.encoder_norm.bias"]
    for i in range(len(model.transformer.encoder.layer)):
        src, dst = f"Transformer/encoderblock_{i}/", f"transformer.encoder.layer.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            kernel = sd[dst + f"attn.{name}.weight"].T
            w[att + f"{name}/kernel"] = kernel.reshape(kernel.shape[0], heads, -1)
            w[att + f"{name}/bias"] = sd[dst + f"attn.{name}.bias"].reshape(heads, -1)
        kernel = sd[dst + "attn.out.weight"].T
        w[att + "out/kernel"] = kernel.reshape(heads, -1, kernel.shape[1])
        w[att + "out/bias"] = sd[dst + "attn.out.bias"]
        w[src + "MlpBlock_3/Dense_0/kernel"] = sd[dst + "ffn.fc1.weight"].T
        w[src + "MlpBlock_3/Dense_0/bias"] = sd[dst + "ffn.fc1.bias"]
        w[src + "MlpBlock_3/Dense_1/kernel"] = sd[dst + "ffn.fc2.weight"].T
        w[src + "MlpBlock_3/Dense_1/bias"] = sd[dst + "ffn.fc2.bias"]
        for k, name in ((0, "attention_norm"), (2, "ffn_norm")):
            w[src + f"LayerNorm_{k}/scale"] = sd[dst + f"{name}.weight"]
            w[src + f"LayerNorm_{k}/bias"] = sd[dst + f"{name}.bias"]
    res = emb + "hybrid_model."
    w["conv_root/kernel"] = sd[res + "root.conv.weight"].transpose(2, 3, 1, 0)
    w["gn_root/scale"], w["gn_root/bias"] = sd[res + "root.gn.weight"], sd[res + "root.gn.bias"]
    for key, value in sd.items():
        if key.startswith(res + "body."):
            block, unit, layer, param = key[len(res + "body."):].split(".")
            layer = "conv_proj" if layer == "downsample" else layer
            if layer.startswith("conv"):
                w[f"{block}/{unit}/{layer}/kernel"] = value.transpose(2, 3, 1, 0)
            else:
                w[f"{block}/{unit}/{layer}/{'scale' if param == 'weight' else 'bias'}"] = value
    return w


def test_transunet_npz_converter_round_trip():
    torch.manual_seed(1)
    source = TransUNet(**TINY)
    for p in source.parameters():  # every tensor distinct, so a misplaced one shows
        p.data.normal_()
    npz = _write_npz_layout(source)
    torch.manual_seed(2)
    target = TransUNet(**TINY)
    converted = convert_vit_r50_npz(npz, target)
    target.load_state_dict(converted, strict=True)
    src_sd, dst_sd = source.state_dict(), target.state_dict()
    decoder = ("decoder.", "segmentation_head.")
    for k in src_sd:
        if k.startswith(decoder):  # not in the npz: kept from the target model
            torch.testing.assert_close(dst_sd[k], converted[k])
        else:
            torch.testing.assert_close(dst_sd[k], src_sd[k], rtol=0, atol=0, msg=k)
    del npz["block2/unit1/gn_proj/scale"]
    with pytest.raises(KeyError, match="gn_proj"):
        convert_vit_r50_npz(npz, target)


def test_transunet_npz_converter_resizes_the_position_embeddings():
    torch.manual_seed(3)
    small = TransUNet(**TINY)
    npz = _write_npz_layout(small)
    big = TransUNet(**{**TINY, "img_size": 48})
    pos = convert_vit_r50_npz(npz, big)["transformer.embeddings.position_embeddings"]
    assert pos.shape == (1, 9, 16)
    corners = pos.reshape(3, 3, 16)[[0, 0, -1, -1], [0, -1, 0, -1]]  # zoom order 1 keeps the corner values
    want = small.state_dict()["transformer.embeddings.position_embeddings"].reshape(2, 2, 16)
    torch.testing.assert_close(corners, want[[0, 0, -1, -1], [0, -1, 0, -1]])


class _Run(torch.nn.Module):
    """``block.run(*args, fused=True)`` as a module call (the parameters are the block's)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return self.block.run(args[0], True, *args[1:])


def test_transunet_on_the_triton_backend():
    """The fused blocks through the Triton kernels (interpreter on CPU) equal the reference backend: a
    bottleneck (weight-standardized convs, GroupNorms, projected residual) and a decoder conv reading its skip as a
    second input (BatchNorm in evaluation mode); the whole model is too slow for the interpreter."""
    torch.manual_seed(4)
    model = TransUNet(img_size=32, num_classes=2, hidden_size=8, mlp_dim=8, num_heads=2, num_layers=1,
                      block_units=(1, 1, 1), width=32, decoder_channels=(16, 8, 8, 4),
                      skip_channels=(256, 128, 32, 4), dropout=0.0).eval()
    unit = model.transformer.embeddings.hybrid_model.body.block1.unit1  # 32 -> 128: projected residual
    assert hasattr(unit, "downsample")
    assert_triton_matches_reference(_Run(unit), torch.randn(1, 32, 4, 4))
    conv1 = model.decoder.blocks[2].conv1  # (8 up + 32 skip) -> 8
    for p in conv1[1].parameters():
        p.data.uniform_(0.5, 1.5)
    conv1[1].running_mean.uniform_(-0.5, 0.5)
    assert_triton_matches_reference(_Run(conv1), torch.randn(1, 8, 4, 4), torch.randn(1, 32, 4, 4))


def test_transunet_bad_input():
    model = TransUNet(**TINY)
    with pytest.raises(ValueError, match="32 x 32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        TransUNet(img_size=40)
    with pytest.raises(ValueError, match="n_skip"):
        TransUNet(n_skip=4)
    with pytest.raises(ValueError, match="skip_channels"):
        TransUNet(width=32)


def test_transunet_autocast_and_compile():
    torch.manual_seed(5)
    assert_autocast_and_compile(TransUNet(**TINY), torch.randn(1, 3, 32, 32))


def test_transunet_checkpointing_channels_last():
    """checkpointing=True recomputes each transformer block in the backward: same output and gradients, also for a
    channels-last input."""
    torch.manual_seed(6)
    model = TransUNet(**TINY)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    y.square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpointing = True
    y2 = model(x.contiguous(memory_format=torch.channels_last))
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    for g, r in zip((p.grad for p in model.parameters()), ref):  # channels-last convs sum in another order
        torch.testing.assert_close(g, r, atol=1e-4 * r.abs().max().item() + 1e-6, rtol=1e-3)
