"""P/D disaggregation plugins with llm-d's names: decode first, prefill when the decider says
so, the prefill pick in x-prefiller-host-port, decisions counted and explained."""

from __future__ import annotations

from typing import Any

import pytest

from llmd.protocol import headers as hdr
from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.framework import SchedulingError
from llmd.scheduler.plugins.disagg import DisaggProfileHandler

from .conftest import completion, make_director

ROLES = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"},
         2: {"llm-d.ai/role": "decode"}}  # fmt: skip
PROFILES = """
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2},
            {pluginRef: queue-scorer}]
"""


def config(decider: str) -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: 16}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
{decider}
{PROFILES}"""


PREFIX_DECIDER = """- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}"""


def counted(director: Director, kind: str) -> float:
    """The decision count, the same under llm-d's current and deprecated metric names."""
    handler = director.built.handler
    assert isinstance(handler, DisaggProfileHandler)
    name = "disagg-profile-handler"
    values = [c.labels(name, name, "m", kind)._value.get() for c in handler.decisions]
    assert len(values) == 2
    assert values[0] == values[1]
    return float(values[0])


def test_always_disagg_picks_a_decode_pod_and_names_a_prefill_pod() -> None:
    decider = "- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n" \
              "  parameters: {deciders: {prefill: always-disagg-pd-decider}}"  # fmt: skip
    d, _, _ = make_director(3, config(decider), labels=ROLES)
    dec = d.schedule(completion(d, "hello " * 10))
    assert dec.endpoints[0].name in {"pod-1", "pod-2"}  # decode pods only
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"  # the prefill pod
    assert counted(d, "prefill-decode") == 1


def test_the_prefix_decider_disaggregates_only_long_uncached_prompts() -> None:
    d, _, _ = make_director(3, config(PREFIX_DECIDER), labels=ROLES)
    short = d.schedule(completion(d, "short prompt"))
    assert hdr.PREFILLER_HOST_PORT not in short.set_headers
    long_prompt = "a long shared system prompt " * 200  # ~1.4k estimated tokens
    first = d.schedule(completion(d, long_prompt + "question one"))
    assert first.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"
    d.complete(first, "natural")
    # the same prefix again: the decode pod holds it, so few tokens are left to prefill
    again = d.schedule(completion(d, long_prompt + "question two"))
    assert again.endpoints[0].name == first.endpoints[0].name
    assert hdr.PREFILLER_HOST_PORT not in again.set_headers
    assert counted(d, "decode-only") == 2
    assert counted(d, "prefill-decode") == 1
    assert again.result is not None
    why = again.result.profiles["decode"].explain["pd"]
    assert why["decision"] == "decode-only"
    assert "not cached on" in why["reason"]


def test_no_decode_pod_is_a_503_and_no_prefill_pod_is_decode_only() -> None:
    decider = "- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n" \
              "  parameters: {deciders: {prefill: always-disagg-pd-decider}}"  # fmt: skip
    d, _, _ = make_director(1, config(decider), labels={0: {"llm-d.ai/role": "prefill"}})
    with pytest.raises(SchedulingError) as exc:
        d.schedule(completion(d, "x"))
    assert exc.value.status == 503
    d, _, _ = make_director(2, config(decider),
                            labels={0: {"llm-d.ai/role": "decode"}, 1: {"llm-d.ai/role": "decode"}})  # fmt: skip
    dec = d.schedule(completion(d, "x"))
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    assert counted(d, "decode-only") == 1


