"""fastmed.ops.norm_act / fastmed.nn.NormAct against the torch composition.

Both backends are checked: the reference (CPU fallback) and the Triton kernels (under TRITON_INTERPRET=1 on
this CPU machine, natively on a GPU machine).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, triton_device
from hypothesis import given
from hypothesis import strategies as st

import fastmed
from fastmed._validate import flat_view
from fastmed.ops import norm_act
from fastmed.ops.norm_act import norm_act_call, op_inputs
from fastmed.reference.norm_act import ACTIVATIONS, KINDS, NormSpec, NormTensors, norm_act_reference

ACTS = list(ACTIVATIONS)


def make_case(seed, kind, act, ndim, dtype, affine, residual, channels_last, device, n=2, c=4, sizes=None,
              requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [3, 4, 5][:ndim]
    x = (torch.randn(n, c, *sizes, generator=g, dtype=torch.float64) * 2 + 0.5)
    if channels_last and ndim in (2, 3):
        x = x.to(memory_format=torch.channels_last if ndim == 2 else torch.channels_last_3d)
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    r = torch.randn(x.shape, generator=g, dtype=torch.float64) if residual else None
    slope = (torch.rand(c, generator=g, dtype=torch.float64) * 0.5) if act == "prelu" else 0.1
    ng = (2 if c % 2 == 0 else 1) if kind == "group" else None

    def cast(t):
        if t is None or not isinstance(t, torch.Tensor):
            return t
        t = t.to(device=device, dtype=dtype if t.dim() > 1 else torch.float32 if dtype != torch.float64 else dtype)
        return t.requires_grad_(requires_grad)

    x = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return x, cast(w), cast(b), cast(r), cast(slope), ng


def inputs_of(x, w, b, r, slope):
    return [t for t in (x, w, b, r, slope) if isinstance(t, torch.Tensor)]


def run(backend, x, kind, w, b, r, slope, ng, act, gy, **kw):
    with fastmed.use_backend(backend):
        y = norm_act(x, kind, w, b, num_groups=ng, residual=r, activation=act, negative_slope=slope, **kw)
    grads = torch.autograd.grad(y, inputs_of(x, w, b, r, slope), gy)
    return y, grads


def oracle(x, kind, w, b, r, slope, ng, act, gy):
    """The torch composition in float64."""
    up = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in (x, w, b, r, slope)]
    y = norm_act_reference(up[0], kind, up[1], up[2], num_groups=ng, residual=up[3], activation=act,
                           negative_slope=up[4])
    grads = torch.autograd.grad(y, inputs_of(*up), gy.double())
    return y, grads


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.ext), "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@given(kind=st.sampled_from(KINDS), act=st.sampled_from(ACTS), ndim=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]), affine=st.booleans(), residual=st.booleans(),
       channels_last=st.booleans(), n=st.integers(1, 2), c=st.integers(1, 5),
       sizes=st.lists(st.integers(1, 6), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_equivalence(backend, kind, act, ndim, dtype, affine, residual, channels_last, n, c, sizes, seed):
    group_size = {"instance": 1, "group": c // 2 if c % 2 == 0 else c, "batch": n}[kind]
    if group_size * math.prod(sizes[:ndim]) == 1:  # torch refuses to normalize a single value
        sizes = [2] + sizes[1:]
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, r, slope, ng = make_case(seed, kind, act, ndim, dtype, affine, residual, channels_last, device, n=n,
                                      c=c, sizes=sizes[:ndim])
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(x)
    y, grads = run(backend, x, kind, w, b, r, slope, ng, act, gy)
    y_ref, grads_ref = oracle(x, kind, w, b, r, slope, ng, act, gy)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y")
    names = ["x", "weight", "bias", "residual", "slope"]
    present = [nm for nm, t in zip(names, (x, w, b, r, slope)) if isinstance(t, torch.Tensor)]
    for nm, g, g_ref in zip(present, grads, grads_ref):
        # Reductions over the row amplify rounding: scale the tolerance by the gradient's magnitude.
        scale = max(1.0, float(g_ref.abs().max()))
        tol = TOL[dtype]
        torch.testing.assert_close(g.double() / scale, g_ref / scale, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10,
                                   msg=lambda m, nm=nm: f"d{nm}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(backend, dtype, kind):
    """fp16/bf16 in, fp32 statistics: error of the fused path <= 2x the error of the composition run in the same
    precision, plus a small floor (flash-attention's rule)."""
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, r, slope, ng = make_case(3, kind, "leaky_relu", 3, torch.float32, True, True, True, device, c=4,
                                      sizes=[4, 5, 6])
    xl, rl = x.detach().to(dtype).requires_grad_(), r.detach().to(dtype).requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
    y, grads = run(backend, xl, kind, w, b, rl, slope, ng, "leaky_relu", gy.to(dtype))
    y64, grads64 = oracle(xl, kind, w, b, rl, slope, ng, "leaky_relu", gy)
    # The composition in the same low precision (torch's own norms upcast internally; the output is rounded).
    with torch.no_grad():
        y_low = norm_act_reference(xl.float(), kind, w, b, num_groups=ng, residual=rl.float(),
                                   activation="leaky_relu", negative_slope=0.1).to(dtype)
    err_low = (y_low.double() - y64).abs().max().item()
    err = (y.double().cpu() - y64.cpu()).abs().max().item()
    # floor: one unit in the last place of the largest output (a rounding tie may fall either way)
    floor = torch.finfo(dtype).eps * y64.abs().max().item()
    assert err <= 2 * err_low + floor, (err, err_low, floor)
    assert y.dtype == dtype
    for g, g64 in zip(grads, grads64):
        scale = max(1.0, float(g64.abs().max()))
        assert (g.double().cpu() - g64.cpu()).abs().max().item() / scale < 3e-2


def test_gradcheck_reference_fp64():
    x, w, b, r, slope, ng = make_case(0, "group", "prelu", 2, torch.float64, True, True, False, "cpu", c=4,
                                      sizes=[3, 3])
    with fastmed.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r, s: norm_act(x, "group", w, b, num_groups=2, residual=r, activation="prelu",
                                           negative_slope=s), (x, w, b, r, slope))
        x, w, b, r, _, _ = make_case(1, "batch", "gelu", 1, torch.float64, True, False, False, "cpu", c=3)
        assert torch.autograd.gradcheck(lambda x, w, b: norm_act(x, "batch", w, b, activation="gelu"), (x, w, b))


