"""vLLM command lines: --config YAML, --log-level after the subcommand, and the model flags that
either apply as in vLLM or are refused with one line (config/engine_args.py, config/model_flags.py, cli/main.py)."""

from __future__ import annotations

import json

import pytest

from tokenmill.config import EngineArgs
from tokenmill.entrypoints.cli.main import build_parser, expand_config_file, main


def parse(argv):
    parser = build_parser()
    return parser.parse_args(expand_config_file(parser, argv))


def test_log_level_after_the_subcommand():
    assert parse(["serve", "--log-level", "debug"]).log_level == "debug"
    assert parse(["--log-level", "info", "chat"]).log_level == "info"
    assert parse(["generate", "x"]).log_level == "WARNING"


def test_config_yaml_fills_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nmax_model_len: 1024\nmax-num-seqs: 8\nenable-prefix-caching: false\n"
                      "trust-remote-code: true\nallowed-origins: '[\"*\"]'\n")
    args = parse(["serve", "--config", str(config), "--port", "9002"])
    assert (args.port, args.max_model_len, args.max_num_seqs) == (9002, 1024, 8)
    assert args.enable_prefix_caching is False and args.trust_remote_code is True
    assert args.allowed_origins == '["*"]'


def test_config_yaml_unknown_option_is_an_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("no-such-flag: 1\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(config)])
    assert "has no option --no-such-flag" in capsys.readouterr().err


def test_revision_and_unsupported_quantization_are_refused_in_one_line(capsys):
    assert main(["generate", "x", "--revision", "v1.0"]) == 1
    assert "cannot check out a revision" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ValueError, match="quantization must be one of fp8, gguf \\(or unset\\), got 'awq'"):
        EngineArgs(quantization="awq").create_engine_config()
    with pytest.raises(ValueError, match="max_logprobs must be in"):
        EngineArgs(max_logprobs=50).create_engine_config()


def test_accepted_vllm_model_flags(tmp_path):
    """--quantization gguf keeps a .gguf file's blocks; --download-dir and --trust-remote-code
    change nothing (no downloads, no remote code), as vLLM behaves for a local model."""
    config = EngineArgs(quantization="gguf", download_dir=str(tmp_path), trust_remote_code=True,
                        max_logprobs=5).create_engine_config()
    assert config.model.max_logprobs == 5
    assert config.load_format == "gguf" and config.kernels.gguf_weight_type is not None


def test_chat_template_from_a_file_inline_or_refused(tmp_path):
    from tokenmill.engine.input_processor import InputProcessor
    from tokenmill.config.tokenizer import load_tokenizer
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    for value in (str(path), template):
        config = EngineArgs(chat_template=value).create_engine_config()
        processor = InputProcessor(load_tokenizer(config.model.source.tokenizer_path), config.model)
        assert processor.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        EngineArgs(chat_template="no-such-file.jinja").create_engine_config()


def test_max_logprobs_limits_requests():
    from tokenmill import SamplingParams
    from tokenmill.engine.input_processor import InputProcessor
    from tokenmill.config.tokenizer import load_tokenizer
    config = EngineArgs(max_logprobs=2).create_engine_config()
    processor = InputProcessor(load_tokenizer(config.model.source.tokenizer_path), config.model)
    processor.process("a", "hello", SamplingParams(logprobs=2, max_tokens=4))
    with pytest.raises(ValueError, match="logprobs=3 is more than this server's --max-logprobs 2"):
        processor.process("b", "hello", SamplingParams(logprobs=3, max_tokens=4))


def _tiny_llama(folder):
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 256}))
    return folder


def test_generation_config_defaults(tmp_path):
    """`auto` takes the model folder's generation_config.json sampling fields, `vllm` none, and a
    folder its own file; requests that set a field keep their value (LLM and the OpenAI routes)."""
    from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
    (tmp_path / "model").mkdir()
    folder = _tiny_llama(tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 33, "eos_token_id": 2}))
    auto = EngineArgs(model=str(folder), load_format="dummy").create_engine_config()
    assert auto.model.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 33}
    assert EngineArgs(model=str(folder), load_format="dummy",
                      generation_config="vllm").create_engine_config().model.sampling_defaults == {}
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert EngineArgs(generation_config=str(other)).create_engine_config().model.sampling_defaults == {
        "temperature": 0.0}
    with pytest.raises(ValueError, match="no generation_config.json"):
        EngineArgs(generation_config=str(tmp_path)).create_engine_config()

    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_p=0.5)
    params = body.to_sampling_params(default_max_tokens=None, logprobs=None,
                                     defaults=auto.model.sampling_defaults)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.5, 20, 33)

    from tokenmill import LLM
    with LLM(str(folder), load_format="dummy", max_num_seqs=2) as llm:
        default = llm.get_default_sampling_params()
        assert (default.temperature, default.top_k, default.max_tokens) == (0.6, 20, 33)


@pytest.mark.parametrize("command", [["bench", "throughput"], ["bench", "latency"], ["generate"], ["chat"],
                                     ["serve"]])
def test_every_option_is_documented_in_help(command):
    """`tokenmill ... --help` explains every option, not just lists it."""
    import argparse
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)]
    assert not undocumented, f"tokenmill {' '.join(command)}: no help for {undocumented}"


@pytest.mark.parametrize("argv,message", [
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--tool-call-parser", "nope"], "unknown tool call parser 'nope'"),
    (["--reasoning-parser", "nope"], "unknown reasoning parser"),
    (["--response-role", " "], "--response-role must not be empty"),
])
def test_serve_refuses_bad_parser_flags_before_starting(argv, message):
    from tokenmill.entrypoints.cli.serve_plan import CannotServe, plan_server
    with pytest.raises(CannotServe, match=message):
        plan_server(parse(["serve", *argv]))


def test_serve_accepts_the_vllm_reasoning_and_tool_flags():
    from tokenmill.entrypoints.cli.serve_plan import plan_server
    plan = plan_server(parse(["serve", "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                              "--reasoning-parser", "deepseek_r1", "--response-role", "bot"]))
    assert (plan.config.tool_call_parser, plan.config.reasoning_parser, plan.config.response_role) == (
        "hermes", "deepseek_r1", "bot")
