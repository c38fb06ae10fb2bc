"""Training-step benchmark of complete models: forward + loss + backward + optimizer step.

Cases (GPU):
    nnunet-3d   UNet.nnunet((128, 128, 128)) (PlainConvUNet, 6 stages, deep supervision), batch 2, 1 channel,
                3 classes, bf16 autocast, SGD (momentum 0.99, nesterov), nnU-Net's Dice + CE with deep supervision
    swin-unet   SwinUNet() (Cao et al.: 224, patch 4, embed 96, depths 2-2-2-2, window 7), batch 24, 1 channel,
                9 classes, bf16 autocast, AdamW, Dice + CE
    swin-unetr  SwinUNETR(1, 14, feature_size=48) (MONAI's, 62.19M), 1 x 1 x 96^3 (``--swin-unetr-batch 2`` for
                2 x 1 x 96^3), bf16 autocast, AdamW, Dice + CE (issue 14)
    transunet   TransUNet(224, 9) (R50-ViT-B/16, 105.28M), batch 24, 3 channels, bf16 autocast, SGD, Dice + CE
CPU (``--device cpu``, issue 12): the same models in fp32, nnunet-3d at a (32, 64, 64) patch batch 1, swin-unet at
224^2 batch 1, swin-unetr at 64^3 batch 1, transunet at 224^2 batch 1.  ``--quick``: tiny models (the device
script's CPU rehearsal).  The eager SwinUNETR is ``fused=False``: MONAI's computation on the same weights (MONAI's
own class needs einops, which the GPU machines lack).
Implementations, interleaved in one run:
    fastmed         the model with fused=True and fastmed's fused losses
    eager           the same model with fused=False (plain PyTorch) and the losses written in plain PyTorch
                    (bench/peers.py)
    torch.compile   torch.compile of the eager model and loss (GPU; ``--cpu-compile`` on the CPU)
    monai           swin-unetr only: MONAI's own SwinUNETR on the same weights (when MONAI and einops import)
Reported: ms per step (median, 20/80 %), images/s, peak memory, speed-ups of fastmed over eager and compile.
Bytes a step must move at least (``min_bytes``): ``x + y + P*(4 + 2k)``: read the batch, read the parameters P
(fp32), write and read their gradients, read and write the k optimizer states (SGD momentum k=1, AdamW k=2),
write the parameters.

    python bench/bench_models.py                 # GPU, full shapes
    python bench/bench_models.py --device cpu    # CPU cases
    python bench/bench_models.py --quick         # tiny models
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_parser, compiled, nbytes, setup, with_compile  # noqa: E402
from peers import dice_ce, nnunet_deep_supervision  # noqa: E402

from fastmed.models import SwinUNet, SwinUNETR, TransUNet, UNet  # noqa: E402
from fastmed.models.unet import plan_nnunet  # noqa: E402
from fastmed.nn import DeepSupervisionLoss, DiceCELoss, NNUNetDiceCELoss  # noqa: E402

# ------------------------------------------------------------------------------------------------------- cases
SIZES = {  # (quick, CPU, GPU)
    "nnunet-3d": (((8, 16, 16), 1), ((32, 64, 64), 1), ((128, 128, 128), 2)),
    "swin-unet": ((32, 1), (224, 1), (224, 24)),
    "swin-unetr": ((64, 1), (64, 1), (96, 1)),  # 64: the smallest size whose bottleneck has > 1 voxel
    "transunet": ((32, 1), (224, 1), (224, 24)),
}
# --quick: the same architectures, narrow (every kind of layer still runs: nnU-Net's strided convs, transposed
# convs and deep-supervision heads; Swin-Unet's shifted and whole-axis windows, patch merging and expanding)
QUICK_NNUNET_FEATURES = 8
QUICK_SWIN = dict(embed_dim=12, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=4)
QUICK_SWIN_UNETR = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
QUICK_TRANSUNET = dict(hidden_size=16, mlp_dim=16, num_heads=2, num_layers=2, block_units=(1, 2, 1))
OPTIMIZER_STATES = {"nnunet-3d": 1, "swin-unet": 2, "swin-unetr": 2, "transunet": 1}


def make_case(name: str, quick: bool, device, batch: Optional[int] = None):
    """(model builder, loss for fastmed, eager loss, optimizer factory, input, labels, batch)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    size, default_batch = SIZES[name][0 if quick else (2 if device.type == "cuda" else 1)]
    batch = batch or default_batch
    channels = 1
    if name == "nnunet-3d":
        patch, classes = size, 3

        kw = {}
        if quick:
            stages = len(plan_nnunet(patch)["features"])
            kw["features"] = [QUICK_NNUNET_FEATURES * 2 ** s for s in range(stages)]

        def build(fused):
            torch.manual_seed(0)
            return UNet.nnunet(patch, in_channels=1, out_channels=classes, fused=fused, **kw).to(device)

        fast_loss = DeepSupervisionLoss(NNUNetDiceCELoss())

        def opt(params):
            return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    elif name == "swin-unetr":
        patch, classes = (size,) * 3, 14

        def build(fused):
            torch.manual_seed(0)
            return SwinUNETR(1, classes, fused=fused, **swin_unetr_kwargs(quick)).to(device)

        fast_loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def opt(params):
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)
    elif name == "transunet":
        patch, classes, channels = (size, size), 9, 3

        def build(fused):
            torch.manual_seed(0)
            kw = QUICK_TRANSUNET if quick else {}
            return TransUNet(img_size=size, num_classes=classes, fused=fused, **kw).to(device)

        fast_loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def opt(params):
            return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    else:
        patch, classes = (size, size), 9

        def build(fused):
            torch.manual_seed(0)
            kw = QUICK_SWIN if quick else {}
            return SwinUNet(2, in_channels=1, out_channels=classes, img_size=size, fused=fused, **kw).to(device)

        fast_loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def opt(params):
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    x = torch.randn((batch, channels) + patch, generator=g).to(device)
    y = torch.randint(0, classes, (batch, 1) + patch, generator=g).to(device)
    eager_loss = nnunet_deep_supervision if name == "nnunet-3d" else dice_ce
    return build, fast_loss, eager_loss, opt, x, y, batch


