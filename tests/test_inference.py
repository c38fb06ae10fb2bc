"""``fastmed.inference.sliding_window_inference`` against MONAI's ``sliding_window_inference`` (installed here).

Same arguments in the same calls; float64 inputs make both sides accumulate in float64, so results agree to
rounding (the only difference is the order of the normalization: MONAI divides by its count map, fastmed by the
summed weights of the grid).  float32 runs compare at float32 tolerance.  ``output="labels"`` is compared with the
argmax of MONAI's result (float64, random weights: no ties).
"""
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from fastmed.inference import sliding_window_inference
from fastmed.reference.sliding_window import monai_grid

monai_inferers = pytest.importorskip("monai.inferers")
monai_swi = monai_inferers.sliding_window_inference
pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one thread is faster here

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)


class _Net:
    """A cheap network whose prediction depends on where a voxel sits in the window (so overlapping windows
    disagree and the blending weights matter): a 1x1 channel mix plus a fixed random map of the window's shape,
    scaled by the input.  float64, like the inputs of most tests."""

    def __init__(self, cin: int, cout: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(cout, cin, generator=self.g, dtype=torch.float64)
        self.maps: dict = {}

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        shape = (self.mix.shape[0],) + tuple(w.shape[2:])
        if shape not in self.maps:
            self.maps[shape] = torch.randn(shape, generator=self.g, dtype=torch.float64)
        bias = self.maps[shape].to(w.dtype)
        return torch.einsum("kc...,oc->ko...", w, self.mix.to(w.dtype)) + bias * (1 + w.mean(1, keepdim=True))


def _net(nd: int, cin: int, cout: int, seed: int = 0) -> _Net:
    del nd  # the same network for every number of spatial axes
    return _Net(cin, cout, seed)


def _x(shape, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _both(x, *args, **kwargs):
    with torch.no_grad():
        return monai_swi(x, *args, **kwargs), sliding_window_inference(x, *args, **kwargs)


def _close(got, want, tol=F64):
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want)
        for k in want:
            _close(got[k], want[k], tol)
        return
    if isinstance(want, (tuple, list)):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w, tol)
        return
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    torch.testing.assert_close(got, want, **tol)


# ------------------------------------------------------------------------------------------------------------------
# Equal to MONAI
# ------------------------------------------------------------------------------------------------------------------

CASES = [  # (input shape, roi_size)
    ((2, 2, 13, 17, 11), (8, 7, 5)),       # 3D, odd sizes, batch 2
    ((1, 1, 9, 10, 12), (4, 10, 5)),       # roi equal to the image on one axis
    ((1, 2, 5, 6, 7), (8, 7, 9)),          # roi larger than the image on every axis (padded, cropped)
    ((1, 2, 12, 5, 9), (6, 8, 4)),         # larger on one axis only
    ((2, 1, 19, 23), (8, 6)),              # 2D
    ((1, 3, 7, 30), (10, 7)),              # 2D, roi larger on the first axis
    ((1, 1, 29), (8,)),                    # 1D
]


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("shape,roi", CASES)
def test_equals_monai(shape, roi, overlap, mode):
    nd = len(roi)
    net = _net(nd, shape[1], 3)
    want, got = _both(_x(shape), roi, 3, net, overlap, mode)
    _close(got, want)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_equals_monai_float32(mode):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()  # a real network, float32 both sides
    want, got = _both(_x((1, 1, 11, 9, 14), torch.float32), (6, 5, 8), 2, net, 0.5, mode)
    _close(got, want, F32)


def test_defaults_match_monai():
    """No optional argument: MONAI's defaults (overlap 0.25, constant blending)."""
    net = _net(2, 1, 2)
    want, got = _both(_x((1, 1, 21, 18)), (8, 8), 1, net)
    _close(got, want)


@pytest.mark.parametrize("sw_batch_size", [1, 4, 100])
def test_sw_batch_size_across_samples(sw_batch_size):
    """Window batches that span two samples of the input batch."""
    net = _net(3, 1, 2)
    want, got = _both(_x((3, 1, 9, 8, 7)), (5, 4, 6), sw_batch_size, net, 0.5, "gaussian")
    _close(got, want)


