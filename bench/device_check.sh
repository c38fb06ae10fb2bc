#!/usr/bin/env bash
# One prepared run on a lent GPU machine (torch + triton already installed, no network):
# install fastmed, report the environment, run the GPU tests, run the quick GPU benchmarks, and write
#   $OUT/device_check.log   everything printed
#   $OUT/device_check.json  all benchmark rows merged (device, versions, commit in every row)
# Budget: under 6 minutes (install <= 150 s, GPU tests <= 90 s, benchmarks <= 40 s each; a benchmark stopped at
# its limit keeps the rows it measured).  Commit the JSON under bench/results/ afterwards.
#
#   bash bench/device_check.sh                       # OUT defaults to bench/results/device
#   BENCHES="norm_act losses" bash bench/device_check.sh   # a subset (names of bench/bench_<name>.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1 FASTMED_RESULTS_DIR="$TMP" FASTMED_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
exec > >(tee "$OUT/device_check.log") 2>&1
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }

step "install (no deps, no build isolation; CUDA part of fastmed._C if nvcc is present)"
MAX_JOBS=16 timeout 150 pip install -q --no-deps --no-build-isolation . || {
  echo "extension build failed or timed out: installing without fastmed._C"
  FASTMED_BUILD_EXT=0 pip install -q --no-deps --no-build-isolation . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

step "fastmed info"
(cd /tmp && python -m fastmed info)

step "GPU tests"
(cd /tmp && timeout 90 python -m pytest "$OLDPWD/tests" -m gpu -q -p no:cacheprovider) || echo "GPU TESTS FAILED (rc=$?)"

step "benchmarks"
for name in ${BENCHES:-norm_act losses window_attention conv_block distance_transform models}; do
  step "bench_$name --quick"
  timeout 40 python "bench/bench_$name.py" --quick || echo "bench_$name stopped or failed (rc=$?)"
done

step "merge results"
python - "$TMP" "$OUT/device_check.json" <<'PY'
import glob, json, sys
rows, envs = [], []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    d = json.load(open(f))
    rows += d["rows"]
    envs.append({"op": d["op"], "copy_GB/s": d.get("copy_GB/s"), **d["env"]})
json.dump({"runs": envs, "rows": rows}, open(sys.argv[2], "w"), indent=1)
print(f"{len(rows)} rows from {len(envs)} benchmarks -> {sys.argv[2]}")
PY
step "done"
