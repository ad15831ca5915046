"""vLLM 0.32 metric names and a Prometheus text parser that yields a typed engine snapshot.

The scheduler scrapes every endpoint every 50 ms, so parsing is on a hot path: given the metrics
it wants, `parse_samples` finds their lines by searching for their names and never splits or
looks at the rest of the page (mostly histogram buckets), which makes a scrape of vLLM's page
cheap (see the package README for figures against prometheus_client).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Final

from llmd.protocol.errors import DecodeError

# Names as exposed (counters carry `_total`). All core metrics are labelled model_name, engine.
NUM_REQUESTS_RUNNING: Final = "vllm:num_requests_running"
NUM_REQUESTS_WAITING: Final = "vllm:num_requests_waiting"
NUM_REQUESTS_WAITING_BY_REASON: Final = "vllm:num_requests_waiting_by_reason"
KV_CACHE_USAGE_PERC: Final = "vllm:kv_cache_usage_perc"
PREFIX_CACHE_QUERIES: Final = "vllm:prefix_cache_queries_total"
PREFIX_CACHE_HITS: Final = "vllm:prefix_cache_hits_total"
EXTERNAL_PREFIX_CACHE_QUERIES: Final = "vllm:external_prefix_cache_queries_total"
EXTERNAL_PREFIX_CACHE_HITS: Final = "vllm:external_prefix_cache_hits_total"
NUM_PREEMPTIONS: Final = "vllm:num_preemptions_total"
PROMPT_TOKENS: Final = "vllm:prompt_tokens_total"
PROMPT_TOKENS_BY_SOURCE: Final = "vllm:prompt_tokens_by_source_total"
"""Label `source`: local_compute, local_cache_hit, external_kv_transfer."""
KV_OFFLOAD_LOAD_BYTES: Final = "vllm:kv_offload_load_bytes_total"
KV_OFFLOAD_LOAD_TIME: Final = "vllm:kv_offload_load_time_total"
"""Seconds of offload loads (each load from submission to completion), summed."""
GENERATION_TOKENS: Final = "vllm:generation_tokens_total"
REQUEST_SUCCESS: Final = "vllm:request_success_total"
CACHE_CONFIG_INFO: Final = "vllm:cache_config_info"
LORA_REQUESTS_INFO: Final = "vllm:lora_requests_info"
TIME_TO_FIRST_TOKEN: Final = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY: Final = "vllm:inter_token_latency_seconds"
TIME_PER_OUTPUT_TOKEN: Final = "vllm:request_time_per_output_token_seconds"
E2E_REQUEST_LATENCY: Final = "vllm:e2e_request_latency_seconds"
REQUEST_QUEUE_TIME: Final = "vllm:request_queue_time_seconds"
REQUEST_PREFILL_TIME: Final = "vllm:request_prefill_time_seconds"
REQUEST_PREFILL_TIME_SUM: Final = REQUEST_PREFILL_TIME + "_sum"
REQUEST_DECODE_TIME: Final = "vllm:request_decode_time_seconds"
REQUEST_INFERENCE_TIME: Final = "vllm:request_inference_time_seconds"
REQUEST_PROMPT_TOKENS: Final = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS: Final = "vllm:request_generation_tokens"

# Histogram buckets vLLM 0.32 uses (for the simulator and for reading).
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

SNAPSHOT_METRICS: Final = frozenset(
    {
        NUM_REQUESTS_RUNNING,
        NUM_REQUESTS_WAITING,
        KV_CACHE_USAGE_PERC,
        PREFIX_CACHE_QUERIES,
        PREFIX_CACHE_HITS,
        CACHE_CONFIG_INFO,
        LORA_REQUESTS_INFO,
    }
)
"""The metrics an EngineSnapshot's gauges are built from (read on every scrape)."""
SNAPSHOT_COUNTERS: Final = frozenset(
    {PROMPT_TOKENS_BY_SOURCE, KV_OFFLOAD_LOAD_TIME, REQUEST_PREFILL_TIME_SUM}
)
"""The slow-moving counters it can also carry (a scheduler reads them about once a second)."""
_WITH_COUNTERS: Final = SNAPSHOT_METRICS | SNAPSHOT_COUNTERS