def test_per_axis_overlap_sigma_and_roi_fallback():
    """Sequences of overlaps and sigmas; roi entries None / <= 0 take the image's size (MONAI's fall_back_tuple)."""
    net = _net(3, 1, 2)
    want, got = _both(_x((1, 1, 10, 11, 12)), (6, -1, 5), 2, net, (0.5, 0.25, 0.0), "gaussian",
                      (0.2, 0.1, 0.3))
    _close(got, want)
    want, got = _both(_x((1, 1, 10, 11)), (None, 5), 2, _net(2, 1, 2), 0.25, "gaussian")
    _close(got, want)


@pytest.mark.parametrize("padding_mode,cval", [("constant", 2.5), ("reflect", 0.0), ("replicate", 0.0),
                                               ("circular", 0.0)])
def test_padding_modes(padding_mode, cval):
    net = _net(2, 1, 2)
    want, got = _both(_x((1, 1, 5, 7)), (8, 9), 1, net, 0.25, "gaussian", padding_mode=padding_mode, cval=cval)
    _close(got, want)


def test_several_heads_tuple_and_dict():
    """Tuple and dict outputs (MONAI returns dicts with the predictor's keys, tuples as tuples)."""
    net = _net(3, 1, 3)

    def as_tuple(w):
        y = net(w)
        return y, y[:, :1] * 2 - 1

    def as_dict(w):
        y = net(w)
        return {"seg": y, "aux": torch.tanh(y[:, 1:])}

    x = _x((2, 1, 11, 9, 13))
    for predictor in (as_tuple, as_dict):
        want, got = _both(x, (6, 5, 7), 3, predictor, 0.5, "gaussian")
        _close(got, want)


