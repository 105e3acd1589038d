#!/usr/bin/env bash
# Runs every benchmark engine on the same workloads, one at a time, prints a table and writes
# bench/results.json. Not part of CI. Usage: bench/run.sh [STEPS]   (default 300 timed steps)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-300}"
VENV=bench/.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
KERAS_BACKEND=jax "$VENV/bin/python" -c "import torch, keras, jax" 2>/dev/null || \
  "$VENV/bin/pip" install -q torch "keras==3.15.1" "jax[cpu]==0.10.2" numpy

cargo build --release -p kiln-bench
OUT=$(mktemp -d)
export BENCH_THREADS=2
# The machine's sgemm rate: the best of a few 2048^3 float32 products in torch.
"$VENV/bin/python" - > "$OUT/sgemm.json" <<'PY'
import json, time, torch
torch.set_num_threads(2)
a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
best = 0.0
for _ in range(5):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
print(json.dumps({"sgemm_gflops": best}))
PY

run_all() { # $1 = workloads
  ./target/release/kiln-bench --workloads "$1" --steps "$STEPS"
  "$VENV/bin/python" bench/pytorch_ref.py --workloads "$1" --steps "$STEPS"
  KERAS_BACKEND=jax "$VENV/bin/python" bench/keras_ref.py --workloads "$1" --steps "$STEPS" 2>/dev/null
}
run_all W1,W2,W3 > "$OUT/results.jsonl"
# Convolutional and recurrent training (steps/s) and predict at batch 1024 (samples/s).
run_all C1,C2,R1,R2,P1-C1,P1-W1 >> "$OUT/results.jsonl"
# W4: the same W1 while another process keeps one core busy.
( while :; do :; done ) & BUSY=$!
trap 'kill $BUSY 2>/dev/null || true' EXIT
run_all W4 >> "$OUT/results.jsonl"
kill $BUSY 2>/dev/null || true

"$VENV/bin/python" - "$OUT" <<'PY'
import json, os, platform, sys
out = sys.argv[1]
sgemm = json.load(open(os.path.join(out, "sgemm.json")))["sgemm_gflops"]
rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.startswith("{")]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
machine = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
json.dump({"machine": machine, "sgemm_gflops": sgemm,
           "results": [{k: r[k] for k in ("engine", "workload", "steps_per_s", "peak_rss_mb", "params") if k in r}
                       for r in rows]},
          open("bench/results.json", "w"), indent=1)
by = {(r["engine"], r["workload"]): r for r in rows}
print(f"machine: {cpu}, {os.cpu_count()} cores; sgemm {sgemm:.1f} GFLOP/s")
print("C*, R*: training steps/s; P1-*: predict samples/s at batch 1024")
print(f"{'workload':<16}{'kiln':>10}{'pytorch':>10}{'keras-jax':>11}{'kiln/pt':>9}{'kiln/keras':>11}{'kiln MB':>9}{'kiln %sgemm':>12}")
for w in sorted({r["workload"] for r in rows}, key=lambda w: (len(w), w)):
    k, p, j = (by.get((e, w)) for e in ("kiln", "pytorch", "keras-jax"))
    s = lambda r: r["steps_per_s"] if r else float("nan")
    frac = (k["gflops"] / sgemm * 100) if k and "gflops" in k else float("nan")
    print(f"{w:<16}{s(k):>10.1f}{s(p):>10.1f}{s(j):>11.1f}{s(k)/s(p):>9.2f}{s(k)/s(j):>11.2f}"
          f"{(k['peak_rss_mb'] if k else float('nan')):>9.0f}{frac:>11.0f}%")
PY
