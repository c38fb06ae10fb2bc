"""Benchmark of the fused convolution block conv -> InstanceNorm -> LeakyReLU (nnU-Net's ConvDropoutNormReLU).

Side by side in one run, per case, dtype (bf16, fp32) and layout (channels-first, channels-last):
    fastmed-auto            fastmed.ops.conv_norm_act(implementation="auto")
    fastmed-cudnn           cuDNN convolution + the fused norm-act op
    fastmed-implicit_gemm   Triton implicit GEMM with statistics in the epilogue
    eager                   F.conv3d + F.instance_norm + F.leaky_relu
    torch.compile           torch.compile of the eager composition
forward+backward and forward, interleaved, with TFLOP/s (convolution FLOPs; forward+backward counts 3x) and the
percent of a matmul rate measured in the same run, peak memory, and speed-ups of fastmed-auto over eager and
compile.  Bytes the block must move at least (``min_bytes``): forward ``x + w + params + y`` (read the input(s),
weight and the four per-channel vectors, write y); forward+backward ``2*(x + w + params) + 2*y`` (also read dy,
write dx, dw and the vector gradients).  The Triton kernels are compiled in the warm-up, never in the timed region
(``fastmed.kernels.conv_block.warm_cache(device)`` runs first where that function exists).

    python bench/bench_conv_block.py                  # GPU, nnU-Net stage shapes
    python bench/bench_conv_block.py --device cpu     # CPU cases of issue 12: (1, 32, 40^3) and the tiny
                                                      # (1, 4, 8^3) -> 8 channels (per-call cost)
    python bench/bench_conv_block.py --quick          # tiny shapes (the device script's CPU rehearsal)
    python bench/bench_conv_block.py --write-choice   # also rewrite fastmed/ops/_conv_block_choice.py (GPU only)
    python bench/bench_conv_block.py --write-choice --from bench/results/device_check-....json
                                                      # rewrite it from a committed GPU results file, no run
"""
from __future__ import annotations

import argparse
import math
import os
import pprint
import sys
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, bench_parser, compiled, nbytes, quantiles, setup, with_compile  # noqa: E402
from results_io import load_rows  # noqa: E402

from fastmed.ops import conv_norm_act  # noqa: E402

# (name, N, Cin, Cout, spatial, stride[, Cskip]): nnU-Net 3D stages, their strided downsampling convs, a 2D stage,
# and decoder convolutions whose input is cat([upsampled, skip]) (Cskip given: fastmed reads the two tensors,
# eager and torch.compile concatenate).
GPU_CASES = [
    ("stage0-128^3", 2, 32, 32, (128, 128, 128), 1),
    ("stage1-64^3", 2, 64, 64, (64, 64, 64), 1),
    ("stage2-32^3", 2, 128, 128, (32, 32, 32), 1),
    ("stage3-16^3", 2, 256, 256, (16, 16, 16), 1),
    ("stage4-8^3", 2, 320, 320, (8, 8, 8), 1),
    ("down1-128^3-s2", 2, 32, 64, (128, 128, 128), 2),
    ("down2-64^3-s2", 2, 64, 128, (64, 64, 64), 2),
    ("down3-32^3-s2", 2, 128, 256, (32, 32, 32), 2),
    ("down4-16^3-s2", 2, 256, 320, (16, 16, 16), 2),
    ("2d-224^2", 24, 64, 64, (224, 224), 1),
    ("decoder-128^3-concat", 2, 32, 32, (128, 128, 128), 1, 32),
    ("decoder-64^3-concat", 2, 64, 64, (64, 64, 64), 1, 64),
]
CPU_CASES = [
    ("cpu-40^3", 1, 32, 32, (40, 40, 40), 1),
    ("cpu-tiny-8^3", 1, 4, 8, (8, 8, 8), 1),  # the per-call cost: checks, backend choice, autograd wrapper
]
QUICK_CASES = [
    ("quick-3d", 1, 4, 8, (10, 10, 10), 1),
    ("quick-3d-s2", 1, 4, 8, (10, 10, 10), 2),
    ("quick-2d", 2, 8, 8, (24, 24), 1),
    ("quick-3d-concat", 1, 4, 4, (8, 8, 8), 1, 4),
]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICE_FILE = os.path.join(REPO_ROOT, "fastmed", "ops", "_conv_block_choice.py")
IMPLS = ("cudnn", "implicit_gemm")
FORMULAS = {"fwd": "x + w + params + y: read x (and skip), weight, bias, norm weight/bias; write y",
            "fwd+bwd": "2*(x + w + params) + 2*y: also read dy; write dx, dweight and the vector gradients"}


def conv_flops(n, cin, cout, out_spatial, kernel_numel) -> float:
    vox = 1
    for s in out_spatial:
        vox *= s
    return 2.0 * n * cout * vox * cin * kernel_numel


def eager_block(x, w, b, nw, nb, stride, skip=None):
    if skip is not None:
        x = torch.cat([x, skip], 1)
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    h = conv(x, w, b, stride, 1)
    return F.leaky_relu(F.instance_norm(h, weight=nw, bias=nb, eps=1e-5), 0.01)


