"""The simulator's tokenizer: llmd.kvcache's engine-identical tokenizer, plus a default.

Without a model directory the simulator uses the deterministic tiny tokenizer that llmd's
real-vLLM tests use, generated once into the user cache.
"""

from __future__ import annotations

from pathlib import Path

from llmd.kvcache.tokenization import ChatMessageIn, ModelTokenizer, TokenizerError
from llmd.vllm_cpu import tiny_model_build
from llmd.vllm_cpu.install import cache_root
from llmd.vllm_cpu.tiny_model import build_cached, builder_digest

__all__ = ["ChatMessageIn", "SimTokenizer", "TokenizerError", "default_tokenizer_dir"]


def default_tokenizer_dir() -> Path:
    """The tiny tokenizer (the one the generated tiny model uses), built on first use."""
    target = cache_root() / "models" / f"tiny-tokenizer-{builder_digest()}"
    return build_cached(target, ("tokenizer.json",), tiny_model_build.build_tokenizer)


class SimTokenizer(ModelTokenizer):
    """A model directory's tokenizer and chat template, and what the simulator may generate."""

    def output_vocabulary(self) -> list[int]:
        """Ids the simulator may 'generate': every non-special token."""
        return [i for i in range(self.vocab_size) if i not in self.special_ids]
