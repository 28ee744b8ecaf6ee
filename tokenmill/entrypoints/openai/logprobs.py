"""Turning `tokenmill.outputs.Logprob` dicts into the two OpenAI logprobs shapes."""

from __future__ import annotations

from typing import Callable

from tokenmill.outputs import PositionLogprobs


def _token_text(entry, token_id: int) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"<token {token_id}>"


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, object]]:
    # The dict holds the sampled token and the top-k; the top-k are those ranked 1..k.
    ranked = [(tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda item: item[1].rank)
    return ranked[:k]


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs] | None, k: int) -> dict | None:
    """`{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}` for chat completions."""
    if positions is None:
        return None
    content = []
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id)
        if entry is None:
            continue
        text = _token_text(entry, token_id)
        content.append({
            "token": text,
            "logprob": max(entry.logprob, -9999.0),
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": _token_text(lp, tid), "logprob": max(lp.logprob, -9999.0),
                 "bytes": list(_token_text(lp, tid).encode())}
                for tid, lp in _top(position, k)
            ],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None] | None, k: int,
                        text_offset_start: int = 0,
                        token_text: Callable[[int], str] | None = None) -> dict | None:
    """`{tokens, token_logprobs, top_logprobs, text_offset}` for legacy completions. A `None`
    position (the first prompt token when echoing) has no logprob; its text comes from
    `token_text` (the token decoded alone, as every other position's text is), so the texts add
    up to the echoed prompt and the offsets after it are right."""
    if positions is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset_start
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id) if position else None
        if entry is not None:
            text = _token_text(entry, token_id)
        else:
            text = token_text(token_id) if token_text is not None else ""
        tokens.append(text)
        token_logprobs.append(None if entry is None else max(entry.logprob, -9999.0))
        tops.append(None if position is None else
                    {_token_text(lp, tid): max(lp.logprob, -9999.0) for tid, lp in _top(position, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}
