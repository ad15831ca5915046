"""llmd.kvcache: the KV-block index behind precise prefix-cache routing.

- `keys`: request keys (llm-d's chained hashes) for prompts and for event payloads.
- `index`: `InMemoryIndex` (bounded LRU) and the `Index` protocol; `valkey.ValkeyIndex` shares
  one index between scheduler replicas.
- `ingest`: ZMQ subscriptions with sequence tracking, replay and restart detection, sharded
  in-order application, reference-counted duplicates.
- `indexer`: `KVCacheIndexer`, scoring + speculative entries + index health.
- `tokenization`: the model directory's tokenizer and chat template, as the engine applies them.
"""

from llmd.kvcache.index import InMemoryIndex, PodEntry, PrefixHit
from llmd.kvcache.indexer import HealthConfig, KVCacheIndexer
from llmd.kvcache.keys import TokenProcessor, TokenProcessorConfig

__all__ = [
    "HealthConfig",
    "InMemoryIndex",
    "KVCacheIndexer",
    "PodEntry",
    "PrefixHit",
    "TokenProcessor",
    "TokenProcessorConfig",
]
