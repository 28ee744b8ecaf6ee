#!/usr/bin/env bash
# The GPU tests of the model families (MoE + MLA, fp8 weights, sliding windows + hybrid, RL) in one
# device call: three lanes side by side (moe, fp8, mla then hybrid: mostly Triton compiles and tiny
# models, at most 0.3 of the GPU's memory per engine), then the RL tests alone, since they read the
# device's free memory around sleep. Side by side, an engine's start-up profile may count memory
# another lane took meanwhile as its own ("no memory left for the cache"; seen on an 80 GB H100,
# not on an H200, whose 141 GB hold the three lanes): rerun that lane alone. Each family's suite
# (moe_suite.sh, mla_suite.sh, fp8_suite.sh, hybrid_suite.sh, rl_suite.sh) runs the same files one
# by one, with its benchmarks. About 8 minutes on an H200 with GROUP_TIMEOUT=390 RL_TIMEOUT=150.
# Usage (repo root, one GPU):  bash tokenmill/benchmarks/suites/family_tests.sh [GROUP...]
#   groups: moe mla fp8 hybrid rl (default all). GROUP_TIMEOUT (default 360 s a lane), RL_TIMEOUT
#   (150 s); with pytest-timeout installed (carried in wheels/), TEST_TIMEOUT (150 s) per test.
# Carry: wheels/ (device_setup.sh installs them). Logs: $OUT/<group>.log, a summary last.
set -u -o pipefail
source "$(dirname "$0")/device_setup.sh" ./gpu_out
groups="${*:-moe mla fp8 hybrid rl}"
files() {
  case $1 in
    moe) echo tests/gpu/kernels/test_fused_moe.py tests/gpu/kernels/test_moe_routing.py tests/gpu/test_moe_gpu.py ;;
    mla) echo tests/gpu/kernels/test_mla_decode.py tests/gpu/test_mla_gpu.py ;;
    fp8) echo tests/gpu/kernels/test_fp8_kernels.py tests/gpu/kernels/test_fused_moe_fp8.py tests/gpu/test_fp8_weights_gpu.py ;;
    hybrid) echo tests/gpu/kernels/test_sliding_window_kernels.py tests/gpu/kernels/test_lightning_attention.py \
                 tests/gpu/test_hybrid_gpu.py tests/gpu/kernels/test_batch_invariant_kernels.py ;;
    rl) echo tests/gpu/test_rl_gpu.py ;;
  esac
}
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_TIMEOUT:-150}")
run_group() {  # run_group NAME TIMEOUT
  # The fp8 no-compiles test starts its own engine on a fresh Triton cache (minutes): fp8_suite.sh
  # compiles. K_<group> (e.g. K_mla) replaces the -k selection for that group.
  local k_var="K_$1"
  timeout "$2" python3 -m pytest -v --tb=short -p no:cacheprovider -o addopts="" --durations=8 "${per_test[@]}" \
      -k "${!k_var:-not compile_nothing}" $(files "$1") > "$out/$1.log" 2>&1
  echo "$1 rc=$?" >> "$out/rc.txt"
}
lane() {  # lane TIMEOUT GROUP...: the groups one after another, within TIMEOUT together
  local end=$(( SECONDS + $1 )); shift
  for g in "$@"; do (( end - SECONDS > 10 )) && run_group "$g" $(( end - SECONDS )); done
}
: > "$out/rc.txt"
# Three lanes of about equal length on an H100 (2026-12-07: moe 313 s, fp8 321 s, mla 305 s, then
# hybrid 83 s with a warm cache): moe; fp8; mla then hybrid.
selected() { local g; for g in "$@"; do [[ " $groups " == *" $g "* ]] && echo "$g"; done; }
for lane_groups in "moe" "fp8" "mla hybrid"; do
  picked=($(selected $lane_groups))
  (( ${#picked[@]} )) && lane "${GROUP_TIMEOUT:-360}" "${picked[@]}" &
done
wait
[[ " $groups " == *" rl "* ]] && run_group rl "${RL_TIMEOUT:-150}"
echo "=== summary ($(tail -1 "$out/device.txt"))"
for g in $groups; do
  echo "--- $g: $(grep "^$g rc" "$out/rc.txt")"
  grep -E "^(FAILED|ERROR)|Timeout|[0-9]+ (passed|failed)" "$out/$g.log" | cut -c1-200 | tail -14
done
! grep -qv "rc=0$" "$out/rc.txt"
