"""fp8 weights end to end on the CPU, on tiny random models.

Block-FP8: each HF model is quantised to 128x128 blocks in the test and saved as the checkpoints of
DeepSeek-V3 / Qwen3 `-FP8` are (`fp8_checkpoints.save_block_fp8`); tokenmill loads the folder with
its scales and must match HF transformers running the same dequantised weights (float32; prompt
and generated log-probabilities within 2e-4, exact greedy tokens), under batching and chunked
prefill. The CPU path multiplies by the dequantised weight, so the match is as tight as for an
unquantised model. HF transformers reading the folder itself gives the same logits as that
reference (the folder is in the format HF reads).

Online fp8 (`quantization="fp8"` on an unquantised checkpoint): HF with the same per-channel
quantisation applied to its weights is the reference (2e-4); the distance to the unquantised model
is reported.

Refused at start: an unsupported `quant_method`, unsupported fields, fp8 tensors without a
`quantization_config`, an unquantised tensor where the config says fp8.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fp8_checkpoints import save_block_fp8
from tokenmill import LLM, SamplingParams
from tokenmill.ops.fp8_format import dequantize_weight_per_channel, quantize_weight_per_channel

FP8 = torch.float8_e4m3fn
COMMON = dict(vocab_size=160, num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.2,
              rms_norm_eps=1e-6, head_dim=128, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    # Every dimension on 128-blocks (HF transformers can read this folder too).
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
                  intermediate_size=512, tie_word_embeddings=False),
    # hidden 320: partial blocks (2.5 per row) in every projection's input or output.
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=320,
                  intermediate_size=768, tie_word_embeddings=True),
}
PROMPT = [(7 * i + 3) % 160 for i in range(37)]
NEW_TOKENS = 6
ENGINE = dict(dtype="float32", block_size=4, enable_prefix_caching=False, kv_cache_memory=1 << 22)


def hf_model(name: str, **overrides) -> torch.nn.Module:
    values = {**COMMON, **CONFIGS[name], **overrides}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fp8_folder(request, tmp_path_factory):
    """(name, block-FP8 folder, HF model holding the dequantised weights)."""
    folder = str(tmp_path_factory.mktemp(f"{request.param}_fp8"))
    model = save_block_fp8(hf_model(request.param), folder)
    return request.param, folder, model


def _logprobs(out, prompt):
    generated = out.outputs[0].token_ids
    values = [out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
    values += [out.outputs[0].logprobs[j][t].logprob for j, t in enumerate(generated)]
    return generated, torch.tensor(values)


def _reference_logprobs(model, tokens):
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    return ref, torch.tensor([float(ref[i - 1, tokens[i]]) for i in range(1, len(tokens))])


@pytest.mark.parametrize("chunk", [None, 8])
def test_block_fp8_checkpoint_matches_hf(fp8_folder, chunk):
    name, folder, reference = fp8_folder
    kwargs = dict(ENGINE, max_num_batched_tokens=chunk) if chunk else ENGINE
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    with LLM(folder, **kwargs) as llm:
        model = llm.engine.core.executor.driver_worker.model
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == FP8 and qkv.weight_scale_inv.dtype == torch.float32
        assert model.model.layers[1].mlp.down_proj.weight.dtype == FP8
        # A second, shorter request in the same batch: decodes and prefills mix in one step.
        out, _ = llm.generate([PROMPT, PROMPT[:11]], params, use_tqdm=False)
    generated, ours = _logprobs(out, PROMPT)
    ref, ref_tokens = _reference_logprobs(reference, PROMPT + generated)
    assert generated == ref[len(PROMPT) - 1:-1].argmax(-1).tolist(), name
    assert (ours - ref_tokens).abs().max() < 2e-4, name
    for j, position in enumerate(out.outputs[0].logprobs):
        top = ref[len(PROMPT) - 1 + j].topk(5)
        for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(position[token_id].logprob - value) < 2e-4, (name, j)


def test_hf_transformers_reads_the_same_checkpoint(fp8_folder):
    """The folder is a block-FP8 checkpoint as HF transformers reads them (it dequantises on the
    CPU): its logits equal the reference's. (HF cannot dequantise partial blocks: llama only.)"""
    name, folder, reference = fp8_folder
    if name != "llama":
        pytest.skip("HF's dequantiser needs every dimension on a block")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, reference(ids).logits)


