"""fastmed.metrics vs MONAI's compute_dice / compute_hausdorff_distance / compute_surface_dice."""
import warnings

import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

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
    with pytest.raises(ValueError, match="same shape"):
        dice(p, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_distance(p, p, percentile=101)
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(p, p, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one-hot"):
        dice(torch.zeros(4, 4), torch.zeros(4, 4))
