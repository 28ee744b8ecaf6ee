"""`AsyncEngine` admission over the engine-core process with the fake core (`server_fakes.py`):
a request that fails anywhere in `submit` leaves nothing behind, and the core answers every request
it cannot decode or add, so none waits forever (docs/reliability.md, "ghost requests")."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from server_fakes import FakeInputProcessor, FakeOutputProcessor, FakeTokenizer, make_fake_engine

from tokenmill.engine.admission import QueueWaitEstimator
from tokenmill.engine.async_engine import AsyncEngine, QueueFullError
from tokenmill.engine.core_client import EngineCoreClient
from tokenmill.engine.core_process import AddRequests
from tokenmill.core.messages import EngineRequest
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

pytestmark = pytest.mark.slow


async def make_engine(input_processor=None, **kwargs) -> AsyncEngine:
    client = await EngineCoreClient.start(b"", make_engine=make_fake_engine)
    engine = AsyncEngine(client, input_processor or FakeInputProcessor(), FakeOutputProcessor(),
                         FakeTokenizer(), model_name="fake", max_model_len=64, max_num_seqs=4, max_queue_len=4,
                         vocab_size=1000, **kwargs)
    engine.start()
    return engine


def assert_nothing_registered(engine: AsyncEngine) -> None:
    assert engine.num_inflight_requests == 0
    assert engine._num_inflight_seqs == 0 and not engine._child_to_parent
    assert not engine.output_processor.requests


async def collect(stream) -> list:
    return [out async for out in stream]


class WideIntInputProcessor(FakeInputProcessor):
    """Hands the engine a priority msgpack cannot carry, as a missed range check would."""

    def process(self, *args, **kwargs) -> list[EngineRequest]:
        requests = super().process(*args, **kwargs)
        for request in requests:
            request.priority = 10**20
        return requests


class SlowInputProcessor(FakeInputProcessor):
    def process(self, *args, **kwargs) -> list[EngineRequest]:
        import time
        time.sleep(0.5)
        return super().process(*args, **kwargs)


def test_an_encoding_failure_leaves_nothing_registered():
    async def run() -> None:
        engine = await make_engine(WideIntInputProcessor())
        try:
            stop = ["x" * 1000] * 16
            for _ in range(3):
                with pytest.raises(ValueError, match="out of range"):
                    await engine.submit("r1", "hello", SamplingParams(max_tokens=2, stop=stop, n=2))
                assert_nothing_registered(engine)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_a_client_that_leaves_during_tokenization_leaves_nothing_registered():
    async def run() -> None:
        engine = await make_engine(SlowInputProcessor())
        try:
            task = asyncio.create_task(engine.submit("r1", "hello", SamplingParams(max_tokens=2, n=3)))
            await asyncio.sleep(0.1)
            assert engine._num_inflight_seqs == 3  # the capacity is held while it tokenizes
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.6)  # the input thread finishes the abandoned work
            assert_nothing_registered(engine)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_capacity_held_while_tokenizing_is_counted():
    async def run() -> None:
        engine = await make_engine(SlowInputProcessor())
        try:
            first = asyncio.create_task(engine.submit("r1", "hello", SamplingParams(max_tokens=2, n=8)))
            await asyncio.sleep(0.1)
            with pytest.raises(QueueFullError):  # 8 of 4 + 4 sequences are taken by the first
                await engine.submit("r2", "hello", SamplingParams(max_tokens=2))
            await collect(await first)
            assert_nothing_registered(engine)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_the_core_answers_a_request_it_cannot_decode():
    async def run() -> None:
        engine = await make_engine()
        try:
            # The wire form of a request whose `choice` is a string: msgspec's __init__ does not
            # check types, so only the core's decoder would notice.
            bad = msgspec.msgpack.encode({"type": "add", "requests": [
                {"request_id": f"{i}_r1", "prompt_token_ids": [104, 105],
                 "sampling_params": {"max_tokens": 2, "structured_outputs": {"choice": "abc"}},
                 "arrival_time": 0.0} for i in range(4)]})
            engine.client.encode_add_requests = lambda requests: bad
            stream = await engine.submit("r1", "hi", SamplingParams(max_tokens=2, n=4,
                                                                      output_kind=RequestOutputKind.FINAL_ONLY))
            outputs = await asyncio.wait_for(collect(stream), timeout=10)
            assert [c.finish_reason for c in outputs[-1].outputs] == ["error"] * 4
            assert_nothing_registered(engine)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_the_core_answers_a_request_it_cannot_add_and_keeps_serving():
    async def run() -> None:
        engine = await make_engine()
        try:
            # The fake core's add_request raises for prompts starting with token 9.
            refused = await engine.submit("r1", [9, 1], SamplingParams(max_tokens=2, n=2))
            outputs = await asyncio.wait_for(collect(refused), timeout=10)
            assert {c.finish_reason for o in outputs for c in o.outputs} == {"error"}
            served = await engine.submit("r2", "hi", SamplingParams(max_tokens=2))
            outputs = await asyncio.wait_for(collect(served), timeout=10)
            assert outputs[-1].outputs[0].text == "ab"
            assert_nothing_registered(engine)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_a_well_formed_message_still_decodes():
    """The core's fallback decoder only runs on frames the typed one refuses."""
    request = EngineRequest("r", [1, 2], SamplingParams(max_tokens=2), 0.0)
    frame = msgspec.msgpack.encode(AddRequests(requests=[request]))
    from tokenmill.engine.core_process import CoreRequest
    assert msgspec.msgpack.Decoder(CoreRequest).decode(frame).requests[0].request_id == "r"


