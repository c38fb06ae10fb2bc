"""The blending ops of sliding-window inference (``fastmed.ops.sliding_window_accumulate`` / ``_finalize``):
Triton (under ``TRITON_INTERPRET=1`` here) and the C++ ``cpp`` backend against the reference, the reference
against a dense oracle (a full count map, as MONAI keeps), the normalizer cached per geometry, and the memory the
blending keeps (measured by counting tensor storages, ``bench/bench_sliding_window.py``'s ``TrackedPeak``) against
MONAI's.
"""
import importlib.util
import math
import os

import pytest
import torch
from conftest import TOL, triton_device
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmed
from fastmed import inference
from fastmed._tensors import accumulation_dtype
from fastmed.ops import sliding_window_accumulate, sliding_window_finalize
from fastmed.reference import sliding_window as ref

BACKENDS = ("reference", pytest.param("cpp", marks=pytest.mark.ext), "triton")
pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one thread is faster here


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _device(backend):
    return triton_device() if backend == "triton" else "cpu"


def _bench_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_sliding_window.py")
    spec = importlib.util.spec_from_file_location("bench_sliding_window", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------------------------
# A dense oracle: every window added into a full volume, with a full count map
# ------------------------------------------------------------------------------------------------------------------

def _dense(grid3, patches, weight, samples):
    """(N, C, Z, Y, X) blended values and the (Z, Y, X) summed weights, in float64, window by window."""
    N = max(samples) + 1
    C = patches.shape[1]
    out = torch.zeros((N, C) + grid3.image_size, dtype=torch.float64)
    count = torch.zeros(grid3.image_size, dtype=torch.float64)
    w = weight.double()
    for k in range(grid3.num_windows):
        sl = grid3.slices(k)
        count[sl] += w
    for k, n in enumerate(samples):
        sl = grid3.slices(k % grid3.num_windows)
        out[(n, slice(None)) + sl] += patches[k].double() * w
    return out, count


def _grid(image, window, overlap):
    return ref.monai_grid(image, window, overlap)


def _origins(grid3, samples):
    out = []
    for k, n in enumerate(samples):
        out += [n, *grid3.origin(k % grid3.num_windows)]
    return out


# ------------------------------------------------------------------------------------------------------------------
# accumulate
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_accumulate_whole_volume_against_dense(backend, dtype):
    dev = _device(backend)
    grid = _grid((7, 6, 9), (4, 3, 5), (0.5, 0.25, 0.5))
    n_win = grid.num_windows
    samples = [0] * n_win + [1] * n_win
    patches = torch.randn(2 * n_win, 3, 4, 3, 5, generator=_gen(0), dtype=torch.float64)
    weight = torch.rand(4, 3, 5, generator=_gen(1), dtype=torch.float64) + 0.1
    want, _ = _dense(grid, patches, weight, samples)
    buf = torch.zeros(2, 3, 7, 6, 9, dtype=dtype, device=dev)
    with fastmed.use_backend(backend):
        sliding_window_accumulate(buf, patches.to(dtype).to(dev), weight.to(dtype).to(dev), _origins(grid, samples))
    tol = TOL[dtype] if dtype != torch.float16 else dict(atol=2e-2 * 4, rtol=2e-2)
    torch.testing.assert_close(buf.cpu().double(), want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_ring_and_strides(backend):
    """A ring of R rows (windows wrap around it), non-contiguous patches and weight, a channels-last buffer."""
    dev = _device(backend)
    R, wz = 5, 3
    base = torch.randn(1, 2, R, 6, 7, generator=_gen(2)).to(dev)
    buf = base.to(memory_format=torch.channels_last_3d)
    patches = torch.randn(4, 2, wz, 2, 10, generator=_gen(3)).to(dev)[..., ::2]          # (4, 2, wz, 2, 5), strided
    weight = torch.rand(5, 2, wz, generator=_gen(4)).to(dev).permute(2, 1, 0)          # (wz, 2, 5), strided
    origins = [0, 0, 0, 0, 0, 3, 4, 2, 0, 4, 1, 1, 0, 7, 2, 0]                            # rows 3..5 wrap
    want = base.double().cpu().clone()
    for k in range(4):
        n, z, y, x = origins[4 * k:4 * k + 4]
        for dz in range(wz):
            want[n, :, (z + dz) % R, y:y + 2, x:x + 5] += (patches[k, :, dz].double() * weight[dz].double()).cpu()
    with fastmed.use_backend(backend):
        sliding_window_accumulate(buf, patches, weight, origins)
    torch.testing.assert_close(buf.cpu().double(), want, **TOL[torch.float32])
    assert buf.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "triton"])
