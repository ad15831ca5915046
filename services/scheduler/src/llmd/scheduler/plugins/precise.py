"""`precise-prefix-cache-producer`: prefix matches from the engines' own KV events.

The approximate producer guesses where KV lives from where requests went; this one knows. It
subscribes to every endpoint's KV events (the endpoint's `llmd.ai/kv-events-endpoint` label, or
`tcp://<address>:<socketPort>`), keeps a `llmd.kvcache` index (in this process, or on a Valkey
server shared with other scheduler replicas, or in a remote `llmd-indexer`), tokenizes each
prompt exactly as the engine does, and writes a `PrefixMatch` per endpoint for
`prefix-cache-scorer`. Its parameters are llm-d-kv-cache's (`llmd.kvcache.config`), and the
stack is built by `llmd.kvcache.stack`, the same builder llmd-indexer uses.

Remote mode (`indexerUrl`) builds no local index: it computes request keys here and sends
scoring, speculative entries and index-health observations to the indexer's HTTP API; each
failed call is logged and counted (`errors` in /debug/plugins/state), never hidden.

A hit on a shared KV volume (llmd-fs-offload, endpoints labelled `llmd.ai/storage-domain`) is
weighted by the `storage` tier's weight. Unless `kvCacheBackendConfigs` names `storage`, that
weight is measured (`llmd.scheduler.tiercost`): one minus the engines' reload time per token over
their recompute time per token, refreshed every second from the scraped counters, exported as
`llmd_precise_prefix_storage_weight` with its inputs and shown in /debug/plugins/state.

After each decision it adds speculative entries for the chosen endpoint (TTL `speculativeTTL`),
so a burst of requests sharing a new prefix does not herd before the engine's events arrive. On
every response it compares the engine's `cached_tokens` with the prediction and lets the
indexer down-weight and resync endpoints whose index is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from pydantic import Field, model_validator

from llmd.kvcache.api import IndexerClient, ObserveRequest, ScoreRequest
from llmd.kvcache.config import KVCacheConfig
from llmd.kvcache.index import PrefixHit
from llmd.kvcache.indexer import confirmed_gpu_blocks
from llmd.kvcache.stack import (
    EngineAddress,
    KVCacheStack,
    RequestKeys,
    build_kvcache,
    build_request_keys,
)
from llmd.kvcache.tokenization import TokenizerError
from llmd.runtime.breaker import CircuitBreaker
from llmd.runtime.config import Seconds
from llmd.runtime.fastmetrics import Counter, Gauge, Histogram
from llmd.runtime.tasks import cancel_tasks
from llmd.scheduler.framework import (
    AsyncDataProducer,
    EndpointState,
    Lifecycle,
    LLMRequest,
    PluginHandle,
    PluginParams,
    PrefixMatch,
    PreRequest,
    ResponseHook,
    SchedulingResult,
)
from llmd.scheduler.tiercost import StorageCost, StorageWeightEstimator

log = logging.getLogger(__name__)

INLINE_TOKENIZE_BYTES = 65_536
"""Bodies up to this size are tokenized on the event loop (well under a millisecond); larger
ones in a worker thread, so one huge prompt never stalls routing or response passthrough."""

PRODUCER = "precise-prefix-cache-producer"

STORAGE_TIER = "storage"
STORAGE_WEIGHT_REFRESH_S = 1.0
STORAGE_DOMAIN_LABEL = "llmd.ai/storage-domain"
"""Pods with the same value mount the same shared KV volume (llmd-fs-offload)."""


def storage_domains(endpoints: list[EndpointState]) -> dict[str, str]:
    """Pod -> storage domain of the endpoints that carry the label."""
    out = {}
    for e in endpoints:
        domain = e.endpoint.labels.get(STORAGE_DOMAIN_LABEL)
        if domain:
            out[e.key] = domain
    return out


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the index predicted for the chosen pod, checked against the engine's usage."""

    pod: str
    confirmed_tokens: int
    """Tokens in blocks the pod's events confirmed on the GPU tier."""
    speculative_tokens: int
    """Tokens in blocks including those only just routed there."""


