"""Front-end output processing: turns the engine core's token outputs into `RequestOutput`s.

Per sample it detokenizes incrementally, applies stop strings (reporting which samples the core
must abort), converts log-probabilities, and gathers the `n` samples of a prompt into one output.
`SamplingParams.output_kind` decides whether each output is cumulative, a delta, or final only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.input_processor import child_request_id
from tokenmill.core.messages import EngineOutput, FinishReason, TokenLogprobs
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


@dataclass(slots=True)
class _Sample:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_chars: int = 0  # for DELTA outputs
    sent_tokens: int = 0
    changed: bool = False


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    samples: dict[str, _Sample] = field(default_factory=dict)  # child id -> sample, in index order
    num_unfinished: int = 0  # samples without a finish reason
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    def finish(self, sample: _Sample, reason: str, stop_reason: int | str | None) -> None:
        if sample.finish_reason is None:
            self.num_unfinished -= 1
        sample.finish_reason, sample.stop_reason = reason, stop_reason


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    to_abort: list[str]  # child request ids the engine core must stop (a stop string matched)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.samples: dict[str, tuple[_Parent, _Sample]] = {}  # child request id -> (parent, sample)
        self._token_texts: dict[int, str] = {}  # token id -> its text decoded alone

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> list[str]:
        """Track a request; returns the child ids its EngineRequests carry."""
        if params.n == 1:
            child_ids = [request_id]
        else:
            child_ids = [child_request_id(i, request_id) for i in range(params.n)]
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, arrival_time or time.time(),
                         num_unfinished=len(child_ids))
        for i, cid in enumerate(child_ids):
            sample = _Sample(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                             logprobs=[] if params.logprobs is not None else None,
                             cumulative_logprob=0.0 if params.logprobs is not None else None)
            parent.samples[cid] = sample
            self.samples[cid] = (parent, sample)
        self.parents[request_id] = parent
        return child_ids

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request (client gone); returns child ids to abort in the core."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for cid in parent.samples:
            self.samples.pop(cid, None)
        return [cid for cid, s in parent.samples.items() if s.finish_reason is None]

    def process(self, outputs: list[EngineOutput]) -> ProcessedOutputs:
        touched: dict[str, _Parent] = {}
        to_abort: list[str] = []
        now = time.time()
        samples = self.samples
        for out in outputs:
            entry = samples.get(out.request_id)
            if entry is None:
                continue  # aborted meanwhile
            parent, sample = entry
            new_token_ids = out.new_token_ids
            if parent.first_token_time is None and new_token_ids:
                parent.first_token_time = now
            if out.num_cached_tokens > parent.num_cached_tokens:
                parent.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None and parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None] + [self._position(lp) for lp in out.prompt_logprobs]
            stop_token = out.stop_reason if isinstance(out.stop_reason, int) else None
            if out.finish_reason == FinishReason.STOP and stop_token is None and new_token_ids:
                stop_token = new_token_ids[-1]  # EOS: kept in token_ids, not in text
            matched = sample.detok.add_tokens(new_token_ids, stop_token)
            sample.token_ids.extend(new_token_ids)
            if out.new_logprobs and sample.logprobs is not None:
                for lp in out.new_logprobs:
                    sample.logprobs.append(self._position(lp))
                    sample.cumulative_logprob += lp.logprobs[0]
            sample.changed = True
            if matched is not None:
                parent.finish(sample, "stop", matched)
                if out.finish_reason is None:
                    to_abort.append(out.request_id)
            elif out.finish_reason is not None:
                parent.finish(sample, str(out.finish_reason), out.stop_reason)
            touched[parent.request_id] = parent

        results = []
        for parent in touched.values():
            finished = parent.finished
            if parent.params.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue  # nothing to report until the last sample ends
            result = self._make_output(parent)
            if finished:
                del self.parents[parent.request_id]
                for cid in parent.samples:
                    samples.pop(cid, None)
            if result is not None:
                results.append(result)
        return ProcessedOutputs(results, to_abort)

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for sample in parent.samples.values():  # built in index order
            done = sample.finish_reason is not None
            end = sample.detok.sendable_length(done)
            if kind == RequestOutputKind.DELTA:
                if not sample.changed:
                    continue
                text = sample.detok.text[sample.sent_chars:end]
                tokens = sample.token_ids[sample.sent_tokens:]
                logprobs = sample.logprobs[sample.sent_tokens:] if sample.logprobs is not None else None
                sample.sent_chars, sample.sent_tokens = end, len(sample.token_ids)
            else:
                text, tokens, logprobs = sample.detok.text[:end], list(sample.token_ids), sample.logprobs
            sample.changed = False
            completions.append(CompletionOutput(
                index=sample.index, text=text, token_ids=tokens,
                cumulative_logprob=sample.cumulative_logprob, logprobs=logprobs,
                finish_reason=sample.finish_reason, stop_reason=sample.stop_reason))
        metrics = {"arrival_time": parent.arrival_time}
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            outputs=completions, finished=finished, prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens, metrics=metrics)

    def _position(self, lp: TokenLogprobs) -> PositionLogprobs:
        result: PositionLogprobs = {}
        for token_id, value, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            if token_id not in result:
                result[token_id] = Logprob(value, rank, self._token_text(token_id))
        return result

    def _token_text(self, token_id: int) -> str | None:
        """One token decoded alone (pure, so cached: top-k lists repeat the same tokens)."""
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text
