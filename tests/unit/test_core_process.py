"""The engine-core process wire format and thread choice (no process started)."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from tokenmill.engine.core_process import (
    AbortRequests, AddRequests, CoreMessage, CoreReady, CoreRequest, CoreStep, cpu_threads_for_core,
)
from tokenmill.core.messages import EngineOutput, EngineOutputs, EngineRequest, FinishReason
from tokenmill.sampling_params import SamplingParams


def test_messages_round_trip_as_typed_msgpack():
    request = EngineRequest(request_id="r1", prompt_token_ids=[1, 2, 3],
                            sampling_params=SamplingParams(max_tokens=4, stop=["x"]), arrival_time=1.5)
    decoder = msgspec.msgpack.Decoder(CoreRequest)
    for msg in (AddRequests(requests=[request]), AbortRequests(request_ids=["a", "b"])):
        assert decoder.decode(msgspec.msgpack.encode(msg)) == msg
    step = CoreStep(outputs=EngineOutputs(outputs=[EngineOutput(request_id="r1", new_token_ids=[5],
                                                                finish_reason=FinishReason.STOP)]))
    out_decoder = msgspec.msgpack.Decoder(CoreMessage)
    assert out_decoder.decode(msgspec.msgpack.encode(step)) == step
    assert out_decoder.decode(msgspec.msgpack.encode(CoreReady(kv_capacity_tokens=64, pid=1))).pid == 1


def test_a_pickled_frame_is_rejected():
    # docs/reliability.md item 27: nothing on the socket is ever unpickled.
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.Decoder(CoreRequest).decode(pickle.dumps({"requests": []}))


def test_core_threads_are_what_the_entry_point_chose():
    """The serving entry point picks the count (entrypoints/threads.py, tests/unit/test_threads.py);
    the core applies it, and with none leaves torch as OMP_NUM_THREADS set it."""
    assert cpu_threads_for_core(3) == 3 and cpu_threads_for_core(0) == 1
    assert cpu_threads_for_core(None) is None
