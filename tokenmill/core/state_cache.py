"""State slots of a hybrid model (linear-attention layers): one per running request, the rest
holding prefix-cache checkpoints of the state.

A linear-attention layer keeps, per request, one constant-size state (`model/attention/lightning.py`)
in a slot of its state pool; slot i of every such layer belongs to the same request. This module
hands out the slot ids, like `BlockPool` hands out KV block ids, and is built on one: a running
request holds its working slot (ref 1); a checkpoint is a slot holding the state after exactly P
tokens of some prefix, P a multiple of `interval`, published under the KV block hash of the block
that ends at P (the hash chains every token before it, and the cache salt). A free slot keeps its
checkpoint until it is handed out again, least recently used first, as a free KV block keeps its
cached prefix.

Prefix caching therefore never reuses KV blocks without the matching state: a cached prefix is
used up to its last boundary whose checkpoint is still there (`longest_hit`), the request's
working slot is first filled with that checkpoint (the runner's restore copy, before the step's
layers run), and the tokens after it are recomputed.

Timing: the scheduler publishes a checkpoint when it schedules the step whose prefill chunk crosses
the boundary (the kernel stores the state there as it passes). Until the next `begin_step` the
slot stays referenced, so nothing else is written into it while that step may still be running,
and it is not a hit yet: a request restoring it copies at the start of a later step, after the
writing step in stream order. A checkpoint published for a step that then does not run for its
request (preempted while being scheduled) is withdrawn (`free`). Only chunks of two or more tokens
take checkpoints (a one-token step runs the decode kernel, which keeps none).
"""

from __future__ import annotations

from tokenmill.core.block_pool import BlockPool, KVBlock
from tokenmill.core.request import Request

NO_SLOT = -1


class StateCache:
    """Args:
        num_slots: slots of the pool (`CacheConfig.num_state_slots`).
        interval: tokens between checkpoints (a multiple of the KV block size); 0 or caching off: none.
        enable_caching: prefix caching is on.
        max_running: requests that can run at once; that many slots are never taken by a checkpoint.
    """

    def __init__(self, num_slots: int, interval: int, enable_caching: bool, max_running: int) -> None:
        if num_slots < 1:
            raise ValueError("a hybrid model needs at least one state slot")
        self.pool = BlockPool(num_slots, enable_caching)
        self.interval = interval
        self.checkpointing = enable_caching and interval > 0
        self.max_running = max_running
        self.working: dict[str, KVBlock] = {}
        self._restores: dict[str, int] = {}  # request -> checkpoint slot to copy, for its NewRequestData
        # Checkpoints published for the step being scheduled, per request: (boundary, slot).
        self._published: dict[str, list[tuple[int, KVBlock]]] = {}
        # Requests whose state mixes weights from before and after a `reset_prefix_cache`: they
        # take no checkpoints until they restart (preempted) or finish.
        self._no_checkpoints: set[str] = set()

    def begin_step(self) -> None:
        """Every checkpoint published for earlier steps is now written (its step was launched
        before this one): release its slot, which makes it a hit and, later, evictable."""
        for published in self._published.values():
            self.pool.free(slot for _, slot in published)
        self._published.clear()

    # ----- admission -----
    def longest_hit(self, request: Request, num_hit_blocks: int, block_size: int) -> tuple[int, KVBlock | None]:
        """The longest prefix of the request's `num_hit_blocks` cached KV blocks that ends at a
        ready checkpoint: (its length in blocks, the checkpoint), or (0, None)."""
        if not self.checkpointing:
            return 0, None
        boundary = (num_hit_blocks * block_size) // self.interval * self.interval
        while boundary > 0:
            slot = self.pool.lookup(request.block_hashes[boundary // block_size - 1])
            if slot is not None and slot.ref_cnt == 0:  # (a published one is held until written)
                return boundary // block_size, slot
            boundary -= self.interval
        return 0, None

    @property
    def can_admit(self) -> bool:
        return self.pool.num_free_blocks > 0

    def admit(self, request_id: str, restore: KVBlock | None) -> None:
        """Give a request starting (or restarting) its working slot; `restore`: the checkpoint it
        starts from (kept out of the allocation, and refreshed as recently used)."""
        if restore is not None:
            self.pool.touch([restore])
        self.working[request_id] = self.pool.allocate(1)[0]
        if restore is not None:
            self.pool.free([restore])
            self._restores[request_id] = restore.block_id

    def slot(self, request_id: str) -> int:
        return self.working[request_id].block_id

    def take_restore(self, request_id: str) -> int:
        """The checkpoint slot the request's first step copies its state from, or NO_SLOT."""
        return self._restores.pop(request_id, NO_SLOT)

    # ----- checkpoints -----
    def checkpoint(self, request: Request, start: int, end: int, block_size: int) -> list[int]:
        """Slots for the state at each multiple of `interval` in (start, end], the chunk a step
        computes for `request` (NO_SLOT where none is taken), or [] if none is. Taken where the
        boundary's tokens are known and hashed, its checkpoint is not there already, and a slot is
        free beyond those requests not yet running may need."""
        if (not self.checkpointing or end - start < 2 or request.wants_prompt_logprobs
                or request.request_id in self._no_checkpoints):
            return []
        first = start // self.interval + 1
        boundaries = range(first * self.interval, end + 1, self.interval)
        slots = [NO_SLOT] * len(boundaries)
        reserve = self.max_running - len(self.working)
        for j, boundary in enumerate(boundaries):
            if boundary // block_size > len(request.block_hashes):
                break  # its last token is still in flight: no hash yet
            block_hash = request.block_hashes[boundary // block_size - 1]
            if self.pool.lookup(block_hash) is not None or self.pool.num_free_blocks <= reserve:
                continue
            slot = self.pool.allocate(1)[0]
            self.pool.register(slot, block_hash)
            self._published.setdefault(request.request_id, []).append((boundary, slot))
            slots[j] = slot.block_id
        return slots if any(s != NO_SLOT for s in slots) else []

    # ----- release -----
    def free(self, request: Request) -> None:
        """The request stops (finished, aborted, preempted): its working slot returns; checkpoints
        published for a step that will now not run for it (past its computed tokens) are withdrawn."""
        self._restores.pop(request.request_id, None)
        self._no_checkpoints.discard(request.request_id)
        slot = self.working.pop(request.request_id, None)
        if slot is not None:
            self.pool.free([slot])
        published = self._published.get(request.request_id)
        if published:
            withdrawn = [s for boundary, s in published if boundary > request.num_computed_tokens]
            for s in withdrawn:
                self.pool.unregister(s)
            self.pool.free(withdrawn)
            self._published[request.request_id] = [
                (b, s) for b, s in published if b <= request.num_computed_tokens]

    def reset_prefix_cache(self) -> None:
        """New weights (or a state pool about to be dropped): no checkpoint stored before now is
        ever restored, and the running requests, whose states were computed with the old weights,
        store none from here on (until they restart after a preemption). Called between steps,
        when no restore is pending: a restore is taken in the same `schedule()` that admits."""
        self.pool.drop_cached_prefixes()
        self._no_checkpoints = set(self.working)
