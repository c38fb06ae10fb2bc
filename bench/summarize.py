"""Markdown table of benchmark results files (for the README).

    python bench/summarize.py bench/results/*.json

One row per (op, case, dtype): the median time of every implementation and the speed-up of fastmed over each of
them (baseline time / fastmed time; > 1 means fastmed is faster), with the device the file was measured on.
The fastmed implementation is the row named ``fastmed`` (or ``fastmed-auto``).
"""
from __future__ import annotations

import collections
import json
import sys


def table(paths: list[str]) -> str:
    lines = ["| op | device | case | dtype | times (ms, median) | fastmed speed-up |", "|---|---|---|---|---|---|"]
    for path in paths:
        data = json.load(open(path))
        runs = data["runs"] if "runs" in data else [{"op": data["op"], **data["env"]}]
        device = runs[0].get("device", "?")
        cases = collections.OrderedDict()
        for row in data["rows"]:
            if row.get("ms") is not None:
                cases.setdefault((row["op"], row["case"], row.get("dtype", "")), {})[row["impl"]] = row["ms"]
        for (op, case, dtype), impls in cases.items():
            ours = impls.get("fastmed", impls.get("fastmed-auto"))
            times = ", ".join(f"{k} {v:.3g}" for k, v in impls.items())
            ratios = ", ".join(f"{v / ours:.2f}x vs {k}" for k, v in impls.items()
                               if ours and not k.startswith("fastmed"))
            lines.append(f"| {op} | {device} | {case} | {dtype} | {times} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
