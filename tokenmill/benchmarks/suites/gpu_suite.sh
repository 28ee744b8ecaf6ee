#!/usr/bin/env bash
# Device pass for the GPU engine: install carried wheels, run the GPU tests, then the benchmarks.
# Usage on the device (repo root):  bash tokenmill/benchmarks/suites/gpu_suite.sh [tests|bench1|bench2|prefix|async|async2|gemv|profile|timeline|fp8|fp8-qwen8b|tune|prefixtime|cascade|all]
#   async, async2: the workloads with synchronous steps and with async scheduling, side by side
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
part="${1:-all}"
source "$(dirname "$0")/device_setup.sh" ./gpu_out
tm() { python3 -m tokenmill.entrypoints.cli.main "$@"; }
rc=0
gpu_tests() {  # gpu_tests DEFAULT_SELECTION: pytest on $TESTS (or the default; none if empty) -> tests.log
  # TESTS is split on spaces (paths, node ids); a -k expression goes in TESTS_K, passed as one argument.
  local sel="${TESTS:-$1}"
  [[ -z "$sel" ]] && return
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider $sel ${TESTS_K:+-k "$TESTS_K"} -o addopts="" \
      --durations=5 2>&1 | tee "$out/tests.log" || rc=1
}
if [[ "$part" == tests || "$part" == all ]]; then
  gpu_tests "tests/gpu"
fi
if [[ "$part" == bench1 || "$part" == all ]]; then
  # 1. Batch-1 decode, Llama-3.1-8B shape, 512 in / 256 out, beside HF generate().
  tm bench latency --model llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 512 \
      --output-len 256 --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.5 \
      --output-json "$out/latency_llama8b.json" 2>&1 | grep -v Warning | tee "$out/latency_llama8b.log" || rc=1
  # 2. Fixed-length offline batch, 256 x 256 in / 256 out, Qwen3-0.6B shape, beside HF at batch 256.
  tm bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 256 --input-len 256 --output-len 256 --hf-batch-size 256 --max-model-len 1024 \
      --gpu-memory-utilization 0.5 --output-json "$out/tput_qwen06b.json" 2>&1 | grep -v Warning \
      | tee "$out/tput_qwen06b.log" || rc=1
  # 3. The nano-vllm workload on the Qwen3-0.6B shape (absolute target; HF would take too long).
  tm bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload nanovllm \
      --baseline none --output-json "$out/nanovllm_qwen06b.json" 2>&1 | grep -v Warning \
      | tee "$out/nanovllm_qwen06b.log" || rc=1
fi
if [[ "$part" == bench2 || "$part" == all ]]; then
  # 2b. Fixed-length offline batch, Llama-3.1-8B shape, beside HF at batch 256.
  tm bench throughput --model llama-3.1-8b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 256 --input-len 256 --output-len 256 --hf-batch-size 256 --max-model-len 1024 \
      --gpu-memory-utilization 0.55 --output-json "$out/tput_llama8b.json" 2>&1 | grep -v Warning \
      | tee "$out/tput_llama8b.log" || rc=1
  # 4. Qwen3-8B shape, 1024 in / 2048 out, 200 prompts.
  tm bench throughput --model qwen3-8b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 200 --input-len 1024 --output-len 2048 --max-model-len 3072 --baseline none \
      --output-json "$out/tput_qwen8b.json" 2>&1 | grep -v Warning | tee "$out/tput_qwen8b.log" || rc=1
fi
if [[ "$part" == prefix ]]; then
  gpu_tests ""
  # Prefix reuse: Llama-3.1-8B shape, 2048 in / 128 out, shared-prefix hit rates 0/25/50/75%.
  # KV=fp8 runs it with an fp8 KV cache (both arms, cache on and off).
  tm bench prefix --workload hit-rate --model llama-3.1-8b --load-format dummy --dtype bfloat16 \
      --num-prompts 128 --input-len 2048 --output-len 128 --max-model-len 4096 --kv-cache-dtype "${KV:-auto}" \
      --output-json "$out/prefix_llama8b_${KV:-auto}.json" 2>&1 | grep -v Warning | tee "$out/prefix_llama8b.log" || rc=1
