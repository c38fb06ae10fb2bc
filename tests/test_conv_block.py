"""Tests for fastmed.ops.conv_norm_act and the ConvNormAct / ResidualBlock / UpBlock modules.

Oracle: ``fastmed.reference.conv_block.conv_norm_act_reference`` (F.conv{2,3}d + torch norm + activation,
differentiated by autograd), in float64 for the equivalence tests.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastmed
from fastmed.nn import ConvNormAct, ResidualBlock, UpBlock, convert_monai_state_dict
from fastmed.ops import conv_norm_act
from fastmed.ops.conv_block import op_inputs
from fastmed.reference.conv_block import ConvSpec, ConvTensors, conv_norm_act_reference
from fastmed.reference.norm_act import ACTIVATIONS, NormSpec, NormTensors

ACTS = ACTIVATIONS


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
        torch.testing.assert_close(a.double() / scale, e / scale, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
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


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_batch_norm_running_stats_both_implementations(backend, dtype):
    """Training updates the running statistics like F.batch_norm; eval uses them (constant statistics in the
    backward too)."""
    x, w, b, nw, nb, _, _ = _inputs(4, 2, 3, 4, (5, 6, 4), 3, dtype)
    expect_m, expect_v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    conv_norm_act_reference(x.double(), w.double(), b.double(), nw.double(), nb.double(), padding=1, norm="batch",
                            running_mean=expect_m, running_var=expect_v, momentum=0.2)
    for impl in ("cudnn", "implicit_gemm"):
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        with fastmed.use_backend(backend):
            conv_norm_act(x, w, b, nw, nb, norm="batch", running_mean=rm, running_var=rv, momentum=0.2,
                          implementation=impl)
        torch.testing.assert_close(rm.double(), expect_m, **TOL[dtype])
        torch.testing.assert_close(rv.double(), expect_v, **TOL[dtype])
        leaves = [t.clone().requires_grad_() for t in (x, w, b, nw, nb)]
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        with fastmed.use_backend(backend):
            y = conv_norm_act(*leaves, norm="batch", running_mean=rm, running_var=rv, training=False,
                              implementation=impl)
        y_ref = conv_norm_act_reference(*ref_leaves, padding=1, norm="batch", running_mean=rm.double(),
                                        running_var=rv.double(), training=False)
        torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
        for a, e in zip(_grads(y, leaves, 4), _grads(y_ref, ref_leaves, 4)):
            torch.testing.assert_close(a.double(), e, **TOL[dtype])


def test_gradcheck_reference_op():
    x, w, b, nw, nb, r, _ = _inputs(5, 1, 2, 3, (4, 5, 3), 3, torch.float64, residual_shape=(1, 3, 2, 3, 2))
    ts = [t.requires_grad_() for t in (x, w, b, nw, nb, r)]
    with fastmed.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *a: conv_norm_act(*a[:5], residual=a[5], stride=2, activation="silu",
                                     implementation="implicit_gemm"), ts)


@pytest.mark.parametrize("implementation", ["cudnn", "implicit_gemm"])
def test_autocast_like_eager(implementation):
    """Under autocast (nnU-Net trains with it) a float32 module runs the convolution in the autocast dtype."""
    torch.manual_seed(20)
    m = ConvNormAct(3, 3, 4, implementation=implementation)
    x = torch.randn(2, 3, 5, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        h = m.conv(x)
        expect = F.leaky_relu(F.instance_norm(h.float(), weight=m.norm.weight, bias=m.norm.bias), 0.01)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expect, **TOL[torch.bfloat16])
    y.float().sum().backward()
    assert x.grad is not None and m.conv.weight.grad is not None


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
    cspec, nspec = ConvSpec([1, 1, 1], [1, 1, 1], [1, 1, 1]), NormSpec("instance", 3, 1e-5, "leaky_relu", 0.01)
    conv, norm = ConvTensors(None, w.requires_grad_(), b), NormTensors(nw, nb, r, None)
    args = op_inputs(x.requires_grad_(), conv, norm, None, None, cspec, nspec, "reference")
    torch.library.opcheck(torch.ops.fastmed.conv_block_fwd.default, args)
    y, conv_out, mean, rstd = (t.detach() for t in torch.ops.fastmed.conv_block_fwd(*args))
    bwd_args = (torch.randn_like(y), x.detach(), conv_out, None, w.detach(), b, nw, nb, r, None, mean, rstd, *cspec,
                *nspec, True, "reference")
    torch.library.opcheck(torch.ops.fastmed.conv_block_bwd.default, bwd_args)


def test_op_schema_follows_the_specs():
    """The flat torch.library signature takes the spec fields in the order op_inputs lays them out."""
    names = [a.name for a in torch.ops.fastmed.conv_block_fwd.default._schema.arguments]
    norm_names = [("norm_" + f if f in ("weight", "bias") else f) for f in NormTensors._fields]
    assert names == ["x", *ConvTensors._fields, *norm_names, "mean_in", "rstd_in", *ConvSpec._fields,
                     *NormSpec._fields, "backend"]


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
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=lambda m, name=name: f"{name}: {m}")


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
    with pytest.raises(ValueError, match="skip must have the batch and spatial size of the upsampled x"):
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


# ------------------------------------------------------------------------------------------------
# Triton implicit GEMM under the interpreter (tiny shapes: the interpreter runs the GEMM in numpy)
# ------------------------------------------------------------------------------------------------

TRITON_CASES = [
    # n, cin, cout, spatial, kernel, stride, padding, dilation, norm, act, bias, residual, groups, channels_last
    (1, 3, 4, (5, 6, 7), 3, 1, 1, 1, "instance", "leaky_relu", True, False, None, False),
    (1, 3, 4, (5, 6, 7), 3, 2, 1, 1, "instance", "leaky_relu", True, False, None, True),
    (2, 3, 4, (7, 6), 5, 2, 2, 1, "group", "gelu", False, True, 2, False),
    (1, 5, 6, (4, 5, 3), 1, 1, 0, 1, "batch", "prelu", True, True, None, True),
    (2, 2, 3, (9, 8), 3, 1, 2, 2, "instance", "silu", True, False, None, True),
    (1, 3, 4, (5, 4, 6), 3, 2, 0, 1, "instance", "relu", False, True, None, False),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{len(c[3])}d-k{c[4]}s{c[5]}p{c[6]}d{c[7]}-{c[8]}")
def test_triton_implicit_gemm_forward_backward(case):
    n, cin, cout, spatial, k, s, p, d, norm, act, bias, res, groups, cl = case
    with fastmed.use_backend("triton"):
        _check_block(11, n, cin, cout, spatial, k, s, p, d, norm, act, bias, res, torch.float32, "implicit_gemm",
                     num_groups=groups, channels_last=cl)


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    (1, 2, 1, 0), (3, (2, 1, 3), 1, 1), (3, 2, 2, 2), (5, 3, 1, 2), ((1, 3, 3), (1, 2, 2), 1, (0, 1, 1))])
def test_triton_strides_dilations(kernel, stride, dilation, padding):
    """Residue classes of the data gradient: stride 3, anisotropic strides and kernels (nnU-Net's (1, 2, 2)),
    dilated taps that skip classes, and classes no tap reaches (1x1 kernel, stride 2)."""
    g = torch.Generator().manual_seed(21)
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    x = torch.randn(1, 3, 7, 6, 8, generator=g, requires_grad=True)
    w = (torch.randn((4, 3) + k, generator=g) / 5).requires_grad_()
    with fastmed.use_backend("triton"):
        y = conv_norm_act(x, w, stride=stride, padding=padding, dilation=dilation, activation="silu",
                          implementation="implicit_gemm")
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = conv_norm_act_reference(xr, wr, stride=stride, padding=padding, dilation=dilation, activation="silu")
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    dy = torch.randn(y.shape, generator=g)
    for a, e in zip(torch.autograd.grad(y, [x, w], dy), torch.autograd.grad(y_ref, [xr, wr], dy.double())):
        torch.testing.assert_close(a.double(), e, **TOL[torch.float32])


@given(cfg=block_config(max_spatial=5), channels_last=st.booleans())
def test_triton_implicit_gemm_hypothesis(cfg, channels_last):
    if not _norm_defined(cfg) or cfg["norm"] == "none":
        return
    with fastmed.use_backend("triton"):
        _check_block(12, dtype=torch.float32, implementation="implicit_gemm", channels_last=channels_last, **cfg)


def test_triton_auto_and_cudnn_paths():
    with fastmed.use_backend("triton"):
        for impl in ("auto", "cudnn"):
            _check_block(13, 1, 3, 4, (5, 6, 7), 3, 1, 1, 1, "instance", "leaky_relu", True, True, torch.float32,
                         impl)


def test_triton_bfloat16_storage():
    """bf16 in and out: the error of the fast path is at most 2x that of the reference run in bf16 (the torch
    composition on the CPU) plus a small floor, output and every gradient, against the float64 oracle.  A smooth
    activation: at a kink (leaky_relu at 0) one rounding apart flips the derivative, in either path."""
    x, w, b, nw, nb, _, _ = _inputs(14, 1, 3, 4, (5, 6, 7), 3, torch.bfloat16, channels_last=True)

    def run(backend, impl, dtype, fmt=torch.channels_last_3d):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x.contiguous(memory_format=fmt), w, b, nw, nb)]
        with fastmed.use_backend(backend):
            y = conv_norm_act(*leaves, activation="silu", implementation=impl)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    fast = run("triton", "implicit_gemm", torch.bfloat16)
    # The reference runs use NCDHW: torch's CPU group-norm backward mixes up channels-last inputs.
    low = run("reference", "cudnn", torch.bfloat16, torch.contiguous_format)
    exact = run("reference", "cudnn", torch.float64, torch.contiguous_format)
    for name, f, lo, e in zip(("y", "x", "weight", "bias", "norm_weight", "norm_bias"), fast, low, exact):
        assert f.dtype == torch.bfloat16
        err_fast = (f.double() - e).abs().max().item()
        err_low = (lo.double() - e).abs().max().item()
        assert err_fast <= 2 * err_low + 1e-2 * max(e.abs().max().item(), 1.0), (name, err_fast, err_low)


def test_epilogue_statistics_match_two_pass():
    """The per-tile (mean, M2) partials of the convolution epilogue combine to the exact statistics, also when
    |mean| >> std (a large bias) and across several M tiles."""
    from fastmed.kernels.conv_block import conv_forward_stats
    from fastmed.kernels.norm_act import finalize_stats

    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 6, 7, 5, generator=g)
    w = torch.randn(5, 3, 3, 3, 3, generator=g) / 9
    b = torch.full((5,), 1000.0)
    y, pmean, pm2, tile = conv_forward_stats(x, ConvTensors(None, w, b), ConvSpec((1, 1, 1), (1, 1, 1), (1, 1, 1)),
                                             True)
    assert pmean.shape[2] > 1
    torch.testing.assert_close(y, F.conv3d(x, w, b, padding=1), rtol=1e-5, atol=1e-3)
    for kind, groups in (("instance", 5), ("batch", 1)):
        mean, rstd = finalize_stats(pmean, pm2, y[0, 0].numel(), tile, kind, groups, 1e-5)
        yd = y.double()
        dims = (2, 3, 4) if kind == "instance" else (0, 2, 3, 4)
        var, mu = torch.var_mean(yd, dim=dims, unbiased=False)
        torch.testing.assert_close(mean.double(), mu.reshape(-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-5).reshape(-1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend,implementation,channels_last", [
    ("reference", "cudnn", False), ("reference", "implicit_gemm", False), ("triton", "implicit_gemm", False),
    ("triton", "implicit_gemm", True), ("triton", "cudnn", True)])
def test_two_input_convolution_skip(backend, implementation, channels_last):
    """conv(cat([x, skip], 1)) with skip passed separately: values and the gradients of x, skip and weight."""
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2, 3, 5, 4, 6, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)  # the skip stays NCDHW: mixed layouts
    skip = torch.randn(2, 2, 5, 4, 6, generator=g)
    w = torch.randn(4, 5, 3, 3, 3, generator=g) / 11
    b, nw, nb = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, skip, w, b, nw, nb)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    with fastmed.use_backend(backend):
        y = conv_norm_act(leaves[0], *leaves[2:], skip=leaves[1], stride=(1, 2, 1), activation="gelu",
                          implementation=implementation)
    y_ref = conv_norm_act_reference(ref_leaves[0], *ref_leaves[2:], skip=ref_leaves[1], stride=(1, 2, 1), padding=1,
                                    activation="gelu")
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    for name, a, e in zip(("x", "skip", "weight", "bias", "norm_weight", "norm_bias"), _grads(y, leaves, 18),
                          _grads(y_ref, ref_leaves, 18)):
        torch.testing.assert_close(a.double(), e, **TOL[torch.float32], msg=lambda m, name=name: f"grad {name}: {m}")
    with pytest.raises(ValueError, match="x and skip have 3 \\+ 2 = 5 channels"):
        conv_norm_act(x, w[:, :4], skip=skip)
    with pytest.raises(ValueError, match="skip must have the batch and spatial size of x"):
        conv_norm_act(x, w, skip=skip[:, :, :4])


def test_up_block_implicit_gemm_triton():
    torch.manual_seed(19)
    up = UpBlock(3, 6, 3, 4, upsample_stride=2, num_convs=2)
    up_ig = UpBlock(3, 6, 3, 4, upsample_stride=2, num_convs=2, implementation="implicit_gemm")
    up_ig.load_state_dict(up.state_dict())
    x, skip = torch.randn(1, 6, 2, 3, 2), torch.randn(1, 3, 4, 6, 4)
    with fastmed.use_backend("triton"):
        y = up_ig(x, skip)
    torch.testing.assert_close(y, up(x, skip), **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------
# Parameter layouts, double backward, in-place use of the output, meta tensors, module state (issue 10)
# ------------------------------------------------------------------------------------------------

BACKEND_IMPLS = [("reference", "cudnn"), ("reference", "implicit_gemm"), ("triton", "cudnn"),
                 ("triton", "implicit_gemm")]


@pytest.mark.parametrize("backend,implementation", BACKEND_IMPLS)
def test_strided_expanded_offset_parameters(backend, implementation):
    """The convolution bias, norm weight/bias and prelu slope are read with their own strides (issue 10 3.1:
    the Triton kernels read them as if contiguous; an expanded bias read past its storage)."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(1, 2, 4, 5, 6, generator=g)
    w = torch.randn(3, 2, 3, 3, 3, generator=g) / 7
    views = [torch.randn(9, generator=g)[1::3],                  # conv bias: offset 1, stride 3
             (torch.rand(6, generator=g) + 0.5)[::2],            # norm weight: stride 2
             torch.tensor([0.5]).expand(3),                      # norm bias: stride 0
             (torch.rand(5, generator=g) * 0.5)[2:]]             # prelu slope: offset 2
    leaves = [t.clone().requires_grad_() for t in (x, w)] + [t.requires_grad_() for t in views]
    copies = [t.detach().double().contiguous().requires_grad_() for t in leaves]

    def call(fn, ts, **kw):
        return fn(ts[0], ts[1], ts[2], ts[3], ts[4], activation="prelu", negative_slope=ts[5], padding=1, **kw)

    with fastmed.use_backend(backend):
        y = call(conv_norm_act, leaves, implementation=implementation)
    y_ref = call(conv_norm_act_reference, copies)
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    for a, e in zip(_grads(y, leaves, 40), _grads(y_ref, copies, 40)):
        torch.testing.assert_close(a.double(), e, **TOL[torch.float32])


@pytest.mark.parametrize("backend,implementation", BACKEND_IMPLS)
def test_gradgradcheck(backend, implementation):
    """Second-order gradients of the block (issue 10 3.3).  The Triton implicit GEMM runs float16/32 only, so it is
    checked against the float64 reference's second-order gradients instead of by finite differences."""
    g = torch.Generator().manual_seed(41)
    dtype = torch.float32 if (backend, implementation) == ("triton", "implicit_gemm") else torch.float64
    ts = [torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, 3, 3, generator=g,
          dtype=torch.float64) / 4, torch.randn(2, generator=g, dtype=torch.float64),
          torch.rand(2, generator=g, dtype=torch.float64) + 0.5, torch.randn(2, generator=g, dtype=torch.float64),
          torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64)]

    def block(x, w, b, nw, nb, r):
        return conv_norm_act(x, w, b, nw, nb, residual=r, activation="silu", implementation=implementation)

    with fastmed.use_backend(backend):
        if dtype == torch.float64:
            assert torch.autograd.gradgradcheck(block, [t.requires_grad_() for t in ts], fast_mode=True)
            return
        leaves = [t.to(dtype).requires_grad_() for t in ts]
        (gx,) = torch.autograd.grad(block(*leaves).pow(2).sum(), leaves[0], create_graph=True)
        second = torch.autograd.grad(gx.pow(2).sum(), leaves[1:])
    ref_leaves = [t.detach().requires_grad_() for t in ts]
    (gx_ref,) = torch.autograd.grad(
        conv_norm_act_reference(*ref_leaves[:5], residual=ref_leaves[5], activation="silu", padding=1).pow(2).sum(),
        ref_leaves[0], create_graph=True)
    for a, e in zip(second, torch.autograd.grad(gx_ref.pow(2).sum(), ref_leaves[1:])):
        assert e.abs().max() > 0
        torch.testing.assert_close(a.double(), e, **TOL[torch.float32])


