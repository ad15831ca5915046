"""Endpoint discovery: model-server endpoints from a watched static file or from Kubernetes pods.

Both sources yield complete `EndpointSet` snapshots through `watch()`. A bad update never
empties the pool: the static source keeps the last good file (and counts the error), the
Kubernetes source keeps its last state while it reconnects.

Static file format (llm-d's file-discovery, YAML or JSON, at most 1 MiB):

    endpoints:
      - name: vllm-0
        address: 10.0.0.7
        port: "8000"          # string or int
        namespace: default    # optional
        labels: {llm-d.ai/role: decode}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from llmd.runtime.config import ConfigError, ConfigIssue, YamlSyntaxError, load_yaml

log = logging.getLogger(__name__)

MAX_DISCOVERY_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server endpoint."""

    name: str
    address: str
    port: int
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True

    @property
    def host_port(self) -> str:
        """`ip:port` (IPv6 in brackets), the form x-gateway-destination-endpoint carries."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def __hash__(self) -> int:
        return hash((self.name, self.address, self.port, self.namespace, self.ready))


EndpointSet = tuple[Endpoint, ...]


class DiscoveryError(ValueError):
    """A discovery source that cannot be read or parsed."""


class EndpointSource(Protocol):
    """Anything that yields endpoint snapshots as the pool changes."""

    def watch(self) -> AsyncIterator[EndpointSet]: ...


def _port(raw: object, where: str) -> int:
    try:
        port = int(str(raw))
    except ValueError:
        raise DiscoveryError(f"{where}.port: {raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise DiscoveryError(f"{where}.port: {port} is out of range")
    return port


def parse_endpoints_document(text: str, origin: str = "endpoints file") -> EndpointSet:
    """Parse the static discovery document; DiscoveryError names the bad entry and field."""
    try:
        doc = load_yaml(text)
    except YamlSyntaxError as exc:
        raise DiscoveryError(f"{origin} is {exc}") from None
    if doc is None:
        return ()
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints", []), list):
        raise DiscoveryError(f"{origin} must be a mapping with an 'endpoints' list")
    out: list[Endpoint] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("endpoints") or []):
        where = f"endpoints[{i}]"
        if not isinstance(raw, dict):
            raise DiscoveryError(f"{where} must be a mapping")
        address = raw.get("address")
        if not isinstance(address, str) or not address:
            raise DiscoveryError(f"{where}.address is required")
        port = _port(raw.get("port"), where)
        name = str(raw.get("name") or f"{address}:{port}")
        if name in seen:
            raise DiscoveryError(f"{where}.name {name!r} is duplicated")
        seen.add(name)
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict):
            raise DiscoveryError(f"{where}.labels must be a mapping")
        out.append(
            Endpoint(
                name=name,
                address=address,
                port=port,
                namespace=str(raw.get("namespace") or ""),
                labels={str(k): str(v) for k, v in labels.items()},
            )
        )
    return tuple(out)


class StaticFileDiscovery:
    """Endpoints from a file, re-read whenever its modification time or size changes."""

    def __init__(
        self,
        path: str | Path,
        poll_interval_s: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self.last_error: str | None = None
        self._errors = Counter(
            "llmd_discovery_errors",
            "Discovery updates rejected (the previous endpoint set stays in force)",
            ["source"],
            registry=registry,
        )

    def load(self) -> EndpointSet:
        """Read and parse the file once (DiscoveryError on failure)."""
        try:
            size = self.path.stat().st_size
            if size > MAX_DISCOVERY_FILE_BYTES:
                raise DiscoveryError(f"{self.path} is {size} bytes, over the 1 MiB limit")
            text = self.path.read_text()
        except OSError as exc:
            raise DiscoveryError(f"cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DiscoveryError(f"{self.path} is not UTF-8 text") from None
        return parse_endpoints_document(text, str(self.path))

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    async def watch(self) -> AsyncIterator[EndpointSet]:
        """Yield the endpoint set now and after every valid change to the file."""
        last_stamp: tuple[int, int] | None = (-1, -1)
        last: EndpointSet | None = None
        while True:
            stamp = self._stamp()
            if stamp != last_stamp:
                last_stamp = stamp
                try:
                    current = await asyncio.to_thread(self.load)
                except DiscoveryError as exc:
                    self._errors.labels("file").inc()
                    if str(exc) != self.last_error:
                        log.error("discovery update rejected, keeping previous endpoints: %s", exc)
                    self.last_error = str(exc)
                else:
                    self.last_error = None
                    if current != last:
                        last = current
                        yield current
            await asyncio.sleep(self.poll_interval_s)


# --- Kubernetes ----------------------------------------------------------------------------


DRAIN_ANNOTATION = "llmd.ai/draining"
"""A pod being drained before a scale-down: schedulers stop sending it new requests."""


def pod_endpoint(pod: Any, port: int) -> Endpoint | None:
    """The endpoint of a `V1Pod` (official client model), or None if it cannot serve.

    A pod serves when it is Running, has an IP, is not being deleted, is not being drained
    (annotation `llmd.ai/draining: "true"`, set before a scale-down) and its Ready condition
    is True.
    """
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or not status.pod_ip:
        return None
    ready = (
        status.phase == "Running"
        and meta.deletion_timestamp is None
        and (meta.annotations or {}).get(DRAIN_ANNOTATION) != "true"
        and any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
    )
    return Endpoint(
        name=meta.name,
        address=status.pod_ip,
        port=port,
        namespace=meta.namespace or "",
        labels=dict(meta.labels or {}),
        ready=ready,
    )


class _Latest:
    """A one-slot mailbox on the event loop: `put` replaces, `get` waits for a value."""

    def __init__(self) -> None:
        self._value: EndpointSet | None = None
        self._ready = asyncio.Event()

    def put(self, value: EndpointSet) -> None:
        self._value = value
        self._ready.set()

    async def get(self) -> EndpointSet:
        await self._ready.wait()
        self._ready.clear()
        assert self._value is not None
        return self._value


class KubernetesPodDiscovery:
    """Pods matching a label selector, kept current with list + watch (official client).

    The client is blocking, so list/watch run in a worker thread that hands the newest snapshot
    to the event loop through a single slot (older, unconsumed snapshots are superseded).
    Only ready pods are reported. Watch errors (expired resourceVersion, dropped connection)
    trigger a fresh list after `retry_s`; the last snapshot stays in force meanwhile.
    """

    def __init__(
        self,
        core_api: Any,
        namespace: str,
        label_selector: str,
        port: int,
        *,
        watch_timeout_s: int = 300,
        retry_s: float = 2.0,
        registry: CollectorRegistry | None = None,
        watch_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.api = core_api
        self.namespace = namespace
        self.selector = label_selector
        self.port = port
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._errors = Counter(
            "llmd_kubernetes_discovery_errors",
            "List/watch failures talking to the Kubernetes API",
            registry=registry,
        )
        if watch_factory is None:
            from kubernetes import watch as k8s_watch

            watch_factory = k8s_watch.Watch
        self._watch_factory = watch_factory

    def _list(self) -> tuple[dict[str, Endpoint], str]:
        pods = self.api.list_namespaced_pod(self.namespace, label_selector=self.selector)
        state: dict[str, Endpoint] = {}
        for pod in pods.items:
            ep = pod_endpoint(pod, self.port)
            if ep is not None:
                state[ep.name] = ep
        return state, pods.metadata.resource_version

    def _run(self, loop: asyncio.AbstractEventLoop, handoff: _Latest) -> None:
        def publish(state: dict[str, Endpoint]) -> None:
            snapshot = tuple(sorted((e for e in state.values() if e.ready), key=lambda e: e.name))
            loop.call_soon_threadsafe(handoff.put, snapshot)

        while not self._stop.is_set():
            try:
                state, version = self._list()
                publish(state)
                watcher = self._watch_factory()
                for event in watcher.stream(
                    self.api.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=version,
                    timeout_seconds=self.watch_timeout_s,
                ):
                    if self._stop.is_set():
                        watcher.stop()
                        return
                    kind, pod = event["type"], event["object"]
                    if kind == "ERROR":
                        raise RuntimeError(f"watch error: {pod}")
                    name = pod.metadata.name
                    ep = pod_endpoint(pod, self.port)
                    if kind == "DELETED" or ep is None:
                        changed = state.pop(name, None) is not None
                    else:
                        changed = state.get(name) != ep
                        state[name] = ep
                    if changed:
                        publish(state)
            except Exception as exc:
                self._errors.inc()
                log.warning("kubernetes pod discovery failed, relisting: %s", exc)
                self._stop.wait(self.retry_s)

    async def watch(self) -> AsyncIterator[EndpointSet]:
        handoff = _Latest()
        loop = asyncio.get_running_loop()
        self._stop.clear()
        thread = threading.Thread(target=self._run, args=(loop, handoff), daemon=True)
        thread.start()
        last: EndpointSet | None = None
        try:
            while True:
                snapshot = await handoff.get()
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        finally:
            self._stop.set()
            with contextlib.suppress(RuntimeError):
                await asyncio.to_thread(thread.join, 5.0)


def discovery_source(
    *,
    endpoints_file: str | Path | None,
    selector: str | None,
    namespace: str,
    target_port: int,
    registry: Any = None,
) -> StaticFileDiscovery | KubernetesPodDiscovery | None:
    """The source a service's flags ask for: a static file (watched), Kubernetes pods matching
    `selector` (in-cluster config, else the kubeconfig), or None when neither is given."""
    if endpoints_file:
        return StaticFileDiscovery(endpoints_file, poll_interval_s=1.0, registry=registry)
    if selector:
        from kubernetes import client

        return KubernetesPodDiscovery(
            client.CoreV1Api(kube_api_client()), namespace, selector, target_port, registry=registry
        )
    return None


def kube_api_client() -> Any:
    """The official client's ApiClient from the in-cluster config, else the kubeconfig (the
    one place llmd's services load Kubernetes credentials)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException as in_pod:
        try:
            # KUBECONFIG as it is now (the client reads it once, when first imported)
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG") or None
            )
        except (config.ConfigException, OSError) as kubeconfig:
            raise ConfigError(
                [
                    ConfigIssue(
                        "kubernetes",
                        f"no Kubernetes credentials: not running in a pod ({in_pod}) and no "
                        f"usable kubeconfig (KUBECONFIG or ~/.kube/config: {kubeconfig})",
                    )
                ]
            ) from None
    return client.ApiClient()
