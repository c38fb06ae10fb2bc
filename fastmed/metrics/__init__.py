"""Segmentation metrics."""
from fastmed.metrics.segmentation import dice, hausdorff_distance, surface_dice

__all__ = ["dice", "hausdorff_distance", "surface_dice"]
