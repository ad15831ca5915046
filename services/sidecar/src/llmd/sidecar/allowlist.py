"""The SSRF allowlist from an InferencePool: the pods its selector matches, by IP and name.

With `--enable-ssrf-protection --inference-pool [NAMESPACE/]NAME`, llm-d's sidecar contacts only
prefill hosts that are pods of that pool. This reads the pool (`inference.networking.k8s.io/v1`:
`spec.selector.matchLabels`; the older `inference.networking.x-k8s.io/v1alpha2`: a flat
`spec.selector`), then follows its pods with llmd's Kubernetes discovery (list + watch, ready
pods), and keeps the set of their addresses and names. Ports are not compared (llm-d's rule).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from llmd.runtime.cluster import ClusterError, kube_call

log = logging.getLogger(__name__)

POOL_VERSIONS = {"inference.networking.k8s.io": "v1", "inference.networking.x-k8s.io": "v1alpha2"}


def parse_pool(value: str) -> tuple[str, str]:
    """(namespace, name) of `namespace/name` or `name` (namespace `default`, as llm-d)."""
    ns, sep, name = value.partition("/")
    return (ns, name) if sep else ("default", ns)


def pool_selector(pool: dict[str, Any]) -> str:
    """The label selector of an InferencePool object, as `k=v,k=v`; ValueError without one."""
    spec = pool.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if not isinstance(labels, dict) or not labels:
        raise ValueError("the InferencePool has no spec.selector labels")
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


async def read_pool(custom_api: Any, group: str, namespace: str, name: str) -> str:
    """The selector of the named InferencePool; ClusterError when it cannot be read."""
    version = POOL_VERSIONS.get(group)
    if version is None:
        raise ClusterError(f"pool group {group!r}: one of {', '.join(POOL_VERSIONS)}")
    doc = await kube_call(
        f"listing inferencepools.{group} in {namespace}",
        custom_api.list_namespaced_custom_object, group, version, namespace, "inferencepools",
    )  # fmt: skip
    for item in doc.get("items", []) if isinstance(doc, dict) else []:
        if (item.get("metadata") or {}).get("name") == name:
            try:
                return pool_selector(item)
            except ValueError as exc:
                raise ClusterError(f"InferencePool {namespace}/{name}: {exc}") from None
    raise ClusterError(f"no InferencePool {namespace}/{name} ({group})", 404)


async def follow_pods(source: Any) -> AsyncIterator[set[str]]:
    """Each new set of allowed hosts (pod addresses and names) from a pod discovery source."""
    async for endpoints in source.watch():
        yield {h for e in endpoints for h in (e.address, e.name) if h}
