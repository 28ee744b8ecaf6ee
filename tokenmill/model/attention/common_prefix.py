"""Which decode steps run as cascade attention (`ops/attention_cascade.py`): the prefix
every decode request of a step has in the same KV blocks, read off the block tables on the host.

The prefix cache makes requests with the same prompt start share physical blocks, and `n > 1`
samples share their prompt's blocks, so "same block ids in the same leading columns" is exactly
"same tokens, already computed". The step's own new token is never in a shared block: only whole
blocks before every request's last token count.

Below the thresholds the plain decode kernel is as fast: a short prefix saves little reading,
and a small batch neither rereads much nor fills the GPU with the prefix kernel's few programs
(docs/perf-kernels.md has the kernel timings they come from).
"""

from __future__ import annotations

import numpy as np

# Measured on one H200 at Llama-3.1-8B attention shapes (bench_attention_kernels.py
# --shared-prefix): 256 shared tokens were 2-5% slower as cascade at batch 32-64, 512 were as fast
# or faster at every batch (vLLM's FlashAttention backend starts at 256).
CASCADE_MIN_PREFIX_TOKENS = 512
# Decode requests a step needs for cascade attention; the CUDA graphs capture a cascade variant
# for each batch size from here up.
CASCADE_MIN_DECODES = 32


def common_prefix_tokens(block_table: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Tokens at the start of every row's context held in the same blocks in every row, in whole
    blocks before each row's last token; 0 when that is under CASCADE_MIN_PREFIX_TOKENS.

    `block_table` [num_decodes, >= blocks] and `seq_lens` [num_decodes] (context length after the
    step, the new token included) are the decode rows of the step."""
    if len(seq_lens) == 0 or block_table.shape[1] == 0:
        return 0
    # Blocks wholly before every row's newest token (its key is written into the cache this step).
    limit = min(int((int(seq_lens.min()) - 1) // block_size), block_table.shape[1])
    if limit * block_size < CASCADE_MIN_PREFIX_TOKENS or not (block_table[:, 0] == block_table[0, 0]).all():
        return 0  # (the usual case without sharing ends at the first column)
    same = (block_table[:, :limit] == block_table[0, :limit]).all(axis=0)
    shared_blocks = limit if same.all() else int(same.argmin())
    tokens = shared_blocks * block_size
    return tokens if tokens >= CASCADE_MIN_PREFIX_TOKENS else 0
