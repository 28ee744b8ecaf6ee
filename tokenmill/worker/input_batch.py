"""The runner's persistent view of the running requests, and a step's flattened inputs on the host.

The scheduler sends only diffs (new requests, new blocks, progress); `InputBatch` applies them to
per-request state the runner keeps across steps, and builds each step's flattened inputs
(`HostInputs`) with numpy, without a per-token Python loop. Block ids only grow, so each request's
row of the persistent host block table is written once per new block and a step gathers its rows
in one numpy call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenmill.core.scheduler_output import NewRequestData, SchedulerOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


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
    table_row: int  # this request's row of the persistent host block table
    grammar: object | None = None  # structured_output.RequestGrammar / ReasoningGate: constrained requests
    # Logit bias, min_tokens, penalties or a grammar: the rows the sampling batch must look at.
    sampling_extras: bool = False
    pooling_params: PoolingParams | None = None  # an embedding request
    state_slot: int = -1  # hybrid models: its slot in the linear layers' state pools

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class HostInputs:
    """A step's flattened inputs on the host; requests ordered decodes first."""

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
    # Hybrid models: [num_reqs] int32 state slots; None: -1 for every row (no state).
    state_slots: np.ndarray | None = None
    # [2, n] int64 (source, destination) slot copies before the step (prefix-cache restores).
    state_restores: np.ndarray | None = None
    # [num_reqs, max_boundaries] int32 checkpoint slots (-1: none) every `state_checkpoint_interval`
    # tokens; see AttentionMetadata.
    state_checkpoints: np.ndarray | None = None
    state_checkpoint_interval: int = 0


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.states: dict[str, RequestState] = {}
        self._block_table = np.zeros((max_num_seqs, -(-max_model_len // block_size)), np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.states)

    # ----- diffs -----
    def apply_progress(self, sched: SchedulerOutput) -> None:
        """New blocks and computed-token counts of the requests the runner already holds."""
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            if cached.new_block_ids:
                self._write_block_ids(state.table_row, len(state.block_ids), cached.new_block_ids)
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def drop(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self._free_rows.append(state.table_row)

    def add(self, new: NewRequestData) -> RequestState:
        if not self._free_rows:  # a step that adds before it drops: grow the table
            self._free_rows.append(len(self._block_table))
            self._block_table = np.concatenate([self._block_table, np.zeros_like(self._block_table[:1])])
        row = self._free_rows.pop()
        self._block_table[row] = 0
        self._write_block_ids(row, 0, new.block_ids)
        state = RequestState(
            new.request_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
            list(new.block_ids), new.num_computed_tokens, new.eos_token_id, row,
            pooling_params=new.pooling_params, state_slot=new.state_slot)
        self.states[new.request_id] = state
        return state

    def _write_block_ids(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self._block_table.shape[1]:
            grown = np.zeros((self._block_table.shape[0], end), np.int32)
            grown[:, :self._block_table.shape[1]] = self._block_table
            self._block_table = grown
        self._block_table[row, start:end] = block_ids

    def append_tokens(self, sampled: dict[str, list[int]]) -> None:
        """Tokens sampled elsewhere (rank 0, for the other tensor-parallel ranks)."""
        for request_id, tokens in sampled.items():
            state = self.states.get(request_id)
            if state is not None:
                state.token_ids.extend(tokens)

    # ----- a step's inputs -----
    def prepare(self, states: list[RequestState], counts: np.ndarray) -> HostInputs:
        """The step's flattened inputs for `states` (decodes first), `counts[i]` tokens each."""
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
        state_slots = None
        if states[0].state_slot >= 0:  # a hybrid model: every request holds a slot
            state_slots = np.fromiter((s.state_slot for s in states), np.int32, num_reqs)
        return HostInputs(input_ids, positions, slot_mapping, seq_lens.astype(np.int32), block_table,
                          query_start, int(np.count_nonzero(counts == 1)), int(counts.max()), num_known, lag_rows,
                          state_slots)
