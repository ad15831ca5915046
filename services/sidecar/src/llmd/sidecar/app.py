"""`llmd-sidecar`: beside vLLM on a decode pod, runs each disaggregated request's prefill leg on
the pod the scheduler named (`x-prefiller-host-port`) and its decode leg on the local engine.

Compatible with llm-d's pd-sidecar: the same flags (`--port` 8000, `--model-server-port` 8200,
`--kv-connector nixlv2`, `--enable-ssrf-protection`, `--prefill-max-retries`,
`--prefill-retry-backoff`, `--enable-prefiller-sampling`, `--secure-proxy`, `--cert-path`,
`--metrics-port`), the same intercepted routes, `GET /health`, errors and headers. Differences,
each deliberate:

- `--secure-proxy` (serve HTTPS) defaults to false and needs `--cert-path` (`tls.crt`,
  `tls.key`, and `ca.crt` to require client certificates; re-read when they change): llm-d
  defaults to true with a self-signed certificate, which every deployment of it turns off.
  `--enable-tls` / `--tls-insecure-skip-verify` take llm-d's stages `prefiller`, `decoder` and
  `encoder`.
- The prefill leg has a deadline (`--prefill-timeout`, 60 s): a dead or hung prefill pod gets a
  504 instead of holding the request as long as the client waits.
- E/P/D (`--ec-connector ec-example|ec-nixl`): a request naming encode pods
  (`x-encoder-hosts-ports`) has each multimodal item sent to one of them first (round robin, in
  parallel, one output token each); with `ec-nixl` their `ec_transfer_params` are merged into
  the request before its prefill (or decode) leg. The encoder legs have a deadline
  (`--encode-timeout`, 60 s); a failed item is a 502 (a deadline a 504) naming the encoder.
- Request metrics (`llmd_sidecar_*`) on `--metrics-port` (9090): llm-d's sidecar has none.
- Besides the InferencePool's pods (`--inference-pool`, llm-d's way), a static list of prefill
  hosts can be allowed (`--allowed-prefill-hosts`), for runs without Kubernetes.
- `--data-parallel-size N` starts N listeners as llm-d's does (rank r on `port+r`, its engine on
  `model-server-port+r`). On rank 0, `x-data-parallel-host-port` picks the rank whose engine
  serves the request; one naming no rank of this pod is a 400 that says so (llm-d answers an
  empty 400).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import Field, field_validator, model_validator

from llmd.runtime.cluster import ClusterError
from llmd.runtime.config import Seconds
from llmd.runtime.discovery import kube_api_client
from llmd.runtime.lifecycle import (
    BodyTooLargeError,
    Health,
    health_router,
    read_body,
    serve_http,
)
from llmd.runtime.proxy import ProxyResult, ProxyTimeouts, StreamingProxy, forward_headers
from llmd.runtime.service import ServiceConfig
from llmd.runtime.tasks import cancel_tasks
from llmd.runtime.tls import TLSFiles
from llmd.sidecar.allowlist import POOL_VERSIONS, follow_pods, parse_pool, read_pool
from llmd.sidecar.pd import (
    DP_HEADER,
    ENCODER_HEADER,
    ENCODER_PATHS,
    PREFILLER_HEADER,
    REQUEST_ID_HEADER,
    ROUTES,
    Api,
    cached_tokens,
    choose,
    decode_body,
    encoder_body,
    media_items,
    prefill_body,
    prefill_targets,
    target_host,
)

log = logging.getLogger(__name__)

RETRYABLE = frozenset({502, 503, 504})
DECODE_REFUSED = (
    "The decode node is not ready. Please check that the vLLM service is running and the port "
    "configuration is correct."
)
TLS_STAGES = ("prefiller", "decoder", "encoder")
CERT_CHECK_S = 10.0
"""How often the serving certificate files are looked at for a rotation."""
MAX_DP_RANKS = 16
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SidecarConfig(ServiceConfig):
    """Everything `llmd-sidecar` takes (llm-d pd-sidecar's names)."""

    port: int = Field(default=8000, gt=0, lt=65536, description="the port clients call")
    model_server_port: int = Field(
        default=8200, gt=0, lt=65536, description="the local vLLM's port (decode leg)"
    )
    kv_connector: Literal["nixlv2"] = Field(
        default="nixlv2",
        description="how KV moves: nixlv2 (vLLM's NixlConnector; llm-d's other connectors are "
        "not available)",
    )
    ec_connector: Literal["", "ec-example", "ec-nixl"] = Field(
        default="",
        description="the encoder stage (E/P/D): ec-example (encoders store their outputs on "
        "shared storage) or ec-nixl (their answers' ec_transfer_params go with the request); "
        "empty: x-encoder-hosts-ports is ignored",
    )
    encode_timeout: Seconds = Field(
        default=60.0, gt=0, description="the longest the encoder legs may take (then 504)"
    )
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        le=MAX_DP_RANKS,
        description="data-parallel ranks behind this sidecar: rank r listens on port+r and "
        "proxies to model_server_port+r; rank 0 follows x-data-parallel-host-port",
    )
    secure_proxy: bool = Field(default=False, description="serve HTTPS (needs cert_path)")
    cert_path: str | None = Field(
        default=None,
        description="directory with tls.crt, tls.key (and ca.crt: client certificates "
        "required); re-read when they change",
    )
    enable_tls: list[str] = Field(
        default_factory=list,
        description="stages reached over HTTPS: prefiller, decoder, encoder (comma list or "
        "repeated)",
    )
    tls_insecure_skip_verify: list[str] = Field(
        default_factory=list,
        description="stages whose certificate is not verified: prefiller, decoder, encoder",
    )
    enable_ssrf_protection: bool = Field(
        default=False,
        description="contact only prefill and encode hosts in the allowlist (others: a 403 "
        "for a prefiller, dropped for an encoder)",
    )
    allowed_prefill_hosts: list[str] = Field(
        default_factory=list,
        description="with SSRF protection: the prefill hosts (addresses or names; any port)",
    )
    inference_pool: str = Field(
        default="",
        description="with SSRF protection: [NAMESPACE/]NAME of the InferencePool whose pods "
        "(addresses and names) are the allowlist, followed in the cluster",
    )
    pool_group: str = Field(
        default="inference.networking.k8s.io",
        description="the InferencePool's API group (or inference.networking.x-k8s.io)",
    )
    enable_prefiller_sampling: bool = Field(
        default=False, description="pick a random prefiller of the header's list, not the first"
    )
    prefill_max_retries: int = Field(
        default=0, ge=0, le=10, description="retries of a prefill answering 502, 503 or 504"
    )
    prefill_retry_backoff: Seconds = Field(
        default=0.2, gt=0, description="the wait between prefill retries"
    )
    prefill_timeout: Seconds = Field(
        default=60.0, gt=0, description="the longest a prefill leg may take (then 504)"
    )
    read_timeout: Seconds = Field(
        default=600.0, gt=0, description="longest silence from the decoder inside a response"
    )
    max_body_bytes: int = Field(default=32 << 20, gt=0, description="largest request body")
    metrics_port: int = Field(
        default=9090, ge=0, lt=65536, description="port of /metrics and /readyz (0 = off)"
    )

    @model_validator(mode="after")
    def _supported(self) -> SidecarConfig:
        if self.enable_ssrf_protection and not (self.allowed_prefill_hosts or self.inference_pool):
            raise ValueError("enable_ssrf_protection needs inference_pool or allowed_prefill_hosts")
        if self.pool_group not in POOL_VERSIONS:
            raise ValueError(f"pool_group: one of {', '.join(POOL_VERSIONS)}")
        last = self.data_parallel_size - 1
        if self.port + last > 65535 or self.model_server_port + last > 65535:
            raise ValueError(
                f"data_parallel_size {self.data_parallel_size}: the rank ports run past 65535"
            )
        ranks = range(self.port, self.port + self.data_parallel_size)
        if self.metrics_port in ranks:
            raise ValueError(
                f"metrics_port {self.metrics_port} is a rank's listener port "
                f"({ranks.start}-{ranks.stop - 1})"
            )
        if self.secure_proxy and not self.cert_path:
            raise ValueError(
                "secure_proxy needs cert_path (a directory with tls.crt and tls.key); llmd "
                "makes no self-signed certificate (llm-d's deployments pass --secure-proxy=false)"
            )
        return self

    @field_validator("enable_tls", "tls_insecure_skip_verify", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # llm-d's --enable-tls prefiller,decoder

    @field_validator("enable_tls", "tls_insecure_skip_verify", mode="after")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        stages = sorted({s.strip() for item in v for s in item.split(",") if s.strip()})
        for s in stages:
            if s not in TLS_STAGES:
                raise ValueError(f"unknown stage {s!r}: one of {', '.join(TLS_STAGES)}")
        return stages


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "llmd_sidecar_requests_total",
            "Requests by mode (pd, decode-only, passthrough) and outcome",
            ["mode", "outcome"],
            registry=registry,
        )
        self.prefill = Histogram(
            "llmd_sidecar_prefill_duration_seconds",
            "The prefill leg, retries included",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.true_ttft = Histogram(
            "llmd_sidecar_true_ttft_seconds",
            "From the request's arrival to the decoder's first byte (prefill leg included)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.decode = Histogram(
            "llmd_sidecar_decode_duration_seconds",
            "The decode leg, to its last byte",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "llmd_sidecar_prefill_retries_total", "Prefill legs sent again", registry=registry
        )
        self.refused = Counter(
            "llmd_sidecar_ssrf_refused_total",
            "Prefill targets refused by SSRF protection",
            registry=registry,
        )
        self.ranks = Counter(
            "llmd_sidecar_data_parallel_requests_total",
            "Requests rank 0 sent to a rank's engine as x-data-parallel-host-port asked",
            ["rank"],
            registry=registry,
        )
        self.encode = Histogram(
            "llmd_sidecar_encode_duration_seconds",
            "The encoder legs of one request (all its multimodal items, in parallel)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.encoder_items = Counter(
            "llmd_sidecar_encoder_items_total",
            "Multimodal items sent to encoders by outcome (ok, no-params: an ec-nixl answer "
            "without ec_transfer_params, error, timeout)",
            ["outcome"],
            registry=registry,
        )
        self.encoders_ignored = Counter(
            "llmd_sidecar_encoder_header_ignored_total",
            "Requests naming encoders that this sidecar, without --ec-connector, did not use",
            registry=registry,
        )
        self.encoders_refused = Counter(
            "llmd_sidecar_ssrf_refused_encoders_total",
            "Encode hosts dropped by SSRF protection",
            registry=registry,
        )
        self.missing_params = Counter(
            "llmd_sidecar_missing_kv_transfer_params_total",
            "Prefill answers without kv_transfer_params (the decoder prefilled locally)",
            registry=registry,
        )


class _EncoderError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def vllm_error_body(status: int, message: str, kind: str) -> bytes:
    """vLLM's error shape, as llm-d's sidecar writes it (`param` is an empty string)."""
    return msgspec.json.encode(
        {"object": "error", "message": message, "type": kind, "param": "", "code": status}
    )


def vllm_error(status: int, message: str, kind: str) -> Response:
    return Response(vllm_error_body(status, message, kind), status, media_type="application/json")


class SidecarApp:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.health = Health(self.registry)
        self.metrics = SidecarMetrics(self.registry)
        self.proxy = StreamingProxy(ProxyTimeouts(read_s=config.read_timeout))
        scheme = "https" if "decoder" in config.enable_tls else "http"
        self.decoders = [
            f"{scheme}://127.0.0.1:{config.model_server_port + r}"
            for r in range(config.data_parallel_size)
        ]
        self.decoder = self.decoders[0]
        self.pod_ip = os.environ.get("POD_IP", "").strip("[]")
        """This pod's address (llm-d's POD_IP): x-data-parallel-host-port must name it."""
        self.prefill_scheme = "https" if "prefiller" in config.enable_tls else "http"
        self.verify_prefiller = "prefiller" not in config.tls_insecure_skip_verify
        self.verify_decoder = "decoder" not in config.tls_insecure_skip_verify
        self.tls = (
            TLSFiles(Path(config.cert_path)) if config.secure_proxy and config.cert_path else None
        )
        self.ssl_context: ssl.SSLContext | None = None
        self.prefill_timeout = aiohttp.ClientTimeout(total=config.prefill_timeout)
        self.encoder_scheme = "https" if "encoder" in config.enable_tls else "http"
        self.verify_encoder = "encoder" not in config.tls_insecure_skip_verify
        self.encode_timeout = aiohttp.ClientTimeout(total=config.encode_timeout)
        self._warned_ignored = False
        self.static_allowed = {h.strip().strip("[]") for h in config.allowed_prefill_hosts}
        self.allowed = set(self.static_allowed)
        self._servers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.pool_watch: Any = None
        """Whatever follows the InferencePool's pods (set by build() when one is named)."""
        self.custom_api: Any = None
        if config.enable_ssrf_protection and config.inference_pool:
            self.health.set("allowlist-synced", False, "the InferencePool's pods not read yet")

    def describe(self) -> str:
        c = self.config
        ssrf = f"allowlist of {len(self.allowed)} host(s)" if c.enable_ssrf_protection else "off"
        ranks = ""
        if c.data_parallel_size > 1:
            last = c.data_parallel_size - 1
            ranks = f" ({c.data_parallel_size} data-parallel ranks: :{c.port}-{c.port + last})"
        return (
            f"llmd-sidecar: :{c.port} -> decoder {self.decoder}{ranks}, kv connector "
            f"{c.kv_connector}, encoder stage {c.ec_connector or 'off'}, "
            f"SSRF protection {ssrf}, prefill retries {c.prefill_max_retries}, prefill timeout "
            f"{c.prefill_timeout:g}s"
        )

    # --- the legs --------------------------------------------------------------------------

    async def _prefill(
        self, request: Request, url: str, body: bytes, request_id: str
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of the prefill leg, retried on 502/503/504; a transport
        failure is a 502 and a deadline a 504, both answered in vLLM's error shape."""
        # the body is re-encoded JSON
        drop = [PREFILLER_HEADER, DP_HEADER, ENCODER_HEADER, "content-type"]
        headers = forward_headers(request.headers.items(), drop=drop)
        headers += [(REQUEST_ID_HEADER, request_id), ("content-type", "application/json")]
        attempt = 0
        while True:
            try:
                async with self.proxy.session.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=self.prefill_timeout,
                    ssl=self.verify_prefiller,
                ) as r:
                    status, answer = r.status, await r.read()
                    reply = dict(forward_headers(r.headers.items()))
            except TimeoutError:
                status, reply = 504, {"content-type": "application/json"}
                answer = vllm_error_body(
                    504,
                    f"the prefill leg at {url} took over {self.config.prefill_timeout:g}s",
                    "GatewayTimeoutError",
                )
            except aiohttp.ClientError as exc:
                status, reply = 502, {"content-type": "application/json"}
                answer = vllm_error_body(
                    502,
                    f"the prefill leg at {url} failed: {type(exc).__name__}: {exc}",
                    "BadGatewayError",
                )
            if status not in RETRYABLE or attempt >= self.config.prefill_max_retries:
                return status, answer, reply
            attempt += 1
            self.metrics.retries.inc()
            log.warning(
                "retrying prefill request (attempt %d, target %s, request_id %s, previous %d)",
                attempt, url, request_id, status,
            )  # fmt: skip
            await asyncio.sleep(self.config.prefill_retry_backoff)

    def _encoders(self, request: Request) -> list[str]:
        """The encode hosts of x-encoder-hosts-ports (none without an EC connector); with SSRF
        protection, those outside the allowlist are dropped, as llm-d does."""
        hosts = prefill_targets(request.headers.getlist(ENCODER_HEADER))
        if hosts and not self.config.ec_connector:
            # the scheduler has an encode profile, this sidecar no encoder stage: say so
            if not self._warned_ignored:
                self._warned_ignored = True
                log.warning(
                    "%s names encoders but --ec-connector is not set: the decode engine "
                    "encodes the request's media itself (counted in "
                    "llmd_sidecar_encoder_header_ignored_total; logged once)",
                    ENCODER_HEADER,
                )
            self.metrics.encoders_ignored.inc()
            return []
        if not self.config.enable_ssrf_protection:
            return hosts
        kept = [h for h in hosts if target_host(h) in self.allowed]
        if len(kept) < len(hosts):
            self.metrics.encoders_refused.inc(len(hosts) - len(kept))
            log.warning(
                "SSRF protection: encode hosts not in allowlist dropped (%s)",
                ", ".join(h for h in hosts if h not in kept),
            )
        return kept

    async def _encode(
        self, request_id: str, doc: dict[str, Any], api: Api, encoders: list[str]
    ) -> Response | None:
        """Send each multimodal item of `doc` to an encoder (round robin, in parallel); with
        ec-nixl, merge their `ec_transfer_params` into `doc`. A failed item cancels the others
        and is answered: 502 (its status and message), 504 past the encode timeout."""
        items = media_items(doc, api)
        if not items:
            log.debug("request %s names encoders but has no multimodal items", request_id)
            return None
        path = ENCODER_PATHS.get(api, "/v1/chat/completions")
        merged: dict[str, Any] = {}
        contributed = 0

        async def one(i: int, part: dict[str, Any]) -> None:
            nonlocal contributed
            url = f"{self.encoder_scheme}://{encoders[i % len(encoders)]}{path}"
            headers = {
                "content-type": "application/json",
                REQUEST_ID_HEADER: f"{request_id}-enc-{i}",
            }
            try:
                async with self.proxy.session.post(
                    url,
                    data=msgspec.json.encode(encoder_body(doc, part, api)),
                    headers=headers,
                    timeout=self.encode_timeout,
                    ssl=self.verify_encoder,
                ) as r:
                    status, answer = r.status, await r.read()
            except TimeoutError:
                self.metrics.encoder_items.labels("timeout").inc()
                raise _EncoderError(
                    504,
                    f"the encoder leg of item {i} at {url} took over "
                    f"{self.config.encode_timeout:g}s",
                    "GatewayTimeoutError",
                ) from None
            except aiohttp.ClientError as exc:
                self.metrics.encoder_items.labels("error").inc()
                raise _EncoderError(
                    502,
                    f"the encoder leg of item {i} at {url} failed: {type(exc).__name__}: {exc}",
                    "BadGatewayError",
                ) from None
            if not 200 <= status < 300:
                self.metrics.encoder_items.labels("error").inc()
                raise _EncoderError(
                    502,
                    f"encoder request failed for item {i} at {url} with status {status}: "
                    f"{answer[:500].decode(errors='replace')}",
                    "BadGatewayError",
                )
            params = None
            if self.config.ec_connector == "ec-nixl":
                try:
                    found = msgspec.json.decode(answer)
                except msgspec.DecodeError:
                    found = None
                params = found.get("ec_transfer_params") if isinstance(found, dict) else None
                if not isinstance(params, dict) or not params:
                    self.metrics.encoder_items.labels("no-params").inc()
                    log.warning("encoder answer for item %d of %s has no ec_transfer_params",
                                i, request_id)  # fmt: skip
                    return
                merged.update(params)
                contributed += 1
            self.metrics.encoder_items.labels("ok").inc()

        t0 = time.monotonic()
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                for i, part in enumerate(items):
                    group.create_task(one(i, part))
        except* _EncoderError as failures:
            failure = failures.exceptions[0]
        finally:
            self.metrics.encode.observe(time.monotonic() - t0)
        if isinstance(failure, _EncoderError):
            log.warning("encoder stage of %s failed: %s", request_id, failure.message)
            return vllm_error(failure.status, failure.message, failure.kind)
        if merged:
            doc["ec_transfer_params"] = merged
            if contributed < len(items):
                log.warning("ec_transfer_params for %d of %d items of %s", contributed,
                            len(items), request_id)  # fmt: skip
        return None

    def _rank(self, request: Request, listener: int, mode: str) -> int | Response:
        """The rank whose engine serves `request` arriving on the listener of rank
        `listener`: that rank, or on rank 0 the one x-data-parallel-host-port names (this
        pod's address, a rank's listener port); a value naming no rank is a 400."""
        value = request.headers.get(DP_HEADER)
        if listener != 0 or not value:
            return listener
        host, _, port = value.rpartition(":")
        rank = int(port) - self.config.port if port.isdecimal() else -1
        if 0 <= rank < self.config.data_parallel_size and (
            not self.pod_ip or host.strip("[]") == self.pod_ip
        ):
            self.metrics.ranks.labels(str(rank)).inc()
            return rank
        self.metrics.requests.labels(mode, "bad-rank").inc()
        last = self.config.port + self.config.data_parallel_size - 1
        pod = self.pod_ip or "this pod"
        log.warning("%s %r names no data-parallel rank of this pod", DP_HEADER, value)
        return vllm_error(
            400,
            f"{DP_HEADER} {value!r} names no data-parallel rank of this sidecar (ranks listen "
            f"on {pod}, ports {self.config.port}-{last})",
            "BadRequestError",
        )

    async def disaggregated(self, request: Request, api: Api, listener: int = 0) -> Response:
        started = time.monotonic()
        targets = prefill_targets(request.headers.getlist(PREFILLER_HEADER))
        encoders = self._encoders(request)
        mode = ("encode-" if encoders else "") + ("pd" if targets else "decode")
        if mode == "decode":
            mode = "decode-only"
        rank = self._rank(request, listener, mode)
        if isinstance(rank, Response):
            return rank
        if mode == "decode-only":
            return await self._decode(request, None, mode, started, rank=rank)
        target = choose(targets, self.config.enable_prefiller_sampling) if targets else ""
        ssrf = self.config.enable_ssrf_protection
        if target and ssrf and target_host(target) not in self.allowed:
            self.metrics.refused.inc()
            self.metrics.requests.labels(mode, "ssrf-refused").inc()
            log.warning(
                "SSRF protection: prefill target not in allowlist (target %s, path %s)",
                target, request.url.path,
            )  # fmt: skip
            return Response(
                "Forbidden: prefill target not allowed by SSRF protection",
                403,
                media_type="text/plain",
            )
        try:
            raw = await read_body(request, self.config.max_body_bytes)
        except BodyTooLargeError as exc:
            self.metrics.requests.labels(mode, "bad-request").inc()
            return vllm_error(413, str(exc), "BadRequestError")
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            doc, error = None, str(exc)
        else:
            error = "" if isinstance(doc, dict) else "the body is not a JSON object"
        if not isinstance(doc, dict):
            self.metrics.requests.labels(mode, "bad-request").inc()
            return vllm_error(400, f"invalid JSON body: {error}", "BadRequestError")
        request_id = str(uuid.uuid1())
        if encoders:
            failed = await self._encode(request_id, doc, api, encoders)
            if failed is not None:
                self.metrics.requests.labels(mode, "encode-error").inc()
                return failed
            if not targets:
                return await self._decode(
                    request, msgspec.json.encode(doc), mode, started, request_id,
                    doc.get("stream"), rank=rank,
                )  # fmt: skip
        url = f"{self.prefill_scheme}://{target}{request.url.path}"
        t0 = time.monotonic()
        status, answer_raw, reply = await self._prefill(
            request, url, msgspec.json.encode(prefill_body(doc, api)), request_id
        )
        self.metrics.prefill.observe(time.monotonic() - t0)
        if not 200 <= status < 300:
            log.warning("prefill request failed (%s -> %d)", url, status)
            self.metrics.requests.labels(mode, "prefill-error").inc()
            return Response(answer_raw, status, headers=reply)
        try:
            answer = msgspec.json.decode(answer_raw)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            self.metrics.requests.labels(mode, "prefill-error").inc()
            return vllm_error(400, f"the prefill leg at {url} answered no JSON object",
                              "BadRequestError")  # fmt: skip
        if answer.get("kv_transfer_params") is None:
            self.metrics.missing_params.inc()
            log.warning("warning: missing 'kv_transfer_params' field in prefiller response")
        log.debug("prefill of %s: %d cached tokens", request_id, cached_tokens(answer))
        body = msgspec.json.encode(decode_body(doc, answer))
        return await self._decode(
            request, body, mode, started, request_id, doc.get("stream"), rank=rank
        )

    async def _decode(
        self,
        request: Request,
        body: bytes | None,
        mode: str,
        started: float,
        request_id: str | None = None,
        stream: Any = None,
        *,
        rank: int = 0,
    ) -> Response:
        def done(result: ProxyResult) -> None:
            outcome = result.outcome if result.outcome != "ok" else f"{result.status // 100}xx"
            self.metrics.requests.labels(mode, outcome).inc()
            if result.first_byte_s is not None and mode not in ("decode-only", "passthrough"):
                # the decode leg began duration_s ago; its first byte came first_byte_s after
                first_byte_at = time.monotonic() - result.duration_s + result.first_byte_s
                self.metrics.true_ttft.observe(first_byte_at - started)
            if mode != "passthrough":  # a scrape of the engine is no decode leg
                self.metrics.decode.observe(result.duration_s)

        return await self.proxy.forward(
            request,
            self.decoders[rank]
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else ""),
            body=body,
            stream=bool(stream),
            headers={REQUEST_ID_HEADER: request_id} if request_id else None,
            drop_headers=[PREFILLER_HEADER, DP_HEADER, ENCODER_HEADER],
            on_complete=done,
            refused=vllm_error(503, DECODE_REFUSED, "ServiceUnavailable"),
            verify_tls=self.verify_decoder,
        )

    # --- HTTP ------------------------------------------------------------------------------

    def http_app(self, listener: int = 0) -> FastAPI:
        """The app of rank `listener`'s port (rank 0: `--port`)."""
        app = FastAPI(title="llmd-sidecar", docs_url=None, redoc_url=None)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        for path, api in ROUTES.items():

            async def handler(request: Request, api: Api = api) -> Response:
                return await self.disaggregated(request, api, listener)

            app.add_api_route(path, handler, methods=["POST"])

        @app.api_route(
            "/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        )
        async def passthrough(request: Request) -> Response:
            rank = self._rank(request, listener, "passthrough")
            if isinstance(rank, Response):
                return rank
            return await self._decode(request, None, "passthrough", time.monotonic(), rank=rank)

        return app

    def metrics_app(self) -> FastAPI:
        app = FastAPI(title="llmd-sidecar metrics", docs_url=None, redoc_url=None)
        app.include_router(health_router(self.health, self.registry))
        return app

    async def _follow_pool(self) -> None:
        """Read the pool's selector (retrying), then follow its pods into the allowlist."""
        from kubernetes import client

        from llmd.runtime.discovery import KubernetesPodDiscovery

        ns, name = parse_pool(self.config.inference_pool)
        while True:
            try:
                selector = await read_pool(self.custom_api, self.config.pool_group, ns, name)
                break
            except ClusterError as exc:
                log.warning("SSRF allowlist: %s (retrying in 5s)", exc)
                await asyncio.sleep(5.0)
        source = self.pool_watch or KubernetesPodDiscovery(
            client.CoreV1Api(self.custom_api.api_client), ns, selector, self.config.port,
            registry=self.registry,
        )  # fmt: skip
        async for hosts in follow_pods(source):
            self.allowed = self.static_allowed | hosts
            self.health.set("allowlist-synced", True)
            log.info("SSRF allowlist: %d host(s) of InferencePool %s/%s", len(hosts), ns, name)

    async def start(self) -> None:
        c = self.config
        if c.enable_ssrf_protection and c.inference_pool:
            if self.custom_api is None:
                from kubernetes import client

                self.custom_api = client.CustomObjectsApi(kube_api_client())
            self._tasks.append(asyncio.create_task(self._follow_pool(), name="allowlist"))
        if self.tls is not None:
            self.ssl_context = self.tls.ssl_context()  # OSError/SSLError: refuse to start
            self._tasks.append(asyncio.create_task(self._watch_certificates(), name="certs"))
        for rank in range(c.data_parallel_size):
            self._servers.append(
                serve_http(
                    self.http_app(rank),
                    c.host,
                    c.port + rank,
                    f"rank {rank}" if rank else "http",
                    ssl_context=self.ssl_context,
                )
            )
        if c.metrics_port:
            self._servers.append(serve_http(self.metrics_app(), c.host, c.metrics_port, "metrics"))
        log.info("%s", self.describe())

    async def _watch_certificates(self) -> None:
        assert self.tls is not None
        assert self.ssl_context is not None
        while True:
            await asyncio.sleep(CERT_CHECK_S)
            # on the loop, not a thread: the context serves handshakes here (a few kB read
            # every 10 s)
            self.tls.refresh(self.ssl_context)

    async def stop(self) -> None:
        await cancel_tasks(*self._tasks)
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:
            await asyncio.wait([t for _, t in self._servers], timeout=5)
        await self.proxy.aclose()


def build(config: SidecarConfig) -> SidecarApp:
    return SidecarApp(config)
