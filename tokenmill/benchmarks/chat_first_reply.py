"""Seconds from starting `tokenmill chat` to the first byte of its first reply, cold and warm.

    python3 -m tokenmill.benchmarks.chat_first_reply [--runs 2] [--cache DIR]

Cold: an empty tokenmill cache ($TOKENMILL_CACHE pointed at a fresh folder), so the first start
converts the GGUF; warm: the runs after it, with the same cache. One message ("Hi") is piped in,
so the measure is start-up + prompt + first token. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def first_reply_s(env: dict) -> float:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.entrypoints.cli.main", "chat", "--max-tokens", "8",
                             "--temperature", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    proc.stdin.write(b"Hi\n")
    proc.stdin.flush()
    proc.stdout.read(1)
    elapsed = time.monotonic() - start
    proc.stdin.close()
    proc.wait(120)
    return round(elapsed, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    parser.add_argument("--cache", default=None, help="cache folder to start from (default: a new, empty one)")
    args = parser.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="tokenmill-cache-")
    env = {**os.environ, "TOKENMILL_CACHE": cache}
    cold = first_reply_s(env)
    warm = [first_reply_s(env) for _ in range(args.runs)]
    print(json.dumps({"cold_s": cold, "warm_s": warm, "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
