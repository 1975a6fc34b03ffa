#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test/conversion extras,
# pinned by requirements-lock.txt. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.m2sa-installed
want=$(cat setup.cfg requirements-lock.txt | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -c requirements-lock.txt -e '.[test,convert,demo]'
  echo "$want" > "$stamp"
fi
