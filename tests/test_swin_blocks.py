"""fastmed.nn Swin modules against MONAI's SwinUNETR blocks (monai as a test extra) and Swin-Unet's code."""
import numpy as np
import pytest
import torch

import fastmed
from fastmed.nn import FinalPatchExpandX4, PatchExpand, PatchMerging, SwinTransformerBlock, WindowAttention

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def _monai_block(dim, heads, window, shift, seed=0):
    torch.manual_seed(seed)
    block = swin_unetr.SwinTransformerBlock(dim, heads, window, shift, qkv_bias=True).double()
    with torch.no_grad():  # a non-trivial bias table (MONAI initialises it with std 0.02)
        block.attn.relative_position_bias_table.normal_()
    return block


def _monai_forward(block, x, window, shift):
    """What MONAI's BasicLayer does around a block: shrink the window, build the mask on the padded grid."""
    grid = tuple(x.shape[1:-1])
    ws, ss = swin_unetr.get_window_size(grid, window, shift)
    dims = [int(np.ceil(g / w)) * w for g, w in zip(grid, ws)]
    return block(x, swin_unetr.compute_mask(dims, ws, ss, x.device))


def _grads(module, x, fn=None):
    """Output and gradients of x and of every parameter of ``module`` (called through ``fn`` if given)."""
    x = x.detach().requires_grad_()
    y = (fn or module)(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x] + [p for p in module.parameters()], g)
    return y.detach(), grads


CASES_3D = [
    pytest.param((7, 7, 7), (7, 7, 7), (3, 3, 3), id="divisible-shift-shrinks-away"),
    pytest.param((14, 7, 14), (7, 7, 7), (3, 3, 3), id="divisible-shifted"),
    pytest.param((14, 7, 14), (7, 7, 7), (0, 0, 0), id="divisible-unshifted"),
    pytest.param((9, 8, 10), (7, 7, 7), (3, 3, 3), id="padded-shifted"),
    pytest.param((9, 8, 10), (7, 7, 7), (0, 0, 0), id="padded-unshifted"),
    pytest.param((6, 9, 9), (7, 7, 7), (3, 3, 3), id="padded-shifted-window-shrinks"),
]