@dataclass(slots=True)
class PreciseState:
    """Per request: the prompt's request keys, the pods' hits, the prediction."""

    keys: list[int] | None = None
    hits: dict[str, PrefixHit] | None = None
    prediction: Prediction | None = None


class PreciseParams(PluginParams, KVCacheConfig):
    """llm-d-kv-cache's configuration, plus where a remote llmd-indexer runs."""

    indexer_url: str | None = Field(default=None, alias="indexerUrl")
    """Use a remote llmd-indexer (HTTP) instead of the embedded index and subscriptions."""
    indexer_write_url: str | None = Field(default=None, alias="indexerWriteUrl")
    """The indexer's write routes (its --write-port): speculative entries and index-health
    observations go there. Without it, remote mode only scores."""
    indexer_token: str | None = Field(default=None, alias="indexerToken")
    """The bearer token the indexer requires (its --api-token), if any."""
    lookup_timeout: Seconds = Field(default=0.1, gt=0, alias="lookupTimeout")
    """A lookup in a shared index or a remote indexer taking longer is abandoned (the request
    is routed without precise prefix data); failures open a circuit breaker that skips lookups
    for 1 s, doubling to 30 s while they keep failing."""

    @model_validator(mode="after")
    def _needs_tokenizer(self) -> PreciseParams:
        if self.tokenizer is None:
            raise ValueError(
                "tokenizer is required: give tokenizer.modelDir (a tokenizer directory) or "
                "tokenizer.renderUrl (a vLLM server)"
            )
        return self


class _Message(msgspec.Struct):
    role: str = "user"
    content: Any = None


class _PromptView(msgspec.Struct):
    prompt: Any = None
    messages: list[_Message] | None = None


_view = msgspec.json.Decoder(_PromptView)


