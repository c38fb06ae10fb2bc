"""fastmed.medsam.predict: MedSAM's box-prompt pipeline, against segment_anything's modules run step by step."""
import pytest
import torch
import torch.nn.functional as F
from test_sam_model import _pair

from fastmed import medsam

pytestmark = pytest.mark.usefixtures("one_thread")


def _medsam_pair():
    """The tiny segment_anything / fastmed pair with the single-mask hypernetwork's output scaled down, so that the
    random-weight logits straddle 0 (a mask that is neither empty nor full)."""
    theirs, ours = _pair(True)
    last = theirs.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        last.weight.mul_(0.02)
        last.bias.zero_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _medsam_by_hand(theirs, image2d, box):
    """MedSAM_Inference.py's steps with segment_anything's modules (torch's bicubic resize, as fastmed documents)."""
    H, W = image2d.shape
    x = F.interpolate(image2d.double()[None, None].expand(1, 3, H, W), size=(64, 64), mode="bicubic",
                      align_corners=False, antialias=True)
    x = ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)).float()
    b = torch.tensor(box, dtype=torch.float64) / torch.tensor([W, H, W, H]) * 64
    emb = theirs.image_encoder(x)
    sparse, dense = theirs.prompt_encoder(points=None, boxes=b.float()[None, None], masks=None)
    logits, _ = theirs.mask_decoder(emb, theirs.prompt_encoder.get_dense_pe(), sparse, dense, False)
    prob = F.interpolate(torch.sigmoid(logits), size=(H, W), mode="bilinear", align_corners=False)
    return prob[0, 0], prob[0, 0] > 0.5


def _agree(mask, prob, want):
    """Equal masks, except where the probability is within float noise of the threshold."""
    near = (prob - 0.5).abs() < 1e-4
    assert torch.equal(mask[~near], want[~near])


def test_predict_2d_equals_medsam_steps():
    theirs, ours = _medsam_pair()
    image = torch.rand(50, 40, generator=torch.Generator().manual_seed(0)) * 900 - 100
    box = (4.0, 6.0, 30.0, 41.0)
    with torch.no_grad():
        prob, want = _medsam_by_hand(theirs, image, box)
    before = image.clone()
    mask = medsam.predict(image, box, ours)
    assert mask.dtype == torch.bool and mask.shape == (50, 40)
    assert torch.equal(image, before)
    assert 0 < want.sum() < want.numel(), "degenerate test: the reference mask is empty or full"
    _agree(mask, prob, want)


def test_predict_volume_slice_by_slice_and_batching():
    _, ours = _medsam_pair()
    vol = torch.rand(5, 30, 20, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[2.0, 3.0, 15.0, 25.0]] * 5) + torch.arange(5.0)[:, None]
    a = medsam.predict(vol, boxes, ours, batch_size=2)
    b = medsam.predict(vol, boxes, ours, batch_size=5)
    assert a.shape == (5, 30, 20)
    assert 0 < a.sum() < a.numel(), "degenerate test: every mask is empty or full"
    assert torch.equal(a, b)
    for d in range(5):
        assert torch.equal(a[d], medsam.predict(vol[d], boxes[d], ours))


def test_predict_errors():
    _, ours = _pair(True)
    img = torch.rand(10, 10)
    with pytest.raises(ValueError, match="box must be"):
        medsam.predict(img, (1, 2, 3), ours)
    with pytest.raises(ValueError, match="x0 <= x1"):
        medsam.predict(img, (5, 2, 3, 8), ours)
    with pytest.raises(ValueError, match="image must be"):
        medsam.predict(torch.rand(2, 3, 4, 5), (1, 2, 3, 4), ours)
    with pytest.raises(TypeError, match="model must be"):
        medsam.predict(img, (1, 2, 3, 4), object())
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        medsam.predict(img.numpy(), (1, 2, 3, 4), ours)
    with pytest.raises(ValueError, match="batch_size"):
        medsam.predict(img, (1, 2, 3, 4), ours, batch_size=0)


def test_cli_writes_mask_and_overlay(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import numpy as np

    from fastmed.__main__ import main

    np.save(tmp_path / "img.npy", np.random.default_rng(0).random((40, 30)).astype("float32"))
    out = tmp_path / "m.png"
    rc = main(["medsam", "--image", str(tmp_path / "img.npy"), "--box", "3,4,20,30", "--out", str(out), "--tiny",
               "--device", "cpu"])
    said = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in said
    import matplotlib.image as mpimg

    assert mpimg.imread(out).shape[:2] == (40, 30)
    assert mpimg.imread(tmp_path / "m_overlay.png").shape[:2] == (40, 30)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from fastmed.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["medsam", "--image", "x.npy", "--box", "1,2,3"])
    assert e.value.code == 2
    assert "--box must be four numbers" in capsys.readouterr().err
    rc = main(["medsam", "--image", str(tmp_path / "missing.npy"), "--box", "1,2,3,4", "--tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read --image" in err and len(err.strip().splitlines()) == 1


def test_cli_checkpoint(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import numpy as np

    from fastmed.__main__ import main

    _, ours = _medsam_pair()
    torch.save(ours.state_dict(), tmp_path / "ck.pth")
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    img = np.random.default_rng(1).random((30, 20)).astype("float32")
    np.save(tmp_path / "img.npy", img)
    args = ["medsam", "--image", str(tmp_path / "img.npy"), "--box", "2,3,15,25", "--tiny", "--device", "cpu"]
    assert main(args + ["--checkpoint", str(tmp_path / "ck.pth"), "--out", str(tmp_path / "m.png")]) == 0
    assert "RANDOM" not in capsys.readouterr().out
    import matplotlib.image as mpimg

    written = mpimg.imread(tmp_path / "m.png")[..., 0] > 0.5
    want = medsam.predict(torch.from_numpy(img), (2, 3, 15, 25), ours)
    assert torch.equal(torch.from_numpy(written), want)
    assert main(args + ["--checkpoint", str(tmp_path / "bad.pth")]) == 2
    assert "cannot load --checkpoint" in capsys.readouterr().err
