"""Summarise `suites/compare_trees.sh`: per workload, the before and after figures (best of the
rounds) and their ratio.

    python3 -m tokenmill.benchmarks.compare_results OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# workload -> (figure, unit, higher is better)
FIGURES = {
    "latency": ("ms_per_token", "ms/token", False),
    "tput": ("output_tok_per_s", "output tok/s", True),
    "nanovllm": ("output_tok_per_s", "output tok/s", True),
}


def collect(out: Path) -> dict[tuple[str, str], list[float]]:
    values: dict[tuple[str, str], list[float]] = {}
    for path in sorted(out.glob("*_r*.json")):
        m = re.fullmatch(r"(\w+?)_(before|after)_r\d+\.json", path.name)
        if not m or m.group(1) not in FIGURES:
            continue
        key, _, _ = FIGURES[m.group(1)]
        values.setdefault((m.group(1), m.group(2)), []).append(json.loads(path.read_text())["tokenmill"][key])
    return values


def main(argv: list[str]) -> int:
    values = collect(Path(argv[0]))
    print(f"{'workload':<10} {'unit':<14} {'before':>10} {'after':>10} {'after/before':>13}  (best of rounds; all)")
    for workload, (_, unit, higher) in FIGURES.items():
        before, after = values.get((workload, "before")), values.get((workload, "after"))
        if not before or not after:
            print(f"{workload:<10} missing")
            continue
        best = max if higher else min
        b, a = best(before), best(after)
        ratio = a / b if higher else b / a  # > 1: after is faster
        print(f"{workload:<10} {unit:<14} {b:>10.2f} {a:>10.2f} {ratio:>12.3f}x  "
              f"before {[round(v, 2) for v in before]} after {[round(v, 2) for v in after]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
