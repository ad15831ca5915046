"""KV-event ingestion against real llmd-sim publishers over ZMQ: the index follows the engines
through dropped events (replay), restarts, duplicates, pod churn and a publisher that sends
garbage, and its prediction for a repeated prompt equals the engine's `cached_tokens`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
import zmq
import zmq.asyncio

from llmd.dev.sim_engines import SimFleetProcess
from llmd.kvcache.index import InMemoryIndex
from llmd.kvcache.indexer import KVCacheIndexer
from llmd.kvcache.ingest import EngineEndpoint, EventApplier, Ingestor
from llmd.kvcache.keys import TokenProcessor
from llmd.kvcache.tokenization import ModelTokenizer
from llmd.sim.tokenizer import default_tokenizer_dir

pytestmark = pytest.mark.integration

BLOCK = 16


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleetProcess]:
    f = SimFleetProcess.start(
        count=2, block_size=BLOCK, profile="h100-8b", work=tmp_path_factory.mktemp("kvfleet")
    )
    yield f
    f.stop()


def engine_endpoints(fleet: SimFleetProcess) -> list[EngineEndpoint]:
    doc = yaml.safe_load(Path(fleet.endpoints_file).read_text())
    return [
        EngineEndpoint(
            pod=e["name"],
            events=e["labels"]["llmd.ai/kv-events-endpoint"],
            replay=e["labels"]["llmd.ai/kv-replay-endpoint"],
        )
        for e in doc["endpoints"]
    ]


class Harness:
    def __init__(self, fleet: SimFleetProcess) -> None:
        self.fleet = fleet
        self.index = InMemoryIndex()
        self.applier = EventApplier(self.index, TokenProcessor())
        self.ingestor = Ingestor(self.applier, shards=2, replay_timeout_s=2.0)
        self.indexer = KVCacheIndexer(self.index, TokenProcessor(), metrics=self.applier.metrics)
        self.tokenizer = ModelTokenizer(default_tokenizer_dir())
        self.http = httpx.AsyncClient(timeout=30)

    def url(self, pod: str) -> str:
        return next(e.url for e in self.fleet.engines if e.pod == pod)

    async def complete(self, pod: str, prompt: str) -> dict[str, object]:
        r = await self.http.post(
            self.url(pod) + "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
        usage: dict[str, object] = r.json()["usage"]
        return usage

    async def faults(self, pod: str, **faults: object) -> None:
        r = await self.http.post(self.url(pod) + "/sim/faults", json=faults)
        assert r.status_code == 200, r.text

    def hit(self, pod: str, prompt: str) -> int:
        keys = self.indexer.keys(self.tokenizer.encode(prompt), "tiny")
        h = self.indexer.score_sync(keys, None).get(pod)
        return h.blocks if h else 0

    async def settle(self, check: object = None, timeout: float = 5.0) -> None:
        """Let published batches arrive and be applied."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.1)
            await self.ingestor.drain()
            if check is None or check() or time.monotonic() > deadline:  # type: ignore[operator]
                return


@pytest.fixture
async def h(fleet: SimFleetProcess) -> AsyncIterator[Harness]:
    harness = Harness(fleet)
    await harness.ingestor.start()
    for e in engine_endpoints(fleet):
        harness.ingestor.subscribe(e)
    await asyncio.sleep(0.5)  # SUB sockets join after the connect (ZMQ slow joiner)
    yield harness
    await harness.ingestor.stop()
    await harness.http.aclose()


def prompt(tag: str, words: int = 120) -> str:
    return f"{tag}: " + " ".join(f"w{tag}{i}" for i in range(words))


