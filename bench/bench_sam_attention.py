"""Benchmark: SAM / MedSAM ViT-B image encoder, and its attention op alone (issue 15).

Encoder (images -> embeddings), interleaved in one run, every model with the same weights:
  fastmed                   ``fastmed.models.SAM(...).image_encoder`` (fused: ``fastmed.ops.sam_attention`` through
                            ``auto``: Triton on CUDA, the reference on the CPU), segment_anything's weights loaded
  segment_anything          segment_anything's own ``ImageEncoderViT`` (eager)
  segment_anything-compile  ``torch.compile`` of it, block by block (regional; GPU, CPU with --cpu-compile), in a
                            second pass of cases ``... vs compile`` after the others (compilation is slow)
  sdpa                      segment_anything's encoder with each attention as ``F.scaled_dot_product_attention``
                            and the decomposed rel-pos bias materialized ``(B*nW, heads, L, L)`` as its attn_mask
                            (segment-anything-fast's first step)
GPU cases: inference (no_grad, bfloat16 weights and images) at 1024^2, batch 1 and 8; training step (forward +
backward to every parameter, autocast bfloat16 over float32 weights, as MedSAM trains with AMP) batch 2.  CPU
cases (float32): inference batch 1 at 1024^2 (ViT-B as it runs), training batch 1 at 512^2 (a 32x32 token grid:
14x14 windows padded to 42x42, global attention on 1024 tokens; tables sized for it).  Rows carry ``images/s``,
``TFLOP/s`` from an analytic count (``flops_formula``), peak memory, and ``min_bytes`` (images, parameters and
embeddings read / written once; training: parameter gradients and the embeddings' gradient too).

Op alone (qkv grid -> attention output, no projections), ViT-B's two kinds of blocks on a 64x64 grid, C=768,
12 heads: 14x14 windows (padded to 70x70) and global attention; forward and forward + backward (gradients of qkv
and both tables):
  fastmed                   ``fastmed.ops.sam_attention`` (``auto``: the reference on the CPU)
  fastmed-unfused           the reference composition differentiated by autograd (``fused=False`` models)
  segment_anything          window_partition + segment_anything's Attention math (add_decomposed_rel_pos) +
                            window_unpartition, the padding tokens' qkv = the qkv bias as SAM computes it
  sdpa                      the same with SDPA and the materialized bias
The CPU target of issue 15: fastmed's CPU path is never slower than segment_anything's own code.

    python bench/bench_sam_attention.py                 # GPU: encoder inference b1, b8, training b2; then the op
    python bench/bench_sam_attention.py --device cpu    # CPU cases (float32)
    python bench/bench_sam_attention.py --quick         # tiny shapes (the device script's CPU rehearsal)
"""
from __future__ import annotations

import copy
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_parser, compiled, fastmed_backend, nbytes, setup, with_compile  # noqa: E402

from fastmed.models import SAM  # noqa: E402
from fastmed.models.sam import segment_anything_modeling  # noqa: E402
from fastmed.ops import sam_attention  # noqa: E402
from fastmed.reference import sam_attention as ref  # noqa: E402

VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11))
TINY = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,))
# encoder cases: name, config, image size, batch, mode
GPU_ENCODER = [("vit_b-1024^2", VIT_B, 1024, 1, "inference"), ("vit_b-1024^2", VIT_B, 1024, 8, "inference"),
               ("vit_b-1024^2", VIT_B, 1024, 2, "training")]
CPU_ENCODER = [("vit_b-1024^2", VIT_B, 1024, 1, "inference"), ("vit_b-512^2", VIT_B, 512, 1, "training")]
QUICK_ENCODER = [("tiny-64^2", TINY, 64, 2, "inference"), ("tiny-64^2", TINY, 64, 2, "training")]
# op cases: name, B, grid, C, heads, window (0: global)
OP_CASES = [("window-14x14-of-64^2", 1, 64, 768, 12, 14), ("global-64^2", 1, 64, 768, 12, 0)]
GPU_OP_CASES = [("window-14x14-of-64^2-b8", 8, 64, 768, 12, 14), ("global-64^2-b8", 8, 64, 768, 12, 0)]
QUICK_OP_CASES = [("quick-window-3-of-8^2", 2, 8, 32, 2, 3), ("quick-global-8^2", 2, 8, 32, 2, 0)]
ENCODER_FORMULAS = {"inference": "images + params + embeddings",
                    "training": "images + 2*params + 2*embeddings: read images, parameters, d embeddings; write "
                                "embeddings, parameter gradients"}
