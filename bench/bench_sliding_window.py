"""Whole-volume sliding-window inference: fastmed vs MONAI ``sliding_window_inference`` with the same network.

Cases (full shapes; ``--quick`` shrinks them for the CPU):
    accumulation   the blending alone: a 1x1x1 convolution as the network (C = 3 and 14 classes), volume
                   1x1x256x256x192, 96^3 windows, overlap 0.5, Gaussian blending
    unet           UNet.nnunet((128,)*3) (PlainConvUNet, 3 classes, deep supervision off), same volume, 128^3
                   windows, overlap 0.5, Gaussian
    swinunetr      MONAI's SwinUNETR (feature_size 48, 14 classes; fastmed.models has no SwinUNETR, so MONAI's
                   network serves both implementations), 96^3 windows, overlap 0.5, Gaussian
    blend          (only when asked: ``--cases blend``) the blending with no network at all: the predictor returns
                   copies of fixed predictions (C = 3 and 14), so time and tracked memory are the blending's
                   own; same volume and windows as ``accumulation``
Implementations, one run, same network and inputs:
    network-only            the network on every window, nothing blended (what blending adds to)
    monai                   monai.inferers.sliding_window_inference
    monai+argmax            the same, then ``argmax(1)`` (what ``output="labels"`` replaces)
    fastmed                 fastmed.inference.sliding_window_inference (MONAI's result, float32)
    fastmed-fp16-buffer     ``buffer_dtype=torch.float16``: float16 accumulation and result
    fastmed-labels          ``output="labels"``: uint8 argmax taken on the fly
    fastmed-labels-fp16-buffer  the same with ``buffer_dtype=torch.float16`` (the open tiles in float16)
Reported per row: time (median, 20/80 %), peak memory: on CUDA the harness's peak of the whole call; on every
device ``tracked_peak_mb``, the largest sum of tensor storages created by the call and alive at once (a dispatch
mode sees every allocation: buffers, window predictions, network activations), and the ratio of fastmed's to
MONAI's, whole (``peak_vs_monai``) and beyond the network alone (``accumulation_vs_monai``: (peak - network-only
peak) / (MONAI's peak - network-only peak)).  The first rows check that fastmed's values equal MONAI's (max abs
difference) and its labels MONAI's argmax.

    python bench/bench_sliding_window.py            # GPU (or CPU) at full shapes
    python bench/bench_sliding_window.py --quick    # small shapes for the CPU (CPU timings are CPU timings)
    python bench/bench_sliding_window.py --cases blend --memory-only   # accumulation memory at full shapes, no timing
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, bench_parser  # noqa: E402

from fastmed.inference import sliding_window_inference  # noqa: E402
from fastmed.models import UNet  # noqa: E402
from fastmed.reference.sliding_window import monai_grid  # noqa: E402


class TrackedPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops inside the block allocate, alive at the same time.

    An op's output counts when its storage is not one of its inputs' (views and in-place results do not
    allocate); a storage stops counting when it is freed (checked before each op).  Storages made before the
    block (the inputs) never count; what the block returns counts until the end."""

    def __enter__(self):
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0
        return super().__enter__()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def tracked_peak(fn) -> int:
    """Bytes: the peak of :class:`TrackedPeak` over one call of ``fn``."""
    with torch.no_grad(), TrackedPeak() as mode:
        fn()
    return mode.peak


def network_only(net, x: torch.Tensor, grid, sw_batch_size: int) -> None:
    """The predictor on every window of ``grid`` (MONAI's and fastmed's windows), outputs dropped: the time of
    the network alone, to which the blending of the other rows adds."""
    for start in range(0, grid.num_windows, sw_batch_size):
        idx = range(start, min(start + sw_batch_size, grid.num_windows))
        net(torch.cat([x[(slice(None), slice(None)) + grid.slices(i)] for i in idx]))


