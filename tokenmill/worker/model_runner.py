"""The model runner: applies the scheduler's diffs to its persistent per-request state, builds the
step's flattened inputs, runs the model and samples.

It makes no scheduling decisions. Requests are ordered decodes-first so the attention backend can
batch all one-token queries together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.config import EngineConfig
from tokenmill.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from tokenmill.distributed.parallel_state import tp_all_reduce_min, tp_rank
from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.registry import build_model
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.sampler import Sampler, SamplingBatch, batch_token_logprobs

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


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

    # ----- KV cache -----
    def bytes_per_block(self) -> int:
        m = self.config.model
        element = torch.empty((), dtype=m.dtype).element_size()
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        return 2 * m.num_layers * self.block_size * num_kv_heads * m.head_dim * element

    def determine_num_blocks(self) -> int:
        """KV blocks for this rank's pool; every tensor-parallel rank agrees on the smallest."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        if self.device.type == "cuda":
            num_blocks = self._profile_gpu_blocks()
        else:
            num_blocks = max(1, (cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES) // self.bytes_per_block())
        return tp_all_reduce_min(num_blocks, self.device)

    def _profile_gpu_blocks(self) -> int:
        """Run the largest batch once, then give what `gpu_memory_utilization` leaves to the KV pool."""
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
        dummy = torch.empty(1, self.block_size, num_kv_heads, m.head_dim, dtype=m.dtype, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device) % m.max_model_len,
                                [(dummy, dummy)] * m.num_layers, meta)
            self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.cache.gpu_memory_utilization - peak - (total - free - torch.cuda.memory_reserved())
        return max(1, int(budget // self.bytes_per_block()))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        shape = (num_blocks, self.block_size, num_kv_heads, m.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=m.dtype, device=self.device),
                           torch.zeros(shape, dtype=m.dtype, device=self.device))
                          for _ in range(m.num_layers)]
        self.num_blocks = num_blocks

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs (CUDA only, after the KV cache exists; `enforce_eager` skips)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        from tokenmill.worker.cuda_graphs import CudaGraphDecoder
        self.graphs = CudaGraphDecoder(self.model, self.kv_caches, min(self.config.scheduler.max_num_seqs, 512),
                                       self.config.model.max_model_len, self.block_size, self.device)
        self.graphs.capture()

    def shutdown(self) -> None:
        self.kv_caches = []
        self.graphs = None

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

    def append_sampled_tokens(self, sampled: dict[str, int]) -> None:
        """Non-driver ranks: the tokens rank 0 sampled last step (before this step's diffs)."""
        for request_id, token in sampled.items():
            state = self.states.get(request_id)
            if state is not None:
                state.token_ids.append(token)

    # ----- one step -----
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_diffs(sched)
        if sched.is_empty:
            return ModelRunnerOutput()
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
        num_known = np.fromiter((len(s.token_ids) for s in states), np.int64, num_reqs)
        sample_rows = np.flatnonzero(host.seq_lens >= num_known).tolist()
        # A one-token row that samples is past its prompt, so it needs no prompt logprobs.
        needs_prompt_logprobs = not (one_token_each and len(sample_rows) == num_reqs) and any(
            s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens - 1
            for s in states)
        if (self.graphs is not None and len(sample_rows) == host.num_decodes == len(states)
                and not needs_prompt_logprobs and self.graphs.can_run(len(states))):
            logits = self.graphs.run(host.input_ids, host.positions, host.slot_mapping,
                                     host.seq_lens, host.block_table)
        else:
            inputs = self._to_device(host)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            for i, s in enumerate(states):
                if s.params.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens - 1:
                    output.prompt_logprobs[s.request_id] = self._prompt_logprobs(
                        s, hidden, int(host.query_start[i]), int(counts[i]))
            if not sample_rows:
                return output
            if one_token_each and len(sample_rows) == num_reqs:
                last_hidden = hidden  # every token is its request's last
            else:
                last_token_index = torch.as_tensor(host.query_start[1:][sample_rows] - 1, device=self.device)
                last_hidden = hidden.index_select(0, last_token_index)
            logits = self.model.compute_logits(last_hidden)
        if not self.is_driver:  # rank 0 samples; this rank hears the tokens next step
            return output
        sampled_states = states if len(sample_rows) == num_reqs else [states[i] for i in sample_rows]
        batch = self._sampling_batch(sampled_states)
        result = self.sampler(logits, batch)
        for state, token in zip(sampled_states, result.token_ids):
            state.token_ids.append(token)
            if state.grammar is not None and not state.grammar.accept_token(token):
                # The mask makes this impossible; if it ever happens the output is cut here.
                logger.error("request %s: sampled token %d breaks its grammar", state.request_id, token)
        sampled_ids = order if len(sample_rows) == num_reqs else [s.request_id for s in sampled_states]
        output.sampled_token_ids = dict(zip(sampled_ids, result.token_ids))
        if result.logprobs.count(None) != len(result.logprobs):
            for request_id, lp in zip(sampled_ids, result.logprobs):
                if lp is not None:
                    output.logprobs[request_id] = lp
        return output

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
        if num_tokens == num_reqs:  # one token each: the token after the computed ones
            input_ids = np.fromiter((s.token_ids[s.num_computed_tokens] for s in states), np.int64, num_reqs)
        else:
            input_ids = np.empty(num_tokens, dtype=np.int64)
            for i, s in enumerate(states):
                input_ids[query_start[i]:query_start[i + 1]] = s.token_ids[starts[i]:seq_lens[i]]
        slot_mapping = block_table[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        return HostInputs(input_ids, positions, slot_mapping, seq_lens.astype(np.int32), block_table,
                          query_start, int(np.count_nonzero(counts == 1)), int(counts.max()))

    def _to_device(self, host: "HostInputs") -> "StepInputs":
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
        return StepInputs(torch.from_numpy(host.input_ids).to(dev, non_blocking=True),
                          torch.from_numpy(host.positions).to(dev, non_blocking=True), meta)

    def _sampling_batch(self, states: list[RequestState]) -> SamplingBatch:
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
            num_out = len(s.token_ids) - s.num_prompt_tokens
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


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
