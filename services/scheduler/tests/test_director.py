"""Scheduling decisions through the Director, over hand-made endpoint states."""

from __future__ import annotations

import collections

import pytest

from llmd.protocol.metrics import EngineSnapshot, LoraInfo
from llmd.scheduler.framework import SchedulingError

from .conftest import completion, make_director

LONG = "You are a careful assistant. " * 200  # ~5.6k bytes, ~22 blocks of 64 pseudo-tokens


def test_shared_prefix_lands_on_the_same_endpoint() -> None:
    d, _, _ = make_director()
    first = d.schedule(completion(d, LONG + "question one"))
    d.complete(first, "natural")
    for q in ("two", "three", "four"):
        dec = d.schedule(completion(d, LONG + q))
        assert dec.endpoints[0].key == first.endpoints[0].key
        d.complete(dec, "natural")


def test_prefix_hit_is_explained_per_plugin_and_endpoint() -> None:
    d, _, _ = make_director()
    d.complete(d.schedule(completion(d, LONG + "a")), "natural")
    dec = d.schedule(completion(d, LONG + "b"))
    explained = d.explain(request_id=dec.request.request_id)[0]
    prof = explained["profiles"]["default"]
    winner = dec.endpoints[0].name
    assert prof["picked"] == [winner]
    assert prof["scores"]["prefix-cache-scorer"]["per_endpoint"][winner] > 0.9
    assert prof["scores"]["prefix-cache-scorer"]["weight"] == 3
    assert explained["prefix_match_blocks"][dec.endpoints[0].key].startswith("22/")


def test_burst_with_stale_metrics_spreads_with_pick_time_accounting() -> None:
    """One endpoint looked idle at the last scrape; a burst must not all go there."""
    d, ds, _ = make_director()
    for e in ds.all()[1:]:
        e.metrics = EngineSnapshot(waiting=3, running=8, kv_cache_usage=0.3)
    picks = collections.Counter()
    for i in range(40):
        picks[d.schedule(completion(d, f"distinct prompt {i} " * 10)).endpoints[0].name] += 1
    assert picks["pod-0"] < 40
    assert len(picks) == 4


def test_llm_d_behaviour_without_pick_time_accounting_herds() -> None:
    d, ds, _ = make_director(config=_baseline(pick_time=False))
    for e in ds.all()[1:]:
        e.metrics = EngineSnapshot(waiting=3, running=8, kv_cache_usage=0.3)
    picks = collections.Counter(
        d.schedule(completion(d, f"distinct prompt {i} " * 10)).endpoints[0].name for i in range(40)
    )
    assert picks == {"pod-0": 40}


def test_equal_scores_do_not_pile_onto_one_endpoint() -> None:
    d, _, _ = make_director(config=_baseline(pick_time=True))
    picks = collections.Counter(
        d.schedule(completion(d, f"cold {i} " * 10)).endpoints[0].name for i in range(40)
    )
    assert max(picks.values()) <= 11


def test_hot_prefix_spreads_when_its_endpoint_is_overloaded() -> None:
    d, _ds, _ = make_director()
    first = d.schedule(completion(d, LONG + "0"))
    hot = first.endpoints[0]
    hot.metrics = EngineSnapshot(waiting=30, running=64, kv_cache_usage=0.5)
    dec = d.schedule(completion(d, LONG + "1"))
    assert dec.endpoints[0].key != hot.key
    explained = d.explain(request_id=dec.request.request_id)[0]
    assert explained["profiles"]["default"]["filters"] == [{"plugin": "overload-filter", "kept": 3}]


def test_accounting_is_released_exactly_once() -> None:
    d, _ds, _ = make_director()
    dec = d.schedule(completion(d, "hello " * 100))
    ep = dec.endpoints[0]
    assert ep.inflight_requests == 1
    assert ep.inflight_tokens == dec.tokens > 0
    d.complete(dec, "error")
    d.complete(dec, "natural")
    assert ep.inflight_requests == 0
    assert ep.inflight_tokens == 0
    assert d.inflight == 0


def test_unseen_picks_clear_when_a_later_scrape_sees_them() -> None:
    d, _ds, clock = make_director()
    dec = d.schedule(completion(d, "x " * 50))
    ep = dec.endpoints[0]
    assert len(ep.unseen) == 1
    clock.now += 0.05
    ep.note_scrape(clock.now - 0.01, EngineSnapshot(waiting=1), clock.now)
    assert ep.unseen == {}
    assert ep.waiting == 1


def test_a_request_that_finishes_before_any_scrape_stops_counting_as_load() -> None:
    d, _ds, _clock = make_director()
    dec = d.schedule(completion(d, "x " * 50))
    ep = dec.endpoints[0]
    other = d.schedule(completion(d, "y " * 50))
    assert ep.waiting + other.endpoints[0].waiting == 2
    d.complete(dec, "natural")
    assert ep.waiting == (1 if other.endpoints[0] is ep else 0)
    assert ep.unseen_tokens == (other.tokens if other.endpoints[0] is ep else 0)
    d.complete(other, "natural")
    assert all(not e.unseen and e.unseen_tokens == 0 for e in d.datastore.all())


