"""fastmed.metrics vs MONAI's compute_dice / compute_hausdorff_distance / compute_surface_dice."""
import warnings

import monai.metrics as mm
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

import fastmed.metrics as fm
from fastmed.metrics import dice, hausdorff_distance, surface_dice


def _pairs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    C = 3
    lab = torch.randint(0, C, (4, 1) + shape, generator=g)
    pred = torch.randint(0, C, (4, 1) + shape, generator=g)
    pred[0] = 0       # empty prediction for the foreground classes
    lab[1] = 0        # empty target
    lab[2], pred[2] = 0, 0  # both empty
    oh = lambda t: torch.nn.functional.one_hot(t[:, 0], C).movedim(-1, 1).float()  # noqa: E731
    return oh(pred), oh(lab)


CASES = [((9, 11), None), ((9, 11), (1.5, 0.7)), ((5, 6, 7), None), ((5, 6, 7), (2.0, 1.0, 0.5))]


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("include_background", [True, False])
def test_against_monai(shape, spacing, include_background):
    p, y = _pairs(shape, seed=len(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ignore_empty in (True, False):
            torch.testing.assert_close(dice(p, y, include_background, ignore_empty),
                                       compute_dice(p, y, include_background, ignore_empty), equal_nan=True)
        for percentile in (None, 95):
            for directed in (False, True):
                want = compute_hausdorff_distance(p, y, include_background, percentile=percentile,
                                                  directed=directed, spacing=spacing)
                got = hausdorff_distance(p, y, include_background, percentile, directed, spacing)
                torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
        nc = p.shape[1] - (0 if include_background else 1)
        for tol in ([1.0] * nc, [0.5 + i for i in range(nc)]):
            torch.testing.assert_close(surface_dice(p, y, tol, include_background, spacing),
                                       compute_surface_dice(p, y, tol, include_background, spacing=spacing),
                                       equal_nan=True)


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("include_background", [True, False])
def test_single_channel_against_monai(shape, spacing, include_background):
    """(B, 1, *spatial) binary masks (one structure, the common HD95 case): MONAI keeps the only channel even with
    include_background=False (fastmed dropped it: HD95 raised, the others returned (B, 0))."""
    g = torch.Generator().manual_seed(11)
    p = (torch.rand((4, 1) + shape, generator=g) > 0.5).float()
    y = (torch.rand((4, 1) + shape, generator=g) > 0.4).float()
    p[0], y[1], p[2], y[2] = 0, 0, 0, 0  # empty prediction, empty target, both empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dice(p, y, include_background)
        assert got.shape == (4, 1)
        torch.testing.assert_close(got, compute_dice(p, y, include_background), equal_nan=True)
        for percentile in (None, 95):
            got = hausdorff_distance(p, y, include_background, percentile, spacing=spacing)
            want = compute_hausdorff_distance(p, y, include_background, percentile=percentile, spacing=spacing)
            assert got.shape == (4, 1)
            torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
        got = surface_dice(p, y, 1.5, include_background, spacing)
        assert got.shape == (4, 1)
        torch.testing.assert_close(got, compute_surface_dice(p, y, [1.5], include_background, spacing=spacing),
                                   equal_nan=True)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_per_item_spacing_against_monai(shape):
    """spacing with one entry per batch item (MONAI accepts it): each item's distances use its own spacing."""
    p, y = _pairs(shape, seed=7)
    nd = len(shape)
    per_item = [[1.0] * nd, [2.0, 0.5, 1.25][:nd], [1.0] * nd, [0.3, 3.0, 0.9][:nd]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for percentile in (None, 95):
            want = compute_hausdorff_distance(p, y, percentile=percentile, spacing=per_item)
            for spacing in (per_item, torch.tensor(per_item)):
                torch.testing.assert_close(hausdorff_distance(p, y, percentile=percentile, spacing=spacing), want,
                                           equal_nan=True, rtol=1e-5, atol=1e-5)
        want = compute_surface_dice(p, y, [1.0, 2.0], spacing=per_item)
        torch.testing.assert_close(surface_dice(p, y, [1.0, 2.0], spacing=per_item), want, equal_nan=True)
    with pytest.raises(ValueError, match="needs 4 entries"):
        hausdorff_distance(p, y, spacing=per_item[:3])
    with pytest.raises(ValueError, match=f"spacing must be one number or {nd} numbers"):
        hausdorff_distance(p, y, spacing=[0.7, 1.3, 2.0, 0.5])  # 4 numbers: neither one per dim nor per item


def test_errors():
    p = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="1 channel .class indices. or 2 channels"):
        dice(p, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        hausdorff_distance(p, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_distance(p, p, percentile=101)
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(p, p, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"y_pred must be \(B, C, \*spatial\)"):
        dice(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="one-hot"):
        surface_dice(torch.zeros(4, 4), torch.zeros(4, 4), 1.0)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
@pytest.mark.parametrize("metric", ["chessboard", "taxicab"])
def test_distance_metric_against_monai(shape, metric):
    """distance_metric="chessboard"/"taxicab" (MONAI: scipy distance_transform_cdt, in voxels; spacing ignored)."""
    p, y = _pairs(shape, seed=21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for percentile in (None, 95):
            for directed in (False, True):
                want = compute_hausdorff_distance(p, y, True, metric, percentile, directed)
                got = hausdorff_distance(p, y, True, percentile, directed, distance_metric=metric)
                torch.testing.assert_close(got, want, equal_nan=True)
                # spacing does not apply to these metrics (MONAI ignores it too)
                got = hausdorff_distance(p, y, True, percentile, directed, (2.0,) * len(shape),
                                         distance_metric=metric)
                torch.testing.assert_close(got, want, equal_nan=True)
        for tol in ([1.0, 1.0], [0.0, 2.0], [3.0, 1.5]):
            want = compute_surface_dice(p, y, tol, distance_metric=metric)
            torch.testing.assert_close(surface_dice(p, y, tol, distance_metric=metric), want, equal_nan=True)
    with pytest.raises(ValueError, match="distance_metric must be one of"):
        hausdorff_distance(p, y, distance_metric="manhattan")


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_dice_num_classes_and_ignore_index_against_monai(shape):
    """num_classes with class-index y_pred / y, and ignore_index as label, class index or sentinel."""
    g = torch.Generator().manual_seed(22)
    C = 3
    lab = torch.randint(0, C, (3, 1) + shape, generator=g)
    pred = torch.randint(0, C, (3, 1) + shape, generator=g)
    pred[0] = 0
    oh = lambda t: torch.nn.functional.one_hot(t[:, 0], C).movedim(-1, 1).float()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for include_background in (True, False):
            for ignore_empty in (True, False):
                for yp, yt in ((pred, lab), (pred, oh(lab)), (oh(pred), lab), (oh(pred), oh(lab))):
                    want = compute_dice(yp, yt, include_background, ignore_empty, num_classes=C)
                    got = dice(yp, yt, include_background, ignore_empty, num_classes=C)
                    torch.testing.assert_close(got, want, equal_nan=True)
                for ignore_index in (0, 2, 7, -1):
                    for yp, yt in ((pred, lab), (oh(pred), oh(lab))):
                        want = compute_dice(yp, yt, include_background, ignore_empty, num_classes=C,
                                            ignore_index=ignore_index)
                        got = dice(yp, yt, include_background, ignore_empty, num_classes=C,
                                   ignore_index=ignore_index)
                        torch.testing.assert_close(got, want, equal_nan=True)
    # a sentinel label (255 = unlabeled) in class-index y: those voxels count for no class
    y255 = lab.clone()
    y255[:, :, :2] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(dice(pred, y255, num_classes=C, ignore_index=255),
                                   compute_dice(pred, y255, num_classes=C, ignore_index=255), equal_nan=True)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_surface_metrics_ignore_index_against_monai(shape):
    p, y = _pairs(shape, seed=23)
    y[3, :, 0] = 0  # an unlabeled slab (all channels zero): the sentinel case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for include_background in (True, False):
            for ignore_index in (0, 1, 2, 255):
                want = compute_hausdorff_distance(p, y, include_background, ignore_index=ignore_index)
                got = hausdorff_distance(p, y, include_background, ignore_index=ignore_index)
                torch.testing.assert_close(got, want, equal_nan=True)
                nc = 3 if include_background else 2
                want = compute_surface_dice(p, y, [1.0] * nc, include_background, ignore_index=ignore_index)
                got = surface_dice(p, y, 1.0, include_background, ignore_index=ignore_index)
                torch.testing.assert_close(got, want, equal_nan=True)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        surface_dice(p, y, 1.0, ignore_index=1.5)


REDUCTIONS = ["none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_metric_reduction_against_monai(reduction):
    g = torch.Generator().manual_seed(24)
    f = torch.rand(5, 3, generator=g)
    f[0, 1] = f[2] = f[:, 2] = float("nan")  # a NaN, an all-NaN item, an all-NaN class
    want = mm.do_metric_reduction(f.clone(), reduction)
    before = f.clone()
    got = fm.metric_reduction(f, reduction)
    assert torch.equal(f.isnan(), before.isnan()) and torch.equal(f.nan_to_num(), before.nan_to_num())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


def _run_both(ours, theirs, batches, **kwargs):
    """Feed the same batches to a fastmed and a MONAI metric object; compare each call and every aggregate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for yp, yt in batches:
            torch.testing.assert_close(ours(yp, yt, **kwargs), theirs(y_pred=yp, y=yt, **kwargs), equal_nan=True)
        torch.testing.assert_close(ours.get_buffer(), theirs.get_buffer(), equal_nan=True)
        assert len(ours) == len(theirs)
        labelled = getattr(theirs, "return_with_label", False)  # MONAI fails on a reduction that is not per class
        for reduction in [None, "mean_batch", "sum_batch"] if labelled else REDUCTIONS + [None]:
            got, want = ours.aggregate(reduction), theirs.aggregate(reduction)
            if isinstance(want, dict):
                assert got == want
                continue
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, equal_nan=True)
    ours.reset()
    theirs.reset()
    assert len(ours) == 0 and ours.get_buffer() is None
    with pytest.raises(ValueError, match="nothing to aggregate"):
        ours.aggregate()


def _batches(shape):
    p, y = _pairs(shape, seed=25)
    p2, y2 = _pairs(shape, seed=26)
    return [(p, y), (list(p2), list(y2))]  # a batch-first tensor, then a decollated list of channel-first ones


@pytest.mark.parametrize("shape", [(9, 11), (4, 5, 6)])
@pytest.mark.parametrize("kw", [dict(), dict(include_background=False, reduction="mean_batch", get_not_nans=True),
                                dict(reduction="mean_batch", return_with_label=True),
                                dict(include_background=False, reduction="mean_batch",
                                     return_with_label=["liver", "tumour"]),
                                dict(ignore_empty=False, reduction="sum", ignore_index=0)])
def test_dice_metric_class_against_monai(shape, kw):
    _run_both(fm.DiceMetric(**kw), mm.DiceMetric(**kw), _batches(shape))


def test_dice_metric_class_num_classes_against_monai():
    g = torch.Generator().manual_seed(27)
    lab, pred = torch.randint(0, 4, (2, 3, 1, 7, 8), generator=g)
    _run_both(fm.DiceMetric(num_classes=4, reduction="mean_batch"), mm.DiceMetric(num_classes=4,
              reduction="mean_batch"), [(pred, lab), (list(pred), list(lab))])
    with pytest.raises(NotImplementedError, match="per_component"):
        fm.DiceMetric(per_component=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fm.DiceMetric(reduction="median")


@pytest.mark.parametrize("shape", [(9, 11), (4, 5, 6)])
@pytest.mark.parametrize("kw", [dict(), dict(percentile=95, reduction="mean_channel", get_not_nans=True),
                                dict(distance_metric="chessboard", directed=True, include_background=True),
                                dict(distance_metric="taxicab", reduction="sum_batch"),
                                dict(ignore_index=1, include_background=True, reduction="none")])
def test_hausdorff_metric_class_against_monai(shape, kw):
    _run_both(fm.HausdorffDistanceMetric(**kw), mm.HausdorffDistanceMetric(**kw), _batches(shape))
    nd = len(shape)
    _run_both(fm.HausdorffDistanceMetric(**kw), mm.HausdorffDistanceMetric(**kw), _batches(shape)[:1],
              spacing=[[1.0] * nd, [2.0] * nd, [0.5] * nd, [1.5] * nd])


@pytest.mark.parametrize("shape", [(9, 11), (4, 5, 6)])
@pytest.mark.parametrize("kw", [dict(class_thresholds=[1.0, 2.0]),
                                dict(class_thresholds=[1.0, 0.5, 2.0], include_background=True,
                                     distance_metric="taxicab", reduction="mean_batch", get_not_nans=True),
                                dict(class_thresholds=[1.5, 1.5], distance_metric="chessboard", ignore_index=2)])
def test_surface_dice_metric_class_against_monai(shape, kw):
    _run_both(fm.SurfaceDiceMetric(**kw), mm.SurfaceDiceMetric(**kw), _batches(shape))
    _run_both(fm.SurfaceDiceMetric(**kw), mm.SurfaceDiceMetric(**kw), _batches(shape)[:1], spacing=0.7)


def test_metric_classes_positional_order_matches_monai():
    """MONAI's positional order: code that passes the arguments positionally builds the same metric."""
    import inspect

    for name in ("DiceMetric", "HausdorffDistanceMetric", "SurfaceDiceMetric"):
        ours = inspect.signature(getattr(fm, name)).parameters
        theirs = inspect.signature(getattr(mm, name)).parameters
        assert list(ours) == list(theirs), name
        for k in ours:
            want = theirs[k].default
            assert ours[k].default == getattr(want, "value", want), (name, k)


@pytest.mark.parametrize("shape,spacing,metric", [((9, 11), None, "euclidean"), ((9, 11), (1.5, 0.7), "euclidean"),
                                                  ((9, 11), (1.5, 0.7), "taxicab"), ((5, 6, 7), None, "chessboard"),
                                                  ((5, 6, 7), (2.0, 1.0, 0.5), "euclidean")])
def test_surface_dice_subvoxels_against_monai(shape, spacing, metric):
    """use_subvoxels=True: boundary cells weighted by their contour length (2D) / surface area (3D)."""
    p, y = _pairs(shape, seed=28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for include_background in (True, False):
            nc = 3 if include_background else 2
            for tol in ([1.0] * nc, [0.0, 2.0, 0.7][:nc]):
                want = compute_surface_dice(p, y, tol, include_background, metric, spacing, use_subvoxels=True)
                got = surface_dice(p, y, tol, include_background, spacing, distance_metric=metric,
                                   use_subvoxels=True)
                torch.testing.assert_close(got, want, equal_nan=True)
        # one spacing per item: each item's lengths / areas use its own
        nd = len(shape)
        per_item = [[1.0] * nd, [2.0, 0.5, 1.25][:nd], [1.0] * nd, [0.3, 3.0, 0.9][:nd]]
        want = compute_surface_dice(p, y, [1.0, 2.0], spacing=per_item, use_subvoxels=True)
        torch.testing.assert_close(surface_dice(p, y, [1.0, 2.0], spacing=per_item, use_subvoxels=True), want,
                                   equal_nan=True)
        _run_both(fm.SurfaceDiceMetric([1.0, 1.0], use_subvoxels=True),
                  mm.SurfaceDiceMetric([1.0, 1.0], use_subvoxels=True), _batches(shape)[:1], spacing=spacing)


def _messages(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return sorted(str(w.message) for w in rec if "is all 0" in str(w.message))


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("ignore_index", [None, 1, 2])
def test_empty_class_warnings_match_monai(include_background, ignore_index):
    """MONAI warns once per (item, class) whose ground truth or prediction is empty (none for ignore_index)."""
    p, y = _pairs((7, 8), seed=29)
    nc = 3 if include_background else 2
    for ours, theirs in (
            (lambda: hausdorff_distance(p, y, include_background, ignore_index=ignore_index),
             lambda: compute_hausdorff_distance(p, y, include_background, ignore_index=ignore_index)),
            (lambda: surface_dice(p, y, 1.0, include_background, ignore_index=ignore_index),
             lambda: compute_surface_dice(p, y, [1.0] * nc, include_background, ignore_index=ignore_index))):
        want = _messages(theirs)
        assert want and _messages(ours) == want
    single_p, single_y = p[:, 1:2], y[:, 1:2]  # one channel: classes counted from 1 without the background
    want = _messages(lambda: compute_hausdorff_distance(single_p, single_y, include_background))
    assert want and _messages(lambda: hausdorff_distance(single_p, single_y, include_background)) == want


@pytest.mark.parametrize("shape", [(12,), (3, 4, 5, 6)])
def test_dice_any_rank_against_monai(shape):
    """Dice has no spatial-rank limit in MONAI (1D signals, 4D volumes); the surface metrics need 2D or 3D."""
    p, y = _pairs(shape, seed=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(dice(p, y), compute_dice(p, y), equal_nan=True)
        _run_both(fm.DiceMetric(), mm.DiceMetric(), [(p, y)])
    with pytest.raises(ValueError, match=r"y must be \(B, C, \*spatial\)"):
        dice(p, y.flatten(1))
    with pytest.raises(ValueError, match="one-hot"):
        hausdorff_distance(p, y)
