"""Small helpers shared by the benchmark commands."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request

import torch


def wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Poll `url`/health until it answers 200 (True), or `proc` exits or `timeout_s` passes
    (False: the caller reports why, with its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(poll_s)
    return False


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def weight_bytes_read(model: torch.nn.Module, batch_size: int = 1) -> int:
    """Bytes of weights one decode step of `batch_size` tokens reads: every weight except the
    embedding table (only its rows are gathered), and of a mixture-of-experts layer's routed
    experts only those the tokens chose: top_k per token, at most all of them (exact at batch 1;
    an upper bound above it)."""
    total = 0
    has_head = getattr(model, "lm_head", None) is not None
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and module_name.endswith("embed_tokens") and has_head:
                continue
            size = p.numel() * p.element_size()
            experts = getattr(module, "num_local_experts", None)
            if experts is not None and name in ("w13_weight", "w2_weight"):
                size = size * min(experts, batch_size * module.routing.top_k) // experts
            total += size
    return total


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def parse_cpu_kernel_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """For the C++ CPU kernel benchmarks: adds `--threads` and `--output-json`, parses, sets torch's
    thread count, and stops with a clear message where the kernels cannot be built here."""
    from tokenmill.ops.cpu_extension import extension

    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if extension() is None:
        raise SystemExit("the C++ CPU kernels are not available here (see the warning above)")
    return args


def mean_call_us(fn, weights: list, passes: int = 3) -> float:
    """Microseconds a call of `fn(w)`, taking the next of `weights` each call (distinct copies: the
    figure is the weight stream's from memory; one copy repeated: hot), mean over `passes` passes
    after a warm-up on the first three."""
    for w in weights[:3]:
        fn(w)
    start = time.perf_counter()
    for _ in range(passes):
        for w in weights:
            fn(w)
    return (time.perf_counter() - start) / (passes * len(weights)) * 1e6
