"""fastmed.ops.sam_attention: SAM's windowed / global attention with decomposed relative position.

Oracles: segment_anything's own ``Attention`` / ``window_partition`` (loaded without the package ``__init__``, which
imports torchvision) and :mod:`fastmed.reference.sam_attention`.  Triton runs under ``TRITON_INTERPRET=1`` here.
"""
import pytest
import torch
from conftest import TOL, triton_device

import fastmed
from fastmed.reference import sam_attention as ref

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sam_modeling():
    """``segment_anything.modeling`` without its package ``__init__`` (which imports torchvision, absent from
    fastmed's test environment); skips when segment_anything is not installed."""
    from fastmed.models.sam import segment_anything_modeling

    try:
        return segment_anything_modeling()
    except ImportError as exc:
        pytest.skip(f"{exc} (the `test` extra)")

# (B, H, W, heads, head_dim, window): windows with padding (7x6 grid, window 4 -> 8x8), exact tiling, global
SHAPES = [(2, 7, 6, 2, 8, 4), (1, 4, 8, 1, 16, 4), (1, 5, 6, 2, 8, 0)]


def _inputs(B, H, W, heads, hd, window, dtype, device="cpu", pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = heads * hd
    wh, ww = (H, W) if window == 0 else (window, window)
    qkv = torch.randn(B, H, W, 3 * C, generator=g, dtype=torch.float64)
    th = torch.randn(2 * wh - 1, hd, generator=g, dtype=torch.float64) * 0.5
    tw = torch.randn(2 * ww - 1, hd, generator=g, dtype=torch.float64) * 0.5
    qp = torch.randn(3 * C, generator=g, dtype=torch.float64) if pad else None
    return tuple(None if t is None else t.to(dtype).to(device).requires_grad_() for t in (qkv, th, tw, qp))


def _grads(out, leaves, dout):
    live = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, live, dout)


def _sam_attention_module(dim, heads, window, grid):
    """segment_anything's Attention as its Block builds it (input_size = the window, or the grid when global)."""
    modeling = load_sam_modeling()
    size = grid if window == 0 else (window, window)
    return modeling.image_encoder.Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=size)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_segment_anything(shape):
    B, H, W, heads, hd, window = shape
    modeling = load_sam_modeling()
    ie = modeling.image_encoder
    torch.manual_seed(0)
    attn = _sam_attention_module(heads * hd, heads, window, (H, W)).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(B, H, W, heads * hd, dtype=torch.float64)
    if window:
        xw, pad_hw = ie.window_partition(x, window)
        expected = ie.window_unpartition(attn(xw), window, pad_hw, (H, W))
    else:
        expected = attn(x)
    with fastmed.use_backend("reference"):
        got = attn.proj(fastmed.ops.sam_attention(attn.qkv(x), heads, attn.rel_pos_h, attn.rel_pos_w, window,
                                                  qkv_pad=attn.qkv.bias))
    torch.testing.assert_close(got, expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_equals_reference_values_and_grads(shape, dtype):
    device = triton_device()
    leaves = _inputs(*shape, dtype, device)
    results = []
    for backend in ("triton", "reference"):
        with fastmed.use_backend(backend):
            out = fastmed.ops.sam_attention(leaves[0], shape[3], leaves[1], leaves[2], shape[5], qkv_pad=leaves[3])
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
        results.append((out, _grads(out, leaves, dout)))
    (out_t, g_t), (out_r, g_r) = results
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    for name, a, b in zip(("qkv", "rel_pos_h", "rel_pos_w", "qkv_pad"), g_t, g_r):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"d{name}: {m}")


def test_triton_padding_gradient_reaches_qkv_pad():
    """With padding, keys/values of padding tokens are qkv_pad's: its k/v gradient is non-zero, its q part zero."""
    device = triton_device()
    B, H, W, heads, hd, window = SHAPES[0]
    leaves = _inputs(*SHAPES[0], torch.float64, device)
    with fastmed.use_backend("triton"):
        out = fastmed.ops.sam_attention(leaves[0], heads, leaves[1], leaves[2], window, qkv_pad=leaves[3])
    (dpad,) = torch.autograd.grad(out.sum(), leaves[3])
    C = heads * hd
    assert torch.count_nonzero(dpad[:C]) == 0
    assert torch.count_nonzero(dpad[C:]) == 2 * C