def test_stale_endpoints_leave_candidates_but_never_empty_the_pool() -> None:
    d, ds, clock = make_director()
    eps = ds.all()
    clock.now += 5
    eps[2].metrics_at = clock.now  # only pod-2 is fresh
    assert [e.name for e in ds.candidates()] == ["pod-2"]
    assert ds.stale_count() == 3
    for e in eps:
        e.metrics_at = 1.0  # every endpoint stale: all stay candidates
    assert len(ds.candidates()) == 4
    dec = d.schedule(completion(d, "still served"))
    assert dec.endpoints


def test_no_endpoints_is_503_with_dropped_reason() -> None:
    d, ds, _ = make_director()
    ds.set_endpoints(())
    with pytest.raises(SchedulingError) as exc:
        d.schedule(completion(d, "x"))
    assert exc.value.status == 503
    assert exc.value.dropped_reason == "rejected-no-endpoints"


def test_filters_that_drain_candidates_give_precise_errors() -> None:
    d, _, _ = make_director(config=_with_filter("prefill-filter"))
    with pytest.raises(SchedulingError) as exc:
        d.schedule(completion(d, "x"))
    assert exc.value.status == 503
    assert "prefill-filter" in exc.value.message


def test_bad_bodies_are_400() -> None:
    d, _, _ = make_director()
    for body, msg in (
        (b"{nope", "not valid JSON"),
        (b'{"prompt": "x"}', "model not found"),
        (b'{"model": "m"}', "need a 'prompt'"),
        (b'{"model": "m", "prompt": [1.5]}', "prompt must be"),
    ):
        req = d.new_request({}, "/v1/completions")
        req.body = body
        with pytest.raises(SchedulingError) as exc:
            d.schedule(req)
        assert exc.value.status == 400
        assert msg in exc.value.message


def test_model_rewrite_header_changes_the_forwarded_body() -> None:
    d, _, _ = make_director()
    req = completion(d, "x", model="public", **{"x-llm-d-model-name-rewrite": "lora-a"})
    dec = d.schedule(req)
    assert req.target_model == "lora-a"
    assert dec.body is not None
    assert b'"model":"lora-a"' in dec.body


def test_lora_affinity_prefers_endpoints_with_the_adapter() -> None:
    config = _single_scorer("lora-affinity-scorer")
    d, ds, _ = make_director(config=config)
    eps = ds.all()
    eps[0].metrics = EngineSnapshot(lora=LoraInfo(max_lora=1, running=("other",), waiting=()))
    eps[1].metrics = EngineSnapshot(lora=LoraInfo(max_lora=2, running=("sql",), waiting=()))
    eps[2].metrics = EngineSnapshot(lora=LoraInfo(max_lora=2, running=(), waiting=()))
    eps[3].metrics = EngineSnapshot(lora=LoraInfo(max_lora=1, running=("x",), waiting=("sql",)))
    scores = d.built.plugins["lora-affinity-scorer"].score(completion(d, "q", model="sql"), eps)  # type: ignore[attr-defined]
    d2 = completion(d, "q", model="sql")
    d2.target_model = "sql"
    scores = d.built.plugins["lora-affinity-scorer"].score(d2, eps)  # type: ignore[attr-defined]
    assert scores == [0.0, 1.0, 0.8, 0.6]
    assert d.schedule(completion(d, "q", model="sql")).endpoints[0].name == "pod-1"


def test_session_affinity_pins_a_session() -> None:
    config = _single_scorer(
        "session-affinity-scorer",
        weight=10,
        extra="- type: queue-scorer\n",
        extra_ref="  - pluginRef: queue-scorer\n",
    )
    d, _ds, _ = make_director(config=config, allow_experimental=True)
    first = d.schedule(completion(d, "a", **{"x-session-id": "s1"}))
    for i in range(10):
        dec = d.schedule(completion(d, f"b{i}", **{"x-session-id": "s1"}))
        assert dec.endpoints[0].key == first.endpoints[0].key


def test_label_selector_and_decode_filter() -> None:
    config = _with_filter("label-selector-filter", "{matchLabels: {tier: gold}}")
    d, _, _ = make_director(config=config, labels={2: {"tier": "gold"}})
    assert d.schedule(completion(d, "x")).endpoints[0].name == "pod-2"
    d2, _, _ = make_director(
        config=_with_filter("decode-filter"), labels={0: {"llm-d.ai/role": "prefill"}}
    )
    assert all(d2.schedule(completion(d2, f"x{i}")).endpoints[0].name != "pod-0" for i in range(20))