async def test_prediction_equals_the_engines_cached_tokens(h: Harness) -> None:
    p = prompt("alpha")
    first = await h.complete("sim-0", p)
    await h.settle(lambda: h.hit("sim-0", p) > 0)
    n_tokens = len(h.tokenizer.encode(p))
    predicted = h.hit("sim-0", p) * BLOCK
    assert predicted == (n_tokens // BLOCK) * BLOCK
    second = await h.complete("sim-0", p)
    cached = second["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert first["prompt_tokens"] == n_tokens
    assert cached == min(predicted, ((n_tokens - 1) // BLOCK) * BLOCK)
    assert h.hit("sim-1", p) == 0


async def test_dropped_events_are_replayed(h: Harness) -> None:
    await h.complete("sim-1", prompt("warm"))
    await h.settle()
    await h.faults("sim-1", drop_events_rate=1.0)
    lost = prompt("lost")
    await h.complete("sim-1", lost)
    await h.settle()
    assert h.hit("sim-1", lost) == 0  # its events never arrived live
    await h.faults("sim-1", drop_events_rate=0.0)
    after = prompt("after")
    await h.complete("sim-1", after)
    await h.settle(lambda: h.hit("sim-1", lost) > 0)
    assert h.hit("sim-1", lost) > 0  # the gap was noticed and replayed
    assert h.hit("sim-1", after) > 0
    assert h.applier.metrics.replays.labels("ok")._value.get() >= 1
    assert h.applier.metrics.sequence.labels("gap")._value.get() >= 1


async def test_a_restarted_publisher_is_detected_and_its_pod_cleared(h: Harness) -> None:
    before = prompt("before-restart")
    await h.complete("sim-0", before)
    await h.settle(lambda: h.hit("sim-0", before) > 0)
    await h.faults("sim-0", reset_event_sequence=True)
    fresh = prompt("fresh")
    await h.complete("sim-0", fresh)
    await h.settle(lambda: h.hit("sim-0", before) == 0)
    assert h.applier.metrics.sequence.labels("restart")._value.get() == 1
    assert h.hit("sim-0", before) == 0  # cleared: a restarted engine has an empty cache
    assert h.hit("sim-0", fresh) > 0  # and the new stream is followed


async def test_duplicate_stores_are_reference_counted(h: Harness) -> None:
    p = prompt("dup", 40)
    await asyncio.gather(*(h.complete("sim-1", p) for _ in range(4)))
    await h.settle(lambda: h.hit("sim-1", p) > 0)
    assert h.hit("sim-1", p) == len(h.tokenizer.encode(p)) // BLOCK


async def test_pod_churn_clears_the_departed_pod(h: Harness) -> None:
    p = prompt("churn")
    await h.complete("sim-1", p)
    await h.settle(lambda: h.hit("sim-1", p) > 0)
    sim1 = next(e for e in engine_endpoints(h.fleet) if e.pod == "sim-1")
    for t in h.ingestor.sync([e for e in engine_endpoints(h.fleet) if e.pod != "sim-1"]):
        await t
    await h.settle()
    assert h.hit("sim-1", p) == 0
    assert [e.pod for e in h.ingestor.subscribed] == ["sim-0"]
    h.ingestor.subscribe(sim1)  # it comes back: joining replays what it still buffers
    await h.settle(lambda: h.hit("sim-1", p) > 0)
    assert h.hit("sim-1", p) > 0


async def test_a_garbage_publisher_is_counted_and_the_index_survives(h: Harness) -> None:
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        h.ingestor.subscribe(EngineEndpoint(pod="junk", events=f"tcp://127.0.0.1:{port}"))
        await asyncio.sleep(0.5)
        for frames in (
            [b"kv@junk@tiny", (0).to_bytes(8, "big"), b"\xc1not msgpack"],
            [b"kv@junk@tiny", b"short"],
            [b"kv@junk@tiny", (1).to_bytes(8, "big"), b"\x93\xa1x\x90\x00"],
        ):
            await pub.send_multipart(frames)
        good = prompt("still-good")
        await h.complete("sim-0", good)
        await h.settle(lambda: h.hit("sim-0", good) > 0)
        errors = h.applier.metrics.decode_errors
        assert errors.labels("payload")._value.get() + errors.labels("frames")._value.get() == 3
        assert h.ingestor.snapshot()["junk|" + f"tcp://127.0.0.1:{port}"]["last_error"]
        assert h.hit("sim-0", good) > 0
    finally:
        pub.close(linger=0)
