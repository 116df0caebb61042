#!/usr/bin/env bash
# The main job: IOPO on the embedded SmolLM2-135M-Instruct and hh-rlhf harmless-base, then its evaluation:
#   1. iopo train     (configs/quickstart.yaml): 12 steps of full-fine-tuning IOPO, margin reward + pairwise accuracy
#   2. iopo train-rm  (configs/rm.yaml): a Bradley-Terry reward model judge, trained once (kept in runs/rm)
#   3. iopo eval      (configs/eval.yaml): protagonist vs the starting model, judged by that reward model (and with
#                      QUICKSTART_LLM_JUDGE=1 by an LLM: llama.cpp's llama-server serving the embedded SmolLM2)
#   4. iopo report    -> runs/quickstart/report.md with its figures
# Steps 2-4 are scripts/evaluate_quickstart.sh, which can be run again on its own.
# Extra arguments are overrides of the training config, e.g. `bash scripts/quickstart.sh model.lora=true`.
# resume=true: a finished quickstart is not trained again (it is exported and scored again); pass overwrite=true
# (with resume=false) to start it over, or output_dir=... for another run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The main job needs iopo alone; llama.cpp (compiled on first install) only for the opt-in LLM judge.
if [ "${QUICKSTART_LLM_JUDGE:-0}" = "1" ]; then bash scripts/setup.sh llama; else bash scripts/setup.sh ""; fi
.venv/bin/iopo train --config configs/quickstart.yaml resume=true "$@"
exec bash scripts/evaluate_quickstart.sh
