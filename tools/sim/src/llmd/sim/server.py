"""One simulated vLLM server: the HTTP surface over an Engine, its metrics, events and P/D side.

Many servers can share one process and one event loop (each on its own port); nothing here is
global. Paths under /sim/ are the simulator's own (faults, state); everything else answers as
vLLM 0.32 answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq.asyncio
from aiohttp import web  # a third of uvicorn/Starlette's CPU per request: benchmarks/http_stacks.py

from llmd.kvcache.publisher import KVEventPublisher
from llmd.protocol.errors import ProtocolError
from llmd.protocol.kv_events import format_topic
from llmd.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    parse_request,
)
from llmd.sim import responses
from llmd.sim.config import FaultConfig, SimServerConfig
from llmd.sim.engine import Engine, EngineError, EngineSettings, LoraAdapter, SimClock, SimRequest
from llmd.sim.latency import LatencyModel
from llmd.sim.metrics import CONTENT_TYPE, EngineMetrics, restrict_page
from llmd.sim.pd import InvalidTransferParamsError, SimNixlConnector, parse_decode_params
from llmd.sim.storage import shared_tier
from llmd.sim.tokenizer import ChatMessageIn, SimTokenizer, TokenizerError, default_tokenizer_dir

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
MAX_BODY_BYTES = 64 * 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def resolve_model_dir(cfg: SimServerConfig) -> tuple[Path, Path | None]:
    """(tokenizer directory, model directory or None) for a config's model/tokenizer fields."""
    model_path = Path(cfg.model).expanduser()
    model_dir = model_path if model_path.is_dir() else None
    if cfg.tokenizer:
        tok = Path(cfg.tokenizer).expanduser()
        if not tok.is_dir():
            raise TokenizerError(f"tokenizer directory {tok} does not exist")
        return tok, model_dir
    if model_dir is not None:
        return model_dir, model_dir
    return default_tokenizer_dir(), None