def test_heads_at_other_resolutions():
    """Outputs at half and double the window's resolution (MONAI resizes the weight map, nearest-exact)."""
    net = _net(2, 1, 2)

    def predictor(w):
        y = net(w)
        return (y, torch.nn.functional.avg_pool2d(y, 2),
                torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest"))

    for shape, mode in (((1, 1, 20, 24), "gaussian"), ((2, 1, 16, 12), "constant")):
        want, got = _both(_x(shape), (8, 8), 2, predictor, 0.5, mode)
        _close(got, want)


def test_roi_weight_map_process_fn_with_coord_and_extra_args():
    net = _net(2, 1, 2)
    x = _x((1, 1, 14, 13))
    w = torch.rand(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    want, got = _both(x, (6, 5), 2, net, 0.5, roi_weight_map=w)
    _close(got, want)

    def process(outputs, windows, weight):
        return [o * 2 + windows.mean() for o in outputs], weight * 0.5 + 0.25

    want, got = _both(x, (6, 5), 2, net, 0.5, "gaussian", process_fn=process)
    _close(got, want)

    def with_coord(windows, coords, scale, *, shift):
        assert len(coords) == windows.shape[0]
        starts = torch.tensor([float(c[2].start + c[3].start) for c in coords], dtype=windows.dtype)
        return net(windows) * scale + shift + starts[:, None, None, None]

    with torch.no_grad():
        want = monai_swi(x, (6, 5), 3, with_coord, 0.25, "gaussian", 0.125, "constant", 0.0, None, None, False,
                         None, None, None, -1, True, 2.0, shift=1.0)
        got = sliding_window_inference(x, (6, 5), 3, with_coord, 0.25, "gaussian", 0.125, "constant", 0.0, None,
                                       None, False, None, None, None, -1, True, 2.0, shift=1.0)
    _close(got, want)


def test_condition_is_windowed():
    net = _net(2, 2, 2)
    x, cond = _x((1, 1, 12, 11)), _x((1, 1, 12, 11), seed=5)
    want, got = _both(x, (8, 6), 2, lambda w, condition: net(torch.cat([w, condition], 1)), 0.5, "gaussian",
                      condition=cond)
    _close(got, want)


def test_buffer_steps_does_not_change_results():
    net = _net(3, 1, 2)
    x = _x((1, 1, 12, 10, 9))
    with torch.no_grad():
        want = monai_swi(x, (6, 5, 4), 2, net, 0.5, "gaussian")
        got = sliding_window_inference(x, (6, 5, 4), 2, net, 0.5, "gaussian", buffer_steps=2, buffer_dim=0)
    _close(got, want)


def test_metatensor_in_metatensor_out():
    from monai.data import MetaTensor

    net = _net(2, 1, 2)
    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    x = MetaTensor(_x((1, 1, 12, 9)), affine=affine)
    want, got = _both(x, (6, 6), 2, net, 0.25, "gaussian")
    assert isinstance(got, MetaTensor)
    torch.testing.assert_close(got.affine, want.affine)
    assert got.dtype == want.dtype == torch.float32  # MONAI converts to an empty MetaTensor's dtype
    torch.testing.assert_close(got.as_tensor(), want.as_tensor(), **F32)


# ------------------------------------------------------------------------------------------------------------------
# fastmed's additions: output="labels", buffer_dtype
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,roi", [((2, 2, 13, 17, 11), (8, 7, 5)), ((1, 2, 5, 6, 7), (8, 7, 9)),
                                       ((2, 1, 19, 23), (8, 6))])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_labels_equal_monai_argmax(shape, roi, mode):
    net = _net(len(roi), shape[1], 4)
    x = _x(shape)
    with torch.no_grad():
        want = monai_swi(x, roi, 3, net, 0.5, mode).argmax(1, keepdim=True)
        got = sliding_window_inference(x, roi, 3, net, 0.5, mode, output="labels")
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("heads", ["dict", "another resolution"])
def test_labels_of_every_head(heads, blend_mode):
    """Each head has its own grid and tiles (a head at twice the resolution: a scaled grid)."""
    net = _net(2, 1, 3)
    x = _x((1, 1, 16, 12))

    def predictor(w):
        y = net(w)
        return {"a": y, "b": -y} if heads == "dict" else (y, F.interpolate(y, scale_factor=2.0, mode="nearest"))

    with torch.no_grad():
        want = monai_swi(x, (8, 8), 2, predictor, 0.5, "gaussian")
        got = sliding_window_inference(x, (8, 8), 2, predictor, 0.5, "gaussian", output="labels")
    for k in (want if heads == "dict" else range(2)):
        assert torch.equal(got[k].long(), want[k].argmax(1, keepdim=True))
    if heads != "dict":
        assert got[1].shape[2:] == (32, 24)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75, (0.6, 0.0, 0.3)])
@pytest.mark.parametrize("sw_batch_size", [1, 4])
def test_labels_equal_monai_argmax_at_every_overlap(overlap, sw_batch_size, blend_mode):
    """Labels finalized row by row (band) or tile by tile (cells cut at every window start and end): any overlap,
    batch and predictor batching gives MONAI's argmax."""
    net = _net(3, 1, 3)
    x = _x((2, 1, 21, 14, 9))
    with torch.no_grad():
        want = monai_swi(x, (8, 6, 4), sw_batch_size, net, overlap, "gaussian").argmax(1, keepdim=True)
        got = sliding_window_inference(x, (8, 6, 4), sw_batch_size, net, overlap, "gaussian", output="labels")
    assert torch.equal(got.long(), want)


def test_labels_hold_about_one_window_step_of_rows(monkeypatch):
    """The accumulation held at once in labels mode: about one window step of rows across the volume plus a
    window's reach (here at most C x X x step x (Y + wy + step) values), not a band one window deep (C x X x wz x Y)
    and not the volume."""
    import fastmed.inference as inf

    peak = [0]
    finish = inf._Head._finish_tile

    def watched(self, n, cell):
        peak[0] = max(peak[0], sum(t.numel() for t in self.tiles.values()))
        finish(self, n, cell)

    monkeypatch.setattr(inf._Head, "_finish_tile", watched)
    monkeypatch.setattr(inf, "TILES_MIN_BAND_BYTES", 0)
    C, (Z, Y, X), roi, step = 3, (48, 32, 8), (8, 8, 8), 4
    net = _net(3, 1, C)
    with torch.no_grad():
        want = monai_swi(_x((1, 1, Z, Y, X)), roi, 2, net, 0.5, "gaussian").argmax(1, keepdim=True)
        got = sliding_window_inference(_x((1, 1, Z, Y, X)), roi, 2, net, 0.5, "gaussian", output="labels")
    assert torch.equal(got.long(), want)
    assert 0 < peak[0] <= C * X * step * (Y + roi[1] + step) < C * X * roi[0] * Y


