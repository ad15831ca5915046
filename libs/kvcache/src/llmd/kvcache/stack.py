"""The KV-cache stack, assembled in one place for the scheduler and for llmd-indexer.

    KVCacheConfig -> TokenProcessor (request keys) -> index (memory | Valkey, with key and pod
    TTLs) -> KVCacheIndexer (tier-weighted scoring, speculative entries, index health)
    -> Ingestor (one ZMQ subscription per engine, replay, restarts) ; tokenizer or render client

`KVCacheStack.follow(endpoints)` keeps subscriptions in step with a changing pool and runs the
shared index's janitor (pods whose events stopped past `podTtlSeconds` are cleared), the same
loop in both services.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from llmd.kvcache.config import InMemoryParams, KVCacheConfig
from llmd.kvcache.index import InMemoryIndex
from llmd.kvcache.indexer import HealthConfig, KVCacheIndexer
from llmd.kvcache.ingest import EngineEndpoint, EventApplier, Ingestor
from llmd.kvcache.keys import TokenProcessor, TokenProcessorConfig
from llmd.kvcache.metrics import KVCacheMetrics
from llmd.kvcache.tokenization import (
    ChatMessageIn,
    ModelTokenizer,
    RenderClient,
    TokenizerError,
    message_text,
)
from llmd.kvcache.valkey import ValkeyIndex
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

LONG_PROMPT_CHARS = 16_384
"""Prompts longer than this are tokenized in a worker thread, never on the event loop."""

EVENTS_LABEL = "llmd.ai/kv-events-endpoint"
"""Endpoint label naming where an engine publishes KV events (else host:socketPort)."""
REPLAY_LABEL = "llmd.ai/kv-replay-endpoint"
"""Endpoint label naming an engine's replay ROUTER (else host:replaySocketPort, if set)."""


@dataclass(frozen=True)
class EngineAddress:
    """What the stack needs of a discovered engine: its pod key, address and labels."""

    pod: str
    host: str
    labels: dict[str, str]


def prompt_token_ids(
    tokenizer: ModelTokenizer, prompt: Any = None, messages: Sequence[Any] | None = None
) -> list[int] | None:
    """The token ids vLLM computes for a completion prompt (the first of a batch) or a chat;
    None when there is neither."""
    if messages is not None:
        msgs = []
        for m in messages:
            role = m.get("role", "user") if isinstance(m, dict) else getattr(m, "role", "user")
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            msgs.append(ChatMessageIn(str(role), message_text(content)))
        return tokenizer.encode_chat(msgs)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return None


class RequestKeys:
    """Prompt -> token ids (local tokenizer or the engine's render endpoint) -> request keys.

    All a client of a remote index needs; the full stack holds one too."""

    def __init__(self, config: KVCacheConfig) -> None:
        tp = config.token_processor_config
        self.processor = TokenProcessor(
            TokenProcessorConfig(tp.block_size_tokens, tp.hash_seed, tp.hash_algorithm)
        )
        tk = config.tokenizer
        self.render = (
            RenderClient(tk.render_url, tk.timeout_seconds) if tk and tk.render_url else None
        )
        self.tokenizer: ModelTokenizer | None = None
        if tk is not None and self.render is None and tk.model_dir:
            self.tokenizer = ModelTokenizer(Path(tk.model_dir).expanduser())

    @property
    def block_size(self) -> int:
        return self.processor.block_size

    def keys(self, tokens: Sequence[int], model: str, cache_salt: str | None = None) -> list[int]:
        return self.processor.prompt_keys(tokens, model, cache_salt=cache_salt)

    def local_tokens(self, prompt: Any = None, messages: Sequence[Any] | None = None) -> list[int]:
        """Token ids from the local tokenizer; TokenizerError when there is none or no prompt."""
        if self.tokenizer is None:
            raise TokenizerError("no tokenizer configured (tokenizer.modelDir)")
        ids = prompt_token_ids(self.tokenizer, prompt, messages)
        if ids is None:
            raise TokenizerError("the request has neither a prompt nor messages")
        return ids

    async def tokens(
        self, model: str, prompt: Any = None, messages: Sequence[Any] | None = None
    ) -> list[int]:
        """Token ids exactly as the engine computes them: through its render endpoint when
        configured, else the local tokenizer (off the event loop for long prompts)."""
        if self.render is not None:
            if messages is not None:
                body = {"model": model, "messages": list(messages)}
                return await self.render.tokens("/v1/chat/completions", body)
            return await self.render.tokens("/v1/completions", {"model": model, "prompt": prompt})
        size = len(prompt) if isinstance(prompt, str) else 0
        size += sum(len(str(m)) for m in messages or ())
        if size > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(self.local_tokens, prompt, messages)
        return self.local_tokens(prompt, messages)

    async def close(self) -> None:
        if self.render is not None:
            await self.render.close()