def test_accumulate_equals_reference_float64(backend):
    """float64 buffers accumulate in float64 in every backend (one product and one sum per voxel and window)."""
    grid = _grid((6, 5, 7), (3, 4, 4), (0.5, 0.5, 0.5))
    samples = [0] * grid.num_windows
    patches = torch.randn(grid.num_windows, 2, 3, 4, 4, generator=_gen(5), dtype=torch.float64)
    weight = torch.rand(3, 4, 4, generator=_gen(6), dtype=torch.float64)
    out = {}
    for b in ("reference", backend):
        buf = torch.zeros(1, 2, 6, 5, 7, dtype=torch.float64, device=_device(b))
        with fastmed.use_backend(b):
            sliding_window_accumulate(buf, patches.to(buf.device), weight.to(buf.device), _origins(grid, samples))
        out[b] = buf.cpu()
    torch.testing.assert_close(out[backend], out["reference"], rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------------
# finalize: normalization and argmax, whole volume and ring
# ------------------------------------------------------------------------------------------------------------------

def _blended(seed, image=(9, 7, 10), window=(4, 3, 5), overlap=(0.5, 0.25, 0.5), C=3, gaussian=True):
    grid = _grid(image, window, overlap)
    samples = [0] * grid.num_windows
    patches = torch.randn(grid.num_windows, C, *window, generator=_gen(seed), dtype=torch.float64)
    if gaussian:
        weight = ref.importance_map(window, "gaussian", (0.125,) * 3, torch.float64)
    else:
        weight = torch.rand(window, generator=_gen(seed + 1), dtype=torch.float64) + 0.05
    return grid, samples, patches, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output,in_place", [("values", False), ("values", True), ("labels", False)])
def test_finalize_whole_volume(backend, output, in_place):
    dev = _device(backend)
    grid, samples, patches, weight = _blended(7, gaussian=False)
    values, count = _dense(grid, patches, weight, samples)
    want = values / count
    buf = values.float().to(dev)
    norm = ref.window_normalizer(grid, weight.float().to(dev), torch.float32)
    result = None
    if not in_place:
        result = (torch.zeros(1, 1, *grid.image_size, dtype=torch.uint8, device=dev) if output == "labels"
                  else torch.zeros(1, 3, *grid.image_size, dtype=torch.float64, device=dev))
    with fastmed.use_backend(backend):
        sliding_window_finalize(buf, norm, grid.window[:2], 0, grid.image_size[0], result=result, output=output)
    if output == "labels":
        assert torch.equal(result.cpu().long(), want.argmax(1, keepdim=True))
    else:
        got = buf if in_place else result
        torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["values", "labels"])
