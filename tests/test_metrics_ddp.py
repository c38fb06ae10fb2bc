"""Metric classes under torch.distributed (two CPU processes on gloo): aggregate() sees every rank's values, as
MONAI's (which all-gather their buffers), including ranks with different numbers of items."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmed.metrics import DiceMetric, HausdorffDistanceMetric

WORLD = 2
SPLIT = [3, 2]  # items per rank: uneven, so the gather pads and trims


def _inputs():
    gen = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (sum(SPLIT), 1, 6, 7), generator=gen)
    pred = torch.randint(0, 3, (sum(SPLIT), 1, 6, 7), generator=gen)
    lab[0] = 0  # an empty class: NaN values that the reduction skips
    onehot = lambda t: torch.nn.functional.one_hot(t[:, 0], 3).movedim(-1, 1).float()  # noqa: E731
    return onehot(pred), onehot(lab)


def _metrics():
    return {"dice": DiceMetric(reduction="mean_batch", get_not_nans=True),
            "hd": HausdorffDistanceMetric(percentile=95, reduction="mean")}


def _worker(rank, out_dir):
    """One rank: its share of the items through each metric, then aggregate() and the (gathered) buffer."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD)
    p, y = _inputs()
    lo = sum(SPLIT[:rank])
    mine = slice(lo, lo + SPLIT[rank])
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, metric in _metrics().items():
            metric(p[mine], y[mine])
            result[name] = (metric.aggregate(), metric.get_buffer())
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_metric_classes_gather_across_ranks(tmp_path):
    from monai.metrics import DiceMetric as MonaiDiceMetric  # here: the spawned ranks need not import MONAI
    from monai.metrics import HausdorffDistanceMetric as MonaiHD

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    p, y = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {"dice": MonaiDiceMetric(reduction="mean_batch", get_not_nans=True),
                "hd": MonaiHD(percentile=95, reduction="mean")}
        for metric in want.values():
            metric(p, y)
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        for name, metric in want.items():
            aggregate, buffer = got[name]
            assert buffer.shape[0] == sum(SPLIT)
            torch.testing.assert_close(buffer, metric.get_buffer(), equal_nan=True)
            expected = metric.aggregate()
            for a, b in zip(aggregate if isinstance(aggregate, tuple) else (aggregate,),
                            expected if isinstance(expected, tuple) else (expected,)):
                torch.testing.assert_close(a, b)