def matmul_tflops(bench: Bench) -> float:
    """bf16 (GPU) / fp32 (CPU) square matmul rate measured in this run, TFLOP/s."""
    size, dtype = (8192, torch.bfloat16) if bench.device.type == "cuda" and not bench.quick else (512, torch.float32)
    a = torch.randn(size, size, device=bench.device, dtype=dtype)
    b = torch.randn(size, size, device=bench.device, dtype=dtype)
    return 2 * size ** 3 / (quantiles(bench.time_fn(lambda: a @ b))[0] * 1e-3) / 1e12


def make_inputs(case, dtype, channels_last, device):
    """[x, weight, bias, norm_weight, norm_bias] (+ [skip] for a decoder case)."""
    _, n, cin, cout, spatial, stride, *skip_c = case
    sd = len(spatial)
    g = torch.Generator(device="cpu").manual_seed(0)
    cin_total = cin + sum(skip_c)
    x = torch.randn((n, cin) + spatial, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn((cout, cin_total) + (3,) * sd, generator=g) / (cin_total * 3 ** sd) ** 0.5).to(device=device,
                                                                                                     dtype=dtype)
    b, nw, nb = (torch.randn(cout, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    out = [x, w, b, nw, nb] + [torch.randn((n, c) + spatial, generator=g).to(device=device, dtype=dtype)
                               for c in skip_c]
    if channels_last:
        fmt = torch.channels_last_3d if sd == 3 else torch.channels_last
        out = [t.contiguous(memory_format=fmt) if t.dim() > 1 else t for t in out]
    return out


def timed(fn, leaves, backward):
    """A closure running fn forward, or forward + backward with a fixed upstream gradient."""
    if not backward:
        def run():
            with torch.no_grad():
                return fn(*leaves)
        return run
    params = [t.requires_grad_() for t in leaves]
    dy = torch.randn_like(fn(*params).detach())

    def run_bwd():
        for p in params:
            p.grad = None
        fn(*params).backward(dy)
    return run_bwd


def warm_kernels(device) -> None:
    """Compile the conv kernels before anything is timed, where kernels/conv_block.py offers a way to."""
    try:
        from fastmed.kernels import conv_block as kernels
    except ImportError:
        return
    warm = getattr(kernels, "warm_cache", None)
    if callable(warm) and device.type == "cuda":
        import time

        t0 = time.perf_counter()
        warm(device)
        print(f"conv kernels warmed in {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    parser = bench_parser(__doc__, None, "comma-separated case names to run (default: all)")
    parser.add_argument("--write-choice", action="store_true",
                        help="rewrite fastmed/ops/_conv_block_choice.py from the forward+backward timings")
    parser.add_argument("--from", dest="source", default=None,
                        help="with --write-choice: take the timings from this results file instead of running")
    parser.add_argument("--choice-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--any-device", action="store_true", help=argparse.SUPPRESS)  # the device script's rehearsal
    args = parser.parse_args(argv)
    if args.source:
        if not args.write_choice:
            parser.error("--from goes with --write-choice")
        write_choice_from(args.source, args.choice_file, any_device=args.any_device)
        return
    bench = setup(args, "conv_block")
    on_gpu = bench.device.type == "cuda"
    cases = QUICK_CASES if args.quick else (GPU_CASES if on_gpu else CPU_CASES)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in wanted]
    dtypes = [torch.bfloat16, torch.float32] if on_gpu and not args.quick else [torch.float32]
    if args.dtype:
        dtypes = [getattr(torch, args.dtype)]
    layouts = (False, True) if on_gpu or args.quick else (False,)
    mm = matmul_tflops(bench)
    print(f"measured {'bf16' if on_gpu and not args.quick else 'fp32'} matmul {mm:.3g} TFLOP/s")
    warm_kernels(bench.device)
    compile_cache = {}
    for case in cases:
        name, n, cin, cout, spatial, stride, *skip_c = case
        sd = len(spatial)
        out_sp = tuple((s + 2 - 3) // stride + 1 for s in spatial)
        flops_fwd = conv_flops(n, cin + sum(skip_c), cout, out_sp, 3 ** sd)
        for dtype in dtypes:
            for channels_last in layouts:
                layout = "channels_last" if channels_last else "channels_first"
                impls = {"fastmed-auto": "auto"}
                if on_gpu or args.quick:
                    impls["fastmed-cudnn"] = "cudnn"
                if on_gpu or os.environ.get("TRITON_INTERPRET") == "1":
                    impls["fastmed-implicit_gemm"] = "implicit_gemm"
                fns = {k: (lambda *t, _impl=v, _s=stride: conv_norm_act(*t[:5], skip=t[5] if len(t) > 5 else None,
                                                                      stride=_s, implementation=_impl))
                       for k, v in impls.items()}
                fns["eager"] = lambda *t, _s=stride: eager_block(*t[:5], _s, *t[5:])
                if with_compile(args, bench.device):
                    key = (sd, stride)
                    if key not in compile_cache:
                        compile_cache[key] = compiled(lambda *t, _s=stride: eager_block(*t[:5], _s, *t[5:]))
                    fns["torch.compile"] = compile_cache[key]
                for mode, backward in (("fwd+bwd", True), ("fwd", False)):
                    label = f"{name} {str(dtype)[6:]} {layout} {mode}"
                    flops = flops_fwd * (3 if backward else 1)
                    extra = dict(case_name=name, layout=layout, mode=mode, stride=stride, N=n, Cin=cin, Cout=cout,
                                 Cskip=sum(skip_c), spatial="x".join(map(str, spatial)), **{"matmul_TFLOP/s": mm})
                    leaves = {k: make_inputs(case, dtype, channels_last, bench.device) for k in fns}
                    x, w, b, nw, nb, *skip = leaves["eager"]
                    y_bytes = n * cout * math.prod(out_sp) * x.element_size()
                    ins = nbytes(x, w, b, nw, nb, *skip)
                    min_bytes = ins + y_bytes if not backward else 2 * ins + 2 * y_bytes
                    rows = bench.compare(label, {k: timed(fn, leaves[k], backward) for k, fn in fns.items()},
                                         dtype=dtype, shape=(n, cin, cout) + spatial, flops=flops,
                                         min_bytes=min_bytes, formula=FORMULAS[mode], extra=extra)
                    for row in rows.values():
                        row["pct_matmul"] = round(100 * row["TFLOP/s"] / mm, 2)
                    del leaves
                    for base in ("eager", "torch.compile"):
                        r = bench.ratios(label, base, against="fastmed-auto")
                        if r is not None:
                            print(f"  {label:<44} fastmed-auto vs {base}: {r:.2f}x")
    path = bench.save(args.out)
    if args.write_choice:
        if not on_gpu:
            sys.exit("--write-choice needs a CUDA run: CPU timings say nothing about the GPU choice")
        write_choice(bench.rows, path, bench.env, args.choice_file)


def write_choice_from(source: str, choice_file: Optional[str] = None, any_device: bool = False) -> None:
    """:func:`write_choice` from the conv_block rows of a results file (a benchmark's or a merged one).
    ``any_device`` takes CPU rows too (the device script's rehearsal; a CPU table says nothing about the GPU)."""
    rows = [r for r in load_rows(source) if r.get("op") == "conv_block"]
    gpu = [r for r in rows if r.get("timer") == "cuda-events" or any_device]
    if not gpu:
        sys.exit(f"{source}: no conv_block rows measured on a GPU ({len(rows)} conv_block rows in all): "
                 "CPU timings say nothing about the GPU choice")
    write_choice(gpu, source, gpu[0], choice_file)


def write_choice(rows, source: str, env: dict, choice_file: Optional[str] = None) -> None:
    """Fastest implementation of forward+backward per (case, dtype, layout) -> ``choice_file`` (default
    fastmed/ops/_conv_block_choice.py)."""
    choice_file = choice_file or CHOICE_FILE
    best: dict = {}
    for r in rows:
        impl = r["impl"].replace("fastmed-", "")
        if r.get("mode") != "fwd+bwd" or impl not in IMPLS or r.get("ms") is None or r.get("Cskip"):
            continue
        spatial = tuple(int(s) for s in r["spatial"].split("x"))
        sd = len(spatial)
        key = (sd, r["dtype"], r["Cin"], r["Cout"], spatial, (r["stride"],) * sd, (3,) * sd,
               r["layout"] == "channels_last")
        if key not in best or r["ms"] < best[key][1]:
            best[key] = (impl, r["ms"])
    table = {k: v[0] for k, v in sorted(best.items(), key=lambda kv: str(kv[0]))}
    measurements = {k: v[1] for k, v in sorted(best.items(), key=lambda kv: str(kv[0]))}
    text = f'''"""Which implementation ``conv_norm_act(..., implementation="auto")`` runs, per shape and dtype.

Generated by ``python bench/bench_conv_block.py --write-choice``: for each benchmarked case the implementation
with the fastest forward+backward (fp32 rows run tf32 when torch.backends.cudnn.allow_tf32).  Keys are
``(spatial_dims, dtype, in_channels, out_channels, spatial_in, stride, kernel, channels_last)``; a shape not in
the table gets ``DEFAULT``.

Status: MEASURED on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']},
cuDNN {env['cudnn']}, commit {env['commit']}).
"""

MEASURED = True
SOURCE = {os.path.relpath(os.path.abspath(source), REPO_ROOT)!r}
DEFAULT = "cudnn"
# fastest forward+backward time (ms) of the chosen implementation, per key
MEASUREMENTS = {pprint.pformat(measurements, width=110)}
TABLE: dict = {pprint.pformat(table, width=110)}
'''
    with open(choice_file, "w") as fh:
        fh.write(text)
    print(f"wrote {choice_file} ({len(table)} entries, "
          f"{sum(v == 'implicit_gemm' for v in table.values())} choose implicit_gemm)")


if __name__ == "__main__":
    main()
