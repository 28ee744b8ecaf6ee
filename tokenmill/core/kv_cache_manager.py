"""Per-request block lists on top of the block pool: allocation, prefix hits and freeing."""

from __future__ import annotations

import sys

from tokenmill.core.block_pool import BlockPool, KVBlock, hash_block
from tokenmill.core.request import Request

# `_num_registered` of a request whose blocks must never be published (see `reset_prefix_cache`).
_NEVER_PUBLISH = sys.maxsize


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_registered: dict[str, int] = {}  # blocks of the request already in the index
        # Prefix-cache counters, in tokens (for metrics).
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    # ----- prefix caching -----
    def _update_block_hashes(self, request: Request) -> None:
        """Hash every full block of the request's tokens not hashed yet (chained on the parent)."""
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs],
                                     request.cache_salt if i == 0 else None))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest chain of cached blocks that prefixes the request, and its length in tokens.

        At least one token is always left to compute, because sampling needs its logits; requests
        that want prompt logprobs bypass the cache (those need every prompt position computed).
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        self._update_block_hashes(request)
        hits: list[KVBlock] = []
        max_blocks = (request.num_tokens - 1) // self.block_size
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ----- allocation -----
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens; returns the new block ids, or None (and
        changes nothing) when the pool cannot supply them."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks is not None and not computed_blocks:
            # A running request (the per-step case; most steps need no new block).
            needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size) - len(blocks)
            if needed <= 0:
                return []
            if needed > self.pool.num_free_blocks:
                return None
        else:
            computed_blocks = computed_blocks or []
            num_existing = len(blocks) if blocks is not None else len(computed_blocks)
            total_tokens = request.num_computed_tokens + num_new_tokens
            if blocks is None:
                total_tokens = len(computed_blocks) * self.block_size + num_new_tokens
            needed = -(-total_tokens // self.block_size) - num_existing
            # Reviving a cached free block takes it out of the free queue too.
            revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
            if max(needed, 0) + revived > self.pool.num_free_blocks:
                return None
            if blocks is None:
                self.pool.touch(computed_blocks)
                blocks = self.req_blocks[request.request_id] = list(computed_blocks)
                self._num_registered[request.request_id] = len(computed_blocks)
        new_blocks = self.pool.allocate(needed) if needed > 0 else []
        blocks.extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Publish the request's blocks that are full within its first `num_tokens` tokens.

        Called when a step is scheduled, with the tokens that step will have computed: a request
        scheduled later in the same step (a sibling of `n > 1`, or another prompt with the same
        prefix) then hits these blocks, and reads them after this step's attention layers wrote
        them (every layer writes all new K/V before it attends).
        """
        if not self.enable_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start or request.wants_prompt_logprobs:
            return  # (the first: no block filled up since the last call, most decode steps)
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(num_full, len(blocks))
        if num_full <= start:
            return
        self._update_block_hashes(request)
        for i in range(start, num_full):
            self.pool.register(blocks[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Return the request's blocks, deepest first (so a chain's tail is evicted before its head).

        Blocks published for a step that will now not run for this request (preempted while being
        scheduled) are unpublished first: their contents were never computed.
        """
        blocks = self.req_blocks.pop(request.request_id, None)
        registered = self._num_registered.pop(request.request_id, 0)
        if not blocks:
            return
        computed_full = request.num_computed_tokens // self.block_size
        for block in blocks[computed_full:registered]:
            if block.ref_cnt == 1:
                self.pool.unregister(block)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        """After new weights: no block computed before now is ever found by a prefix lookup.

        Every published hash is dropped (free and in-use blocks alike). Requests that hold blocks
        now keep running on them, but their blocks, and the ones they fill later, mix K/V of the
        old and new weights, so they are never published; a request that starts (or restarts
        after preemption) from here on publishes normally. Hashes depend only on tokens and salt,
        so requests keep the hashes they computed.
        """
        self.pool.drop_cached_prefixes()
        for request_id in self.req_blocks:
            self._num_registered[request_id] = _NEVER_PUBLISH

    def reset_counters(self) -> None:
        self.prefix_queries = self.prefix_hits = 0
