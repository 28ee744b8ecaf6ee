"""Device-memory copy rate of every visible GPU (GB/s, bytes read + written), measured the way
the decode benchmarks are compared: a large device-to-device copy, best of several.

    python3 -m tokenmill.benchmarks.kernels.copy_bandwidth [--gib 4] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch


def copy_rate(device: int, gib: float, iters: int = 10) -> float:
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(device):
            start.record()
            dst.copy_(src)
            end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    rates = {f"cuda:{d}": copy_rate(d, args.gib) for d in range(torch.cuda.device_count())}
    for name, rate in rates.items():
        print(f"{name} ({torch.cuda.get_device_name(0)}): copy {rate:.0f} GB/s (read + write)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"copy_gb_per_s": rates, "gib": args.gib}, f, indent=2)


if __name__ == "__main__":
    main()
