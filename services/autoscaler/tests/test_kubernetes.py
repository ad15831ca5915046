"""Kubernetes actuation at the official client's boundary: the same decision code as the local
pool, a real simulated engine's metrics, and a loopback API server that records scale PATCHes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from llmd.autoscaler.app import AutoscalerApp, AutoscalerConfig
from llmd.autoscaler.controller import Autoscaler
from llmd.autoscaler.kube import KubeVariants
from llmd.autoscaler.variants import parse_variants
from llmd.dev.fakekube import FakeKube, pod
from llmd.dev.sim_engines import SimFleetProcess
from llmd.runtime.cluster import KubernetesCluster, KubernetesPool, PoolStatus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("k8s-autoscale")
    fleet = SimFleetProcess.start(
        count=1, block_size=16, profile="h100-8b", work=work,
        extra_args=["--max-num-seqs", "1"],
    )  # fmt: skip
    yield fleet.engines[0].url
    fleet.stop()


@pytest.fixture
def kube(engine: str) -> Iterator[FakeKube]:
    fake = FakeKube().start()
    fake.replicas = {"llama-h100": 1, "llama-l40s": 0}
    port = urlsplit(engine).port
    assert port is not None
    p = pod("llama-h100-0", "127.0.0.1", labels={"llm-d.ai/variant": "llama-h100"})
    fake.apply("ADDED", p)
    fake.port = port  # type: ignore[attr-defined]
    yield fake
    fake.stop()


async def busy(url: str) -> list[asyncio.Task[httpx.Response]]:
    """One long request, running on the engine when this returns."""
    tasks = await saturate(url, 1)
    async with httpx.AsyncClient(timeout=5) as c:
        for _ in range(100):
            if (
                'vllm:num_requests_running{engine="0",model_name="tiny"} 1.0'
                in (await c.get(url + "/metrics")).text
            ):
                break
            await asyncio.sleep(0.05)
    return tasks


def variants() -> list[dict[str, object]]:
    return [
        {
            "apiVersion": "llmd.ai/v1alpha1",
            "kind": "VariantAutoscaling",
            "metadata": {
                "name": name,
                "namespace": "llm",
                "labels": {"inference.optimization/acceleratorName": acc},
            },
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": name},
                "modelID": "tiny",
                "variantCost": cost,
                "minReplicas": lo,
                "maxReplicas": 4,
            },
        }
        for name, acc, cost, lo in (("llama-h100", "H100", "10", 1), ("llama-l40s", "L40S", "5", 0))
    ]


async def saturate(url: str, n: int) -> list[asyncio.Task[httpx.Response]]:
    """`n` long requests on an engine that runs one at a time: n-1 wait (once the requests
    of an earlier test are gone)."""
    c = httpx.AsyncClient(timeout=60)
    for _ in range(600):
        text = (await c.get(url + "/metrics")).text
        if 'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0' in text:
            break
        await asyncio.sleep(0.1)
    body = {"model": "tiny", "prompt": "hello " * 50, "max_tokens": 400}
    tasks = [asyncio.create_task(c.post(url + "/v1/completions", json=body)) for _ in range(n)]
    for _ in range(100):
        text = (await c.get(url + "/metrics")).text
        if "vllm:num_requests_waiting{" in text and f"}} {n - 1}.0" in text:
            break
        await asyncio.sleep(0.05)
    return tasks


async def test_saturation_patches_the_cheapest_deployment(kube: FakeKube, engine: str) -> None:
    api = client.ApiClient(client.Configuration(host=kube.url))
    port: int = kube.port  # type: ignore[attr-defined]
    pools = {
        v: KubernetesPool(v, "llm", f"llm-d.ai/variant={v}", port)
        for v in ("llama-h100", "llama-l40s")
    }
    cluster = KubernetesCluster(client.CoreV1Api(api), client.AppsV1Api(api), pools)
    registry = CollectorRegistry()
    scaler = Autoscaler(
        parse_variants(variants()), cluster, registry=registry, actuation="scale",
        controller_instance="test",
    )  # fmt: skip
    # idle: nothing to do, nothing patched, the gauge says what each variant has
    decisions = await scaler.step()
    assert {d.variant: d.applied for d in decisions} == {"llama-h100": 1, "llama-l40s": 0}
    assert kube.patches == []
    tasks = await saturate(engine, 7)  # 6 waiting >= queueLengthThreshold 5
    try:
        decisions = await scaler.step()
    finally:
        for t in tasks:
            t.cancel()
    by_name = {d.variant: d for d in decisions}
    up = by_name["llama-l40s"]
    assert up.analysis.saturated == 1
    assert "every replica saturated" in up.analysis.reason
    # the cheaper variant takes the new capacity; the expensive one stays at its minimum
    assert (up.current, up.applied, up.actuated) == (0, 2, True)
    assert by_name["llama-h100"].applied == 1
    assert kube.patches == [("llama-l40s", 2)]
    labels = {"variant_name": "llama-l40s", "namespace": "llm",
              "accelerator_type": "L40S", "controller_instance": "test"}  # fmt: skip
    assert registry.get_sample_value("wva_desired_replicas", labels) == 2
    up_labels = {"variant_name": "llama-l40s", "namespace": "llm",
                 "direction": "up", "reason": "saturation"}  # fmt: skip
    assert registry.get_sample_value("wva_replica_scaling_total", up_labels) == 1
    await scaler.stop()


async def test_metric_actuation_only_exports(kube: FakeKube, engine: str) -> None:
    api = client.ApiClient(client.Configuration(host=kube.url))
    port: int = kube.port  # type: ignore[attr-defined]
    pools = {
        v: KubernetesPool(v, "llm", f"llm-d.ai/variant={v}", port)
        for v in ("llama-h100", "llama-l40s")
    }
    cluster = KubernetesCluster(client.CoreV1Api(api), client.AppsV1Api(api), pools)
    registry = CollectorRegistry()
    scaler = Autoscaler(parse_variants(variants()), cluster, registry=registry, actuation="metric")
    tasks = await saturate(engine, 7)
    try:
        await scaler.step()
    finally:
        for t in tasks:
            t.cancel()
    assert kube.patches == []  # an HPA or KEDA reading wva_desired_replicas scales
    labels = {"variant_name": "llama-l40s", "namespace": "llm",
              "accelerator_type": "L40S", "controller_instance": ""}  # fmt: skip
    assert registry.get_sample_value("wva_desired_replicas", labels) == 2
    # a Deployment the API server does not know is an error the loop survives
    kube.replicas.pop("llama-l40s")
    await scaler.step()
    assert registry.get_sample_value("llmd_autoscaler_errors_total", {"stage": "cluster"}) == 1
    await scaler.stop()


async def test_variant_objects_are_followed_and_their_status_written(
    kube: FakeKube, engine: str
) -> None:
    objs = {f"llm/{o['metadata']['name']}": o for o in variants()}  # type: ignore[index]
    objs["llm/broken"] = {
        "apiVersion": "llmd.ai/v1alpha1",
        "kind": "VariantAutoscaling",
        "metadata": {"name": "broken", "namespace": "llm"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}},  # no modelID
    }
    kube.custom["variantautoscalings"] = objs
    api = client.ApiClient(client.Configuration(host=kube.url))
    cluster = KubernetesCluster(client.CoreV1Api(api), client.AppsV1Api(api), {})
    config = AutoscalerConfig(
        cluster="kubernetes", variants_source="kubernetes", actuation="scale",
        engine_port=kube.port,  # type: ignore[attr-defined]
    )  # fmt: skip
    app = AutoscalerApp(config, [], cluster, KubeVariants(client.CustomObjectsApi(api), "llm"))
    await app.refresh_variants()
    assert sorted(v.name for v in app.variants) == ["llama-h100", "llama-l40s"]
    assert app._problems == ("llm/broken.spec.modelID: required, a non-empty string",)
    tasks = await saturate(engine, 7)
    try:
        await app.autoscaler.step()
    finally:
        for t in tasks:
            t.cancel()
    assert kube.patches == [("llama-l40s", 2)]
    status = kube.custom["variantautoscalings"]["llm/llama-l40s"]["status"]
    assert status["currentAlloc"] == {"numReplicas": 0, "accelerator": "L40S"}
    assert status["desiredOptimizedAlloc"]["numReplicas"] == 2
    assert status["actuation"] == {"applied": True}
    written = len(kube.status_patches)
    assert written == 2  # both variants, once each
    # an object deleted in the cluster is no longer scaled
    del kube.custom["variantautoscalings"]["llm/llama-l40s"]
    await app.refresh_variants()
    assert [v.name for v in app.autoscaler.variants] == ["llama-h100"]
    await app.autoscaler.stop()


async def test_scale_down_drains_the_newest_pod_before_the_patch(
    kube: FakeKube, engine: str
) -> None:
    port: int = kube.port  # type: ignore[attr-defined]
    kube.pods.clear()
    kube.replicas = {"vllm": 3}
    for i in range(3):
        kube.apply("ADDED", pod(f"vllm-{i}", "127.0.0.1", created=f"2026-01-01T0{i}:00:00Z"))
    api = client.ApiClient(client.Configuration(host=kube.url))
    cluster = KubernetesCluster(
        client.CoreV1Api(api), client.AppsV1Api(api),
        {"decode": KubernetesPool("vllm", "llm", "app=vllm", port)},
        drain_timeout_s=30, drain_poll_s=0.1,
    )  # fmt: skip
    tasks = await busy(engine)  # one long request running
    try:
        await cluster.scale("decode", 2)
        notes = kube.pods["vllm-2"]["metadata"]["annotations"]
        assert notes == {"llmd.ai/draining": "true",
                         "controller.kubernetes.io/pod-deletion-cost": "-1000"}  # fmt: skip
        assert "annotations" not in kube.pods["vllm-1"]["metadata"]
        eps = {e.name: e.ready for e in await cluster.endpoints("decode")}
        assert eps == {"vllm-0": True, "vllm-1": True, "vllm-2": False}  # no new requests
        assert await cluster.status("decode") == PoolStatus(desired=2, ready=2)
        await asyncio.sleep(0.5)
        assert kube.patches == []  # in flight: not yet
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for _ in range(100):
            if kube.patches:
                break
            await asyncio.sleep(0.1)
        assert kube.patches == [("vllm", 2)]
        # a drain cancelled by a scale-up takes its annotations back
        tasks = await busy(engine)
        await cluster.scale("decode", 1)
        drained = [n for n, p in kube.pods.items() if p["metadata"].get("annotations")]
        assert len(drained) == 1
        await cluster.scale("decode", 3)
        assert not kube.pods[drained[0]]["metadata"].get("annotations")
        assert kube.patches == [("vllm", 2), ("vllm", 3)]
    finally:
        for t in tasks:
            t.cancel()
        await cluster.aclose()
