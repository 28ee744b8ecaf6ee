"""A GGUF file converted once into an HF model folder in the user cache, so later starts are fast.

Every start from a GGUF file pays twice: the gguf library parses the whole metadata (the
tokenizer's 100,000+ array entries: ~4 s for the embedded SmolLM2 on the 2-core CI box) and
dequantizes every tensor (~3 s). `serve` pays the parse twice, in the API process and in the
engine core. The first start therefore writes what those steps produce to
`$TOKENMILL_CACHE/gguf/<key>/` (default `~/.cache/tokenmill`): `config.json`, the dequantized
float32 weights as safetensors, and the tokenizer with its chat template. Later starts load that
folder like any HF model folder (memory-mapped safetensors), with the same numbers as the GGUF
path: the values written are exactly what dequantization gives.

The key is the file's size, modification time and a hash of its first and last MiB, so a changed
file is converted again and a second copy of the same file shares the cache. Files whose float32
weights exceed `MAX_CACHED_BYTES` are read from the GGUF every time: for them the cache would take
more disk than it saves time. A cache that cannot be written (read-only home, full disk) only
costs the slow path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from tokenmill.config.cache_root import cache_root
from tokenmill.config.model_source import ModelSource

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the folder's layout or contents change
MAX_CACHED_BYTES = 4 << 30  # float32 weights; about a 1B-parameter model
SHARD_BYTES = 1 << 30


def file_key(path: str) -> str:
    """Size, mtime and the first and last MiB's sha256: cheap for a multi-GB file, and a copy of
    the file (same bytes, same mtime) maps to the same key."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"v{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if stat.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()[:24]


def converted_folder(path: str) -> Path:
    return cache_root() / "gguf" / file_key(path)


def use_cached_conversion(source: ModelSource) -> ModelSource:
    """For a GGUF source, the same model read from its converted folder (converting it first if
    needed); any other source unchanged. Raises what reading the GGUF raises (a corrupt file)."""
    if source.kind != "gguf":
        return source
    folder = converted_folder(source.path)
    if not (folder / "config.json").is_file():
        if source.load_format == "dummy":
            return source  # random weights: nothing to convert, the metadata parse is all it costs
        if not _convert(source, folder):
            return source
    tokenizer = str(folder) if source.tokenizer_path == source.path else source.tokenizer_path
    load_format = "dummy" if source.load_format == "dummy" else "safetensors"
    return dataclasses.replace(source, kind="hf", path=str(folder), load_format=load_format,
                               tokenizer_path=tokenizer)


def _convert(source: ModelSource, folder: Path) -> bool:
    """Writes the converted folder; False (and the GGUF is read directly) when it cannot."""
    import torch
    from tqdm.auto import tqdm

    from tokenmill.config.gguf_metadata import gguf_hf_config, gguf_reader
    from tokenmill.config.gguf_weights import iter_gguf_weights
    from tokenmill.config.tokenizer import load_tokenizer

    hf_config = gguf_hf_config(source.path)  # raises CorruptModelError for a bad file
    tensors = gguf_reader(source.path).tensors
    float32_bytes = 4 * sum(int(t.n_elements) for t in tensors)
    if float32_bytes > MAX_CACHED_BYTES:
        logger.info("reading %s directly (its %.1f GiB of float32 weights are not cached)",
                    source.path, float32_bytes / 2**30)
        return False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder.parent).free < 2 * float32_bytes:
            logger.info("not caching the converted GGUF: too little disk free in %s", folder.parent)
            return False
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    except OSError as exc:
        logger.info("not caching the converted GGUF (%s)", exc)
        return False
    start = time.perf_counter()
    logger.info("converting %s to %s (first start only: later starts read the converted copy)",
                os.path.basename(source.path), folder)
    try:
        hf_config.save_pretrained(tmp)
        if source.tokenizer_path == source.path:
            tokenizer = load_tokenizer(source.path)
            tokenizer.save_pretrained(tmp)
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        bar = tqdm(iter_gguf_weights(source.path, hf_config), total=len(tensors), unit="tensor",
                   desc="dequantizing GGUF", leave=False, disable=None)
        for name, tensor in bar:
            if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor
            shard_bytes += tensor.nbytes
        _save_shards(shards, tmp)
        (tmp / "tokenmill-source.json").write_text(json.dumps(
            {"gguf": os.path.abspath(source.path), "format_version": FORMAT_VERSION}))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent start's finished copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("not caching the converted GGUF (%s)", exc)
        return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted in %.1f s", time.perf_counter() - start)
    return True


def _save_shards(shards: list[dict], folder: Path) -> None:
    """One `model.safetensors`, or numbered shards with the index transformers reads."""
    from safetensors.torch import save_file

    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for shard in shards for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