def _max_model_len(cfg: SimServerConfig, model_dir: Path | None, tok: SimTokenizer) -> int:
    if cfg.max_model_len is not None:
        return cfg.max_model_len
    if model_dir is not None and (model_dir / "config.json").is_file():
        with contextlib.suppress(ValueError, OSError):
            data = msgspec.json.decode((model_dir / "config.json").read_bytes())
            value = data.get("max_position_embeddings") if isinstance(data, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return tok.model_max_length or 8192


class SimServer:
    """One simulated engine with its HTTP site, KV-event publisher and P/D connector."""

    def __init__(
        self,
        cfg: SimServerConfig,
        *,
        zmq_ctx: zmq.asyncio.Context | None = None,
        tokenizer: SimTokenizer | None = None,
    ) -> None:
        self.cfg = cfg
        tok_dir, self.model_dir = resolve_model_dir(cfg)
        self.tokenizer = tokenizer or SimTokenizer(tok_dir)
        self.model_name = cfg.served_model_name or cfg.model
        self.pod_name = cfg.pod_name or f"{cfg.host}:{cfg.port}"
        self.max_model_len = _max_model_len(cfg, self.model_dir, self.tokenizer)
        self.fingerprint = f"vllm-{VLLM_VERSION}-{uuid.uuid4().hex[:8]}"
        self._zmq = zmq_ctx
        self._own_zmq = zmq_ctx is None
        self.faults = cfg.faults.model_copy()
        self._fault_rng = random.Random(cfg.seed + 7)
        self.requests_seen = 0
        self.in_flight = 0
        self.crashed = False
        self.ec = cfg.ec_transfer_config
        self._encoder = asyncio.Lock()
        """One multimodal item through the encoder at a time (it shares the accelerator)."""
        self.mm_encoded = 0
        self.mm_received = 0
        """Multimodal items encoded here, and items whose encoder output came from elsewhere
        (named by the request's ec_transfer_params)."""
        self.loras: dict[str, LoraAdapter] = {}
        self._next_lora_id = 1
        self._vocab = self.tokenizer.output_vocabulary()
        self._texts = {i: self.tokenizer.decode([i]) for i in self._vocab}
        self._runner: web.AppRunner | None = None
        self.engine: Engine | None = None
        self.publisher: KVEventPublisher | None = None
        self.connector: SimNixlConnector | None = None
        self.metrics: EngineMetrics | None = None
        self.bound_port: int | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if self.faults.startup_delay_s:
            log.info("%s: slow start, %.1fs", self.pod_name, self.faults.startup_delay_s)
            await asyncio.sleep(self.faults.startup_delay_s)
        if self._zmq is None:
            self._zmq = zmq.asyncio.Context()
        transfer = cfg.kv_transfer_config
        role = transfer.kv_role if transfer and transfer.kv_connector else None
        cache_config = self._cache_config_labels()
        self.metrics = EngineMetrics(
            self.model_name,
            max_model_len=self.max_model_len,
            cache_config=cache_config,
            kv_consumer=role in ("kv_consumer", "kv_both"),
            nixl=role is not None,
        )
        self.metrics.offload = cfg.storage is not None
        settings = EngineSettings(
            block_size=cfg.block_size,
            num_gpu_blocks=cfg.num_gpu_blocks(),
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_loras=cfg.max_loras,
            max_waiting=cfg.max_waiting_requests,
            enable_prefix_caching=cfg.enable_prefix_caching,
            hash_algo=cfg.prefix_caching_hash_algo,
            hash_seed=cfg.hash_seed,
            kv_load_failure_policy=transfer.kv_load_failure_policy if transfer else "fail",
        )
        events = cfg.kv_events_config
        if events is not None and events.enable_kv_cache_events and events.publisher == "zmq":
            self.publisher = KVEventPublisher(
                self._zmq,
                endpoint=events.endpoint,
                replay_endpoint=events.replay_endpoint,
                bind_host=cfg.host,  # `tcp://*:<port>` binds where the HTTP API listens
                topic=events.topic,
                buffer_steps=events.buffer_steps,
                hwm=events.hwm,
                seed=cfg.seed,
            )
            self.publisher.drop_rate = self.faults.drop_events_rate
            await self.publisher.start()
        self.engine = Engine(
            settings,
            LatencyModel(cfg.latency_profile(), noise=cfg.noise, seed=cfg.seed),
            SimClock(cfg.speed),
            self.metrics,
            self._vocab,
            publish=self.publisher.publish if self.publisher else None,
            seed=cfg.seed,
            storage=shared_tier(cfg.storage, cfg.block_size) if cfg.storage else None,
        )
        if role is not None:
            assert transfer is not None
            self.connector = SimNixlConnector(
                self.engine,
                self._zmq,
                role=role,
                engine_id=transfer.engine_id,
                side_channel_host=os.environ.get(
                    "VLLM_NIXL_SIDE_CHANNEL_HOST", cfg.side_channel_host
                ),
                side_channel_port=cfg.side_channel_port,
                lease_s=transfer.lease_s,
            )
            await self.connector.start()
        for module in cfg.lora_modules:
            self._load_lora(module.name, module.path)
        self._update_lora_info()
        self.engine.start()
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._not_found])
        self._routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else cfg.port
        log.info(
            "%s serving %s on http://%s:%s (%d KV blocks of %d, profile %s, speed %sx)",
            self.pod_name,
            self.model_name,
            cfg.host,
            self.bound_port,
            settings.num_gpu_blocks,
            cfg.block_size,
            cfg.profile,
            cfg.speed,
        )

    def _cache_config_labels(self) -> dict[str, str]:
        """vllm:cache_config_info's labels: vLLM 0.32's CacheConfig fields, as it prints them."""
        cfg = self.cfg
        blocks = cfg.num_gpu_blocks()
        tokens = blocks * cfg.block_size
        return {
            "_block_size_resolved": "True",
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "cache_hit_alignment_tokens": "None",
            "effective_attention_block_size": str(cfg.block_size),
            "enable_mamba_shared_prefix_checkpoint": "False",
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "gpu_memory_utilization": "0.92",
            "hash_block_size": "None",
            "is_attention_free": "False",
            "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "None",
            "kv_cache_max_concurrency": str(round(tokens / self.max_model_len, 2)),
            "kv_cache_memory_bytes": "None",
            "kv_cache_size_tokens": str(tokens),
            "kv_offloading_backend": "native",
            "kv_offloading_size": "None",
            "kv_sharing_fast_prefill": "False",
            "mamba_block_size": "None",
            "mamba_cache_dtype": "auto",
            "mamba_cache_mode": "none",
            "mamba_page_size_padded": "None",
            "mamba_ssm_cache_dtype": "float32",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(blocks),
            "num_gpu_blocks_override": str(cfg.num_gpu_blocks_override),
            "prefix_cache_retention_interval": "0",
            "prefix_caching_hash_algo": cfg.prefix_caching_hash_algo,
            "prefix_match_unit": "None",
            "replayssm_buffer_len": "16",
            "skip_page_size_padded": "None",
            "sliding_window": "None",
            "swa_bounded_replay": "True",
            "use_kda_recoverssm": "False",
            "use_replayssm": "False",
            "user_specified_block_size": "True",
        }

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.engine is not None:
            await self.engine.stop()
        if self.connector is not None:
            await self.connector.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self._own_zmq and self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    async def crash(self) -> None:
        """Die like a killed process: the port closes and open connections drop."""
        if self.crashed:
            return
        self.crashed = True
        log.error("%s: crash fault: stopping", self.pod_name)
        server = self._runner.server if self._runner is not None else None
        for conn in list(server.connections) if server is not None else []:
            transport = conn.transport
            if transport is not None:
                transport.abort()  # reset open connections instead of finishing their responses
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.bound_port or self.cfg.port}"

    @property
    def topic(self) -> str:
        events = self.cfg.kv_events_config
        if events is not None and events.topic:
            return events.topic
        return format_topic(self.pod_name, self.model_name)

    # -- routing ----------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        # vLLM's plain /metrics route ignores a query; its /metrics/ mount is prometheus_client's
        # ASGI app, which honours `name[]` (the scheduler's filtered scrapes)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/metrics/", self.prometheus)
        r.add_get("/version", self.version)
        r.add_get("/load", self.load)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        if self.cfg.allow_runtime_lora_updating or os.environ.get(
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING", ""
        ).lower() in ("1", "true"):
            r.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        if os.environ.get("VLLM_SERVER_DEV_MODE", "") == "1":
            r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        r.add_post("/sim/faults", self.set_faults)
        r.add_get("/sim/state", self.state)

    @web.middleware
    async def _not_found(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """FastAPI's bodies for unknown paths and methods, as vLLM serves them."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)

    @staticmethod
    def _error(
        message: str, kind: str = "BadRequestError", status: int = 400, param: str | None = None
    ) -> web.Response:
        return web.Response(
            body=error_body(message, kind=kind, code=status, param=param),
            status=status,
            content_type="application/json",
        )

    # -- simple endpoints -------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.engine is None or self.engine.fatal is not None:
            return web.Response(status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": self.in_flight})

    async def prometheus(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        assert self.engine is not None
        rate = self.faults.metrics_error_rate
        if rate and self._fault_rng.random() < rate:
            return web.Response(status=500, text="simulated metrics outage (metrics_error_rate)")
        self.engine.refresh_gauges()
        asked = request.query.getall("name[]", []) if request.path.endswith("/") else []
        wanted = frozenset(asked) if asked else None
        if self.cfg.metrics_dialect == "sglang":
            page = self.metrics.render_sglang()
        else:
            page = self.metrics.render(wanted)  # renders only the asked-for families
        if wanted is not None:
            page = restrict_page(page, wanted)
        return web.Response(body=page.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        root = str(self.model_dir) if self.model_dir else self.cfg.model

        def card(
            model_id: str, root_: str, parent: str | None, max_len: int | None
        ) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root_,
                "parent": parent,
                "max_model_len": max_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex[:16]}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }

        data = [card(self.model_name, root, None, self.max_model_len)]
        data += [card(a.name, a.path, self.model_name, None) for a in self.loras.values()]
        return web.json_response({"object": "list", "data": data})

    async def _json(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise _BadRequestError(
                f"JSON decode error: {exc}", "Bad Request", _json_error_param(str(exc))
            ) from None
        if not isinstance(data, dict):
            raise _BadRequestError("the request body must be a JSON object", "Bad Request", "body")
        return data

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            data = await self._json(request)
            if "messages" in data:
                messages = [
                    ChatMessageIn(m["role"], _content(m.get("content"))) for m in data["messages"]
                ]
                ids = self.tokenizer.encode_chat(
                    messages, add_generation_prompt=bool(data.get("add_generation_prompt", True))
                )
            elif isinstance(data.get("prompt"), str):
                ids = self.tokenizer.encode(
                    data["prompt"], add_special_tokens=bool(data.get("add_special_tokens", True))
                )
            else:
                raise _BadRequestError(
                    "either prompt (a string) or messages is required", param="prompt"
                )
        except _BadRequestError as exc:
            return self._error(str(exc), exc.kind, 400, exc.param)
        except (TokenizerError, KeyError, TypeError) as exc:
            return self._error(f"cannot tokenize: {exc}")
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.max_model_len,
                "tokens": ids,
                "token_strs": None,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            data = await self._json(request)
            tokens = data.get("tokens")
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise _BadRequestError("tokens must be a list of token ids", param="tokens")
        except _BadRequestError as exc:
            return self._error(str(exc), exc.kind, 400, exc.param)
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    # -- LoRA -------------------------------------------------------------------------------

    def _load_lora(self, name: str, path: str) -> LoraAdapter:
        adapter = LoraAdapter(name=name, path=path, lora_id=self._next_lora_id)
        self._next_lora_id += 1
        self.loras[name] = adapter
        return adapter

    def _update_lora_info(self) -> None:
        if not self.cfg.enable_lora or self.metrics is None or self.engine is None:
            return
        running = sorted({r.lora.name for r in self.engine.running if r.lora})
        waiting = sorted({r.lora.name for r in self.engine.waiting if r.lora})
        self.metrics.lora_info = (self.cfg.max_loras, ",".join(running), ",".join(waiting))

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            data = await self._json(request)
        except _BadRequestError as exc:
            return self._error(str(exc), exc.kind, 400, exc.param)
        name, path = data.get("lora_name"), data.get("lora_path")
        if not self.cfg.enable_lora:
            return self._error("LoRA is not enabled on this server (start it with --enable-lora)")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            return self._error(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name in self.loras:
            return self._error(
                f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
            )
        self._load_lora(name, path)
        self._update_lora_info()
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            data = await self._json(request)
        except _BadRequestError as exc:
            return self._error(str(exc), exc.kind, 400, exc.param)
        name = data.get("lora_name")
        if not isinstance(name, str) or name not in self.loras:
            return self._error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.loras[name]
        self._update_lora_info()
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        if not self.engine.pool.reset_prefix_cache():
            return self._error("the prefix cache cannot be reset while requests run", status=500)
        self.engine.wake()
        return web.Response(status=200)

    # -- simulator controls -----------------------------------------------------------------

    async def set_faults(self, request: web.Request) -> web.Response:
        """Change faults at run time; also {"crash": true}, {"hang": bool} and
        {"reset_event_sequence": true}."""
        try:
            data = await self._json(request)
        except _BadRequestError as exc:
            return self._error(str(exc), exc.kind, 400, exc.param)
        actions = {k: data.pop(k) for k in ("crash", "hang", "reset_event_sequence") if k in data}
        try:
            self.faults = FaultConfig.model_validate({**self.faults.model_dump(), **data})
        except ValueError as exc:
            return self._error(f"invalid faults: {exc}")
        if self.publisher is not None:
            self.publisher.drop_rate = self.faults.drop_events_rate
            if actions.get("reset_event_sequence"):
                self.publisher.reset_sequence()
        if self.engine is not None and "hang" in actions:
            if actions["hang"]:
                self.engine.hang()
            else:
                self.engine.unhang()
        if actions.get("crash"):
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.crash()))
        return web.json_response({"faults": self.faults.model_dump(), **actions})

    async def state(self, request: web.Request) -> web.Response:
        e = self.engine
        assert e is not None
        return web.json_response(
            {
                "pod": self.pod_name,
                "model": self.model_name,
                "running": len(e.running),
                "waiting": len(e.waiting),
                "fetching": len(e.fetching),
                "steps": e.steps,
                "hung": e.hung,
                "kv_usage": e.pool.usage,
                "free_blocks": e.pool.num_free_blocks,
                "cached_hashes": e.pool.num_cached_hashes,
                "leases": len(self.connector.leases) if self.connector else 0,
                "events": {
                    "next_seq": self.publisher.next_seq,
                    "published": self.publisher.published,
                    "dropped": self.publisher.dropped,
                }
                if self.publisher
                else None,
                "requests_seen": self.requests_seen,
                "mm_items": {"encoded": self.mm_encoded, "received": self.mm_received},
                "faults": self.faults.model_dump(),
            }
        )

    # -- inference --------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=True)

    def _count_request(self) -> None:
        self.requests_seen += 1
        f = self.faults
        assert self.engine is not None
        if f.hang_after_requests is not None and self.requests_seen > f.hang_after_requests:
            self.engine.hang()
        if f.crash_after_requests is not None and self.requests_seen > f.crash_after_requests:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.crash()))
            raise EngineError(
                "engine crashed (llmd-sim crash fault)", status=500, kind="EngineDeadError"
            )
        if f.error_rate and self._fault_rng.random() < f.error_rate:
            raise EngineError(
                "simulated internal error (llmd-sim error_rate fault)",
                status=500,
                kind="InternalServerError",
            )

    def _resolve_model(self, model: str | None) -> tuple[str, LoraAdapter | None]:
        if model is None or model == self.model_name:
            return self.model_name, None
        adapter = self.loras.get(model)
        if adapter is not None:
            return model, adapter
        aliases = ", ".join([self.model_name, *self.loras])
        raise _BadRequestError(
            f"The model `{model}` does not exist. Valid aliases: {aliases}.",
            "NotFoundError",
            "model",
            status=404,
        )

    def _prompts(self, req: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
        if isinstance(req, ChatCompletionRequest):
            messages = [
                ChatMessageIn(
                    m.role,
                    m.content
                    if isinstance(m.content, str)
                    else "\n".join(p.text or "" for p in m.content or [] if p.type == "text"),
                )
                for m in req.messages
            ]
            try:
                ids = self.tokenizer.encode_chat(
                    messages,
                    add_generation_prompt=req.add_generation_prompt,
                    template_kwargs=req.chat_template_kwargs,
                )
            except TokenizerError as exc:
                raise _BadRequestError(str(exc), param="messages") from None
            return [ids]
        out: list[list[int]] = []
        for p in req.prompts():
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise _BadRequestError(
                    "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
                )
            out.append(ids)
        return out

    async def _encode_media(
        self, req: CompletionRequest | ChatCompletionRequest
    ) -> dict[str, Any] | None:
        """Run the encoder over the request's multimodal items, except those whose output a
        consumer is told to read elsewhere (`ec_transfer_params`); on a producer, where each
        encoded item can be read, by mm hash (what vLLM's EC connectors answer)."""
        if not isinstance(req, ChatCompletionRequest):
            return None
        hashes = media_hashes(req)
        if not hashes:
            return None
        given = req.ec_transfer_params or {}
        consumer = self.ec is not None and self.ec.consumes
        todo = [h for h in hashes if not (consumer and isinstance(given.get(h), dict))]
        self.mm_received += len(hashes) - len(todo)
        per_item = self.cfg.latency_profile().encode_item_s / self.cfg.speed
        for _ in todo:
            async with self._encoder:
                if per_item:
                    await asyncio.sleep(per_item)
                self.mm_encoded += 1
        if self.ec is None or not self.ec.produces:
            return None
        return {
            h: {
                "peer_host": self.cfg.host,
                "peer_port": self.cfg.side_channel_port,
                "size_bytes": MM_ITEM_BYTES,
                "shape": [MM_ITEM_TOKENS, MM_HIDDEN],
            }
            for h in hashes
        }

    def _max_tokens(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int) -> int:
        requested = req.output_limit() if isinstance(req, ChatCompletionRequest) else req.max_tokens
        if requested is None:
            if isinstance(req, CompletionRequest):
                requested = 16
            else:
                return max(self.max_model_len - prompt_len, 1)
        if requested < 1:
            raise _BadRequestError(
                f"max_tokens must be at least 1, got {requested}. "
                f"(parameter=max_tokens, value={requested})",
                param="max_tokens",
            )
        if requested > self.max_model_len:
            raise _BadRequestError(
                f"max_tokens={requested} cannot be greater than max_model_len="
                f"{self.max_model_len}. Please request fewer output tokens. "
                f"(parameter=max_tokens, value={requested})",
                param="max_tokens",
            )
        if prompt_len + requested > self.max_model_len:
            raise _BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {requested} output tokens and your prompt contains "
                f"{prompt_len} input tokens, for a total of {prompt_len + requested} tokens. "
                "Please reduce the length of the input prompt or the number of requested "
                "output tokens.",
                param="input_tokens",
            )
        return requested

    async def _inference(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        engine = self.engine
        assert engine is not None
        self.in_flight += 1
        children: list[SimRequest] = []
        try:
            try:
                body = await request.read()
                try:
                    parsed = parse_request(request.path, body)
                except ProtocolError as exc:
                    raise _from_protocol_error(str(exc)) from None
                model, lora = self._resolve_model(parsed.model)
                prompts = self._prompts(parsed)
                max_tokens = [self._max_tokens(parsed, len(p)) for p in prompts]
                self._count_request()
                remote = self._decode_params(parsed.kv_transfer_params)
            except _BadRequestError as exc:
                return self._error(str(exc), exc.kind, exc.status, exc.param)
            except EngineError as exc:
                return self._error(str(exc), exc.kind, exc.status)
            ec_params = await self._encode_media(parsed)
            base = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{base}"
            do_remote_decode = (
                bool(
                    parsed.kv_transfer_params and parsed.kv_transfer_params.get("do_remote_decode")
                )
                and self.connector is not None
                and self.connector.produces
            )
            for p_index, (ids, limit) in enumerate(zip(prompts, max_tokens, strict=True)):
                for c in range(parsed.n):
                    child = engine.new_request(
                        f"{rid}-{p_index * parsed.n + c}-{uuid.uuid4().hex[:8]}",
                        ids,
                        limit,
                        lora=lora,
                        cache_salt=parsed.cache_salt,
                        seed=None if parsed.seed is None else parsed.seed + c,
                    )
                    child.params_n = parsed.n
                    child.params_max_tokens = limit
                    child.do_remote_decode = do_remote_decode
                    child.remote = remote
                    children.append(child)
            try:
                for child in children:
                    engine.submit(child)
            except EngineError as exc:
                return self._error(str(exc), exc.kind, exc.status)
            self._update_lora_info()
            created = int(time.time())
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                return await self._stream(
                    request, children, rid, created, model, chat, include_usage, len(prompts)
                )
            return await self._complete(
                children, rid, created, model, chat, len(prompts), ec_params
            )
        finally:
            self.in_flight -= 1
            for child in children:
                if not child.finished:
                    engine.abort(child)

    def _decode_params(self, params: dict[str, Any] | None) -> Any:
        if self.connector is None or not self.connector.consumes:
            return None
        try:
            return parse_decode_params(params)
        except InvalidTransferParamsError as exc:
            self.connector.invalid_params += 1
            log.warning(
                "Got invalid KVTransferParams: %s (%s). This request will not utilize KVTransfer",
                params,
                exc,
            )
            return None

    def _usage(
        self, children: list[SimRequest], chat: bool, stream: bool, n_prompts: int
    ) -> dict[str, Any]:
        per_prompt = len(children) // max(n_prompts, 1)
        firsts = children[::per_prompt] if per_prompt else children
        prompt = sum(c.num_prompt_tokens for c in firsts)
        completion = sum(len(c.output_ids) for c in children)
        cached = (
            sum(c.cached_tokens for c in firsts) if self.cfg.enable_prompt_tokens_details else None
        )
        return responses.usage(prompt, completion, cached, chat=chat, stream=stream)

    def _text(self, ids: list[int]) -> str:
        texts = self._texts
        return "".join(texts.get(i, "") for i in ids)

    async def _complete(
        self,
        children: list[SimRequest],
        rid: str,
        created: int,
        model: str,
        chat: bool,
        n_prompts: int,
        ec_params: dict[str, Any] | None = None,
    ) -> web.Response:
        waiter = asyncio.Event()
        for child in children:
            child.on_update = waiter.set
        while not all(c.finished for c in children):
            await waiter.wait()
            waiter.clear()
        failed = next((c for c in children if c.finish_reason == "error"), None)
        if failed is not None:
            return self._error(failed.error or "request failed", "GenerationError", 500)
        choices: list[tuple[str, str | None]] = [
            (self._text(c.output_ids), c.finish_reason) for c in children
        ]
        usage_obj = self._usage(children, chat, False, n_prompts)
        kv_params = children[0].kv_transfer_params if len(children) == 1 else None
        build = responses.chat_completion if chat else responses.completion
        body = build(
            rid, created, model, choices, usage_obj, self.fingerprint, kv_params, ec_params
        )
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        children: list[SimRequest],
        rid: str,
        created: int,
        model: str,
        chat: bool,
        include_usage: bool,
        n_prompts: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        writer = responses.ChunkWriter(rid, created, model, chat=chat, fingerprint=self.fingerprint)
        waiter = asyncio.Event()
        for child in children:
            child.on_update = waiter.set
        sent = [0] * len(children)
        done = [False] * len(children)
        if chat:
            for i in range(len(children)):
                await resp.write(writer.role(i))
        while not all(done):
            await waiter.wait()
            waiter.clear()
            out: list[bytes] = []
            for i, child in enumerate(children):
                if done[i]:
                    continue
                if child.finish_reason == "error":
                    out.append(
                        writer.error(child.error or "request failed", "GenerationError", 500)
                    )
                    done[:] = [True] * len(children)
                    break
                new = child.output_ids[sent[i] :]
                sent[i] += len(new)
                text = self._text(new)
                if child.finished:
                    done[i] = True
                    out.append(writer.token(i, text, child.finish_reason, last=not include_usage))
                elif text:
                    out.append(writer.token(i, text, None, last=False))
            if out:
                await resp.write(b"".join(out))
        if include_usage and not any(c.finish_reason == "error" for c in children):
            await resp.write(writer.usage(self._usage(children, chat, True, n_prompts)))
        await resp.write(responses.DONE)
        await resp.write_eof()
        return resp


class _BadRequestError(Exception):
    def __init__(
        self,
        message: str,
        kind: str = "BadRequestError",
        param: str | None = None,
        *,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param
        self.status = status


def _from_protocol_error(message: str) -> _BadRequestError:
    if "stream_options" in message:
        return _BadRequestError(
            "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
            param="stream_options",
        )
    if "not valid JSON" in message:
        return _BadRequestError(message, "Bad Request", _json_error_param(message))
    if "prompt must not be empty" in message:
        return _BadRequestError(
            "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
        )
    return _BadRequestError(message)


def _json_error_param(message: str) -> str:
    """FastAPI's `loc` for a JSON syntax error: body.<offset of the error>."""
    match = re.search(r"\((?:byte|char) (\d+)\)", message)
    return f"body.{match.group(1)}" if match else "body"


MM_ITEM_TOKENS = 576
MM_HIDDEN = 4096
MM_ITEM_BYTES = MM_ITEM_TOKENS * MM_HIDDEN * 2
"""An encoded image as the simulator describes it: 576 embeddings of width 4096 in bf16."""


def media_hashes(req: ChatCompletionRequest) -> list[str]:
    """One hash per multimodal content part, in order (repeats included): the part's type and
    media reference, hashed (vLLM hashes the processed media; any stable digest serves)."""
    out = []
    for m in req.messages:
        if isinstance(m.content, list):
            for part in m.content:
                media = part.media()
                if media is not None:
                    digest = hashlib.sha256(msgspec.json.encode([part.type, media]))
                    out.append(digest.hexdigest()[:32])
    return out


def _content(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(
            str(p.get("text", "")) for p in value if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""