def test_a_stale_decode_pod_still_serves_when_only_a_prefill_pod_is_usable() -> None:
    """The flake a real P/D run showed: the decode pod's metrics went stale and the busy
    prefill pod's scrape failed. The pool-wide candidates were the prefill pod alone, so the
    decode profile found no decode pod. It now looks wider, and counts that it did."""
    decider = "- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n" \
              "  parameters: {deciders: {prefill: always-disagg-pd-decider}}"  # fmt: skip
    d, ds, clock = make_director(
        2, config(decider), labels={0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"}}
    )
    prefill, decode = ds.all()
    clock.now += 60  # both stale
    scrape(ds, clock, "pod-0")  # the prefill pod's last scrape was good...
    ds.endpoint_failed(prefill, "metrics")  # ...and its next one failed: fresh, held out
    assert [e.name for e in ds.candidates()] == ["pod-0"]
    assert [[e.name for e in t] for t in ds.candidate_tiers()] == [["pod-0"], ["pod-0", "pod-1"]]
    dec = d.schedule(completion(d, "x " * 20))
    assert dec.endpoints[0] is decode
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9000"
    assert d.metrics.profile_widened.labels("decode")._value.get() == 1
    assert d.metrics.profile_widened.labels("prefill")._value.get() == 0
    why = d.explain(request_id=dec.request.request_id)[0]["profiles"]["decode"]["widened"]
    assert why == (
        "no endpoint passes filter decode-filter (profile decode) among the usable candidates; "
        "picked among 1 stale or held-out endpoint(s)"
    )
    d.complete(dec, "natural")
    assert decode.inflight_requests == 0
    # with the decode pod back, nothing is widened
    scrape(ds, clock, "pod-1")
    d.complete(d.schedule(completion(d, "y " * 20)), "natural")
    assert d.metrics.profile_widened.labels("decode")._value.get() == 1


def test_a_saturated_profile_is_never_widened_to_held_out_pods() -> None:
    limits = """- type: utilization-filter
  name: overload-filter
  parameters: {conditions: [{metric: waiting-queue, maxValue: 2}], fallbackOnEmpty: false}
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
"""
    cfg = config(limits).replace(
        "plugins: [{pluginRef: decode-filter},",
        "plugins: [{pluginRef: decode-filter}, {pluginRef: overload-filter},",
    )
    d, ds, clock = make_director(3, cfg, labels=ROLES)
    scrape(ds, clock, "pod-1", waiting=10)  # usable, over the limit
    ds.endpoint_failed(ds.all()[2], "metrics")  # idle, but held out
    with pytest.raises(SchedulingError) as exc:
        d.schedule(completion(d, "x"))
    assert exc.value.status == 429
    assert d.metrics.profile_widened.labels("decode")._value.get() == 0


def test_a_handler_naming_a_missing_decider_or_profile_is_refused() -> None:
    bad = "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: nope}}"
    with pytest.raises(ConfigError, match="'nope' is not a P/D decider"):
        build_core(config(bad))
    wrong = ("- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n"
             "  parameters: {profiles: {prefill: pre}, deciders: {prefill: always-disagg-pd-decider}}")  # fmt: skip
    with pytest.raises(ConfigError, match="no scheduling profile named 'pre'"):
        build_core(config(wrong))


COST_DECIDER = """- type: llmd-cost-pd-decider
  parameters: {minUncachedTokens: 256, maxTTFTIncrease: 0.2, transferSecondsPerToken: 0.00001}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: llmd-cost-pd-decider}}"""


def scrape(ds: Datastore, clock: Any, name: str, **metrics: Any) -> None:
    """Give one pod new scraped metrics (the counters included)."""
    (e,) = [e for e in ds.all() if e.endpoint.name == name]
    base = {"waiting": 0, "running": 0, "kv_cache_usage": 0.0, "block_size": 16}
    e.note_scrape(clock.now - 0.01, EngineSnapshot(**{**base, **metrics}), clock.now)


def test_the_cost_decider_disaggregates_only_when_it_pays() -> None:
    """An idle decode pod prefills locally (no decode to protect); a busy one sends the prompt
    to an idle prefill pod; a prefill pod with a long queue keeps it local; the numbers show in
    the explanation."""
    two_decode = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"}}
    d, ds, clock = make_director(2, config(COST_DECIDER), labels=two_decode)
    long_prompt = "a long and entirely new prompt " * 150  # ~1k estimated tokens

    def decide(prompt: str) -> tuple[bool, str]:
        dec = d.schedule(completion(d, prompt))
        assert dec.result is not None
        why = dec.result.profiles["decode"].explain["pd"]
        d.complete(dec, "natural")
        return hdr.PREFILLER_HOST_PORT in dec.set_headers, why["reason"]

    yes, why = decide(long_prompt + " one")
    assert not yes
    assert "runs 0 decodes: a local prefill delays none" in why
    scrape(ds, clock, "pod-1", running=8)
    yes, why = decide("another new prompt " * 200)
    assert yes, why
    assert "runs 8 decodes" in why
    # the same reasoning in /debug/decisions
    (rendered,) = d.explain(limit=1)
    assert rendered["profiles"]["decode"]["pd"] == {"reason": why, "decision": "prefill-decode"}
    assert "on pod-0 (queue 0.0" in why
    short_yes, why = decide("a short question")
    assert not short_yes
    assert "under 256" in why
    # the prefill pod is busy: 50k prompt tokens sent there and not finished
    (prefill,) = [e for e in ds.all() if e.endpoint.name == "pod-0"]
    prefill.inflight_tokens = 50_000
    yes, why = decide("yet another new prompt " * 200)
    assert not yes
    assert "over 1.2x local" in why


def test_the_cost_decider_uses_each_engines_measured_prefill_cost() -> None:
    """A slow decode pod (its own counters: 1 ms per token) and a fast prefill pod (0.1 ms)
    make the remote prefill worth it even behind a queue; a prefill pod with no counters of its
    own is judged at the decode pod's cost."""
    two = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"}}
    d, ds, clock = make_director(2, config(COST_DECIDER), labels=two)
    (prefill,) = [e for e in ds.all() if e.endpoint.name == "pod-0"]
    prefill.inflight_tokens = 5_000
    scrape(ds, clock, "pod-1", running=4, prefill_seconds=10.0, computed_tokens=10_000)
    # unmeasured, the prefill pod is taken to be as slow as the decode pod: 5 s of queue
    dec = d.schedule(completion(d, "a new long prompt " * 200))
    assert hdr.PREFILLER_HOST_PORT not in dec.set_headers
    d.complete(dec, "natural")
    scrape(ds, clock, "pod-0", prefill_seconds=1.0, computed_tokens=10_000)  # 0.5 s of queue
    dec = d.schedule(completion(d, "another new long prompt " * 200))
    assert hdr.PREFILLER_HOST_PORT in dec.set_headers
    assert dec.result is not None
    assert "local ~" in dec.result.profiles["decode"].explain["pd"]["reason"]


def test_the_cost_deciders_parameters_are_checked() -> None:
    bad = COST_DECIDER.replace("maxTTFTIncrease: 0.2", "maxTTFTIncrease: -1")
    with pytest.raises(ConfigError, match="maxTTFTIncrease"):
        build_core(config(bad))


def test_back_to_back_decisions_see_the_prefill_queue_they_build() -> None:
    """The prefill leg never comes back through the gateway, so the handler notes it on the
    prefill pod as a pick the next scrape will show: the next decision sees that queue and
    keeps its prefill local; once a scrape shows the prefill pod idle again, it disaggregates
    again; a scraped backlog counts at the average prefill size."""
    two = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"}}
    d, ds, clock = make_director(2, config(COST_DECIDER), labels=two)
    (prefill,) = [e for e in ds.all() if e.endpoint.name == "pod-0"]
    scrape(ds, clock, "pod-1", running=8)

    def decide(prompt: str) -> tuple[bool, str]:
        dec = d.schedule(completion(d, prompt))
        assert dec.result is not None
        d.complete(dec, "natural")
        return hdr.PREFILLER_HOST_PORT in dec.set_headers, dec.result.profiles["decode"].explain[
            "pd"
        ]["reason"]

    yes, why = decide("the first new prompt " * 200)
    assert yes, why
    assert prefill.unseen_tokens > 500, "the prefill leg is noted on the prefill pod"
    yes, why = decide("the second new prompt " * 200)
    assert not yes, why
    assert "over 1.2x local" in why
    clock.now += 0.05
    scrape(ds, clock, "pod-0")  # the prefill pod's next scrape: idle, the pick is covered
    assert prefill.unseen_tokens == 0
    yes, why = decide("the third new prompt " * 200)
    assert yes, why
    clock.now += 0.05
    scrape(ds, clock, "pod-0", waiting=3)  # three prefill legs queued there
    yes, why = decide("the fourth new prompt " * 200)
    assert not yes, why


CACHE_SOURCE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16}
- type: prefix-cache-scorer
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: llmd-cache-source-pd-decider
  parameters: {minCachedTokenDelta: 256}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: llmd-cache-source-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer},
            {pluginRef: kv-cache-utilization-scorer, weight: 2}]
