from __future__ import annotations

import pytest

from llmd.autoscaler.decide import (
    ReplicaLoad,
    SaturationSettings,
    Stabilizer,
    Trend,
    VariantState,
    allocate,
    analyze,
)
from llmd.autoscaler.variants import Variant

S = SaturationSettings()


def variant(name: str = "v", cost: float = 10.0, lo: int = 1, hi: int = 10) -> Variant:
    return Variant(name, "llm", "m", name, cost, lo, hi)


def state(*loads: tuple[float, int], desired: int | None = None, v: Variant | None = None,
          ready: int | None = None) -> VariantState:  # fmt: skip
    reps = tuple(ReplicaLoad(f"r{i}", kv, w, 1) for i, (kv, w) in enumerate(loads))
    n = len(reps) if desired is None else desired
    return VariantState(v or variant(), n, len(reps) if ready is None else ready, reps)


def test_within_thresholds_holds() -> None:
    a = analyze([state((0.5, 0), (0.4, 1))], S)
    assert a.replicas == 2
    assert a.reason == "within thresholds"
    assert a.saturated == 0
    assert a.spare_kv == pytest.approx(0.35)
    assert a.spare_queue == pytest.approx(4.5)


def test_low_spare_kv_scales_up_by_what_the_load_needs() -> None:
    # 2 replicas at 0.75 KV: spare 0.05 < 0.1; 1.5 of KV needs ceil(1.5 / 0.7) = 3 replicas
    a = analyze([state((0.75, 0), (0.75, 0))], S)
    assert a.replicas == 3
    assert "spare KV 0.05 < kvSpareTrigger 0.1" in a.reason
    # far over: 4 replicas at 0.79 KV and 4 waiting each -> queue needs ceil(16 / 2) = 8
    a = analyze([state(*[(0.79, 4)] * 4)], S)
    assert a.replicas == 8
    assert "spare queue 1.0 < queueSpareTrigger 3" in a.reason


def test_every_replica_saturated_scales_up() -> None:
    a = analyze([state((0.9, 0), (0.2, 7))], S)
    assert a.saturated == 2
    assert "every replica saturated" in a.reason
    assert a.replicas >= 3


def test_gateway_queue_is_demand() -> None:
    a = analyze([state((0.1, 0))], S, queued=5)
    assert a.replicas == 3  # ceil(5 / 2)
    assert "5 request(s) held at the gateway or activator" in a.reason


def test_scale_down_only_while_the_rest_keep_their_spare() -> None:
    a = analyze([state((0.2, 0), (0.2, 0), (0.1, 0), (0.0, 0))], S)
    assert a.replicas == 1  # 0.5 of KV fits one replica under 0.7
    a = analyze([state((0.6, 0), (0.5, 0))], S)
    assert a.replicas == 2  # 1.1 would put one replica over 0.7
    a = analyze([state((0.85, 0), (0.0, 0), (0.0, 0))], S)
    assert a.replicas == 3  # one saturated: never remove


def test_starting_replicas_hold_a_scale_down() -> None:
    a = analyze([state((0.0, 0), desired=3, ready=1)], S)
    assert a.replicas == 3
    assert "starting" in a.reason


def test_zero_and_idle() -> None:
    assert analyze([state(desired=0)], S).replicas == 0
    a = analyze([state(desired=0)], S, queued=1)
    assert (a.replicas, a.reason) == (1, "scale from zero: 1 request(s) waiting")
    a = analyze([state((0.0, 0))], S, idle_for_s=31, retention_s=30)
    assert a.replicas == 0
    assert "idle for 31s" in a.reason
    assert analyze([state((0.0, 0))], S, idle_for_s=31, retention_s=None).replicas == 1
    assert analyze([state((0.0, 0))], S, queued=1, idle_for_s=31, retention_s=30).replicas >= 1