def test_triton_backward_is_deterministic():
    device = triton_device()
    shape = SHAPES[0]
    grads = []
    for _ in range(2):
        leaves = _inputs(*shape, torch.float32, device)
        with fastmed.use_backend("triton"):
            out = fastmed.ops.sam_attention(leaves[0], shape[3], leaves[1], leaves[2], shape[5], qkv_pad=leaves[3])
        grads.append(_grads(out, leaves, torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_reference_gradcheck_float64():
    leaves = _inputs(1, 3, 3, 1, 4, 2, torch.float64)
    fn = lambda q, h, w, p: fastmed.ops.sam_attention(q, 1, h, w, 2, qkv_pad=p)  # noqa: E731
    with fastmed.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward(backend):
    """create_graph=True: second derivatives are right on every backend (gradgradcheck on the reference; the Triton
    run's double backward equals it)."""
    leaves = _inputs(1, 3, 3, 1, 4, 2, torch.float64)
    fn = lambda q, h, w, p: fastmed.ops.sam_attention(q, 1, h, w, 2, qkv_pad=p)  # noqa: E731
    if backend == "reference":
        with fastmed.use_backend("reference"):
            assert torch.autograd.gradgradcheck(fn, leaves)
        return
    results = []
    for b in ("triton", "reference"):
        with fastmed.use_backend(b):
            out = fn(*leaves)
            g = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
            results.append(torch.autograd.grad(sum(t.square().sum() for t in g), leaves))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_opcheck_and_compile_reference():
    import importlib

    mod = importlib.import_module("fastmed.ops.sam_attention")  # the package attribute is the function

    qkv, th, tw, qp = _inputs(1, 5, 6, 2, 8, 4, torch.float32)
    spec = ref.SamAttentionSpec(2, (4, 4), 8 ** -0.5)
    torch.library.opcheck(mod._sam_attention_fwd, (qkv, th, tw, qp, *spec.flat(), "reference"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    fn = torch.compile(lambda q, h, w, p: fastmed.ops.sam_attention(q, 2, h, w, 4, qkv_pad=p), fullgraph=True,
                       backend="aot_eager")
    with fastmed.use_backend("reference"):
        got, want = fn(qkv, th, tw, qp), fastmed.ops.sam_attention(qkv, 2, th, tw, 4, qkv_pad=qp)
        torch.testing.assert_close(got, want)
        dout = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
        for a, b in zip(_grads(got, (qkv, th, tw, qp), dout), _grads(want, (qkv, th, tw, qp), dout)):
            torch.testing.assert_close(a, b)  # the backward op (its probabilities kept by the forward) compiled too


def test_errors():
    qkv, th, tw, qp = _inputs(1, 5, 6, 2, 8, 4, torch.float32, pad=True)
    op = fastmed.ops.sam_attention
    with pytest.raises(ValueError, match="rel_pos_h must have shape"):
        op(qkv, 2, th[:-1], tw, 4)
    with pytest.raises(ValueError, match=r"rel_pos_h must have shape \(2 \* 5 - 1.*window_size=0 on a 5x6 grid"):
        op(qkv, 2, th, tw, 0)  # global attention on a 5x6 grid needs (9, 8) and (11, 8) tables
    with pytest.raises(ValueError, match="num_heads must divide"):
        op(qkv, 3, th, tw, 4)
    with pytest.raises(ValueError, match="window_size"):
        op(qkv, 2, th, tw, -1)
    with pytest.raises(ValueError, match="qkv_pad must have shape"):
        op(qkv, 2, th, tw, 4, qkv_pad=qp[:-1])
    with pytest.raises(TypeError, match="rel_pos_h must have qkv's dtype"):
        op(qkv, 2, th.double(), tw, 4)
    with pytest.raises(ValueError, match="qkv"):
        op(qkv[0], 2, th, tw, 4)


def test_nan_stays_nan():
    qkv, th, tw, qp = (t.detach() for t in _inputs(1, 4, 4, 1, 8, 4, torch.float32))
    qkv[0, 1, 2, 0] = float("nan")
    for backend in ("reference", "triton"):
        with fastmed.use_backend(backend):
            out = fastmed.ops.sam_attention(qkv.to(triton_device()) if backend == "triton" else qkv, 1, th, tw, 4)
        assert torch.isnan(out).any(), backend


def test_inputs_not_modified():
    leaves = [t.detach() for t in _inputs(1, 5, 6, 2, 8, 4, torch.float32)]
    before = [t.clone() for t in leaves]
    with fastmed.use_backend("triton"):
        fastmed.ops.sam_attention(leaves[0], 2, leaves[1], leaves[2], 4, qkv_pad=leaves[3])
    for a, b in zip(leaves, before):
        assert torch.equal(a, b)


def _sm90_specs():
    """The specializations SAM ViT-B runs: 14x14 windows (64x64 grid padded to 70x70) and global 64x64,
    head_dim 64, bf16 (64-tiles, tf32 dots, no upcast) and fp32 (32-tiles, ieee dots)."""
    from fastmed.kernels import sam_attention as K

    specs = []
    for window in (14, 64):
        for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            qkv = torch.empty(1, 64, 64, 3 * 768, dtype=torch_dt, device="meta")
            _, _, consts, padded = K._launch_args(qkv, ref.SamAttentionSpec(12, (window, window), 0.125))
            consts = {**consts, "CAST": dt != "bf16", "HAS_PAD": padded}  # CAST as on a GPU, not the interpreter
            ptrs = {"qkv_ptr": f"*{dt}", "pad_ptr": f"*{dt}", "out_ptr": f"*{dt}", "dout_ptr": f"*{dt}",
                    "dqkv_ptr": f"*{dt}"}
            warps = consts.pop("num_warps")
            for kernel, kc in (("_fwd_kernel", consts), ("_bwd_dkdv_kernel", K.half_query_tile(consts)),
                               ("_bwd_dq_kernel", K.half_query_tile(consts))):
                specs.append(dict(module="fastmed.kernels.sam_attention", kernel=kernel, constexprs=kc,
                                  pointers=ptrs, floats=["scale"], num_warps=warps))
    return specs


def test_kernels_compile_for_sm90_without_spills():
    """Every ViT-B specialization compiles for sm_90; the 16-bit ones (what SAM runs) keep everything in registers.
    The float32 ones (ieee dots on upcast tiles) are compiled but still spill: not asserted."""
    pytest.importorskip("triton")
    from sm90 import assert_no_spills, compile_for_sm90

    reports = compile_for_sm90(_sm90_specs())
    assert len(reports) == 12
    assert_no_spills([r for r in reports if not r["constexprs"]["CAST"]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [14, 0])
def test_gpu_vit_b_sizes_equal_reference(window, dtype):
    """ViT-B's blocks on the GPU (64x64 tokens, C=768, 12 heads; 14x14 windows padded to 70x70, and global): the
    Triton values and gradients against the float64 reference, within twice the reference's own error in ``dtype``
    plus the dtype's tolerance floor."""
    leaves = _inputs(2, 64, 64, 12, 64, window, torch.float64, "cuda")
    exact_in = [t.detach().requires_grad_() for t in leaves]
    low_in = [t.detach().to(dtype).requires_grad_() for t in leaves]
    dout = torch.randn(2, 64, 64, 768, generator=torch.Generator().manual_seed(3), dtype=torch.float64).cuda()
    results = {}
    for name, ins, backend in (("exact", exact_in, "reference"), ("triton", low_in, "triton"),
                               ("ref_low", [t.detach().requires_grad_() for t in low_in], "reference")):
        with fastmed.use_backend(backend):
            out = fastmed.ops.sam_attention(ins[0], 12, ins[1], ins[2], window, qkv_pad=ins[3])
        results[name] = [out] + list(_grads(out, ins, dout.to(out.dtype)))
    for i, what in enumerate(("out", "dqkv", "drel_pos_h", "drel_pos_w", "dqkv_pad")):
        exact = results["exact"][i]
        err = (results["triton"][i].double() - exact).abs().max().item()
        ref_err = (results["ref_low"][i].double() - exact).abs().max().item()
        floor = TOL[dtype]["atol"] * max(1.0, exact.abs().max().item())
        assert err <= 2 * ref_err + floor, f"{what}: triton error {err:.3g}, reference error {ref_err:.3g}"
