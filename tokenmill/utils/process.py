"""Helpers for tokenmill's long-lived processes (the engine core, tensor-parallel workers)."""

from __future__ import annotations

import atexit
import gc
import os
import time

PARENT_POLL_S = 1.0


def watch_parent(parent_pid: int) -> None:
    """Exit as soon as the parent process is gone (killed -9: nobody will ever send a shutdown).
    Runs on a daemon thread, so it also ends a process stuck in a call that would wait for the
    dead parent (a tensor-parallel worker inside a collective)."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def freeze_long_lived_objects() -> None:
    """Move everything built so far (model, KV blocks, graphs) out of the cyclic GC's generations.

    They live as long as the engine; left in, each full collection scans ~280k objects (65k KV
    blocks) and pauses a step for ~140 ms. Measured at batch 256 (benchmarks/host_overhead.py,
    CPU): GC pauses 1.33 -> 0.13 ms per step on average.
    """
    gc.collect()
    gc.freeze()
    # Unfrozen at exit so the interpreter's final collection still frees them (native extensions
    # such as xgrammar's report never-freed objects as leaks otherwise).
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)


# Where distributions install tcmalloc (gperftools); the first that exists is suggested.
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")


def loaded_tcmalloc(maps: str = "/proc/self/maps") -> bool:
    """Whether this process allocates through tcmalloc (preloaded)."""
    try:
        with open(maps) as f:
            return "tcmalloc" in f.read()
    except OSError:
        return True  # not Linux: nothing to suggest


def tcmalloc_hint(maps: str = "/proc/self/maps", candidates: tuple[str, ...] = TCMALLOC_PATHS) -> str | None:
    """A line for the start-up log where a CPU engine runs on glibc's malloc and tcmalloc is
    installed: each step allocates and frees a few hundred tensors, and glibc's consolidation of
    its free lists showed as ~4% of the main thread's time; with tcmalloc preloaded, single-stream
    decode of the embedded model took 9.8 instead of 10.9 ms/token (docs/perf-cpu.md). A library
    cannot be preloaded after the process started, so this is advice, not a switch."""
    if loaded_tcmalloc(maps):
        return None
    found = next((path for path in candidates if os.path.exists(path)), None)
    return None if found is None else (f"CPU decode is ~10% faster with tcmalloc: start with LD_PRELOAD={found}")
