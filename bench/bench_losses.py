"""Benchmark: fused segmentation losses vs MONAI eager vs torch.compile of the MONAI loss (forward + backward).

    python bench/bench_losses.py            # GPU: (2, 14, 128^3) bf16 and fp32, (24, 9, 224^2) bf16
    python bench/bench_losses.py --quick    # tiny shapes, CPU smoke test (CPU timings are CPU timings)

Each case: logits with requires_grad, int64 labels (B, 1, *spatial), ``softmax=True, to_onehot_y=True``.
GB/s counts the bytes the fused kernels must move: forward reads logits + labels, backward reads them again and
writes the gradient (3 logits-sized + 2 label-sized transfers); ``pct_copy_bw`` compares with the copy bandwidth
measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, add_common_args  # noqa: E402

import fastmed.nn as FN  # noqa: E402

LOSSES = ("DiceLoss", "DiceCELoss", "DiceFocalLoss")
FULL = [((2, 14, 128, 128, 128), torch.bfloat16), ((2, 14, 128, 128, 128), torch.float32),
        ((24, 9, 224, 224), torch.bfloat16)]
QUICK = [((2, 4, 16, 16, 16), torch.float32), ((2, 3, 48, 48), torch.bfloat16)]


def _step(loss_fn, x, y):
    def fn():
        x.grad = None
        loss_fn(x, y).backward()
    return fn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    bench = Bench("losses", quick=args.quick, device=args.device)
    try:
        import monai.losses as monai_losses
    except ImportError:
        monai_losses = None
        print("monai is not installed: fastmed rows only")
    copy_gbs = bench.copy_bandwidth()
    print(f"device {bench.env['device']}, copy bandwidth {copy_gbs:.0f} GB/s")
    cases = QUICK if args.quick else FULL
    if args.dtype:
        cases = [c for c in cases if str(c[1]).replace("torch.", "") == args.dtype]
    compile_ok = not args.no_compile and not args.quick  # --quick: a CPU smoke test, no compile time
    for shape, dtype in cases:
        gen = torch.Generator(device=bench.device).manual_seed(0)
        x = torch.randn(shape, device=bench.device, generator=gen).to(dtype).requires_grad_()
        y = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], device=bench.device, generator=gen)
        nbytes = 3 * x.numel() * x.element_size() + 2 * y.numel() * y.element_size()
        for name in LOSSES:
            case = f"{name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
            kw = dict(softmax=True, to_onehot_y=True)
            bench.run(name="fastmed", fn=_step(getattr(FN, name)(**kw), x, y), case=case, dtype=dtype, shape=shape,
                      bytes_moved=nbytes)
            if monai_losses is None:
                continue
            peer = getattr(monai_losses, name)(**kw)
            bench.run(name="monai-eager", fn=_step(peer, x, y), case=case, dtype=dtype, shape=shape,
                      bytes_moved=nbytes)
            if compile_ok:
                bench.run(name="monai-compile", fn=_step(torch.compile(peer), x, y), case=case, dtype=dtype,
                          shape=shape, bytes_moved=nbytes)
            for base in ("monai-eager", "monai-compile"):
                r = bench.ratios(case, base)
                if r:
                    print(f"    fastmed speed-up over {base}: {r:.2f}x")
        del x, y
    bench.save(args.out)


if __name__ == "__main__":
    main()