OP_FORMULAS = {"fwd": "4*C*tokens + tables: read qkv (3C per token) and the tables, write out (C per token)",
               "fwd+bwd": "8*C*tokens + 2*tables: read qkv, dout; write out, dqkv; read tables, write their grads"}


ENCODER_FLOPS = ("forward: patch embedding 2*N*C*3*P^2; per block 24*N*C^2 (qkv, proj, MLP 4C) + 4*Np*L*C (scores "
                 "and values; Np tokens of the padded grid, L a window's tokens) + 4*Np*C*(WH + WW) (bias); neck "
                 "2*N*C*256 + 2*N*256^2*9; training 3x forward")


def encoder_flops(cfg: dict, img: int, batch: int) -> float:
    """Forward FLOPs of the encoder (``ENCODER_FLOPS``)."""
    g = img // cfg["patch_size"]
    C, N = cfg["embed_dim"], batch * g * g
    total = 2 * N * C * 3 * cfg["patch_size"] ** 2 + 2 * N * C * 256 + 2 * N * 256 * 256 * 9
    for i in range(cfg["depth"]):
        w = g if i in cfg["global_attn_indexes"] else cfg["window_size"]
        gp = -(-g // w) * w
        Np = batch * gp * gp
        total += 24 * N * C * C + 4 * Np * w * w * C + 4 * Np * C * 2 * w
    return float(total)


def sam_modules():
    """segment_anything.modeling, or None (with a message) where it is not installed."""
    try:
        return segment_anything_modeling()
    except ImportError as exc:
        print(f"{exc}: segment_anything, its compile and SDPA rows are left out")
        return None


def segment_anything_encoder(m, cfg: dict, img: int):
    return m.ImageEncoderViT(img_size=img, patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                             depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=4, out_chans=256,
                             qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
                             window_size=cfg["window_size"], global_attn_indexes=cfg["global_attn_indexes"])


def sdpa_attention_forward(self, x):
    """segment_anything's ``Attention.forward`` with SDPA and the decomposed bias materialized as attn_mask."""
    m = sys.modules[type(self).__module__]
    B, H, W, _ = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, L, d)
    r_q = q.reshape(B * heads, H, W, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, m.get_rel_pos(H, H, self.rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, m.get_rel_pos(W, W, self.rel_pos_w).to(q.dtype))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    return self.proj(out.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1))


def with_sdpa(encoder):
    enc = copy.deepcopy(encoder)
    for blk in enc.blocks:
        blk.attn.forward = types.MethodType(sdpa_attention_forward, blk.attn)
    return enc


def regional_compile(encoder):
    enc = copy.deepcopy(encoder)
    for i, blk in enumerate(enc.blocks):
        enc.blocks[i] = compiled(blk)
    return enc


