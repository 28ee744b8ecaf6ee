"""The CPU thread policy shared by generate, chat, LLM() and serve (tokenmill/entrypoints/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tokenmill.entrypoints.threads import busy_cores_elsewhere, choose_cpu_threads, start_load_sample, threads_for


def test_free_cores_rule():
    assert threads_for(2, 0.1) == 2
    assert threads_for(2, 1.0) == 1  # one core taken by other work: one thread
    assert threads_for(2, 0.0, reserve=1) == 1  # the server keeps a core for its API process
    assert threads_for(8, 2.6) == 5
    assert threads_for(2, 3.9) == 1  # never zero


def test_explicit_count_and_omp_num_threads_win(monkeypatch):
    assert choose_cpu_threads(3).num_threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = choose_cpu_threads(None)
    assert choice.num_threads is None and "OMP_NUM_THREADS=1" in choice.reason


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_a_spinning_process_counts_as_a_busy_core_and_this_one_does_not(monkeypatch):
    """A process spinning on one CPU leaves that CPU no idle time, whatever else runs there, so
    the sample of that CPU reads about one busy core. This process's own CPU time (spent here in
    a loop during the sample) is not counted as other work."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    spinner = subprocess.Popen([sys.executable, "-c",
                                f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        since = start_load_sample()
        own = sum(range(3_000_000))  # this process's work, on any CPU, during the sample
        assert own > 0
        busy = busy_cores_elsewhere([cpu], sample_s=0.5, since=since)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= 1.05
