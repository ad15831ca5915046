"""Flow control: bands served highest first, fairness within a band, bounded queues, TTLs,
clients leaving while queued, and dispatch that never halts on stale metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math

import pytest

from llmd.protocol import headers as hdr
from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.config import ConfigError
from llmd.scheduler.core import build_core
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.director import Director
from llmd.scheduler.flowcontrol import parse_quantity
from llmd.scheduler.framework import LLMRequest, SchedulingError

from .conftest import make_director

OBJECTIVES = {"critical": 10, "standard": 0, "batch": -5}


def config(flow: str = "{}", extra_plugins: str = "") -> str:
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
{extra_plugins}
flowControl: {flow}
"""


def setup(flow: str = "{}", n: int = 2, extra_plugins: str = "") -> tuple[Director, Datastore]:
    director, ds, _ = make_director(n, config(flow, extra_plugins))
    director.objectives = OBJECTIVES
    return director, ds


def request(
    director: Director, objective: str = "", tenant: str = "", **headers: str
) -> LLMRequest:
    h = dict(headers)
    if objective:
        h[hdr.INFERENCE_OBJECTIVE] = objective
    if tenant:
        h[hdr.FAIRNESS_ID] = tenant
    req = director.new_request(h, "/v1/completions")
    req.body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4}).encode()
    return req


def load(ds: Datastore, waiting: int, kv: float = 0.0, running: int = 4) -> None:
    """Every endpoint reports this queue (fresh metrics)."""
    now = ds.clock()
    for e in ds.all():
        e.unseen.clear()
        e.note_scrape(
            now,
            EngineSnapshot(
                waiting=waiting,
                running=running,
                kv_cache_usage=kv,
                block_size=16,
                num_gpu_blocks=10_000,
            ),
            now,
        )


async def started(director: Director) -> None:
    assert director.flow is not None
    director.flow.tick_s = 0.001
    director.flow.start()


def test_quantities() -> None:
    assert parse_quantity("500") == 500
    assert parse_quantity("10k") == 10_000
    assert parse_quantity("1Gi") == 1 << 30
    assert parse_quantity(7) == 7
    for bad in ("ten", "-1", "1Zi", ""):
        with pytest.raises(ValueError, match=r"quantity|negative"):
            parse_quantity(bad)


async def test_unloaded_requests_pass_at_once() -> None:
    director, _ = setup()
    await started(director)
    try:
        for _ in range(20):
            req = request(director)
            await asyncio.wait_for(director.admit(req), 1)
        assert director.flow is not None
        assert director.flow.outcomes["Dispatched"] == 20
        assert director.flow.queued == 0
    finally:
        await director.flow.stop()


async def test_requests_sent_since_the_scrape_fill_free_batch_slots_before_they_queue() -> None:
    """Requests sent since the last scrape count as waiting only beyond the batch slots the
    engine had free (the most it was seen running, minus what it ran at the scrape), so
    admission is not capped at `queueDepthThreshold` per endpoint per scrape interval. While
    an engine queues, every one of them counts, and the pool saturates before the next
    scrape shows it."""
    director, ds = setup()
    flow = director.flow
    assert flow is not None
    load(ds, waiting=0, running=8)  # each engine is seen running 8 at once
    await started(director)
    try:
        await asyncio.wait_for(director.admit(request(director)), 1)  # (learns the 8)
        load(ds, waiting=0, running=2)  # a later scrape: 6 free slots each
        # saturation per endpoint: (sent since the scrape - 6) / 5; 1.0 at 11 each
        for _ in range(22):
            req = request(director)
            await asyncio.wait_for(director.admit(req), 1)
            director.schedule(req, None)
        assert flow.outcomes["Dispatched"] == 23
        assert sum(len(e.unseen) for e in ds.all()) == 22  # the load scorers see them all
        held = asyncio.create_task(director.admit(request(director)))
        await asyncio.sleep(0.05)
        assert not held.done()
        assert flow.queued == 1
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held

        load(ds, waiting=1, running=2)  # queueing engines: no free slots
        for _ in range(8):  # (1 + 4) / 5 per endpoint afterwards: saturation 1.0
            req = request(director)
            await asyncio.wait_for(director.admit(req), 1)
            director.schedule(req, None)
        held = asyncio.create_task(director.admit(request(director)))
        await asyncio.sleep(0.05)
        assert not held.done()
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    finally:
        await flow.stop()


