"""The load generator: open loop (send at the trace's times) or closed loop (N users), streaming.

One asyncio loop and one aiohttp session; a request is a coroutine that records its send time,
every content chunk's arrival, the end, and the engine's `usage`. Nothing per request is
computed while it runs, so one core drives hundreds of requests/s (`benchmarks/README.md` has
the figure against a zero-latency simulator). Progress goes to stderr every `progress_s`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import aiohttp  # a tenth of httpx's client CPU per streamed request: benchmarks/http_stacks.py

from llmd.bench.metrics import RequestRecord
from llmd.bench.workloads import Stage, TraceRequest

ENDPOINT_HEADER = "x-gateway-destination-endpoint-served"


def _content(chunk: dict[str, Any]) -> bool:
    """Whether an SSE chunk carries generated text (completions or chat)."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    req: TraceRequest,
    model: str,
    clock: Callable[[], float] = time.perf_counter,
) -> RequestRecord:
    rec = RequestRecord(sent_at=clock(), stage=req.stage)
    body = json.dumps(req.body(model)).encode()
    try:
        async with session.post(
            base_url + req.path, data=body, headers={"content-type": "application/json"}
        ) as resp:
            rec.status = resp.status
            rec.target = resp.headers.get(ENDPOINT_HEADER)
            if resp.status != 200:
                rec.error = (await resp.text())[:300]
                rec.done_at = clock()
                return rec
            async for raw in resp.content:
                if not raw.startswith(b"data: {"):
                    continue
                now = clock()
                doc = json.loads(raw[6:])
                if _content(doc):
                    rec.chunk_times.append(now)
                    if rec.first_token_at is None:
                        rec.first_token_at = now
                usage = doc.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.output_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens")
            rec.done_at = clock()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


class Progress:
    """A line every `every_s` seconds: sent, done, errors, request rate."""

    def __init__(self, total: int, every_s: float = 2.0, out: TextIO = sys.stderr) -> None:
        self.total, self.every_s, self.out = total, every_s, out
        self.sent = self.done = self.errors = 0
        self.started = time.perf_counter()
        self._last = self.started

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        el = now - self.started
        rate = self.done / el if el > 0 else 0.0
        print(
            f"  {el:6.1f}s  sent {self.sent}/{self.total}  done {self.done}  "
            f"errors {self.errors}  {rate:.1f} req/s",
            file=self.out,
            flush=True,
        )


async def run_trace(
    base_url: str,
    trace: Sequence[TraceRequest],
    stages: Sequence[Stage],
    model: str,
    *,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
) -> tuple[list[RequestRecord], float]:
    """Drive `trace` against `base_url`; returns the records and the wall time."""
    prog = progress or Progress(len(trace))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    records: list[RequestRecord] = []
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(req: TraceRequest) -> None:
            prog.sent += 1
            rec = await send(session, base_url, req, model)
            records.append(rec)
            prog.done += 1
            prog.errors += 0 if rec.ok else 1
            prog.tick()

        closed = all(s.concurrency is not None for s in stages)
        if closed:
            for i, st in enumerate(stages):
                queue = [r for r in trace if r.stage == i]
                it = iter(queue)

                async def user(it: Any = it) -> None:
                    for req in it:
                        await one(req)

                assert st.concurrency is not None
                await asyncio.gather(*(user() for _ in range(st.concurrency)))
        else:
            tasks = []
            for req in trace:
                delay = req.t - (time.perf_counter() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(req)))
            await asyncio.gather(*tasks)
    prog.tick(force=True)
    return records, time.perf_counter() - started
