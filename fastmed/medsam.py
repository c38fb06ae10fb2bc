"""MedSAM box-prompt inference on 2D images and, slice by slice, 3D volumes (``fastmed.medsam.predict``).

MedSAM's pipeline (``MedSAM_Inference.py``): grey images become 3 channels; the image is resized to the encoder's
input size (1024^2 for ViT-B), min-max scaled to [0, 1] (no ImageNet mean/std), encoded; the box, scaled to the
resized image, prompts the decoder (one mask, ``multimask_output=False``); the 256^2 logits go through a sigmoid,
are resized bilinearly to the original size and thresholded at 0.5.  Difference from MedSAM's script: the resize is
torch's antialiased bicubic on floats (MedSAM uses skimage's and rounds to uint8 before the min-max scaling).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmed.models.sam import SAM

__all__ = ["predict", "preprocess"]

THRESHOLD = 0.5  # on the sigmoid of the mask logits


def preprocess(images: Tensor, size: int) -> Tensor:
    """``(N, H, W)`` or ``(N, H, W, 3)`` images -> ``(N, 3, size, size)`` float32 in [0, 1] (per-image min-max)."""
    x = images.float()
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


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
    if not isinstance(model, SAM):
        raise TypeError(f"model must be a fastmed.models.SAM, got {type(model).__name__}")
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