@pytest.mark.parametrize("grid,window,shift", CASES_3D)
@pytest.mark.parametrize("fused", [True, False])
def test_block_3d_equals_monai(grid, window, shift, fused):
    monai_block = _monai_block(12, 3, window, shift)
    ours = SwinTransformerBlock(12, 3, window, shift, fused=fused).double()
    ours.load_state_dict(monai_block.state_dict())  # strict: identical names and shapes
    x = torch.randn(1, *grid, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, g_ref = _grads(monai_block, x, lambda t: _monai_forward(monai_block, t, window, shift))
    y, g = _grads(ours, x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_block_3d_triton_equals_monai():
    # small windows keep the Triton interpreter fast; padded and shifted
    window, shift = (3, 3, 3), (1, 1, 1)
    monai_block = _monai_block(16, 1, window, shift).float()
    ours = SwinTransformerBlock(16, 1, window, shift).float()
    ours.load_state_dict(monai_block.state_dict())
    x = torch.randn(1, 5, 6, 7, 16, generator=torch.Generator().manual_seed(2))
    y_ref, g_ref = _grads(monai_block, x, lambda t: _monai_forward(monai_block, t, window, shift))
    with fastmed.use_backend("triton"):
        y, g = _grads(ours, x)
    torch.testing.assert_close(y, y_ref, atol=2e-4, rtol=2e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)


def test_block_2d_fused_equals_eager_and_monai():
    window, shift = (7, 7), (3, 3)
    monai_block = _monai_block(12, 3, window, shift)
    x = torch.randn(2, 11, 16, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y_ref, g_ref = _grads(monai_block, x, lambda t: _monai_forward(monai_block, t, window, shift))
    for fused in (True, False):
        ours = SwinTransformerBlock(12, 3, window, shift, fused=fused).double()
        ours.load_state_dict(monai_block.state_dict())
        y, g = _grads(ours, x)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_window_attention_coords_mode_fused_equals_eager():
    attn_f = WindowAttention(8, 2, (7, 7), bias_index="coords").double()
    attn_e = WindowAttention(8, 2, (7, 7), fused=False, bias_index="coords").double()
    attn_e.load_state_dict(attn_f.state_dict())
    x = torch.randn(1, 5, 9, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(attn_f(x, 3), attn_e(x, 3), atol=1e-10, rtol=1e-8)


def test_state_dict_names_match_monai():
    monai_block = swin_unetr.SwinTransformerBlock(24, 3, (7, 7, 7), (3, 3, 3), qkv_bias=True)
    ours = SwinTransformerBlock(24, 3, (7, 7, 7), (3, 3, 3))
    assert list(ours.state_dict()) == list(monai_block.state_dict())
    assert torch.equal(ours.attn.relative_position_index, monai_block.attn.relative_position_index)


@pytest.mark.parametrize("mode,cls", [("merging", "PatchMerging"), ("mergingv2", "PatchMergingV2")])
@pytest.mark.parametrize("grid", [(4, 6, 8), (5, 6, 7)])
def test_patch_merging_3d_equals_monai(mode, cls, grid):
    torch.manual_seed(0)
    theirs = getattr(swin_unetr, cls)(6, spatial_dims=3).double()
    ours = PatchMerging(6, spatial_dims=3, mode=mode).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, *grid, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_patch_merging_2d_equals_monai_and_swin(grid):
    torch.manual_seed(0)
    theirs = swin_unetr.PatchMergingV2(6, spatial_dims=2).double()
    ours = PatchMerging(6, spatial_dims=2).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, *grid, 6, dtype=torch.float64)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x), atol=1e-12, rtol=1e-10)
    if grid[0] % 2 == 0 and grid[1] % 2 == 0:  # Swin / Swin-Unet order: x0, x1, x2, x3
        cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        torch.testing.assert_close(y, ours.reduction(ours.norm(cat)))


def _rearranged(e, p):
    """Swin-Unet's rearrange(e, 'b h w (p1 p2 c) -> b (h p1) (w p2) c', p1=p, p2=p) written with loops."""
    B, H, W, C = e.shape
    c = C // (p * p)
    want = torch.empty(B, H * p, W * p, c, dtype=e.dtype)
    for p1 in range(p):
        for p2 in range(p):
            want[:, p1::p, p2::p] = e[..., (p1 * p + p2) * c:(p1 * p + p2 + 1) * c]
    return want


@pytest.mark.parametrize(("cls", "dim", "p", "x_shape", "y_shape", "weight_shape"), [
    (PatchExpand, 8, 2, (2, 3, 5, 8), (2, 6, 10, 4), (16, 8)),
    (FinalPatchExpandX4, 4, 4, (1, 2, 3, 4), (1, 8, 12, 4), (64, 4)),
], ids=["patch_expand", "final_patch_expand_x4"])
def test_patch_expand_as_swin_unet(cls, dim, p, x_shape, y_shape, weight_shape):
    torch.manual_seed(0)
    m = cls(dim).double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = m(x)
    assert y.shape == y_shape
    torch.testing.assert_close(y, m.norm(_rearranged(m.expand(x), p)))
    assert m.expand.bias is None and m.expand.weight.shape == weight_shape


def test_module_errors():
    with pytest.raises(ValueError, match="num_heads must divide dim"):
        WindowAttention(10, 3, (7, 7))
    with pytest.raises(ValueError, match="shift_size must satisfy"):
        SwinTransformerBlock(12, 3, (7, 7, 7), (7, 0, 0))
    with pytest.raises(ValueError, match="x must be a 3D token grid"):
        SwinTransformerBlock(12, 3, (7, 7, 7), (3, 3, 3))(torch.randn(1, 7, 7, 12))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        PatchMerging(4, spatial_dims=1)
    with pytest.raises(ValueError, match="dim must be even"):
        PatchExpand(5)
    with pytest.raises(ValueError, match="window_size must be 2 or 3 integers"):
        WindowAttention(12, 3, 7)
    with pytest.raises(ValueError, match="shift_size must be >= 0"):
        SwinTransformerBlock(12, 3, (7, 7, 7), (-1, 0, 0))
    with pytest.raises(ValueError, match="mode must be one of 'merging', 'mergingv2'"):
        PatchMerging(4, mode="v3")
    with pytest.raises(ValueError, match="bias_index must be one of"):
        WindowAttention(12, 3, (7, 7), bias_index="timm")


def test_monai_constructor_positional_and_keyword():
    """MONAI 1.6's SwinTransformerBlock signature (act_layer before norm_layer, use_checkpoint,
    use_flash_attention), positionally and by keyword; use_checkpoint recomputes in the backward with the same
    result and gradients; act_layer other than GELU is refused naming the argument."""
    import inspect

    theirs_params = list(inspect.signature(swin_unetr.SwinTransformerBlock.__init__).parameters)[1:]
    ours_params = list(inspect.signature(SwinTransformerBlock.__init__).parameters)[1:]
    assert ours_params[:len(theirs_params)] == theirs_params
    args = (12, 3, (2, 2, 2), (1, 1, 1), 2.0, True, 0.0, 0.0, 0.0, "GELU", torch.nn.LayerNorm, True, False)
    torch.manual_seed(0)
    theirs = swin_unetr.SwinTransformerBlock(*args).double()
    ours = SwinTransformerBlock(*args).double()
    ours.load_state_dict(theirs.state_dict())
    assert ours.use_checkpoint and not ours.use_flash_attention
    kw = SwinTransformerBlock(dim=12, num_heads=3, window_size=(2, 2, 2), shift_size=(1, 1, 1), mlp_ratio=2.0,
                              act_layer="GELU", norm_layer=torch.nn.LayerNorm, use_checkpoint=False,
                              use_flash_attention=True).double()
    kw.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 4, 4, 4, 12, dtype=torch.float64)
    mask = swin_unetr.compute_mask((4, 4, 4), (2, 2, 2), (1, 1, 1), x.device).double()
    grads = []
    for block in (theirs, ours, kw):
        xi = x.clone().requires_grad_()
        y = block(xi, mask)
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, block.attn.qkv.weight.grad))
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="act_layer"):
        SwinTransformerBlock(12, 3, (2, 2, 2), (1, 1, 1), act_layer="RELU")


