"""Endpoint discovery from a watched file and from a (loopback) Kubernetes API."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from llmd.dev.fakekube import FakeKube, pod
from llmd.runtime.cluster import ClusterError, KubernetesCluster, KubernetesPool, PoolStatus
from llmd.runtime.config import ConfigError
from llmd.runtime.discovery import (
    DiscoveryError,
    Endpoint,
    EndpointSet,
    EndpointSource,
    KubernetesPodDiscovery,
    StaticFileDiscovery,
    kube_api_client,
    parse_endpoints_document,
)


class Follower:
    """Consumes a source's watch() in a task, as a service does, into a queue."""

    def __init__(self, source: EndpointSource) -> None:
        self.queue: asyncio.Queue[EndpointSet] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(source))

    async def _run(self, source: EndpointSource) -> None:
        async for snapshot in source.watch():
            self.queue.put_nowait(snapshot)

    async def next(self, timeout: float = 10.0) -> EndpointSet:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # make the change visible even within one mtime tick
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_document_parsing_reports_the_bad_entry() -> None:
    eps = parse_endpoints_document(
        "endpoints:\n- {name: a, address: 10.0.0.1, port: '8000', labels: {role: decode}}\n"
        "- {address: '::1', port: 8001}\n"
    )
    assert eps[0] == Endpoint("a", "10.0.0.1", 8000, labels={"role": "decode"})
    assert eps[1].host_port == "[::1]:8001"
    for doc, message in [
        ("endpoints: [{address: x, port: nope}]", r"endpoints\[0\]\.port"),
        ("endpoints: [{port: 1}]", r"endpoints\[0\]\.address"),
        ("endpoints: [{address: a, port: 70000}]", "out of range"),
        (
            "endpoints: [{name: a, address: a, port: 1}, {name: a, address: b, port: 1}]",
            "duplicated",
        ),
        ("endpoints: {a: 1}", "'endpoints' list"),
        ("endpoints: [", "not valid YAML"),
    ]:
        with pytest.raises(DiscoveryError, match=message):
            parse_endpoints_document(doc)


async def test_static_file_changes_are_followed_and_bad_updates_keep_the_last_good_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "endpoints.yaml"
    write(path, "endpoints: [{name: a, address: 127.0.0.1, port: 9001}]")
    registry = CollectorRegistry()
    source = StaticFileDiscovery(path, poll_interval_s=0.02, registry=registry)
    it = Follower(source)
    assert [e.name for e in await it.next()] == ["a"]

    write(
        path,
        "endpoints: [{name: a, address: 127.0.0.1, port: 9001}, {name: b, address: 127.0.0.1, port: 9002}]",
    )
    assert [e.name for e in await it.next()] == ["a", "b"]

    write(path, "endpoints: [{name: c, address: 127.0.0.1, port: bad}]")
    with pytest.raises(TimeoutError):
        await it.next(timeout=0.3)
    assert source.last_error is not None
    assert "port" in source.last_error
    assert registry.get_sample_value("llmd_discovery_errors_total", {"source": "file"}) == 1.0

    path.unlink()
    with pytest.raises(TimeoutError):
        await it.next(timeout=0.3)
    assert source.last_error is not None
    assert "cannot read" in source.last_error

    write(path, "endpoints: [{name: c, address: 127.0.0.1, port: 9003}]")
    assert [e.name for e in await it.next()] == ["c"]
    await it.close()


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube().start()
    yield fake
    fake.stop()


def api_client(kube: FakeKube) -> client.ApiClient:
    config = client.Configuration(host=kube.url)
    return client.ApiClient(config)


@pytest.mark.integration
async def test_kubernetes_discovery_follows_pod_readiness(kube: FakeKube) -> None:
    kube.apply("ADDED", pod("vllm-0", "10.0.0.1"))
    kube.apply("ADDED", pod("vllm-1", "10.0.0.2", ready=False))
    registry = CollectorRegistry()
    source = KubernetesPodDiscovery(
        client.CoreV1Api(api_client(kube)),
        "llm",
        "app=vllm",
        8000,
        watch_timeout_s=2,
        registry=registry,
    )
    it = Follower(source)
    first = await it.next()
    assert [(e.name, e.host_port) for e in first] == [("vllm-0", "10.0.0.1:8000")]

    kube.apply("MODIFIED", pod("vllm-1", "10.0.0.2", ready=True))
    assert [e.name for e in await it.next()] == ["vllm-0", "vllm-1"]

    kube.apply("MODIFIED", pod("vllm-0", "10.0.0.1", phase="Failed"))
    assert [e.name for e in await it.next()] == ["vllm-1"]

    kube.apply("DELETED", pod("vllm-1", "10.0.0.2"))
    assert await it.next() == ()
    await it.close()


@pytest.mark.integration
async def test_kubernetes_discovery_survives_an_unreachable_api() -> None:
    config = client.Configuration(host="http://127.0.0.1:9")  # nothing listens on port 9
    registry = CollectorRegistry()
    source = KubernetesPodDiscovery(
        client.CoreV1Api(client.ApiClient(config)),
        "llm",
        "app=vllm",
        8000,
        retry_s=0.05,
        registry=registry,
    )
    it = Follower(source)
    with pytest.raises(TimeoutError):
        await it.next(timeout=0.5)
    errors = registry.get_sample_value("llmd_kubernetes_discovery_errors_total")
    assert errors is not None
    assert errors >= 1
    await it.close()


@pytest.mark.integration
async def test_kubernetes_cluster_scales_and_reports_status(kube: FakeKube) -> None:
    kube.apply("ADDED", pod("vllm-0", "10.0.0.1"))
    kube.apply("ADDED", pod("vllm-1", "10.0.0.2", ready=False))
    api = api_client(kube)
    cluster = KubernetesCluster(
        client.CoreV1Api(api),
        client.AppsV1Api(api),
        {"decode": KubernetesPool("vllm", "llm", "app=vllm", 8000)},
    )
    assert await cluster.pools() == ["decode"]
    assert await cluster.status("decode") == PoolStatus(desired=2, ready=1)
    await cluster.scale("decode", 5)
    assert kube.replicas["vllm"] == 5
    assert (await cluster.status("decode")).desired == 5
    assert [e.ready for e in await cluster.endpoints("decode")] == [True, False]
    with pytest.raises(ClusterError, match="unknown pool"):
        await cluster.status("prefill")
    with pytest.raises(ClusterError, match=">= 0"):
        await cluster.scale("decode", -1)


def test_missing_kubernetes_credentials_are_a_config_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a pod and without a kubeconfig, a service that needs the API server says so
    (and its entry point prints it and exits 2) instead of raising the client's exception."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no Kubernetes credentials"):
        kube_api_client()
