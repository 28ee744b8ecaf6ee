"""Small stand-ins for the engine parts, so the server stack is tested without a model.

Tokens are characters (`ord`), text is `chr` of the ids. The fake core answers each prompt with
the letters "abcdefghij..." in turn, one token per step; prompt token 7 crashes the core process,
prompt token 8 wedges it (step never returns), prompt token 9 is refused by `add_request`, and
prompt token 6 makes the input processor fail with an unexpected exception (a server bug).
`FAKE_FAULT_TOKENS=0` turns these faults off (for fuzzing, which sends such prompts at random).

`FAKE_SCRIPT` scripts the replies instead, for formats no small model writes by itself (tool calls
in each model family's syntax, thinking): a JSON list of `[prompt substring, reply]`; the first
rule whose substring is in the prompt gives the reply, one character (token) per step, then the
request stops ("stop"), or at max_tokens ("length"). Prompts no rule matches get the letters.
`FAKE_MAX_MODEL_LEN` raises the context window (64) for the longer prompts of conversations.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from tokenmill.core.messages import EngineOutput, EngineOutputs, EngineRequest, FinishReason, SchedulerStats
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

VOCAB = 1000
MAX_MODEL_LEN = int(os.environ.get("FAKE_MAX_MODEL_LEN", "64"))
FAULTS = os.environ.get("FAKE_FAULT_TOKENS", "1") != "0"
SCRIPT: list[tuple[str, str]] = [tuple(rule) for rule in json.loads(os.environ.get("FAKE_SCRIPT", "[]"))]


def scripted_reply(prompt_token_ids: list[int]) -> str | None:
    prompt = "".join(chr(t) for t in prompt_token_ids)
    return next((reply for key, reply in SCRIPT if key in prompt), None)


from tokenmill.engine.input_processor import ContextLengthError  # noqa: E402


class FakeEngineCore:
    kv_capacity_tokens = 4096

    def __init__(self) -> None:
        self.requests: dict[str, EngineRequest] = {}
        self.generated: dict[str, int] = {}
        self.replies: dict[str, str] = {}  # scripted replies (FAKE_SCRIPT)
        self.step_delay_s = float(os.environ.get("FAKE_STEP_DELAY_S", "0.002"))

    def add_request(self, request: EngineRequest) -> None:
        if FAULTS and request.prompt_token_ids[0] == 9:
            raise ValueError("the fake core refuses prompts that start with token 9")
        self.requests[request.request_id] = request
        self.generated[request.request_id] = 0
        reply = scripted_reply(request.prompt_token_ids)
        if reply is not None:
            self.replies[request.request_id] = reply

    def abort_requests(self, request_ids) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)
            self.generated.pop(rid, None)
            self.replies.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> EngineOutputs:
        time.sleep(self.step_delay_s)
        outputs = []
        for rid, req in list(self.requests.items()):
            if FAULTS and req.prompt_token_ids[0] == 7:
                os._exit(9)
            while FAULTS and req.prompt_token_ids[0] == 8:
                time.sleep(1)
            count = self.generated[rid]
            reply = self.replies.get(rid)
            token = ord(reply[count]) if reply is not None else ord("a") + count % 26
            self.generated[rid] = count + 1
            out = EngineOutput(request_id=rid, new_token_ids=[token])
            limit = req.sampling_params.max_tokens or (len(reply) if reply is not None else 16)
            if count + 1 >= limit and (reply is None or count + 1 < len(reply)):
                out.finish_reason = FinishReason.LENGTH
                self.abort_requests([rid])
            elif reply is not None and count + 1 == len(reply):
                out.finish_reason = FinishReason.STOP
                self.abort_requests([rid])
            outputs.append(out)
        stats = self.get_stats()
        stats.num_generation_tokens = len(outputs)
        return EngineOutputs(outputs=outputs, scheduler_stats=stats, timestamp=time.time())

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(num_running_reqs=len(self.requests))

    def shutdown(self) -> None:
        pass


def make_fake_engine(_: bytes) -> FakeEngineCore:
    return FakeEngineCore()


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class FakeInputProcessor:
    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()

    def process(self, request_id, prompt, params: SamplingParams, arrival_time=None, priority=0,
                cache_salt=None, add_special_tokens=True) -> list[EngineRequest]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if FAULTS and ids[0] == 6:
            raise RuntimeError("a bug in the input processor")
        if any(not 0 <= t < VOCAB for t in ids):
            raise ValueError("token id out of vocabulary")
        total = len(ids) + (params.max_tokens or 0)
        if total > MAX_MODEL_LEN:
            raise ContextLengthError(len(ids), params.max_tokens, MAX_MODEL_LEN)
        ids_for = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        return [EngineRequest(request_id=rid, prompt_token_ids=ids, sampling_params=params,
                              arrival_time=arrival_time or time.time()) for rid in ids_for]

    def render_chat(self, messages, tools=None, add_generation_prompt=True, chat_template_kwargs=None) -> str:
        text = "".join(f"<{m['role']}>{m['content'] if isinstance(m['content'], str) else ''}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Tracked:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput]
    sent: list[int]


class FakeOutputProcessor:
    def __init__(self) -> None:
        self.requests: dict[str, _Tracked] = {}

    def add_request(self, parent_id, prompt, prompt_token_ids, params) -> None:
        outs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(params.n)]
        self.requests[parent_id] = _Tracked(prompt, prompt_token_ids, params, outs, [0] * params.n)

    def abort_request(self, parent_id) -> None:
        self.requests.pop(parent_id, None)

    def process(self, outputs):
        from types import SimpleNamespace
        touched = []
        for out in outputs:
            if "_" in out.request_id and out.request_id.split("_", 1)[1] in self.requests:
                idx, pid = out.request_id.split("_", 1)
                idx = int(idx)
            else:
                idx, pid = 0, out.request_id
            tr = self.requests[pid]
            comp = tr.outputs[idx]
            comp.token_ids.extend(out.new_token_ids)
            comp.text += "".join(chr(t) for t in out.new_token_ids)
            if out.finish_reason is not None:
                comp.finish_reason = str(out.finish_reason)
            if pid not in touched:
                touched.append(pid)
        results = []
        for pid in touched:
            tr = self.requests[pid]
            finished = all(c.finish_reason is not None for c in tr.outputs)
            kind = tr.params.output_kind
            if kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            if kind == RequestOutputKind.DELTA:
                outs = []
                for i, c in enumerate(tr.outputs):
                    start = tr.sent[i]
                    if start < len(c.token_ids) or c.finish_reason is not None and start >= 0:
                        outs.append(CompletionOutput(index=i, text=c.text[start:], token_ids=c.token_ids[start:],
                                                     finish_reason=c.finish_reason))
                    tr.sent[i] = len(c.token_ids) if c.finish_reason is None else -10**9
            else:
                outs = [CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids),
                                         finish_reason=c.finish_reason) for c in tr.outputs]
            results.append(RequestOutput(request_id=pid, prompt=tr.prompt, prompt_token_ids=tr.prompt_token_ids,
                                         outputs=outs, finished=finished))
            if finished:
                del self.requests[pid]
        return SimpleNamespace(request_outputs=results, to_abort=[])