INFERENCE_CASES = [
    pytest.param((11, 16), (7, 7), (3, 3), id="2d-padded-shifted"),
    pytest.param((14, 14), (7, 7), (0, 0), id="2d-divisible-unshifted"),
    pytest.param((9, 8, 10), (7, 7, 7), (3, 3, 3), id="3d-padded-shifted"),
]


@pytest.mark.parametrize("grid,window,shift", INFERENCE_CASES)
def test_block_float32_inference_uses_onednn_linear_and_equals_monai(monkeypatch, grid, window, shift):
    """float32 inference on the CPU (no_grad): the fused block's four Linears run as oneDNN GEMMs, the MLP's GELU
    fused into the first one's epilogue and the two residual adds into the output GEMMs' epilogues; the output
    equals MONAI's block (float64) to float32 precision.  A call that needs gradients runs the four GEMMs by oneDNN
    too (the GELU separate, its derivative kept for the backward where fastmed._C is built: the MLP's backward
    multiplies by it in place; the residual's gradient passed through), output and every gradient equal to
    MONAI's."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = []
    linear = swin._onednn_linear()

    class Counting:  # torch.ops.mkldnn._linear_pointwise and its .binary overload, counted
        def __call__(self, x, w, b, attr, scalars, algorithm):
            calls.append(attr)
            return linear(x, w, b, attr, scalars, algorithm)

        def binary(self, x, other, w, b, attr):
            calls.append("residual " + attr)
            return linear.binary(x, other, w, b, attr)

    monkeypatch.setattr(swin, "_ONEDNN_LINEAR", Counting())
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 0)  # these small grids: oneDNN too
    monai_block = _monai_block(24, 3, window, shift).eval()
    ours = SwinTransformerBlock(24, 3, window, shift).float().eval()
    ours.load_state_dict(monai_block.state_dict())
    x = torch.randn(2, *grid, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        want = _monai_forward(monai_block, x, window, shift)
        got = ours(x.float())
    assert calls == ["none", "residual add", "gelu", "residual add"]  # qkv, proj (+ x), fc1 + GELU, fc2 (+ x)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    calls.clear()
    ours.train()
    monai_block.train()
    y_want, grads_want = _grads(monai_block, x, lambda t: _monai_forward(monai_block, t, window, shift))
    xg = x.float().requires_grad_()
    y = ours(xg)
    grads = torch.autograd.grad(y, [xg, *ours.parameters()],
                                torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype).float())
    # qkv, proj (+ x), fc1, fc2 (+ x); the backward's d(fc1 output) = (dy w2) * GELU' (when the kernel kept GELU')
    # is torch's mm into the GELU output's buffer, times GELU' in place: the graph is freed after this backward;
    # then the input gradients of fc1, proj and qkv (d in = dy w) by oneDNN on the transposed weights
    assert calls == ["none", "residual add", "none", "residual add", "none", "none", "none"]
    torch.testing.assert_close(y.double(), y_want, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


# --- the MLP's GELU kernel (csrc/gelu_cpu.cpp) and the training MLP node (fastmed.nn.swin._OneDnnMlp) ---

def _gelu64(x):
    x64 = x.double()
    return torch.nn.functional.gelu(x64), torch.ops.aten.gelu_backward(torch.ones_like(x64), x64)


@pytest.mark.ext
def test_gelu_kernel_is_accurate_and_unbiased():
    """GELU and its derivative from one pass: within about 1 ulp of float64 everywhere, and their errors average
    out (a summed gradient over millions of values inherits any bias: Abramowitz & Stegun's erf, which torch's
    derivative shares, is biased by ~2e-8 on these samples); the same values at 1 and 2 threads; NaN stays NaN;
    a tensor that is not contiguous float32 on the CPU is refused with a ValueError naming it."""
    from fastmed import _ext
    ext = _ext.load()
    g = torch.Generator().manual_seed(0)
    for x in (torch.linspace(-12, 12, 480001), torch.randn(1_000_000, generator=g),
              3 * torch.randn(1_000_000, generator=g)):
        d = x.clone()
        y = ext.gelu_and_derivative_cpu_(d)
        y64, d64 = _gelu64(x)
        torch.testing.assert_close(y.double(), y64, atol=2.5e-7, rtol=1.2e-7)
        torch.testing.assert_close(d.double(), d64, atol=2e-7, rtol=0)
        assert abs((y.double() - y64).mean().item()) < 3e-9
        assert abs((d.double() - d64).mean().item()) < 3e-9
    runs = []
    x = torch.randn(100_003, generator=g) * 4
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            d = x.clone()
            runs.append((ext.gelu_and_derivative_cpu_(d), d))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 1e20, -1e20, -40.0])
    d = special.clone()
    y = ext.gelu_and_derivative_cpu_(d)
    want_y, want_d = torch.nn.functional.gelu(special), torch.ops.aten.gelu_backward(torch.ones_like(special), special)
    torch.testing.assert_close(y[3:], want_y[3:])
    torch.testing.assert_close(d[3:], want_d[3:])
    assert y[0].isnan() and y[1] == float("inf") and y[2].isnan()  # NaN stays NaN; gelu(inf) = inf
    assert d[:3].isnan().all()  # inf * 0
    for bad in (torch.randn(4, 6).t(), torch.randn(5).double(), torch.randn(5).half()):
        with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor"):
            ext.gelu_and_derivative_cpu_(bad)


@pytest.mark.ext
def test_mul_and_column_sums_kernel():
    """``mul_and_column_sums_cpu_`` (the training MLP's ``d pre *= GELU'`` with ``d b1``): the product in place, as
    torch's ``a * b`` bit for bit; the column sums equal float64's to float32 precision, the same bits at 1 and 2
    threads (fixed row blocks added in order); NaN stays NaN; ``b`` untouched; a ValueError for other shapes,
    dtypes or layouts."""
    from fastmed import _ext

    ext = _ext.load()
    g = torch.Generator().manual_seed(8)
    for rows, cols in ((6272, 384), (130, 13), (64, 8), (1, 5), (0, 7)):
        a, b = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
        b_before = b.clone()
        runs = []
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = a.clone()
                out, sums = ext.mul_and_column_sums_cpu_(got, b)
                runs.append((got, sums))
            finally:
                torch.set_num_threads(before)
            assert out.data_ptr() == got.data_ptr()  # in place
        assert torch.equal(runs[0][0], a * b) and torch.equal(b, b_before)
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        want = (a.double() * b.double()).sum(0)
        scale = (a.double() * b.double()).abs().sum(0).clamp_min(1.0)
        assert ((runs[0][1].double() - want).abs() <= 2e-6 * scale).all()
    a, b = torch.randn(70, 9, generator=g), torch.randn(70, 9, generator=g)
    a[3, 4] = float("nan")
    sums = ext.mul_and_column_sums_cpu_(a, b)[1]
    assert a[3, 4].isnan() and sums[4].isnan() and not sums[torch.arange(9) != 4].isnan().any()
    for bad_a, bad_b, what in ((torch.randn(4, 6).t(), torch.randn(6, 4), "contiguous float32"),
                               (torch.randn(4, 6).double(), torch.randn(4, 6).double(), "contiguous float32"),
                               (torch.randn(4, 6), torch.randn(4, 5), "one shape"),
                               (torch.randn(24), torch.randn(24), "one shape")):
        with pytest.raises(ValueError, match=what):
            ext.mul_and_column_sums_cpu_(bad_a, bad_b)


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=pytest.mark.ext), False], ids=["gelu-kernel", "torch"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_training_mlp_node_equals_float64_first_and_second_order(monkeypatch, kernel, residual):
    """The training MLP node (oneDNN GEMMs; the GELU's derivative kept from the forward by the kernel and applied in
    the backward GEMM's epilogue, or torch's GELU without the extension): output and the gradients of every input
    (the residual's too) equal the float64 composition to float32 precision; create_graph=True gives the same
    first-order gradients and a second-order gradient equal to the float64 one; retain_graph=True gives the same
    gradients twice (nothing saved is overwritten then), and the last backward, which frees the graph (and writes
    d pre into the GELU output's buffer), the same again; no input is modified."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    if not kernel:
        monkeypatch.setattr(swin, "_gelu_kernel", lambda: None)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 7, 12, generator=g)
    params = [torch.randn(48, 12, generator=g) / 4, torch.randn(48, generator=g) / 4,
              torch.randn(12, 48, generator=g) / 7, torch.randn(12, generator=g) / 7]
    res = torch.randn(2, 5, 7, 12, generator=g) if residual else None
    dy = torch.randn(2, 5, 7, 12, generator=g)
    inputs = [h] + params + ([res] if residual else [])
    before = [t.clone() for t in inputs]

    def composed(t, w1, b1, w2, b2, r=None):
        y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(t, w1, b1)), w2, b2)
        return y if r is None else r + y

    leaves64 = [t.double().requires_grad_() for t in inputs]
    want = composed(*leaves64)
    grads64 = torch.autograd.grad(want, leaves64, dy.double(), create_graph=True)
    second64 = torch.autograd.grad(grads64[0].square().sum(), leaves64[1])[0]
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = swin._OneDnnMlp.apply(*leaves, *([] if residual else [None]))
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
    first = torch.autograd.grad(got, leaves, dy, retain_graph=True)
    again = torch.autograd.grad(got, leaves, dy, retain_graph=True)
    graph = torch.autograd.grad(got, leaves, dy, create_graph=True)
    for a, b, c, w in zip(first, again, graph, grads64):
        torch.testing.assert_close(a.double(), w.detach(), atol=1e-5, rtol=1e-5)
        assert torch.equal(a, b)
        torch.testing.assert_close(c.double(), w.detach(), atol=1e-5, rtol=1e-5)
    second = torch.autograd.grad(graph[0].square().sum(), leaves[1])[0]
    torch.testing.assert_close(second.double(), second64, atol=1e-4, rtol=1e-4)
    kept, products = [], []
    real_kept, real_product = swin._graph_kept, swin._mul_sums_kernel()
    monkeypatch.setattr(swin, "_graph_kept", lambda: kept.append(real_kept()) or kept[-1])
    monkeypatch.setattr(swin, "_mul_sums_kernel", lambda: lambda *a: products.append(1) or real_product(*a))
    # the graph freed after this backward: d pre written into the GELU output's buffer, times GELU' with d b1 in
    # one C++ pass (the kernel's path)
    last = torch.autograd.grad(got, leaves, dy)
    assert kept == ([False] if kernel else []) and products == ([1] if kernel else [])
    for a, b, w in zip(last, first, grads64):
        torch.testing.assert_close(a.double(), w.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(got, leaves, dy)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)


