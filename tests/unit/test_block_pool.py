"""Block pool and KV-cache manager invariants, including a property test of random operations."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request
from tokenmill.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], salt: str | None = None, **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), arrival_time=0.0, cache_salt=salt)


def test_free_queue_is_lru_and_removes_from_middle():
    blocks = [KVBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3]
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 2] and q.num_free == 3


def test_hash_chains_and_salt():
    h1 = hash_block(None, [1, 2], None)
    assert hash_block(None, [1, 2], None) == h1
    assert hash_block(None, [1, 2], "tenant-a") != h1
    assert hash_block(h1, [3, 4], None) != hash_block(None, [3, 4], None)


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 1) == []  # slot 11 fits in block 2
    req.num_computed_tokens = 12
    assert len(kv.allocate_slots(req, 1)) == 1
    assert kv.allocate_slots(make_request("b", list(range(40))), 40) is None  # too big: no change
    assert kv.pool.num_free_blocks == 4
    kv.free(req)
    assert kv.pool.num_free_blocks == 8
    kv.pool.check_invariants()


def _run_prefill(kv: KVCacheManager, req: Request) -> int:
    blocks, hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - hit, blocks) is not None
    kv.cache_full_blocks(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    return hit


def test_prefix_hit_shares_blocks_and_salt_isolates():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    prefix = list(range(100, 112))  # three full blocks
    first = make_request("a", prefix + [1, 2])
    assert _run_prefill(kv, first) == 0
    second = make_request("b", prefix + [7, 8, 9])
    assert _run_prefill(kv, second) == 12
    assert kv.block_ids("a")[:3] == kv.block_ids("b")[:3]
    assert all(b.ref_cnt == 2 for b in kv.req_blocks["a"][:3])
    salted = make_request("c", prefix + [7], salt="other-tenant")
    assert _run_prefill(kv, salted) == 0
    assert not set(kv.block_ids("c")) & set(kv.block_ids("a"))
    for r in (first, second, salted):
        kv.free(r)
    kv.pool.check_invariants()
    assert kv.pool.num_free_blocks == 16


def test_cached_blocks_evicted_lru_deepest_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    req = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    _run_prefill(kv, req)
    kv.free(req)
    # Freed deepest-first: the chain's tail block is the first to be reused.
    order = [b.block_id for b in kv.pool.free_queue]
    chain = [b for b in kv.pool.blocks if b.block_hash is not None]
    assert len(chain) == 3
    tail_hashes = req.block_hashes
    assert kv.pool.lookup(tail_hashes[2]).block_id == order[1]
    assert kv.pool.lookup(tail_hashes[0]).block_id == order[3]


def test_prompt_logprobs_bypass_cache():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=True)
    _run_prefill(kv, make_request("a", [1, 2, 3, 4, 5]))
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 9], prompt_logprobs=1)) == ([], 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5),
                          st.integers(1, 9)), min_size=1, max_size=60))
def test_random_operations_keep_invariants(ops):
    kv = KVCacheManager(num_blocks=12, block_size=2, enable_caching=True)
    live: dict[str, Request] = {}
    counter = 0
    for op, which, size in ops:
        if op == "add":
            counter += 1
            # Few distinct prefixes, so hits and evictions both happen.
            req = make_request(f"r{counter}", [which % 3] * size + [counter])
            blocks, hit = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - hit, blocks) is not None:
                kv.cache_full_blocks(req, req.num_tokens)
                req.num_computed_tokens = req.num_tokens
                live[req.request_id] = req
        elif op == "grow" and live:
            req = list(live.values())[which % len(live)]
            if kv.allocate_slots(req, size) is not None:
                req.all_token_ids.extend([7] * size)
                kv.cache_full_blocks(req, req.num_computed_tokens + size)
                req.num_computed_tokens += size
        elif op == "free" and live:
            req = live.pop(list(live)[which % len(live)])
            kv.free(req)
        kv.pool.check_invariants()
    for req in live.values():
        kv.free(req)
    kv.pool.check_invariants()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_preempted_before_compute_unpublishes_its_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=True)
    req = make_request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(req, 5)
    kv.cache_full_blocks(req, 5)  # published for a step that then does not run
    assert len(kv.pool.cached) == 2
    kv.free(req)  # num_computed_tokens is still 0
    assert not kv.pool.cached
    kv.pool.check_invariants()
