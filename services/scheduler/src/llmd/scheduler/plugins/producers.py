"""Built-in data producers: the approximate prefix index and the in-flight load estimate."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator, model_validator

from llmd.runtime.config import parse_duration
from llmd.runtime.fastmetrics import Gauge, Histogram
from llmd.scheduler.framework import (
    DataProducer,
    EndpointState,
    LLMRequest,
    LoadEstimator,
    PluginHandle,
    PluginParams,
    PrefixMatch,
    PreRequest,
    SchedulingResult,
)
from llmd.scheduler.prefix import MIN_BLOCK_SIZE_TOKENS, ApproxPrefixIndex, prompt_hashes

Duration = str | float


class ApproxPrefixParams(PluginParams):
    auto_tune: bool = Field(default=True, alias="autoTune")
    block_size_tokens: int = Field(default=16, gt=0, alias="blockSizeTokens")
    max_prefix_tokens_to_match: int = Field(default=131_072, ge=0, alias="maxPrefixTokensToMatch")
    max_prefix_blocks_to_match: int = Field(default=2048, ge=0, alias="maxPrefixBlocksToMatch")
    lru_capacity_per_server: int = Field(default=31_250, gt=0, alias="lruCapacityPerServer")


@dataclass(slots=True)
class _ApproxState:
    """Per request: the prompt's block hashes, recorded on the chosen endpoint afterwards."""

    hashes: list[int] = field(default_factory=list)


