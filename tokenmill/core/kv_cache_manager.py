"""Per-request block lists on top of the block pool: allocation, prefix hits and freeing.

With a sliding window on every layer that has a KV cache (`sliding_window`), the blocks wholly
behind the window of a request's next query are freed as it advances (its list keeps `None` in
their places, so block i still holds tokens i * block_size ...): a long generation holds about
window / block_size + 1 blocks, not its whole context. A freed block that was published keeps its
prefix hash in the pool until it is handed out again, so it can still be a prefix hit; once
evicted, the chain lookup stops there and the prefix is simply not a hit.

A hybrid model's state slots (`state_cache.py`) are managed beside the blocks: a request starts
only with a free slot as well as its blocks, a prefix hit is cut back to the last boundary whose
state checkpoint is cached, and freeing a request returns both.
"""

from __future__ import annotations

import sys

from tokenmill.core.block_pool import BlockPool, KVBlock, hash_block
from tokenmill.core.request import Request
from tokenmill.core.state_cache import NO_SLOT, StateCache


# The id the runner's block table gets for a block freed behind the window (never read).
FREED_BLOCK_ID = -1

# `_num_registered` of a request whose blocks must never be published (see `reset_prefix_cache`).
_NEVER_PUBLISH = sys.maxsize


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 sliding_window: int | None = None, states: StateCache | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.states = states  # hybrid models only
        self._hit_checkpoints: dict[str, KVBlock] = {}  # the state checkpoint a prefix hit ends at
        # None in place of a block freed behind the sliding window.
        self.req_blocks: dict[str, list[KVBlock | None]] = {}
        self._num_freed: dict[str, int] = {}  # leading blocks of the request freed behind the window
        self._num_registered: dict[str, int] = {}  # blocks of the request already in the index
        # Prefix-cache counters, in tokens (for metrics).
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [FREED_BLOCK_ID if b is None else b.block_id for b in self.req_blocks.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (those freed behind its window not counted)."""
        blocks = self.req_blocks.get(request_id, ())
        return len(blocks) - self._num_freed.get(request_id, 0)

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
        if self.states is not None:
            # Never the blocks without the state: only up to the last cached state checkpoint.
            self._hit_checkpoints.pop(request.request_id, None)
            num_blocks, checkpoint = self.states.longest_hit(request, len(hits), self.block_size)
            hits = hits[:num_blocks]
            if checkpoint is not None:
                self._hit_checkpoints[request.request_id] = checkpoint
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ----- allocation -----
    def _free_behind_window(self, request_id: str, blocks: list[KVBlock | None], first_query: int) -> None:
        """Free the blocks wholly behind the window of the query at position `first_query`: it
        (and every later query) attends keys > first_query - window only. Deepest first, as `free`."""
        num_dead = max(0, first_query - self.sliding_window + 1) // self.block_size
        start = self._num_freed.get(request_id, 0)
        if num_dead <= start:
            return
        num_dead = min(num_dead, len(blocks))
        dead = blocks[start:num_dead]
        blocks[start:num_dead] = [None] * (num_dead - start)
        self._num_freed[request_id] = num_dead
        self.pool.free(reversed(dead))

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens; returns the new block ids, or None (and
        changes nothing but the release of blocks behind the window, which no step reads again)
        when the pool cannot supply them."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks is not None and self.sliding_window is not None:
            self._free_behind_window(request.request_id, blocks, request.num_computed_tokens)
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
            if blocks is None and self.states is not None:
                if not self.states.can_admit:
                    return None
                self.states.admit(request.request_id, self._hit_checkpoints.pop(request.request_id, None)
                                  if computed_blocks else None)
            if blocks is None:
                self.pool.touch(computed_blocks)
                blocks = self.req_blocks[request.request_id] = list(computed_blocks)
                self._num_registered[request.request_id] = len(computed_blocks)
                if self.sliding_window is not None:  # a long hit: keep only its last window
                    self._free_behind_window(request.request_id, blocks, len(computed_blocks) * self.block_size)
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
            if blocks[i] is not None:  # (one freed behind the window before it filled: nothing to keep)
                self.pool.register(blocks[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Return the request's blocks, deepest first (so a chain's tail is evicted before its head).

        Blocks published for a step that will now not run for this request (preempted while being
        scheduled) are unpublished first: their contents were never computed.
        """
        if self.states is not None:
            self.states.free(request)
            self._hit_checkpoints.pop(request.request_id, None)
        blocks = self.req_blocks.pop(request.request_id, None)
        registered = self._num_registered.pop(request.request_id, 0)
        num_freed = self._num_freed.pop(request.request_id, 0)
        if not blocks:
            return
        computed_full = request.num_computed_tokens // self.block_size
        for block in blocks[max(computed_full, num_freed):registered]:
            if block.ref_cnt == 1:
                self.pool.unregister(block)
        self.pool.free(reversed(blocks[num_freed:]))

    # ----- state slots (hybrid models) -----
    def begin_step(self) -> None:
        """Called when a step starts to be scheduled: the previous step's state checkpoints are
        launched, so they become hits."""
        if self.states is not None:
            self.states.begin_step()

    def state_slot(self, request_id: str) -> int:
        return NO_SLOT if self.states is None else self.states.slot(request_id)

    def take_state_restore(self, request_id: str) -> int:
        """The state checkpoint slot a starting request copies first, or NO_SLOT."""
        return NO_SLOT if self.states is None else self.states.take_restore(request_id)

    def checkpoint_states(self, request: Request, start: int, end: int) -> list[int]:
        """State checkpoint slots the step computing tokens [start, end) of `request` stores (one
        per interval boundary in (start, end], NO_SLOT where none), or []."""
        if self.states is None or not self.enable_caching:
            return []
        self._update_block_hashes(request)
        return self.states.checkpoint(request, start, end, self.block_size)

    def reset_prefix_cache(self) -> None:
        """After new weights: no block (nor, for a hybrid model, state checkpoint) computed before
        now is ever found by a prefix lookup.

        Every published hash is dropped (free and in-use blocks alike). Requests that hold blocks
        now keep running on them, but their blocks, and the ones they fill later, mix K/V of the
        old and new weights, so they are never published; a request that starts (or restarts
        after preemption) from here on publishes normally. Hashes depend only on tokens and salt,
        so requests keep the hashes they computed.
        """
        self.pool.drop_cached_prefixes()
        for request_id in self.req_blocks:
            self._num_registered[request_id] = _NEVER_PUBLISH
        if self.states is not None:  # the recurrent states' checkpoints, likewise
            self.states.reset_prefix_cache()
            self._hit_checkpoints.clear()

    def reset_counters(self) -> None:
        self.prefix_queries = self.prefix_hits = 0
