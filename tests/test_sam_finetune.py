"""fastmed.medsam's fine-tuning path against MedSAM's train_one_gpu.py written with segment_anything's modules,
MONAI's DiceLoss and torch's BCEWithLogitsLoss."""
import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from test_sam_model import _pair

import fastmed
from fastmed import medsam

pytestmark = pytest.mark.usefixtures("one_thread")


def _monai_medsam_loss(logits, target):
    """MedSAM's ``seg_loss(pred, gt) + ce_loss(pred, gt.float())`` (MONAI 1.6 needs a float target for the squared
    norm)."""
    monai_losses = pytest.importorskip("monai.losses")
    dice = monai_losses.DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")
    return dice(logits, target.float()) + torch.nn.BCEWithLogitsLoss(reduction="mean")(logits, target.float())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.ext), "triton"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.float32])
def test_medsam_loss_equals_monai_dice_plus_bce(backend, target_dtype):
    device = triton_device() if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 1, 12, 10, generator=g) * 3).to(device).requires_grad_()
    target = (torch.rand(3, 1, 12, 10, generator=g) > 0.6).to(target_dtype).to(device)
    with fastmed.use_backend(backend):
        loss = medsam.MedSAMLoss()(logits, target)
    # the fused statistics and finalize ops ran (not a plain composition): the direct path's nodes (on the cpp
    # backend its C++ autograd nodes, LossFinalizeFunction and LossStatsFunction)
    assert "LossFinalize" in loss.grad_fn.name()
    assert "LossStats" in loss.grad_fn.next_functions[0][0].name()
    (grad,) = torch.autograd.grad(loss, logits)
    x = logits.detach().cpu().double().requires_grad_()
    want = _monai_medsam_loss(x, target.cpu())
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), want_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
def test_medsam_loss_fused_on_gpu():
    logits = torch.randn(2, 1, 64, 64, device="cuda", requires_grad=True)
    target = (torch.rand(2, 1, 64, 64, device="cuda") > 0.5).long()
    loss = medsam.MedSAMLoss()(logits, target)
    assert loss.grad_fn.name() == "_LossFinalizeDirectBackward"
    (grad,) = torch.autograd.grad(loss, logits)
    x = logits.detach().double().requires_grad_()
    want = _monai_medsam_loss(x, target)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=1e-4)


def _batch():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[5.0, 8.0, 40.0, 50.0], [10.0, 3.0, 63.0, 30.0]])
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.int64)
    masks[0, 0, 10:45, 8:38] = 1
    masks[1, 0, 5:28, 12:60] = 1
    return images, boxes, masks


def _medsam_by_hand(theirs, images, boxes, masks):
    """MedSAM.forward + its loss with segment_anything's modules (its batched decoder pairs image i with box i)."""
    emb = theirs.image_encoder(images)
    low = []
    for i in range(images.shape[0]):
        with torch.no_grad():
            sparse, dense = theirs.prompt_encoder(points=None, boxes=boxes[i:i + 1, None], masks=None)
        m, _ = theirs.mask_decoder(emb[i:i + 1], theirs.prompt_encoder.get_dense_pe(), sparse, dense, False)
        low.append(m)
    logits = F.interpolate(torch.cat(low), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits, _monai_medsam_loss(logits, masks)


def test_prepare_for_finetuning_freezes_the_prompt_encoder_only():
    _, ours = _pair(True)
    ours.eval()
    params = medsam.prepare_for_finetuning(ours)
    assert ours.training
    assert all(not p.requires_grad for p in ours.prompt_encoder.parameters())
    want = list(ours.image_encoder.parameters()) + list(ours.mask_decoder.parameters())
    assert [id(p) for p in params] == [id(p) for p in want] and all(p.requires_grad for p in params)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_train_step_equals_medsam_train_one_gpu(backend):
    theirs, ours = _pair(True)
    images, boxes, masks = _batch()
    for p in theirs.prompt_encoder.parameters():
        p.requires_grad_(False)
    logits_t, loss_t = _medsam_by_hand(theirs, images, boxes, masks)
    loss_t.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}

    if backend == "triton":  # the decoder's attention has no Triton backend: its plain composition runs
        for m in ours.mask_decoder.modules():
            if hasattr(m, "fused"):
                m.fused = False
    params = medsam.prepare_for_finetuning(ours)
    lr = 0.5
    optimizer = torch.optim.SGD(params, lr=lr)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with fastmed.use_backend(backend):
        logits_o = medsam.forward_logits(ours, images, boxes)
        torch.testing.assert_close(logits_o, logits_t, atol=1e-4, rtol=1e-4)
        loss = medsam.train_step(ours, optimizer, images, boxes, masks)
    torch.testing.assert_close(loss, loss_t.detach(), atol=1e-5, rtol=1e-5)
    changed = set()
    for n, p in ours.named_parameters():
        if n.startswith("prompt_encoder."):
            assert torch.equal(p, before[n]), n  # frozen: untouched
            assert p.grad is None
            continue
        if grads[n] is None:  # not on the loss's path (the IoU head): no gradient in MedSAM either
            assert torch.equal(p, before[n]), n
            continue
        torch.testing.assert_close((before[n] - p.detach()) / lr, grads[n], atol=2e-5, rtol=1e-3, msg=n)
        if not torch.equal(p, before[n]):
            changed.add(n.split(".")[0])
        assert p.grad is None  # zero_grad after the step, as MedSAM
    assert changed == {"image_encoder", "mask_decoder"}
    for n in ("image_encoder.blocks.0.attn.rel_pos_h", "image_encoder.blocks.1.attn.qkv.weight",
              "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"):
        assert not torch.equal(dict(ours.named_parameters())[n], before[n]), n


def test_finetuning_errors():
    _, ours = _pair(True)
    images, boxes, masks = _batch()
    with pytest.raises(TypeError, match="model must be a fastmed.models.SAM"):
        medsam.prepare_for_finetuning(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"boxes must be a \(2, 4\) tensor"):
        medsam.forward_logits(ours, images, boxes[:1])
    with pytest.raises(ValueError, match="images must be a"):
        medsam.forward_logits(ours, images[0], boxes)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        medsam.train_step(ours, None, images, boxes, masks)
    with pytest.raises(ValueError, match="logits must have one channel"):
        medsam.MedSAMLoss()(torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