async def held_back(director: Director) -> bool:
    """Whether one more request waits in flow control's queue (it is withdrawn after)."""
    held = asyncio.create_task(director.admit(request(director)))
    await asyncio.sleep(0.05)
    waited = not held.done()
    held.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await held
    return waited


async def test_a_cold_pool_learns_what_its_endpoints_hold_without_queueing() -> None:
    """A pool never seen busy gets `queueDepthThreshold` requests per endpoint until a scrape;
    a scrape that finds no queue while those are still in flight shows they were held, and
    the next interval admits that many more on top (a slow start, not a fixed cap)."""
    director, ds = setup()
    flow = director.flow
    assert flow is not None
    load(ds, waiting=0, running=0)
    await started(director)
    try:
        for _ in range(10):  # 5 per endpoint: saturation 1.0
            req = request(director)
            await asyncio.wait_for(director.admit(req), 1)
            director.schedule(req, None)
        assert await held_back(director)
        load(ds, waiting=0, running=0)  # a scrape: no queue, the 10 still in flight
        for _ in range(20):  # 5 held each, so (10 - 5) / 5 = 1.0 after 10 more each
            req = request(director)
            await asyncio.wait_for(director.admit(req), 1)
            director.schedule(req, None)
        assert await held_back(director)
        assert flow.outcomes["Dispatched"] == 30
    finally:
        await flow.stop()


async def test_higher_bands_go_first_when_the_pool_frees_up() -> None:
    director, ds = setup()
    load(ds, waiting=10)  # saturated: 10 / 5 = 2.0
    await started(director)
    order: list[str] = []

    async def one(objective: str) -> None:
        await director.admit(request(director, objective))
        order.append(objective)

    tasks = [asyncio.create_task(one(o)) for o in ("batch", "standard", "critical", "batch")]
    await asyncio.sleep(0.05)
    assert director.flow is not None
    assert director.flow.queued == 4
    assert order == []
    load(ds, waiting=0)
    director.flow.wake()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[0] == "critical"
    assert order[1] == "standard"
    assert order[2:] == ["batch", "batch"]
    await director.flow.stop()


async def test_round_robin_shares_a_band_between_tenants() -> None:
    director, ds = setup(
        "{priorityBands: [{priority: 0, fairnessPolicyRef: round-robin-fairness-policy}]}"
    )
    load(ds, waiting=10)
    await started(director)
    order: list[str] = []

    async def one(tenant: str) -> None:
        await director.admit(request(director, tenant=tenant))
        order.append(tenant)

    tasks = [asyncio.create_task(one("flood")) for _ in range(8)]
    await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(one("quiet")) for _ in range(2)]
    await asyncio.sleep(0.02)
    load(ds, waiting=0)
    assert director.flow is not None
    director.flow.wake()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order.index("quiet") <= 2, order  # the quiet tenant does not wait behind the flood
    await director.flow.stop()


