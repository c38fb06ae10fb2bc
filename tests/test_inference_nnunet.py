"""``fastmed.inference.nnunet_sliding_window_inference`` against nnU-Net v2's predictor, transcribed below.

nnunetv2 is not installed here (it pulls dynamic-network-architectures, timm and a CUDA torch), so the parts of
``nnunetv2/inference`` that decide the result are transcribed from its source (``sliding_window_prediction.py``:
``compute_gaussian``, ``compute_steps_for_sliding_window``; ``predict_from_raw_data.py``: ``nnUNetPredictor.
_internal_get_sliding_window_slicers``, ``_internal_maybe_mirror_and_predict``,
``_internal_predict_sliding_window_return_logits``, ``predict_sliding_window_return_logits``; acvl_utils'
``pad_nd_image``), on the CPU path (no autocast, results on the CPU), without the producer thread and tqdm.
nnU-Net keeps the logits and the summed weights in float16, so results agree within float16 rounding.
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmed.inference import mirrored, nnunet_sliding_window_inference
from fastmed.reference import sliding_window as ref

scipy_ndimage = pytest.importorskip("scipy.ndimage")
pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny convolutions


# ------------------------------------------------------------------------------------------------------------------
# nnU-Net v2, transcribed
# ------------------------------------------------------------------------------------------------------------------

def nnunet_compute_gaussian(tile_size, sigma_scale=1.0 / 8, value_scaling_factor=1, dtype=torch.float16):
    tmp = np.zeros(tile_size)
    center_coords = [i // 2 for i in tile_size]
    sigmas = [i * sigma_scale for i in tile_size]
    tmp[tuple(center_coords)] = 1
    gaussian_importance_map = scipy_ndimage.gaussian_filter(tmp, sigmas, 0, mode="constant", cval=0)
    gaussian_importance_map = torch.from_numpy(gaussian_importance_map)
    gaussian_importance_map = gaussian_importance_map / torch.max(gaussian_importance_map) * value_scaling_factor
    gaussian_importance_map = gaussian_importance_map.type(dtype)
    gaussian_importance_map[gaussian_importance_map == 0] = torch.min(
        gaussian_importance_map[gaussian_importance_map != 0])
    return gaussian_importance_map


def nnunet_compute_steps_for_sliding_window(image_size, tile_size, tile_step_size):
    target_step_sizes_in_voxels = [i * tile_step_size for i in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target_step_sizes_in_voxels, tile_size)]
    steps = []
    for dim in range(len(tile_size)):
        max_step_value = image_size[dim] - tile_size[dim]
        if num_steps[dim] > 1:
            actual_step_size = max_step_value / (num_steps[dim] - 1)
        else:
            actual_step_size = 99999999999
        steps_here = [int(np.round(actual_step_size * i)) for i in range(num_steps[dim])]
        steps.append(steps_here)
    return steps


def nnunet_pad_nd_image(image, new_shape):
    """acvl_utils ``pad_nd_image(image, new_shape, 'constant', {'value': 0}, return_slicer=True)``."""
    old_shape = np.array(image.shape[-len(new_shape):])
    new_shape = np.array([max(new_shape[i], old_shape[i]) for i in range(len(new_shape))])
    difference = new_shape - old_shape
    pad_below = difference // 2
    pad_above = difference // 2 + difference % 2
    pad = []
    for lo, hi in zip(reversed(pad_below.tolist()), reversed(pad_above.tolist())):
        pad += [lo, hi]
    res = F.pad(image, pad, mode="constant", value=0)
    slicer = [slice(None)] * (image.dim() - len(new_shape)) + [slice(int(lo), int(lo + s))
                                                              for lo, s in zip(pad_below, old_shape)]
    return res, tuple(slicer)


def nnunet_slicers(image_size, patch_size, tile_step_size):
    slicers = []
    if len(patch_size) < len(image_size):
        steps = nnunet_compute_steps_for_sliding_window(image_size[1:], patch_size, tile_step_size)
        for d in range(image_size[0]):
            for sx in steps[0]:
                for sy in steps[1]:
                    slicers.append(tuple([slice(None), d, *[slice(si, si + ti) for si, ti in
                                                            zip((sx, sy), patch_size)]]))
    else:
        steps = nnunet_compute_steps_for_sliding_window(image_size, patch_size, tile_step_size)
        for sx in steps[0]:
            for sy in steps[1]:
                for sz in (steps[2] if len(steps) > 2 else [None]):
                    starts = (sx, sy) if sz is None else (sx, sy, sz)
                    slicers.append(tuple([slice(None), *[slice(si, si + ti) for si, ti in zip(starts, patch_size)]]))
    return slicers


def nnunet_maybe_mirror_and_predict(network, x, mirror_axes):
    prediction = network(x)
    if mirror_axes is not None:
        assert max(mirror_axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
        mirror_axes = [m + 2 for m in mirror_axes]
        axes_combinations = [c for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)]
        for axes in axes_combinations:
            prediction += torch.flip(network(torch.flip(x, axes)), axes)
        prediction /= (len(axes_combinations) + 1)
    return prediction


@torch.inference_mode()
def nnunet_predict_sliding_window_return_logits(network, input_image, patch_size, tile_step_size, use_gaussian,
                                                mirror_axes, num_heads):
    data, slicer_revert_padding = nnunet_pad_nd_image(input_image, patch_size)
    slicers = nnunet_slicers(data.shape[1:], patch_size, tile_step_size)
    predicted_logits = torch.zeros((num_heads, *data.shape[1:]), dtype=torch.half)
    n_predictions = torch.zeros(data.shape[1:], dtype=torch.half)
    if use_gaussian:
        gaussian = nnunet_compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10)
    else:
        gaussian = 1
    for sl in slicers:
        workon = torch.clone(data[sl][None], memory_format=torch.contiguous_format)
        prediction = nnunet_maybe_mirror_and_predict(network, workon, mirror_axes)[0]
        if use_gaussian:
            prediction *= gaussian
        predicted_logits[sl] += prediction
        n_predictions[sl[1:]] += gaussian
    torch.div(predicted_logits, n_predictions, out=predicted_logits)
    return predicted_logits[(slice(None), *slicer_revert_padding[1:])]


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------

def _network(nd, cin, cout, seed=0):
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d, torch.nn.Conv3d)[nd - 2]
    return torch.nn.Sequential(conv(cin, 4, 3, padding=1), torch.nn.LeakyReLU(0.01), conv(4, cout, 3, padding=1,
                                                                                           bias=True)).eval()


@pytest.mark.parametrize("image,patch,step", [
    ((110,), (64,), 0.5), ((97,), (32,), 0.5), ((40,), (40,), 0.5), ((41,), (16,), 0.33), ((50,), (20,), 1.0),
    ((300,), (128,), 0.5), ((33,), (7,), 0.25),
])
def test_tiling_equals_nnunet(image, patch, step):
    """nnU-Net's comment: image 110, patch 64, step 0.5 -> starts 0, 23, 46."""
    want = nnunet_compute_steps_for_sliding_window(image, patch, step)
    got = ref.nnunet_grid(image, patch, step).starts
    assert [list(s) for s in got] == want


