"""Shared benchmark harness for fastmed.

    from harness import Bench
    bench = Bench("norm_act", quick=args.quick, device=args.device)
    bench.copy_bandwidth()                                   # measured copy bandwidth of this run, GB/s
    bench.compare("instance fwd 2x32x128^3", {"fastmed": f, "eager": g, "torch.compile": h},
                  dtype=..., shape=..., min_bytes=..., formula="2*x: read x, write y")
    bench.save()                                             # bench/results/<op>-<device>-<stamp>.json + .csv

Timing.  The implementations of one case are timed *interleaved*: after a warm-up of each (compilation and
autotuning happen there, never in the timed region) the calls alternate A B C, B C A, C A B, ... (the order rotates
every round), so a change of the machine's load during a case hits every implementation alike.  CUDA events around
each call on the GPU (each call synchronized), ``time.perf_counter`` on the CPU.  Rows hold the median and the
20 % / 80 % quantiles over the repeats.  The repeats stop early when a case would exceed its time budget
(``FASTMED_BENCH_CASE_S``, seconds per case), never below ``MIN_REPS``.

Memory.  Peak extra memory of one call, measured in a separate untimed call: on CUDA
``torch.cuda.max_memory_allocated`` minus what was allocated before; on the CPU the peak of torch's CPU allocator
during the call, from the profiler's allocation events (torch tensors only; ``--quick`` skips it, the profiler's
first start costs seconds).

Bytes.  Every row records ``min_bytes``, the bytes the operation must move at least (each input read once, each
output written once, computed from the shapes by the benchmark, formula in ``min_bytes_formula``), the achieved
``GB/s`` (min_bytes / median time) and ``pct_copy_bw``, that rate as a percentage of the copy bandwidth measured in
the same run (``copy_GB/s``: read + write of a large buffer).

Each row carries the device (GPU name, or CPU model, cores and the threads torch used), dtype, shape,
torch / triton / CUDA / cuDNN versions, the git commit, and the 1-minute load average at the start and the end of
its case (``loadavg_start`` / ``loadavg_end``; the file's env has the run's, ``loadavg_run_start`` / ``_end``: CPU
timings on a shared machine are only as good as that).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from results_io import comparisons

try:
    import resource
except ImportError:  # not on Windows
    resource = None

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIN_REPS = 5


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError("not a git checkout")
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("FASTMED_COMMIT", "unknown")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    cores = os.cpu_count()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({cpu_model()}, {cores} cores)"
    env = {
        "device": name,
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "commit": git_commit(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    return env


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 20 % quantile, 80 % quantile) of ``times``."""
    times = sorted(times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def _sig(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant digits (small rates stay visible)."""
    return float(f"{v:.{digits}g}")


def rotation(names: list[str], rounds: int) -> list[list[str]]:
    """The call order of each timed round: A B C, B C A, C A B, ... (each implementation runs first equally often)."""
    k = len(names)
    return [names[r % k:] + names[:r % k] for r in range(rounds)] if k else []


def cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes of torch's CPU allocator held at once by the blocks ``fn()`` allocates, from the profiler's
    allocation events (None if this torch's profiler does not report them).  Frees of blocks that existed before
    (a gradient the step resets) do not lower it: the profiler reports them only for some blocks (those whose size
    it learnt in an earlier profiling session), which made the peak of one call depend on what ran before."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocs = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            allocs.append(node)
    allocs.sort(key=lambda n: n.start_time_ns)
    live, level, peak = set(), 0, 0
    for node in allocs:
        event = node.typed[1]
        if event.alloc_size > 0:
            live.add(event.ptr)
            level += event.alloc_size
        elif event.ptr in live:  # a block fn allocated, freed
            live.discard(event.ptr)
            level += event.alloc_size
        peak = max(peak, level)
    return peak


class Bench:
    """One benchmark run of one op family: timing, rows, and the results file."""

    def __init__(self, op: str, *, quick: bool = False, device: Optional[str] = None, reps: Optional[int] = None,
                 warmup: Optional[int] = None, memory: Optional[bool] = None):
        self.op = op
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quick = quick
        self.reps = reps or (10 if quick else 40)
        self.warmup = warmup or (2 if quick else 5)
        self.case_budget_s = float(os.environ.get("FASTMED_BENCH_CASE_S", "20"))
        # CPU peak memory needs the profiler (seconds to start): on for full CPU runs, off for --quick
        self.memory = (self.device.type == "cuda" or not quick) if memory is None else memory
        self.rows: list[dict] = []
        self.env = environment(self.device)
        self.env["loadavg_run_start"] = load_average()
        self._copy_gbs: Optional[float] = None
        self._path: Optional[str] = None

    # ------------------------------------------------------------------ timing
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_once(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one call of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def minor_faults(self) -> Optional[int]:
        """The process's minor page faults so far, on the CPU where the OS counts them (else None).  A CPU call that
        writes into memory freshly mapped by the allocator pays one fault per 4 KiB page touched first (glibc's
        malloc maps large blocks anew and returns freed ones, depending on the process's history); the rows record
        the faults per call so that times differing for this reason can be told apart."""
        if resource is None or self.device.type != "cpu":
            return None
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def peak_bytes(self, fn: Callable[[], object]) -> Optional[int]:
        """Peak extra memory of one call of ``fn`` (None when not measured)."""
        if not self.memory:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - base
        return cpu_peak_bytes(fn)

    def time_fn(self, fn: Callable[[], object]) -> list[float]:
        """Milliseconds per call of ``fn`` alone, after the warm-up (a reference rate such as the copy bandwidth)."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        return [self.time_once(fn) for _ in range(self.reps)]

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Copy bandwidth in GB/s (read + write counted), measured once per run on a large buffer."""
        if self._copy_gbs is None:
            if self.device.type != "cuda" or self.quick:
                nbytes = min(nbytes, 1 << 26)
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).fill_(1.0)
            dst = torch.empty_like(src)
            times = self.time_fn(lambda: dst.copy_(src))
            self._copy_gbs = 2 * nbytes / (quantiles(times)[0] * 1e-3) / 1e9
            del src, dst
        return self._copy_gbs

    # ------------------------------------------------------------------ rows
    def compare(self, case: str, impls: Mapping[str, Callable[[], object]], *, dtype, shape,
                min_bytes: Optional[int] = None, formula: Optional[str] = None, flops: Optional[float] = None,
                extra: Optional[dict] = None, impl_extra: Optional[Mapping[str, dict]] = None) -> dict[str, dict]:
        """Time the implementations of one case interleaved and record one row each.

        ``impls`` maps a name to a zero-argument callable running the whole measured operation (forward, or
        forward + backward).  ``min_bytes`` / ``formula``: the bytes the operation must move at least and how they
        were counted; ``flops``: its floating-point operations (for TFLOP/s); ``extra`` goes into every row,
        ``impl_extra[name]`` into that implementation's.  An implementation that raises gets a row with ``error``
        and leaves the rotation.  Returns the rows that have times, by name.
        """
        load_start = load_average()
        base = {"op": self.op, "case": case, "dtype": str(dtype).replace("torch.", ""),
                "shape": "x".join(map(str, shape)) if not isinstance(shape, str) else shape,
                "timer": "cuda-events" if self.device.type == "cuda" else "cpu-wall-clock",
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}
        if min_bytes is not None:
            base.update(min_bytes=int(min_bytes), min_bytes_formula=formula)
        errors: dict[str, str] = {}
        peaks: dict[str, Optional[int]] = {}
        live = dict(impls)

        def attempt(name, action):
            try:
                return action()
            except Exception as exc:  # a baseline that cannot run (e.g. torch.compile without a compiler)
                errors[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                live.pop(name, None)
                self.sync()
                return None

        t_warm = time.perf_counter()
        for _ in range(self.warmup):
            for name in list(live):
                attempt(name, live[name])
        self.sync()
        for name in list(live):
            peaks[name] = attempt(name, lambda fn=live[name]: self.peak_bytes(fn))
        # one untimed round tells how long a round takes: repeats fit the case's budget
        t0 = time.perf_counter()
        for name in list(live):
            attempt(name, live[name])
        self.sync()
        round_s = time.perf_counter() - t0
        reps = self.reps if round_s <= 0 else max(MIN_REPS, min(self.reps, int(self.case_budget_s / round_s)))
        times: dict[str, list[float]] = {name: [] for name in live}
        faults: dict[str, list[int]] = {name: [] for name in live}
        for order in rotation(list(live), reps):
            for name in order:
                if name in live:
                    f0 = self.minor_faults()
                    t = attempt(name, lambda fn=live[name]: self.time_once(fn))
                    if t is not None:
                        times[name].append(t)
                        if f0 is not None:
                            faults[name].append(self.minor_faults() - f0)
        load_end = load_average()
        out: dict[str, dict] = {}
        for name in impls:
            row = {**base, "impl": name, "loadavg_start": load_start, "loadavg_end": load_end}
            if name in errors:
                row["error"] = errors[name]
                print(f"  {case:<44} {name:<22} FAILED: {row['error']}")
            else:
                med, q20, q80 = quantiles(times[name])
                row.update(ms=_sig(med, 6), ms_q20=_sig(q20, 6), ms_q80=_sig(q80, 6), reps=len(times[name]),
                           timing=f"interleaved x{len(live)}" if len(live) > 1 else "alone")
                peak = peaks.get(name)
                row["peak_mem_mb"] = None if peak is None else round(peak / 2**20, 2)
                if min_bytes is not None:
                    gbs = min_bytes / (med * 1e-3) / 1e9
                    row["GB/s"] = _sig(gbs)
                    if self._copy_gbs:
                        row["pct_copy_bw"] = _sig(100 * gbs / self._copy_gbs)
                if flops is not None:
                    row["TFLOP/s"] = _sig(flops / (med * 1e-3) / 1e12)
                out[name] = row
                if faults[name]:
                    row["minor_faults_per_call"] = statistics.median(faults[name])
                mem = "" if row["peak_mem_mb"] is None else f"  peak {row['peak_mem_mb']:.1f} MiB"
                bw = f"  {row['pct_copy_bw']:.1f}% copy bw" if "pct_copy_bw" in row else ""
                flt = f"  {row['minor_faults_per_call']:g} faults/call" if row.get("minor_faults_per_call") else ""
                print(f"  {case:<44} {name:<22} {med:9.3f} ms [{q20:.3f}, {q80:.3f}]{bw}{mem}{flt}")
            row.update(extra or {})
            row.update((impl_extra or {}).get(name, {}))
            row["copy_GB/s"] = None if self._copy_gbs is None else round(self._copy_gbs, 2)
            row.update(self.env)
            self.rows.append(row)
        self._checkpoint()
        print(f"  {'':<44} ({time.perf_counter() - t_warm:.1f} s, load {load_start} -> {load_end})")
        return out

    def run(self, *, name: str, fn: Callable[[], object], case: str, dtype, shape, **kw) -> Optional[dict]:
        """One implementation alone (no peer to interleave with): ``compare`` with a single entry."""
        return self.compare(case, {name: fn}, dtype=dtype, shape=shape, **kw).get(name)

    def ratios(self, case: str, baseline: str, against: str = "fastmed") -> Optional[float]:
        """Speed-up of ``against`` over ``baseline`` for one case (baseline time / against time)."""
        t = {r["impl"]: r.get("ms") for r in self.rows if r["case"] == case}
        if t.get(baseline) and t.get(against):
            return t[baseline] / t[against]
        return None

    def print_ratios(self, case: str, against: str = "fastmed") -> None:
        """One line: the speed-up of ``against`` over every other implementation of ``case``."""
        names = [r["impl"] for r in self.rows if r["case"] == case and r.get("ms") and r["impl"] != against]
        parts = [f"{b} {self.ratios(case, b, against):.2f}x" for b in names if self.ratios(case, b, against)]
        if parts:
            print(f"  {'':<44} {against} speed-up: " + ", ".join(parts))

    def _default_path(self) -> str:
        if self._path is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            dev = "cuda" if self.device.type == "cuda" else "cpu"
            folder = os.environ.get("FASTMED_RESULTS_DIR", RESULTS_DIR)
            self._path = os.path.join(folder, f"{self.op}-{dev}-{stamp}.json")
        return self._path

    def _checkpoint(self) -> None:
        """Under FASTMED_RESULTS_DIR (the device script sets it) rows are written after every case, so a benchmark
        stopped by a time limit keeps what it measured."""
        if os.environ.get("FASTMED_RESULTS_DIR"):
            self._write(self._default_path())

    def _write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        env = {**self.env, "loadavg_run_end": load_average()}
        with open(path, "w") as fh:
            json.dump({"op": self.op, "env": env, "copy_GB/s": self._copy_gbs, "rows": self.rows,
                       "comparisons": comparisons(self.rows)}, fh, indent=1)
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


def fastmed_backend(op: str, device: torch.device) -> str:
    """The backend ``auto`` runs for ``op`` on ``device`` (recorded in the fastmed rows)."""
    from fastmed import _backend

    try:
        return _backend.choose(op, device)
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def compiled(fn, **kw):
    """``torch.compile(fn, dynamic=False)`` for a baseline.  The benchmarks call one function at many shapes, dtypes
    and layouts; past dynamo's recompile limit it would silently run eager, so the limit is raised and, where this
    torch has the switch, hitting it fails instead."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, **kw)


def nbytes(*tensors) -> int:
    """Total bytes of the given tensors (None entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few repeats (the device script's rehearsal on the CPU; a smoke test)")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when present); cpu runs the CPU comparison cases")
    parser.add_argument("--dtype", default=None, help="restrict to one dtype: float32, bfloat16, float16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="also time torch.compile baselines on the CPU (off by default: inductor's C++ builds)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per case, at most (default: 40; "
                        "--quick 10; fewer when a case would exceed FASTMED_BENCH_CASE_S seconds, never below 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per case first (default: 5; "
                        "--quick 2)")
    parser.add_argument("--out", default=None, help="results file path (.json; a .csv is written beside it)")


def bench_parser(doc: Optional[str], cases: Optional[str] = None, cases_help: Optional[str] = None):
    """A bench script's argument parser: its docstring ``doc``, the common arguments and, given ``cases_help``, a
    ``--cases`` option whose default is ``cases``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    if cases_help is not None:
        parser.add_argument("--cases", default=cases, help=cases_help)
    return parser


def with_compile(args, device: torch.device) -> bool:
    """Whether to time the torch.compile baselines: on the GPU unless --no-compile, on the CPU with --cpu-compile."""
    return not args.no_compile and (device.type == "cuda" or args.cpu_compile)


def setup(args, op: str, **kw) -> Bench:
    """A :class:`Bench` from the common arguments (sets the CPU thread count first)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    kw.update({k: v for k, v in (("reps", args.reps), ("warmup", args.warmup)) if v is not None})
    bench = Bench(op, quick=args.quick, device=args.device, **kw)
    copy = bench.copy_bandwidth()
    extra = "" if bench.device.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"{op} on {bench.env['device']}{extra}; copy bandwidth {copy:.1f} GB/s; commit {bench.env['commit']}; "
          f"load {bench.env['loadavg_run_start']}")
    return bench