def test_band_through_the_volume(backend, output):
    """How inference uses the ops on a band: a ring one window deep, each z-row of windows accumulated, then the
    rows it completes finalized (and zeroed for reuse); equals the dense oracle."""
    dev = _device(backend)
    grid, samples, patches, weight = _blended(11, image=(11, 6, 8), window=(4, 3, 5), overlap=(0.25, 0.5, 0.5))
    values, count = _dense(grid, patches, weight, samples)
    want = values / count
    wz = grid.window[0]
    band = torch.zeros(1, 3, wz, 6, 8, dtype=torch.float32, device=dev)
    norm = ref.window_normalizer(grid, weight.float().to(dev), torch.float32)
    result = (torch.zeros(1, 1, *grid.image_size, dtype=torch.uint8, device=dev) if output == "labels"
              else torch.zeros(1, 3, *grid.image_size, dtype=torch.float16, device=dev))
    per_row = len(grid.starts[1]) * len(grid.starts[2])
    ends = list(grid.starts[0][1:]) + [grid.image_size[0]]
    with fastmed.use_backend(backend):
        for row, (lo, hi) in enumerate(zip(grid.starts[0], ends)):
            ks = range(row * per_row, (row + 1) * per_row)
            sliding_window_accumulate(band, patches[list(ks)].float().to(dev), weight.float().to(dev),
                                      _origins(grid, samples)[4 * ks.start:4 * ks.stop])
            sliding_window_finalize(band, norm, grid.window[:2], lo, hi, result=result, output=output,
                                    zero_buffer=True)
    assert not band.any()  # every row read was zeroed
    if output == "labels":
        assert torch.equal(result.cpu().long(), want.argmax(1, keepdim=True))
    else:
        torch.testing.assert_close(result.cpu().double(), want, **TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["values", "labels"])
