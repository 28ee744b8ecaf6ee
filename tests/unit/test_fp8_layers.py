"""fp8 linear layers on the CPU, without an engine: how `quantization_config` resolves, how each
tensor-parallel rank loads its shard of block-FP8 weights with the scales of its blocks, what is
refused, and the online per-channel quantisation.

Sharding is checked against the full checkpoint tensor: the weight rank r dequantises to is
exactly the slice of the whole dequantised weight that the same layer holds unquantised.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_context import layers_for
from tokenmill.config.quantization import QuantizationConfig, resolve_quantization
from tokenmill.model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tokenmill.model.layers.quantization.not_converted import keep_unquantized_modules
from tokenmill.ops.fp8_format import FP8_DTYPE, dequantize_weight_blocks, quantize_weight_blocks

BLOCK_FP8 = QuantizationConfig("fp8", (128, 128), from_checkpoint=True)
ONLINE_FP8 = QuantizationConfig("fp8", None, from_checkpoint=False)


class _Config:
    def __init__(self, quantization_config=None):
        if quantization_config is not None:
            self.quantization_config = quantization_config


# ----- quantization_config -----

def test_block_fp8_checkpoints_resolve():
    qwen3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    quant = resolve_quantization(_Config(qwen3), None)
    assert quant == BLOCK_FP8 and quant.block_fp8
    assert resolve_quantization(_Config(qwen3), "fp8") == BLOCK_FP8
    minimax = dict(qwen3, fmt="float8_e4m3fn", modules_to_not_convert=["gate", "e_score_correction_bias", "lm_head"])
    assert resolve_quantization(_Config(minimax), None).modules_to_not_convert == (
        "gate", "e_score_correction_bias", "lm_head")
    assert resolve_quantization(_Config(dict(qwen3, ignored_layers=["lm_head"])), None).modules_to_not_convert == (
        "lm_head",)
    v31 = resolve_quantization(_Config(dict(qwen3, scale_fmt="ue8m0")), None)
    assert v31.ue8m0_activation_scales
    # HF transformers' FineGrainedFP8Config.to_dict() writes its defaults too.
    hf = dict(qwen3, dequantize=False, modules_to_convert=None, modules_to_not_convert=None, scale_fmt="float",
              expert_dtype="fp8")
    assert resolve_quantization(_Config(hf), None) == BLOCK_FP8


def test_online_fp8_and_no_quantisation():
    assert resolve_quantization(_Config(), None) is None
    assert resolve_quantization(_Config(), "fp8") == QuantizationConfig("fp8", None, False, ("gate",))
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        resolve_quantization(_Config(), "awq")


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "awq"}, "quant_method 'awq'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "activation_scheme"),
    ({"quant_method": "fp8"}, "weight_block_size=None"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "two integers"),
    ({"quant_method": "fp8", "weight_block_size": [128, 96]}, "power of two"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "dequantize": True}, "dequantize"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_convert": ["embed_tokens"]},
     "modules_to_convert"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "e5m2"}, "scale_fmt"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "input_scale_format": "x"}, "input_scale_format"),
])
def test_unsupported_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_quantization(_Config(config), None)


def test_a_checkpoint_of_another_method_refuses_the_fp8_argument():
    """The argument names what the user expects; a checkpoint of another method is refused anyway
    (unsupported), and an fp8 checkpoint agrees with it."""
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        resolve_quantization(_Config({"quant_method": "awq"}), "fp8")


def test_modules_to_not_convert_match_as_hf_does():
    quant = QuantizationConfig("fp8", (128, 128), True, modules_to_not_convert=("gate", "model.layers.1", "o_pr.*"))
    assert quant.keeps_unquantized("model.layers.0.block_sparse_moe.gate")  # suffix
    assert not quant.keeps_unquantized("model.layers.0.mlp.gate_proj")
    assert quant.keeps_unquantized("model.layers.1.mlp.down_proj")  # prefix up to a module boundary
    assert not quant.keeps_unquantized("model.layers.11.mlp.down_proj")
    assert not quant.keeps_unquantized("model.layers.0.self_attn.o_proj")  # a regex must match from the start
    assert QuantizationConfig("fp8", (128, 128), True, ("model.layers.0.self_attn.o_pr.*",)).keeps_unquantized(
        "model.layers.0.self_attn.o_proj")


# ----- block-FP8 shards -----

def _checkpoint(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full checkpoint tensor: (fp8 weight, weight_scale_inv, its dequantised float32 value)."""
    torch.manual_seed(seed)
    w_q, scale = quantize_weight_blocks(torch.randn(rows, cols), (128, 128))
    return w_q, scale, dequantize_weight_blocks(w_q, scale, (128, 128), torch.float32)


