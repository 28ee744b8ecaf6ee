"""`tokenmill serve --tensor-parallel-size 2` on the CPU (gloo): the OpenAI SDK gets the same greedy
text as from the one-rank server, streaming works, and a killed rank is engine death (the stream
ends with an error chunk, the server exits non-zero so a supervisor restarts it)."""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai
import pytest

from conftest import API_KEY, serve_argv
from server_harness import running_server

from tokenmill import SamplingParams

pytestmark = pytest.mark.slow


def _worker_pids(server_pid: int) -> list[int]:
    """This server's rank processes: workers whose --parent-pid is a child of the server (its
    engine-core process); other runs' workers on the machine are not counted."""
    cmdlines, parents = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdlines[int(entry)] = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    children = {pid for pid, ppid in parents.items() if ppid == server_pid}
    pids = []
    for pid, cmd in cmdlines.items():
        if b"tokenmill.executor.worker_process" in cmd and b"--parent-pid" in cmd:
            parent = int(cmd[cmd.index(b"--parent-pid") + 1])
            if parent in children:
                pids.append(pid)
    return pids


def test_tp2_server_answers_like_tp1_and_a_dead_rank_is_engine_death(llm_fp32):
    # float32 on both sides: in bf16 the ranks' partial sums round differently from one rank's.
    messages = [{"role": "user", "content": "Name three primary colors."}]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    reference = llm_fp32.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    argv = lambda port: serve_argv(port) + ["--tensor-parallel-size", "2", "--engine-threads", "1",  # noqa: E731
                                            "--dtype", "float32"]
    with running_server(argv, api_key=API_KEY) as tp_server:
        assert len(_worker_pids(tp_server.proc.pid)) == 1
        model_name = httpx.get(f"{tp_server.url}/v1/models", headers=tp_server.headers()).json()["data"][0]["id"]
        client = openai.OpenAI(api_key=API_KEY, base_url=f"{tp_server.url}/v1", max_retries=0, timeout=120)
        got = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
        assert got.choices[0].message.content == reference
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model_name, messages=messages, max_tokens=16, temperature=0, stream=True) if chunk.choices)
        assert streamed == reference

        body = {"model": model_name, "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=tp_server.url, headers=tp_server.headers(), timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                os.kill(_worker_pids(tp_server.proc.pid)[0], signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data: ")]
        last = json.loads(rest[-1].removeprefix("data: "))
        assert last["error"]["type"] == "server_error"
        assert tp_server.proc.wait(60) != 0
        assert "tensor-parallel rank 1 exited" in tp_server.log()
