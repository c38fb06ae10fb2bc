"""The ``cpp`` backend of the loss statistics (csrc/losses_cpu.cpp, issue 12 item 1): equivalence with the
reference over the statistics options, dtypes, layouts, label kinds and non-finite inputs; bit-identical results at
1 and 2 threads; ``auto`` picks it for CPU tensors.  (tests/test_losses.py runs the whole loss suite on it too.)"""
import itertools

import pytest
import torch
from conftest import TOL

import fastmed
from fastmed import _backend, _ext, ops
from fastmed.ops import _direct
from fastmed.ops import losses as L
from fastmed.reference import losses as ref
from fastmed.reference.loss_spec import SLOTS, StatsSpec

pytestmark = pytest.mark.ext


def _specs():
    out = []
    for act, pow_mode, ce, focal, pos, label_mode, ignore in itertools.product(
            ["none", "sigmoid", "softmax"], ["off", "linear", "square", "abs"], ["off", "softmax", "softmax_smooth",
                                                                                 "bce"],
            ["off", "sigmoid", "softmax"], ["off", "linear", "hard"], [True, False], [False, True]):
        if (focal != "sigmoid" and pos != "off") or (not label_mode and ignore):
            continue
        out.append(StatsSpec(act, pow_mode, ce, focal, 1 if focal == "softmax" else 0, 1.5, pos, label_mode, ignore,
                             2))
    return out


SPECS = _specs()


