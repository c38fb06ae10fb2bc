"""Functional fastmed ops.  Each dispatches to the best backend that can run (see ``fastmed.info()``)."""
from fastmed.ops.norm_act import norm_act

__all__ = ["norm_act"]
from fastmed.ops.conv_block import conv_norm_act  # noqa: E402

__all__ += ["conv_norm_act"]
