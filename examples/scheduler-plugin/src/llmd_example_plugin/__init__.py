"""`zone-affinity-scorer`: an llmd-scheduler plugin that lives outside the scheduler package.

It prefers endpoints whose zone label matches the zone a client asks for in a header, and tells
the model server which zone was picked. It shows the whole plugin contract in one class:

- typed parameters (`Scorer[ZoneAffinityParams]`: `self.params` is a `ZoneAffinityParams`);
- a score per endpoint;
- a pre-request step that returns headers to add to the forwarded request;
- its own metric, registered through `register_metrics`.

It is found through the `llmd.scheduler.plugins` entry point in this package's pyproject.toml:

    plugins:
    - type: zone-affinity-scorer
      parameters: {headerName: x-preferred-zone, zoneLabel: topology.kubernetes.io/zone}
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from llmd.scheduler.framework import (
    EndpointState,
    LLMRequest,
    PluginHandle,
    PluginParams,
    PreRequest,
    SchedulingResult,
    Scorer,
)

PICKED_ZONE_HEADER = "x-llmd-picked-zone"


class ZoneAffinityParams(PluginParams):
    header_name: str = Field(default="x-preferred-zone", alias="headerName")
    zone_label: str = Field(default="topology.kubernetes.io/zone", alias="zoneLabel")


class ZoneAffinityScorer(Scorer[ZoneAffinityParams], PreRequest[ZoneAffinityParams]):
    """Endpoints in the zone the request asks for (a header) score 1, others 0."""

    type_name = "zone-affinity-scorer"
    Params = ZoneAffinityParams

    def __init__(self, name: str, params: ZoneAffinityParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        self._matches: Counter | None = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._matches = Counter(
            "llmd_example_zone_affinity_picks",
            "Requests that named a zone, by whether the picked endpoint is in it",
            ["plugin_name", "matched"],
            registry=registry,
        )

    def _wanted(self, request: LLMRequest) -> str | None:
        return request.headers.get(self.params.header_name.lower())

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        wanted = self._wanted(request)
        if wanted is None:
            return [0.0] * len(endpoints)
        label = self.params.zone_label
        return [1.0 if e.endpoint.labels.get(label) == wanted else 0.0 for e in endpoints]

    def pre_request(
        self, request: LLMRequest, result: SchedulingResult
    ) -> Mapping[str, str] | None:
        if not result.targets:
            return None
        zone = result.targets[0].endpoint.labels.get(self.params.zone_label, "")
        wanted = self._wanted(request)
        if wanted is not None and self._matches is not None:
            self._matches.labels(self.name, str(zone == wanted).lower()).inc()
        return {PICKED_ZONE_HEADER: zone} if zone else None
