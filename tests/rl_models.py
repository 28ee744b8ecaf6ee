"""Two tiny Llama checkpoints for the RL tests: weights A and weights B (different seeds), saved as
HF folders by transformers, optionally with the embedded SmolLM2's tokenizer (so servers speak
text). Generating with A, updating to B must equal a fresh engine on B."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2,
              tie_word_embeddings=False)
SMALL_VOCAB = 160


@dataclass
class Checkpoints:
    a: str
    b: str
    weights_b: dict[str, torch.Tensor]  # B's tensors, HF names (float32, CPU)
    vocab_size: int


def make_checkpoints(folder: str, with_tokenizer: bool = False) -> Checkpoints:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = None
    vocab = SMALL_VOCAB
    if with_tokenizer:
        from tokenmill.config.model_source import default_gguf_path
        gguf = default_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        vocab = len(tokenizer)
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, **CONFIG)
    paths, weights = [], None
    for seed, name in ((0, "A"), (1, "B")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        path = os.path.join(folder, name)
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        paths.append(path)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Checkpoints(paths[0], paths[1], weights, vocab)


# ----- "trainer" processes (spawned: module-level functions) -----
def trainer_broadcast(checkpoint: str, port: int, world_size: int, group_name: str) -> None:
    """A trainer holding `checkpoint`: joins the update group as rank 0, broadcasts every tensor."""
    from transformers import AutoModelForCausalLM

    from tokenmill.distributed.weight_transfer import broadcast_weights, destroy_group, init_custom_process_group

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", world_size, 0, group_name)
    broadcast_weights(group, list(model.state_dict().items()))
    destroy_group(group)


def trainer_ipc_stream(checkpoint: str, address: str, buffer_bytes: int, ready) -> None:
    """A colocated trainer speaking checkpoint-engine's protocol from a shared CPU buffer."""
    from transformers import AutoModelForCausalLM

    from tokenmill.distributed.ipc_weights import IpcWeightSender

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    sender = IpcWeightSender(address, torch.device("cpu"), buffer_bytes)
    ready.set()
    try:
        sender.send(model.state_dict().items())
    finally:
        sender.close()


def trainer_ipc_handles(checkpoint: str, handles_queue, done) -> None:
    """A colocated trainer handing out a handle per tensor ({"cpu": {name: handle}}), alive until
    `done` (its tensors must outlive the engine's reads)."""
    from transformers import AutoModelForCausalLM

    from tokenmill.distributed.ipc_weights import share_tensor

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handles_queue.put({"cpu": {k: share_tensor(v) for k, v in tensors.items()}})
    done.wait(120)


def trainer_cuda_ipc(folder: str, address: str, mode: str, queue, done) -> None:
    """A trainer on GPU 0 holding `folder`'s tensors: checkpoint-engine's protocol ("stream",
    4 MiB buckets), or one handle per tensor ("handles", alive until `done`)."""
    from safetensors.torch import load_file

    from tokenmill.distributed.ipc_weights import IpcWeightSender, device_uuid, share_tensor
    device = torch.device("cuda", 0)
    tensors = {k: v.to(device) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    if mode == "stream":
        sender = IpcWeightSender(address, device, 4 << 20)
        queue.put("bound")
        sender.send(tensors.items())
        sender.close()
    else:
        queue.put({device_uuid(device): {k: share_tensor(v) for k, v in tensors.items()}})
        done.wait(120)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(process, timeout_s: float = 120.0) -> int:
    """Wait for a spawned trainer to exit; its exit code. Polls `is_alive` (waitpid) rather than
    `join(timeout)`, which waits on a pipe that torch's shared-memory manager (started by the
    trainer's CPU IPC buffers) inherits and holds open after the trainer exited."""
    import time
    deadline = time.monotonic() + timeout_s
    while process.is_alive():
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("the trainer process did not exit")
        time.sleep(0.05)
    return process.exitcode
