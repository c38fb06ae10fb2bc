"""ddp_sync: batch Dice statistics summed across ranks (two CPU processes on gloo)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmed import ops

WORLD = 2


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 1, 5, 6), generator=gen)
    return x, y


def _losses(x, y, ddp_sync):
    return {
        "dice": ops.dice_loss(x, y, softmax=True, to_onehot_y=True, batch=True, ddp_sync=ddp_sync),
        "nnunet_dice": ops.nnunet_dice_ce_loss(x, y, batch_dice=True, weight_ce=0.0, ddp_sync=ddp_sync),
    }


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _inputs()
        per = x.shape[0] // WORLD
        result = {}
        for name in ("dice", "nnunet_dice"):
            xs = x[rank * per:(rank + 1) * per].clone().requires_grad_()
            loss = _losses(xs, y[rank * per:(rank + 1) * per], True)[name]
            (grad,) = torch.autograd.grad(loss, xs)
            result[name] = (loss.detach(), grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_sync_matches_full_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, y = _inputs()
    per = x.shape[0] // WORLD
    for name in ("dice", "nnunet_dice"):
        xf = x.clone().requires_grad_()
        full = _losses(xf, y, False)[name]
        (gfull,) = torch.autograd.grad(full, xf)
        for rank in range(WORLD):
            loss, grad = torch.load(tmp_path / f"rank{rank}.pt")[name]
            # Every rank sees the loss of the whole batch ...
            torch.testing.assert_close(loss, full.detach())
            # ... and, like nnU-Net's AllGatherGrad, the gradient of its shard summed over the WORLD identical
            # rank losses (DDP's gradient averaging divides it back).
            torch.testing.assert_close(grad, WORLD * gfull[rank * per:(rank + 1) * per])
