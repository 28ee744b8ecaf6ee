"""`tokenmill bench rl`: what an RL loop pays between rollouts (docs/rl.md), on one GPU.

- sleep / wake: device memory free before, asleep and awake (GiB, `torch.cuda.mem_get_info`), and
  the time of each call, at level 1 (weights to pinned host memory) and level 2 (dropped); waking
  the weights and the KV cache (which recaptures the CUDA graphs) timed apart.
- a weight push from a second, colocated process (the "trainer", holding the model's HF-named
  tensors on the same GPU): over CUDA IPC with checkpoint-engine's bucketed protocol
  (`update_weights_from_ipc`) and with one handle per tensor (`update_weights_from_ipc_handles`),
  and from a safetensors checkpoint the trainer wrote (`update_weights_from_disk`), with the page
  cache warm and with the files dropped from it (`posix_fadvise`). GB/s = the model's bytes / time.

The engine and the trainer hold the weights at once, so the model must fit twice beside the KV
pool (`--gpu-memory-utilization` is the engine's share; 8B in bf16 is 16 GB). `--device cpu`
runs the same steps (no memory figures; IPC through shared host memory) to check the benchmark.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import queue
import tempfile
import time

import torch

from tokenmill.benchmarks.common import sync, write_json

GIB = 1 << 30
SHARD_BYTES = 4 * GIB


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rl", help="sleep/wake memory and time, weight pushes over IPC and from disk")
    p.add_argument("--model", default="llama-3.1-8b", help="a shipped shape (dummy weights)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--bucket-bytes", type=int, default=GIB, help="checkpoint-engine buffer size")
    p.add_argument("--checkpoint-dir", default=None, help="where the trainer writes (default: a temp dir)")
    p.add_argument("--parts", default="sleep,ipc,disk")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def _free_gib(device: torch.device) -> float:
    """Free device memory (NaN on the CPU, which has no such figure)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GIB