@pytest.mark.parametrize("buffer_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_buffer_dtype(buffer_dtype):
    """A low-precision buffer returns results in that dtype, within its rounding of MONAI's float64 result."""
    net = _net(3, 1, 3)
    x = _x((1, 1, 12, 10, 9))
    with torch.no_grad():
        want = monai_swi(x, (6, 5, 4), 2, net, 0.5, "gaussian")
        got = sliding_window_inference(x.float(), (6, 5, 4), 2, lambda w: net(w.double()).to(w.dtype), 0.5,
                                       "gaussian", buffer_dtype=buffer_dtype)
    assert got.dtype == buffer_dtype
    eps = torch.finfo(buffer_dtype).eps
    # each window adds one rounding of the buffer: at most 8 windows cover a voxel here
    torch.testing.assert_close(got.double(), want, rtol=16 * eps, atol=16 * eps * want.abs().max().item())


def test_float16_inputs_keep_float16_results():
    """MONAI returns the inputs' dtype; fastmed too, accumulating in float32 (a band, not a second volume)."""
    net = _net(2, 1, 2)
    x = _x((1, 1, 18, 14))
    with torch.no_grad():
        want = monai_swi(x, (8, 6), 2, net, 0.5, "gaussian")
        got = sliding_window_inference(x.half(), (8, 6), 2, lambda w: net(w.double()).half(), 0.5, "gaussian")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("output", ["values", "labels"])
def test_previous_windows_freed_before_the_next_predictor_call(output):
    """Only one call's windows and predictions are alive while the predictor runs (two were: the largest
    transient of the blending, 2 bytes a voxel at 96^3 windows, 3 classes, sw_batch 2)."""
    net = _net(3, 1, 3)
    previous: list = []

    def predictor(w):
        assert all(ref() is None for ref in previous), "the previous call's windows or predictions are alive"
        y = net(w)
        previous[:] = [weakref.ref(w), weakref.ref(y)]
        return y

    with torch.no_grad():
        got = sliding_window_inference(_x((1, 1, 12, 10, 9)), (6, 5, 4), 2, predictor, 0.5, "gaussian",
                                       output=output)
    assert got.shape[2:] == (12, 10, 9) and len(previous) == 2


def test_inputs_not_modified_and_nan_propagates():
    net = _net(2, 1, 2)
    x = _x((1, 1, 14, 12))
    x[0, 0, 3, 4] = math.nan
    before = x.clone()
    want, got = _both(x, (6, 6), 2, net, 0.5, "gaussian")
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())
    torch.testing.assert_close(got, want, equal_nan=True, **F64)


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------

