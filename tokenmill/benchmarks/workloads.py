"""Benchmark workloads: prompts (text or token ids) and per-prompt output lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Varied, realistic short prompts for the CPU benchmark on the embedded chat model.
TEXT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "What are the main differences between Python lists and tuples?",
    "Give me a recipe for a simple vegetable soup.",
    "Summarize the causes of the French Revolution in a few sentences.",
    "Describe the water cycle.",
    "Write a poem about autumn leaves falling in a quiet park.",
    "How do I reverse a linked list in C?",
    "What is the capital of Australia, and why was it chosen?",
    "List five tips for better sleep.",
    "Explain the theory of relativity in simple terms.",
    "Write an email asking my manager for a day off next Friday.",
    "What is photosynthesis?",
    "Compare cats and dogs as pets.",
    "Tell me a joke about computers.",
    "How does compound interest work? Give an example.",
    "Describe a sunset over the ocean.",
    "What are black holes made of?",
    "Write a function in JavaScript that checks whether a string is a palindrome.",
    "Why is the sky blue?",
    "Plan a three-day trip to Rome.",
    "What is machine learning?",
    "Give me ideas for a birthday party for a seven-year-old.",
    "Explain what a database index is.",
    "Write a limerick about a cat who loves cheese.",
    "How do vaccines train the immune system?",
    "What should I pack for a hiking trip in the mountains?",
    "Describe the rules of chess briefly.",
    "What are the benefits of learning a second language?",
    "Write a dialogue between a robot and a child meeting for the first time.",
    "How do airplanes stay in the air?",
    "Suggest a name for a coffee shop and explain it.",
]


@dataclass
class Workload:
    name: str
    prompts: list  # str or list[int]
    output_lens: list[int]
    temperature: float = 0.0
    ignore_eos: bool = True


def text_workload(num_prompts: int, output_len: int) -> Workload:
    prompts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(num_prompts)]
    return Workload("text", prompts, [output_len] * num_prompts)


def fixed_random_workload(num_prompts: int, input_len: int, output_len: int, vocab: int,
                          seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(min(vocab, 10000)) for _ in range(input_len)] for _ in range(num_prompts)]
    return Workload(f"random-{input_len}in-{output_len}out", prompts, [output_len] * num_prompts)


def nanovllm_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024) -> Workload:
    """nano-vllm's bench.py, call for call: prompts first, then output lengths, from seed 0."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))]
               for _ in range(num_seqs)]
    output_lens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    return Workload("nanovllm", prompts, output_lens, temperature=0.6, ignore_eos=True)
