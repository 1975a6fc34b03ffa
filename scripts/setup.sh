#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test/conversion/serving extras,
# pinned by requirements-lock.txt, plus Debian's Chromium for the web page's browser test.
# Idempotent: a second run only checks.
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
  .venv/bin/python -m pip install -q -c requirements-lock.txt -e '.[test,convert,demo,serve]'
  echo "$want" > "$stamp"
fi

# Test vocabulary (tests/support/llama_vocab.py): the real LLaMA SentencePiece vocabulary and its
# reference tokenisations, taken from the llama-cpp-python 0.2.90 source distribution on PyPI into .cache/vocab/.
vocab=.cache/vocab/ggml-vocab-llama-spm.gguf
if [ ! -f "$vocab" ] || [ ! -f "$vocab.inp" ] || [ ! -f "$vocab.out" ]; then
  mkdir -p .cache/sdist .cache/vocab
  sdist=.cache/sdist/llama_cpp_python-0.2.90.tar.gz
  [ -f "$sdist" ] || .venv/bin/python -m pip download -q --no-deps --no-binary :all: \
    llama-cpp-python==0.2.90 -d .cache/sdist
  member=llama_cpp_python-0.2.90/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf
  tar -xzf "$sdist" -C .cache/vocab --strip-components=4 "$member" "$member.inp" "$member.out"
  echo "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69  $vocab" | sha256sum -c --quiet
  rm -f "$sdist"
fi

# The web page's browser tests (tests/test_serve.py) drive Debian's Chromium through
# Playwright with the system executable; Playwright's own browser downloads are not used.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    echo "note: chromium is not installed (apt-get install chromium); the browser test will skip" >&2
  fi
fi
