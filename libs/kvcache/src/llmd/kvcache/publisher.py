"""A KV-event publisher: ZMQ exactly as vLLM 0.32's ZmqEventPublisher sends events.

Anything that stores or removes KV blocks outside an engine (the simulator, the shared
filesystem tier and its evictor) publishes with this, so every consumer reads one format.

Live frames are `(topic, seq as 8-byte big-endian, msgpack EventBatch)` on a PUB socket (bound
when the endpoint has `*`, connected otherwise, as vLLM decides); the replay ROUTER answers
`[identity, b"", start_seq]` with every buffered batch from that sequence, then the end marker.
Faults for tests: drop a share of batches (the sequence still advances, so subscribers see a
gap) and reset the sequence to 0 with an empty replay buffer (what a restarted engine looks like).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from llmd.protocol.kv_events import END_SEQ, EventBatch, KVEvent, encode_batch, encode_seq
from llmd.runtime.tasks import cancel_tasks

log = logging.getLogger(__name__)

DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_HWM = 100_000


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """One engine's PUB socket, replay ROUTER and bounded replay buffer."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        endpoint: str,
        topic: str,
        replay_endpoint: str | None = None,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
        seed: int = 0,
        data_parallel_rank: int = 0,
        bind_host: str | None = None,
    ) -> None:
        self._ctx = ctx
        self.bind_host = bind_host
        """When set, a wildcard endpoint (`tcp://*:<port>`) binds this address instead of every
        interface (the simulator binds where its HTTP API listens)."""
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self._hwm = hwm
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(seed)
        self.data_parallel_rank = data_parallel_rank
        self.drop_rate = 0.0
        self.published = 0
        self.dropped = 0
        self.replays_served = 0

    async def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self._hwm)
        pub.setsockopt(zmq.LINGER, 0)
        ipv6 = int(self.bind_host is not None and ":" in self.bind_host)
        pub.setsockopt(zmq.IPV6, ipv6)
        if _binds(self.endpoint):
            pub.bind(self._bind_address(self.endpoint))
        else:
            pub.connect(self.endpoint)
        self._pub = pub
        if self.replay_endpoint:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.IPV6, ipv6)
            router.bind(self._bind_address(self.replay_endpoint))
            self._replay = router
            self._task = asyncio.create_task(self._serve_replay(), name="kv-replay")

    def _bind_address(self, endpoint: str) -> str:
        if self.bind_host is None or not endpoint.startswith("tcp://*:"):
            return endpoint
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"tcp://{host}:{endpoint.removeprefix('tcp://*:')}"

    async def close(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Send one batch (one engine step's events); never blocks (PUB drops at the HWM)."""
        if not events or self._pub is None:
            return
        seq = self._seq
        self._seq += 1
        payload = encode_batch(
            EventBatch(
                ts=time.time(), events=list(events), data_parallel_rank=self.data_parallel_rank
            )
        )
        self._buffer.append((seq, payload))
        if self.drop_rate and self._rng.random() < self.drop_rate:
            self.dropped += 1
            return
        try:
            self._pub.send_multipart([self.topic, encode_seq(seq), payload], flags=zmq.NOBLOCK)
            self.published += 1
        except zmq.Again:
            self.dropped += 1

    def reset_sequence(self) -> None:
        """Start again from sequence 0 with nothing to replay, as a restarted engine does."""
        self._seq = 0
        self._buffer.clear()

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("replay request with %d frames ignored", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await sock.send_multipart([identity, b"", self.topic, encode_seq(seq), payload])
            await sock.send_multipart([identity, b"", b"", END_SEQ, b""])
            self.replays_served += 1
