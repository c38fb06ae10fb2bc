"""fastmed.models.plan_nnunet against nnU-Net v2's planner, transcribed below from nnunetv2
(experiment_planning/experiment_planners/network_topology.py, default_experiment_planner.py and
dynamic_network_architectures' compute_conv_feature_map_size) as the oracle, for several fingerprints."""
from copy import deepcopy

import numpy as np
import pytest
import torch

from fastmed.models import UNet, plan_nnunet
from fastmed.models.nnunet_plan import pool_and_conv_props


# ------------------------------------------------------------------------------ nnU-Net v2, transcribed (oracle)
def get_shape_must_be_divisible_by(net_numpool_per_axis):
    return 2 ** np.array(net_numpool_per_axis)


def pad_shape(shape, must_be_divisible_by):
    new_shp = [shape[i] + must_be_divisible_by[i] - shape[i] % must_be_divisible_by[i] for i in range(len(shape))]
    for i in range(len(shape)):
        if shape[i] % must_be_divisible_by[i] == 0:
            new_shp[i] -= must_be_divisible_by[i]
    return np.array(new_shp).astype(int)


def get_pool_and_conv_props(spacing, patch_size, min_feature_map_size, max_numpool):
    dim = len(spacing)
    current_spacing = deepcopy(list(spacing))
    current_size = deepcopy(list(patch_size))
    pool_op_kernel_sizes = [[1] * len(spacing)]
    conv_kernel_sizes = []
    num_pool_per_axis = [0] * dim
    kernel_size = [1] * dim
    while True:
        valid_axes_for_pool = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if len(valid_axes_for_pool) < 1:
            break
        spacings_of_axes = [current_spacing[i] for i in valid_axes_for_pool]
        min_spacing_of_valid = min(spacings_of_axes)
        valid_axes_for_pool = [i for i in valid_axes_for_pool if current_spacing[i] / min_spacing_of_valid < 2]
        valid_axes_for_pool = [i for i in valid_axes_for_pool if num_pool_per_axis[i] < max_numpool]
        if len(valid_axes_for_pool) == 1:
            if current_size[valid_axes_for_pool[0]] >= 3 * min_feature_map_size:
                pass
            else:
                break
        if len(valid_axes_for_pool) < 1:
            break
        for d in range(dim):
            if kernel_size[d] == 3:
                continue
            else:
                if current_spacing[d] / min(current_spacing) < 2:
                    kernel_size[d] = 3
        other_axes = [i for i in range(dim) if i not in valid_axes_for_pool]
        pool_kernel_sizes = [0] * dim
        for v in valid_axes_for_pool:
            pool_kernel_sizes[v] = 2
            num_pool_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = np.ceil(current_size[v] / 2)
        for nv in other_axes:
            pool_kernel_sizes[nv] = 1
        pool_op_kernel_sizes.append(pool_kernel_sizes)
        conv_kernel_sizes.append(deepcopy(kernel_size))
    must_be_divisible_by = get_shape_must_be_divisible_by(num_pool_per_axis)
    patch_size = pad_shape(patch_size, must_be_divisible_by)
    conv_kernel_sizes.append([3] * dim)
    return num_pool_per_axis, pool_op_kernel_sizes, conv_kernel_sizes, tuple(patch_size), must_be_divisible_by