def test_gradcheck_triton_fp64():
    """The Triton kernels accumulate in fp64 for fp64 inputs, so finite differences check them too."""
    device = triton_device()
    x, w, b, r, _, _ = make_case(2, "instance", "silu", 2, torch.float64, True, True, True, device, n=1, c=2,
                                 sizes=[3, 3])
    with fastmed.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r: norm_act(x, "instance", w, b, residual=r, activation="silu"), (x, w, b, r))


@pytest.mark.ext
@pytest.mark.parametrize("kind,act,channels_last", [("group", "prelu", False), ("instance", "leaky_relu", True),
                                                   ("batch", "gelu", False), ("instance", "relu", True)])
def test_gradcheck_cpp_fp64(kind, act, channels_last):
    """The C++ kernels compute float64 inputs in float64: finite differences check forward and backward."""
    x, w, b, r, slope, ng = make_case(5, kind, act, 3, torch.float64, True, True, channels_last, "cpu", n=2, c=4,
                                      sizes=[3, 2, 3])
    with fastmed.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r, *s: norm_act(x, kind, w, b, num_groups=ng, residual=r, activation=act,
                                            negative_slope=s[0] if s else 0.1),
            (x, w, b, r) + ((slope,) if act == "prelu" else ()))


@pytest.mark.ext
@pytest.mark.parametrize("kind,act", [("instance", "leaky_relu"), ("group", "prelu"), ("batch", "relu")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_bitwise_deterministic_across_threads(kind, act, channels_last):
    """The C++ kernels split the work into fixed items combined in a fixed order: 1 and 2 threads give the same
    bits, forward and backward (the tensor is large enough to be split across threads)."""
    x, w, b, r, slope, ng = make_case(6, kind, act, 3, torch.float32, True, True, channels_last, "cpu", n=2, c=8,
                                      sizes=[20, 24, 24])
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, grads = run("cpp", x, kind, w, b, r, slope, ng, act, gy)
            results.append((y, grads))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.ext)])
@pytest.mark.parametrize("kind,act", [("instance", "leaky_relu"), ("group", "prelu"), ("batch", "gelu"),
                                      ("instance", "identity")])
def test_opcheck(backend, kind, act):
    x, w, b, r, slope, ng = make_case(4, kind, act, 3, torch.float32, True, True, False, "cpu", c=4)
    slope_t = slope if act == "prelu" else None
    spec = NormSpec(kind, ng or (4 if kind == "instance" else 1), 1e-5, act, 0.0 if act == "prelu" else 0.01)
    args = op_inputs(x, NormTensors(w, b, r, slope_t), None, None, spec, backend)
    torch.library.opcheck(torch.ops.fastmed.norm_act_fwd.default, args)
    y, mean, rstd, saved = torch.ops.fastmed.norm_act_fwd(*args)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastmed.norm_act_bwd.default,
                          (dy, x.detach(), saved.detach(), w.detach(), b.detach(), r.detach(),
                           None if slope_t is None else slope_t.detach(), mean.detach(), rstd.detach(), *spec, True,
                           backend))


