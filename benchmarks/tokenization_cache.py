"""Chat tokenization with and without the segment cache (`llmd.kvcache.tokenization`).

Precise prefix routing tokenizes every chat the way the engine will. Chats that share a system
prompt or a conversation history share the leading parts of their rendered text; the cache
keeps those parts' tokens. For each prompt size: 16 system prompts, then `--chats` chats that
each reuse one of them with a new user turn; the time to tokenize a chat whose system prompt
was seen before (cache warm), against encoding the rendered text whole, and a check that both
give the same tokens.

Usage: uv run python benchmarks/tokenization_cache.py [--chats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_throughput import write_report

from llmd.kvcache.tokenization import ChatMessageIn, ModelTokenizer
from llmd.sim.tokenizer import default_tokenizer_dir

ROOT = Path(__file__).resolve().parent.parent


def row(tok: ModelTokenizer, words: int, chats: int, rng: random.Random) -> dict[str, Any]:
    vocab = [f"w{i}" for i in range(3000)] + ["é", "日本", ".", ","]
    systems = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(16)]
    for s in systems:  # each system prompt seen once
        tok.encode_chat([ChatMessageIn("system", s), ChatMessageIn("user", "warm")])
    cached, whole, sizes = [], [], []
    for i in range(chats):
        msgs = [
            ChatMessageIn("system", systems[i % 16]),
            ChatMessageIn(
                "user", f"question {i}: " + " ".join(rng.choice(vocab) for _ in range(20))
            ),
        ]
        t0 = time.perf_counter()
        ids = tok.encode_chat(msgs)
        t1 = time.perf_counter()
        text = tok.render_chat(msgs)
        t2 = time.perf_counter()
        reference = tok.encode(text, add_special_tokens=False)
        t3 = time.perf_counter()
        if ids != reference:
            raise SystemExit(f"tokens differ for chat {i}: the cache is wrong")
        cached.append(t1 - t0)
        whole.append((t3 - t2) + (t2 - t1))  # render + encode whole, as without the cache
        sizes.append(len(ids))
    cached.sort()
    whole.sort()
    p99 = max(0, int(len(cached) * 0.99) - 1)
    return {
        "prompt_tokens": int(statistics.median(sizes)),
        "chats": chats,
        "cached_p50_ms": round(statistics.median(cached) * 1000, 3),
        "cached_p99_ms": round(cached[p99] * 1000, 3),
        "whole_p50_ms": round(statistics.median(whole) * 1000, 3),
        "whole_p99_ms": round(whole[p99] * 1000, 3),
        "identical_tokens": True,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chats", type=int, default=200, help="chats per prompt size (200)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/tokenization-cache.json"))
    args = p.parse_args()
    tok = ModelTokenizer(default_tokenizer_dir())
    rng = random.Random(0)
    rows = []
    for words in (700, 2800, 11000):  # ~1k, ~4k and ~16k tokens with this tokenizer
        r = row(tok, words, args.chats, rng)
        print(r, flush=True)
        rows.append(r)
    lines = [
        "| chat tokens | cached p50 / p99 | whole p50 / p99 | identical |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {r['cached_p50_ms']} / {r['cached_p99_ms']} ms | "
            f"{r['whole_p50_ms']} / {r['whole_p99_ms']} ms | yes |"
        )
    table = "\n".join(lines)
    print(table)
    write_report(
        args.out,
        "tokenization-cache",
        "uv run python benchmarks/tokenization_cache.py " + shlex.join(sys.argv[1:]),
        tokenizer=str(default_tokenizer_dir().name),
        results=rows,
        table=table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
