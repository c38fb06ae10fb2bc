"""nnU-Net v2's self-configuration (Isensee et al. 2021; ``nnunetv2.experiment_planning``): the U-Net topology for a
patch (``get_pool_and_conv_props``) and the ``ExperimentPlanner`` rules that pick target spacing, patch size and
batch size for the ``3d_fullres`` and ``2d`` configurations from a dataset fingerprint.

Rules (nnU-Net v2's, constants below):

* **target spacing**: the median spacing; if the coarsest axis is anisotropic (median spacing > 3x the others and
  median size < 1/3 of the others) it gets the 10th percentile of that axis' spacings (at least the others' + 1e-5).
  The coarsest axis is moved first (``transpose_forward``).
* **median shape** after resampling each case to the target spacing.
* **patch size**: the target spacing's aspect ratio scaled to 256^3 voxels (2048^2 in 2D), clipped to the median
  shape, then padded to the network's divisibility and shrunk (the axis largest relative to the median shape first)
  while the VRAM estimate (the summed conv feature-map sizes of the ``PlainConvUNet``) exceeds the reference for
  ``gpu_memory_gb``.
* **topology** (``get_pool_and_conv_props``): an axis is pooled while its feature map is >= 8 (2 x 4) and its
  spacing is within 2x of the finest pooled-candidate spacing (a lone axis needs >= 12); an axis' kernel becomes 3
  once its spacing is within 2x of the finest (1 before), and the bottleneck's kernel is always 3.
* **features** ``min(32 * 2**s, 320)`` (3D) / ``512`` (2D); **batch size** from the VRAM headroom, at most 5% of
  the dataset's voxels, at least 2.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from fastmed._validate import check_int

__all__ = ["pool_and_conv_props", "plan_from_fingerprint", "target_spacing", "FEATUREMAP_MIN_EDGE", "BASE_FEATURES"]

FEATUREMAP_MIN_EDGE = 4          # UNet_featuremap_min_edge_length
BASE_FEATURES = 32               # UNet_base_num_features
MAX_FEATURES = {2: 512, 3: 320}  # UNet_max_features_2d / _3d
REFERENCE_VRAM = {2: 85_000_000, 3: 560_000_000}  # UNet_reference_val_2d / _3d (at 8 GB)
REFERENCE_GB = 8                 # UNet_reference_val_corresp_GB
REFERENCE_BATCH = {2: 12, 3: 2}  # UNet_reference_val_corresp_bs_2d / _3d
MIN_BATCH = 2                    # UNet_min_batch_size
MAX_DATASET_COVERED = 0.05       # max_dataset_covered
CONVS_PER_STAGE = 2              # UNet_blocks_per_stage_encoder / _decoder
ANISOTROPY_THRESHOLD = 3         # ANISO_THRESHOLD
INITIAL_PATCH_VOXELS = {2: 2048 ** 2, 3: 256 ** 3}


def pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[int],
                        min_feature_map: int = FEATUREMAP_MIN_EDGE, max_numpool: Optional[int] = None) -> dict:
    """nnU-Net v2's ``get_pool_and_conv_props``: strides (``strides[0]`` all 1) and kernel sizes per stage for a
    patch, and the patch padded up to a multiple of the total stride (``divisor``) per axis."""
    nd = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = list(patch_size)  # may be fractional (a median shape), as in nnU-Net
    strides, kernels = [(1,) * nd], []
    num_pool = [0] * nd
    kernel = [1] * nd
    while True:
        valid = [a for a in range(nd) if cur_size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(cur_spacing[a] for a in valid)
        valid = [a for a in valid if cur_spacing[a] / finest < 2]
        if max_numpool is not None:
            valid = [a for a in valid if num_pool[a] < max_numpool]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        smallest = min(cur_spacing)
        kernel = [3 if k == 3 or cur_spacing[a] / smallest < 2 else 1 for a, k in enumerate(kernel)]
        for a in valid:
            num_pool[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
        strides.append(tuple(2 if a in valid else 1 for a in range(nd)))
        kernels.append(tuple(kernel))
    kernels.append((3,) * nd)  # the bottleneck: always 3
    divisor = tuple(2 ** n for n in num_pool)
    padded = tuple(int(p if p % d == 0 else p + d - p % d) for p, d in zip(patch_size, divisor))  # pad_shape
    return {"strides": tuple(strides), "kernel_sizes": tuple(kernels), "patch_size": padded, "divisor": divisor}


def _features(num_stages: int, nd: int) -> tuple:
    return tuple(min(BASE_FEATURES * 2 ** s, MAX_FEATURES[nd]) for s in range(num_stages))


def vram_estimate(patch_size: Sequence[int], strides, features, num_classes: int) -> int:
    """``PlainConvUNet.compute_conv_feature_map_size`` (no deep supervision): the summed sizes of every conv,
    transposed-conv and segmentation output for one sample."""
    sizes, size = [], list(patch_size)
    for stride in strides:
        size = [z // s for z, s in zip(size, stride)]
        sizes.append(size)
    total = sum(CONVS_PER_STAGE * c * math.prod(z) for c, z in zip(features, sizes))  # encoder
    total += sum((CONVS_PER_STAGE + 1) * features[s] * math.prod(sizes[s]) for s in range(len(sizes) - 1))  # decoder
    return total + num_classes * math.prod(sizes[0])


def _config_plan(spacing, median_shape, n_voxels_dataset: float, num_classes: int, gpu_memory_gb: float) -> dict:
    """``ExperimentPlanner.get_plans_for_configuration`` for one configuration (spacing and median shape)."""
    nd = len(spacing)
    inv = [1.0 / s for s in spacing]
    scale = (INITIAL_PATCH_VOXELS[nd] / math.prod(inv)) ** (1.0 / nd)
    initial = [min(round(i * scale), m) for i, m in zip(inv, median_shape)]
    topo = pool_and_conv_props(spacing, initial)
    reference = REFERENCE_VRAM[nd] * (gpu_memory_gb / REFERENCE_GB)

    def estimate(t):
        return vram_estimate(t["patch_size"], t["strides"], _features(len(t["strides"]), nd), num_classes)

    est = estimate(topo)
    while est > reference:
        patch = list(topo["patch_size"])
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = max(range(nd), key=lambda a: (ratios[a], a))  # np.argsort(...)[-1]: the last of the largest
        tmp = list(patch)
        tmp[axis] -= topo["divisor"][axis]
        patch[axis] -= pool_and_conv_props(spacing, tmp)["divisor"][axis]
        topo = pool_and_conv_props(spacing, patch)
        est = estimate(topo)
    batch = round(reference / est * REFERENCE_BATCH[nd])
    cap = round(n_voxels_dataset * MAX_DATASET_COVERED / math.prod(topo["patch_size"]))
    return {"patch_size": tuple(int(p) for p in topo["patch_size"]), "spacing": tuple(spacing),
            "median_shape": tuple(median_shape), "features": _features(len(topo["strides"]), nd),
            "strides": topo["strides"], "kernel_sizes": topo["kernel_sizes"],
            "batch_size": max(min(batch, cap), MIN_BATCH), "vram_estimate": est}


def _percentile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple:
    """nnU-Net v2's ``determine_fullres_target_spacing`` from the cases' spacings and shapes (after cropping)."""
    nd = len(spacings[0])
    target = [_percentile([s[a] for s in spacings], 50) for a in range(nd)]
    target_size = [_percentile([s[a] for s in shapes], 50) for a in range(nd)]
    worst = max(range(nd), key=lambda a: (target[a], -a))  # np.argmax: the first of the largest
    others = [a for a in range(nd) if a != worst]
    other_spacing = max(target[a] for a in others)
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * other_spacing
    aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(target_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        t = _percentile([s[worst] for s in spacings], 10)
        if t < other_spacing:
            t = max(other_spacing, t) + 1e-5
        target[worst] = t
    return tuple(target)


def _median(values):
    return _percentile(values, 50)


def plan_from_fingerprint(fingerprint: dict, num_classes: int = 2, gpu_memory_gb: float = 8.0,
                          configurations: Sequence[str] = ("3d_fullres", "2d")) -> dict:
    """nnU-Net v2's ``ExperimentPlanner.plan_experiment`` (``3d_fullres`` and ``2d``) for a dataset fingerprint.

    ``fingerprint``: nnU-Net's ``dataset_fingerprint.json`` fields ``{"spacings": [per case (z, y, x)],
    "shapes_after_crop": [per case shape]}``, or the summary ``{"median_shape": (...), "spacing": (...),
    "num_cases": n}`` (one representative case repeated ``num_cases`` times, default 1).  ``num_classes`` counts the
    background (nnU-Net's ``len(labels)``).

    Returns ``{"transpose_forward", "target_spacing", "3d_fullres": {...}, "2d": {...}}``; each configuration has
    ``patch_size``, ``spacing``, ``median_shape``, ``features``, ``strides``, ``kernel_sizes``, ``batch_size`` and
    ``vram_estimate``, in the transposed axis order (the coarsest axis first).  A dataset whose median shape has one
    slice along the first axis (2D data) gets no ``3d_fullres``.
    """
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    if "spacings" in fingerprint:
        spacings = [tuple(float(v) for v in s) for s in fingerprint["spacings"]]
        shapes = [tuple(int(v) for v in s) for s in fingerprint.get("shapes_after_crop", ())]
    elif "spacing" in fingerprint and "median_shape" in fingerprint:
        n = check_int(fingerprint.get("num_cases", 1), "fingerprint['num_cases']", 1)
        spacings = [tuple(float(v) for v in fingerprint["spacing"])] * n
        shapes = [tuple(int(v) for v in fingerprint["median_shape"])] * n
    else:
        raise ValueError("fingerprint must hold 'spacings' and 'shapes_after_crop' (nnU-Net's fingerprint) or "
                         f"'median_shape' and 'spacing', got keys {sorted(fingerprint)}")
    if not spacings or len(shapes) != len(spacings) or any(len(s) != 3 or len(z) != 3 for s, z in
                                                           zip(spacings, shapes)):
        raise ValueError("fingerprint: one 3-entry spacing and one 3-entry shape per case are needed (nnU-Net plans "
                         "3D volumes; 2D images have spacing 999 and one slice on the first axis)")
    if any(not math.isfinite(v) or v <= 0 for s in spacings for v in s):
        raise ValueError("fingerprint: every spacing must be a positive finite number")
    if any(v < 1 for z in shapes for v in z):
        raise ValueError("fingerprint: every shape entry must be >= 1")
    check_int(num_classes, "num_classes", 1)
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb!r}")
    unknown = set(configurations) - {"3d_fullres", "2d"}
    if unknown:
        raise ValueError(f"configurations must be among '3d_fullres', '2d', got {sorted(unknown)}")

    target = target_spacing(spacings, shapes)
    worst = max(range(3), key=lambda a: (target[a], -a))
    order = [worst] + [a for a in range(3) if a != worst]
    new_shapes = [[int(round(s / t * z)) for s, t, z in zip(sp, target, sh)] for sp, sh in zip(spacings, shapes)]
    median = [_median([s[a] for s in new_shapes]) for a in range(3)]
    spacing_t, median_t = [target[a] for a in order], [median[a] for a in order]
    n_voxels = float(math.prod(median_t)) * len(spacings)
    plans = {"transpose_forward": tuple(order), "target_spacing": tuple(spacing_t)}
    if "3d_fullres" in configurations and median_t[0] != 1:
        plans["3d_fullres"] = _config_plan(spacing_t, median_t, n_voxels, num_classes, gpu_memory_gb)
    if "2d" in configurations:
        plans["2d"] = _config_plan(spacing_t[1:], median_t[1:], n_voxels, num_classes, gpu_memory_gb)
    return plans
