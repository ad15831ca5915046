"""The gateway's shapes on real Envoy, llmd-scheduler and llmd-sim: the lean path (request
body buffered once, responses never through the scheduler, usage and timings from Envoy's access
log), the same with Envoy asking through ext_authz's HTTP check instead of ext_proc (`authz`),
and llm-d's full-duplex path. All must serve the same bytes and record the same facts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

from .conftest import Stack, start_stack

pytestmark = pytest.mark.integration

PROMPT = "the lean path carries this prompt " * 8


@pytest.fixture(scope="module", params=["lean", "full", "authz"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    authz = request.param == "authz"
    s = start_stack(
        tmp_path_factory.mktemp(request.param), count=2, config=None,
        envoy={"response_path": "full" if request.param == "full" else "lean"},
        scheduler_api="ext_authz" if authz else "ext_proc",
    )  # fmt: skip
    yield s
    s.stop()


def metric(stack: Stack, prefix: str) -> float:
    total = 0.0
    for line in stack.gateway.scheduler.metrics_text().splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(stack: Stack, prefix: str, at_least: float, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    value = metric(stack, prefix)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        value = metric(stack, prefix)
    return value


def test_usage_and_time_to_first_byte_are_recorded(stack: Stack) -> None:
    inputs = metric(stack, "llm_d_epp_request_input_tokens_count")
    outputs = metric(stack, "llm_d_epp_request_output_tokens_sum")
    ttft = metric(stack, "llm_d_epp_request_ttft_seconds_count")
    r = httpx.post(stack.url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": PROMPT, "max_tokens": 5})  # fmt: skip
    assert r.status_code == 200
    body = {"model": "tiny", "prompt": PROMPT + "streamed", "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as s:
        assert s.status_code == 200
        text = s.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    assert wait_metric(stack, "llm_d_epp_request_input_tokens_count", inputs + 2) == inputs + 2
    assert metric(stack, "llm_d_epp_request_output_tokens_sum") == outputs + 5 + 7
    assert metric(stack, "llm_d_epp_request_ttft_seconds_count") == ttft + 2
    state = stack.gateway.scheduler.get_json("/debug/plugins/state")
    assert state["inflight"] == 0


def authz(stack: Stack) -> bool:
    return stack.gateway.envoy.settings.scheduler_api == "ext_authz"


def test_a_rewritten_model_name_is_given_back_in_the_response(stack: Stack) -> None:
    headers = {"x-llm-d-model-name-rewrite": "tiny"}
    body = {"model": "public-name", "prompt": PROMPT, "max_tokens": 3}
    r = httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=30)
    if authz(stack):  # ext_authz cannot rewrite the body: refused, never sent unrewritten
        assert r.status_code == 500, r.text
        assert "ext_authz" in r.json()["error"]["message"]
        assert stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0
        return
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "public-name"  # the engine answered for "tiny"
    with httpx.stream("POST", stack.url + "/v1/completions", headers=headers, timeout=30,
                      json={**body, "stream": True}) as s:  # fmt: skip
        events = [line for line in s.iter_lines() if line.startswith("data: {")]
    assert events
    assert {json.loads(e[6:])["model"] for e in events} == {"public-name"}


def test_a_client_that_leaves_mid_stream_is_released_and_counted(stack: Stack) -> None:
    before = metric(stack, 'llm_d_epp_request_error_total{error_code="client-disconnect"')
    body = {"model": "tiny", "prompt": PROMPT + "abandoned", "max_tokens": 300, "stream": True}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as s:
        for _ in s.iter_lines():
            break  # read one line, then hang up
    after = wait_metric(
        stack, 'llm_d_epp_request_error_total{error_code="client-disconnect"', before + 1
    )
    assert after == before + 1
    deadline = time.monotonic() + 5
    while stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0


def test_every_lean_request_got_its_report(stack: Stack) -> None:
    observed = metric(stack, 'llmd_gateway_feedback_total{outcome="observed"')
    early = metric(stack, 'llmd_gateway_feedback_total{outcome="early"')
    missing = metric(stack, 'llmd_gateway_feedback_total{outcome="missing"')
    if stack.gateway.envoy.settings.response_path == "full":
        assert observed + early == 0  # the full path reads responses itself
    else:  # the ext_authz run's rewrite is refused before routing
        assert observed + early >= (3 if authz(stack) else 5)
    assert missing == 0


def test_a_rejection_reaches_the_client_as_the_scheduler_wrote_it(stack: Stack) -> None:
    r = httpx.post(stack.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "BadRequestError"
    assert "JSON" in error["message"]  # the scheduler's own message, not re-wrapped by Envoy


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz"])
def test_a_body_over_the_gateway_limit_is_refused_with_json(
    tmp_path: Path, api: Literal["ext_proc", "ext_authz"]
) -> None:
    s = start_stack(tmp_path, count=1, config=None, envoy={"max_request_body_bytes": 200_000},
                    scheduler_api=api)  # fmt: skip
    try:
        big = {"model": "tiny", "prompt": "x" * 300_000, "max_tokens": 1}
        r = httpx.post(s.url + "/v1/completions", json=big, timeout=30)
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "PayloadTooLargeError"
        ok = httpx.post(s.url + "/v1/completions", timeout=30,
                        json={"model": "tiny", "prompt": "fine", "max_tokens": 1})  # fmt: skip
        assert ok.status_code == 200
    finally:
        s.stop()


LATENCY = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- type: latency-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: latency-scorer}]
"""


