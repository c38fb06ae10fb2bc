"""Repeated-code check: runs of MIN_LINES or more consecutive code lines that stand in two places of the tree.

    python tests/repeated_code.py                     # every tracked Python file (git ls-files)
    python tests/repeated_code.py a.py b.py           # only pairs with a side in these files (pre-commit passes
                                                      # the staged ones), compared against the whole tree
    python tests/repeated_code.py --min-lines 8 ...

Lines are compared with their indentation stripped; blank lines, comment lines and import lines do not count (an
import block is not logic to share).  Each pair is printed as ``a.py:10-17 ~ b.py:40-47``; the exit status is 1
when any pair is found, so a repeated block can be given one home before it is committed.  Not a test module
(pytest collects ``test_*.py`` only).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            is_import = text.startswith("import ") or (text.startswith("from ") and " import " in text)
            if not text or text.startswith("#") or is_import:
                continue
            out.append((number, text))
    return out


def _tracked_python_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in listing.stdout.splitlines() if os.path.exists(os.path.join(ROOT, f))]


def find_pairs(files: list[str], min_lines: int) -> list[tuple[str, int, int, str, int, int]]:
    """Maximal runs of at least ``min_lines`` equal code lines standing in two places (in one file or two):
    ``(file_a, first_line, last_line, file_b, first_line, last_line)``, paths relative to the repository."""
    lines = {f: _code_lines(os.path.join(ROOT, f)) for f in files}
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for f, code in lines.items():
        for i in range(len(code) - min_lines + 1):
            windows[tuple(text for _, text in code[i:i + min_lines])].append((f, i))
    matches = set()  # (file_a, i, file_b, j): the windows starting at code line i of a and j of b are equal
    for places in windows.values():
        for k, (fa, i) in enumerate(places):
            for fb, j in places[k + 1:]:
                if fa != fb or abs(i - j) >= min_lines:  # overlapping windows of one file are not a repeat
                    matches.add((fa, i, fb, j))
    pairs = []
    for fa, i, fb, j in sorted(matches):
        if (fa, i - 1, fb, j - 1) in matches:
            continue  # inside a run that starts earlier
        length = min_lines
        while (fa, i + length - min_lines + 1, fb, j + length - min_lines + 1) in matches:
            length += 1
        a, b = lines[fa], lines[fb]
        pairs.append((fa, a[i][0], a[i + length - 1][0], fb, b[j][0], b[j + length - 1][0]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="report only pairs with a side in these files")
    parser.add_argument("--min-lines", type=int, default=6, help="shortest run that counts (default 6)")
    args = parser.parse_args(argv)
    if args.min_lines < 2:
        parser.error(f"--min-lines must be at least 2, got {args.min_lines}")
    tree = _tracked_python_files()
    only = {os.path.relpath(os.path.abspath(f), ROOT) for f in args.files if f.endswith(".py")}
    pairs = find_pairs(sorted(set(tree) | only), args.min_lines)
    if args.files:
        pairs = [p for p in pairs if p[0] in only or p[3] in only]
    for fa, a0, a1, fb, b0, b1 in pairs:
        print(f"{fa}:{a0}-{a1} ~ {fb}:{b0}-{b1}")
    print(f"{len(pairs)} repeated block(s) of {args.min_lines} or more code lines", file=sys.stderr)
    return 1 if pairs else 0


if __name__ == "__main__":
    sys.exit(main())
