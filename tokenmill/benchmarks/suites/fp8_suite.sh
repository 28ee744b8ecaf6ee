#!/usr/bin/env bash
# Device pass for fp8 weights (docs/quantization.md), each measurement beside bf16 in the same run:
#   tests    the fp8 GPU tests (kernels vs references, fused-MoE fp8 paths, whole models vs HF)
#   compiles the GPU test that fp8 serving compiles no Triton kernel after start-up (a fresh cache)
#   kernels  block-FP8 GEMM TFLOP/s at Llama-3.1-8B prefill shapes (Triton and cuBLAS's block-scaled
#            GEMM) vs torch._scaled_mm per-tensor and bf16 cuBLAS; the batch-1 weight set through
#            the fp8 GEMV vs the bf16 GEMV vs the copy rate
#   latency  Llama-3.1-8B shape, batch-1 decode 512/128: bf16, online fp8 (--quantization fp8),
#            block-FP8 (a config.json with DeepSeek's quantization_config, dummy weights)
#   tput     Llama-3.1-8B shape, offline ${TPUT_N:-128} x ${TPUT_IN:-512}/${TPUT_OUT:-512}: bf16 vs online fp8
#   moe      Qwen3-30B-A3B shape, offline ${TPUT_N:-128} x ${TPUT_IN:-512}/${TPUT_OUT:-512}: bf16 vs online fp8
# Usage (repo root, one H100), one call per line, each under 10 minutes:
#   bash tokenmill/benchmarks/suites/fp8_suite.sh          # bench = kernels latency tput (~7 min)
#   bash tokenmill/benchmarks/suites/fp8_suite.sh tests    # (~4 min)
#   bash tokenmill/benchmarks/suites/fp8_suite.sh moe      # (~4 min)
#   bash tokenmill/benchmarks/suites/fp8_suite.sh compiles # (~3 min)
# or a single part (kernels, latency, tput). Every step is capped by its timeout. The issue's
# 256 x 1024/1024: TPUT_N=256 TPUT_IN=1024 TPUT_OUT=1024 with `tput` or `moe` alone (longer).
# LATENCY_ARGS: more engine flags for `latency` (e.g. "--no-pdl" with OUT=another folder, for an A/B);
# LATENCY_VARIANTS: which of "bf16 fp8 block-fp8" it runs (default all three).
# SWEEP=1 adds the block-GEMM tile sweep to `kernels`; FP8_M sets its token counts (default "512 2048 8192").
# Carry: wheels/ (device_setup.sh installs them).
set -u -o pipefail
part="${1:-bench}"
source "$(dirname "$0")/device_setup.sh" ./fp8_out
tm() { python3 -m tokenmill.entrypoints.cli.main "$@"; }
has() { [[ "$part" == bench && "$1" =~ ^(kernels|latency|tput)$ ]] || [[ "$part" == "$1" ]]; }
rc=0

# A block-FP8 variant of a shipped shape: its config.json plus DeepSeek's quantization_config,
# served with --load-format dummy (fp8 weights, 128x128 block scales).
block_fp8_folder() {  # block_fp8_folder SHAPE -> prints the folder
  python3 - "$1" <<'EOF'
import json, pathlib, sys
from tokenmill.config.model_source import CONFIGS_DIR
config = json.loads((CONFIGS_DIR / f"{sys.argv[1]}.json").read_text())
config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                 "weight_block_size": [128, 128]}
folder = pathlib.Path(f"/tmp/{sys.argv[1]}-block-fp8")
folder.mkdir(exist_ok=True)
(folder / "config.json").write_text(json.dumps(config))
print(folder)
EOF
}

if has tests; then
  timeout "${TESTS_TIMEOUT:-540}" python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=6 \
      tests/gpu/kernels/test_fp8_kernels.py tests/gpu/kernels/test_fused_moe_fp8.py tests/gpu/test_fp8_weights_gpu.py \
      -k "not compile_nothing" 2>&1 | tee "$out/tests.log" || rc=1
fi
if has compiles; then
  timeout "${COMPILES_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
      tests/gpu/test_fp8_weights_gpu.py -k compile_nothing 2>&1 | tee "$out/compiles.log" || rc=1
fi
if has kernels; then
  timeout "${KERNELS_TIMEOUT:-130}" python3 -m tokenmill.benchmarks.kernels.fp8 gemm gemv --m ${FP8_M:-512 2048 8192} \
      ${SWEEP:+--sweep} --output-json "$out/kernels.json" 2>&1 | tee "$out/kernels.log" || rc=1
