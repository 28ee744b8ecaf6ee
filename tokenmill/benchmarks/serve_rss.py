"""Resident memory of `tokenmill serve` with the default model: the API process plus its engine
core, after start-up and one chat request.

    python3 -m tokenmill.benchmarks.serve_rss [-- extra serve flags]

Prints one JSON line: seconds to /health 200, RSS of each process and their sum (MiB).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from tokenmill.benchmarks.common import wait_for_health


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def main() -> None:
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.entrypoints.cli.main", "serve", "--port",
                             str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_health(url, proc, 300):
            raise SystemExit("server did not start")
        ready_s = time.monotonic() - start
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", body,
                                                      {"Content-Type": "application/json"}), timeout=120)
        pids = [proc.pid, *children(proc.pid)]
        per_process = {str(pid): round(rss_mib(pid)) for pid in pids}
        print(json.dumps({"ready_s": round(ready_s, 1), "rss_mib": per_process,
                          "total_rss_mib": sum(per_process.values())}))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
