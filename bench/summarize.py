"""Markdown table of benchmark results files (for the README).

    python bench/summarize.py bench/results/*.json                  # print the table
    python bench/summarize.py FILES... --readme README.md           # replace the table between the README's markers

One row per (device, op, case, dtype): the median time of every implementation with its 20 % and 80 % quantiles
(the implementations of a case were timed interleaved in one run), the speed-up of fastmed over each
baseline (baseline time / fastmed time; > 1 means fastmed is faster), fastmed's peak memory as a fraction of each
baseline's (< 1 means fastmed uses less), and the share of the copy bandwidth fastmed reached on the bytes the
operation must move at least.  Which row is "fastmed" and which are baselines: see ``results_io``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import cases, category, comparisons, load_rows  # noqa: E402

BEGIN = "<!-- bench-table:begin (bench/summarize.py --readme) -->"
END = "<!-- bench-table:end -->"


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def table(paths: list[str]) -> str:
    rows = [r for p in paths for r in load_rows(p)]
    by_case: dict = {}
    for c in comparisons(rows):
        by_case.setdefault((c["device"], c["op"], c["case"], c["dtype"]), []).append(c)
    lines = ["| op | device | case | dtype | times (ms: median [20 %, 80 % quantiles]) | fastmed speed-up | "
             "fastmed peak memory | "
             "fastmed % copy bw |", "|---|---|---|---|---|---|---|---|"]
    for key, impls in cases(rows).items():
        device, op, case, dtype = key
        times = ", ".join(f"{k} {_fmt(r['ms'])}" + (f" [{_fmt(r['ms_q20'])}, {_fmt(r['ms_q80'])}]"
                                                     if r.get("ms_q20") is not None else "")
                          for k, r in impls.items())
        comps = by_case.get(key, [])
        speed = ", ".join(f"{c['speedup']:.2f}x vs {c['baseline']}" for c in comps) or "n/a"
        mem = ", ".join(f"{c['mem_ratio']:.2f}x of {c['baseline']}" for c in comps if c["mem_ratio"]) or "n/a"
        ours = next((r for k, r in impls.items() if category(k) == "fastmed"), None)
        bw = f"{ours['pct_copy_bw']:.3g}%" if ours and ours.get("pct_copy_bw") is not None else "n/a"
        lines.append(f"| {op} | {device} | {case} | {dtype} | {times} | {speed} | {mem} | {bw} |")
    return "\n".join(lines)


# Issue 11's GPU targets: (name, op, case, dtype, metric, baseline, bound).  metric: "speedup" (baseline time /
# fastmed time >= bound), "mem" (fastmed peak memory / baseline's <= bound) or "pct_copy_bw" (fastmed's >= bound).
TARGETS = [
    ("norm_act fwd+bwd bf16 2x32x128^3", "norm_act", "instance fwd+bwd cf 2x32x128x128x128", "bfloat16",
     [("speedup", "eager", 1.5), ("speedup", "torch.compile", 1.2), ("pct_copy_bw", None, 80.0)]),
    ("DiceCE fwd+bwd (2, 14, 128^3) bf16", "losses", "DiceCELoss 2x14x128x128x128 bfloat16", "bfloat16",
     [("speedup", "monai", 6.0), ("speedup", "monai-compile", 2.0), ("mem", "monai", 0.3)]),
    ("Swin-UNet stage-1 window attention fwd+bwd bf16", "window_attention", "swin-unet-56^2 fwd+bwd", "bfloat16",
     [("speedup", "eager", 4.0), ("speedup", "sdpa", 2.0), ("speedup", "flex", 2.0), ("mem", "eager", 0.5)]),
]


def targets(paths: list[str]) -> str:
    """Issue 11's GPU targets against the GPU rows of ``paths`` (CUDA-event timings): one line per bound, with the
    measured value and whether it is met, or 'unmeasured'."""
    rows = [r for p in paths for r in load_rows(p) if r.get("timer") == "cuda-events" and r.get("ms") is not None]
    lines = ["| target | bound | measured | met |", "|---|---|---|---|"]
    for name, op, case, dtype, bounds in TARGETS:
        impls = {r["impl"]: r for r in rows if r["op"] == op and r["case"] == case and r.get("dtype") == dtype}
        ours = impls.get("fastmed") or impls.get("fastmed-auto")
        for metric, baseline, bound in bounds:
            theirs = impls.get(baseline)
            value = None
            if metric == "speedup" and ours and theirs:
                value = theirs["ms"] / ours["ms"]
            elif metric == "mem" and ours and theirs and ours.get("peak_mem_mb") and theirs.get("peak_mem_mb"):
                value = ours["peak_mem_mb"] / theirs["peak_mem_mb"]
            elif metric == "pct_copy_bw" and ours:
                value = ours.get("pct_copy_bw")
            if metric == "speedup":
                text, ok = f">= {bound}x {baseline}", value is not None and value >= bound
            elif metric == "mem":
                text, ok = f"peak memory <= {bound}x {baseline}'s", value is not None and value <= bound
            else:
                text, ok = f">= {bound:g}% of the copy bandwidth", value is not None and value >= bound
            shown = "unmeasured" if value is None else (f"{value:.3g}%" if metric == "pct_copy_bw" else
                                                        f"{value:.3g}x")
            met = "n/a" if value is None else ("yes" if ok else "NO")
            lines.append(f"| {name} | {text} | {shown} | {met} |")
    return "\n".join(lines)


def replace_in_readme(readme: str, text: str) -> None:
    """Put ``text`` between the README's table markers (both must be there, once each)."""
    with open(readme) as fh:
        content = fh.read()
    if content.count(BEGIN) != 1 or content.count(END) != 1:
        raise SystemExit(f"{readme}: expected one '{BEGIN}' and one '{END}' line")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    content = pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", content)
    with open(readme, "w") as fh:
        fh.write(content)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results files (.json)")
    parser.add_argument("--readme", default=None, help="rewrite the table in this README instead of printing it")
    parser.add_argument("--targets", action="store_true", help="also print issue 11's GPU targets, met or not")
    args = parser.parse_args(argv)
    text = table(args.paths)
    if args.targets and not args.readme:
        text += "\n\nGPU targets (issue 11):\n\n" + targets(args.paths)
    if args.readme:
        replace_in_readme(args.readme, text)
        print(f"{args.readme}: table of {len(text.splitlines()) - 2} rows from {len(args.paths)} files")
    else:
        print(text)


if __name__ == "__main__":
    main()