@dataclass(frozen=True, slots=True)
class Sample:
    """One exposition line: metric name (with suffix), labels and value."""

    name: str
    labels: dict[str, str]
    value: float


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(text: str, pos: int, line: str) -> tuple[dict[str, str], int]:
    """Parse `{k="v",...}` starting after '{'; returns labels and the index after '}'."""
    labels: dict[str, str] = {}
    n = len(text)
    while True:
        while pos < n and text[pos] in " ,":
            pos += 1
        if pos >= n:
            raise DecodeError(f"unterminated label set in {line[:120]!r}")
        if text[pos] == "}":
            return labels, pos + 1
        eq = text.find("=", pos)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            raise DecodeError(f"malformed label in {line[:120]!r}")
        key = text[pos:eq].strip()
        pos = eq + 2
        end = text.find('"', pos)
        if end < 0:
            raise DecodeError(f"unterminated label value in {line[:120]!r}")
        if text.find("\\", pos, end) < 0:
            labels[key] = text[pos:end]
            pos = end + 1
            continue
        chars: list[str] = []
        while True:
            if pos >= n:
                raise DecodeError(f"unterminated label value in {line[:120]!r}")
            c = text[pos]
            if c == "\\" and pos + 1 < n:
                chars.append(_ESCAPES.get(text[pos + 1], "\\" + text[pos + 1]))
                pos += 2
            elif c == '"':
                pos += 1
                break
            else:
                chars.append(c)
                pos += 1
        labels[key] = "".join(chars)


def _parse_value(text: str, line: str) -> float:
    parts = text.split()
    if not parts:
        raise DecodeError(f"missing value in {line[:120]!r}")
    try:
        return float(parts[0])  # float() reads NaN, +Inf, -Inf and exponents
    except ValueError:
        raise DecodeError(f"bad value {parts[0]!r} in {line[:120]!r}") from None


LABEL_CACHE_SIZE: Final = 2048
"""Label sets remembered by `_sample` (then it starts over): a scraper sees the same few label
sets on every scrape of every engine, and only the values change."""
LABEL_CACHE_MAX_CHARS: Final = 2048
"""Longer label sets are parsed every time, so a hostile page cannot fill the memory."""
_label_cache: dict[str, dict[str, str]] = {}


def _sample(line: str, name: str) -> Sample:
    """One exposition line of metric `name` (the line starts with it)."""
    rest = line[len(name) :]
    if rest.startswith("{"):
        # the label set ends at the line's last '}' (a value or timestamp never holds one)
        close = line.rfind("}")
        key = line[len(name) + 1 : close] if close > 0 else ""
        cached = _label_cache.get(key) if key else None
        if cached is not None:
            return Sample(name, dict(cached), _parse_value(line[close + 1 :], line))
        labels, end = _parse_labels(line, len(name) + 1, line)
        if key and end == close + 1 and len(key) <= LABEL_CACHE_MAX_CHARS:
            if len(_label_cache) >= LABEL_CACHE_SIZE:
                _label_cache.clear()
            _label_cache[key] = dict(labels)
        return Sample(name, labels, _parse_value(line[end:], line))
    if not rest.strip():
        raise DecodeError(f"line without a value: {line[:120]!r}")
    return Sample(name, {}, _parse_value(rest, line))


def _wanted_samples(text: str, wanted: Collection[str]) -> Iterator[Sample]:
    """The lines of the wanted metrics, found by searching for their names (C-speed `find`)
    instead of splitting the whole page: a vLLM page is mostly histogram buckets nobody wants.
    Samples come grouped by name, each group in page order."""
    n = len(text)
    for name in wanted:
        needle = "\n" + name
        k = len(name)
        start = 0 if text.startswith(name) else text.find(needle)
        if start > 0:
            start += 1
        while start >= 0:
            after = start + k
            c = text[after] if after < n else "\n"
            if c in "{ \t\r\n":  # this metric, not a longer name (`_total`, `_bucket`...)
                end = text.find("\n", after)
                yield _sample(text[start:] if end < 0 else text[start:end], name)
            nxt = text.find(needle, after)
            start = nxt + 1 if nxt >= 0 else -1


