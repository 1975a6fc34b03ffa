#!/usr/bin/env bash
# Sets up everything and runs the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m m2sa_jax.demo_sam --out outputs/demo "$@"
