"""Command line: ``python -m fastmed info`` | ``python -m fastmed bench [norm_act ...]`` | ``python -m fastmed demo``
| ``python -m fastmed medsam --image X --box x0,y0,x1,y1``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _bench(names: list[str], quick: bool) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "bench")
    if not os.path.isdir(bench_dir):
        print("python -m fastmed bench runs the scripts in the repository's bench/ folder; "
              "run it from a source checkout", file=sys.stderr)
        return 2
    rc = 0
    for name in names:
        script = os.path.join(bench_dir, f"bench_{name}.py")
        if not os.path.exists(script):
            print(f"no benchmark named {name!r} (looked for {script})", file=sys.stderr)
            return 2
        cmd = [sys.executable, script] + (["--quick"] if quick else [])
        rc = subprocess.call(cmd) or rc
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmed", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled extension, and which backend each op uses here and why")
    b = sub.add_parser("bench", help="run benchmarks from the source checkout's bench/ folder")
    b.add_argument("names", nargs="*", default=["norm_act"], help="benchmark names (default: norm_act)")
    b.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    sub.add_parser("demo", add_help=False, help="train a small 3D U-Net on synthetic phantoms (see demo --help)")
    sub.add_parser("predict", add_help=False, help="segment a NIfTI volume with a checkpoint (see predict --help)")
    if argv is None:
        argv = sys.argv[1:]
    sub.add_parser("medsam", add_help=False, help="MedSAM box-prompt segmentation of an image (see medsam --help)")
    if argv and argv[0] == "demo":
        from fastmed.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "predict":
        from fastmed.inference import main as predict_main

        return predict_main(argv[1:])
    if argv and argv[0] == "medsam":
        from fastmed.medsam import main as medsam_main

        return medsam_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import fastmed

        try:
            text = fastmed.info()
        except ValueError as exc:  # e.g. FASTMED_BACKEND names no backend
            print(f"python -m fastmed info: error: {exc}", file=sys.stderr)
            return 2
        print(text)
        return 0
    return _bench(args.names, args.quick)


if __name__ == "__main__":
    sys.exit(main())
