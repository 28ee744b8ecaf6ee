"""The CPU forward pass compiled by inductor (`--cpu-compile`): on the CPU it plays the part CUDA
graphs play on the GPU, removing the per-op cost of thousands of small eager ops per step.

The whole model forward is one graph; each attention layer is one opaque op in it
(`torch.ops.tokenmill.cpu_paged_attention`, `model/attention/cpu.py`), so nothing in the graph
depends on the step's lengths but the tensor sizes. Sizes are symbolic: the token count is a
dynamic dimension, and the request count is unbacked (only the attention op reads it, and the
compiler never specialises on it). A graph is compiled for one-token steps (batch-1 decode) and
one for every other size, both at start-up (`warm_up`), so no served step compiles.

How a step reaches its graph costs as much as a tenth of a small model's decode step, so neither
goes through dynamo's full dispatch once it is safe not to:
- One-token steps call the code dynamo made for them as a plain function (`_one_token_fn`),
  without its frame hook, cache lookup and guards, with the compiled graph it names bound when
  it was made; decode 9.99 -> 9.58 ms/token (SmolLM2, 2-core Zen 4, alternated in one process).
- Other steps, once their graph has run under dynamo's full guards, skip all but the guards that
  tell dynamo's cached graphs apart (`skip_guard_eval_unsafe`): the full check walks ~6,000 guards
  on the model's modules, ~1.1 ms a step, and nothing they check changes while an engine serves.
  The trust holds while the cache entries present when it was given are all still there: a reset
  of dynamo's cache (`forget_compiled_graphs`, another engine, or any code in the process)
  removes them, and these steps run under full guards until their graph has been compiled and
  checked again, so a step is never handed another engine's graph.
Weights are
frozen into the graph (inductor packs each linear's for oneDNN); start-up therefore compiles for
minutes on a 2-core machine every time: with frozen weights inductor's on-disk cache did not
shorten a second start-up in our measurement (docs/perf-cpu.md).
"""

from __future__ import annotations

import logging
import time
import types

import torch
from torch import nn

from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.utils.process import tcmalloc_hint

logger = logging.getLogger(__name__)


class CompiledCpuForward:
    """`model(input_ids, positions, kv_caches, meta)`, compiled on first use of each graph."""

    def __init__(self, model: nn.Module, max_tokens: int) -> None:
        self.max_tokens = max(max_tokens, 3)
        # Weights are constants of the graph: inductor folds them and packs each linear's weight
        # for oneDNN once, at compile time.
        torch._inductor.config.freezing = True
        # Dynamo keeps its graphs on the model class's forward code, shared by every engine in the
        # process: each engine adds two, so the default limit of 8 would stop the fifth engine.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # A C++ wrapper calls the graph's ~300 kernels (SmolLM2: 121 linears, 30 attention ops)
        # instead of generated Python: decode 19.4 -> 17.8 ms/token on the 2-core box.
        self._compiled = torch.compile(model, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        self._code = type(model).forward.__code__  # dynamo keeps the compiled graphs on it
        # Which graphs (one-token: True, multi-token: False) ran under full guards since the trust
        # was last lost, and the compiled code of every cache entry there was when both had.
        self._checked: set[bool] = set()
        self._trusted_codes: list = []
        # One-token steps call dynamo's output for that graph as a plain function (`_one_token_fn`).
        self._model = model
        self._one_token = None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        if input_ids.shape[0] == 1 and self._one_token is not None:
            return self._one_token(self._model, input_ids, positions, kv_caches, meta)
        if input_ids.shape[0] > 1:
            for per_token in (input_ids, positions, meta.slot_mapping):
                torch._dynamo.mark_dynamic(per_token, 0, min=2, max=self.max_tokens)
        for per_request in (meta.seq_lens, meta.block_table, meta.query_start_loc):
            torch._dynamo.decorators.mark_unbacked(per_request, 0)
        if self.trusted:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(input_ids, positions, kv_caches, meta)
            except RuntimeError as error:  # no entry fits: a graph must be compiled, under full guards
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self._trusted_codes = []
        out = self._compiled(input_ids, positions, kv_caches, meta)
        self._checked.add(input_ids.shape[0] == 1)
        # Without the one-token function, both graphs are dynamo's to tell apart.
        if self._checked >= ({False} if self._one_token else {True, False}) and not self._trusted_codes:
            self._trusted_codes = [entry.code for entry in self._cache_entries()]
        return out

    def _cache_entries(self) -> list:
        return torch._dynamo.eval_frame._debug_get_cache_entry_list(self._code)

    @property
    def trusted(self) -> bool:
        """Whether steps skip dynamo's full guard check: both graphs ran under it, and no entry of
        dynamo's cache present then has gone since (~1.5 us to check)."""
        if not self._trusted_codes:
            return False
        # The codes are held here, so no other object can have taken their ids.
        present = {id(entry.code) for entry in self._cache_entries()}
        if all(id(code) in present for code in self._trusted_codes):
            return True
        self._checked, self._trusted_codes = set(), []
        return False

    def warm_up(self, run_step) -> None:
        """Compile both graphs now: `run_step(num_tokens)` runs one step of that many tokens."""
        hint = tcmalloc_hint()
        if hint:
            logger.info(hint)
        for num_tokens in (1, 2):
            start = time.perf_counter()
            before = {id(entry.code) for entry in self._cache_entries()}
            run_step(num_tokens)
            if num_tokens == 1:
                self._one_token = self._one_token_fn(before)
            logger.info("compiled the CPU forward for %s-token steps in %.1f s",
                        "one" if num_tokens == 1 else "multi", time.perf_counter() - start)

    def _one_token_fn(self, before: set[int]):
        """The code dynamo compiled for one-token steps (the cache entry that is not in `before`)
        as a function of the forward's arguments: a step calls it without dynamo's frame hook,
        cache lookup and guards, ~0.5 ms of a 10 ms SmolLM2 decode step on the 2-core Zen 4.
        Its globals are a copy of the forward's module's, taken now, without the graphs dynamo
        put there that this code does not name: what it calls is bound, so nothing compiled or
        reset later (this engine's other graph, another engine's, a `forget_compiled_graphs`)
        changes what it runs, and it keeps no other graph (and its frozen weights) alive. It needs no
        guards: one-token steps differ from the warm-up's only in values, never in what dynamo
        specialised on (tests/models/test_cpu_compile.py checks the guards on served steps)."""
        new = [entry for entry in self._cache_entries() if id(entry.code) not in before]
        if len(new) != 1:  # another thread compiled meanwhile: stay with dynamo's dispatch
            return None
        code, forward = new[0].code, type(self._model).forward
        named = set(_names(code))
        bound = {name: value for name, value in forward.__globals__.items()
                 if not name.startswith("__compiled_fn") or name in named}
        return types.FunctionType(code, bound, forward.__name__, forward.__defaults__, forward.__closure__)


def _names(code: types.CodeType):
    """The global names `code` and the code objects inside it may load."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def forget_compiled_graphs() -> None:
    """Drop every graph dynamo compiled in this process. Needed before compiling a model again
    after its weights changed in place: the weights are frozen into the graphs, and dynamo's code
    cache, whose guards check the parameters' shapes and not their values, would hand back the
    graph of the old ones. (Other engines in the process compile theirs again on their next call.)"""
    torch._dynamo.reset()
