"""Benchmark: fused normalization + activation.

fastmed.ops.norm_act vs the eager torch composition (F.instance_norm / F.group_norm + F.leaky_relu) vs
torch.compile of that composition, forward and forward+backward, interleaved in one run.

    python bench/bench_norm_act.py                 # GPU: nnU-Net stage shapes, bf16 and fp32, both layouts
    python bench/bench_norm_act.py --device cpu    # CPU cases of issue 12: IN + LeakyReLU (2, 32, 48^3), fp32, and
                                                   # the per-call cost: IN and GN + LeakyReLU (1, 8, 4^3)
    python bench/bench_norm_act.py --quick         # tiny shapes (the device script's CPU rehearsal)

Cases run most important first (the issue-11 target, instance norm fwd+bwd bf16 2x32x128^3 channels-first, leads),
so a run stopped at its time limit keeps the rows that matter.  Bytes the operation must move at least
(``min_bytes``): forward ``2*x + params`` (read x, write y); forward+backward ``4*x + 2*params`` (read x and dy,
write y and dx; read weight and bias, write their gradients).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_parser, compiled, fastmed_backend, nbytes, setup, with_compile  # noqa: E402

import fastmed  # noqa: E402

GPU_SHAPES = [(2, 32, 128, 128, 128), (2, 64, 64, 64, 64), (2, 128, 32, 32, 32), (2, 320, 8, 8, 8),
              (24, 64, 224, 224)]
CPU_SHAPES = [(2, 32, 48, 48, 48)]
# Tiny: what a call costs besides its arithmetic (checks, backend choice, autograd wrapper), instance and group norm.
CPU_TINY_SHAPES = [(1, 8, 4, 4, 4)]
QUICK_SHAPES = [(2, 8, 12, 12, 12), (2, 8, 16, 16)]
FORMULAS = {"fwd": "2*x + params: read x, weight, bias; write y",
            "fwd+bwd": "4*x + 2*params: read x, dy, weight, bias; write y, dx, dweight, dbias"}


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


def variants(shape, on_gpu: bool, dtype_arg, kinds, modes, layouts):
    """(dtype, kind, layout, mode) of one shape, most important first."""
    dtypes = [getattr(torch, dtype_arg)] if dtype_arg else ([torch.bfloat16, torch.float32] if on_gpu
                                                            else [torch.float32])
    out = []
    for kind in kinds:
        for dtype in dtypes:
            for layout in layouts:
                for mode in modes:
                    out.append((dtype, kind, layout, mode))
    return out


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--kinds", default="instance,group")
    p.add_argument("--modes", default="fwd+bwd,fwd")
    p.add_argument("--layouts", default="cf,cl", help="cf (contiguous), cl (channels-last) or both (default)")
    p.add_argument("--shapes", default=None, help="e.g. 2x32x128x128x128;24x64x224x224")
    args = p.parse_args(argv)
    bench = setup(args, "norm_act")
    dev = bench.device
    on_gpu = dev.type == "cuda"
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(";")]
    else:
        shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if on_gpu else CPU_SHAPES)
    kinds = args.kinds.split(",") if (on_gpu or args.quick or args.kinds != "instance,group") else ["instance"]
    shape_kinds = [(shape, kinds) for shape in shapes]
    if not (on_gpu or args.quick or args.shapes):
        shape_kinds += [(shape, args.kinds.split(",")) for shape in CPU_TINY_SHAPES]
    backend = fastmed_backend("norm_act", dev)
    for shape, shape_kind_list in shape_kinds:
        for dtype, kind, layout, mode in variants(shape, on_gpu, args.dtype, shape_kind_list, args.modes.split(","),
                                                  args.layouts.split(",")):
            x0 = torch.randn(shape, device=dev, dtype=dtype)
            if layout == "cl":
                x0 = x0.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
            C = shape[1]
            w = (torch.rand(C, device=dev) + 0.5).requires_grad_()
            b = torch.randn(C, device=dev).requires_grad_()
            gy = torch.randn_like(x0)
            groups = 8 if C % 8 == 0 else 1
            fns = {"fastmed": fused(kind, groups), "eager": composition(kind, groups)}
            if with_compile(args, dev):
                fns["torch.compile"] = compiled(composition(kind, groups))
            x = x0.detach().requires_grad_(mode == "fwd+bwd")
            impls = {}
            for name, fn in fns.items():
                if mode == "fwd":
                    def call(fn=fn, x=x, w=w, b=b):
                        with torch.no_grad():
                            return fn(x, w, b)
                else:
                    def call(fn=fn, x=x, w=w, b=b, gy=gy):
                        return torch.autograd.grad(fn(x, w, b), (x, w, b), gy)
                impls[name] = call
            params = nbytes(w, b)
            min_bytes = 2 * nbytes(x0) + params if mode == "fwd" else 4 * nbytes(x0) + 2 * params
            case = f"{kind} {mode} {layout} " + "x".join(map(str, shape))
            bench.compare(case, impls, dtype=dtype, shape=shape, min_bytes=min_bytes, formula=FORMULAS[mode],
                          extra={"kind": kind, "mode": mode, "layout": layout, "activation": "leaky_relu"},
                          impl_extra={"fastmed": {"backend": backend}})
            bench.print_ratios(case)
            del x0, x, gy
    bench.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
