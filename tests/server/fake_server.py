"""Runs the real server stack (uvicorn, app, AsyncEngine, engine-core process) over the fakes in
`server_fakes.py`: `python fake_server.py PORT [API_KEY]`. Used by the server unit tests."""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_fakes import (  # noqa: E402
    MAX_MODEL_LEN, VOCAB, FakeInputProcessor, FakeOutputProcessor, FakeTokenizer, make_fake_engine,
)

from tokenmill.engine.async_engine import AsyncEngine  # noqa: E402
from tokenmill.engine.core_client import EngineCoreClient  # noqa: E402
from tokenmill.entrypoints.server.app import ServerConfig  # noqa: E402
from tokenmill.entrypoints.server.launch import serve  # noqa: E402


async def make_engine() -> AsyncEngine:
    client = await EngineCoreClient.start(b"", make_engine=make_fake_engine)
    engine = AsyncEngine(client, FakeInputProcessor(), FakeOutputProcessor(), FakeTokenizer(),
                         model_name="fake-model", max_model_len=MAX_MODEL_LEN, max_num_seqs=4,
                         max_queue_len=int(os.environ.get("FAKE_MAX_QUEUE_LEN", "4")), vocab_size=VOCAB,
                         wedge_timeout_s=float(os.environ.get("FAKE_WEDGE_TIMEOUT_S", "2")),
                         max_queue_wait_s=_optional_float("FAKE_MAX_QUEUE_WAIT_S"))
    engine.start()
    return engine


def _optional_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    port = int(sys.argv[1])
    key = sys.argv[2] if len(sys.argv) > 2 else None
    # FAKE_SERVER_CONFIG: more ServerConfig fields; FAKE_SERVE_KWARGS: serve()'s (ssl_*, root_path).
    extra = {k: tuple(v) if isinstance(v, list) else v
             for k, v in json.loads(os.environ.get("FAKE_SERVER_CONFIG", "{}")).items()}
    config = ServerConfig(api_key=key, max_body_bytes=64 * 1024,
                          drain_timeout_s=float(os.environ.get("FAKE_DRAIN_TIMEOUT_S", "5")),
                          log_stats_interval_s=1.0,
                          header_timeout_s=float(os.environ.get("FAKE_HEADER_TIMEOUT_S", "10")),
                          body_timeout_s=float(os.environ.get("FAKE_BODY_TIMEOUT_S", "30")),
                          request_timeout_s=_optional_float("FAKE_REQUEST_TIMEOUT_S"), **extra)
    sys.exit(serve(make_engine, config, host="127.0.0.1", port=port,
                   **json.loads(os.environ.get("FAKE_SERVE_KWARGS", "{}"))))
