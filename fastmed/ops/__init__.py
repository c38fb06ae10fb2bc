"""Functional fastmed ops.  Each dispatches to the best backend that can run (see ``fastmed.info()``)."""
from fastmed.ops.losses import (deep_supervision_loss, deep_supervision_weights, dice_ce_loss, dice_focal_loss,
                                dice_loss, focal_loss, generalized_dice_loss, nnunet_dice_ce_loss, tversky_loss)
from fastmed.ops.norm_act import norm_act
from fastmed.ops.window_attention import attention, window_attention

__all__ = ["norm_act", "dice_loss", "generalized_dice_loss", "tversky_loss", "focal_loss", "dice_ce_loss",
           "dice_focal_loss", "nnunet_dice_ce_loss", "deep_supervision_loss", "deep_supervision_weights"]
from fastmed.ops.conv_block import conv_norm_act  # noqa: E402

__all__ += ["conv_norm_act"]
__all__ += ["window_attention", "attention"]