class PreciseProducer(
    AsyncDataProducer[PreciseParams],
    PreRequest[PreciseParams],
    ResponseHook[PreciseParams],
    Lifecycle[PreciseParams],
):
    """Prefix matches from the engines' KV events (embedded index, Valkey, or llmd-indexer)."""

    type_name = PRODUCER
    Params = PreciseParams

    def __init__(self, name: str, params: PreciseParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        p = params
        self.p = p
        self.remote = p.indexer_url.rstrip("/") if p.indexer_url else None
        self.stack: KVCacheStack | None = None
        self.client: IndexerClient | None = None
        try:
            if self.remote is not None:
                self.keymaker: RequestKeys = build_request_keys(p)
                self.client = IndexerClient(
                    self.remote, token=p.indexer_token, write_url=p.indexer_write_url
                )
            else:
                self.stack = build_kvcache(p)
                self.keymaker = self.stack.keys
        except TokenizerError as exc:
            raise ValueError(str(exc)) from None
        self.breaker = CircuitBreaker(base_s=1.0, max_s=30.0)
        self._prompt_tokens: Any = None
        self._predicted_tokens: Any = None
        self.queries = 0
        self.errors = 0
        self._errors: Counter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        configured = {b.name: b.weight for b in p.indexer_config.kv_cache_backend_configs}
        self.storage_configured = STORAGE_TIER in configured
        self.storage_estimator = StorageWeightEstimator()
        self.storage_cost = (
            StorageCost(configured[STORAGE_TIER], "configured", None, None)
            if self.storage_configured
            else self.storage_estimator.cost()
        )
        self._apply_storage_weight()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        if self.stack is not None:
            try:
                registry.register(self.stack.metrics.registry)  # the KV-cache index families
            except ValueError:  # a second embedded index: the families are per process
                log.warning(
                    "%s: another precise producer already exports the KV-cache index metrics; "
                    "this one's index is visible at /debug/plugins/state only",
                    self.name,
                )
        fam = _prefix_families(registry)
        self._prompt_tokens = fam[0].labels(self.name, self.type_name)
        self._predicted_tokens = fam[1].labels(self.name, self.type_name)
        self._errors = Counter(
            "llmd_precise_prefix_errors",
            "Failed tokenizations, lookups, speculative entries or observations (the request "
            "is routed without precise prefix data)",
            ["plugin_name", "stage"],
            registry=registry,
        )
        weight, measured, reload, recompute = _storage_families(registry)
        weight.labels(self.name).set_function(lambda: self.storage_cost.weight)
        measured.labels(self.name).set_function(
            lambda: 1.0 if self.storage_cost.source == "measured" else 0.0
        )
        reload.labels(self.name).set_function(lambda: _or_nan(self.storage_cost.reload_s_per_token))
        recompute.labels(self.name).set_function(
            lambda: _or_nan(self.storage_cost.recompute_s_per_token)
        )

    def _failed(self, stage: str, exc: BaseException | None) -> None:
        self.errors += 1
        if self._errors is not None:
            self._errors.labels(self.name, stage).inc()
        if exc is not None:
            log.warning("precise prefix %s failed: %s", stage, exc)

    @property
    def embedded_sync(self) -> bool:
        """Everything in this process without I/O: scoring happens inside `produce`."""
        return self.stack is not None and self.stack.embedded_sync

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.storage_configured:
            self._tasks.add(asyncio.get_running_loop().create_task(self._storage_weight_loop()))
        if self.stack is None:
            return
        await self.stack.start()
        self.stack.follow(self._engines)

    # --- the storage tier's weight ---------------------------------------------------------

    def refresh_storage_weight(self, now: float) -> StorageCost:
        """Fold the endpoints' latest scraped counters into the measured storage weight."""
        endpoints = list(self.handle.endpoints())
        domains = storage_domains(endpoints)
        snapshots = [(e.key, e.counters, e.key in domains) for e in endpoints if e.counters]
        self.storage_cost = self.storage_estimator.observe(now, snapshots)
        self._apply_storage_weight()
        return self.storage_cost

    def _apply_storage_weight(self) -> None:
        if self.stack is not None:
            self.stack.indexer.weights[STORAGE_TIER] = self.storage_cost.weight

    async def _storage_weight_loop(self) -> None:
        while True:
            await asyncio.sleep(STORAGE_WEIGHT_REFRESH_S)
            try:
                self.refresh_storage_weight(time.monotonic())
            except Exception as exc:  # keep the last weight; say why
                self._failed("storage-weight", exc)

    def _engines(self) -> list[EngineAddress]:
        return [
            EngineAddress(e.key, e.endpoint.address, dict(e.endpoint.labels))
            for e in self.handle.endpoints()
        ]

    async def stop(self) -> None:
        await cancel_tasks(*self._tasks)
        if self.stack is not None:
            await self.stack.stop()
        else:
            await self.keymaker.close()
        if self.client is not None:
            await self.client.close()

    # --- request path ----------------------------------------------------------------------

    def _local_keys(self, request: LLMRequest) -> list[int]:
        view = _view.decode(request.body)
        tokens = self.keymaker.local_tokens(view.prompt, view.messages)
        return self._keys_of(request, tokens)

    def _keys_of(self, request: LLMRequest, tokens: list[int]) -> list[int]:
        request.prompt_tokens = len(tokens) or request.prompt_tokens
        keys = self.keymaker.keys(tokens, request.target_model, request.cache_salt or None)
        request.state(self.name, PreciseState).keys = keys
        return keys

    async def prefetch(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        if self.embedded_sync and len(request.body) <= INLINE_TOKENIZE_BYTES:
            return  # short prompts: tokenized and scored inside `produce`, no I/O
        try:
            if self.keymaker.render is not None:
                view = _view.decode(request.body)
                messages = (
                    [{"role": m.role, "content": m.content} for m in view.messages]
                    if view.messages is not None
                    else None
                )
                tokens = await self.keymaker.tokens(request.target_model, view.prompt, messages)
                keys = self._keys_of(request, tokens)
            elif len(request.body) > INLINE_TOKENIZE_BYTES:  # never block the event loop
                keys = await asyncio.to_thread(self._local_keys, request)
            else:
                keys = self._local_keys(request)
        except (TokenizerError, msgspec.DecodeError) as exc:
            self._failed("tokenize", exc)
            return
        pods = [e.key for e in endpoints]
        domains = storage_domains(endpoints)
        hits: dict[str, PrefixHit] = {}
        if not self.breaker.allow():
            self._failed("lookup-skipped", None)  # the index is failing: route without it
        else:
            try:
                async with asyncio.timeout(self.p.lookup_timeout):
                    hits = await self._lookup(keys, pods, domains)
                self.breaker.success()
            except Exception as exc:  # degrade to no prefix data, never fail the request
                self.breaker.failure()
                self._failed("lookup", exc if str(exc) else TimeoutError("lookup timed out"))
        request.state(self.name, PreciseState).hits = hits

    async def _lookup(
        self, keys: list[int], pods: list[str], domains: dict[str, str]
    ) -> dict[str, PrefixHit]:
        if self.client is not None:
            request = ScoreRequest(
                keys=keys,
                pods=pods,
                domains=domains or None,
                tier_weights=(
                    {STORAGE_TIER: self.storage_cost.weight}
                    if domains and not self.storage_configured
                    else None
                ),
            )
            answer = await self.client.score(request)
            return {p: h.to_hit() for p, h in answer.pods.items()}
        assert self.stack is not None
        return await self.stack.indexer.score(keys, pods, domains)

    def _track(self, coro: Any, stage: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._failed(stage, t.exception())

        task.add_done_callback(done)

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        if not request.parsed:
            return
        st = request.state(self.name, PreciseState)
        hits = st.hits
        if hits is None:
            if not self.embedded_sync:
                return  # prefetch did not run (or failed): no prefix data this time
            assert self.stack is not None
            try:
                keys = self._local_keys(request)
            except (TokenizerError, msgspec.DecodeError) as exc:
                self._failed("tokenize", exc)
                return
            hits = st.hits = self.stack.indexer.score_sync(
                keys, [e.key for e in endpoints], storage_domains(endpoints)
            )
        total = len(st.keys or ())
        self.queries += 1
        bs = self.keymaker.block_size
        request.prefix[self.name] = {
            e.key: PrefixMatch(int(hits[e.key].score) if e.key in hits else 0, total, bs)
            for e in endpoints
        }

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        st = request.state(self.name, PreciseState)
        keys = st.keys
        if not keys:
            return
        hits = st.hits or {}
        for profile in {result.primary, "prefill"}:
            r = result.profiles.get(profile)
            if r is None or not r.targets:
                continue
            pod = r.targets[0].key
            if profile == result.primary:
                hit = hits.get(pod)
                bs = self.keymaker.block_size
                st.prediction = Prediction(
                    pod, confirmed_gpu_blocks(hit) * bs, (hit.blocks if hit else 0) * bs
                )
                if self._prompt_tokens is not None:
                    prompt = max(request.prompt_tokens, len(keys) * bs)
                    self._prompt_tokens.observe(prompt)
                    self._predicted_tokens.observe(min(prompt, st.prediction.speculative_tokens))
            if not self.p.speculative_indexing:
                continue
            if self.client is not None:
                if self.client.writes:
                    self._track(self.client.speculate(pod, keys), "speculate")
            elif self.embedded_sync:
                assert self.stack is not None
                self.stack.indexer.speculate_sync(keys, pod)
            else:
                assert self.stack is not None
                self._track(self.stack.indexer.speculate(keys, pod), "speculate")

    def response_complete(
        self, request: LLMRequest, endpoint: EndpointState | None, cause: str
    ) -> None:
        if not self.p.health_check or cause != "natural" or endpoint is None:
            return
        predicted = request.state(self.name, PreciseState).prediction
        usage = request.usage
        m = endpoint.metrics
        if predicted is None or usage is None or m is None:
            return
        if predicted.pod != endpoint.key:
            return  # served by another endpoint (a gateway retry): the prediction says nothing
        details = usage.prompt_tokens_details
        if details is None or details.cached_tokens is None:
            return  # the engine does not report cached tokens: nothing to judge
        cached, prompt = details.cached_tokens, usage.prompt_tokens
        pod, tokens, speculative = (
            predicted.pod,
            predicted.confirmed_tokens,
            predicted.speculative_tokens,
        )
        ebs = m.block_size or self.keymaker.block_size
        if self.client is not None:
            if self.client.writes:
                observation = ObserveRequest(pod, tokens, cached, prompt, ebs, speculative)
                self._track(self.client.observe(observation), "observe")
        else:
            assert self.stack is not None
            self.stack.indexer.observe(pod, tokens, cached, prompt, ebs, speculative)

    # --- introspection ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": "remote"
            if self.remote
            else type(self.stack.index).__name__
            if self.stack
            else "none",
            "queries": self.queries,
            "errors": self.errors,
            "storage_tier": {
                "weight": self.storage_cost.weight,
                "source": self.storage_cost.source,
                "reload_seconds_per_token": self.storage_cost.reload_s_per_token,
                "recompute_seconds_per_token": self.storage_cost.recompute_s_per_token,
                "counter_resets": self.storage_estimator.resets,
            },
        }
        if self.remote is not None:
            out["indexer_url"] = self.remote
            out["indexer_write_url"] = self.p.indexer_write_url
        if self.stack is not None:
            out["index"] = self.stack.index.stats()
            out["health"] = self.stack.indexer.health_snapshot()
            out["streams"] = self.stack.ingestor.snapshot()
        return out


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


_STORAGE_FAMILIES: weakref.WeakKeyDictionary[
    CollectorRegistry, tuple[Gauge, Gauge, Gauge, Gauge]
] = weakref.WeakKeyDictionary()


def _storage_families(registry: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge, Gauge]:
    fam = _STORAGE_FAMILIES.get(registry)
    if fam is None:
        labels = ["plugin_name"]
        fam = (
            Gauge(
                "llmd_precise_prefix_storage_weight",
                "Weight of a shared-storage KV hit against a GPU hit (configured, or measured: "
                "1 - reload / recompute seconds per token)",
                labels,
                registry=registry,
            ),
            Gauge(
                "llmd_precise_prefix_storage_weight_measured",
                "1 when the storage weight is measured, 0 while it is the prior or configured",
                labels,
                registry=registry,
            ),
            Gauge(
                "llmd_precise_prefix_storage_reload_seconds_per_token",
                "Engines' KV offload load seconds per loaded token (decayed sums; NaN: unknown)",
                labels,
                registry=registry,
            ),
            Gauge(
                "llmd_precise_prefix_recompute_seconds_per_token",
                "Engines' prefill seconds per computed prompt token (decayed sums; NaN: unknown)",
                labels,
                registry=registry,
            ),
        )
        _STORAGE_FAMILIES[registry] = fam
    return fam


_TOKEN_BUCKETS = tuple(float(2**i) for i in range(21))
_PREFIX_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Histogram, Histogram]] = (
    weakref.WeakKeyDictionary()
)


def _prefix_families(registry: CollectorRegistry) -> tuple[Histogram, Histogram]:
    """llm-d's per-request prefix-prediction histograms, once per registry (several precise
    producers each get their own `plugin_name` series)."""
    fam = _PREFIX_FAMILIES.get(registry)
    if fam is None:
        labels = ["plugin_name", "plugin_type"]
        fam = (
            Histogram(
                "llm_d_epp_prefix_prompt_tokens",
                "Prompt tokens of each request the producer scored",
                labels,
                buckets=_TOKEN_BUCKETS,
                registry=registry,
            ),
            Histogram(
                "llm_d_epp_prefix_predicted_cached_tokens",
                "Prompt tokens the producer predicted the chosen endpoint holds",
                labels,
                buckets=_TOKEN_BUCKETS,
                registry=registry,
            ),
        )
        _PREFIX_FAMILIES[registry] = fam
    return fam
