"""How big the KV pool is on a CPU when the user does not say, and how long a context fits it.

A GPU's pool is what `gpu_memory_utilization` leaves after a profile run. A CPU shares its memory
with everything else on the machine, so its default pool is sized from what the engine can use:

- tokens: every sequence the scheduler may run at full length (`max_num_seqs * max_model_len`),
  but no more than two full-length requests or `CPU_POOL_MIN_TOKENS`, whichever is larger. A CPU
  decodes a few hundred tokens a second at best, so a larger pool only sits there; 16384 tokens
  still hold dozens of chat-sized requests at once.
- bytes: those tokens times the model's KV bytes per token, capped at `CPU_POOL_MAX_FRACTION` of
  the memory available now (a shared machine's OOM killer takes the largest process).

The functions are pure (the caller measures memory with `available_memory_bytes`), so the rule is
unit-tested without a model.
"""

from __future__ import annotations

import os

GiB = 1 << 30
MiB = 1 << 20
CPU_POOL_MIN_TOKENS = 16384
CPU_POOL_MAX_FRACTION = 1 / 8


def default_cpu_kv_cache_bytes(bytes_per_token: int, max_model_len: int, max_num_seqs: int,
                               available_bytes: int) -> tuple[int, str]:
    """The default CPU KV pool in bytes, and one line saying why (for the start-up log).

    Args:
        bytes_per_token: K and V of every layer for one token, on this rank.
        max_model_len: the context length the engine runs with.
        max_num_seqs: most sequences running at once.
        available_bytes: memory available to this rank now.

    When even one `max_model_len` request does not fit under the cap, the cap is returned anyway:
    the engine then refuses to start and names the fix (lower --max-model-len, or
    --kv-cache-memory), rather than take memory the machine does not have.
    """
    assert bytes_per_token > 0 and max_model_len > 0 and max_num_seqs > 0
    tokens = min(max_num_seqs * max_model_len, max(2 * max_model_len, CPU_POOL_MIN_TOKENS))
    wanted = tokens * bytes_per_token
    limit = int(available_bytes * CPU_POOL_MAX_FRACTION)
    if wanted <= limit:
        return wanted, (f"KV cache {_size(wanted)} ({tokens} tokens at {_size(bytes_per_token)} each: "
                        f"{_why_tokens(tokens, max_model_len, max_num_seqs)}; "
                        f"{_size(available_bytes)} of memory available)")
    limit_tokens = limit // bytes_per_token
    return limit, (f"KV cache {_size(limit)} ({limit_tokens} tokens at {_size(bytes_per_token)} each: "
                   f"capped at 1/{round(1 / CPU_POOL_MAX_FRACTION)} of the {_size(available_bytes)} "
                   f"available; {tokens} tokens wanted; --kv-cache-memory sets it)")


def fit_cpu_max_model_len(model_max_len: int, bytes_per_token: int,
                          available_bytes: int) -> tuple[int, str | None]:
    """The default `max_model_len` on a CPU: the model's own, unless one request that long would
    not fit the largest default pool; then the largest power of two that does (at least 256).
    Returns the length and, when it is shorter than the model's, a line saying so."""
    limit_tokens = int(available_bytes * CPU_POOL_MAX_FRACTION) // max(1, bytes_per_token)
    if model_max_len <= limit_tokens:
        return model_max_len, None
    fitted = max(256, 1 << (max(1, limit_tokens).bit_length() - 1))
    return fitted, (f"max_model_len {fitted} (the model allows {model_max_len}, whose KV cache would "
                    f"take {_size(model_max_len * bytes_per_token)} a request, more than 1/"
                    f"{round(1 / CPU_POOL_MAX_FRACTION)} of the {_size(available_bytes)} available); "
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


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


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
