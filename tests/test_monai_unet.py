"""fastmed.models.MonaiUNet against monai.networks.nets.UNet: weights through fastmed.convert.from_monai_unet,
outputs and gradients in train and eval mode, both paths, the Triton backend, errors."""
import copy

import pytest
import torch

import fastmed
from fastmed.convert import from_monai_unet
from fastmed.models import MonaiUNet

monai_nets = pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [
    # spatial_dims, in, out, channels, strides, num_res_units, act, norm, size
    (2, 1, 2, (4, 8, 16), (2, 2), 0, "PRELU", "INSTANCE", 8),
    (2, 3, 5, (3, 5, 7, 9), (2, 1, 2), 2, "LEAKYRELU", "BATCH", 8),
    (3, 2, 3, (3, 6, 5), (2, 2), 0, "RELU", "BATCH", 4),
    (3, 1, 2, (5, 7), ((1, 2, 2),), 2, "PRELU", "INSTANCE", 4),
    (2, 2, 1, (6, 3), (2,), 1, ("LeakyReLU", {"negative_slope": 0.2}), ("instance", {"affine": True}), 6),
]


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _run(model, x, w):
    """Output and the gradients of ``(y * w).sum()`` w.r.t. the input and every parameter."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}d-res{c[5]}-{c[6]}-{c[7]}")
def test_matches_monai_unet(cfg):
    sd, cin, cout, channels, strides, res, act, norm, size = cfg
    _check_against_monai(dict(spatial_dims=sd, in_channels=cin, out_channels=cout, channels=channels,
                              strides=strides, num_res_units=res, act=act, norm=norm), size)


# MONAI options beyond the defaults: other ADN orders (letters left out drop the module), activations given as a
# class or (class, kwargs), activations fastmed does not fuse, group norm, instance norm with running statistics,
# no activation
OPTIONS = [
    dict(spatial_dims=2, channels=(4, 8, 16), strides=(2, 2), adn_ordering="NA", act=(torch.nn.ReLU, {}),
         norm="BATCH"),
    dict(spatial_dims=2, channels=(3, 5), strides=(2,), num_res_units=1, adn_ordering="AN",
         act=(torch.nn.LeakyReLU, {"negative_slope": 0.1}), norm=("instance", {"affine": True})),
    dict(spatial_dims=3, out_channels=4, channels=(4, 6), strides=(2,), num_res_units=2, adn_ordering="dan", act="GELU",
         norm=("GROUP", {"num_groups": 2})),
    dict(spatial_dims=2, channels=(4, 8), strides=(2,), act="TANH", norm="BATCH", adn_ordering="NDAN"),
    dict(spatial_dims=2, channels=(4, 8), strides=(2,), num_res_units=1, act=("elu", {"alpha": 0.5}),
         norm=("INSTANCE", {"track_running_stats": True, "affine": True})),
    dict(spatial_dims=2, channels=(4, 8), strides=(2,), act=None, norm="BATCH", adn_ordering="N"),
]


@pytest.mark.parametrize("kwargs", OPTIONS, ids=lambda k: f"{k.get('adn_ordering', 'NDA')}-{k['act']}")
def test_monai_options_match_monai_unet(kwargs):
    _check_against_monai({"in_channels": 2, "out_channels": 3, **kwargs}, 8 if kwargs["spatial_dims"] == 2 else 4)


def test_act_class_alone_is_class_with_no_kwargs():
    """A bare class (MONAI itself needs ``(class, {})``) builds the same model as ``(class, {})``."""
    torch.manual_seed(0)
    a = MonaiUNet(2, 1, 2, channels=(4, 8), strides=(2,), act=torch.nn.SELU)
    torch.manual_seed(0)
    b = MonaiUNet(2, 1, 2, channels=(4, 8), strides=(2,), act=(torch.nn.SELU, {}))
    assert isinstance(a.model[0].adn.A, torch.nn.SELU) and str(a) == str(b)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))


def _check_against_monai(kwargs, size):
    sd, cin, cout = kwargs["spatial_dims"], kwargs["in_channels"], kwargs["out_channels"]
    torch.manual_seed(3)
    ref = monai_nets.UNet(**kwargs)
    with torch.no_grad():  # non-trivial affine / running statistics, so that loading them matters
        for name, t in ref.state_dict().items():
            if name.endswith(("adn.N.weight", "adn.N.bias", "running_mean")):
                t.add_(0.3 * torch.randn_like(t))
            elif name.endswith("running_var"):
                t.mul_(torch.rand_like(t) + 0.5)
    model = MonaiUNet(**kwargs)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert _count(model) == _count(ref)
    model.load_state_dict(from_monai_unet(ref.state_dict()), strict=True)
    x = torch.randn(2, cin, *(size,) * sd)
    w = torch.randn(2, cout, *(size,) * sd)
    for train in (True, False):
        r = copy.deepcopy(ref).train(train)
        y_ref, gx_ref, gp_ref = _run(r, x, w)
        for fused in (True, False):
            m = copy.deepcopy(model).train(train)
            m.fused = fused
            y, gx, gp = _run(m, x, w)
            what = f"train={train} fused={fused}"
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=what)
            torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4, msg=what)
            assert gp.keys() == gp_ref.keys()
            for k in gp:  # a conv bias right before batch norm has a ~0 gradient: absolute tolerance
                torch.testing.assert_close(gp[k], gp_ref[k], atol=1e-4, rtol=1e-4, msg=f"{what} {k}")
            if train:  # batch norm running statistics updated alike
                for k, t in r.state_dict().items():
                    torch.testing.assert_close(m.state_dict()[k], t, atol=1e-6, rtol=1e-5, msg=f"{what} {k}")


@pytest.mark.parametrize("order", ["NDA", "ADN"])
@pytest.mark.parametrize("fused", [True, False])
def test_dropout_matches_monai_draw_for_draw(order, fused):
    """dropout > 0 in training: the same modules in the same order draw the same masks from the same seed."""
    kwargs = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8), strides=(2, 1),
                  num_res_units=1, dropout=0.25, norm="BATCH", adn_ordering=order)
    torch.manual_seed(4)
    ref = monai_nets.UNet(**kwargs)
    model = MonaiUNet(**kwargs, fused=fused)
    model.load_state_dict(from_monai_unet(ref.state_dict()), strict=True)
    x, w = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8)
    torch.manual_seed(9)
    y_ref, gx_ref, gp_ref = _run(ref, x, w)
    torch.manual_seed(9)
    y, gx, gp = _run(model, x, w)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=1e-4, rtol=1e-4, msg=k)
    torch.manual_seed(10)
    assert not torch.allclose(_run(model, x, w)[0], y, atol=1e-3)  # the dropout is active


def test_default_arguments_match_monai():
    torch.manual_seed(0)
    ref = monai_nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    model = MonaiUNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    assert list(model.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    norm = model.model[0].adn.N
    assert isinstance(norm, torch.nn.InstanceNorm3d) and not norm.affine and not norm.track_running_stats
    assert isinstance(model.model[0].adn.A, torch.nn.PReLU) and model.model[0].adn.A.weight.numel() == 1
    assert not hasattr(model.model[2], "adn")  # the last layer is conv_only


def test_triton_backend_matches_reference():
    from fastmed import _backend

    reason = _backend.why_not("norm_act", "triton", torch.device("cpu"), forced=True)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(5)
    model = MonaiUNet(2, 1, 2, channels=(3, 4), strides=(2,), num_res_units=1)
    x, w = torch.randn(1, 1, 4, 4), torch.randn(1, 2, 4, 4)
    y_ref, gx_ref, gp_ref = _run(copy.deepcopy(model), x, w)
    with fastmed.use_backend("triton"):
        y, gx, gp = _run(model, x, w)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_converter_rejects_foreign_keys():
    ref = monai_nets.UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1)
    sd = ref.state_dict()
    out = from_monai_unet(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="'module.model.0.conv.unit0.conv.weight'"):
        from_monai_unet({"module." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match="empty"):
        from_monai_unet({})
    with pytest.raises(TypeError, match="mapping"):
        from_monai_unet([1, 2])


def test_bad_arguments():
    ok = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    for change, pattern in [(dict(act="SWISH"), "act must be one of PRELU, RELU, LEAKYRELU"),
                            (dict(act=("RELU",)), "act must be"),
                            (dict(act=torch.nn.ReLU()), "act must be a name, an nn.Module class"),
                            (dict(norm=torch.nn.BatchNorm2d), "norm must be a name or"),
                            (dict(norm="LAYER"), "norm must be one of INSTANCE, BATCH, GROUP"),
                            (dict(norm="GROUP"), "norm: GROUP needs num_groups"),
                            (dict(adn_ordering="NAX"), "adn_ordering must be a string of the letters N, D, A"),
                            (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\]"),
                            (dict(dropout="0.1"), "dropout must be a probability"),
                            (dict(channels=(4,), strides=()), "channels must list at least 2"),
                            (dict(strides=(2, 2)), r"strides needs len\(channels\) - 1 = 1 entries"),
                            (dict(channels=(4, 8, 16)), r"strides needs len\(channels\) - 1 = 2 entries"),
                            (dict(kernel_size=4), "kernel_size must be odd"),
                            (dict(up_kernel_size=(3, 2)), "up_kernel_size must be odd"),
                            (dict(num_res_units=-1), "num_res_units"),
                            (dict(spatial_dims=1), "spatial_dims must be 2 or 3")]:
        with pytest.raises(ValueError, match=pattern):
            MonaiUNet(**{**ok, **change})
    with pytest.raises(TypeError, match="adn_ordering must be a string"):
        MonaiUNet(**ok, adn_ordering=None)
    model = MonaiUNet(**ok)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"divisible by the product of the strides \(2, 2\)"):
        model(torch.randn(1, 1, 7, 8))


@pytest.mark.parametrize("order, dropout, fused_blocks", [("NDA", 0.0, 3), ("NA", 0.0, 3), ("NDA", 0.3, 3),
                                                          ("AN", 0.0, 0)])
def test_fused_path_is_taken(monkeypatch, order, dropout, fused_blocks):
    """fused=True runs conv + norm (+ act) as one fastmed op wherever the norm follows the convolution: the
    3 Convolutions with an ADN of a 2-level residual UNet (down unit, bottom unit, transposed conv; the top up
    layer's unit is conv-only), none when the activation comes first."""
    import fastmed.models.monai_unet as mu

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return fused_conv_norm_act(*args, **kwargs)

    fused_conv_norm_act = mu.fused_conv_norm_act
    monkeypatch.setattr(mu, "fused_conv_norm_act", counting)
    model = MonaiUNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1, adn_ordering=order, dropout=dropout)
    model(torch.randn(2, 1, 8, 8))
    assert len(calls) == fused_blocks
