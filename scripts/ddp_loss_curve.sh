#!/usr/bin/env bash
# Same 16 sequences per optimizer step two ways, 20 steps: 1 GPU x (4 rows x accumulation 4) and
# 2 GPUs (DDP) x (4 rows x accumulation 2). The per-step losses must agree within tolerance.
#   bash scripts/ddp_loss_curve.sh [OUT_DIR]        (on a machine with 2 GPUs)
set -euo pipefail
out=${1:-/tmp/qb-curve-out}; mkdir -p "$out"
[ -f /tmp/qb/bench_c.yaml ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py --work /tmp/qb --warmup 1 --steps 1 --ways c >/dev/null
common=(--set train.max_steps=20 --set train.batch_size=4 --set train.save_every=1000 --overwrite)
CUDA_VISIBLE_DEVICES=0 python3 -m train fit /tmp/qb/bench_c.yaml --set run.output_dir=/tmp/qb/runs/one \
  --set train.grad_accum=4 "${common[@]}" 2>&1 | grep -E "^error" || true
accelerate launch --config_file configs/accelerate/ddp.yaml -m train fit /tmp/qb/bench_c.yaml \
  --set run.output_dir=/tmp/qb/runs/two --set train.grad_accum=2 "${common[@]}" 2>&1 | grep -E "^error" || true
cp /tmp/qb/runs/one/metrics.jsonl "$out/one_gpu.jsonl"; cp /tmp/qb/runs/two/metrics.jsonl "$out/two_gpus.jsonl"
python3 - "$out" <<'PY'
import json, sys
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{name}")) if "loss" in r}
one, two = losses("one_gpu.jsonl"), losses("two_gpus.jsonl")
diffs = [abs(one[s] - two[s]) for s in sorted(one) if s in two]
print("step  1xGPU acc4   2xGPU acc2")
for s in sorted(one):
    print(f"{s:4d}  {one[s]:10.4f}  {two.get(s, float('nan')):10.4f}")
print(f"steps compared: {len(diffs)}; max |diff| {max(diffs):.4f}; mean |diff| {sum(diffs)/len(diffs):.4f}")
PY