def _ident(w):
    return w


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(inputs=torch.zeros(4, 4)), ValueError, ["inputs", "dimensions"]),
    (dict(inputs=torch.zeros(1, 1, 4, 4, dtype=torch.int64)), TypeError, ["inputs", "floating"]),
    (dict(inputs=[[1.0]]), TypeError, ["inputs", "Tensor"]),
    (dict(roi_size=(4, 4, 4)), ValueError, ["roi_size", "3 entries"]),
    (dict(roi_size="44"), ValueError, ["roi_size"]),
    (dict(roi_size=(4.5, 4)), ValueError, ["roi_size", "ints"]),
    (dict(sw_batch_size=0), ValueError, ["sw_batch_size"]),
    (dict(predictor=3), TypeError, ["predictor", "callable"]),
    (dict(overlap=1.0), ValueError, ["overlap", "< 1"]),
    (dict(overlap=-0.1), ValueError, ["overlap"]),
    (dict(overlap=(0.5,)), ValueError, ["overlap", "2 numbers"]),
    (dict(mode="linear"), ValueError, ["mode", "gaussian"]),
    (dict(mode="gaussian", sigma_scale=0.0), ValueError, ["sigma_scale", "> 0"]),
    (dict(padding_mode="wrap"), ValueError, ["padding_mode", "reflect"]),
    (dict(output="probs"), ValueError, ["output", "labels"]),
    (dict(buffer_dtype=torch.int32), TypeError, ["buffer_dtype", "torch.int32"]),
    (dict(output="labels", predictor=lambda w: w[:, :1]), ValueError, ["labels", "1 channel"]),
    (dict(predictor=lambda w: "no"), TypeError, ["predictor", "str"]),
    (dict(predictor=lambda w: w[0]), ValueError, ["predictor output 0", "windows"]),
    (dict(roi_weight_map=torch.ones(3, 3)), ValueError, ["roi_weight_map", "(4, 4)"]),
    (dict(process_fn=5), TypeError, ["process_fn", "callable"]),
    (dict(sw_device="gpu0"), ValueError, ["sw_device"]),
])
def test_errors(kwargs, exc, words):
    args = dict(inputs=torch.zeros(1, 2, 9, 8), roi_size=(4, 4), sw_batch_size=2, predictor=_ident)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        sliding_window_inference(args.pop("inputs"), args.pop("roi_size"), args.pop("sw_batch_size"),
                                 args.pop("predictor"), **args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_error_when_a_head_changes_channels():
    calls = []

    def predictor(w):
        calls.append(1)
        return w if len(calls) == 1 else torch.cat([w, w], 1)

    with pytest.raises(ValueError, match="changed from 1 to 2 channels"):
        sliding_window_inference(torch.zeros(1, 1, 9, 8), (4, 4), 1, predictor)


def test_tiles_take_the_moved_back_windows_together(monkeypatch):
    """MONAI's last window along an axis is moved back to end at the image's edge (here 4 voxels after the one
    before it, the step being 6): the tiles engine takes such rows together (:func:`tile_order`), so that at most
    about one window step of z rows is open, where the raster order holds a window's depth while the last two rows
    pass.  Every window once, labels equal to MONAI's argmax, every tile finished."""
    import fastmed.inference as inf

    monkeypatch.setattr(inf, "TILES_MIN_BAND_BYTES", 0)
    C, (Z, Y, X), roi = 3, (40, 40, 12), (12, 12, 12)
    grid3 = monai_grid((Z, Y, X), roi, (0.5,) * 3)
    assert grid3.starts[0] == (0, 6, 12, 18, 24, 28)
    assert inf._start_groups(grid3.starts[0]) == [[0], [1], [2], [3], [4, 5]]
    order = inf.tile_order(grid3)
    assert sorted(order) == list(range(grid3.num_windows)) and order != sorted(order)

    peaks = {}
    finish = inf._Head._finish_tile
    current = [None]

    def watched(self, n, cell):
        peaks[current[0]] = max(peaks.get(current[0], 0), sum(t.numel() for t in self.tiles.values()))
        finish(self, n, cell)

    monkeypatch.setattr(inf._Head, "_finish_tile", watched)
    net = _net(3, 1, C)
    calls = []

    def predictor(w):
        calls.append(w.shape[0])
        return net(w)

    x = _x((1, 1, Z, Y, X))
    with torch.no_grad():
        want = monai_swi(x, roi, 2, net, 0.5, "gaussian").argmax(1, keepdim=True)
        for name, rows in (("raster", None), ("grouped", inf.tile_order)):
            if rows is None:
                monkeypatch.setattr(inf, "tile_order", lambda g: list(range(g.num_windows)))
            else:
                monkeypatch.setattr(inf, "tile_order", rows)
            current[0] = name
            calls.clear()
            got = sliding_window_inference(x, roi, 2, predictor, 0.5, "gaussian", output="labels")
            assert torch.equal(got.long(), want), name
            assert sum(calls) == grid3.num_windows
    step = roi[0] // 2
    assert peaks["grouped"] <= C * X * step * (Y + roi[1] + step) < peaks["raster"], peaks
