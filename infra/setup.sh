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
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
