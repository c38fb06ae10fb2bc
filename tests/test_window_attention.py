"""fastmed.ops.window_attention / fastmed.ops.attention against the float64 eager composition.

The oracle is :func:`fastmed.reference.window_attention.window_attention_eager` (roll + partition + explicit
bias and mask + softmax, as timm / Swin-Unet / MONAI write it) differentiated by autograd in float64, with the
grid padded by hand (MONAI's semantics) where it is not divisible by the window.
"""
import importlib
import math

import pytest
import torch
from conftest import TOL, triton_device
from hypothesis import given
from hypothesis import strategies as st

import fastmed
from fastmed.ops import attention, window_attention
from fastmed.reference import window_attention as ref


def _oracle(qkv, heads, window, shift, table, scale=None, qkv_pad=None, bias_index="coords"):
    """Eager float64 window attention with MONAI padding and Swin window shrinking."""
    nd = qkv.dim() - 2
    grid = tuple(qkv.shape[1:-1])
    window = (window,) * nd if isinstance(window, int) else tuple(window)
    shift = (shift,) * nd if isinstance(shift, int) else tuple(shift)
    win, sh = ref.effective_window(grid, window, shift)
    x = qkv
    for a, w in enumerate(win):
        extra = -x.shape[a + 1] % w
        if extra:
            shape = list(x.shape)
            shape[a + 1] = extra
            fill = x.new_zeros(shape) if qkv_pad is None else qkv_pad.expand(shape)
            x = torch.cat([x, fill], dim=a + 1)
    C = qkv.shape[-1] // 3
    scale = (C // heads) ** -0.5 if scale is None else scale
    index = ref.bias_index(win, window, win if bias_index == "coords" else window)
    out = ref.window_attention_eager(x, heads, win, sh, table, scale, index=index)
    return out[(slice(None),) + tuple(slice(0, s) for s in grid)]


def _inputs(B, grid, heads, head_dim, window, bias, pad, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    nd = len(grid)
    window = (window,) * nd if isinstance(window, int) else tuple(window)
    C = heads * head_dim
    qkv = torch.randn(B, *grid, 3 * C, generator=g, dtype=torch.float64)
    table = torch.randn(math.prod(2 * w - 1 for w in window), heads, generator=g, dtype=torch.float64) if bias else None
    qkv_pad = torch.randn(3 * C, generator=g, dtype=torch.float64) if pad else None
    dout = torch.randn(B, *grid, C, generator=g, dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) if t is not None else None for t in (qkv, table, qkv_pad, dout)]
    return cast


def _grads(fn, qkv, table, qkv_pad, dout):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (qkv, table, qkv_pad)]
    out = fn(*leaves)
    req = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, req, dout, allow_unused=True)  # qkv_pad is unused on divisible grids
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(req, grads)]


def _check(B, grid, heads, head_dim, window, shift, bias, pad, dtype, backend, bias_index="coords", tol=None):
    device = triton_device() if backend == "triton" else "cpu"
    qkv, table, qkv_pad, dout = _inputs(B, grid, heads, head_dim, window, bias, pad, dtype, device)
    with fastmed.use_backend(backend):
        got = _grads(lambda q, t, p: window_attention(q, heads, window, shift, t, qkv_pad=p, bias_index=bias_index),
                     qkv, table, qkv_pad, dout)
    want = _grads(lambda q, t, p: _oracle(q, heads, window, shift, t, qkv_pad=p, bias_index=bias_index),
                  *[t.double().cpu() if t is not None else None for t in (qkv, table, qkv_pad, dout)])
    tol = tol or TOL[dtype]
    names = ["out", "dqkv", "dtable", "dqkv_pad"]
    names = [n for n, present in zip(names, (True, True, bias, pad)) if present]
    for name, a, b in zip(names, got, want):
        scale = max(1.0, b.abs().max().item()) if name == "dtable" else 1.0
        torch.testing.assert_close(a.double().cpu(), b, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


# ----------------------------------------------------------------------------------------------- reference path

@given(nd=st.sampled_from([2, 3]), data=st.data(), bias=st.booleans(), head_dim=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float64, torch.float32]), pad=st.booleans())
def test_reference_backend_matches_eager(nd, data, bias, head_dim, dtype, pad):
    window = tuple(data.draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd), label="window"))
    grid = tuple(data.draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd), label="grid"))
    shift = tuple(data.draw(st.integers(0, w - 1), label="shift") for w in window)
    _check(2, grid, 2, head_dim, window, shift, bias, pad, dtype, "reference")


def test_reference_gradcheck():
    qkv, table, qkv_pad, _ = _inputs(1, (3, 5), 1, 2, 2, True, True, torch.float64)
    leaves = [t.requires_grad_() for t in (qkv, table, qkv_pad)]
    with fastmed.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda q, t, p: window_attention(q, 1, 2, 1, t, qkv_pad=p), leaves)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward_gradgradcheck(backend):
    """Second-order gradients (create_graph=True, e.g. a gradient penalty) on every backend: the first-order
    gradient carries a graph, and gradgradcheck agrees with finite differences of it (float64)."""
    device = triton_device() if backend == "triton" else "cpu"
    qkv, table, qkv_pad, _ = _inputs(1, (3, 2), 1, 2, 2, True, True, torch.float64, device)  # 3 rows: padded

    def f(q, t, p):
        return window_attention(q, 1, 2, 1, t, qkv_pad=p)

    leaves = [t.requires_grad_() for t in (qkv, table, qkv_pad)]
    with fastmed.use_backend(backend):
        out = f(*leaves)
        first = torch.autograd.grad(out, leaves, torch.ones_like(out), create_graph=True)
        assert all(g.requires_grad for g in first)  # the Triton backend used to return gradients with no graph
        plain = torch.autograd.grad(f(*leaves), leaves, torch.ones_like(out))  # the backend's own backward
        for a, b in zip(first, plain):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        assert torch.autograd.gradgradcheck(f, leaves)


