"""The in-process engine behind the offline `LLM`: input processor -> EngineCore -> output processor."""

from __future__ import annotations

from typing import Any

from tokenmill.config import EngineArgs, EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.config.tokenizer import load_tokenizer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer: Any = load_tokenizer(config.model.source.tokenizer_path)
        self.input_processor = InputProcessor(self.tokenizer, config.model)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str | None = None, add_special_tokens: bool = True) -> None:
        """Validate (raising ValueError before anything is queued), then queue the request."""
        requests = self.input_processor.process(request_id, prompt, params, priority=priority,
                                                cache_salt=cache_salt, add_special_tokens=add_special_tokens)
        self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None,
                                          requests[0].prompt_token_ids, params, requests[0].arrival_time)
        for request in requests:
            self.core.add_request(request)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        engine_outputs = self.core.step()
        processed = self.output_processor.process(engine_outputs.outputs)
        if processed.to_abort:
            self.core.abort_requests(processed.to_abort)
        return processed.request_outputs
