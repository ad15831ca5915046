"""`precise-prefix-cache-producer`: prefix matches from the engines' own KV events.

The approximate producer guesses where KV lives from where requests went; this one knows. It
subscribes to every endpoint's KV events (the endpoint's `llmd.ai/kv-events-endpoint` label, or
`tcp://<address>:<socketPort>`), keeps a `llmd.kvcache` index (in this process, or on a Valkey
server shared with other scheduler replicas, or in a remote `llmd-indexer`), tokenizes each
prompt exactly as the engine does, and writes a `PrefixMatch` per endpoint for
`prefix-cache-scorer`.

After each decision it adds speculative entries for the chosen endpoint (TTL `speculativeTTL`),
so a burst of requests sharing a new prefix does not herd before the engine's events arrive. On
every response it compares the engine's `cached_tokens` with the prediction and lets the
indexer down-weight and resync endpoints whose index is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmd.kvcache.index import InMemoryIndex, PrefixHit
from llmd.kvcache.indexer import HealthConfig, KVCacheIndexer, confirmed_gpu_blocks
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
from llmd.runtime.config import parse_duration
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

log = logging.getLogger(__name__)

PRODUCER = "precise-prefix-cache-producer"
EVENTS_LABEL = "llmd.ai/kv-events-endpoint"
REPLAY_LABEL = "llmd.ai/kv-replay-endpoint"
KEYS_KEY = "precise-prefix-keys"
HITS_KEY = "precise-prefix-hits"


class _Camel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TokenProcessorParams(_Camel):
    block_size_tokens: int = Field(default=16, gt=0, alias="blockSizeTokens")
    hash_seed: str = Field(default="", alias="hashSeed")
    hash_algorithm: Literal["cbor-fnv", "xxh64"] = Field(default="cbor-fnv", alias="hashAlgorithm")


class InMemoryParams(_Camel):
    size: int = Field(default=10_000_000, gt=0)
    pod_cache_size: int = Field(default=64, gt=0, alias="podCacheSize")
    max_bytes: int = Field(default=2 << 30, gt=0, alias="maxBytes")


class ValkeyParams(_Camel):
    address: str = "redis://127.0.0.1:6379"
    key_prefix: str = Field(default="", alias="keyPrefix")
    key_ttl_seconds: int = Field(default=0, ge=0, alias="keyTtlSeconds")
    pod_ttl_seconds: float = Field(default=900.0, gt=0, alias="podTtlSeconds")


class BlockIndexParams(_Camel):
    in_memory_config: InMemoryParams | None = Field(default=None, alias="inMemoryConfig")
    valkey_config: ValkeyParams | None = Field(default=None, alias="valkeyConfig")
    redis_config: ValkeyParams | None = Field(default=None, alias="redisConfig")
    enable_metrics: bool = Field(default=True, alias="enableMetrics")


class BackendWeight(_Camel):
    name: str
    weight: float = Field(ge=0)


class IndexerParams(_Camel):
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


class PodDiscoveryParams(_Camel):
    socket_port: int = Field(default=5557, gt=0, lt=65536, alias="socketPort")
    replay_socket_port: int = Field(default=0, ge=0, lt=65536, alias="replaySocketPort")


class KVEventsParams(_Camel):
    zmq_endpoint: str = Field(default="", alias="zmqEndpoint")
    topic_filter: str = Field(default="kv@", alias="topicFilter")
    concurrency: int = Field(default=4, gt=0)
    discover_pods: bool = Field(default=True, alias="discoverPods")
    pod_discovery_config: PodDiscoveryParams = Field(
        default_factory=PodDiscoveryParams, alias="podDiscoveryConfig"
    )


class TokenizerParams(_Camel):
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


class PreciseParams(PluginParams):
    token_processor_config: TokenProcessorParams = Field(
        default_factory=TokenProcessorParams, alias="tokenProcessorConfig"
    )
    indexer_config: IndexerParams = Field(default_factory=IndexerParams, alias="indexerConfig")
    kv_events_config: KVEventsParams = Field(default_factory=KVEventsParams, alias="kvEventsConfig")
    speculative_indexing: bool = Field(default=True, alias="speculativeIndexing")
    speculative_ttl: str = Field(
        default="2s", alias="speculativeTTL", pattern=r"^\d+(\.\d+)?(ms|s)$"
    )
    tokenizer: TokenizerParams
    indexer_url: str | None = Field(default=None, alias="indexerUrl")
    """Use a remote llmd-indexer (HTTP) instead of the embedded index and subscriptions."""
    health_check: bool = Field(default=True, alias="healthCheck")


class _Message(msgspec.Struct):
    role: str = "user"
    content: Any = None


class _PromptView(msgspec.Struct):
    prompt: Any = None
    messages: list[_Message] | None = None


_view = msgspec.json.Decoder(_PromptView)


def prompt_tokens(tokenizer: ModelTokenizer, body: bytes) -> list[int] | None:
    """The prompt's token ids as vLLM computes them (the first prompt of a batch)."""
    view = _view.decode(body)
    if view.messages is not None:
        msgs = [ChatMessageIn(m.role, message_text(m.content)) for m in view.messages]
        return tokenizer.encode_chat(msgs)
    prompt = view.prompt
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return None


