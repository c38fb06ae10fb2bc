"""``python -m fastmed demo``: train a small 3D U-Net from fastmed blocks on synthetic phantoms (no download).

The phantoms: noisy volumes holding one large ellipsoid "organ" (class 1) with a small sphere "lesion"
(class 2) inside it, at random positions, sizes and contrasts, with a smooth bias field.  The model is a
:class:`fastmed.models.UNet` (instance norm + LeakyReLU conv blocks, strided-conv down, transposed-conv up)
trained with fastmed's fused Dice + cross-entropy (:class:`fastmed.nn.DiceCELoss`) and Adam.  Each epoch
prints the validation Dice per class; at the end a PNG shows the loss / Dice curves and a slice of
prediction vs label.

``--data PATH`` trains on a Medical Segmentation Decathlon folder (``dataset.json`` listing ``training`` cases,
``imagesTr/``, ``labelsTr/``) or an nnU-Net v2 raw dataset folder (``dataset.json`` with ``channel_names``,
``labels``, ``numTraining``, ``file_ending``; ``imagesTr/<case>_<XXXX>.nii.gz``) instead, NIfTI read through
nibabel: volumes are z-scored and resized to ``--size``^3.  A folder that cannot be read is reported in one
line (exit status 2), not a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["main", "make_phantoms", "load_dataset", "load_decathlon", "load_nnunet_v2", "dice_per_class"]


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def make_phantoms(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic volumes: images ``(n, 1, size, size, size)`` float32, labels ``(n, 1, S, S, S)`` int64
    in {0: background, 1: organ (ellipsoid), 2: lesion (sphere inside the organ)}."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")

    def rand(lo, hi, shape=()):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    images, labels = [], []
    for _ in range(n):
        center = rand(-0.25, 0.25, (3,))
        radii = rand(0.3, 0.6, (3,))
        organ = ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + \
                ((x - center[2]) / radii[2]) ** 2 <= 1
        r_les = float(rand(0.18, 0.28))
        offset = (rand(-0.5, 0.5, (3,)) * (radii - r_les).clamp_min(0))
        lc = center + offset
        lesion = ((z - lc[0]) ** 2 + (y - lc[1]) ** 2 + (x - lc[2]) ** 2 <= r_les ** 2) & organ
        label = organ.long() + lesion.long()
        contrast = torch.stack([torch.zeros(()), rand(0.6, 1.0), rand(1.8, 2.4)])
        bias = 1 + 0.2 * (z * rand(-1, 1) + y * rand(-1, 1) + x * rand(-1, 1))
        img = contrast[label] * bias + 0.6 * torch.randn((size,) * 3, generator=g)
        images.append(img)
        labels.append(label)
    return torch.stack(images)[:, None].float(), torch.stack(labels)[:, None]


def load_dataset(path: str, size: int = 48, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Read a dataset folder for ``--data``: a Medical Segmentation Decathlon folder (its ``dataset.json`` lists
    ``"training"`` cases, :func:`load_decathlon`) or an nnU-Net v2 raw dataset folder (``dataset.json`` with
    ``channel_names`` / ``file_ending``, :func:`load_nnunet_v2`).  Same returns as :func:`load_decathlon`;
    ``ValueError`` with one line naming the file or entry for anything the folder lacks."""
    meta = _read_dataset_json(path)
    if "training" in meta:
        return load_decathlon(path, size, limit)
    if "file_ending" in meta or "channel_names" in meta:
        return load_nnunet_v2(path, size, limit)
    raise ValueError(f"{os.path.join(path, 'dataset.json')} has neither 'training' (Decathlon layout) nor "
                     f"'channel_names'/'file_ending' (nnU-Net v2 layout)")


def _read_dataset_json(path: str) -> dict:
    meta_path = os.path.join(path, "dataset.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"--data must be a Decathlon or nnU-Net v2 dataset folder with a dataset.json, found none "
                         f"in {path!r}")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _class_names(meta: dict, meta_path: str) -> list:
    """``"labels"`` as ``{"0": "background", ...}`` (MSD) or ``{"background": 0, ...}`` (nnU-Net v2)."""
    labels_meta = meta.get("labels")
    if not isinstance(labels_meta, dict) or not labels_meta:
        raise ValueError(f"{meta_path} must have a non-empty 'labels' object")
    if all(str(k).isdigit() for k in labels_meta):
        return [labels_meta[k] for k in sorted(labels_meta, key=int)]
    if not all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in labels_meta.values()):
        raise ValueError(f"{meta_path}: 'labels' must map each name to one integer class (region-based labels, "
                         f"lists of classes, are not supported by the demo), got {labels_meta!r}")
    return [k for k, _ in sorted(labels_meta.items(), key=lambda kv: int(kv[1]))]


