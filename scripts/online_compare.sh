#!/usr/bin/env bash
# The paper's online scenario on this CPU (docs/online.md): 3 rounds of Iter-DPO judged by the reward model of
# configs/rm.yaml, 3 rounds of IOPO and 3 of DPO on the human pairs, all from the embedded SmolLM2-135M-Instruct,
# then one report comparing them (runs/online-report.md). Run after `bash scripts/setup.sh` (or the quickstart).
# Each `iopo online` continues where it stopped: rerun this script after an interruption. Extra arguments are
# passed to every `iopo online` (e.g. rounds=2 prompts_per_round=24).
set -euo pipefail
cd "$(dirname "$0")/.."
IOPO=.venv/bin/iopo
if [ ! -f runs/rm/final/config.json ]; then
  $IOPO train-rm --config configs/rm.yaml
fi
for method in iter_dpo iopo dpo; do
  $IOPO online --config configs/online.yaml method=$method "$@"
done
$IOPO report runs/online-iter_dpo runs/online-iopo runs/online-dpo output=runs/online-report.md \
  title="iopo online: Iter-DPO vs IOPO vs DPO"
