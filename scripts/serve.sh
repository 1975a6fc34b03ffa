#!/usr/bin/env bash
# Sets up everything and serves the web page and HTTP API (python -m m2sa_jax.serve) on
# http://127.0.0.1:7860/, by default for the model the demo trains (outputs/synthetic).
# Extra arguments go to the server, e.g. --checkpoint converted/m2sa_7b --port 8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m m2sa_jax.serve "$@"
