"""llmd-indexer as a process: HTTP and gRPC scoring from real llmd-sim KV events, dynamic
subscriptions as the pool changes, clear errors, and a scheduler that scores through it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from llmd.dev.gateway import SchedulerProcess
from llmd.dev.sim_engines import SimFleetProcess
from llmd.indexer import proto
from llmd.protocol.metrics import EngineSnapshot
from llmd.protocol.openai import PromptTokensDetails, Usage
from llmd.runtime.discovery import StaticFileDiscovery
from llmd.scheduler.core import build_core
from llmd.scheduler.plugins.precise import PreciseProducer
from llmd.sim.tokenizer import default_tokenizer_dir
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration


@dataclass
class Indexer:
    process: subprocess.Popen[bytes]
    http: str
    grpc_target: str
    log: Path
    writes: str


@dataclass
class Setup:
    fleet: SimFleetProcess
    indexer: Indexer
    pool_file: Path
    work: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("indexer")
    fleet = SimFleetProcess.start(count=2, block_size=16, profile="h100-8b", work=work)
    pool_file = work / "pool.yaml"
    pool_file.write_text(Path(fleet.endpoints_file).read_text())
    http_port, grpc_port, write_port = free_port(), free_port(), free_port()
    log = work / "llmd-indexer.log"
    cmd = [
        sys.executable, "-m", "llmd.indexer.cli", "--endpoints-file", str(pool_file),
        "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--tokenizer-dir", str(default_tokenizer_dir()), "--write-port", str(write_port),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    ix = Indexer(
        proc,
        f"http://127.0.0.1:{http_port}",
        f"127.0.0.1:{grpc_port}",
        log,
        f"http://127.0.0.1:{write_port}",
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(ix.http + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    time.sleep(0.5)
    yield Setup(fleet, ix, pool_file, work)
    proc.terminate()
    proc.wait(timeout=15)
    fleet.stop()


def address(s: Setup, pod: str) -> str:
    url = next(e.url for e in s.fleet.engines if e.pod == pod)
    return url.removeprefix("http://")


def send(s: Setup, pod: str, prompt: str) -> None:
    url = next(e.url for e in s.fleet.engines if e.pod == pod)
    r = httpx.post(
        url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}
    )
    assert r.status_code == 200, r.text


def score(s: Setup, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(s.indexer.http + "/v1/score", json=body, timeout=10)


def blocks(s: Setup, prompt: str, pod: str) -> int:
    r = score(s, {"model": "tiny", "prompt": prompt})
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()["pods"].get(address(s, pod), {})
    return int(got.get("blocks", 0))


def wait_blocks(s: Setup, prompt: str, pod: str, cond: Any) -> int:
    deadline = time.monotonic() + 5
    n = blocks(s, prompt, pod)
    while not cond(n) and time.monotonic() < deadline:
        time.sleep(0.1)
        n = blocks(s, prompt, pod)
    return n


PROMPT = "indexer " + " ".join(f"tok{i}" for i in range(200))


def test_http_and_grpc_scores_follow_the_engines(setup: Setup) -> None:
    send(setup, "sim-0", PROMPT)
    n = wait_blocks(setup, PROMPT, "sim-0", lambda n: n > 0)
    assert n >= 10
    assert blocks(setup, PROMPT, "sim-1") == 0
    with grpc.insecure_channel(setup.indexer.grpc_target) as channel:
        call = channel.unary_unary(
            proto.METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=proto.GetPodScoresResponse.FromString,
        )
        resp = call(proto.GetPodScoresRequest(prompt=PROMPT, model_name="tiny"), timeout=10)
    top = resp.scores[0]
    assert top.pod == address(setup, "sim-0")
    assert (top.score, top.matched_blocks) == (float(n), n)
    pods = httpx.get(setup.indexer.http + "/v1/pods").json()
    assert {p["pod"] for p in pods["subscriptions"]} == {
        address(setup, "sim-0"),
        address(setup, "sim-1"),
    }


def test_bad_requests_get_clear_errors(setup: Setup) -> None:
    r = httpx.post(setup.indexer.http + "/v1/score", content=b"{nope", timeout=10)
    assert r.status_code == 400
    r = score(setup, {"prompt": "no model"})
    assert r.status_code == 400
    assert "'model' is required" in r.json()["error"]
    r = score(setup, {"keys": [1, 2], "tier_weights": {"storage": -1}})
    assert r.status_code == 400
    assert "'tier_weights'" in r.json()["error"]
    r = score(setup, {"keys": [1, 2], "tier_weights": {"storage": 0.5}})
    assert r.status_code == 200, r.text
    with grpc.insecure_channel(setup.indexer.grpc_target) as channel:
        call = channel.unary_unary(
            proto.METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=proto.GetPodScoresResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(proto.GetPodScoresRequest(prompt="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def remote_config(setup: Setup) -> str:
    """An EndpointPickerConfig whose precise producer scores through this indexer."""
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{default_tokenizer_dir()}"}}
    indexerUrl: "{setup.indexer.http}"
    indexerWriteUrl: "{setup.indexer.writes}"
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 1}}]
"""