def _load(layer: nn.Module, tensors: dict, shard_id=None) -> None:
    w_q, scale, _ = tensors
    layer.weight_loader(layer.weight, w_q, shard_id)
    layer.weight_loader(layer.weight_scale_inv, scale, shard_id)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    return layer.method.dequantized_weight(layer, torch.float32)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
def test_column_and_row_shards_carry_their_block_scales(world, rank):
    full = _checkpoint(1024, 640, seed=1)  # 640 = 5 blocks: a partial-free but odd block count
    with layers_for("cpu", rank, world, quantization=BLOCK_FP8):
        column = ColumnParallelLinear(640, 1024)
        row = RowParallelLinear(1024, 640)
    assert column.weight.dtype == FP8_DTYPE and column.weight_scale_inv.shape == (1024 // world // 128, 5)
    _load(column, full)
    rows = 1024 // world
    assert torch.equal(_dequantized(column), full[2][rank * rows:(rank + 1) * rows])
    full_t = _checkpoint(640, 1024, seed=2)
    _load(row, full_t)
    assert torch.equal(_dequantized(row), full_t[2][:, rank * rows:(rank + 1) * rows])


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_merged_and_qkv_parts_land_on_their_blocks(world, rank):
    gate, up = _checkpoint(512, 320, seed=3), _checkpoint(512, 320, seed=4)  # 320: a partial input block
    q, k, v = _checkpoint(4 * 128, 320, 5), _checkpoint(2 * 128, 320, 6), _checkpoint(2 * 128, 320, 7)
    with layers_for("cpu", rank, world, quantization=BLOCK_FP8):
        gate_up = MergedColumnParallelLinear(320, [512, 512])
        qkv = QKVParallelLinear(320, 128, 4, 2)
    _load(gate_up, gate, 0)
    _load(gate_up, up, 1)
    part = 512 // world
    expected = torch.cat([gate[2][rank * part:(rank + 1) * part], up[2][rank * part:(rank + 1) * part]])
    assert torch.equal(_dequantized(gate_up), expected)
    for shard_id, tensors in zip("qkv", (q, k, v)):
        _load(qkv, tensors, shard_id)
    heads, kv_heads = 4 // world, 2 // world
    expected = torch.cat([q[2][rank * heads * 128:(rank + 1) * heads * 128],
                          k[2][rank * kv_heads * 128:(rank + 1) * kv_heads * 128],
                          v[2][rank * kv_heads * 128:(rank + 1) * kv_heads * 128]])
    assert torch.equal(_dequantized(qkv), expected)


def test_partial_blocks_at_the_end_of_a_tensor():
    """DeepSeek's kv_a_proj_with_mqa is 576 rows: 4.5 blocks, the last one partial (and unsplit)."""
    full = _checkpoint(576, 200, seed=8)
    with layers_for("cpu", quantization=BLOCK_FP8):
        layer = ReplicatedLinear(200, 576, bias=False)
    assert layer.weight_scale_inv.shape == (5, 2)
    _load(layer, full)
    assert torch.equal(_dequantized(layer), full[2])
    x = torch.randn(3, 200)
    assert torch.allclose(layer(x), x @ full[2].T, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda: ColumnParallelLinear(256, 384), "output features \\[192, 384\\) of a 384-wide"),  # rank 1 of 2
    (lambda: RowParallelLinear(384, 256), "input features \\[192, 384\\) of a 384-wide"),
    (lambda: MergedColumnParallelLinear(256, [192, 192]), "output features"),
    (lambda: QKVParallelLinear(256, 64, 2, 2), "output features"),  # one 64-row head per rank
])
def test_shards_that_cut_a_block_are_refused_when_built(make, message):
    with layers_for("cpu", 1, 2, quantization=BLOCK_FP8), pytest.raises(ValueError, match=message):
        make()


def test_a_wrongly_shaped_scale_is_refused():
    with layers_for("cpu", quantization=BLOCK_FP8):
        layer = ReplicatedLinear(256, 256, bias=False)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        layer.weight_loader(layer.weight_scale_inv, torch.ones(2, 1))


# ----- modules_to_not_convert -----

class _TinyModel(nn.Module):
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(256, 128, 2, 1)
        self.gate_up_proj = MergedColumnParallelLinear(256, [256, 256])
        self.gate = ReplicatedLinear(256, 8, bias=False)


def test_modules_to_not_convert_switch_layers_to_the_plain_method():
    quant = QuantizationConfig("fp8", (128, 128), True, modules_to_not_convert=("gate", "gate_proj", "up_proj"))
    with layers_for("cpu", quantization=quant):
        model = _TinyModel()
        assert model.gate.weight.dtype == FP8_DTYPE
        assert sorted(keep_unquantized_modules(model, quant)) == ["gate", "gate_up_proj"]
    assert model.gate.weight.dtype == torch.float32 and not hasattr(model.gate, "weight_scale_inv")
    assert model.gate_up_proj.weight.shape == (512, 256) and model.qkv_proj.weight.dtype == FP8_DTYPE