def test_fallback_list_and_scores_in_metadata() -> None:
    config = _baseline(pick_time=True, picker_params="{maxNumOfEndpoints: 3}")
    d, _, _ = make_director(config=config)
    dec = d.schedule(completion(d, "x"))
    assert len(dec.destination.split(",")) == 3


def test_dry_run_changes_nothing() -> None:
    d, ds, _ = make_director()
    out = d.dry_run("/v1/completions", b'{"model": "m", "prompt": "hi"}')
    assert set(out["profiles"]["default"]["totals"]) == {"pod-0", "pod-1", "pod-2", "pod-3"}
    assert all(e.inflight_requests == 0 and not e.unseen for e in ds.all())


def _baseline(pick_time: bool, picker_params: str | None = None) -> str:
    picker = "- type: max-score-picker\n" + (
        f"  parameters: {picker_params}\n" if picker_params else ""
    )
    return f"""
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
{picker}schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: max-score-picker}}
llmd:
  pickTimeAccounting: {str(pick_time).lower()}
"""


def _with_filter(filter_type: str, params: str | None = None) -> str:
    p = f"  parameters: {params}\n" if params else ""
    return f"""
plugins:
- type: {filter_type}
{p}- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: {filter_type}
  - pluginRef: queue-scorer
"""


def _single_scorer(scorer: str, weight: int = 1, extra: str = "", extra_ref: str = "") -> str:
    return f"""
plugins:
- type: {scorer}
{extra}schedulingProfiles:
- name: default
  plugins:
  - pluginRef: {scorer}
    weight: {weight}
{extra_ref}"""


def test_tracing_emits_a_span_per_stage() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    d, _, _ = make_director()
    d.tracer = provider.get_tracer("test")
    d.schedule(completion(d, "traced"))
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == [
        "filter_endpoints",
        "llm_d.epp.scoring",
        "pick_endpoints",
        "run_scheduler_profile",
        "gateway.request_orchestration",
    ]
    profile_span = exporter.get_finished_spans()[3]
    assert profile_span.attributes["llm_d.epp.scheduling.profile.name"] == "default"


def test_prefix_consumers_read_the_precise_producers_data_under_the_default_name() -> None:
    from llmd.scheduler.framework import (
        PRECISE_PRODUCER,
        LLMRequest,
        PluginHandle,
        PrefixMatch,
    )
    from llmd.scheduler.plugins.scorers import NoHitLRUParams, NoHitLRUScorer

    req = LLMRequest(request_id="r", path="/v1/completions", headers={}, body=b"")
    scorer = NoHitLRUScorer("no-hit-lru-scorer", NoHitLRUParams(), PluginHandle(list))
    assert scorer._cold(req)  # no producer wrote anything: cold
    req.prefix[PRECISE_PRODUCER] = {"10.0.0.1:8000": PrefixMatch(3, 4, 16)}
    assert not scorer._cold(req)  # a precise-only config: its matches count


def test_plugin_state_is_typed_per_owner() -> None:
    from dataclasses import dataclass

    from llmd.scheduler.framework import LLMRequest

    @dataclass
    class Mine:
        count: int = 0

    @dataclass
    class Other:
        name: str = ""

    req = LLMRequest(request_id="r", path="/v1/completions", headers={}, body=b"")
    req.state("p", Mine).count += 1
    assert req.state("p", Mine).count == 1
    with pytest.raises(TypeError, match="p state is Mine, not Other"):
        req.state("p", Other)


def test_failed_scrape_and_5xx_answers_hold_an_endpoint_out_until_it_recovers() -> None:
    d, ds, clock = make_director(n=3)
    dead = ds.all()[0]
    ds.failed(dead.key, "metrics", "ConnectionRefusedError")  # its last scrape failed
    picks = set()
    for i in range(6):
        dec = d.schedule(completion(d, f"prompt {i}"))
        picks.add(dec.endpoints[0].key)
        d.complete(dec, "natural")
    assert dead.key not in picks
    # a 5xx answer from another endpoint holds it out too
    dec = d.schedule(completion(d, "one more"))
    bad = dec.endpoints[0]
    d.response_headers(dec, 503)
    d.complete(dec, "natural")
    for i in range(4):
        dec = d.schedule(completion(d, f"after {i}"))
        assert dec.endpoints[0].key not in {dead.key, bad.key}
        d.complete(dec, "natural")
    # when every endpoint is held out, routing goes on (never fail closed)
    for e in ds.all():
        ds.endpoint_failed(e, "response")
    dec = d.schedule(completion(d, "all held out"))
    assert dec.endpoints
    d.complete(dec, "natural")
    # the backoff passes and a good scrape brings the endpoint back
    clock.now += 11
    ds.metrics(dead.key, clock.now - 0.01, EngineSnapshot(waiting=0, running=0), clock.now)
    assert dead.failure_streak == 0
    assert dead in ds.candidates()
