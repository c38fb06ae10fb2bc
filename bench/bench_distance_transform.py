"""Benchmark: fastmed.ops.distance_transform vs scipy vs the `edt` package (CPU), vs cupy looped (GPU).

    python bench/bench_distance_transform.py --quick          # CPU smoke test (64^3)
    python bench/bench_distance_transform.py --device cpu     # 128^3 blobs (~13% fg), 2x14 batch; 1 and 2 threads
    python bench/bench_distance_transform.py                  # GPU: (2, 14, 128^3) and (24, 9, 224^2) vs cupy looped

There is no eager / torch.compile composition of an exact EDT in torch to compare with; the peers are scipy
(single-threaded C), `edt` (seung-lab, C++, threads) and cupyx.scipy.ndimage.distance_transform_edt (GPU), timed
interleaved with fastmed.  Bytes the transform must move at least (``min_bytes``): read the bool mask, write the
float32 distances: ``mask + 4*voxels``.
"""
import os
import sys

import numpy as np
import scipy.ndimage as ndi
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, bench_parser, fastmed_backend  # noqa: E402

import fastmed  # noqa: E402
from fastmed.ops import distance_transform  # noqa: E402


def blobs(shape, seed, fraction=0.13):
    """Smooth random blobs covering about `fraction` of the volume."""
    rng = np.random.default_rng(seed)
    z = np.zeros(shape, np.float32)
    z[tuple(rng.integers(0, s, 60) for s in shape)] = 1
    z = ndi.gaussian_filter(z, max(shape) / 20)
    return z > np.quantile(z, 1 - fraction)


FORMULA = "mask + 4*voxels: read the bool mask, write float32 distances"


def cpu_cases(bench, n, batch):
    import importlib.util

    has_edt = importlib.util.find_spec("edt") is not None
    one = blobs((n,) * 3, 0)
    many = np.stack([blobs((n,) * 3, s) for s in range(batch[0] * batch[1])]).reshape(batch + (n,) * 3)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for case, m in ((f"1x{n}^3 blobs", one), (f"{batch[0]}x{batch[1]}x{n}^3 blobs", many)):
            label = f"{case} t={threads}"
            t = torch.from_numpy(m)
            flat = m.reshape((-1,) + m.shape[-3:])
            impls = {"fastmed": lambda t=t: distance_transform(t)}
            if threads == 1:  # scipy is single-threaded: timed once, at t=1
                impls["scipy"] = lambda flat=flat: [ndi.distance_transform_edt(x) for x in flat]
            if has_edt:
                import edt

                impls["edt"] = lambda flat=flat, threads=threads: [edt.edt(x, parallel=threads) for x in flat]
            bench.compare(label, impls, dtype=torch.float32, shape=m.shape, min_bytes=m.size * 5, formula=FORMULA,
                          impl_extra={"fastmed": {"backend": fastmed_backend("distance_transform", bench.device)}})
            bench.print_ratios(label)


def gpu_cases(bench):
    try:
        import cupy
        import cupyx.scipy.ndimage as cndi
    except Exception:
        cupy = None
    for shape, sd in (((2, 14, 128, 128, 128), 3), ((24, 9, 224, 224), 2)):
        distinct = [blobs(shape[-sd:], s) for s in range(4)]  # a few distinct masks, repeated (setup time)
        m = torch.from_numpy(np.stack([distinct[s % 4] for s in range(shape[0] * shape[1])]).reshape(shape))
        mc = m.cuda()
        case = "x".join(map(str, shape))
        impls = {"fastmed": lambda mc=mc, sd=sd: distance_transform(mc, spatial_dims=sd)}
        if cupy is not None:
            flat = cupy.asarray(m.reshape((-1,) + shape[-sd:]).numpy())
            impls["cupy-looped"] = lambda flat=flat: [cndi.distance_transform_edt(x, float64_distances=False)
                                                      for x in flat]
        bench.compare(case, impls, dtype=torch.float32, shape=shape, min_bytes=m.numel() * 5, formula=FORMULA,
                      impl_extra={"fastmed": {"backend": fastmed_backend("distance_transform", bench.device)}})
        bench.print_ratios(case)


def main(argv=None):
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench("distance_transform", quick=args.quick, device=device, reps=3 if args.quick else 10,
                  warmup=1 if args.quick else 2)
    bench.copy_bandwidth()
    print(fastmed.info().splitlines()[0] if fastmed.info() else "")
    if device == "cuda":
        gpu_cases(bench)
    else:
        cpu_cases(bench, 64 if args.quick else 128, (1, 2) if args.quick else (2, 14))
    bench.save(args.out)


if __name__ == "__main__":
    main()
