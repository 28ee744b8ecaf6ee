#!/usr/bin/env bash
# Device pass for sliding windows and MiniMax's hybrid lightning attention: the GPU tests, then the
# benchmarks of tokenmill/benchmarks/hybrid.py (MiniMax-M1 shape, 8 layers, vs all-softmax;
# Mistral-7B shape with its 4k window vs without), a short table last. About 7 minutes on one H100
# (at most 9: the parts' timeouts); each part also runs alone.
# Usage on the device (repo root):  bash tokenmill/benchmarks/suites/hybrid_suite.sh [tests|minimax|mistral|all]
# Carry: wheels/ (device_setup.sh installs them). Results: $OUT (or ./gpu_out).
set -u -o pipefail
part="${1:-all}"
source "$(dirname "$0")/device_setup.sh" ./gpu_out
rc=0
if [[ $part == tests || $part == all ]]; then
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=5 \
      tests/gpu/kernels/test_sliding_window_kernels.py tests/gpu/kernels/test_lightning_attention.py \
      tests/gpu/test_hybrid_gpu.py 2>&1 | tee "$out/tests.log" || rc=1
fi
for bench in minimax mistral; do
  if [[ $part == "$bench" || $part == all ]]; then
    limit=$([[ $bench == minimax ]] && echo "${MINIMAX_TIMEOUT:-200}" || echo "${MISTRAL_TIMEOUT:-100}")
    timeout "$limit" python3 -m tokenmill.benchmarks.hybrid "$bench" --json "$out/$bench.json" 2>&1 \
        | grep -v -i warning | tee "$out/$bench.log" || rc=1
  fi
done
echo "=== summary ($(head -2 "$out/device.txt" | tail -1))"
[[ -f $out/tests.log ]] && grep -E "passed|failed|error" "$out/tests.log" | tail -1
python3 - "$out" <<'PY'
import json, pathlib, sys
for name in ("minimax", "mistral"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if path.exists():
        print("\n".join(json.loads(path.read_text())["table"]))
PY
exit $rc
