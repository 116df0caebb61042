#!/usr/bin/env bash
# The main job: IOPO on the embedded SmolLM2-135M-Instruct and hh-rlhf harmless-base, then its evaluation.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh model.lora=true`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/iopo train --config configs/quickstart.yaml overwrite=true "$@"
