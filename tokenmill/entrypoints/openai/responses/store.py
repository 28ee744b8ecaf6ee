"""The responses a server remembers, for `previous_response_id` and `GET /v1/responses/{id}`.

In memory, least recently used first out, bounded by count and by size (each entry holds its
whole conversation, so a long chain of turns is large): a flood of stored responses costs at
most `max_bytes`, and a response that has been evicted is a 404 (`previous_response_id` names a
response this server no longer has).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as it was returned
    messages: list[dict[str, Any]]  # the conversation through this response, as chat messages
    size: int  # bytes of both, as JSON


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        assert max_entries >= 1 and max_bytes >= 1
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(messages, ensure_ascii=False))
        if size > self.max_bytes:
            return  # larger than the whole store: kept by nobody rather than evicting everyone
        self.delete(response["id"])
        self._entries[response["id"]] = StoredResponse(response, messages, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.size

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True
