"""fastmed modules (drop-in replacements whose parameter names match the modules they replace)."""
from fastmed.nn.norm_act import BatchNormAct, GroupNormAct, InstanceNormAct, NormAct
from fastmed.nn.swin import (DropPath, FinalPatchExpandX4, Mlp, PatchExpand, PatchMerging, SwinTransformerBlock,
                             WindowAttention)

__all__ = ["NormAct", "InstanceNormAct", "GroupNormAct", "BatchNormAct", "WindowAttention", "SwinTransformerBlock",
           "Mlp", "DropPath", "PatchMerging", "PatchExpand", "FinalPatchExpandX4"]