async def test_full_band_rejects_with_llm_d_reason() -> None:
    director, ds = setup("{priorityBands: [{priority: 0, maxRequests: 2}]}")
    load(ds, waiting=10)
    await started(director)
    waiting = [asyncio.create_task(director.admit(request(director))) for _ in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(SchedulingError) as exc:
        await director.admit(request(director))
    assert exc.value.status == 429
    assert exc.value.dropped_reason == hdr.DROPPED_SATURATED
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert director.flow is not None
    assert director.flow.queued == 0
    await director.flow.stop()


async def test_ttl_expiry_and_the_empty_pool() -> None:
    director, ds = setup("{defaultRequestTTL: 100ms, noEndpointRequestTTL: 150ms}")
    load(ds, waiting=10)
    await started(director)

    async def expired() -> SchedulingError:
        task = asyncio.create_task(director.admit(request(director)))
        await asyncio.sleep(0.02)
        assert not task.done()
        ds.clock.now += 1  # type: ignore[attr-defined]  # past either TTL
        with pytest.raises(SchedulingError) as exc:
            await asyncio.wait_for(task, 2)
        return exc.value

    err = await expired()
    assert (err.status, err.dropped_reason) == (429, hdr.DROPPED_TTL_EXPIRED)
    ds.set_endpoints(())
    err = await expired()
    assert (err.status, err.dropped_reason) == (503, hdr.DROPPED_NO_ENDPOINTS)
    assert director.flow is not None
    assert director.flow.outcomes["EvictedTTL"] == 2
    await director.flow.stop()


async def test_a_request_waiting_for_scale_from_zero_goes_when_an_endpoint_arrives() -> None:
    director, ds = setup("{noEndpointRequestTTL: 5s}")
    endpoints = tuple(e.endpoint for e in ds.all())
    ds.set_endpoints(())
    await started(director)
    task = asyncio.create_task(director.admit(request(director)))
    await asyncio.sleep(0.05)
    assert not task.done()
    ds.set_endpoints(endpoints)
    load(ds, waiting=0)
    assert director.flow is not None
    director.flow.wake()
    await asyncio.wait_for(task, 2)
    await director.flow.stop()


async def test_a_client_leaving_the_queue_leaks_nothing() -> None:
    director, ds = setup()
    load(ds, waiting=10)
    await started(director)
    tasks = [
        asyncio.create_task(director.admit(request(director, tenant=f"t{i}"))) for i in range(5)
    ]
    await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    flow = director.flow
    assert flow is not None
    assert flow.queued == 0
    assert flow.queued_bytes == 0
    assert flow.outcomes["EvictedContextCancelled"] == 5
    assert all(b.requests == 0 and b.bytes == 0 for b in flow.bands.values())
    await flow.stop()


async def test_stale_metrics_never_halt_dispatch() -> None:
    director, ds = setup()
    load(ds, waiting=0, running=4)
    assert director.flow is not None
    director.flow.detector.pool_saturation(ds.all(), ds.clock())  # learns each engine runs 4
    ds.clock.now += 30  # type: ignore[attr-defined]  # every scrape is now 30 s old
    await started(director)
    for _ in range(6):
        await asyncio.wait_for(director.admit(request(director)), 1)
    assert director.flow.outcomes["Dispatched"] == 6
    assert director.flow.detector.stale_count == 2
    await director.flow.stop()


async def test_llm_d_staleness_policy_halts_as_llm_d_does() -> None:
    director, ds = setup(
        "{saturationDetector: {pluginRef: strict}, defaultRequestTTL: 100ms}",
        extra_plugins="- {type: utilization-detector, name: strict, "
        "parameters: {stalenessPolicy: saturated}}",
    )
    load(ds, waiting=0)
    ds.clock.now += 30  # type: ignore[attr-defined]
    await started(director)
    task = asyncio.create_task(director.admit(request(director)))
    await asyncio.sleep(0.05)
    assert not task.done()  # stale metrics read as saturated: nothing is dispatched
    ds.clock.now += 1  # type: ignore[attr-defined]
    with pytest.raises(SchedulingError) as exc:
        await asyncio.wait_for(task, 2)
    assert exc.value.dropped_reason == hdr.DROPPED_TTL_EXPIRED
    assert director.flow is not None
    await director.flow.stop()


async def test_slo_deadline_ordering() -> None:
    director, ds = setup(
        "{priorityBands: [{priority: 0, orderingPolicyRef: slo-deadline-ordering-policy}]}"
    )
    load(ds, waiting=10)
    await started(director)
    order: list[str] = []

    async def one(slo: str) -> None:
        await director.admit(request(director, **({hdr.SLO_TTFT_MS: slo} if slo else {})))
        order.append(slo)

    tasks = [asyncio.create_task(one(s)) for s in ("", "5000", "junk", "100")]
    await asyncio.sleep(0.02)
    load(ds, waiting=0)
    assert director.flow is not None
    director.flow.wake()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[:2] == ["100", "5000"]
    await director.flow.stop()


async def test_without_flow_control_sheddable_requests_are_dropped_when_saturated() -> None:
    director, ds, _ = make_director(2, "plugins: [{type: queue-scorer}]")  # llm-d: gate off
    assert director.flow is None
    director.objectives = OBJECTIVES
    load(ds, waiting=10)
    with pytest.raises(SchedulingError) as exc:
        await director.admit(request(director, "batch"))
    assert (exc.value.status, exc.value.dropped_reason) == (429, hdr.DROPPED_SATURATED)
    await director.admit(request(director, "critical"))  # never rejected without flow control


def test_flow_control_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError) as exc:
        build_core(config("{maxBytes: lots, priorityBands: [{priority: 1, maxRequests: -2}]}"))
    msgs = [str(i) for i in exc.value.issues]
    assert any("flowControl.maxBytes" in m and "not a quantity" in m for m in msgs), msgs
    assert any("flowControl.priorityBands[0].maxRequests" in m for m in msgs), msgs
    with pytest.raises(ConfigError) as exc:
        build_core(
            config(
                "{priorityBands: [{priority: 1, fairnessPolicyRef: nope}],"
                " saturationDetector: {pluginRef: queue-scorer}}"
            )
        )
    msgs = [str(i) for i in exc.value.issues]
    assert any("priorityBands[0].fairnessPolicyRef" in m and "nope" in m for m in msgs), msgs
    assert any("queue-scorer" in m and "SaturationDetector" in m for m in msgs), msgs


