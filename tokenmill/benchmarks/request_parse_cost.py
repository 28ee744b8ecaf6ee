"""CPU time the event loop spends on one hostile request body before anything else can run:
the parse-work scan (`request_body.json_cost`) and, when the body passes it, the strict parse
into the request model. Process CPU time, so the figures do not depend on what else the machine
runs (docs/reliability.md, item 34).

    python3 -m tokenmill.benchmarks.request_parse_cost
"""

from __future__ import annotations

import json
import time

import pydantic

from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.entrypoints.server.request_body import MAX_JSON_COST, json_cost

BODIES = {
    "7.5 MB prompt": (CompletionRequest, {"prompt": "hello world, this is a prompt. " * 240_000}),
    "7.5 MB chat message": (ChatCompletionRequest,
                            {"messages": [{"role": "user", "content": "hello world, this is a prompt. " * 240_000}]}),
    "16 stop strings of 450 KB": (CompletionRequest, {"prompt": "a", "stop": ["s" * 450_000] * 16}),
    "nested arrays, 7.5 MB": (CompletionRequest, {"prompt": "a", "x": [json.loads("[" * 150 + "]" * 150)] * 25_000}),
    "800,000 integers": (CompletionRequest, {"prompt": "a", "x": list(range(800_000))}),
    "290,000 strings (under the cap)": (CompletionRequest, {"prompt": "a", "x": ["ab"] * 290_000}),
    "4,096 messages": (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi " * 100}] * 4096}),
    "290,000 token ids (under the cap)": (CompletionRequest, {"prompt": list(range(290_000))}),
    "27,000 objects in chat_template_kwargs (under the cap)": (
        ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                "chat_template_kwargs": {"a": [{"k": 1}] * 27_000}}),
}


def cpu_ms(fn) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1000


def main() -> None:
    print("| body | bytes | scan (ms CPU) | parse (ms CPU) |")
    print("|---|---|---|---|")
    for name, (model, body) in BODIES.items():
        raw = json.dumps(body).encode()
        scan = cpu_ms(lambda: json_cost(raw))
        if json_cost(raw) > MAX_JSON_COST:
            parse = "refused"
        else:
            def parse_once() -> None:
                try:
                    model.model_validate_json(raw)
                except pydantic.ValidationError:
                    pass
            parse = f"{cpu_ms(parse_once):.0f}"
        print(f"| {name} | {len(raw):,} | {scan:.0f} | {parse} |")


if __name__ == "__main__":
    main()
