"""Complete models assembled from fastmed blocks."""
from fastmed.models.attention_unet import AttentionGate, AttentionUNet
from fastmed.models.unet import UNet, plan_nnunet

__all__ = ["UNet", "plan_nnunet", "AttentionUNet", "AttentionGate"]
from fastmed.models.swin_unet import SwinUNet  # noqa: E402

__all__ += ["SwinUNet"]
from fastmed.models.vit import UNETR, ViT  # noqa: E402

__all__ += ["ViT", "UNETR"]