def test_op_schema_follows_the_specs():
    """The flat torch.library signatures take the spec fields in the order op_inputs lays them out."""
    names = [a.name for a in torch.ops.fastmed.norm_act_fwd.default._schema.arguments]
    assert names == ["x", *NormTensors._fields, "mean_in", "rstd_in", *NormSpec._fields, "backend"]
    names = [a.name for a in torch.ops.fastmed.norm_act_bwd.default._schema.arguments]
    assert names == ["dy", "x", "saved", *NormTensors._fields, "mean", "rstd", *NormSpec._fields, "input_stats",
                     "backend"]


def test_torch_compile_fullgraph_block():
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)
            self.norm = fastmed.nn.InstanceNormAct(4, activation="leaky_relu")

        def forward(self, x):
            return self.norm(self.conv(x)).sum()

    block = Block()
    x = torch.randn(2, 2, 4, 5, 6, requires_grad=True)
    with fastmed.use_backend("reference"):
        eager = block(x)
        (g_eager,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)
        (g_comp,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_running_stats(backend, channels_last):
    device = triton_device() if backend == "triton" else "cpu"
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, device=device) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    with fastmed.use_backend(backend):
        y = norm_act(x, "batch", w, b, running_mean=rm, running_var=rv, momentum=0.3, activation="relu")
    y_t = F.relu(F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3, 1e-5))
    torch.testing.assert_close(y, y_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, rm_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv, rv_t, atol=1e-6, rtol=1e-5)
    # eval mode: running statistics, gradients through x only
    xe = x.detach().clone().requires_grad_()
    with fastmed.use_backend(backend):
        ye = norm_act(xe, "batch", w, b, running_mean=rm, running_var=rv, training=False, activation="relu")
    xt = x.detach().clone().requires_grad_()
    ye_t = F.relu(F.batch_norm(xt, rm_t, rv_t, w, b, False, 0.3, 1e-5))
    torch.testing.assert_close(ye, ye_t, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(ye)
    torch.testing.assert_close(torch.autograd.grad(ye, xe, gy)[0], torch.autograd.grad(ye_t, xt, gy)[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, rm_t)  # eval does not touch the running statistics


def test_module_matches_torch_modules_and_loads_state_dict():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(4, momentum=None)
    fm = fastmed.nn.BatchNormAct(4, momentum=None, activation="relu")
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    fm.load_state_dict(bn.state_dict())
    for _ in range(3):  # cumulative moving average when momentum=None
        x = torch.randn(2, 4, 3, 3, 3)
        torch.testing.assert_close(fm(x), F.relu(bn(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fm.running_var, bn.running_var, atol=1e-6, rtol=1e-5)
    assert int(fm.num_batches_tracked) == 3
    fm.eval(), bn.eval()
    x = torch.randn(2, 4, 3, 3, 3)
    torch.testing.assert_close(fm(x), F.relu(bn(x)), atol=1e-5, rtol=1e-5)

    inorm = torch.nn.InstanceNorm3d(4, affine=True)
    inorm.weight.data.normal_()
    act = torch.nn.LeakyReLU(0.01)
    na = fastmed.nn.NormAct.from_modules(inorm, act)
    assert na.weight is inorm.weight  # shared, not copied
    x = torch.randn(2, 4, 3, 4, 5)
    torch.testing.assert_close(na(x), act(inorm(x)), atol=1e-5, rtol=1e-5)
    gn = torch.nn.GroupNorm(2, 4)
    pr = torch.nn.PReLU(4)
    na = fastmed.nn.NormAct.from_modules(gn, pr)
    torch.testing.assert_close(na(x), pr(gn(x)), atol=1e-5, rtol=1e-5)
    assert set(fastmed.nn.GroupNormAct(2, 4).state_dict()) == set(gn.state_dict())
    with pytest.raises(TypeError, match="norm must be"):
        fastmed.nn.NormAct.from_modules(torch.nn.LayerNorm(4), act)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_without_copies(backend):
    device = triton_device() if backend == "triton" else "cpu"
    x = torch.randn(2, 8, 3, 4, 5, device=device).to(memory_format=torch.channels_last_3d)
    with fastmed.use_backend(backend):
        y = norm_act(x, "instance")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert flat_view(x).data_ptr() == x.data_ptr()  # the (N, C, S) view the kernels read: no copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_and_inputs_untouched(backend):
    device = triton_device() if backend == "triton" else "cpu"
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 2] = float("nan")
    before = x.clone()
    with fastmed.use_backend(backend):
        y = norm_act(x, "instance", activation="relu")
    assert torch.isnan(y[0, 1]).all()  # the poisoned row
    assert not torch.isnan(y[1]).any() and not torch.isnan(y[0, 0]).any()
    torch.testing.assert_close(x, before, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_gradient(backend):
    """dy from .sum() is an expanded tensor with zero strides; the kernels read it without a copy."""
    device = triton_device() if backend == "triton" else "cpu"
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    with fastmed.use_backend(backend):
        (g,) = torch.autograd.grad(norm_act(x, "group", num_groups=3, activation="gelu").sum(), x)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(norm_act_reference(xr, "group", num_groups=3, activation="gelu").sum(), xr)
    torch.testing.assert_close(g, gr, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_permuted_and_sliced_input(backend, kind):
    """Inputs that are neither contiguous nor channels-last (a batch-transposed, a sliced, a spatially permuted
    view): values and gradients as for their contiguous copies."""
    device = triton_device() if backend == "triton" else "cpu"
    base = torch.randn(4, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(37)).to(device)
    ng = 2 if kind == "group" else None
    for view in (lambda t: t.transpose(0, 1), lambda t: t.transpose(0, 1)[:, :, ::2],
                 lambda t: t.transpose(0, 1).permute(0, 1, 3, 2)):
        x = base.clone().requires_grad_()
        with fastmed.use_backend(backend):
            y = norm_act(view(x), kind, num_groups=ng, activation="gelu")
        xr = base.clone().requires_grad_()
        y_ref = norm_act_reference(view(xr).contiguous(), kind, num_groups=ng, activation="gelu")
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        gy = torch.randn_like(y_ref)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, xr, gy)[0],
                                   **TOL[torch.float64])


def _layouts_of_parameters(c, dtype):
    """Per-channel parameters of c channels that are strided, expanded (stride 0) and offset views."""
    g = torch.Generator().manual_seed(30)
    weight = (torch.rand(2 * c, generator=g, dtype=dtype) + 0.5)[::2]               # stride 2
    bias = torch.tensor([2.0], dtype=dtype).expand(c)                               # stride 0
    slope = (torch.rand(c + 3, generator=g, dtype=dtype) * 0.5)[3:]                 # storage offset 3
    slope_one = torch.tensor([0.1, 0.3], dtype=dtype)[1:]                           # (1,), offset
    return weight, bias, slope, slope_one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_strided_expanded_offset_parameters(backend, kind):
    """weight, bias and prelu slope are read with their own strides: a strided, an expanded and an offset view act
    like their contiguous copies (issue 10 3.1: the Triton kernels read them as if contiguous)."""
    device = triton_device() if backend == "triton" else "cpu"
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(31), dtype=torch.float64).to(device)
    ng = 3 if kind == "group" else None
    for slope_view in _layouts_of_parameters(3, torch.float64)[2:]:
        views = [t.to(device) for t in _layouts_of_parameters(3, torch.float64)[:2]] + [slope_view.to(device)]
        assert not all(t.is_contiguous() and t.storage_offset() == 0 for t in views)
        leaves = [x.clone().requires_grad_()] + [t.requires_grad_() for t in views]
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        with fastmed.use_backend(backend):
            y = norm_act(leaves[0], kind, leaves[1], leaves[2], num_groups=ng, activation="prelu",
                         negative_slope=leaves[3])
        y_ref = norm_act_reference(copies[0], kind, copies[1], copies[2], num_groups=ng, activation="prelu",
                                   negative_slope=copies[3])
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        gy = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, copies, gy)):
            torch.testing.assert_close(a, e, **TOL[torch.float64])
    # batch norm in eval mode: strided running statistics
    rm = torch.randn(6, dtype=torch.float64).to(device)[::2]
    rv = (torch.rand(6, dtype=torch.float64) + 0.5).to(device)[1::2]
    with fastmed.use_backend(backend):
        y = norm_act(x, "batch", running_mean=rm, running_var=rv, training=False, activation="identity")
    torch.testing.assert_close(y, F.batch_norm(x, rm.contiguous(), rv.contiguous(), training=False),
                               **TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8, 8), (2, 4, 9, 7)])
