"""`LLM`: offline batch inference with vLLM's API (`generate`, `chat`, `embed`), and the calls RL
frameworks make between rollouts (`sleep`, `wake_up`, weight updates, `collective_rpc`;
docs/rl.md)."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

import torch

from tqdm.auto import tqdm

from tokenmill.config import engine_args_from_kwargs
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.entrypoints.threads import apply_cpu_threads, start_load_sample
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """An engine for offline inference.

    Args:
        model: a GGUF file, an HF folder, or a shipped shape name (with `load_format="dummy"`);
            None uses the embedded SmolLM2-135M-Instruct (or all-MiniLM-L6-v2 with `task="embed"`).
        task: "generate" (default) or "embed".
        engine_threads: CPU threads for the model's math; None picks the cores free now
            (tokenmill/entrypoints/threads.py). Sets torch's thread count for this process.
        **engine_args: any `EngineArgs` field (`max_model_len`, `max_num_seqs`, `dtype`, ...).
    """

    def __init__(self, model: str | None = None, task: str = "generate", engine_threads: int | None = None,
                 **engine_args: Any) -> None:
        if task not in ("generate", "embed"):
            raise ValueError(f"task must be 'generate' or 'embed', got {task!r}")
        load = start_load_sample()  # spans reading the model's config (tokenmill/entrypoints/threads.py)
        self.task = task
        self._counter = itertools.count()
        if task == "embed":
            from tokenmill.engine.embedding_engine import EmbeddingEngine
            engine_args_from_kwargs(model, **engine_args)  # names any unknown argument
            apply_cpu_threads(engine_threads, since=load)
            self.embedding_engine = EmbeddingEngine(model, **engine_args)
            self.engine = None
            return
        config = engine_args_from_kwargs(model, **engine_args).create_engine_config()
        apply_cpu_threads(engine_threads, since=load)
        self.engine = LLMEngine(config)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no `SamplingParams`: the model's
        generation_config.json sampling fields (`generation_config="auto"`), else the defaults."""
        self._require_generate()
        return SamplingParams(**self.engine.config.model.sampling_defaults)

    def shutdown(self) -> None:
        """Free the KV cache and stop tensor-parallel worker processes (also at interpreter exit).

        The LLM cannot generate afterwards. `with LLM(...) as llm:` calls it on leaving the block.
        """
        if self.engine is not None:
            self.engine.core.shutdown()
            self.engine = None
        if getattr(self, "embedding_engine", None) is not None:
            self.embedding_engine.shutdown()
            self.embedding_engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ----- generation -----
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 cache_salt: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many; results come back in prompt order.

        A prompt is a string, a list of token ids, or a dict with "prompt" or "prompt_token_ids"
        (and optionally "cache_salt"). Every prompt is validated before any is queued.
        """
        self._require_generate()
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._broadcast(sampling_params or self.get_default_sampling_params(), len(prompt_list), "sampling_params")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        salts = self._broadcast(cache_salt, len(prompt_list), "cache_salt")
        return self._run(prompt_list, params_list, priorities, salts, use_tqdm, add_special_tokens=True)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        self._require_generate()
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        processor = self.engine.input_processor
        prompts = [processor.render_chat(conv, tools=tools, add_generation_prompt=add_generation_prompt,
                                         chat_template_kwargs=chat_template_kwargs)
                   for conv in conversations]
        params_list = self._broadcast(sampling_params or self.get_default_sampling_params(), len(prompts), "sampling_params")
        # The template already placed BOS and other special tokens.
        return self._run(prompts, params_list, [0] * len(prompts), [None] * len(prompts), use_tqdm,
                         add_special_tokens=False)

    def _run(self, prompts, params_list, priorities, salts, use_tqdm, add_special_tokens) -> list[RequestOutput]:
        engine = self.engine
        if engine.core.asleep:
            raise RuntimeError(f"the engine is asleep ({', '.join(sorted(engine.core.asleep))}): "
                               "call wake_up() before generating")
        ids = []
        try:
            for prompt, params, prio, salt in zip(prompts, params_list, priorities, salts):
                if isinstance(prompt, dict):
                    salt = prompt.get("cache_salt", salt)
                    prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
                params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params, priority=prio, cache_salt=salt,
                                   add_special_tokens=add_special_tokens)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        out_tokens += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"{out_tokens / elapsed:.1f} tok/s out", refresh=False)
        except BaseException:
            for request_id in ids:
                if request_id not in results:
                    engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    # ----- between rollouts (docs/rl.md) -----
    def sleep(self, level: int = 1) -> None:
        """Hand the device memory back (needs `enable_sleep_mode=True`): the KV cache is dropped,
        the weights go to pinned host memory (level 1) or are dropped (level 2: load new ones
        after `wake_up`). The prefix cache is emptied."""
        self._require_generate()
        self.engine.core.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back: `tags` of "weights", "kv_cache" (None: both). Waking the weights
        alone first lets new weights land before the KV cache is allocated again."""
        self._require_generate()
        self.engine.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        self._require_generate()
        return self.engine.core.is_sleeping()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix: no block computed before now is reused. (Weight updates do
        this themselves.)"""
        self._require_generate()
        self.engine.core.reset_prefix_cache()
        return True

    def update_weights_from_disk(self, path: str) -> int:
        """Load new weights, in place, from a safetensors folder (or a GGUF file) with the model's
        HF tensor names; any subset of them. Returns the number of parameters written."""
        self._require_generate()
        return self.engine.core.update_weights_from_disk(path)

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict) -> int:
        """Load `(hf_name, tensor)` pairs from this process (any device); with tensor
        parallelism rank 0 broadcasts them to the other ranks. Returns the parameters written."""
        self._require_generate()
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        return self.engine.core.update_weights_from_tensors(items)

    def update_weights_from_ipc_handles(self, ipc_handles: dict[str, dict[str, tuple]]) -> int:
        """vLLM's colocated form: `{device_uuid: {hf_name: torch IPC handle}}` (handles from
        `torch.multiprocessing.reductions.reduce_tensor` in the trainer's process); each rank
        opens the handles of its own GPU."""
        self._require_generate()
        return self.engine.core.update_weights_from_ipc_handles(ipc_handles)

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> int:
        """checkpoint-engine's protocol: each rank serves the sender at `zmq_handles[device_uuid]`
        (`tokenmill.distributed.ipc_weights.IpcWeightSender` is a sender)."""
        self._require_generate()
        return self.engine.core.update_weights_from_ipc(zmq_handles)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str | None = None) -> None:
        """Join a trainer's torch.distributed group (SGLang's call): the trainer is rank 0,
        tensor-parallel rank r is `rank_offset + r`; NCCL on GPUs, gloo on CPUs by default.
        Blocks until every member joined."""
        self._require_generate()
        self.engine.core.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                                   group_name, backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str | torch.dtype],
                                        shapes: list[list[int]], group_name: str = "weight_update_group",
                                        bucket_bytes: int | None = None) -> int:
        """Receive the trainer's broadcast of these tensors (it broadcasts them from rank 0, in
        this order, `tokenmill.distributed.weight_transfer.broadcast_weights`), in buckets of at
        most `bucket_bytes` (default 1 GiB). Returns the parameters written."""
        from tokenmill.distributed.weight_transfer import DEFAULT_BUCKET_BYTES, dtype_name, specs_from
        self._require_generate()
        specs = specs_from(names, [d if isinstance(d, str) else dtype_name(d) for d in dtypes], shapes)
        return self.engine.core.update_weights_from_distributed(specs, group_name,
                                                                bucket_bytes or DEFAULT_BUCKET_BYTES)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._require_generate()
        self.engine.core.destroy_weights_update_group(group_name)

    def collective_rpc(self, method: str, args: tuple | list = (), kwargs: dict | None = None) -> list[Any]:
        """Call `method` on every rank's worker (a method of `worker_extension_cls`, or
        `update_weights_from_ipc` / `report_device_id`); returns each rank's result, rank 0 first.
        The prefix cache is dropped afterwards (the method may have changed the weights)."""
        self._require_generate()
        return self.engine.core.collective_rpc(method, args, kwargs)

    # ----- embeddings -----
    def embed(self, inputs, truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              dimensions: int | None = None):
        """Embed texts or token ids; `dimensions` truncates Matryoshka models (ValueError otherwise)."""
        if self.task != "embed":
            raise ValueError("this LLM was created for generation: use LLM(task='embed') for embeddings")
        return self.embedding_engine.embed(inputs, truncate_prompt_tokens=truncate_prompt_tokens,
                                           use_tqdm=use_tqdm, dimensions=dimensions)

    # ----- helpers -----
    def _require_generate(self) -> None:
        if self.engine is None:
            raise ValueError("this LLM was created with task='embed': use .embed()")

    @staticmethod
    def _as_prompt_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [prompts]  # a single token-id prompt
        if not prompts:
            raise ValueError("no prompts given")
        return prompts

    @staticmethod
    def _broadcast(value, n: int, name: str) -> list:
        if value is None or isinstance(value, (SamplingParams, str)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return value
