"""llmd-indexer: the KV-event indexer as a service.

    discovery (static file | Kubernetes) -> subscriptions (one per engine, kept in step with
    the pool: new pods subscribed, departed pods unsubscribed and cleared) -> llmd.kvcache index
    (in memory, or Valkey shared with other replicas) -> scoring over HTTP and gRPC

HTTP (JSON):
- `POST /v1/score`: `{"model", "prompt" | "messages" | "tokens" | "keys", "pods": [...],
  "cache_salt"}` -> `{"pods": {pod: {"blocks", "score", "tiers"}}, "total_blocks",
  "block_size"}`. `keys` are precomputed request keys (the scheduler's remote mode).
- `GET /v1/pods`: subscriptions, per-stream sequence state, index health.
- `/metrics`, `/healthz`, `/readyz`.

HTTP write routes, on their own port (`write_port`, loopback by default; any other address
needs `api_token`; 0 turns them off), because they change what every scheduler believes:
- `POST /v1/speculate`: `{"pod", "keys"}`: the pod was just picked for these keys (a
  speculative entry until its events confirm them, or `speculative_ttl`).
- `POST /v1/observe`: `{"pod", "predicted_tokens", "cached_tokens", "prompt_tokens",
  "engine_block_size"}` feeds the index health check.
The request and response types are `llmd.kvcache.api`'s, shared with its client.

gRPC: llm-d's `indexer.v1.IndexerService/GetPodScores` (see `proto.py`) and grpc.health.v1.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Literal

import grpc
import msgspec
from fastapi import Depends, FastAPI, Request, Response
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from pydantic import Field, ValidationError, model_validator

from llmd.indexer import proto
from llmd.kvcache.api import ObserveRequest, ScoreRequest, SpeculateRequest
from llmd.kvcache.config import (
    KVCacheConfig,
)
from llmd.kvcache.index import PrefixHit
from llmd.kvcache.stack import EngineAddress, build_kvcache
from llmd.kvcache.tokenization import TokenizerError
from llmd.runtime.config import ConfigError, ConfigIssue, Seconds
from llmd.runtime.discovery import Endpoint, discovery_source
from llmd.runtime.lifecycle import (
    BodyTooLargeError,
    Health,
    QuietHttpServer,
    grpc_listen,
    health_router,
    is_loopback,
    read_body,
    require_token,
    serve_http,
)
from llmd.runtime.service import ServiceConfig
from llmd.runtime.tasks import cancel_tasks
from llmd.runtime.tls import TLSServing

log = logging.getLogger(__name__)

MAX_TIER_WEIGHTS = 8
MAX_TIER_WEIGHT = 10.0
"""Bounds of a score request's `tier_weights` (llm-d's tier weights are at most 1.0)."""


def _valid_weights(weights: dict[str, float]) -> bool:
    return len(weights) <= MAX_TIER_WEIGHTS and all(
        math.isfinite(w) and 0.0 <= w <= MAX_TIER_WEIGHT for w in weights.values()
    )


class IndexerConfig(ServiceConfig, TLSServing):
    """Everything `llmd-indexer` takes; `kvcache()` maps it onto llm-d-kv-cache's config."""

    endpoints_file: str | None = Field(
        default=None, description="static discovery file (llm-d file-discovery format)"
    )
    endpoint_selector: str | None = Field(
        default=None, description="Kubernetes label selector of the engine pods"
    )
    endpoint_target_port: int = Field(default=8000, gt=0, lt=65536, description="engine HTTP port")
    namespace: str = Field(default="default", description="namespace of the pods")
    http_port: int = Field(
        default=8085, ge=0, lt=65536, description="HTTP port (scoring, /metrics, health)"
    )
    grpc_port: int = Field(default=9095, ge=0, lt=65536, description="gRPC port")
    tokenizer_dir: str | None = Field(
        default=None, description="model directory whose tokenizer and chat template to use"
    )
    render_url: str | None = Field(
        default=None, description="a vLLM server whose /render endpoints tokenize (exactly as vLLM)"
    )
    block_size: int = Field(default=16, gt=0, description="tokens per index block")
    hash_seed: str = Field(default="", description="request-key hash seed (llm-d hashSeed)")
    hash_algorithm: Literal["cbor-fnv", "xxh64"] = Field(
        default="cbor-fnv", description="request-key hash"
    )
    valkey_url: str | None = Field(
        default=None, description="share the index in Redis/Valkey (redis:// or valkey://)"
    )
    valkey_prefix: str = Field(default="", description="key prefix in the shared index")
    key_ttl: int = Field(
        default=0, ge=0, description="shared index: seconds a block key lives (0 = no expiry)"
    )
    pod_ttl: Seconds = Field(
        default=900.0,
        gt=0,
        description="shared index: a pod silent this long (and not in the pool) is cleared",
    )
    max_keys: int = Field(default=10_000_000, gt=0, description="in-memory index: key bound")
    max_bytes: int = Field(default=2 << 30, gt=0, description="in-memory index: byte bound")
    socket_port: int = Field(
        default=5557, gt=0, lt=65536, description="engines' KV PUB port (when no label names it)"
    )
    replay_socket_port: int = Field(
        default=0, ge=0, lt=65536, description="engines' replay ROUTER port (0 = none)"
    )
    zmq_bind: str | None = Field(
        default=None, description="also bind a SUB socket engines connect to (centralized)"
    )
    shards: int = Field(default=4, gt=0, description="ordered apply queues")
    gpu_weight: float = Field(default=1.0, ge=0, description="score of a GPU-tier block")
    cpu_weight: float = Field(default=0.8, ge=0, description="score of a CPU-tier block")
    speculative_ttl: Seconds = Field(
        default=2.0, ge=0, description="how long a /v1/speculate entry lives (0 = off)"
    )
    write_port: int = Field(
        default=8086,
        ge=0,
        lt=65536,
        description="port of the write routes (/v1/speculate, /v1/observe); 0 turns them off",
    )
    write_host: str = Field(
        default="127.0.0.1",
        description="address the write routes listen on; any other than loopback needs api_token",
    )
    api_token: str | None = Field(
        default=None,
        description="when set, /v1/score and the write routes require "
        "'Authorization: Bearer <token>'",
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, gt=0, description="largest accepted request body"
    )

    @model_validator(mode="after")
    def _one_discovery(self) -> IndexerConfig:
        if self.endpoints_file is not None and self.endpoint_selector is not None:
            raise ValueError("give endpoints_file or endpoint_selector, not both")
        if self.write_port and not self.api_token and not is_loopback(self.write_host):
            raise ValueError(
                f"write routes on {self.write_host!r} (not loopback) need api_token: anyone who "
                "can reach them can rewrite the index; set api_token, use write_host 127.0.0.1, "
                "or turn them off with write_port 0"
            )
        if self.write_port and self.write_port == self.http_port:
            raise ValueError("write_port must differ from http_port (0 turns the routes off)")
        return self

    def kvcache(self) -> KVCacheConfig:
        """The KV-cache stack these settings describe, in llm-d-kv-cache's names."""
        index: dict[str, Any] = {
            "inMemoryConfig": {"size": self.max_keys, "maxBytes": self.max_bytes}
        }
        if self.valkey_url:
            index["valkeyConfig"] = {
                "address": self.valkey_url,
                "keyPrefix": self.valkey_prefix,
                "keyTtlSeconds": self.key_ttl,
                "podTtlSeconds": self.pod_ttl,
            }
        doc: dict[str, Any] = {
            "tokenProcessorConfig": {
                "blockSizeTokens": self.block_size,
                "hashSeed": self.hash_seed,
                "hashAlgorithm": self.hash_algorithm,
            },
            "indexerConfig": {
                "kvBlockIndexConfig": index,
                "kvCacheBackendConfigs": [
                    {"name": "gpu", "weight": self.gpu_weight},
                    {"name": "cpu", "weight": self.cpu_weight},
                ],
            },
            "kvEventsConfig": {
                "zmqEndpoint": self.zmq_bind or "",
                "concurrency": self.shards,
                "podDiscoveryConfig": {
                    "socketPort": self.socket_port,
                    "replaySocketPort": self.replay_socket_port,
                },
            },
            "speculativeIndexing": self.speculative_ttl > 0,
            "speculativeTTL": self.speculative_ttl,
        }
        if self.tokenizer_dir or self.render_url:
            doc["tokenizer"] = {"modelDir": self.tokenizer_dir, "renderUrl": self.render_url}
        return KVCacheConfig.model_validate(doc)


