"""Complete models assembled from fastmed blocks."""
from fastmed.models.attention_unet import AttentionGate, AttentionUNet
from fastmed.models.unet import UNet, plan_nnunet

__all__ = ["UNet", "plan_nnunet", "AttentionUNet", "AttentionGate"]
