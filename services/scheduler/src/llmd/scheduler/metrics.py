"""The scheduler's Prometheus metrics, under llm-d's `llm_d_epp_` names and labels."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from llmd.runtime.fastmetrics import Counter, Gauge, Histogram
from llmd.runtime.observability import LabelBudget

_LATENCY_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
)
_REQUEST_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
_TOKEN_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32778,
    65536,
    131072,
    262144,
    524288,
    1048576,
)


_TTFT_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6,
    8, 10, 15, 20, 30, 45, 60, 120,
)  # fmt: skip
_REQUEST_SIZE_BUCKETS = tuple(float(2**i) for i in range(6, 31))  # 64 B .. 1 GiB
_RESPONSE_SIZE_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32778,
    65536,
)
_OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_TPOT_BUCKETS = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.6, 0.8, 1, 2,
)  # fmt: skip
_SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
MAX_LABEL_SETS = 1000
MAX_LABEL_LENGTH = 128
MAX_MODEL_LABELS = MAX_LABEL_SETS


class SchedulerMetrics:
    """Every metric the scheduler exports, registered on one registry.

    Names, types, labels and buckets are llm-d-router's (`llm_d_epp_*`), so its Grafana
    dashboards and PromQL work unchanged. Request metrics carry `model_name`,
    `target_model_name`, `fairness_id` and `priority`; clients choose those values, so at most
    MAX_LABEL_SETS distinct sets are kept and the rest are reported as `other`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        req = ["model_name", "target_model_name", "fairness_id", "priority"]
        self._labels = LabelBudget(
            "request_labels",
            max_sets=MAX_LABEL_SETS,
            max_length=MAX_LABEL_LENGTH,
            registry=registry,
        )
        self.request_total = Counter(
            "llm_d_epp_request", "Total number of processed requests", req, registry=registry
        )
        self.request_error_total = Counter(
            "llm_d_epp_request_error",
            "Total number of request errors",
            [*req, "error_code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "llm_d_epp_request_duration_seconds",
            "End-to-end request latency distribution in seconds, through the proxy",
            req,
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.request_ttft = Histogram(
            "llm_d_epp_request_ttft_seconds",
            "Time from the request's arrival to the first response body byte (non-streaming: "
            "the whole response)",
            [*req, "streaming"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.request_tpot = Histogram(
            "llm_d_epp_request_streaming_tpot_seconds",
            "Streaming requests: (end-to-end - TTFT) / (output tokens - 1)",
            req,
            buckets=_TPOT_BUCKETS,
            registry=registry,
        )
        self.request_ntpot = Histogram(
            "llm_d_epp_request_ntpot_seconds",
            "End-to-end latency divided by output tokens",
            req,
            buckets=_NTPOT_BUCKETS,
            registry=registry,
        )
        self.request_size = Histogram(
            "llm_d_epp_request_size_bytes",
            "Incoming request body size distribution in bytes",
            req,
            buckets=_REQUEST_SIZE_BUCKETS,
            registry=registry,
        )
        self.response_size = Histogram(
            "llm_d_epp_response_size_bytes",
            "Outgoing response body size distribution in bytes",
            req,
            buckets=_RESPONSE_SIZE_BUCKETS,
            registry=registry,
        )
        self.input_tokens = Histogram(
            "llm_d_epp_request_input_tokens",
            "Prompt tokens per request (from the response usage)",
            req,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.output_tokens = Histogram(
            "llm_d_epp_request_output_tokens",
            "Completion tokens per request (from the response usage)",
            req,
            buckets=_OUTPUT_TOKEN_BUCKETS,
            registry=registry,
        )
        self.cached_tokens = Histogram(
            "llm_d_epp_request_cached_tokens",
            "Prompt tokens read from the prefix cache per request, as the model server reported",
            req,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_running = Gauge(
            "llm_d_epp_request_running",
            "Requests in flight through this scheduler",
            req,
            registry=registry,
        )
        self.scheduler_e2e = Histogram(
            "llm_d_epp_scheduler_e2e_duration_seconds",
            "Scheduling time per request (producers, profiles, pre-request)",
            buckets=_SCHEDULER_BUCKETS,
            registry=registry,
        )
        self.scheduler_attempts = Counter(
            "llm_d_epp_scheduler_attempts",
            "Scheduling attempts",
            ["status", "target_model_name", "endpoint_name", "namespace", "port"],
            registry=registry,
        )
        self.plugin_duration = Histogram(
            "llm_d_epp_plugin_duration_seconds",
            "Time spent in each plugin",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_SCHEDULER_BUCKETS,
            registry=registry,
        )
        self.request_processing = Histogram(
            "llm_d_epp_request_processing_duration_seconds",
            "Request-side processing in the scheduler (parse, schedule, reply)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        inflight = ["endpoint_name", "namespace", "producer_name"]
        self.inflight_requests = Gauge(
            "llm_d_epp_inflight_requests",
            "Requests in flight per endpoint",
            inflight,
            registry=registry,
        )
        self.inflight_tokens = Gauge(
            "llm_d_epp_inflight_tokens",
            "Estimated uncached prompt tokens in flight per endpoint",
            inflight,
            registry=registry,
        )
        self.activator_routed = Counter(
            "llmd_activator_routed_requests",
            "Requests sent to llmd-activator because the pool had no endpoint (scale from zero)",
            registry=registry,
        )
        self.profile_widened = Counter(
            "llmd_scheduler_profile_widened",
            "Scheduling profiles whose filters left no usable endpoint and that picked among "
            "stale or held-out ones instead (one role usable, another's endpoints not)",
            ["profile"],
            registry=registry,
        )
        self.served_elsewhere = Counter(
            "llmd_served_endpoint_mismatch",
            "Responses the gateway reports as served by another endpoint than the one picked "
            "(an Envoy retry to a fallback); their outcome is attributed to the serving one",
            registry=registry,
        )
        Gauge(
            "llm_d_epp_info",
            "Build of this scheduler",
            ["commit", "build_ref"],
            registry=registry,
        ).labels(_commit(), _version()).set(1)
        self.streams_inflight = Gauge(
            "llm_d_epp_extproc_streams_inflight", "Open ext_proc streams", registry=registry
        )
        self.gateway_feedback = Counter(
            "llmd_gateway_feedback",
            "Requests on the lean response path by how their usage and timings arrived from "
            "the gateway's access log: observed, early (before the stream ended), missing (none "
            "within the timeout), evicted (too many waiting), unobserved (no feedback token), "
            "orphaned (ext_authz: the gateway went away before reporting it)",
            ["outcome"],
            registry=registry,
        )
        self.gateway_feedback_waiting = Gauge(
            "llmd_gateway_feedback_waiting",
            "Ended requests waiting for their access-log entry",
            registry=registry,
        )
        self.streams_total = Counter(
            "llm_d_epp_extproc_streams",
            "ext_proc streams by outcome",
            ["code"],
            registry=registry,
        )
        self.decisions_recorded = Gauge(
            "llm_d_epp_debug_decisions_buffered",
            "Decisions kept for /debug/decisions",
            registry=registry,
        )

    def request_labels(
        self, model: str, target: str, fairness: str = "", priority: int = 0
    ) -> tuple[str, ...]:
        """Label values for the request metrics, within the label budget."""
        return self._labels(model, target, fairness, str(priority))


def _version() -> str:
    try:
        return importlib.metadata.version("llmd-scheduler")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _commit() -> str:
    return os.environ.get("LLMD_BUILD_COMMIT", "unknown")[:40]


LEGACY_PREFIX = "llm_d_router_epp_"
_LEGACY_RENAMED = {
    "llm_d_epp_request_size_bytes": "request_sizes",
    "llm_d_epp_response_size_bytes": "response_sizes",
    "llm_d_epp_request_input_tokens": "input_tokens",
    "llm_d_epp_request_output_tokens": "output_tokens",
    "llm_d_epp_request_cached_tokens": "prompt_cached_tokens",
    "llm_d_epp_request_running": "running_requests",
    "llm_d_epp_request_ntpot_seconds": "normalized_time_per_output_token_seconds",
}
_LEGACY_SAME = frozenset(
    {
        "request",
        "request_error",
        "request_duration_seconds",
        "average_kv_cache_utilization",
        "average_queue_size",
        "average_running_requests",
        "ready_endpoints",
        "per_endpoint_queue_size",
        "scheduler_e2e_duration_seconds",
        "scheduler_attempts",
        "plugin_duration_seconds",
        "info",
    }
)


def legacy_name(name: str) -> str | None:
    """The `llm_d_router_epp_*` name llm-d-router's earlier releases (and the Grafana dashboard
    it still ships) use for an `llm_d_epp_*` family, or None."""
    if name in _LEGACY_RENAMED:
        return LEGACY_PREFIX + _LEGACY_RENAMED[name]
    rest = name.removeprefix("llm_d_epp_")
    if rest != name and rest in _LEGACY_SAME:
        return LEGACY_PREFIX + rest
    return None


class LegacyNames(Collector):
    """Exports the families that have an `llm_d_router_epp_*` name a second time under it, as
    llm-d dual-emits its legacy prefixes, so dashboards built on them fill unchanged."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._busy = False

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._busy:  # the registry's collection includes this collector
            return
        self._busy = True
        try:
            for fam in self.registry.collect():
                new = legacy_name(fam.name)
                if new is None:
                    continue
                out = Metric(new, fam.documentation, fam.type, fam.unit)
                out.samples = [s._replace(name=new + s.name[len(fam.name) :]) for s in fam.samples]
                yield out
        finally:
            self._busy = False
