"""Plots of benchmark results: one PNG per device.

    python bench/plot.py bench/results/device_check-*.json --out bench/results/plots

Left panel: the speed-up of fastmed over each baseline (baseline time / fastmed time) for every benchmark case, one
bar per (case, baseline), coloured by the baseline's kind (eager PyTorch, torch.compile, peer library), log scale,
the 1.0 line drawn (right of it: fastmed is faster).  Right panel: fastmed's peak memory as a fraction of each
baseline's (left of 1.0: fastmed uses less), where both were measured.  Needs matplotlib (an optional dependency:
``pip install matplotlib``); writes ``<out>/bench-<device>.png`` and prints the paths.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import comparisons, load_rows  # noqa: E402

COLORS = {"eager": "#4C72B0", "compile": "#DD8452", "peer": "#55A868"}
LABELS = {"eager": "eager PyTorch", "compile": "torch.compile", "peer": "peer library"}


def slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"


def _panel(ax, comps, key: str, title: str, xlabel: str) -> None:
    import matplotlib.ticker as mticker

    drawn = [(y, c[key], c["category"]) for y, c in enumerate(comps) if c[key]]
    ys, vals = [d[0] for d in drawn], [d[1] for d in drawn]
    ax.barh(ys, vals, color=[COLORS[d[2]] for d in drawn], height=0.8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1.2)
    ax.set_ylim(len(comps) - 0.5, -0.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.grid(axis="x", which="both", alpha=0.3)
    for y, v in zip(ys, vals):
        ax.annotate(f"{v:.2f}", (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                    ha="left" if v >= 1 else "right", va="center", fontsize=6)


def plot_device(device: str, comps: list[dict], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [f"{c['op']}: {c['case']} [{c['dtype']}] vs {c['baseline']}" for c in comps]
    height = max(3.0, 0.16 * len(comps) + 1.5)
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(16, height), sharey=True,
                                     gridspec_kw=dict(width_ratios=[3, 2]))
    _panel(ax_s, comps, "speedup", f"fastmed speed-up ({device})", "baseline time / fastmed time (log)")
    ax_s.set_yticks(range(len(comps)))
    ax_s.set_yticklabels(labels, fontsize=6)
    if any(c["mem_ratio"] for c in comps):
        _panel(ax_m, comps, "mem_ratio", "fastmed peak memory / baseline's", "ratio (log; < 1: fastmed uses less)")
    else:
        ax_m.text(0.5, 0.5, "peak memory not measured", ha="center", va="center", transform=ax_m.transAxes)
        ax_m.set_xticks([])
    cats = [k for k in COLORS if any(c["category"] == k for c in comps)]
    fig.legend(handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in cats], loc="upper right", ncol=len(cats))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    fig.subplots_adjust(left=max(fig.subplotpars.left, 0.3))  # the case labels are long
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench-{slug(device)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(paths: list[str], out_dir: str) -> list[str]:
    """One PNG per device found in ``paths``; returns the files written."""
    rows = [r for p in paths for r in load_rows(p)]
    by_device: dict = {}
    for c in comparisons(rows):
        by_device.setdefault(c["device"], []).append(c)
    return [plot_device(device, comps, out_dir) for device, comps in by_device.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results files (.json)")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    written = plot(args.paths, args.out)
    if not written:
        raise SystemExit("no case has both a fastmed row and a baseline row: nothing to plot")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