class BadRequestError(ValueError):
    pass


class IndexerApp:
    """Composition root: discovery, the KV-cache stack, the HTTP and gRPC servers."""

    def __init__(self, config: IndexerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        try:
            self.stack = build_kvcache(config.kvcache(), self.registry)
        except (TokenizerError, ValidationError) as exc:
            raise ConfigError(
                [ConfigIssue("tokenizer_dir", str(exc))], "llmd-indexer configuration"
            ) from None
        self.index = self.stack.index
        self.indexer = self.stack.indexer
        self.ingestor = self.stack.ingestor
        self.processor = self.stack.processor
        self.health = Health(self.registry)
        self.health.set("endpoints-synced", False, "discovery has not reported yet")
        self._grpc: grpc.aio.Server | None = None
        self._grpc_health = health.aio.HealthServicer()
        self._servers: list[tuple[QuietHttpServer, asyncio.Task[None]]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.endpoints: list[Endpoint] = []

    def describe(self) -> str:
        c = self.config
        return (
            f"llmd-indexer: {type(self.index).__name__} index, block {c.block_size} tokens, "
            f"hash {c.hash_algorithm}, HTTP :{c.http_port}, "
            f"gRPC :{c.grpc_port} ({'TLS' if c.secure_serving else 'plaintext'}), "
            f"writes {f'{c.write_host}:{c.write_port}' if c.write_port else 'off'}, "
            f"tokenizer {'render ' + c.render_url if c.render_url else c.tokenizer_dir or 'none'}"
        )

    # --- scoring -----------------------------------------------------------------------------

    async def score(self, doc: ScoreRequest) -> tuple[dict[str, PrefixHit], int]:
        if doc.keys is not None:
            keys = doc.keys
        else:
            if not doc.model:
                raise BadRequestError("'model' is required to compute block keys")
            if doc.tokens is not None:
                tokens = doc.tokens
            elif doc.prompt is None and doc.messages is None:
                raise BadRequestError("give one of 'prompt', 'messages', 'tokens' or 'keys'")
            elif self.stack.keys.tokenizer is None and self.stack.keys.render is None:
                raise BadRequestError(
                    "this indexer has no tokenizer (--tokenizer-dir or --render-url): "
                    "send 'tokens' or 'keys'"
                )
            else:
                tokens = await self.stack.keys.tokens(doc.model, doc.prompt, doc.messages)
            keys = self.stack.keys.keys(tokens, doc.model, doc.cache_salt)
        pods = doc.pods if doc.pods else None
        weights = doc.tier_weights
        if weights is not None and not _valid_weights(weights):
            raise BadRequestError(
                f"'tier_weights': at most {MAX_TIER_WEIGHTS} tiers, each weight a finite "
                f"number in [0, {MAX_TIER_WEIGHT}]"
            )
        hits = await self.indexer.score(keys, pods, doc.domains, weights)
        return hits, len(keys)

    # --- discovery -> subscriptions ----------------------------------------------------------

    def known_pods(self) -> set[str]:
        """Pods the indexer follows: writes about any other pod are refused, which bounds
        every per-pod structure by the size of the pool."""
        pods = {e.pod for e in self.ingestor.subscribed}
        pods.update(k.split("|", 1)[0] for k in self.ingestor.streams)  # centralized mode
        return pods

    async def _follow(self, source: Any) -> None:
        async for endpoints in source.watch():
            self.endpoints = [e for e in endpoints if e.ready]
            await self.stack.sync(
                [EngineAddress(e.host_port, e.address, dict(e.labels)) for e in self.endpoints]
            )
            self.health.set("endpoints-synced", True)

    def _discovery(self) -> Any:
        o = self.config
        return discovery_source(
            endpoints_file=o.endpoints_file,
            selector=o.endpoint_selector,
            namespace=o.namespace,
            target_port=o.endpoint_target_port,
            registry=self.registry,
        )

    # --- servers -----------------------------------------------------------------------------

    def http_app(self) -> FastAPI:
        app = FastAPI(title="llmd-indexer", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))
        score_decoder = msgspec.json.Decoder(ScoreRequest)
        guarded = [Depends(require_token(self.config.api_token))]
        limit = self.config.max_request_bytes

        @app.post("/v1/score", dependencies=guarded)
        async def score(request: Request) -> Response:
            try:
                doc = score_decoder.decode(await read_body(request, limit))
                hits, total = await self.score(doc)
            except BodyTooLargeError as exc:
                return _json({"error": str(exc)}, 413)
            except (
                msgspec.DecodeError,
                msgspec.ValidationError,
                BadRequestError,
                RecursionError,
            ) as exc:
                return _json({"error": str(exc)}, 400)
            except (TokenizerError, ValueError) as exc:
                return _json({"error": str(exc)}, 422)
            return _json(
                {
                    "pods": {
                        p: {"blocks": h.blocks, "score": h.score, "tiers": h.tiers}
                        for p, h in hits.items()
                    },
                    "total_blocks": total,
                    "block_size": self.processor.block_size,
                }
            )

        @app.get("/v1/pods")
        async def pods() -> Response:
            return _json(
                {
                    "subscriptions": [
                        {"pod": e.pod, "events": e.events, "replay": e.replay}
                        for e in self.ingestor.subscribed
                    ],
                    "streams": self.ingestor.snapshot(),
                    "health": self.indexer.health_snapshot(),
                    "index": self.index.stats(),
                }
            )

        return app

    def write_app(self) -> FastAPI:
        """The routes that change the index, served on their own port (`write_port`)."""
        app = FastAPI(title="llmd-indexer writes", docs_url=None, redoc_url=None)
        observe_decoder = msgspec.json.Decoder(ObserveRequest)
        speculate_decoder = msgspec.json.Decoder(SpeculateRequest)
        guarded = [Depends(require_token(self.config.api_token))]
        limit = self.config.max_request_bytes

        @app.post("/v1/observe", dependencies=guarded)
        async def observe(request: Request) -> Response:
            try:
                o = observe_decoder.decode(await read_body(request, limit))
            except BodyTooLargeError as exc:
                return _json({"error": str(exc)}, 413)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                return _json({"error": str(exc)}, 400)
            if o.pod not in self.known_pods():
                return _json({"error": f"unknown pod {o.pod[:100]!r}"}, 404)
            self.indexer.observe(
                o.pod,
                o.predicted_tokens,
                o.cached_tokens,
                o.prompt_tokens,
                o.engine_block_size,
                o.speculative_tokens,
            )
            return _json(self.indexer.health_snapshot().get(o.pod, {}))

        @app.post("/v1/speculate", dependencies=guarded)
        async def speculate(request: Request) -> Response:
            try:
                s = speculate_decoder.decode(await read_body(request, limit))
            except BodyTooLargeError as exc:
                return _json({"error": str(exc)}, 413)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                return _json({"error": str(exc)}, 400)
            if s.pod not in self.known_pods():
                return _json({"error": f"unknown pod {s.pod[:100]!r}"}, 404)
            await self.indexer.speculate(s.keys, s.pod)
            return _json({})

        return app

    async def _get_pod_scores(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        doc = ScoreRequest(
            model=request.model_name,
            prompt=request.prompt or None,
            tokens=list(request.token_ids) or None,
            pods=list(request.pod_identifiers) or None,
            cache_salt=request.cache_salt or None,
        )
        try:
            hits, total = await self.score(doc)
        except BadRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (TokenizerError, ValueError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return proto.GetPodScoresResponse(
            scores=[
                proto.PodScore(pod=p, score=h.score, matched_blocks=h.blocks, total_blocks=total)
                for p, h in sorted(hits.items(), key=lambda kv: -kv[1].score)
            ]
        )

    async def start(self) -> None:
        o = self.config
        await self.stack.start()
        source = self._discovery()
        if source is not None:
            self._tasks.append(asyncio.create_task(self._follow(source), name="discovery"))
        else:
            self.health.set("endpoints-synced", True)
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            proto.SERVICE,
            {
                "GetPodScores": grpc.unary_unary_rpc_method_handler(
                    self._get_pod_scores,
                    request_deserializer=proto.GetPodScoresRequest.FromString,
                    response_serializer=lambda m: m.SerializeToString(),
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        health_pb2_grpc.add_HealthServicer_to_server(self._grpc_health, server)
        tls = o.tls_files()
        credentials = tls.credentials() if tls is not None else None
        grpc_listen(server, f"{o.host}:{o.grpc_port}", credentials)
        await server.start()
        await self._grpc_health.set(proto.SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._grpc_health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._grpc = server
        self._servers.append(serve_http(self.http_app(), o.host, o.http_port))
        if o.write_port:
            self._servers.append(serve_http(self.write_app(), o.write_host, o.write_port))
        log.info(
            "llmd-indexer serving HTTP :%d, gRPC :%d, writes %s (%s index, block %d tokens)",
            o.http_port,
            o.grpc_port,
            f"{o.write_host}:{o.write_port}" if o.write_port else "off",
            type(self.index).__name__,
            o.block_size,
        )

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:  # let them close their sockets before the process moves on
            await asyncio.wait([task for _, task in self._servers], timeout=3)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await cancel_tasks(*self._tasks)
        await self.stack.stop()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def build(config: IndexerConfig) -> IndexerApp:
    """The composition root: the indexer service for a config (ConfigError when invalid)."""
    return IndexerApp(config)
