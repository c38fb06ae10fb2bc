"""Functional fastmed ops.  Each dispatches to the best backend that can run (see ``fastmed.info()``)."""
from fastmed.ops.norm_act import norm_act
from fastmed.ops.window_attention import attention, window_attention

__all__ = ["norm_act", "window_attention", "attention"]