def test_input_gradient_by_onednn_equals_the_product(monkeypatch):
    """``_input_grad(dy, w)`` (a Linear's ``d in = dy w`` in the training nodes' backward): oneDNN's linear on the
    transposed weight from ``_ONEDNN_MIN_ROWS`` float32 rows on, outside grad mode; ``mm`` for fewer rows, for other
    dtypes and in grad mode (create_graph=True), where the result must stay differentiable.  Values equal the float64
    product to float32 precision; nothing passed is modified."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = []
    linear = swin._onednn_linear()

    def counting(x, w, b, attr, scalars, algorithm):
        calls.append((tuple(x.shape), tuple(w.shape), b, attr))
        return linear(x, w, b, attr, scalars, algorithm)

    monkeypatch.setattr(swin, "_ONEDNN_LINEAR", counting)
    g = torch.Generator().manual_seed(11)
    rows = swin._ONEDNN_MIN_ROWS
    dy, w = torch.randn(rows, 40, generator=g), torch.randn(40, 24, generator=g)
    dy0, w0 = dy.clone(), w.clone()
    want = dy.double() @ w.double()
    with torch.no_grad():
        got = swin._input_grad(dy, w)
    assert calls == [((rows, 40), (24, 40), None, "none")]  # oneDNN, on w^T (out = 24, in = 40)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(dy, dy0) and torch.equal(w, w0)
    calls.clear()
    with torch.no_grad():  # fewer rows, float64: mm
        small = swin._input_grad(dy[: rows - 1], w)
        got64 = swin._input_grad(dy.double(), w.double())
    assert calls == []
    torch.testing.assert_close(small.double(), want[: rows - 1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got64, want)
    wg = w.clone().requires_grad_()
    out = swin._input_grad(dy, wg)  # grad mode: differentiable
    assert calls == [] and out.grad_fn is not None
    (gw,) = torch.autograd.grad(out.sum(), wg)
    torch.testing.assert_close(gw.double(), dy.double().sum(0)[:, None].expand(40, 24), atol=1e-3, rtol=1e-5)


def test_training_mlp_takes_the_node_only_where_it_applies(monkeypatch):
    """The fused Mlp with gradients runs the node for float32 CPU inputs of at least ``_ONEDNN_MIN_ROWS`` tokens
    and plain Linears; float64, a hooked Linear or an active dropout take the per-Linear path; the values agree."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    used = []
    node = swin._OneDnnMlp

    class Spy:
        @staticmethod
        def apply(*args):
            used.append(True)
            return node.apply(*args)

    monkeypatch.setattr(swin, "_OneDnnMlp", Spy)
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 0)
    g = torch.Generator().manual_seed(5)
    mlp = swin.Mlp(8, 32)
    x = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    r = torch.randn(3, 4, 8, generator=g)
    want = r + mlp(x)  # the unfused module
    torch.testing.assert_close(mlp(x, fused=True, residual=r), want, atol=1e-5, rtol=1e-5)
    assert used == [True]
    used.clear()
    mlp.double()
    mlp(x.double(), fused=True, residual=r.double())
    handle = mlp.float().linear2.register_forward_hook(lambda *a: None)
    torch.testing.assert_close(mlp(x, fused=True, residual=r), want, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert used == []
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 1 << 30)
    mlp(x, fused=True)
    assert used == []


