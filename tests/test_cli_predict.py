"""``python -m fastmed predict --model CKPT --input volume.nii.gz --out seg.nii.gz`` end to end on a tiny model.

nibabel (the ``demo`` extra) reads and writes NIfTI; without it these tests are skipped and ``predict`` says how to
install it.  Expected labels come from MONAI's ``sliding_window_inference`` on the same model, then argmax.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmed import demo, inference
from fastmed.models import UNet

nib = pytest.importorskip("nibabel")
monai_swi = pytest.importorskip("monai.inferers").sliding_window_inference
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KWARGS = dict(features=[4, 8], strides=[1, 2], norm="instance", act="leaky_relu")


def _model(cin=1, classes=3, seed=0):
    torch.manual_seed(seed)
    return UNet(3, cin, classes, **MODEL_KWARGS).eval()


def _volume(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.float32)


def _nifti(path, data, *, slope=None):
    """A NIfTI with a rotated, shifted affine, anisotropic zooms, qform/sform codes and a description."""
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * c, -0.8 * s, 0, -12.5], [0.8 * s, 0.8 * c, 0, 30.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"fastmed test volume"
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return img


def _expected(model, x, roi, overlap=0.5):
    with torch.no_grad():
        return monai_swi(x, roi, 1, model, overlap, "gaussian").argmax(1)[0]


def test_predict_end_to_end(tmp_path):
    """The command in a fresh interpreter: labels equal MONAI's argmax, affine and header kept, a progress bar."""
    model = _model()
    ckpt = inference.save_checkpoint(str(tmp_path / "m.pt"), model, (3, 1, 3), MODEL_KWARGS,
                                     classes=["background", "a", "b"], roi_size=[8, 8, 8], overlap=0.5)
    data = _volume((13, 11, 9))
    _nifti(tmp_path / "in.nii.gz", data)
    src = nib.load(str(tmp_path / "in.nii.gz"))  # as stored (float32 sform)
    out = tmp_path / "seg.nii.gz"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "fastmed", "predict", "--model", ckpt, "--input",
                          str(tmp_path / "in.nii.gz"), "--out", str(out), "--device", "cpu"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "background:" in run.stdout
    assert "sliding window" in run.stderr  # the progress bar (tqdm or the plain one)
    seg = nib.load(str(out))
    assert seg.get_data_dtype() == np.uint8 and seg.shape == data.shape
    np.testing.assert_array_equal(seg.affine, src.affine)
    for key in ("qform_code", "sform_code", "pixdim", "descrip", "xyzt_units", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(seg.header[key], src.header[key], err_msg=key)
    want = _expected(model, torch.from_numpy(data)[None, None], (8, 8, 8))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), want.numpy().astype(np.uint8))


def test_predict_four_channels_last_zscore_resize(tmp_path, capsys):
    """4D input (channels on the last axis), the checkpoint's z-score and resize; a scaled input header does not
    scale the labels."""
    from fastmed.__main__ import main

    model = _model(cin=2, classes=4, seed=3)
    ckpt = inference.save_checkpoint(str(tmp_path / "m.pt"), "UNet", (3, 2, 4), MODEL_KWARGS,
                                     state_dict=model.state_dict(), roi_size=[8, 8, 8], normalize="zscore",
                                     resize=[12, 12, 12], overlap=0.25, mode="gaussian")
    data = _volume((10, 14, 9, 2), seed=4) * 50 + 100
    _nifti(tmp_path / "in.nii.gz", data, slope=(2.0, 5.0))
    assert main(["predict", "--model", ckpt, "--input", str(tmp_path / "in.nii.gz"), "--out",
                 str(tmp_path / "seg.nii.gz"), "--no-progress"]) == 0
    assert "sliding window" not in capsys.readouterr().err
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == (10, 14, 9)
    x = torch.as_tensor(nib.load(str(tmp_path / "in.nii.gz")).get_fdata(dtype="float32")).permute(3, 0, 1, 2)
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
    x = F.interpolate(x[None], size=(12, 12, 12), mode="trilinear", align_corners=False)
    small = _expected(model, x, (8, 8, 8), overlap=0.25)
    want = F.interpolate(small[None, None].float(), size=(10, 14, 9), mode="nearest")[0, 0]
    np.testing.assert_array_equal(seg.get_fdata(), want.numpy())  # get_fdata applies any scaling: none


def test_predict_with_the_demo_checkpoint(tmp_path):
    """The demo writes a checkpoint that ``predict`` reads (features and strides of the demo's UNet)."""
    images, labels = demo.make_phantoms(4, size=16, seed=0)
    res = demo.train(images, labels, ["background", "organ", "lesion"], epochs=1, batch_size=2, features=(4, 8),
                     lr=3e-3, device=torch.device("cpu"), seed=0, out=str(tmp_path), quiet=True)
    assert res["checkpoint"] == str(tmp_path / "fastmed_demo.pt")
    model, ckpt = inference.load_checkpoint(res["checkpoint"])
    assert ckpt["classes"] == ["background", "organ", "lesion"] and ckpt["inference"]["roi_size"] == [16, 16, 16]
    volume = images[0]
    got = inference.predict_volume(model, volume, ckpt)
    with torch.no_grad():
        want = model(volume[None]).argmax(1)[0]  # one window covers the volume: the network's own argmax
    assert got.dtype == torch.uint8 and torch.equal(got.long(), want)


def test_predict_errors(tmp_path, capsys):
    from fastmed.__main__ import main

    data = tmp_path / "in.nii.gz"
    _nifti(data, _volume((6, 6, 6)))
    not_ckpt = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, str(not_ckpt))
    ckpt = inference.save_checkpoint(str(tmp_path / "m.pt"), _model(), (3, 1, 3), MODEL_KWARGS, roi_size=[4, 4, 4])
    cases = [
        (["--model", str(tmp_path / "missing.pt"), "--input", str(data)], "--model: no such file"),
        (["--model", ckpt, "--input", str(tmp_path / "missing.nii.gz")], "--input: no such file"),
        (["--model", str(not_ckpt), "--input", str(data)], "is not a fastmed checkpoint"),
        (["--model", ckpt, "--input", str(data), "--overlap", "1"], "--overlap must be in [0, 1)"),
        (["--model", ckpt, "--input", str(data), "--sw-batch-size", "0"], "--sw-batch-size must be >= 1"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            main(["predict", *args, "--out", str(tmp_path / "o.nii.gz")])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="model must be a class of fastmed.models"):
        inference.save_checkpoint(str(tmp_path / "n.pt"), torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="normalize must be one of"):
        inference.save_checkpoint(str(tmp_path / "n.pt"), _model(), (3, 1, 3), MODEL_KWARGS, normalize="minmax")


def test_plain_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    x = torch.zeros(1, 1, 12, 8)
    inference.sliding_window_inference(x, (4, 4), 2, lambda w: w, 0.0, progress=True)
    err = capsys.readouterr().err
    assert "sliding window [" in err and "3/3" in err  # 6 windows, 2 per call
