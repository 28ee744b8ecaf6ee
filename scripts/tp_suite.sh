#!/usr/bin/env bash
# Device pass for tensor parallelism (issues 8 and 9) on a multi-GPU machine.
# Usage on the device (repo root):  bash scripts/tp_suite.sh PART
#   tests   GPU suite: kernels, single-GPU model tests and the TP tests at every rank count present
#   x2      Llama-3.1-8B batch-1 at TP=1 and TP=2; Llama-3.1-70B TP=2 batch-1 and 64 x 512/256
#   x4      Llama-3.1-70B TP=4 batch-1, 64 and 256 x 512/256; Llama-3.1-8B batch-1 at TP=1, 2, 4
#   x8      the x4 runs plus TP=8
# Carry: wheels/ (msgspec, gguf, pyzmq for Python 3.12; see scripts/gpu_suite.sh).
set -u -o pipefail
part="${1:-tests}"
out="${OUT:-./gpu_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: some parts run from another directory
export PYTHONPATH=.:/tmp/tm_wheels PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pip install --quiet --no-deps --no-index --target /tmp/tm_wheels wheels/*.whl 2>&1 | tail -1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"
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
  python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/kernels tests/gpu} -o addopts="" --durations=8 \
      2>&1 | tee "$out/tests.log" || rc=1
fi
if [[ "$part" == x2 || "$part" == tests+x2 ]]; then
  [[ "$part" == tests+x2 ]] && { timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" 2>&1 | tee "$out/tests_tp.log" || rc=1; }
  python3 scripts/copy_bandwidth.py --output-json "$out/copy.json" | tee "$out/copy.log"
  lat llama8b llama-3.1-8b 1
  lat llama8b llama-3.1-8b 2
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
  tput llama70b llama-3.1-70b 2 64
fi
if [[ "$part" == x4 || "$part" == x8 ]]; then
  python3 scripts/copy_bandwidth.py --output-json "$out/copy.json" | tee "$out/copy.log"
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
# Symmetric-memory all-reduce (fourth session), one call on a 2- or 4-GPU machine: the all-reduce
# check/benchmark at every rank count present, the TP test file (TP_TESTS_K narrows it), then
# batch-1 latency: Llama-3.1-8B TP=1, TP=2 with NCCL only and with the one-shot all-reduce, and
# Llama-3.1-70B at TP=2 (and TP=4 where there are 4 GPUs).
if [[ "$part" == symm ]]; then
  ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  for w in 2 4; do
    (( w > ngpu )) && continue
    timeout 150 python3 scripts/bench_all_reduce.py --world-size $w --output-json "$out/allreduce_w$w.json" 2>&1 \
        | tee "$out/allreduce_w$w.log" || rc=1
  done
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" -k "${TP_TESTS_K:-}" 2>&1 | tee "$out/tests_tp.log" || rc=1
  lat llama8b llama-3.1-8b 1
  TOKENMILL_SYMM_MEM_ALL_REDUCE=0 lat llama8b_nccl llama-3.1-8b 2
  lat llama8b llama-3.1-8b 2
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
  (( ngpu >= 4 )) && lat llama70b llama-3.1-70b 4
fi
# The all-reduce fused with add + RMSNorm (fifth session), on a 2- or 4-GPU machine: its check and
# benchmark, the TP logits tests, then Llama-3.1-8B batch-1 at TP=1 and at TP=2 without and with
# the fused kernel; FUSED_70B=1 adds Llama-3.1-70B batch-1 at TP=2 (and TP=4 with 4 GPUs).
if [[ "$part" == fused ]]; then
  ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  timeout 150 python3 scripts/bench_all_reduce.py --world-size 2 --output-json "$out/allreduce_w2.json" 2>&1 \
      | tee "$out/allreduce_w2.log" || rc=1
  (( ngpu >= 4 )) && { timeout 150 python3 scripts/bench_all_reduce.py --world-size 4 \
      --output-json "$out/allreduce_w4.json" 2>&1 | tee "$out/allreduce_w4.log" || rc=1; }
  [[ -n "${TP_TESTS_K:-}" ]] && { timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
      tests/gpu/test_tensor_parallel_gpu.py -o addopts="" -k "$TP_TESTS_K" 2>&1 | tee "$out/tests_tp.log" || rc=1; }
  lat llama8b llama-3.1-8b 1
  TOKENMILL_FUSED_ALL_REDUCE_NORM=0 lat llama8b_unfused llama-3.1-8b 2
  lat llama8b llama-3.1-8b 2
  if [[ -n "${FUSED_70B:-}" ]]; then
    lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
    (( ngpu >= 4 )) && lat llama70b llama-3.1-70b 4
  fi
fi
# The same on the 4-GPU machine, in one call: the check and benchmark at 4 ranks (the fused kernel
# timed there although the engine uses it at TP=2 only), Llama-3.1-70B batch-1 at TP=4, then the
# eager == graphs == graphs + async tests at TP=2 and TP=4 (three engines in one process).
if [[ "$part" == fused-x4 ]]; then
  timeout 110 python3 scripts/bench_all_reduce.py --world-size 4 --output-json "$out/allreduce_w4.json" 2>&1 \
      | tee "$out/allreduce_w4.log" || rc=1
  lat llama70b llama-3.1-70b 4
  timeout "${TESTS_TIMEOUT:-230}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" -k graphs_match_eager -o faulthandler_timeout=200 2>&1 | tee "$out/tests_tp.log" || rc=1
fi
# Last call of the fifth session (4x H200): Llama-3.1-70B batch-1 at TP=4 (one-shot sums + norm,
# the fused kernel being for TP=2 only), then eager == graphs == graphs + async at TP=2 (three
# engines in one process: the first with symmetric memory, the later two with NCCL).
if [[ "$part" == x4-last ]]; then
  lat llama70b llama-3.1-70b 4
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" -k "graphs_match_eager and 2" -o faulthandler_timeout=140 2>&1 | tee "$out/tests_tp.log" || rc=1
fi
# Async scheduling (default on CUDA) on a 4-GPU machine, in two calls of under 10 minutes:
#   async-a  TP tests (+ the single-GPU async test); Llama-3.1-8B batch-1 at TP=1, 2, 4, and TP=2 with
#            synchronous steps beside it; Llama-3.1-70B TP=2 batch-1
#   async-b  copy rate; Llama-3.1-70B TP=4 batch-1, 64 x 512/256 at TP=2 and TP=4, 256 at TP=4
if [[ "$part" == async-a ]]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      "tests/gpu/test_gpu_model.py::test_async_scheduling_matches_synchronous_steps" -o addopts="" \
      2>&1 | tee "$out/tests.log" || rc=1
  lat llama8b llama-3.1-8b 1
  lat llama8b_sync llama-3.1-8b 2 --no-async-scheduling
  lat llama8b llama-3.1-8b 2
  lat llama8b llama-3.1-8b 4
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
fi
if [[ "$part" == async-b ]]; then
  [[ -n "${TESTS:-}" ]] && { timeout 300 python3 -m pytest -q -p no:cacheprovider $TESTS -o addopts="" 2>&1 \
      | tee "$out/tests.log" || rc=1; }
  python3 scripts/copy_bandwidth.py --output-json "$out/copy.json" | tee "$out/copy.log"
  lat llama70b llama-3.1-70b 4
  tput llama70b llama-3.1-70b 4 64
  tput llama70b llama-3.1-70b 2 64
  tput llama70b llama-3.1-70b 4 256
fi
# Sixth session, on the 2-GPU machine: the pushed fused all-reduce (check + benchmark), the TP
# tests, then Llama-3.1-8B batch-1 at TP=1 and TP=2 with this tree and with the fifth session's
# code side by side (BASELINE: a directory holding that commit's `tokenmill/`, e.g. `git archive
# 5cc6e0d tokenmill | tar -x -C .baseline`), and the step profile at TP=2.
lat_in() {  # lat_in DIR NAME MODEL TP [extra]: `lat` with the tokenmill package found in DIR
  local dir=$1; shift
  ( cd "$dir" && lat "$@" )
}
if [[ "$part" == ab ]]; then
  base="${BASELINE:-.baseline}"
  timeout 150 python3 scripts/bench_all_reduce.py --world-size 2 --output-json "$out/allreduce_w2.json" 2>&1 \
      | tee "$out/allreduce_w2.log" || rc=1
  [[ -n "${TP_TESTS_K:-}" ]] && { timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
      tests/gpu/test_tensor_parallel_gpu.py -o addopts="" -k "$TP_TESTS_K" 2>&1 | tee "$out/tests_tp.log" || rc=1; }
  [[ -n "${GPU_TESTS:-}" ]] && { timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider $GPU_TESTS \
      -o addopts="" ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tee "$out/tests_gpu.log" || rc=1; }
  for tp in 1 2; do
    [[ -n "${AB_BASE:-}" ]] && lat_in "$base" llama8b_base llama-3.1-8b $tp
    lat llama8b llama-3.1-8b $tp
  done
  [[ -n "${PROFILE:-}" ]] && timeout 200 python3 -m bench.gpu_step_profile --model llama-3.1-8b --batch 1 \
      --input-len 512 --warm-steps 16 --steps 30 --max-model-len 4096 --gaps --rows 22 --tensor-parallel-size 2 \
      2>&1 | grep -v -i warn > "$out/profile_tp2.log"
fi
# Seventh session, 2-GPU machine, call 1 (ab7): the all-reduce check (now with the embeddings'
# slot), the TP tests (TP_TESTS_K), single-GPU tests (GPU_TESTS, GPU_TESTS_K) with the new kernels,
# then Llama-3.1-8B batch-1 at TP=1 and TP=2 with this tree, and TP=2 with the sixth session's code
# (BASELINE directory, see "ab"). Call 2 (x2-70b): Llama-3.1-70B TP=2 batch-1 and 64 x 512/256.
if [[ "$part" == ab7 ]]; then
  base="${BASELINE:-.baseline}"
  timeout 150 python3 scripts/bench_all_reduce.py --world-size 2 --output-json "$out/allreduce_w2.json" 2>&1 \
      | grep -v -i warn | tail -25 || rc=1
  [[ -n "${TP_TESTS_K:-}" ]] && { timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
      tests/gpu/test_tensor_parallel_gpu.py -o addopts="" -k "$TP_TESTS_K" 2>&1 | tee "$out/tests_tp.log" || rc=1; }
  [[ -n "${GPU_TESTS:-}" ]] && { timeout "${GPU_TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider $GPU_TESTS \
      -o addopts="" ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tee "$out/tests_gpu.log" || rc=1; }
  lat llama8b llama-3.1-8b 1
  lat llama8b llama-3.1-8b 2
  [[ -n "${AB_BASE:-}" ]] && lat_in "$base" llama8b_base llama-3.1-8b 2
fi
if [[ "$part" == confirm7 ]]; then  # Llama-3.1-8B batch-1 TP=1, TP=2 twice over, alternating; 70B TP=2
  for round in 1 2; do
    lat llama8b_r$round llama-3.1-8b 1
    lat llama8b_r$round llama-3.1-8b 2
  done
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
fi
if [[ "$part" == prof7 ]]; then  # batch-1 step profiles of Llama-3.1-8B at TP=1 and TP=2 (rank 0), then x2-70b
  for tp in 1 2; do
    timeout 130 python3 -m bench.gpu_step_profile --model llama-3.1-8b --batch 1 --input-len 512 --warm-steps 16 \
        --steps 30 --max-model-len 4096 --gaps --rows 30 --tensor-parallel-size $tp 2>&1 | grep -v -i warn \
        > "$out/profile_tp$tp.log" || rc=1
  done
fi
if [[ "$part" == x2-70b || "$part" == prof7 ]]; then
  python3 scripts/copy_bandwidth.py --output-json "$out/copy.json" | tail -3
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
  tput llama70b llama-3.1-70b 2 64
fi
# Eighth session, 4-GPU machine (issue 9). x4s8a: the all-reduce check and benchmark at 4 ranks (the
# pushed fused kernel's first run there), the copy rate, Llama-3.1-70B TP=4 batch-1 with one-shot
# sums + norm (the default then) and with the fused kernel (TOKENMILL_FUSED_MAX_WORLD_SIZE=4), then
# 64 x 512/256 both ways. x4s8b (FUSED4=1: fused at TP=4): the TP tests at TP=4 (TP_TESTS_K),
# 70B TP=4 at 256 concurrent, Llama-3.1-8B batch-1 at TP=1, 2, 4.
if [[ "$part" == x4s8a ]]; then
  timeout 150 python3 scripts/bench_all_reduce.py --world-size 4 --output-json "$out/allreduce_w4.json" 2>&1 \
      | grep -v -i warn | tail -30 || rc=1
  python3 scripts/copy_bandwidth.py --output-json "$out/copy.json" | tail -3
  lat llama70b llama-3.1-70b 4
  TOKENMILL_FUSED_MAX_WORLD_SIZE=4 lat llama70b_fused llama-3.1-70b 4
  TOKENMILL_FUSED_MAX_WORLD_SIZE=4 tput llama70b_fused llama-3.1-70b 4 64
  tput llama70b llama-3.1-70b 4 64
fi
if [[ "$part" == x4s8b ]]; then
  [[ -n "${FUSED4:-}" ]] && export TOKENMILL_FUSED_MAX_WORLD_SIZE=4
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" -k "${TP_TESTS_K:-}" -o faulthandler_timeout=230 2>&1 | tee "$out/tests_tp.log" || rc=1
  tput llama70b llama-3.1-70b 4 256
  for tp in 1 2 4; do lat llama8b llama-3.1-8b $tp; done
fi
# x4s8c: the TP logits test at TP=4 (TP_TESTS_K), then Llama-3.1-70B batch-1 at TP=2 and TP=4 side by side.
if [[ "$part" == x4s8c ]]; then
  timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py \
      -o addopts="" -k "${TP_TESTS_K:-}" 2>&1 | tee "$out/tests_tp.log" || rc=1
  lat llama70b llama-3.1-70b 2 --gpu-memory-utilization 0.92
  lat llama70b llama-3.1-70b 4
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    if r.get("benchmark") == "latency":
        rows.append(f"{os.path.basename(path)}: {r['tokenmill']['ms_per_token']:.2f} ms/token, "
                    f"{r['tokenmill']['weight_gb_per_s']:.0f} GB/s per GPU")
    elif r.get("benchmark") == "throughput":
        rows.append(f"{os.path.basename(path)}: {r['tokenmill']['output_tok_per_s']:.0f} output tok/s")
print("\n".join(rows))
PY
exit $rc
