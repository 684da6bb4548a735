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
# pip re-resolves and rebuilds the editable package on every call, even when it changes nothing: about 2 minutes
# of index queries, a third of the demo's budget. So a stamp of what the last install was made from (this Python,
# pyproject.toml, the pins) lets a repeat run check the pins itself and skip pip when every one still holds.
stamp=.setup-stamp
want=$(python -c 'import sys; print(sys.executable)'; cat pyproject.toml "$lock" | sha256sum)
if [[ ${#pins[@]} -gt 0 && -f $stamp && "$(cat "$stamp")" == "$want" ]] && python - "$lock" <<'PY'
import importlib.metadata as md, re, sys
pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", open(sys.argv[1]).read(), re.M)
def holds(name, version):
    try:
        return md.version(name).split("+")[0] == version.split("+")[0]
    except md.PackageNotFoundError:
        return False
sys.exit(0 if pins and all(holds(n, v) for n, v in pins) else 1)
PY
then
  echo "setup.sh: the tested set (scripts/constraints.txt) is installed already: nothing to do"
  exit 0
fi
rm -f "$stamp"
if [[ -z $torch ]]; then
  python -m pip install -q "torch==$torch_pin"
fi
python -m pip install -q -e ".[test]" ${pins[@]+"${pins[@]}"}
if [[ ${#pins[@]} -gt 0 ]]; then echo "$want" > "$stamp"; fi