fi
ab() {  # ab NAME ARGS...: one benchmark with synchronous steps, then with async scheduling
  local name=$1; shift
  for mode in no-async-scheduling async-scheduling; do
    timeout "${STEP_TIMEOUT:-200}" python3 -m tokenmill.entrypoints.cli.main "$@" --$mode \
        --output-json "$out/${name}_${mode%%-scheduling}.json" 2>&1 | grep -v Warning \
        | tee "$out/${name}_${mode%%-scheduling}.log" || rc=1
  done
}
if [[ "$part" == async ]]; then
  gpu_tests tests/gpu
  ab latency_llama8b bench latency --model llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 512 \
      --output-len 256 --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.5 --baseline none
  ab tput_qwen06b bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 256 --input-len 256 --output-len 256 --max-model-len 1024 --gpu-memory-utilization 0.5 \
      --baseline none
  ab nanovllm_qwen06b bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 \
      --workload nanovllm --baseline none
  # HF generate() beside the async run (same process), for the 10x target.
  tm bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 256 --input-len 256 --output-len 256 --hf-batch-size 256 --max-model-len 1024 \
      --gpu-memory-utilization 0.5 --output-json "$out/tput_qwen06b_hf.json" 2>&1 | grep -v Warning \
      | tee "$out/tput_qwen06b_hf.log" || rc=1
fi
if [[ "$part" == async2 ]]; then
  gpu_tests ""
  ab tput_llama8b bench throughput --model llama-3.1-8b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 256 --input-len 256 --output-len 256 --max-model-len 1024 --gpu-memory-utilization 0.55 \
      --baseline none
  tm bench throughput --model qwen3-8b --load-format dummy --dtype bfloat16 --workload random \
      --num-prompts 200 --input-len 1024 --output-len 2048 --max-model-len 3072 --baseline none \
      --output-json "$out/tput_qwen8b.json" 2>&1 | grep -v Warning | tee "$out/tput_qwen8b.log" || rc=1
fi
if [[ "$part" == gemv ]]; then
  # Batch-1 GEMV: kernel test, per-shape and whole-weight-set comparison with cuBLAS, then the
  # Llama-3.1-8B batch-1 latency with cuBLAS and with the Triton GEMV, one after the other.
  gpu_tests tests/gpu/kernels/test_triton_gemv.py
  [[ -z "${SKIP_MICRO:-}" ]] && { timeout 200 python3 -m tokenmill.benchmarks.kernels.gemv --output-json "$out/gemv.json" 2>&1 \
      | tee "$out/gemv.log" || rc=1; }
  for g in no-triton-gemv triton-gemv; do
    timeout 200 python3 -m tokenmill.entrypoints.cli.main bench latency --$g \
        --model llama-3.1-8b --load-format dummy --dtype bfloat16 --input-len 512 --output-len 256 \
        --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.5 --baseline none \
        --output-json "$out/latency_llama8b_gemv$g.json" 2>&1 | grep -v Warning | tee "$out/latency_llama8b_gemv$g.log" || rc=1
  done
fi
if [[ "$part" == profile ]]; then
  # Where the host's time goes at batch 256 with async scheduling: cProfile of the Qwen3-0.6B
  # 256 x 256/256 run (profiling slows Python ~1.5x; read the shares, not the total).
  python3 -m cProfile -o "$out/qwen06b.prof" -m tokenmill.entrypoints.cli.main bench throughput \
      --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random --num-prompts 256 \
      --input-len 256 --output-len 256 --max-model-len 1024 --gpu-memory-utilization 0.5 --baseline none \
      2>&1 | grep -v Warning | tee "$out/profile.log"
  python3 -c "import pstats,sys; s=pstats.Stats(sys.argv[1]); s.sort_stats('tottime').print_stats(45); \
s.sort_stats('cumulative').print_stats(45)" "$out/qwen06b.prof" > "$out/profile_top.txt" 2>&1
fi
if [[ "$part" == timeline ]]; then
  # Where the Qwen3-0.6B 256 x 256/256 run's wall time goes (prefill-carrying vs decode steps,
  # Triton compiles inside the timed region), at the default token budget and larger ones.
  for budget in ${BUDGETS:-default 8192 16384}; do
    extra=(); [[ "$budget" != default ]] && extra=(--max-num-batched-tokens "$budget")
    timeout 200 python3 -m tokenmill.benchmarks.step_timeline --model qwen3-0.6b --num-prompts 256 --input-len 256 \
        --output-len 256 "${extra[@]}" --output-json "$out/timeline_$budget.json" 2>&1 | grep -v Warning \
        | tee "$out/timeline_$budget.log" || rc=1
  done
