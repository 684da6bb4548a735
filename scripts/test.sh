#!/usr/bin/env bash
# The README's second command (and what CI runs): install, then the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
python -m pytest -q tests "$@"
