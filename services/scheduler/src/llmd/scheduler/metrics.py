"""The scheduler's Prometheus metrics, under llm-d's `llm_d_epp_` names and labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
MAX_MODEL_LABELS = 1000
MAX_LABEL_LENGTH = 128


class SchedulerMetrics:
    """Every metric the scheduler exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        req = ["model_name", "target_model_name"]
        self._models = LabelBudget(
            "model_name", max_sets=MAX_MODEL_LABELS, max_length=MAX_LABEL_LENGTH, registry=registry
        )
        self.request_total = Counter(
            "llm_d_epp_request", "Requests handled", req, registry=registry
        )
        self.request_error_total = Counter(
            "llm_d_epp_request_error",
            "Requests that failed",
            [*req, "error_code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "llm_d_epp_request_duration_seconds",
            "Request latency end to end, through the proxy",
            req,
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.request_ttft = Histogram(
            "llm_d_epp_request_ttft_seconds",
            "Time to the first response body byte",
            [*req, "streaming"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.request_size = Histogram(
            "llm_d_epp_request_size_bytes",
            "Request body size",
            req,
            buckets=tuple(float(4**i) for i in range(2, 14)),
            registry=registry,
        )
        self.input_tokens = Histogram(
            "llm_d_epp_request_input_tokens",
            "Prompt tokens (from the response usage)",
            req,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.output_tokens = Histogram(
            "llm_d_epp_request_output_tokens",
            "Completion tokens (from the response usage)",
            req,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.cached_tokens = Histogram(
            "llm_d_epp_request_cached_tokens",
            "Prompt tokens served from the prefix cache",
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
            buckets=_LATENCY_BUCKETS,
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
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_processing = Histogram(
            "llm_d_epp_request_processing_duration_seconds",
            "Request-side processing in the scheduler (parse, schedule, reply)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight_requests = Gauge(
            "llm_d_epp_inflight_requests",
            "Requests in flight per endpoint",
            ["endpoint_name", "namespace"],
            registry=registry,
        )
        self.inflight_tokens = Gauge(
            "llm_d_epp_inflight_tokens",
            "Estimated uncached prompt tokens in flight per endpoint",
            ["endpoint_name", "namespace"],
            registry=registry,
        )
        self.streams_inflight = Gauge(
            "llm_d_epp_extproc_streams_inflight", "Open ext_proc streams", registry=registry
        )
        self.gateway_feedback = Counter(
            "llmd_gateway_feedback",
            "Requests on the lean response path by how their usage and timings arrived from "
            "the gateway's access log: observed, early (before the stream ended), missing (none "
            "within the timeout), evicted (too many waiting), unobserved (no feedback token)",
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

    def model_labels(self, model: str, target: str) -> tuple[str, str]:
        """Model label values: at most MAX_MODEL_LABELS distinct pairs, each name at most
        MAX_LABEL_LENGTH characters (clients choose them); the rest are `other`."""
        model, target = self._models(model, target)
        return model, target