class PreciseProducer(AsyncDataProducer, PreRequest, ResponseHook, Lifecycle):
    type_name = PRODUCER
    Params = PreciseParams

    def __init__(self, name: str, params: PluginParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        p: PreciseParams = params  # type: ignore[assignment]
        self.p = p
        tk = p.tokenizer
        self.render = RenderClient(tk.render_url, tk.timeout_seconds) if tk.render_url else None
        self.tokenizer: ModelTokenizer | None = None
        if self.render is None and tk.model_dir:
            try:
                self.tokenizer = ModelTokenizer(Path(tk.model_dir).expanduser())
            except TokenizerError as exc:
                raise ValueError(str(exc)) from None
        tp = p.token_processor_config
        self.processor = TokenProcessor(
            TokenProcessorConfig(tp.block_size_tokens, tp.hash_seed, tp.hash_algorithm)
        )
        self.metrics = KVCacheMetrics()
        bic = p.indexer_config.kv_block_index_config
        shared = bic.valkey_config or bic.redis_config
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
        self.remote = p.indexer_url.rstrip("/") if p.indexer_url else None
        self.indexer = KVCacheIndexer(
            self.index,
            self.processor,
            weights={b.name: b.weight for b in p.indexer_config.kv_cache_backend_configs},
            metrics=self.metrics,
            speculative_ttl_s=parse_duration(p.speculative_ttl) if p.speculative_indexing else 0.0,
            health=HealthConfig(),
            resync=self._resync,
        )
        self.ingestor: Ingestor | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.queries = 0
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(self.metrics.registry)  # the kvcache_* families

    @property
    def embedded_sync(self) -> bool:
        """Everything in this process without I/O: scoring happens inside `produce`."""
        return self.remote is None and self.render is None and isinstance(self.index, InMemoryIndex)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.remote is not None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
            return
        ev = self.p.kv_events_config
        applier = EventApplier(self.index, self.processor, self.metrics)
        self.ingestor = Ingestor(applier, topic_filter=ev.topic_filter, shards=ev.concurrency)
        await self.ingestor.start()
        if ev.zmq_endpoint:
            self.ingestor.bind(ev.zmq_endpoint)
        if ev.discover_pods:
            self._sync_task = asyncio.create_task(self._follow_endpoints(), name="kv-subscriptions")

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        if self.ingestor is not None:
            await self.ingestor.stop()
        if isinstance(self.index, ValkeyIndex):
            await self.index.close()
        if self._session is not None:
            await self._session.close()
        if self.render is not None:
            await self.render.close()

    def engine_endpoints(self) -> list[EngineEndpoint]:
        pd = self.p.kv_events_config.pod_discovery_config
        out = []
        for e in self.handle.endpoints():
            labels = e.endpoint.labels
            events = labels.get(EVENTS_LABEL) or f"tcp://{e.endpoint.address}:{pd.socket_port}"
            replay = labels.get(REPLAY_LABEL) or (
                f"tcp://{e.endpoint.address}:{pd.replay_socket_port}"
                if pd.replay_socket_port
                else None
            )
            out.append(EngineEndpoint(pod=e.key, events=events, replay=replay))
        return out

    async def _follow_endpoints(self) -> None:
        assert self.ingestor is not None
        while True:
            try:
                for t in self.ingestor.sync(self.engine_endpoints()):
                    await t
                if isinstance(self.index, ValkeyIndex):
                    await self.index.janitor(live={e.key for e in self.handle.endpoints()})
            except Exception as exc:  # keep following; the next round retries
                log.warning("KV subscription sync failed: %s", exc)
            await asyncio.sleep(1.0)

    async def _resync(self, pod: str, reason: str) -> None:
        if self.ingestor is not None:
            await self.ingestor.resync(pod, reason)

    # --- request path ----------------------------------------------------------------------

    def _keys(self, request: LLMRequest, tokens: list[int] | None = None) -> list[int]:
        keys: list[int] | None = request.data.get(KEYS_KEY)
        if keys is None:
            if tokens is None:
                assert self.tokenizer is not None
                tokens = prompt_tokens(self.tokenizer, request.body) or []
            request.prompt_tokens = len(tokens) or request.prompt_tokens
            keys = self.indexer.keys(tokens, request.target_model, request.cache_salt or None)
            request.data[KEYS_KEY] = keys
        return keys

    async def prefetch(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        if self.embedded_sync:
            return
        if self.render is not None:
            try:
                tokens = await self.render.tokens(request.path, request.body)
            except TokenizerError as exc:
                self.errors += 1
                log.warning("render failed, no prefix data for this request: %s", exc)
                return
            self._keys(request, tokens)
        elif len(request.body) > 65_536:  # long prompts tokenize off the event loop
            await asyncio.to_thread(self._keys, request)
        keys = self._keys(request)
        pods = [e.key for e in endpoints]
        try:
            if self.remote is not None:
                hits = await self._remote_score(keys, pods)
            else:
                hits = await self.indexer.score(keys, pods)
        except Exception as exc:  # scoring degrades to no prefix data, never fails requests
            self.errors += 1
            log.warning("precise prefix lookup failed: %s", exc)
            hits = {}
        request.data[HITS_KEY] = hits

    def _speculated(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors += 1
            log.warning("speculative index entry failed: %s", task.exception())

    async def _remote_score(self, keys: list[int], pods: list[str]) -> dict[str, PrefixHit]:
        assert self._session is not None
        async with self._session.post(
            f"{self.remote}/v1/score", json={"keys": keys, "pods": pods}
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"indexer answered {resp.status}: {await resp.text()}")
            doc = await resp.json()
        return {
            p: PrefixHit(int(v["blocks"]), float(v["score"]), dict(v.get("tiers", {})))
            for p, v in doc.get("pods", {}).items()
        }

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        if not request.parsed:
            return
        hits: dict[str, PrefixHit] | None = request.data.get(HITS_KEY)
        if hits is None and not self.embedded_sync:
            return  # prefetch did not run (or failed): no prefix data this time
        keys = self._keys(request)
        if hits is None:
            if not self.embedded_sync:
                return  # prefetch did not run (or failed): no prefix data this time
            hits = self.indexer.score_sync(keys, [e.key for e in endpoints])
            request.data[HITS_KEY] = hits
        self.queries += 1
        total = len(keys)
        bs = self.processor.block_size
        request.data[self.name] = {
            e.key: PrefixMatch(int(hits[e.key].score) if e.key in hits else 0, total, bs)
            for e in endpoints
        }

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        keys: list[int] | None = request.data.get(KEYS_KEY)
        if not keys:
            return
        hits: dict[str, PrefixHit] = request.data.get(HITS_KEY) or {}
        for profile in {result.primary, "prefill"}:
            r = result.profiles.get(profile)
            if r is None or not r.targets:
                continue
            pod = r.targets[0].key
            if profile == result.primary:
                hit = hits.get(pod)
                bs = self.processor.block_size
                request.data["precise-prediction"] = (
                    pod,
                    confirmed_gpu_blocks(hit) * bs,
                    (hit.blocks if hit else 0) * bs,
                )
            if self.embedded_sync:
                self.indexer.speculate_sync(keys, pod)
            elif self.remote is None:
                task = asyncio.get_running_loop().create_task(self.indexer.speculate(keys, pod))
                self._tasks.add(task)
                task.add_done_callback(self._speculated)

    def response_complete(
        self, request: LLMRequest, endpoint: EndpointState | None, cause: str
    ) -> None:
        if not self.p.health_check or cause != "natural" or endpoint is None:
            return
        predicted = request.data.get("precise-prediction")
        usage = request.data.get("usage")
        if not predicted or not isinstance(usage, dict):
            return
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = usage.get("prompt_tokens")
        m = endpoint.metrics
        if not isinstance(cached, int) or not isinstance(prompt, int) or m is None:
            return
        pod, tokens, speculative = predicted
        ebs = m.block_size or self.processor.block_size
        self.indexer.observe(pod, tokens, cached, prompt, ebs, speculative)

    # --- introspection ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": "remote" if self.remote else type(self.index).__name__,
            "queries": self.queries,
            "errors": self.errors,
            "index": self.index.stats(),
            "health": self.indexer.health_snapshot(),
        }
        if self.ingestor is not None:
            out["streams"] = self.ingestor.snapshot()
        return out
