"""The ``cpp`` backend of the loss statistics (csrc/losses_cpu.cpp, issue 12 item 1): equivalence with the
reference over the statistics options, dtypes, layouts, label kinds and non-finite inputs; bit-identical results at
1 and 2 threads; ``auto`` picks it for CPU tensors.  (tests/test_losses.py runs the whole loss suite on it too.)"""
import itertools

import pytest
import torch
from conftest import TOL

from fastmed import _backend, _ext
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
    got, want = L._cpp_stats(x, t, mask, spec), L._reference_stats(x, t, mask, spec)
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
    dgot = L._cpp_stats_backward(g, x, t, mask, spec)
    dwant = ref.loss_stats_backward(g, x, t, mask, spec)
    assert dgot.dtype == x.dtype and dgot.stride() == x.stride()
    torch.testing.assert_close(dgot.double(), dwant.double(), equal_nan=True, **TOL[dtype])


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
