"""HTTP header names llm-d components exchange (all lower case, as Envoy presents them)."""

import math
from typing import Final

REQUEST_ID: Final = "x-request-id"
DESTINATION_ENDPOINT: Final = "x-gateway-destination-endpoint"
"""`ip:port[,ip:port...]`: the picked endpoint, then an ordered fallback list."""
DESTINATION_ENDPOINT_SERVED: Final = "x-gateway-destination-endpoint-served"
DESTINATION_ENDPOINT_SUBSET: Final = "x-gateway-destination-endpoint-subset"
DESTINATION_ENDPOINT_SCORES: Final = "x-gateway-destination-endpoint-scores"
ENVOY_LB_NAMESPACE: Final = "envoy.lb"
"""Dynamic-metadata namespace carrying the destination for Envoy's ORIGINAL_DST cluster."""
ENVOY_LB_SUBSET_HINT: Final = "envoy.lb.subset_hint"

# Envoy's ext_authz filter asking llmd-scheduler (its --extauthz-port)
EXTAUTHZ_CHECK_PREFIX: Final = "/llmd/check"
"""Check requests go to this prefix followed by the client's path."""
EXTAUTHZ_HEALTH_PATH: Final = "/llmd/health"
EXTAUTHZ_NAMESPACE: Final = "envoy.filters.http.ext_authz"
"""Where the ext_authz filter keeps the check answer's metadata headers."""
EXTAUTHZ_TOKEN: Final = "x-llmd-pick"
"""The check answer's header that becomes dynamic metadata: the feedback token."""
EXTAUTHZ_STATUS: Final = "x-llmd-status"
"""Envoy's ext_authz takes any 5xx check answer for a failed check: a 5xx rejection travels
as 424 with its real status in this header, and the gateway restores it."""

REQUEST_DROPPED_REASON: Final = "x-llm-d-request-dropped-reason"
INFERENCE_OBJECTIVE: Final = "x-llm-d-inference-objective"
INFERENCE_OBJECTIVE_LEGACY: Final = "x-gateway-inference-objective"
MODEL_NAME_REWRITE: Final = "x-llm-d-model-name-rewrite"
MODEL_NAME_REWRITE_LEGACY: Final = "x-gateway-model-name-rewrite"
FAIRNESS_ID: Final = "x-llm-d-inference-fairness-id"
FAIRNESS_ID_LEGACY: Final = "x-gateway-inference-fairness-id"
SLO_TTFT_MS: Final = "x-llm-d-slo-ttft-ms"
SLO_TPOT_MS: Final = "x-llm-d-slo-tpot-ms"
SLO_TTFT_MS_LEGACY: Final = "x-slo-ttft-ms"
SLO_TPOT_MS_LEGACY: Final = "x-slo-tpot-ms"
SESSION_ID: Final = "x-session-id"
SESSION_TOKEN: Final = "x-session-token"

# P/D and friends (set by the scheduler, read by the decode-side sidecar).
PREFILLER_HOST_PORT: Final = "x-prefiller-host-port"
ENCODER_HOSTS_PORTS: Final = "x-encoder-hosts-ports"
KV_CACHE_SOURCE_HOST_PORT: Final = "x-kv-cache-source-host-port"
DATA_PARALLEL_HOST_PORT: Final = "x-data-parallel-host-port"

# Values of x-llm-d-request-dropped-reason.
DROPPED_SATURATED: Final = "rejected-saturated"
DROPPED_NO_ENDPOINTS: Final = "rejected-no-endpoints"
DROPPED_TTL_EXPIRED: Final = "rejected-ttl-expired"
DROPPED_CONTEXT_CANCELLED: Final = "rejected-context-cancelled"
DROPPED_SHUTTING_DOWN: Final = "rejected-shutting-down"
DROPPED_EVICTED: Final = "evicted"
DROPPED_EVICTED_QUEUE_PRESSURE: Final = "evicted-queue-pressure"
DROPPED_EVICTED_PRIORITY: Final = "evicted-priority"

SYSTEM_OWNED: Final = frozenset(
    {
        FAIRNESS_ID,
        FAIRNESS_ID_LEGACY,
        INFERENCE_OBJECTIVE,
        INFERENCE_OBJECTIVE_LEGACY,
        MODEL_NAME_REWRITE,
        MODEL_NAME_REWRITE_LEGACY,
        DESTINATION_ENDPOINT_SUBSET,
        SLO_TTFT_MS,
        SLO_TPOT_MS,
        DESTINATION_ENDPOINT,
        DESTINATION_ENDPOINT_SERVED,
        REQUEST_DROPPED_REASON,
        "content-length",
    }
)
"""Headers the scheduler strips before forwarding so they never leak to model servers."""

SCHEDULER_OWNED: Final = frozenset(
    {
        DESTINATION_ENDPOINT,
        PREFILLER_HOST_PORT,
        DATA_PARALLEL_HOST_PORT,
        ENCODER_HOSTS_PORTS,
        KV_CACHE_SOURCE_HOST_PORT,
    }
)
"""Routing headers only the scheduler may set: a client's own values are removed, so a
client cannot choose its engine, its prefill pod or where KV comes from."""


def slo_ms(raw: str | None) -> float | None:
    """An SLO header's value in milliseconds; None when absent or not a positive finite
    number (llm-d ignores such a value)."""
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms if math.isfinite(ms) and ms > 0 else None
