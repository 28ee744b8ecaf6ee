"""`AsyncEngine`: the asyncio front end of the engine-core process, used by the HTTP servers.

Tokenization, chat templates and incremental detokenization run here, in the API process, through
`InputProcessor` / `OutputProcessor`; the core process only schedules and computes. Templates and
tokenization run on one input thread, never on the event loop, so a megabyte prompt does not stall
`/health` or anyone else. Each request gets an `asyncio.Queue` that one output task fills with
`RequestOutput`s, so a slow client never slows the others.

Admission is bounded twice, before anything is registered: past `max_num_seqs + max_queue_len`
sequences in flight, or when the work already in flight would delay the request more than
`max_queue_wait_s` at the engine's measured speed (`admission.py`), `submit` raises
`QueueFullError`. A request may carry a deadline: still queued or running past it, it is aborted
in the core (its KV blocks freed) and its stream raises `RequestTimeoutError`.

`submit()` does every check up front and returns a `RequestStream`; only then may a caller start
writing a response (so a context-length error is a plain 400, before any SSE byte). Whatever fails
inside `submit` (a bad value, a cancelled client, an encoding error) leaves nothing registered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

import msgspec

from tokenmill.engine.admission import QueueWaitEstimator
from tokenmill.engine.core_client import EngineCoreClient, EngineDeadError
from tokenmill.engine.rl_control import AdmissionGate, RolloutControl
from tokenmill.core.messages import SchedulerStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """Admission refused: too many sequences in flight, or too long a projected wait (-> 429 / 529
    with `retry-after: retry_after_s`)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(RuntimeError):
    """The request was still queued or running at its deadline and has been aborted (-> 408)."""


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
    # Seconds between successive outputs that carried tokens (the inter-token latencies).
    inter_token_latencies: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _RequestState:
    queue: asyncio.Queue
    child_ids: list[str]
    timing: RequestTiming
    delta_outputs: bool  # DELTA outputs carry only new tokens, so counts are summed
    timeout_s: float | None = None
    # For admission by time (admission.py): its prompt tokens (all sequences) until its first
    # token, the most tokens each sequence may generate, and how many all of them have.
    pending_prefill: int = 0
    max_tokens: int = 0
    num_generated: int = 0
    deadline_timer: asyncio.TimerHandle | None = None
    finished: bool = False


