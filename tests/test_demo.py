"""``python -m fastmed demo``: the tiny configuration end to end, the Decathlon loader, errors."""
import importlib.util
import json
import os
import re

import pytest
import torch

from fastmed import demo


def test_phantoms_have_three_classes():
    images, labels = demo.make_phantoms(3, size=16, seed=1)
    assert images.shape == (3, 1, 16, 16, 16) and labels.shape == (3, 1, 16, 16, 16)
    assert set(labels.unique().tolist()) == {0, 1, 2}
    # the classes are separable by intensity on average (what the network has to learn)
    means = [images[labels == c].mean().item() for c in range(3)]
    assert means[0] < means[1] < means[2]


def test_demo_tiny_end_to_end(tmp_path, capsys):
    from fastmed.__main__ import main

    threads = torch.get_num_threads()
    assert main(["demo", "--tiny", "--epochs", "3", "--out", str(tmp_path), "--seed", "0"]) == 0
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    out = capsys.readouterr().out
    assert "backends (fastmed ops" in out
    from fastmed import _backend

    cpu = torch.device("cpu")
    for op in ("conv_block", "losses", "norm_act"):  # what auto really runs here (cpp where fastmed._C is built)
        assert f"{op:<11} -> {_backend.choose(op, cpu)}" in out, (op, _backend.choose(op, cpu), out)
    assert out.count("val Dice") == 3
    png = tmp_path / "fastmed_demo.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists() and "matplotlib is not installed" in out


