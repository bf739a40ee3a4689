#!/usr/bin/env bash
# Creates .venv with the pinned project (+ test extra) and fetches the offline demo assets.
# Usage: bash launch/setup.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing ir_jax with its test extra (jax, flax, torch CPU for parity tests, ...)"
.venv/bin/python -m pip install --quiet -e ".[test,eval]"
PYTHON=.venv/bin/python bash launch/fetch_assets.sh
echo "setup done: activate with '. .venv/bin/activate'"
