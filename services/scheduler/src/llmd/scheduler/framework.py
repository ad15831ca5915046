"""The plugin framework: request and endpoint types, the plugin kinds, and the type registry.

A plugin is one class with a `type_name`, an optional `Params` model (strictly validated, camelCase
keys as in llm-d's YAML) and one method per extension point it implements:

    @register
    class QueueScorer(Scorer):
        type_name = "queue-scorer"

        def score(self, request, endpoints):
            ...return one float per endpoint, clamped to [0, 1] by the framework

Plugins receive a `PluginHandle` (the endpoint datastore and the scheduler-wide settings) at
construction; they never reach for globals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from prometheus_client import CollectorRegistry

from llmd.protocol.metrics import EngineSnapshot
from llmd.protocol.openai import Usage
from llmd.runtime.config import StrictModel
from llmd.runtime.discovery import Endpoint
from llmd.runtime.enginepool import is_fresh


class PluginParams(StrictModel):
    """Base for plugin parameters: unknown keys are errors, llm-d's camelCase keys accepted."""


class NoParams(PluginParams):
    """For plugins without parameters."""


# --- endpoints -----------------------------------------------------------------------------


FAILURE_BACKOFF_S = 0.5
FAILURE_BACKOFF_MAX_S = 10.0


class EndpointState:
    """What the scheduler knows about one endpoint: scraped metrics plus its own accounting.

    `unseen` are requests this scheduler sent after the endpoint's last scrape started, so the
    scraped queue cannot contain them yet; load scorers add them (llm-d's herding fix). An
    entry leaves when a later scrape covers it or when its request completes, whichever is
    first (a short request can finish between two scrapes and must not linger as load).
    """

    __slots__ = (
        "_pick_seq",
        "consecutive_failures",
        "counters",
        "counters_at",
        "endpoint",
        "failed_until",
        "failure_streak",
        "inflight_requests",
        "inflight_tokens",
        "key",
        "last_error",
        "loaded_models",
        "metrics",
        "metrics_at",
        "page",
        "unseen",
        "unseen_tokens",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.key = endpoint.host_port
        self.metrics: EngineSnapshot | None = None
        self.metrics_at = 0.0  # monotonic time of the last good scrape (0 = never)
        self.counters: EngineSnapshot | None = None
        """The last snapshot that carried the engine's counters (read about once a second)."""
        self.counters_at = -math.inf
        """When the counters were last asked for."""
        self.page: tuple[str, EngineSnapshot, bool] | None = None
        """The last `/metrics` page parsed, its snapshot, and whether the counters were read
        from it: an unchanged page (an idle engine) is not parsed again."""
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.inflight_requests = 0
        self.inflight_tokens = 0
        # pick id -> (pick time, tokens), oldest first (dicts keep insertion order)
        self.unseen: dict[int, tuple[float, int]] = {}
        self.unseen_tokens = 0
        self._pick_seq = 0
        self.loaded_models: frozenset[str] = frozenset()
        self.failed_until = 0.0  # monotonic time until which the endpoint is held out
        self.failure_streak = 0

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.endpoint.labels)

    def fresh(self, now: float, threshold_s: float) -> bool:
        return is_fresh(self.metrics_at, now, threshold_s)

    def note_failure(self, now: float) -> None:
        """A failed scrape or a 5xx answer: hold the endpoint out of the candidates for a
        backoff that doubles with each consecutive failure (0.5 s up to 10 s)."""
        self.failure_streak += 1
        backoff = min(FAILURE_BACKOFF_MAX_S, FAILURE_BACKOFF_S * 2 ** (self.failure_streak - 1))
        self.failed_until = now + backoff

    def note_success(self) -> None:
        self.failure_streak = 0
        self.failed_until = 0.0

    def usable(self, now: float, threshold_s: float) -> bool:
        """Fresh metrics and not held out after a failure."""
        return self.fresh(now, threshold_s) and self.failed_until <= now

    @property
    def waiting(self) -> int:
        """Scraped waiting queue plus the requests sent since that scrape."""
        scraped = self.metrics.waiting if self.metrics and self.metrics.waiting else 0
        return scraped + len(self.unseen)

    @property
    def running(self) -> int:
        return self.metrics.running if self.metrics and self.metrics.running else 0

    @property
    def kv_usage(self) -> float:
        """Scraped KV usage plus the blocks the unseen requests will take (estimated)."""
        m = self.metrics
        if m is None or m.kv_cache_usage is None:
            return 0.0
        extra = 0.0
        if self.unseen_tokens and m.num_gpu_blocks and m.block_size:
            extra = self.unseen_tokens / (m.num_gpu_blocks * m.block_size)
        return min(1.0, m.kv_cache_usage + extra)

    def note_pick(self, tokens: int, now: float, limit: int = 4096) -> int:
        """Record a request sent here; visible to load scorers until the next scrape.

        Returns the pick id to hand to `note_done`. At most `limit` entries are kept.
        """
        if len(self.unseen) >= limit:
            oldest = next(iter(self.unseen))
            self.unseen_tokens -= self.unseen.pop(oldest)[1]
        self._pick_seq += 1
        self.unseen[self._pick_seq] = (now, tokens)
        self.unseen_tokens += tokens
        return self._pick_seq

    def note_done(self, pick_id: int) -> None:
        """The request finished: if no scrape has covered it yet, it stops counting now."""
        entry = self.unseen.pop(pick_id, None)
        if entry is not None:
            self.unseen_tokens -= entry[1]

    def note_scrape(self, started_at: float, snapshot: EngineSnapshot, now: float) -> None:
        """A scrape that started at `started_at` sees every request picked before it."""
        self.metrics = snapshot
        self.metrics_at = now
        if (
            snapshot.prefill_seconds is not None
            or snapshot.computed_tokens is not None
            or snapshot.kv_load_seconds is not None
        ):
            self.counters = snapshot
        self.last_error = None
        self.consecutive_failures = 0
        covered = []
        for pick_id, (t, tokens) in self.unseen.items():
            if t > started_at:
                break
            covered.append(pick_id)
            self.unseen_tokens -= tokens
        for pick_id in covered:
            del self.unseen[pick_id]

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-able view for the debug endpoints."""
        m = self.metrics
        return {
            "name": self.name,
            "address": self.key,
            "labels": self.labels,
            "metrics_age_s": round(now - self.metrics_at, 3) if self.metrics_at else None,
            "held_out_s": round(self.failed_until - now, 3) if self.failed_until > now else 0,
            "waiting": m.waiting if m else None,
            "running": m.running if m else None,
            "kv_cache_usage": m.kv_cache_usage if m else None,
            "block_size": m.block_size if m else None,
            "num_gpu_blocks": m.num_gpu_blocks if m else None,
            "unseen_requests": len(self.unseen),
            "inflight_requests": self.inflight_requests,
            "inflight_tokens": self.inflight_tokens,
            "loaded_models": sorted(self.loaded_models),
            "last_error": self.last_error,
        }


# --- requests ------------------------------------------------------------------------------


StateT = TypeVar("StateT")


@dataclass(slots=True)
class PrefixMatch:
    """How many of a request's prefix blocks an endpoint holds (llm-d's PrefixCacheMatchInfo)."""

    match_blocks: int
    total_blocks: int
    block_size_tokens: int

    @property
    def tokens(self) -> int:
        """The prompt tokens the matched blocks hold."""
        return self.match_blocks * self.block_size_tokens


APPROX_PRODUCER = "approx-prefix-cache-producer"
PRECISE_PRODUCER = "precise-prefix-cache-producer"


def prefix_matches(
    request: LLMRequest, producer: str = APPROX_PRODUCER
) -> dict[str, PrefixMatch] | None:
    """The `PrefixMatch` per endpoint that `producer` wrote. Consumers name the approximate
    producer by default (llm-d's default); when a config has the precise one instead (the
    builder then adds no approximate one), its data answers for that default name."""
    got = request.prefix.get(producer)
    if got is None and producer == APPROX_PRODUCER:
        got = request.prefix.get(PRECISE_PRODUCER)
    return got


def uncached_tokens(
    request: LLMRequest, matches: Mapping[str, PrefixMatch] | None, key: str
) -> int:
    """The prompt tokens endpoint `key` would have to compute: the request's, less its prefix
    hit there (`matches` from `prefix_matches`; none = nothing cached)."""
    m = matches.get(key) if matches else None
    return max(0, request.prompt_tokens - (m.tokens if m is not None else 0))


@dataclass(slots=True)
class LLMRequest:
    """One inference request as the scheduler sees it."""

    request_id: str
    path: str
    headers: dict[str, str]
    body: bytes
    model: str = ""
    target_model: str = ""
    stream: bool = False
    max_tokens: int | None = None
    cache_salt: str = ""
    prompt_bytes: list[bytes] = field(default_factory=list)
    """Per prompt, the bytes the token estimate packs (4 bytes = 1 pseudo-token) or real ids."""
    prompt_tokens: int = 0
    media_items: int = 0
    """A chat's multimodal content parts (images, audio, video): what an encoder works on."""
    head: tuple[tuple[str, str], ...] = ()
    """A chat's leading system/developer messages as (role, text): what a pool's requests
    share (learned as hot prompts for warm starts)."""
    parsed: bool = False
    received_at: float = field(default_factory=time.monotonic)
    prefix: dict[str, dict[str, PrefixMatch]] = field(default_factory=dict)
    """Prefix matches per endpoint key, written by each prefix producer under its name."""
    usage: Usage | None = None
    """The response's usage (set when the response completes)."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers plugins add to the response (the gateway sets them; e.g. x-session-token)."""
    timing: tuple[float, float, int] | None = None
    """(TTFT, end-to-end seconds, output tokens) once the response completed naturally."""
    fairness_id: str = ""
    """llm-d's fairness id (header x-llm-d-inference-fairness-id, or the x-gateway- alias)."""
    objective: str = ""
    """The InferenceObjective named by x-llm-d-inference-objective (or the x-gateway- alias)."""
    priority: int = 0
    """The objective's priority (0 without an objective, as in llm-d)."""
    _state: dict[str, object] = field(default_factory=dict)

    def state(self, owner: str, kind: type[StateT]) -> StateT:
        """The per-request state plugin `owner` keeps in its own type `kind` (created empty on
        first use); another type under the same owner is a programming error."""
        got = self._state.get(owner)
        if got is None:
            got = self._state[owner] = kind()
        if not isinstance(got, kind):
            raise TypeError(f"{owner} state is {type(got).__name__}, not {kind.__name__}")
        return got

    def state_items(self) -> list[tuple[str, object]]:
        """Every plugin's per-request state, by owner."""
        return list(self._state.items())

    def header(self, name: str, *aliases: str) -> str | None:
        for key in (name, *aliases):
            value = self.headers.get(key)
            if value is not None:
                return value
        return None


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: EndpointState
    score: float