class ApproxPrefixCacheProducer(DataProducer[ApproxPrefixParams], PreRequest[ApproxPrefixParams]):
    """Matches each request's prompt blocks against where earlier requests were sent, and
    records this request's blocks on its destination (and its prefill endpoint, if any)."""

    type_name = "approx-prefix-cache-producer"
    Params = ApproxPrefixParams

    def __init__(self, name: str, params: ApproxPrefixParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        p = params
        self.index = ApproxPrefixIndex(p.lru_capacity_per_server)
        self.queries = 0
        self.hit_blocks = 0
        self.hit_tokens = 0
        self.total_blocks = 0
        self._sized: dict[str, tuple[int, int]] = {}
        self._ratio: Any = None
        self._bytes: Any = None

    def block_size(self, endpoints: list[EndpointState]) -> int:
        p = self.params
        size = p.block_size_tokens
        if p.auto_tune and endpoints:
            m = endpoints[0].metrics
            if m is not None and m.block_size:
                size = m.block_size
        return max(size, MIN_BLOCK_SIZE_TOKENS)

    def _max_blocks(self, block_size: int) -> int:
        p = self.params
        if p.max_prefix_tokens_to_match:
            return max(1, p.max_prefix_tokens_to_match // block_size)
        return p.max_prefix_blocks_to_match

    def _size_lrus(self, endpoints: list[EndpointState], block_size: int) -> None:
        """Per endpoint LRU capacity = the engine's KV capacity in index blocks."""
        if not self.params.auto_tune:
            return
        for e in endpoints:
            m = e.metrics
            if m is None or not m.num_gpu_blocks or not m.block_size:
                continue
            sig = (m.num_gpu_blocks, m.block_size)
            if self._sized.get(e.key) != sig:
                self._sized[e.key] = sig
                tokens = m.num_gpu_blocks * m.block_size
                self.index.set_capacity(e.key, max(1, tokens // block_size))

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        if not request.prompt_bytes:
            return
        block_size = self.block_size(endpoints)
        self._size_lrus(endpoints, block_size)
        hashes = prompt_hashes(
            request.prompt_bytes,
            request.target_model,
            request.cache_salt,
            block_size,
            self._max_blocks(block_size),
        )
        request.state(self.name, _ApproxState).hashes = hashes
        counts = self.index.match(hashes)
        total = len(hashes)
        request.prefix[self.name] = {
            e.key: PrefixMatch(counts.get(e.key, 0), total, block_size) for e in endpoints
        }
        self.queries += 1
        self.total_blocks += total
        best = max(counts.values(), default=0)
        self.hit_blocks += best
        self.hit_tokens += best * block_size
        if self._ratio is not None and total:
            self._ratio.observe(best / total)
            self._bytes.observe(best * block_size * 4)

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        hashes = request.state(self.name, _ApproxState).hashes
        if not hashes:
            return
        for profile in {result.primary, "prefill"}:
            r = result.profiles.get(profile)
            if r is not None and r.targets:
                self.index.add(r.targets[0].key, hashes)

    def endpoints_changed(self, live: set[str]) -> None:
        """Drop endpoints that left the pool."""
        for key in self.index.endpoints():
            if key not in live:
                self.index.remove_endpoint(key)
                self._sized.pop(key, None)

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    def state(self) -> dict[str, Any]:
        return {
            "indexed_hashes": len(self.index),
            "entries": self.index.entries,
            "evictions": self.index.evictions,
            "hit_ratio": round(self.hit_ratio, 4),
            "queries": self.queries,
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        fam = _approx_families(registry)
        labels = (self.name, self.type_name)
        fam.size.labels(*labels).set_function(lambda: len(self.index))
        self._ratio = fam.ratio.labels(*labels)
        self._bytes = fam.hit_bytes.labels(*labels)


@dataclass(slots=True)
class _ApproxFamilies:
    size: Gauge
    ratio: Histogram
    hit_bytes: Histogram


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _ApproxFamilies] = (
    weakref.WeakKeyDictionary()
)


def _approx_families(registry: CollectorRegistry) -> _ApproxFamilies:
    """llm-d's approximate-prefix families, registered once per registry: a config with several
    producers (llm-d's tiered-prefix-cache guides) gives each its own `plugin_name` series."""
    fam = _FAMILIES.get(registry)
    if fam is None:
        labels = ["plugin_name", "plugin_type"]
        fam = _ApproxFamilies(
            Gauge(
                "llm_d_epp_prefix_indexer_size",
                "Distinct block hashes in the approximate prefix index",
                labels,
                registry=registry,
            ),
            Histogram(
                "llm_d_epp_prefix_indexer_hit_ratio",
                "Per request: prompt blocks matched on the best endpoint / prompt blocks",
                labels,
                buckets=tuple(i / 10 for i in range(11)),
                registry=registry,
            ),
            Histogram(
                "llm_d_epp_prefix_indexer_hit_bytes",
                "Per request: prompt bytes matched on the best endpoint (4 bytes per token)",
                labels,
                buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
                registry=registry,
            ),
        )
        _FAMILIES[registry] = fam
    return fam


class InflightLoadParams(PluginParams):
    add_estimated_output_tokens: bool = Field(default=False, alias="addEstimatedOutputTokens")
    output_ratio: float = Field(default=1.5, ge=0, alias="outputRatio")
    max_estimated_output_tokens: int = Field(default=8192, ge=0, alias="maxEstimatedOutputTokens")


class InflightLoadProducer(DataProducer[InflightLoadParams], LoadEstimator[InflightLoadParams]):
    """Sets how the in-flight token load of a request is estimated. The accounting itself
    (at pick time, released at completion) always runs in the director."""

    type_name = "inflight-load-producer"
    Params = InflightLoadParams

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        return None

    def tokens(self, request: LLMRequest, cached_tokens: int) -> int:
        p = self.params
        tokens = max(0, request.prompt_tokens - cached_tokens)
        if p.add_estimated_output_tokens:
            est = round(request.prompt_tokens * p.output_ratio)
            if request.max_tokens is not None:
                est = min(est, request.max_tokens)
            tokens += min(est, p.max_estimated_output_tokens)
        return tokens


class VllmTokenizerParams(PluginParams):
    url: str = Field(min_length=1)
    timeout: Duration = "5s"
    mm_timeout: Duration = Field(default="30s", alias="mmTimeout")

    @field_validator("timeout", "mm_timeout")
    @classmethod
    def _duration(cls, v: Duration) -> Duration:
        parse_duration(v)
        return v


class TokenProducerParams(PluginParams):
    """llm-d's token-producer parameters. `udsTokenizerConfig` is refused before this model
    sees it (the scheduler's config compatibility layer says why)."""

    backend: Literal["estimate", "vllm"] | None = None
    model_name: str | None = Field(default=None, alias="modelName")
    vllm: VllmTokenizerParams | None = None
    estimate: dict[str, Any] | None = None
    """The estimate backend's media placeholders (image and video sizes): accepted; llmd's
    estimate packs the request's text bytes."""

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") is None:
            data = {**data, "backend": "vllm" if data.get("vllm") is not None else "estimate"}
        return data

    @model_validator(mode="after")
    def _backend(self) -> TokenProducerParams:
        if self.backend == "vllm" and self.vllm is None:
            raise ValueError("backend vllm needs vllm.url (a `vllm launch render` server)")
        return self


class TokenProducer(DataProducer[TokenProducerParams]):
    """Where tokens come from. The byte estimate (4 bytes per pseudo-token) is built by the
    parser for every request; with `backend: vllm` the precise-prefix-cache-producer tokenizes
    through that render server (the config loader passes the URL on)."""

    type_name = "token-producer"
    Params = TokenProducerParams

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        return None


PRODUCERS = (ApproxPrefixCacheProducer, InflightLoadProducer, TokenProducer)