def test_a_merged_layer_with_parts_in_two_formats_is_refused():
    quant = QuantizationConfig("fp8", (128, 128), True, modules_to_not_convert=("q_proj",))
    with layers_for("cpu", quantization=quant), pytest.raises(ValueError, match="holds one format"):
        keep_unquantized_modules(_TinyModel(), quant)


# ----- online fp8 -----

def test_online_fp8_quantises_each_rank_per_channel_after_loading():
    torch.manual_seed(9)
    full = torch.randn(512, 256, dtype=torch.bfloat16)
    with layers_for("cpu", 1, 2, quantization=ONLINE_FP8):
        layer = ColumnParallelLinear(256, 512)
    assert layer.weight.dtype == torch.float32  # loads in the model dtype
    layer.weight_loader(layer.weight, full.float())
    layer.process_weights_after_loading()
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (256,)
    shard = full[256:].float()
    assert torch.allclose(layer.weight_scale, shard.abs().amax(dim=1) / 448)
    deq = _dequantized(layer)
    assert ((deq - shard).abs() <= shard.abs().amax(dim=1, keepdim=True) / 16).all()  # e4m3: 3 mantissa bits
    x = torch.randn(4, 256)
    assert torch.allclose(layer(x), x @ deq.T, atol=1e-5)


# ----- routed experts -----

def _expert_checkpoint(inter: int, hidden: int, seed: int):
    """One expert's gate, up and down as a block-FP8 checkpoint stores them (128-blocks)."""
    return {shard: _checkpoint(*shape, seed=seed + i) for i, (shard, shape) in
            enumerate((("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))))}


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_fp8_experts_load_their_rank_slice_with_its_scales(world, rank):
    from tokenmill.model.layers.moe.fused_moe import FusedMoE
    from tokenmill.model.layers.moe.router import RoutingConfig

    inter, hidden = 512, 320  # 320: a partial block of the hidden size
    with layers_for("cpu", rank, world, quantization=BLOCK_FP8):
        layer = FusedMoE(4, hidden, inter, RoutingConfig(top_k=2))
    assert layer.w13_weight.dtype == FP8_DTYPE and layer.w13_weight_scale_inv.shape == (4, 2 * inter // world // 128, 3)
    experts = [_expert_checkpoint(inter, hidden, seed=10 * e) for e in range(4)]
    for e, tensors in enumerate(experts):
        for shard, (w_q, scale, _) in tensors.items():
            stacked = "w2" if shard == "w2" else "w13"
            layer.weight_loader(getattr(layer, f"{stacked}_weight"), w_q, shard, e)
            layer.weight_loader(getattr(layer, f"{stacked}_weight_scale_inv"), scale, shard, e)
    assert layer.unloaded_weights() == []
    w13, w2 = layer.method.reference_weights(layer, torch.float32)
    part = inter // world
    for e, tensors in enumerate(experts):
        rows = slice(rank * part, (rank + 1) * part)
        assert torch.equal(w13[e], torch.cat([tensors["w1"][2][rows], tensors["w3"][2][rows]]))
        assert torch.equal(w2[e], tensors["w2"][2][:, rows])


def test_missing_expert_scales_are_reported():
    from tokenmill.model.layers.moe.fused_moe import FusedMoE
    from tokenmill.model.layers.moe.router import RoutingConfig

    with layers_for("cpu", quantization=BLOCK_FP8):
        layer = FusedMoE(2, 256, 128, RoutingConfig(top_k=1))
    for e in range(2):
        for shard, (w_q, scale, _) in _expert_checkpoint(128, 256, seed=e).items():
            layer.weight_loader(layer.w2_weight if shard == "w2" else layer.w13_weight, w_q, shard, e)
    missing = layer.unloaded_weights()
    assert len(missing) == 6 and "expert 0 w1 w13_weight_scale_inv" in missing


def test_experts_in_modules_to_not_convert_stay_unquantised():
    from tokenmill.model.layers.moe.fused_moe import FusedMoE
    from tokenmill.model.layers.moe.router import RoutingConfig

    class _Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = FusedMoE(2, 256, 128, RoutingConfig(top_k=1))

    quant = QuantizationConfig("fp8", (128, 128), True, modules_to_not_convert=("mlp.experts",))
    with layers_for("cpu", quantization=quant):
        model = nn.Module()
        model.mlp = _Moe()
        assert model.mlp.experts.w13_weight.dtype == FP8_DTYPE
        assert keep_unquantized_modules(model, quant) == ["mlp.experts"]
    experts = model.mlp.experts
    assert experts.w13_weight.dtype == torch.float32 and not hasattr(experts, "w13_weight_scale_inv")
