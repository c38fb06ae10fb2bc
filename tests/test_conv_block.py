"""Tests for fastmed.ops.conv_norm_act and the ConvNormAct / ResidualBlock / UpBlock modules.

Oracle: ``fastmed.reference.conv_block.conv_norm_act_reference`` (F.conv{2,3}d + torch norm + activation,
differentiated by autograd), in float64 for the equivalence tests.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastmed
from fastmed.nn import ConvNormAct, ResidualBlock, UpBlock, convert_monai_state_dict
from fastmed.ops import conv_norm_act
from fastmed.reference.conv_block import conv_norm_act_reference

from conftest import INTERPRET, TOL

ACTS = ("leaky_relu", "relu", "prelu", "gelu", "silu", "identity")


def _inputs(seed, n, cin, cout, spatial, kernel, dtype, *, bias=True, affine=True, residual_shape=None,
            prelu=False, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    sd = len(spatial)
    x = torch.randn((n, cin) + tuple(spatial), generator=g, dtype=torch.float64)
    w = torch.randn((cout, cin) + (kernel,) * sd, generator=g, dtype=torch.float64) / (cin * kernel ** sd) ** 0.5
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    nw = 1 + 0.3 * torch.randn(cout, generator=g, dtype=torch.float64) if affine else None
    nb = 0.2 * torch.randn(cout, generator=g, dtype=torch.float64) if affine else None
    r = torch.randn(residual_shape, generator=g, dtype=torch.float64) if residual_shape is not None else None
    slope = 0.05 + 0.3 * torch.rand(cout, generator=g, dtype=torch.float64) if prelu else None
    ts = [t.to(dtype) if t is not None else None for t in (x, w, b, nw, nb, r, slope)]
    if channels_last:
        fmt = torch.channels_last_3d if sd == 3 else torch.channels_last
        ts[0] = ts[0].contiguous(memory_format=fmt)
    return ts


def _grads(out, tensors, seed):
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    live = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(out, live, dy)
    it = iter(grads)
    return [next(it) if t is not None else None for t in tensors]


def _check_block(seed, n, cin, cout, spatial, kernel, stride, padding, dilation, norm, act, bias, residual,
                 dtype, implementation, num_groups=None, channels_last=False, tol=None):
    """Runs the fastmed block and the float64 oracle; compares the output and every gradient."""
    sd = len(spatial)
    out_sp = tuple((i + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for i in spatial)
    affine = norm != "none"
    x, w, b, nw, nb, r, slope = _inputs(seed, n, cin, cout, spatial, kernel, dtype, bias=bias, affine=affine,
                                        residual_shape=(n, cout) + out_sp if residual else None,
                                        prelu=act == "prelu", channels_last=channels_last)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, nw, nb, r, slope)]
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    kw = dict(stride=stride, padding=padding, dilation=dilation, norm=norm, activation=act,
              num_groups=num_groups)

    def call(fn, ts, **extra):
        x_, w_, b_, nw_, nb_, r_, s_ = ts
        return fn(x_, w_, b_, nw_, nb_, negative_slope=s_ if act == "prelu" else 0.01, residual=r_, **kw, **extra)

    y = call(conv_norm_act, leaves, implementation=implementation)
    y_ref = call(conv_norm_act_reference, ref_leaves)
    assert y.shape == y_ref.shape and y.dtype == dtype
    tol = tol or TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    g = _grads(y, leaves, seed)
    g_ref = _grads(y_ref, ref_leaves, seed)
    names = ("x", "weight", "bias", "norm_weight", "norm_bias", "residual", "prelu slope")
    for name, a, e in zip(names, g, g_ref):
        if e is None:
            continue
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / scale, e / scale, **tol, msg=lambda m: f"grad {name}: {m}")
    return y


# ------------------------------------------------------------------------------------------------
# Reference backend (CPU): both implementations, hypothesis over the configuration space
# ------------------------------------------------------------------------------------------------

@st.composite
def block_config(draw, max_spatial=7):
    sd = draw(st.sampled_from((2, 3)))
    kernel = draw(st.sampled_from((1, 3, 5)))
    stride = draw(st.sampled_from((1, 2)))
    dilation = draw(st.sampled_from((1, 2))) if kernel > 1 else 1
    padding = draw(st.integers(0, (kernel - 1) // 2 * dilation + 1))
    extent = dilation * (kernel - 1) + 1
    lo = max(extent - 2 * padding, 1)
    spatial = tuple(draw(st.integers(lo, max(lo, max_spatial))) for _ in range(sd))
    norm = draw(st.sampled_from(("instance", "group", "batch", "none")))
    cout = draw(st.sampled_from((2, 4, 6)))
    num_groups = 2 if norm == "group" else None
    return dict(n=draw(st.sampled_from((1, 2))), cin=draw(st.sampled_from((1, 3, 5))), cout=cout, spatial=spatial,
                kernel=kernel, stride=stride, padding=padding, dilation=dilation, norm=norm,
                act=draw(st.sampled_from(ACTS)), bias=draw(st.booleans()), residual=draw(st.booleans()),
                num_groups=num_groups)


def _norm_defined(cfg):
    """torch's norms (the oracle) refuse a single value per statistic; so does this test."""
    count = 1
    for i in cfg["spatial"]:
        count *= (i + 2 * cfg["padding"] - cfg["dilation"] * (cfg["kernel"] - 1) - 1) // cfg["stride"] + 1
    return cfg["norm"] == "none" or count > 1


