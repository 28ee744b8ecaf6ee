#!/usr/bin/env bash
# Device pass for multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight) on one GPU:
# the MLA GPU tests, then the DeepSeek-V2-Lite shape benchmark (tokenmill/benchmarks/mla_bench.py:
# latent vs MHA-form KV bytes per token, the largest batch at 2,048 tokens from the engine's KV
# pool, batch-1 decode against its bytes-read floor at the copy rate measured in the same run,
# offline 256 x 1024/1024 throughput). About 6 minutes on one H100.
# Usage (repo root):  bash tokenmill/benchmarks/suites/mla_suite.sh [tests|bench|all]
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
part="${1:-all}"
source "$(dirname "$0")/device_setup.sh" ./mla_out
rc=0
if [[ "$part" == tests || "$part" == all ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=8 \
      tests/gpu/kernels/test_mla_decode.py tests/gpu/test_mla_gpu.py ${TESTS_K:+-k "$TESTS_K"} \
      > "$out/tests.log" 2>&1 || rc=1
  tail -25 "$out/tests.log"
fi
if [[ "$part" == bench || "$part" == all ]]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 -m tokenmill.benchmarks.mla_bench --model "${MODEL:-deepseek-v2-lite}" \
      --output-json "$out/mla_bench.json" 2>&1 | grep -v Warning > "$out/mla_bench.log" || rc=1
  tail -40 "$out/mla_bench.log"
fi
echo
echo "== MLA suite: $(cat "$out/device.txt" | tail -1)"
[[ -f "$out/tests.log" ]] && echo "tests: $(tail -1 "$out/tests.log")"
[[ -f "$out/mla_bench.log" ]] && tail -9 "$out/mla_bench.log"
exit $rc