def _nib():
    try:
        import nibabel as nib
    except ImportError as exc:
        raise RuntimeError("--data needs nibabel to read NIfTI files: pip install nibabel") from exc
    return nib


def _read_volume(nib, file: str, what: str) -> torch.Tensor:
    if not os.path.isfile(file):
        raise ValueError(f"{what} {file!r} does not exist")
    try:
        return torch.as_tensor(nib.load(file).get_fdata(dtype="float32"))
    except Exception as exc:  # nibabel raises its own ImageFileError, OSError, EOFError, ... per format problem
        raise ValueError(f"{what} {file!r} could not be read as NIfTI: {exc}") from None


def _load_cases(cases: list, size: int, names: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``cases``: (channel images: one 3D/4D file or one 3D file per channel, label file) per case."""
    nib = _nib()
    images, labels = [], []
    for files, label_file in cases:
        vols = [_read_volume(nib, f, "image") for f in files]
        lab = _read_volume(nib, label_file, "label").round().long()
        img = torch.stack(vols, dim=-1) if len(vols) > 1 else vols[0]
        if img.dim() == 3:
            img = img[..., None]
        if img.dim() != 4 or lab.dim() != 3 or img.shape[:3] != lab.shape:
            raise ValueError(f"case {files[0]}: image {tuple(img.shape)} and label {tuple(lab.shape)} must "
                             f"be 3D volumes of the same size (image may carry modalities on a 4th axis)")
        img = img.permute(3, 0, 1, 2)
        img = (img - img.mean(dim=(1, 2, 3), keepdim=True)) / img.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        images.append(F.interpolate(img[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0])
        labels.append(F.interpolate(lab[None, None].float(), size=(size,) * 3, mode="nearest")[0].long())
    lab_t = torch.stack(labels)
    if int(lab_t.max()) >= len(names) or int(lab_t.min()) < 0:
        raise ValueError(f"label maps hold classes {int(lab_t.min())}..{int(lab_t.max())} but dataset.json names "
                         f"only {len(names)} labels")
    return torch.stack(images), lab_t, names


def _enough(cases: list, meta_path: str) -> None:
    if len(cases) < 2:
        raise ValueError(f"{meta_path} gives {len(cases)} training cases; the demo needs at least 2 "
                         f"(one to validate on)")


def load_decathlon(path: str, size: int = 48, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Read a Medical Segmentation Decathlon folder: ``dataset.json`` (``"training": [{"image", "label"}]``,
    ``"labels"`` as ``{"0": "background", ...}`` (MSD) or ``{"background": 0, ...}`` (nnU-Net v2)), NIfTI images
    (3D, or 4D with modalities on the last axis) and label maps.  Each image is z-scored per channel and
    resized (trilinear) to ``size``^3, each label map resized by nearest neighbour.

    Returns images ``(n, C, S, S, S)`` float32, labels ``(n, 1, S, S, S)`` int64 and the class names."""
    meta = _read_dataset_json(path)
    meta_path = os.path.join(path, "dataset.json")
    if "training" not in meta or "labels" not in meta:
        raise ValueError(f"{meta_path} must have 'training' and 'labels' entries (Decathlon layout)")
    names = _class_names(meta, meta_path)
    training = meta["training"]
    if not isinstance(training, list) or not all(isinstance(c, dict) and "image" in c and "label" in c
                                                 for c in training):
        raise ValueError(f"{meta_path}: 'training' must list {{\"image\": ..., \"label\": ...}} entries")
    cases = training[:limit] if limit else training
    _enough(cases, meta_path)
    return _load_cases([([os.path.join(path, c["image"])], os.path.join(path, c["label"])) for c in cases], size,
                       names)


def load_nnunet_v2(path: str, size: int = 48, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Read an nnU-Net v2 raw dataset folder (``DatasetXXX_Name``): ``dataset.json`` with ``channel_names``
    (``{"0": "CT", ...}``), ``labels`` (``{"background": 0, "organ": 1, ...}``), ``numTraining`` and
    ``file_ending`` (``.nii.gz`` / ``.nii``: the demo reads NIfTI), and either the cases found in ``imagesTr/``
    (``<case>_<XXXX><file_ending>``, one file per channel XXXX) with ``labelsTr/<case><file_ending>``, or, as
    nnU-Net also allows, a ``"dataset"`` entry ``{case: {"images": [...], "label": ...}}`` (paths relative to
    the folder or absolute).  Preprocessing and returns as :func:`load_decathlon`."""
    meta = _read_dataset_json(path)
    meta_path = os.path.join(path, "dataset.json")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise ValueError(f"{meta_path} must have a {key!r} entry (nnU-Net v2 layout)")
    names = _class_names(meta, meta_path)
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{meta_path}: file_ending {ending!r} is not NIfTI (.nii.gz / .nii); the demo reads NIfTI "
                         f"only")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise ValueError(f"{meta_path}: 'channel_names' must be a non-empty object such as {{\"0\": \"CT\"}}")
    if "dataset" in meta:
        entries = meta["dataset"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and "images" in e and "label" in e
                                                    for e in entries.values()):
            raise ValueError(f"{meta_path}: 'dataset' must map each case to {{\"images\": [...], \"label\": ...}}")
        cases = [([os.path.join(path, os.path.expandvars(f)) for f in e["images"]],
                  os.path.join(path, os.path.expandvars(e["label"]))) for _, e in sorted(entries.items())]
    else:
        cases = _nnunet_cases(path, ending, len(channels))
    if "numTraining" in meta and meta["numTraining"] != len(cases):
        raise ValueError(f"{meta_path} says numTraining={meta['numTraining']!r} but {len(cases)} cases were found")
    cases = cases[:limit] if limit else cases
    _enough(cases, meta_path)
    return _load_cases(cases, size, names)


def _nnunet_cases(path: str, ending: str, n_channels: int) -> list:
    """(channel files, label file) of each case in ``imagesTr/`` (``<case>_<XXXX><ending>``), sorted by case."""
    images_dir, labels_dir = os.path.join(path, "imagesTr"), os.path.join(path, "labelsTr")
    for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
            raise ValueError(f"nnU-Net v2 dataset {path!r} has no {os.path.basename(d)}/ folder")
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict = {}
    for name in os.listdir(images_dir):
        match = pattern.fullmatch(name)
        if match is not None:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    cases = []
    for case in sorted(found):
        if found[case] != set(range(n_channels)):
            raise ValueError(f"case {case!r} in {images_dir} has channels {sorted(found[case])}, but channel_names "
                             f"lists {n_channels} (files {case}_0000{ending} ...)")
        cases.append(([os.path.join(images_dir, f"{case}_{c:04d}{ending}") for c in range(n_channels)],
                      os.path.join(labels_dir, case + ending)))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class over the whole set (labels ``(N, 1, *sp)``, predictions ``(N, *sp)``)."""
    out = []
    lab = label[:, 0]
    for c in range(1, num_classes):
        p, t = pred == c, lab == c
        denom = int(p.sum() + t.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


class _Progress:
    """tqdm when installed, else a plain one-line bar on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.n, self.desc, self.postfix = total, 0, desc, ""

    def update(self, loss: float) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._bar.update(1)
            return
        width = 30
        done = width * self.n // self.total
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                         f"loss {loss:.3f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


_DEMO_OPS = ("conv_block", "norm_act", "losses")  # the fastmed ops a UNet + DiceCELoss training step runs


def _backends_lines(device: torch.device) -> list[str]:
    """Per op the demo runs: the backend chosen on ``device`` and why the preferred ones were not."""
    from fastmed import _backend

    lines = []
    for name, picked, reasons in _backend.explain(device):
        if name not in _DEMO_OPS:
            continue
        why = "; ".join(f"{b}: {r}" for b, r in reasons.items() if r is not None and b != picked)
        lines.append(f"  {name:<11} -> {picked}" + (f"   ({why})" if why else ""))
    return lines


def _save_png(path: str, losses: list, dices: list, class_names: list, image, label, pred) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].plot(range(1, len(losses) + 1), losses, marker="o")
    axes[0].set(title="training loss (Dice + CE)", xlabel="epoch")
    for c, name in enumerate(class_names[1:]):
        axes[1].plot(range(1, len(dices) + 1), [d[c] for d in dices], marker="o", label=name)
    axes[1].set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    axes[1].legend()
    z = int(label.flatten(1).gt(0).sum(1).argmax()) if bool(label.gt(0).any()) else label.shape[0] // 2
    for ax, seg, title in ((axes[2], label, "label"), (axes[3], pred, "prediction")):
        ax.imshow(image[z], cmap="gray")
        masked = torch.where(seg[z] > 0, seg[z].float(), torch.tensor(float("nan")))
        ax.imshow(masked, cmap="autumn", alpha=0.5, vmin=1, vmax=max(len(class_names) - 1, 1))
        ax.set(title=f"{title} (slice {z})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train(images, labels, class_names, *, epochs: int, batch_size: int, features, lr: float, device: torch.device,
          seed: int, out: Optional[str], quiet: bool = False) -> dict:
    """Train and validate; returns ``{"losses", "dices", "seconds", "png"}``."""
    from fastmed.models import UNet
    from fastmed.nn import DiceCELoss

    torch.manual_seed(seed)
    n_val = max(1, len(images) // 5)
    x_tr, y_tr = images[n_val:].to(device), labels[n_val:].to(device)
    x_va, y_va = images[:n_val].to(device), labels[:n_val].to(device)
    num_classes = len(class_names)
    strides = (1,) + (2,) * (len(features) - 1)
    model = UNet(3, images.shape[1], num_classes, features=features, strides=strides,
                 norm="instance", act="leaky_relu").to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = math.ceil(len(x_tr) / batch_size)
    say = (lambda *a: None) if quiet else print
    say(f"fastmed demo: {len(x_tr)} training / {len(x_va)} validation volumes of {tuple(images.shape[1:])}, "
        f"{num_classes} classes, UNet features {tuple(features)} "
        f"({sum(p.numel() for p in model.parameters()) / 1e3:.1f}k parameters), device {device}")
    say("backends (fastmed ops this training step runs):")
    for line in _backends_lines(device):
        say(line)
    losses, dices = [], []
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_tr), generator=g)
        bar = _Progress(steps, f"epoch {epoch}/{epochs}") if not quiet else None
        total = 0.0
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size].to(device)
            xb, yb = x_tr[idx], y_tr[idx]
            if torch.rand((), generator=g) < 0.5:  # flip augmentation
                xb, yb = xb.flip(-1), yb.flip(-1)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if bar is not None:
                bar.update(float(loss.detach()))
        if bar is not None:
            bar.close()
        losses.append(total / steps)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_va[i:i + batch_size]).argmax(1) for i in range(0, len(x_va), batch_size)])
        dices.append(dice_per_class(pred, y_va, num_classes))
        per_class = "  ".join(f"{name} {d:.3f}" for name, d in zip(class_names[1:], dices[-1]))
        say(f"epoch {epoch:3d}  loss {losses[-1]:.4f}  val Dice: {per_class}  "
            f"(mean {sum(dices[-1]) / len(dices[-1]):.3f})  [{time.perf_counter() - t0:.1f}s]")
    seconds = time.perf_counter() - t0
    png = None
    if out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            say("matplotlib is not installed: no PNG written (pip install 'fastmed[demo]')")
        else:
            os.makedirs(out, exist_ok=True)
            png = os.path.join(out, "fastmed_demo.png")
            _save_png(png, losses, dices, class_names, x_va[0, 0].float().cpu(), y_va[0, 0].cpu(), pred[0].cpu())
            say(f"wrote {png}")
    return {"losses": losses, "dices": dices, "seconds": seconds, "png": png}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmed demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Medical Segmentation Decathlon or nnU-Net v2 dataset folder (dataset.json, "
                                       "imagesTr, labelsTr); default: built-in synthetic phantoms")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 15; 2 with --tiny)")
    parser.add_argument("--out", default="fastmed_demo_out", help="folder for the PNG (default: fastmed_demo_out)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="volume edge (default 32; --data: 48)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: half the cores, at most 4; oversubscribed threads on a busy "
                             "machine are many times slower than one)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' configuration (for tests)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here")
    torch.manual_seed(args.seed)
    if args.tiny:
        epochs, size, n, features, batch = args.epochs or 2, args.size or 16, 6, (4, 8), 2
    else:
        epochs, size, n, features, batch = args.epochs or 15, args.size or 32, 48, (8, 16, 32), 4
    if size % (2 ** (len(features) - 1)):
        parser.error(f"--size must be divisible by {2 ** (len(features) - 1)}, got {size}")
    if args.data:
        try:
            images, labels, names = load_dataset(args.data, size=args.size or (16 if args.tiny else 48))
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"python -m fastmed demo: error: --data {args.data}: {exc}", file=sys.stderr)
            return 2
    else:
        images, labels = make_phantoms(n, size, seed=args.seed)
        names = ["background", "organ", "lesion"]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
    try:
        result = train(images, labels, names, epochs=epochs, batch_size=batch, features=features, lr=3e-3,
                       device=device, seed=args.seed, out=args.out)
    finally:
        torch.set_num_threads(threads_before)
    mean = [sum(d) / len(d) for d in result["dices"]]
    print(f"done in {result['seconds']:.1f}s: mean validation Dice {mean[0]:.3f} (epoch 1) -> {mean[-1]:.3f} "
          f"(epoch {len(mean)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
