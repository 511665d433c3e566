#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with the CUDA 13.0 build of
# torch 2.14.1 (from the machine's local package store; it lets the CUDA extension build even
# without a GPU) and this project in editable mode with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check setuptools wheel "torch==2.14.1"
# --no-build-isolation: the extension's build imports the torch installed above.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --disable-pip-version-check \
    --no-build-isolation -e ".[dev,plot]"
# Say what was built and which backends work here (and why not).
.venv/bin/python -m ema_kernels info