def test_large_mean_is_exact_on_every_layout(kind, channels_last, shape):
    """The default CPU path with |mean| >> std is as exact as torch's own norm (F.instance_norm, F.group_norm,
    F.batch_norm) on the contiguous input, forward and backward, within 2x the error of torch plus a floor of a few
    float32 ulps of the output (issue 10 3.2: on channels_last(_3d) input it erred by 1e3, where torch's instance
    norm errs by 3e-5)."""
    g = torch.Generator().manual_seed(32)
    x = torch.randn(shape, generator=g) + 1000.0
    w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    gy = torch.randn(shape, generator=g)
    ng = 2 if kind == "group" else None
    fmt = (torch.channels_last_3d if len(shape) == 5 else torch.channels_last) if channels_last else \
        torch.contiguous_format

    def torch_norm(t):
        wt, bt = w.to(t.dtype), b.to(t.dtype)
        if kind == "batch":
            return F.batch_norm(t, None, None, wt, bt, training=True)
        if kind == "instance":
            return F.instance_norm(t, weight=wt, bias=bt)
        return F.group_norm(t, ng, wt, bt)

    def value_and_grad(fn, t):
        t = t.detach().clone().requires_grad_()
        y = fn(t)
        return y, torch.autograd.grad(y, t, gy.to(t.dtype))[0]

    y64, dx64 = value_and_grad(torch_norm, x.double())
    y_t, dx_t = value_and_grad(torch_norm, x)  # torch, float32, contiguous
    y_f, dx_f = value_and_grad(lambda t: norm_act(t, kind, w, b, num_groups=ng, activation="identity"),
                               x.contiguous(memory_format=fmt))
    assert y_f.is_contiguous(memory_format=fmt)
    for name, fast, theirs, exact in (("y", y_f, y_t, y64), ("dx", dx_f, dx_t, dx64)):
        err = (fast.double() - exact).abs().max().item()
        err_torch = (theirs.double() - exact).abs().max().item()
        floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert err <= 2 * err_torch + floor, (name, err, err_torch)