def _operands(spec, dtype, seed, nonfinite=False, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    B, C, sp = 2, 4, (4, 5, 3)
    x = (torch.randn((B, C) + sp, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if nonfinite:
        x[0, 1, 0, 0, 0] = float("nan")
        x[1, 2, 1, 1, 1] = float("-inf")
        x[1, 0, 2, 2, 2] = float("inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    if spec.label_mode:
        t = torch.randint(0, C, (B, 1) + sp, generator=gen)
        t[0, 0, 1, 2, 0] = C  # a bad label: counted in slot BAD
        t[1, 0, 0, 1, 1] = 2  # ignore_index when has_ignore
        mask = None
    else:
        t = torch.rand((B, C) + sp, generator=gen, dtype=torch.float64)
        mask = (torch.rand((B, 1) + sp, generator=gen) > 0.3).double() if seed % 2 else None
    return x, t, mask


#: (dtype, non-finite logits, channels-last), one per spec in turn
VARIANTS = ((torch.float64, False, False), (torch.float32, True, True), (torch.bfloat16, False, False))


@pytest.mark.parametrize("case", range(len(SPECS)))
def test_matches_reference(case):
    spec = SPECS[case]
    dtype, nonfinite, channels_last = VARIANTS[case % len(VARIANTS)]
    x, t, mask = _operands(spec, dtype, case, nonfinite, channels_last)
    _check_block(spec, x, t, mask, dtype, seed=1, stride=x.stride())


@pytest.mark.parametrize(("ldtype", "value", "bad"), [(torch.float64, 1 + 1e-9, 1), (torch.float32, 0.5, 1),
                                                      (torch.float16, 2.0, 0), (torch.uint8, 3, 0),
                                                      (torch.int16, -1, 1), (torch.float32, float("nan"), 1)])
def test_label_kinds(ldtype, value, bad):
    """Labels of every dtype, checked in their own precision (1 + 1e-9 is not an integer in float64)."""
    spec = StatsSpec("softmax", "linear", "softmax", label_mode=True)
    x = torch.randn(1, 4, 3, 3)
    t = torch.randint(0, 4, (1, 1, 3, 3))
    t[0, 0, 0, 0] = 0
    t = t.to(ldtype)
    t[0, 0, 0, 0] = value
    got, want = L._cpp_stats(x, t, None, spec), L._reference_stats(x, t, None, spec)
    torch.testing.assert_close(got, want)
    assert got[0, -1, 0].item() == bad


def test_slots_match_loss_spec():
    assert tuple(_ext.load().loss_slots_cpu()) == SLOTS


def test_bit_identical_at_1_and_2_threads():
    """Fixed chunks of voxels, partial sums combined in chunk order: the thread count does not change a bit."""
    spec = StatsSpec("softmax", "square", "softmax_smooth", "sigmoid", 0, 2.0, "linear", True, True, 1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 40, 30, 9, generator=gen)  # 10,800 voxels per sample: several chunks
    t = torch.randint(0, 5, (2, 1, 40, 30, 9), generator=gen)
    g = torch.randn(2, len(SLOTS), 5, generator=gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((L._cpp_stats(x, t, None, spec), L._cpp_stats_backward(g, x, t, None, spec)))
    finally:
        torch.set_num_threads(threads)
    (s1, d1), (s2, d2) = results
    assert torch.equal(s1, s2) and torch.equal(d1, d2)


def test_auto_picks_cpp_for_cpu_tensors():
    assert _backend.choose("losses", torch.device("cpu")) == "cpp"


# The vectorized blocks of csrc/losses_cpu_kernels.h (every spec): blocks of 16
# voxels with a padded tail, chunks of 2048 voxels, strided and converted loads, the polynomial exp / log.
BLOCK_SPECS = [StatsSpec("softmax", "linear", "softmax", label_mode=True),
               StatsSpec("softmax", "linear", "softmax", label_mode=True, has_ignore=True, ignore_index=1),
               StatsSpec("softmax", "square", "softmax_smooth", "sigmoid", 0, 2.0, "linear", True, True, 0),
               StatsSpec("sigmoid", "abs", "off", "sigmoid", 0, 2.0, "hard", True),
               StatsSpec("none", "linear", "softmax", "sigmoid", 0, 0.0, "off", False),
               StatsSpec("softmax", "abs", "softmax_smooth", "sigmoid", 0, 1.5, "linear", False),
               StatsSpec("sigmoid", "linear", "bce", "sigmoid", 0, 2.0, "linear", False),
               StatsSpec("none", "square", "bce", label_mode=True, has_ignore=True, ignore_index=1),
               StatsSpec("softmax", "linear", "softmax", "softmax", 1, 1.5, label_mode=True),
               StatsSpec(focal_mode="softmax", label_mode=True, has_ignore=True, ignore_index=0),
               StatsSpec(focal_mode="softmax", focal_c0=1, gamma=0.5)]


def _block_case(spec, shape, dtype, seed, scale=2.0, dense_mask=False):
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if spec.label_mode:
        t = torch.randint(0, C, (B, 1) + shape[2:], generator=gen)
        mask = None
    else:
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        mask = (torch.rand((B, 1) + shape[2:], generator=gen) > 0.3).double() if dense_mask else None
    return x, t, mask


def _check_block(spec, x, t, mask, dtype, seed=3, stride=None):
    """The cpp statistics and d logits against the reference; d logits in the logits' dtype with ``stride``
    (default: what ``empty_like`` gives the logits)."""
    got, want = L._cpp_stats(x, t, mask, spec), L._reference_stats(x, t, mask, spec)
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=want.dtype)
    dgot = L._cpp_stats_backward(g, x, t, mask, spec)
    dwant = ref.loss_stats_backward(g, x, t, mask, spec)
    expected_stride = torch.empty_like(x).stride() if stride is None else stride
    assert dgot.dtype == x.dtype and dgot.stride() == expected_stride
    torch.testing.assert_close(dgot.double(), dwant.double(), equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("spatial", [(1,), (15,), (16,), (17,), (3, 11), (2049,), (2, 2048 + 33)])
@pytest.mark.parametrize("spec", range(len(BLOCK_SPECS)))
def test_blocks_tails_and_chunks(spatial, spec):
    """Voxel counts that are not a multiple of the block (16) or of the chunk (2048), and a single voxel."""
    spec = BLOCK_SPECS[spec]
    dtype = torch.float32 if len(spatial) == 1 else torch.float64
    x, t, mask = _block_case(spec, (2, 3) + spatial, dtype, sum(spatial), dense_mask=True)
    _check_block(spec, x, t, mask, dtype)


@pytest.mark.parametrize("spec", range(len(BLOCK_SPECS)))
def test_blocks_many_classes_and_one(spec):
    spec = BLOCK_SPECS[spec]
    for C in (1, 2, 37):
        if C == 1 and spec.label_mode:
            continue
        x, t, mask = _block_case(spec, (2, C, 5, 7), torch.float32, C)
        _check_block(spec, x, t, mask, torch.float32)


@pytest.mark.parametrize("spec", [2, 6, 7, 8, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_blocks_strided_and_extreme(dtype, spec):
    """Non-contiguous logits (a strided slice), large logits (exp over- and underflow, softplus's threshold),
    NaN and infinities in the same pass: NaN in gives NaN out, infinities give the reference's limits (specs 6
    and 7: BCE, dense and label targets; 8 and 10: the softmax focal term)."""
    spec = BLOCK_SPECS[spec]
    big = torch.randn(2, 4, 9, 2 * 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 60
    x = big.to(dtype)[:, :, :, ::2]
    assert not x.is_contiguous()
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 4, 5] = float("inf")
    x[1, 2, 6, 7] = float("-inf")
    t = torch.randint(0, 4, (2, 1, 9, 23), generator=torch.Generator().manual_seed(1))
    if not spec.label_mode:
        t = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check_block(spec, x, t, None, dtype)
    s = L._cpp_stats(x, t, None, spec)
    assert s[0, :8].isnan().any()  # NaN in, NaN out (the values are checked against the reference above)


def test_blocks_bad_labels_counted():
    spec = BLOCK_SPECS[1]  # ignore_index=1
    x = torch.randn(1, 3, 37)
    t = torch.randint(0, 2, (1, 1, 37)) * 2  # classes 0 and 2
    t[0, 0, [0, 16, 36]] = torch.tensor([3, -1, 1])  # two bad labels (one in the tail block), one ignored
    got = L._cpp_stats(x, t, None, spec)
    torch.testing.assert_close(got, L._reference_stats(x, t, None, spec))
    assert got[0, SLOTS.index("bad"), 0].item() == 2
    assert got[0, SLOTS.index("count"), 0].item() == 36


@pytest.mark.parametrize("spec", [0, 3, 5])
def test_blocks_bit_identical_at_1_and_2_threads(spec):
    spec = BLOCK_SPECS[spec]
    x, t, mask = _block_case(spec, (3, 4, 2048 * 2 + 100), torch.float32, 9, dense_mask=True)
    g = torch.randn(3, len(SLOTS), 4, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append((L._cpp_stats(x, t, mask, spec), L._cpp_stats_backward(g, x, t, mask, spec)))
    finally:
        torch.set_num_threads(threads)
    for s, d in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(d, results[0][1])


# The direct path's native implementations (csrc/losses_cpu_finalize.cpp): both loss steps with their autograd nodes
# in C++ must give what the registered ops give (their Python autograd and the cpp bodies), bit for bit, values and
# gradients, over the output-gradient shapes of the finalize step (0-d, "none" per class with and without the
# background, generalized Dice per sample, batch).
NATIVE_CASES = {
    "dice_ce": lambda x, y, t: ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True, label_smoothing=0.1,
                                                weight=torch.tensor([0.5, 1.0, 2.0, 1.5]), include_background=False),
    "dice_focal": lambda x, y, t: ops.dice_focal_loss(x, y, sigmoid=True, to_onehot_y=True, alpha=0.25,
                                                      squared_pred=True, batch=True),
    "nnunet": lambda x, y, t: ops.nnunet_dice_ce_loss(x, y, ignore_label=2),
    "dice_none": lambda x, y, t: ops.dice_loss(x, y, softmax=True, to_onehot_y=True, reduction="none",
                                               include_background=False, jaccard=True),
    "dice_none_batch": lambda x, y, t: ops.dice_loss(x, t, sigmoid=True, reduction="none", batch=True,
                                                     soft_label=True),
    "generalized_none": lambda x, y, t: ops.generalized_dice_loss(x, y, softmax=True, to_onehot_y=True,
                                                                  reduction="none"),
    "tversky_none_batch": lambda x, y, t: ops.tversky_loss(x, y, softmax=True, to_onehot_y=True, reduction="none",
                                                           batch=True, include_background=False),
    "focal_softmax": lambda x, y, t: ops.focal_loss(x, y, to_onehot_y=True, use_softmax=True, alpha=0.3,
                                                    reduction="sum"),
    "dice": lambda x, y, t: ops.dice_loss(x, y, softmax=True, to_onehot_y=True),
    "dice_ignore": lambda x, y, t: ops.dice_loss(x, y, softmax=True, to_onehot_y=True, ignore_index=1, batch=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(NATIVE_CASES))
def test_native_autograd_equals_registered_ops(name, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 4, 5, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (2, 1, 5, 6), generator=gen)
    t = torch.rand(x0.shape, generator=gen, dtype=dtype)
    results = []
    for route in ("native", "op"):
        if route == "op":
            monkeypatch.setattr(_direct, "call", lambda op, function, *inputs: op(*inputs))
        x = x0.clone().requires_grad_()
        with fastmed.use_backend("cpp"):
            out = NATIVE_CASES[name](x, y, t)
        if route == "native":  # the C++ autograd node, not a Python one
            node = out.grad_fn
            while "LossFinalize" not in node.name() and node.next_functions:
                node = node.next_functions[0][0]
            assert "LossFinalizeFunction" in node.name()
        gout = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        (g,) = torch.autograd.grad(out, x, gout)
        results.append((out.detach(), g))
    (out_n, g_n), (out_o, g_o) = results
    assert torch.equal(out_n, out_o) and torch.equal(g_n, g_o)


def test_native_autograd_label_check_and_no_grad():
    """Bad labels raise on the native path; without a gradient the op bodies run (no autograd node)."""
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 4, 4))
    y[0, 0, 1, 1] = 3
    with pytest.raises(ValueError, match="target"):
        ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True)
    y[0, 0, 1, 1] = 2
    with torch.no_grad():
        value = ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True)
    assert value.grad_fn is None
    torch.testing.assert_close(value, ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True).detach())


@pytest.mark.parametrize("spec", BLOCK_SPECS[:4])
def test_layouts_that_do_not_collapse(spec):
    """Transposed logits (spatial dims that do not collapse into one: copied in C++, and d logits written back in
    the logits' layout) and strided labels (the label loads' strided path)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 21, 19, generator=gen).transpose(2, 3)
    t = torch.randint(0, 4, (2, 1, 19, 42), generator=gen)[..., ::2]
    assert t.stride(-1) == 2 and x.stride(-1) != 1
    got, want = L._cpp_stats(x, t, None, spec), L._reference_stats(x, t, None, spec)
    torch.testing.assert_close(got, want)
    g = torch.randn(want.shape, generator=gen)
    dgot = L._cpp_stats_backward(g, x, t, None, spec)
    assert dgot.stride() == x.stride()
    torch.testing.assert_close(dgot, ref.loss_stats_backward(g, x, t, None, spec))


# The softmax Dice path of csrc/losses_cpu_kernels.h (softmax_dice_forward / softmax_dice_backward: float32 logits and
# int64 labels contiguous along the voxels, softmax, pow linear, with or without the softmax cross entropy, no BCE or
# focal term) and the softmax the native autograd
# node keeps from the forward for the backward (loss_stats_probs_cpu / loss_stats_backward_probs_cpu).
DICE_SPECS = [StatsSpec("softmax", "linear", label_mode=True),
              StatsSpec("softmax", "linear", label_mode=True, has_ignore=True, ignore_index=1),
              StatsSpec("softmax", "linear", "softmax", label_mode=True),
              StatsSpec("softmax", "linear", "softmax_smooth", label_mode=True, has_ignore=True, ignore_index=1)]


def _strided_copy(x):
    """The values of ``x`` in a layout whose last dim has stride 2 (the generic blocks, not the Dice path)."""
    wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)[..., ::2]
    wide.copy_(x)
    assert wide.stride(-1) == 2
    return wide


@pytest.mark.parametrize("spec", range(len(DICE_SPECS)))
@pytest.mark.parametrize("spatial", [(15,), (16,), (2048 + 37,), (3, 5, 7)])
def test_softmax_dice_path_equals_generic_blocks(spatial, spec):
    """The path's statistics and d logits (from the stored softmax) against the reference, and bit for bit the
    generic blocks' on the same values (the same arithmetic in the same order); NaN, -inf and +inf logits, ignored
    and bad labels in the same pass."""
    spec = DICE_SPECS[spec]
    x, t, _ = _block_case(spec, (2, 4) + spatial, torch.float32, 7)
    flat_x, flat_t = x.view(2, 4, -1), t.view(2, 1, -1)
    flat_x[0, 1, 3] = float("nan")
    flat_x[1, 2, 0] = float("-inf")
    flat_x[1, 0, 5] = float("inf")
    flat_t[0, 0, 1] = 1  # ignored by the second spec
    _check_block(spec, x, t, None, torch.float32)
    strided = _strided_copy(x)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    stats = L._cpp_stats(x, t, None, spec)
    torch.testing.assert_close(stats, L._cpp_stats(strided, t, None, spec), **exact)
    assert stats[0, :2].isnan().all() and not stats[:, SLOTS.index("ground")].isnan().any()  # NaN in, NaN out
    g = torch.randn(stats.shape, generator=torch.Generator().manual_seed(1))
    want = L._cpp_stats_backward(g, strided, t, None, spec)  # the generic blocks, the softmax computed again
    ext = _ext.load()
    fields = tuple(spec)
    probs = torch.empty_like(x)
    torch.testing.assert_close(ext.loss_stats_probs_cpu(x.view(2, 4, -1), t.view(2, -1), None, *fields,
                                                        probs.view(2, 4, -1)), stats, **exact)
    got = ext.loss_stats_backward_probs_cpu(g, x.view(2, 4, -1), t.view(2, -1), None, *fields, probs.view(2, 4, -1))
    torch.testing.assert_close(got.view(x.shape), want, **exact)
    if len(spatial) == 1 and spatial[0] > 16:  # a tail block in the bad-label count too
        t2 = t.clone()
        t2.view(-1)[-1] = 9
        assert L._cpp_stats(x, t2, None, spec)[0, SLOTS.index("bad"), 0].item() == 0  # sample 1 holds it
        assert L._cpp_stats(x, t2, None, spec)[1, SLOTS.index("bad"), 0].item() == 1


@pytest.mark.parametrize("case", ["dice", "dice_ignore", "dice_ce", "float64", "channels_last", "strided", "bf16"])
def test_stored_softmax_backward(case):
    """The native node keeps the forward's softmax for its backward where that replaces the logits (softmax with a
    region term, no BCE or focal term, float32 / float64 logits): the gradient is the one of the backward that
    computes the softmax again (the registered op's), bit for bit; a second backward (retain_graph=True) computes it
    again and gives the same; the logits are left as they were; create_graph=True still gives second-order terms."""
    gen = torch.Generator().manual_seed(21)
    dtype = {"float64": torch.float64, "bf16": torch.bfloat16}.get(case, torch.float32)
    x0 = torch.randn(2, 5, 9, 8, 7, generator=gen).to(dtype)
    if case == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last_3d)
    elif case == "strided":
        x0 = _strided_copy(x0)
    y = torch.randint(0, 5, (2, 1, 9, 8, 7), generator=gen)
    kw = dict(softmax=True, to_onehot_y=True)
    fn = {"dice_ignore": lambda x: ops.dice_loss(x, y, ignore_index=3, **kw),
          "dice_ce": lambda x: ops.dice_ce_loss(x, y, lambda_ce=0.7, **kw)}.get(
        case, lambda x: ops.dice_loss(x, y, **kw))
    grads = []
    for route in ("native", "op"):
        x = (_strided_copy(x0) if case == "strided" else x0.clone()).requires_grad_()
        before = x.detach().clone()
        with fastmed.use_backend("cpp"):
            if route == "op":
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(_direct, "call", lambda op, function, *inputs: op(*inputs))
                    out = fn(x)
            else:
                out = fn(x)
        (g1,) = torch.autograd.grad(out, x, retain_graph=True)
        (g2,) = torch.autograd.grad(out, x)
        assert torch.equal(g1, g2) and torch.equal(x.detach(), before)
        assert g1.dtype == dtype and g1.stride() == torch.empty_like(x).stride()
        grads.append(g1)
    assert torch.equal(grads[0], grads[1])
    # create_graph=True on the native node: a gradient penalty's second-order term against the reference's
    x = x0.clone().requires_grad_()
    with fastmed.use_backend("cpp"):
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (h,) = torch.autograd.grad(g.float().square().sum(), x)
    xr = x0.clone().requires_grad_()
    with fastmed.use_backend("reference"):
        (gr,) = torch.autograd.grad(fn(xr), xr, create_graph=True)
    (hr,) = torch.autograd.grad(gr.float().square().sum(), xr)
    torch.testing.assert_close(h.double(), hr.double(), **TOL[dtype])


@pytest.mark.parametrize("gap", [90.0, 100.0])
def test_subnormal_probabilities_match_reference_and_leave_the_mode(gap):
    """Logits ``gap`` apart make softmax probabilities below float32's smallest normal, which the kernel's threads
    flush to zero (csrc/cpu_denormals.h: each operation on a subnormal costs an Intel core a microcode assist; a
    DiceCE call was 5x slower): the losses and their gradients still equal the float64 reference, including voxels
    whose label is the improbable class (CE and focal from the log-sum-exp, not from log p), and the calling and
    worker threads get their floating-point mode back."""
    from fastmed.nn import DiceCELoss, DiceFocalLoss

    gen = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (2, 1, 8, 8, 8), generator=gen)
    off = 1 - torch.nn.functional.one_hot(y[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    flip = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.5).float()  # half the voxels: the label is improbable
    x = torch.randn(2, 4, 8, 8, 8, generator=gen) + gap * off * flip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for loss in (DiceCELoss(to_onehot_y=True, softmax=True), DiceFocalLoss(to_onehot_y=True, softmax=True)):
            got_x, want_x = x.clone().requires_grad_(), x.double().requires_grad_()
            with fastmed.use_backend("cpp"):
                got = loss(got_x, y)
            got.backward()
            with fastmed.use_backend("reference"):
                want = loss(want_x, y)
            want.backward()
            assert torch.isfinite(got) and torch.isfinite(got_x.grad).all()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_x.grad.double(), want_x.grad, rtol=1e-4, atol=1e-7)
        tiny = torch.finfo(torch.float32).tiny
        small = torch.tensor([tiny]) * 0.25
        many = torch.full((1 << 20,), tiny) * 0.25
    finally:
        torch.set_num_threads(threads)
    assert small.item() > 0 and bool((many > 0).all())
