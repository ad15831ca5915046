"""Shared helpers: a Director over hand-made endpoint states (no network)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.discovery import Endpoint
from llmd.scheduler.core import build_core
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.framework import LLMRequest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_director(
    n: int = 4,
    config: str | None = None,
    labels: dict[int, dict[str, str]] | None = None,
    allow_experimental: bool = False,
) -> tuple[Director, Datastore, Clock]:
    clock = Clock()
    core = build_core(config, clock=clock, allow_experimental=allow_experimental)
    ds = core.datastore
    ds.set_endpoints(
        tuple(
            Endpoint(f"pod-{i}", "127.0.0.1", 9000 + i, labels=(labels or {}).get(i, {}))
            for i in range(n)
        )
    )
    for e in ds.all():
        e.note_scrape(
            clock.now - 0.01,
            EngineSnapshot(
                waiting=0, running=0, kv_cache_usage=0.0, block_size=16, num_gpu_blocks=10_000
            ),
            clock.now,
        )
    return core.director, ds, clock


def completion(director: Director, prompt: str, model: str = "m", **headers: str) -> LLMRequest:
    req = director.new_request(
        {k.replace("_", "-"): v for k, v in headers.items()}, "/v1/completions"
    )
    import json

    req.body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4}).encode()
    return req


@pytest.fixture
def director_factory() -> Callable[..., tuple[Director, Datastore, Clock]]:
    return make_director
