"""Prefix-cache reporting through the official SDKs: `usage.prompt_tokens_details.cached_tokens`
(OpenAI), `usage.cache_read_input_tokens` (Anthropic), `cache_salt` partitioning, and the metrics.

Each test starts its prompt with a fresh nonce so no earlier test can have cached any of it.
"""

from __future__ import annotations

import uuid

DOC = " ".join(f"Paragraph {i}: the paged KV cache stores keys and values in fixed-size blocks." for i in range(12))


def _doc() -> str:
    # ~200 tokens: many full KV blocks, well under the e2e server's max_model_len of 512.
    return f"[{uuid.uuid4().hex}] {DOC}"


def _chat(client, model, doc, **kw):
    return client.chat.completions.create(
        model=model, max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": doc}, {"role": "user", "content": "Summarize."}], **kw)


def test_openai_chat_cached_tokens(openai_client, model_name, server):
    hits_before = server.metric("prefix_cache_hits_total")
    doc = _doc()
    cold = _chat(openai_client, model_name, doc)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = _chat(openai_client, model_name, doc)
    assert warm.usage.prompt_tokens == cold.usage.prompt_tokens
    # All full blocks but the one holding the last prompt token come from the cache.
    assert 0.5 * warm.usage.prompt_tokens < warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens
    # Another tenant's salt never sees those blocks; a repeat under its own salt does.
    salted = _chat(openai_client, model_name, doc, extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    salted_again = _chat(openai_client, model_name, doc, extra_body={"cache_salt": "tenant-b"})
    assert salted_again.usage.prompt_tokens_details.cached_tokens > 0
    # The streaming usage chunk carries the same number.
    chunks = list(_chat(openai_client, model_name, doc, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == warm.usage.prompt_tokens_details.cached_tokens
    # Counters are in tokens; the metrics land within a step of the response.
    assert server.metric("prefix_cache_hits_total") - hits_before >= 3 * warm.usage.prompt_tokens_details.cached_tokens
    assert server.metric("prefix_cache_queries_total") >= server.metric("prefix_cache_hits_total")


def test_openai_completions_cached_tokens(openai_client, model_name):
    doc = _doc()
    cold = openai_client.completions.create(model=model_name, prompt=doc, max_tokens=1, temperature=0)
    warm = openai_client.completions.create(model=model_name, prompt=doc, max_tokens=1, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens
    # Two prompts in one request: both warm, so the usage is the sum of both hits.
    both = openai_client.completions.create(model=model_name, prompt=[doc, doc], max_tokens=1, temperature=0)
    assert both.usage.prompt_tokens_details.cached_tokens == 2 * warm.usage.prompt_tokens_details.cached_tokens
    chunks = list(openai_client.completions.create(model=model_name, prompt=doc, max_tokens=1, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == warm.usage.prompt_tokens_details.cached_tokens


def test_anthropic_cache_read_input_tokens(anthropic_client, model_name):
    doc = _doc()

    def ask(**kw):
        return anthropic_client.messages.create(model=model_name, max_tokens=2, system=doc,
                                                messages=[{"role": "user", "content": "Summarize."}], **kw)

    cold = ask(extra_body={"temperature": 0})
    assert cold.usage.cache_read_input_tokens == 0
    warm = ask(extra_body={"temperature": 0})
    assert warm.usage.cache_read_input_tokens > 0
    # Anthropic's split: input_tokens are the uncached rest; together they are the whole prompt.
    assert warm.usage.input_tokens + warm.usage.cache_read_input_tokens == cold.usage.input_tokens
    assert ask(extra_body={"temperature": 0, "cache_salt": "tenant-b"}).usage.cache_read_input_tokens == 0
    # Streamed: message_delta carries the final split, which the SDK folds into the message.
    with anthropic_client.messages.stream(model=model_name, max_tokens=2, system=doc,
                                          messages=[{"role": "user", "content": "Summarize."}],
                                          extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == warm.usage.cache_read_input_tokens
    assert final.usage.input_tokens == warm.usage.input_tokens
