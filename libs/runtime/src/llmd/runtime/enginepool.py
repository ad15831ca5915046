"""The engine-pool scraper: each engine's `/metrics` (and `/v1/models`) into typed snapshots.

One task per engine scrapes `/metrics` every `interval_s` (stretched when the pool is large, so
that all engines together cost at most `max_scrapes_per_s` scrapes a second) and `/v1/models`
every `models_interval_s`, parses the Prometheus text into an `EngineSnapshot`
(`llmd.protocol.metrics`), keeps the latest good one, and tells a listener. A failed scrape keeps
the previous values, counts the error, logs a changed error once, and never blocks other
engines. The number of engines is bounded (`max_engines`); targets past it are refused loudly.

Staleness is one pure rule, `is_fresh`: a sample is fresh if the last good scrape is at most
`threshold_s` old. `fresh_or_all` picks the fresh engines, or all of them when none is fresh
(start-up, a metrics outage), so a consumer never halts on stale metrics.

The scheduler's data layer, the autoscaler and the activator all read engines through this.
HTTP is `scrapeclient.ScrapeClient`: a kept-alive HTTP/1.1 GET per engine and nothing else,
because a scheduler scrapes every engine up to 20 times a second and a general client spends
most of a scrape's CPU on itself (`benchmarks/scrape_cost.py`; `benchmarks/http_stacks.py` had
already chosen aiohttp, 0.30 ms per GET, over httpx, 2.3 ms).

**Name-filtered scrapes.** A vLLM page is ~50 KB, mostly histogram buckets no consumer reads,
and rendering it costs the engine milliseconds. When the owner says which samples its parser
reads (`wanted_names`), the scraper asks for only those with prometheus_client's own filter,
`<metrics path>/?name[]=...` (vLLM serves it from the `/metrics` mount, whose trailing-slash
route is prometheus_client's ASGI app; its plain `/metrics` route ignores the filter). Whether
an engine honours it is checked, never assumed: the first scrape of an engine, and one every
`FILTER_RECHECK_S`, fetches the whole page and the filtered one, and filters only if the
filtered page holds nothing unasked and every asked-for sample the whole page has. Otherwise, or
after any failed filtered scrape, the engine gets the whole page until the next check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from llmd.protocol.errors import DecodeError
from llmd.protocol.metrics import EngineSnapshot, parse_engine_snapshot, parse_samples, sample_names
from llmd.runtime.scrapeclient import ScrapeClient, ScrapeError
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

FILTER_RECHECK_S = 300.0
"""How often an engine scraped with a name filter is checked against its whole page again."""


def filtered_path(metrics_path: str, names: Iterable[str]) -> str:
    """`metrics_path` asking for only `names` (prometheus_client's `name[]` query)."""
    query = "&".join("name%5B%5D=" + quote(n, safe="") for n in sorted(names))
    return metrics_path.rstrip("/") + "/?" + query


@dataclass(slots=True)
class _NameFilter:
    """The outcome of checking whether one engine honours the name filter."""

    names: frozenset[str]
    path: str
    """The filtered path, or "" when the engine gets the whole page."""
    check_at: float


def is_fresh(last_good_at: float, now: float, threshold_s: float) -> bool:
    """The one staleness rule: scraped at least once, and at most `threshold_s` ago."""
    return last_good_at > 0 and now - last_good_at <= threshold_s


class HasScrapeTime(Protocol):
    @property
    def metrics_at(self) -> float: ...


T = TypeVar("T", bound=HasScrapeTime)


def fresh_or_all(items: Sequence[T], now: float, threshold_s: float) -> list[T]:
    """The fresh items, or all of them when none is fresh (never fail closed)."""
    fresh = [i for i in items if is_fresh(i.metrics_at, now, threshold_s)]
    return fresh or list(items)


@dataclass(slots=True)
class EngineSample:
    """What the scraper knows about one engine."""

    key: str
    """host:port"""
    snapshot: EngineSnapshot | None = None
    metrics_at: float = 0.0
    """Clock time of the last good `/metrics` scrape (0 = never)."""
    started_at: float = 0.0
    """Clock time the last good scrape started: it saw every request sent before then."""
    models: frozenset[str] = field(default_factory=frozenset)
    last_error: str | None = None
    consecutive_failures: int = 0


class ScrapeListener(Protocol):
    def metrics(self, key: str, started_at: float, snapshot: EngineSnapshot, now: float) -> None:
        """A good `/metrics` scrape of `key` that started at `started_at`."""

    def models(self, key: str, models: frozenset[str]) -> None:
        """A good `/v1/models` scrape of `key`."""

    def failed(self, key: str, source: str, error: str) -> None:
        """A failed scrape (`source` is `metrics` or `models`)."""


class _Models(msgspec.Struct):
    data: list[dict[str, Any]] = []


_models_decoder = msgspec.json.Decoder(_Models)


class EnginePoolScraper:
    """Scrapes a changing set of engines on an interval (bounded, measured, never blocking)."""

    def __init__(
        self,
        *,
        interval_s: float = 0.05,
        models_interval_s: float = 2.0,
        timeout_s: float = 1.0,
        max_engines: int = 4096,
        max_scrapes_per_s: float | None = None,
        registry: CollectorRegistry | None = None,
        listener: ScrapeListener | None = None,
        clock: Callable[[], float] = time.monotonic,
        parser: Callable[[str, str], EngineSnapshot] | None = None,
        metrics_path: str = "/metrics",
    ) -> None:
        self.parser = parser or (lambda key, text: parse_engine_snapshot(text))
        """`(engine key, page) -> snapshot`: vLLM's names unless the owner maps engine kinds."""
        self.metrics_path = metrics_path
        self.wanted_names: Callable[[str], frozenset[str] | None] | None = None
        """`engine key -> the sample names the parser reads`: each engine that honours
        prometheus_client's name filter is asked for only those. None: whole pages."""
        self._filters: dict[str, _NameFilter] = {}
        self.interval_s = max(0.01, interval_s)
        self.max_scrapes_per_s = max_scrapes_per_s
        self.models_interval_s = models_interval_s
        self.timeout_s = timeout_s
        self.max_engines = max_engines
        self.listener = listener
        self.clock = clock
        self.samples: dict[str, EngineSample] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._clients: dict[str, ScrapeClient] = {}
        self._started = False
        self._scrapes = Counter(
            "llmd_engine_scrapes",
            "Scrapes of engines by source (metrics, models) and outcome (ok, error)",
            ["source", "outcome"],
            registry=registry,
        )
        self._refused = Counter(
            "llmd_engine_scrape_targets_refused",
            "Engines not scraped because the pool is at max_engines",
            registry=registry,
        )
        Gauge(
            "llmd_engine_scrape_targets", "Engines being scraped", registry=registry
        ).set_function(lambda: len(self.samples))
        Gauge(
            "llmd_engine_scrape_filtered_targets",
            "Engines scraped for only the samples the parser reads (name[] filter honoured)",
            registry=registry,
        ).set_function(lambda: sum(1 for f in self._filters.values() if f.path))
        self._filter_checks = Counter(
            "llmd_engine_scrape_filter_checks",
            "Checks of whether an engine honours the /metrics name filter, by outcome "
            "(filtered, whole_page)",
            ["outcome"],
            registry=registry,
        )
        Gauge(
            "llmd_engine_scrape_interval_seconds",
            "Seconds between two /metrics scrapes of one engine (the configured interval, "
            "stretched so the whole pool stays within max_scrapes_per_s)",
            registry=registry,
        ).set_function(lambda: self.effective_interval_s)

    @property
    def effective_interval_s(self) -> float:
        """The configured interval, or longer so that all engines together are scraped at most
        `max_scrapes_per_s` times a second: the scraper's CPU stays bounded as the pool grows
        (in-flight accounting covers what happens between two scrapes)."""
        if not self.max_scrapes_per_s:
            return self.interval_s
        return max(self.interval_s, len(self.samples) / self.max_scrapes_per_s)

    # --- targets -----------------------------------------------------------------------------

    def set_targets(self, keys: Iterable[str]) -> None:
        """Scrape exactly these engines (host:port) from now on."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) > self.max_engines:
            self._refused.inc(len(wanted) - self.max_engines)
            log.error(
                "%d engines discovered, scraping the first %d (max_engines)",
                len(wanted),
                self.max_engines,
            )
            wanted = wanted[: self.max_engines]
        keep = set(wanted)
        for key in list(self.samples):
            if key not in keep:
                del self.samples[key]
                self._filters.pop(key, None)
                task = self._tasks.pop(key, None)
                if task is not None:
                    task.cancel()
                client = self._clients.pop(key, None)
                if client is not None:
                    client.discard()
        for key in wanted:
            if key not in self.samples:
                self.samples[key] = EngineSample(key)
                if self._started:
                    self._start(key)

    def fresh(self, threshold_s: float) -> list[EngineSample]:
        """Samples by the staleness rule (fresh, or all when none is)."""
        return fresh_or_all(list(self.samples.values()), self.clock(), threshold_s)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        for key in self.samples:
            if key not in self._tasks:
                self._start(key)

    async def stop(self) -> None:
        await cancel_tasks(*self._tasks.values())
        self._tasks.clear()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        self._started = False

    def _start(self, key: str) -> None:
        self._tasks[key] = asyncio.create_task(self._loop(key), name=f"scrape-{key}")

    async def _loop(self, key: str) -> None:
        next_models = 0.0
        while key in self.samples:
            started = self.clock()
            try:
                await self.scrape_metrics(key)
                if self.models_interval_s > 0 and started >= next_models:
                    next_models = started + self.models_interval_s
                    await self.scrape_models(key)
            except Exception as exc:  # whatever an engine sends, its scraper keeps running
                log.exception("scrape of %s failed unexpectedly", key)
                self._failed(key, "metrics", f"{type(exc).__name__}: {exc}")
            elapsed = self.clock() - started
            await asyncio.sleep(max(0.0, self.effective_interval_s - elapsed))

    # --- one scrape --------------------------------------------------------------------------

    async def _get(self, key: str, path: str) -> bytes:
        """`GET path` on engine `key` over its kept-alive scrape connection."""
        client = self._clients.get(key)
        if client is None:
            host, _, port = key.rpartition(":")
            client = ScrapeClient(host.strip("[]"), int(port), self.timeout_s)
            self._clients[key] = client
        return await client.get(path)

    async def scrape_metrics(self, key: str) -> None:
        """One `/metrics` scrape of `key` (also usable on demand)."""
        started = self.clock()
        try:
            path, names = self._metrics_path_for(key, started)
            if names is not None:
                text = await self._check_filter(key, names, started)
            else:
                text = (await self._get(key, path)).decode("utf-8", "replace")
            snapshot = self.parser(key, text)
        except (ScrapeError, DecodeError, ValueError) as exc:
            checked = self._filters.get(key)
            if checked is not None:
                checked.check_at = 0.0  # whatever failed, the next scrape checks the filter again
            self._failed(key, "metrics", f"{type(exc).__name__}: {exc}")
            return
        now = self.clock()
        sample = self.samples.get(key)
        if sample is None:
            return
        sample.snapshot, sample.metrics_at, sample.started_at = snapshot, now, started
        sample.last_error, sample.consecutive_failures = None, 0
        self._scrapes.labels("metrics", "ok").inc()
        if self.listener is not None:
            self.listener.metrics(key, started, snapshot, now)

    def _metrics_path_for(self, key: str, now: float) -> tuple[str, frozenset[str] | None]:
        """The path of this scrape, and the wanted names when the name filter is due a check."""
        names = self.wanted_names(key) if self.wanted_names is not None else None
        if not names:
            return self.metrics_path, None
        checked = self._filters.get(key)
        if checked is None or checked.names != names or now >= checked.check_at:
            return self.metrics_path, names
        return checked.path or self.metrics_path, None

    async def _check_filter(self, key: str, names: frozenset[str], now: float) -> str:
        """Fetch the whole page (returned, for this scrape) and the filtered one, and decide
        whether `key` is scraped with the filter until the next check."""
        whole = (await self._get(key, self.metrics_path)).decode("utf-8", "replace")
        path = filtered_path(self.metrics_path, names)
        why = ""
        try:
            page = (await self._get(key, path)).decode("utf-8", "replace")
            got = sample_names(page)
            needed = {s.name for s in parse_samples(whole, names)}
            if not got <= names:
                why = f"it ignores the filter ({len(got - names)} unasked metrics)"
            elif not needed <= got:
                why = f"the filtered page lacks {', '.join(sorted(needed - got))}"
        except (ScrapeError, DecodeError, ValueError) as exc:
            why = f"the filtered page failed: {type(exc).__name__}: {exc}"
        before = self._filters.get(key)
        self._filters[key] = _NameFilter(names, "" if why else path, now + FILTER_RECHECK_S)
        self._filter_checks.labels("whole_page" if why else "filtered").inc()
        if before is None or bool(before.path) != (not why):
            if why:
                log.info("scraping %s%s whole: %s", key, self.metrics_path, why)
            else:
                log.info("scraping %s for its %d wanted metrics only", key, len(names))
        return whole

    async def scrape_models(self, key: str) -> None:
        try:
            doc = _models_decoder.decode(await self._get(key, "/v1/models"))
        except (ScrapeError, ValueError, msgspec.DecodeError) as exc:
            self._failed(key, "models", f"{type(exc).__name__}: {exc}")
            return
        models = frozenset(str(m["id"]) for m in doc.data if isinstance(m, dict) and "id" in m)
        sample = self.samples.get(key)
        if sample is None:
            return
        sample.models = models
        self._scrapes.labels("models", "ok").inc()
        if self.listener is not None:
            self.listener.models(key, models)

    def _failed(self, key: str, source: str, error: str) -> None:
        self._scrapes.labels(source, "error").inc()
        sample = self.samples.get(key)
        if sample is not None:
            sample.consecutive_failures += 1
            if sample.last_error != error:
                log.warning("scrape of %s %s failed: %s", key, source, error)
            sample.last_error = error
        if self.listener is not None:
            self.listener.failed(key, source, error)
