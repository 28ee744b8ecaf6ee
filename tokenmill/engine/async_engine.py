"""`AsyncEngine`: the asyncio front end of the engine-core process, used by the HTTP servers.

Tokenization, chat templates and incremental detokenization run here, in the API process, through
`InputProcessor` / `OutputProcessor`; the core process only schedules and computes. Each request
gets an `asyncio.Queue` that one output task fills with `RequestOutput`s, so a slow client never
slows the others. Admission is bounded: past `max_num_seqs + max_queue_len` sequences in flight,
`submit` raises `QueueFullError` before anything is tokenized or allocated.

`submit()` does every check up front and returns a `RequestStream`; only then may a caller start
writing a response (so a context-length error is a plain 400, before any SSE byte).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

import msgspec

from tokenmill.engine.core_client import EngineCoreClient, EngineDeadError
from tokenmill.engine.rl_control import AdmissionGate, RolloutControl
from tokenmill.core.messages import SchedulerStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Admission refused: too many sequences already in flight (-> 429 / 529 with retry-after)."""


class StatsListener(Protocol):
    """Receives what the metrics need; implemented by the server's Prometheus metrics."""

    def on_scheduler_stats(self, stats: SchedulerStats) -> None: ...
    def on_request_finished(self, timing: "RequestTiming") -> None: ...


@dataclass(slots=True)
class RequestTiming:
    """Wall-clock marks of one request, in seconds (`time.monotonic`)."""

    arrival: float
    submitted: float = 0.0  # handed to the engine core (after tokenization)
    first_token: float = 0.0
    last_token: float = 0.0
    finished: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class _RequestState:
    queue: asyncio.Queue
    child_ids: list[str]
    timing: RequestTiming
    delta_outputs: bool  # DELTA outputs carry only new tokens, so counts are summed
    finished: bool = False


_ERROR = object()  # queue sentinel: the engine died while this request ran