def parse_samples(text: str, wanted: Collection[str] | None = None) -> Iterator[Sample]:
    """Samples of a Prometheus text exposition, optionally only those named in `wanted`.

    Comment and blank lines are skipped; a malformed wanted line raises DecodeError. With
    `wanted`, lines of other metrics are never looked at (not even to check their syntax).
    """
    if wanted is not None:
        yield from _wanted_samples(text, wanted)
        return
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, end = _parse_labels(line, brace + 1, line)
            value = _parse_value(line[end:], line)
        else:
            if space < 0:
                raise DecodeError(f"line without a value: {line[:120]!r}")
            name = line[:space]
            labels = {}
            value = _parse_value(line[space:], line)
        yield Sample(name, labels, value)


def sample_name(line: str) -> str:
    """The metric name of one sample line: up to its labels or its value."""
    end = len(line)
    for sep in "{ \t":
        i = line.find(sep)
        if 0 <= i < end:
            end = i
    return line[:end]


def sample_names(text: str) -> set[str]:
    """The metric name of every sample line of an exposition (nothing else is parsed)."""
    return {sample_name(line) for line in text.splitlines() if line and line[0] != "#"}


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """vLLM's `lora_requests_info`: adapters being served or waiting, and the slot limit."""

    max_lora: int
    running: tuple[str, ...]
    waiting: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What a scheduler needs to know about one engine, from one /metrics scrape.

    Fields are None when the engine did not publish the metric. With several engine cores
    (data parallel) queue sizes and counters are summed and KV usage is the highest.
    """

    waiting: int | None = None
    running: int | None = None
    kv_cache_usage: float | None = None
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    lora: LoraInfo | None = None
    cache_config: dict[str, str] = field(default_factory=dict)
    prefill_seconds: float | None = None
    """Counter: seconds requests spent in prefill (`request_prefill_time_seconds_sum`)."""
    computed_tokens: float | None = None
    """Counter: prompt tokens the engine computed (`prompt_tokens_by_source{local_compute}`)."""
    external_tokens: float | None = None
    """Counter: prompt tokens loaded by a KV connector (`{source="external_kv_transfer"}`)."""
    kv_load_seconds: float | None = None
    """Counter: seconds of KV offload loads (`kv_offload_load_time`)."""

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


def _int_label(labels: dict[str, str], key: str) -> int | None:
    raw = labels.get(key)
    if raw is None or raw == "None":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DecodeError(f"label {key}={raw!r} is not an integer") from None


def _csv(raw: str | None) -> tuple[str, ...]:
    return tuple(s for s in (raw or "").split(",") if s)


def _add(current: float | None, value: float) -> float:
    return value if current is None else current + value


_BOUNDED = frozenset(
    {
        NUM_REQUESTS_WAITING,
        NUM_REQUESTS_RUNNING,
        KV_CACHE_USAGE_PERC,
        PREFIX_CACHE_HITS,
        PREFIX_CACHE_QUERIES,
        PROMPT_TOKENS_BY_SOURCE,
        KV_OFFLOAD_LOAD_TIME,
        REQUEST_PREFILL_TIME_SUM,
    }
)


def parse_engine_snapshot(text: str, *, counters: bool = True) -> EngineSnapshot:
    """Build an EngineSnapshot from a vLLM /metrics page; DecodeError on malformed input.
    Without `counters` the SNAPSHOT_COUNTERS are not looked for (their fields stay None).

    A non-finite or negative count, or a KV usage outside [0, 1], is malformed: it could only
    come from a broken or hostile server, and no scorer can use it."""
    waiting: float | None = None
    running: float | None = None
    kv: float | None = None
    hits: float | None = None
    queries: float | None = None
    cache_config: dict[str, str] = {}
    lora_best: tuple[float, dict[str, str]] | None = None
    prefill_s: float | None = None
    computed: float | None = None
    external: float | None = None
    load_s: float | None = None
    for s in parse_samples(text, _WITH_COUNTERS if counters else SNAPSHOT_METRICS):
        name, value = s.name, s.value
        if math.isnan(value):
            continue
        if name in _BOUNDED and (math.isinf(value) or value < 0):
            raise DecodeError(f"{name} is {value}: not a count")
        if name == KV_CACHE_USAGE_PERC and value > 1.0:
            raise DecodeError(f"{name} is {value}: not a fraction")
        if name == NUM_REQUESTS_WAITING:
            waiting = _add(waiting, value)
        elif name == NUM_REQUESTS_RUNNING:
            running = _add(running, value)
        elif name == KV_CACHE_USAGE_PERC:
            kv = value if kv is None else max(kv, value)
        elif name == PREFIX_CACHE_HITS:
            hits = _add(hits, value)
        elif name == PREFIX_CACHE_QUERIES:
            queries = _add(queries, value)
        elif name == CACHE_CONFIG_INFO:
            cache_config = s.labels
        elif name == LORA_REQUESTS_INFO and (lora_best is None or value > lora_best[0]):
            lora_best = (value, s.labels)
        elif name == PROMPT_TOKENS_BY_SOURCE:
            source = s.labels.get("source")
            if source == "local_compute":
                computed = _add(computed, value)
            elif source == "external_kv_transfer":
                external = _add(external, value)
        elif name == KV_OFFLOAD_LOAD_TIME:
            load_s = _add(load_s, value)
        elif name == REQUEST_PREFILL_TIME_SUM:
            prefill_s = _add(prefill_s, value)
    lora = None
    if lora_best is not None:
        labels = lora_best[1]
        lora = LoraInfo(
            max_lora=_int_label(labels, "max_lora") or 0,
            running=_csv(labels.get("running_lora_adapters")),
            waiting=_csv(labels.get("waiting_lora_adapters")),
        )
    return EngineSnapshot(
        waiting=None if waiting is None else int(waiting),
        running=None if running is None else int(running),
        kv_cache_usage=kv,
        prefix_cache_hits=hits,
        prefix_cache_queries=queries,
        block_size=_int_label(cache_config, "block_size"),
        num_gpu_blocks=_int_label(cache_config, "num_gpu_blocks"),
        lora=lora,
        cache_config=cache_config,
        prefill_seconds=prefill_s,
        computed_tokens=computed,
        external_tokens=external,
        kv_load_seconds=load_s,
    )


# --- other engines ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric name and the label values a series must have (`name{key=value,...}`)."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        """`name` or `name{key=value,key2="value"}` (llm-d's engineConfigs spec strings)."""
        text = text.strip()
        brace = text.find("{")
        if brace < 0:
            if not text or any(c in text for c in ' }"='):
                raise ValueError(f"not a metric spec: {text!r}")
            return cls(text)
        if not text.endswith("}") or brace == 0:
            raise ValueError(f"not a metric spec: {text!r}")
        pairs = []
        for part in text[brace + 1 : -1].split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"not a label matcher: {part!r} in {text!r}")
            pairs.append((key.strip(), value.strip().strip('"')))
        return cls(text[:brace], tuple(pairs))

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class EngineDialect:
    """Where one engine kind publishes what an EngineSnapshot holds (llm-d's core metrics
    extractor mappings). A field is None where the engine publishes nothing equivalent."""

    name: str
    waiting: MetricSpec | None = None
    running: MetricSpec | None = None
    kv_usage: MetricSpec | None = None
    cache_info: MetricSpec | None = None
    """An info metric whose labels give the block size and block count."""
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    block_size: MetricSpec | None = None
    """Or: the block size as a metric's value (TensorRT-LLM)."""
    num_blocks: MetricSpec | None = None
    lora: MetricSpec | None = None
    prefix_hits: MetricSpec | None = None
    prefix_queries: MetricSpec | None = None

    def specs(self) -> list[tuple[str, MetricSpec]]:
        fields = (
            "waiting",
            "running",
            "kv_usage",
            "cache_info",
            "block_size",
            "num_blocks",
            "lora",
            "prefix_hits",
            "prefix_queries",
        )
        out = []
        for f in fields:
            spec = getattr(self, f)
            if spec is not None:
                out.append((f, spec))
        return out