def encoder_cases(bench, cases, args, compile_pass: bool = False) -> None:
    """The encoder cases; ``compile_pass``: fastmed against the regional torch.compile of segment_anything only (a
    second pass after all the others, labelled ``... vs compile``, so that compilation, slow for ViT-B, cannot keep
    the other rows from being written within the device script's time limit)."""
    device = bench.device
    on_gpu = device.type == "cuda"
    m = sam_modules()
    backend = fastmed_backend("sam_attention", device)
    for name, cfg, img, batch, mode in cases:
        torch.manual_seed(0)
        ours = SAM(img_size=img, **cfg).image_encoder
        models = {"fastmed": ours}
        if m is not None:
            theirs = segment_anything_encoder(m, cfg, img)
            with torch.no_grad():  # random weights, rel-pos tables non-zero (they are zeros at initialization)
                for blk in theirs.blocks:
                    blk.attn.rel_pos_h.normal_(0, 0.02)
                    blk.attn.rel_pos_w.normal_(0, 0.02)
            ours.load_state_dict(theirs.state_dict(), strict=True)
            if compile_pass:
                models["segment_anything-compile"] = regional_compile(theirs)
            else:
                models.update({"segment_anything": theirs, "sdpa": with_sdpa(theirs)})
        elif compile_pass:
            return
        inference = mode == "inference"
        dtype = torch.bfloat16 if on_gpu and inference else torch.float32
        autocast = on_gpu and not inference
        for model in models.values():
            model.to(device, dtype).train(not inference)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(batch, 3, img, img, generator=g).to(device, dtype)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            want = ours(x).float()
        dy = torch.randn(want.shape, generator=g).to(device, dtype)
        impls, diffs = {}, {}
        for impl, model in models.items():
            params = list(model.parameters())
            if inference:
                def run(model=model, x=x):
                    with torch.no_grad():
                        return model(x)
            else:
                def run(model=model, params=params, x=x, dy=dy, autocast=autocast):
                    with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                        y = model(x)
                    return torch.autograd.grad(y, params, dy)
            try:
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    diffs[impl] = (model(x).float() - want).abs().max().item()
            except Exception as exc:  # recorded as a failed row by compare
                diffs[impl] = type(exc).__name__
            impls[impl] = run
        params_bytes = nbytes(*ours.parameters())
        emb = want.numel() * (2 if dtype == torch.bfloat16 else 4)
        min_bytes = (nbytes(x) + params_bytes + emb) if inference else (nbytes(x) + 2 * params_bytes + 2 * emb)
        flops = encoder_flops(cfg, img, batch) * (1 if inference else 3)
        precision = "bf16 weights" if dtype == torch.bfloat16 else ("autocast bf16" if autocast else "fp32")
        label = f"encoder {name} {mode} b{batch}" + (" vs compile" if compile_pass else "")
        print(f"  {label}: max |impl - fastmed| = "
              + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()))
        rows = bench.compare(label, impls, dtype=torch.bfloat16 if autocast else dtype,
                             shape=(batch, 3, img, img), min_bytes=min_bytes, formula=ENCODER_FORMULAS[mode],
                             flops=flops, extra=dict(kind="encoder", mode=mode, precision=precision,
                                                     flops_formula=ENCODER_FLOPS),
                             impl_extra={k: {"max_abs_diff_vs_fastmed": v, **({"backend": backend}
                                                                             if k == "fastmed" else {})}
                                         for k, v in diffs.items()})
        for row in rows.values():
            row["images/s"] = round(batch / (row["ms"] * 1e-3), 3)
        bench.print_ratios(label)
        del models, ours, impls


class OpCase:
    """The qkv grid, tables and padding token of one attention block, and the implementations."""

    def __init__(self, B, grid, C, heads, window, dtype, device, m):
        self.B, self.grid, self.C, self.heads, self.window, self.m = B, grid, C, heads, window, m
        hd = C // heads
        side = grid if window == 0 else window
        g = torch.Generator().manual_seed(0)
        self.qkv = (torch.randn(B, grid, grid, 3 * C, generator=g) * 0.5).to(device, dtype).requires_grad_()
        self.th = (torch.randn(2 * side - 1, hd, generator=g) * 0.05).to(device, dtype).requires_grad_()
        self.tw = (torch.randn(2 * side - 1, hd, generator=g) * 0.05).to(device, dtype).requires_grad_()
        self.pad = (torch.randn(3 * C, generator=g) * 0.1).to(device, dtype)
        self.dout = torch.randn(B, grid, grid, C, generator=g).to(device, dtype)
        self.scale = hd ** -0.5
        self.spec = ref.SamAttentionSpec(heads, (side, side), self.scale)

    def fastmed(self):
        return sam_attention(self.qkv, self.heads, self.th, self.tw, self.window, self.scale, qkv_pad=self.pad)

    def unfused(self):
        return ref.sam_attention_forward(self.qkv, self.th, self.tw, self.pad, self.spec)[0]

    def _segment_anything(self, attend):
        """window_partition of the grid (padding tokens' qkv = the bias: SAM pads the normalized tokens with zeros
        before the qkv Linear), ``attend(q, k, v, size)`` per window, window_unpartition."""
        x, B, n = self.qkv, self.B, self.grid
        w = self.window
        if w:
            extra = -n % w
            if extra:
                x = torch.cat([x, self.pad.expand(B, n, extra, 3 * self.C)], dim=2)
                x = torch.cat([x, self.pad.expand(B, extra, n + extra, 3 * self.C)], dim=1)
            x, pad_hw = self.m.image_encoder.window_partition(x, w)
        b, h, wd, _ = x.shape
        qkv = x.reshape(b, h * wd, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * wd, -1).unbind(0)
        o = attend(q, k, v, (h, wd)).view(b, self.heads, h, wd, -1).permute(0, 2, 3, 1, 4).reshape(b, h, wd, -1)
        return self.m.image_encoder.window_unpartition(o, w, pad_hw, (n, n)) if w else o

    def segment_anything(self):
        def attend(q, k, v, size):
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.m.image_encoder.add_decomposed_rel_pos(attn, q, self.th, self.tw, size, size)
            return attn.softmax(dim=-1) @ v
        return self._segment_anything(attend)

    def sdpa(self):
        enc = self.m.image_encoder

        def attend(q, k, v, size):
            h, w = size
            r_q = q.reshape(q.shape[0], h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, enc.get_rel_pos(h, h, self.th))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, enc.get_rel_pos(w, w, self.tw))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], h * w, h * w)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self._segment_anything(attend)


