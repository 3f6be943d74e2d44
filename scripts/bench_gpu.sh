#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md, on one H100 with dummy weights at real shapes.
#
#   scripts/bench_gpu.sh main        latency (llama-3.1-8b), offline qwen3-8b, ablations on qwen3-0.6b (~5 min)
#   scripts/bench_gpu.sh hf          offline qwen3-0.6b against transformers, same run (~6 min)
#   scripts/bench_gpu.sh decode      the decode-kernel ablation alone (tensor cores against CUDA cores)
#   scripts/bench_gpu.sh serve [M]   serve M (default qwen3-8b): a streamed chat reply, bench serve, then bench
#                                    offline on the same engine settings, for comparison
#   scripts/bench_gpu.sh serve-mixed bench serve against serve (qwen3-8b, 64 in flight) with and without mixed steps
#   scripts/bench_gpu.sh tp          two GPUs: offline qwen3-8b at --tp 1 and 2, latency llama-3.1-8b at both
#   scripts/bench_gpu.sh tp4         four GPUs: llama-3.1-70b at --tp 4, latency b1/b32 and offline
#
# Run from the project root after `source .gpu/activate.sh` (see ../shared/gpu/README.md); JSON reports go
# to $OUT (default ./bench-out).
set -uo pipefail
out="${OUT:-bench-out}"
mkdir -p "$out"
mini() { python3 -m minisgl_cli "$@"; }
offline06() {  # offline qwen3-0.6b, the default workload, with extra engine flags; $1 names the report
  local name="$1"; shift
  echo "== offline qwen3-0.6b $name: $*"
  mini bench offline --dummy-weights -m qwen3-0.6b "$@" --json "$out/offline_qwen3-0.6b_$name.json" 2>&1 | tail -4
}

case "${1:-main}" in
  main)
    mini bench latency --dummy-weights -m llama-3.1-8b --batch-sizes 1 --input-len 128 --output-len 512 \
      --json "$out/latency_llama-3.1-8b_b1.json" 2>&1 | tail -6
    mini bench latency --dummy-weights -m llama-3.1-8b --batch-sizes 1,8,64,256 --input-len 128 --output-len 256 \
      --json "$out/latency_llama-3.1-8b.json" 2>&1 | tail -10
    mini bench offline --dummy-weights -m qwen3-8b --json "$out/offline_qwen3-8b.json" 2>&1 | tail -4
    offline06 default
    offline06 no-overlap --disable-overlap
    offline06 no-graphs --cuda-graph-max-bs 0
    offline06 page16 --page-size 16
    offline06 page256 --page-size 256
    offline06 fa2 --prefill-kernel fa2
    offline06 fa3 --prefill-kernel fa3
    offline06 greedy --temperature 0
    offline06 decode-tensor-cores --decode-kernel tensor-cores
    offline06 decode-cuda-cores --decode-kernel cuda-cores
    ;;
  decode)
    offline06 decode-tensor-cores --decode-kernel tensor-cores
    offline06 decode-cuda-cores --decode-kernel cuda-cores
    for k in tensor-cores cuda-cores; do
      mini bench offline --dummy-weights -m qwen3-8b --decode-kernel $k --json "$out/offline_qwen3-8b_$k.json" 2>&1 | tail -3
      mini bench latency --dummy-weights -m llama-3.1-8b --batch-sizes 1,64 --input-len 128 --output-len 256 \
        --decode-kernel $k --json "$out/latency_llama-3.1-8b_$k.json" 2>&1 | tail -6
    done
    ;;
  serve)
    model="${2:-qwen3-8b}"
    port=18200
    # python itself in the background (not the `mini` function's subshell), so $! is the server's pid
    python3 -m minisgl_cli serve --dummy-weights -m "$model" --port $port > "$out/serve_$model.log" 2>&1 &
    pid=$!
    python3 scripts/wait_healthy.py $port || { kill $pid; exit 1; }
    python3 - "$port" "$model" <<'PY'
import sys, httpx
port, model = sys.argv[1], sys.argv[2]
body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
    print(r.status_code, [line for line in r.iter_lines() if line][:3])
PY
    mini bench serve --url "http://127.0.0.1:$port" --json "$out/serve_$model.json" 2>&1 | tail -22
    kill -TERM $pid; wait $pid; echo "serve exit status $?"
    mini bench offline --dummy-weights -m "$model" --json "$out/offline_${model}_serve-run.json" 2>&1 | tail -4
    ;;
  serve-mixed)
    # Issue 16: bench serve against serve, qwen3-8b, 64 in flight, 256 requests, with mixed steps (--mixed-steps)
    # and without (the default), one after the other in the same call; TTFT and ITL summaries.
    port=18201
    for flags in "--mixed-steps" ""; do
      name="unmixed"; [ -n "$flags" ] && name="mixed"
      python3 -m minisgl_cli serve --dummy-weights -m qwen3-8b --port $port $flags > "$out/serve_$name.log" 2>&1 &
      pid=$!
      python3 scripts/wait_healthy.py $port || { kill $pid; exit 1; }
      mini bench serve --url "http://127.0.0.1:$port" --max-concurrency 64 --num-prompts 256 \
        --json "$out/serve_qwen3-8b_$name.json" > "$out/serve_bench_$name.txt" 2>&1
      kill -TERM $pid; wait $pid
      python3 - "$out/serve_qwen3-8b_$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
print(f"{sys.argv[2]}: {r['completed']}/{r['num_requests']} done, {r['output_tok_per_s']:,.0f} output tok/s; "
      f"TTFT p50 {r['median_ttft_ms']:.0f} ms p99 {r['p99_ttft_ms']:.0f} ms; "
      f"ITL p50 {r['median_itl_ms']:.1f} ms p99 {r['p99_itl_ms']:.1f} ms")
PY
    done
    ;;
  tp)
    for tp in 1 2; do
      mini bench offline --dummy-weights -m qwen3-8b --tp $tp --json "$out/offline_qwen3-8b_tp$tp.json" 2>&1 | tail -4
      mini bench latency --dummy-weights -m llama-3.1-8b --tp $tp --batch-sizes 1,32 --input-len 128 \
        --output-len 256 --json "$out/latency_llama-3.1-8b_tp$tp.json" 2>&1 | tail -7
    done
    ;;
  tp4)
    mini bench latency --dummy-weights -m llama-3.1-70b --tp 4 --batch-sizes 1,32 --input-len 128 \
      --output-len 256 --json "$out/latency_llama-3.1-70b_tp4.json" 2>&1 | tail -7
    mini bench offline --dummy-weights -m llama-3.1-70b --tp 4 --json "$out/offline_llama-3.1-70b_tp4.json" 2>&1 | tail -4
    ;;
  hf)
    mini bench offline --dummy-weights -m qwen3-0.6b --baseline hf --json "$out/offline_qwen3-0.6b_hf.json" 2>&1 | tail -8
    ;;
  *) echo "usage: scripts/bench_gpu.sh main|hf|decode|serve [MODEL]|tp|tp4"; exit 2 ;;
esac