class FixedPredictions(torch.nn.Module):
    """A stand-in network for the ``blend`` case: for each window, a copy of one of a few fixed blocks of
    predictions ``(classes, *roi)`` (a copy: MONAI scales the predictor's output in place), picked by the window's
    first input value, so that a window's prediction depends on the window only (not on its place in a batch:
    fastmed's labels engine batches the windows in another order than MONAI's raster)."""

    def __init__(self, classes: int, roi, bank_size: int = 8):
        super().__init__()
        self.register_buffer("bank", torch.randn(bank_size, classes, *roi,
                                                 generator=torch.Generator().manual_seed(classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = (x.reshape(x.shape[0], -1)[:, 0] * 1e4).long().remainder(self.bank.shape[0])
        return self.bank[pick]  # advanced indexing: a copy


MIN_BYTES_FORMULA = ("4*C*(windows*roi + volume): every window's float32 predictions read once and the float32 "
                     "result written once (the network's own traffic not counted)")


def _beyond(peaks: dict, name: str) -> float:
    """The accumulation's share: (peak of ``name`` - peak of the network alone) / (the same for MONAI).  Both run
    the same windows through the same network, so what is left is what the blending keeps."""
    return (peaks[name] - peaks["network-only"]) / (peaks["monai"] - peaks["network-only"])


def _cases(quick: bool, device):
    """(case, network factory, input shape, roi, classes) per case."""
    vol = (1, 1, 64, 64, 48) if quick else (1, 1, 256, 256, 192)
    roi_small = (32,) * 3 if quick else (96,) * 3
    roi_unet = (32,) * 3 if quick else (128,) * 3
    out = []
    for classes in (3, 14):
        out.append((f"accumulation-c{classes}", lambda c=classes: torch.nn.Conv3d(1, c, 1), vol, roi_small, classes))
    for classes in (3, 14):
        out.append((f"blend-c{classes}", lambda c=classes: FixedPredictions(c, roi_small), vol, roi_small, classes))
    out.append(("unet", lambda: UNet.nnunet(roi_unet, in_channels=1, out_channels=3, deep_supervision=False,
                                            **(dict(features=(8, 16, 32, 64)) if quick else {})),
                vol, roi_unet, 3))
    try:
        from monai.networks.nets import SwinUNETR
    except ImportError:
        return out
    if importlib.util.find_spec("einops") is None:  # MONAI's SwinUNETR needs it at forward time
        print("  swinunetr: skipped (MONAI's SwinUNETR needs einops, which is not installed)")
        return out

    def swin():
        return SwinUNETR(in_channels=1, out_channels=14, feature_size=12 if quick else 48, spatial_dims=3)

    out.append(("swinunetr", swin, vol, roi_small, 14))
    return out


def main(argv=None) -> int:
    parser = bench_parser(__doc__, "accumulation,unet,swinunetr",
                          "comma-separated prefixes (run in this order): accumulation, unet, swinunetr, blend")
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--memory-only", action="store_true",
                        help="print each implementation's tracked peak (bytes a voxel, ratio to MONAI) and time "
                             "nothing (fast at full shapes; writes no results file)")
    # --threads, --reps (default here: 3 quick, 5 full) and --warmup (1 quick, 2 full) come from the harness
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from monai.inferers import sliding_window_inference as monai_swi

    bench = Bench("sliding_window", quick=args.quick, device=args.device, reps=args.reps or (3 if args.quick else 5),
                  warmup=args.warmup or (1 if args.quick else 2))
    dev = bench.device
    if not args.memory_only:
        bench.copy_bandwidth()  # the rows' pct_copy_bw
    print(f"device: {bench.env['device']}; sw_batch_size {args.sw_batch_size}, overlap {args.overlap}, gaussian")
    wanted = args.cases.split(",")
    g = torch.Generator().manual_seed(0)
    cases = _cases(args.quick, dev)
    ordered = [c for w in wanted for c in cases if c[0].startswith(w)]  # in the order asked, each once
    for case, build, shape, roi, classes in [c for i, c in enumerate(ordered) if c not in ordered[:i]]:
        torch.manual_seed(0)
        net = build().to(dev).eval()
        x = torch.randn(shape, generator=g).to(dev)
        common = (roi, args.sw_batch_size, net, args.overlap, "gaussian")
        grid = monai_grid(tuple(shape[2:]), roi, (args.overlap,) * 3)
        impls = {
            "network-only": lambda x=x, net=net, grid=grid: network_only(net, x, grid, args.sw_batch_size),
            "monai": lambda x=x, common=common: monai_swi(x, *common),
            "monai+argmax": lambda x=x, common=common: monai_swi(x, *common).argmax(1, keepdim=True),
            "fastmed": lambda x=x, common=common: sliding_window_inference(x, *common),
            "fastmed-fp16-buffer": lambda x=x, common=common: sliding_window_inference(x, *common,
                                                                                       buffer_dtype=torch.float16),
            "fastmed-labels": lambda x=x, common=common: sliding_window_inference(x, *common, output="labels"),
            "fastmed-labels-fp16-buffer": lambda x=x, common=common: sliding_window_inference(
                x, *common, output="labels", buffer_dtype=torch.float16),
        }
        with torch.no_grad():
            want, got = impls["monai"](), impls["fastmed"]()
            labels = impls["fastmed-labels"]()
            same_labels = (labels.long() == want.argmax(1, keepdim=True)).float().mean().item()
            diff = (got - want).abs().max().item()
            del want, got, labels
        print(f"  {case}: max |fastmed - monai| = {diff:.3g}; labels equal to monai's argmax at "
              f"{100 * same_labels:.4f}% of voxels")
        peaks = {}
        if args.memory_only:
            for name, fn in impls.items():
                peaks[name] = tracked_peak(fn) / 2**20
                ratio = ""
                if name not in ("monai", "network-only"):
                    ratio = (f", {peaks[name] / peaks['monai']:.3f}x monai; beyond the network "
                             f"{_beyond(peaks, name):.3f}x")
                print(f"  {case:<22} {name:<26} tracked peak {peaks[name]:9.1f} MiB "
                      f"({peaks[name] * 2**20 / math.prod(shape[2:]):.2f} B/voxel{ratio})")
            del net, x
            continue
        impl_extra = {}
        for name, fn in impls.items():
            peaks[name] = tracked_peak(fn) / 2**20
            impl_extra[name] = {"tracked_bytes_per_voxel": round(peaks[name] * 2**20 / math.prod(shape[2:]), 3),
                                "tracked_peak_mb": round(peaks[name], 2)}
            if name not in ("monai", "network-only"):
                impl_extra[name].update(peak_vs_monai=round(peaks[name] / peaks["monai"], 3),
                                        accumulation_vs_monai=round(_beyond(peaks, name), 3))
        extra = {"case_detail": f"roi {roi}, {classes} classes, overlap {args.overlap}, sw_batch "
                                f"{args.sw_batch_size}", "max_abs_diff_vs_monai": diff,
                 "labels_agree_pct": round(100 * same_labels, 4)}
        windows = grid.num_windows * shape[0]
        min_bytes = 4 * classes * (windows * math.prod(roi) + math.prod(shape))

        def no_grad(fn):
            def call():
                with torch.no_grad():
                    return fn()
            return call

        bench.compare(case, {name: no_grad(fn) for name, fn in impls.items()}, dtype=x.dtype, shape=tuple(x.shape),
                      min_bytes=min_bytes, formula=MIN_BYTES_FORMULA, extra=extra, impl_extra=impl_extra)
        for name in impls:
            e = impl_extra[name]
            print(f"  {'':<40} {name:<26} tracked peak {e['tracked_peak_mb']:.1f} MB"
                  + (f" ({e['peak_vs_monai']:.3f}x monai, {e['accumulation_vs_monai']:.3f}x beyond the network)"
                     if "peak_vs_monai" in e else ""))
        t = {r["impl"]: r.get("ms") for r in bench.rows if r["case"] == case}
        for impl, peer in (("fastmed", "monai"), ("fastmed-labels", "monai+argmax")):
            r = bench.ratios(case, peer, against=impl)
            if r is not None:
                print(f"  {case}: {impl} speed-up over {peer}: {r:.2f}x")
            if t.get(impl) and t.get("network-only"):
                share = (t[impl] - t["network-only"]) / t["network-only"]
                print(f"  {case}: {impl} time beyond the network: {100 * share:.1f}% of the network's")
        del net, x
    if not args.memory_only:
        bench.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