def test_inference_band_and_tiles(backend, output, blend_mode):
    """How inference uses the ops for labels (and for results in another dtype than the buffer): a band one window
    deep, or tiles cut at every window start and end, each finalized with the normalizer cropped to it (window
    starts shifted, the table cut in x) into a strided view of the result; equals MONAI."""
    monai_swi = pytest.importorskip("monai.inferers").sliding_window_inference
    dev = _device(backend)
    torch.manual_seed(21)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).double()
    x = torch.randn(2, 1, 11, 9, 10, generator=_gen(21)).half().double()  # float16 inputs below: same values
    with torch.no_grad():
        want = monai_swi(x, (5, 4, 6), 3, net, (0.4, 0.5, 0.25), "gaussian")
        with fastmed.use_backend(backend):
            got = inference.sliding_window_inference(
                x.half().to(dev), (5, 4, 6), 3, lambda w: net(w.cpu().double()).to(dev), (0.4, 0.5, 0.25),
                "gaussian", output=output)
    if output == "labels":
        assert torch.equal(got.cpu().long(), want.argmax(1, keepdim=True))
    else:  # float16 inputs: a float32 buffer, float16 results written tile by tile
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_labels_nan_and_ties(backend):
    """torch.argmax's rules: the first maximum wins a tie; a NaN counts as the maximum (the first NaN)."""
    dev = _device(backend)
    grid = _grid((2, 3, 4), (2, 3, 4), (0.0, 0.0, 0.0))
    weight = torch.ones(2, 3, 4)
    norm = ref.window_normalizer(grid, weight.to(dev), torch.float32)
    buf = torch.randn(1, 4, 2, 3, 4, generator=_gen(12))
    buf[0, 2, 0, 0, 0] = buf[0, 1, 0, 0, 0] = 10.0     # tie: channel 1
    buf[0, 3, 0, 1, 1] = math.nan                        # NaN in the last channel
    buf[0, 1, 1, 2, 3] = buf[0, 3, 1, 2, 3] = math.nan   # two NaNs: the first
    want = buf.argmax(1, keepdim=True)
    result = torch.zeros(1, 1, 2, 3, 4, dtype=torch.uint8, device=dev)
    with fastmed.use_backend(backend):
        sliding_window_finalize(buf.to(dev), norm, (2, 3), 0, 2, result=result, output="labels")
    assert result[0, 0, 0, 0, 0] == 1 and result[0, 0, 0, 1, 1] == 3 and result[0, 0, 1, 2, 3] == 1
    assert torch.equal(result.cpu().long(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_values_keep_nan(backend):
    dev = _device(backend)
    grid, samples, patches, weight = _blended(13, image=(5, 4, 6), window=(3, 3, 3), overlap=(0.5,) * 3, C=2)
    patches[0, 1, 1, 1, 1] = math.nan
    values, count = _dense(grid, patches, weight, samples)
    buf = values.float().to(dev)
    norm = ref.window_normalizer(grid, weight.float().to(dev), torch.float32)
    with fastmed.use_backend(backend):
        sliding_window_finalize(buf, norm, grid.window[:2], 0, 5)
    assert torch.equal(buf.cpu().isnan(), (values / count).isnan()) and bool(buf.isnan().any())


# ------------------------------------------------------------------------------------------------------------------
# The normalizer: equal to a count map, computed once per geometry
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_normalizer_equals_the_count_map(mode):
    """Finalizing a buffer that holds the dense count map itself gives ones everywhere."""
    for image, window, overlap in (((13, 9, 11), (5, 4, 6), (0.5, 0.25, 0.0)), ((8, 1, 10), (3, 1, 4), (0.6,) * 3)):
        grid = _grid(image, window, overlap)
        weight = ref.importance_map(window, mode, (0.125,) * 3, torch.float64)
        _, count = _dense(grid, torch.zeros(grid.num_windows, 1, *window), weight, [0] * grid.num_windows)
        buf = count[None, None].clone()
        sliding_window_finalize(buf, ref.window_normalizer(grid, weight, torch.float64), window[:2], 0, image[0])
        torch.testing.assert_close(buf, torch.ones_like(buf), rtol=1e-14, atol=1e-14)


def test_normalizer_and_weights_once_per_geometry(monkeypatch):
    calls, maps = [], []
    real, real_map = ref.window_normalizer, ref.importance_map

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    def counting_map(*args, **kwargs):
        maps.append(args[:2])
        return real_map(*args, **kwargs)

    monkeypatch.setattr(ref, "window_normalizer", counting)
    monkeypatch.setattr(ref, "importance_map", counting_map)
    inference._normalizer_cache.clear()
    inference._weight_cache.clear()
    x = torch.randn(2, 1, 12, 10, generator=_gen(14))
    predictor = lambda w: torch.cat([w, -w], 1)  # noqa: E731
    first = inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.5, "gaussian")
    again = inference.sliding_window_inference(x, (6, 4), 1, predictor, 0.5, "gaussian")
    assert len(calls) == 1 and torch.equal(first, again)
    inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.5, "gaussian", output="labels")
    assert len(calls) == 1  # the same geometry and weights: the cached table
    inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.25, "gaussian")
    assert len(calls) == 2  # another grid
    inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.25, "constant")
    assert len(calls) == 3  # other weights
    assert maps == [((6, 4), "gaussian"), ((6, 4), "constant")]  # the importance map once per window and mode
    edit = lambda seg, win, w: (seg, w.mul_(2))  # noqa: E731  (a process_fn may edit the map it is given)
    inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.25, "constant", process_fn=edit)
    assert len(maps) == 3  # with a process_fn: computed for the call, not cached
    want = pytest.importorskip("monai.inferers").sliding_window_inference(x, (6, 4), 3, predictor, 0.25, "constant")
    torch.testing.assert_close(inference.sliding_window_inference(x, (6, 4), 3, predictor, 0.25, "constant"), want)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.ext)])
def test_opcheck_and_compile(backend):
    """torch.library.opcheck of both ops, and torch.compile(fullgraph=True) through them, on the CPU backends
    (``cpp``: the C++ kernels eagerly, the reference when traced)."""
    grid = _grid((4, 3, 3), (3, 3, 3), (0.5,) * 3)  # two windows: tracing cost grows with them
    w = torch.rand(3, 3, 3, generator=_gen(17))
    p = torch.randn(grid.num_windows, 2, 3, 3, 3, generator=_gen(18))
    origins = _origins(grid, [0] * grid.num_windows)
    norm = ref.window_normalizer(grid, w, torch.float32)
    with fastmed.use_backend(backend):
        torch.library.opcheck(torch.ops.fastmed.sliding_window_accumulate.default,
                              (torch.zeros(1, 2, 4, 3, 3), p, w, origins, backend))
        torch.library.opcheck(torch.ops.fastmed.sliding_window_finalize.default,
                              (torch.rand(1, 2, 4, 3, 3) + 1, torch.zeros(1, 2, 4, 3, 3), *norm, 3, 3, 0, 4,
                               "values", True, backend))

        def blend(buf, result):
            sliding_window_accumulate(buf, p, w, origins)
            sliding_window_finalize(buf, norm, (3, 3), 0, 4, result=result)
            return result

        want = blend(torch.zeros(1, 2, 4, 3, 3), torch.zeros(1, 2, 4, 3, 3))
        compiled = torch.compile(blend, fullgraph=True, backend="aot_eager")
        got = compiled(torch.zeros(1, 2, 4, 3, 3), torch.zeros(1, 2, 4, 3, 3))
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------------------
# The cpp backend against the reference
# ------------------------------------------------------------------------------------------------------------------

