#!/usr/bin/env bash
# Device pass for the mixture-of-experts work: the MoE GPU tests, the fused-MoE kernel
# micro-benchmark with its launch-config sweep, and the Qwen3-30B-A3B serving set (dummy bf16
# weights): batch-1 decode 512/256 vs its bytes-read floor, 100 x 2048/1024 at 10 in flight (mean
# TPOT), offline 256 x 1024/1024 vs HF generate(). Results under $OUT; a short table last.
# Usage (repo root, one H100):  bash tokenmill/benchmarks/suites/moe_suite.sh [tests|kernels|gemv-sweep|tune|attention-ab|layer|profile|model|decode-flags|decode-ab|batch10-ab|all]
#   ~2.5 min tests, ~2.5 min kernels, ~4 min model (one engine start of the 30B shape + HF).
#   gemv-sweep: the token-by-token path's configurations (Qwen3-30B-A3B experts), the winners
#   written into ops/fused_moe_configs.py (a copy in $OUT), so a later part in the call runs them.
#   tune (~5 min): batch-1 decode's launch configurations of the Qwen3-30B-A3B shape on this GPU, each
#   sweep's winners written into its table (copies in $OUT): the dense GEMVs launched dependent
#   (benchmarks/kernels/gemv.py --graph-sweep --model), the one-launch router (--router-sweep), and
#   the experts' token-by-token kernels where this GPU's table lacks them (--gemv-sweep; EXPERTS_SWEEP=no: not).
#   attention-ab: batch-1 decode's attention kernels a layer (benchmarks/kernels/batch1_attention.py),
#   this tree's and then $BASELINE's, side by side.
#   layer: batch-1 decode's decoder layer kernel by kernel in one graph (benchmarks/kernels/batch1_layer.py):
#   as served and with L2 prefetches, GEMV tiles; then the O and QKV GEMVs' tiles swept inside it.
#   profile: per-kernel GPU time of a decode step without dependent launches (gpu_step_profile
#   --no-pdl --gaps) at batch 1 (600-token contexts) and at batch 10 (2,560-token contexts, the
#   10-in-flight load's mean); with $BASELINE set, batch 1 also for that tree.
#   decode-flags: batch-1 decode only, this tree as served and then with the engine flags $FLAGS,
#   one engine start each.
#   batch10-ab: ten requests decoding together (2,560-token prompts, the 10-in-flight load's mean
#   context), ms a step, this tree and then $BASELINE's (`bench latency --batch-size 10`).
#   PROFILE_ARGS adds flags to the batch-10 profile (--stacks); PROFILE_BATCH1=no skips batch 1.
#   decode-ab: batch-1 decode only, this tree and then the one in $BASELINE (another commit's
#   `tokenmill/`, carried), alternating ROUNDS times (default 2); this one first, so a call cut
#   short still has its figure.
#   MOE_SHAPES / SWEEP_SHAPES choose the micro-benchmark's shapes; MODEL_ARGS adds engine flags.
# Carry: wheels/ (device_setup.sh installs them), and $BASELINE for decode-ab.
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
if [[ "$part" == gemv-sweep ]]; then
  timeout "${SWEEP_TIMEOUT:-240}" python3 -m tokenmill.benchmarks.kernels.fused_moe --shapes qwen3-30b-a3b \
      --gemv-sweep --write-table --output-json "$out/gemv_sweep.json" 2>&1 | grep -v -i warning \
      | tee "$out/gemv_sweep.log" || rc=1
  cp tokenmill/ops/fused_moe_configs.py "$out/fused_moe_configs.py.txt"
