"""The `flowControl:` section of an EndpointPickerConfig: llm-d's keys, Kubernetes quantities
and durations, checked when the config loads."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from llmd.runtime.config import StrictModel, parse_duration

Duration = str | float

# --- quantities ------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?\s*$")
_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: str | int | float) -> int:
    """`500`, `10k`, `1G`, `10Gi` (Kubernetes quantities) as an integer; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return int(value)
    m = _QUANTITY.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a quantity (e.g. 500, 10k, 1Gi)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


Quantity = str | int


class _Quantities(StrictModel):
    max_bytes: Quantity | None = Field(default=None, alias="maxBytes")
    max_requests: Quantity | None = Field(default=None, alias="maxRequests")

    @field_validator("max_bytes", "max_requests")
    @classmethod
    def _q(cls, v: Quantity | None) -> Quantity | None:
        if v is not None:
            parse_quantity(v)
        return v


class BandTemplate(_Quantities):
    fairness_policy_ref: str | None = Field(default=None, alias="fairnessPolicyRef")
    ordering_policy_ref: str | None = Field(default=None, alias="orderingPolicyRef")


class BandSpec(BandTemplate):
    priority: int = Field(ge=-(2**31), lt=2**31)


class PluginRef(StrictModel):
    plugin_ref: str = Field(alias="pluginRef", min_length=1)


class FlowControlSpec(_Quantities):
    """`flowControl:` of an EndpointPickerConfig (llm-d's keys)."""

    default_request_ttl: Duration = Field(default="60s", alias="defaultRequestTTL")
    no_endpoint_request_ttl: Duration | None = Field(default=None, alias="noEndpointRequestTTL")
    default_priority_band: BandTemplate | None = Field(default=None, alias="defaultPriorityBand")
    default_negative_priority_band: BandTemplate | None = Field(
        default=None, alias="defaultNegativePriorityBand"
    )
    priority_bands: list[BandSpec] = Field(default_factory=list, alias="priorityBands")
    usage_limit_policy_plugin_ref: str | None = Field(
        default=None, alias="usageLimitPolicyPluginRef"
    )
    saturation_detector: PluginRef | None = Field(default=None, alias="saturationDetector")
    enable_eviction: bool = Field(default=False, alias="enableEviction")

    @field_validator("default_request_ttl", "no_endpoint_request_ttl")
    @classmethod
    def _duration(cls, v: Duration | None) -> Duration | None:
        if v is not None:
            parse_duration(v)
        return v


DEFAULT_BAND_MAX_BYTES = 1 << 30
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_TTL_S = 60.0