def test_queue_wait_estimate():
    estimator = QueueWaitEstimator(max_num_seqs=64)
    assert estimator.wait_s(0, 10_000, 1) == 0.0  # nothing measured: admit by count only
    for _ in range(10):
        estimator.on_step(0.5, 50)  # 100 tokens/s, every step the same size
    assert estimator.tokens_per_s == pytest.approx(100)
    assert estimator.wait_s(0, 3000, 1) == pytest.approx(30)
    assert estimator.wait_s(0, 3000, 64) == pytest.approx(30)  # no slope seen: no batch discount


def test_queue_wait_prices_tokens_at_the_batch_they_run_in():
    # Steps cost 40 ms plus 1 ms a token: mostly single decodes, a few 30-token prompts.
    estimator = QueueWaitEstimator(max_num_seqs=64, max_step_tokens=128)
    for i in range(60):
        n = 30 if i % 10 == 0 else 1
        estimator.on_step(0.040 + 0.001 * n, n)
    a, b = estimator.step_cost()
    assert a == pytest.approx(0.040) and b == pytest.approx(0.001)
    assert estimator.wait_s(0, 50, 1) == pytest.approx(50 * 0.041)  # alone: a whole step a token
    # 64 sequences x 50 decode tokens share 50 steps: ~5 s, where the average step's speed
    # (a 1-2 token step) would project 100 s and refuse them.
    assert estimator.wait_s(0, 64 * 50, 64) == pytest.approx(64 * 50 * (0.040 + 0.064) / 64)
    assert estimator.wait_s(0, 64 * 50, 1000) == estimator.wait_s(0, 64 * 50, 64)  # capped at max_num_seqs
    assert estimator.wait_s(1280, 0, 1) == pytest.approx(10 * (0.040 + 0.128))  # prompts in full steps


def test_tokens_ahead_counts_what_each_sequence_lacks_up_to_the_new_ones_work():
    async def run() -> None:
        engine = await make_engine()
        try:
            slow = SamplingParams(max_tokens=50, n=2)
            stream = await engine.submit("r1", "hello", slow)  # 2 sequences of 5 + 50 tokens
            assert engine.tokens_ahead(3) == (2 * 3, 0, 2)  # a short request waits for 3 of each
            assert engine.tokens_ahead(10) == (2 * 5, 2 * 5, 2)
            assert engine.tokens_ahead(100) == (2 * 5, 2 * 50, 2)
            engine.abort(stream.request_id)
            assert engine.tokens_ahead(100) == (0, 0, 0)
        finally:
            await engine.shutdown()
    asyncio.run(run())


def test_queue_wait_believes_no_slope_from_small_steps_alone():
    # A warm-up request: one slow 3-token prompt step and 7 single decodes. The line through them
    # would charge ~130 ms a token at any batch; the average is the price until a batch is seen.
    estimator = QueueWaitEstimator(max_num_seqs=64)
    estimator.on_step(0.30, 3)
    for _ in range(7):
        estimator.on_step(0.04, 1)
    a, b = estimator.step_cost()
    assert a == 0.0 and b == pytest.approx((0.30 + 7 * 0.04) / 10, rel=0.05)
