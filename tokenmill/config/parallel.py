"""How a model's attention heads split over tensor-parallel ranks: arithmetic shared by config
validation (refuse a split before any process starts) and the layers that shard themselves."""

from __future__ import annotations


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def head_partition(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[int, int, int, int]:
    """This rank's attention heads: `(q_start, q_count, kv_start, kv_count)`.

    KV heads are spread as evenly as they go, each taking its whole group of query heads, so a
    model whose KV heads do not divide by the rank count still splits (SmolLM2-135M's 3 KV heads
    over 2 ranks: 2 + 1, with 6 + 3 query heads). With fewer KV heads than ranks, each KV head is
    replicated on `tp // num_kv_heads` ranks and the query heads split evenly.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"attention heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if num_kv_heads >= tp:
        base, extra = divmod(num_kv_heads, tp)
        kv_count = base + (rank < extra)
        kv_start = rank * base + min(rank, extra)
        group = num_heads // num_kv_heads
        return kv_start * group, kv_count * group, kv_start, kv_count
    if tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of the KV heads ({num_kv_heads}) "
                         "when there are fewer KV heads than ranks")
    q_count = divide(num_heads, tp, "attention heads")
    return rank * q_count, q_count, rank // (tp // num_kv_heads), 1
