"""Live view of running engines: their KV events and load, one line each, as a router sees them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import zmq
import zmq.asyncio

from llmd.protocol import DecodeError, ProtocolError
from llmd.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    decode_seq,
    parse_topic,
    to_u64,
)
from llmd.protocol.metrics import EngineSnapshot, parse_engine_snapshot


@dataclass(frozen=True)
class EngineAddress:
    """What the monitor needs to know about one engine."""

    pod: str
    url: str
    kv_events_endpoint: str


def describe_batch(pod: str, seq: int, batch: EventBatch) -> list[str]:
    """One human-readable line per event."""
    lines = []
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            first = f"{to_u64(ev.block_hashes[0]):016x}" if ev.block_hashes else "-"
            parent = (
                "root" if ev.parent_block_hash is None else f"{to_u64(ev.parent_block_hash):016x}"
            )
            lines.append(
                f"[{pod}] seq={seq} stored {len(ev.block_hashes)} block(s) of {ev.block_size} "
                f"tokens on {ev.medium or 'GPU'} first={first} parent={parent}"
            )
        elif isinstance(ev, BlockRemoved):
            lines.append(
                f"[{pod}] seq={seq} removed {len(ev.block_hashes)} block(s) from {ev.medium}"
            )
        elif isinstance(ev, AllBlocksCleared):
            lines.append(f"[{pod}] seq={seq} cleared all blocks")
    if batch.unknown_events:
        lines.append(f"[{pod}] seq={seq} {batch.unknown_events} event(s) of unknown type skipped")
    return lines


def describe_snapshot(pod: str, snap: EngineSnapshot) -> str:
    kv = "-" if snap.kv_cache_usage is None else f"{snap.kv_cache_usage:.1%}"
    hit = "-" if snap.prefix_cache_hit_rate is None else f"{snap.prefix_cache_hit_rate:.1%}"
    return f"[{pod}] load: running={snap.running} waiting={snap.waiting} kv={kv} prefix-hit={hit}"


async def _events(
    engine: EngineAddress,
    ctx: zmq.asyncio.Context,
    emit: Callable[[str], None],
    stop: asyncio.Event,
) -> None:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sock.connect(engine.kv_events_endpoint)
    try:
        while not stop.is_set():
            if not await sock.poll(200):
                continue
            parts = await sock.recv_multipart()
            try:
                if len(parts) != 3:
                    raise DecodeError(f"expected 3 frames, got {len(parts)}")
                pod = parse_topic(parts[0]).pod
                for line in describe_batch(pod, decode_seq(parts[1]), decode_batch(parts[2])):
                    emit(line)
            except ProtocolError as exc:
                emit(f"[{engine.pod}] undecodable KV-event message: {exc}")
    finally:
        sock.close(linger=0)


async def _load(
    engine: EngineAddress, interval_s: float, emit: Callable[[str], None], stop: asyncio.Event
) -> None:
    last = ""
    async with httpx.AsyncClient(timeout=5.0) as http:
        while not stop.is_set():
            try:
                snap = parse_engine_snapshot((await http.get(f"{engine.url}/metrics")).text)
                line = describe_snapshot(engine.pod, snap)
            except (httpx.HTTPError, ProtocolError) as exc:
                line = f"[{engine.pod}] metrics unavailable: {exc}"
            if line != last:  # print only changes
                emit(line)
                last = line
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


async def monitor(
    engines: Sequence[EngineAddress],
    stop: asyncio.Event,
    emit: Callable[[str], None] = print,
    load_interval_s: float = 2.0,
) -> None:
    """Print every engine's KV events and load changes until `stop` is set."""
    ctx = zmq.asyncio.Context()
    try:
        tasks = [asyncio.create_task(_events(e, ctx, emit, stop)) for e in engines]
        tasks += [asyncio.create_task(_load(e, load_interval_s, emit, stop)) for e in engines]
        await asyncio.gather(*tasks)
    finally:
        ctx.term()
