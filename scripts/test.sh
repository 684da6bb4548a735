#!/usr/bin/env bash
# The README's second command (and what CI runs): install, then the whole test suite, offline.
#   bash scripts/test.sh [pytest args]           the pinned, tested set (scripts/setup.sh, scripts/constraints.txt)
#   bash scripts/test.sh --latest [pytest args]  the newest releases within pyproject.toml's ranges, in a fresh
#       .venv-latest/, so the next upstream break is ours to find first; torch stays 2.13.0 (the CPU build).
#       The result and the versions go to docs/results/latest-check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
if [[ ${1:-} != --latest ]]; then
  bash scripts/setup.sh
  python -m pytest -q tests "$@"
  exit
fi
shift
venv=$PWD/.venv-latest
out=docs/results/latest-check.txt
rm -rf "$venv"
python -m venv "$venv"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV=$venv
py=$venv/bin/python
torch_pin=$(sed -nE 's/^torch==([^ ;]+).*/\1/p' scripts/constraints.txt)
echo "torch==$torch_pin" >"$venv/torch-pin.txt"  # -U would otherwise move torch to a (CUDA) release past the pin
"$py" -m pip install -q "torch==$torch_pin"
"$py" -m pip install -q -U --upgrade-strategy eager -c "$venv/torch-pin.txt" -e ".[test]"
versions=$("$py" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate", "datasets", "huggingface_hub",
             "liger-kernel", "gguf", "triton", "numpy", "wandb", "pytest"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
)
echo "newest releases installed in $venv:"
echo "$versions"
# the tree under test, as it is when the suite starts
tree=$(git rev-parse --short HEAD 2>/dev/null || echo "no git")
if [[ -n $(git status --porcelain -- train tests configs pyproject.toml 2>/dev/null) ]]; then
  tree="$tree + uncommitted changes"
fi
set +e
"$py" -m pytest -q tests "$@" 2>&1 | tee "$venv/pytest.log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$venv/pytest.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
{
  echo "$(date -u +%Y-%m-%d) newest releases: ${summary:-no pytest summary (exit $rc)} (exit $rc; bash scripts/test.sh --latest${*:+ $*}; commit $tree; Python $("$py" -c 'import platform; print(platform.python_version())'), $(uname -s) $(uname -m))"
  echo "$versions"
  grep -E '^(FAILED|ERROR) ' "$venv/pytest.log" || true
} >"$out"
echo "wrote $out"
exit "$rc"