def test_llm_d_flow_control_example_loads() -> None:
    core = build_core(
        config(
            """
  maxBytes: "10Gi"
  maxRequests: "10k"
  defaultRequestTTL: 60s
  noEndpointRequestTTL: 10m
  defaultPriorityBand: {maxBytes: 1Gi, fairnessPolicyRef: round-robin-fairness-policy}
  priorityBands: [{priority: 10, maxRequests: "500", fairnessPolicyRef: round-robin-fairness-policy}]
  saturationDetector: {pluginRef: utilization-detector}
  usageLimitPolicyPluginRef: static-usage-limit-policy
""",
        )
    )
    flow = core.director.flow
    assert flow is not None
    assert flow.max_bytes == 10 << 30
    assert flow.max_requests == 10_000
    assert flow.no_endpoint_ttl_s == 600
    assert flow.bands[10].max_requests == 500
    assert not math.isinf(flow.ttl_s)


def test_llmd_default_config_has_flow_control_and_llm_d_configs_do_not() -> None:
    assert build_core(None).director.flow is not None
    assert build_core("plugins: [{type: queue-scorer}]").director.flow is None
    forced = build_core("plugins: [{type: queue-scorer}]\nllmd: {flowControl: true}")
    assert forced.director.flow is not None


async def test_soft_reflective_ceilings_thin_lower_bands_instead_of_cutting_them() -> None:
    """llm-d's soft-reflective-ceiling-policy: band i of N has the ceiling 1 - i*sat/(N-1);
    above it a band goes one decision in round(sat/(1-sat)); at saturation all wait."""
    director, ds = setup(
        "{usageLimitPolicyPluginRef: soft}",
        extra_plugins="- type: soft-reflective-ceiling-policy\n  name: soft",
    )
    assert director.flow is not None
    policy = director.flow.usage
    bands = [10, 0, -5]
    assert policy.ceilings(0.2, bands) == [1.0, 1.0, 1.0]  # 0.2 < 0.9 and < 0.8: all open
    opened = [0, 0, 0]
    for _ in range(300):  # sat 0.75: ceilings 1, 0.625, 0.25; period round(0.75/0.25) = 3
        for i, c in enumerate(policy.ceilings(0.75, bands)):
            opened[i] += c > 0.75
    assert opened == [300, 100, 100]
    assert all(c > 0.5 for c in policy.ceilings(0.5, bands))  # period 1: always open
    assert not any(c > 1.0 for c in policy.ceilings(1.0, bands))  # saturated: everyone waits
    # end to end, three bands at ~94% saturation (kv 0.75 / threshold 0.8): the batch band's
    # ceiling is 0.06, yet its requests trickle through (one decision in 16) instead of
    # waiting for the pool to drain
    load(ds, waiting=0, kv=0.75)
    await started(director)
    try:
        for objective in ("critical", "standard"):
            await asyncio.wait_for(director.admit(request(director, objective)), 2)
        ticks = policy.state()["tick"]
        for _ in range(4):
            await asyncio.wait_for(director.admit(request(director, "batch")), 2)
        assert director.flow.outcomes["Dispatched"] == 6
        assert policy.state()["tick"] - ticks >= 4  # each went on an opening decision
    finally:
        await director.flow.stop()


