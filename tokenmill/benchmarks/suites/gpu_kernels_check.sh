#!/usr/bin/env bash
# Device command for the Triton kernels: correctness tests, then the micro-benchmark.
# Run from the repo root on the GPU machine:  bash tokenmill/benchmarks/suites/gpu_kernels_check.sh
# Logs go to $OUT (the device tool's return folder) when set, else to ./gpu_kernels_out.
set -u -o pipefail
out_dir="${OUT:-./gpu_kernels_out}"
mkdir -p "$out_dir"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
date -u | tee "$out_dir/date.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out_dir/date.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu/kernels/test_triton_ops.py tests/gpu/kernels/test_attention_kernels.py \
    -o addopts="" --durations=8 2>&1 | tee "$out_dir/tests.log"
tests_rc=$?
python3 -m tokenmill.benchmarks.kernels.attention_kernels --json "$out_dir/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$out_dir/bench.log"
bench_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
