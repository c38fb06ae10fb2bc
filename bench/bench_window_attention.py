"""Benchmark: Swin (shifted-)window attention core, from the qkv grid to the attention output (no projections).

Implementations, side by side in one run:
  fastmed      fastmed.ops.window_attention (Triton on CUDA; the reference on CPU)
  eager        roll + partition + gathered bias + mask tensor + softmax + reverse + roll, as timm / Swin-Unet /
               MONAI write it (bias index and mask precomputed, as their modules keep them in buffers)
  compile      torch.compile of the eager composition
  sdpa         roll + partition, bias + mask materialized per (window, head) as SDPA's attn_mask, reverse
  flex         FlexAttention on the partitioned windows with a score_mod adding bias and mask (CUDA only)
Cases: Swin-UNet stages (B=24, window 7, shift 3) and SwinUNETR-like 3D stages (B=2, window 7^3, shift 3,
grids 48^3 / 24^3 padded to 49^3 / 28^3 as MONAI does), forward and forward+backward, bfloat16 and float32.
GB/s counts one read of qkv and one write of the output (forward; the backward adds dout, out and dqkv).

    python bench/bench_window_attention.py            # full shapes on a GPU
    python bench/bench_window_attention.py --quick    # tiny shapes, CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, add_common_args  # noqa: E402

from fastmed.ops import window_attention  # noqa: E402
from fastmed.reference import window_attention as ref  # noqa: E402

FULL_CASES = [
    # name, B, grid, C, heads, window, shift
    ("swin-unet-56^2", 24, (56, 56), 96, 3, 7, 3),
    ("swin-unet-28^2", 24, (28, 28), 192, 6, 7, 3),
    ("swin-unet-14^2", 24, (14, 14), 384, 12, 7, 3),
    ("swin-unet-7^2", 24, (7, 7), 768, 24, 7, 3),
    ("swinunetr-48^3", 2, (48, 48, 48), 48, 3, 7, 3),
    ("swinunetr-24^3", 2, (24, 24, 24), 96, 6, 7, 3),
]
QUICK_CASES = [
    ("quick-14^2", 2, (14, 14), 32, 2, 7, 3),
    ("quick-9^3-padded", 1, (9, 9, 9), 32, 2, 3, 1),
]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    bench = Bench("window_attention", quick=args.quick, device=args.device)
    device = bench.device
    copy_gbs = bench.copy_bandwidth()
    print(f"device: {bench.env['device']}; copy bandwidth {copy_gbs:.0f} GB/s")
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    if args.dtype:
        dtypes = [getattr(torch, args.dtype)]
    flex_attention = None
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention as _flex

            flex_attention = torch.compile(_flex, dynamic=False)
        except ImportError:
            print("FlexAttention is not available in this torch; skipping it")
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.quick and device.type == "cpu" and not args.no_compile:
        print("--quick on CPU: torch.compile baseline skipped (inductor's C++ build exceeds the smoke-test budget)")

    for name, B, grid, C, heads, window, shift in cases:
        for dtype in dtypes:
            case = Case(B, grid, C, heads, window, shift, dtype, device)
            impls = {"fastmed": case.fastmed, "eager": case.eager, "sdpa": case.sdpa}
            if not args.no_compile and not (args.quick and device.type == "cpu"):
                impls["compile"] = torch.compile(case.eager)
            if flex_attention is not None:
                impls["flex"] = lambda q, t, _f=flex_attention: case.flex(_f, q, t)
            tokens = B
            for s in grid:
                tokens *= s
            elem = case.qkv.element_size()
            shape = (B,) + grid + (C,)
            with torch.no_grad():
                want = case.fastmed(case.qkv, case.table).float()
            diffs = {}
            for impl, fn in impls.items():  # every baseline computes the same thing (checked before timing)
                try:
                    with torch.no_grad():
                        diffs[impl] = (fn(case.qkv, case.table).float() - want).abs().max().item()
                except Exception as exc:  # recorded as a failed row below
                    diffs[impl] = f"{type(exc).__name__}"
            print(f"  {name} {str(dtype).replace('torch.', '')}: max |impl - fastmed| = "
                  + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()))
            for mode in ("fwd", "fwd+bwd"):
                label = f"{name} {mode}"
                bytes_moved = tokens * 4 * C * elem if mode == "fwd" else tokens * 12 * C * elem
                for impl, fn in impls.items():
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                return fn(case.qkv, case.table)
                    else:
                        def run(fn=fn):
                            out = fn(case.qkv, case.table)
                            torch.autograd.backward(out, case.dout, inputs=[case.qkv, case.table])
                    bench.run(name=impl, fn=run, case=label, dtype=dtype, shape=shape, bytes_moved=bytes_moved,
                              extra=dict(heads=heads, window=window, shift=shift, tokens_per_window=case.n,
                                         max_abs_diff_vs_fastmed=diffs[impl]))
                for base in ("eager", "compile", "sdpa", "flex"):
                    r = bench.ratios(label, base)
                    if r is not None:
                        print(f"    fastmed vs {base}: {r:.2f}x")
    bench.save(args.out)


if __name__ == "__main__":
    main()
