"""`LLM(task="embed")` wires the offline API to the embedding engine (all-MiniLM-L6-v2 by default)."""

import math

import pytest

from tokenmill import LLM


def test_llm_embed_default_model():
    llm = LLM(task="embed")
    texts = ["The cat sat on the mat.", "A feline rested on the rug.", "Quarterly revenue grew 8%."]
    outs = llm.embed(texts, use_tqdm=False)
    vecs = [o.outputs.embedding for o in outs]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)  # normalized
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    with pytest.raises(ValueError):
        llm.generate("hi")
    with pytest.raises(ValueError):  # MiniLM is not a Matryoshka model
        llm.embed(["x"], dimensions=128, use_tqdm=False)


def test_generate_llm_refuses_embed(llm_fp32):
    with pytest.raises(ValueError, match="task='embed'"):
        llm_fp32.embed(["x"])
