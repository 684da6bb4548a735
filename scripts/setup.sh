#!/usr/bin/env bash
# Installs the project and its test tools at the pinned, tested versions of scripts/constraints.txt (made by
# scripts/lock.sh), so a fresh machine gets what the suite passed with; pyproject.toml keeps its ranges for people
# who install the package into their own environment. When everything is installed already, pip changes nothing.
# torch goes first, as the CPU build, where none is present:
# a plain `torch` requirement would pull several GB of CUDA packages on a machine without a GPU.
# The pins apply only where they can hold: on the Python minor version they were resolved on, and with no torch or
# the pinned one. Elsewhere (another Python, a torch of your own, e.g. a CUDA build) this installs within
# pyproject's ranges as before, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=scripts/constraints.txt
torch_pin=$(sed -nE 's/^torch==([^ ;]+).*/\1/p' "$lock")
have=$(python - "$lock" <<'PY'
import importlib.metadata as md, re, sys
py = "%d.%d" % sys.version_info[:2]
locked = re.search(r"^# python: (\S+)", open(sys.argv[1]).read(), re.M).group(1)
try:
    torch = md.version("torch")
except md.PackageNotFoundError:
    torch = ""
print(py, locked, torch)
PY
)
read -r py locked torch <<<"$have"
pins=(-c "$lock")
if [[ $py != "$locked" ]]; then
  echo "setup.sh: $lock was resolved on Python $locked, this is $py: installing within pyproject.toml's ranges (not the tested set)" >&2
  pins=()
elif [[ -n $torch && ${torch%%+*} != "$torch_pin" ]]; then
  echo "setup.sh: keeping this environment's torch $torch (the tested set has $torch_pin): installing within pyproject.toml's ranges (not the tested set)" >&2
  pins=()
fi
if [[ -z $torch ]]; then
  python -m pip install -q "torch==$torch_pin"
fi
python -m pip install -q -e ".[test]" ${pins[@]+"${pins[@]}"}
