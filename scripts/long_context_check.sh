#!/usr/bin/env bash
# Issue #21 on one H200 (scripts/bench.py): ours against Unsloth on memory and context length, with train plan's
# prediction beside every measured peak. In stages that each fit one 10-minute device call: one 350K-token step
# alone takes ~7 min (the issue's 65K and 131K steps took 21 s and 74 s; attention grows with the square).
#   default        the 8B workload: ours (offload auto = on at every length since session 9), ours resident, Unsloth
#   ladder         one row of 16,384 and of 131,072 tokens: ours, then Unsloth on the same rows
#   350k           one row of 350,000 tokens: ours (offload + tiled MLP, both auto at this length)
#   unsloth-350k   the same row through Unsloth
#   profile        the default workload, ours offloaded and resident, one extra profiled step each (item 5)
#   memory         what is live at the CUDA peak of one 131,072-token row (--memory-peak; the plan's long-row miss)
#   attention      the attention kernels alone on one row of 4K to 131K tokens: our varlen kernel vs sdpa's backends
#   profile-131k   one 131K row, ours, timed then profiled (torch.profiler by kernel family: where Unsloth's 1.6x is)
#   knobs-131k     one 131K row, ours without the tiled MLP, then without offload (what each costs in s and GB)
#   qwen           train plan against a random Qwen2.5-7B (issue #20 item 4): 16 rows of 2,048 and one of 16,384
#   levers         the default workload with the dropout in Triton (lora.kernel=fused_triton), resident and offloaded:
#                  dropout costs ~10 % there (session 5: 8,690 -> 9,572 tok/s with lora.dropout=0)
#   host           the default workload's host cost (session 6: the GPU idles 41-45 % of a step waiting for the host):
#                  scripts/layer_bench.py (one layer's host us and GPU ms per call: fused, fused_triton, peft; the NF4
#                  dequantization), then c and c-offload with the dropout in torch and in Triton, interleaved
#   optim          train/optim.py's one-step AdamW (the default; TRAIN_ONE_STEP_ADAMW=0 is bitsandbytes' per-tensor
#                  step): the optimizer step alone, bitsandbytes' against ours (scripts/layer_bench.py), then c with
#                  the variable 0 and 1, interleaved twice
#   offload-ab     what offload costs on the default workload (train.offload_checkpoints auto turns it on there while
#                  that is <= 3 %): c (offloaded) and c-resident interleaved, three of each, per-step times in each
#                  results.json
#   alternate      A/B of the switches a step reads afresh, inside one process (BENCH_ALTERNATE: the host's speed moves
#                  by up to 2x between processes, more than these changes): way c, 32 timed steps (STEPS=N) alternating
#                  TRAIN_FLAT_WALKS (train/step_walks.py), TRAIN_SYNC_FREE_HEAD (train/fused_head.py),
#                  TRAIN_DIRECT_LAUNCH (kernels/launch.py), TRAIN_LIGER_RELAUNCH (kernels/liger_launch.py), then
#                  TRAIN_LEAN_RECOMPUTE (kernels/lean_recompute.py);
#                  SWITCHES="A B" runs only those; every step trains the first batch again (BENCH_SAME_BATCH), so
#                  the two settings do the same work; the table gives the ratio's 95 % interval (16 steps: about
#                  +-5 %, session 13), and says whether it resolved the difference
#   spy            the default workload's host time by function: way c under py-spy (wheels in .spy-wheels/:
#                  `pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 -d
#                  .spy-wheels py-spy`), then scripts/host_profile.py on its samples (session 10: the step waits for the host)
#   gemm           scripts/gemm_host.py: the host time of a GEMM with a new token count (session 12's trace: ~30 ms a
#                  step in the first layer), per BLAS backend, and whether rounding the count up lets steps reuse it
#   trace          way c with one profiled step's timeline written (trace-c.json.gz: where the compute stream waits)
#   prepare        what `issue` needs before its clock starts, for a call of its own on a fresh machine (~1 minute):
#                  the random 8B written to /tmp/qb (positions for 350K), both data sets, Unsloth's packages, and the
#                  weights read once (the page cache); then `issue` in the next call on the same warm machine
#   issue          issue #21's done-when in one invocation: the default workload (c, our defaults, and Unsloth) and
#                  one 350,000-token row of ours with train plan beside it (~9 minutes on an H100; run `prepare`
#                  first: building the model inside the same 10-minute call leaves too little for Unsloth)
#   all            every stage in one run (no 10-minute limit)
# Usage, from the repo root with .gpu-wheels/ and .unsloth-wheels/ (../shared/tools/unsloth-wheels.sh) carried:
#   bash scripts/long_context_check.sh STAGE [OUT_DIR]     -> OUT_DIR/STAGE/{table.md,results.json}, stdout
#   PACK=1 ...: OUT_DIR/STAGE.tar.gz instead of the folder (the device machine returns only a few files a call)
set -uo pipefail
stage=${1:?usage: long_context_check.sh default|prepare|ladder|350k|unsloth-350k|profile|memory|attention|profile-131k|knobs-131k|qwen|levers|host|optim|offload-ab|alternate|spy|gemm|trace|issue|all [OUT_DIR]}
out=${2:-${OUT:-/tmp/long-context}}/$stage
budget=${BUDGET_S:-540}  # start no way after this many seconds: a 10-minute call keeps a minute for the rest
site=/tmp/unsloth-site
if [ -d .gpu-wheels ] && ! python3 -c "import trl, peft, bitsandbytes, liger_kernel, datasets, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .gpu-wheels/*.whl  # as gpu_check.sh
fi
if [ -d .site ]; then export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ -d .unsloth-wheels ] && [ ! -d "$site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .unsloth-wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
free -g | head -2  # pinned CPU RAM: the 350K row offloads ~92 GB of layer inputs
bench() { python3 scripts/bench.py --work /tmp/qb --report "$out" --unsloth-site "$site" --budget-s "$budget" "$@"; }
case $stage in
  default) bench --ways c,c-resident,unsloth --warmup 2 --steps 4 ;;
  ladder) bench --plan-check --plan-tokens 1x16384,1x131072 --plan-stacks ours,unsloth ;;
  350k) bench --plan-check --plan-tokens 1x350000 ;;
  unsloth-350k) bench --plan-check --plan-tokens 1x350000 --plan-stacks unsloth ;;
  profile) bench --ways c,c-resident --warmup 2 --steps 4 --profile c,c-resident ;;
  memory) bench --plan-check --plan-tokens 1x131072 --memory-peak ;;
  attention) mkdir -p "$out" && python3 scripts/attention_bench.py --tokens 4096,8192,16384,131072 | tee "$out/attention.md" ;;
  profile-131k) bench --plan-check --plan-tokens 1x131072 --profile plan-1x131072 ;;
  knobs-131k) bench --plan-check --plan-tokens 1x131072 --set train.tile_mlp=false --report "$out/no-tile" &&
    bench --plan-check --plan-tokens 1x131072 --set train.offload_checkpoints=false --report "$out/no-offload" ;;
  qwen) bench --plan-check --base Qwen/Qwen2.5-7B --plan-tokens 16x2048,1x16384 ;;
  levers) bench --ways c,c-offload --warmup 2 --steps 4 --set lora.kernel=fused_triton ;;
  host) mkdir -p "$out" && python3 scripts/layer_bench.py --rounds 3 | tee "$out/layer.md" &&
    for way in c c-offload; do
      bench --ways $way --warmup 2 --steps 8 --report "$out/fused-$way" &&
        bench --ways $way --warmup 2 --steps 8 --set lora.kernel=fused_triton --report "$out/triton-$way"
    done ;;
  optim) mkdir -p "$out" && python3 scripts/layer_bench.py --optimizer-only | tee "$out/optimizer.md" &&
    for round in 1 2; do
      for on in 0 1; do
        TRAIN_ONE_STEP_ADAMW=$on bench --ways c --warmup 2 --steps 8 --report "$out/$round-one-step-$on"
      done
    done ;;
  offload-ab) for round in 1 2 3; do
      for way in c c-resident; do bench --ways $way --warmup 2 --steps 8 --report "$out/$round-$way"; done
    done ;;
  alternate) for switch in ${SWITCHES:-TRAIN_FLAT_WALKS TRAIN_SYNC_FREE_HEAD TRAIN_DIRECT_LAUNCH TRAIN_LIGER_RELAUNCH TRAIN_LEAN_RECOMPUTE}; do
      env BENCH_ALTERNATE=$switch BENCH_SAME_BATCH=1 $switch=1 python3 scripts/bench.py --work /tmp/qb --report "$out/$switch" \
        --unsloth-site "$site" --budget-s "$budget" --ways c --warmup 2 --steps "${STEPS:-32}"
    done ;;
  spy) mkdir -p "$out" && { [ -x /tmp/spy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --no-compile \
         --target /tmp/spy .spy-wheels/*.whl; } &&
    /tmp/spy/bin/py-spy record --subprocesses --rate 100 --format raw -o "$out/spy.txt" -- python3 scripts/bench.py \
      --work /tmp/qb --report "$out" --unsloth-site "$site" --budget-s "$budget" --ways c --warmup 2 --steps 8 &&
    python3 scripts/host_profile.py "$out/spy.txt" | tee "$out/host_profile.md" ;;
  gemm) mkdir -p "$out" && python3 scripts/gemm_host.py | tee "$out/gemm_host.md" ;;
  trace) bench --ways c --warmup 2 --steps 4 --profile c --trace ;;
  prepare) bench --ways c,unsloth --plan-check --plan-tokens 1x350000 --prepare &&  # issue's arguments
    cat /tmp/qb/model-*/*.safetensors >/dev/null ;;
  issue) budget=${BUDGET_S:-575}  # the 350K row first, with the most of one 10-minute call; then c and Unsloth
    bench --ways c,unsloth --warmup 2 --steps 8 --plan-check --plan-tokens 1x350000 --plan-first ;;
  all) budget=100000; bench --ways c,c-resident,unsloth --warmup 2 --steps 4 --plan-check \
         --plan-tokens 1x16384,1x131072,1x262144,1x350000 --plan-stacks ours,unsloth ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
rc=$?
if [ "${PACK:-0}" = 1 ] && [ -d "$out" ]; then
  tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
exit $rc
