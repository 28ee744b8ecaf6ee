"""How big the KV pool is on a CPU when the user does not say, and how long a context fits it.

A GPU's pool is what `gpu_memory_utilization` leaves after a profile run. A CPU shares its memory
with everything else on the machine, so its default pool is sized from what the engine can use:

- tokens: every sequence the scheduler may run at full length (`max_num_seqs * max_model_len`),
  but no more than two full-length requests or `CPU_POOL_MIN_TOKENS`, whichever is larger. A CPU
  decodes a few hundred tokens a second at best, so a larger pool only sits there; 16384 tokens
  still hold dozens of chat-sized requests at once.
- bytes: those tokens times the model's KV bytes per token, at most `CPU_POOL_MAX_FRACTION` of the
  machine's memory: a fixed share, so the pool (and with it how often requests are preempted) does
  not depend on what other processes hold at the moment of a start; the log line says when the
  pool is more than half of the memory available then;
- but never less than one `max_model_len` request while that fits in half the machine: a pool
  that cannot hold one request makes the engine refuse to start.

The default `max_model_len` on a CPU is shortened, when the model's own would not fit that share
once, to the largest power of two that does. The functions are pure (the caller measures memory
with `available_memory_bytes` / `total_memory_bytes`), so the rules are unit-tested without a model.
"""

from __future__ import annotations

import os

GiB = 1 << 30
MiB = 1 << 20
CPU_POOL_MIN_TOKENS = 16384
CPU_POOL_MAX_FRACTION = 1 / 8  # of the machine's memory
AVAILABLE_FRACTION = 1 / 2  # of the memory available now


def default_cpu_kv_cache_bytes(bytes_per_token: int, max_model_len: int, max_num_seqs: int,
                               available_bytes: int, total_bytes: int) -> tuple[int, str]:
    """The default CPU KV pool in bytes, and one line saying why (for the start-up log).

    Args:
        bytes_per_token: K and V of every layer for one token, on this rank.
        max_model_len: the context length the engine runs with.
        max_num_seqs: most sequences running at once.
        available_bytes: memory available to this rank now.
        total_bytes: this rank's share of the machine's memory.

    When one `max_model_len` request needs more than half the machine, the share is returned
    anyway: the engine then refuses to start and names the fix (lower --max-model-len, or
    --kv-cache-memory).
    """
    assert bytes_per_token > 0 and max_model_len > 0 and max_num_seqs > 0
    tokens = min(max_num_seqs * max_model_len, max(2 * max_model_len, CPU_POOL_MIN_TOKENS))
    wanted = tokens * bytes_per_token
    share = int(total_bytes * CPU_POOL_MAX_FRACTION)
    one_request = max_model_len * bytes_per_token
    per_token = f"at {_size(bytes_per_token)} each"
    if one_request > total_bytes * AVAILABLE_FRACTION:
        return share, (f"KV cache {_size(share)} (1/{_inverse(CPU_POOL_MAX_FRACTION)} of the machine's "
                       f"{_size(total_bytes)}; one request of max_model_len {max_model_len} would need "
                       f"{_size(one_request)})")
    size = max(min(wanted, share), one_request)
    if size == wanted:
        why = _why_tokens(tokens, max_model_len, max_num_seqs)
    elif size == share:
        why = f"capped at 1/{_inverse(CPU_POOL_MAX_FRACTION)} of the machine's {_size(total_bytes)}"
    else:
        why = f"one request of max_model_len {max_model_len}, more than the default share"
    note = ""
    if size > available_bytes * AVAILABLE_FRACTION:
        # Not shrunk: a pool that follows a busy moment's free memory would change how often
        # requests are preempted (and so their numerics) from one start to the next.
        note = f"; more than half of the {_size(available_bytes)} available now"
    return size, (f"KV cache {_size(size)} ({size // bytes_per_token} tokens {per_token}: {why}"
                  f"{note}; --kv-cache-memory sets it)")


def fit_cpu_max_model_len(model_max_len: int, bytes_per_token: int,
                          total_bytes: int) -> tuple[int, str | None]:
    """The default `max_model_len` on a CPU: the model's own, unless one request that long would
    not fit the default share of the machine's memory; then the largest power of two that does
    (at least 256). Returns the length and, when it is shorter than the model's, a line saying so."""
    limit_tokens = int(total_bytes * CPU_POOL_MAX_FRACTION) // max(1, bytes_per_token)
    if model_max_len <= limit_tokens:
        return model_max_len, None
    fitted = max(256, 1 << (max(1, limit_tokens).bit_length() - 1))
    return fitted, (f"max_model_len {fitted} (the model allows {model_max_len}, whose KV cache would "
                    f"take {_size(model_max_len * bytes_per_token)} a request, more than 1/"
                    f"{_inverse(CPU_POOL_MAX_FRACTION)} of this machine's {_size(total_bytes)}); "
                    f"--max-model-len sets it")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """K and V for every layer of one token (the runner's own count, before tensor parallelism)."""
    return 2 * num_layers * num_kv_heads * head_dim * element_size


def available_memory_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, or less when a cgroup
    (a container's limit) leaves less."""
    available = _meminfo_available()
    cgroup = _cgroup_headroom()
    return min(available, cgroup) if cgroup is not None else available


def total_memory_bytes() -> int:
    """The machine's memory, or a container's (cgroup) limit when that is lower."""
    total = _meminfo("MemTotal:") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_value("memory.max")
    return min(total, limit) if limit is not None else total


def _meminfo_available() -> int:
    return _meminfo("MemAvailable:") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    limit, used = _cgroup_value("memory.max"), _cgroup_value("memory.current")
    return max(0, limit - used) if limit is not None and used is not None else None


def _cgroup_value(name: str) -> int | None:
    """A cgroup v2 memory file of this container; None where absent or unlimited ("max")."""
    try:
        with open(f"/sys/fs/cgroup/{name}") as f:
            value = f.read().strip()
        return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None


def _inverse(fraction: float) -> int:
    return round(1 / fraction)


def _why_tokens(tokens: int, max_model_len: int, max_num_seqs: int) -> str:
    if tokens == max_num_seqs * max_model_len:
        return f"{max_num_seqs} sequences of max_model_len {max_model_len}"
    if tokens == 2 * max_model_len:
        return f"two requests of max_model_len {max_model_len}"
    return f"the CPU default of {CPU_POOL_MIN_TOKENS} tokens"


def _size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"
