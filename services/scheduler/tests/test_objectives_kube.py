"""InferenceObjectives followed in a cluster, through the official client against a loopback
API server: llm-d's group first, the older group when only it is installed, objectives of other
pools ignored, a bad object skipped, and the scheduler keeping the last good set."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

import llmd.scheduler.app as app_module
from llmd.dev.fakekube import FakeKube
from llmd.runtime.cluster import ClusterError
from llmd.scheduler.app import SchedulerApp, SchedulerConfig
from llmd.scheduler.objectives import PLURAL, KubeObjectives


def objective(
    name: str, priority: Any, pool: str | None = "chat", ns: str = "llm"
) -> dict[str, Any]:
    spec: dict[str, Any] = {"priority": priority}
    if pool is not None:
        spec["poolRef"] = {"name": pool}
    return {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube().start()
    fake.custom[PLURAL] = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o
        for o in (
            objective("premium", 10),
            objective("batch", -1, pool=None),  # no poolRef: applies to every pool
            objective("other-pool", 5, pool="code"),
            objective("broken", "high"),
            objective("elsewhere", 7, ns="other"),
        )
    }
    yield fake
    fake.stop()


def api(kube: FakeKube) -> Any:
    return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=kube.url)))


async def test_the_pools_objectives_are_read_and_a_bad_one_is_skipped(kube: FakeKube) -> None:
    objectives, problems = await KubeObjectives(api(kube), "llm", "chat").list()
    assert objectives == {"premium": 10, "batch": -1}
    assert len(problems) == 1
    assert "llm/broken" in problems[0]
    assert "32-bit integer" in problems[0]


async def test_the_older_api_group_is_used_when_only_it_is_installed(kube: FakeKube) -> None:
    kube.custom_groups[PLURAL] = "inference.networking.x-k8s.io"
    objectives, _ = await KubeObjectives(api(kube), "llm", "chat").list()
    assert objectives == {"premium": 10, "batch": -1}
    kube.custom_groups[PLURAL] = "example.com"  # neither group installed
    with pytest.raises(ClusterError, match="no InferenceObjective API installed") as exc:
        await KubeObjectives(api(kube), "llm", "chat").list()
    assert exc.value.status == 404


def test_the_scheduler_follows_them_and_keeps_the_last_good_set(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": kube.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(app_module, "OBJECTIVES_REFRESH_S", 0.1)
    pool = tmp_path / "pool.yaml"
    pool.write_text("endpoints: []\n")

    async def run() -> None:
        with socket.socket() as s1, socket.socket() as s2:
            for s in (s1, s2):
                s.bind(("127.0.0.1", 0))
            grpc_port, metrics = (s.getsockname()[1] for s in (s1, s2))
        cfg = SchedulerConfig(
            host="127.0.0.1", endpoints_file=str(pool), grpc_port=grpc_port, grpc_health_port=0,
            metrics_port=metrics, drain_timeout=0.5, pool_name="chat", pool_namespace="llm",
            inference_objectives_source="kubernetes",
        )  # fmt: skip
        app = SchedulerApp(cfg)
        await app.start()
        try:
            for _ in range(100):
                if app.director.objectives:
                    break
                await asyncio.sleep(0.05)
            assert dict(app.director.objectives) == {"premium": 10, "batch": -1}
            kube.custom[PLURAL]["llm/premium"]["spec"]["priority"] = 20
            for _ in range(100):
                if app.director.objectives.get("premium") == 20:
                    break
                await asyncio.sleep(0.05)
            assert app.director.objectives["premium"] == 20
            kube.custom_groups[PLURAL] = "example.com"  # the API goes away
            async with httpx.AsyncClient() as c:
                for _ in range(100):
                    text = (await c.get(f"http://127.0.0.1:{metrics}/metrics")).text
                    if "llmd_inference_objectives_errors_total 0.0" not in text:
                        break
                    await asyncio.sleep(0.05)
            assert "llmd_inference_objectives 2.0" in text
            assert "llmd_inference_objectives_errors_total 0.0" not in text
            assert app.director.objectives["premium"] == 20  # the last good set stays
        finally:
            await app.stop()

    asyncio.run(run())


def test_a_file_with_kubernetes_as_the_source_is_refused() -> None:
    with pytest.raises(ValueError, match="inference_objectives_file is for"):
        SchedulerConfig(
            inference_objectives_source="kubernetes", inference_objectives_file="objectives.yaml"
        )
