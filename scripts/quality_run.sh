#!/usr/bin/env bash
# The quality study of docs/quality.md: configs/smollm2-135m-pricer.yaml fitted and evaluated (all 461 test
# rows, base vs adapter vs the constant train median) once per WAY, then one general chat question per run.
#   bash scripts/quality_run.sh nf4:42 nf4:43 nf4:44 bf16:42      # on a GPU; runs/quality/<mode>-s<seed>/
#   python scripts/quality_table.py runs/quality                    # the tables of docs/quality.md
# nf4 = the QLoRA recipe as written; bf16 = the same recipe with quant.mode=none (plain bf16 LoRA).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${QUALITY_DIR:-runs/quality}
CHAT="What is the capital of France?"
for way in "$@"; do
  mode=${way%%:*}; seed=${way##*:}; run="$ROOT/$mode-s$seed"
  case "$mode" in nf4) quant=nf4 ;; bf16) quant=none ;; *) echo "error: way $way: mode must be nf4 or bf16" >&2; exit 2 ;; esac
  start=$(date +%s)
  python -m train fit configs/smollm2-135m-pricer.yaml --overwrite \
    --set run.seed="$seed" --set run.output_dir="$run" --set quant.mode="$quant"
  python -m train eval "$run"
  python -m train generate "$run" --chat --max-new-tokens 40 --prompt "$CHAT" > "$run/eval/chat.txt"
  echo "$way: $(( $(date +%s) - start )) s (fit + eval + chat)" | tee -a "$ROOT/times.txt"
done
