"""Shared fixtures: the embedded model's path and engines built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Keep CI deterministic.
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from tokenmill.config.model_source import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_reference(default_gguf_path):
    """HF transformers' model and tokenizer for the embedded GGUF, float32 (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(default_gguf_path), os.path.basename(default_gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def llm_fp32():
    from tokenmill import LLM
    return LLM(dtype="float32", seed=0)
