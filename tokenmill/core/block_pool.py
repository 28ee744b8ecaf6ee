"""The pool of KV-cache blocks: ref counts, an O(1) LRU free queue, and the prefix-hash index.

A block is free when no running request holds it (ref_cnt == 0). A free block may still hold a
valid cached prefix (it keeps its hash) until it is handed out again: free blocks are reused
least-recently-freed first, so popular prefixes survive. Requests free their blocks deepest-first,
so within one chain the tail is evicted before its parents.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Iterable


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and computed (prefix caching)
    prev_free: "KVBlock | None" = None
    next_free: "KVBlock | None" = None


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, append at the tail, remove from the
    middle (a cached block revived by a prefix hit) — all O(1)."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        assert block is not self._tail, "no free block"
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block is not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


def hash_block(parent: bytes | None, token_ids: Iterable[int], extra: str | None) -> bytes:
    """SHA-256 of (parent hash, token ids, extra keys): collision-resistant, unlike `hash()`."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\x00salt:" + extra.encode())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has no room for a single block; give it more memory")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}  # block hash -> block holding that prefix

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` blocks (evicting cached contents of the least recently freed)."""
        assert count <= self.num_free_blocks
        blocks = []
        for _ in range(count):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full, computed block under its prefix hash (first writer wins)."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def unregister(self, block: KVBlock) -> None:
        """Forget a block's prefix hash (its contents are not valid)."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None

    def drop_cached_prefixes(self) -> None:
        """Forget every block's prefix hash, free or in use: no later lookup finds K/V computed
        before now (new weights make them stale). The blocks themselves stay where they are."""
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in the order given (pass deepest first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def check_invariants(self) -> None:
        """For tests: free blocks have no references, counts add up, the index points at real blocks."""
        free = list(self.free_queue)
        assert len(free) == self.free_queue.num_free
        assert len({b.block_id for b in free}) == len(free), "a block is twice in the free queue"
        assert all(b.ref_cnt == 0 for b in free), "a referenced block is in the free queue"
        in_use = [b for b in self.blocks if b.ref_cnt > 0]
        assert all(b.ref_cnt >= 0 for b in self.blocks)
        assert len(in_use) + len(free) == self.num_blocks, "a block is neither free nor in use"
        for h, b in self.cached.items():
            assert b.block_hash == h
