"""Predicted-latency routing: the online model learns a fleet's latency, SLO-aware scoring,
early rejection of sheddable requests no endpoint can serve, and llm-d's affinity filters."""

from __future__ import annotations

import json
import random

import pytest

from llmd.protocol import headers as hdr
from llmd.protocol.metrics import EngineSnapshot
from llmd.protocol.openai import Usage
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.framework import LLMRequest, SchedulingError
from llmd.scheduler.plugins.latency import RLS

from .conftest import make_director

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
  parameters: {minSamples: 10}
- type: latency-scorer
- type: latency-slo-admitter
schedulingProfiles:
- name: default
  plugins: [{pluginRef: latency-scorer}]
"""


def request(director: Director, prompt_words: int = 50, **headers: str) -> LLMRequest:
    req = director.new_request(dict(headers), "/v1/completions")
    body = {"model": "m", "prompt": "w " * prompt_words, "max_tokens": 16, "stream": True}
    req.body = json.dumps(body).encode()
    return req


def scrape(ds: Datastore, waiting: list[int], running: list[int]) -> None:
    now = ds.clock()
    for e, w, r in zip(ds.all(), waiting, running, strict=True):
        e.unseen.clear()
        e.note_scrape(
            now,
            EngineSnapshot(
                waiting=w, running=r, kv_cache_usage=0.1 * r, block_size=16, num_gpu_blocks=1000
            ),
            now,
        )


def true_ttft(waiting: int, running: int) -> float:
    """The simulated fleet: queued work costs 100 ms a request, a busy batch 20 ms a request."""
    return 0.05 + 0.1 * waiting + 0.02 * running


def train(
    director: Director, ds: Datastore, rounds: int = 60, seed: int = 0, usage: bool = True
) -> None:
    """`usage=False`: streams without a usage chunk (the client did not ask for one)."""
    rng = random.Random(seed)
    for _ in range(rounds):
        waiting = [rng.randrange(6) for _ in ds.all()]
        running = [rng.randrange(8) for _ in ds.all()]
        scrape(ds, waiting, running)
        req = request(director)
        decision = director.schedule(req)
        i = ds.all().index(decision.endpoints[0])
        ttft = true_ttft(waiting[i], running[i])
        decision.first_byte_at = req.received_at + ttft
        decision.ended_at = req.received_at + ttft + 15 * (0.01 + 0.002 * running[i])
        director.complete(
            decision,
            "natural",
            Usage(prompt_tokens=60, completion_tokens=16, total_tokens=76) if usage else None,
        )


def test_rls_learns_a_linear_function() -> None:
    m = RLS(3)
    rng = random.Random(1)
    for _ in range(200):
        x = [1.0, rng.random(), rng.random() * 10]
        m.update(x, 0.5 + 2 * x[1] + 0.3 * x[2])
    assert abs(m.predict([1.0, 0.5, 5.0]) - (0.5 + 1.0 + 1.5)) < 1e-3


def test_the_model_learns_and_routes_to_the_lowest_predicted_ttft() -> None:
    director, ds, _ = make_director(3, CONFIG)
    train(director, ds)
    producer = director.built.plugins["predicted-latency-producer"]
    assert producer.state()["ready"]
    scrape(ds, waiting=[5, 0, 3], running=[7, 2, 7])
    decision = director.schedule(request(director))
    assert decision.endpoints[0] is ds.all()[1]
    errors = producer.state()["abs_error_s"]
    assert errors
    assert max(errors.values()) < 0.2


def test_streams_without_a_usage_chunk_teach_ttft_and_routing_uses_it() -> None:
    """Most streaming clients do not ask for `include_usage`: the gateway then sees no usage,
    but the time to first token is known and is a TTFT sample (no TPOT sample: the output
    token count is not). Once TTFT has trained, routing follows predicted TTFT alone."""
    director, ds, _ = make_director(3, CONFIG)
    producer = director.built.plugins["predicted-latency-producer"]
    train(director, ds, rounds=40, seed=3, usage=False)
    state = producer.state()
    assert state["samples"] == {"ttft": 40, "tpot": 0}
    assert state["ready"]
    assert not state["tpot_ready"]
    scrape(ds, waiting=[5, 0, 3], running=[7, 2, 7])
    assert director.schedule(request(director)).endpoints[0] is ds.all()[1]
    # a stream that broke off is no sample
    req = request(director)
    decision = director.schedule(req)
    decision.first_byte_at = req.received_at + 0.2
    director.complete(decision, "upstream-reset", None)
    assert producer.state()["samples"]["ttft"] == 40


def test_with_an_slo_the_tightest_endpoint_that_meets_it_wins() -> None:
    director, ds, _ = make_director(3, CONFIG)
    train(director, ds)
    # predicted TTFT about 0.09 s, 0.39 s and 0.71 s; an SLO of 500 ms fits the first two,
    # and "least headroom" keeps the fastest free for tighter requests
    scrape(ds, waiting=[0, 3, 6], running=[2, 2, 2])
    decision = director.schedule(request(director, **{hdr.SLO_TTFT_MS: "500"}))
    assert decision.endpoints[0] is ds.all()[1]


def test_sheddable_requests_no_endpoint_can_serve_are_refused_early() -> None:
    director, ds, _ = make_director(2, CONFIG)
    director.objectives = {"batch": -1}
    train(director, ds)
    scrape(ds, waiting=[6, 6], running=[8, 8])
    for e in ds.all():
        e.inflight_requests = 3  # nobody idle
    req = request(director, **{hdr.SLO_TTFT_MS: "100", hdr.INFERENCE_OBJECTIVE: "batch"})
    with pytest.raises(SchedulingError) as exc:
        director.schedule(req)
    assert exc.value.status == 429
    assert exc.value.dropped_reason == hdr.DROPPED_SATURATED
    assert "SLO" in exc.value.message
    # a request of priority >= 0 is never refused by the admitter
    director.schedule(request(director, **{hdr.SLO_TTFT_MS: "100"}))


def test_malformed_slo_headers_are_ignored_and_counted() -> None:
    director, ds, _ = make_director(2, CONFIG)
    train(director, ds)
    for bad in ("fast", "-5", "nan", "inf", ""):
        director.schedule(request(director, **{hdr.SLO_TTFT_MS: bad}))
    metrics = director.metrics
    assert metrics is not None
    from prometheus_client import generate_latest

    core_registry = director.built.plugins["predicted-latency-producer"]._m["invalid"]
    assert core_registry._value.get() == 5
    assert generate_latest  # the family is registered with the scheduler's metrics


def test_before_enough_samples_the_composite_score_decides() -> None:
    director, ds, _ = make_director(2, CONFIG)
    scrape(ds, waiting=[4, 0], running=[1, 1])
    decision = director.schedule(request(director))
    assert decision.endpoints[0] is ds.all()[1]  # the shorter queue


STICKY = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-affinity-filter
  parameters: {maxTTFTPenaltyMs: 100, peakPrefillThroughput: 10000}
- type: token-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-affinity-filter}
  - {pluginRef: token-load-scorer}
  - {pluginRef: max-score-picker}
"""


def test_sticky_until_saturated() -> None:
    director, ds, _ = make_director(2, STICKY)
    scrape(ds, waiting=[0, 0], running=[0, 0])
    prompt = 300
    first = director.schedule(request(director, prompt))
    sticky = first.endpoints[0]
    director.complete(first, "natural")
    again = director.schedule(request(director, prompt))
    assert again.endpoints[0] is sticky  # the prefix holder keeps it
    director.complete(again, "natural")
    sticky.inflight_tokens = 5_000  # 500 ms of prefill queued there, over the 100 ms penalty
    moved = director.schedule(request(director, prompt))
    assert moved.endpoints[0] is not sticky