def _spec(text: str) -> MetricSpec:
    return MetricSpec.parse(text)


VLLM: Final = EngineDialect(
    "vllm",
    waiting=_spec(NUM_REQUESTS_WAITING),
    running=_spec(NUM_REQUESTS_RUNNING),
    kv_usage=_spec(KV_CACHE_USAGE_PERC),
    cache_info=_spec(CACHE_CONFIG_INFO),
    lora=_spec(LORA_REQUESTS_INFO),
    prefix_hits=_spec(PREFIX_CACHE_HITS),
    prefix_queries=_spec(PREFIX_CACHE_QUERIES),
)
SGLANG: Final = EngineDialect(
    "sglang",
    waiting=_spec("sglang:num_queue_reqs"),
    running=_spec("sglang:num_running_reqs"),
    kv_usage=_spec("sglang:token_usage"),
    cache_info=_spec("sglang:cache_config_info"),
    block_size_label="page_size",
    num_blocks_label="num_pages",
)
TRTLLM_SERVE: Final = EngineDialect(
    "trtllm-serve",
    waiting=_spec("trtllm_num_requests_waiting"),
    running=_spec("trtllm_num_requests_running"),
    kv_usage=_spec("trtllm_kv_cache_utilization"),
    block_size=_spec("trtllm_kv_cache_tokens_per_block"),
    num_blocks=_spec("trtllm_kv_cache_max_blocks"),
)
TRITON_TENSORRT_LLM: Final = EngineDialect(
    "triton-tensorrt-llm",
    waiting=_spec("nv_trt_llm_request_metrics{request_type=waiting}"),
    running=_spec("nv_trt_llm_request_metrics{request_type=scheduled}"),
    kv_usage=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
    block_size=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
    num_blocks=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
)
TRITON: Final = EngineDialect(
    "triton",
    waiting=_spec("nv_inference_pending_request_count"),
    running=_spec("nv_inference_exec_count"),
)
ENGINES: Final = {d.name: d for d in (VLLM, SGLANG, TRTLLM_SERVE, TRITON_TENSORRT_LLM, TRITON)}
"""The engine kinds llm-d's `defaultEngine` and `llm-d.ai/engine-type` label name."""