@pytest.mark.parametrize("backend,implementation", BACKEND_IMPLS)
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "gelu", "prelu", "identity"])
def test_output_may_be_modified_in_place(backend, implementation, act):
    """nnU-Net's residual block does ``out += residual`` on the block's output (issue 10 3.7)."""
    x, w, b, nw, nb, _, slope = _inputs(42, 1, 2, 3, (4, 5), 3, torch.float32, prelu=True)
    leaves = [t.requires_grad_() for t in (x, w, b, nw, nb, slope)]
    grads = []
    for in_place in (False, True):
        with fastmed.use_backend(backend):
            y = conv_norm_act(*leaves[:5], activation=act, negative_slope=slope if act == "prelu" else 0.01,
                              implementation=implementation)
        if in_place:
            y += 1
            y.mul_(2)
        else:
            y = (y + 1) * 2
        grads.append(torch.autograd.grad(y.sum(), leaves[:5] + (leaves[5:] if act == "prelu" else [])))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("implementation", ["auto", "cudnn", "implicit_gemm"])
def test_meta_tensors_infer_the_shape(implementation):
    """Meta tensors run the shape inference (issue 10 4: an autocast device error)."""
    x = torch.empty(2, 3, 6, 7, 5, device="meta")
    w = torch.empty(4, 3, 3, 3, 3, device="meta")
    y = conv_norm_act(x, w, stride=2, implementation=implementation)
    assert y.shape == (2, 4, 3, 4, 3) and y.device.type == "meta"


