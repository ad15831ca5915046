"""llmd-indexer: the KV-event indexer as a service.

    discovery (static file | Kubernetes) -> subscriptions (one per engine, kept in step with
    the pool: new pods subscribed, departed pods unsubscribed and cleared) -> llmd.kvcache index
    (in memory, or Valkey shared with other replicas) -> scoring over HTTP and gRPC

HTTP (JSON):
- `POST /v1/score`: `{"model", "prompt" | "messages" | "tokens" | "keys", "pods": [...],
  "cache_salt"}` -> `{"pods": {pod: {"blocks", "score", "tiers"}}, "total_blocks",
  "block_size"}`. `keys` are precomputed request keys (the scheduler's remote mode).
- `POST /v1/observe`: `{"pod", "predicted_tokens", "cached_tokens", "prompt_tokens",
  "engine_block_size"}` feeds the index health check.
- `GET /v1/pods`: subscriptions, per-stream sequence state, index health.
- `/metrics`, `/healthz`, `/readyz`.

gRPC: llm-d's `indexer.v1.IndexerService/GetPodScores` (see `proto.py`) and grpc.health.v1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgspec
from fastapi import FastAPI, Request, Response
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from llmd.indexer import proto
from llmd.kvcache.index import InMemoryIndex, PrefixHit
from llmd.kvcache.indexer import KVCacheIndexer
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
from llmd.runtime.discovery import Endpoint, discovery_source
from llmd.runtime.lifecycle import Health, QuietHttpServer, health_router, http_server

log = logging.getLogger(__name__)

EVENTS_LABEL = "llmd.ai/kv-events-endpoint"
REPLAY_LABEL = "llmd.ai/kv-replay-endpoint"


@dataclass
class IndexerOptions:
    endpoints_file: str | None = None
    endpoint_selector: str | None = None
    endpoint_target_port: int = 8000
    namespace: str = "default"
    host: str = "0.0.0.0"
    http_port: int = 8085
    grpc_port: int = 9095
    tokenizer_dir: str | None = None
    render_url: str | None = None
    block_size: int = 16
    hash_seed: str = ""
    hash_algorithm: str = "cbor-fnv"
    valkey_url: str | None = None
    valkey_prefix: str = ""
    max_keys: int = 10_000_000
    max_bytes: int = 2 << 30
    socket_port: int = 5557
    replay_socket_port: int = 0
    zmq_bind: str | None = None
    shards: int = 4
    gpu_weight: float = 1.0
    cpu_weight: float = 0.8
    speculative_ttl_s: float = 0.0


class _ScoreRequest(msgspec.Struct):
    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tokens: list[int] | None = None
    keys: list[int] | None = None
    pods: list[str] | None = None
    cache_salt: str | None = None


class _Observe(msgspec.Struct):
    pod: str
    predicted_tokens: int
    cached_tokens: int
    prompt_tokens: int
    engine_block_size: int = 16
    speculative_tokens: int = 0


class BadRequestError(ValueError):
    pass


class IndexerApp:
    """Composition root: discovery, subscriptions, the index, the HTTP and gRPC servers."""

    def __init__(self, options: IndexerOptions, registry: CollectorRegistry | None = None) -> None:
        self.options = o = options
        self.registry = registry or CollectorRegistry()
        self.metrics = KVCacheMetrics(self.registry)
        self.processor = TokenProcessor(
            TokenProcessorConfig(o.block_size, o.hash_seed, o.hash_algorithm)
        )
        self.index: InMemoryIndex | ValkeyIndex
        if o.valkey_url:
            self.index = ValkeyIndex(o.valkey_url, prefix=o.valkey_prefix)
        else:
            self.index = InMemoryIndex(o.max_keys, o.max_bytes)
        self.render = RenderClient(o.render_url) if o.render_url else None
        self.tokenizer: ModelTokenizer | None = None
        if o.tokenizer_dir and self.render is None:
            try:
                self.tokenizer = ModelTokenizer(Path(o.tokenizer_dir).expanduser())
            except TokenizerError as exc:
                raise ValueError(str(exc)) from None
        self.applier = EventApplier(self.index, self.processor, self.metrics)
        self.ingestor = Ingestor(self.applier, shards=o.shards)
        self.indexer = KVCacheIndexer(
            self.index,
            self.processor,
            weights={"gpu": o.gpu_weight, "cpu": o.cpu_weight},
            metrics=self.metrics,
            speculative_ttl_s=o.speculative_ttl_s,
            resync=self.ingestor.resync,
        )
        self.health = Health(self.registry)
        self.health.set("endpoints-synced", False, "discovery has not reported yet")
        self._grpc: grpc.aio.Server | None = None
        self._grpc_health = health.aio.HealthServicer()
        self._http: QuietHttpServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.endpoints: list[Endpoint] = []

    # --- scoring -----------------------------------------------------------------------------

    def tokens(self, doc: _ScoreRequest) -> list[int]:
        if doc.tokens is not None:
            return doc.tokens
        if self.tokenizer is None:
            raise BadRequestError(
                "this indexer has no tokenizer (--tokenizer-dir or --render-url): "
                "send 'tokens' or 'keys'"
            )
        if doc.messages is not None:
            msgs = [
                ChatMessageIn(str(m.get("role", "user")), message_text(m.get("content")))
                for m in doc.messages
            ]
            return self.tokenizer.encode_chat(msgs)
        if doc.prompt is not None:
            return self.tokenizer.encode(doc.prompt)
        raise BadRequestError("give one of 'prompt', 'messages', 'tokens' or 'keys'")

    async def score(self, doc: _ScoreRequest) -> tuple[dict[str, PrefixHit], int]:
        if doc.keys is not None:
            keys = doc.keys
        else:
            if not doc.model:
                raise BadRequestError("'model' is required to compute block keys")
            if self.render is not None and doc.tokens is None:
                if doc.messages is not None:
                    body = {"model": doc.model, "messages": doc.messages}
                    tokens = await self.render.tokens("/v1/chat/completions", body)
                elif doc.prompt is not None:
                    body = {"model": doc.model, "prompt": doc.prompt}
                    tokens = await self.render.tokens("/v1/completions", body)
                else:
                    raise BadRequestError("give one of 'prompt', 'messages', 'tokens' or 'keys'")
            elif doc.prompt:
                tokens = await asyncio.to_thread(self.tokens, doc)
            else:
                tokens = self.tokens(doc)
            keys = self.indexer.keys(tokens, doc.model, doc.cache_salt)
        pods = doc.pods if doc.pods else None
        hits = await self.indexer.score(keys, pods)
        return hits, len(keys)

    # --- discovery -> subscriptions ----------------------------------------------------------

    def engine_endpoints(self, endpoints: list[Endpoint]) -> list[EngineEndpoint]:
        o = self.options
        out = []
        for e in endpoints:
            events = e.labels.get(EVENTS_LABEL) or f"tcp://{e.address}:{o.socket_port}"
            replay = e.labels.get(REPLAY_LABEL) or (
                f"tcp://{e.address}:{o.replay_socket_port}" if o.replay_socket_port else None
            )
            out.append(EngineEndpoint(pod=e.host_port, events=events, replay=replay))
        return out

    async def _follow(self, source: Any) -> None:
        async for endpoints in source.watch():
            self.endpoints = [e for e in endpoints if e.ready]
            for t in self.ingestor.sync(self.engine_endpoints(self.endpoints)):
                await t
            self.health.set("endpoints-synced", True)

    def _discovery(self) -> Any:
        o = self.options
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
        score_decoder = msgspec.json.Decoder(_ScoreRequest)
        observe_decoder = msgspec.json.Decoder(_Observe)

        @app.post("/v1/score")
        async def score(request: Request) -> Response:
            try:
                doc = score_decoder.decode(await request.body())
                hits, total = await self.score(doc)
            except (msgspec.DecodeError, msgspec.ValidationError, BadRequestError) as exc:
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

        @app.post("/v1/observe")
        async def observe(request: Request) -> Response:
            try:
                o = observe_decoder.decode(await request.body())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return _json({"error": str(exc)}, 400)
            self.indexer.observe(
                o.pod,
                o.predicted_tokens,
                o.cached_tokens,
                o.prompt_tokens,
                o.engine_block_size,
                o.speculative_tokens,
            )
            return _json(self.indexer.health_snapshot().get(o.pod, {}))

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

    async def _get_pod_scores(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        doc = _ScoreRequest(
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
        o = self.options
        await self.ingestor.start()
        if o.zmq_bind:
            self.ingestor.bind(o.zmq_bind)
        source = self._discovery()
        if source is not None:
            self._tasks.append(asyncio.create_task(self._follow(source), name="discovery"))
        else:
            self.health.set("endpoints-synced", True)
        if isinstance(self.index, ValkeyIndex):
            await self.index.ping()
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
        if server.add_insecure_port(f"{o.host}:{o.grpc_port}") == 0:
            raise OSError(f"cannot listen on gRPC port {o.grpc_port}")
        await server.start()
        await self._grpc_health.set(proto.SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._grpc_health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._grpc = server
        self._http = http_server(self.http_app(), o.host, o.http_port)
        self._tasks.append(asyncio.create_task(self._http.serve(), name="http"))
        log.info(
            "llmd-indexer serving HTTP :%d, gRPC :%d (%s index, block %d tokens)",
            o.http_port,
            o.grpc_port,
            type(self.index).__name__,
            o.block_size,
        )

    async def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.ingestor.stop()
        if self.render is not None:
            await self.render.close()
        if isinstance(self.index, ValkeyIndex):
            await self.index.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        await stop.wait()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")