def test_missing_metrics_hold() -> None:
    blind = VariantState(variant(), 2, 2, (ReplicaLoad("r0", None, None, None),))
    a = analyze([blind], S)
    assert (a.replicas, a.reason) == (2, "no engine metrics yet: hold")
    assert analyze([blind], S, queued=3).replicas == 3


def test_allocation_adds_cheapest_first_and_removes_most_expensive_first() -> None:
    h100, l40s = variant("h100", 10, lo=1, hi=4), variant("l40s", 5, lo=0, hi=2)
    states = [VariantState(h100, 1, 1), VariantState(l40s, 0, 0)]
    assert allocate(states, 2) == {"llm/h100": 1, "llm/l40s": 1}
    assert allocate(states, 3) == {"llm/h100": 1, "llm/l40s": 2}
    assert allocate(states, 5) == {"llm/h100": 3, "llm/l40s": 2}
    assert allocate(states, 99) == {"llm/h100": 4, "llm/l40s": 2}
    big = [VariantState(h100, 3, 3), VariantState(l40s, 2, 2)]
    assert allocate(big, 4) == {"llm/h100": 2, "llm/l40s": 2}
    assert allocate(big, 1) == {"llm/h100": 1, "llm/l40s": 0}
    zero = [VariantState(variant("a", lo=0), 2, 2), VariantState(variant("b", lo=0), 1, 1)]
    assert allocate(zero, 0) == {"llm/a": 0, "llm/b": 0}


def test_allocation_prices_capacity_when_engines_report_it() -> None:
    # a is cheaper per replica but holds a quarter of b's KV: b is cheaper capacity
    a = VariantState(variant("a", 4, lo=0), 0, 0, capacity_tokens=100_000)
    b = VariantState(variant("b", 10, lo=0), 0, 0, capacity_tokens=400_000)
    assert allocate([a, b], 1) == {"llm/a": 0, "llm/b": 1}


def test_stabilizer_windows_and_steps() -> None:
    st = Stabilizer(up_window_s=0, down_window_s=10, max_up=2, max_down=1)
    assert st.apply(0, 1, 6) == 3  # up at once, 2 at a time
    assert st.apply(1, 3, 2) == 3  # down: 6 was recommended within 10 s
    assert st.apply(11.5, 3, 2) == 2  # the window has passed
    assert st.apply(12, 2, 1) == 2  # 2 still within the window
    assert st.apply(30, 2, 0) == 0  # scale-to-zero is not step-limited
    assert st.apply(31, 0, 5) == 5  # nor is scale-from-zero
    up = Stabilizer(up_window_s=5, down_window_s=0)
    assert up.apply(0, 1, 1) == 1
    assert up.apply(1, 1, 3) == 1  # a 1 within 5 s: no scale-up on a blip
    assert up.apply(6, 1, 3) == 3


def test_full_batches_are_load_once_the_limit_is_known() -> None:
    v = variant()
    busy = tuple(ReplicaLoad(f"r{i}", 0.02, 0, 4) for i in range(4))
    # limit unknown: tiny KV and empty queues read as one replica's worth
    assert analyze([VariantState(v, 4, 4, busy)], S).replicas == 1
    # limit 4 known: 16 running at 75% of 4 per replica need ceil(16 / 3) = 6
    a = analyze([VariantState(v, 4, 4, busy, batch_limit=4)], S)
    assert a.replicas == 6
    assert "running batches need 5.3 replica(s) at 75% of their limit 4" in a.reason
    assert a.load == pytest.approx(16 / 3)
    half = tuple(ReplicaLoad(f"r{i}", 0.02, 0, 1) for i in range(4))
    assert analyze([VariantState(v, 4, 4, half, batch_limit=4)], S).replicas == 2


