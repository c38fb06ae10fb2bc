"""Benchmark: fastmed.ops.distance_transform vs scipy vs the `edt` package (CPU), vs cupy looped (GPU).

    python bench/bench_distance_transform.py --quick          # CPU smoke test (64^3)
    python bench/bench_distance_transform.py --device cpu     # 128^3 blobs (~13% fg), 2x14 batch; 1 and 2 threads
    python bench/bench_distance_transform.py                  # GPU: (2, 14, 128^3) and (24, 9, 224^2) vs cupy looped

There is no eager / torch.compile composition of an exact EDT in torch to compare with; the peers are scipy
(single-threaded C), `edt` (seung-lab, C++, threads) and cupyx.scipy.ndimage.distance_transform_edt (GPU).
"""
import argparse
import os
import sys

import numpy as np
import scipy.ndimage as ndi
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, add_common_args  # noqa: E402

import fastmed  # noqa: E402
from fastmed.ops import distance_transform  # noqa: E402


def blobs(shape, seed, fraction=0.13):
    """Smooth random blobs covering about `fraction` of the volume."""
    rng = np.random.default_rng(seed)
    z = np.zeros(shape, np.float32)
    z[tuple(rng.integers(0, s, 60) for s in shape)] = 1
    z = ndi.gaussian_filter(z, max(shape) / 20)
    return z > np.quantile(z, 1 - fraction)


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
            common = dict(case=label, dtype=torch.float32, shape=m.shape, extra={"threads": threads})
            bench.run(name="fastmed", fn=lambda t=t: distance_transform(t), **common)
            if threads == 1:
                bench.run(name="scipy", fn=lambda flat=flat: [ndi.distance_transform_edt(x) for x in flat],
                          **common)
            if has_edt:
                import edt

                bench.run(name="edt", fn=lambda flat=flat, threads=threads: [edt.edt(x, parallel=threads)
                                                                             for x in flat], **common)
            for peer in ("scipy", "edt"):  # scipy is single-threaded: timed once, at t=1
                r = bench.ratios(label, peer)
                if r:
                    print(f"    fastmed vs {peer}: {r:.2f}x")


def gpu_cases(bench):
    try:
        import cupy
        import cupyx.scipy.ndimage as cndi
    except Exception:
        cupy = None
    for shape, sd in (((2, 14, 128, 128, 128), 3), ((24, 9, 224, 224), 2)):
        m = torch.from_numpy(np.stack([blobs(shape[-sd:], s) for s in range(shape[0] * shape[1])]).reshape(shape))
        mc = m.cuda()
        case = "x".join(map(str, shape))
        bench.run(name="fastmed", fn=lambda mc=mc, sd=sd: distance_transform(mc, spatial_dims=sd), case=case,
                  dtype=torch.float32, shape=shape)
        if cupy is not None:
            flat = cupy.asarray(m.reshape((-1,) + shape[-sd:]).numpy())
            bench.run(name="cupy-looped", fn=lambda flat=flat: [cndi.distance_transform_edt(x, float64_distances=False)
                                                                for x in flat],
                      case=case, dtype=torch.float32, shape=shape)
            r = bench.ratios(case, "cupy-looped")
            if r:
                print(f"    fastmed vs cupy looped: {r:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench("distance_transform", quick=args.quick, device=device, reps=3 if args.quick else 10,
                  warmup=1 if args.quick else 2)
    print(fastmed.info().splitlines()[0] if fastmed.info() else "")
    if device == "cuda":
        gpu_cases(bench)
    else:
        cpu_cases(bench, 64 if args.quick else 128, (1, 2) if args.quick else (2, 14))
    bench.save(args.out)


if __name__ == "__main__":
    main()
