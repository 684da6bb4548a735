#!/usr/bin/env bash
# Regenerates scripts/constraints.txt, the pinned set that scripts/setup.sh installs, so the lock is never
# hand-made. In a fresh, throw-away virtual environment it installs torch==2.13.0 (the CPU build, as setup.sh
# does), then the project with its test extras, and freezes the result.
#
#   bash scripts/lock.sh                # the newest releases within pyproject.toml's ranges;
#                                       # then run `bash scripts/test.sh` before committing the new lock
#   bash scripts/lock.sh --match PYTHON # the versions already installed for interpreter PYTHON (an environment
#                                       # the suite passed in), newest only for what it lacks
#
# pip and wheel are left out (installer tools); setuptools stays in (torch requires it at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
match=""
if [[ ${1:-} == --match ]]; then
  match=${2:?usage: bash scripts/lock.sh [--match PYTHON]}
fi
out=scripts/constraints.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m venv "$tmp/venv"
py=$tmp/venv/bin/python
extra=()
if [[ -n $match ]]; then
  # exact pins of the other environment, minus the project itself (editable) and torch (pinned below)
  "$match" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9._-]+==' | grep -viE '^torch==' >"$tmp/match.txt"
  extra=(-c "$tmp/match.txt")
fi
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[test]" ${extra[@]+"${extra[@]}"}
"$py" -m pip check
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
  echo "# The pinned, tested set: every package that \`pip install -e \".[test]\"\` pulls in after torch==2.13.0 (CPU"
  echo "# build), at the exact versions the test suite passed with. scripts/setup.sh installs with \`-c\` this file,"
  echo "# so a fresh machine gets what was tested; pyproject.toml keeps ranges for installs into other environments."
  echo "# Generated $(date -u +%Y-%m-%d) by scripts/lock.sh${match:+ --match} on $(uname -s) $(uname -m); pip and wheel not pinned."
  echo "# Regenerate: bash scripts/lock.sh (newest within pyproject's ranges), then bash scripts/test.sh."
  echo "# python: $pyver  (setup.sh applies these pins only on this Python minor version)"
  "$py" -m pip freeze --all --exclude-editable | grep -viE '^(pip|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f -t= -k1,1
} >"$out"
echo "wrote $out: $(grep -cv '^#' "$out") pins (Python $pyver)"
