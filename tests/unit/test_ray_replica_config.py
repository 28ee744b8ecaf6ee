"""`tokenmill serve --ray` without a cluster: flags -> Ray Serve deployment options, the Serve
config's `args` -> the same flags, and the two small ASGI wrappers (tests/e2e/test_ray_serve.py
runs the real thing)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
import yaml

from tokenmill.entrypoints.cli import serve as cli_serve
from tokenmill.entrypoints.ray_serve import (DEPLOYMENT_NAME, PROXY_CALLBACK, PROXY_CALLBACK_ENV,
                                             REPLICA_HEADER, ReplicaConfig, ReplicaHeader,
                                             ReplicaLostErrors, parse_app_args)

RAYSERVICE = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "rayservice.yaml"


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokenmill")
    cli_serve.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def options(*argv: str, gpus: bool = False) -> dict:
    return ReplicaConfig.from_args(cli(*argv), cluster_has_gpus=gpus).deployment_options()


def test_fixed_replicas_and_derived_defaults():
    opts = options("--ray")
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert opts["max_ongoing_requests"] == 256 + 1024  # --max-num-seqs + --max-queue-len
    assert opts["graceful_shutdown_timeout_s"] == 30.0  # --drain-timeout
    opts = options("--ray", "--num-replicas", "3", "--max-num-seqs", "8", "--max-queue-len", "4",
                   "--drain-timeout", "5", "--ray-num-cpus-per-replica", "2")
    assert opts["num_replicas"] == 3 and opts["max_ongoing_requests"] == 12
    assert opts["ray_actor_options"]["num_cpus"] == 2 and opts["graceful_shutdown_timeout_s"] == 5


@pytest.mark.parametrize("argv,gpus,expected", [
    (("--device", "cpu"), True, 0.0),
    (("--device", "cuda"), False, 1.0),
    (("--device", "cuda", "-tp", "2"), False, 2.0),  # a replica holds all its TP ranks' GPUs
    ((), True, 1.0),                                  # auto: the cluster has GPUs
    ((), False, 0.0),
    (("--ray-num-gpus-per-replica", "0.5"), True, 0.5),
])
def test_gpus_per_replica(argv, gpus, expected):
    assert options("--ray", *argv, gpus=gpus)["ray_actor_options"]["num_gpus"] == expected


def test_autoscaling_flags():
    opts = options("--ray", "--max-replicas", "4", "--max-num-seqs", "32")
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 32.0}
    opts = options("--ray", "--min-replicas", "0", "--max-replicas", "3", "--num-replicas", "2",
                   "--target-ongoing-requests", "5")
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "initial_replicas": 2,
                                          "target_ongoing_requests": 5.0}


@pytest.mark.parametrize("argv,message", [
    (("--num-replicas", "0"), "--num-replicas must be >= 1"),
    (("--min-replicas", "2"), "need --max-replicas"),
    (("--target-ongoing-requests", "3"), "need --max-replicas"),
    (("--min-replicas", "3", "--max-replicas", "2"), "--min-replicas (3) <= --max-replicas (2)"),
    (("--min-replicas", "0", "--max-replicas", "0"), "--max-replicas >= 1"),
    (("--num-replicas", "5", "--max-replicas", "4"), "must lie in"),
    (("--max-replicas", "2", "--target-ongoing-requests", "0"), "must be > 0"),
    (("--max-ongoing-requests", "0",), "--max-ongoing-requests must be >= 1"),
    (("--ray-num-gpus-per-replica", "-1",), "must be >= 0"),
])
def test_bad_replica_flags_are_clear_errors(argv, message):
    with pytest.raises(ValueError) as exc:
        options("--ray", *argv)
    assert message in str(exc.value)


def test_ray_flags_without_ray_exit_2(caplog):
    with pytest.raises(SystemExit) as exc:
        cli_serve.run(cli("--num-replicas", "2", "--max-replicas", "3"))
    assert exc.value.code == 2
    assert "--num-replicas, --max-replicas needs --ray" in caplog.text


def test_serve_config_args_become_cli_flags():
    ns = parse_app_args({"model": "/models/m.gguf", "max_model_len": 4096, "enable_prefix_caching": False,
                         "enforce_eager": "true", "num-replicas": 2, "api_key": None})
    assert ns.model == "/models/m.gguf" and ns.max_model_len == 4096
    assert ns.enable_prefix_caching is False and ns.enforce_eager is True
    assert ns.num_replicas == 2 and ns.api_key is None
    flags = cli("--model", "/models/m.gguf", "--max-model-len", "4096", "--no-enable-prefix-caching",
                "--enforce-eager", "--num-replicas", "2")
    del flags.func  # (the subcommand's entry point, which the replica's parser does not name)
    assert ns == flags
    with pytest.raises(ValueError, match="unknown tokenmill serve argument 'modle'"):
        parse_app_args({"modle": "x"})
    with pytest.raises(ValueError, match="invalid tokenmill serve arguments"):
        parse_app_args({"max_model_len": "many"})


def test_rayservice_example_matches_the_module():
    (rs,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    (application,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    module, name = application["import_path"].split(":")
    import importlib
    assert callable(getattr(importlib.import_module(module), name))
    ns = parse_app_args(application["args"])
    assert ns.model == application["args"]["model"]
    assert [d["name"] for d in application["deployments"]] == [DEPLOYMENT_NAME]
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:  # every node runs a proxy, and each must load the middleware
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK


def test_application_builds_with_ray_options():
    pytest.importorskip("ray.serve")
    from ray.serve import Application

    from tokenmill.entrypoints.ray_serve import build_application

    assert isinstance(build_application(cli("--ray", "--max-replicas", "2"), cluster_has_gpus=False),
                      Application)
    assert isinstance(build_application(cli("--ray", "--num-replicas", "2"), cluster_has_gpus=True),
                      Application)


# --- the ASGI wrappers ------------------------------------------------------------------------

def run_asgi(app, path: str) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


def inner(*messages: dict, raises: bool = False):
    async def app(scope, receive, send):
        for m in messages:
            await send(m)
        if raises:
            raise RuntimeError("replica died")
    return app


SSE_START = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}
CHUNK = {"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True}


def body(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("raises", [False, True])
def test_replica_lost_before_the_response_is_a_500_in_the_apis_format(raises):
    sent = run_asgi(ReplicaLostErrors(inner(raises=raises)), "/v1/chat/completions")
    assert sent[0]["status"] == 500
    assert json.loads(body(sent))["error"]["type"] == "server_error"
    sent = run_asgi(ReplicaLostErrors(inner(raises=raises)), "/v1/messages")
    assert sent[0]["status"] == 500
    assert json.loads(body(sent)) == {"type": "error", "error": {
        "type": "api_error", "message": "the replica serving this request failed"}}


def test_replica_lost_mid_stream_ends_with_the_apis_error_event():
    sent = run_asgi(ReplicaLostErrors(inner(SSE_START, CHUNK)), "/v1/completions")
    assert sent[-1]["more_body"] is False
    last = body(sent).decode().strip().split("\n\n")[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["type"] == "server_error"
    sent = run_asgi(ReplicaLostErrors(inner(SSE_START, CHUNK, raises=True)), "/v1/messages")
    event, data = body(sent).decode().strip().split("\n\n")[-1].split("\n")
    assert event == "event: error" and json.loads(data.removeprefix("data: "))["type"] == "error"


def test_complete_responses_pass_through_untouched():
    done = {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
    assert run_asgi(ReplicaLostErrors(inner(SSE_START, CHUNK, done)), "/v1/completions") == [SSE_START, CHUNK, done]
    plain = ({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
             {"type": "http.response.body", "body": b"{}"})
    assert run_asgi(ReplicaLostErrors(inner(*plain)), "/v1/models") == list(plain)


def test_replica_header_on_every_response():
    sent = run_asgi(ReplicaHeader(inner(SSE_START, CHUNK), replica_id="abc123"), "/v1/completions")
    assert (REPLICA_HEADER.encode(), b"abc123") in sent[0]["headers"]
    assert sent[1] is CHUNK


def test_without_ray_the_server_imports_and_ray_is_one_clear_line(monkeypatch, caplog):
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None; import tokenmill.entrypoints.ray_serve, "
            "tokenmill.entrypoints.cli.main, tokenmill.entrypoints.server.launch")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    from tokenmill.entrypoints import ray_serve

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert ray_serve.run(cli("--ray")) == 2
    assert "pip install 'tokenmill[ray]'" in caplog.text
