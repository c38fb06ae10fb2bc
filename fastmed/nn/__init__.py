"""fastmed modules (drop-in replacements whose parameter names match the modules they replace)."""
from fastmed.nn.losses import (DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss,
                               GeneralizedDiceLoss, NNUNetDiceCELoss, TverskyLoss)
from fastmed.nn.norm_act import BatchNormAct, GroupNormAct, InstanceNormAct, NormAct
from fastmed.nn.swin import (DropPath, FinalPatchExpandX4, Mlp, PatchExpand, PatchMerging, SwinTransformerBlock,
                             WindowAttention)

__all__ = ["NormAct", "InstanceNormAct", "GroupNormAct", "BatchNormAct", "DiceLoss", "GeneralizedDiceLoss",
           "TverskyLoss", "FocalLoss", "DiceCELoss", "DiceFocalLoss", "NNUNetDiceCELoss", "DeepSupervisionLoss"]
from fastmed.nn.conv_block import ConvNormAct, ResidualBlock, UpBlock, convert_monai_state_dict  # noqa: E402

__all__ += ["ConvNormAct", "ResidualBlock", "UpBlock", "convert_monai_state_dict"]
__all__ += ["WindowAttention", "SwinTransformerBlock", "Mlp", "DropPath", "PatchMerging", "PatchExpand",
            "FinalPatchExpandX4"]