@dataclass(slots=True)
class ProfileResult:
    """One profile's outcome: the ordered picks, every scored candidate, and the explanation."""

    targets: list[EndpointState]
    scored: list[ScoredEndpoint]
    explain: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SchedulingResult:
    profiles: dict[str, ProfileResult]
    primary: str
    port: int = 0
    """0: each target is reached on its own port. Else the gateway sends to this port on
    each target's address: data-parallel ranks behind one sidecar listener (llm-d's
    `primaryPort`), the picked rank named in x-data-parallel-host-port."""

    def destination(self, endpoint: EndpointState) -> str:
        """Where the gateway sends a request meant for `endpoint`."""
        if not self.port:
            return endpoint.key
        address = endpoint.endpoint.address
        return f"[{address}]:{self.port}" if ":" in address else f"{address}:{self.port}"

    @property
    def targets(self) -> list[EndpointState]:
        return self.profiles[self.primary].targets


class SchedulingError(Exception):
    """A request that cannot be routed: the HTTP status, the dropped reason header, a message."""

    def __init__(self, status: int, message: str, dropped_reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.dropped_reason = dropped_reason


# --- plugins -------------------------------------------------------------------------------


@dataclass
class PluginHandle:
    """What a plugin may use: the endpoint pool, and the clock its scrape times are on."""

    endpoints: Callable[[], Sequence[EndpointState]]
    clock: Callable[[], float] = time.monotonic


ParamsT = TypeVar("ParamsT", bound=PluginParams)


class Plugin(Generic[ParamsT]):
    """Base of every plugin, generic over its parameters (`Scorer[MyParams]`). Subclasses set
    `type_name` and, if configurable, `Params` (the same model as the type argument)."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = NoParams
    """The model `parameters` are validated with; the instance's `params` is one of these."""
    experimental: ClassVar[bool] = False

    def __init__(self, name: str, params: ParamsT, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.handle = handle

    def state(self) -> dict[str, Any]:
        """Internal state for GET /debug/plugins/state (override to expose more)."""
        return {}

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add this plugin's metric families to the scheduler's registry (once, at build)."""
        return

    def endpoints_changed(self, live: set[str]) -> None:
        """The pool changed; `live` holds the keys (host:port) of the endpoints now in it."""
        return


class Filter(Plugin[ParamsT]):
    saturation: ClassVar[bool] = False
    """True for a filter that drops endpoints for load: when it leaves none, the request is
    rejected as saturated (429) rather than unroutable (503)."""

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        raise NotImplementedError


class Scorer(Plugin[ParamsT]):
    category: ClassVar[str] = "distribution"

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        """One score per endpoint, in the same order; the framework clamps to [0, 1]."""
        raise NotImplementedError


class Picker(Plugin[ParamsT]):
    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[EndpointState]:
        """The chosen endpoints, best first (more than one = an ordered fallback list)."""
        raise NotImplementedError


class DataProducer(Plugin[ParamsT]):
    """Computes per-request data (e.g. prefix matches) before scoring."""

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        raise NotImplementedError


class Admitter(Plugin[ParamsT]):
    """Runs after the producers, before the profiles: may refuse a request early (429)."""

    needs: ClassVar[tuple[str, ...]] = ()
    """Producer types this admitter reads (created by default when the config has none)."""

    def admit(self, request: LLMRequest, endpoints: list[EndpointState]) -> str | None:
        """None to admit, or why the request is refused."""
        raise NotImplementedError


class LoadEstimator(Plugin[ParamsT]):
    """Says how many tokens of load a request puts on the endpoint it is sent to (counted at
    pick time, released at completion). Without one: uncached prompt tokens."""

    def tokens(self, request: LLMRequest, cached_tokens: int) -> int:
        raise NotImplementedError


class AsyncDataProducer(DataProducer[ParamsT]):
    """A producer whose data needs I/O (a shared index, a remote indexer): `prefetch` runs on
    the event loop before scheduling, then `produce` fills the request's fields without
    blocking."""

    async def prefetch(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        raise NotImplementedError


class Lifecycle(Plugin[ParamsT]):
    """A plugin with background work (subscriptions, timers): started and stopped with the app."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class PreRequest(Plugin[ParamsT]):
    """Runs once the request's endpoints are chosen, before it is forwarded."""

    def pre_request(
        self, request: LLMRequest, result: SchedulingResult
    ) -> Mapping[str, str] | None:
        """Record the decision; headers returned here are added to the forwarded request
        (P/D uses this for `x-prefiller-host-port`)."""
        raise NotImplementedError


class ResponseHook(Plugin[ParamsT]):
    """Sees the response: headers, then completion (with usage, once, whatever the outcome)."""

    def response_headers(
        self, request: LLMRequest, status: int, endpoint: EndpointState | None
    ) -> None:
        return None

    def first_token(self, request: LLMRequest, endpoint: EndpointState | None) -> None:
        return None

    def response_complete(
        self, request: LLMRequest, endpoint: EndpointState | None, cause: str
    ) -> None:
        """`cause` is natural, client-disconnect, error or rejected."""
        return


class ProfileHandler(Plugin[ParamsT]):
    def pick_profiles(
        self, request: LLMRequest, profiles: Sequence[str], results: dict[str, ProfileResult | None]
    ) -> list[str]:
        raise NotImplementedError

    def process_results(
        self, request: LLMRequest, results: dict[str, ProfileResult | None]
    ) -> SchedulingResult:
        raise NotImplementedError


# --- registry ------------------------------------------------------------------------------


class PluginRegistry:
    """Plugin classes by type string, plus deprecated aliases."""

    def __init__(self) -> None:
        self._types: dict[str, type[Plugin[Any]]] = {}
        self._aliases: dict[str, str] = {}

    def add(self, cls: type[Plugin[Any]], *aliases: str) -> None:
        if not cls.type_name:
            raise ValueError(f"{cls.__name__} has no type_name")
        if cls.type_name in self._types:
            raise ValueError(f"plugin type {cls.type_name!r} registered twice")
        self._types[cls.type_name] = cls
        for alias in aliases:
            self._aliases[alias] = cls.type_name

    def resolve(self, type_name: str) -> tuple[type[Plugin[Any]] | None, str | None]:
        """The class for a type string, and the canonical name when it was an alias."""
        if type_name in self._types:
            return self._types[type_name], None
        canonical = self._aliases.get(type_name)
        if canonical is not None:
            return self._types[canonical], canonical
        return None, None

    def types(self) -> list[str]:
        return sorted(self._types)


def clamp01(value: float) -> float:
    if value != value:  # NaN scores count as 0
        return 0.0
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value