fi
if [[ "$part" == fp8 ]]; then
  # fp8 KV cache kernels against torch_native; batch-1 latency with the (default) graph GEMV run
  # first in its call; Qwen3-0.6B 256 x 256/256 beside HF (bf16 KV), then with an fp8 KV cache.
  TESTS="${TESTS:-tests/gpu/kernels/test_attention_kernels.py -k fp8}" gpu_tests ""
  timeout 120 python3 -m tokenmill.entrypoints.cli.main bench latency --model llama-3.1-8b --load-format dummy \
      --dtype bfloat16 --input-len 512 --output-len 256 --max-model-len 4096 --max-num-seqs 8 \
      --gpu-memory-utilization 0.5 --baseline none --output-json "$out/latency_llama8b.json" 2>&1 \
      | grep -v Warning | tee "$out/latency_llama8b.log" || rc=1
  for kv in auto fp8; do
    base=hf; [[ $kv == fp8 ]] && base=none
    timeout 150 python3 -m tokenmill.entrypoints.cli.main bench throughput --model qwen3-0.6b --load-format dummy \
        --dtype bfloat16 --workload random --num-prompts 256 --input-len 256 --output-len 256 --hf-batch-size 256 \
        --max-model-len 1024 --gpu-memory-utilization 0.5 --kv-cache-dtype $kv --baseline $base \
        --output-json "$out/tput_qwen06b_$kv.json" 2>&1 | grep -v Warning | tee "$out/tput_qwen06b_$kv.log" || rc=1
  done
fi
if [[ "$part" == fp8-qwen8b ]]; then
  # Qwen3-8B shape, 200 x 1024 in / 2048 out, with an fp8 KV cache and then the bf16 cache.
  for kv in fp8 auto; do
    timeout 135 python3 -m tokenmill.entrypoints.cli.main bench throughput --model qwen3-8b --load-format dummy \
        --dtype bfloat16 --workload random --num-prompts 200 --input-len 1024 --output-len 2048 \
        --max-model-len 3072 --kv-cache-dtype $kv --baseline none --output-json "$out/tput_qwen8b_$kv.json" 2>&1 \
        | grep -v Warning | tee "$out/tput_qwen8b_$kv.log" || rc=1
  done
fi
if [[ "$part" == tune ]]; then
  # The batch-1 GEMV configurations timed in CUDA graphs at Llama-3.1-8B's
  # TP=2 and TP=1 shapes; bf16 against fp8 KV caches at the prefix benchmark's shapes (kernels, then
  # decode steps of 128 x ~2k-token contexts profiled in the engine); the fp8 and no-compile tests.
  timeout 260 python3 -m tokenmill.benchmarks.kernels.gemv --graph-sweep --output-json "$out/gemv_graph_sweep.json" 2>&1 \
      | grep -v -i warn || rc=1
  timeout 150 python3 -m tokenmill.benchmarks.kernels.attention_kernels --kv-compare --json "$out/kv_compare.json" 2>&1 || rc=1
  for kv in auto fp8; do
    timeout 150 python3 -m tokenmill.benchmarks.gpu_step_profile --model llama-3.1-8b --batch 128 --input-len 2048 --warm-steps 4 \
        --steps 3 --rows 14 --kv-cache-dtype $kv 2>&1 | grep -v -i warn > "$out/profile_b128_$kv.log" || rc=1
  done
  gpu_tests ""
fi
if [[ "$part" == prefixtime ]]; then
  # Where the prefix benchmark's time goes at 75% hit. The decode kernel
  # with 0-75% of every context in shared blocks; then the hit-rate workload step by step (prefill
  # steps vs decode steps), cache on and off.
  timeout 150 python3 -m tokenmill.benchmarks.kernels.attention_kernels --shared-prefix --json "$out/shared_prefix.json" 2>&1 \
      | grep -v -i warn || rc=1
  for arm in on off; do
    flag=(); [[ $arm == off ]] && flag=(--no-prefix-caching)
    timeout 200 python3 -m tokenmill.benchmarks.step_timeline --model llama-3.1-8b --num-prompts 128 --input-len 2048 \
        --output-len 128 --max-model-len 4096 --gpu-memory-utilization 0.9 --shared-pct "${PCT:-75}" "${flag[@]}" \
        --output-json "$out/timeline_prefix${PCT:-75}_$arm.json" 2>&1 | grep -v Warning | head -40 || rc=1
  done
  gpu_tests ""
fi
if [[ "$part" == cascade ]]; then
  # Cascade attention: kernel tests, then plain vs cascade decode with a
  # shared prefix, then the prefix benchmark (cascade on: the default).
  gpu_tests "tests/gpu/kernels/test_cascade_attention.py"
  [[ -z "${NO_KERNELS:-}" ]] && { timeout 200 python3 -m tokenmill.benchmarks.kernels.attention_kernels --shared-prefix \
      --json "$out/cascade_kernels.json" 2>&1 | grep -v -i warn || rc=1; }
  tm bench prefix --workload hit-rate --model llama-3.1-8b --load-format dummy --dtype bfloat16 \
      --num-prompts 128 --input-len 2048 --output-len 128 --max-model-len 4096 --kv-cache-dtype "${KV:-auto}" \
      --output-json "$out/prefix_llama8b_${KV:-auto}.json" 2>&1 | grep -v Warning | tee "$out/prefix_llama8b.log" || rc=1
fi
exit $rc