def test_a_scheduler_scores_through_the_indexer(setup: Setup) -> None:
    config = setup.work / "remote.yaml"
    config.write_text(remote_config(setup))
    sched = SchedulerProcess.start(setup.pool_file, setup.work, config_file=config)
    try:
        send(setup, "sim-1", "remote " + PROMPT)
        wait_blocks(setup, "remote " + PROMPT, "sim-1", lambda n: n > 0)
        r = httpx.post(
            sched.debug_url + "/debug/explain",
            json={"body": {"model": "tiny", "prompt": "remote " + PROMPT}},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        doc = r.json()["profiles"]["default"]
        assert doc["picked"] == ["sim-1"]
        assert doc["scores"]["prefix-cache-scorer"]["per_endpoint"]["sim-1"] > 0.9
    finally:
        sched.stop()


async def test_remote_mode_sends_speculative_entries_and_observations(setup: Setup) -> None:
    """A scheduler core in remote-indexer mode keeps no index of its own: the pick becomes a
    speculative entry in the indexer, and the response's usage feeds the indexer's health."""
    core = build_core(remote_config(setup))
    producer = core.built.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PreciseProducer)
    assert producer.stack is None  # no local index, no subscriptions
    core.datastore.set_endpoints(StaticFileDiscovery(setup.pool_file).load())
    now = core.datastore.clock()
    for e in core.datastore.all():
        e.note_scrape(now, EngineSnapshot(waiting=0, running=0, block_size=16), now)
    prompt = "speculated " + PROMPT
    req = core.director.new_request({}, "/v1/completions")
    req.body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2}).encode()
    await core.director.prefetch(req)
    decision = core.director.schedule(req)
    pod = decision.endpoints[0].key
    try:
        name = next(e.pod for e in setup.fleet.engines if address(setup, e.pod) == pod)
        for _ in range(50):  # the speculative entry is posted in the background
            if await asyncio.to_thread(blocks, setup, prompt, name) > 0:
                break
            await asyncio.sleep(0.1)
        answer = await asyncio.to_thread(score, setup, {"model": "tiny", "prompt": prompt})
        hits = answer.json()["pods"]
        assert hits[pod]["blocks"] > 0  # routed, not computed yet: speculative
        usage = Usage(
            prompt_tokens=200,
            completion_tokens=2,
            total_tokens=202,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
        )
        core.director.complete(decision, "natural", usage)
        for _ in range(50):
            pods = await asyncio.to_thread(httpx.get, setup.indexer.http + "/v1/pods")
            health = pods.json()["health"]
            if health.get(pod, {}).get("samples", 0) >= 1:
                break
            await asyncio.sleep(0.1)
        assert health[pod]["samples"] >= 1
        assert producer.errors == 0
    finally:
        await core.stop()


def test_pods_leaving_the_pool_are_unsubscribed_and_cleared(setup: Setup) -> None:
    send(setup, "sim-1", "leaving " + PROMPT)
    assert wait_blocks(setup, "leaving " + PROMPT, "sim-1", lambda n: n > 0) > 0
    doc = yaml.safe_load(setup.pool_file.read_text())
    doc["endpoints"] = [e for e in doc["endpoints"] if e["name"] != "sim-1"]
    setup.pool_file.write_text(yaml.safe_dump(doc))
    assert wait_blocks(setup, "leaving " + PROMPT, "sim-1", lambda n: n == 0) == 0
    pods = httpx.get(setup.indexer.http + "/v1/pods").json()
    assert [p["pod"] for p in pods["subscriptions"]] == [address(setup, "sim-0")]
    metrics = httpx.get(setup.indexer.http + "/metrics").text
    assert 'kvcache_index_pod_clears_total{reason="pod left"} 1.0' in metrics