def test_streams_without_usage_still_train_the_latency_model(tmp_path: Path) -> None:
    """Clients that stream without `include_usage`: the lean path counts the stream's data
    events, so both the TTFT and the TPOT model learn from them; the TPOT learned is the
    engines' own."""
    stack = start_stack(tmp_path, count=1, config=LATENCY, envoy={"response_path": "lean"})
    try:
        sent = 0
        for k in range(6):
            chat = k % 2 == 1
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body: dict[str, object] = {"model": "tiny", "max_tokens": 12, "stream": True,
                                       "ignore_eos": True}  # fmt: skip
            if chat:
                body["messages"] = [{"role": "user", "content": f"{PROMPT} {k}"}]
            else:
                body["prompt"] = f"{PROMPT} {k}"
            with httpx.stream("POST", stack.url + path, json=body, timeout=30) as s:
                assert s.status_code == 200
                text = s.read().decode()
            assert '"usage"' not in text
            sent += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            producer = stack.gateway.scheduler.get_json("/debug/plugins/state")["plugins"][
                "predicted-latency-producer"
            ]
            if producer["samples"]["tpot"] >= sent:
                break
            time.sleep(0.1)
        assert producer["samples"] == {"ttft": sent, "tpot": sent}
        engine = httpx.get(stack.fleet.engines[0].url + "/metrics", timeout=5).text
        name = "vllm:request_time_per_output_token_seconds"
        seen = {
            ln.split("{")[0]: float(ln.rsplit(" ", 1)[1])
            for ln in engine.splitlines()
            if ln.startswith((f"{name}_sum", f"{name}_count"))
        }
        engine_tpot = seen[f"{name}_sum"] / seen[f"{name}_count"]
        learned = producer["tpot_weights"][0]  # the intercept: one request running alone
        assert learned == pytest.approx(engine_tpot, rel=0.5), (learned, engine_tpot)
    finally:
        stack.stop()


def test_requests_of_a_stopped_gateway_are_released_on_the_ext_authz_path(
    tmp_path: Path,
) -> None:
    """No stream spans an ext_authz request: when Envoy exits mid-response (dropping its
    buffered access-log entries), the scheduler notices that no gateway is attached and
    releases what that gateway had dispatched."""
    stack = start_stack(tmp_path, count=1, config=None, scheduler_api="ext_authz")
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2000, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")  # the response has started (still open)
            engine = stack.fleet.engines[0].url
            httpx.post(engine + "/sim/faults", json={"hang": True}, timeout=5).raise_for_status()
            assert stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 1
            stack.gateway.envoy.stop()
        deadline = time.monotonic() + 15
        while stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"] == 0
        assert metric(stack, 'llmd_gateway_feedback_total{outcome="orphaned"') == 1
    finally:
        stack.stop()