class RequestStream:
    """The outputs of one admitted request. Iterate it; closing it early aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, state: _RequestState,
                 prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._engine = engine
        self._state = state

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._state.queue.get()
                if item is _ERROR:
                    raise EngineDeadError(self._engine.death_reason or "engine core failed")
                yield item
                if item.finished:
                    return
        finally:
            # Reached on completion, on an error, and when the consumer is cancelled (the client
            # hung up): in the last case the request is still running in the core, so abort it.
            if not self._state.finished:
                self._engine.abort(self.request_id)


class AsyncEngine:
    """Create with `await AsyncEngine.from_engine_args(...)`, or directly with parts (tests)."""

    def __init__(
        self,
        client: EngineCoreClient,
        input_processor: Any,
        output_processor: Any,
        tokenizer: Any,
        *,
        model_name: str,
        max_model_len: int,
        max_num_seqs: int,
        max_queue_len: int,
        vocab_size: int,
        wedge_timeout_s: float = 120.0,
        stats_listener: StatsListener | None = None,
    ) -> None:
        self.client = client
        self.input_processor = input_processor
        self.output_processor = output_processor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.model_aliases: set[str] = set()  # other names clients may use for the model
        self.max_queue_len = max_queue_len
        self.wedge_timeout_s = wedge_timeout_s
        self.stats_listener = stats_listener
        self.last_stats = SchedulerStats()
        self._requests: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, str] = {}
        self._num_inflight_seqs = 0
        self._last_progress = time.monotonic()
        self._output_task: asyncio.Task | None = None
        self._death_callbacks: list[Any] = []
        # RL calls (sleep, weight updates; engine/rl_control.py), and the gate new requests meet
        # while the engine is paused or asleep.
        self.gate = AdmissionGate()
        self.rollouts = RolloutControl(self)

    @classmethod
    async def from_engine_args(cls, engine_args: Any, *, max_queue_len: int,
                               wedge_timeout_s: float = 120.0,
                               stats_listener: StatsListener | None = None,
                               engine_threads: int | None = None, config: Any = None) -> "AsyncEngine":
        """Loads the tokenizer here and starts the engine core in its own process. `config`: the
        `EngineConfig` of `engine_args` when the caller already built it."""
        from tokenmill.engine.input_processor import InputProcessor
        from tokenmill.engine.output_processor import OutputProcessor
        from tokenmill.model.loader.tokenizer import load_tokenizer

        config = config or engine_args.create_engine_config()
        tokenizer = load_tokenizer(config.model.source.tokenizer_path)
        client = await EngineCoreClient.start(msgspec.msgpack.encode(engine_args), num_threads=engine_threads)
        engine = cls(
            client, InputProcessor(tokenizer, config.model), OutputProcessor(tokenizer), tokenizer,
            model_name=config.model.served_model_name or config.model.model,
            max_model_len=config.model.max_model_len,
            max_num_seqs=config.scheduler.max_num_seqs, vocab_size=config.model.vocab_size,
            max_queue_len=max_queue_len, wedge_timeout_s=wedge_timeout_s,
            stats_listener=stats_listener,
        )
        engine.config = config
        engine.model_aliases = {config.model.model}
        engine.start()
        return engine

    def start(self) -> None:
        """Starts the output task and the death watch; call on the serving event loop."""
        self.client.watch(self._on_core_death)
        self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    # ----- health -----
    @property
    def dead(self) -> bool:
        return self.client.dead

    @property
    def death_reason(self) -> str:
        return self.client.death_reason

    @property
    def num_inflight_requests(self) -> int:
        return len(self._requests)

    def is_healthy(self) -> bool:
        """False when the core is dead or wedged. The core reports after every step and sends a
        heartbeat every second when idle, so silence longer than `wedge_timeout_s` means it is
        stuck inside a step (work pending, no progress)."""
        if self.dead:
            return False
        return time.monotonic() - self._last_progress < self.wedge_timeout_s

    def add_death_callback(self, callback: Any) -> None:
        self._death_callbacks.append(callback)

    # ----- tokenizer helpers for /tokenize, count_tokens and echo -----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # ----- requests -----
    async def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                     arrival_time: float | None = None, priority: int = 0,
                     cache_salt: str | None = None, add_special_tokens: bool = True) -> RequestStream:
        """Validates, tokenizes and admits one request.

        Raises (before anything reaches the core): `QueueFullError`, `EngineDeadError`, `ValueError`
        (incl. `ContextLengthError`) for bad input, `EngineSleepingError` while paused or asleep
        if the gate refuses rather than holds requests.
        """
        if self.dead:
            raise EngineDeadError(self.death_reason)
        await self.gate.admit()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if self._num_inflight_seqs + params.n > self.max_num_seqs + self.max_queue_len:
            raise QueueFullError(
                f"server is at capacity ({self._num_inflight_seqs} sequences in flight); retry later"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        engine_requests = self.input_processor.process(
            request_id, prompt, params, arrival_time=time.time(), priority=priority,
            cache_salt=cache_salt, add_special_tokens=add_special_tokens,
        )
        prompt_token_ids = list(engine_requests[0].prompt_token_ids)
        self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None,
                                          prompt_token_ids, params)
        timing = RequestTiming(arrival=arrival, num_prompt_tokens=len(prompt_token_ids))
        state = _RequestState(queue=asyncio.Queue(), child_ids=[r.request_id for r in engine_requests],
                              timing=timing,
                              delta_outputs=params.output_kind == RequestOutputKind.DELTA)
        self._requests[request_id] = state
        for child_id in state.child_ids:
            self._child_to_parent[child_id] = request_id
        self._num_inflight_seqs += len(state.child_ids)
        try:
            await self.client.add_requests(engine_requests)
        except BaseException:
            self._forget(request_id)
            raise
        timing.submitted = time.monotonic()
        return RequestStream(self, request_id, state, prompt_token_ids)

    def abort(self, request_id: str) -> None:
        """Stops a request: its children are aborted in the core (KV freed) and its queue dropped."""
        state = self._forget(request_id)
        if state is None or self.dead:
            return
        self.output_processor.abort_request(request_id)
        asyncio.get_running_loop().create_task(self.client.abort_requests(state.child_ids))

    def _forget(self, request_id: str) -> _RequestState | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        state.finished = True
        for child_id in state.child_ids:
            self._child_to_parent.pop(child_id, None)
        self._num_inflight_seqs -= len(state.child_ids)
        return state

    # ----- the output task -----
    async def _output_loop(self) -> None:
        try:
            while True:
                engine_outputs = await self.client.get_output()
                self._last_progress = time.monotonic()
                if engine_outputs.scheduler_stats is not None:
                    self.last_stats = engine_outputs.scheduler_stats
                    if self.stats_listener is not None:
                        self.stats_listener.on_scheduler_stats(engine_outputs.scheduler_stats)
                # Outputs of requests aborted meanwhile are dropped: their state is gone here.
                outputs = [o for o in engine_outputs.outputs if o.request_id in self._child_to_parent]
                if outputs:
                    self._dispatch(outputs)
        except EngineDeadError:
            pass  # _on_core_death fails the requests
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not leave every client hanging forever
            logger.exception("output processing failed")
            self.client._mark_dead("output processing failed")

    def _dispatch(self, outputs: list) -> None:
        processed = self.output_processor.process(outputs)
        if processed.to_abort:
            asyncio.get_running_loop().create_task(self.client.abort_requests(processed.to_abort))
        now = time.monotonic()
        for request_output in processed.request_outputs:
            state = self._requests.get(request_output.request_id)
            if state is None:
                continue
            timing = state.timing
            new_tokens = sum(len(c.token_ids) for c in request_output.outputs)
            if new_tokens and not timing.first_token:
                timing.first_token = now
            if new_tokens:
                timing.last_token = now
            if state.delta_outputs:
                timing.num_generation_tokens += new_tokens
            else:
                timing.num_generation_tokens = new_tokens
            state.queue.put_nowait(request_output)
            if request_output.finished:
                self._forget(request_output.request_id)
                timing.finished = now
                timing.finish_reason = request_output.outputs[0].finish_reason if request_output.outputs else None
                if self.stats_listener is not None:
                    self.stats_listener.on_request_finished(timing)

    def _on_core_death(self, reason: str) -> None:
        # Every waiting consumer wakes up with an error instead of a fake "stop".
        for request_id in list(self._requests):
            state = self._forget(request_id)
            if state is not None:
                state.queue.put_nowait(_ERROR)
        for callback in self._death_callbacks:
            callback(reason)

    async def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.client.close()
