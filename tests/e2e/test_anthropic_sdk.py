"""The official `anthropic` SDK against a real `tokenmill serve` on the embedded model.

The installed SDK no longer has `temperature` among `messages.create` arguments, so sampling fields
go through `extra_body` (the server reads them as the Messages API defines them).
"""

from __future__ import annotations

import anthropic
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_messages_create(anthropic_client, model_name):
    msg = anthropic_client.messages.create(model=model_name, max_tokens=12, extra_body={"temperature": 0},
                                           system="Answer in one short sentence.", messages=QUESTION,
                                           metadata={"user_id": "u1"})
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert "Paris" in msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 0 < msg.usage.output_tokens <= 12 and msg.usage.input_tokens > 0


def test_multi_turn_and_system_blocks(anthropic_client, model_name):
    msg = anthropic_client.messages.create(
        model=model_name, max_tokens=8, extra_body={"temperature": 0},
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                  {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "Again."}])
    assert msg.content[0].type == "text" and msg.content[0].text


def test_stop_reasons(anthropic_client, model_name):
    msg = anthropic_client.messages.create(model=model_name, max_tokens=3, messages=QUESTION,
                                           extra_body={"temperature": 0})
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    msg = anthropic_client.messages.create(model=model_name, max_tokens=30, messages=QUESTION,
                                           extra_body={"temperature": 0}, stop_sequences=["Paris"])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "Paris"
    assert "Paris" not in msg.content[0].text


def test_stream_event_sequence(anthropic_client, model_name):
    full = anthropic_client.messages.create(model=model_name, max_tokens=10, extra_body={"temperature": 0},
                                            messages=QUESTION)
    events = list(anthropic_client.messages.create(model=model_name, max_tokens=10, extra_body={"temperature": 0},
                                                   messages=QUESTION, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) <= {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == full.content[0].text
    assert events[-2].delta.stop_reason == full.stop_reason
    assert events[-2].usage.output_tokens == full.usage.output_tokens


def test_stream_helper_text(anthropic_client, model_name):
    with anthropic_client.messages.stream(model=model_name, max_tokens=8, extra_body={"temperature": 0},
                                          messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and text


def test_count_tokens(anthropic_client, model_name):
    # (Without a system prompt SmolLM2's template inserts its own default one, so compare two.)
    short = anthropic_client.messages.count_tokens(model=model_name, messages=QUESTION, system="Hi.")
    longer = anthropic_client.messages.count_tokens(model=model_name, messages=QUESTION,
                                                    system="A much longer system prompt than the other.")
    assert 0 < short.input_tokens < longer.input_tokens


def test_sdk_errors(server, model_name):
    bad = anthropic.Anthropic(api_key="wrong", base_url=server.url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=model_name, max_tokens=2, messages=QUESTION)
    good = anthropic.Anthropic(api_key=server.api_key, base_url=server.url, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        good.messages.create(model="no-such-model", max_tokens=2, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError):
        good.messages.create(model=model_name, max_tokens=2, messages=QUESTION, extra_body={"temperature": 3})