def test_modules_to_not_convert_stay_unquantised(tmp_path):
    folder = str(tmp_path)
    reference = save_block_fp8(hf_model("llama"), folder, keep=("down_proj",))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    with LLM(folder, **ENGINE) as llm:
        layer = llm.engine.core.executor.driver_worker.model.model.layers[0]
        assert layer.mlp.down_proj.weight.dtype == torch.float32
        assert not hasattr(layer.mlp.down_proj, "weight_scale_inv")
        assert layer.mlp.gate_up_proj.weight.dtype == FP8
        out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    ours = torch.tensor([out.prompt_logprobs[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))])
    assert (ours - _reference_logprobs(reference, PROMPT)[1]).abs().max() < 2e-4


def test_online_fp8_matches_hf_on_the_same_quantisation(tmp_path):
    """`quantization="fp8"` quantises every linear weight per output channel at load: HF running
    the same per-channel quantise-dequantise of its weights is the reference (2e-4). Against the
    unquantised model the log-probabilities move (reported: mean ~0.3 nats on this random model,
    whose large random weights make it sensitive) but stay far from noise."""
    folder = str(tmp_path)
    model = hf_model("qwen3")
    model.save_pretrained(folder)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    with LLM(folder, quantization="fp8", **ENGINE) as llm:
        layer = llm.engine.core.executor.driver_worker.model.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.dtype == FP8
        assert layer.self_attn.qkv_proj.weight_scale.shape == (4 * 128 + 2 * 2 * 128,)
        generated, fp8 = _logprobs(llm.generate([PROMPT], params, use_tqdm=False)[0], PROMPT)
    tokens = PROMPT + generated
    _, unquantised = _reference_logprobs(model, tokens)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize_weight_per_channel(
                    *quantize_weight_per_channel(module.weight), torch.float32))
    ref, quantised = _reference_logprobs(model, tokens)
    assert generated == ref[len(PROMPT) - 1:-1].argmax(-1).tolist()
    assert (fp8 - quantised).abs().max() < 2e-4
    diff = (fp8 - unquantised).abs()
    print(f"online fp8 vs float32 weights: |logprob difference| mean {diff.mean():.4f}, max {diff.max():.4f} nats")
    assert 1e-3 < diff.mean() < 0.6, diff


def _with_quantization_config(tmp_path, config: dict | None, fp8_tensors: bool = True) -> str:
    folder = str(tmp_path)
    if fp8_tensors:
        save_block_fp8(hf_model("llama"), folder)
    else:
        hf_model("llama").save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    data = json.load(open(path))
    if config is None:
        data.pop("quantization_config", None)
    else:
        data["quantization_config"] = config
    json.dump(data, open(path, "w"))
    return folder