def op_cases(bench, cases, dtypes, args) -> None:
    device = bench.device
    m = sam_modules()
    backend = fastmed_backend("sam_attention", device)
    for name, B, grid, C, heads, window in cases:
        for dtype in dtypes:
            case = OpCase(B, grid, C, heads, window, dtype, device, m)
            fns = {"fastmed": case.fastmed, "fastmed-unfused": case.unfused}
            if m is not None:
                fns.update({"segment_anything": case.segment_anything, "sdpa": case.sdpa})
                if with_compile(args, device):
                    fns["segment_anything-compile"] = compiled(case.segment_anything)
            with torch.no_grad():
                want = case.fastmed().float()
                diffs = {}
                for impl, fn in fns.items():
                    try:
                        diffs[impl] = (fn().float() - want).abs().max().item()
                    except Exception as exc:  # recorded as a failed row by compare
                        diffs[impl] = type(exc).__name__
            tokens = B * grid * grid
            elem = case.qkv.element_size()
            side = grid if window == 0 else window
            gp = -(-grid // side) * side
            fwd_flops = 4 * B * gp * gp * side * side * C
            tables = nbytes(case.th, case.tw)
            print(f"  {name} {str(dtype).replace('torch.', '')}: max |impl - fastmed| = "
                  + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()))
            for mode in ("fwd", "fwd+bwd"):
                impls = {}
                for impl, fn in fns.items():
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                return fn()
                    else:
                        def run(fn=fn, case=case):
                            return torch.autograd.grad(fn(), (case.qkv, case.th, case.tw), case.dout)
                    impls[impl] = run
                label = f"op {name} {mode}"
                min_bytes = (tokens * 4 * C * elem + tables) if mode == "fwd" else (tokens * 8 * C * elem + 2 * tables)
                bench.compare(label, impls, dtype=dtype, shape=(B, grid, grid, C), min_bytes=min_bytes,
                              formula=OP_FORMULAS[mode], flops=fwd_flops * (1 if mode == "fwd" else 3),
                              extra=dict(kind="op", mode=mode, heads=heads, window=window,
                                         tokens_per_window=side * side),
                              impl_extra={k: {"max_abs_diff_vs_fastmed": v, **({"backend": backend}
                                                                              if k == "fastmed" else {})}
                                          for k, v in diffs.items()})
                bench.print_ratios(label)
            del case


def main(argv=None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--parts", default="encoder,op", help="encoder, op or both (default)")
    parser.add_argument("--op-kinds", default="window,global", help="op cases: window, global or both (default)")
    args = parser.parse_args(argv)
    bench = setup(args, "sam_attention")
    on_gpu = bench.device.type == "cuda"
    if not on_gpu and not args.quick and args.warmup is None:
        bench.warmup = 1  # a ViT-B forward takes seconds on a CPU: one untimed call warms it
    parts = args.parts.split(",")
    encoder = QUICK_ENCODER if args.quick else (GPU_ENCODER if on_gpu else CPU_ENCODER)
    if "encoder" in parts:
        encoder_cases(bench, encoder, args)
        if with_compile(args, bench.device):
            encoder_cases(bench, encoder, args, compile_pass=True)
    if "op" in parts:
        dtypes = [getattr(torch, args.dtype)] if args.dtype else (
            [torch.bfloat16] if on_gpu and not args.quick else [torch.float32])
        kinds = args.op_kinds.split(",")
        cases = QUICK_OP_CASES if args.quick else (GPU_OP_CASES if on_gpu else OP_CASES)
        op_cases(bench, [c for c in cases if ("global" if c[5] == 0 else "window") in kinds], dtypes, args)
    bench.save(args.out)


if __name__ == "__main__":
    main()
