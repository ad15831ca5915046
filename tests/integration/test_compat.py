"""llm-d compatibility on real processes: engines read through SGLang's metric names, an
engine of an unknown kind refused instead of read as zeros, llm-d's headers, and the metric
families llm-d's Grafana dashboards query, scraped from a running llmd-scheduler.

Engines are llmd-sim fleets serving /metrics under SGLang's names (`--metrics-dialect
sglang`); the scheduler is told `defaultEngine: sglang` the way llm-d's chart does it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.sim.tokenizer import default_tokenizer_dir

pytestmark = pytest.mark.integration

DASHBOARDS = (
    Path(__file__).parents[2]
    / "services"
    / "scheduler"
    / "tests"
    / "compat"
    / "llm-d"
    / "dashboards.yaml"
)

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: metrics-data-source
  parameters: {{scheme: http, path: /metrics}}
- type: core-metrics-extractor
  parameters: {{defaultEngine: sglang}}
- type: approx-prefix-cache-producer
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{tokenizer}"}}
    indexerConfig: {{kvBlockIndexConfig: {{enableMetrics: true}}}}
- type: queue-scorer
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: session-affinity-scorer
  parameters: {{strategy: encoded_endpoint_header}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 5}}
  - {{pluginRef: prefix-cache-scorer, weight: 1}}
  - {{pluginRef: session-affinity-scorer, weight: 20}}
"""
OBJECTIVES = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: premium}
spec: {priority: 10}
"""


class Stack:
    def __init__(self, fleet: SimFleetProcess, gateway: Gateway, mystery: str) -> None:
        self.fleet, self.gateway, self.mystery = fleet, gateway, mystery

    @property
    def url(self) -> str:
        return self.gateway.url

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.gateway.scheduler.get_json("/debug/plugins/state")
        return state

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {e["address"]: e for e in self.state()["endpoints"]}

    def picked(self, request_id: str) -> str:
        """The address of the endpoint the scheduler picked for a request."""
        found = self.gateway.scheduler.get_json(f"/debug/decisions?request_id={request_id}")
        assert found, request_id
        name = found[-1]["profiles"]["default"]["picked"][0]
        return next(k for k, e in self.endpoints().items() if e["name"] == name)


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compat")
    fleet = SimFleetProcess.start(
        count=3,
        block_size=16,
        profile="h100-8b",
        work=work,
        extra_args=["--metrics-dialect", "sglang", "--max-num-seqs", "2"],
    )
    # the third engine claims an engine kind nobody mapped
    doc = yaml.safe_load(fleet.endpoints_file.read_text())
    last = doc["endpoints"][-1]
    last.setdefault("labels", {})["llm-d.ai/engine-type"] = "mystery-engine"
    mystery = f"{last['address']}:{last['port']}"
    endpoints = work / "endpoints-labelled.yaml"
    endpoints.write_text(yaml.safe_dump(doc))
    config = work / "epp.yaml"
    config.write_text(CONFIG.format(tokenizer=default_tokenizer_dir()))
    objectives = work / "objectives.yaml"
    objectives.write_text(OBJECTIVES)
    try:
        gateway = Gateway.start(
            endpoints,
            work / "gateway",
            config_file=config,
            scheduler_args=[
                "--allow-experimental-plugins",
                "--inference-objectives-file",
                str(objectives),
            ],
            scheduler_api=request.param,
        )
    except Exception:
        fleet.stop()
        raise
    s = Stack(fleet, gateway, mystery)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        eps = s.endpoints()
        if all(e["metrics_age_s"] is not None for k, e in eps.items() if k != mystery):
            break
        time.sleep(0.2)
    yield s
    gateway.stop()
    fleet.stop()


def complete(stack: Stack, prompt: str, **headers: str) -> tuple[httpx.Response, str]:
    rid = str(uuid.uuid4())
    r = httpx.post(
        stack.url + "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 4},
        headers={"x-request-id": rid, **headers},
        timeout=60,
    )
    return r, rid


def test_sglang_metric_names_are_read(stack: Stack) -> None:
    eps = stack.endpoints()
    good = [e for k, e in eps.items() if k != stack.mystery]
    assert len(good) == 2
    for e in good:
        assert e["last_error"] is None, e
        assert e["waiting"] is not None, e
        assert e["running"] is not None, e
        assert e["kv_cache_usage"] is not None, e
        assert e["block_size"] == 16, e  # from sglang:cache_config_info's page_size
        assert (e["num_gpu_blocks"] or 0) > 0, e


def test_an_unmapped_engine_is_an_error_not_zeros(stack: Stack) -> None:
    e = stack.endpoints()[stack.mystery]
    assert e["metrics_age_s"] is None, e  # never read
    assert "mystery-engine" in (e["last_error"] or ""), e
    assert "no metric mapping" in (e["last_error"] or ""), e
    metrics = httpx.get(stack.gateway.scheduler.url + "/metrics").text
    assert 'llm_d_epp_datalayer_extract_errors_total{extractor_type="core-metrics-extractor"' in (
        metrics
    )
    # while the others are fresh, it is never a candidate
    for i in range(6):
        r, rid = complete(stack, f"{uuid.uuid4()} never the mystery engine {i}")
        assert r.status_code == 200, r.text
        assert stack.picked(rid) != stack.mystery


async def test_routing_follows_the_sglang_queue(stack: Stack) -> None:
    good = sorted(k for k in stack.endpoints() if k != stack.mystery)
    busy, idle = good
    busy_url = "http://" + busy

    async with httpx.AsyncClient(timeout=120) as client:

        async def slow(i: int) -> int:
            r = await client.post(
                busy_url + "/v1/completions",
                json={"model": "tiny", "prompt": f"{uuid.uuid4()} load {i}", "max_tokens": 400},
            )
            return r.status_code

        flood = [asyncio.create_task(slow(i)) for i in range(10)]
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if (stack.endpoints()[busy]["waiting"] or 0) >= 4:
                    break
                await asyncio.sleep(0.1)
            assert (stack.endpoints()[busy]["waiting"] or 0) >= 4, stack.endpoints()[busy]
            picks = []
            for i in range(6):
                rid = str(uuid.uuid4())
                r = await client.post(
                    stack.url + "/v1/completions",
                    json={"model": "tiny", "prompt": f"{uuid.uuid4()} route {i}", "max_tokens": 2},
                    headers={"x-request-id": rid},
                )
                assert r.status_code == 200, r.text
                picks.append(stack.picked(rid))
            assert picks == [idle] * 6, (busy, picks)
        finally:
            results = await asyncio.gather(*flood)
    assert all(code == 200 for code in results)


def test_session_token_pins_a_conversation(stack: Stack) -> None:
    r, rid = complete(stack, f"{uuid.uuid4()} first turn")
    assert r.status_code == 200, r.text
    token = r.headers.get("x-session-token")
    assert token, dict(r.headers)
    first = stack.picked(rid)
    for i in range(4):
        r, rid = complete(stack, f"{uuid.uuid4()} turn {i}", **{"x-session-token": token})
        assert r.status_code == 200
        assert stack.picked(rid) == first
        assert r.headers.get("x-session-token") == token


def test_fairness_and_objective_headers_label_the_request_metrics(stack: Stack) -> None:
    r, _ = complete(
        stack,
        f"{uuid.uuid4()} tenant a",
        **{"x-llm-d-inference-fairness-id": "tenant-a", "x-gateway-inference-objective": "premium"},
    )
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(stack.gateway.scheduler.url + "/metrics").text
        if 'fairness_id="tenant-a"' in text and "llm_d_epp_request_duration_seconds_count" in text:
            break
        time.sleep(0.2)
    lines = [ln for ln in text.splitlines() if ln.startswith("llm_d_epp_request_total{")]
    assert any('fairness_id="tenant-a"' in ln and 'priority="10"' in ln for ln in lines), lines
    assert any('fairness_id=""' in ln and 'priority="0"' in ln for ln in lines), lines


def _family(name: str, kind: str) -> str:
    """The family name prometheus_client's parser reports for a name as queried."""
    if kind == "counter":
        return name.removesuffix("_total")
    return name


def test_the_llm_d_dashboards_queries_find_their_metrics(stack: Stack) -> None:
    for i in range(3):  # something in every request family
        r, _ = complete(stack, f"shared system prompt for the dashboard check {i}")
        assert r.status_code == 200
    time.sleep(1.0)  # the lean path reports usage through the access log
    text = httpx.get(stack.gateway.scheduler.url + "/metrics").text
    exported = {f.name: f.type for f in text_string_to_metric_families(text)}
    doc = yaml.safe_load(DASHBOARDS.read_text())
    checked, wrong = 0, []
    for board in doc["dashboards"]:
        for name, kind in board["has"].items():
            got = exported.get(_family(name, kind))
            checked += 1
            if got != kind:
                wrong.append(f"{board['title']}: {name} is {got or 'absent'}, wanted {kind}")
    assert not wrong, "\n".join(wrong)
    assert checked > 50
