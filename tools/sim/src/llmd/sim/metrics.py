"""vLLM 0.32's Prometheus page for one simulated engine, rendered without prometheus_client.

Names, types, HELP texts, label names, bucket bounds, the `_created` companions and the value
formatting follow the page a real vLLM 0.32 server serves (tests/vllm checks this). Rendering is
hand-rolled because a scheduler scrapes every engine every 50 ms and one process hosts many
engines: a shared prometheus_client registry cannot hold several engines' identical names, and
its rendering costs milliseconds per page.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from llmd.protocol import metrics as names

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
KV_FETCH_STAGES = ("waiting_to_start", "in_progress", "completed_waiting")
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
NIXL_BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 24, 2))


def format_value(v: float) -> str:
    """A sample value as prometheus_client writes it (Go-style exponents for big numbers)."""
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6:
        mantissa = (s[0] + "." + s[1:dot] + s[dot + 1 :]).rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def restrict_page(page: str, wanted: Collection[str]) -> str:
    """`page` with only the samples named in `wanted`, and the HELP/TYPE lines of the families
    that keep one: what prometheus_client serves for `?name[]=...` (its restricted registry)."""
    out: list[str] = []
    header: list[str] = []
    for line in page.splitlines():
        if line.startswith("# HELP "):
            header = [line]
        elif line.startswith("#"):
            header.append(line)
        elif line and names.sample_name(line) in wanted:
            out.extend(header)
            header = []
            out.append(line)
    return "\n".join(out) + "\n" if out else ""


def one_two_five(limit: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 buckets up to `limit` (token-count histograms)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > limit:
                return tuple(out)
            out.append(float(value))
        exponent += 1


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(pairs))


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-render histogram with fixed bounds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    help: str


class EngineMetrics:
    """Every value one engine exposes, and its rendering."""

    GAUGES = (
        _Family(names.NUM_REQUESTS_RUNNING, "Number of requests in model execution batches."),
        _Family(names.NUM_REQUESTS_WAITING, "Number of requests waiting to be processed."),
    )

    def __init__(
        self,
        model_name: str,
        *,
        max_model_len: int,
        cache_config: dict[str, str],
        kv_consumer: bool = False,
        nixl: bool = False,
    ) -> None:
        self.model_name = model_name
        self.base = _labels([("engine", "0"), ("model_name", model_name)])
        self.kv_consumer = kv_consumer
        self.nixl = nixl
        self.cache_config = cache_config
        self.created = time.time()
        self._wanted: Collection[str] | None = None
        """While a filtered page renders: the samples asked for."""
        # gauges
        self.running = 0
        self.waiting = 0
        self.waiting_deferred = 0
        self.kv_usage = 0.0
        self.kv_fetch: dict[str, int] = dict.fromkeys(KV_FETCH_STAGES, 0)
        # counters
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.external_queries = 0
        self.external_hits = 0
        self.preemptions = 0
        self.prompt_tokens = 0
        self.prompt_by_source: dict[str, int] = dict.fromkeys(PROMPT_SOURCES, 0)
        self.cached_by_source: dict[str, int] = dict.fromkeys(CACHED_SOURCES, 0)
        self.generation_tokens = 0
        self.success: dict[str, int] = dict.fromkeys(FINISHED_REASONS, 0)
        self.admission_rejections: dict[str, int] = dict.fromkeys(ADMISSION_REASONS, 0)
        self.nixl_failed_transfers = 0
        self.nixl_expired = 0
        self.offload = False
        """A shared storage tier is mounted: export vLLM's offload and llmd-fs-offload's
        counters."""
        self.offload_load_bytes = 0
        self.offload_load_seconds = 0.0
        self.offload_store_bytes = 0
        self.offload_store_seconds = 0.0
        self.offload_stores_dropped = 0
        # histograms
        tok = one_two_five(max_model_len)
        self.hist: dict[str, tuple[str, Histogram]] = {}
        for name, help_text, bounds in (
            (names.REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.", tok),
            (names.REQUEST_GENERATION_TOKENS, "Number of generation tokens processed.", tok),
            (
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                tuple(float(b) for b in ITERATION_BUCKETS),
            ),
            (
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                tok,
            ),
            (
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                tuple(float(b) for b in N_BUCKETS),
            ),
            (
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                tok,
            ),
            (
                names.TIME_TO_FIRST_TOKEN,
                "Histogram of time to first token in seconds.",
                names.TTFT_BUCKETS,
            ),
            (
                names.INTER_TOKEN_LATENCY,
                "Histogram of inter-token latency in seconds.",
                names.ITL_BUCKETS,
            ),
            (
                names.TIME_PER_OUTPUT_TOKEN,
                "Histogram of time_per_output_token_seconds per request.",
                names.ITL_BUCKETS,
            ),
            (
                names.E2E_REQUEST_LATENCY,
                "Histogram of e2e request latency in seconds.",
                names.REQUEST_LATENCY_BUCKETS,
            ),
            (
                names.REQUEST_QUEUE_TIME,
                "Histogram of time spent in WAITING phase for request.",
                names.REQUEST_LATENCY_BUCKETS,
            ),
            (
                names.REQUEST_INFERENCE_TIME,
                "Histogram of time spent in RUNNING phase for request.",
                names.REQUEST_LATENCY_BUCKETS,
            ),
            (
                names.REQUEST_PREFILL_TIME,
                "Histogram of time spent in PREFILL phase for request.",
                names.REQUEST_LATENCY_BUCKETS,
            ),
            (
                names.REQUEST_DECODE_TIME,
                "Histogram of time spent in DECODE phase for request.",
                names.REQUEST_LATENCY_BUCKETS,
            ),
            (
                "vllm:request_num_preemptions",
                "Histogram of the number of times a request was preempted.",
                tuple(float(b) for b in PREEMPTION_BUCKETS),
            ),
            (
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                tok,
            ),
        ):
            self.hist[name] = (help_text, Histogram(bounds))
        self.nixl_xfer_time = Histogram(names.TTFT_BUCKETS)
        self.nixl_bytes = Histogram(NIXL_BYTES_BUCKETS)
        self.lora_info: tuple[int, str, str] | None = None
        """(max_lora, running adapters, waiting adapters) when LoRA is enabled."""

    def observe(self, name: str, value: float) -> None:
        self.hist[name][1].observe(value)

    # -- rendering ------------------------------------------------------------------------

    def _gauge(
        self, out: list[str], name: str, help_text: str, rows: list[tuple[str, float]]
    ) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        for labels, value in rows:
            out.append(f"{name}{{{labels}}} {format_value(value)}\n")

    def _counter(
        self, out: list[str], stem: str, help_text: str, rows: list[tuple[str, float]]
    ) -> None:
        if self._skip(f"{stem}_total", f"{stem}_created"):
            return
        out.append(f"# HELP {stem}_total {help_text}\n# TYPE {stem}_total counter\n")
        for labels, value in rows:
            out.append(f"{stem}_total{{{labels}}} {format_value(value)}\n")
        out.append(f"# HELP {stem}_created {help_text}\n# TYPE {stem}_created gauge\n")
        created = format_value(self.created)
        for labels, _ in rows:
            out.append(f"{stem}_created{{{labels}}} {created}\n")

    def _histogram(self, out: list[str], name: str, help_text: str, h: Histogram) -> None:
        if self._skip(*(name + suffix for suffix in ("_bucket", "_count", "_sum", "_created"))):
            return
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
        engine, model = 'engine="0"', f'model_name="{self.model_name}"'
        cumulative = 0
        for bound, count in zip(h.bounds, h.counts, strict=False):
            cumulative += count
            out.append(
                f'{name}_bucket{{{engine},le="{format_value(bound)}",{model}}} '
                f"{format_value(cumulative)}\n"
            )
        out.append(f'{name}_bucket{{{engine},le="+Inf",{model}}} {format_value(h.n)}\n')
        out.append(f"{name}_count{{{self.base}}} {format_value(h.n)}\n")
        out.append(f"{name}_sum{{{self.base}}} {format_value(h.total)}\n")
        out.append(f"# HELP {name}_created {help_text}\n# TYPE {name}_created gauge\n")
        out.append(f"{name}_created{{{self.base}}} {format_value(self.created)}\n")

    def _with(self, key: str, value: str) -> str:
        return _labels([("engine", "0"), ("model_name", self.model_name), (key, value)])

    def render_sglang(self) -> str:
        """The same state under SGLang's metric names (`--metrics-dialect sglang`), so a
        scheduler's SGLang mapping can be tested end to end. Only the names llm-d's core
        metrics extractor reads, plus SGLang's token counters."""
        labels = _labels([("model_name", self.model_name)])
        info = _labels(
            [
                ("model_name", self.model_name),
                ("page_size", self.cache_config.get("block_size", "")),
                ("num_pages", self.cache_config.get("num_gpu_blocks", "")),
            ]
        )
        out: list[str] = []
        for name, help_text, value in (
            ("sglang:num_running_reqs", "The number of running requests.", self.running),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", self.waiting),
            ("sglang:token_usage", "The token usage (0..1).", self.kv_usage),
        ):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            out.append(f"{name}{{{labels}}} {format_value(value)}\n")
        out.append("# HELP sglang:cache_config_info KV cache layout.\n")
        out.append("# TYPE sglang:cache_config_info gauge\n")
        out.append(f"sglang:cache_config_info{{{info}}} 1\n")
        return "".join(out)

    def render(self, wanted: Collection[str] | None = None) -> str:
        """The whole page, or (with `wanted`) only those samples, skipping the other families
        instead of rendering them, as prometheus_client's restricted registry does."""
        self._wanted = wanted
        try:
            return self._render()
        finally:
            self._wanted = None

    def _skip(self, *sample_names: str) -> bool:
        wanted = self._wanted
        return wanted is not None and not any(n in wanted for n in sample_names)

    def _render(self) -> str:
        b = self.base
        out: list[str] = []
        self._gauge(out, names.NUM_REQUESTS_RUNNING, self.GAUGES[0].help, [(b, self.running)])
        self._gauge(out, names.NUM_REQUESTS_WAITING, self.GAUGES[1].help, [(b, self.waiting)])
        self._gauge(
            out,
            names.NUM_REQUESTS_WAITING_BY_REASON,
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
            "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            [
                (self._with("reason", "capacity"), self.waiting - self.waiting_deferred),
                (self._with("reason", "deferred"), self.waiting_deferred),
            ],
        )
        if self.kv_consumer:
            self._gauge(
                out,
                "vllm:num_requests_kv_fetch_by_stage",
                "Number of requests fetching KV from a remote engine, by stage.",
                [(self._with("stage", s), self.kv_fetch[s]) for s in KV_FETCH_STAGES],
            )
        self._gauge(
            out,
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            [
                (self._with("sleep_state", "awake"), 1),
                (self._with("sleep_state", "weights_offloaded"), 0),
                (self._with("sleep_state", "discard_all"), 0),
            ],
        )
        self._gauge(
            out,
            names.KV_CACHE_USAGE_PERC,
            "KV-cache usage. 1 means 100 percent usage.",
            [(b, self.kv_usage)],
        )
        self._counter(
            out,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            [(b, self.prefix_queries)],
        )
        self._counter(
            out,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            [(b, self.prefix_hits)],
        )
        self._counter(
            out,
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in "
            "terms of number of queried tokens.",
            [(b, self.external_queries)],
        )
        self._counter(
            out,
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
            [(b, self.external_hits)],
        )
        self._counter(
            out,
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
            [(b, 0)],
        )
        self._counter(
            out,
            "vllm:mm_cache_hits",
            "Multi-modal cache hits, in terms of number of cached items.",
            [(b, 0)],
        )
        self._counter(
            out,
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            [(b, self.preemptions)],
        )
        self._counter(
            out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            [(b, self.prompt_tokens)],
        )
        self._counter(
            out,
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [(self._with("source", s), self.prompt_by_source[s]) for s in PROMPT_SOURCES],
        )
        self._counter(
            out,
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            [(b, sum(self.cached_by_source.values()))],
        )
        self._counter(
            out,
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            [(self._with("source", s), self.cached_by_source[s]) for s in CACHED_SOURCES],
        )
        self._counter(
            out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            [(b, self.generation_tokens)],
        )
        self._counter(
            out,
            "vllm:request_success",
            "Count of successfully processed requests.",
            [(self._with("finished_reason", r), self.success[r]) for r in FINISHED_REASONS],
        )
        self._counter(
            out,
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            [
                (_labels([("model_name", self.model_name), ("reason", r)]), v)
                for r, v in self.admission_rejections.items()
            ],
        )
        for name, (help_text, h) in self.hist.items():
            self._histogram(out, name, help_text, h)
        if self.offload:
            for stem, help_text, value in (
                (
                    "vllm:kv_offload_load_bytes",
                    "Total bytes loaded from offload storage to GPU.",
                    self.offload_load_bytes,
                ),
                (
                    "vllm:kv_offload_load_time",
                    "Total load time from offload storage to GPU, in seconds.",
                    self.offload_load_seconds,
                ),
                (
                    "vllm:kv_offload_store_bytes",
                    "Total bytes stored from GPU to offload storage.",
                    self.offload_store_bytes,
                ),
                (
                    "vllm:kv_offload_store_time",
                    "Total store time from GPU to offload storage, in seconds.",
                    self.offload_store_seconds,
                ),
                (
                    "llmd_fs_offload_stores_dropped",
                    "Chunk stores dropped by write back-pressure.",
                    self.offload_stores_dropped,
                ),
            ):
                self._counter(out, stem, help_text, [(b, value)])
        if self.nixl:
            self._histogram(
                out,
                "vllm:nixl_xfer_time_seconds",
                "Histogram of transfer duration for KV cache transfers.",
                self.nixl_xfer_time,
            )
            self._histogram(
                out,
                "vllm:nixl_bytes_transferred",
                "Histogram of bytes transferred per KV cache transfers.",
                self.nixl_bytes,
            )
            self._counter(
                out,
                "vllm:nixl_num_failed_transfers",
                "Number of failed NIXL KV Cache transfers.",
                [(b, self.nixl_failed_transfers)],
            )
            self._counter(
                out,
                "vllm:nixl_num_kv_expired_reqs",
                "Number of requests that had their KV expire.",
                [(b, self.nixl_expired)],
            )
        info = _labels([*self.cache_config.items(), ("engine", "0")])
        self._gauge(
            out,
            names.CACHE_CONFIG_INFO,
            "Information of the LLMEngine CacheConfig",
            [(info, 1.0)],
        )
        if self.lora_info is not None:
            max_lora, running, waiting = self.lora_info
            labels = _labels(
                [
                    ("max_lora", str(max_lora)),
                    ("running_lora_adapters", running),
                    ("waiting_lora_adapters", waiting),
                ]
            )
            self._gauge(
                out,
                names.LORA_REQUESTS_INFO,
                "Running stats on lora requests.",
                [(labels, time.time())],
            )
        return "".join(out)
