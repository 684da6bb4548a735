#!/usr/bin/env bash
# FSDP-QLoRA or DeepSpeed ZeRO-3 on the benchmark workload (scripts/bench.py's 8B model and rows), 2 GPUs:
# trains STEPS steps with a checkpoint at SAVE, prints tokens/s and the per-GPU peak, lists the
# checkpoint's files, checks the saved adapter has the format of a one-GPU/DDP adapter (the keys and
# shapes peft saves for this LoRA config, built on a weightless meta model) and that it trained
# (lora_B != 0); with RESUME_TO=N, runs again to step N, resuming from the checkpoint.
#   bash scripts/sharded_check.sh fsdp|zero3 [OUT_DIR]       (on a machine with 2 GPUs)
set -euo pipefail
mode=$1; out=${2:-/tmp/qb-sharded-out}; mkdir -p "$out"
case $mode in fsdp) acc=configs/accelerate/fsdp_qlora.yaml ;; zero3) acc=configs/accelerate/deepspeed_zero3.yaml ;;
  *) echo "error: mode must be fsdp or zero3" >&2; exit 2 ;; esac
# model weights, data and config only (--budget-s 1 starts no way)
[ -f /tmp/qb/bench_c.yaml ] || CUDA_VISIBLE_DEVICES=0 python3 scripts/bench.py --work /tmp/qb --ways c --budget-s 1 >/dev/null
run=/tmp/qb/runs/$mode
fit() {  # fit MAX_STEPS [--overwrite]
  accelerate launch --config_file "$acc" -m train fit /tmp/qb/bench_c.yaml --set run.output_dir="$run" \
    --set quant.storage_dtype=bfloat16 --set train.max_steps="$1" --set train.save_every="${SAVE:-4}" \
    --set train.resume=auto "${@:2}" 2>&1 | grep -E "^\[train\]|^error|Error|^step " | grep -v "Backend impl" || true
}
fit "${STEPS:-4}" --overwrite
if [ -n "${RESUME_TO:-}" ]; then fit "$RESUME_TO"; fi
cp "$run/metrics.jsonl" "$out/${mode}_metrics.jsonl"
(cd "$run" && find checkpoints adapter -type f | sort) > "$out/${mode}_files.txt"
python3 - "$run" "$out" "$mode" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
run, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
steps = [r for r in rows if "loss" in r]
a, b = steps[1], steps[-1]
print(f"{mode}: steps {[r['step'] for r in steps]}, losses {[round(r['loss'], 4) for r in steps]}")
print(f"{mode}: {(b['tokens_seen'] - a['tokens_seen']) / (b['time_s'] - a['time_s']):,.0f} tok/s (steps 2-{b['step']}), "
      f"peak {max(r.get('gpu_peak_gb', 0) for r in rows):.2f} GB on rank 0")
def tensors(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
mine = tensors(run / "adapter")
bs = [t for k, t in mine.items() if "lora_B" in k]
print(f"{mode}: adapter {len(mine)} tensors, {sum(t.numel() for t in mine.values()):,} params, "
      f"dtypes {sorted({str(t.dtype) for t in mine.values()})}, lora_B nonzero {sum(bool(t.abs().sum()) for t in bs)}/{len(bs)}")
from accelerate import init_empty_weights
from peft import get_peft_model, get_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM
from train import config, lora
cfg = config.load_config("/tmp/qb/bench_c.yaml")
with init_empty_weights():
    meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(get_peft_model(meta, lora.build_lora_config(cfg.lora))).items()}
same = {k: tuple(t.shape) for k, t in mine.items()} == expected
print(f"{mode}: keys and shapes equal a one-GPU adapter's ({len(expected)} tensors): {same}")
json.dump({"mode": mode, "metrics": rows}, open(out / f"{mode}_summary.json", "w"))
PY