def test_prefill_is_load_once_a_replica_s_capacity_is_known() -> None:
    v = variant()
    # 2 replicas computing 30k prompt tokens/s each; KV, queues and batches look calm, so
    # without a capacity the pool would be cut to one replica
    calm = tuple(ReplicaLoad(f"r{i}", 0.1, 0, 1, prefill_tps=30_000.0) for i in range(2))
    assert analyze([VariantState(v, 2, 2, calm)], S).replicas == 1
    # one replica computes 40k tokens/s: 60k at 70% of 40k needs ceil(2.14) = 3
    a = analyze([VariantState(v, 2, 2, calm, prefill_capacity_tps=40_000.0)], S)
    assert a.replicas == 3
    assert "prefill 60000 tok/s needs 2.1 replica(s) at 70% of 40000 tok/s each" in a.reason
    assert a.prefill_tps == 60_000
    assert a.as_dict()["prefill_tps"] == 60_000
    # the same load does not let 3 replicas shrink to 1 either
    three = (*calm, ReplicaLoad("r2", 0.1, 0, 1, prefill_tps=0.0))
    assert analyze([VariantState(v, 3, 3, three, prefill_capacity_tps=40_000.0)], S).replicas == 3
    # a replica whose rate is not known yet stands for the mean of the others
    half = (calm[0], ReplicaLoad("r1", 0.1, 0, 1))
    b = analyze([VariantState(v, 2, 2, half, prefill_capacity_tps=40_000.0)], S)
    assert b.prefill_tps == 60_000


def test_trend_projects_a_rising_load_only() -> None:
    t = Trend(window_s=30)
    for i in range(7):
        t.add(i * 5.0, 1.0 + 0.1 * i)  # +0.02 replicas/s
    assert t.slope() == pytest.approx(0.02)
    assert t.ahead(30) == pytest.approx(1.6 + 0.6)
    falling = Trend(window_s=30)
    for i in range(5):
        falling.add(i * 5.0, 3.0 - 0.5 * i)
    assert falling.ahead(30) == pytest.approx(1.0)  # never below what is measured now
    few = Trend()
    few.add(0, 1)
    few.add(1, 5)
    assert few.slope() == 0.0  # two points are not a trend
    old = Trend(window_s=10)
    for i in range(20):
        old.add(float(i), 0.0 if i < 15 else float(i))
    assert len(old.points) == 11


def test_autoscaler_scales_ahead_of_a_rising_load_and_learns_start_times() -> None:
    from llmd.autoscaler.controller import Autoscaler
    from llmd.autoscaler.decide import Analysis
    from llmd.runtime.cluster import HttpCluster

    v = variant()
    scaler = Autoscaler([v], HttpCluster("http://127.0.0.1:9"), startup_estimate_s=20)
    states = [VariantState(v, 2, 2)]
    out = None
    for i, load in enumerate([1.0, 1.2, 1.4, 1.6]):
        a = Analysis(2, "within thresholds", observed=2, load=load)
        out = scaler._ahead("m", states, a, i * 5.0)
    assert out is not None
    # +0.04 replicas/s: 1.6 + 0.8 = 2.4 expected when a replica asked for now is ready
    assert out.replicas == 3
    assert out.reason == (
        "scale up: load rising 0.040 replicas/s: 2.4 expected in 20s (engine start)"
    )
    # while replicas start, or with prediction off, the measured load decides
    starting = [VariantState(v, 3, 2)]
    a = Analysis(3, "1 replica(s) starting: hold", observed=2, load=1.8)
    assert scaler._ahead("m", starting, a, 20.0).replicas == 3
    scaler.predictive = False
    assert scaler._ahead("m", states, Analysis(2, "x", observed=2, load=2.0), 25.0).replicas == 2
    # a scale-up asked at t=0 for 3 replicas, ready at t=24: the estimate moves halfway
    scaler._pending[v.key] = (0.0, 3)
    scaler._learn_startup([VariantState(v, 3, 3)], 24.0)
    assert scaler.startup_s == pytest.approx(22.0)
    assert v.key not in scaler._pending