def test_window_shrinks_on_small_axes():
    # grid 5x12 with window 7: axis 0 shrinks to 5 with shift 0; axis 1 keeps window 7 (padded to 14) and shift 3
    _check(1, (5, 12), 2, 16, 7, 3, True, True, torch.float64, "reference")
    _check(1, (5, 12), 2, 16, 7, 3, True, True, torch.float64, "reference", bias_index="monai")


def test_bias_index_modes_differ_only_when_shrunk():
    qkv, table, _, _ = _inputs(1, (6, 6), 2, 16, 7, True, False, torch.float64)
    a = window_attention(qkv, 2, 7, 0, table, bias_index="coords")
    b = window_attention(qkv, 2, 7, 0, table, bias_index="monai")
    assert (a - b).abs().max() > 1e-3  # 6x6 window: MONAI's index[:36, :36] is not the displacement bias
    qkv, table, _, _ = _inputs(1, (7, 14), 2, 16, 7, True, False, torch.float64)
    torch.testing.assert_close(window_attention(qkv, 2, 7, 3, table, bias_index="coords"),
                               window_attention(qkv, 2, 7, 3, table, bias_index="monai"), atol=0, rtol=0)


def test_nan_stays_nan_and_inputs_untouched():
    qkv, table, _, _ = _inputs(1, (7, 14), 2, 16, 7, True, False, torch.float32)
    qkv[0, 1, 2, 5] = float("nan")
    before = qkv.clone()
    out = window_attention(qkv, 2, 7, 0, table)
    assert torch.isnan(out[0, :7, :7]).any() and not torch.isnan(out[0, :, 7:]).any()
    assert torch.equal(torch.isnan(qkv), torch.isnan(before)) and torch.equal(qkv.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("backend, saves", [("reference", "logsumexp"), ("aten", "logsumexp"),
                                             ("aten", "probabilities"),
                                             pytest.param("cpp", "logsumexp", marks=pytest.mark.ext),
                                             pytest.param("cpp", "probabilities", marks=pytest.mark.ext)])
def test_opcheck(backend, saves):
    qkv, table, qkv_pad, dout = _inputs(2, (3, 6), 2, 4, 2, True, True, torch.float32)  # 3 rows: padded to 4
    args = (qkv.unsqueeze(1), table, qkv_pad, 2, [1, 2, 2], [0, 1, 1], 0.5, [1, 2, 2], [1, 2, 2], saves, backend)
    torch.library.opcheck(torch.ops.fastmed.window_attention_fwd.default, args)
    _out, lse = torch.ops.fastmed.window_attention_fwd(*args)
    # the forward's aot_dispatch check already runs the backward op through AOT autograd
    torch.library.opcheck(torch.ops.fastmed.window_attention_bwd.default,
                          (dout.unsqueeze(1), qkv.unsqueeze(1), lse, table, qkv_pad, 2, [1, 2, 2], [0, 1, 1],
                           0.5, [1, 2, 2], [1, 2, 2], saves, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["reference", "aten", pytest.param("cpp", marks=pytest.mark.ext)])
def test_torch_compile_fullgraph(backend):
    """Traced through (fake tensors meet no cached layout): values and gradients equal the eager call's."""
    qkv, table, qkv_pad, dout = _inputs(1, (5, 6), 2, 4, 3, True, True, torch.float32)

    def f(q, t, p):
        return window_attention(q, 2, 3, 1, t, qkv_pad=p)

    with fastmed.use_backend(backend):
        want = _grads(f, qkv, table, qkv_pad, dout)
        got = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), qkv, table, qkv_pad, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------- Triton kernels

TRITON_CASES = [
    # B, grid, heads, head_dim, window, shift, bias, pad, dtype
    pytest.param(1, (14, 14), 2, 16, 7, 3, True, False, torch.float32, id="2d-14x14-w7-shift-bias"),
    pytest.param(1, (14, 14), 1, 32, 7, 0, False, False, torch.float32, id="2d-14x14-w7-hd32-plain"),
    pytest.param(2, (9, 10), 1, 16, 7, 3, True, True, torch.float32, id="2d-nondivisible-padded"),
    pytest.param(1, (6, 6), 1, 16, 7, 3, True, False, torch.float32, id="2d-window-larger-than-grid"),
    pytest.param(1, (4, 4, 6), 2, 16, (2, 2, 3), (1, 1, 1), True, False, torch.float32, id="3d-small-windows"),
    # 16-bit inputs take 64-wide tiles (float32: 16-wide, too many programs for the interpreter at these sizes)
    pytest.param(1, (8, 8, 8), 1, 16, 8, 0, True, False, torch.float16, id="3d-8x8x8-512-tokens"),
    pytest.param(1, (7, 7, 14), 1, 16, 7, 3, True, False, torch.bfloat16, id="3d-7^3-343-tokens-partial-tile"),
    pytest.param(1, (7, 7), 1, 64, 7, 0, True, False, torch.float32, id="2d-hd64"),
    pytest.param(1, (5, 6, 7), 1, 16, 3, 1, True, True, torch.float32, id="3d-nondivisible-padded"),
    pytest.param(1, (7, 7), 1, 48, 7, 0, True, False, torch.float32, id="2d-hd48-padded-head"),
    pytest.param(1, (7, 14), 1, 16, 7, 3, True, False, torch.float16, id="2d-fp16"),
    pytest.param(1, (7, 14), 1, 16, 7, 3, True, False, torch.bfloat16, id="2d-bf16"),
    pytest.param(1, (4, 6), 1, 16, (2, 3), (1, 1), True, False, torch.float64, id="2d-fp64"),
    # float64 tiles are 32 wide: 27 tokens are one tile (the fused one-tile backward) with MONAI padding
    pytest.param(1, (5, 6, 7), 1, 16, 3, 1, True, True, torch.float64, id="3d-fp64-one-tile-padded"),
]


@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift,bias,pad,dtype", TRITON_CASES)
def test_triton_matches_eager(B, grid, heads, head_dim, window, shift, bias, pad, dtype):
    tol = TOL[dtype]
    if dtype in (torch.float16, torch.bfloat16):  # inputs rounded to the low precision; gradients sum many terms
        tol = dict(atol=3 * tol["atol"], rtol=tol["rtol"])
    _check(B, grid, heads, head_dim, window, shift, bias, pad, dtype, "triton", tol=tol)


def test_triton_monai_bias_index_when_shrunk():
    _check(1, (6, 6), 1, 16, 7, 3, True, False, torch.float32, "triton", bias_index="monai")


def test_triton_backward_is_deterministic():
    qkv, table, _, dout = _inputs(2, (4, 4, 4), 1, 16, 2, True, False, torch.float32, triton_device())
    with fastmed.use_backend("triton"):
        runs = [_grads(lambda q, t, p: window_attention(q, 1, 2, 1, t), qkv, table, None, dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launch_grids_stay_within_cuda_limits():
    """Every grid the launchers compute stays within CUDA's limits (axis 0: 2^31 - 1, axes 1 and 2: 65,535), here
    for 66 volumes of 64^3 tokens with 7^3 windows: 66,000 windows, more than axes 1 and 2 can hold."""
    from fastmed.kernels import window_attention as K

    cases = [((66, 64, 64, 64, 3 * 96), ref.WindowSpec(3, (7, 7, 7), (3, 3, 3), 0.2, (7, 7, 7), (7, 7, 7))),
             ((3000, 1, 56, 56, 3 * 96), ref.WindowSpec(3, (1, 7, 7), (0, 3, 3), 0.2, (1, 7, 7), (1, 7, 7)))]
    for shape, spec in cases:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for has_table in (True, False):
                plan = K.launch_plan(shape, dtype, spec, has_table=has_table, has_pad=False, programs=4 * 132,
                                     interpreted=False)
                assert plan.n_windows > 65535
                assert "fwd" in plan.launches and ({"bwd_tile", "bwd_tiled"} & set(plan.launches))
                for name, launch in plan.launches.items():
                    grid = launch.grid
                    assert 1 <= len(grid) <= 3, (name, grid)
                    assert all(1 <= n <= limit for n, limit in zip(grid, (2 ** 31 - 1, 65535, 65535))), (name, grid)
    # a launch no GPU could take is refused with a clear error (here: 70,000 heads on grid axis 1)
    with pytest.raises(ValueError, match="exceeds CUDA's grid limits"):
        K.launch_plan((1, 1, 7, 7, 3 * 70000), torch.float32, ref.WindowSpec(70000, (1, 7, 7), (0, 0, 0), 1.0,
                                                                              (1, 7, 7), (1, 7, 7)),
                      has_table=False, has_pad=False, programs=4, interpreted=False)


def test_every_launch_is_device_guarded():
    """Every Triton launch in kernels/window_attention.py runs inside ``with device_guard(...)`` (inputs on
    cuda:1 while the current device is 0 must run on GPU 1); read from the source, since a CPU cannot show it.
    Kernels are launched only through ``_launch`` (the one ``wrap_triton`` call), and every ``_launch`` call sits
    inside a ``with device_guard(...)`` block."""
    import ast
    import inspect

    from fastmed.kernels import window_attention as K

    tree = ast.parse(inspect.getsource(K))
    guarded, launches, wraps = set(), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call)
                                              and getattr(i.context_expr.func, "id", "") == "device_guard"
                                              for i in node.items):
            guarded |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_launch":
            launches.add(id(node))
        if isinstance(node, ast.FunctionDef):
            wraps += [node.name for n in ast.walk(node)
                      if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "wrap_triton"]
    assert wraps == ["_launch"]
    assert len(launches) == 7 and launches <= guarded


# ----------------------------------------------------------------------------------------------- errors

def test_errors():
    qkv = torch.randn(1, 7, 7, 3 * 8)
    table = torch.zeros(169, 2)
    with pytest.raises(ValueError, match="num_heads must divide"):
        window_attention(qkv, 3, 7)
    with pytest.raises(ValueError, match="3 \\* C"):
        window_attention(torch.randn(1, 7, 7, 25), 1, 7)
    with pytest.raises(ValueError, match="rel_pos_bias_table must have shape .* = \\(169, 2\\)"):
        window_attention(qkv, 2, 7, 0, torch.zeros(168, 2))
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        window_attention(qkv, 2, 0)
    with pytest.raises(ValueError, match="shift_size must be smaller than window_size"):
        window_attention(qkv, 2, 7, 7, table)
    with pytest.raises(ValueError, match="shift_size must be >= 0"):
        window_attention(qkv, 2, 7, (0, -1), table)
    with pytest.raises(ValueError, match="window_size must be an int or a sequence of 2"):
        window_attention(qkv, 2, (7, 7, 7))
    with pytest.raises(ValueError, match="qkv must have 4..5 dimensions"):
        window_attention(torch.randn(7, 24), 2, 7)
    with pytest.raises(TypeError, match="qkv must be a floating-point tensor"):
        window_attention(torch.zeros(1, 7, 7, 24, dtype=torch.long), 2, 7)
    with pytest.raises(ValueError, match="qkv_pad must have shape \\(24,\\)"):
        window_attention(qkv, 2, 7, qkv_pad=torch.zeros(8))
    with pytest.raises(ValueError, match="bias_index must be one of"):
        window_attention(qkv, 2, 7, bias_index="timm")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        window_attention(qkv, 2, 7, scale=float("nan"))
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        window_attention(qkv, 0, 7)
    with pytest.raises(fastmed.BackendUnavailableError):
        with fastmed.use_backend("cuda"):
            window_attention(qkv, 2, 7)


# ----------------------------------------------------------------------------------------------- global attention

@pytest.mark.parametrize("bias_shape", [None, (1, 1, 5, 7), (2, 3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_matches_reference(bias_shape, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, 7, 8, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3, 7, 8, generator=g, dtype=dtype, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g, dtype=dtype, requires_grad=True)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    out = attention(q, k, v, bias)
    want = ref.attention_reference(*[t.double() for t in (q, k, v)], None if bias is None else bias.double())
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    exp = torch.autograd.grad(want, leaves, dout.double())
    for a, b in zip(got, exp):  # both gradients come back in the leaves' dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_attention_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention(q, q, torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="must agree in B, heads and head_dim"):
        attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match="bias must broadcast"):
        attention(q, q, q, torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.double(), q)
    for bad in (float("nan"), float("inf"), -float("inf")):  # used to give all-NaN / all-zero attention
        with pytest.raises(ValueError, match="scale must be a finite number"):
            attention(q, q, q, scale=bad)


# ----------------------------------------------------------------------------------------------- GPU

GPU_SHAPES = [
    pytest.param(24, (56, 56), 3, 32, 7, 3, id="swin-unet-56x56"),
    pytest.param(24, (7, 7), 24, 32, 7, 3, id="swin-unet-7x7"),
    pytest.param(2, (48, 48, 48), 3, 16, 7, 3, id="swinunetr-48^3-padded"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift", GPU_SHAPES)
def test_gpu_benchmark_shapes(B, grid, heads, head_dim, window, shift, dtype):
    qkv, table, qkv_pad, dout = _inputs(B, grid, heads, head_dim, window, True, True, dtype, "cuda")
    got = _grads(lambda q, t, p: window_attention(q, heads, window, shift, t, qkv_pad=p), qkv, table, qkv_pad, dout)
    with fastmed.use_backend("reference"):  # float32 reference on the GPU, inputs upcast
        want = _grads(lambda q, t, p: window_attention(q, heads, window, shift, t, qkv_pad=p),
                      *[t.float() for t in (qkv, table, qkv_pad, dout)])
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for name, a, b in zip(["out", "dqkv", "dtable", "dqkv_pad"], got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


# ----------------------------------------------------------------------------------------------- GPU compilation

def _bench_stages():
    """bench/bench_window_attention.py's GPU_CASES: ``(name, B, grid, C, heads, window, shift)`` per stage."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_window_attention.py")
    spec = importlib.util.spec_from_file_location("bench_window_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.GPU_CASES


_SM90_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _stage_spec(grid, C, heads, window, shift):
    nd = len(grid)
    g3 = (1,) * (3 - nd) + tuple(grid)
    win, sh = ref.effective_window(g3, (1,) * (3 - nd) + (window,) * nd, (0,) * (3 - nd) + (shift,) * nd)
    return ref.WindowSpec(heads, win, sh, (C // heads) ** -0.5, win, win), g3


def shipped_specializations():
    """Every (kernel, constexprs, warps) the launchers pick at the benchmark stages on an H100 (132 SMs), bf16 and
    fp32, with a bias table and a ``qkv_pad`` vector (MONAI's padding where the grid is not divisible), as
    :func:`sm90.compile_for_sm90` specs."""
    from fastmed.kernels import window_attention as K

    specs = {}
    for _, B, grid, C, heads, window, shift in _bench_stages():
        spec, g3 = _stage_spec(grid, C, heads, window, shift)
        for dtype, dt in _SM90_DTYPES.items():
            plan = K.launch_plan((B, *g3, 3 * C), dtype, spec, has_table=True, has_pad=True, programs=4 * 132,
                                 interpreted=False)
            for name, launch in plan.launches.items():
                fn = K.KERNELS[name]
                ptrs = {a: f"*{dt}" for a in fn.arg_names
                        if a in ("qkv_ptr", "out_ptr", "dout_ptr", "dqkv_ptr", "pad_ptr", "table_ptr")}
                key = (fn.__name__, dt, tuple(sorted(launch.constexprs.items())), launch.num_warps)
                specs[key] = dict(module=K.__name__, kernel=fn.__name__, ptr="*fp32", pointers=ptrs,
                                  constexprs=dict(launch.constexprs), num_warps=launch.num_warps, floats=["scale"])
    return list(specs.values())


def test_launch_plans_cover_every_kernel():
    """The benchmark stages exercise every kernel (so the sm_90 test below compiles all of them)."""
    from fastmed.kernels import window_attention as K

    assert {s["kernel"] for s in shipped_specializations()} == {fn.__name__ for fn in K.KERNELS.values()}


def test_kernels_compile_for_sm90_without_spills():
    """Compile every specialization the launchers ship at the benchmark stages for an H100 (sm_90) without a GPU
    (catches what the interpreter lets through), and require that none spills registers to local memory."""
    from sm90 import assert_no_spills, compile_for_sm90

    specs = shipped_specializations()
    reports = compile_for_sm90(specs)
    assert len(reports) == len(specs)
    assert_no_spills(reports)


# ----------------------------------------------------------------------------------------------- aten (CPU)

ATEN_CASES = [
    # B, grid, heads, head_dim, window, shift, bias, pad, dtype
    pytest.param(2, (14, 14), 2, 8, 7, 3, True, False, torch.float32, id="2d-shift-bias"),
    pytest.param(1, (9, 10), 1, 8, 7, 3, True, True, torch.float32, id="2d-padded"),
    pytest.param(1, (7, 7), 2, 8, 7, 0, False, False, torch.float32, id="2d-plain"),
    pytest.param(1, (5, 6, 7), 2, 4, 3, 1, True, True, torch.float64, id="3d-padded-fp64"),
    pytest.param(1, (4, 4, 6), 1, 8, (2, 2, 3), (1, 1, 1), False, True, torch.float32, id="3d-shift-no-bias"),
    pytest.param(1, (7, 14), 1, 16, 7, 3, True, False, torch.bfloat16, id="2d-bf16"),
    pytest.param(2, (6, 6, 6), 2, 4, 3, 1, True, False, torch.float32, id="3d-shift-batch2"),
    pytest.param(2, (6, 8, 6), 2, 4, 3, 0, False, True, torch.float64, id="3d-plain-no-bias-fp64"),
    pytest.param(2, (12, 12), 3, 8, 4, 2, True, True, torch.float64, id="2d-shift-pad-unused-fp64"),
]


def _assert_aten_matches_reference(qkv, table, qkv_pad, dout, heads, window, shift, dtype, backend="aten"):
    """Output and the gradients of qkv, the bias table and the padding token: ``backend`` (``aten`` or ``cpp``)
    vs the reference."""
    def f(q, t, p):
        return window_attention(q, heads, window, shift, t, qkv_pad=p)

    with fastmed.use_backend(backend):
        got = _grads(f, qkv, table, qkv_pad, dout)
    with fastmed.use_backend("reference"):
        want = _grads(f, qkv, table, qkv_pad, dout)
    tol = TOL[dtype]
    for name, a, b in zip(["out", "dqkv", "dtable", "dqkv_pad"], got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


def _force_saves(monkeypatch, saves):
    """Make the ``aten`` forward keep ``saves`` whenever a gradient is needed, whatever the window size."""
    wa = importlib.import_module("fastmed.ops.window_attention")
    monkeypatch.setattr(wa, "_PROBS_MAX_TOKENS", 1 << 30 if saves == "probabilities" else 0)


@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift,bias,pad,dtype", ATEN_CASES)
def test_aten_matches_reference(monkeypatch, B, grid, heads, head_dim, window, shift, bias, pad, dtype, saves):
    """The CPU ``aten`` backend (batched matmuls keeping the probabilities, or torch's flash-attention CPU kernel
    keeping the logsumexp; gathers for roll and partition, strided views without shift and padding) against the
    reference backend (the oracle), output and every gradient."""
    _force_saves(monkeypatch, saves)
    qkv, table, qkv_pad, dout = _inputs(B, grid, heads, head_dim, window, bias, pad, dtype)

    _assert_aten_matches_reference(qkv, table, qkv_pad, dout, heads, window, shift, dtype)


ATEN_CHUNK_CASES = [
    # B, grid, heads, head_dim, window, shift, dtype
    pytest.param(2, (9, 9, 9), 2, 4, 3, 1, torch.float64, id="3d-shift-padded-fp64"),
    pytest.param(2, (9, 9, 9), 2, 4, 3, 1, torch.float32, id="3d-shift-padded"),
    pytest.param(3, (14, 14), 2, 8, 7, 0, torch.float32, id="2d-plain"),
]


@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift,dtype", ATEN_CHUNK_CASES)
def test_aten_backward_in_chunks_matches_reference(monkeypatch, B, grid, heads, head_dim, window, shift, dtype,
                                                   saves):
    """The ``aten`` forward (keeping probabilities) and backward walk each shift-mask pattern's windows in chunks;
    with a chunk of one window (so every pattern spans several chunks, and chunks of one pattern meet the next
    pattern's; one batch element when the windows are read in place) the output and every gradient (qkv, bias
    table, padding token) still match the reference."""
    _force_saves(monkeypatch, saves)
    wa = importlib.import_module("fastmed.ops.window_attention")
    n = window ** len(grid)
    monkeypatch.setattr(wa, "_CHUNK_ELEMENTS", heads * n * n // torch.get_num_threads())  # chunks of one window
    qkv, table, qkv_pad, dout = _inputs(B, grid, heads, head_dim, window, True, True, dtype)

    _assert_aten_matches_reference(qkv, table, qkv_pad, dout, heads, window, shift, dtype)


@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
def test_aten_in_place_chunks_of_one_batch_element_match_reference(monkeypatch, saves):
    """No shift, no padding, chunks of exactly one batch element's 4 windows: the windows are read in place
    (strided views of the grid), chunk by chunk; output and gradients equal the reference's.  With chunks of
    fewer windows than one batch element holds, the gathered layout is used instead."""
    _force_saves(monkeypatch, saves)
    wa = importlib.import_module("fastmed.ops.window_attention")
    heads, window, n = 2, 7, 49
    spec = ref.WindowSpec(heads, (1, 7, 7), (0, 0, 0), 0.25, (1, 7, 7), (1, 7, 7))
    qkv, table, _, dout = _inputs(3, (14, 14), heads, 8, window, True, False, torch.float32, seed=7)
    monkeypatch.setattr(wa, "_CHUNK_ELEMENTS", 4 * heads * n * n // torch.get_num_threads())
    assert wa._layout(qkv.unsqueeze(1), spec, None, (qkv,))[0].in_place
    _assert_aten_matches_reference(qkv, table, None, dout, heads, window, 0, torch.float32)
    monkeypatch.setattr(wa, "_CHUNK_ELEMENTS", 3 * heads * n * n // torch.get_num_threads())
    assert not wa._layout(qkv.unsqueeze(1), spec, None, (qkv,))[0].in_place


@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
def test_aten_strided_inputs_read_in_place_stay_untouched(monkeypatch, saves):
    """No shift and no padding: the windows are read from the grid through strided views.  Non-contiguous qkv and
    d out (transposed grids) give the reference's output and gradients, and qkv is not modified (q is scaled in
    a copy)."""
    _force_saves(monkeypatch, saves)
    heads, window = 2, (2, 3)
    qkv, table, _, dout = _inputs(2, (4, 6), heads, 4, window, True, False, torch.float32, seed=5)
    qkv = qkv.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (2, 4, 6, 24), strided
    dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qkv.is_contiguous() and not dout.is_contiguous()
    before = qkv.detach().clone()

    def f(q, t, p):
        return window_attention(q, heads, window, 0, t)

    with fastmed.use_backend("aten"):
        got = _grads(f, qkv, table, None, dout)
    assert torch.equal(qkv.detach(), before)
    with fastmed.use_backend("reference"):
        want = _grads(f, qkv, table, None, dout)
    for name, a, b in zip(["out", "dqkv", "dtable"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)


def test_aten_keeps_probabilities_only_for_small_windows_with_a_gradient():
    """The documented choice (``_PROBS_MAX_TOKENS``): probabilities for Swin-Unet's 7x7 windows when a gradient is
    needed, the flash kernel's logsumexp without one and for SwinUNETR's 7x7x7 windows."""
    wa = importlib.import_module("fastmed.ops.window_attention")
    spec2d = ref.WindowSpec(3, (1, 7, 7), (0, 3, 3), 0.1, (1, 7, 7), (1, 7, 7))
    spec3d = ref.WindowSpec(3, (7, 7, 7), (3, 3, 3), 0.1, (7, 7, 7), (7, 7, 7))
    assert wa.saves_for(spec2d, True) == "probabilities"
    assert wa.saves_for(spec2d, False) == wa.saves_for(spec3d, True) == wa.saves_for(spec3d, False) == "logsumexp"


def test_aten_batch_sizes_and_inplace_output():
    """One grid at two batch sizes in turn (the cached window layout is per batch size), the output modified in
    place before the backward (the backward does not read it): gradients equal the reference's."""
    heads, window, shift = 2, 4, 2
    for B in (1, 3, 1):
        qkv, table, qkv_pad, dout = _inputs(B, (8, 12), heads, 8, window, True, False, torch.float64, seed=B)

        def f(q, t, p):
            out = window_attention(q, heads, window, shift, t)
            out.mul_(2.0).add_(1.0)
            return out

        with fastmed.use_backend("aten"):
            got = _grads(f, qkv, table, qkv_pad, dout)
        with fastmed.use_backend("reference"):
            want = _grads(f, qkv, table, qkv_pad, dout)
        for name, a, b in zip(["out", "dqkv", "dtable"], got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"B={B} {name}")


@pytest.mark.parametrize("backend", ["aten", pytest.param("cpp", marks=pytest.mark.ext)])
@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
def test_masked_probabilities_stay_exact_in_float32(monkeypatch, backend, saves):
    """The CPU backends clamp log-probabilities at float32's smallest normal exponent (subnormal exp is slow on
    the CPU); pairs the shift mask separates (-100) must still get no visible gradient: the float32 gradients of
    a shifted case equal the float64 reference to float32 precision, bias table included."""
    _force_saves(monkeypatch, saves)
    heads, window, shift = 2, 7, 3
    qkv, table, _, dout = _inputs(2, (14, 14), heads, 16, window, True, False, torch.float64, seed=3)

    def f(q, t, p):
        return window_attention(q, heads, window, shift, t)

    with fastmed.use_backend("reference"):
        want = _grads(f, qkv, table, None, dout)
    with fastmed.use_backend(backend):
        got = _grads(f, qkv.float(), table.float(), None, dout.float())
    for name, a, b in zip(["out", "dqkv", "dtable"], got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.ext
def test_cpp_kernel_restores_the_callers_subnormal_mode():
    """The kernel flushes subnormals to zero inside its threads (csrc/cpu_denormals.h: Intel cores take a microcode
    assist per subnormal operation, and the shift mask's tiny probabilities make many), and gives every thread its
    floating-point mode back: after a shifted forward and backward on two threads, float32 products that are
    subnormal still come out subnormal, on the calling thread and on torch's worker threads."""
    heads, window, shift = 2, 7, 3
    qkv, table, _, dout = _inputs(2, (14, 14), heads, 16, window, True, False, torch.float32, seed=5)
    tiny = torch.finfo(torch.float32).tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fastmed.use_backend("cpp"):
            got = _grads(lambda q, t, p: window_attention(q, heads, window, shift, t), qkv, table, None, dout)
        assert all(torch.isfinite(g).all() for g in got)
        small = torch.tensor([tiny]) * 0.25  # the calling thread
        many = torch.full((1 << 20,), tiny) * 0.25  # split over the worker threads
    finally:
        torch.set_num_threads(threads)
    assert small.item() == pytest.approx(tiny * 0.25, rel=1e-6)
    assert bool((many > 0).all()), "a worker thread kept flush-to-zero after the kernel"


@pytest.mark.ext
def test_auto_picks_cpp_on_cpu():
    from fastmed import _backend

    assert _backend.choose("window_attention", torch.device("cpu")) == "cpp"
    assert _backend.why_not("window_attention", "aten", torch.device("cpu")) is None
    assert _backend.why_not("window_attention", "aten", torch.device("meta")) is not None
    assert _backend.why_not("window_attention", "cpp", torch.device("meta")) is not None


# ----------------------------------------------------------------------------------------------- cpp (CPU)

CPP_CASES = ATEN_CASES + [
    # B, grid, heads, head_dim, window, shift, bias, pad, dtype
    pytest.param(2, (56, 56), 3, 32, 7, 3, True, True, torch.float32, id="swin-unet-stage1"),
    pytest.param(1, (10, 13), 2, 12, 7, 3, True, True, torch.float32, id="2d-padded-both-axes-hd12"),
    pytest.param(1, (4, 5, 9), 1, 8, (4, 4, 4), (2, 2, 2), True, True, torch.float32, id="3d-64-tokens"),
    pytest.param(1, (6, 6, 5), 2, 4, (5, 5, 3), (2, 2, 1), True, True, torch.float64, id="3d-75-tokens"),
    pytest.param(2, (7, 9, 14), 2, 8, 7, 3, True, True, torch.float32, id="3d-343-tokens-swinunetr-padded"),
    pytest.param(1, (8, 8, 9), 1, 4, 8, 4, True, True, torch.float64, id="3d-512-tokens-fp64"),
    pytest.param(1, (9, 9, 10), 1, 4, 9, 4, True, True, torch.float64, id="3d-729-tokens-aten"),
    pytest.param(1, (7, 14), 2, 8, 7, 3, True, False, torch.float16, id="2d-fp16"),
]


@pytest.mark.ext
@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
@pytest.mark.parametrize("B,grid,heads,head_dim,window,shift,bias,pad,dtype", CPP_CASES)
def test_cpp_matches_reference(monkeypatch, B, grid, heads, head_dim, window, shift, bias, pad, dtype, saves):
    """The ``cpp`` backend (csrc/window_attention_cpu.cpp: shift, partition and padding by index, the
    probabilities kept, or the log-sum-exp kept and the probabilities recomputed in the backward; windows of
    more than 64 tokens through the ``aten`` code) against the reference, output and every gradient."""
    _force_saves(monkeypatch, saves)
    qkv, table, qkv_pad, dout = _inputs(B, grid, heads, head_dim, window, bias, pad, dtype)

    _assert_aten_matches_reference(qkv, table, qkv_pad, dout, heads, window, shift, dtype, backend="cpp")


@pytest.mark.ext
@given(nd=st.sampled_from([2, 3]), data=st.data(), bias=st.booleans(), head_dim=st.sampled_from([4, 16, 32]),
       dtype=st.sampled_from([torch.float64, torch.float32]), pad=st.booleans())
def test_cpp_backend_matches_eager(nd, data, bias, head_dim, dtype, pad):
    """The hypothesis equivalence test of the reference backend, on the ``cpp`` backend (against the float64
    eager oracle)."""
    window = tuple(data.draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd), label="window"))
    grid = tuple(data.draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd), label="grid"))
    shift = tuple(data.draw(st.integers(0, w - 1), label="shift") for w in window)
    _check(2, grid, 2, head_dim, window, shift, bias, pad, dtype, "cpp")


@pytest.mark.ext
@pytest.mark.parametrize("grid", [(13, 20), (7, 14, 20)], ids=["2d-49-tokens", "3d-343-tokens"])
@pytest.mark.parametrize("saves", ["probabilities", "logsumexp"])
def test_cpp_is_bit_identical_at_1_and_2_threads(monkeypatch, saves, grid):
    """Output and every gradient (the bias table and the padding token are sums over windows) bit-identical for
    1 and 2 threads: blocks of windows fixed by the geometry, added in block order."""
    _force_saves(monkeypatch, saves)
    qkv, table, qkv_pad, dout = _inputs(2, grid, 2, 8, 7, True, True, torch.float32, seed=11)

    def f(q, t, p):
        return window_attention(q, 2, 7, 3, t, qkv_pad=p)

    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with fastmed.use_backend("cpp"):
                runs.append(_grads(f, qkv, table, qkv_pad, dout))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(["out", "dqkv", "dtable", "dqkv_pad"], *runs):
        assert torch.equal(a, b), name


@pytest.mark.ext
@pytest.mark.parametrize("window,runs_kernel", [(7, True), (8, True), (9, False)])
def test_cpp_backend_runs_its_kernel_up_to_512_tokens(monkeypatch, window, runs_kernel):
    """SwinUNETR's 7x7x7 windows (343 tokens) and 8x8x8 ones run the C++ kernel, forward and backward (the
    probabilities recomputed from the kept log-sum-exp); 9x9x9 (729 tokens) takes the ``aten`` code."""
    wa = importlib.import_module("fastmed.ops.window_attention")
    calls = []
    for name in ("_aten_forward", "_aten_backward"):
        real = getattr(wa, name)
        monkeypatch.setattr(wa, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    qkv, table, _, dout = _inputs(1, (window, window, 2 * window), 1, 4, window, True, False, torch.float32, seed=3)
    qkv.requires_grad_()
    table.requires_grad_()
    with fastmed.use_backend("cpp"):
        window_attention(qkv, 1, window, window // 2, table).backward(dout)
    w3 = (window,) * 3
    assert wa.saves_for(ref.WindowSpec(1, w3, (0, 0, 0), 0.5, w3, w3), True) == "logsumexp"
    assert calls == ([] if runs_kernel else ["_aten_forward", "_aten_backward"])
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(table.grad).all()


@pytest.mark.ext
def test_cpp_strided_inputs_stay_untouched_and_output_may_be_modified():
    """Non-contiguous qkv and d out give the reference's output and gradients; qkv is not modified (q is scaled
    in the kernel's scratch); the output modified in place before the backward changes no gradient."""
    heads, window = 2, (2, 3)
    qkv, table, qkv_pad, dout = _inputs(2, (5, 6), heads, 4, window, True, True, torch.float32, seed=5)
    qkv = qkv.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qkv.is_contiguous() and not dout.is_contiguous()
    before = qkv.detach().clone()

    def f(q, t, p):
        out = window_attention(q, heads, window, 1, t, qkv_pad=p)
        return out.mul_(2.0).add_(1.0)

    with fastmed.use_backend("cpp"):
        got = _grads(f, qkv, table, qkv_pad, dout)
    assert torch.equal(qkv.detach(), before)
    with fastmed.use_backend("reference"):
        want = _grads(f, qkv, table, qkv_pad, dout)
    for name, a, b in zip(["out", "dqkv", "dtable", "dqkv_pad"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.ext
def test_cpp_kernel_rejects_bad_operands():
    """The C++ entry points check what the Python side guarantees (a clear ValueError, not a crash)."""
    from fastmed import _ext

    C = _ext.load()
    qkv, one = torch.randn(1, 1, 7, 7, 24), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="at most 512 tokens, got 729"):
        C.window_attention_forward_cpu(torch.randn(1, 9, 9, 9, 24), None, None, one, 2, [9, 9, 9], [0, 0, 0], 0.5,
                                       True)
    with pytest.raises(ValueError, match="float32/float64"):
        C.window_attention_forward_cpu(qkv.half(), None, None, one, 2, [1, 7, 7], [0, 3, 3], 0.5, True)
    with pytest.raises(ValueError, match="bias"):
        C.window_attention_forward_cpu(qkv, torch.zeros(2, 49, 48), None, one, 2, [1, 7, 7], [0, 3, 3], 0.5, True)
    with pytest.raises(ValueError, match="shift < window"):
        C.window_attention_forward_cpu(qkv, None, None, one, 2, [1, 7, 7], [0, 7, 3], 0.5, True)
    with pytest.raises(ValueError, match="slots"):
        C.window_attention_forward_cpu(qkv, None, None, one + 1, 2, [1, 7, 7], [0, 3, 3], 0.5, True)
    out, saved = C.window_attention_forward_cpu(qkv, None, None, one, 2, [1, 7, 7], [0, 3, 3], 0.5, True)
    with pytest.raises(ValueError, match="saved"):
        C.window_attention_backward_cpu(out, qkv, saved[:, :1].contiguous(), None, None, one, 2, [1, 7, 7],
                                        [0, 3, 3], 0.5, True, False)


@pytest.mark.ext
@pytest.mark.parametrize("grid,window,shift", [((14, 14), (7, 7), (0, 0)), ((11, 16), (7, 7), (3, 3)),
                                               ((9, 8, 10), (7, 7, 7), (3, 3, 3))])
def test_cpu_inference_is_the_kernel_without_its_saved_tensor(grid, window, shift):
    """``cpu_inference`` (no autograd: the C++ kernel with ``save=False``, no op dispatch) gives the op's output bit
    for bit, keeps nothing (the kernel's second output is empty) and leaves its inputs alone; it declines (None)
    under grad mode, a forced non-``cpp`` backend, float64, a non-contiguous qkv, a table or padding token of
    another shape, windows of more than 512 tokens."""
    from fastmed import _ext

    W = importlib.import_module("fastmed.ops.window_attention")
    C = _ext.load()
    g = torch.Generator().manual_seed(4)
    heads, nd = 2, len(grid)
    qkv = torch.randn(2, *grid, 3 * 16, generator=g)
    table = torch.nn.Parameter(torch.randn(math.prod(2 * w - 1 for w in window), heads, generator=g))
    pad = torch.randn(3 * 16, generator=g)
    before = [t.detach().clone() for t in (qkv, table, pad)]  # the table a module's Parameter
    args = (heads, window, shift, table, 0.3, pad, "monai")
    with torch.no_grad():
        got = W.cpu_inference(qkv, *args)
        want = window_attention(qkv, heads, window, shift, table, 0.3, qkv_pad=pad, bias_index="monai")
        assert got is not None and torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip((qkv, table, pad), before))
        spec = W._cached_call_spec(tuple(grid), heads, window, shift, 0.3, "monai")
        x, bias, p, slots = W._cpp_operands(qkv.unsqueeze(1) if nd == 2 else qkv, table, pad, spec)
        for probs in (False, True):
            kept, saved = C.window_attention_forward_cpu(x, bias, p, slots, heads, list(spec.window),
                                                         list(spec.shift), spec.scale, probs)
            out, nothing = C.window_attention_forward_cpu(x, bias, p, slots, heads, list(spec.window),
                                                          list(spec.shift), spec.scale, probs, save=False)
            assert torch.equal(out, kept) and nothing.numel() == 0 and saved.numel() > 0
        assert W.cpu_inference(qkv.double(), *args) is None
        assert W.cpu_inference(qkv.transpose(1, 2), *args) is None
        assert W.cpu_inference(qkv, heads, window, shift, table[1:], 0.3, pad, "monai") is None
        assert W.cpu_inference(qkv, heads, window, shift, table, 0.3, pad[1:], "monai") is None
        with fastmed.use_backend("aten"):
            assert W.cpu_inference(qkv, *args) is None
        big = (9, 9, 9) if nd == 3 else (23, 23)  # 729 and 529 tokens a window
        assert W.cpu_inference(torch.randn(1, *big, 48), heads, big, (0,) * nd,
                               torch.zeros(math.prod(2 * w - 1 for w in big), heads), 0.3, None, "monai") is None
    assert W.cpu_inference(qkv, *args) is None  # grad mode on


def test_swin_unet_stage1_backward_is_fused():
    """Swin-UNet stage 1 (B 24, 56^2, C 96, 3 heads, window 7, bf16, 132 SMs): the backward is one kernel per
    (group of windows, head) computing dq, dk, dv from one dS (no saved output, no separate delta pass), the
    bias-table gradient one wide reduction over the group partials (one program per BLOCK_E elements), and the
    traffic model stays under the issue's 126 MB (the old kernels: 203 MB)."""
    from fastmed.kernels import window_attention as K

    shape = (24, 1, 56, 56, 288)
    spec = ref.WindowSpec(3, (1, 7, 7), (0, 3, 3), 32 ** -0.5, (1, 7, 7), (1, 7, 7))
    plan = K.launch_plan(shape, torch.bfloat16, spec, has_table=True, has_pad=False, programs=4 * 132,
                         interpreted=False)
    assert plan.single_tile and set(plan.launches) == {"bias", "fwd", "bwd_tile", "dbias_reduce", "dtable"}
    assert plan.launches["bwd_tile"].grid == (plan.groups, 3) and plan.groups > 1
    assert plan.launches["dbias_reduce"].grid == (3 * plan.padded_tokens ** 2 // K.BLOCK_E,)
    moved = K.traffic(plan, shape, 2)
    assert sum(v for k, v in moved.items() if k != "fwd") < 126e6