def test_failed_call_leaves_the_module_unchanged():
    """A ConvNormAct with batch norm validates before it counts a batch (issue 10 4)."""
    m = ConvNormAct(2, 3, 4, norm="batch", norm_kwargs={"momentum": None})
    m(torch.randn(2, 3, 5, 5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="residual must have the shape"):
        m(torch.randn(2, 3, 5, 5), residual=torch.randn(2, 4, 4, 4))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_data_gradient_tap_tables_are_cached():
    """The residue-class tap tables of the data gradient are built and copied to the device once per
    configuration (issue 11 4), not on every call."""
    from fastmed.kernels.conv_block import class_taps

    first = class_taps((3, 3, 3), (2, 1, 2), (1, 1, 1), torch.device("cpu"))
    again = class_taps((3, 3, 3), (2, 1, 2), (1, 1, 1), torch.device("cpu"))
    assert all(a is b for a, b in zip(first, again))
    taps, ntaps = first
    # per strided axis taps {0, 2} reach residue 0 and {1} residue 1; all 3 taps of the unstrided axis count
    assert ntaps.tolist() == [2 * 3 * 2, 2 * 3 * 1, 1 * 3 * 2, 1 * 3 * 1] and taps.shape == (4, 27)


# ------------------------------------------------------------------------------------------------
# GPU: benchmark shapes (bf16, both implementations, forward and backward)
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    (2, 32, 32, (128, 128, 128), 1), (2, 64, 64, (64, 64, 64), 1), (2, 128, 128, (32, 32, 32), 1),
    (2, 256, 256, (16, 16, 16), 1), (2, 320, 320, (8, 8, 8), 1), (2, 32, 64, (128, 128, 128), 2),
    (2, 128, 256, (32, 32, 32), 2), (24, 64, 64, (224, 224), 1),
]


