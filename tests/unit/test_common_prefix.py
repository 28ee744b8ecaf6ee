"""The shared prefix of a decode batch's block tables (when a step runs as cascade attention)."""

import numpy as np

from tokenmill.model.attention.common_prefix import CASCADE_MIN_PREFIX_TOKENS, common_prefix_tokens

BS = 16


def table(shared: int, rows: int, width: int = 80) -> np.ndarray:
    """`rows` rows whose first `shared` entries are blocks 1000.. in every row, the rest their own."""
    t = np.arange(rows * width, dtype=np.int32).reshape(rows, width)
    t[:, :shared] = 1000 + np.arange(shared)
    return t


def test_whole_shared_blocks_before_every_last_token():
    lens = np.full(4, 70 * BS, np.int32)
    assert common_prefix_tokens(table(40, 4), lens, BS) == 40 * BS
    # The shortest context bounds it: blocks wholly before its newest token (whose key this step
    # writes), so a context of exactly 40 blocks shares 39 of them here, and 40 at one more token.
    lens[2] = 40 * BS
    assert common_prefix_tokens(table(40, 4), lens, BS) == 39 * BS
    lens[2] = 40 * BS + 1
    assert common_prefix_tokens(table(40, 4), lens, BS) == 40 * BS


def test_divergence_and_thresholds():
    lens = np.full(3, 75 * BS, np.int32)
    t = table(70, 3)
    t[1, 52] = 7  # one row leaves the shared chain at block 52
    assert common_prefix_tokens(t, lens, BS) == 52 * BS
    assert common_prefix_tokens(table(0, 3), lens, BS) == 0
    short = CASCADE_MIN_PREFIX_TOKENS // BS - 1
    assert common_prefix_tokens(table(short, 3), lens, BS) == 0  # under the threshold
    assert common_prefix_tokens(table(short + 1, 3), lens, BS) == (short + 1) * BS
    assert common_prefix_tokens(table(70, 1), lens[:1], BS) == 74 * BS  # one row: all its whole blocks
    assert common_prefix_tokens(table(70, 0), lens[:0], BS) == 0