def swin_unetr_kwargs(quick: bool) -> dict:
    """SwinUNETR's (and MONAI's SwinUNETR's) constructor arguments after in/out channels."""
    return QUICK_SWIN_UNETR if quick else dict(feature_size=48)


def monai_swin_unetr(build, quick: bool):
    """A builder of MONAI's SwinUNETR holding the weights of ``build(False)`` (strict load: same keys), or None
    when MONAI or einops (which MONAI's SwinUNETR needs) is not importable."""
    try:
        import einops  # noqa: F401
        from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
    except ImportError as e:
        print(f"  swin-unetr: no MONAI peer ({e})")
        return None

    def make():
        ours = build(False)
        theirs = MonaiSwinUNETR(in_channels=ours.in_channels, out_channels=ours.out_channels,
                                **swin_unetr_kwargs(quick)).to(next(ours.parameters()).device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        return theirs
    return make


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
    parser = bench_parser(__doc__, "nnunet-3d,swin-unet,swin-unetr,transunet",
                          "comma-separated: nnunet-3d, swin-unet, swin-unetr, transunet")
    parser.add_argument("--swin-unetr-batch", type=int, default=None, help="batch of the swin-unetr case")
    args = parser.parse_args(argv)
    bench = setup(args, "models", reps=3 if args.quick else 20, warmup=1 if args.quick else 3)
    on_gpu = bench.device.type == "cuda"
    amp = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else None)
    if amp == torch.float32:
        amp = None
    print(f"autocast: {amp}")
    for case in args.cases.split(","):
        if case not in SIZES:
            parser.error(f"--cases: unknown case {case!r}; choose from {', '.join(SIZES)}")
        batch = args.swin_unetr_batch if case == "swin-unetr" else None
        build, fast_loss, eager_loss, opt, x, y, batch = make_case(case, args.quick, bench.device, batch)
        variants = [("fastmed", True, fast_loss, False), ("eager", False, eager_loss, False)]
        if with_compile(args, bench.device):
            variants.append(("torch.compile", False, eager_loss, True))
        peer = monai_swin_unetr(build, args.quick) if case == "swin-unetr" else None
        if peer is not None:  # MONAI's own class on the same weights (needs einops), eager
            variants.append(("monai", peer, eager_loss, False))
        impls, extra = {}, {}
        for impl, fused, loss_fn, is_compiled in variants:
            model = fused() if callable(fused) else build(fused)
            fused = getattr(model, "fused", None)
            optimizer = opt(model.parameters())
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            extra[impl] = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3), "fused": fused}
            if is_compiled:
                model, loss_fn = compiled(model), compiled(loss_fn)
            impls[impl] = train_step(model, loss_fn, optimizer, x, y, amp)
        k = OPTIMIZER_STATES[case]
        rows = bench.compare(case, impls, dtype=amp or x.dtype, shape=tuple(x.shape),
                             min_bytes=nbytes(x, y) + params * (4 + 2 * k),
                             formula=f"x + y + P*(4 + 2k), k={k}: read the batch; read P, write and read the "
                                     "gradients, read and write the optimizer states, write P",
                             extra={"autocast": str(amp), "batch": batch}, impl_extra=extra)
        for row in rows.values():
            row["images/s"] = round(batch * 1e3 / row["ms"], 3)
        bench.print_ratios(case)
        del impls
    bench.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
