"""Small helpers shared by the benchmark commands."""

from __future__ import annotations

import json

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
