"""Embeddings through the one engine: the embedding model's front end, as `LLMEngine` is the
generation model's. It validates and tokenizes inputs (truncation, Matryoshka dimensions) and runs
them through the same `EngineCore` as generation (scheduler, executor, worker, model runner), which
pools each whole prompt into one vector (`worker/model_runner.py`, `model/layers/pooler.py`).
`LLM(task="embed").embed(...)`, `/v1/embeddings` and `run-batch` call it.

Throughput comes from packing: inputs are submitted longest first, so the scheduler fills each
step with up to `max_num_batched_tokens` real tokens of near-equal lengths: every GEMM runs on real
tokens only (no padding), large enough to keep the cores busy, and attention runs per run of equal
lengths (`model/attention/encoder.py`). Results come back in input order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import count
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from tokenmill.config import EngineArgs
from tokenmill.config.model_source import default_embedding_model_path, is_embedding_model
from tokenmill.config.pooling import read_json
from tokenmill.core.messages import EngineRequest
from tokenmill.engine.engine_core import EngineCore
from tokenmill.model.layers.pooler import truncate_and_normalize
from tokenmill.pooling_outputs import EmbeddingOutput, EmbeddingRequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

__all__ = ["EmbeddingEngine", "default_embedding_model_path", "is_embedding_model", "truncate_and_normalize"]

EmbedInput = str | list[int] | dict
_POOLING_ONLY = SamplingParams(max_tokens=1)  # required by the request type; nothing is sampled


class EmbeddingEngine:
    """Embeds texts or token ids with an encoder model from an HF / sentence-transformers folder.

    Args:
        model_path: model folder (`config.json`, `*.safetensors`, `tokenizer.json`, optionally
            sentence-transformers' `modules.json`); None -> the bundled all-MiniLM-L6-v2.
        dtype: "auto" (the checkpoint's; float16 -> float32), "float32" or "bfloat16".
        max_batch_tokens: real tokens per forward pass (`max_num_batched_tokens`); None -> 4096 on
            CPU (measured best on a 2-core x86 CPU), 32768 on CUDA.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        **engine_args: other `EngineArgs` fields (`max_model_len`, `served_model_name`, ...).
    """

    def __init__(self, model_path: str | None = None, dtype: str = "auto", max_batch_tokens: int | None = None,
                 device: str = "auto", **engine_args: Any) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_batch_tokens is not None:
            engine_args["max_num_batched_tokens"] = max_batch_tokens
        args = EngineArgs(model=model_path, task="embed", dtype=dtype, device=device, **engine_args)
        self.config = args.create_engine_config()
        model = self.config.model
        self.model_path = model.source.pooling_root
        self.encoder_path = model.source.path
        self.hf_config = model.hf_config.to_dict()
        self.max_model_len = model.max_model_len
        self.pooling = model.pooling
        self.served_model_name: str | None = args.served_model_name
        self.core = EngineCore(self.config)
        self.tokenizer = Tokenizer.from_file(os.path.join(self.encoder_path, "tokenizer.json"))
        # tokenizer.json files often carry a fixed padding / truncation; lengths are decided here.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        tok_cfg = read_json(os.path.join(self.encoder_path, "tokenizer_config.json")) or {}
        self.truncation_side: str = tok_cfg.get("truncation_side", "right")
        self.num_special_tokens = self.tokenizer.post_processor.num_special_tokens_to_add(False) \
            if self.tokenizer.post_processor is not None else 0
        self._request_ids = count()

    # --- model facts -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """Element type the encoder computes in."""
        return self.config.model.dtype

    @property
    def device(self) -> torch.device:
        return self.config.device

    @property
    def dimensions(self) -> int:
        """Length of the embeddings `embed` returns (without Matryoshka truncation)."""
        return self.hf_config["hidden_size"]

    @property
    def matryoshka_dimensions(self) -> list[int] | None:
        dims = self.pooling.matryoshka_dimensions
        return list(dims) if dims else None

    @property
    def supports_matryoshka(self) -> bool:
        """True when the model was trained so a prefix of its embedding is itself an embedding."""
        return self.pooling.supports_matryoshka

    def validate_dimensions(self, dimensions: int | None) -> None:
        """Raise ValueError unless `dimensions` is None or a truncation this model allows."""
        if dimensions is None:
            return
        if not self.supports_matryoshka:
            raise ValueError("this model does not support the `dimensions` parameter (not a Matryoshka model)")
        allowed = self.matryoshka_dimensions
        if allowed is not None and dimensions not in allowed:
            raise ValueError(f"dimensions {dimensions} is not one of the model's Matryoshka dimensions {allowed}")
        if not 1 <= dimensions <= self.dimensions:
            raise ValueError(f"dimensions must be in [1, {self.dimensions}], got {dimensions}")

    # --- inputs ------------------------------------------------------------------------------

    def _resolve_truncation(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if not 1 <= truncate_prompt_tokens <= self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or in [1, {self.max_model_len}] (the model's maximum), "
                f"got {truncate_prompt_tokens}"
            )
        if truncate_prompt_tokens <= self.num_special_tokens:
            raise ValueError(
                f"truncate_prompt_tokens {truncate_prompt_tokens} leaves no room for text next to the "
                f"{self.num_special_tokens} special tokens the tokenizer adds"
            )
        return truncate_prompt_tokens

    @staticmethod
    def _as_list(inputs) -> list[EmbedInput]:
        if isinstance(inputs, (str, dict)):
            return [inputs]
        if isinstance(inputs, Sequence) and inputs and all(isinstance(t, int) for t in inputs):
            return [list(inputs)]  # one prompt given as token ids
        return list(inputs)

    def tokenize(self, inputs, truncate_prompt_tokens: int | None = None
                 ) -> tuple[list[str | None], list[list[int]]]:
        """Inputs -> (texts or None, token ids), truncated or length-checked.

        Text is tokenized with the model's special tokens; token-id inputs are used as given.
        Truncation keeps the start (or the end, for tokenizers whose `truncation_side` is "left")
        and, for text, keeps the special tokens."""
        items = self._as_list(inputs)
        max_len = self._resolve_truncation(truncate_prompt_tokens)
        prompts: list[str | None] = []
        ids: list[list[int] | None] = []
        text_slots: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, dict):  # vLLM's TextPrompt / TokensPrompt
                item = item["prompt_token_ids"] if "prompt_token_ids" in item else item["prompt"]
            if isinstance(item, str):
                prompts.append(item)
                ids.append(None)
                text_slots.append(i)
            elif isinstance(item, Sequence) and all(isinstance(t, int) for t in item):
                prompts.append(None)
                ids.append(self._truncate_ids(list(item), max_len))
            else:
                raise ValueError(f"input {i} must be a string or a list of token ids, got {type(item).__name__}")
        if text_slots:
            if max_len is not None:
                self.tokenizer.enable_truncation(max_len, direction=self.truncation_side)
            try:
                encodings = self.tokenizer.encode_batch([prompts[i] for i in text_slots])
            finally:
                self.tokenizer.no_truncation()
            for slot, enc in zip(text_slots, encodings):
                ids[slot] = enc.ids
        vocab_size = self.hf_config["vocab_size"]
        for i, tok in enumerate(ids):
            if not tok:
                raise ValueError(f"input {i} is empty")
            if len(tok) > self.max_model_len:
                raise ValueError(
                    f"input {i} has {len(tok)} tokens; the model's maximum is {self.max_model_len} "
                    "(set truncate_prompt_tokens to truncate)"
                )
            if prompts[i] is None and not all(0 <= t < vocab_size for t in tok):
                raise ValueError(f"input {i} has token ids outside the vocabulary [0, {vocab_size})")
        return prompts, ids  # type: ignore[return-value]

    def _truncate_ids(self, ids: list[int], max_len: int | None) -> list[int]:
        if max_len is None or len(ids) <= max_len:
            return ids
        return ids[-max_len:] if self.truncation_side == "left" else ids[:max_len]

    # --- through the engine core ------------------------------------------------------------

    @torch.inference_mode()
    def embed_token_ids(self, token_ids: list[list[int]], use_tqdm: bool = True,
                        dimensions: int | None = None) -> torch.Tensor:
        """Already-validated token ids -> `[num_inputs, dimensions]` float32 pooled embeddings."""
        params = PoolingParams(dimensions)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
        ids = {}
        for i in order:
            request_id = f"embed-{next(self._request_ids)}"
            ids[request_id] = i
            self.core.add_request(EngineRequest(request_id, list(token_ids[i]), _POOLING_ONLY, 0.0,
                                                pooling_params=params))
        rows: list[list[float] | None] = [None] * len(token_ids)
        bar = tqdm(total=len(token_ids), desc="Embedding", unit="prompt", disable=not use_tqdm)
        try:
            with bar:
                while self.core.has_unfinished_requests():
                    for out in self.core.step().outputs:
                        if out.pooled is not None:
                            rows[ids[out.request_id]] = out.pooled
                            bar.update(1)
        except BaseException:
            self.core.abort_requests(list(ids))
            raise
        return torch.tensor(rows, dtype=torch.float32).reshape(len(token_ids), -1)

    def embed(
        self,
        inputs: str | list[str] | list[int] | list[list[int]],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        dimensions: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """Embed each input; returns one output per input, in input order.

        Args:
            inputs: a text, a list of texts, one prompt's token ids, or a list of token-id lists.
            truncate_prompt_tokens: None -> inputs longer than the model's maximum raise ValueError;
                k -> keep k tokens; -1 -> keep the model's maximum.
            use_tqdm: show a progress bar.
            dimensions: Matryoshka truncation (then re-normalization); ValueError if unsupported.
        """
        self.validate_dimensions(dimensions)
        prompts, token_ids = self.tokenize(inputs, truncate_prompt_tokens)
        if not token_ids:
            return []
        rows = self.embed_token_ids(token_ids, use_tqdm=use_tqdm, dimensions=dimensions).tolist()
        return [
            EmbeddingRequestOutput(str(next(self._request_ids)), p, ids, EmbeddingOutput(row))
            for p, ids, row in zip(prompts, token_ids, rows)
        ]

    def shutdown(self) -> None:
        """Free the model (the engine cannot embed afterwards)."""
        self.core.shutdown()