def compute_conv_feature_map_size(input_size, strides, features, num_classes, n_conv=2):
    """PlainConvUNet(deep_supervision=False).compute_conv_feature_map_size: encoder + decoder."""
    output = np.int64(0)
    size = list(input_size)
    for s in range(len(strides)):  # encoder: StackedConvBlocks (first conv strided)
        size_after_stride = [i // j for i, j in zip(size, strides[s])]
        output += n_conv * np.prod([features[s], *size_after_stride], dtype=np.int64)
        size = size_after_stride
    skip_sizes = []
    size = list(input_size)
    for s in range(len(strides) - 1):
        skip_sizes.append([i // j for i, j in zip(size, strides[s])])
        size = skip_sizes[-1]
    n_dec = len(strides) - 1
    for s in range(n_dec):  # decoder
        output += n_conv * np.prod([features[-(s + 2)], *skip_sizes[-(s + 1)]], dtype=np.int64)
        output += np.prod([features[-(s + 2)], *skip_sizes[-(s + 1)]], dtype=np.int64)
        if s == n_dec - 1:
            output += np.prod([num_classes, *skip_sizes[-(s + 1)]], dtype=np.int64)
    return output


def get_plans_for_configuration(spacing, median_shape, approximate_n_voxels_dataset, num_classes, vram_gb=8):
    max_num_features = 512 if len(spacing) == 2 else 320

    def _features_per_stage(num_stages):
        return tuple([min(max_num_features, 32 * 2 ** i) for i in range(num_stages)])

    tmp = 1 / np.array(spacing)
    if len(spacing) == 3:
        initial_patch_size = [round(i) for i in tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)]
    else:
        initial_patch_size = [round(i) for i in tmp * (2048 ** 2 / np.prod(tmp)) ** (1 / 2)]
    initial_patch_size = np.array([min(i, j) for i, j in zip(initial_patch_size, median_shape[:len(spacing)])])
    _, pool_op_kernel_sizes, conv_kernel_sizes, patch_size, shape_must_be_divisible_by = \
        get_pool_and_conv_props(spacing, initial_patch_size, 4, 999999)
    estimate = compute_conv_feature_map_size(patch_size, pool_op_kernel_sizes,
                                             _features_per_stage(len(pool_op_kernel_sizes)), num_classes)
    reference = (85000000 if len(spacing) == 2 else 560000000) * (vram_gb / 8)
    while estimate > reference:
        axis_to_be_reduced = np.argsort([i / j for i, j in zip(patch_size, median_shape[:len(spacing)])])[-1]
        patch_size = list(patch_size)
        tmp = deepcopy(patch_size)
        tmp[axis_to_be_reduced] -= shape_must_be_divisible_by[axis_to_be_reduced]
        _, _, _, _, shape_must_be_divisible_by = get_pool_and_conv_props(spacing, tmp, 4, 999999)
        patch_size[axis_to_be_reduced] -= shape_must_be_divisible_by[axis_to_be_reduced]
        _, pool_op_kernel_sizes, conv_kernel_sizes, patch_size, shape_must_be_divisible_by = \
            get_pool_and_conv_props(spacing, patch_size, 4, 999999)
        estimate = compute_conv_feature_map_size(patch_size, pool_op_kernel_sizes,
                                                 _features_per_stage(len(pool_op_kernel_sizes)), num_classes)
    ref_bs = 12 if len(spacing) == 2 else 2
    batch_size = round((reference / estimate) * ref_bs)
    bs_corresponding_to_5_percent = round(approximate_n_voxels_dataset * 0.05 / np.prod(patch_size, dtype=np.float64))
    batch_size = max(min(batch_size, bs_corresponding_to_5_percent), 2)
    return {"patch_size": tuple(int(p) for p in patch_size), "batch_size": int(batch_size),
            "features": _features_per_stage(len(pool_op_kernel_sizes)),
            "strides": tuple(tuple(p) for p in pool_op_kernel_sizes),
            "kernel_sizes": tuple(tuple(k) for k in conv_kernel_sizes)}


def determine_fullres_target_spacing(spacings, sizes):
    spacings = np.vstack(spacings)
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(np.vstack(sizes), 50, 0)
    worst_spacing_axis = np.argmax(target)
    other_axes = [i for i in range(len(target)) if i != worst_spacing_axis]
    other_spacings = [target[i] for i in other_axes]
    other_sizes = [target_size[i] for i in other_axes]
    has_aniso_spacing = target[worst_spacing_axis] > (3 * max(other_spacings))
    has_aniso_voxels = target_size[worst_spacing_axis] * 3 < min(other_sizes)
    if has_aniso_spacing and has_aniso_voxels:
        spacings_of_that_axis = spacings[:, worst_spacing_axis]
        target_spacing_of_that_axis = np.percentile(spacings_of_that_axis, 10)
        if target_spacing_of_that_axis < max(other_spacings):
            target_spacing_of_that_axis = max(max(other_spacings), target_spacing_of_that_axis) + 1e-5
        target[worst_spacing_axis] = target_spacing_of_that_axis
    return target


def plan_experiment(spacings, shapes, num_classes, vram_gb=8):
    fullres_spacing = determine_fullres_target_spacing(spacings, shapes)
    max_spacing_axis = np.argmax(fullres_spacing)
    transpose_forward = [max_spacing_axis] + [i for i in range(3) if i != max_spacing_axis]
    new_shapes = [np.array([int(round(i / j * k)) for i, j, k in zip(sp, fullres_spacing, sh)])
                  for sp, sh in zip(spacings, shapes)]
    new_median_shape = np.median(new_shapes, 0)[transpose_forward]
    spacing_t = fullres_spacing[transpose_forward]
    n_voxels = float(np.prod(new_median_shape, dtype=np.float64) * len(spacings))
    plans = {"target_spacing": tuple(spacing_t)}
    if new_median_shape[0] != 1:
        plans["3d_fullres"] = get_plans_for_configuration(spacing_t, new_median_shape, n_voxels, num_classes, vram_gb)
    plans["2d"] = get_plans_for_configuration(spacing_t[1:], new_median_shape[1:], n_voxels, num_classes, vram_gb)
    return plans


# --------------------------------------------------------------------------------------------------- the tests
def _cases(rng, n, spacing, spread, shape, shape_spread):
    spacings = [tuple(float(s * (1 + spread * rng.uniform(-1, 1))) for s in spacing) for _ in range(n)]
    shapes = [tuple(max(1, int(z * (1 + shape_spread * rng.uniform(-1, 1)))) if z > 1 else 1 for z in shape)
              for _ in range(n)]
    return spacings, shapes


FINGERPRINTS = {  # name: (spacing, spread, shape, shape spread, cases, classes, GB)
    "hippocampus-mri": ((1.0, 1.0, 1.0), 0.0, (36, 50, 35), 0.2, 40, 3, 8),
    "isotropic-ct": ((0.8, 0.8, 0.8), 0.15, (300, 400, 400), 0.3, 30, 2, 8),
    "liver-ct-24gb": ((1.0, 0.76, 0.76), 0.3, (430, 512, 512), 0.2, 20, 3, 24),
    "anisotropic-prostate-mri": ((3.6, 0.62, 0.62), 0.1, (20, 320, 320), 0.1, 32, 3, 8),
    "anisotropic-thick-slices": ((8.0, 0.9, 0.9), 0.5, (12, 256, 224), 0.2, 25, 4, 8),
    "anisotropic-axis-last": ((0.7, 0.7, 5.0), 0.1, (400, 400, 30), 0.1, 10, 2, 8),
    "2d-images": ((999.0, 0.5, 0.5), 0.0, (1, 640, 480), 0.3, 50, 2, 8),
    "small-gpu": ((1.5, 1.5, 1.5), 0.1, (128, 160, 144), 0.2, 15, 5, 4),
}


@pytest.mark.parametrize("name", list(FINGERPRINTS))
def test_plans_equal_nnunet_v2(name):
    spacing, spread, shape, shape_spread, n, classes, gb = FINGERPRINTS[name]
    spacings, shapes = _cases(np.random.default_rng(len(name)), n, spacing, spread, shape, shape_spread)
    want = plan_experiment(spacings, shapes, classes, gb)
    got = plan_nnunet(fingerprint={"spacings": spacings, "shapes_after_crop": shapes}, num_classes=classes,
                      gpu_memory_gb=gb)
    np.testing.assert_allclose(got["target_spacing"], want["target_spacing"], rtol=1e-12)
    assert ("3d_fullres" in got) == ("3d_fullres" in want)
    for config in ("3d_fullres", "2d"):
        if config not in want:
            continue
        for key, value in want[config].items():
            assert got[config][key] == value, (config, key)
        assert got[config]["batch_size"] >= 2


def test_known_plans():
    """nnU-Net v2's plans for Dataset004_Hippocampus (260 cases, median (36, 50, 35) at 1 mm, 3 labels):
    3d_fullres patch (40, 56, 40), batch 9; 2d patch (56, 40), batch 366; and the issue's anisotropic case."""
    plans = plan_nnunet(fingerprint={"median_shape": (36, 50, 35), "spacing": (1, 1, 1), "num_cases": 260},
                        num_classes=3)
    assert plans["3d_fullres"]["patch_size"] == (40, 56, 40) and plans["3d_fullres"]["batch_size"] == 9
    assert plans["2d"]["patch_size"] == (56, 40) and plans["2d"]["batch_size"] == 366
    topo = plan_nnunet((20, 192, 160), (3.0, 0.78, 0.78))
    assert topo["kernel_sizes"][0] == (1, 3, 3) and topo["kernel_sizes"][-1] == (3, 3, 3)
    assert topo["strides"][1] == (1, 2, 2) and topo["strides"][2] == (2, 2, 2)
    _, strides, kernels, _, _ = get_pool_and_conv_props((3.0, 0.78, 0.78), (20, 192, 160), 4, 999999)
    assert topo["strides"] == tuple(map(tuple, strides)) and topo["kernel_sizes"] == tuple(map(tuple, kernels))


@pytest.mark.parametrize("spacing,patch", [((1.0, 1.0, 1.0), (96, 160, 160)), ((4.0, 1.0, 1.0), (24, 192, 192)),
                                           ((2.5, 0.7, 1.9), (40, 224, 64)), ((1.0, 1.0), (512, 448)),
                                           ((1.0, 3.0), (384, 48))])
def test_topology_equals_get_pool_and_conv_props(spacing, patch):
    _, strides, kernels, padded, divisor = get_pool_and_conv_props(spacing, patch, 4, 999999)
    got = pool_and_conv_props(spacing, patch)
    assert got["strides"] == tuple(map(tuple, strides)) and got["kernel_sizes"] == tuple(map(tuple, kernels))
    assert got["patch_size"] == tuple(int(p) for p in padded) and got["divisor"] == tuple(int(d) for d in divisor)


def test_unet_from_a_plan_has_the_plan_topology():
    plans = plan_nnunet(fingerprint={"median_shape": (20, 192, 160), "spacing": (3.0, 0.78, 0.78), "num_cases": 32},
                        num_classes=3)
    plan = plans["3d_fullres"]
    with torch.device("meta"):
        net = UNet.nnunet(plan["patch_size"], plan["spacing"], in_channels=1, out_channels=3)
    sd = net.state_dict()
    features, kernels, strides = plan["features"], plan["kernel_sizes"], plan["strides"]
    cin = 1
    for s, (c, k, st) in enumerate(zip(features, kernels, strides)):  # PlainConvUNet's encoder keys and shapes
        assert sd[f"encoder.stages.{s}.0.convs.0.conv.weight"].shape == (c, cin, *k)
        assert net.encoder.stages[s][0].convs[0].conv.stride == st
        cin = c
    n = len(features)
    for s in range(n - 1):  # decoder: transpconvs[s] from stage n-1-s to n-2-s
        assert sd[f"decoder.transpconvs.{s}.weight"].shape == (features[-(s + 1)], features[-(s + 2)],
                                                                 *strides[-(s + 1)])
        assert sd[f"decoder.stages.{s}.convs.0.conv.weight"].shape == (features[-(s + 2)], 2 * features[-(s + 2)],
                                                                        *kernels[-(s + 2)])


def test_plan_errors():
    with pytest.raises(ValueError, match="either patch_size"):
        plan_nnunet((64, 64, 64), fingerprint={"median_shape": (64, 64, 64), "spacing": (1, 1, 1)})
    with pytest.raises(ValueError, match="patch_size .* or fingerprint"):
        plan_nnunet()
    with pytest.raises(ValueError, match="'spacings' and 'shapes_after_crop'"):
        plan_nnunet(fingerprint={"shape": (1, 2, 3)})
    with pytest.raises(ValueError, match="positive finite"):
        plan_nnunet(fingerprint={"median_shape": (64, 64, 64), "spacing": (1, 0, 1)})
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        plan_nnunet(fingerprint={"median_shape": (64, 64, 64), "spacing": (1, 1, 1)}, gpu_memory_gb=0)
    with pytest.raises(TypeError, match="fingerprint must be a dict"):
        plan_nnunet(fingerprint=[(64, 64, 64)])
