#!/usr/bin/env bash
# Device pass for tensor parallelism on a multi-GPU machine.
# Usage on the device (repo root):  bash tokenmill/benchmarks/suites/tp_suite.sh PART
#   tests   GPU suite: kernels, single-GPU model tests and the TP tests at every rank count present
#   x2      Llama-3.1-8B batch-1 at TP=1 and TP=2; Llama-3.1-70B TP=2 batch-1 and 64 x 512/256
#   x4      Llama-3.1-70B TP=4 batch-1, 64 and 256 x 512/256; Llama-3.1-8B batch-1 at TP=1, 2, 4
#   x8      the x4 runs plus TP=8
#   ablate  NCCL only / one-shot all-reduce / fused all-reduce + norm, Llama-3.1-8B batch-1 at TP=2 and 4
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
part="${1:-tests}"
source "$(dirname "$0")/device_setup.sh" ./gpu_out
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Each run is bounded (STEP_TIMEOUT s) so one hang cannot eat the whole device call.
tm() { timeout "${STEP_TIMEOUT:-240}" python3 -m tokenmill.entrypoints.cli.main "$@" 2>&1 | grep -v -i warning; }
rc=0
lat() {  # lat NAME MODEL TP [extra args]
  local name=$1 model=$2 tp=$3; shift 3
  tm bench latency --model "$model" --load-format dummy --dtype bfloat16 --input-len 512 --output-len 256 \
     --max-model-len 4096 --max-num-seqs 16 --tensor-parallel-size "$tp" --baseline none \
     --output-json "$out/latency_${name}_tp${tp}.json" "$@" | tee -a "$out/run.log" || rc=1
}
tput() {  # tput NAME MODEL TP NUM_PROMPTS
  local name=$1 model=$2 tp=$3 n=$4
  tm bench throughput --model "$model" --load-format dummy --dtype bfloat16 --workload random \
     --num-prompts "$n" --input-len 512 --output-len 256 --max-model-len 4096 --max-num-seqs "$n" \
     --tensor-parallel-size "$tp" --baseline none --output-json "$out/tput_${name}_tp${tp}_n${n}.json" \
     | tee -a "$out/run.log" || rc=1
}
if [[ "$part" == tests ]]; then
  python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu} -o addopts="" --durations=8 \
      2>&1 | tee "$out/tests.log" || rc=1
fi
if [[ "$part" == x2 || "$part" == tests+x2 ]]; then
  [[ "$part" == tests+x2 ]] && { timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" 2>&1 | tee "$out/tests_tp.log" || rc=1; }
  python3 -m tokenmill.benchmarks.kernels.copy_bandwidth --output-json "$out/copy.json" | tee "$out/copy.log"
  lat llama8b llama-3.1-8b 1
  lat llama8b llama-3.1-8b 2
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
  tput llama70b llama-3.1-70b 2 64
fi
if [[ "$part" == x4 || "$part" == x8 ]]; then
  python3 -m tokenmill.benchmarks.kernels.copy_bandwidth --output-json "$out/copy.json" | tee "$out/copy.log"
  sizes="4"; [[ "$part" == x8 ]] && sizes="4 8"
  for tp in $sizes; do
    lat llama70b llama-3.1-70b "$tp"
    tput llama70b llama-3.1-70b "$tp" 64
    [[ -z "${QUICK:-}" ]] && tput llama70b llama-3.1-70b "$tp" 256
  done
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py -o addopts="" -k "${TP_TESTS_K:-}" \
      2>&1 | tee "$out/tests_tp.log" || rc=1
  small="1 2 4"; [[ -n "${QUICK:-}" ]] && small="4"; [[ "$part" == x8 ]] && small="1 2 4 8"
  for tp in $small; do lat llama8b llama-3.1-8b "$tp"; done
fi
# The communicator's paths one by one, at TP=2 (and 4): the all-reduce check and benchmark, then
# Llama-3.1-8B batch-1 with NCCL only, with the one-shot all-reduce but no fused norm, and with both.
if [[ "$part" == ablate ]]; then
  ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  for w in 2 4; do
    (( w > ngpu )) && continue
    timeout 150 python3 -m tokenmill.benchmarks.kernels.all_reduce --world-size $w --output-json "$out/allreduce_w$w.json" 2>&1 \
        | tee "$out/allreduce_w$w.log" || rc=1
  done
  lat llama8b llama-3.1-8b 1
  for tp in 2 4; do
    (( tp > ngpu )) && continue
    lat llama8b_nccl llama-3.1-8b $tp --disable-custom-all-reduce
    lat llama8b_unfused llama-3.1-8b $tp --no-fused-all-reduce-norm
    lat llama8b llama-3.1-8b $tp
  done
fi
exit $rc
