#!/usr/bin/env bash
# The README's first command: install, then train the offline demo and evaluate it (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python -m train fit configs/demo.yaml "$@"
python -m train eval runs/demo
echo "demo done: adapter in runs/demo/adapter, report in runs/demo/eval/ (report.json, predictions.jsonl, *.png)"
