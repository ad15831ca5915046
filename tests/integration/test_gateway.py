"""Envoy + llmd-scheduler + llmd-sim: routing behaviour and failure handling end to end."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import Stack, start_stack

pytestmark = pytest.mark.integration

PREFIX = "You are a meticulous assistant who answers with care and cites sources. " * 40


def decision(stack: Stack, request_id: str) -> dict:
    found = stack.gateway.scheduler.get_json(f"/debug/decisions?request_id={request_id}")
    assert found, f"no decision recorded for {request_id}"
    return found[-1]


def picked(stack: Stack, request_id: str) -> str:
    return decision(stack, request_id)["profiles"]["default"]["picked"][0]


def post(
    stack: Stack, body: dict, path: str = "/v1/completions", **headers: str
) -> tuple[httpx.Response, str]:
    rid = str(uuid.uuid4())
    r = httpx.post(
        stack.url + path, json=body, headers={"x-request-id": rid, **headers}, timeout=60
    )
    return r, rid


async def burst(stack: Stack, bodies: list[dict]) -> list[tuple[int, str]]:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(body: dict) -> tuple[int, str]:
            rid = str(uuid.uuid4())
            r = await client.post(
                stack.url + "/v1/completions", json=body, headers={"x-request-id": rid}
            )
            return r.status_code, rid

        return await asyncio.gather(*(one(b) for b in bodies))


def test_shared_prefix_lands_on_one_pod_and_hits_its_cache(stack: Stack) -> None:
    pods, cached = [], []
    for i in range(5):
        r, rid = post(
            stack, {"model": "tiny", "prompt": PREFIX + f" Question {i}?", "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        pods.append(picked(stack, rid))
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(set(pods)) == 1
    assert cached[0] == 0
    assert min(cached[1:]) > 500


async def test_hot_prefix_spreads_when_its_pod_is_overloaded(stack: Stack) -> None:
    prefix = "Overload me with a long shared system prompt please. " * 40
    results = await burst(
        stack, [{"model": "tiny", "prompt": prefix + str(i), "max_tokens": 200} for i in range(24)]
    )
    assert all(code == 200 for code, _ in results)
    pods = collections.Counter(picked(stack, rid) for _, rid in results)
    assert len(pods) >= 2, pods
    _top_pod, top = pods.most_common(1)[0]
    assert top >= 5, pods  # affinity still holds for the first requests


async def test_distinct_requests_are_balanced(stack: Stack) -> None:
    results = await burst(
        stack,
        [
            {"model": "tiny", "prompt": f"{uuid.uuid4()} tell me about {i}", "max_tokens": 100}
            for i in range(32)
        ],
    )
    assert all(code == 200 for code, _ in results)
    pods = collections.Counter(picked(stack, rid) for _, rid in results)
    assert len(pods) == 4, pods
    assert max(pods.values()) <= 12, pods


def test_streaming_passes_through_unchanged(stack: Stack) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rid = str(uuid.uuid4())
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=body,
        headers={"x-request-id": rid},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert len(chunks) == 1 + 6 + 1  # role chunk, one per token, usage chunk
    # TTFT comes from Envoy's access log, which may reach the scheduler after the client has
    # read the stream's end: wait for it.
    ttft = (
        'llm_d_epp_request_ttft_seconds_count{fairness_id="",model_name="tiny",priority="0",'
        'streaming="true",target_model_name="tiny"}'
    )
    deadline = time.monotonic() + 10
    while ttft not in (metrics := stack.gateway.scheduler.metrics_text()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ttft in metrics


def test_lora_requests_go_where_the_adapter_is_loaded(stack: Stack) -> None:
    r = httpx.post(
        stack.engine_url("sim-2") + "/v1/load_lora_adapter",
        json={"lora_name": "sql-lora", "lora_path": "/adapters/sql"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    time.sleep(2.5)  # the scheduler reads /v1/models every 2 s
    # Earlier tests' bursts must have drained: an endpoint over the overload filter's limit
    # would leave the candidates, and the adapter only lives on sim-2.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = stack.gateway.scheduler.get_json("/debug/plugins/state")
        if state["inflight"] == 0 and all(not e["waiting"] for e in state["endpoints"]):
            break
        time.sleep(0.2)
    pods = []
    for i in range(6):
        r, rid = post(stack, {"model": "sql-lora", "prompt": f"select {i}", "max_tokens": 2})
        assert r.status_code == 200, r.text
        pods.append(picked(stack, rid))
    assert pods == ["sim-2"] * 6
    explained = decision(stack, rid)["profiles"]["default"]["scores"]["lora-affinity-scorer"]
    assert explained["per_endpoint"]["sim-2"] == 1.0
    assert explained["per_endpoint"]["sim-0"] == 0.8


def test_bad_requests_get_clear_errors_and_are_counted(stack: Stack) -> None:
    r = httpx.post(stack.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    r, _ = post(stack, {"prompt": "no model"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "model not found in request body"
    r = httpx.post(
        stack.url + "/v1/completions",
        content=b'{"model":"tiny","prompt":"' + b"a" * 1_100_000 + b'"}',
        timeout=10,
    )
    assert r.status_code == 413
    r = httpx.post(stack.url + "/v1/no-such-api", json={"x": 1}, timeout=10)
    assert r.status_code == 404  # only inference paths are routed: Envoy answers
    assert r.json()["error"]["message"] == "this path is not served"
    r = httpx.get(stack.url + "/v1/models", timeout=10)  # bodiless: any endpoint
    assert r.status_code == 200
    metrics = stack.gateway.scheduler.metrics_text()
    assert 'llm_d_epp_request_error_total{error_code="400"' in metrics
    assert 'llm_d_epp_request_error_total{error_code="413"' in metrics
    ok, _ = post(stack, {"model": "tiny", "prompt": "still serving", "max_tokens": 1})
    assert ok.status_code == 200


def test_inflight_returns_to_zero_after_everything(stack: Stack) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = stack.gateway.scheduler.get_json("/debug/plugins/state")
        if state["inflight"] == 0:
            break
        time.sleep(0.2)
    assert state["inflight"] == 0
    assert all(e["inflight_requests"] == 0 for e in state["endpoints"])


def test_engines_are_scraped_for_the_metrics_the_scheduler_reads_only(stack: Stack) -> None:
    """Every simulated engine honours the name filter (as vLLM's /metrics/ mount does), so
    after its first check each is scraped for the scheduler's samples only; the LoRA and queue
    tests above route on what those filtered pages carried."""
    text = stack.gateway.scheduler.metrics_text()
    values = {
        name: float(value)
        for name, value in (
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith("llmd_engine_scrape_filte")
        )
    }
    engines = float(len(stack.fleet.engines))
    assert values["llmd_engine_scrape_filtered_targets"] == engines
    assert values['llmd_engine_scrape_filter_checks_total{outcome="filtered"}'] >= engines
    assert 'llmd_engine_scrape_filter_checks_total{outcome="whole_page"}' not in values


def test_empty_pool_is_503_with_dropped_reason(tmp_path: Path) -> None:
    from llmd.dev.gateway import Gateway

    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    gw = Gateway.start(endpoints, tmp_path / "gw")
    try:
        r = httpx.post(
            gw.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10
        )
        assert r.status_code == 503
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert "no ready endpoints" in r.json()["error"]["message"]
    finally:
        gw.stop()


def test_endpoint_dying_mid_stream(tmp_path: Path) -> None:
    """The client sees the stream end early, the accounting is released, the pool moves on."""
    s = start_stack(tmp_path, count=2)
    try:
        rid = str(uuid.uuid4())
        body = {"model": "tiny", "prompt": "a long story", "max_tokens": 400, "stream": True}
        got, done = 0, False
        try:
            with httpx.stream(
                "POST",
                s.url + "/v1/completions",
                json=body,
                headers={"x-request-id": rid},
                timeout=30,
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    done = done or line == "data: [DONE]"
                    if line.startswith("data: "):
                        got += 1
                        if got == 3:
                            victim = picked(s, rid)
                            httpx.post(
                                s.engine_url(victim) + "/sim/faults",
                                json={"crash": True},
                                timeout=5,
                            )
        except httpx.HTTPError:
            pass  # the connection may be reset instead of closed: either way the stream is cut
        assert not done
        assert got < 400
        assert got >= 3
        state = s.gateway.scheduler.get_json("/debug/plugins/state")
        assert state["inflight"] == 0
        time.sleep(1.5)  # the dead endpoint's metrics go stale and it leaves the candidates
        for i in range(4):
            r2, rid2 = post(s, {"model": "tiny", "prompt": f"after {i}", "max_tokens": 2})
            assert r2.status_code == 200
            assert picked(s, rid2) != victim
        metrics = s.gateway.scheduler.metrics_text()
        assert "llm_d_epp_stale_endpoints" in metrics
    finally:
        s.stop()


def test_fail_open_routes_around_a_dead_scheduler(tmp_path: Path) -> None:
    s = start_stack(tmp_path, count=2, config=None, fail_open=True)
    try:
        r, _ = post(s, {"model": "tiny", "prompt": "with scheduler", "max_tokens": 1})
        assert r.status_code == 200
        assert s.gateway.scheduler.stop() == 0  # graceful drain exits cleanly
        # Envoy may still hold the old HTTP/2 connection for a moment (a reset stream is a 500);
        # once it sees the scheduler gone, fail-open sends requests to the fallback cluster.
        statuses = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = httpx.post(
                s.url + "/v1/completions",
                json={"model": "tiny", "prompt": "without", "max_tokens": 1},
                timeout=30,
            )
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert statuses[-1] == 200, statuses
    finally:
        s.stop()
