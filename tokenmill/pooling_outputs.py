"""What `LLM.embed` / `EmbeddingEngine.embed` return (vLLM's shape: `out.outputs.embedding`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EmbeddingOutput:
    """One input's embedding vector."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """One input of an `embed` call: its token ids (after any truncation) and its embedding."""

    request_id: str
    prompt: str | None  # None when the input was token ids
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
