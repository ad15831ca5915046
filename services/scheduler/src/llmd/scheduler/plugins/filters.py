"""Built-in filters: role filters, label selectors, utilization caps, session pinning."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from llmd.scheduler.framework import (
    EndpointState,
    Filter,
    LLMRequest,
    NoParams,
    PluginParams,
)

ROLE_LABEL = "llm-d.ai/role"


class _RoleFilter(Filter[NoParams]):
    roles: ClassVar[frozenset[str]] = frozenset()
    keep_unlabelled: ClassVar[bool] = False

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        out = []
        for e in endpoints:
            role = e.endpoint.labels.get(ROLE_LABEL)
            if (role is None and self.keep_unlabelled) or role in self.roles:
                out.append(e)
        return out


class DecodeFilter(_RoleFilter):
    """Decode-capable endpoints (and endpoints without a role label)."""

    type_name = "decode-filter"
    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    keep_unlabelled = True


class PrefillFilter(_RoleFilter):
    """Prefill-capable endpoints."""

    type_name = "prefill-filter"
    roles = frozenset(
        {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}
    )


class EncodeFilter(_RoleFilter):
    """Encode-capable endpoints."""

    type_name = "encode-filter"
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class LabelExpression(PluginParams):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelectorParams(PluginParams):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelExpression] = Field(default_factory=list, alias="matchExpressions")


class LabelSelectorFilter(Filter[LabelSelectorParams]):
    """Keeps endpoints whose labels satisfy a Kubernetes label selector."""

    type_name = "label-selector-filter"
    Params = LabelSelectorParams

    def _matches(self, labels: Any) -> bool:
        p = self.params
        for k, v in p.match_labels.items():
            if labels.get(k) != v:
                return False
        for expr in p.match_expressions:
            value = labels.get(expr.key)
            if expr.operator == "In" and value not in expr.values:
                return False
            if expr.operator == "NotIn" and value in expr.values:
                return False
            if expr.operator == "Exists" and value is None:
                return False
            if expr.operator == "DoesNotExist" and value is not None:
                return False
        return True

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if self._matches(e.endpoint.labels)]


class UtilizationCondition(PluginParams):
    metric: Literal["active-requests", "running-requests", "waiting-queue", "kv-cache-utilization"]
    max_value: float = Field(alias="maxValue", ge=0)


class UtilizationParams(PluginParams):
    conditions: list[UtilizationCondition] = Field(min_length=1)
    fallback_on_empty: bool = Field(default=True, alias="fallbackOnEmpty")


def _metric(e: EndpointState, name: str) -> float:
    if name == "active-requests":
        return float(e.inflight_requests)
    if name == "running-requests":
        return float(e.running)
    if name == "waiting-queue":
        return float(e.waiting)
    return e.kv_usage


class UtilizationFilter(Filter[UtilizationParams]):
    saturation = True

    """Drops endpoints over any cap; with fallbackOnEmpty, keeps all when every one is over."""

    type_name = "utilization-filter"
    Params = UtilizationParams

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        p = self.params
        kept = [
            e for e in endpoints if all(_metric(e, c.metric) <= c.max_value for c in p.conditions)
        ]
        if not kept and p.fallback_on_empty:
            return endpoints
        return kept


FILTERS = (DecodeFilter, PrefillFilter, EncodeFilter, LabelSelectorFilter, UtilizationFilter)