def test_tiling_example_from_nnunet_comment():
    assert list(ref.nnunet_grid((110,), (64,), 0.5).starts[0]) == [0, 23, 46]


@pytest.mark.parametrize("tile", [(128, 128, 128), (96, 160, 64), (20, 33, 7), (1, 9), (64, 5)])
def test_gaussian_equals_nnunet(tile):
    """Sigma = size / 8, scipy's truncation at 4 sigma, scaled to 10, float16, zeros clipped to the smallest."""
    want = nnunet_compute_gaussian(tile, 1.0 / 8, 10)
    got = ref.nnunet_gaussian(tile, 1.0 / 8, 10.0, torch.float16)
    assert got.dtype == torch.float16 and got.shape == want.shape
    # separable product vs scipy's filtered impulse: equal in float64 to rounding, so at most one float16 ulp
    diff = (got.float() - want.float()).abs()
    ulp = torch.finfo(torch.float16).eps * want.float().abs()
    assert bool((diff <= ulp).all())
    assert (got == want).float().mean().item() > 0.99
    assert bool((got > 0).all())


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_mirroring_equals_nnunet(axes):
    net = _network(3, 1, 3)
    x = torch.randn(2, 1, 6, 7, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = nnunet_maybe_mirror_and_predict(net, x, list(axes))
        got = mirrored(net, axes)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


CASES = [  # input (C, *spatial), patch, step, gaussian, mirror axes
    ((1, 13, 15, 11), (8, 10, 6), 0.5, True, (0, 1, 2)),
    ((2, 13, 9, 11), (8, 8, 8), 0.5, True, None),
    ((1, 5, 12, 7), (8, 6, 8), 0.5, True, (0,)),              # smaller than the patch: padded, cropped back
    ((1, 12, 11, 10), (8, 8, 6), 0.33, False, (1, 2)),
    ((1, 16, 16, 16), (8, 8, 8), 1.0, True, None),
    ((1, 31, 27), (12, 10), 0.5, True, (0, 1)),               # 2D
    ((1, 4, 21, 13), (8, 8), 0.5, True, (1,)),                # a 2D network on a 3D volume, slice by slice
]


@pytest.mark.parametrize("shape,patch,step,gaussian,axes", CASES)
def test_prediction_equals_nnunet(shape, patch, step, gaussian, axes):
    nd = len(patch)
    net = _network(nd, shape[0], 3, seed=len(shape) + int(10 * step))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    want = nnunet_predict_sliding_window_return_logits(net, x, patch, step, gaussian, None if axes is None
                                                       else list(axes), 3)
    with torch.no_grad():
        got = nnunet_sliding_window_inference(x[None], patch, net, step, gaussian, axes)[0]
        labels = nnunet_sliding_window_inference(x[None], patch, net, step, gaussian, axes, output="labels")[0]
    assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape
    # both round every partial sum to float16; nnU-Net also sums the weights in float16 (fastmed: float32)
    torch.testing.assert_close(got.float(), want.float(), rtol=4e-3, atol=4e-3 * want.float().abs().max().item())
    agree = (labels[0].long() == want.float().argmax(0)).float().mean().item()
    assert agree > 0.99


def test_prediction_float32_buffer_equals_float32_transcription():
    """With float32 buffers the only rounding left is float32's: compare tightly (nnU-Net's algorithm with
    float32 arrays and a float32 Gaussian)."""
    net = _network(3, 1, 2)
    x = torch.randn(1, 15, 13, 11, generator=torch.Generator().manual_seed(3))
    patch, axes = (8, 6, 6), [0, 2]
    data, revert = nnunet_pad_nd_image(x, patch)
    gaussian = nnunet_compute_gaussian(patch, 1.0 / 8, 10, dtype=torch.float32)
    logits = torch.zeros((2, *data.shape[1:]))
    count = torch.zeros(data.shape[1:])
    with torch.no_grad():
        for sl in nnunet_slicers(data.shape[1:], patch, 0.5):
            logits[sl] += nnunet_maybe_mirror_and_predict(net, data[sl][None], axes)[0] * gaussian
            count[sl[1:]] += gaussian
        want = (logits / count)[(slice(None), *revert[1:])]
        got = nnunet_sliding_window_inference(x[None], patch, net, 0.5, True, axes, buffer_dtype=torch.float32)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_labels_with_repeated_window_starts(blend_mode):
    """A small step_size repeats window starts (nnU-Net rounds them): the tiles of labels mode still see every
    window once, and the labels are the argmax of the values."""
    grid = ref.nnunet_grid((10, 9, 8), (8, 6, 6), 0.1)
    assert any(len(set(s)) < len(s) for s in grid.starts)
    net = _network(3, 1, 3)
    x = torch.randn(1, 1, 10, 9, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        values = nnunet_sliding_window_inference(x, (8, 6, 6), net, 0.1, True, buffer_dtype=torch.float32)
        labels = nnunet_sliding_window_inference(x, (8, 6, 6), net, 0.1, True, buffer_dtype=torch.float32,
                                                 output="labels")
    assert torch.equal(labels.long(), values.argmax(1, keepdim=True))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(patch_size=(8,)), ValueError, ["patch_size", "one int per spatial axis"]),
    (dict(patch_size=(8, 0, 8)), ValueError, ["patch_size"]),
    (dict(step_size=0.0), ValueError, ["step_size", "larger than 0"]),
    (dict(step_size=1.5), ValueError, ["step_size"]),
    (dict(mirror_axes=(0, 3)), ValueError, ["mirror_axes"]),
    (dict(mirror_axes="01"), ValueError, ["mirror_axes"]),
    (dict(buffer_dtype=None), TypeError, ["buffer_dtype"]),
    (dict(output="probabilities"), ValueError, ["output"]),
    (dict(sigma_scale=0.0), ValueError, ["sigma_scale"]),
    (dict(predictor="net"), TypeError, ["predictor", "callable"]),
])
def test_errors(kwargs, exc, words):
    args = dict(inputs=torch.zeros(1, 1, 9, 9, 9), patch_size=(4, 4, 4), predictor=lambda w: torch.cat([w, w], 1))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        nnunet_sliding_window_inference(args.pop("inputs"), args.pop("patch_size"), args.pop("predictor"), **args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
