"""The model runner: applies the scheduler's diffs to its persistent request state, stages the
step's inputs, runs the model (eagerly or by replaying a CUDA graph) and samples.

It makes no scheduling decisions. Requests are ordered decodes-first so the attention backend can
batch all one-token queries together.

`launch` enqueues a step and returns a `StepFuture` without waiting for the GPU; `execute` waits
too. Under async scheduling the engine launches step N+1 before it reads step N's tokens: a request
whose next input is such a token (the runner's host copy of its tokens is one short) gets it from
step N's sampled-token tensor on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.attention.backend import KVCache
from tokenmill.model.attention.cache_layer import CacheLayer
from tokenmill.model.attention.selector import backend_class
from tokenmill.model.forward_context import ForwardContext, forward_context
from tokenmill.model.layers.pooler import pool, truncate_and_normalize
from tokenmill.model.registry import build_model
from tokenmill.worker.input_batch import HostInputs, InputBatch, RequestState
from tokenmill.worker.input_buffers import InputBuffers
from tokenmill.worker.sampler import SampledTokens, Sampler, SamplingBatch, batch_token_logprobs
from tokenmill.utils.transfer import index_tensor

logger = logging.getLogger(__name__)

_EAGER = ForwardContext(decode_graph=False)


class ModelRunner:
    """One rank's runner. Rank 0 (the driver) samples; other tensor-parallel ranks run the same
    forward passes (their collectives pair up with rank 0's) and learn the sampled tokens from the
    next step's message (`append_sampled_tokens`)."""

    def __init__(self, config: EngineConfig, tp: TensorParallelGroup) -> None:
        self.config = config
        self.tp = tp
        self.is_driver = tp.is_driver
        self.device = config.device
        self.block_size = config.cache.block_size
        self.model = build_model(config, tp)
        # The model's layers that keep per-request memory (attention: KV blocks; linear attention:
        # state slots), in the order of its layers: each owns its part of the cache.
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, CacheLayer)]
        self.attn_builder = backend_class(config.kernels.attention_backend).builder_class()(config, self.device)
        self.sampler = Sampler(self.device, native_argmax=config.kernels.cpu_native_decode)
        self.pooling = config.model.pooling  # an embedding model: prompts are pooled, not sampled
        sched = config.scheduler
        self.input_batch = InputBatch(sched.max_num_seqs, config.model.max_model_len, self.block_size)
        self.buffers = InputBuffers(max(sched.max_num_batched_tokens, sched.max_num_seqs), sched.max_num_seqs,
                                    -(-config.model.max_model_len // self.block_size), self.device)
        # Seeded generators outlive preemption, so a resumed request continues its random stream.
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[KVCache] = []
        # Hybrid models: (source, destination) state-slot copies for the next step (prefix-cache restores).
        self._state_restores: list[tuple[int, int]] = []
        self.graphs = None  # CudaGraphDecoder once captured
        self._forward = self.model  # or the compiled CPU forward (capture_cuda_graphs)
        self.graphs_ready = False  # `capture_cuda_graphs` ran over the current pool and weights
        self._structured = None  # StructuredOutputManager, built on the first constrained request
        self.async_scheduling = sched.async_scheduling
        # Rank 0 sends each step's sampled tokens to the other ranks on the device (async + TP).
        self._share_sampled = self.async_scheduling and tp.world_size > 1
        # The last step's sampled tokens on the device and each request's row in them.
        self._prev_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    # ----- KV cache and graphs -----
    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.config.cache.kv_cache_dtype or self.config.model.dtype

    def kv_cache_bytes_per_block(self) -> int:
        return sum(layer.kv_cache_bytes_per_block(self.block_size, self.kv_cache_dtype)
                   for layer in self.attention_layers)

    def state_bytes_per_slot(self) -> int:
        """Bytes of one state slot over the model's linear-attention layers (0: none)."""
        return sum(layer.state_bytes_per_slot() for layer in self.attention_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        slots = self.config.cache.num_state_slots
        self.kv_caches = [layer.allocate_kv_cache(num_blocks, self.block_size, self.kv_cache_dtype, self.device,
                                                  slots)
                          for layer in self.attention_layers]

    def release_kv_cache(self) -> None:
        """Drop the cache of every `CacheLayer` (KV blocks, MLA latent rows, linear-attention
        state slots) and what was built over it and the weights: the decode CUDA graphs and the
        compiled CPU forward (sleep). `allocate_kv_cache` and `capture_cuda_graphs` make them again."""
        self.kv_caches = []
        self._state_restores = []
        self._prev_sampled = None
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        self.graphs = None
        self._forward = self.model
        self.graphs_ready = False

    def recapture_cuda_graphs(self) -> None:
        """After the weights changed: CUDA graphs bake in their addresses (recaptured if they
        moved), the compiled CPU forward their values (frozen into the graph: compiled again)."""
        self._drop_graphs()
        if self.config.kernels.cpu_compile:
            from tokenmill.worker.cpu_compile import forget_compiled_graphs
            forget_compiled_graphs()
        self.capture_cuda_graphs()

    def capture_cuda_graphs(self) -> None:
        """Decode graphs (CUDA, after the KV cache exists; `enforce_eager` skips); on the CPU, the
        compiled forward pass (`cpu_compile`), warmed up here."""
        self.graphs_ready = True
        if self.config.kernels.cpu_compile:
            from tokenmill.worker.cpu_compile import CompiledCpuForward
            self._forward = CompiledCpuForward(self.model, self.buffers.max_tokens)
            self._forward.warm_up(self._dummy_step)
            return
        if self.config.kernels.enforce_eager or not self.attn_builder.supports_decode_graphs:
            return
        from tokenmill.worker.cuda_graphs import CudaGraphDecoder
        self.graphs = CudaGraphDecoder(
            self.model, self.kv_caches, self.buffers, self.attn_builder,
            min(self.config.scheduler.max_num_seqs, 512), self.config.model.max_model_len, self.tp,
            getattr(self.attn_builder, "cascade_min_decodes", None))
        self.graphs.capture()

    @torch.inference_mode()
    def profile_run(self) -> None:
        """The largest step the engine can schedule, once, with no KV cache written (its peak
        activation memory is what the KV pool must leave room for); also compiles the prefill
        kernels and the sampler's argmax, so no served step compiles."""
        n = self.config.scheduler.max_num_batched_tokens
        max_len = self.config.model.max_model_len
        positions = np.arange(n, dtype=np.int64) % max_len
        host = HostInputs(
            input_ids=np.zeros(n, np.int64), positions=positions, slot_mapping=np.full(n, -1, np.int64),
            seq_lens=np.array([n], np.int32), block_table=np.zeros((1, 1), np.int32),
            query_start=np.array([0, n], np.int64), num_decodes=0, max_query_len=n,
            num_known=np.array([n], np.int64), lag_rows=[])
        staged = self.buffers.stage(host)
        meta = self.attn_builder.build(staged.batch)
        dummy = [layer.allocate_kv_cache(1, self.block_size, self.kv_cache_dtype, self.device)
                 for layer in self.attention_layers]
        with forward_context(_EAGER):
            hidden = self.model(staged.input_ids, staged.positions, dummy, meta)
            logits = self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs):])
        self.sampler.argmax(logits[:1].float())

    @torch.inference_mode()
    def _dummy_step(self, num_tokens: int) -> None:
        """A step of `num_tokens` tokens that writes no KV (slot -1), for warm-ups: one-token
        requests, as many as `max_num_seqs` allows, the last one taking the tokens left over."""
        n = num_tokens
        reqs = min(n, self.config.scheduler.max_num_seqs)
        query_start = np.append(np.arange(reqs, dtype=np.int64), n)
        query_lens = np.diff(query_start)
        host = HostInputs(
            input_ids=np.zeros(n, np.int64), positions=np.zeros(n, np.int64), slot_mapping=np.full(n, -1, np.int64),
            seq_lens=query_lens.astype(np.int32), block_table=np.zeros((reqs, 1), np.int32),
            query_start=query_start, num_decodes=int((query_lens == 1).sum()), max_query_len=int(query_lens.max()),
            num_known=query_lens.copy(), lag_rows=[])
        staged = self.buffers.stage(host)
        with forward_context(_EAGER):
            self._forward(staged.input_ids, staged.positions, self.kv_caches, self.attn_builder.build(staged.batch))

    def shutdown(self) -> None:
        """Drop everything on the device (the runner cannot step afterwards): the KV pool, graphs
        and weights, so that a later engine in this process finds the memory free."""
        self.kv_caches = []
        self.graphs = None
        if self.config.kernels.cpu_compile:
            # The compiled graphs hold the weights as constants: dynamo's cache would keep them.
            from tokenmill.worker.cpu_compile import forget_compiled_graphs
            forget_compiled_graphs()
        self.model = self._forward = None
        self.attention_layers = []
        self._prev_sampled = None

    # ----- state updates -----
    def _apply_diffs(self, sched: SchedulerOutput) -> None:
        batch = self.input_batch
        for request_id in sched.finished_request_ids:
            batch.drop(request_id)
            self.generators.pop(request_id, None)
        for request_id in sched.preempted_request_ids:
            batch.drop(request_id)
        for new in sched.new_requests:
            self._add_request(new)
        batch.apply_progress(sched)

    def _structured_outputs(self):
        if self._structured is None:
            from tokenmill.config.tokenizer import load_tokenizer
            from tokenmill.structured_output import StructuredOutputManager
            tokenizer = load_tokenizer(self.config.model.source.tokenizer_path)
            self._structured = StructuredOutputManager(tokenizer, self.config.model.vocab_size)
        return self._structured

    def _add_request(self, new: NewRequestData) -> None:
        state = self.input_batch.add(new)
        params = new.sampling_params
        if params.constrains_output and self.is_driver:
            stops = [t for t in [new.eos_token_id, *(params.all_stop_token_ids or [])] if t is not None]
            # A resumed request replays its earlier output so the grammar continues where it was.
            # A reasoning model's grammar waits behind its thinking (structured_output/reasoning_gate.py).
            state.grammar = self._structured_outputs().new_request(
                params.structured_outputs, reasoning=params.reasoning, stop_token_ids=stops,
                prefix_token_ids=state.output_token_ids)
        state.sampling_extras = bool(params.logit_bias or params.min_tokens > 0 or params.needs_penalties
                                     or state.grammar is not None)
        if new.restore_state_from >= 0:
            self._state_restores.append((new.restore_state_from, new.state_slot))
        if params.seed is not None and self.is_driver and new.request_id not in self.generators:
            self.generators[new.request_id] = torch.Generator(device=self.device).manual_seed(params.seed)

    def append_sampled_tokens(self, sampled: dict[str, list[int]]) -> None:
        """Non-driver ranks: the tokens rank 0 read back since its last message (before this
        step's diffs)."""
        self.input_batch.append_tokens(sampled)

    # ----- one step -----
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> "StepFuture":
        """Enqueue one step; the future's `result()` waits for its sampled tokens."""
        with forward_context(_EAGER):  # (a graph replay runs what was captured under its own)
            return self._launch(sched)

    def _launch(self, sched: SchedulerOutput) -> "StepFuture":
        self._apply_diffs(sched)
        if sched.is_empty:
            return StepFuture(ModelRunnerOutput())
        num_scheduled = sched.num_scheduled_tokens
        num_reqs = len(num_scheduled)
        # Every request has one token (the usual decode step): no sort, no per-request counts.
        one_token_each = sched.total_num_scheduled_tokens == num_reqs
        if one_token_each:
            order = list(num_scheduled)
            counts = np.ones(num_reqs, dtype=np.int64)
        else:
            # Decodes first; stable otherwise, so batch order follows the scheduler's.
            order = sorted(num_scheduled, key=lambda r: num_scheduled[r] != 1)
            counts = np.array([num_scheduled[r] for r in order], dtype=np.int64)
        states = [self.input_batch.states[r] for r in order]
        host = self.input_batch.prepare(states, counts)
        if self._state_restores or sched.state_checkpoints:
            self._stage_state_ops(host, order, sched)
        if self.pooling is not None:
            return self._pool_step(order, states, host)
        output = ModelRunnerOutput()
        sample_rows = np.flatnonzero(host.seq_lens >= host.num_known).tolist()
        # A one-token row that samples is past its prompt, so it needs no prompt logprobs.
        needs_prompt_logprobs = not (one_token_each and len(sample_rows) == num_reqs) and any(
            s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens - 1
            for s in states)
        nd = host.num_decodes
        prefix_len = self.attn_builder.common_prefix_len(host.block_table[:nd], host.seq_lens[:nd]) if nd else 0
        graph_key = None
        if (self.graphs is not None and len(sample_rows) == nd == num_reqs and not needs_prompt_logprobs
                and host.state_restores is None):
            graph_key = self.graphs.padded_batch(num_reqs, prefix_len > 0)
        lag_sources = self._lag_sources(states, host) if host.lag_rows else None
        staged = self.buffers.stage(host, pad_to=graph_key[0] if graph_key else None, lag_sources=lag_sources)
        if host.lag_rows:
            staged.input_ids.index_copy_(0, staged.lag_dst, self._prev_sampled[0].index_select(0, staged.lag_src))
        if graph_key is not None:
            self.attn_builder.build(staged.batch, prefix_len if graph_key[1] else 0)
            logits = self.graphs.replay(graph_key, num_reqs)
        else:
            meta = self.attn_builder.build(staged.batch, prefix_len)
            hidden = self._forward(staged.input_ids, staged.positions, self.kv_caches, meta)
            self.tp.check_all_sums_taken()
            for i, s in enumerate(states):
                if s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens - 1:
                    output.prompt_logprobs[s.request_id] = self._prompt_logprobs(
                        s, hidden, int(host.query_start[i]), int(counts[i]))
            if not sample_rows:
                return StepFuture(output)
            if one_token_each and len(sample_rows) == num_reqs:
                last_hidden = hidden  # every token is its request's last
            else:
                last_token_index = index_tensor((host.query_start[1:][sample_rows] - 1).tolist(), self.device)
                last_hidden = hidden.index_select(0, last_token_index)
            logits = self.model.compute_logits(last_hidden)
        all_sample = len(sample_rows) == num_reqs
        sampled_ids = order if all_sample else [order[i] for i in sample_rows]
        if not self.is_driver:  # rank 0 samples; this rank hears the tokens from it
            if self._share_sampled:
                tokens = torch.empty(len(sample_rows), dtype=torch.long, device=self.device)
                self.tp.broadcast_from_driver(tokens)
                self._prev_sampled = (tokens, dict(zip(sampled_ids, range(len(sampled_ids)))))
            return StepFuture(output)
        sampled_states = states if all_sample else [states[i] for i in sample_rows]
        batch = self._sampling_batch(sampled_states, host.seq_lens if all_sample else host.seq_lens[sample_rows])
        sampled = self.sampler.sample(logits, batch)
        if self._share_sampled:
            self.tp.broadcast_from_driver(sampled.token_ids)
        if self.async_scheduling:
            self._prev_sampled = (sampled.token_ids, dict(zip(sampled_ids, range(len(sampled_ids)))))
        return StepFuture(output, sampled_states, sampled_ids, sampled.to_host(), _record_event(self.device))

    def _pool_step(self, order: list[str], states: list[RequestState], host: HostInputs) -> "StepFuture":
        """An embedding model's step: every request's whole prompt, pooled into its vector."""
        staged = self.buffers.stage(host)
        meta = self.attn_builder.build(staged.batch)
        hidden = self.model(staged.input_ids, staged.positions, self.kv_caches, meta)
        rows = pool(hidden, meta.query_start_loc.long(), self.pooling).cpu()  # one device sync per step
        output = ModelRunnerOutput()
        for request_id, state, row in zip(order, states, rows):
            dims = state.pooling_params.dimensions if state.pooling_params is not None else None
            output.pooled[request_id] = (truncate_and_normalize(row, dims) if dims else row).tolist()
        return StepFuture(output)

    def _stage_state_ops(self, host: HostInputs, order: list[str], sched: SchedulerOutput) -> None:
        """Hybrid models: this step's state restores and checkpoint slots, rows in batch order."""
        if self._state_restores:
            host.state_restores = np.array(self._state_restores, dtype=np.int64).T.copy()
            self._state_restores = []
        if sched.state_checkpoints:
            width = max(len(slots) for slots in sched.state_checkpoints.values())
            table = np.full((len(order), width), -1, dtype=np.int32)
            for row, request_id in enumerate(order):
                slots = sched.state_checkpoints.get(request_id)
                if slots:
                    table[row, :len(slots)] = slots
            host.state_checkpoints = table
            host.state_checkpoint_interval = self.config.cache.state_checkpoint_interval

    def _lag_sources(self, states: list[RequestState], host: HostInputs) -> list[int]:
        """For each row whose input the host does not know yet, its row in the previous step's
        sampled tokens (on the device)."""
        if self._prev_sampled is None:
            raise RuntimeError("a request's next input token is unknown, and no step sampled it")
        prev_rows = self._prev_sampled[1]
        return [prev_rows[states[i].request_id] for i in host.lag_rows]

    def _sampling_batch(self, states: list[RequestState], seq_lens: np.ndarray) -> SamplingBatch:
        """Rows in `states` order; `seq_lens` are their context lengths after this step."""
        batch = SamplingBatch(
            temperature=[s.params.temperature for s in states],
            top_k=[s.params.top_k for s in states],
            top_p=[s.params.top_p for s in states],
            min_p=[s.params.min_p for s in states],
            generators=[self.generators.get(s.request_id) for s in states],
            num_logprobs=[s.params.logprobs for s in states])
        for row, s in enumerate(states):
            if not s.sampling_extras:
                continue
            p = s.params
            if p.logit_bias:
                batch.logit_bias[row] = p.logit_bias
            num_out = int(seq_lens[row]) - s.num_prompt_tokens  # (its token list may lag a step)
            grammar_done = s.grammar is not None and s.grammar.is_completed()
            if num_out < p.min_tokens and not grammar_done:
                stop = list(p.all_stop_token_ids or p.stop_token_ids or [])
                if s.eos_token_id is not None:
                    stop.append(s.eos_token_id)
                batch.suppressed_tokens[row] = stop
            if p.needs_penalties:
                batch.penalties[row] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
                batch.output_token_ids[row] = s.output_token_ids
                if p.repetition_penalty != 1.0:
                    batch.prompt_token_ids[row] = s.token_ids[:s.num_prompt_tokens]
        if self._structured is not None:
            from tokenmill.structured_output import constrained_rows
            grammars = [s.grammar for s in states]
            batch.grammar_bitmask = self._structured.batch_bitmask(grammars)
            batch.grammar_rows = constrained_rows(grammars) if batch.grammar_bitmask is not None else []
        return batch

    def _prompt_logprobs(self, s: RequestState, hidden: torch.Tensor, start: int, count: int) -> list:
        """Log-probabilities of each next prompt token at this chunk's positions."""
        first_pos = s.num_computed_tokens
        n = min(count, s.num_prompt_tokens - 1 - first_pos)
        if n <= 0:
            return []
        logits = self.model.compute_logits(hidden[start:start + n])  # a collective: every rank
        if not self.is_driver:
            return []
        logprobs = torch.log_softmax(logits, dim=-1)
        k = s.params.prompt_logprobs
        next_tokens = s.token_ids[first_pos + 1:first_pos + 1 + n]
        return batch_token_logprobs(logprobs, list(range(n)), next_tokens, [k] * n)


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class StepFuture:
    """A launched step. `result()` waits for its sampled tokens, appends them to the runner's
    request states (and grammars) and returns the ModelRunnerOutput."""

    __slots__ = ("_output", "_states", "_request_ids", "_sampled", "_event")

    def __init__(self, output: ModelRunnerOutput, states: list[RequestState] | None = None,
                 request_ids: list[str] | None = None, sampled: SampledTokens | None = None,
                 event=None) -> None:
        self._output = output
        self._states = states
        self._request_ids = request_ids
        self._sampled = sampled
        self._event = event

    def result(self) -> ModelRunnerOutput:
        sampled, output = self._sampled, self._output
        if sampled is None:
            return output
        self._sampled = None
        if self._event is not None:
            self._event.synchronize()
        result = sampled.result()
        for state, token in zip(self._states, result.token_ids):
            state.token_ids.append(token)
            if state.grammar is not None and not state.grammar.accept_token(token):
                # The mask makes this impossible; if it ever happens the output is cut here.
                logger.error("request %s: sampled token %d breaks its grammar", state.request_id, token)
        output.sampled_token_ids = dict(zip(self._request_ids, result.token_ids))
        if result.logprobs.count(None) != len(result.logprobs):
            for request_id, lp in zip(self._request_ids, result.logprobs):
                if lp is not None:
                    output.logprobs[request_id] = lp
        return output
