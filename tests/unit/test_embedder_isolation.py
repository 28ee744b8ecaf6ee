"""`AsyncEmbedder` batches requests into one forward pass; an input its tokenizer or model cannot
take fails only its own request (docs/reliability.md, "one bad embedding input")."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder


class FakeEmbeddingEngine:
    """Embeds token ids as [count, first id]; text "TYPE" breaks its tokenizer with a TypeError
    (as a lone surrogate breaks HF's) and token id 13 breaks the model."""

    max_model_len = 64

    def __init__(self) -> None:
        self.passes = 0

    def validate_dimensions(self, dimensions) -> None:
        pass

    def tokenize(self, inputs, truncate_prompt_tokens=None):
        ids = []
        for x in inputs:
            if x == "TYPE":
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, ...]]")
            ids.append([ord(c) for c in x] if isinstance(x, str) else list(x))
        return inputs, ids

    def embed_token_ids(self, token_ids, use_tqdm=False):
        self.passes += 1
        if any(13 in ids for ids in token_ids):
            raise RuntimeError("the model cannot embed token 13")
        return torch.tensor([[float(len(ids)), float(ids[0])] for ids in token_ids])


@pytest.mark.parametrize("bad_input", ["TYPE", [13, 1]])
def test_a_bad_input_fails_only_its_request(bad_input):
    async def run() -> None:
        engine = FakeEmbeddingEngine()
        embedder = AsyncEmbedder(engine, "fake")
        embedder.start()
        try:
            jobs = [embedder.embed(["ab", "c"]), embedder.embed([bad_input]), embedder.embed(["xyz"])]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            assert results[0].embeddings == [[2.0, 97.0], [1.0, 99.0]]
            assert results[2].embeddings == [[3.0, 120.0]]
            assert isinstance(results[1], (ValueError, RuntimeError))
            if isinstance(bad_input, str):  # a tokenizer failure is the request's: a 400
                assert isinstance(results[1], ValueError) and "could not be tokenized" in str(results[1])
        finally:
            await embedder.shutdown()
    asyncio.run(run())
