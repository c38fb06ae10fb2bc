"""Shared benchmark harness for fastmed.

    from harness import Bench
    bench = Bench("norm_act", quick=args.quick)
    copy_gbs = bench.copy_bandwidth()                        # measured device-to-device copy, GB/s
    bench.run(name="fastmed", fn=lambda: f(x), shape=..., dtype=..., bytes_moved=..., flops=None, extra={})
    bench.save()                                             # bench/results/<op>-<device>-<stamp>.json + .csv

Timing: CUDA events around each call after warm-up, median and 20/80 quantiles over ``reps`` runs;
peak memory from ``torch.cuda.max_memory_allocated`` minus the memory held before the call.  On the
CPU (``--device cpu`` or no GPU) wall-clock ``time.perf_counter`` is used and rows say so.
Each row records device name, dtype, shape, torch / triton / CUDA / cuDNN versions and the git commit.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("FASTMED_COMMIT", "unknown")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "commit": git_commit(),
        "python": platform.python_version(),
    }
    return env


def quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]  # median, 20%, 80%


class Bench:
    def __init__(self, op: str, *, quick: bool = False, device: Optional[str] = None, reps: Optional[int] = None,
                 warmup: Optional[int] = None):
        self.op = op
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quick = quick
        self.reps = reps or (10 if quick else 50)
        self.warmup = warmup or (3 if quick else 10)
        self.rows: list[dict] = []
        self.env = environment(self.device)
        self._copy_gbs: Optional[float] = None
        self._path: Optional[str] = None

    # ------------------------------------------------------------------ timing
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_fn(self, fn: Callable[[], object]) -> tuple[list[float], Optional[int]]:
        """Milliseconds per call (list) and peak extra memory in bytes (CUDA only)."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        peak = None
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times, peak

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Device-to-device copy bandwidth in GB/s (read + write counted), measured once per run."""
        if self._copy_gbs is None:
            if self.device.type != "cuda" or self.quick:
                nbytes = min(nbytes, 1 << 26)
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).fill_(1.0)
            dst = torch.empty_like(src)
            times, _ = self.time_fn(lambda: dst.copy_(src))
            med = quantiles(times)[0]
            self._copy_gbs = 2 * nbytes / (med * 1e-3) / 1e9
            del src, dst
        return self._copy_gbs

    # ------------------------------------------------------------------ rows
    def run(self, *, name: str, fn: Callable[[], object], case: str, dtype, shape, bytes_moved: Optional[int] = None,
            flops: Optional[float] = None, extra: Optional[dict] = None) -> Optional[dict]:
        """Time ``fn`` and record a row.  Returns the row, or None if ``fn`` failed (the error is recorded)."""
        row = {"op": self.op, "case": case, "impl": name, "dtype": str(dtype).replace("torch.", ""),
               "shape": "x".join(map(str, shape)) if not isinstance(shape, str) else shape,
               "timer": "cuda-events" if self.device.type == "cuda" else "cpu-wall-clock"}
        try:
            times, peak = self.time_fn(fn)
        except Exception as exc:  # a baseline that cannot run (e.g. torch.compile without a compiler)
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            self.rows.append({**row, **self.env, **(extra or {})})
            self._checkpoint()
            print(f"  {case:<40} {name:<22} FAILED: {row['error']}")
            self.sync()
            return None
        med, q20, q80 = quantiles(times)
        row.update(ms=round(med, 5), ms_q20=round(q20, 5), ms_q80=round(q80, 5),
                   peak_mem_mb=None if peak is None else round(peak / 2**20, 2))
        if bytes_moved is not None:
            gbs = bytes_moved / (med * 1e-3) / 1e9
            row["GB/s"] = round(gbs, 2)
            if self._copy_gbs:
                row["pct_copy_bw"] = round(100 * gbs / self._copy_gbs, 1)
        if flops is not None:
            row["TFLOP/s"] = round(flops / (med * 1e-3) / 1e12, 3)
        row.update(extra or {})
        row.update(self.env)
        self.rows.append(row)
        self._checkpoint()
        mem = "" if peak is None else f"  peak {row['peak_mem_mb']:.1f} MB"
        bw = f"  {row['GB/s']:.0f} GB/s" if "GB/s" in row else ""
        print(f"  {case:<40} {name:<22} {med:9.3f} ms [{q20:.3f}, {q80:.3f}]{bw}{mem}")
        return row

    def ratios(self, case: str, baseline: str, against: str = "fastmed") -> Optional[float]:
        """Speed-up of ``against`` over ``baseline`` for one case (baseline time / against time)."""
        t = {r["impl"]: r.get("ms") for r in self.rows if r["case"] == case}
        if t.get(baseline) and t.get(against):
            return t[baseline] / t[against]
        return None

    def _default_path(self) -> str:
        if self._path is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            dev = "cuda" if self.device.type == "cuda" else "cpu"
            self._path = os.path.join(os.environ.get("FASTMED_RESULTS_DIR", RESULTS_DIR), f"{self.op}-{dev}-{stamp}.json")
        return self._path

    def _checkpoint(self) -> None:
        """Under FASTMED_RESULTS_DIR (the device script sets it) rows are written after every run, so a benchmark
        stopped by a time limit keeps what it measured."""
        if os.environ.get("FASTMED_RESULTS_DIR"):
            self._write(self._default_path())

    def _write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump({"op": self.op, "env": self.env, "copy_GB/s": self._copy_gbs, "rows": self.rows}, fh, indent=1)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(path[:-5] + ".csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def save(self, path: Optional[str] = None) -> str:
        """Write the rows (JSON + CSV beside it) and say where."""
        path = path or self._default_path()
        self._write(path)
        print(f"results: {path}")
        return path


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="restrict to one dtype: float32, bfloat16, float16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--out", default=None, help="results file path (.json; a .csv is written beside it)")
