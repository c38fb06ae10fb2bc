"""Training-step benchmark of complete models: forward + loss + backward + optimizer step.

Cases (full, GPU):
    nnunet-3d   UNet.nnunet((128, 128, 128)) (PlainConvUNet, 6 stages, deep supervision), batch 2, 1 channel,
                3 classes, bf16 autocast, SGD (momentum 0.99, nesterov), nnU-Net's Dice + CE with deep supervision
    swin-unet   SwinUNet() (Cao et al.: 224, patch 4, embed 96, depths 2-2-2-2, window 7), batch 24, 1 channel,
                9 classes, bf16 autocast, AdamW, Dice + CE
Implementations, one run:
    fastmed         the model with fused=True and fastmed's fused losses
    eager           the same model with fused=False (plain PyTorch) and the losses written in plain PyTorch
    torch.compile   torch.compile of the eager model and loss (skipped on CPU unless --cpu-compile)
Reported: ms per step (median, 20/80 %), images/s, peak memory (CUDA), speed-ups of fastmed over eager and compile.

    python bench/bench_models.py            # GPU, full shapes
    python bench/bench_models.py --quick    # tiny models on CPU, fp32 (a smoke test; CPU timings are CPU timings)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, add_common_args  # noqa: E402

from fastmed.models import SwinUNet, UNet  # noqa: E402
from fastmed.nn import DeepSupervisionLoss, DiceCELoss, NNUNetDiceCELoss  # noqa: E402


# ------------------------------------------------------------------------------------------- plain-PyTorch losses
def _soft_dice_terms(logits, labels, do_bg: bool):
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, labels.long(), 1.0)
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    return inter, probs.sum(dims), onehot.sum(dims)


def eager_nnunet_loss(outputs, labels):
    """nnU-Net DC_and_CE (Dice term -mean(dc), smooth 1e-5, no background) with deep supervision, plain torch."""
    n = len(outputs)
    w = torch.tensor([1 / 2 ** i for i in range(n)])
    w[-1] = 0
    w = w / w.sum()
    total = 0.0
    for i, out in enumerate(outputs):
        if w[i] == 0:
            continue
        t = labels if out.shape[2:] == labels.shape[2:] else F.interpolate(labels.float(), out.shape[2:],
                                                                          mode="nearest-exact")
        inter, ps, ts = _soft_dice_terms(out, t, do_bg=False)
        dc = (2 * inter + 1e-5) / (ps + ts + 1e-5).clamp_min(1e-8)
        ce = F.cross_entropy(out.float(), t[:, 0].long())
        total = total + w[i] * (ce - dc.mean())
    return total


def eager_dice_ce(logits, labels):
    """MONAI DiceCELoss(to_onehot_y=True, softmax=True) in plain torch."""
    inter, ps, ts = _soft_dice_terms(logits, labels, do_bg=True)
    dice = 1 - (2 * inter + 1e-5) / (ps + ts + 1e-5)
    return dice.mean() + F.cross_entropy(logits.float(), labels[:, 0].long())


# ------------------------------------------------------------------------------------------------------- cases
def make_case(name: str, quick: bool, device):
    """(model builder, loss for fastmed, eager loss, optimizer factory, input, labels, batch)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if name == "nnunet-3d":
        patch, batch, classes = ((16, 32, 32), 1, 3) if quick else ((128, 128, 128), 2, 3)

        def build(fused):
            torch.manual_seed(0)
            return UNet.nnunet(patch, in_channels=1, out_channels=classes, fused=fused).to(device)

        fast_loss = DeepSupervisionLoss(NNUNetDiceCELoss())

        def opt(params):
            return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        size, batch, classes = (64, 2, 9) if quick else (224, 24, 9)
        patch = (size, size)

        def build(fused):
            torch.manual_seed(0)
            kw = dict(embed_dim=24, num_heads=(1, 2, 3, 6)) if quick else {}
            return SwinUNet(2, in_channels=1, out_channels=classes, img_size=size, fused=fused, **kw).to(device)

        fast_loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def opt(params):
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    x = torch.randn((batch, 1) + patch, generator=g).to(device)
    y = torch.randint(0, classes, (batch, 1) + patch, generator=g).to(device)
    eager_loss = eager_nnunet_loss if name == "nnunet-3d" else eager_dice_ce
    return build, fast_loss, eager_loss, opt, x, y, batch


def train_step(model, loss_fn, optimizer, x, y, autocast_dtype):
    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cases", default="nnunet-3d,swin-unet", help="comma-separated: nnunet-3d, swin-unet")
    parser.add_argument("--cpu-compile", action="store_true", help="also time torch.compile on the CPU")
    args = parser.parse_args(argv)
    bench = Bench("models", quick=args.quick, device=args.device, reps=3 if args.quick else 20,
                  warmup=1 if args.quick else 5)
    on_gpu = bench.device.type == "cuda"
    amp = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else None)
    if amp == torch.float32:
        amp = None
    print(f"device: {bench.env['device']}; autocast: {amp}")
    for case in args.cases.split(","):
        build, fast_loss, eager_loss, opt, x, y, batch = make_case(case, args.quick, bench.device)
        impls = [("fastmed", True, fast_loss, False), ("eager", False, eager_loss, False)]
        if not args.no_compile and (on_gpu or args.cpu_compile):
            impls.append(("torch.compile", False, eager_loss, True))
        shape = tuple(x.shape)
        for impl, fused, loss_fn, compiled in impls:
            model = build(fused)
            optimizer = opt(model.parameters())
            if compiled:
                model = torch.compile(model)
                loss_fn = torch.compile(loss_fn)
            row = bench.run(name=impl, fn=train_step(model, loss_fn, optimizer, x, y, amp), case=case,
                            dtype=amp or x.dtype, shape=shape,
                            extra={"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)})
            if row is not None:
                row["images/s"] = round(batch * 1e3 / row["ms"], 3)
                print(f"  {'':<40} {'':<22} {row['images/s']:.2f} images/s")
            del model, optimizer
        for base in ("eager", "torch.compile"):
            r = bench.ratios(case, base, against="fastmed")
            if r is not None:
                print(f"  {case}: fastmed speed-up over {base}: {r:.2f}x")
    bench.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