def _blend_all(backend, grid, samples, patches, weight, buffer_dtype, output, ring):
    """Every window accumulated and every row finalized with ``backend``: a whole-volume buffer (``ring`` False;
    values in place or into a result, or labels), or a ring one window deep that each z-row of windows fills and
    the rows it completes leave (finalized and zeroed), as inference uses the ops.  Returns the buffer and the
    result."""
    N, C = max(samples) + 1, patches.shape[1]
    Z, Y, X = grid.image_size
    acc = accumulation_dtype(buffer_dtype)
    norm = ref.window_normalizer(grid, weight.to(acc), acc)
    in_place = output == "in_place"
    result = None if in_place else (torch.zeros(N, 1, Z, Y, X, dtype=torch.uint8) if output == "labels"
                                    else torch.zeros(N, C, Z, Y, X, dtype=torch.float16 if ring else acc))
    origins = _origins(grid, samples)
    kind = "labels" if output == "labels" else "values"
    with fastmed.use_backend(backend):
        if not ring:
            buf = torch.zeros(N, C, Z, Y, X, dtype=buffer_dtype)
            sliding_window_accumulate(buf, patches, weight, origins)
            sliding_window_finalize(buf, norm, grid.window[:2], 0, Z, result=result, output=kind)
            return buf, result
        buf = torch.zeros(N, C, grid.window[0], Y, X, dtype=buffer_dtype)
        per_row = len(grid.starts[1]) * len(grid.starts[2])
        ends = list(grid.starts[0][1:]) + [Z]
        for n in range(N):
            for row, (lo, hi) in enumerate(zip(grid.starts[0], ends)):
                ks = [n * grid.num_windows + k for k in range(row * per_row, (row + 1) * per_row)]
                sliding_window_accumulate(buf, patches[ks], weight, [v for k in ks for v in origins[4 * k:4 * k + 4]])
                if lo < hi:
                    sliding_window_finalize(buf[n:n + 1], norm, grid.window[:2], lo, hi, result=result[n:n + 1],
                                            output=kind, zero_buffer=True)
    return buf, result


@pytest.mark.ext
@settings(max_examples=40, deadline=None)
@given(data=st.data(), buffer_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       patch_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
       output=st.sampled_from(["values", "in_place", "labels"]), ring=st.booleans())