fi
if [[ "$part" == tune ]]; then
  timeout "${DENSE_SWEEP_TIMEOUT:-300}" python3 -m tokenmill.benchmarks.kernels.gemv --graph-sweep --model qwen3-30b-a3b \
      --pdl --write-table --output-json "$out/dense_gemv_sweep.json" 2>&1 | grep -v -i warning \
      | tee "$out/dense_gemv_sweep.log" || rc=1
  cp tokenmill/ops/gemv_configs.py "$out/gemv_configs.py.txt"
  experts_sweep=$(python3 -c "import torch; from tokenmill.ops import fused_moe_configs as c
print('' if (128, 2048, 768, 2, 8) in c.TUNED_GEMV.get(torch.cuda.get_device_name(), {}) else '--gemv-sweep')")
  [[ "${EXPERTS_SWEEP:-auto}" == no ]] && experts_sweep=""
  timeout "${ROUTER_SWEEP_TIMEOUT:-300}" python3 -m tokenmill.benchmarks.kernels.fused_moe --shapes qwen3-30b-a3b \
      --router-sweep $experts_sweep --write-table --no-rows --output-json "$out/router_sweep.json" 2>&1 \
      | grep -v -i warning | tee "$out/router_sweep.log" || rc=1
  cp tokenmill/ops/fused_moe_configs.py "$out/fused_moe_configs.py.txt"
fi
if [[ "$part" == attention-ab ]]; then
  base="$(cd "${BASELINE:?set BASELINE to the other tree}" && pwd)"
  timeout 150 python3 -m tokenmill.benchmarks.kernels.batch1_attention --json "$out/b1_attention_this.json" 2>&1 \
      | grep -v -i warning > "$out/b1_attention_this.log" || rc=1
  PYTHONPATH="$base:/tmp/tm_wheels" timeout 150 python3 tokenmill/benchmarks/kernels/batch1_attention.py \
      --json "$out/b1_attention_baseline.json" 2>&1 | grep -v -i warning > "$out/b1_attention_baseline.log" || rc=1
  paste -d'|' "$out/b1_attention_this.log" "$out/b1_attention_baseline.log" | tee "$out/b1_attention_ab.log"
fi
if [[ "$part" == layer ]]; then
  timeout "${LAYER_TIMEOUT:-200}" python3 -m tokenmill.benchmarks.kernels.batch1_layer --json "$out/layer.json" 2>&1 \
      | grep -v -i warning | tee "$out/layer.log" || rc=1
  for gemv in o qkv; do
    timeout "${LAYER_TIMEOUT:-200}" python3 -m tokenmill.benchmarks.kernels.batch1_layer --sweep $gemv \
        --json "$out/layer_${gemv}_sweep.json" 2>&1 | grep -v -i warning | tee "$out/layer_${gemv}_sweep.log" || rc=1
  done
fi
if [[ "$part" == profile ]]; then
  prof="python3 -m tokenmill.benchmarks.gpu_step_profile --model qwen3-30b-a3b --gpu-memory-utilization 0.9 --max-model-len 4096 --no-pdl --gaps"
  timeout "${PROFILE_TIMEOUT:-150}" $prof --batch 10 --input-len 2560 ${PROFILE_ARGS:-} 2>&1 | grep -v -i warning \
      > "$out/profile_b10_nopdl.log" || rc=1
  [[ "${PROFILE_BATCH1:-yes}" == no ]] || timeout "${PROFILE_TIMEOUT:-150}" $prof --batch 1 --input-len 600 2>&1 \
      | grep -v -i warning > "$out/profile_b1_nopdl_this.log" || rc=1
  if [[ -n "${BASELINE:-}" ]]; then
    base="$(cd "$BASELINE" && pwd)"
    ( cd "$base" && PYTHONPATH="$base:/tmp/tm_wheels" timeout "${PROFILE_TIMEOUT:-150}" $prof --batch 1 --input-len 600 2>&1 \
        | grep -v -i warning > "$out/profile_b1_nopdl_baseline.log" ) || rc=1
  fi
fi
if [[ "$part" == decode-flags ]]; then
  : "${FLAGS:?set FLAGS to the engine flags to compare}"
  for label in default flags; do
    extra=$([[ $label == flags ]] && echo "$FLAGS" || echo "")
    timeout "${DECODE_TIMEOUT:-200}" python3 -m tokenmill.entrypoints.cli.main bench moe --model qwen3-30b-a3b \
        --load-format dummy --dtype bfloat16 --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.9 \
        --parts decode $extra --output-json "$out/decode_${label}.json" 2>&1 | grep -E "^batch-1" \
        | sed "s/^/$label ($extra): /" | tee -a "$out/decode_flags.log" || rc=1
  done
fi
if [[ "$part" == batch10-ab ]]; then
  here="$(pwd)"
  base="$(cd "${BASELINE:?set BASELINE to the other tree}" && pwd)"
  for tree in "$here" "$base"; do
    label=$([[ $tree == "$here" ]] && echo this || echo baseline)
    ( cd "$tree" && PYTHONPATH="$tree:/tmp/tm_wheels" timeout "${DECODE_TIMEOUT:-200}" python3 -m \
        tokenmill.entrypoints.cli.main bench latency --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
        --batch-size 10 --input-len 2560 --output-len 128 --num-iters 2 --baseline none --max-model-len 4096 \
        --max-num-seqs 16 --gpu-memory-utilization 0.9 ${MODEL_ARGS:-} --output-json "$out/batch10_${label}.json" \
        2>&1 | grep -v -i warning | tail -3 | sed "s/^/$label: /" | tee -a "$out/batch10_ab.log" ) || rc=1
  done
fi
if [[ "$part" == decode-ab ]]; then
  here="$(pwd)"
  base="$(cd "${BASELINE:?set BASELINE to the other tree}" && pwd)"
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for tree in "$here" "$base"; do
      label=$([[ $tree == "$here" ]] && echo this || echo baseline)
      ( cd "$tree" && PYTHONPATH="$tree:/tmp/tm_wheels" timeout "${DECODE_TIMEOUT:-200}" python3 -m \
          tokenmill.entrypoints.cli.main bench moe --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
          --max-model-len 4096 --max-num-seqs 8 --gpu-memory-utilization 0.9 --parts decode ${MODEL_ARGS:-} \
          --output-json "$out/decode_${label}_r${round}.json" 2>&1 | grep -E "^batch-1" \
          | sed "s/^/$label r$round: /" | tee -a "$out/decode_ab.log" ) || rc=1
    done
  done
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
[[ -f "$out/gemv_sweep.log" ]] && grep -E "gemv sweep" "$out/gemv_sweep.log"
[[ -f "$out/dense_gemv_sweep.log" ]] && grep -E "engine's choice" "$out/dense_gemv_sweep.log" | cut -c1-200
[[ -f "$out/router_sweep.log" ]] && grep -E "router sweep|gemv sweep" "$out/router_sweep.log"
[[ -f "$out/decode_ab.log" ]] && cat "$out/decode_ab.log"
[[ -f "$out/batch10_ab.log" ]] && cat "$out/batch10_ab.log"
[[ -f "$out/decode_flags.log" ]] && cat "$out/decode_flags.log"
[[ -f "$out/layer.log" ]] && cat "$out/layer.log"
echo "rc=$rc"
exit $rc
