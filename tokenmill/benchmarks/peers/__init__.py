"""Peer engines on the same CPU: vLLM's CPU build and llama.cpp, set up in their own environments
under a cache dir (`setup_vllm.sh`, `setup_llamacpp.sh`) and run beside tokenmill on the same
token ids by `run.py` (`tokenmill bench peers`, docs/perf-cpu.md)."""
