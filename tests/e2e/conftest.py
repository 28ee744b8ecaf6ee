"""One real `tokenmill serve` on the embedded SmolLM2-135M for the whole e2e session (starting it
costs most of a minute on a 2-core CPU, so it is started once)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "server"))

from server_harness import running_server  # noqa: E402

API_KEY = "sk-e2e-key"
MAX_MODEL_LEN = 512
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def serve_argv(port: int) -> list[str]:
    # `tokenmill serve` through the CLI module (works without the console script on PATH).
    main = os.path.join(_ROOT, "tokenmill", "entrypoints", "cli", "main.py")
    module = ["tokenmill.entrypoints.cli.main", "serve"] if os.path.exists(main) else \
        ["tokenmill.entrypoints.cli.serve"]
    return [sys.executable, "-m", *module, "--port", str(port), "--api-key", API_KEY,
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64", "--log-stats-interval", "5"]


@pytest.fixture(scope="session")
def server():
    with running_server(serve_argv, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture()
def own_server():
    """A server for one test that breaks it (the session's `server` stays up for the others)."""
    with running_server(serve_argv, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="session")
def batch_invariant_server():
    """The same server in batch-invariant mode (docs/rl.md): greedy tokens do not depend on what
    else is batched, which tests that compare concurrent requests' outputs rely on."""
    with running_server(lambda port: serve_argv(port) + ["--batch-invariant"], api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="session")
def model_name(server) -> str:
    import httpx
    return httpx.get(f"{server.url}/v1/models", headers=server.headers()).json()["data"][0]["id"]


@pytest.fixture()
def openai_client(server):
    import openai
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


@pytest.fixture()
def anthropic_client(server):
    import anthropic
    return anthropic.Anthropic(api_key=API_KEY, base_url=server.url, max_retries=0, timeout=120)
