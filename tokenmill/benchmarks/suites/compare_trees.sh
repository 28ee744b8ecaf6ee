#!/usr/bin/env bash
# Two trees of tokenmill on one GPU, in one call: the reference workloads run with the tree in
# $BASELINE (a folder holding another commit's `tokenmill/`) and with this one, alternating, then a
# table of both and their ratio (benchmarks/compare_results.py).
# Usage on the device (repo root):  BASELINE=.baseline bash tokenmill/benchmarks/suites/compare_trees.sh
#   REPEATS (default 1): alternating rounds; WORKLOADS (default "latency tput nanovllm").
# Carry: wheels/ (device_setup.sh installs them) and the baseline folder.
set -u -o pipefail
source "$(dirname "$0")/device_setup.sh" ./gpu_out
here="$(pwd)"
base="$(cd "${BASELINE:?set BASELINE to the other tree}" && pwd)"
rc=0
run() {  # run TREE_DIR LABEL WORKLOAD
  local dir=$1 label=$2 workload=$3 json="$out/${3}_${2}_r${round}.json"
  local args
  case $workload in
    latency) args=(bench latency --model llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 512
                   --output-len 256 --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.5 --baseline none) ;;
    tput) args=(bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random
                --num-prompts 256 --input-len 256 --output-len 256 --max-model-len 1024
                --gpu-memory-utilization 0.5 --baseline none) ;;
    nanovllm) args=(bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload nanovllm
                    --baseline none) ;;
  esac
  ( cd "$dir" && PYTHONPATH="$dir:/tmp/tm_wheels" timeout "${STEP_TIMEOUT:-150}" \
      python3 -m tokenmill.entrypoints.cli.main "${args[@]}" --output-json "$json" 2>&1 | grep -v -i warning \
      | tail -4 ) || rc=1
}
for round in $(seq 1 "${REPEATS:-1}"); do
  for workload in ${WORKLOADS:-latency tput nanovllm}; do
    run "$base" before "$workload"
    run "$here" after "$workload"
  done
done
python3 -m tokenmill.benchmarks.compare_results "$out" | tee "$out/compare.txt"
exit $rc
