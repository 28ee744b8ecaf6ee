"""A worker extension for the collective_rpc tests (`worker_extension_cls="rl_worker_ext.WeightProbe"`):
its methods run on every rank, with the worker as `self`."""

from __future__ import annotations

import os


class WeightProbe:
    def weight_sum(self, scale: float = 1.0) -> list:
        """[this rank, its parameters summed times `scale`] (each rank holds its shard)."""
        return [self.tp.rank, scale * float(sum(p.detach().double().sum() for p in self.model.parameters()))]

    def load_checkpoint_file(self, folder: str) -> int:
        """What a vLLM extension does with `model_runner.model.load_weights`: HF-named tensors in."""
        from safetensors.torch import load_file
        return self.load_weights(load_file(os.path.join(folder, "model.safetensors")).items())
