"""`--enable-log-requests`: one log line per admitted request, as vLLM writes it.

Prompts can hold personal data, so nothing is logged unless the operator asks; `--max-log-len`
cuts the prompt text and its token ids to that many characters / ids.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("tokenmill.server")


class RequestLogger:
    def __init__(self, max_log_len: int | None = None) -> None:
        self.max_log_len = max_log_len

    def __call__(self, request_id: str, prompt: str | list[int], prompt_token_ids: list[int],
                 params: object) -> None:
        text = prompt if isinstance(prompt, str) else None
        ids = prompt_token_ids
        if self.max_log_len is not None:
            text = text[:self.max_log_len] if text is not None else None
            ids = ids[:self.max_log_len]
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request_id, text, params, ids)
