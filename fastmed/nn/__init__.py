"""fastmed modules (drop-in replacements whose parameter names match the modules they replace)."""
from fastmed.nn.norm_act import BatchNormAct, GroupNormAct, InstanceNormAct, NormAct

__all__ = ["NormAct", "InstanceNormAct", "GroupNormAct", "BatchNormAct"]
from fastmed.nn.conv_block import ConvNormAct, ResidualBlock, UpBlock, convert_monai_state_dict  # noqa: E402

__all__ += ["ConvNormAct", "ResidualBlock", "UpBlock", "convert_monai_state_dict"]
