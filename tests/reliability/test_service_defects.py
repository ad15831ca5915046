"""Regression tests for defects found by probing the services from outside: each failed on the
code that had the defect and passes now."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from llmd.indexer.app import IndexerApp, IndexerConfig
from llmd.kvcache.valkey import ValkeyIndex
from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.breaker import CircuitBreaker
from llmd.runtime.discovery import Endpoint
from llmd.runtime.lifecycle import grpc_listen, listen_socket
from llmd.runtime.observability import LabelBudget, render_metrics
from llmd.scheduler.app import SchedulerApp, SchedulerConfig
from llmd.scheduler.core import build_core
from llmd.scheduler.framework import SchedulingError
from llmd.scheduler.plugins.precise import PreciseProducer
from llmd.sim.tokenizer import default_tokenizer_dir

pytestmark = pytest.mark.reliability


def test_a_huge_prompt_is_tokenized_off_the_event_loop() -> None:
    """Embedded precise routing used to tokenize a 1 MiB prompt on the event loop, freezing all
    routing and response passthrough for seconds."""
    config = f"""
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{default_tokenizer_dir()}"}}
    kvEventsConfig: {{discoverPods: false}}
- type: prefix-cache-scorer
"""
    core = build_core(config)
    producer = core.built.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PreciseProducer)
    assert producer.embedded_sync
    core.datastore.set_endpoints((Endpoint("pod-0", "127.0.0.1", 9000),))
    threads: list[str] = []
    original = producer.keymaker.local_tokens

    def recording(*args: object, **kwargs: object) -> list[int]:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    producer.keymaker.local_tokens = recording  # type: ignore[method-assign]

    async def route(prompt: str) -> None:
        req = core.director.new_request({}, "/v1/completions")
        req.body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()
        await core.director.prefetch(req)
        core.director.complete(core.director.schedule(req), "natural")

    asyncio.run(route("the system user " * 70_000))  # ~1 MiB
    asyncio.run(route("a short prompt"))
    main = threading.main_thread().name
    assert threads[0] != main  # the huge one in a worker thread
    assert threads[-1] == main  # short ones inline (well under a millisecond)


def test_client_chosen_model_names_cannot_grow_metrics() -> None:
    registry = CollectorRegistry()
    budget = LabelBudget("model_name", max_sets=3, max_length=16, registry=registry)
    assert budget("m1", "m1") == ("m1", "m1")
    assert budget("x" * 512 * 1024, "t") == ("other", "other")  # 512 KiB name: not a label
    for i in range(10):
        budget(f"m{i}", "t")
    seen = {budget(f"m{i}", "t") for i in range(10)}
    assert len(seen) <= 4  # three sets at most, then `other`
    assert (
        registry.get_sample_value("llmd_metric_label_overflow_total", {"budget": "model_name"}) >= 8
    )


def test_scheduler_metrics_stay_small_whatever_the_model_names() -> None:
    core = build_core()
    d = core.director
    d.datastore.set_endpoints((Endpoint("pod-0", "127.0.0.1", 9000),))
    now = d.datastore.clock()
    d.datastore.all()[0].note_scrape(now, EngineSnapshot(waiting=0, running=0), now)
    for i in range(50):
        req = d.new_request({}, "/v1/completions")
        req.body = json.dumps({"model": f"{i}-" + "n" * 2048, "prompt": "p"}).encode()
        d.complete(d.schedule(req), "natural")
    payload, _ = render_metrics(core.registry)
    assert b"nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn" not in payload


def test_deep_and_non_utf8_bodies_are_400_not_500() -> None:
    d = build_core().director
    d.datastore.set_endpoints((Endpoint("pod-0", "127.0.0.1", 9000),))
    for body in (b"\xff\xfe{", b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        req = d.new_request({}, "/v1/completions")
        req.body = body
        with pytest.raises(SchedulingError) as err:
            d.schedule(req)
        assert err.value.status == 400


def test_a_taken_port_is_a_clear_error() -> None:
    first = listen_socket("127.0.0.1", 0)
    port = first.getsockname()[1]

    async def grpc_on_taken_port() -> None:
        server = grpc.aio.server()
        with pytest.raises(OSError, match="cannot listen on"):
            grpc_listen(server, f"127.0.0.1:{port}")
        await server.stop(None)

    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen_socket("127.0.0.1", port)
        asyncio.run(grpc_on_taken_port())
    finally:
        first.close()


def test_debug_routes_are_off_by_default_and_guarded_when_on(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("endpoints: []\n")

    async def run() -> None:
        with socket.socket() as s1, socket.socket() as s2, socket.socket() as s3:
            for s in (s1, s2, s3):
                s.bind(("127.0.0.1", 0))
            grpc_port, metrics, debug = (s.getsockname()[1] for s in (s1, s2, s3))
        base = {"host": "127.0.0.1", "endpoints_file": str(pool), "grpc_port": grpc_port,
                    "grpc_health_port": 0, "metrics_port": metrics, "drain_timeout": 0.5}  # fmt: skip
        app = SchedulerApp(SchedulerConfig(**base))
        await app.start()
        try:
            async with httpx.AsyncClient() as c:
                assert (await c.get(f"http://127.0.0.1:{metrics}/metrics")).status_code == 200
                r = await c.get(f"http://127.0.0.1:{metrics}/debug/plugins/state")
                assert r.status_code == 404  # not on the metrics port
        finally:
            await app.stop()
        app = SchedulerApp(SchedulerConfig(**base, debug_port=debug, debug_token="s3cret"))
        await app.start()
        try:
            async with httpx.AsyncClient() as c:
                url = f"http://127.0.0.1:{debug}/debug/plugins/state"
                assert (await c.get(url)).status_code == 401
                ok = await c.get(url, headers={"authorization": "Bearer s3cret"})
                assert ok.status_code == 200
                big = await c.post(
                    f"http://127.0.0.1:{debug}/debug/explain",
                    content=b"x" * (2 * 1024 * 1024),
                    headers={"authorization": "Bearer s3cret"},
                )
                assert big.status_code == 413
        finally:
            await app.stop()

    asyncio.run(run())


def test_indexer_writes_are_on_their_own_guarded_port(tmp_path: Path) -> None:
    """Forged /v1/observe posts used to mark a real pod untrusted through the scoring port; the
    write routes now listen on their own port, loopback unless a token guards them."""
    with pytest.raises(ValidationError, match="need api_token"):
        IndexerConfig(write_host="0.0.0.0")
    IndexerConfig(write_host="0.0.0.0", api_token="t")  # a token makes it acceptable
    IndexerConfig(write_host="0.0.0.0", write_port=0)  # so does turning the routes off
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "endpoints:\n- {name: e0, address: 127.0.0.1, port: 1, labels: {}, ready: true}\n"
    )

    async def run() -> None:
        with socket.socket() as s1, socket.socket() as s2, socket.socket() as s3:
            for s in (s1, s2, s3):
                s.bind(("127.0.0.1", 0))
            http, grpc_port, writes = (s.getsockname()[1] for s in (s1, s2, s3))
        app = IndexerApp(
            IndexerConfig(host="127.0.0.1", http_port=http, grpc_port=grpc_port,
                          write_port=writes, api_token="s3cret", endpoints_file=str(pool))
        )  # fmt: skip
        await app.start()
        auth = {"authorization": "Bearer s3cret"}
        observe = {"pod": "127.0.0.1:1", "predicted_tokens": 0, "cached_tokens": 0,
                   "prompt_tokens": 16}  # fmt: skip
        try:
            async with httpx.AsyncClient() as c:
                for _ in range(50):
                    if app.known_pods():
                        break
                    await asyncio.sleep(0.05)
                main = f"http://127.0.0.1:{http}"
                write = f"http://127.0.0.1:{writes}"
                r = await c.post(main + "/v1/observe", json=observe, headers=auth)
                assert r.status_code == 404  # not on the scoring port
                r = await c.post(write + "/v1/observe", json=observe)
                assert r.status_code == 401
                r = await c.post(write + "/v1/observe", json=observe, headers=auth)
                assert r.status_code == 200, r.text
                forged = dict(observe, pod="10.9.9.9:8000")
                r = await c.post(write + "/v1/observe", json=forged, headers=auth)
                assert r.status_code == 404
                assert "10.9.9.9:8000" not in app.indexer.health_snapshot()
                r = await c.post(write + "/v1/speculate", json={"pod": "x", "keys": [1]})
                assert r.status_code == 401
        finally:
            await app.stop()

    asyncio.run(run())


def test_the_breaker_opens_doubles_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(base_s=1.0, max_s=4.0, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert not b.allow()
    now[0] = 1.01
    assert b.allow()  # one try after the backoff
    b.failure()
    now[0] = 2.5
    assert not b.allow()  # two seconds this time
    now[0] = 3.02
    b.failure()
    now[0] = 6.9
    assert not b.allow()  # capped at four
    now[0] = 7.1
    assert b.allow()
    b.success()
    assert b.allow()
    assert b.skipped == 3


def test_a_hung_shared_index_costs_one_timeout_then_is_skipped() -> None:
    """A Valkey that accepts connections and never answers used to add its 5 s socket timeout
    to every decision."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    port = hung.getsockname()[1]
    config = f"""
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{default_tokenizer_dir()}"}}
    indexerConfig: {{kvBlockIndexConfig: {{valkeyConfig: {{address: "redis://127.0.0.1:{port}"}}}}}}
    kvEventsConfig: {{discoverPods: false}}
    lookupTimeout: 100ms
- type: prefix-cache-scorer
"""
    core = build_core(config)
    producer = core.built.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PreciseProducer)
    core.datastore.set_endpoints((Endpoint("pod-0", "127.0.0.1", 9000),))

    async def route(n: int) -> None:
        for i in range(n):
            req = core.director.new_request({}, "/v1/completions")
            prompt = f"p {i} " + "the system user " * 50  # several full blocks: real lookups
            req.body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode()
            await core.director.prefetch(req)
            decision = core.director.schedule(req)  # routed, without precise prefix data
            assert decision.endpoints
            core.director.complete(decision, "natural")
        assert producer.stack is not None
        if isinstance(producer.stack.index, ValkeyIndex):
            await producer.stack.index.close()

    try:
        asyncio.run(route(5))
    finally:
        hung.close()
    errors = {
        stage: core.registry.get_sample_value(
            "llmd_precise_prefix_errors_total",
            {"plugin_name": "precise-prefix-cache-producer", "stage": stage},
        )
        for stage in ("lookup", "lookup-skipped")
    }
    assert errors == {"lookup": 1.0, "lookup-skipped": 4.0}
