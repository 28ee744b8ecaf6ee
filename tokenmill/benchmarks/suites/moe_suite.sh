#!/usr/bin/env bash
# Device pass for the mixture-of-experts work: the MoE GPU tests, the fused-MoE kernel
# micro-benchmark with its launch-config sweep, and the Qwen3-30B-A3B serving set (dummy bf16
# weights): batch-1 decode 512/256 vs its bytes-read floor, 100 x 2048/1024 at 10 in flight (mean
# TPOT), offline 256 x 1024/1024 vs HF generate(). Results under $OUT; a short table last.
# Usage (repo root, one H100):  bash tokenmill/benchmarks/suites/moe_suite.sh [tests|kernels|model|all]
#   ~2.5 min tests, ~2.5 min kernels, ~4 min model (one engine start of the 30B shape + HF).
#   MOE_SHAPES / SWEEP_SHAPES choose the micro-benchmark's shapes; MODEL_ARGS adds engine flags.
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
part="${1:-all}"
source "$(dirname "$0")/device_setup.sh" ./moe_out
rc=0
if [[ "$part" == tests || "$part" == all ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/gpu/kernels/test_fused_moe.py tests/gpu/kernels/test_moe_routing.py \
      tests/gpu/test_moe_gpu.py -o addopts="" --durations=8 2>&1 | tee "$out/tests.log" || rc=1
fi
if [[ "$part" == kernels || "$part" == all ]]; then
  timeout "${KERNELS_TIMEOUT:-300}" python3 -m tokenmill.benchmarks.kernels.fused_moe \
      --shapes "${MOE_SHAPES:-qwen3-30b-a3b,mixtral-8x7b,minimax-m2}" --sweep --sweep-shapes "${SWEEP_SHAPES:-qwen3-30b-a3b}" \
      --output-json "$out/fused_moe.json" --tuned-out "$out/fused_moe_tuned.py" 2>&1 | tee "$out/fused_moe.log" || rc=1
fi
if [[ "$part" == model || "$part" == all ]]; then
  timeout "${MODEL_TIMEOUT:-480}" python3 -m tokenmill.entrypoints.cli.main bench moe --model qwen3-30b-a3b \
      --load-format dummy --dtype bfloat16 --max-model-len 4096 --max-num-seqs 256 --gpu-memory-utilization 0.92 \
      ${MODEL_ARGS:-} --output-json "$out/moe_qwen3_30b.json" 2>&1 | grep -v Warning | tee "$out/moe_qwen3_30b.log" || rc=1
fi
echo
echo "== summary ($(head -2 "$out/device.txt" | tail -1)) =="
[[ -f "$out/tests.log" ]] && tail -1 "$out/tests.log"
[[ -f "$out/fused_moe.log" ]] && grep -E "copy .* GB/s|T=    1:|T=  128:|T= 8192:" "$out/fused_moe.log"
[[ -f "$out/moe_qwen3_30b.log" ]] && grep -E "^\|" "$out/moe_qwen3_30b.log"
echo "rc=$rc"
exit $rc