class KVCacheStack:
    """Keys, index, scoring, ingestion and tokenization of one service."""

    def __init__(self, config: KVCacheConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.keys = RequestKeys(config)
        self.processor = self.keys.processor
        self.metrics = KVCacheMetrics(registry)
        bic = config.indexer_config.kv_block_index_config
        shared = bic.shared
        self.index: InMemoryIndex | ValkeyIndex
        if shared is not None:
            self.index = ValkeyIndex(
                shared.address,
                prefix=shared.key_prefix,
                key_ttl_s=shared.key_ttl_seconds,
                pod_ttl_s=shared.pod_ttl_seconds,
            )
        else:
            mem = bic.in_memory_config or InMemoryParams()
            self.index = InMemoryIndex(mem.size, mem.max_bytes, mem.pod_cache_size)
        ev = config.kv_events_config
        self.applier = EventApplier(self.index, self.processor, self.metrics)
        self.ingestor = Ingestor(self.applier, topic_filter=ev.topic_filter, shards=ev.concurrency)
        self.indexer = KVCacheIndexer(
            self.index,
            self.processor,
            weights={b.name: b.weight for b in config.indexer_config.kv_cache_backend_configs},
            metrics=self.metrics,
            speculative_ttl_s=config.speculative_ttl_s,
            health=HealthConfig(),
            resync=self.ingestor.resync,
        )
        self._follow: asyncio.Task[None] | None = None

    @property
    def block_size(self) -> int:
        return self.processor.block_size

    @property
    def embedded_sync(self) -> bool:
        """Scoring needs no I/O: an in-memory index and a local tokenizer."""
        return self.keys.render is None and isinstance(self.index, InMemoryIndex)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ingestion (and the centralized SUB socket, if configured); check Valkey."""
        await self.ingestor.start()
        if self.config.kv_events_config.zmq_endpoint:
            self.ingestor.bind(self.config.kv_events_config.zmq_endpoint)
        if isinstance(self.index, ValkeyIndex):
            await self.index.ping()

    def follow(
        self, endpoints: Callable[[], Iterable[EngineAddress]], every_s: float = 1.0
    ) -> None:
        """Keep subscriptions in step with `endpoints()` (when `discoverPods`), every second."""
        if self.config.kv_events_config.discover_pods and self._follow is None:
            self._follow = asyncio.create_task(
                self._follow_loop(endpoints, every_s), name="kv-sync"
            )

    async def _follow_loop(
        self, endpoints: Callable[[], Iterable[EngineAddress]], every_s: float
    ) -> None:
        while True:
            try:
                await self.sync(list(endpoints()))
            except Exception as exc:  # keep following; the next round retries
                log.warning("KV subscription sync failed: %s", exc)
            await asyncio.sleep(every_s)

    async def sync(self, endpoints: Sequence[EngineAddress]) -> None:
        """Subscribe new engines, unsubscribe (and clear) departed ones, run the janitor."""
        for t in self.ingestor.sync(self.engine_endpoints(endpoints)):
            await t
        if isinstance(self.index, ValkeyIndex):
            await self.index.janitor(live={e.pod for e in endpoints})

    def engine_endpoints(self, endpoints: Iterable[EngineAddress]) -> list[EngineEndpoint]:
        """Where each engine publishes: its labels, else the configured ports on its host."""
        pd = self.config.kv_events_config.pod_discovery_config
        out = []
        for e in endpoints:
            events = e.labels.get(EVENTS_LABEL) or f"tcp://{e.host}:{pd.socket_port}"
            replay = e.labels.get(REPLAY_LABEL) or (
                f"tcp://{e.host}:{pd.replay_socket_port}" if pd.replay_socket_port else None
            )
            out.append(EngineEndpoint(pod=e.pod, events=events, replay=replay))
        return out

    async def stop(self) -> None:
        await cancel_tasks(self._follow)
        self._follow = None
        await self.ingestor.stop()
        await self.keys.close()
        if isinstance(self.index, ValkeyIndex):
            await self.index.close()


def build_request_keys(config: KVCacheConfig) -> RequestKeys:
    """Tokenization and request keys alone (a client of a remote index)."""
    return RequestKeys(config)


def build_kvcache(config: KVCacheConfig, registry: CollectorRegistry | None = None) -> KVCacheStack:
    """The one builder of the KV-cache stack (TokenizerError for an unusable tokenizer)."""
    return KVCacheStack(config, registry)