_ERROR = object()  # queue sentinel: the engine died while this request ran
_TIMED_OUT = object()  # queue sentinel: the request passed its deadline


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
                if item is _TIMED_OUT:
                    raise RequestTimeoutError(f"the request ran past its {self._state.timeout_s:g} s timeout "
                                              "and was aborted")
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
        max_queue_wait_s: float | None = None,
        max_step_tokens: int | None = None,
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
        self.sampling_defaults: dict = {}  # --generation-config: for fields a request leaves unset
        # Called as (request_id, prompt, prompt_token_ids, params) for each admitted request
        # (--enable-log-requests); see tokenmill/entrypoints/server/request_log.py.
        self.request_logger: Any = None
        self.max_queue_len = max_queue_len
        self.max_queue_wait_s = max_queue_wait_s  # None: admission by count only
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
        self.queue_wait = QueueWaitEstimator(max_num_seqs, max_step_tokens)
        # One thread: requests are tokenized in arrival order and HF tokenizers are not built for
        # many concurrent callers; a megabyte prompt still costs the event loop nothing.
        self._input_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-input")

    @classmethod
    async def from_engine_args(cls, engine_args: Any, *, max_queue_len: int,
                               wedge_timeout_s: float = 120.0,
                               stats_listener: StatsListener | None = None,
                               engine_threads: int | None = None, config: Any = None,
                               max_queue_wait_s: float | None = None) -> "AsyncEngine":
        """Loads the tokenizer here and starts the engine core in its own process. `config`: the
        `EngineConfig` of `engine_args` when the caller already built it."""
        from tokenmill.engine.input_processor import InputProcessor
        from tokenmill.engine.output_processor import OutputProcessor
        from tokenmill.config.tokenizer import load_tokenizer

        config = config or engine_args.create_engine_config()
        tokenizer = load_tokenizer(config.model.source.tokenizer_path)
        # The config's own copy: values resolved here (a CPU's default max_model_len) travel as is.
        client = await EngineCoreClient.start(msgspec.msgpack.encode(config.engine_args or engine_args),
                                              num_threads=engine_threads)
        engine = cls(
            client, InputProcessor(tokenizer, config.model), OutputProcessor(tokenizer), tokenizer,
            model_name=config.model.served_model_name or config.model.model,
            max_model_len=config.model.max_model_len,
            max_num_seqs=config.scheduler.max_num_seqs, vocab_size=config.model.vocab_size,
            max_queue_len=max_queue_len, wedge_timeout_s=wedge_timeout_s,
            stats_listener=stats_listener, max_queue_wait_s=max_queue_wait_s,
            max_step_tokens=config.scheduler.max_num_batched_tokens,
        )
        engine.config = config
        engine.model_aliases = {config.model.model}
        engine.sampling_defaults = dict(config.model.sampling_defaults)
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

    # ----- the input thread: templates and tokenization -----
    async def run_input(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the input thread (it holds the tokenizer's CPU work)."""
        return await asyncio.get_running_loop().run_in_executor(self._input_thread,
                                                                lambda: fn(*args, **kwargs))

    async def render_chat(self, messages: list[dict], **kwargs: Any) -> str:
        """`InputProcessor.render_chat` on the input thread."""
        return await self.run_input(self.input_processor.render_chat, messages, **kwargs)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (for /tokenize and count_tokens), on the input thread, with the same
        length bound as prompts."""
        return await self.run_input(self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenize = getattr(self.input_processor, "tokenize", None)
        if tokenize is None:  # a test's input processor without one
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(tokenize(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # ----- requests -----
    async def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                     arrival_time: float | None = None, priority: int = 0,
                     cache_salt: str | None = None, add_special_tokens: bool = True,
                     timeout_s: float | None = None) -> RequestStream:
        """Validates, tokenizes and admits one request; `timeout_s` from `arrival_time` on.

        Raises, with nothing left registered: `QueueFullError`, `EngineDeadError`,
        `RequestTimeoutError`, `ValueError` (incl. `ContextLengthError`) for bad input,
        `EngineSleepingError` while paused or asleep if the gate refuses rather than holds requests.
        """
        if self.dead:
            raise EngineDeadError(self.death_reason)
        await self.gate.admit()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        num_seqs = params.n
        if self._num_inflight_seqs + num_seqs > self.max_num_seqs + self.max_queue_len:
            raise QueueFullError(
                f"server is at capacity ({self._num_inflight_seqs} sequences in flight); retry later"
            )
        if params.max_tokens is not None:
            self._admit_by_time(0, params.max_tokens, num_seqs)  # at once, before the tokenizer's queue
        arrival = time.monotonic() if arrival_time is None else arrival_time
        # Held from here (and then by the request's state), so requests tokenizing side by side
        # cannot all pass the count above.
        self._num_inflight_seqs += num_seqs
        state: _RequestState | None = None
        try:
            engine_requests = await self.run_input(
                self.input_processor.process, request_id, prompt, params, arrival_time=time.time(),
                priority=priority, cache_salt=cache_salt, add_special_tokens=add_special_tokens)
            assert len(engine_requests) == num_seqs
            prompt_token_ids = list(engine_requests[0].prompt_token_ids)
            if self.request_logger is not None:
                self.request_logger(request_id, prompt, prompt_token_ids, params)
            self._admit_by_time(len(prompt_token_ids), engine_requests[0].sampling_params.max_tokens, num_seqs)
            if timeout_s is not None and time.monotonic() - arrival > timeout_s:
                raise RequestTimeoutError(f"the request ran past its {timeout_s:g} s timeout before it "
                                          "was admitted")
            try:
                payload = self.client.encode_add_requests(engine_requests)
            except (OverflowError, msgspec.EncodeError):
                raise ValueError("a field of this request is out of range") from None
            state = self._register(request_id, prompt, prompt_token_ids, params, engine_requests, arrival,
                                   timeout_s)
            await self.client.send_add_requests(payload)
        except BaseException:
            if state is None:
                self._num_inflight_seqs -= num_seqs
            else:
                self.abort(request_id)  # it may have reached the core before a cancellation
            raise
        state.timing.submitted = time.monotonic()
        return RequestStream(self, request_id, state, prompt_token_ids)

    def _admit_by_time(self, num_prompt_tokens: int, max_tokens: int, num_seqs: int) -> None:
        """Refuses a request (its prompt, and `max_tokens` per sequence) that the work already in
        flight would delay more than `max_queue_wait_s` (admission.py)."""
        if self.max_queue_wait_s is None:
            return
        prompt_ahead, decode_ahead, seqs_ahead = self.tokens_ahead(num_prompt_tokens + max_tokens)
        wait = self.queue_wait.wait_s(prompt_ahead, decode_ahead, seqs_ahead + num_seqs)
        if wait > self.max_queue_wait_s:
            retry_after = min(600, max(1, math.ceil(wait - self.max_queue_wait_s)))
            raise QueueFullError(f"server is overloaded: the work ahead would delay this request about "
                                 f"{wait:.0f} s (the limit is {self.max_queue_wait_s:g} s); retry later",
                                 retry_after_s=retry_after)

    def tokens_ahead(self, num_tokens: int) -> tuple[int, int, int]:
        """(prompt tokens, decode tokens, sequences) in flight that a new sequence computing its
        own `num_tokens` (prompt and output) waits for: the steps are shared, so each sequence
        delays it by its remaining prompt, then output, tokens, by `num_tokens` at most."""
        prompt_total = decode_total = seqs = 0
        for state in self._requests.values():
            num_seqs = len(state.child_ids)
            prompt = min(state.pending_prefill // num_seqs, num_tokens)
            left = max(0, state.max_tokens - state.num_generated // num_seqs)
            prompt_total += num_seqs * prompt
            decode_total += num_seqs * min(left, num_tokens - prompt)
            seqs += num_seqs
        return prompt_total, decode_total, seqs

    def _register(self, request_id: str, prompt: str | list[int], prompt_token_ids: list[int],
                  params: SamplingParams, engine_requests: list, arrival: float,
                  timeout_s: float | None) -> _RequestState:
        """Tracks an admitted request; its sequences are already counted in `_num_inflight_seqs`."""
        try:
            self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None,
                                              prompt_token_ids, params)
        except BaseException:
            self.output_processor.abort_request(request_id)
            raise
        timing = RequestTiming(arrival=arrival, num_prompt_tokens=len(prompt_token_ids))
        state = _RequestState(queue=asyncio.Queue(), child_ids=[r.request_id for r in engine_requests],
                              timing=timing, delta_outputs=params.output_kind == RequestOutputKind.DELTA,
                              timeout_s=timeout_s,
                              pending_prefill=len(prompt_token_ids) * len(engine_requests),
                              max_tokens=engine_requests[0].sampling_params.max_tokens or 0)
        self._requests[request_id] = state
        for child_id in state.child_ids:
            self._child_to_parent[child_id] = request_id
        if timeout_s is not None:
            state.deadline_timer = asyncio.get_running_loop().call_at(
                arrival + timeout_s, self._expire, request_id)
        return state

    def abort(self, request_id: str) -> None:
        """Stops a request: its children are aborted in the core (KV freed) and its queue dropped."""
        state = self._forget(request_id)
        if state is None or self.dead:
            return
        self.output_processor.abort_request(request_id)
        asyncio.get_running_loop().create_task(self.client.abort_requests(state.child_ids))

    def _expire(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        logger.info("request %s passed its %.3g s timeout: aborted", request_id, state.timeout_s)
        self.abort(request_id)
        state.queue.put_nowait(_TIMED_OUT)

    def _forget(self, request_id: str) -> _RequestState | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        state.finished = True
        if state.deadline_timer is not None:
            state.deadline_timer.cancel()
        for child_id in state.child_ids:
            self._child_to_parent.pop(child_id, None)
        self._num_inflight_seqs -= len(state.child_ids)
        return state

    # ----- the output task -----
    async def _output_loop(self) -> None:
        try:
            while True:
                step = await self.client.get_output()
                engine_outputs = step.outputs
                self._last_progress = time.monotonic()
                stats = engine_outputs.scheduler_stats
                if stats is not None:
                    self.last_stats = stats
                    if self.stats_listener is not None:
                        self.stats_listener.on_scheduler_stats(stats)
                    self.queue_wait.on_step(step.step_s, stats.num_prompt_tokens + stats.num_generation_tokens)
                # Outputs of requests aborted meanwhile are dropped: their state is gone here.
                outputs = [o for o in engine_outputs.outputs if o.request_id in self._child_to_parent]
                if outputs:
                    self._count_progress(outputs)
                    self._dispatch(outputs)
        except EngineDeadError:
            pass  # _on_core_death fails the requests
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not leave every client hanging forever
            logger.exception("output processing failed")
            self.client._mark_dead("output processing failed")

    def _count_progress(self, outputs: list) -> None:
        """Generated tokens per request, and the end of its prefill at its first token. Read from
        the core's outputs: FINAL_ONLY requests report nothing else until they end. Token times
        are `_dispatch`'s: setting them here too would count a first gap from time zero."""
        for output in outputs:
            if not output.new_token_ids:
                continue
            state = self._requests.get(self._child_to_parent[output.request_id])
            if state is None:
                continue
            state.num_generated += len(output.new_token_ids)
            state.pending_prefill = 0

    def _dispatch(self, outputs: list) -> None:
        now = time.monotonic()
        # Token times from the core's outputs, which arrive every step whatever the request's
        # output kind (a non-streamed request's RequestOutput comes only at the end).
        for output in outputs:
            state = self._requests.get(self._child_to_parent.get(output.request_id, ""))
            if state is None or not output.new_token_ids:
                continue
            timing = state.timing
            if not timing.first_token:
                timing.first_token = now
            elif timing.last_token < now:  # n > 1: one gap per step, not one per child
                timing.inter_token_latencies.append(now - timing.last_token)
            timing.last_token = now
        processed = self.output_processor.process(outputs)
        if processed.to_abort:
            asyncio.get_running_loop().create_task(self.client.abort_requests(processed.to_abort))
        for request_output in processed.request_outputs:
            state = self._requests.get(request_output.request_id)
            if state is None:
                continue
            timing = state.timing
            new_tokens = sum(len(c.token_ids) for c in request_output.outputs)
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
        self._input_thread.shutdown(wait=False, cancel_futures=True)
        self.client.close()