fi
if has latency; then
  block=$(block_fp8_folder llama-3.1-8b)
  for variant in ${LATENCY_VARIANTS:-bf16 fp8 block-fp8}; do
    case $variant in
      bf16) args=(--model llama-3.1-8b) ;;
      fp8) args=(--model llama-3.1-8b --quantization fp8) ;;
      block-fp8) args=(--model "$block") ;;
    esac
    timeout "${LATENCY_TIMEOUT:-80}" python3 -m tokenmill.entrypoints.cli.main bench latency "${args[@]}" \
        --load-format dummy --dtype bfloat16 --input-len 512 --output-len 128 --num-iters 2 --max-model-len 2048 \
        --max-num-seqs 8 --gpu-memory-utilization 0.5 --baseline none ${LATENCY_ARGS:-} --output-json "$out/latency_$variant.json" \
        2>&1 | grep -v Warning | tee "$out/latency_$variant.log" || rc=1
  done
fi
throughput() {  # throughput NAME SHAPE TIMEOUT
  for variant in bf16 fp8; do
    extra=(); [[ $variant == fp8 ]] && extra=(--quantization fp8)
    timeout "$3" python3 -m tokenmill.entrypoints.cli.main bench throughput --model "$2" "${extra[@]}" \
        --load-format dummy --dtype bfloat16 --workload random --num-prompts "${TPUT_N:-128}" \
        --input-len "${TPUT_IN:-512}" --output-len "${TPUT_OUT:-512}" --max-num-seqs "${TPUT_N:-128}" \
        --max-model-len $(( ${TPUT_IN:-512} + ${TPUT_OUT:-512} + 16 )) --gpu-memory-utilization 0.9 \
        --baseline none --output-json "$out/tput_${1}_$variant.json" 2>&1 | grep -v Warning \
        | tee "$out/tput_${1}_$variant.log" || rc=1
  done
}
has tput && throughput llama8b llama-3.1-8b "${TPUT_TIMEOUT:-100}"
has moe && throughput qwen30b qwen3-30b-a3b "${MOE_TIMEOUT:-270}"

echo
echo "== summary ($(tail -1 "$out/device.txt")) =="
[[ -f "$out/tests.log" ]] && tail -1 "$out/tests.log"
[[ -f "$out/compiles.log" ]] && tail -1 "$out/compiles.log"
python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
load = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None  # noqa: E731
kernels = load("kernels.json")
copy = kernels["gemv"]["copy_gb_per_s"] if kernels and "gemv" in kernels else None
if kernels and "gemm" in kernels:
    print("block-FP8, TFLOP/s (Triton GEMM | Triton + activation quant | cuBLAS block-scaled + quant | "
          "torch._scaled_mm per-tensor | bf16 cuBLAS):")
    for r in kernels["gemm"]:
        f = lambda v: f"{v:5.0f}" if v else "  n/a"  # noqa: E731
        print(f"  M={r['m']:5d} {r['shape']:8s} {f(r['block_gemm'])} | {f(r['block_linear'])} | "
              f"{f(r.get('block_linear_cublas'))} | {f(r['scaled_mm'])} | {f(r['bf16'])}")
if kernels and "gemv" in kernels:
    g = kernels["gemv"]
    print(f"batch-1 GEMV weight set: bf16 {g['bf16_gemv']['ms']:.2f} ms ({g['bf16_gemv']['gb_per_s']:.0f} GB/s), "
          f"fp8 block {g['fp8_block_gemv']['ms']:.2f} ms ({g['fp8_block_gemv']['gb_per_s']:.0f} GB/s), "
          f"= {g['fp8_block_vs_bf16_time']:.2f}x the bf16 time; copy rate {copy:.0f} GB/s")
base = load("latency_bf16.json")
for variant in ("bf16", "fp8", "block-fp8"):
    r = load(f"latency_{variant}.json")
    if r:
        t = r["tokenmill"]
        ratio = f", {t['ms_per_token'] / base['tokenmill']['ms_per_token']:.2f}x bf16" if base else ""
        of_copy = f" ({t['weight_gb_per_s'] / copy * 100:.0f}% of copy)" if copy else ""
        print(f"llama-3.1-8b batch-1 decode {variant:9s}: {t['ms_per_token']:.2f} ms/token{ratio}, "
              f"{r['weight_bytes'] / 1e9:.1f} GB weights at {t['weight_gb_per_s']:.0f} GB/s{of_copy}")
for name in ("llama8b", "qwen30b"):
    b, f = load(f"tput_{name}_bf16.json"), load(f"tput_{name}_fp8.json")
    if b or f:
        bt = b["tokenmill"]["output_tok_per_s"] if b else None
        ft = f["tokenmill"]["output_tok_per_s"] if f else None
        r = b or f
        print(f"{name} offline {r['num_prompts']} x {r['input_tokens'] // r['num_prompts']}/"
              f"{(b or f)['tokenmill']['output_tokens'] // r['num_prompts']}: bf16 {bt or 0:.0f} tok/s, "
              f"fp8 {ft or 0:.0f} tok/s" + (f" = {ft / bt:.2f}x" if bt and ft else ""))
EOF
echo "rc=$rc"
exit $rc
