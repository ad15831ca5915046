"""End to end through Envoy and llmd-scheduler to two real vLLM 0.32 CPU servers.

Prefix-aware routing must turn shared prompt prefixes into prefix-cache hits that vLLM itself
reports (`usage.prompt_tokens_details.cached_tokens`), where round-robin over the same two
servers gets none: each group's two requests alternate servers under round-robin.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
import yaml

from llmd.dev.gateway import Gateway
from llmd.vllm_cpu.pytest_plugin import VllmFleet
from llmd.vllm_cpu.server import VllmServer

pytestmark = pytest.mark.vllm

WORDS = "the system user assistant answer question model token cache block".split()
GROUPS = 5


@pytest.fixture(scope="module")
def pair(vllm_fleet: VllmFleet) -> list[VllmServer]:
    return vllm_fleet.get("vllm-a", "vllm-b")


@pytest.fixture(scope="module")
def gateway(pair: list[VllmServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("gateway")
    endpoints = work / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": s.spec.pod, "address": "127.0.0.1", "port": str(s.port)} for s in pair
                ]
            }
        )
    )
    gw = Gateway.start(endpoints, work)
    yield gw
    gw.stop()


def prompts(tag: str) -> list[str]:
    """GROUPS groups x 2 requests, interleaved: g0r0 g1r0 ... g4r0 g0r1 ... g4r1."""
    rng = random.Random(tag)
    prefixes = [
        f"{tag} group {g}: " + " ".join(rng.choice(WORDS) for _ in range(160))
        for g in range(GROUPS)
    ]
    return [p + f" question {r}" for r in range(2) for p in prefixes]


def cached(url: str, prompt: str) -> int:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return int((r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_prefix_aware_routing_gets_hits_round_robin_does_not(
    pair: list[VllmServer], gateway: Gateway
) -> None:
    rr = [cached(pair[i % 2].url, p) for i, p in enumerate(prompts("round-robin"))]
    routed = [cached(gateway.url, p) for p in prompts("llmd")]
    assert sum(rr) == 0, rr
    second_round = routed[GROUPS:]
    assert all(c >= 256 for c in second_round), routed  # ~160 words, vLLM block 32: most blocks hit
    assert sum(routed[:GROUPS]) == 0
    state = gateway.scheduler.get_json("/debug/plugins/state")
    assert state["inflight"] == 0
    assert {e["name"] for e in state["endpoints"]} == {"vllm-a", "vllm-b"}
    assert all(
        e["metrics_age_s"] is not None and e["metrics_age_s"] < 2 for e in state["endpoints"]
    )