def _rel_err(a, e):
    return ((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["cudnn", "implicit_gemm"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}x{'x'.join(map(str, s[3]))}s{s[4]}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_benchmark_shapes(shape, implementation, channels_last):
    n, cin, cout, spatial, stride = shape
    sd = len(spatial)
    torch.manual_seed(16)
    dev = "cuda"
    x = torch.randn((n, cin) + spatial, device=dev, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if sd == 3 else torch.channels_last)
    w = (torch.randn((cout, cin) + (3,) * sd, device=dev) / (cin * 3 ** sd) ** 0.5).to(torch.bfloat16)
    b, nw, nb = (torch.randn(cout, device=dev, dtype=torch.bfloat16) for _ in range(3))
    leaves = [t.requires_grad_() for t in (x, w, b, nw, nb)]
    y = conv_norm_act(*leaves, stride=stride, implementation=implementation)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = conv_norm_act_reference(*ref_leaves, stride=stride, padding=1)
    assert _rel_err(y, y_ref) < 2e-2
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.float())
    for name, a, e in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), grads, grads_ref):
        assert _rel_err(a, e) < 3e-2, name


def test_cudnn_path_channels_last_smooth_activation_reference_backend():
    with fastmed.use_backend("reference"):
        _check_block(17, 2, 3, 5, (5, 6, 7), 3, 1, 1, 1, "instance", "silu", True, False, torch.float32, "cudnn",
                     channels_last=True)