@pytest.mark.parametrize("implementation", ["cudnn", "implicit_gemm"])
@given(cfg=block_config())
def test_reference_backend_matches_torch(implementation, cfg):
    if not _norm_defined(cfg):
        return
    with fastmed.use_backend("reference"):
        _check_block(0, dtype=torch.float64, implementation=implementation, **cfg)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "cudnn", "implicit_gemm"])
def test_float32_layouts(implementation, channels_last):
    with fastmed.use_backend("reference"):
        y = _check_block(1, 2, 3, 5, (5, 6, 7), 3, 1, 1, 1, "instance", "leaky_relu", True, False, torch.float32,
                         implementation, channels_last=channels_last)
    if channels_last and implementation != "implicit_gemm":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_padding_none_is_same_padding():
    x, w, b, nw, nb, _, _ = _inputs(3, 1, 2, 3, (6, 5), 5, torch.float64)
    y = conv_norm_act(x, w, b, nw, nb, dilation=2)
    assert y.shape == (1, 3, 6, 5)
    torch.testing.assert_close(y, conv_norm_act_reference(x, w, b, nw, nb, padding=4, dilation=2))


def test_batch_norm_running_stats_both_implementations():
    x, w, b, nw, nb, _, _ = _inputs(4, 2, 3, 4, (5, 6, 4), 3, torch.float64)
    expect_m, expect_v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    conv_norm_act_reference(x, w, b, nw, nb, padding=1, norm="batch", running_mean=expect_m,
                            running_var=expect_v, momentum=0.2)
    for impl in ("cudnn", "implicit_gemm"):
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        conv_norm_act(x, w, b, nw, nb, norm="batch", running_mean=rm, running_var=rv, momentum=0.2,
                      implementation=impl)
        torch.testing.assert_close(rm, expect_m)
        torch.testing.assert_close(rv, expect_v)
        y = conv_norm_act(x, w, b, nw, nb, norm="batch", running_mean=rm, running_var=rv, training=False,
                          implementation=impl)
        y_ref = conv_norm_act_reference(x, w, b, nw, nb, padding=1, norm="batch", running_mean=rm,
                                        running_var=rv, training=False)
        torch.testing.assert_close(y, y_ref)


def test_gradcheck_reference_op():
    x, w, b, nw, nb, r, _ = _inputs(5, 1, 2, 3, (4, 5, 3), 3, torch.float64, residual_shape=(1, 3, 2, 3, 2))
    ts = [t.requires_grad_() for t in (x, w, b, nw, nb, r)]
    with fastmed.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *a: conv_norm_act(*a[:5], residual=a[5], stride=2, activation="silu",
                                     implementation="implicit_gemm"), ts)


