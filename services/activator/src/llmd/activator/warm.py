"""Warm start: a replica that joins the pool gets the pool's hot prefixes before (or while)
traffic reaches it.

The operator lists the hot prompts (system prompts, few-shot headers, shared documents) in a
YAML file. When an engine of the pool answers `/health` for the first time, the activator sends
each prompt to that engine alone with `max_tokens: 1`, a few at a time. With an FS tier under
the pool (llmd-fs-offload, or any vLLM KV connector that loads by prefix), the engine loads the
prompt's blocks from the shared volume instead of computing them; without one it computes them.
Either way the prefix is in the new engine's GPU cache when the first user request for it
arrives, and that request's time to first token is the GPU hit's, not the load's or the
prefill's.

Engines already up when the activator starts are not warmed (they have been serving). A
warm-up never delays a held request: held requests are forwarded the moment the engine is
ready, and the warm-up runs beside them.

File format (YAML): a list whose items are a prompt string (`/v1/completions`), or a mapping
with `prompt` or `messages` (`/v1/chat/completions`) and optionally `model`:

    - "You are a support agent for ACME. Policies: ..."
    - messages: [{role: system, content: "You are a code reviewer. ..."}]
      model: llama-3-8b

Learned prompts: with `--warm-prompts-url` pointing at llmd-scheduler's `/debug/hot-prompts`,
the activator asks, each time a replica joins, for the hottest chat heads the scheduler has
routed lately (their system/developer messages) and sends those too. Nobody has to keep a list
up to date. A failed read is logged and counted
(`llmd_activator_warm_prompt_fetch_errors_total`); the file's prompts are still sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from llmd.protocol.openai import usage_from_body
from llmd.runtime.config import (
    ConfigError,
    ConfigIssue,
    YamlSyntaxError,
    load_yaml,
    read_config_text,
)
from llmd.runtime.discovery import Endpoint
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

MAX_WARM_PROMPTS = 1000


@dataclass(frozen=True)
class WarmPrompt:
    path: str
    """`/v1/completions` or `/v1/chat/completions`."""
    body: bytes
    """The request, with `max_tokens: 1` and `stream: false`."""


def _prompt(item: Any, model: str) -> tuple[WarmPrompt | None, str]:
    """One file item as a request, or None and what is wrong with it."""
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict):
        return None, f"must be a prompt string or a mapping, got {type(item).__name__}"
    unknown = set(item) - {"prompt", "messages", "model"}
    if unknown:
        return None, f"unknown key(s) {sorted(unknown)} (prompt, messages, model)"
    if ("prompt" in item) == ("messages" in item):
        return None, "needs exactly one of prompt, messages"
    name = item.get("model", model)
    if not isinstance(name, str) or not name:
        return None, "no model: set `model` on the item or --warm-model"
    body: dict[str, Any] = {"model": name, "max_tokens": 1, "stream": False}
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            return None, "prompt must be a non-empty string"
        body["prompt"] = item["prompt"]
        path = "/v1/completions"
    else:
        msgs = item["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                for m in msgs
            )
        ):
            return None, "messages must be a non-empty list of {role, content}"
        body["messages"] = msgs
        path = "/v1/chat/completions"
    return WarmPrompt(path, msgspec.json.encode(body)), ""


def load_warm_prompts(file: str, model: str) -> list[WarmPrompt]:
    """The warm prompts in `file`; ConfigError names every bad item."""
    where = "warm_prompts_file"
    text = read_config_text(Path(file), where)
    try:
        data = load_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(where, f"{file} is {exc}")]) from None
    if not isinstance(data, list) or not data:
        raise ConfigError([ConfigIssue(where, f"{file} must hold a non-empty list of prompts")])
    if len(data) > MAX_WARM_PROMPTS:
        raise ConfigError(
            [ConfigIssue(where, f"{file} lists {len(data)} prompts, over {MAX_WARM_PROMPTS}")]
        )
    prompts, issues = [], []
    for i, item in enumerate(data):
        prompt, problem = _prompt(item, model)
        if prompt is None:
            issues.append(ConfigIssue(f"{where}[{i}]", problem, file))
        else:
            prompts.append(prompt)
    if issues:
        raise ConfigError(issues)
    return prompts


class WarmMetrics:
    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.pool = pool
        self.requests = Counter(
            "llmd_activator_warm_requests",
            "Warm-up requests sent to new replicas, by outcome (ok, error)",
            ["pool", "outcome"],
            registry=registry,
        )
        self.tokens = Counter(
            "llmd_activator_warm_prompt_tokens",
            "Prompt tokens of warm-up requests, by source: cached (already on the GPU or "
            "loaded by the KV connector, e.g. from the FS tier) or computed",
            ["pool", "source"],
            registry=registry,
        )
        self.duration = Histogram(
            "llmd_activator_warm_duration_seconds",
            "Time from a replica's first healthy answer to the end of its warm-up",
            ["pool"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        ).labels(pool)
        self.fetch_errors = Counter(
            "llmd_activator_warm_prompt_fetch_errors",
            "Failed reads of the learned hot prompts (--warm-prompts-url)",
            ["pool"],
            registry=registry,
        ).labels(pool)
        self.learned = Counter(
            "llmd_activator_warm_learned_prompts",
            "Learned hot prompts sent as warm-ups (counted per replica warmed)",
            ["pool"],
            registry=registry,
        ).labels(pool)
        self.replicas = Counter(
            "llmd_activator_warmed_replicas",
            "Replicas whose warm-up finished (every prompt sent, whatever the outcome)",
            ["pool"],
            registry=registry,
        ).labels(pool)


class Warmer:
    """Warms every replica that joins the pool after the first look at it."""

    def __init__(
        self,
        pool: str,
        prompts: list[WarmPrompt],
        *,
        registry: CollectorRegistry,
        concurrency: int = 2,
        timeout_s: float = 60.0,
        learned_url: str = "",
        learned_token: str | None = None,
        learned_top: int = 8,
        model: str = "",
    ) -> None:
        self.pool = pool
        self.prompts = prompts
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.learned_url = learned_url
        """llmd-scheduler's /debug/hot-prompts ("": no learned prompts)."""
        self.learned_token = learned_token
        self.learned_top = learned_top
        self.model = model
        self.metrics = WarmMetrics(registry, pool)
        self._known: set[str] | None = None
        """Replicas seen (host:port); None until the first look at the pool."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def observe(self, ready: list[Endpoint]) -> None:
        """The replicas ready now: a new one is warmed; one gone is forgotten (bounded)."""
        now = {e.host_port for e in ready}
        if self._known is None:
            self._known = now  # serving already: not warmed
            return
        for ep in ready:
            if ep.host_port not in self._known and ep.host_port not in self._tasks:
                task = asyncio.create_task(self._warm(ep), name=f"warm-{ep.host_port}")
                self._tasks[ep.host_port] = task
                task.add_done_callback(functools.partial(self._forget, ep.host_port))
        self._known = now

    def _forget(self, host_port: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(host_port, None)

    async def _one(self, ep: Endpoint, prompt: WarmPrompt) -> bool:
        assert self._session is not None
        url = f"http://{ep.host_port}{prompt.path}"
        try:
            async with self._session.post(
                url, data=prompt.body, headers={"content-type": "application/json"}
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    log.warning(
                        "pool %s: warm-up of %s: HTTP %d %s",
                        self.pool, ep.host_port, resp.status, data[:200].decode(errors="replace"),
                    )  # fmt: skip
                    return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("pool %s: warm-up of %s: %r", self.pool, ep.host_port, exc)
            return False
        usage = usage_from_body(data, stream=False)
        if usage is not None:
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens if details is not None else None) or 0
            self.metrics.tokens.labels(self.pool, "cached").inc(cached)
            self.metrics.tokens.labels(self.pool, "computed").inc(
                max(0, usage.prompt_tokens - cached)
            )
        return True

    async def _warm(self, ep: Endpoint) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        started = time.monotonic()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(prompt: WarmPrompt) -> bool:
            async with gate:
                return await self._one(ep, prompt)

        prompts = list(self.prompts)
        if self.learned_url:
            known = {p.body for p in prompts}
            learned = [p for p in await self.fetch_learned() if p.body not in known]
            self.metrics.learned.inc(len(learned))
            prompts += learned
        results = await asyncio.gather(*(one(p) for p in prompts))
        ok = sum(results)
        self.metrics.requests.labels(self.pool, "ok").inc(ok)
        self.metrics.requests.labels(self.pool, "error").inc(len(results) - ok)
        took = time.monotonic() - started
        self.metrics.duration.observe(took)
        self.metrics.replicas.inc()
        log.info(
            "pool %s: warmed %s with %d/%d prompt(s) in %.2fs",
            self.pool, ep.host_port, ok, len(results), took,
        )  # fmt: skip

    async def fetch_learned(self) -> list[WarmPrompt]:
        """The scheduler's hottest chat heads as warm prompts; [] (logged, counted) when the
        read fails or its answer is not the expected shape."""
        assert self._session is not None
        headers = {"authorization": f"Bearer {self.learned_token}"} if self.learned_token else {}
        params = None if "top=" in self.learned_url else {"top": str(self.learned_top)}
        try:
            async with self._session.get(
                self.learned_url,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=min(self.timeout_s, 5.0)),
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status} {data[:200].decode(errors='replace')}")
            doc = msgspec.json.decode(data)
            items = doc.get("prompts") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise ValueError('the answer has no "prompts" list')
        except (aiohttp.ClientError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
            self.metrics.fetch_errors.inc()
            log.warning("pool %s: reading learned hot prompts from %s: %s",
                        self.pool, self.learned_url, exc)  # fmt: skip
            return []
        out: list[WarmPrompt] = []
        for i, item in enumerate(items[: self.learned_top]):
            fields = (
                {k: item[k] for k in ("messages", "model") if k in item}
                if isinstance(item, dict)
                else item
            )
            prompt, problem = _prompt(fields, self.model)
            if prompt is None or prompt.path != "/v1/chat/completions":
                self.metrics.fetch_errors.inc()
                log.warning("pool %s: learned hot prompt %d skipped: %s",
                            self.pool, i, problem or "not a chat")  # fmt: skip
                continue
            out.append(prompt)
        return out

    async def aclose(self) -> None:
        await cancel_tasks(*self._tasks.values())
        if self._session is not None:
            await self._session.close()
