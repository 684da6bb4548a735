#!/usr/bin/env bash
# GPU checks: the tests marked `gpu` (tests/test_gpu.py; docs/reliability.md, "GPU checks") on a CUDA
# machine, after the versions they ran with. About 2 minutes on one H200.
#   bash scripts/gpu_check.sh [pytest args, e.g. -k varlen or -x]
# A machine without the project's packages: put their wheels in .gpu-wheels/ (docs/benchmarks.md) and
# they are installed into .site/ first. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
if [ -d .gpu-wheels ] && ! "$py" -c "import trl, peft, bitsandbytes, liger_kernel, datasets, gguf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target .site .gpu-wheels/*.whl
fi
if [ -d .site ]; then export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
"$py" - <<'PY'
import importlib.metadata as md
import sys

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    sys.exit("error: no CUDA GPU visible to torch: the gpu tests would all be skipped")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
print(", ".join(f"{n} {version(n)}" for n in
                ("triton", "bitsandbytes", "transformers", "peft", "trl", "accelerate", "liger-kernel")))
PY
exec "$py" -m pytest -q -m gpu tests/ -p no:cacheprovider --durations=8 "$@"
