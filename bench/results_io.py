"""Reading, merging and comparing benchmark results files (no torch needed).

Two file shapes exist: one benchmark's file ``{"op", "env", "copy_GB/s", "rows", "comparisons"}``
(``bench/bench_*.py``) and a merged file ``{"runs": [env of each benchmark], "rows": [...], "comparisons": [...]}``
(``bench/device_check.sh``).  Every row carries its device and versions; ``comparisons`` holds fastmed's speed-up
over, and peak-memory ratio to, each baseline of each case (:func:`comparisons`).

    python bench/results_io.py --merge OUT.json IN.json... | DIR     # merge files (a directory: its *.json)

Implementations are grouped by name: ``fastmed`` (or ``fastmed-auto``) is the one fastmed measures itself by;
other ``fastmed-*`` rows are forced variants (not baselines); a name holding ``compile`` is a torch.compile
baseline; ``eager`` is the plain PyTorch composition (for models: ``fused=False``); anything else is a peer
(MONAI, nnU-Net, SDPA, FlexAttention, scipy, edt, cupy).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Iterable
from typing import Optional

FASTMED = ("fastmed", "fastmed-auto")
CATEGORIES = ("eager", "compile", "peer")


def load_rows(path: str) -> list[dict]:
    """The rows of a results file (either shape), each with its device filled in."""
    with open(path) as fh:
        data = json.load(fh)
    runs = data.get("runs") or [{"op": data.get("op"), **data.get("env", {})}]
    device = {r.get("op"): r.get("device") for r in runs}
    rows = []
    for row in data["rows"]:
        row = dict(row)
        row.setdefault("device", device.get(row.get("op")) or runs[0].get("device", "?"))
        rows.append(row)
    return rows


def merge(paths: Iterable[str], out: str) -> dict:
    """Merge benchmark files into one ``{"runs", "rows"}`` file at ``out``; returns it."""
    runs, rows = [], []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        if "runs" in data:
            runs += data["runs"]
        else:
            runs.append({"op": data["op"], "copy_GB/s": data.get("copy_GB/s"), "file": os.path.basename(path),
                         **data.get("env", {})})
        rows += load_rows(path)
    merged = {"runs": runs, "rows": rows, "comparisons": comparisons(rows)}
    with open(out, "w") as fh:
        json.dump(merged, fh, indent=1)
    return merged


def category(impl: str) -> Optional[str]:
    """``fastmed``, ``variant`` (a forced fastmed implementation), ``compile``, ``eager`` or ``peer``."""
    if impl in FASTMED:
        return "fastmed"
    if impl.startswith("fastmed"):
        return "variant"
    if "compile" in impl:
        return "compile"
    return "eager" if impl == "eager" else "peer"


def cases(rows: Iterable[dict]) -> dict:
    """``{(device, op, case, dtype): {impl: row}}`` for the rows that have a time, in file order."""
    out: dict = {}
    for row in rows:
        if row.get("ms") is not None:
            key = (row.get("device", "?"), row["op"], row["case"], row.get("dtype", ""))
            out.setdefault(key, {})[row["impl"]] = row
    return out


def comparisons(rows: Iterable[dict]) -> list[dict]:
    """One entry per (case, baseline): ``speedup`` = baseline time / fastmed time (> 1: fastmed is faster) and
    ``mem_ratio`` = fastmed peak memory / baseline peak memory (< 1: fastmed uses less), None where unmeasured."""
    out = []
    for (device, op, case, dtype), impls in cases(rows).items():
        ours_name = next((n for n in FASTMED if n in impls), None)
        if ours_name is None:
            continue
        ours = impls[ours_name]
        for name, row in impls.items():
            cat = category(name)
            if cat not in CATEGORIES:
                continue
            mem = None
            if ours.get("peak_mem_mb") and row.get("peak_mem_mb"):
                mem = ours["peak_mem_mb"] / row["peak_mem_mb"]
            out.append(dict(device=device, op=op, case=case, dtype=dtype, fastmed=ours_name, baseline=name,
                            category=cat, speedup=row["ms"] / ours["ms"], mem_ratio=mem))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", metavar="OUT", required=True, help="write the merged file here")
    parser.add_argument("inputs", nargs="+", help="results files, or directories of them")
    args = parser.parse_args(argv)
    paths = []
    for p in args.inputs:
        paths += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    paths = [p for p in paths if os.path.abspath(p) != os.path.abspath(args.merge)]
    merged = merge(paths, args.merge)
    print(f"{len(merged['rows'])} rows from {len(paths)} files -> {args.merge}")


if __name__ == "__main__":
    main()
