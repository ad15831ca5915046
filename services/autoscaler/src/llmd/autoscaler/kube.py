"""VariantAutoscaling objects in a cluster, through the official client.

`KubeVariants.list()` reads every `variantautoscalings.llmd.ai` object (one namespace or all)
into `Variant`s; an object that does not parse is skipped with its problem named, so one bad
object never stops the others. `write_status()` records a decision in the object's status
subresource in WVA's shape:

    status:
      currentAlloc: {numReplicas: 2, accelerator: H100}
      desiredOptimizedAlloc: {numReplicas: 3, accelerator: H100, lastRunTime: <RFC 3339>}
      actuation: {applied: true}
"""

from __future__ import annotations

import time
from typing import Any

from llmd.autoscaler.controller import Decision
from llmd.autoscaler.variants import Variant, parse_variant
from llmd.runtime.cluster import kube_call
from llmd.runtime.config import ConfigError

GROUP = "llmd.ai"
VERSION = "v1alpha1"
PLURAL = "variantautoscalings"


class KubeVariants:
    def __init__(self, custom_api: Any, namespace: str = "") -> None:
        self.api = custom_api
        self.namespace = namespace

    async def list(self) -> tuple[list[Variant], list[str]]:
        """(the variants, one message per object that was skipped)."""
        if self.namespace:
            doc = await kube_call(
                f"listing {PLURAL} in {self.namespace}",
                self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
            )  # fmt: skip
        else:
            doc = await kube_call(
                f"listing {PLURAL}", self.api.list_cluster_custom_object, GROUP, VERSION, PLURAL
            )
        out: list[Variant] = []
        problems: list[str] = []
        seen: set[str] = set()
        for item in doc.get("items", []) if isinstance(doc, dict) else []:
            meta = item.get("metadata", {}) if isinstance(item, dict) else {}
            where = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
            try:
                v = parse_variant(item, where)
            except ConfigError as exc:
                problems.append("; ".join(str(i) for i in exc.issues))
                continue
            if f"{v.namespace}/{v.target}" in seen:
                problems.append(f"{where}: another variant already scales {v.target}")
                continue
            seen.add(f"{v.namespace}/{v.target}")
            out.append(v)
        return out, problems

    async def write_status(self, v: Variant, d: Decision) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "status": {
                "currentAlloc": {"numReplicas": d.current, "accelerator": v.accelerator},
                "desiredOptimizedAlloc": {
                    "numReplicas": d.applied,
                    "accelerator": v.accelerator,
                    "lastRunTime": now,
                },
                "actuation": {"applied": d.actuated or d.applied == d.current},
            }
        }
        await kube_call(
            f"writing the status of {v.key}",
            self.api.patch_namespaced_custom_object_status,
            GROUP, VERSION, v.namespace, PLURAL, v.name, status,
        )  # fmt: skip