def test_does_not_modify_inputs_and_nan_propagates():
    x, w, b, nw, nb, _, _ = _inputs(6, 1, 2, 3, (5, 5), 3, torch.float32)
    x[0, 0, 2, 2] = float("nan")
    saved = [t.clone() for t in (x, w, b, nw, nb)]
    for impl in ("cudnn", "implicit_gemm"):
        y = conv_norm_act(x, w, b, nw, nb, implementation=impl)
        assert torch.isnan(y).any()
    for a, e in zip((x, w, b, nw, nb), saved):
        torch.testing.assert_close(a, e, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# torch.library / torch.compile on the reference path
# ------------------------------------------------------------------------------------------------

def test_opcheck_reference():
    x, w, b, nw, nb, r, _ = _inputs(7, 1, 2, 3, (4, 5, 3), 3, torch.float32, residual_shape=(1, 3, 4, 5, 3))
    args = (x.requires_grad_(), w.requires_grad_(), b, nw, nb, r, None, None, None, [1, 1, 1], [1, 1, 1],
            [1, 1, 1], "instance", 3, 1e-5, "leaky_relu", 0.01, "reference")
    torch.library.opcheck(torch.ops.fastmed.conv_block_fwd.default, args)
    y, conv_out, mean, rstd = (t.detach() for t in torch.ops.fastmed.conv_block_fwd(*args))
    bwd_args = (torch.randn_like(y), x.detach(), w.detach(), conv_out, nw, nb, r, None, mean, rstd,
                [1, 1, 1], [1, 1, 1], [1, 1, 1], "instance", 3, "leaky_relu", 0.01, True, True, "reference")
    torch.library.opcheck(torch.ops.fastmed.conv_block_bwd.default, bwd_args)


@pytest.mark.parametrize("implementation", ["cudnn", "implicit_gemm"])
def test_compile_fullgraph_reference(implementation):
    torch._dynamo.reset()
    x, w, b, nw, nb, _, _ = _inputs(8, 1, 2, 3, (5, 4), 3, torch.float32)
    w.requires_grad_()

    def block(x, w):
        return conv_norm_act(x, w, b, nw, nb, stride=2, implementation=implementation)

    with fastmed.use_backend("reference"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        y = compiled(x, w)
        y.sum().backward()
        gw = w.grad.clone()
        w.grad = None
        y_e = block(x, w)
        y_e.sum().backward()
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(gw, w.grad)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_errors():
    x = torch.randn(1, 3, 5, 6, 7)
    w = torch.randn(4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="weight expects 2 input channels.*x has 3 channels"):
        conv_norm_act(x, torch.randn(4, 2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) or \(N, C, D, H, W\)"):
        conv_norm_act(torch.randn(1, 3, 5), torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="weight must have 5 dimensions"):
        conv_norm_act(x, torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv_norm_act(x, w, stride=0)
    with pytest.raises(ValueError, match="stride must be an int or a sequence of 3 ints"):
        conv_norm_act(x, w, stride=(1, 2))
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        conv_norm_act(x, w, dilation=(1, 0, 1))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv_norm_act(x, w, padding=-1)
    with pytest.raises(ValueError, match="kernel .* is larger than the padded input along spatial axis 0"):
        conv_norm_act(x, torch.randn(4, 3, 7, 3, 3), padding=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        conv_norm_act(x, w, norm="layer")
    with pytest.raises(ValueError, match="implementation must be one of"):
        conv_norm_act(x, w, implementation="winograd")
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        conv_norm_act(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="residual must have the shape of the convolution output"):
        conv_norm_act(x, w, padding=1, residual=torch.randn(1, 4, 5, 6, 6))
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        conv_norm_act(x, w.double())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        conv_norm_act(x.long(), w)
    for impl in ("cudnn", "implicit_gemm"):
        with pytest.raises(ValueError, match="num_groups"):
            conv_norm_act(x, w, norm="group", num_groups=3, implementation=impl)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        ConvNormAct(1, 3, 4)


# ------------------------------------------------------------------------------------------------
# Modules and checkpoint compatibility
# ------------------------------------------------------------------------------------------------

class _ConvDropoutNormReLU(nn.Module):
    """The structure of dynamic-network-architectures' ConvDropoutNormReLU (attributes and all_modules)."""

    def __init__(self, conv_op, cin, cout, kernel, stride, conv_bias, norm_op, norm_kwargs, dropout_op,
                 dropout_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        sd = 3 if conv_op is nn.Conv3d else 2
        kernel = [kernel] * sd
        ops = []
        self.conv = conv_op(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], dilation=1,
                            bias=conv_bias)
        ops.append(self.conv)
        if dropout_op is not None:
            self.dropout = dropout_op(**dropout_kwargs)
            ops.append(self.dropout)
        if norm_op is not None:
            self.norm = norm_op(cout, **norm_kwargs)
            ops.append(self.norm)
        if nonlin is not None:
            self.nonlin = nonlin(**nonlin_kwargs)
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x):
        return self.all_modules(x)


def _dna_block_cls():
    try:
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
    except ImportError:
        return None
    return ConvDropoutNormReLU


@pytest.mark.parametrize("source", ["copy", "dynamic_network_architectures"])
@pytest.mark.parametrize("sd,norm_op,nonlin,norm,act", [
    (3, nn.InstanceNorm3d, nn.LeakyReLU, "instance", "leaky_relu"),
    (2, nn.BatchNorm2d, nn.ReLU, "batch", "relu"),
    (3, nn.InstanceNorm3d, nn.PReLU, "instance", "prelu"),
])
def test_loads_nnunet_conv_dropout_norm_relu(source, sd, norm_op, nonlin, norm, act):
    cls = _ConvDropoutNormReLU if source == "copy" else _dna_block_cls()
    if cls is None:
        pytest.skip("dynamic-network-architectures is not installed (it pulls a CUDA build of torch)")
    torch.manual_seed(0)
    conv_op = nn.Conv3d if sd == 3 else nn.Conv2d
    norm_kwargs = {"eps": 1e-5, "affine": True}
    nonlin_kwargs = {"negative_slope": 0.01, "inplace": True} if nonlin is nn.LeakyReLU else {}
    if nonlin is nn.ReLU:
        nonlin_kwargs = {"inplace": True}
    theirs = cls(conv_op, 3, 6, 3, 2, True, norm_op, norm_kwargs, None, None, nonlin, nonlin_kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn((2, 3) + (7,) * sd)
    theirs.train()
    theirs(x)  # moves batch-norm running statistics away from their initial values
    ours = ConvNormAct(sd, 3, 6, 3, stride=2, norm=norm, act=act)
    ours.load_state_dict(theirs.state_dict())
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        t_sd = copy.deepcopy(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
        if norm == "batch" and mode == "train":
            torch.testing.assert_close(ours.norm.running_mean, theirs.norm.running_mean)
            torch.testing.assert_close(ours.norm.running_var, theirs.norm.running_var)
            assert not torch.equal(t_sd["norm.running_mean"], theirs.norm.running_mean)


def test_monai_convolution_mapping():
    from monai.networks.blocks import Convolution

    torch.manual_seed(1)
    theirs = Convolution(3, 3, 5, kernel_size=3, act=("prelu", {"num_parameters": 5}),
                         norm=("instance", {"affine": True}), bias=True)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ConvNormAct(3, 3, 5, act="prelu", act_kwargs={"num_parameters": 5})
    ours.load_state_dict(convert_monai_state_dict(theirs.state_dict(), "convolution"))
    x = torch.randn(2, 3, 6, 5, 7)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


def test_monai_unet_basic_block_mapping():
    from monai.networks.blocks import UnetBasicBlock

    torch.manual_seed(2)
    theirs = UnetBasicBlock(3, 4, 6, kernel_size=3, stride=2, norm_name=("instance", {"affine": True}))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = nn.Sequential(ConvNormAct(3, 4, 6, 3, stride=2, bias=False), ConvNormAct(3, 6, 6, 3, bias=False))
    ours.load_state_dict(convert_monai_state_dict(theirs.state_dict(), "unet_basic_block"))
    x = torch.randn(2, 4, 8, 7, 9)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    with pytest.raises(ValueError, match="has no fastmed counterpart"):
        convert_monai_state_dict({"conv3.conv.weight": torch.zeros(1)}, "unet_basic_block")


class _BasicBlockD(nn.Module):
    """The structure of dynamic-network-architectures' BasicBlockD (no stochastic depth, no SE)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        kw = dict(norm_op=nn.InstanceNorm3d, norm_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                  dropout_kwargs=None)
        self.conv1 = _ConvDropoutNormReLU(nn.Conv3d, cin, cout, 3, stride, True, nonlin=nn.LeakyReLU,
                                          nonlin_kwargs={"inplace": True}, **kw)
        self.conv2 = _ConvDropoutNormReLU(nn.Conv3d, cout, cout, 3, 1, True, nonlin=None, nonlin_kwargs=None, **kw)
        self.nonlin2 = nn.LeakyReLU(inplace=True)
        ops = []
        if stride != 1:
            ops.append(nn.AvgPool3d(stride, stride))
        if cin != cout:
            ops.append(_ConvDropoutNormReLU(nn.Conv3d, cin, cout, 1, 1, False, nonlin=None, nonlin_kwargs=None,
                                            **kw))
        self.skip = nn.Sequential(*ops) if ops else (lambda x: x)

    def forward(self, x):
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (3, 6, 2), (4, 4, 2), (3, 5, 1)])
def test_residual_block_matches_basic_block_d(cin, cout, stride):
    torch.manual_seed(3)
    theirs = _BasicBlockD(cin, cout, stride)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ResidualBlock(3, cin, cout, 3, stride)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, cin, 6, 8, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_t = ours(x), theirs(x2)
    torch.testing.assert_close(y, y_t, **TOL[torch.float32])
    y.square().sum().backward()
    y_t.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL[torch.float32])
    for (name, p), (_, q) in zip(sorted(ours.named_parameters()), sorted(theirs.named_parameters())):
        if not name.startswith("all_modules"):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


def test_up_block_matches_torch():
    torch.manual_seed(4)
    up = UpBlock(3, 8, 4, 5, upsample_stride=2, num_convs=2)
    x, skip = torch.randn(2, 8, 3, 4, 2), torch.randn(2, 4, 6, 8, 4)
    y = up(x, skip)
    h = torch.cat([up.transpconv(x), skip], 1)
    for blk in up.convs:
        c = blk.conv
        h = F.leaky_relu(F.instance_norm(c(h), weight=blk.norm.weight, bias=blk.norm.bias, eps=1e-5), 0.01)
    torch.testing.assert_close(y, h, **TOL[torch.float32])
    with pytest.raises(ValueError, match="skip must have batch and spatial size"):
        up(x, torch.randn(2, 4, 6, 8, 5))


def test_conv_norm_act_module_dropout_and_none_norm():
    torch.manual_seed(5)
    m = ConvNormAct(2, 3, 4, 3, dropout=0.5, norm="none", act="silu")
    x = torch.randn(2, 3, 6, 6)
    m.eval()
    torch.testing.assert_close(m(x), F.silu(m.conv(x)))
    m.train()
    y = m(x)
    assert (y == 0).any() and y.shape == (2, 4, 6, 6)
    m2 = ConvNormAct(3, 3, 4, dropout=0.3, norm="group", norm_kwargs={"num_groups": 2})
    m2.train()
    torch.manual_seed(9)
    y = m2(torch.randn(1, 3, 4, 4, 4))
    torch.manual_seed(9)
    expect = F.leaky_relu(F.group_norm(F.dropout(m2.conv(torch.randn(1, 3, 4, 4, 4)), 0.3), 2,
                                       m2.norm.weight, m2.norm.bias), 0.01)
    torch.testing.assert_close(y, expect, **TOL[torch.float32])