async def test_in_flight_sheddable_requests_are_revoked_for_a_blocked_higher_band() -> None:
    """enableEviction: a critical request queued behind saturation revokes at most two
    in-flight sheddable requests, the most recently dispatched first, then waits for the
    detector's grace; standard (priority 0) work is never revoked; a revoked request that ends
    confirms its revocation."""
    director, ds = setup("{enableEviction: true}")
    flow = director.flow
    assert flow is not None
    await started(director)
    try:
        inflight: dict[str, asyncio.Future[str]] = {}
        reqs: dict[str, LLMRequest] = {}
        for name, objective in (("b1", "batch"), ("b2", "batch"), ("b3", "batch"), ("s", "")):
            req = request(director, objective)
            await asyncio.wait_for(director.admit(req), 1)
            revoked = director.evictable(req)
            if objective:
                assert revoked is not None
                inflight[name] = revoked
            else:
                assert revoked is None, "only sheddable requests can be revoked"
            reqs[name] = req
            await asyncio.sleep(0.002)  # distinct dispatch times
        load(ds, waiting=10)  # saturated
        critical = asyncio.create_task(director.admit(request(director, "critical")))
        await asyncio.sleep(0.05)
        assert inflight["b3"].done(), "the most recent first"
        assert inflight["b2"].done(), "then the next most recent"
        assert inflight["b3"].result() == hdr.DROPPED_EVICTED
        assert not inflight["b1"].done(), "at most two per decision, then the grace"
        assert flow.state()["eviction"] == {
            "enabled": True,
            "tracked": 3,
            "revocations": 2,
            "pending": 2,
        }
        for name in ("b2", "b3"):
            flow.untrack(reqs[name])  # the revoked requests ended
        assert flow.state()["eviction"]["pending"] == 0
        load(ds, waiting=0)
        flow.wake()
        await asyncio.wait_for(critical, 2)
        flow.untrack(reqs["b1"])
        assert inflight["b1"].cancelled(), "an untracked request can no longer be revoked"
        assert flow.state()["eviction"]["tracked"] == 0
    finally:
        await flow.stop()


async def test_without_enable_eviction_nothing_is_tracked() -> None:
    director, _ = setup()
    await started(director)
    try:
        req = request(director, "batch")
        await director.admit(req)
        assert director.evictable(req) is None
    finally:
        assert director.flow is not None
        await director.flow.stop()


async def test_output_of_a_stream_without_usage_is_credited_from_its_events() -> None:
    """Least-attained-service fairness charges a tenant for its output tokens: from the usage
    chunk, or, when a stream has none, from its data events as the lean path counts them."""
    from llmd.scheduler.flowcontrol import FlowKey

    director, ds = setup()
    await started(director)
    flow = director.flow
    assert flow is not None
    load(ds, waiting=50, kv=0.99)  # saturated: a request of tenant t1 stays queued
    queued = asyncio.ensure_future(director.admit(request(director, tenant="t1")))
    try:
        while flow.queued == 0:
            await asyncio.sleep(0.001)
        done = request(director, tenant="t1")  # an earlier request of t1, finishing now
        done.body = json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode()
        f = flow.bands[done.priority].flows[FlowKey("t1", done.priority)]
        before = f.service
        decision = director.schedule(done)
        decision.first_byte_at = done.received_at + 0.1
        decision.ended_at = done.received_at + 0.5
        director.complete(decision, "natural", None, stream_events=9)
        assert f.service == before + 2 * 9
    finally:
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await flow.stop()