def test_cpp_matches_reference(data, buffer_dtype, patch_dtype, output, ring):
    """The hypothesis equivalence test of the ``cpp`` backend against the reference: random grids (1-9 voxels an
    axis, overlaps 0 / 0.25 / 0.5), 1-2 samples, buffer and patch dtypes, strided patches, a whole-volume buffer or
    a ring, values (in place or into a result) and labels.  Values to the buffer dtype's tolerance (the
    multiply-add may round once instead of twice); labels exactly, from integer predictions and unit weights
    (exact sums in every dtype, so the same argmax)."""
    ring = ring and output != "in_place"
    image = tuple(data.draw(st.integers(1, 9), label="image") for _ in range(3))
    window = tuple(data.draw(st.integers(1, n), label="window") for n in image)
    grid = _grid(image, window, tuple(data.draw(st.sampled_from([0.0, 0.25, 0.5]), label="overlap") for _ in range(3)))
    C = data.draw(st.integers(2 if output == "labels" else 1, 4), label="C")
    samples = [n for n in range(data.draw(st.integers(1, 2), label="N")) for _ in range(grid.num_windows)]
    g = _gen(data.draw(st.integers(0, 2**16), label="seed"))
    shape = (len(samples), C) + window + (2,)
    if output == "labels":
        patches = torch.randint(-4, 5, shape, generator=g).to(patch_dtype)[..., 0]
        weight = torch.ones(window)
    else:
        patches = torch.randn(shape, generator=g).to(patch_dtype)[..., 0]  # strided along x
        weight = ref.importance_map(window, "gaussian", (0.125,) * 3, torch.float32)
    got = _blend_all("cpp", grid, samples, patches, weight, buffer_dtype, output, ring)
    want = _blend_all("reference", grid, samples, patches, weight, buffer_dtype, output, ring)
    if output == "labels":
        assert torch.equal(got[1], want[1])
        return
    tol = TOL[buffer_dtype if output == "in_place" else (torch.float16 if ring else buffer_dtype)]
    g_out, w_out = (got[0], want[0]) if output == "in_place" else (got[1], want[1])
    torch.testing.assert_close(g_out.double(), w_out.double(), **tol)


@pytest.mark.ext
@pytest.mark.parametrize("output", ["in_place", "float16", "labels"])
def test_cpp_finalize_is_the_reference_bit_for_bit(output):
    """From the same buffer, the ``cpp`` finalization equals the reference's exactly: the normalizer row is summed
    in the reference's order (z windows outer, y windows inner) and divided once."""
    grid, samples, patches, weight = _blended(23, image=(9, 7, 10), window=(4, 3, 5), overlap=(0.5, 0.25, 0.5), C=4)
    values, _ = _dense(grid, patches, weight, samples)
    norm = ref.window_normalizer(grid, weight.float(), torch.float32)
    out = {}
    for backend in ("reference", "cpp"):
        buf = values.float().clone()
        result = (None if output == "in_place" else torch.zeros(1, 1, *grid.image_size, dtype=torch.uint8)
                  if output == "labels" else torch.zeros(1, 4, *grid.image_size, dtype=torch.float16))
        with fastmed.use_backend(backend):
            sliding_window_finalize(buf, norm, grid.window[:2], 0, grid.image_size[0], result=result,
                                    output="labels" if output == "labels" else "values")
        out[backend] = buf if result is None else result
    assert torch.equal(out["cpp"], out["reference"])


@pytest.mark.ext
@pytest.mark.parametrize("output", ["values", "labels"])
def test_cpp_is_bit_identical_at_1_and_2_threads(output):
    """Windows large enough that both ops split their rows between the threads: the same bits at 1 and 2."""
    grid = _grid((10, 70, 64), (4, 64, 64), (0.5, 0.5, 0.0))
    samples = [0] * grid.num_windows
    patches = torch.randn(grid.num_windows, 3, 4, 64, 64, generator=_gen(31))
    weight = ref.importance_map((4, 64, 64), "gaussian", (0.125,) * 3, torch.float32)
    norm = ref.window_normalizer(grid, weight, torch.float32)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            buf = torch.zeros(1, 3, *grid.image_size)
            result = torch.zeros(1, 1 if output == "labels" else 3, *grid.image_size,
                                 dtype=torch.uint8 if output == "labels" else torch.float32)
            with fastmed.use_backend("cpp"):
                sliding_window_accumulate(buf, patches, weight, _origins(grid, samples))
                sliding_window_finalize(buf, norm, (4, 64), 0, 10, result=result, output=output)
            out.append((buf, result))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.ext
def test_auto_picks_cpp_on_cpu():
    """``auto`` blends CPU tensors with the ``cpp`` backend (the extension is built)."""
    from fastmed import _backend
    assert _backend.choose("sliding_window", torch.device("cpu")) == "cpp"
    assert _backend.why_not("sliding_window", "cpp", torch.device("meta")) is not None


