"""Built-in scorers (behaviour per llm-d; every score is clamped to [0, 1] by the framework)."""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from typing import Any, ClassVar, Literal

from pydantic import Field

from llmd.scheduler.framework import (
    APPROX_PRODUCER,
    EndpointState,
    LLMRequest,
    NoParams,
    PluginParams,
    PrefixMatch,
    PreRequest,
    SchedulingResult,
    Scorer,
    prefix_matches,
)


def _min_max_inverted(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


class QueueScorer(Scorer[NoParams]):
    """Shorter waiting queues score higher: (max - q) / (max - min); all equal -> 1."""

    type_name = "queue-scorer"

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        return _min_max_inverted([float(e.waiting) for e in endpoints])


class RunningRequestsSizeScorer(Scorer[NoParams]):
    """Fewer running requests score higher (min-max over the candidates)."""

    type_name = "running-requests-size-scorer"

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        return _min_max_inverted([float(e.running) for e in endpoints])


class KVCacheUtilizationScorer(Scorer[NoParams]):
    """1 - KV-cache usage (usage includes the blocks of requests sent since the scrape)."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        return [1.0 - e.kv_usage for e in endpoints]


class LoadAwareParams(PluginParams):
    threshold: int = Field(default=128, gt=0)


class LoadAwareScorer(Scorer[LoadAwareParams]):
    """Empty queue -> 0.5; otherwise 0.5 * (1 - min(q, threshold) / threshold) (llm-d's scale)."""

    type_name = "load-aware-scorer"
    Params = LoadAwareParams

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        t = self.params.threshold
        return [0.5 if e.waiting == 0 else 0.5 * (1 - min(e.waiting, t) / t) for e in endpoints]


class ActiveRequestParams(PluginParams):
    idle_threshold: int = Field(default=0, ge=0, alias="idleThreshold")
    max_busy_score: float = Field(default=1.0, ge=0, le=1, alias="maxBusyScore")
    request_timeout: str | None = Field(default=None, alias="requestTimeout")


class ActiveRequestScorer(Scorer[ActiveRequestParams]):
    """In-flight requests from this scheduler: idle -> 1, else (max - n) / max * maxBusyScore."""

    type_name = "active-request-scorer"
    Params = ActiveRequestParams

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        p = self.params
        counts = [e.inflight_requests for e in endpoints]
        top = max(counts)
        out = []
        for n in counts:
            if n <= p.idle_threshold:
                out.append(1.0)
            else:
                out.append((top - n) / top * p.max_busy_score if top else 1.0)
        return out


class TokenLoadParams(PluginParams):
    queue_threshold_tokens: int = Field(default=4_194_304, gt=0, alias="queueThresholdTokens")


class TokenLoadScorer(Scorer[TokenLoadParams]):
    """1 - min(1, in-flight tokens / queueThresholdTokens)."""

    type_name = "token-load-scorer"
    Params = TokenLoadParams

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        t = self.params.queue_threshold_tokens
        return [1.0 - min(1.0, e.inflight_tokens / t) for e in endpoints]


class PrefixScorerParams(PluginParams):
    match_length_weight: float = Field(default=0.0, ge=0, le=1, alias="matchLengthWeight")
    match_length_scale_tokens: int = Field(default=8192, gt=0, alias="matchLengthScaleTokens")
    prefix_match_info_producer_name: str = Field(
        default=APPROX_PRODUCER, alias="prefixMatchInfoProducerName"
    )


class PrefixCacheScorer(Scorer[PrefixScorerParams]):
    """w * min(1, matched tokens / scale)^2 + (1 - w) * matched blocks / total blocks."""

    type_name = "prefix-cache-scorer"
    category = "affinity"
    Params = PrefixScorerParams

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        p = self.params
        matches = prefix_matches(request, p.prefix_match_info_producer_name)
        if not matches:
            return [0.0] * len(endpoints)
        w, scale = p.match_length_weight, p.match_length_scale_tokens
        out = []
        for e in endpoints:
            m = matches.get(e.key)
            if m is None or m.total_blocks == 0:
                out.append(0.0)
                continue
            ratio = m.match_blocks / m.total_blocks
            if w:
                length = min(1.0, m.tokens / scale) ** 2
                out.append(w * length + (1 - w) * ratio)
            else:
                out.append(ratio)
        return out


class NoHitLRUParams(PluginParams):
    lru_size: int = Field(default=1024, gt=0, alias="lruSize")
    prefix_match_info_producer_name: str = Field(
        default=APPROX_PRODUCER, alias="prefixMatchInfoProducerName"
    )


class NoHitLRUScorer(Scorer[NoHitLRUParams], PreRequest[NoHitLRUParams]):
    """Cold requests (no prefix hit anywhere) go to the least recently used endpoint first."""

    type_name = "no-hit-lru-scorer"
    Params = NoHitLRUParams

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._lru: OrderedDict[str, None] = OrderedDict()

    def _cold(self, request: LLMRequest) -> bool:
        p = self.params
        matches: dict[str, PrefixMatch] = (
            prefix_matches(request, p.prefix_match_info_producer_name) or {}
        )
        return not any(m.match_blocks > 0 for m in matches.values())

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        if not self._cold(request):
            return [0.5] * len(endpoints)
        n = len(endpoints)
        if n == 1:
            return [1.0]
        age = {key: i for i, key in enumerate(self._lru)}  # 0 = least recently used
        order = sorted(
            range(n), key=lambda i: (endpoints[i].key in age, age.get(endpoints[i].key, 0))
        )
        out = [0.0] * n
        for rank, i in enumerate(order):
            out[i] = 1.0 - rank / (n - 1)
        return out

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if not self._cold(request):
            return
        p = self.params
        for profile in (result.primary, "prefill"):
            r = result.profiles.get(profile)
            if r is not None and r.targets:
                key = r.targets[0].key
                self._lru.pop(key, None)
                self._lru[key] = None
                while len(self._lru) > p.lru_size:
                    self._lru.popitem(last=False)

    def state(self) -> dict[str, Any]:
        return {"lru_oldest_first": list(self._lru)}


class LoraAffinityScorer(Scorer[NoParams]):
    """Adapter already active -> 1; a free adapter slot -> 0.8; only waiting -> 0.6; else 0."""

    type_name = "lora-affinity-scorer"
    category = "affinity"

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        model = request.target_model
        out = []
        for e in endpoints:
            lora = e.metrics.lora if e.metrics else None
            active = set(lora.running) if lora else set()
            waiting = set(lora.waiting) if lora else set()
            if model in active or model in e.loaded_models:
                out.append(1.0)
            elif lora is not None and len(active) + len(waiting) < lora.max_lora:
                out.append(0.8)
            elif model in waiting:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


class SessionAffinityParams(PluginParams):
    strategy: Literal["session_id", "encoded_endpoint_header"] = "session_id"
    """`session_id`: the client sends an id (header `x-session-id`) and the scheduler remembers
    where it went (TTL map). `encoded_endpoint_header`: the scheduler answers with
    `x-session-token` naming the endpoint (base64 of `namespace/name`), and the client sends it
    back; nothing is stored, so it survives scheduler restarts and replicas (llm-d's default)."""
    header_name: str | None = Field(default=None, alias="headerName")
    eviction_ttl_seconds: float = Field(default=300, gt=0, alias="evictionTtlSeconds")
    eviction_sweep_seconds: float = Field(default=10, gt=0, alias="evictionSweepSeconds")
    max_sessions: int = Field(default=100_000, gt=0, alias="maxSessions")
    profile_name: str | None = Field(default=None, alias="profileName")

    @property
    def header(self) -> str:
        if self.header_name:
            return self.header_name.lower()
        return SESSION_TOKEN if self.strategy == "encoded_endpoint_header" else SESSION_ID


SESSION_ID = "x-session-id"
SESSION_TOKEN = "x-session-token"
MAX_TOKEN_CHARS = 512


def encode_endpoint(e: EndpointState) -> str:
    ep = e.endpoint
    return base64.urlsafe_b64encode(f"{ep.namespace}/{ep.name}".encode()).decode()


def decode_endpoint(token: str) -> str | None:
    """`namespace/name` from a session token, or None for anything malformed (clients send
    it back, so it is untrusted input)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        text = raw.decode()
    except (binascii.Error, ValueError):
        return None
    return text if "/" in text else None


class SessionAffinityScorer(Scorer[SessionAffinityParams], PreRequest[SessionAffinityParams]):
    """1 for the endpoint the session is pinned to, else 0 (llm-d's two strategies)."""

    type_name = "session-affinity-scorer"
    category = "affinity"
    Params = SessionAffinityParams
    experimental: ClassVar[bool] = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _session(self, request: LLMRequest) -> str | None:
        return request.headers.get(self.params.header)

    def pinned(self, request: LLMRequest) -> str | None:
        """The endpoint key (session_id) or `namespace/name` (token) the session is pinned to."""
        sid = self._session(request)
        if sid is None:
            return None
        if self.params.strategy == "encoded_endpoint_header":
            return decode_endpoint(sid)
        hit = self._sessions.get(sid)
        ttl = self.params.eviction_ttl_seconds
        if hit is None or time.monotonic() - hit[1] > ttl:
            return None
        return hit[0]

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        key = self.pinned(request)
        if key is None:
            return [0.0] * len(endpoints)
        if self.params.strategy == "encoded_endpoint_header":
            return [
                1.0 if f"{e.endpoint.namespace}/{e.endpoint.name}" == key else 0.0
                for e in endpoints
            ]
        return [1.0 if e.key == key else 0.0 for e in endpoints]

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        profile = self.params.profile_name or result.primary
        r = result.profiles.get(profile)
        if r is None or not r.targets:
            return
        target = r.targets[0]
        if self.params.strategy == "encoded_endpoint_header":
            request.response_headers[SESSION_TOKEN] = encode_endpoint(target)
            return
        sid = self._session(request)
        if sid is None:
            return
        self._sessions.pop(sid, None)
        self._sessions[sid] = (target.key, time.monotonic())
        while len(self._sessions) > self.params.max_sessions:
            self._sessions.popitem(last=False)

    def state(self) -> dict[str, Any]:
        return {"strategy": self.params.strategy, "sessions": len(self._sessions)}


SCORERS = (
    QueueScorer,
    RunningRequestsSizeScorer,
    KVCacheUtilizationScorer,
    LoadAwareScorer,
    ActiveRequestScorer,
    TokenLoadScorer,
    PrefixCacheScorer,
    NoHitLRUScorer,
    LoraAffinityScorer,
    SessionAffinityScorer,
)
