"""The chat tokenization cache: cut texts tokenize exactly as whole ones, and repeated leading
messages are not tokenized again."""

from __future__ import annotations

import random

from llmd.kvcache.tokenization import ChatMessageIn, ModelTokenizer
from llmd.sim.tokenizer import default_tokenizer_dir

WORDS = ["alpha", "beta", " gamma", "\n", "é", "日本", "the", "  ", "</s>", "<|user|>", "x1", "."]


def test_cached_chat_tokens_are_the_whole_texts_tokens() -> None:
    tok = ModelTokenizer(default_tokenizer_dir())
    assert tok.segments.cut_at  # the test tokenizer's specials pass the self-test
    rng = random.Random(7)
    system = "".join(rng.choice(WORDS) for _ in range(3000))
    for i in range(40):
        turns = [ChatMessageIn("system", system)]
        for j in range(rng.randrange(4)):
            role = "user" if j % 2 == 0 else "assistant"
            turns.append(ChatMessageIn(role, "".join(rng.choice(WORDS) for _ in range(30))))
        turns.append(ChatMessageIn("user", f"q{i} " + "".join(rng.choice(WORDS) for _ in range(9))))
        text = tok.render_chat(turns)
        assert tok.encode_chat(turns) == tok.encode(text, add_special_tokens=False)
    assert tok.segments.hits > 0  # the system prompt's part came from the cache


def test_the_cache_is_bounded_by_tokens() -> None:
    tok = ModelTokenizer(default_tokenizer_dir())
    tok.segments.max_tokens = 500
    for i in range(50):
        tok.encode_chat([ChatMessageIn("system", f"system {i} " * 40), ChatMessageIn("user", "hi")])
        assert tok.segments.cached_tokens <= 500