def _tiny(seed, device, shape=(1, 2, 3, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5).to(device).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).to(device).requires_grad_()
    b = torch.randn(c, generator=g, dtype=dtype).to(device).requires_grad_()
    r = torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()
    s = (torch.rand(c, generator=g, dtype=dtype) * 0.5).to(device).requires_grad_()
    return x, w, b, r, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,act", [("instance", "silu"), ("group", "prelu"), ("batch", "gelu_tanh")])
def test_gradgradcheck_fp64(backend, kind, act):
    """Second-order gradients (issue 10 3.3: the Triton backward returned a gradient without a graph)."""
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, r, s = _tiny(33, device)
    ng = 2 if kind == "group" else None
    with fastmed.use_backend(backend):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b, r, s: norm_act(x, kind, w, b, num_groups=ng, residual=r, activation=act,
                                           negative_slope=s if act == "prelu" else 0.01), (x, w, b, r, s),
            fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_batch_eval_fp64(backend):
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, _, _ = _tiny(34, device)
    rm, rv = torch.randn(2, dtype=torch.float64, device=device), torch.rand(2, dtype=torch.float64, device=device) + .5
    with fastmed.use_backend(backend):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: norm_act(x, "batch", w, b, running_mean=rm, running_var=rv, training=False,
                                     activation="gelu"), (x, w, b), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_torch_modules(backend):
    """A gradient penalty (create_graph=True) through fastmed's module equals the one through torch's modules."""
    device = triton_device() if backend == "triton" else "cpu"
    torch.manual_seed(35)
    inorm = torch.nn.InstanceNorm2d(3, affine=True).double().to(device)
    inorm.weight.data.uniform_(0.5, 1.5)
    inorm.bias.data.normal_()
    act = torch.nn.SiLU()
    fused = fastmed.nn.NormAct.from_modules(inorm, act)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)

    def penalty(module):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(xi).pow(2).sum(), xi, create_graph=True)
        return gx.pow(2).sum(), torch.autograd.grad(gx.pow(2).sum(), [inorm.weight, inorm.bias])

    with fastmed.use_backend(backend):
        p_fused, g_fused = penalty(fused)
    p_torch, g_torch = penalty(lambda t: act(inorm(t)))
    torch.testing.assert_close(p_fused, p_torch, **TOL[torch.float64])
    for a, e in zip(g_fused, g_torch):
        assert e.abs().max() > 0
        torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_output_may_be_modified_in_place(backend, act):
    """``y = norm_act(x); y += 1; y.sum().backward()`` as with torch's own norms (issue 10 3.7: the reference saved
    y for the backward, so autograd refused)."""
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, r, s = _tiny(36, device, shape=(2, 2, 3, 4))
    slope = s if act == "prelu" else 0.1
    grads = []
    for in_place in (False, True):
        with fastmed.use_backend(backend):
            y = norm_act(x, "instance", w, b, residual=r, activation=act, negative_slope=slope)
        if in_place:
            y += 1
            y.mul_(2)
        else:
            y = (y + 1) * 2
        grads.append(torch.autograd.grad(y.sum(), inputs_of(x, w, b, r, slope)))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


