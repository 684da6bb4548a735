#!/usr/bin/env bash
# DDP throughput on the benchmark workload: our default fast path on 1 GPU (scripts/bench.py way c),
# then the same config through `accelerate launch` on 2 GPUs (16 rows per GPU per step), tokens/s read
# from each run's metrics.jsonl (tokens_seen and time_s, after the warm-up steps).
#   bash scripts/bench_ddp.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/qb-ddp-out}; mkdir -p "$out"
CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py --work /tmp/qb --report "$out" --warmup 2 --steps 6 --ways c
accelerate launch --config_file configs/accelerate/ddp.yaml -m train fit /tmp/qb/bench_c.yaml \
  --set run.output_dir=/tmp/qb/runs/ddp --set train.max_steps=8 --overwrite 2>&1 | grep -E "^\[train\]|error" || true
cp /tmp/qb/runs/ddp/metrics.jsonl "$out/ddp_metrics.jsonl"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/ddp_metrics.jsonl") if l.strip()]
steps = [r for r in rows if "loss" in r]
a, b = steps[1], steps[-1]  # tokens/s from the end of step 2 to the last step
tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["time_s"] - a["time_s"])
one = json.load(open(f"{sys.argv[1]}/results.json"))["results"]
one_tps = next((r.get("tok_per_s") for r in one if r.get("way") == "c"), None)
print(f"DDP 2 GPUs: {tps:,.0f} tok/s, peak {max(r.get('gpu_peak_gb', 0) for r in rows):.2f} GB per GPU; "
      f"1 GPU: {one_tps:,.0f} tok/s; speed-up {tps / one_tps:.2f}x" if one_tps else f"DDP: {tps:,.0f} tok/s")
print("losses", [round(r["loss"], 4) for r in steps])
PY
