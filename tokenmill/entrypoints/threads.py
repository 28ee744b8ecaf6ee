"""How many threads the engine's CPU math gets: one policy for `generate`, `chat`, `LLM()` and
`serve`.

torch's OpenMP team splits every matmul into equal parts and waits at a barrier for the slowest.
A thread that shares its core with another busy process runs half the time, so the whole team
runs at its pace: on a 2-core machine with its cores already busy, two threads decoded 7-16x
slower than one (docs/cli.md#measured). The team is therefore sized to the cores that are free now: the usable
cores (CPU affinity) minus what other processes kept busy over a short sample of /proc/stat,
minus the cores the caller keeps for itself (the server's API process), and at least one.
An explicit count, or OMP_NUM_THREADS, always wins.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SAMPLE_S = 0.25  # long enough for 25 scheduler ticks a core, short beside a model load


@dataclass(frozen=True)
class LoadSample:
    """The start of a load measurement: started before other start-up work (reading the model's
    config), the sample spans that work instead of adding a wait."""
    busy_jiffies: dict[str, int] | None
    own_cpu_s: float
    at: float


def start_load_sample() -> LoadSample:
    return LoadSample(_cpu_lines(), _own_cpu_seconds(), time.monotonic())


@dataclass(frozen=True)
class ThreadChoice:
    num_threads: int | None  # None: leave torch as OMP_NUM_THREADS set it
    reason: str


def choose_cpu_threads(requested: int | None = None, *, reserve: int = 0,
                       sample_s: float = SAMPLE_S, since: LoadSample | None = None) -> ThreadChoice:
    """The thread count for the engine's CPU math.

    Args:
        requested: an explicit count (`--engine-threads`); taken as given (at least 1).
        reserve: cores kept for other work of this program (1 for the server's API process).
        sample_s: how long to watch the machine's load, at least.
        since: a sample started earlier (`start_load_sample`); by default one starts now.
    """
    if requested is not None:
        return ThreadChoice(max(1, requested), f"{max(1, requested)} CPU threads (as asked)")
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(None, f"CPU threads from OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    cpus = sorted(os.sched_getaffinity(0))
    busy = busy_cores_elsewhere(cpus, sample_s, since)
    n = threads_for(len(cpus), busy, reserve)
    kept = f", {reserve} kept for the API process" if reserve else ""
    return ThreadChoice(n, f"{n} CPU thread{'s' if n > 1 else ''} ({len(cpus)} usable cores, "
                           f"{busy:.1f} busy with other work{kept}; --engine-threads sets it)")


def threads_for(usable_cores: int, busy_elsewhere: float, reserve: int = 0) -> int:
    """Free cores, rounding a core that is more than half busy to busy; at least one."""
    return max(1, usable_cores - reserve - int(busy_elsewhere + 0.5))


def apply_cpu_threads(requested: int | None = None, *, reserve: int = 0,
                      since: LoadSample | None = None) -> ThreadChoice:
    """Chooses and sets torch's intra-op thread count for this process; logs the choice."""
    choice = choose_cpu_threads(requested, reserve=reserve, since=since)
    if choice.num_threads is not None:
        import torch

        torch.set_num_threads(choice.num_threads)
    logger.info("%s", choice.reason)
    return choice


def busy_cores_elsewhere(cpus: list[int], sample_s: float, since: LoadSample | None = None) -> float:
    """Cores' worth of CPU time that other processes used on `cpus` since `since` (default: now),
    over `sample_s` seconds at least."""
    since = since or start_load_sample()
    before, own_before, t0 = _busy_jiffies(cpus, since.busy_jiffies), since.own_cpu_s, since.at
    if before is None:
        return 0.0
    time.sleep(max(0.0, sample_s - (time.monotonic() - t0)))
    after, own_after, t1 = _busy_jiffies(cpus, _cpu_lines()), _own_cpu_seconds(), time.monotonic()
    if after is None:
        return 0.0
    busy_s = (after - before) / os.sysconf("SC_CLK_TCK") - (own_after - own_before)
    return max(0.0, busy_s / max(t1 - t0, 1e-3))


def _busy_jiffies(cpus: list[int], lines: dict[str, int] | None) -> int | None:
    """Non-idle jiffies summed over `cpus` from a `_cpu_lines` reading; None off Linux."""
    if lines is None:
        return None
    return sum(lines.get(f"cpu{c}", 0) for c in cpus)


def _cpu_lines() -> dict[str, int] | None:
    """Non-idle jiffies of every CPU line in /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu":
                    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    out[name] = sum(values) - values[3] - values[4]
    except (OSError, ValueError, IndexError):
        return None
    return out


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system