# ------------------------------------------------------------------------------------------------------------------
# Errors of the ops
# ------------------------------------------------------------------------------------------------------------------

def test_accumulate_errors():
    buf = torch.zeros(1, 2, 4, 5, 6)
    p, w = torch.zeros(1, 2, 3, 3, 3), torch.ones(3, 3, 3)
    with pytest.raises(ValueError, match="patches must have the 2 channels"):
        sliding_window_accumulate(buf, torch.zeros(1, 3, 3, 3, 3), w, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="weight must have the window shape"):
        sliding_window_accumulate(buf, p, torch.ones(3, 3, 2), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="origins must be 4 ints"):
        sliding_window_accumulate(buf, p, w, [0, 0, 0])
    with pytest.raises(ValueError, match="origins: window 0 .* is not inside buffer"):
        sliding_window_accumulate(buf, p, w, [0, 0, 3, 0])
    with pytest.raises(ValueError, match="windows of 5 rows do not fit the 4 rows"):
        sliding_window_accumulate(buf, torch.zeros(1, 2, 5, 3, 3), torch.ones(5, 3, 3), [0, 0, 0, 0])
    with pytest.raises(TypeError, match="buffer must be a floating-point tensor"):
        sliding_window_accumulate(buf.long(), p, w, [0, 0, 0, 0])


def test_finalize_errors():
    grid = _grid((4, 5, 6), (3, 3, 3), (0.5,) * 3)
    norm = ref.window_normalizer(grid, torch.ones(3, 3, 3), torch.float32)
    buf = torch.zeros(1, 2, 4, 5, 6)
    with pytest.raises(ValueError, match="output='labels' needs a result"):
        sliding_window_finalize(buf, norm, (3, 3), 0, 4, output="labels")
    with pytest.raises(TypeError, match="result must be torch.uint8"):
        sliding_window_finalize(buf, norm, (3, 3), 0, 4, result=torch.zeros(1, 1, 4, 5, 6), output="labels")
    with pytest.raises(ValueError, match="z_lo, z_hi must be image rows"):
        sliding_window_finalize(buf, norm, (3, 3), 2, 5)
    with pytest.raises(TypeError, match="normalizer must be a WindowNormalizer"):
        sliding_window_finalize(buf, (1, 2), (3, 3), 0, 4)
    with pytest.raises(TypeError, match="accumulation dtype"):
        sliding_window_finalize(buf.double(), norm, (3, 3), 0, 4)
    with pytest.raises(ValueError, match="result=None normalizes the buffer in place"):
        sliding_window_finalize(buf[:, :, :3], norm, (3, 3), 0, 3)
    with pytest.raises(ValueError, match="output must be one of"):
        sliding_window_finalize(buf, norm, (3, 3), 0, 4, output="probs")


# ------------------------------------------------------------------------------------------------------------------
# Memory: what the blending keeps, against MONAI
# ------------------------------------------------------------------------------------------------------------------

def test_tracked_peak_counts_storages():
    """The instrument: new storages count while alive; views and in-place results do not."""
    bench = _bench_module()
    x = torch.ones(1000)

    def work():
        a = x * 2                 # 4000 bytes
        v = a[10:]                # view: 0
        v.add_(1)                 # in place: 0
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes, both alive: 8000
        del a, v, b
        c = torch.zeros(100)      # after the others are freed: 400
        return c

    assert bench.tracked_peak(work) == 8000