def test_meta_tensors_infer_the_shape():
    x = torch.empty(2, 3, 4, 5, device="meta")
    w = torch.empty(3, device="meta")
    y = norm_act(x.to(memory_format=torch.channels_last), "group", w, w, num_groups=3, activation="silu")
    assert y.shape == x.shape and y.device.type == "meta"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_failed_call_leaves_the_module_unchanged(momentum):
    """BatchNormAct validates before it counts a batch (issue 10 4): a bad call changes no buffer."""
    m = fastmed.nn.BatchNormAct(4, momentum=momentum)
    m(torch.randn(3, 4, 5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(3, 5, 5), torch.randn(1, 4, 1), torch.randn(3, 4, 5).long()):
        with pytest.raises((ValueError, TypeError)):
            m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m(torch.randn(3, 4, 5))
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("module", ["fastmed.kernels.norm_act", "fastmed.kernels.conv_block"])
def test_every_launch_is_device_guarded(module):
    """Every Triton launch of the norm-act and conv-block launchers runs inside ``with device_guard(...)`` (issue 10
    5: Triton launches on the current device, so inputs on cuda:1 would run on GPU 0)."""
    import ast
    import importlib
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(isinstance(item.context_expr, ast.Call)
                                              and getattr(item.context_expr.func, "id", None) == "device_guard"
                                              for item in node.items):
            guarded.update(id(n) for n in ast.walk(node))
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "wrap_triton"]
    assert launches and all(id(n) in guarded for n in launches)


