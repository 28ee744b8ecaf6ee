#!/usr/bin/env bash
# Device pass for programmatic dependent launch (ops/pdl.py), one H100/H200:
#   gemv     the Llama-3.1-8B batch-1 weight set through the bf16 and fp8 GEMVs, each in one CUDA
#            graph, ordinary launches beside dependent ones (benchmarks/kernels/fp8.py gemv)
#   latency  fp8_suite.sh's batch-1 decode (Llama-3.1-8B shape, 512/128, bf16, online fp8, block-FP8,
#            dummy weights) with --no-pdl, then with --pdl (in $OUT/no-pdl, $OUT/pdl)
#   tests    the PDL chain tests (tests/gpu/kernels/test_pdl.py), then the GEMV and attention-kernel tests
#   sweep    the fp8 GEMV's launch configurations timed with dependent launches; the winners are
#            written into ops/gemv_configs.py's TUNED_FP8_PDL table for the GPU (a copy in $OUT), so a `latency` after
#            it in the same call runs them
# Usage (repo root), one call per line, each under 10 minutes:
#   bash tokenmill/benchmarks/suites/pdl_suite.sh tests gemv   # (~5 min: the tests alone took over 150 s on an H100, 2026-12-07)
#   bash tokenmill/benchmarks/suites/pdl_suite.sh latency      # (~7 min)
# LAUNCHES ("no-pdl pdl" by default) and LATENCY_VARIANTS (fp8_suite.sh's) narrow `latency`, e.g. "bf16 fp8" to fit one call with `tests`.
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
parts="${*:-tests gemv}"
source "$(dirname "$0")/device_setup.sh" ./pdl_out
rc=0
if [[ " $parts " == *" tests "* ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -x \
      tests/gpu/kernels/test_pdl.py tests/gpu/kernels/test_triton_gemv.py tests/gpu/kernels/test_attention_kernels.py \
      2>&1 | tee "$out/tests.log" | tail -15 || rc=1
fi
if [[ " $parts " == *" gemv "* ]]; then
  timeout 100 python3 -m tokenmill.benchmarks.kernels.fp8 gemv --output-json "$out/gemv.json" 2>&1 \
      | tee "$out/gemv.log" || rc=1
fi
if [[ " $parts " == *" sweep "* ]]; then
  # The full grid's compile alone outlasted 280 s; by default only the configurations among the six
  # fastest of any shape in the ordinary sweep (33 of 183). SWEEP_GRID=full for all.
  grid=(--grid-from docs/results/fp8-gemv-h100-2026-12-07/sweep.json)
  [[ "${SWEEP_GRID:-}" == full ]] && grid=()
  timeout "${SWEEP_TIMEOUT:-300}" python3 -m tokenmill.benchmarks.kernels.fp8 gemv-sweep --pdl "${grid[@]}" \
      --write-table --output-json "$out/sweep_pdl.json" 2>&1 \
      | grep -v -i warning | tee "$out/sweep_pdl.log" | tail -14 || rc=1
  cp tokenmill/ops/gemv_configs.py "$out/"
fi
if [[ " $parts " == *" latency "* ]]; then
  # fp8_suite.sh's latency part (bf16, online fp8, block-FP8), once with each launch mode.
  for launch in ${LAUNCHES:-no-pdl pdl}; do
    OUT="$out/$launch" LATENCY_ARGS="--$launch" bash "$(dirname "$0")/fp8_suite.sh" latency | tail -3 || rc=1
  done
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for variant in ("bf16", "fp8", "block-fp8"):
    ms = {}
    for launch in ("no-pdl", "pdl"):
        f = out / launch / f"latency_{variant}.json"
        if f.exists():
            ms[launch] = json.loads(f.read_text())["tokenmill"]["ms_per_token"]
    if len(ms) == 2:
        print(f"{variant:9s}: {ms['no-pdl']:.3f} -> {ms['pdl']:.3f} ms/token with PDL ({ms['pdl'] / ms['no-pdl']:.3f}x)")
PY
fi
exit $rc
