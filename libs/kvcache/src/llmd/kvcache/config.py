"""`KVCacheConfig`: the KV-cache stack's settings under llm-d-kv-cache's names.

The same document configures the scheduler's `precise-prefix-cache-producer` (its plugin
parameters) and `llmd-indexer` (its `kvcache:` section), so the two never drift:

    tokenProcessorConfig: {blockSizeTokens, hashSeed, hashAlgorithm}
    indexerConfig:
      kvBlockIndexConfig: {inMemoryConfig | valkeyConfig | redisConfig, enableMetrics}
      kvCacheBackendConfigs: [{name, weight}]          # tier weights (gpu 1.0, cpu 0.8)
    kvEventsConfig: {zmqEndpoint, topicFilter, concurrency, discoverPods,
                     podDiscoveryConfig: {socketPort, replaySocketPort}}
    tokenizer: {modelDir | renderUrl, timeoutSeconds}  # optional for the indexer
    speculativeIndexing, speculativeTTL, healthCheck
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmd.runtime.config import Seconds, StrictModel

CamelModel = StrictModel
"""Strict (unknown keys are errors); fields carry llm-d's camelCase aliases (snake_case works)."""


class TokenProcessorParams(CamelModel):
    block_size_tokens: int = Field(default=16, gt=0, alias="blockSizeTokens")
    hash_seed: str = Field(default="", alias="hashSeed")
    hash_algorithm: Literal["cbor-fnv", "xxh64"] = Field(default="cbor-fnv", alias="hashAlgorithm")


class InMemoryParams(CamelModel):
    size: int = Field(default=10_000_000, gt=0)
    pod_cache_size: int = Field(default=64, gt=0, alias="podCacheSize")
    max_bytes: int = Field(default=2 << 30, gt=0, alias="maxBytes")


class ValkeyParams(CamelModel):
    address: str = "redis://127.0.0.1:6379"
    key_prefix: str = Field(default="", alias="keyPrefix")
    key_ttl_seconds: int = Field(default=0, ge=0, alias="keyTtlSeconds")
    pod_ttl_seconds: float = Field(default=900.0, gt=0, alias="podTtlSeconds")


class BlockIndexParams(CamelModel):
    in_memory_config: InMemoryParams | None = Field(default=None, alias="inMemoryConfig")
    valkey_config: ValkeyParams | None = Field(default=None, alias="valkeyConfig")
    redis_config: ValkeyParams | None = Field(default=None, alias="redisConfig")
    enable_metrics: bool = Field(default=True, alias="enableMetrics")

    @property
    def shared(self) -> ValkeyParams | None:
        """The Valkey/Redis settings when the index is shared, else None (in memory)."""
        return self.valkey_config or self.redis_config


class BackendWeight(CamelModel):
    name: str
    weight: float = Field(ge=0)


class IndexerParams(CamelModel):
    kv_block_index_config: BlockIndexParams = Field(
        default_factory=BlockIndexParams, alias="kvBlockIndexConfig"
    )
    kv_cache_backend_configs: list[BackendWeight] = Field(
        default_factory=lambda: [
            BackendWeight(name="gpu", weight=1.0),
            BackendWeight(name="cpu", weight=0.8),
        ],
        alias="kvCacheBackendConfigs",
    )


class PodDiscoveryParams(CamelModel):
    socket_port: int = Field(default=5557, gt=0, lt=65536, alias="socketPort")
    replay_socket_port: int = Field(default=0, ge=0, lt=65536, alias="replaySocketPort")


class KVEventsParams(CamelModel):
    zmq_endpoint: str = Field(default="", alias="zmqEndpoint")
    topic_filter: str = Field(default="kv@", alias="topicFilter")
    concurrency: int = Field(default=4, gt=0)
    discover_pods: bool = Field(default=True, alias="discoverPods")
    pod_discovery_config: PodDiscoveryParams = Field(
        default_factory=PodDiscoveryParams, alias="podDiscoveryConfig"
    )


class TokenizerParams(CamelModel):
    model_dir: str | None = Field(default=None, alias="modelDir")
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, template)."""
    render_url: str | None = Field(default=None, alias="renderUrl")
    """A vLLM server whose render endpoints tokenize (wins over modelDir when both are set)."""
    timeout_seconds: float = Field(default=5.0, gt=0, alias="timeoutSeconds")

    @field_validator("model_dir")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v).expanduser() / "tokenizer.json").is_file():
            raise ValueError(f"{v} has no tokenizer.json")
        return v

    @model_validator(mode="after")
    def _one(self) -> TokenizerParams:
        if not self.model_dir and not self.render_url:
            raise ValueError("give modelDir (a tokenizer directory) or renderUrl (a vLLM server)")
        return self


class KVCacheConfig(CamelModel):
    """The whole KV-cache stack: keys, index, event ingestion, tokenization, speculation."""

    token_processor_config: TokenProcessorParams = Field(
        default_factory=TokenProcessorParams, alias="tokenProcessorConfig"
    )
    indexer_config: IndexerParams = Field(default_factory=IndexerParams, alias="indexerConfig")
    kv_events_config: KVEventsParams = Field(default_factory=KVEventsParams, alias="kvEventsConfig")
    tokenizer: TokenizerParams | None = None
    speculative_indexing: bool = Field(default=True, alias="speculativeIndexing")
    speculative_ttl: Seconds = Field(default=2.0, ge=0, alias="speculativeTTL")
    health_check: bool = Field(default=True, alias="healthCheck")
    """Compare each response's `cached_tokens` with the index's prediction (index health)."""

    @property
    def speculative_ttl_s(self) -> float:
        """How long a speculative entry lives (0 when speculative indexing is off)."""
        return self.speculative_ttl if self.speculative_indexing else 0.0