def test_demo_training_raises_dice():
    images, labels = demo.make_phantoms(12, size=16, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core CI machine runs one thread many times faster than two
    try:
        res = demo.train(images, labels, ["background", "organ", "lesion"], epochs=8, batch_size=3,
                         features=(8, 16), lr=3e-3, device=torch.device("cpu"), seed=0, out=None, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert res["losses"][-1] < 0.8 * res["losses"][0]
    first, last = sum(res["dices"][0]) / 2, sum(res["dices"][-1]) / 2
    assert last > first + 0.2, res["dices"]


def _write_decathlon(root, n=4, size=12, modalities=1):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    images, labels = demo.make_phantoms(n, size=size, seed=3)
    training = []
    for i in range(n):
        img = images[i, 0].numpy()
        if modalities > 1:
            img = np.stack([img * (m + 1) for m in range(modalities)], axis=-1)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / f"case_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(labels[i, 0].numpy().astype("uint8"), np.eye(4)),
                 str(root / "labelsTr" / f"case_{i}.nii.gz"))
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": "phantoms", "labels": {"0": "background", "1": "organ", "2": "lesion"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_demo_on_decathlon_folder(tmp_path, capsys):
    data = tmp_path / "Task00_Phantom"
    _write_decathlon(data, modalities=2)
    images, labels, names = demo.load_decathlon(str(data), size=8)
    assert images.shape == (4, 2, 8, 8, 8) and labels.shape == (4, 1, 8, 8, 8) and names[2] == "lesion"
    assert demo.main(["--data", str(data), "--tiny", "--epochs", "1", "--out", str(tmp_path / "out")]) == 0
    assert "val Dice: organ" in capsys.readouterr().out
    assert (tmp_path / "out" / "fastmed_demo.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def _write_nnunet_v2(root, n=4, size=12, channels=2, explicit=False):
    """An nnU-Net v2 raw dataset folder as nnU-Net's docs lay it out: imagesTr/<case>_<XXXX>.nii.gz (one file per
    channel), labelsTr/<case>.nii.gz, dataset.json without a 'training' list (or, explicit=True, with nnU-Net's
    optional 'dataset' entry and files in other places)."""
    nib = pytest.importorskip("nibabel")
    import numpy as np

    images, labels = demo.make_phantoms(n, size=size, seed=4)
    sub = "raw" if explicit else ""
    os.makedirs(root / sub / "imagesTr")
    os.makedirs(root / sub / "labelsTr")
    dataset = {}
    for i in range(n):
        case = f"phantom_{i:03d}"
        files = []
        for c in range(channels):
            f = f"{sub + '/' if sub else ''}imagesTr/{case}_{c:04d}.nii.gz"
            nib.save(nib.Nifti1Image(images[i, 0].numpy() * (c + 1), np.eye(4)), str(root / f))
            files.append(f)
        label = f"{sub + '/' if sub else ''}labelsTr/{case}.nii.gz"
        nib.save(nib.Nifti1Image(labels[i, 0].numpy().astype("uint8"), np.eye(4)), str(root / label))
        dataset[case] = {"images": files, "label": label}
    meta = {"channel_names": {str(c): f"MR{c}" for c in range(channels)},
            "labels": {"background": 0, "organ": 1, "lesion": 2}, "numTraining": n, "file_ending": ".nii.gz"}
    if explicit:
        meta["dataset"] = dataset
    (root / "dataset.json").write_text(json.dumps(meta))
    return images, labels


@pytest.mark.parametrize("explicit", [False, True])
def test_demo_on_nnunet_v2_folder(tmp_path, capsys, explicit):
    data = tmp_path / "Dataset001_Phantom"
    images, labels = _write_nnunet_v2(data, explicit=explicit)
    x, y, names = demo.load_dataset(str(data), size=12)
    assert x.shape == (4, 2, 12, 12, 12) and y.shape == (4, 1, 12, 12, 12)
    assert names == ["background", "organ", "lesion"]
    torch.testing.assert_close(y, labels)  # same size: the label maps come back unchanged, cases in order
    z = (images - images.mean(dim=(2, 3, 4), keepdim=True)) / images.std(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(x[:, 1:], z, atol=1e-4, rtol=1e-4)  # channel 1 (= 2 x image) z-scored
    assert demo.main(["--data", str(data), "--tiny", "--epochs", "1", "--out", str(tmp_path / "out")]) == 0
    assert "val Dice: organ" in capsys.readouterr().out


def _one_line_error(capsys, argv, pattern):
    from fastmed.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_demo_data_errors_print_one_line(tmp_path, capsys):
    pytest.importorskip("nibabel")
    base = ["demo", "--tiny", "--epochs", "1", "--out", str(tmp_path / "out"), "--data"]
    _one_line_error(capsys, base + [str(tmp_path / "nowhere")], "found none in")
    data = tmp_path / "Dataset002_Phantom"
    _write_nnunet_v2(data, channels=1)
    meta = json.loads((data / "dataset.json").read_text())

    def rewrite(**change):
        (data / "dataset.json").write_text(json.dumps({**meta, **change}))

    rewrite(file_ending=".png")
    _one_line_error(capsys, base + [str(data)], r"file_ending '\.png' is not NIfTI")
    rewrite(numTraining=7)
    _one_line_error(capsys, base + [str(data)], r"numTraining=7 but 4 cases")
    rewrite(labels={"background": 0, "organ": [1, 2]})
    _one_line_error(capsys, base + [str(data)], "region-based labels")
    rewrite(labels={"background": 0, "organ": 1})
    _one_line_error(capsys, base + [str(data)], r"classes 0..2 but dataset.json names only 2 labels")
    rewrite(channel_names={"0": "T1", "1": "T2"})
    _one_line_error(capsys, base + [str(data)], r"has channels \[0\], but channel_names lists 2")
    rewrite()
    os.remove(data / "labelsTr" / "phantom_002.nii.gz")
    _one_line_error(capsys, base + [str(data)], r"label '.*phantom_002.nii.gz' does not exist")
    (data / "labelsTr" / "phantom_002.nii.gz").write_bytes(b"not a nifti")
    _one_line_error(capsys, base + [str(data)], r"could not be read as NIfTI")
    (data / "dataset.json").write_text("{not json")
    _one_line_error(capsys, base + [str(data)], "is not valid JSON")
    (data / "dataset.json").write_text(json.dumps({"name": "x"}))
    _one_line_error(capsys, base + [str(data)], "neither 'training'")


def test_demo_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dataset.json"):
        demo.load_decathlon(str(tmp_path))
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])


def test_plain_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm now raises ImportError
    bar = demo._Progress(4, "epoch 1/1")
    for _ in range(4):
        bar.update(0.5)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 1/1 [" in err and "4/4 loss 0.500" in err