def dialect_sample_names(dialect: EngineDialect) -> frozenset[str]:
    """Every sample name `parse_dialect_snapshot` reads for `dialect` (with its counters): what a
    scraper can ask an engine for instead of the whole page."""
    if dialect is VLLM:
        return _WITH_COUNTERS
    return frozenset(spec.name for _, spec in dialect.specs())


def parse_dialect_snapshot(
    text: str, dialect: EngineDialect, *, counters: bool = True
) -> EngineSnapshot:
    """An EngineSnapshot from a /metrics page in `dialect`'s names (DecodeError as for vLLM).
    The SNAPSHOT_COUNTERS are vLLM's: other dialects never carry them."""
    if dialect is VLLM:
        return parse_engine_snapshot(text, counters=counters)
    by_name: dict[str, list[tuple[str, MetricSpec]]] = {}
    for field_name, spec in dialect.specs():
        by_name.setdefault(spec.name, []).append((field_name, spec))
    values: dict[str, float] = {}
    info: dict[str, str] = {}
    for s in parse_samples(text, by_name):
        if math.isnan(s.value):
            continue
        for field_name, spec in by_name[s.name]:
            if not spec.matches(s.labels):
                continue
            if field_name == "cache_info":
                info = s.labels
                continue
            if math.isinf(s.value) or s.value < 0:
                raise DecodeError(f"{s.name} is {s.value}: not a count")
            if field_name == "kv_usage":
                if s.value > 1.0:
                    raise DecodeError(f"{s.name} is {s.value}: not a fraction")
                values[field_name] = max(values.get(field_name, 0.0), s.value)
            elif field_name in ("block_size", "num_blocks"):
                values[field_name] = s.value
            else:
                values[field_name] = values.get(field_name, 0.0) + s.value
    block_size = _int_label(info, dialect.block_size_label) if info else None
    num_blocks = _int_label(info, dialect.num_blocks_label) if info else None
    if "block_size" in values:
        block_size = int(values["block_size"])
    if "num_blocks" in values:
        num_blocks = int(values["num_blocks"])
    waiting = values.get("waiting")
    running = values.get("running")
    return EngineSnapshot(
        waiting=None if waiting is None else int(waiting),
        running=None if running is None else int(running),
        kv_cache_usage=values.get("kv_usage"),
        prefix_cache_hits=values.get("prefix_hits"),
        prefix_cache_queries=values.get("prefix_queries"),
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        cache_config=info,
    )