@pytest.mark.parametrize("min_rows", [0, 1 << 30])
def test_residual_in_the_output_gemm_epilogue(monkeypatch, min_rows):
    """``fused_linear`` / ``gelu_linear`` with ``residual``: ``residual + layer(x)`` (and its gradients: the residual's
    is the output's), with or without gradients, the residual left untouched; ``WindowAttention`` and ``Mlp`` with
    ``residual`` equal ``residual + module(x)``; a residual of another shape, or with ``gelu=True``, is refused.
    Through oneDNN (``min_rows`` 0) and through torch's Linear (fewer rows than ``_ONEDNN_MIN_ROWS``)."""
    swin = pytest.importorskip("fastmed.nn.swin")
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", min_rows)
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 7, 16, generator=g)
    r = torch.randn(2, 5, 7, 8, generator=g)
    dy = torch.randn(2, 5, 7, 8, generator=g)
    before = r.clone()
    for fn, eager in ((swin.fused_linear, layer), (swin.gelu_linear, lambda t: layer(torch.nn.functional.gelu(t)))):
        with torch.no_grad():
            torch.testing.assert_close(fn(x, layer, residual=r), r + eager(x), atol=1e-6, rtol=1e-6)
        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
        got = torch.autograd.grad(fn(xg, layer, residual=rg), [xg, rg, layer.weight, layer.bias], dy)
        want = torch.autograd.grad(rg + eager(xg), [xg, rg, layer.weight, layer.bias], dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], dy, atol=0, rtol=0)
        # float64 operands take torch's composition (the same values)
        with torch.no_grad():
            torch.testing.assert_close(fn(x, layer, residual=r.double()), r.double() + eager(x), atol=1e-6, rtol=1e-6)
    assert torch.equal(r, before)
    with pytest.raises(ValueError, match="gelu=True and a residual"):
        swin.fused_linear(x, layer, gelu=True, residual=r)

    attn = WindowAttention(16, 2, (3, 3)).eval()
    mlp = swin.Mlp(16, 32, dropout_rate=0.5).eval()
    res = torch.randn(2, 5, 7, 16, generator=g)
    with torch.no_grad():
        for fused in (True, False):
            attn.fused = fused
            torch.testing.assert_close(attn(x, (1, 1), residual=res), res + attn(x, (1, 1)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mlp(x, fused=fused, residual=res), res + mlp(x, fused=fused), atol=1e-5,
                                       rtol=1e-5)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        attn(x, 0, residual=r)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        mlp(x, residual=r)


@pytest.mark.parametrize("n_in,n_out", [(24, 8), (8, 24), (12, 12)])
def test_linear_weight_gradient_orientation(monkeypatch, n_in, n_out):
    """The training Linears' weight gradient ``dy^T x`` (computed as ``(x^T dy)^T`` when the output is the narrower
    side) equals torch's ``nn.Linear`` gradient; accumulated into ``.grad`` it is a contiguous tensor."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 0)
    g = torch.Generator().manual_seed(8)
    x, dy = torch.randn(50, n_in, generator=g), torch.randn(50, n_out, generator=g)
    torch.testing.assert_close(swin._weight_grad(dy, x), dy.t() @ x, atol=1e-5, rtol=1e-5)
    layer = torch.nn.Linear(n_in, n_out)
    assert swin._onednn_applies(x, layer)
    swin.fused_linear(x, layer).backward(dy)
    assert layer.weight.grad.is_contiguous()
    torch.testing.assert_close(layer.weight.grad, dy.t() @ x, atol=1e-5, rtol=1e-5)


def test_small_inputs_take_torchs_linear(monkeypatch):
    """Below ``_ONEDNN_MIN_ROWS`` tokens the fused block's Linears are torch's (oneDNN's per-call cost is higher
    there), from it on oneDNN's; the same values either way."""
    swin = pytest.importorskip("fastmed.nn.swin")
    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = []
    linear = swin._onednn_linear()

    class Counting:
        def __call__(self, *args):
            calls.append("linear")
            return linear(*args)

        def binary(self, *args):
            calls.append("binary")
            return linear.binary(*args)

    monkeypatch.setattr(swin, "_ONEDNN_LINEAR", Counting())
    block = SwinTransformerBlock(24, 3, (7, 7), (3, 3)).eval()
    small = torch.randn(1, 14, 14, 24, generator=torch.Generator().manual_seed(2))  # 196 tokens
    with torch.no_grad():
        want = block(small)
        assert swin._ONEDNN_MIN_ROWS > 196 and calls == []
        monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 196)
        got = block(small)
    assert calls == ["linear", "binary", "linear", "binary"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.ext
def test_layer_norm_kernel_matches_torch():
    """csrc/layer_norm_cpu.cpp against float64 (and torch's float32 LayerNorm): channels a multiple of 8 and not,
    with and without weight and bias, a large offset (the two-pass variance has no cancellation), the row statistics;
    the same values at 1 and 2 threads; NaN stays in its row; the input is not modified; bad operands get a
    ValueError."""
    from fastmed import _ext
    ln = _ext.load().layer_norm_cpu
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 7, 9, 96), (3, 5, 13), (1, 4, 4, 4, 48), (1000, 1), (6, 8)]:
        C = shape[-1]
        x = torch.randn(shape, generator=g) * 3 + 50
        w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
        before = x.clone()
        for ww, bb in ((w, b), (None, b), (w, None), (None, None)):
            y, mean, rstd = ln(x, ww, bb, 1e-5, True)
            want = torch.nn.functional.layer_norm(x.double(), (C,), None if ww is None else ww.double(),
                                                  None if bb is None else bb.double(), 1e-5)
            torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (C,), ww, bb, 1e-5), atol=3e-5, rtol=1e-5)
            x64 = x.double().reshape(-1, C)
            torch.testing.assert_close(mean.double(), x64.mean(-1), atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
            assert torch.equal(ln(x, ww, bb, 1e-5)[0], y) and ln(x, ww, bb, 1e-5)[1] is None
        assert torch.equal(x, before)
    x = torch.randn(4097, 96, generator=g)
    runs = []
    for threads in (1, 2):
        keep = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(ln(x, w[:1].expand(96).contiguous(), None, 1e-6, True))
        finally:
            torch.set_num_threads(keep)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    x[5, 17] = float("nan")
    y = ln(x, None, None, 1e-5)[0]
    assert y[5].isnan().all() and not y[[4, 6]].isnan().any()
    with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor"):
        ln(torch.randn(4, 6).t(), None, None, 1e-5)
    with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor"):
        ln(torch.randn(4, 6).double(), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight must be a contiguous float32 CPU tensor of 6 values"):
        ln(torch.randn(4, 6), torch.randn(5), None, 1e-5)
    with pytest.raises(ValueError, match="bias must be a contiguous float32 CPU tensor of 6 values"):
        ln(torch.randn(4, 6), None, torch.randn(6).double(), 1e-5)


def _ln_grads(x, w, b, dy, create_graph=False):
    """Gradients of LayerNorm written out in primitive ops (twice differentiable for any weight / bias; torch's
    own LayerNorm has no second-order gradient without a weight)."""
    ps = [t for t in (x, w, b) if t is not None]
    y = (x - x.mean(-1, keepdim=True)) * (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    y = y if w is None else y * w
    y = y if b is None else y + b
    return torch.autograd.grad(y, ps, dy, create_graph=create_graph)


@pytest.mark.ext
@pytest.mark.parametrize("shape,affine", [((2, 9, 11, 96), "both"), ((700, 13), "both"), ((5, 3, 8), "weight"),
                                          ((300, 24), "bias"), ((17, 40), "none")])
def test_layer_norm_node_gradients(shape, affine):
    """The C++ LayerNorm as an autograd node (fastmed.nn.swin._LayerNorm): x, weight and bias gradients against
    float64 torch (a non-contiguous d out too), bit-identical at 1 and 2 threads (the weight and bias gradients are
    sums over fixed blocks of rows), and second-order gradients (create_graph=True) against torch's."""
    from fastmed.nn import swin
    g = torch.Generator().manual_seed(1)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 3).requires_grad_()
    w = (torch.randn(C, generator=g) if affine in ("both", "weight") else None)
    b = (torch.randn(C, generator=g) if affine in ("both", "bias") else None)
    w, b = [None if t is None else t.requires_grad_() for t in (w, b)]
    dy = torch.randn(shape[::-1], generator=g).permute(*range(len(shape) - 1, -1, -1))  # not contiguous
    ps = [t for t in (x, w, b) if t is not None]

    def ours():
        return torch.autograd.grad(swin._LayerNorm.apply(x, w, b, 1e-5), ps, dy)

    want = _ln_grads(*[None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)], dy.double())
    runs = []
    for threads in (1, 2):
        keep = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(ours())
        finally:
            torch.set_num_threads(keep)
    for a, b1, ref64 in zip(*runs, want):
        assert torch.equal(a, b1)
        torch.testing.assert_close(a.double(), ref64, atol=1e-4 * max(1.0, ref64.abs().max().item()), rtol=1e-4)
    y = swin._LayerNorm.apply(x, w, b, 1e-5)
    first = torch.autograd.grad(y, ps, dy, create_graph=True)
    second = torch.autograd.grad(sum((t * t).sum() for t in first), ps, allow_unused=True)
    want1 = _ln_grads(x, w, b, dy, create_graph=True)
    want2 = torch.autograd.grad(sum((t * t).sum() for t in want1), ps, allow_unused=True)
    for a, ref in zip(first + second, want1 + want2):
        assert (a is None) == (ref is None)  # the bias gets no second-order gradient
        if ref is not None:
            torch.testing.assert_close(a, ref, atol=2e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


@pytest.mark.ext
@pytest.mark.parametrize("use", ["both", "norm", "alias"])
def test_layer_norm_node_residual_alias(use):
    """``_LayerNorm`` with ``residual=True`` returns ``(LayerNorm(x), alias of x)``; x's gradient is the sum of the
    gradients through both (the alias's added in the backward kernel's pass; also when only one is used, with a
    non-contiguous gradient, and under create_graph=True), against float64 torch; the alias carries x's values."""
    from fastmed.nn import swin
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 7, 24, generator=g) * 2 + 1).requires_grad_()
    w, b = torch.randn(24, generator=g).requires_grad_(), torch.randn(24, generator=g).requires_grad_()
    k = torch.randn(24, 24, generator=g)
    dy = torch.randn(24, 7, 5, 2, generator=g).permute(3, 2, 1, 0)  # not contiguous

    def f(y, r):  # the block's use: the norm's output through a layer, plus the residual
        out = 0
        if use in ("both", "norm"):
            out = out + y @ k.to(y.dtype)
        if use in ("both", "alias"):
            out = out + r * 1.5
        return out

    y, r = swin._LayerNorm.apply(x, w, b, 1e-5, True)
    assert torch.equal(r, x) and r.requires_grad
    leaves = [x, w, b]
    got = torch.autograd.grad(f(y, r), leaves, dy, allow_unused=True)
    x64, w64, b64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(f(torch.nn.functional.layer_norm(x64, (24,), w64, b64, 1e-5), x64), [x64, w64, b64],
                               dy.double(), allow_unused=True)
    for a, ref in zip(got, want):
        assert (a is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(a.double(), ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    y, r = swin._LayerNorm.apply(x, w, b, 1e-5, True)
    graph = torch.autograd.grad(f(y, r), leaves, dy, create_graph=True, allow_unused=True)
    for a, ref in zip(graph, want):
        if ref is not None:
            torch.testing.assert_close(a.double(), ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


@pytest.mark.ext
def test_block_layer_norm_takes_the_kernel_only_where_it_applies(monkeypatch):
    """The fused block's LayerNorms run the C++ kernel on float32 CPU tensors, in inference and in training (the
    block's output and every gradient as with torch's LayerNorm, within float32 rounding), and torch's LayerNorm on
    the eager path (``fused=False``), for float64 and under a forward hook on the norm."""
    from fastmed.nn import swin
    calls = []
    real = swin._layer_norm_kernel()
    monkeypatch.setattr(swin, "_layer_norm_kernel", lambda: lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    block = SwinTransformerBlock(32, 2, (7, 7), (3, 3))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 14, 14, 32)
    with torch.no_grad():
        y = block.eval()(x)
        assert len(calls) == 2
        with monkeypatch.context() as m:
            m.setattr(swin, "_layer_norm_kernel", lambda: None)
            want = block(x)
        torch.testing.assert_close(y, want, atol=2e-5, rtol=1e-5)
        calls.clear()
        block.attn.fused = False
        block(x)
        block.attn.fused = True
        block.double()(x.double())
        block.float()
        handle = block.norm1.register_forward_hook(lambda *a: None)
        block(x)
        assert len(calls) == 1  # norm2 only
        handle.remove()
        calls.clear()
    block.train()
    xg = x.clone().requires_grad_()
    got = torch.autograd.grad(block(xg).square().sum(), [xg] + list(block.parameters()))
    assert len(calls) == 2
    with monkeypatch.context() as m:
        m.setattr(swin, "_layer_norm_kernel", lambda: None)
        want = torch.autograd.grad(block(xg).square().sum(), [xg] + list(block.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("grid,window,shift", INFERENCE_CASES)
def test_block_inference_calls_the_kernels_directly(monkeypatch, grid, window, shift):
    """Without autograd, a fused float32 CPU block runs its kernels as straight calls (no submodule call, the
    window attention through ``cpu_inference``): the output is bit-identical to the path through the submodules
    and to the window-attention op's; that path runs instead under forward hooks on the attention or the MLP (or
    global ones), an active dropout or drop path, ``fused=False``, float64, a non-contiguous input, grad mode, and
    below ``_ONEDNN_MIN_ROWS`` tokens."""
    from fastmed.nn import swin

    if swin._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 0)
    torch.manual_seed(0)
    block = SwinTransformerBlock(24, 3, window, shift, drop_path=0.1).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, *grid, 24, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    through = []  # calls of WindowAttention.forward: the path through the submodules
    real_forward = WindowAttention.forward
    monkeypatch.setattr(WindowAttention, "forward", lambda *a, **k: through.append(1) or real_forward(*a, **k))
    attention = []
    real_inference = swin.cpu_inference

    def counted(*a):
        out = real_inference(*a)
        attention.append(out is not None)  # True: the C++ kernel ran (not the op)
        return out

    monkeypatch.setattr(swin, "cpu_inference", counted)
    with torch.no_grad():
        got = block(x)
        assert through == [] and torch.equal(x, before)
        assert attention == [swin._ext.extension_info()["built"]]
        handle = block.attn.register_forward_pre_hook(lambda *a: None)
        want = block(x)
        handle.remove()
        assert through == [1] and torch.equal(got, want)
        with monkeypatch.context() as m:  # the op itself (its own dispatch; the kernel keeps its log-sum-exp)
            m.setattr(swin, "cpu_inference", lambda *a: None)
            assert torch.equal(block(x), got)
        through.clear()
        for hooked in (block.mlp, torch.nn.modules.module):
            if hooked is torch.nn.modules.module:
                handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
            else:
                handle = hooked.register_forward_hook(lambda *a: None)
            torch.testing.assert_close(block(x), got, atol=0, rtol=0)
            handle.remove()
        assert through == [1, 1]
        through.clear()
        block.train()  # drop path active
        block(x)
        block.eval()
        block.attn.fused = False
        torch.testing.assert_close(block(x), got, atol=1e-4, rtol=1e-4)
        block.attn.fused = True
        torch.testing.assert_close(block.double()(x.double()).float(), got, atol=1e-4, rtol=1e-4)
        block.float()
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)
        torch.testing.assert_close(block(xt), got, atol=1e-4, rtol=1e-4)
        assert len(through) == 4
        through.clear()
        monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 1 << 30)
        torch.testing.assert_close(block(x), got, atol=1e-4, rtol=1e-4)
        assert through == [1]
    monkeypatch.setattr(swin, "_ONEDNN_MIN_ROWS", 0)
    through.clear()
    torch.testing.assert_close(block(x), got, atol=1e-4, rtol=1e-4)  # grad mode on: the autograd path
    assert through == [1]
