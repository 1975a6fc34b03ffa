#!/usr/bin/env bash
# Sets up everything and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# glibc's huge-page malloc, as train.py and eval.py use it (m2sa_jax/hugepages.py): the many
# small trainings and evaluations in the tests run in this process.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb*) ;;
  "") export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ;;
  *) export GLIBC_TUNABLES="$GLIBC_TUNABLES:glibc.malloc.hugetlb=1" ;;
esac
exec .venv/bin/python -m pytest -q "$@"
