"""Incremental detokenization with stop strings.

Text is decoded one token at a time with `tokenizers`' `DecodeStream`, which buffers partial UTF-8
sequences (a multi-byte character split over tokens) and handles SentencePiece/BPE space markers
given the prompt's last tokens as context. Stop strings are searched only in the new text's
neighbourhood; while running, the last `max_stop_len - 1` characters are held back so a stop string
that is still forming never leaks into streamed text.
"""

from __future__ import annotations

from typing import Any

from tokenmill.sampling_params import SamplingParams

# Prompt tokens given as context to the decoder: enough for any space / byte-fallback state.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stop = params.stop or []
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.finished_by_stop: str | None = None
        self._enabled = tokenizer is not None and params.detokenize
        self._stream = None
        self._slow_ids: list[int] = []
        self._slow_text = ""
        if self._enabled:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                from tokenizers.decoders import DecodeStream
                self._backend = backend
                self._stream = DecodeStream(ids=list(prompt_token_ids[-_CONTEXT_TOKENS:]),
                                            skip_special_tokens=params.skip_special_tokens)

    def add_tokens(self, token_ids: list[int], stop_token_id: int | None = None) -> str | None:
        """Append decoded text for new tokens; returns the stop string if one matched.

        A token that ended the request as a stop/EOS token (`stop_token_id`) is not decoded into text.
        """
        if not self._enabled:
            return None
        before = len(self.text)
        stream = self._stream
        for token in token_ids:
            if token == stop_token_id:
                continue
            # Called once per token of every running request: the stream is called directly.
            piece = stream.step(self._backend, token) if stream is not None else self._decode_slow(token)
            if piece:
                self.text += piece
        if not self.stop or len(self.text) == before:
            return None
        # Search only where a new match can be: from max_stop_len - 1 characters before the new text.
        search_from = max(0, before - self.hold_back)
        best = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.params.include_stop_str_in_output else self.text[:idx]
        self.finished_by_stop = s
        return s

    def _decode_slow(self, token: int) -> str | None:
        """Slow tokenizers: decode everything and diff (rare; no DecodeStream available)."""
        self._slow_ids.append(token)
        new = self.tokenizer.decode(self._slow_ids, skip_special_tokens=self.params.skip_special_tokens)
        if new.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        piece, self._slow_text = new[len(self._slow_text):], new
        return piece

    def sendable_length(self, finished: bool) -> int:
        """How much of the text can be shown now (all of it once finished)."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - self.hold_back)