def test_accumulation_memory_against_monai(blend_mode):
    """Peak bytes of the storages the call allocates (the predictor returns views of a fixed bank, so only the
    blending is counted).  MONAI keeps a float32 result and a count map (C + 1 floats a voxel); fastmed the result
    only (values), or a band one window deep / tiles about one window step deep, plus one byte a voxel (labels)."""
    monai_swi = pytest.importorskip("monai.inferers").sliding_window_inference
    bench = _bench_module()
    C, shape, roi = 3, (1, 1, 96, 48, 48), (12, 12, 12)
    vol = math.prod(shape[2:])
    bank = torch.randn(4, C, *roi, generator=_gen(15))
    predictor = lambda w: bank[:w.shape[0]]  # noqa: E731
    x = torch.randn(shape, generator=_gen(16))
    inference._normalizer_cache.clear()
    peak = {}
    for name, fn, kw in (("monai", monai_swi, {}), ("values", inference.sliding_window_inference, {}),
                         ("float16", inference.sliding_window_inference, dict(buffer_dtype=torch.float16)),
                         ("labels", inference.sliding_window_inference, dict(output="labels"))):
        peak[name] = bench.tracked_peak(lambda fn=fn, kw=kw: fn(x, roi, 4, predictor, 0.5, "gaussian", **kw))
    windows = 4 * (1 + C) * math.prod(roi) * 4 * 2       # window inputs and the importance map, generously
    normalizer = roi[0] * roi[1] * shape[4] * 4 * 2      # the table (a few window-sized planes)
    assert peak["monai"] >= (C + 1) * 4 * vol
    assert peak["values"] <= C * 4 * vol + windows + normalizer
    assert peak["float16"] <= C * 2 * vol + windows + normalizer
    step = roi[0] // 2
    tiles = C * 4 * shape[4] * step * (shape[3] + roi[1] + step)  # ~one window step of rows (see _Head)
    band = C * 4 * roi[0] * shape[3] * shape[4]                  # one window deep
    assert tiles < band
    assert peak["labels"] <= vol + (tiles if blend_mode == "tiles" else band) + windows + normalizer
    ratio = {k: v / peak["monai"] for k, v in peak.items()}
    assert ratio["values"] <= C / (C + 1) + 0.02
    assert ratio["float16"] <= 0.5 and ratio["labels"] <= 0.25, ratio


# ------------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("output", ["values", "labels"])
def test_gpu_inference_equals_cpu(buffer_dtype, output):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 4, 3, padding=1)
    x = torch.randn(1, 1, 40, 33, 29)
    with torch.no_grad():
        want = inference.sliding_window_inference(x.double(), (16, 16, 16), 4, net.double(), 0.5, "gaussian")
        got = inference.sliding_window_inference(x.cuda(), (16, 16, 16), 4, net.float().cuda(), 0.5, "gaussian",
                                                 output=output, buffer_dtype=buffer_dtype)
    if output == "labels":
        agree = (got.cpu().long() == want.argmax(1, keepdim=True)).float().mean().item()
        assert agree > (0.999 if buffer_dtype == torch.float32 else 0.99)
    else:
        torch.testing.assert_close(got.cpu().double(), want, **TOL[buffer_dtype])


def test_kernels_compile_for_sm90():
    """Both kernels, in the specializations the launchers use, compile for an H100 without spilling."""
    from sm90 import assert_no_spills, compile_for_sm90

    m = "fastmed.kernels.sliding_window"
    ints = {p: "*i32" for p in ("sz_ptr", "sy_ptr", "fz_ptr", "cz_ptr", "fy_ptr", "cy_ptr")}
    specs = []
    for buf, acc, f64 in (("*fp32", "*fp32", False), ("*bf16", "*fp32", False), ("*fp16", "*fp32", False),
                          ("*fp64", "*fp64", True)):
        specs.append(dict(module=m, kernel="_accumulate_kernel", ptr=buf, pointers={"patch_ptr": "*fp32"},
                          constexprs=dict(F64=f64, BLOCK_Y=8, BLOCK_X=128), num_warps=8))
        for output, out in (("values", buf), ("labels", "*u8")):
            specs.append(dict(module=m, kernel="_finalize_kernel", ptr=buf,
                              pointers=dict(out_ptr=out, tab_ptr=acc, **ints),
                              constexprs=dict(OUTPUT=output, ZERO=True, BLOCK_Y=8, BLOCK_X=128), num_warps=8))
    assert_no_spills(compile_for_sm90(specs))
