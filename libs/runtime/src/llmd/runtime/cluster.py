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

from llmd.protocol.metrics import parse_engine_snapshot
from llmd.runtime.discovery import DRAIN_ANNOTATION, Endpoint, pod_endpoint
from llmd.runtime.scrapeclient import ScrapeClient, ScrapeError
from llmd.runtime.tasks import cancel_tasks

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A pool's size: what was asked for and what can serve."""

    desired: int
    ready: int


class ClusterError(RuntimeError):
    """A pool that does not exist or a scaling request the cluster refused; `status` is the
    API server's HTTP status when it answered (404: no such object or resource type)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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


async def kube_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking official-client call in a thread; the API server's refusals and unreachable
    servers become ClusterError naming what was asked."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except ApiException as exc:
        raise ClusterError(f"{what}: {exc.status} {exc.reason}", exc.status) from None
    except HTTPError as exc:
        raise ClusterError(f"{what}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True, slots=True)
class KubernetesPool:
    """A pool backed by one Deployment whose pods carry `selector` labels."""

    deployment: str
    namespace: str
    selector: str
    port: int


class KubernetesCluster:
    """Cluster over the Kubernetes API (official client; blocking calls run in threads).

    Scaling down drains first (when `drain_timeout_s` > 0): the pods to remove are annotated
    `llmd.ai/draining: "true"` (discovery stops offering them to schedulers) and given the
    lowest `controller.kubernetes.io/pod-deletion-cost` (the ReplicaSet removes exactly them);
    the scale subresource is patched once their engines report nothing running or waiting, or
    after `drain_timeout_s`. Until then `status().desired` already reports the new size. A
    scale-up during a drain cancels it and takes the annotations back."""

    def __init__(
        self,
        core_api: Any,
        apps_api: Any,
        pools: dict[str, KubernetesPool],
        *,
        drain_timeout_s: float = 0.0,
        drain_poll_s: float = 0.5,
    ) -> None:
        self.core = core_api
        self.apps = apps_api
        self._pools = pools
        self.drain_timeout_s = drain_timeout_s
        self.drain_poll_s = drain_poll_s
        self._drains: dict[str, tuple[int, list[str], asyncio.Task[None]]] = {}

    def _pool(self, name: str) -> KubernetesPool:
        return lookup_pool(self._pools, name)

    def set_pools(self, pools: dict[str, KubernetesPool]) -> None:
        """Manage these pools from now on (when the objects that declare them change)."""
        self._pools = dict(pools)

    async def pools(self) -> list[str]:
        return sorted(self._pools)

    async def _pods(self, p: KubernetesPool) -> list[Any]:
        pods = await kube_call(
            f"listing pods {p.selector} in {p.namespace}",
            self.core.list_namespaced_pod,
            p.namespace,
            label_selector=p.selector,
        )
        return list(pods.items)

    async def endpoints(self, pool: str) -> list[Endpoint]:
        p = self._pool(pool)
        eps = (pod_endpoint(pod, p.port) for pod in await self._pods(p))
        return sorted((e for e in eps if e is not None), key=lambda e: e.name)

    async def _spec_replicas(self, p: KubernetesPool) -> int:
        scale = await kube_call(
            f"reading the scale of {p.namespace}/{p.deployment}",
            self.apps.read_namespaced_deployment_scale,
            p.deployment,
            p.namespace,
        )
        return int(scale.spec.replicas or 0)

    async def status(self, pool: str) -> PoolStatus:
        p = self._pool(pool)
        drain = self._drains.get(pool)
        desired = drain[0] if drain is not None else await self._spec_replicas(p)
        ready = sum(1 for e in await self.endpoints(pool) if e.ready)
        return PoolStatus(desired=desired, ready=ready)

    async def _patch_scale(self, p: KubernetesPool, replicas: int) -> None:
        await kube_call(
            f"scaling {p.namespace}/{p.deployment} to {replicas}",
            self.apps.patch_namespaced_deployment_scale,
            p.deployment,
            p.namespace,
            {"spec": {"replicas": replicas}},
        )

    async def _annotate(self, p: KubernetesPool, names: list[str], drain: bool) -> None:
        annotations = (
            {DRAIN_ANNOTATION: "true", DELETION_COST: "-1000"}
            if drain
            else {DRAIN_ANNOTATION: None, DELETION_COST: None}
        )
        for name in names:
            await kube_call(
                f"annotating pod {p.namespace}/{name}",
                self.core.patch_namespaced_pod,
                name,
                p.namespace,
                {"metadata": {"annotations": annotations}},
            )

    async def scale(self, pool: str, replicas: int) -> None:
        if replicas < 0:
            raise ClusterError(f"replicas must be >= 0, got {replicas}")
        p = self._pool(pool)
        drain = self._drains.pop(pool, None)
        if drain is not None:
            await cancel_tasks(drain[2])  # ended before the new target is patched
            await self._annotate(p, drain[1], drain=False)
        if self.drain_timeout_s <= 0:
            await self._patch_scale(p, replicas)
            return
        current = await self._spec_replicas(p)
        if replicas >= current:
            await self._patch_scale(p, replicas)
            return
        pods = [pod for pod in await self._pods(p) if pod.metadata.deletion_timestamp is None]

        def serving(pod: Any) -> bool:
            ep = pod_endpoint(pod, p.port)
            return ep is not None and ep.ready

        def age(pod: Any) -> float:
            created = pod.metadata.creation_timestamp
            return created.timestamp() if created is not None else 0.0

        # pods that serve nothing go first, then the newest (as the local pool does)
        ranked = sorted(pods, key=lambda pod: (serving(pod), -age(pod)))
        victims = ranked[: current - replicas]
        names = [pod.metadata.name for pod in victims]
        addresses = [
            (pod.status.pod_ip, p.port) for pod in victims if pod.status and pod.status.pod_ip
        ]
        await self._annotate(p, names, drain=True)
        task = asyncio.create_task(self._finish_drain(pool, p, replicas, addresses))
        self._drains[pool] = (replicas, names, task)

    async def _idle(self, address: tuple[str, int]) -> bool:
        client = ScrapeClient(address[0], address[1], timeout_s=2.0)
        try:
            snap = parse_engine_snapshot((await client.get("/metrics")).decode("utf-8", "replace"))
        except (ScrapeError, ValueError):
            return True  # an engine that does not answer serves nothing
        finally:
            await client.close()
        return not (snap.running or 0) and not (snap.waiting or 0)

    async def _finish_drain(
        self, pool: str, p: KubernetesPool, replicas: int, addresses: list[tuple[str, int]]
    ) -> None:
        deadline = asyncio.get_running_loop().time() + self.drain_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            idle = await asyncio.gather(*(self._idle(a) for a in addresses))
            if all(idle):
                break
            await asyncio.sleep(self.drain_poll_s)
        try:
            await self._patch_scale(p, replicas)
        finally:
            drain = self._drains.get(pool)
            if drain is not None and drain[0] == replicas:
                del self._drains[pool]

    async def aclose(self) -> None:
        tasks = [task for _, _, task in self._drains.values()]
        self._drains.clear()
        await cancel_tasks(*tasks)


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
