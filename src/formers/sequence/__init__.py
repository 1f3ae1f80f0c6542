"""Small sequence models trained on local text (the FuseGPT demo's causal GPT and its corpus)."""
from .gpt import GPT, CausalBlock
from .text import ByteCorpus, random_windows, stdlib_corpus

__all__ = ["GPT", "CausalBlock", "ByteCorpus", "random_windows", "stdlib_corpus"]
