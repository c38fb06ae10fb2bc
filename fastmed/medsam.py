"""MedSAM box-prompt inference on 2D images and, slice by slice, 3D volumes (``fastmed.medsam.predict``).

MedSAM's pipeline (``MedSAM_Inference.py``): grey images become 3 channels; the image is resized to the encoder's
input size (1024^2 for ViT-B), min-max scaled to [0, 1] (no ImageNet mean/std), encoded; the box, scaled to the
resized image, prompts the decoder (one mask, ``multimask_output=False``); the 256^2 logits go through a sigmoid,
are resized bilinearly to the original size and thresholded at 0.5.  Difference from MedSAM's script: the resize is
torch's antialiased bicubic on floats (MedSAM uses skimage's and rounds to uint8 before the min-max scaling).

Fine-tuning as MedSAM trains (``train_one_gpu.py``)::

    params = medsam.prepare_for_finetuning(model)       # prompt encoder frozen; image encoder + mask decoder train
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)   # MedSAM's defaults
    loss_fn = medsam.MedSAMLoss()                        # Dice(sigmoid, squared_pred) + BCE-with-logits, fused
    for images, boxes, masks in loader:                  # (B, 3, 1024, 1024) in [0, 1], (B, 4) in 1024 pixels,
        loss = medsam.train_step(model, optimizer, images, boxes, masks, loss_fn)   # (B, 1, 1024, 1024) 0/1
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmed.models.sam import SAM
from fastmed.ops.losses import dice_ce_loss

__all__ = ["predict", "preprocess", "main", "prepare_for_finetuning", "MedSAMLoss", "forward_logits", "train_step"]

THRESHOLD = 0.5  # on the sigmoid of the mask logits


def preprocess(images: Tensor, size: int) -> Tensor:
    """``(N, H, W)`` or ``(N, H, W, 3)`` images -> ``(N, 3, size, size)`` float32 in [0, 1] (per-image min-max)."""
    x = images.float()
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def _check_model(model) -> None:
    if not isinstance(model, SAM):
        raise TypeError(f"model must be a fastmed.models.SAM, got {type(model).__name__}")


def _boxes(box, n: int, H: int, W: int) -> Tensor:
    b = torch.as_tensor(box, dtype=torch.float64)
    if b.shape == (4,):
        b = b.expand(n, 4)
    if b.shape != (n, 4):
        raise ValueError(f"box must be (x0, y0, x1, y1) or one such box per slice ({n}, 4), got shape "
                         f"{tuple(b.shape)}")
    if not torch.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"box must be finite with x0 <= x1 and y0 <= y1, got {b.tolist()}")
    return b


@torch.no_grad()
def predict(image: Tensor, box: Union[Sequence[float], Tensor], model: SAM, *, batch_size: int = 8) -> Tensor:
    """MedSAM segmentation of ``image`` inside ``box``.

    Args:
        image: ``(H, W)`` grey, ``(H, W, 3)`` RGB, or a ``(D, H, W)`` volume segmented slice by slice (a 3D input
            whose last dimension is 3 is read as RGB).  Any real dtype; not modified.
        box: ``(x0, y0, x1, y1)`` in ``image``'s pixels (x along W), or for a volume one box per slice ``(D, 4)``.
        model: a :class:`fastmed.models.SAM` (e.g. ``SAM.vit_b()`` with MedSAM's checkpoint loaded); its device and
            dtype are used.
        batch_size: slices encoded at once (volumes).

    Returns:
        bool mask ``(H, W)`` (``(D, H, W)`` for a volume).
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.is_complex() or image.dtype == torch.bool:
        raise TypeError(f"image must have a real dtype, got {image.dtype}")
    _check_model(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rgb = image.dim() == 3 and image.shape[-1] == 3
    if image.dim() == 2 or rgb:
        slices, squeeze = image.unsqueeze(0), True
    elif image.dim() == 3:
        slices, squeeze = image, False
    else:
        raise ValueError(f"image must be (H, W), (H, W, 3) or (D, H, W), got shape {tuple(image.shape)}")
    n, H, W = slices.shape[:3]
    if n == 0 or H == 0 or W == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    boxes = _boxes(box, n, H, W)
    p = next(model.parameters())
    size = model.image_encoder.img_size
    scale = torch.tensor([size / W, size / H, size / W, size / H], dtype=torch.float64)
    out = []
    for i in range(0, n, batch_size):
        x = preprocess(slices[i:i + batch_size].to(p.device), size).to(p.dtype)
        emb = model.image_encoder(x)
        for j in range(emb.shape[0]):
            b = (boxes[i + j] * scale).to(p.device, torch.float32)[None]
            logits, _ = model.decode(emb[j:j + 1], boxes=b)
            prob = F.interpolate(torch.sigmoid(logits.float()), size=(H, W), mode="bilinear", align_corners=False)
            out.append(prob[0, 0] > THRESHOLD)
    mask = torch.stack(out).cpu()
    return mask[0] if squeeze else mask


def prepare_for_finetuning(model: SAM) -> list[nn.Parameter]:
    """MedSAM's training setup: freezes the prompt encoder (``requires_grad=False``), makes the image encoder and
    the mask decoder trainable, and puts the model in training mode.

    Returns:
        the trainable parameters (image encoder's, then mask decoder's), the ones MedSAM gives its optimizer.
    """
    _check_model(model)
    model.train()
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(False)
    params = list(model.image_encoder.parameters()) + list(model.mask_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class MedSAMLoss(nn.Module):
    """MedSAM's loss: ``monai.losses.DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")`` plus
    ``torch.nn.BCEWithLogitsLoss(reduction="mean")``, computed as one fused :func:`fastmed.ops.dice_ce_loss` (one
    pass over the logits for both terms' statistics, one for the gradient).

    ``forward(logits (B, 1, H, W), target (B, 1, H, W) of 0/1, any real dtype)`` -> a float32 scalar (float64
    for float64 logits)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if isinstance(logits, Tensor) and (logits.dim() < 2 or logits.shape[1] != 1):
            raise ValueError(f"logits must have one channel (B, 1, *spatial), as MedSAM's single mask, got shape "
                             f"{tuple(logits.shape)}")
        return dice_ce_loss(logits, target, sigmoid=True, squared_pred=True, reduction="mean")


def forward_logits(model: SAM, images: Tensor, boxes: Tensor) -> Tensor:
    """MedSAM's ``forward``: full-resolution mask logits for one box per image.

    The image encoder runs with gradients; the prompt encoder under ``no_grad`` (frozen, as in MedSAM); the mask
    decoder with ``multimask_output=False`` on the batch; its low-resolution logits are upsampled bilinearly
    (``align_corners=False``) to the images' size.

    Args:
        images: ``(B, 3, S, S)`` preprocessed images (:func:`preprocess`), S the encoder's input size.
        boxes: ``(B, 4)`` ``(x0, y0, x1, y1)`` in the images' pixels.

    Returns:
        ``(B, 1, S, S)`` logits.
    """
    _check_model(model)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, S, S) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (images.shape[0], 4):
        raise ValueError(f"boxes must be a ({images.shape[0]}, 4) tensor (one box per image), got "
                         f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
    emb = model.image_encoder(images)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(None, boxes.to(images.device, torch.float32), None)
    low, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return F.interpolate(low, size=images.shape[-2:], mode="bilinear", align_corners=False)


def train_step(model: SAM, optimizer: torch.optim.Optimizer, images: Tensor, boxes: Tensor, masks: Tensor,
               loss_fn: Optional[nn.Module] = None) -> Tensor:
    """One MedSAM training step: :func:`forward_logits`, ``loss_fn`` (default :class:`MedSAMLoss`) against
    ``masks``, ``backward``, ``optimizer.step()``, ``optimizer.zero_grad()`` (MedSAM's order).

    Args:
        images, boxes: as :func:`forward_logits`; masks: ``(B, 1, S, S)`` ground truth (0/1).
        optimizer: over :func:`prepare_for_finetuning`'s parameters.

    Returns:
        the loss (detached).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    loss = (loss_fn or MedSAMLoss())(forward_logits(model, images, boxes), masks)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _read_image(path: str) -> Tensor:
    """``.npy`` (2D, 2D RGB or a 3D volume) or an image file matplotlib reads (PNG; grey or RGB, alpha dropped)."""
    if path.endswith(".npy"):
        import numpy as np

        return torch.from_numpy(np.load(path))
    import matplotlib.image as mpimg

    img = torch.from_numpy(mpimg.imread(path).copy())
    return img[..., :3] if img.dim() == 3 and img.shape[-1] == 4 else img


def _write_pngs(out: str, image: Tensor, mask: Tensor) -> str:
    """The mask (white on black) at ``out`` and an overlay next to it; returns the overlay's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mask.dim() == 3:  # a volume: the slice with the largest mask
        k = int(mask.flatten(1).sum(1).argmax())
        image, mask = image[k], mask[k]
    plt.imsave(out, mask.numpy().astype("uint8") * 255, cmap="gray", vmin=0, vmax=255)
    img = image.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    rgb = img[..., None].expand(*img.shape, 3).clone() if img.dim() == 2 else img.clone()
    rgb[mask] = 0.5 * rgb[mask] + 0.5 * torch.tensor([1.0, 0.2, 0.2])
    root, ext = os.path.splitext(out)
    overlay = f"{root}_overlay{ext or '.png'}"
    plt.imsave(overlay, rgb.clamp(0, 1).numpy())
    return overlay


def main(argv: Optional[list] = None) -> int:
    """``python -m fastmed medsam --image X --box x0,y0,x1,y1 [--checkpoint ckpt] --out mask.png``."""
    parser = argparse.ArgumentParser(prog="python -m fastmed medsam",
                                     description="MedSAM box-prompt segmentation (SAM ViT-B); writes the mask and an "
                                                 "overlay PNG")
    parser.add_argument("--image", required=True, help="PNG/JPEG (grey or RGB) or .npy (2D, 2D RGB, or 3D volume)")
    parser.add_argument("--box", required=True, help="x0,y0,x1,y1 in the image's pixels")
    parser.add_argument("--checkpoint", help="local MedSAM / SAM ViT-B state dict (.pth); without it: random weights")
    parser.add_argument("--out", default="mask.png", help="mask PNG (the overlay goes next to it, *_overlay.png)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="a small SAM of ViT-B's structure (for tests)")
    args = parser.parse_args(argv)
    try:
        box = [float(v) for v in args.box.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        parser.error(f"--box must be four numbers x0,y0,x1,y1, got {args.box!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here")
    try:
        image = _read_image(args.image)
    except (OSError, ValueError) as exc:
        print(f"python -m fastmed medsam: error: cannot read --image {args.image!r}: {exc}", file=sys.stderr)
        return 2
    if args.tiny:
        torch.manual_seed(0)
        model = SAM(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3,
                    global_attn_indexes=(1,), prompt_dim=32, mask_in_chans=8, decoder_mlp=64, decoder_heads=2)
    else:
        model = SAM.vit_b()
    if args.checkpoint:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"python -m fastmed medsam: error: cannot load --checkpoint {args.checkpoint!r}: {exc}",
                  file=sys.stderr)
            return 2
    else:
        print("no --checkpoint: running RANDOM weights (the mask means nothing); pass a local MedSAM checkpoint")
    model = model.to(device).eval()
    try:
        mask = predict(image, box, model)
    except (TypeError, ValueError) as exc:
        print(f"python -m fastmed medsam: error: {exc}", file=sys.stderr)
        return 2
    overlay = _write_pngs(args.out, image, mask)
    print(f"mask: {args.out} ({int(mask.sum())} of {mask.numel()} pixels); overlay: {overlay}")
    return 0
