"""Front-end input processing: chat templates, tokenization and every length / vocabulary / range
check, so nothing invalid ever reaches the engine core.

These calls are CPU-bound (a chat template over thousands of messages, a megabyte prompt): the
server runs them on `AsyncEngine`'s input thread, never on its event loop.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from tokenmill.config import ModelConfig
from tokenmill.core.messages import EngineRequest
from tokenmill.sampling_params import SamplingParams, is_int, wrap_int64

logger = logging.getLogger(__name__)

# `apply_chat_template`'s own parameters and the names it hands the template: `chat_template_kwargs`
# may not set them. `chat_template` among them would render the caller's own code on the server.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "conversation", "messages", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")


class ChatTemplateError(ValueError):
    """The model's chat template refused the conversation (roles out of order, a bad tool, ...)."""


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the context window. `at_least`: the prompt
    was too long to be worth tokenizing, and `num_prompt_tokens` is a lower bound."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                 at_least: bool = False) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        if at_least:
            msg = (f"This model's maximum context length is {max_model_len} tokens; the prompt alone has "
                   f"at least {num_prompt_tokens} tokens. Please reduce the prompt.")
        elif max_tokens is None:
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
        self._max_token_chars: int | None = None  # longest vocabulary entry; 0: no bound known

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
        """The conversation as the model's chat template renders it (transformers' sandboxed Jinja).

        Only the model's own template is rendered: `chat_template_kwargs` are variables for it and
        may not replace it. Raises `ChatTemplateError` (a ValueError) when the template refuses the
        messages, with the template's own message or a generic one, never a Python repr.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids, not chat messages")
        template = self.model_config.chat_template  # --chat-template replaces the tokenizer's
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; use completions instead")
        kwargs = dict(chat_template_kwargs or {})
        if "chat_template" in kwargs:
            raise ValueError("request-supplied chat templates are not allowed")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved[:5]}")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
                chat_template=template, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the template ran on the caller's data
            raise ChatTemplateError(_template_message(exc)) from None

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `prompt`; a `ContextLengthError` without tokenizing when the text is too long
        to fit the context window whatever its tokens."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send token ids instead of text")
        max_chars = self.max_model_len * self.max_token_chars()
        if max_chars and len(prompt) > max_chars:
            raise ContextLengthError(math.ceil(len(prompt) / self.max_token_chars()), None,
                                     self.max_model_len, at_least=True)
        try:
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        except (TypeError, UnicodeError):  # lone surrogates and the like: the text is not Unicode
            raise ValueError("the prompt is not valid Unicode text") from None

    def max_token_chars(self) -> int:
        """The most characters one token can stand for (the longest vocabulary entry), or 0 when
        a normalizer may shorten the text first and no bound holds."""
        if self._max_token_chars is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None or backend.normalizer is not None:
                self._max_token_chars = 0
            else:
                # A byte-level entry has one character per byte, so it never undercounts.
                self._max_token_chars = max(len(t) for t in backend.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    # ----- requests -----
    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None,
                add_special_tokens: bool = True) -> list[EngineRequest]:
        """Validate and tokenize one prompt; one EngineRequest per sample (`n` children)."""
        if not is_int(priority):
            raise ValueError(f"priority must be a 64-bit integer, got {priority!r}")
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
        if params.stop_token_ids:
            bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids has token ids outside the vocabulary "
                                 f"(size {self.vocab_size}): {bad[:10]}")
        if params.structured_outputs is not None:
            # Compiling validates the schema / regex / grammar (cached, so the engine's compile of
            # the same spec is a hit); a bad one raises GrammarError, a ValueError.
            self.structured_output_manager().compile(params.structured_outputs)
            if params.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured outputs: the grammar "
                                 "ends the output")
        if params.reasoning is not None:
            ids = [*params.reasoning.end_token_ids, params.reasoning.start_token_id]
            bad = [t for t in ids if t is not None and t >= self.vocab_size]
            if bad:
                raise ValueError(f"reasoning marker token ids outside the vocabulary (size {self.vocab_size}): "
                                 f"{bad[:10]}")
        stop_ids = list(params.stop_token_ids or []) + self.extra_stop_token_ids
        base = params.clone(all_stop_token_ids=stop_ids or None,
                            max_tokens=max_tokens if max_tokens is not None
                            else self.max_model_len - len(token_ids))
        arrival = time.time() if arrival_time is None else arrival_time
        if params.n == 1:
            return [EngineRequest(request_id, token_ids, base.clone(n=1), arrival, self.eos_token_id,
                                  priority, cache_salt)]
        # Child i draws from seed + i, folded into 64 bits so the largest seed still has n children.
        seeds = [None if params.seed is None else wrap_int64(params.seed + i) for i in range(params.n)]
        return [EngineRequest(child_request_id(i, request_id), token_ids, base.clone(n=1, seed=seeds[i]),
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


def _template_message(exc: Exception) -> str:
    """What to tell the client when the chat template fails. `raise_exception(...)` in a template
    raises a bare `TemplateError` with words its author wrote for users; anything else is a
    Python error inside the template, whose text (reprs, addresses) stays in the log."""
    import jinja2

    if type(exc) is jinja2.TemplateError:
        text = _ADDRESS.sub("0x...", str(exc))[:300]
        return f"the chat template rejected these messages: {text}"
    logger.info("chat template failed: %s: %s", type(exc).__name__, exc)
    return "the chat template could not render these messages"
