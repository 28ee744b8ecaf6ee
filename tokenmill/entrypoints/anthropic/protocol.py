"""Anthropic Messages API request models (pydantic) and their translation to a prompt and
`SamplingParams`. Only text content blocks are served; other block types are a 400."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.entrypoints.openai.protocol import MAX_MESSAGES, MAX_STOP_SEQUENCES
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class Message(_Model):
    role: Literal["user", "assistant"]
    content: Union[str, list[TextBlock]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class Metadata(_Model):
    user_id: str | None = None


class _Conversation(_Model):
    model: str
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Union[str, list[TextBlock], None] = None

    def chat_messages(self) -> list[dict]:
        """OpenAI-style role/content dicts for the model's chat template."""
        out = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        out.extend({"role": m.role, "content": m.text()} for m in self.messages)
        return out


class MessagesRequest(_Conversation):
    max_tokens: int  # required by the Anthropic API
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    stream: bool = False

    def to_sampling_params(self) -> SamplingParams:
        """Raises `ValueError` with a user-facing message for out-of-range values."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            stop=self.stop_sequences or None,
            max_tokens=self.max_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class CountTokensRequest(_Conversation):
    pass
