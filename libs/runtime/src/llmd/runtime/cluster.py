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

    def set_pools(self, pools: dict[str, KubernetesPool]) -> None:
        """Manage these pools from now on (when the objects that declare them change)."""
        self._pools = dict(pools)

    @staticmethod
    async def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A blocking client call in a thread; the API server's refusals and unreachable
        servers become ClusterError naming what was asked."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            raise ClusterError(f"{what}: {exc.status} {exc.reason}") from None
        except HTTPError as exc:
            raise ClusterError(f"{what}: {type(exc).__name__}: {exc}") from None

    async def pools(self) -> list[str]:
        return sorted(self._pools)

    async def endpoints(self, pool: str) -> list[Endpoint]:
        p = self._pool(pool)
        pods = await self._call(
            f"listing pods {p.selector} in {p.namespace}",
            self.core.list_namespaced_pod,
            p.namespace,
            label_selector=p.selector,
        )
        eps = (pod_endpoint(pod, p.port) for pod in pods.items)
        return sorted((e for e in eps if e is not None), key=lambda e: e.name)

    async def status(self, pool: str) -> PoolStatus:
        p = self._pool(pool)
        scale = await self._call(
            f"reading the scale of {p.namespace}/{p.deployment}",
            self.apps.read_namespaced_deployment_scale,
            p.deployment,
            p.namespace,
        )
        ready = sum(1 for e in await self.endpoints(pool) if e.ready)
        return PoolStatus(desired=int(scale.spec.replicas or 0), ready=ready)

    async def scale(self, pool: str, replicas: int) -> None:
        if replicas < 0:
            raise ClusterError(f"replicas must be >= 0, got {replicas}")
        p = self._pool(pool)
        await self._call(
            f"scaling {p.namespace}/{p.deployment} to {replicas}",
            self.apps.patch_namespaced_deployment_scale,
            p.deployment,
            p.namespace,
            {"spec": {"replicas": replicas}},
        )


class HttpCluster:
    """Cluster over the local stack's control API (`llmd-dev up`): `GET /pools`,
    `POST /pools/{pool}/scale`. This is how services in their own processes (the autoscaler,
    the activator) drive the local process pool; they never import `llmd-dev`."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def _pools_doc(self) -> dict[str, Any]:
        import aiohttp

        try:
            async with self._client().get(f"{self.url}/pools") as resp:
                if resp.status != 200:
                    raise ClusterError(f"{self.url}/pools answered {resp.status}")
                doc = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot read pools from {self.url}: {exc!r}") from None
        if not isinstance(doc, dict):
            raise ClusterError(f"{self.url}/pools did not answer a mapping")
        return doc

    async def _pool(self, pool: str) -> dict[str, Any]:
        doc = lookup_pool(await self._pools_doc(), pool)
        if not isinstance(doc, dict):
            raise ClusterError(f"{self.url}/pools: pool {pool!r} is not a mapping")
        return doc

    async def pools(self) -> list[str]:
        return sorted(await self._pools_doc())

    async def endpoints(self, pool: str) -> list[Endpoint]:
        out = []
        for r in (await self._pool(pool)).get("replicas", []):
            try:
                out.append(
                    Endpoint(
                        str(r["name"]),
                        str(r["address"]),
                        int(r["port"]),
                        labels={str(k): str(v) for k, v in dict(r.get("labels", {})).items()},
                        ready=bool(r["ready"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ClusterError(f"{self.url}/pools: bad replica {r!r}: {exc}") from None
        return out

    async def status(self, pool: str) -> PoolStatus:
        doc = await self._pool(pool)
        try:
            return PoolStatus(desired=int(doc["desired"]), ready=int(doc["ready"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ClusterError(f"{self.url}/pools: bad status for {pool!r}: {exc}") from None

    async def scale(self, pool: str, replicas: int) -> None:
        import aiohttp

        if replicas < 0:
            raise ClusterError(f"replicas must be >= 0, got {replicas}")
        url = f"{self.url}/pools/{pool}/scale"
        try:
            async with self._client().post(url, json={"replicas": replicas}) as resp:
                if resp.status != 202:
                    raise ClusterError(f"scaling {pool} to {replicas}: {await resp.text()}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach {url}: {exc!r}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
