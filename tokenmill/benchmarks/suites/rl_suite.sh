#!/usr/bin/env bash
# Device pass for RL rollouts (docs/rl.md) on one GPU, about 7 minutes on an H100.
# Usage on the device (repo root):  bash tokenmill/benchmarks/suites/rl_suite.sh [tests|bench|all]
#   tests  the RL and batch-invariant GPU tests (sleep memory, updates over CUDA IPC, block-FP8
#          DeepSeek-V3 and MiniMax hybrid sleep and updates, kernels)
#   bench  Llama-3.1-8B shape: memory freed by sleep, time to wake, weight pushes over CUDA IPC
#          from a second process and from disk (GB/s); Qwen3-0.6B shape, 256 x 256/256: tok/s
#          with and without --batch-invariant. RL_PARTS (default sleep,ipc,disk) narrows the
#          first; TPUT_MODES="" skips the second (e.g. RL_PARTS=disk TPUT_MODES="": the disk push alone)
# Carry: wheels/ (device_setup.sh installs them).
# Writes $OUT/{tests.log,rl.json,rl.log,tput_*.json,summary.txt}; prints the summary table last.
set -u -o pipefail
part="${1:-all}"
source "$(dirname "$0")/device_setup.sh" ./gpu_out
tm() { timeout "${STEP_TIMEOUT:-300}" python3 -m tokenmill.entrypoints.cli.main "$@" 2>&1 | grep -v -i warning; }
rc=0
if [[ "$part" == tests || "$part" == all ]]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_rl_gpu.py \
      tests/gpu/kernels/test_batch_invariant_kernels.py -o addopts="" --durations=5 2>&1 | tee "$out/tests.log" || rc=1
fi
if [[ "$part" == bench || "$part" == all ]]; then
  tm bench rl --model llama-3.1-8b --gpu-memory-utilization 0.45 --checkpoint-dir "${CKPT_DIR:-/tmp/tm_rl_ckpt}" \
      --parts "${RL_PARTS:-sleep,ipc,disk}" --output-json "$out/rl.json" | tee "$out/rl.log" || rc=1
  rm -rf "${CKPT_DIR:-/tmp/tm_rl_ckpt}"
  for mode in ${TPUT_MODES-default invariant}; do
    extra=""; [[ "$mode" == invariant ]] && extra="--batch-invariant"
    tm bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 --workload random \
        --num-prompts 256 --input-len 256 --output-len 256 --max-model-len 1024 --gpu-memory-utilization 0.5 \
        --baseline none $extra --output-json "$out/tput_qwen06b_${mode}.json" | tee -a "$out/tput.log" || rc=1
  done
fi
python3 - "$out" <<'EOF' | tee "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
rl = load("rl.json")
if rl:
    print(f"RL rollouts, {rl['model']} on {rl['device']} ({rl.get('weights_gb', 0):.1f} GB of weights)")
    for level in ("level1", "level2"):
        s = rl.get("sleep", {}).get(level)
        if s:
            print(f"  sleep {level[-1]}: free {s['free_gib_before']:.1f} -> {s['free_gib_asleep']:.1f} -> "
                  f"{s['free_gib_awake']:.1f} GiB (freed {s['freed_gib']:.1f}); sleep {s['sleep_s']:.2f}s, "
                  f"wake {s['wake_s']:.2f}s (weights {s['wake_weights_s']:.2f} + KV/graphs {s['wake_kv_cache_s']:.2f})"
                  + (f", same tokens after wake: {s['same_tokens_after_wake']}" if "same_tokens_after_wake" in s else ""))
    for key, label in (("ipc_stream", "CUDA IPC, checkpoint-engine protocol"), ("ipc_handles", "CUDA IPC, handle per tensor")):
        if key in rl:
            print(f"  push {label}: {rl[key]['seconds']:.2f}s = {rl[key]['gb_per_s']:.1f} GB/s")
    if "disk" in rl:
        d = rl["disk"]
        print(f"  push from disk: warm {d['warm_seconds']:.2f}s = {d['warm_gb_per_s']:.1f} GB/s, "
              f"cold {d['cold_seconds']:.2f}s = {d['cold_gb_per_s']:.1f} GB/s (written in {d['write_s']:.1f}s)")
base, inv = load("tput_qwen06b_default.json"), load("tput_qwen06b_invariant.json")
if base and inv:
    b, i = base["tokenmill"]["output_tok_per_s"], inv["tokenmill"]["output_tok_per_s"]
    print(f"Batch-invariant cost, qwen3-0.6b 256 x 256/256: default {b:.0f} tok/s, invariant {i:.0f} tok/s "
          f"(ratio {i / b:.2f}x)")
EOF
exit $rc
