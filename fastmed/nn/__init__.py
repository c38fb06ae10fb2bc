"""fastmed modules (drop-in replacements whose parameter names match the modules they replace)."""
from fastmed.nn.boundary_losses import BoundaryLoss, HausdorffDTLoss, LogHausdorffDTLoss, boundary_loss_weights
from fastmed.nn.conv_block import ConvNormAct, ResidualBlock, UpBlock, convert_monai_state_dict
from fastmed.nn.losses import (
                               DeepSupervisionLoss,
                               DiceCELoss,
                               DiceFocalLoss,
                               DiceLoss,
                               FocalLoss,
                               GeneralizedDiceLoss,
                               NNUNetDiceCELoss,
                               TverskyLoss,
)
from fastmed.nn.norm_act import BatchNormAct, GroupNormAct, InstanceNormAct, NormAct
from fastmed.nn.swin import (
                               DropPath,
                               FinalPatchExpandX4,
                               Mlp,
                               PatchExpand,
                               PatchMerging,
                               SwinTransformerBlock,
                               WindowAttention,
)

__all__ = ["NormAct", "InstanceNormAct", "GroupNormAct", "BatchNormAct", "ConvNormAct", "ResidualBlock", "UpBlock",
           "convert_monai_state_dict", "WindowAttention", "SwinTransformerBlock", "Mlp", "DropPath", "PatchMerging",
           "PatchExpand", "FinalPatchExpandX4", "BoundaryLoss", "HausdorffDTLoss", "LogHausdorffDTLoss",
           "boundary_loss_weights",
           "DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "FocalLoss", "DiceCELoss", "DiceFocalLoss",
           "NNUNetDiceCELoss", "DeepSupervisionLoss"]
