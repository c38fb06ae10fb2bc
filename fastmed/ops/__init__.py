"""Functional fastmed ops.  Each dispatches to the best backend that can run (see ``fastmed.info()``)."""
from fastmed.ops.distance_transform import distance_transform, signed_distance
from fastmed.ops.norm_act import norm_act

__all__ = ["norm_act", "distance_transform", "signed_distance"]
