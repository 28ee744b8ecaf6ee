"""The HF transformers baseline: `generate()` on the same prompts and the same weights."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def load_hf_model(llm: Any) -> tuple[Any, Any]:
    """HF's model for what `llm` serves, in the same dtype on the same device, with the same weights.

    GGUF and HF folders are loaded by transformers itself (its own dequantization); dummy weights are
    created from the config and copied into tokenmill's model, so both run identical numbers.
    """
    from transformers import AutoModelForCausalLM

    config = llm.engine.config
    if config.model.quantization is not None:
        raise ValueError("the HF baseline runs the unquantised model: benchmark quantised weights with "
                         "--baseline none (and the unquantised model beside them)")
    source = config.model.source
    dtype, device = config.model.dtype, config.device
    if source.load_format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path),
                                                     gguf_file=os.path.basename(source.path), dtype=dtype)
    elif source.load_format == "safetensors":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    else:
        from tokenmill.model.loader.weights import load_weights

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config.model.hf_config, dtype=dtype)
        ours = llm.engine.core.executor.driver_worker.model
        load_weights(ours, checkpoint_named_weights(model))
        for module in ours.modules():  # re-derive what was computed from the dummy weights
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
    return model.to(device).eval(), llm.engine.tokenizer


def checkpoint_named_weights(model: Any) -> Any:
    """An HF model's tensors under the names its checkpoints use (transformers 5 holds some
    differently in memory, e.g. a mixture of experts' stacked `experts.gate_up_proj`)."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: memory and checkpoint names agree
        return state.items()
    return revert_weight_conversion(model, state).items()


@torch.inference_mode()
def hf_generate_throughput(model: Any, tokenizer: Any, prompts: list, output_len: int,
                           batch_size: int, device: torch.device) -> dict:
    """Left-padded batches of `batch_size`, greedy, exactly `output_len` new tokens each."""
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None
              else (model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0))
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    total_out = 0
    start = time.perf_counter()
    for batch in batches:
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
        total_out += (out.shape[1] - width) * len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"output_tokens": total_out, "seconds": elapsed, "output_tok_per_s": total_out / elapsed}
