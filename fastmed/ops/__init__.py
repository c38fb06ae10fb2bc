"""Functional fastmed ops.  Each dispatches to the best backend that can run (see ``fastmed.info()``)."""
from fastmed.ops.conv_block import conv_norm_act
from fastmed.ops.distance_transform import distance_transform, signed_distance
from fastmed.ops.losses import (
                                deep_supervision_loss,
                                deep_supervision_weights,
                                dice_ce_loss,
                                dice_focal_loss,
                                dice_loss,
                                focal_loss,
                                generalized_dice_loss,
                                nnunet_dice_ce_loss,
                                tversky_loss,
)
from fastmed.ops.norm_act import norm_act
from fastmed.ops.sam_attention import sam_attention
from fastmed.ops.sliding_window import sliding_window_accumulate, sliding_window_finalize
from fastmed.ops.window_attention import attention, window_attention

__all__ = ["norm_act", "conv_norm_act", "window_attention", "attention", "distance_transform", "signed_distance",
           "dice_loss", "generalized_dice_loss", "tversky_loss", "focal_loss", "dice_ce_loss", "dice_focal_loss",
           "nnunet_dice_ce_loss", "deep_supervision_loss", "deep_supervision_weights", "sliding_window_accumulate",
           "sliding_window_finalize", "sam_attention"]
