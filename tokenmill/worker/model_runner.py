"""The model runner: applies the scheduler's diffs to its persistent per-request state, builds the
step's flattened inputs, runs the model and samples.

It makes no scheduling decisions. Requests are ordered decodes-first so the attention backend can
batch all one-token queries together.

`launch` enqueues a step and returns a `StepFuture` without waiting for the GPU; `execute` waits
too. Under async scheduling the engine launches step N+1 before it reads step N's tokens: a request
whose next input is such a token (the runner's host copy of its tokens is one short) gets it from
step N's sampled-token tensor on the device.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.config import EngineConfig
from tokenmill.config_kv_sizing import available_memory_bytes, default_cpu_kv_cache_bytes, total_memory_bytes
from tokenmill.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from tokenmill.distributed.parallel_state import tp_all_reduce_min, tp_broadcast_from_driver, tp_rank, tp_world_size
from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.registry import build_model
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.common_prefix import CASCADE_MIN_DECODES, common_prefix_tokens
from tokenmill.worker.sampler import (
    SampledTokens, Sampler, SamplingBatch, argmax, batch_token_logprobs, index_tensor)

logger = logging.getLogger(__name__)

@dataclass(slots=True)
class RequestState:
    """What the runner remembers about a running request between steps."""

    request_id: str
    token_ids: list[int]  # prompt + sampled so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None
    table_row: int  # this request's row of the runner's persistent host block table
    grammar: object | None = None  # structured_output.RequestGrammar for constrained requests
    # Logit bias, min_tokens, penalties or a grammar: the rows _sampling_batch must look at.
    sampling_extras: bool = False

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class ModelRunner:
    """One rank's runner. Rank 0 (the driver) samples; other tensor-parallel ranks run the same
    forward passes (their collectives pair up with rank 0's) and learn the sampled tokens from the
    next step's message (`append_sampled_tokens`)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.is_driver = tp_rank() == 0
        self.device = config.device
        self.block_size = config.cache.block_size
        torch.manual_seed(config.model.seed)
        self._memory_at_start = self._gpu_memory_baseline() if self.device.type == "cuda" else None
        self.model = build_model(config)
        self.sampler = Sampler()
        self.states: dict[str, RequestState] = {}
        # Seeded generators outlive preemption, so a resumed request continues its random stream.
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[KVCache] = []
        self.num_blocks = 0
        self.graphs = None  # CudaGraphDecoder once captured
        self._structured = None  # StructuredOutputManager, built on the first constrained request
        # One row per running request, written only when it gets new blocks (block ids only grow);
        # each step gathers its rows in one numpy call instead of copying Python lists row by row.
        max_seqs = config.scheduler.max_num_seqs
        self._block_table = np.zeros((max_seqs, -(-config.model.max_model_len // self.block_size)), np.int32)
        self._free_table_rows = list(range(max_seqs - 1, -1, -1))
        self.async_scheduling = config.scheduler.async_scheduling
        # Rank 0 sends each step's sampled tokens to the other ranks on the device (async + TP).
        self._share_sampled = self.async_scheduling and tp_world_size() > 1
        # The last step's sampled tokens on the device and each request's row in them.
        self._prev_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    # ----- KV cache -----
    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.config.cache.kv_cache_dtype or self.config.model.dtype

    def bytes_per_block(self) -> int:
        m = self.config.model
        element = torch.empty((), dtype=self.kv_cache_dtype).element_size()  # 1 for fp8: twice the blocks
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        return 2 * m.num_layers * self.block_size * num_kv_heads * m.head_dim * element

    def determine_num_blocks(self) -> int:
        """KV blocks for this rank's pool; every tensor-parallel rank agrees on the smallest.
        Explicit sizes first (`num_gpu_blocks_override`, then `kv_cache_memory`); otherwise what
        `gpu_memory_utilization` leaves on a GPU, or the CPU default (tokenmill/config_kv_sizing.py)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        if self.device.type == "cuda":
            budget = self._profile_gpu_kv_budget()  # also compiles the prefill kernels: always run it
            if cache.kv_cache_memory:
                budget = cache.kv_cache_memory
        else:
            budget = cache.kv_cache_memory
            if not budget:
                budget, reason = default_cpu_kv_cache_bytes(
                    self.bytes_per_block() // self.block_size, self.config.model.max_model_len,
                    self.config.scheduler.max_num_seqs, available_memory_bytes() // tp_world_size(),
                    total_memory_bytes() // tp_world_size())
                logger.info("%s", reason)
        return tp_all_reduce_min(max(1, int(budget // self.bytes_per_block())), self.device)

    def _gpu_memory_baseline(self) -> tuple[int, int, int]:
        """Before anything is loaded: refuse to start where `gpu_memory_utilization` of the GPU is
        more than is free (other processes hold the rest), rather than find out at the KV pool.
        Returns (free, torch reserved, torch allocated) now: the baseline `_profile_gpu_kv_budget`
        measures this engine's own use from."""
        # An earlier engine's tensors in this process are free memory once collected (reference
        # cycles can keep a shut-down engine's objects alive until then) and returned to CUDA.
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        cache = self.config.cache
        wanted = total * cache.gpu_memory_utilization
        if not cache.pool_size_given and wanted > free:
            raise ValueError(
                f"{self.device} has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, less than "
                f"gpu_memory_utilization={cache.gpu_memory_utilization} asks for ({wanted / 2**30:.1f} GiB): "
                f"lower --gpu-memory-utilization, or free the memory other processes hold")
        return free, torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(self.device)

    def _profile_gpu_kv_budget(self) -> float:
        """Run the largest batch once, then give the KV pool what `gpu_memory_utilization` of the
        GPU leaves after this engine's own use: weights and peak activations (torch's allocator),
        and what it holds outside torch (CUDA context growth, NCCL and symmetric-memory buffers),
        both measured from the start-up baseline. Memory other processes hold is not charged: the
        fraction is this engine's share, as in vLLM (two engines at 0.45 can share one GPU)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = self.config.scheduler.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            num_reqs=1, num_tokens=n, num_decodes=0, max_query_len=n, max_seq_len=n,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_table=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=self.device),
            query_start_loc_cpu=torch.tensor([0, n], dtype=torch.int32),
            seq_lens_cpu=torch.tensor([n], dtype=torch.int32))
        m = self.config.model
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        dummy = torch.empty(1, self.block_size, num_kv_heads, m.head_dim, dtype=self.kv_cache_dtype,
                            device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device) % m.max_model_len,
                                [(dummy, dummy)] * m.num_layers, meta)
            logits = self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs):])
            argmax(logits[:1].float())  # compiles the sampler's Triton argmax now, not on a served step
        torch.cuda.synchronize()
        free_at_start, reserved_at_start, allocated_at_start = self._memory_at_start
        free, total = torch.cuda.mem_get_info(self.device)
        torch_peak = torch.cuda.max_memory_allocated(self.device) - allocated_at_start
        outside_torch = (free_at_start - free) - (torch.cuda.memory_reserved(self.device) - reserved_at_start)
        return total * self.config.cache.gpu_memory_utilization - torch_peak - max(0, outside_torch)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        shape = (num_blocks, self.block_size, num_kv_heads, m.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device))
                          for _ in range(m.num_layers)]
        self.num_blocks = num_blocks

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs (CUDA only, after the KV cache exists; `enforce_eager` skips)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        from tokenmill.worker.cuda_graphs import CudaGraphDecoder
        self.graphs = CudaGraphDecoder(self.model, self.kv_caches, min(self.config.scheduler.max_num_seqs, 512),
                                       self.config.model.max_model_len, self.block_size, self.device,
                                       CASCADE_MIN_DECODES if self.config.cascade_attention else None)
        self.graphs.capture()

    def shutdown(self) -> None:
        """Drop everything on the device (the runner cannot step afterwards): the KV pool, graphs
        and weights, so that a later engine in this process finds the memory free."""
        self.kv_caches = []
        self.graphs = None
        self.model = None
        self._prev_sampled = None

    # ----- state updates -----
    def _apply_diffs(self, sched: SchedulerOutput) -> None:
        for request_id in sched.finished_request_ids:
            self._drop_request(request_id)
            self.generators.pop(request_id, None)
        for request_id in sched.preempted_request_ids:
            self._drop_request(request_id)
        for new in sched.new_requests:
            self._add_request(new)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            if cached.new_block_ids:
                self._write_block_ids(state.table_row, len(state.block_ids), cached.new_block_ids)
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _drop_request(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self._free_table_rows.append(state.table_row)

    def _write_block_ids(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self._block_table.shape[1]:
            grown = np.zeros((self._block_table.shape[0], end), np.int32)
            grown[:, :self._block_table.shape[1]] = self._block_table
            self._block_table = grown
        self._block_table[row, start:end] = block_ids

    def _structured_outputs(self):
        if self._structured is None:
            from tokenmill.model.loader.tokenizer import load_tokenizer
            from tokenmill.structured_output import StructuredOutputManager
            tokenizer = load_tokenizer(self.config.model.source.tokenizer_path)
            self._structured = StructuredOutputManager(tokenizer, self.config.model.vocab_size)
        return self._structured

    def _add_request(self, new: NewRequestData) -> None:
        if not self._free_table_rows:  # more requests than max_num_seqs: grow the table
            self._free_table_rows.append(len(self._block_table))
            self._block_table = np.concatenate([self._block_table, np.zeros_like(self._block_table[:1])])
        row = self._free_table_rows.pop()
        self._block_table[row] = 0
        self._write_block_ids(row, 0, new.block_ids)
        state = RequestState(
            new.request_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
            list(new.block_ids), new.num_computed_tokens, new.eos_token_id, row)
        spec = new.sampling_params.structured_outputs
        if spec is not None and self.is_driver:
            params = new.sampling_params
            stops = [t for t in [new.eos_token_id, *(params.all_stop_token_ids or [])] if t is not None]
            # A resumed request replays its earlier output so the grammar continues where it was.
            state.grammar = self._structured_outputs().new_request(
                spec, stop_token_ids=stops, prefix_token_ids=state.output_token_ids)
        p = new.sampling_params
        state.sampling_extras = bool(p.logit_bias or p.min_tokens > 0 or p.needs_penalties
                                     or state.grammar is not None)
        self.states[new.request_id] = state
        seed = new.sampling_params.seed
        if seed is not None and self.is_driver and new.request_id not in self.generators:
            self.generators[new.request_id] = torch.Generator(device=self.device).manual_seed(seed)

    def append_sampled_tokens(self, sampled: dict[str, list[int]]) -> None:
        """Non-driver ranks: the tokens rank 0 read back since its last message (before this
        step's diffs)."""
        for request_id, tokens in sampled.items():
            state = self.states.get(request_id)
            if state is not None:
                state.token_ids.extend(tokens)

    # ----- one step -----
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> "StepFuture":
        """Enqueue one step; the future's `result()` waits for its sampled tokens."""
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
        states = [self.states[r] for r in order]
        host = self._prepare_host_inputs(states, counts)
        output = ModelRunnerOutput()
        sample_rows = np.flatnonzero(host.seq_lens >= host.num_known).tolist()
        device_tokens = self._device_tokens(states, host) if host.lag_rows else None
        # A one-token row that samples is past its prompt, so it needs no prompt logprobs.
        needs_prompt_logprobs = not (one_token_each and len(sample_rows) == num_reqs) and any(
            s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens - 1
            for s in states)
        prefix_len = self._common_prefix_len(host)
        if (self.graphs is not None and len(sample_rows) == host.num_decodes == len(states)
                and not needs_prompt_logprobs and self.graphs.can_run(len(states))):
            logits = self.graphs.run(host.input_ids, host.positions, host.slot_mapping,
                                     host.seq_lens, host.block_table, device_tokens, prefix_len)
        else:
            inputs = self._to_device(host, prefix_len)
            if device_tokens is not None:
                inputs.input_ids.index_copy_(0, *device_tokens)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
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
                tp_broadcast_from_driver(tokens)
                self._prev_sampled = (tokens, dict(zip(sampled_ids, range(len(sampled_ids)))))
            return StepFuture(output)
        sampled_states = states if all_sample else [states[i] for i in sample_rows]
        batch = self._sampling_batch(sampled_states, host.seq_lens if all_sample else host.seq_lens[sample_rows])
        sampled = self.sampler.sample(logits, batch)
        if self._share_sampled:
            tp_broadcast_from_driver(sampled.token_ids)
        if self.async_scheduling:
            self._prev_sampled = (sampled.token_ids, dict(zip(sampled_ids, range(len(sampled_ids)))))
        return StepFuture(output, sampled_states, sampled_ids, sampled.to_host(),
                          _record_event(self.device))

    def _device_tokens(self, states: list[RequestState], host: "HostInputs") -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows, token ids) on the device for the rows whose input the host does not know yet."""
        if self._prev_sampled is None:
            raise RuntimeError("a request's next input token is unknown, and no step sampled it")
        prev_tokens, prev_rows = self._prev_sampled
        src = [prev_rows[states[i].request_id] for i in host.lag_rows]
        dst = host.query_start[host.lag_rows].tolist()
        return index_tensor(dst, self.device), prev_tokens.index_select(0, index_tensor(src, self.device))

    def _prepare_host_inputs(self, states: list[RequestState], counts: np.ndarray) -> "HostInputs":
        """The step's flattened inputs as numpy arrays (no per-token Python loop)."""
        bs = self.block_size
        num_reqs = len(states)
        starts = np.fromiter((s.num_computed_tokens for s in states), np.int64, num_reqs)
        seq_lens = starts + counts
        query_start = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        num_tokens = int(query_start[-1])
        row_of_token = np.repeat(np.arange(num_reqs), counts)
        positions = np.arange(num_tokens, dtype=np.int64) - query_start[row_of_token] + starts[row_of_token]
        # Only the blocks this step's contexts reach (a request may hold one more, preallocated).
        max_blocks = int(-(-seq_lens.max() // bs))
        table_rows = np.fromiter((s.table_row for s in states), np.intp, num_reqs)
        block_table = self._block_table[table_rows, :max_blocks]
        # Known tokens per request; one short (its input still on the device) under async scheduling.
        num_known = np.fromiter((len(s.token_ids) for s in states), np.int64, num_reqs)
        lag = seq_lens > num_known
        lag_rows = np.flatnonzero(lag).tolist() if lag.any() else []
        if lag_rows and counts[lag].max() != 1:
            raise RuntimeError("only a one-token step can start from a token still on the device")
        if num_tokens == num_reqs and not lag_rows:  # one token each: the token after the computed ones
            input_ids = np.fromiter((s.token_ids[s.num_computed_tokens] for s in states), np.int64, num_reqs)
        else:
            input_ids = np.zeros(num_tokens, dtype=np.int64)
            for i in (np.flatnonzero(~lag).tolist() if lag_rows else range(num_reqs)):
                input_ids[query_start[i]:query_start[i + 1]] = states[i].token_ids[starts[i]:seq_lens[i]]
        slot_mapping = block_table[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        return HostInputs(input_ids, positions, slot_mapping, seq_lens.astype(np.int32), block_table,
                          query_start, int(np.count_nonzero(counts == 1)), int(counts.max()), num_known, lag_rows)

    def _common_prefix_len(self, host: "HostInputs") -> int:
        """Tokens every decode of the step has in the same blocks, where enough decodes share
        enough for cascade attention (worker/common_prefix.py); else 0."""
        n = host.num_decodes
        if not self.config.cascade_attention or n < CASCADE_MIN_DECODES:
            return 0
        return common_prefix_tokens(host.block_table[:n], host.seq_lens[:n], self.block_size)

    def _to_device(self, host: "HostInputs", common_prefix_len: int = 0) -> "StepInputs":
        dev = self.device
        qsl_cpu = torch.from_numpy(host.query_start.astype(np.int32))
        seq_cpu = torch.from_numpy(host.seq_lens)
        meta = AttentionMetadata(
            num_reqs=len(host.seq_lens), num_tokens=len(host.input_ids), num_decodes=host.num_decodes,
            max_query_len=host.max_query_len, max_seq_len=int(host.seq_lens.max()),
            query_start_loc=qsl_cpu.to(dev, non_blocking=True),
            seq_lens=seq_cpu.to(dev, non_blocking=True),
            block_table=torch.from_numpy(host.block_table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(host.slot_mapping).to(dev, non_blocking=True),
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=seq_cpu)
        if common_prefix_len:
            meta.common_prefix_len = torch.tensor([common_prefix_len], dtype=torch.int32).to(dev, non_blocking=True)
        return StepInputs(torch.from_numpy(host.input_ids).to(dev, non_blocking=True),
                          torch.from_numpy(host.positions).to(dev, non_blocking=True), meta)

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


@dataclass(slots=True)
class HostInputs:
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    seq_lens: np.ndarray  # [num_reqs] int32
    block_table: np.ndarray  # [num_reqs, max_blocks] int32
    query_start: np.ndarray  # [num_reqs + 1] int64
    num_decodes: int
    max_query_len: int
    num_known: np.ndarray  # [num_reqs] tokens the runner knows per request
    lag_rows: list[int]  # rows whose (one) input token is the previous step's sample, on the device


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata


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