def test_activation_vocabulary_is_shared():
    """One list of activation names: the modules' table covers it and maps each name back to itself."""
    from fastmed.nn.norm_act import ACTIVATION_MODULES, activation_module, activation_of

    assert set(ACTIVATION_MODULES) == set(ACTIVATIONS)
    for name in ACTIVATIONS:
        assert activation_of(activation_module(name))[0] == name


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,exc,match", [
    (lambda x: norm_act(x[0, 0], "instance"), ValueError, "x must have 3..5 dimensions"),
    (lambda x: norm_act(x, "instance", torch.ones(3)), ValueError, r"weight must have shape \(4,\)"),
    (lambda x: norm_act(x, "group", num_groups=3), ValueError, "num_groups must divide the 4 channels"),
    (lambda x: norm_act(x, "group"), ValueError, "num_groups must be a positive integer"),
    (lambda x: norm_act(x, "instance", num_groups=2), ValueError, "num_groups is only used with kind='group'"),
    (lambda x: norm_act(x.long(), "instance"), TypeError, "x must be a floating-point tensor"),
    (lambda x: norm_act(x, "instance", torch.ones(4, device="meta")), ValueError, "weight is on meta"),
    (lambda x: norm_act(x[:0], "instance"), ValueError, "x must not be empty"),
    (lambda x: norm_act(x, "layer"), ValueError, "kind must be one of"),
    (lambda x: norm_act(x, "instance", activation="mish"), ValueError, "activation must be one of"),
    (lambda x: norm_act(x, "instance", activation="prelu"), TypeError, "negative_slope must be the learned prelu"),
    (lambda x: norm_act(x, "instance", negative_slope=torch.ones(1)), TypeError, "negative_slope must be a number"),
    (lambda x: norm_act(x, "instance", residual=x[:, :2]), ValueError, "residual must have the shape of x"),
    (lambda x: norm_act(x, "batch", training=False), ValueError, "needs running_mean and running_var"),
    (lambda x: norm_act(x, "instance", running_mean=torch.zeros(4), running_var=torch.ones(4)), ValueError,
     "only used with kind='batch'"),
    (lambda x: norm_act(x, "batch", running_mean=torch.zeros(4)), ValueError, "must be given together"),
    (lambda x: norm_act(x[:1, :, :1, :1], "batch"), ValueError, "more than one value per channel"),
    (lambda x: norm_act(x, "instance", eps=-1.0), ValueError, "eps must be a finite real number in \\[0.0, inf\\]"),
    (lambda x: norm_act(x[:, :, :1, :1], "instance"), ValueError, "more than one value per normalized group"),
    (lambda x: norm_act(x.numpy(), "instance"), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(call, exc, match):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(exc, match=match):
        call(x)


BENCHMARK_SHAPES = [(2, 32, 128, 128, 128), (2, 64, 64, 64, 64), (2, 128, 32, 32, 32), (2, 320, 8, 8, 8),
                    (24, 64, 224, 224)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", BENCHMARK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_benchmark_shapes(shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.rand(shape[1], device="cuda") + 0.5
    b = torch.randn(shape[1], device="cuda")
    gy = torch.randn_like(x)
    y = norm_act(x, "instance", w, b)
    (g,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().float().requires_grad_()
    y_ref = F.leaky_relu(F.instance_norm(xr, weight=w, bias=b), 0.01)
    (g_ref,) = torch.autograd.grad(y_ref, xr, gy.float())
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(g.float() / g_ref.abs().max(), g_ref / g_ref.abs().max(), **tol)


# ----------------------------------------------------------------------------------------- GPU compilation

def test_kernels_compile_for_sm90():
    """Every norm_act kernel, in the configurations the launchers use, compiles for an H100 without spills."""
    from sm90 import assert_no_spills, compile_for_sm90

    from fastmed.kernels.norm_act import launch_blocks, reduce_flags

    m = "fastmed.kernels.norm_act"
    acc = {"pmean_ptr": "*fp32", "pm2_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32",
           "b_ptr": "*fp32", "slope_ptr": "*fp32", "m1_ptr": "*fp32", "m2_ptr": "*fp32", "psg_ptr": "*fp32",
           "psgx_ptr": "*fp32", "psa_ptr": "*fp32"}
    floats = ["negative_slope", "eps"]
    flags = dict(HAS_W=True, HAS_B=True, HAS_RES=True)
    specs = []
    configs = {("*bf16", 2, 2048, 8), ("*fp16", 64, 64, 8), ("*fp32", 1, 16, 4)}
    # the tiles the launcher picks at the GPU benchmark shapes (test_gpu_benchmark_shapes, bf16), both layouts
    for shape in BENCHMARK_SHAPES:
        for fmt in (torch.contiguous_format, torch.channels_last_3d if len(shape) == 5 else torch.channels_last):
            x3 = flat_view(torch.empty(shape, device="meta").contiguous(memory_format=fmt))
            configs.add(("*bf16", *launch_blocks(x3, shape[1])))
    for dt, block_c, block_s, warps in sorted(configs):
        blocks = dict(BLOCK_C=block_c, BLOCK_S=block_s)
        specs.append(dict(module=m, kernel="_norm_stats_kernel", ptr=dt, pointers=acc, constexprs=blocks,
                          num_warps=warps))
        for act in ACTIVATIONS:
            specs.append(dict(module=m, kernel="_norm_act_fwd_kernel", ptr=dt, pointers=acc, floats=floats,
                              constexprs=dict(ACT=act, **flags, **reduce_flags(blocks)), num_warps=warps))
        for act in ("leaky_relu", "gelu", "prelu"):
            specs.append(dict(module=m, kernel="_norm_act_bwd_reduce_kernel", ptr=dt, pointers=acc, floats=floats,
                              constexprs=dict(ACT=act, **flags, **reduce_flags(blocks)), num_warps=warps))
            specs.append(dict(module=m, kernel="_norm_act_bwd_apply_kernel", ptr=dt, pointers=acc, floats=floats,
                              constexprs=dict(ACT=act, INPUT_STATS=act != "prelu", **flags, **blocks), num_warps=warps))
    # float64 inputs accumulate in float64; contiguous strides arrive as the constant 1; no affine, no residual
    f64 = {k: "*fp64" for k in acc}
    specs.append(dict(module=m, kernel="_norm_stats_kernel", ptr="*fp64", pointers=f64,
                      constexprs=dict(BLOCK_C=2, BLOCK_S=1024, sxs=1)))
    specs.append(dict(module=m, kernel="_norm_act_fwd_kernel", ptr="*fp64", pointers=f64, floats=floats,
                      constexprs=dict(ACT="gelu", HAS_W=False, HAS_B=False, HAS_RES=False, BLOCK_C=2, BLOCK_S=1024,
                                      sxs=1, sys=1)))
    for dt_acc in ("*fp32", "*fp64"):
        specs.append(dict(module=m, kernel="_norm_finalize_kernel", ptr=dt_acc, floats=floats,
                          constexprs=dict(BLOCK=1024)))
        specs.append(dict(module=m, kernel="_row_sums_kernel", ptr=dt_acc, constexprs=dict(HAS_W=True, BLOCK=16)))
        specs.append(dict(module=m, kernel="_row_sums_kernel", ptr=dt_acc, pointers={"w_ptr": "*bf16"},
                          constexprs=dict(HAS_W=False, BLOCK=256, divisor=1, P=1)))
    assert_no_spills(compile_for_sm90(specs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_path_equals_registered_op(backend):
    """Outside torch.compile the op bodies run through a plain autograd.Function (no torch.library dispatch
    cost); through the registered op they must give bit-identical values and gradients."""
    device = triton_device() if backend == "triton" else "cpu"
    x, w, b, r, slope, ng = make_case(9, "group", "prelu", 2, torch.float32, True, True, False, device, c=4)
    spec, tensors = NormSpec("group", ng, 1e-5, "prelu", 0.0), NormTensors(w, b, r, slope)
    y_fast = norm_act_call(x, tensors, spec, None, None, backend)[0]
    y_op = torch.ops.fastmed.norm_act_fwd(*op_inputs(x, tensors, None, None, spec, backend))[0]
    gy = torch.randn_like(y_op)
    g_fast = torch.autograd.grad(y_fast, (x, w, b, r, slope), gy)
    g_op = torch.autograd.grad(y_op, (x, w, b, r, slope), gy)
    assert torch.equal(y_fast, y_op)
    for a, e in zip(g_fast, g_op):
        assert torch.equal(a, e)


@pytest.mark.ext
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "prelu"])
@pytest.mark.parametrize("kind", KINDS)
def test_native_autograd_equals_registered_op(kind, act):
    """On the cpp backend a call that needs a gradient runs the C++ autograd node (norm_act_autograd_cpu, no Python
    autograd.Function): bit-identical to the registered op, values and every gradient; create_graph=True goes
    through its Python double backward and matches the composition's second-order gradient."""
    x, w, b, r, slope, ng = make_case(11, kind, act, 2, torch.float32, True, True, False, "cpu", c=4)
    with fastmed.use_backend("cpp"):
        y = norm_act(x, kind, w, b, num_groups=ng, residual=r, activation=act, negative_slope=slope)
    assert type(y.grad_fn).__name__ == "CppFunction"  # the C++ node, not a Python autograd.Function
    spec = NormSpec(kind, ng if kind == "group" else (4 if kind == "instance" else 1), 1e-5, act,
                    0.0 if act == "prelu" else float(slope))
    tensors = NormTensors(w, b, r, slope if act == "prelu" else None)
    y_op = torch.ops.fastmed.norm_act_fwd(*op_inputs(x, tensors, None, None, spec, "cpp"))[0]
    leaves = inputs_of(x, w, b, r, slope)
    gy = torch.randn_like(y)
    assert torch.equal(y, y_op)
    for a, e in zip(torch.autograd.grad(y, leaves, gy, retain_graph=True), torch.autograd.grad(y_op, leaves, gy)):
        assert torch.equal(a, e)
    (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    up = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in (x, w, b, r, slope)]
    y_ref = norm_act_reference(up[0], kind, up[1], up[2], num_groups=ng, residual=up[3], activation=act,
                               negative_slope=up[4])
    (gx_ref,) = torch.autograd.grad(y_ref, up[0], gy.double(), create_graph=True)
    (ggx_ref,) = torch.autograd.grad(gx_ref.pow(2).sum(), up[0])
    assert_close(gx, gx_ref, torch.float32, "first-order gradient with graph")
    assert_close(ggx, ggx_ref, torch.float32, "second-order gradient")


def test_remembered_checks_still_refuse_bad_arguments():
    """The checks run once per call signature (types, shapes, dtypes and devices of the arguments): a call that
    differs from a remembered one only in an argument's type (a bool for an int or a float), its shape or its
    device is checked again and refused."""
    x = torch.randn(2, 4, 3, 3)
    w = torch.ones(4)
    norm_act(x, "group", w, num_groups=2, eps=1.0)
    norm_act(x, "group", w, num_groups=1, eps=1.0)
    with pytest.raises(ValueError, match="num_groups must be a positive integer"):
        norm_act(x, "group", w, num_groups=True, eps=1.0)
    with pytest.raises(ValueError, match="eps must be"):
        norm_act(x, "group", w, num_groups=2, eps=True)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm_act(x, "group", torch.ones(5), num_groups=2, eps=1.0)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        norm_act(x, "group", torch.ones(4, dtype=torch.int64), num_groups=2, eps=1.0)
    with pytest.raises(TypeError, match="activation must be a string"):
        norm_act(x, "group", w, num_groups=2, eps=1.0, activation=["relu"])  # unhashable: checked, never remembered
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        norm_act(x, "group", w.to("meta"), num_groups=2, eps=1.0)


def test_remembered_checks_are_bounded():
    from fastmed._validate import CheckedCalls

    calls = CheckedCalls(size=2)
    calls.remember(("a",), 1)
    calls.remember(("b",), 2)
    assert calls.get(("a",)) == 1 and len(calls) == 2
    calls.remember(("c",), 3)  # full: everything is forgotten first
    assert calls.get(("a",)) is None and calls.get(("c",)) == 3 and len(calls) == 1
    assert calls.get(([1],)) is None  # an unhashable key is never found
    calls.remember(([1],), 4)
    assert len(calls) == 1
