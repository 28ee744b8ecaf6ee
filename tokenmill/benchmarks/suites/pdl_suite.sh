#!/usr/bin/env bash
# Device pass for programmatic dependent launch (ops/pdl.py), one H100/H200, ~9 minutes:
#   gemv     the Llama-3.1-8B batch-1 weight set through the bf16 and fp8 GEMVs, each in one CUDA
#            graph, ordinary launches beside dependent ones (benchmarks/kernels/fp8.py gemv)
#   latency  Llama-3.1-8B shape, batch-1 decode 512/128, bf16 and online fp8 (VARIANTS), each with --no-pdl and
#            with PDL, alternated in one call (dummy weights)
#   tests    the PDL chain test, the GEMV and attention-kernel tests (with PDL, the default on Hopper)
# Usage (repo root): bash tokenmill/benchmarks/suites/pdl_suite.sh [gemv] [latency] [tests]
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
parts="${*:-gemv latency tests}"
source "$(dirname "$0")/device_setup.sh" ./pdl_out
rc=0
if [[ " $parts " == *" gemv "* ]]; then
  timeout 100 python3 -m tokenmill.benchmarks.kernels.fp8 gemv --output-json "$out/gemv.json" 2>&1 \
      | tee "$out/gemv.log" || rc=1
fi
if [[ " $parts " == *" latency "* ]]; then
  for variant in ${VARIANTS:-bf16 fp8}; do
    for launch in no-pdl pdl; do
      args=(--model llama-3.1-8b); [[ $variant == fp8 ]] && args+=(--quantization fp8)
      timeout 90 python3 -m tokenmill.entrypoints.cli.main bench latency "${args[@]}" --$launch \
          --load-format dummy --dtype bfloat16 --input-len 512 --output-len 128 --num-iters 2 --max-model-len 2048 \
          --max-num-seqs 8 --gpu-memory-utilization 0.5 --baseline none \
          --output-json "$out/latency_${variant}_$launch.json" 2>&1 | grep -v Warning \
          > "$out/latency_${variant}_$launch.log" || rc=1
      tail -2 "$out/latency_${variant}_$launch.log"
    done
  done
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
ms = {}
for f in sorted(out.glob("latency_*.json")):
    ms[f.stem.removeprefix("latency_")] = json.loads(f.read_text())["tokenmill"]["ms_per_token"]
for name, v in ms.items():
    print(f"{name:12s} {v:.3f} ms/token")
for launch in ("no-pdl", "pdl"):
    if f"fp8_{launch}" in ms and f"bf16_{launch}" in ms:
        print(f"fp8 / bf16 ({launch}): {ms[f'fp8_{launch}'] / ms[f'bf16_{launch}']:.3f}x")
for variant in ("bf16", "fp8"):
    if f"{variant}_pdl" in ms and f"{variant}_no-pdl" in ms:
        print(f"{variant}: pdl / no-pdl {ms[f'{variant}_pdl'] / ms[f'{variant}_no-pdl']:.3f}x")
PY
fi
if [[ " $parts " == *" tests "* ]]; then
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -x \
      tests/gpu/kernels/test_pdl.py tests/gpu/kernels/test_triton_gemv.py tests/gpu/kernels/test_attention_kernels.py \
      2>&1 | tee "$out/tests.log" | tail -15 || rc=1
fi
exit $rc
