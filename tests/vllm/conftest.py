"""Helpers for contract tests against real vLLM: a live KV-event subscriber and replay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq

from llmd.protocol.kv_events import END_SEQ, decode_seq
from llmd.vllm_cpu.server import VllmServer


@dataclass
class Frame:
    topic: bytes
    seq: int
    payload: bytes


class KVEventTap:
    """A SUB socket on one server's KV-event PUB endpoint that keeps every multipart frame."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], server: VllmServer) -> None:
        self.server = server
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.connect(server.kv_events_endpoint)
        self.frames: list[Frame] = []
        time.sleep(1.0)  # ZMQ slow joiner: let the subscription reach the publisher

    def drain(self, settle_s: float = 1.0) -> list[Frame]:
        """Receive until the publisher has been quiet for `settle_s`; returns new frames."""
        new: list[Frame] = []
        while self.sock.poll(int(settle_s * 1000)):
            parts = self.sock.recv_multipart()
            assert len(parts) == 3, f"vLLM sent {len(parts)} frames, expected 3"
            new.append(Frame(parts[0], decode_seq(parts[1]), parts[2]))
        self.frames.extend(new)
        return new

    def replay(self, start_seq: int, timeout_s: float = 5.0) -> list[Frame]:
        """Ask the server's replay ROUTER for every buffered batch from `start_seq`."""
        dealer = self.sock.context.socket(zmq.DEALER)
        dealer.connect(self.server.replay_endpoint)
        try:
            dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
            out: list[Frame] = []
            while True:
                assert dealer.poll(int(timeout_s * 1000)), "replay timed out"
                parts = dealer.recv_multipart()
                assert parts[0] == b"", "replay frames start with an empty delimiter"
                if parts[2] == END_SEQ:
                    return out
                out.append(Frame(parts[1], decode_seq(parts[2]), parts[3]))
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture(scope="module")
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture(scope="module")
def kv_tap(
    vllm_server: VllmServer, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[KVEventTap]:
    tap = KVEventTap(zmq_ctx, vllm_server)
    yield tap
    tap.close()
