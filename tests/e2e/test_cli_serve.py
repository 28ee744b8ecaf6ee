"""`tokenmill serve` start-up failures: one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import re
import subprocess

from conftest import serve_argv
from server_harness import free_port


def test_unknown_model_exits_with_a_clear_message():
    argv = serve_argv(free_port()) + ["--model", "/nonexistent/model.gguf"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot serve" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_engine_start_up_error_reaches_the_log_with_its_cause(tmp_path):
    """An engine that refuses to start (here: its KV pool cannot hold one max_model_len request)
    stops the server with a non-zero exit and the engine's own reason in the log, not only
    "engine core exited"."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 128,
        "intermediate_size": 64, "num_hidden_layers": 64, "num_attention_heads": 2,
        "max_position_embeddings": 1 << 20}))
    # 64 layers x K and V x 2 heads x 64 dims x 4 bytes = 64 KiB a token: one request of 2**20
    # tokens needs 64 GiB, more than the default CPU pool (1/8 of the memory available) holds.
    argv = serve_argv(free_port()) + ["--model", str(tmp_path), "--load-format", "dummy", "--dtype", "float32",
                                      "--max-model-len", str(1 << 20)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert re.search(r"engine failed to start: ValueError: the KV cache fits only \d+ tokens", proc.stderr)
