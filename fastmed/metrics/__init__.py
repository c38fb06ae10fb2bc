"""Segmentation metrics: functions (:mod:`fastmed.metrics.segmentation`) and MONAI-style classes
(:mod:`fastmed.metrics.cumulative`)."""
from fastmed.metrics.cumulative import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, metric_reduction
from fastmed.metrics.segmentation import dice, hausdorff_distance, ignore_mask, surface_dice

__all__ = ["dice", "hausdorff_distance", "surface_dice", "ignore_mask", "metric_reduction", "DiceMetric",
           "HausdorffDistanceMetric", "SurfaceDiceMetric"]
