"""Benchmark: fused normalization + activation.

fastmed.ops.norm_act vs the eager torch composition (F.instance_norm / F.group_norm + F.leaky_relu) vs
torch.compile of that composition, forward and forward+backward, at nnU-Net stage shapes.

    python bench/bench_norm_act.py                 # full grid on the GPU
    python bench/bench_norm_act.py --quick         # small shapes, few repeats (CPU or GPU smoke run)

On the CPU the fastmed row runs the reference backend (what `auto` picks for CPU tensors).  CPU timings are
wall-clock CPU timings; on a shared machine `--threads 1` gives steadier numbers.  At small CPU shapes fresh
allocations dominate (each first touch of a page faults), so results move with the C allocator's trimming.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, add_common_args  # noqa: E402

import fastmed  # noqa: E402

GPU_SHAPES = [(2, 32, 128, 128, 128), (2, 64, 64, 64, 64), (2, 128, 32, 32, 32), (2, 320, 8, 8, 8),
              (24, 64, 224, 224)]
CPU_SHAPES = [(2, 16, 32, 32, 32), (4, 32, 64, 64)]


def composition(kind: str, groups: int):
    def f(x, w, b):
        if kind == "instance":
            z = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
        else:
            z = F.group_norm(x, groups, w, b, 1e-5)
        return F.leaky_relu(z, 0.01)

    return f


def fused(kind: str, groups: int):
    def f(x, w, b):
        return fastmed.ops.norm_act(x, kind, w, b, num_groups=groups if kind == "group" else None,
                                    activation="leaky_relu", negative_slope=0.01)

    return f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--kinds", default="instance,group")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--layouts", default="cf,cl", help="cf (contiguous), cl (channels-last) or both (default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shapes", default=None, help="e.g. 2x32x128x128x128;24x64x224x224")
    args = p.parse_args(argv)

    bench = Bench("norm_act", quick=args.quick, device=args.device)
    dev = bench.device
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(";")]
    elif dev.type == "cuda":
        shapes = GPU_SHAPES[:2] if args.quick else GPU_SHAPES
    else:
        shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
    dtypes = [getattr(torch, args.dtype)] if args.dtype else (
        [torch.bfloat16, torch.float32] if dev.type == "cuda" else [torch.float32])
    layouts = args.layouts.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    modes = args.modes.split(",")
    copy = bench.copy_bandwidth()
    print(f"norm_act benchmark on {bench.env['device']}; copy bandwidth {copy:.0f} GB/s; commit {bench.env['commit']}")

    summary = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts:
                x0 = torch.randn(shape, device=dev, dtype=dtype)
                if layout == "cl":
                    if len(shape) not in (4, 5):
                        continue
                    x0 = x0.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
                C = shape[1]
                w = (torch.rand(C, device=dev) + 0.5).requires_grad_()
                b = torch.randn(C, device=dev).requires_grad_()
                gy = torch.randn_like(x0)
                elem = x0.numel() * x0.element_size()
                for kind in kinds:
                    groups = 8 if C % 8 == 0 else 1
                    impls = {"eager": composition(kind, groups), "fastmed": fused(kind, groups)}
                    if not args.no_compile:
                        impls["torch.compile"] = torch.compile(composition(kind, groups), dynamic=False)
                    for mode in modes:
                        case = f"{kind} {mode} {layout} " + "x".join(map(str, shape))
                        # bytes the fused kernels move: fwd = stats read + apply read + write (3 passes);
                        # fwd+bwd adds reduce (read x, dy) + apply (read x, dy, write dx): 8 passes in all.
                        passes = 3 if mode == "fwd" else 8
                        ideal = 2 if mode == "fwd" else 5  # x read + y write; + x, dy read and dx write
                        x = x0.detach().requires_grad_(mode == "fwdbwd")
                        for name, fn in impls.items():
                            if mode == "fwd":
                                def call(fn=fn, x=x):
                                    with torch.no_grad():
                                        return fn(x, w, b)
                            else:
                                def call(fn=fn, x=x):
                                    y = fn(x, w, b)
                                    return torch.autograd.grad(y, (x, w, b), gy)
                            bench.run(name=name, fn=call, case=case, dtype=dtype, shape=shape,
                                      bytes_moved=passes * elem if name == "fastmed" else None,
                                      extra={"kind": kind, "mode": mode, "layout": layout,
                                             "ideal_bytes": ideal * elem,
                                             "backend": fastmed._backend.choose("norm_act", dev)
                                             if name == "fastmed" else "torch"})
                        r_e = bench.ratios(case, "eager")
                        r_c = bench.ratios(case, "torch.compile")
                        summary.append((case, str(dtype).replace("torch.", ""), r_e, r_c))
    print("\nspeed-up of fastmed (time of baseline / time of fastmed):")
    print(f"  {'case':<44} {'dtype':<9} {'vs eager':>9} {'vs compile':>11}")
    for case, dt, r_e, r_c in summary:
        fmt = lambda r: f"{r:9.2f}x" if r else "      n/a"  # noqa: E731
        print(f"  {case:<44} {dt:<9} {fmt(r_e)} {fmt(r_c)}")
    bench.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
