"""tokenmill beside vLLM's CPU build and llama.cpp on this CPU, on the same token ids.

    bash tokenmill/benchmarks/peers/setup_vllm.sh
    bash tokenmill/benchmarks/peers/setup_llamacpp.sh  # needs the HF folder: run.py --setup-only prints it
    python -m tokenmill.benchmarks.peers.run --threads 2 --rounds 2 --repeats 2

Engines run one at a time, each in a fresh process (`engine_runs.py`), interleaved round by round
(A B C A B C ...) so that a change in the machine's load hits every engine alike; the table shows
medians over all repeats of all rounds, the ratios against tokenmill, and the load average before
each run. The bf16 engines read the same weights: the embedded Q4_1 GGUF dequantised once
(`hf_folder.py`), as an HF folder (tokenmill, vLLM) and converted by llama.cpp to a bf16 GGUF;
the quantised engines read the GGUF itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
METRICS = (("batch_tok_s", "batch tok/s", True), ("decode_ms", "decode ms/tok", False),
           ("ttft_ms", "TTFT ms", False), ("prefill_tok_s", "prefill tok/s", True))


def token_ids(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(count)]


def engine_specs(args: argparse.Namespace, hf_folder: str, bf16_gguf: str, q4_gguf: str) -> dict[str, dict]:
    threads = args.threads
    # Prefix caching off in every engine (llama.cpp: `cache_prompt: false`): each measurement
    # repeats its prompts, and a cache hit would time a lookup instead of a prefill.
    tokenmill_args = {"dtype": "bfloat16", "max_model_len": 2048, "kv_cache_memory": 1 << 30,
                      "max_num_seqs": max(args.batch, 1), "cpu_compile": True, "enable_prefix_caching": False}
    python = sys.executable
    vllm_python = str(Path(args.cache_dir) / "vllm-venv" / "bin" / "python")
    venv_lib = Path(args.cache_dir) / "vllm-venv" / "lib"
    preload = [p for p in ("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv_lib / "libiomp5.so"))
               if os.path.exists(p)]
    vllm_env = [f"VLLM_CPU_OMP_THREADS_BIND=0-{threads - 1}" if threads > 1 else "VLLM_CPU_OMP_THREADS_BIND=0",
                "VLLM_CPU_KVCACHE_SPACE=1", f"LD_PRELOAD={':'.join(preload)}", "PYTHONPATH="]
    server = str(Path(args.cache_dir) / f"llama_cpp_python-{args.llama_cpp_version}" / "vendor" / "llama.cpp"
                 / "build" / "bin" / "llama-server")
    specs = {
        "tokenmill": {"runner": "tokenmill", "python": python, "model": hf_folder, "engine_args": tokenmill_args,
                      "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        "vllm": {"runner": "vllm", "python": vllm_python, "model": hf_folder, "env": vllm_env,
                 "engine_args": {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": max(args.batch, 1),
                                 "seed": 0, "enable_prefix_caching": False}},
        "llamacpp": {"runner": "llamacpp", "python": python, "model": bf16_gguf, "server": server, "ctx": 8192,
                     "env": []},
        # The compiled engine with decode attention through gather + SDPA instead of the C++ kernel.
        "tokenmill-sdpa": {"runner": "tokenmill", "python": python, "model": hf_folder,
                           "engine_args": {**tokenmill_args, "cpu_native_decode": False},
                           "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        # The compiled engine with tcmalloc preloaded (as the vLLM runs are, following its docs).
        "tokenmill-tcmalloc": {"runner": "tokenmill", "python": python, "model": hf_folder, "engine_args": tokenmill_args,
                               "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}",
                                       f"LD_PRELOAD={':'.join(preload[:1])}"]},
        "tokenmill-eager": {"runner": "tokenmill", "python": python, "model": hf_folder,
                            "engine_args": {**tokenmill_args, "cpu_compile": False},
                            "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        "tokenmill-q4": {"runner": "tokenmill", "python": python, "model": q4_gguf,
                         "engine_args": {**tokenmill_args, "cpu_compile": False, "quantization": "gguf"},
                         "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        "tokenmill-q4-compiled": {"runner": "tokenmill", "python": python, "model": q4_gguf,
                                  "engine_args": {**tokenmill_args, "quantization": "gguf"},
                                  "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        # The same with float activations: PyTorch's weight-only int4 kernel (--no-gguf-int8-activations).
        "tokenmill-q4-float": {"runner": "tokenmill", "python": python, "model": q4_gguf,
                               "engine_args": {**tokenmill_args, "quantization": "gguf",
                                               "gguf_int8_activations": False},
                               "env": [f"PYTHONPATH={REPO}", f"OMP_NUM_THREADS={threads}"]},
        "llamacpp-q4": {"runner": "llamacpp", "python": python, "model": q4_gguf, "server": server, "ctx": 8192,
                        "env": []},
    }
    return {name: {**spec, "threads": threads} for name, spec in specs.items()}


def run_engine(name: str, spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        load = os.getloadavg()[0]
        cmd = ["env", *spec["env"], spec["python"], str(HERE / "engine_runs.py"), str(spec_path), str(out_path)]
        start = time.perf_counter()
        # Output to a file, not a pipe: an engine's helper processes (vLLM's resource tracker)
        # outlive it and would hold a pipe open.
        log_path = Path(tmp) / "engine.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            finally:
                # vLLM's engine-core and worker processes outlive its runner (2.5 GB each): the
                # whole group ends before the next engine runs.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if returncode != 0 or not out_path.exists():
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"{name} failed (exit {returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
        result.update(load_before=load, wall_s=time.perf_counter() - start)
        return result


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    table = {}
    for name, results in runs.items():
        row = {key: statistics.median(v for r in results for v in r[key]) for key, _, _ in METRICS}
        row["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in results)
        row["startup_s"] = statistics.median(r["startup_s"] for r in results)
        row["loads"] = [round(r["load_before"], 1) for r in results]
        table[name] = row
    return table


def print_table(table: dict[str, dict], threads: int) -> None:
    base = table.get("tokenmill")
    print(f"\n{threads} thread(s); medians; ratio = tokenmill's advantage (>1: tokenmill better)")
    header = f"{'engine':<14}" + "".join(f"{label:>16}" for _, label, _ in METRICS) + f"{'peak RSS MB':>14}{'loads':>16}"
    print(header)
    for name, row in table.items():
        # Quantised peers against tokenmill's compiled quantised engine (else its eager one).
        q4 = table.get("tokenmill-q4-compiled") or table.get("tokenmill-q4")
        ref = q4 if name.endswith("-q4") and q4 is not None else base
        cells = []
        for key, _, higher_better in METRICS:
            value = row[key]
            cell = f"{value:.1f}"
            if ref is not None and ref is not row and value:
                ratio = ref[key] / value if higher_better else value / ref[key]
                cell += f" ({ratio:.2f}x)"
            cells.append(f"{cell:>16}")
        print(f"{name:<14}" + "".join(cells) + f"{row['peak_rss_mb']:>14.0f}{str(row['loads']):>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="tokenmill,tokenmill-eager,vllm,llamacpp,tokenmill-q4,llamacpp-q4",
                        help="tokenmill (compiled), tokenmill-tcmalloc (the same with tcmalloc preloaded), "
                             "tokenmill-sdpa (compiled, decode attention by "
                             "gather + SDPA), tokenmill-eager, vllm, llamacpp (bf16 GGUF), "
                             "tokenmill-q4 (--quantization gguf, eager), tokenmill-q4-compiled (the same with "
                             "--cpu-compile), tokenmill-q4-float (compiled, float activations: "
                             "--no-gguf-int8-activations), llamacpp-q4 (the Q4_1 file)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per engine, interleaved")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each measurement per process")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=1500)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "tokenmill" / "peers"))
    parser.add_argument("--llama-cpp-version", default="0.3.36")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per engine process")
    parser.add_argument("--setup-only", action="store_true", help="write the shared HF folder, print its path")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    from tokenmill.benchmarks.peers.hf_folder import dequantised_hf_folder
    from tokenmill.config.model_source import default_gguf_path

    q4_gguf = default_gguf_path()
    hf_folder = dequantised_hf_folder(q4_gguf, str(Path(args.cache_dir) / "smollm2-135m-bf16"))
    bf16_gguf = str(Path(args.cache_dir) / "smollm2-135m-bf16-bf16.gguf")
    if args.setup_only:
        print(hf_folder)
        return
    shared = {"prompts": token_ids(args.batch, args.input_len, 0),
              "prefill_prompt": token_ids(1, args.prefill_len, 1)[0],
              "output_len": args.output_len, "repeats": args.repeats}
    specs = engine_specs(args, hf_folder, bf16_gguf, q4_gguf)
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        for name in engines:
            result = run_engine(name, {**specs[name], **shared}, args.timeout)
            runs[name].append(result)
            print(f"round {round_index + 1} {name}: load {result['load_before']:.1f}, "
                  + ", ".join(f"{k} {result['medians'][k]:.1f}" for k, _, _ in METRICS)
                  + f", peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    table = summarize(runs)
    print_table(table, args.threads)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "table": table, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
