#!/usr/bin/env bash
# Sets up everything and runs the main job on its embedded default: the learning demo (a small
# M²SA trained from scratch on the synthetic MMR-format dataset, evaluated on its val split).
# Extra arguments go to train.py, e.g. --config.train.steps=500 or --workdir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py --config configs/synthetic.py "$@"
