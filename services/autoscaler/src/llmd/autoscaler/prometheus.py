"""Engine load from Prometheus instead of the engines themselves (`--metrics-source prometheus`).

The autoscaler reads each engine's `/metrics` directly by default: seconds-fresh, no extra
component. Where the engines are not reachable from the autoscaler, or an operator wants one
source of truth, it can read the same vLLM series from Prometheus (as WVA does). One pass runs
five instant queries over the HTTP API, each aggregated by `instance` (the `host:port`
Prometheus scraped, which is the endpoint the autoscaler knows for each replica):

    max by (instance) (vllm:kv_cache_usage_perc)
    sum by (instance) (vllm:num_requests_waiting)
    sum by (instance) (vllm:num_requests_running)
    sum by (instance) (vllm:request_success_total)
    max by (instance, block_size, num_gpu_blocks) (vllm:cache_config_info)

A replica Prometheus has no fresh sample for (a target down, a series gone stale) is unknown,
exactly like an engine that does not answer its scrape: the analyzer holds rather than guess.
The figures lag by up to Prometheus's scrape interval.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from dataclasses import dataclass

import msgspec

from llmd.protocol.metrics import (
    CACHE_CONFIG_INFO,
    KV_CACHE_USAGE_PERC,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    REQUEST_SUCCESS,
)
from llmd.runtime.scrapeclient import ScrapeClient, ScrapeError

QUERIES = {
    "kv": f"max by (instance) ({KV_CACHE_USAGE_PERC})",
    "waiting": f"sum by (instance) ({NUM_REQUESTS_WAITING})",
    "running": f"sum by (instance) ({NUM_REQUESTS_RUNNING})",
    "done": f"sum by (instance) ({REQUEST_SUCCESS})",
    "cache": f"max by (instance, block_size, num_gpu_blocks) ({CACHE_CONFIG_INFO})",
}
MAX_SERIES = 100_000


class PrometheusError(Exception):
    """Prometheus could not be queried or answered something else than a vector."""


class _Sample(msgspec.Struct):
    metric: dict[str, str]
    value: tuple[float, str]


class _Data(msgspec.Struct):
    resultType: str  # noqa: N815 - Prometheus's field name
    result: list[_Sample]


class _Answer(msgspec.Struct):
    status: str
    data: _Data | None = None
    error: str = ""


_decode = msgspec.json.Decoder(_Answer)


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One engine's figures as Prometheus last scraped them (None: no fresh sample)."""

    kv_usage: float | None
    waiting: int | None
    running: int | None
    completed: float | None
    kv_capacity_tokens: int | None
    computed_prompt_tokens: float | None = None
    """Prompt tokens computed so far (vLLM's prompt-tokens-by-source counter, local_compute)."""


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http:// Prometheus URL; ValueError otherwise."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"{url!r}: an http://host[:port][/prefix] URL")
    return u.hostname, u.port or 80, u.path.rstrip("/")


class PrometheusSource:
    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        host, port, self.prefix = parse_url(url)
        self.url = url
        self.client = ScrapeClient(host, port, timeout_s)
        self._lock = asyncio.Lock()

    async def _query(self, promql: str) -> list[_Sample]:
        path = f"{self.prefix}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            async with self._lock:  # one kept-alive connection: queries go one at a time
                raw = await self.client.get(path)
            answer = _decode.decode(raw)
        except ScrapeError as exc:
            raise PrometheusError(f"{self.url}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise PrometheusError(f"{self.url}: not a Prometheus API answer: {exc}") from None
        if answer.status != "success" or answer.data is None:
            raise PrometheusError(f"{self.url}: {answer.error or answer.status} for {promql}")
        if answer.data.resultType != "vector":
            raise PrometheusError(f"{self.url}: {answer.data.resultType} for {promql}")
        if len(answer.data.result) > MAX_SERIES:
            raise PrometheusError(f"{self.url}: over {MAX_SERIES} series for {promql}")
        return answer.data.result

    async def read(self) -> dict[str, EngineReading]:
        """Every engine Prometheus has figures for, by `instance` (host:port)."""
        values: dict[str, dict[str, float]] = {}
        caps: dict[str, int] = {}
        for key, promql in QUERIES.items():
            for s in await self._query(promql):
                instance = s.metric.get("instance")
                if not instance:
                    continue
                try:
                    v = float(s.value[1])
                except ValueError:
                    continue
                if not math.isfinite(v) or v < 0:
                    continue
                if key == "cache":
                    blocks, size = s.metric.get("num_gpu_blocks", ""), s.metric.get("block_size")
                    if blocks.isdigit() and size and size.isdigit():
                        caps[instance] = int(blocks) * int(size)
                    continue
                values.setdefault(instance, {})[key] = v
        out = {}
        for instance in values.keys() | caps.keys():
            got = values.get(instance, {})
            kv = got.get("kv")
            out[instance] = EngineReading(
                kv_usage=min(kv, 1.0) if kv is not None else None,
                waiting=int(got["waiting"]) if "waiting" in got else None,
                running=int(got["running"]) if "running" in got else None,
                completed=got.get("done"),
                kv_capacity_tokens=caps.get(instance),
            )
        return out

    async def close(self) -> None:
        await self.client.close()
