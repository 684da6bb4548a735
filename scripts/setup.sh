#!/usr/bin/env bash
# Installs the project and its test tools. torch goes first, as the CPU build, where none is present:
# a plain `torch` requirement would pull several GB of CUDA packages on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