def _timed(device: torch.device, fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def _greedy(llm) -> list[list[int]]:
    from tokenmill import SamplingParams
    vocab = llm.engine.config.model.vocab_size
    prompts = [[(31 * i + 7 * j) % (vocab - 1) + 1 for i in range(64)] for j in range(4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def measure_sleep(llm) -> dict:
    result = {}
    device = llm.engine.config.device
    before_tokens = _greedy(llm)
    for level in (1, 2):
        free_before = _free_gib(device)
        sleep_s = _timed(device, llm.sleep, level)
        free_asleep = _free_gib(device)
        wake_weights_s = _timed(device, llm.wake_up, ["weights"])
        wake_kv_s = _timed(device, llm.wake_up, ["kv_cache"])
        free_awake = _free_gib(device)
        result[f"level{level}"] = {
            "free_gib_before": free_before, "free_gib_asleep": free_asleep, "free_gib_awake": free_awake,
            "freed_gib": free_asleep - free_before, "sleep_s": sleep_s, "wake_weights_s": wake_weights_s,
            "wake_kv_cache_s": wake_kv_s, "wake_s": wake_weights_s + wake_kv_s}
        if level == 1:
            result["level1"]["same_tokens_after_wake"] = _greedy(llm) == before_tokens
        print(f"sleep level {level}: free {free_before:.1f} -> {free_asleep:.1f} GiB asleep "
              f"(freed {free_asleep - free_before:.1f}) -> {free_awake:.1f} awake; sleep {sleep_s:.2f}s, "
              f"wake weights {wake_weights_s:.2f}s + KV cache and graphs {wake_kv_s:.2f}s")
    return result


def _hf_specs(hf_config) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensor names and shapes, from HF's model built on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _trainer(specs, device_type: str, address: str, bucket_bytes: int, folder: str | None, commands,
             replies) -> None:
    """The colocated trainer: HF-named bf16 tensors on GPU 0, then whatever the bench asks for."""
    from tokenmill.distributed.ipc_weights import IpcWeightSender, device_uuid, share_tensor

    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    generator = torch.Generator(device=device).manual_seed(1)
    tensors = {}
    for name, shape in specs:
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        tensors[name] = t.fill_(1.0) if "norm" in name else t.uniform_(-0.02, 0.02, generator=generator)
    sync(device)
    replies.put(sum(t.numel() * t.element_size() for t in tensors.values()))
    while True:
        command = commands.get()
        if command == "handles":
            replies.put({device_uuid(device): {name: share_tensor(t) for name, t in tensors.items()}})
        elif command == "stream":
            sender = IpcWeightSender(address, device, bucket_bytes)
            replies.put("bound")
            sender.send(tensors.items())
            sender.close()
        elif command == "disk":
            replies.put(_save_shards(tensors, folder))
        else:
            return


def _save_shards(tensors: dict[str, torch.Tensor], folder: str) -> float:
    from safetensors.torch import save_file
    start = time.perf_counter()
    shard, size, index = {}, 0, 0
    for name, t in tensors.items():
        shard[name] = t.cpu()
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            save_file(shard, os.path.join(folder, f"model-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1
    if shard:
        save_file(shard, os.path.join(folder, f"model-{index:05d}.safetensors"))
    os.sync()
    return time.perf_counter() - start


def _drop_from_page_cache(folder: str) -> None:
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_pushes(llm, args, parts: set[str]) -> dict:
    config = llm.engine.config
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="tokenmill-rl-ckpt-")
    os.makedirs(folder, exist_ok=True)
    address = f"ipc://{tempfile.mkdtemp(prefix='tokenmill-rl-ipc-')}/weights"
    ctx = multiprocessing.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    device = config.device
    trainer = ctx.Process(target=_trainer, args=(_hf_specs(config.model.hf_config), device.type, address,
                                                 args.bucket_bytes, folder, commands, replies))
    trainer.start()
    result = {}

    def reply(timeout: float):
        # Poll, so that a trainer that died (its traceback is on stderr) ends the bench at once
        # instead of after the whole timeout.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return replies.get(timeout=1.0)
            except queue.Empty:
                if not trainer.is_alive():
                    raise RuntimeError(f"the trainer process exited ({trainer.exitcode}); see its traceback above")
        raise TimeoutError(f"no reply from the trainer in {timeout:.0f}s")

    try:
        nbytes = reply(600)
        gb = nbytes / 1e9
        result["weights_gb"] = gb
        if "ipc" in parts:
            commands.put("stream")
            assert reply(600) == "bound"
            uuid = llm.collective_rpc("report_device_id")[0]
            seconds = _timed(device, llm.update_weights_from_ipc, {uuid: address})
            result["ipc_stream"] = {"seconds": seconds, "gb_per_s": gb / seconds, "bucket_bytes": args.bucket_bytes}
            print(f"IPC push (checkpoint-engine protocol, {args.bucket_bytes / GIB:.1f} GiB buckets): "
                  f"{gb:.1f} GB in {seconds:.2f}s = {gb / seconds:.1f} GB/s")
            commands.put("handles")
            handles = reply(600)
            seconds = _timed(device, llm.update_weights_from_ipc_handles, handles)
            del handles
            result["ipc_handles"] = {"seconds": seconds, "gb_per_s": gb / seconds}
            print(f"IPC push (a handle per tensor): {gb:.1f} GB in {seconds:.2f}s = {gb / seconds:.1f} GB/s")
        if "disk" in parts:
            commands.put("disk")
            write_s = reply(1200)
            warm = _timed(device, llm.update_weights_from_disk, folder)
            _drop_from_page_cache(folder)
            cold = _timed(device, llm.update_weights_from_disk, folder)
            result["disk"] = {"write_s": write_s, "warm_seconds": warm, "warm_gb_per_s": gb / warm,
                              "cold_seconds": cold, "cold_gb_per_s": gb / cold, "path": folder}
            print(f"from disk: {gb:.1f} GB in {warm:.2f}s = {gb / warm:.1f} GB/s (page cache warm), "
                  f"{cold:.2f}s = {gb / cold:.1f} GB/s (dropped from it); the trainer wrote it in {write_s:.1f}s")
    finally:
        commands.put("stop")
        trainer.join(60)
        if trainer.is_alive():
            trainer.kill()
        if args.checkpoint_dir is None:
            for path in glob.glob(os.path.join(folder, "*")):
                os.remove(path)
            os.rmdir(folder)
    return result


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU: tokenmill bench rl measures device memory (--device cpu checks the steps)")
    parts = set(args.parts.split(","))
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", enable_sleep_mode=True, device=args.device,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              kv_cache_memory=None if args.device == "cuda" else 64 << 20)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"benchmark": "rl", "model": args.model, "device": name}
    if "sleep" in parts:
        result["sleep"] = measure_sleep(llm)
    if parts & {"ipc", "disk"}:
        result.update(measure_pushes(llm, args, parts))
    llm.shutdown()
    write_json(args.output_json, result)
    return result
