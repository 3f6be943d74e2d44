#!/usr/bin/env bash
# `minisgl serve --tp 2` on a machine with one GPU: both ranks on cuda:0 over gloo (MINISGL_TP_ONE_GPU=1),
# float32, checked by scripts/serve_check.py against the unsplit in-process engine. A correctness check of
# the split server on a GPU where two GPUs are not to be had; not a benchmark (gloo, no CUDA graphs).
# Run from the project root after `source .gpu/activate.sh`; the server log goes to $OUT.
set -uo pipefail
out="${OUT:-bench-out}"
mkdir -p "$out"
port=18300
MINISGL_TP_ONE_GPU=1 python3 -m minisgl_cli serve --dummy-weights -m qwen3-0.6b --tp 2 --dtype float32 \
  --kv-cache-tokens 50000 --max-running-requests 64 --port $port > "$out/serve_tp2_one_gpu.log" 2>&1 &
pid=$!
python3 scripts/wait_healthy.py $port || { kill $pid; exit 1; }
python3 scripts/serve_check.py --url "http://127.0.0.1:$port" -m qwen3-0.6b --dummy-weights --dtype float32 \
  --kv-cache-tokens 50000
kill -TERM $pid; wait $pid; echo "serve exit status $?"
grep -E "ranks|error" "$out/serve_tp2_one_gpu.log" | head -5
