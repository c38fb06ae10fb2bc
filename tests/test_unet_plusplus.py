"""fastmed.models.UNetPlusPlus: parameter count (an independent formula), nested structure, deep supervision,
pruning, fused vs plain PyTorch, checkpointing, the Triton backend (interpreter) on a tiny case, errors."""
import pytest
import torch
from model_support import assert_autocast_and_compile, assert_triton_matches_reference, fused_and_plain
from model_support import grads as _grads

from fastmed.models import UNetPlusPlus

pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_count(sd, cin, cout, feats, heads):
    """Zhou et al.'s nested network counted by hand: conv (weight + bias) + instance-norm affine per ConvNormAct."""
    k3, k2 = 3 ** sd, 2 ** sd

    def cna(a, b):
        return a * b * k3 + b + 2 * b

    n = len(feats)
    total = sum(cna(cin if i == 0 else feats[i - 1], feats[i]) + cna(feats[i], feats[i]) for i in range(n))
    for j in range(1, n):
        for i in range(n - j):
            total += feats[i + 1] * feats[i] * k2 + feats[i]  # Up: transposed conv
            total += cna((j + 1) * feats[i], feats[i]) + cna(feats[i], feats[i])  # H
    return total + heads * (feats[0] * cout + cout)


@pytest.mark.parametrize("sd", [2, 3])
@pytest.mark.parametrize("ds", [True, False])
def test_unet_plusplus_parameter_count(sd, ds):
    with torch.device("meta"):
        model = UNetPlusPlus(sd, 1, 2, deep_supervision=ds)
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_count(sd, 1, 2, (32, 64, 128, 256, 512), 4 if ds else 1)
    documented = {(2, True): 9_049_128, (3, True): 26_205_800, (2, False): 9_048_930, (3, False): 26_205_602}
    assert count == documented[sd, ds]
    assert len(model.nodes) == 5 + 4 + 3 + 2 + 1 and len(model.up) == 10


def _agree(model, x):
    """fused=True and fused=False: the same outputs and parameter gradients (train mode)."""
    outs, grads, _ = zip(*fused_and_plain(model, x))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    # a conv bias before instance norm has a zero gradient (the norm removes it): compare to the largest gradient
    scale = max(g.abs().max().item() for g in grads[1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5 * scale, rtol=1e-4, msg=k)
    return outs[0]


@pytest.mark.parametrize("sd", [2, 3])
def test_unet_plusplus_deep_supervision_fused_matches_plain(sd):
    torch.manual_seed(0)
    model = UNetPlusPlus(sd, 2, 3, features=(4, 8, 8, 16), deep_supervision=True)
    x = torch.randn(2, 2, *(16,) * sd)
    outs = _agree(model, x)
    assert len(outs) == 3 and all(o.shape == (2, 3, *(16,) * sd) for o in outs)
    model.eval()
    evals = model(x)
    assert isinstance(evals, list) and len(evals) == 3  # deep supervision in evaluation too


def test_unet_plusplus_batch_norm_and_single_output():
    torch.manual_seed(1)
    model = UNetPlusPlus(2, 1, 2, features=(4, 8, 16), norm="batch", act="relu")
    y = _agree(model, torch.randn(2, 1, 8, 12))
    assert len(y) == 1 and y[0].shape == (2, 2, 8, 12)


def test_unet_plusplus_pruning_is_the_subnetwork():
    """Pruned inference L^k = head k on X^{0,k} of the full network (the nodes it needs are the same)."""
    torch.manual_seed(2)
    model = UNetPlusPlus(2, 1, 2, features=(4, 8, 8, 16), deep_supervision=True, prune=2).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        pruned = model(x)
        model.prune = None
        full = model(x)
    torch.testing.assert_close(pruned, full[1])
    model.prune = 2
    model.train()
    assert isinstance(model(x), list)  # training runs the whole network


def test_unet_plusplus_checkpointing_channels_last():
    torch.manual_seed(3)
    model = UNetPlusPlus(3, 1, 2, features=(4, 8), deep_supervision=True).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    ref = model(x)[0]
    ref.square().sum().backward()
    g_ref = _grads(model)
    model.zero_grad()
    model.checkpointing = True
    y = model(x.contiguous(memory_format=torch.channels_last_3d))[0]
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_unet_plusplus_on_the_triton_backend():
    """The fused path through the Triton kernels (interpreter on CPU) equals the reference backend."""
    torch.manual_seed(4)
    model = UNetPlusPlus(2, 1, 2, features=(2, 4), deep_supervision=True)
    assert_triton_matches_reference(model, torch.randn(1, 1, 8, 8))


def test_unet_plusplus_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 levels"):
        UNetPlusPlus(2, 1, 2, features=(8,))
    with pytest.raises(ValueError, match="prune must be in 1..4"):
        UNetPlusPlus(2, 1, 2, deep_supervision=True, prune=5)
    with pytest.raises(ValueError, match="prune needs deep_supervision"):
        UNetPlusPlus(2, 1, 2, prune=2)
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetPlusPlus(4, 1, 2)
    model = UNetPlusPlus(2, 1, 2, features=(4, 8, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 1, 8, 10))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 2, 8, 8))


def test_unet_plusplus_autocast_and_compile():
    torch.manual_seed(7)
    model = UNetPlusPlus(3, 1, 2, features=(4, 8, 8), deep_supervision=True)
    assert_autocast_and_compile(model, torch.randn(1, 1, 8, 8, 8))
