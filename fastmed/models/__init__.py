"""Complete models assembled from fastmed blocks.

``UNet``           2D/3D U-Net; presets ``UNet.original()`` (Ronneberger, 31.03M), ``UNet.nnunet(patch, spacing)``
                   (nnU-Net's PlainConvUNet, deep supervision) and ``UNet.resenc(...)`` (ResidualEncoderUNet)
``UNetPlusPlus``   U-Net++ (Zhou et al.; nested skips, deep supervision, pruning; 9.05M in 2D), 2D or 3D
``AttentionUNet``  MONAI's AttentionUnet (loads its weights: fastmed.convert.from_monai_attention_unet)
``MonaiUNet``      MONAI's UNet, same module tree and parameter names (fastmed.convert.from_monai_unet)
``SwinUNet``       Swin-Unet (Cao et al., 27.17M with 9 classes), any input size, 2D or 3D
``SwinUNETR``      MONAI's SwinUNETR (v1 / v2; loads its checkpoints; 62.19M at feature_size 48), any input size
``ViT``            timm-compatible Vision Transformer (``ViT.b16()``: 86.57M), 2D or 3D patches
``UNETR``          MONAI's UNETR (same constructor and keys: loads its checkpoints), 2D or 3D
``TransUNet``      TransUNet R50-ViT-B/16 (Chen et al.; repository keys, npz converter; 105.28M)
``ViTUNETR``       UNETR-style model on ``ViT`` (timm keys)
``SAM``            Segment Anything / MedSAM (``SAM.vit_b()``: 93.74M), segment_anything's parameter names

Every model takes ``fused`` (fastmed ops, or the same parameters through plain PyTorch) and, except ``MonaiUNet``,
``checkpointing``.
"""
from fastmed.models.attention_unet import AttentionGate, AttentionUNet
from fastmed.models.monai_unet import MonaiUNet
from fastmed.models.sam import SAM
from fastmed.models.swin_unet import SwinUNet
from fastmed.models.swin_unetr import SwinUNETR
from fastmed.models.transunet import TransUNet
from fastmed.models.unet import UNet, plan_nnunet
from fastmed.models.unet_plusplus import UNetPlusPlus
from fastmed.models.unetr import UNETR
from fastmed.models.vit import ViT, ViTUNETR

__all__ = ["UNet", "plan_nnunet", "AttentionUNet", "AttentionGate", "MonaiUNet", "SwinUNet", "SwinUNETR", "ViT",
           "UNETR", "ViTUNETR", "UNetPlusPlus", "TransUNet", "SAM"]