def test_bench_write_choice_table_round_trip(tmp_path, monkeypatch):
    """The table the GPU benchmark writes is valid Python whose keys are the ones ``auto`` looks up."""
    import importlib.util
    import os

    from fastmed.ops import conv_block as ops_cb

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_conv_block.py")
    spec = importlib.util.spec_from_file_location("bench_conv_block", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "choice.py"
    monkeypatch.setattr(bench, "CHOICE_FILE", str(out))
    rows = [dict(impl=f"fastmed-{impl}", mode="fwd+bwd", ms=ms, spatial="6x5x4", dtype="float32", Cin=3, Cout=4,
                 stride=2, layout="channels_last") for impl, ms in (("cudnn", 2.0), ("implicit_gemm", 1.0))]
    rows.append(dict(rows[0], spatial="7x6", layout="channels_first"))
    bench.write_choice(rows, str(tmp_path / "run.json"), dict(device="test", torch="t", triton="t", cuda="c",
                                                                cudnn="d", commit="x"))
    spec = importlib.util.spec_from_file_location("choice", str(out))
    choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choice)
    assert choice.MEASURED and len(choice.TABLE) == 2
    monkeypatch.setattr(ops_cb, "_conv_block_choice", choice)
    x = torch.randn(1, 3, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d)
    assert ops_cb.choose_implementation(x, torch.randn(4, 3, 3, 3, 3), (2, 2, 2)) == "implicit_gemm"
    assert ops_cb.choose_implementation(torch.randn(1, 3, 7, 6), torch.randn(4, 3, 3, 3), (2, 2)) == "cudnn"
    assert ops_cb.choose_implementation(x, torch.randn(4, 3, 3, 3, 3), (1, 1, 1)) == choice.DEFAULT


