"""Benchmark: fused segmentation losses, forward + backward, vs MONAI, nnU-Net and torch.compile of those.

    python bench/bench_losses.py                 # GPU: (2, 14, 128^3) bf16 and fp32, (24, 9, 224^2) bf16
    python bench/bench_losses.py --device cpu    # CPU cases of issue 12 (fp32): (2, 4, 64^3), (2, 14, 48^3),
                                                 # (8, 9, 224^2) and the per-call cost at (1, 3, 4^3)
    python bench/bench_losses.py --quick         # tiny shapes (the device script's CPU rehearsal)

Each case: logits with requires_grad, integer labels (B, 1, *spatial), softmax over the classes.  Losses and their
peers, interleaved in one run (the fastmed row runs whatever ``auto`` picks for the device, recorded as
``backend``):
    DiceCELoss, DiceFocalLoss, DiceLoss   fastmed.nn (to_onehot_y=True, softmax=True) vs MONAI's, and
                                          torch.compile of MONAI's (GPU; ``--cpu-compile`` on the CPU)
    nnU-Net DC+CE                         fastmed.nn.NNUNetDiceCELoss vs nnU-Net's DC_and_CE_loss written out
                                          (bench/peers.py), and torch.compile of it
Bytes the operation must move at least (``min_bytes``): read the logits and the labels once, write d logits once:
``2 * logits + labels`` (the loss itself is a scalar).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_parser, compiled, fastmed_backend, nbytes, setup, with_compile  # noqa: E402
from peers import nnunet_dc_and_ce  # noqa: E402

import fastmed.nn as FN  # noqa: E402

FORMULA = "2*logits + labels: read logits and labels, write dlogits"
MONAI_LOSSES = ("DiceCELoss", "DiceFocalLoss", "DiceLoss")
# (shape, dtype), most important first (a stopped run keeps the rows it has)
GPU_CASES = [((2, 14, 128, 128, 128), torch.bfloat16), ((2, 14, 128, 128, 128), torch.float32),
             ((24, 9, 224, 224), torch.bfloat16)]
CPU_CASES = [((2, 4, 64, 64, 64), torch.float32), ((2, 14, 48, 48, 48), torch.float32),
             ((8, 9, 224, 224), torch.float32), ((1, 3, 4, 4, 4), torch.float32)]
QUICK_CASES = [((2, 4, 16, 16, 16), torch.float32), ((2, 3, 24, 24), torch.float32), ((1, 3, 4, 4, 4), torch.float32)]


def step(loss_fn, x, y):
    """One forward + backward of ``loss_fn(x, y)`` (x.grad reset first)."""
    def fn():
        x.grad = None
        loss_fn(x, y).backward()
    return fn


def main(argv=None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--losses", default=None, help="comma-separated subset of: " + ", ".join(MONAI_LOSSES)
                        + ", nnU-Net")
    args = parser.parse_args(argv)
    bench = setup(args, "losses")
    dev = bench.device
    try:
        import monai.losses as monai_losses
    except ImportError:
        monai_losses = None
        print("monai is not installed: MONAI rows left out")
    cases = QUICK_CASES if args.quick else (GPU_CASES if dev.type == "cuda" else CPU_CASES)
    if args.dtype:
        cases = [c for c in cases if str(c[1]).replace("torch.", "") == args.dtype]
    compile_ok = with_compile(args, dev)
    names = args.losses.split(",") if args.losses else list(MONAI_LOSSES) + ["nnU-Net"]
    backend = fastmed_backend("losses", dev)
    for shape, dtype in cases:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(shape, device=dev, generator=gen).to(dtype).requires_grad_()
        y = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], device=dev, generator=gen)
        min_bytes = 2 * nbytes(x) + nbytes(y)
        for name in names:
            case = f"{name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
            if name == "nnU-Net":
                impls = {"fastmed": step(FN.NNUNetDiceCELoss(), x, y), "nnunet": step(nnunet_dc_and_ce, x, y)}
                if compile_ok:
                    impls["nnunet-compile"] = step(compiled(nnunet_dc_and_ce), x, y)
            else:
                kw = dict(softmax=True, to_onehot_y=True)
                impls = {"fastmed": step(getattr(FN, name)(**kw), x, y)}
                if monai_losses is not None:
                    peer = getattr(monai_losses, name)(**kw)
                    impls["monai"] = step(peer, x, y)
                    if compile_ok:
                        impls["monai-compile"] = step(compiled(peer), x, y)
            bench.compare(case, impls, dtype=dtype, shape=shape, min_bytes=min_bytes, formula=FORMULA,
                          extra=dict(loss=name, mode="fwd+bwd", labels="integer (B, 1, *sp)"),
                          impl_extra={"fastmed": {"backend": backend}})
            bench.print_ratios(case)
        del x, y
    bench.save(args.out)


if __name__ == "__main__":
    main()