"""


def test_a_busy_holder_of_a_prefix_prefills_for_an_idle_pod_that_pulls_it() -> None:
    """Three `both` pods. A hot prompt lands on one pod; once that pod is busy (KV nearly
    full, no queue) the load scorer sends the next request with the same prefix to another
    pod, and the cache-source decider names the holder as its prefiller (rather than the pod
    the prefill profile's own scorer would take): the KV moves instead of being recomputed.
    With a queue on the holder the leg would wait there, so the pod recomputes; a prompt that
    nobody holds is never pulled."""
    both = {i: {"llm-d.ai/role": "both"} for i in range(3)}
    d, ds, clock = make_director(3, CACHE_SOURCE, labels=both)
    hot = "a hot system prompt shared by many requests " * 70  # ~780 estimated tokens

    def route(prompt: str) -> tuple[str, str | None, str]:
        dec = d.schedule(completion(d, prompt))
        assert dec.result is not None
        d.complete(dec, "natural")
        why = dec.result.profiles["decode"].explain["pd"]["reason"]
        return dec.endpoints[0].name, dec.set_headers.get(hdr.PREFILLER_HOST_PORT), why

    holder, prefiller, why = route(hot + "first question")
    assert prefiller is None, why
    scrape(ds, clock, holder, running=8, kv_cache_usage=0.95)
    (held,) = [e for e in ds.all() if e.endpoint.name == holder]
    decode, prefiller, why = route(hot + "second question")
    assert decode != holder
    assert prefiller == f"127.0.0.1:{held.endpoint.port}", why
    assert "; pull" in why
    assert f"{holder} lacks" in why
    assert counted(d, "prefill-decode") == 1
    (rendered,) = d.explain(limit=1)
    assert rendered["profiles"]["prefill"]["pd"] == {"source": f"{holder}, as the decider costed"}

    # now two pods hold the prefix (the second pulled it), both busy and queueing
    clock.now += 0.05
    for busy in (holder, decode):
        scrape(ds, clock, busy, running=8, kv_cache_usage=0.95, waiting=3)
    third, prefiller, why = route(hot + "third question")
    assert third not in (holder, decode)
    assert prefiller is None, why
    assert "with 3 waiting" in why
    assert why.endswith("recompute")

    _, prefiller, why = route("a prompt nobody has seen before " * 70)
    assert prefiller is None
    assert "under 256" in why


def test_the_cost_decider_names_the_prefill_pod_it_costed() -> None:
    """Two prefill pods: the cost decider takes the one whose prefill is cheapest for this
    prompt, and the handler uses that pod even though the prefill profile's scorer ties them."""
    roles = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "prefill"},
             2: {"llm-d.ai/role": "decode"}}  # fmt: skip
    d, ds, clock = make_director(3, config(COST_DECIDER), labels=roles)
    (slow,) = [e for e in ds.all() if e.endpoint.name == "pod-0"]
    slow.inflight_tokens = 3_000  # pod-0 has a backlog, pod-1 none
    scrape(ds, clock, "pod-2", running=8)
    dec = d.schedule(completion(d, "a new long prompt for the cost decider " * 100))
    assert dec.set_headers[hdr.PREFILLER_HOST_PORT] == "127.0.0.1:9001"
    assert dec.result is not None
    assert "on pod-1" in dec.result.profiles["decode"].explain["pd"]["reason"]
