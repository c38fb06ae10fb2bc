"""Benchmark: Swin (shifted-)window attention: the core op, and whole Swin blocks against MONAI's.

Core op, from the qkv grid to the attention output (no projections), interleaved in one run:
  fastmed      fastmed.ops.window_attention (whatever ``auto`` picks for the device, recorded as ``backend``)
  eager        roll + partition + gathered bias + mask tensor + softmax + reverse + roll, as timm / Swin-Unet /
               MONAI write it (bias index and mask precomputed, as their modules keep them in buffers)
  compile      torch.compile of the eager composition (GPU)
  sdpa         roll + partition, bias + mask materialized per (window, head) as SDPA's attn_mask, reverse
  flex         FlexAttention on the partitioned windows with a score_mod adding bias and mask (CUDA only)
Cases: Swin-UNet stages (B=24, window 7, shift 3) and SwinUNETR-like 3D stages (B=2, window 7^3, shift 3,
grids 48^3 / 24^3 padded to 49^3 / 28^3 as MONAI does), forward+backward and forward, bfloat16 and float32; the
issue-11 target (Swin-UNet stage 1, 56^2, fwd+bwd bf16) runs first.  Bytes the op must move at least
(``min_bytes``): forward ``4*C*tokens`` (read qkv, 3C per token; write the output, C) + the bias table;
forward+backward ``8*C*tokens`` (also read d out, write d qkv) + the table and its gradient.

Blocks (``fastmed.nn.SwinTransformerBlock`` loaded with the weights of MONAI's ``SwinTransformerBlock``, vs that
block; MONAI's shifted-window mask is computed once outside the timed region, which favours MONAI, whose
``BasicLayer`` builds it every call): training (forward + backward, gradients of the input and every parameter)
and inference (no_grad forward, batch 1).  Cases: SwinUNETR stage 1 in 3D ((2, 28^3, C48), 3 heads, window 7,
shift 3) and the Swin-Unet / timm 2D stage-1 block (56^2, C96, 3 heads, window 7, shift 3, and on the CPU also
shift 0, the W-MSA block every other one of a stage; MONAI's 2D block is
the peer: the same computation as Swin-Unet's timm-style block, and timm is not a dependency).  Bytes at least:
forward ``2*x + params``, forward+backward ``4*x + 2*params``.

    python bench/bench_window_attention.py                # GPU: core op at the model stages, then blocks
    python bench/bench_window_attention.py --device cpu   # CPU cases of issue 12 (blocks), and two core cases
    python bench/bench_window_attention.py --quick        # tiny shapes (the device script's CPU rehearsal)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_parser, compiled, fastmed_backend, nbytes, setup, with_compile  # noqa: E402

from fastmed.nn import SwinTransformerBlock  # noqa: E402
from fastmed.ops import window_attention  # noqa: E402
from fastmed.reference import window_attention as ref  # noqa: E402

GPU_CASES = [
    # name, B, grid, C, heads, window, shift
    ("swin-unet-56^2", 24, (56, 56), 96, 3, 7, 3),
    ("swin-unet-28^2", 24, (28, 28), 192, 6, 7, 3),
    ("swin-unet-14^2", 24, (14, 14), 384, 12, 7, 3),
    ("swin-unet-7^2", 24, (7, 7), 768, 24, 7, 3),
    ("swinunetr-48^3", 2, (48, 48, 48), 48, 3, 7, 3),
    ("swinunetr-24^3", 2, (24, 24, 24), 96, 6, 7, 3),
]
CPU_CASES = [
    ("swin-unet-56^2-b2", 2, (56, 56), 96, 3, 7, 3),
    ("swinunetr-28^3-b1", 1, (28, 28, 28), 48, 3, 7, 3),
]
QUICK_CASES = [
    ("quick-14^2", 2, (14, 14), 32, 2, 7, 3),
    ("quick-9^3-padded", 1, (9, 9, 9), 32, 2, 3, 1),
]
# blocks: name, grid, C, heads, window, shift, batch for training, batch for inference
GPU_BLOCKS = [
    ("swinunetr-block-48^3", (48, 48, 48), 48, 3, 7, 3, 2, 1),
    ("swin-unet-block-56^2", (56, 56), 96, 3, 7, 3, 24, 1),
]
CPU_BLOCKS = [
    ("swinunetr-block-28^3", (28, 28, 28), 48, 3, 7, 3, 2, 1),
    ("swin-unet-block-56^2", (56, 56), 96, 3, 7, 3, 2, 1),
    ("swin-unet-block-56^2-unshifted", (56, 56), 96, 3, 7, 0, 2, 1),  # every other block of a Swin stage
]
QUICK_BLOCKS = [
    ("quick-block-8^3", (8, 8, 8), 24, 2, 4, 2, 1, 1),
    ("quick-block-14^2", (14, 14), 24, 2, 7, 3, 2, 1),
]
CORE_FORMULAS = {"fwd": "4*C*tokens + table: read qkv (3C per token) and the bias table, write out (C per token)",
                 "fwd+bwd": "8*C*tokens + 2*table: read qkv, dout; write out, dqkv; read table, write dtable"}
BLOCK_FORMULAS = {"inference": "2*x + params: read x and the parameters, write y",
                  "training": "4*x + 2*params: read x, dy, parameters; write y, dx, parameter gradients"}


class Case:
    """Inputs and the precomputed buffers of the eager baselines for one stage."""

    def __init__(self, B, grid, C, heads, window, shift, dtype, device):
        nd = len(grid)
        self.nd, self.grid, self.C, self.heads = nd, grid, C, heads
        self.window0 = (window,) * nd
        self.win, self.shift = ref.effective_window(grid, self.window0, (shift,) * nd)
        g = torch.Generator().manual_seed(0)
        self.qkv = (torch.randn(B, *grid, 3 * C, generator=g) * 0.5).to(device, dtype).requires_grad_()
        n_table = 1
        for w in self.window0:
            n_table *= 2 * w - 1
        self.table = (torch.randn(n_table, heads, generator=g) * 0.02).to(device, dtype).requires_grad_()
        self.pad = (torch.randn(3 * C, generator=g) * 0.1).to(device, dtype)
        self.dout = torch.randn(B, *grid, C, generator=g).to(device, dtype)
        self.scale = (C // heads) ** -0.5
        self.padded = tuple(-(-s // w) * w for s, w in zip(grid, self.win))
        lead = (1,) * (3 - nd)
        self.lead = lead
        self.index = ref.relative_position_index(self.win).to(device)
        mask = ref.shift_mask(lead + self.padded, lead + self.win, (0,) * (3 - nd) + self.shift, device, torch.float32)
        self.mask = None if mask is None else mask.to(dtype)
        self.n = self.index.shape[0]

    # ---------------------------------------------------------------- shared pieces of the eager baselines
    def pad_grid(self, qkv):
        for a, w in enumerate(self.win):
            extra = -qkv.shape[a + 1] % w
            if extra:
                shape = list(qkv.shape)
                shape[a + 1] = extra
                qkv = torch.cat([qkv, self.pad.expand(shape)], dim=a + 1)
        return qkv

    def partition(self, qkv):
        x = self.pad_grid(qkv)
        if any(self.shift):
            x = torch.roll(x, tuple(-s for s in self.shift), tuple(range(1, self.nd + 1)))
        x = x.reshape((x.shape[0],) + self.lead + self.padded + (3 * self.C,))
        xw = ref.window_partition(x, self.lead + self.win)
        bw, n, _ = xw.shape
        return xw.reshape(bw, n, 3, self.heads, self.C // self.heads).permute(2, 0, 3, 1, 4)

    def reverse(self, out):  # (B*nW, h, N, d) -> cropped grid
        bw, h, n, d = out.shape
        x = ref.window_reverse(out.transpose(1, 2).reshape(bw, n, h * d), self.lead + self.win,
                               self.lead + self.padded)
        x = x.reshape((x.shape[0],) + self.padded + (self.C,))
        if any(self.shift):
            x = torch.roll(x, self.shift, tuple(range(1, self.nd + 1)))
        return x[(slice(None),) + tuple(slice(0, s) for s in self.grid)]

    def bias(self, table):  # (h, N, N)
        return table[self.index.reshape(-1)].view(self.n, self.n, -1).permute(2, 0, 1)

    # ---------------------------------------------------------------- implementations
    def fastmed(self, qkv, table):
        return window_attention(qkv, self.heads, self.window0, self.shift, table, self.scale, qkv_pad=self.pad)

    def eager(self, qkv, table):
        q, k, v = self.partition(qkv)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias(table).unsqueeze(0)
        if self.mask is not None:
            nw = self.mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, self.n, self.n) + self.mask[None, :, None]).view(attn.shape)
        return self.reverse(torch.softmax(attn, dim=-1) @ v)

    def sdpa(self, qkv, table):
        q, k, v = self.partition(qkv)
        bias = self.bias(table).unsqueeze(0)
        if self.mask is not None:
            nw = self.mask.shape[0]
            bias = (bias.unsqueeze(0) + self.mask[None, :, None]).expand(q.shape[0] // nw, -1, -1, -1, -1)
            bias = bias.reshape(q.shape[0], self.heads, self.n, self.n)
        else:
            bias = bias.expand(q.shape[0], -1, -1, -1)
        return self.reverse(F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale))

    def flex(self, flex_attention, qkv, table):
        q, k, v = self.partition(qkv)
        bias = self.bias(table)
        mask = self.mask
        nw = 1 if mask is None else mask.shape[0]

        def score_mod(score, b, h, qi, ki):
            s = score + bias[h, qi, ki]
            if mask is not None:
                s = s + mask[b % nw, qi, ki]
            return s

        out = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=score_mod, scale=self.scale)
        return self.reverse(out)


def core_cases(bench, cases, dtypes, args) -> None:
    device = bench.device
    flex_attention = None
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention as _flex

            flex_attention = compiled(_flex)
        except ImportError:
            print("FlexAttention is not available in this torch; skipping it")
    backend = fastmed_backend("window_attention", device)
    for name, B, grid, C, heads, window, shift in cases:
        for dtype in dtypes:
            case = Case(B, grid, C, heads, window, shift, dtype, device)
            fns = {"fastmed": case.fastmed, "eager": case.eager, "sdpa": case.sdpa}
            if with_compile(args, device):
                fns["compile"] = compiled(case.eager)
            if flex_attention is not None:
                fns["flex"] = lambda q, t, _f=flex_attention, _c=case: _c.flex(_f, q, t)
            tokens = B
            for s in grid:
                tokens *= s
            elem = case.qkv.element_size()
            shape = (B,) + grid + (C,)
            with torch.no_grad():
                want = case.fastmed(case.qkv, case.table).float()
            diffs = {}
            for impl, fn in fns.items():  # every baseline computes the same thing (checked before timing)
                try:
                    with torch.no_grad():
                        diffs[impl] = (fn(case.qkv, case.table).float() - want).abs().max().item()
                except Exception as exc:  # recorded as a failed row by compare
                    diffs[impl] = f"{type(exc).__name__}"
            print(f"  {name} {str(dtype).replace('torch.', '')}: max |impl - fastmed| = "
                  + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()))
            for mode in ("fwd+bwd", "fwd"):
                label = f"{name} {mode}"
                table = nbytes(case.table)
                min_bytes = tokens * 4 * C * elem + table if mode == "fwd" else tokens * 8 * C * elem + 2 * table
                impls = {}
                for impl, fn in fns.items():
                    if mode == "fwd":
                        def run(fn=fn, case=case):
                            with torch.no_grad():
                                return fn(case.qkv, case.table)
                    else:
                        def run(fn=fn, case=case):
                            out = fn(case.qkv, case.table)
                            return torch.autograd.grad(out, (case.qkv, case.table), case.dout)
                    impls[impl] = run
                bench.compare(label, impls, dtype=dtype, shape=shape, min_bytes=min_bytes,
                              formula=CORE_FORMULAS[mode],
                              extra=dict(kind="core", mode=mode, heads=heads, window=window, shift=shift,
                                         tokens_per_window=case.n),
                              impl_extra={k: {"max_abs_diff_vs_fastmed": v, **({"backend": backend}
                                                                              if k == "fastmed" else {})}
                                          for k, v in diffs.items()})
                bench.print_ratios(label)
            del case


def block_cases(bench, blocks, dtypes, args) -> None:
    """fastmed's SwinTransformerBlock with MONAI's weights vs MONAI's block, training and inference."""
    try:
        from monai.networks.nets import swin_unetr
    except ImportError:
        print("monai is not installed: block cases skipped")
        return
    device = bench.device
    backend = fastmed_backend("window_attention", device)
    for name, grid, C, heads, window, shift, b_train, b_infer in blocks:
        nd = len(grid)
        win, sh = (window,) * nd, (shift,) * nd
        for dtype in dtypes:
            torch.manual_seed(0)
            theirs = swin_unetr.SwinTransformerBlock(C, heads, win, sh, qkv_bias=True).to(device, dtype)
            ours = SwinTransformerBlock(C, heads, win, sh).to(device, dtype)
            ours.load_state_dict(theirs.state_dict())
            ws, ss = swin_unetr.get_window_size(grid, win, sh)
            padded = [-(-g // w) * w for g, w in zip(grid, ws)]
            mask = swin_unetr.compute_mask(padded, ws, ss, device)
            params = [p for p in ours.parameters()]
            params_theirs = [p for p in theirs.parameters()]
            fns = {"fastmed": (ours, lambda x, m=ours: m(x), params),
                   "monai": (theirs, lambda x, m=theirs, mk=mask: m(x, mk), params_theirs)}
            if with_compile(args, device):
                theirs_c = compiled(theirs)
                fns["monai-compile"] = (theirs, lambda x, m=theirs_c, mk=mask: m(x, mk), params_theirs)
            psize = nbytes(*params)
            for mode, batch in (("training", b_train), ("inference", b_infer)):
                g = torch.Generator().manual_seed(1)
                x = torch.randn((batch,) + grid + (C,), generator=g).to(device, dtype)
                dy = torch.randn(x.shape, generator=g).to(device, dtype)
                impls = {}
                for impl, (module, fn, ps) in fns.items():
                    module.train(mode == "training")
                    if mode == "inference":
                        def run(fn=fn, x=x):
                            with torch.no_grad():
                                return fn(x)
                    else:
                        xg = x.detach().requires_grad_()

                        def run(fn=fn, ps=ps, xg=xg, dy=dy):
                            return torch.autograd.grad(fn(xg), [xg] + ps, dy)
                    impls[impl] = run
                with torch.no_grad():
                    diff = (fns["fastmed"][1](x).float() - fns["monai"][1](x).float()).abs().max().item()
                label = f"{name} {mode} b{batch}"
                min_bytes = 2 * nbytes(x) + psize if mode == "inference" else 4 * nbytes(x) + 2 * psize
                bench.compare(label, impls, dtype=dtype, shape=(batch,) + grid + (C,), min_bytes=min_bytes,
                              formula=BLOCK_FORMULAS[mode],
                              extra=dict(kind="block", mode=mode, heads=heads, window=window, shift=shift,
                                         max_abs_diff_fastmed_vs_monai=diff),
                              impl_extra={"fastmed": {"backend": backend}})
                bench.print_ratios(label)
            del ours, theirs


def main(argv=None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--parts", default="core,blocks", help="core, blocks or both (default)")
    args = parser.parse_args(argv)
    bench = setup(args, "window_attention")
    on_gpu = bench.device.type == "cuda"
    dtypes = [getattr(torch, args.dtype)] if args.dtype else (
        [torch.bfloat16, torch.float32] if on_gpu and not args.quick else [torch.float32])
    parts = args.parts.split(",")
    if "core" in parts:
        core_cases(bench, QUICK_CASES if args.quick else (GPU_CASES if on_gpu else CPU_CASES), dtypes, args)
    if "blocks" in parts:
        block_cases(bench, QUICK_BLOCKS if args.quick else (GPU_BLOCKS if on_gpu else CPU_BLOCKS), dtypes, args)
    bench.save(args.out)


if __name__ == "__main__":
    main()
