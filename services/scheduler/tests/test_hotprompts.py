"""Hot prompt heads: what the parser takes as a chat's head, and the bounded decaying table."""

from __future__ import annotations

import pytest

from llmd.scheduler.framework import LLMRequest
from llmd.scheduler.hotprompts import HotPrompts
from llmd.scheduler.parsing import parse_openai

SYSTEM = "You are the support agent of a garden tool shop. " * 20  # ~1k chars


def chat(body: bytes) -> LLMRequest:
    req = LLMRequest("r", "/v1/chat/completions", {}, body)
    parse_openai(req, head=True)
    return req


def test_the_head_is_the_leading_system_and_developer_messages() -> None:
    req = chat(
        b'{"model": "m", "messages": ['
        b'{"role": "system", "content": "be brief"},'
        b'{"role": "developer", "content": [{"type": "text", "text": "use "},'
        b' {"type": "text", "text": "tools"}]},'
        b'{"role": "user", "content": "hi"},'
        b'{"role": "system", "content": "late system message: not the head"}]}'
    )
    assert req.head == (("system", "be brief"), ("developer", "use tools"))
    assert chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}').head == ()
    completion = LLMRequest("r", "/v1/completions", {}, b'{"model": "m", "prompt": "x"}')
    parse_openai(completion, head=True)
    assert completion.head == ()
    unwanted = LLMRequest(
        "r",
        "/v1/chat/completions",
        {},
        b'{"model": "m", "messages": '
        b'[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}',
    )
    parse_openai(unwanted)  # learning off: no head is built
    assert unwanted.head == ()


def test_heads_are_counted_decayed_and_ranked() -> None:
    now = [0.0]
    hot = HotPrompts(max_entries=8, half_life_s=10.0, min_chars=100, clock=lambda: now[0])
    a, b = (("system", SYSTEM),), (("system", SYSTEM + " Also sell seeds."),)
    for _ in range(4):
        hot.observe("m", a)
    hot.observe("m", b)
    hot.observe("m", (("system", "too short to warm"),))
    assert len(hot) == 2
    top = hot.top(5, min_requests=1)
    assert [t["requests"] for t in top] == [4, 1]
    assert top[0]["messages"] == [{"role": "system", "content": SYSTEM}]
    assert top[0]["model"] == "m"
    assert hot.top(5) == top[:1]  # seen once is not hot
    # 30 s (3 half-lives) later, b is used 2 more times: 2 + 1/8 beats 4/8
    now[0] = 30.0
    hot.observe("m", b)
    hot.observe("m", b)
    top = hot.top(5)
    assert [t["requests"] for t in top] == [3, 4]
    assert top[0]["score"] == pytest.approx(2.125)
    assert top[1]["score"] == pytest.approx(0.5)
    assert hot.top(5, model="other") == []


def test_the_table_is_bounded_in_entries_and_characters() -> None:
    now = [0.0]
    hot = HotPrompts(max_entries=3, max_chars=3000, min_chars=10, clock=lambda: now[0])
    heads = [(("system", f"{i} " + "x" * 990),) for i in range(5)]
    for _ in range(3):
        hot.observe("m", heads[0])  # the hot one survives every eviction
    for h in heads[1:]:
        now[0] += 1
        hot.observe("m", h)
    assert len(hot) == 3
    assert hot.evicted == 2
    assert hot.chars <= 3000
    kept = {t["messages"][0]["content"][:2] for t in hot.top(10, min_requests=1)}
    assert kept == {"0 ", "3 ", "4 "}
    hot.observe("m", (("system", "y" * 5000),))  # larger than the whole table: not kept
    assert len(hot) == 3
    with pytest.raises(ValueError, match="positive"):
        HotPrompts(max_entries=0)
