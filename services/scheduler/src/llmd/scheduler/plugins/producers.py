"""Built-in data producers: the approximate prefix index and the in-flight load estimate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from pydantic import Field

from llmd.scheduler.framework import (
    DataProducer,
    EndpointState,
    LLMRequest,
    LoadEstimator,
    NoParams,
    PluginHandle,
    PluginParams,
    PrefixMatch,
    PreRequest,
    SchedulingResult,
)
from llmd.scheduler.prefix import MIN_BLOCK_SIZE_TOKENS, ApproxPrefixIndex, prompt_hashes


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
        labels = {"plugin_name": self.name, "plugin_type": self.type_name}
        size = Gauge(
            "llm_d_epp_prefix_indexer_size",
            "Distinct block hashes in the approximate prefix index",
            list(labels),
            registry=registry,
        )
        size.labels(**labels).set_function(lambda: len(self.index))
        ratio = Gauge(
            "llm_d_epp_prefix_indexer_hit_ratio",
            "Matched prompt blocks / prompt blocks over all requests (best endpoint)",
            list(labels),
            registry=registry,
        )
        ratio.labels(**labels).set_function(lambda: self.hit_ratio)
        hit_bytes = Gauge(
            "llm_d_epp_prefix_indexer_hit_bytes",
            "Prompt bytes matched in the approximate prefix index (4 bytes per token)",
            list(labels),
            registry=registry,
        )
        hit_bytes.labels(**labels).set_function(lambda: self.hit_tokens * 4)


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


class TokenProducer(DataProducer[NoParams]):
    """The token estimate (4 bytes per pseudo-token) is built by the parser; this type exists so
    configs that name it keep working. A real-tokenizer backend comes with precise routing."""

    type_name = "token-producer"

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        return None


PRODUCERS = (ApproxPrefixCacheProducer, InflightLoadProducer, TokenProducer)