# bench/bench_conv_block.py's GPU cases: (N, Cin, Cout, spatial, stride, Cskip)
BENCHMARK_CASES = [
    (2, 32, 32, (128, 128, 128), 1, 0), (2, 64, 64, (64, 64, 64), 1, 0), (2, 128, 128, (32, 32, 32), 1, 0),
    (2, 256, 256, (16, 16, 16), 1, 0), (2, 320, 320, (8, 8, 8), 1, 0), (2, 32, 64, (128, 128, 128), 2, 0),
    (2, 64, 128, (64, 64, 64), 2, 0), (2, 128, 256, (32, 32, 32), 2, 0), (2, 256, 320, (16, 16, 16), 2, 0),
    (24, 64, 64, (224, 224), 1, 0), (2, 32, 32, (128, 128, 128), 1, 32), (2, 64, 64, (64, 64, 64), 1, 64)]


def test_kernels_compile_for_sm90():
    """The implicit-GEMM kernels compile for an H100 with tensor-core tl.dot (bf16, tf32 for fp32), without spills,
    at the tiles the launchers pick at the benchmark shapes; the interpreter runs them with fp32 dots only."""
    from sm90 import assert_no_spills, compile_for_sm90

    from fastmed.kernels.conv_block import gemm_blocks, wgrad_blocks

    m = "fastmed.kernels.conv_block"
    launches = set()
    for n, cin, cout, spatial, stride, cskip in BENCHMARK_CASES:
        kd = 3 if len(spatial) == 3 else 1
        out_voxels = math.prod(-(-size // stride) for size in spatial)
        per_class = out_voxels  # ceil(size / stride) voxels per residue class and axis
        fwd = gemm_blocks(False, out_voxels, cout, max(cin, cskip))
        launches.add(("_conv_fwd_kernel", kd, cskip > 0, tuple(sorted(fwd.items()))))
        for c in (cin, cskip) if cskip else (cin,):
            dgrad = gemm_blocks(False, per_class, c, cout)
            launches.add(("_conv_dgrad_kernel", kd, False, tuple(sorted(dgrad.items()))))
            launches.add(("_conv_wgrad_kernel", kd, False,
                          tuple(sorted(wgrad_blocks(False, cout, c, n * out_voxels).items()))))
    specs = []
    for dt, prec in (("*bf16", "ieee"), ("*fp32", "tf32")):
        acc = {"pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "pw_ptr": "*fp32", "taps_ptr": "*i32",
               "ntaps_ptr": "*i32", "b_ptr": dt}
        for kernel, kd, has_x2, items in sorted(launches):
            blocks = dict(items)
            warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
            dots = dict(DOT_FP32=False, INPUT_PRECISION=prec, **blocks)
            consts = dict(KD=kd, KH=3, KW=3, HAS_X2=has_x2, HAS_BIAS=True, STATS=True) \
                if kernel == "_conv_fwd_kernel" else dict(KH=3, KW=3, TAPS=kd * 9)
            specs.append(dict(module=m, kernel=kernel, ptr=dt, pointers=acc, num_warps=warps, num_stages=stages,
                              constexprs=dict(**consts, **dots)))
    assert_no_spills(compile_for_sm90(specs))


def test_warm_triton_cache_runs_every_case_and_implementation(monkeypatch, tdevice):
    """warm_triton_cache runs forward + backward of each case on the Triton backend, per implementation: the
    implicit GEMM's forward once per case, its data gradient once per input (twice with a skip input)."""
    import fastmed.kernels.conv_block as kernels_cb
    from fastmed.ops.conv_block import warm_triton_cache

    calls = []
    for name in ("conv_forward_stats", "conv_input_grad"):
        real = getattr(kernels_cb, name)
        monkeypatch.setattr(kernels_cb, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    cases = [dict(x_shape=(1, 2, 4, 5), out_channels=3),
             dict(x_shape=(1, 2, 3, 4, 4), out_channels=2, stride=2, skip_channels=1, channels_last=True)]
    assert warm_triton_cache(cases, device=tdevice) == 4
    assert calls.count("conv_forward_stats") == 2 and calls.count("conv_input_grad") == 3


@pytest.mark.parametrize("case,match", [(dict(x_shape=(1, 2, 4, 5), out_channels=3, strides=2), "unknown"),
                                        (dict(x_shape=(1, 2, 4, 5)), "missing"),
                                        (dict(x_shape=(1, 2, 4), out_channels=3), "2 or 3 spatial dims")])
def test_warm_triton_cache_bad_case(case, match):
    from fastmed.ops.conv_block import warm_triton_cache

    with pytest.raises(ValueError, match=match):
        warm_triton_cache([case], device="cpu")


def test_remembered_checks_still_refuse_bad_arguments():
    """conv_norm_act checks once per call signature: a call that differs from a remembered one only in the type
    of a stride/padding entry (a bool for an int), a shape or a dtype is checked again and refused."""
    x = torch.randn(1, 2, 5, 5, 5)
    w = torch.randn(3, 2, 3, 3, 3)
    conv_norm_act(x, w, stride=(1, 1, 1), padding=(1, 1, 1))
    with pytest.raises(ValueError, match="stride must be an int or a sequence of 3 ints"):
        conv_norm_act(x, w, stride=(True, 1, 1), padding=(1, 1, 1))
    with pytest.raises(ValueError, match="padding must be an int or a sequence of 3 ints"):
        conv_norm_act(x, w, stride=(1, 1, 1), padding=(1, True, 1))
    with pytest.raises(ValueError, match="weight expects 2 input channels"):
        conv_norm_act(torch.randn(1, 3, 5, 5, 5), w, stride=(1, 1, 1), padding=(1, 1, 1))
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        conv_norm_act(x, w.double(), stride=(1, 1, 1), padding=(1, 1, 1))
