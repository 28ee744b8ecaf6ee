"""Front-end input processing: chat templates, tokenization and every length / vocabulary check,
so nothing invalid ever reaches the engine core."""

from __future__ import annotations

import time
from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.core.messages import EngineRequest
from tokenmill.sampling_params import SamplingParams


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the context window."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        if max_tokens is None:
            msg = (f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                   f"{num_prompt_tokens} tokens, leaving no room for output.")
        else:
            msg = (f"This model's maximum context length is {max_model_len} tokens. However, you "
                   f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                   f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.")
        super().__init__(msg)


def child_request_id(index: int, parent_id: str) -> str:
    return f"{index}_{parent_id}"


class InputProcessor:
    def __init__(self, tokenizer: Any, model_config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        hf = model_config.hf_config
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        if eos is None:
            eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
        self.eos_token_id = eos
        # Models often end turns with tokens other than EOS (e.g. <|eot_id|>, <|im_end|>).
        extra = set()
        for value in (getattr(hf, "eos_token_id", None), self._generation_config_eos()):
            if isinstance(value, int):
                extra.add(value)
            elif isinstance(value, list):
                extra.update(v for v in value if isinstance(v, int))
        extra.discard(eos)
        self.extra_stop_token_ids = sorted(extra)
        self._structured = None  # StructuredOutputManager, built on the first constrained request

    def _generation_config_eos(self) -> Any:
        source = self.model_config.source
        if source.kind != "hf":
            return None
        try:
            from transformers import GenerationConfig
            return GenerationConfig.from_pretrained(source.path).eos_token_id
        except (OSError, ValueError):
            return None

    # ----- text -----
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> str:
        """The conversation as the model's chat template renders it (transformers' sandboxed Jinja)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids, not chat messages")
        template = self.model_config.chat_template  # --chat-template replaces the tokenizer's
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; use completions instead")
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
            chat_template=template, **(chat_template_kwargs or {}))

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids instead of text")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    # ----- requests -----
    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None,
                add_special_tokens: bool = True) -> list[EngineRequest]:
        """Validate and tokenize one prompt; one EngineRequest per sample (`n` children)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            token_ids = self.tokenize(prompt, add_special_tokens=add_special_tokens)
        else:
            token_ids = list(prompt)
        self.validate_token_ids(token_ids)
        max_tokens = params.max_tokens
        if len(token_ids) + (max_tokens or 1) > self.max_model_len:
            raise ContextLengthError(len(token_ids), max_tokens, self.max_model_len)
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > self.model_config.max_logprobs:
                raise ValueError(f"{name}={asked} is more than this server's --max-logprobs "
                                 f"{self.model_config.max_logprobs}")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise ValueError(f"logit_bias has token ids outside the vocabulary "
                                 f"(size {self.vocab_size}): {bad[:10]}")
        if params.structured_outputs is not None:
            # Compiling validates the schema / regex / grammar (cached, so the engine's compile of
            # the same spec is a hit); a bad one raises GrammarError, a ValueError.
            self.structured_output_manager().compile(params.structured_outputs)
            if params.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured outputs: the grammar "
                                 "ends the output")
        stop_ids = list(params.stop_token_ids or []) + self.extra_stop_token_ids
        base = params.clone(all_stop_token_ids=stop_ids or None,
                            max_tokens=max_tokens if max_tokens is not None
                            else self.max_model_len - len(token_ids))
        arrival = time.time() if arrival_time is None else arrival_time
        if params.n == 1:
            return [EngineRequest(request_id, token_ids, base.clone(n=1), arrival, self.eos_token_id,
                                  priority, cache_salt)]
        return [EngineRequest(child_request_id(i, request_id), token_ids,
                              base.clone(n=1, seed=None if params.seed is None else params.seed + i),
                              arrival, self.eos_token_id, priority, cache_salt)
                for i in range(params.n)]

    def structured_output_manager(self):
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this model has none")
            from tokenmill.structured_output import StructuredOutputManager
            self._structured = StructuredOutputManager(
                self.tokenizer, self.vocab_size, stop_token_ids=[self.eos_token_id, *self.extra_stop_token_ids])
        return self._structured

    def validate_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool)
               or t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:10]}")
