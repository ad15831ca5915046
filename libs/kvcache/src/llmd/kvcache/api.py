"""llmd-indexer's HTTP API: one typed schema for the server and its client.

    POST /v1/score      ScoreRequest     -> ScoreResponse
    GET  /v1/pods       subscriptions, stream state, index health
  on the write port (--write-port, loopback unless a token guards it):
    POST /v1/speculate  SpeculateRequest -> {}            (a pod is about to compute these keys)
    POST /v1/observe    ObserveRequest   -> the pod's index-health record

`IndexerClient` (aiohttp, llmd's client library on per-request paths) is what the scheduler's
remote-indexer mode uses: every call either succeeds or raises `IndexerError`; the caller
counts and logs it (never a silent fallback).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from llmd.kvcache.index import PrefixHit


class ScoreRequest(msgspec.Struct, omit_defaults=True):
    """Score a prompt per pod: give `keys` (precomputed request keys), `tokens`, or text."""

    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tokens: list[int] | None = None
    keys: list[int] | None = None
    pods: list[str] | None = None
    cache_salt: str | None = None
    domains: dict[str, str] | None = None
    """Pod -> storage domain: a pod is credited with the hits of its domain's shared volume."""
    tier_weights: dict[str, float] | None = None
    """Tier -> weight for this request, over the indexer's configured ones (a scheduler sends
    the storage weight it measures)."""


class PodHit(msgspec.Struct):
    """One pod's match: consecutive blocks from the start, their tier-weighted worth."""

    blocks: int
    score: float
    tiers: dict[str, int] = {}

    def to_hit(self) -> PrefixHit:
        return PrefixHit(self.blocks, self.score, dict(self.tiers))


class ScoreResponse(msgspec.Struct):
    pods: dict[str, PodHit]
    total_blocks: int
    block_size: int


class SpeculateRequest(msgspec.Struct):
    """`pod` was just picked for a request with these keys (held until events or the TTL)."""

    pod: str
    keys: list[int]


class ObserveRequest(msgspec.Struct):
    """One response's `cached_tokens` against the prediction made at routing time."""

    pod: str
    predicted_tokens: int
    cached_tokens: int
    prompt_tokens: int
    engine_block_size: int = 16
    speculative_tokens: int = 0


class ErrorResponse(msgspec.Struct):
    error: str


class IndexerError(RuntimeError):
    """The indexer could not be reached or refused a call."""


class IndexerClient:
    """An async client of llmd-indexer's HTTP API (its session opens on first use)."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 2.0,
        token: str | None = None,
        write_url: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.write_url = write_url.rstrip("/") if write_url else None
        self.timeout_s = timeout_s
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def writes(self) -> bool:
        """Whether the indexer's write routes were given (`write_url`)."""
        return self.write_url is not None

    async def _post(self, path: str, doc: msgspec.Struct, base: str | None = None) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=64),
            )
        url = f"{base or self.base_url}{path}"
        try:
            async with self._session.post(
                url, data=msgspec.json.encode(doc), headers=self._headers
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IndexerError(f"{url}: {type(exc).__name__}: {exc}") from None
        if status != 200:
            raise IndexerError(f"{url} answered {status}: {body[:300].decode(errors='replace')}")
        return body

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        raw = await self._post("/v1/score", request)
        try:
            return msgspec.json.decode(raw, type=ScoreResponse)
        except msgspec.DecodeError as exc:
            raise IndexerError(f"{self.base_url}/v1/score: bad answer: {exc}") from None

    async def speculate(self, pod: str, keys: list[int]) -> None:
        await self._post("/v1/speculate", SpeculateRequest(pod, keys), self._writes())

    async def observe(self, observation: ObserveRequest) -> None:
        await self._post("/v1/observe", observation, self._writes())

    def _writes(self) -> str:
        if self.write_url is None:
            raise IndexerError("no write_url: this client only scores")
        return self.write_url
