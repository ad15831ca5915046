"""The Cluster interface: discovery, scaling and readiness of model-server pools.

Two implementations exist: `KubernetesCluster` here (Deployments' scale subresource and pods by
label selector, through the official client) and the local process pool of `llmd-dev`, which
really starts and stops engine processes. Autoscaling, scale-from-zero and failover logic are
written against this Protocol only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from llmd.runtime.discovery import Endpoint, pod_endpoint


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A pool's size: what was asked for and what can serve."""

    desired: int
    ready: int


class ClusterError(RuntimeError):
    """A pool that does not exist or a scaling request the cluster refused."""


PoolT = TypeVar("PoolT")


def lookup_pool(pools: Mapping[str, PoolT], name: str) -> PoolT:
    """The pool named `name`; ClusterError naming the known pools otherwise."""
    try:
        return pools[name]
    except KeyError:
        raise ClusterError(f"unknown pool {name!r}; known: {sorted(pools)}") from None


@runtime_checkable
class Cluster(Protocol):
    """What llmd needs from wherever model servers run."""

    async def pools(self) -> list[str]:
        """Names of the pools this cluster manages."""
        ...

    async def endpoints(self, pool: str) -> list[Endpoint]:
        """Every endpoint of the pool, ready or not (see `Endpoint.ready`)."""
        ...

    async def status(self, pool: str) -> PoolStatus: ...

    async def scale(self, pool: str, replicas: int) -> None:
        """Ask for `replicas` replicas; returns once the request is accepted."""
        ...


@dataclass(frozen=True, slots=True)
class KubernetesPool:
    """A pool backed by one Deployment whose pods carry `selector` labels."""

    deployment: str
    namespace: str
    selector: str
    port: int


class KubernetesCluster:
    """Cluster over the Kubernetes API (official client; blocking calls run in threads)."""

    def __init__(self, core_api: Any, apps_api: Any, pools: dict[str, KubernetesPool]) -> None:
        self.core = core_api
        self.apps = apps_api
        self._pools = pools

    def _pool(self, name: str) -> KubernetesPool:
        return lookup_pool(self._pools, name)

    async def pools(self) -> list[str]:
        return sorted(self._pools)

    async def endpoints(self, pool: str) -> list[Endpoint]:
        p = self._pool(pool)
        pods = await asyncio.to_thread(
            self.core.list_namespaced_pod, p.namespace, label_selector=p.selector
        )
        eps = (pod_endpoint(pod, p.port) for pod in pods.items)
        return sorted((e for e in eps if e is not None), key=lambda e: e.name)

    async def status(self, pool: str) -> PoolStatus:
        p = self._pool(pool)
        scale = await asyncio.to_thread(
            self.apps.read_namespaced_deployment_scale, p.deployment, p.namespace
        )
        ready = sum(1 for e in await self.endpoints(pool) if e.ready)
        return PoolStatus(desired=int(scale.spec.replicas or 0), ready=ready)

    async def scale(self, pool: str, replicas: int) -> None:
        if replicas < 0:
            raise ClusterError(f"replicas must be >= 0, got {replicas}")
        p = self._pool(pool)
        await asyncio.to_thread(
            self.apps.patch_namespaced_deployment_scale,
            p.deployment,
            p.namespace,
            {"spec": {"replicas": replicas}},
        )