BLOCK = {"quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "quant_method 'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ({**BLOCK, "activation_scheme": "static"}, "activation_scheme='static'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size=None"),
    ({**BLOCK, "fmt": "e5m2"}, "fmt='e5m2'"),
    ({**BLOCK, "expert_dtype": "fp4"}, "expert_dtype='fp4'"),
    ({**BLOCK, "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
])
def test_unsupported_quantization_is_refused_at_start(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(_with_quantization_config(tmp_path, config), **ENGINE)


def test_fp8_tensors_without_quantization_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="float8_e4m3fn, but the layer is not quantised"):
        LLM(_with_quantization_config(tmp_path, None), **ENGINE)


def test_unquantised_tensors_where_the_config_says_fp8_are_refused(tmp_path):
    folder = _with_quantization_config(tmp_path, BLOCK, fp8_tensors=False)
    with pytest.raises(ValueError, match="is float32, but its layer holds fp8 weights"):
        LLM(folder, **ENGINE)


def test_a_split_that_cuts_a_block_is_refused(tmp_path):
    """One KV head of 64 rows merged behind 4 query heads of 64: the k part starts at row 256 (on
    a block) but is 64 rows long, so v would start inside a 128-row block of the merged matrix."""
    folder = str(tmp_path)
    values = dict(COMMON, **CONFIGS["llama"], head_dim=64, num_key_value_heads=1)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    save_block_fp8(AutoModelForCausalLM.from_config(config, dtype=torch.float32), folder)
    with pytest.raises(ValueError, match="does not start and end on 128-feature blocks"):
        LLM(folder, **ENGINE)


def test_quantization_argument_must_match_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        LLM(_with_quantization_config(tmp_path, BLOCK), quantization="int8", **ENGINE)


@pytest.mark.slow
def test_block_fp8_tensor_parallel_matches_one_rank(fp8_folder):
    """TP=2 over gloo: each rank loads its shard of the fp8 weights with the scales of its blocks
    (q/k/v by heads, gate/up by rows, o/down by columns); greedy tokens and log-probabilities as
    one rank's."""
    name, folder, _ = fp8_folder
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    prompts = [PROMPT, PROMPT[5:20]]
    with LLM(folder, **ENGINE) as llm:
        expected = [_logprobs(o, p) for o, p in zip(llm.generate(prompts, params, use_tqdm=False), prompts)]
    with LLM(folder, tensor_parallel_size=2, **ENGINE) as llm:
        qkv = llm.engine.core.executor.driver_worker.model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == FP8 and qkv.weight.shape == ((2 + 2 * 1) * 128, CONFIGS[name]["hidden_size"])
        assert qkv.weight_scale_inv.shape == (4, -(-CONFIGS[name]["hidden_size"] // 128))
        got = [_logprobs(o, p) for o, p in zip(llm.generate(prompts, params, use_tqdm=False), prompts)]
    for (tokens, ours), (ref_tokens, ref) in zip(got, expected):
        assert tokens == ref_tokens, name
        assert (ours - ref).abs().max() < 1e-4, name


@pytest.mark.slow
def test_tensor_parallel_split_that_cuts_a_block_is_refused(tmp_path):
    """An MLP of 384 features over 2 ranks: 192 each, which cuts the second 128-row block."""
    folder = str(tmp_path)
    values = {**COMMON, **CONFIGS["llama"], "intermediate_size": 384}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    save_block_fp8(AutoModelForCausalLM.from_config(config, dtype=torch.float32), folder)
    with pytest.raises(Exception, match="does not start and end on 128-feature blocks"):
        LLM(folder, tensor_parallel_size=2, **ENGINE)


def test_block_fp8_with_prefix_caching_and_preemption(tmp_path):
    """fp8 weights under prefix caching, chunked prefill and preemption (a pool too small for the
    batch): the same greedy tokens as a roomy engine without prefix caching."""
    folder = str(tmp_path)
    save_block_fp8(hf_model("llama"), folder)
    prefix = [(5 * i + 1) % 160 for i in range(24)]
    prompts = [prefix + [(3 * i + j) % 160 for i in range(5 + j)] for j in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(folder, dtype="float32", block_size=4, enable_prefix_caching=False, kv_cache_memory=1 << 22) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(folder, dtype="float32", block_size=4, enable_prefix_caching=True, num_gpu_blocks_override=16,
             max_num_batched_tokens=8) as llm:
        llm.generate(prompts[:1], params, use_tqdm=False)  # the prefix's blocks are cached
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.core.scheduler.num_preemptions > 0
        assert llm.engine.core.kv_manager.pool.num_free_blocks == 16
    assert got == expected


def test_block_fp8_with_fp8_kv_cache(tmp_path):
    """fp8 weights beside the fp8 KV cache (chunked prefill reading the cached prefix back): the
    log-probabilities of its own greedy tokens as the same weights with a float32 cache give them,
    within what the fp8 cache alone moves them. On this calmer model (weights of std 0.05) the fp8
    cache moves them by mean 0.02 / max 0.08 nats with fp8 weights or float32 ones alike."""
    folder = str(tmp_path)
    save_block_fp8(hf_model("llama", initializer_range=0.05), folder)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    engine = dict(ENGINE, max_num_batched_tokens=8)
    with LLM(folder, kv_cache_dtype="fp8", **engine) as llm:
        assert all(k.dtype == FP8 for k, _ in llm.engine.core.executor.driver_worker.runner.kv_caches)
        generated, fp8 = _logprobs(llm.generate([PROMPT], params, use_tqdm=False)[0], PROMPT)
    tokens = PROMPT + generated
    with LLM(folder, **engine) as llm:
        out = llm.generate([tokens], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
    ref = torch.tensor([out.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens))])
    diff = (fp8 - ref).abs()
    assert 1e-3 < diff.mean() < 0.1 and diff.max() < 0.5, diff
