"""fastmed.models.SAM against segment_anything's own modules (loaded without the package ``__init__``)."""
import pytest
import torch
from test_sam_attention import load_sam_modeling

import fastmed
from fastmed.models import SAM

pytestmark = pytest.mark.usefixtures("one_thread")

# a small model of ViT-B's structure: 8x8 tokens, windows of 3 (padded to 9x9), one global block
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,),
            prompt_dim=32, mask_in_chans=8, decoder_depth=2, decoder_heads=2, decoder_mlp=64)


def _segment_anything_sam(cfg):
    m = load_sam_modeling()
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = m.ImageEncoderViT(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=4, out_chans=cfg["prompt_dim"], qkv_bias=True,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_rel_pos=True, window_size=cfg["window_size"],
        global_attn_indexes=cfg["global_attn_indexes"])
    prompt = m.PromptEncoder(embed_dim=cfg["prompt_dim"], image_embedding_size=(grid, grid),
                             input_image_size=(cfg["img_size"], cfg["img_size"]), mask_in_chans=cfg["mask_in_chans"])
    decoder = m.MaskDecoder(num_multimask_outputs=3, transformer=m.TwoWayTransformer(
        depth=cfg["decoder_depth"], embedding_dim=cfg["prompt_dim"], mlp_dim=cfg["decoder_mlp"],
        num_heads=cfg["decoder_heads"]), transformer_dim=cfg["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=256)
    return m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def _pair(fused):
    torch.manual_seed(0)
    theirs = _segment_anything_sam(TINY).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = SAM(**TINY, fused=fused).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _prompts():
    g = torch.Generator().manual_seed(1)
    points = (torch.rand(2, 3, 2, generator=g) * 64, torch.tensor([[1, 0, 1], [1, 1, -1]]))
    boxes = torch.tensor([[5.0, 8.0, 40.0, 50.0], [0.0, 3.0, 63.0, 30.0]])
    return points, boxes


@pytest.mark.parametrize("fused, backend", [(True, "reference"), (True, "triton"), (False, "reference")])
def test_embeddings_and_masks_equal_segment_anything(fused, backend):
    theirs, ours = _pair(fused)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    points, boxes = _prompts()
    with torch.no_grad():
        emb_t = theirs.image_encoder(images)
        with fastmed.use_backend(backend):  # the encoder's sam_attention (the decoder's attention has no Triton)
            emb_o = ours.image_encoder(images)
        torch.testing.assert_close(emb_o, emb_t, atol=1e-4, rtol=1e-4)
        for prompt in (dict(points=points), dict(boxes=boxes), dict(points=points, boxes=boxes)):
            for multimask in (False, True):
                for i in range(2):
                    sp, de = theirs.prompt_encoder(
                        None if "points" not in prompt else (points[0][i:i + 1], points[1][i:i + 1]),
                        None if "boxes" not in prompt else boxes[i:i + 1], None)
                    m_t, iou_t = theirs.mask_decoder(emb_t[i:i + 1], theirs.prompt_encoder.get_dense_pe(), sp, de,
                                                     multimask)
                    m_o, iou_o = ours.decode(
                        emb_o[i:i + 1], None if "points" not in prompt else (points[0][i:i + 1],
                                                                              points[1][i:i + 1]),
                        None if "boxes" not in prompt else boxes[i:i + 1], multimask_output=multimask)
                    torch.testing.assert_close(m_o, m_t, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(iou_o, iou_t, atol=1e-4, rtol=1e-4)
        masks, iou = ours(images, boxes=boxes)
        assert masks.shape == (2, 1, 32, 32) and iou.shape == (2, 1)


def test_mask_prompt_equals_segment_anything():
    theirs, ours = _pair(True)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 32, 8, 8, generator=g)
    mask_in = torch.randn(1, 1, 32, 32, generator=g)
    _, boxes = _prompts()
    with torch.no_grad():
        sp, de = theirs.prompt_encoder(None, boxes[:1], mask_in)
        m_t, _ = theirs.mask_decoder(emb, theirs.prompt_encoder.get_dense_pe(), sp, de, False)
        m_o, _ = ours.decode(emb, boxes=boxes[:1], masks=mask_in)
    torch.testing.assert_close(m_o, m_t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_encoder_gradients_equal_segment_anything(checkpointing):
    theirs, ours = _pair(True)
    ours.image_encoder.checkpointing = checkpointing
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    theirs.image_encoder(images).square().sum().backward()
    ours.image_encoder(images).square().sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if name.startswith("image_encoder."):
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_vit_b_keys_shapes_and_parameter_count():
    """Same state-dict keys and shapes as segment_anything's vit_b (so official checkpoints load strictly), and
    93.74M parameters, counted (on the meta device: no memory)."""
    m = load_sam_modeling()
    with torch.device("meta"):
        ours = SAM.vit_b()
        theirs = _segment_anything_sam(dict(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                            window_size=14, global_attn_indexes=(2, 5, 8, 11), prompt_dim=256,
                                            mask_in_chans=16, decoder_depth=2, decoder_heads=8, decoder_mlp=2048))
    assert isinstance(theirs, m.Sam)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b
    count = sum(p.numel() for p in ours.parameters())
    assert round(count / 1e6, 2) == 93.74, count


def test_encoder_bfloat16_error_within_segment_anythings():
    """bf16 image encoder: fastmed's error against the float32 result is at most 2x segment_anything's own bf16
    error plus a small floor."""
    theirs, ours = _pair(True)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = theirs.image_encoder(images)
        err_theirs = (theirs.image_encoder.bfloat16()(images.bfloat16()).float() - want).abs().max()
        err_ours = (ours.image_encoder.bfloat16()(images.bfloat16()).float() - want).abs().max()
    assert err_ours <= 2 * err_theirs + 1e-2, (float(err_ours), float(err_theirs))


def test_box_masks_under_bfloat16_autocast_error_within_segment_anythings():
    """The whole pipeline (encoder, box prompt, decoder) under CPU bf16 autocast: fastmed's mask error against the
    float32 masks is at most 2x segment_anything's own under the same autocast plus a small floor."""
    theirs, ours = _pair(True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _, boxes = _prompts()

    def masks(model, decode):
        emb = model.image_encoder(images)
        return torch.cat([decode(emb[i:i + 1], boxes[i:i + 1]) for i in range(2)]).float()

    def theirs_decode(emb, box):
        sp, de = theirs.prompt_encoder(None, box, None)
        return theirs.mask_decoder(emb, theirs.prompt_encoder.get_dense_pe(), sp, de, False)[0]

    def ours_decode(emb, box):
        return ours.decode(emb, boxes=box)[0]

    with torch.no_grad():
        want = masks(theirs, theirs_decode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err_theirs = (masks(theirs, theirs_decode) - want).abs().max()
            err_ours = (masks(ours, ours_decode) - want).abs().max()
    assert err_ours <= 2 * err_theirs + 1e-3, (float(err_ours), float(err_theirs))
