"""The storage tier's measured weight, from the engines' counters."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.discovery import Endpoint
from llmd.scheduler.datalayer import Datastore
from llmd.scheduler.engines import DataLayerSettings
from llmd.scheduler.framework import EndpointState, PluginHandle
from llmd.scheduler.plugins.precise import STORAGE_DOMAIN_LABEL, PreciseProducer
from llmd.scheduler.tiercost import StorageWeightEstimator
from llmd.sim.tokenizer import default_tokenizer_dir


def snap(
    prefill_s: float, computed: float, load_s: float = 0, external: float = 0
) -> EngineSnapshot:
    return EngineSnapshot(
        prefill_seconds=prefill_s,
        computed_tokens=computed,
        kv_load_seconds=load_s,
        external_tokens=external,
    )


def test_the_prior_holds_until_both_costs_have_evidence() -> None:
    est = StorageWeightEstimator(prior=0.8, min_tokens=1000)
    cost = est.observe(0.0, [("a", snap(0, 0), True)])
    assert (cost.weight, cost.source) == (0.8, "prior")
    # prefill evidence only: still the prior
    cost = est.observe(1.0, [("a", snap(1.0, 10_000), True)])
    assert cost.source == "prior"
    assert cost.recompute_s_per_token == pytest.approx(1e-4, rel=0.01)
    assert cost.reload_s_per_token is None


def test_weight_is_one_minus_reload_over_recompute() -> None:
    est = StorageWeightEstimator(min_tokens=1000, half_life_s=1e9)
    est.observe(0.0, [("a", snap(0, 0, 0, 0), True), ("b", snap(0, 0), False)])
    # a: 1 s of prefill for 10k tokens (100 us/token); 0.25 s of loads for 10k tokens (25 us)
    cost = est.observe(
        1.0, [("a", snap(1.0, 10_000, 0.25, 10_000), True), ("b", snap(1.0, 10_000), False)]
    )
    assert cost.source == "measured"
    assert cost.recompute_s_per_token == pytest.approx(1e-4)
    assert cost.reload_s_per_token == pytest.approx(2.5e-5)
    assert cost.weight == pytest.approx(0.75)


def test_a_reload_slower_than_recompute_is_worth_nothing() -> None:
    est = StorageWeightEstimator(min_tokens=10, half_life_s=1e9)
    est.observe(0.0, [("a", snap(0, 0, 0, 0), True)])
    cost = est.observe(1.0, [("a", snap(1.0, 1000, 5.0, 1000), True)])
    assert (cost.weight, cost.source) == (0.0, "measured")


def test_loads_of_pods_without_a_shared_volume_do_not_count() -> None:
    """external_kv_transfer also counts P/D transfers: only storage-domain pods' loads count."""
    est = StorageWeightEstimator(min_tokens=10, half_life_s=1e9)
    est.observe(0.0, [("pd", snap(0, 0, 0, 0), False)])
    cost = est.observe(1.0, [("pd", snap(1.0, 1000, 0.0, 50_000), False)])
    assert cost.reload_s_per_token is None
    assert cost.source == "prior"


def test_a_restarted_engine_skips_one_interval_and_old_evidence_decays() -> None:
    est = StorageWeightEstimator(min_tokens=100, half_life_s=10.0)
    est.observe(0.0, [("a", snap(0, 0, 0, 0), True)])
    est.observe(1.0, [("a", snap(1.0, 1000, 0.1, 1000), True)])
    before = est.cost()
    assert before.weight == pytest.approx(0.9)
    est.observe(2.0, [("a", snap(0.01, 10, 0.0, 0), True)])  # counters fell: restarted
    assert est.resets == 1
    assert est.cost().weight == pytest.approx(0.9), "the restart's interval adds nothing"
    # 100 s later (10 half-lives) the old evidence is below min_tokens: back to the prior
    assert est.observe(102.0, [("a", snap(0.01, 10, 0.0, 0), True)]).source == "prior"


def test_forgotten_endpoints_leave_and_bad_priors_are_refused() -> None:
    est = StorageWeightEstimator()
    est.observe(0.0, [("a", snap(0, 0), True)])
    est.observe(1.0, [])
    assert est.tracked == 0
    with pytest.raises(ValueError, match="prior"):
        StorageWeightEstimator(prior=1.5)


def _producer(backends: list[dict[str, object]] | None = None) -> tuple[Any, list[EndpointState]]:
    indexer: dict[str, object] = {}
    if backends is not None:
        indexer["kvCacheBackendConfigs"] = backends
    params = PreciseProducer.Params.model_validate(
        {"tokenizer": {"modelDir": str(default_tokenizer_dir())}, "indexerConfig": indexer}
    )
    states = [
        EndpointState(Endpoint("a", "10.0.0.1", 8000, labels={STORAGE_DOMAIN_LABEL: "vol"})),
        EndpointState(Endpoint("b", "10.0.0.2", 8000)),
    ]
    return PreciseProducer("precise", params, PluginHandle(endpoints=lambda: states)), states


def test_the_precise_producer_measures_the_storage_weight_and_exports_it() -> None:
    producer, (a, b) = _producer()
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    labels = {"plugin_name": "precise"}

    def gauge(name: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert producer.stack.indexer.weights["storage"] == 0.8, "the prior until measured"
    assert gauge("llmd_precise_prefix_storage_weight_measured") == 0.0
    a.counters, b.counters = snap(0, 0, 0, 0), snap(0, 0, 99, 99)
    producer.refresh_storage_weight(0.0)
    # a: 40 us/token to recompute, 10 us/token to reload; b's loads (no volume) do not count
    a.counters = snap(0.4, 10_000, 0.1, 10_000)
    b.counters = snap(0.4, 10_000, 99 + 50, 99 + 10_000)
    cost = producer.refresh_storage_weight(1.0)
    assert cost.source == "measured"
    assert cost.weight == pytest.approx(0.75, abs=1e-3)
    assert producer.stack.indexer.weights["storage"] == pytest.approx(cost.weight)
    assert gauge("llmd_precise_prefix_storage_weight") == pytest.approx(0.75, abs=1e-3)
    assert gauge("llmd_precise_prefix_storage_weight_measured") == 1.0
    assert gauge("llmd_precise_prefix_storage_reload_seconds_per_token") == pytest.approx(1e-5)
    assert gauge("llmd_precise_prefix_recompute_seconds_per_token") == pytest.approx(4e-5)
    assert producer.state()["storage_tier"]["source"] == "measured"


def test_a_configured_storage_weight_is_kept() -> None:
    producer, _ = _producer([{"name": "gpu", "weight": 1.0}, {"name": "storage", "weight": 0.3}])
    assert producer.storage_configured
    assert producer.stack.indexer.weights["storage"] == 0.3
    assert producer.state()["storage_tier"] == {
        "weight": 0.3,
        "source": "configured",
        "reload_seconds_per_token": None,
        "recompute_seconds_per_token": None,
        "counter_resets": 0,
    }


def one_endpoint(registry: CollectorRegistry, now: list[float]) -> tuple[Datastore, EndpointState]:
    """A datastore on the clock `now[0]` with one endpoint and the default data layer."""
    ds = Datastore(registry, clock=lambda: now[0])
    ds.use_datalayer(DataLayerSettings())
    state = EndpointState(Endpoint("a", "10.0.0.1", 8000))
    ds.endpoints[state.key] = state
    return ds, state


def test_the_scrape_reads_the_counters_about_once_a_second() -> None:
    """Every scrape (50 ms) reads the gauges; the counters only when a second has passed, and
    the endpoint keeps the last snapshot that had them."""
    now = [100.0]
    ds, state = one_endpoint(CollectorRegistry(), now)
    page = "\n".join(
        [
            'vllm:num_requests_waiting{engine="0"} 2',
            'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 640',
            'vllm:request_prefill_time_seconds_sum{engine="0"} 0.5',
        ]
    )
    parse = ds.scraper.parser
    first = parse(state.key, page)
    assert (first.waiting, first.computed_tokens, first.prefill_seconds) == (2, 640.0, 0.5)
    state.note_scrape(now[0], first, now[0])
    now[0] += 0.05
    page = page.replace("} 2", "} 3", 1)  # a new page (an unchanged one is not parsed again)
    second = parse(state.key, page)
    assert second.waiting == 3
    assert second.computed_tokens is None, "not again within the second"
    state.note_scrape(now[0], second, now[0])
    assert state.counters is first
    now[0] += 1.0
    assert parse(state.key, page).computed_tokens == 640.0


def test_an_unchanged_page_is_not_parsed_again() -> None:
    """An idle engine serves the same page scrape after scrape: its snapshot is reused (and
    counted), unless the counters are due and the earlier parse did not read them."""
    now = [100.0]
    registry = CollectorRegistry()
    ds, state = one_endpoint(registry, now)
    page = "\n".join(
        [
            'vllm:num_requests_waiting{engine="0"} 2',
            'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 640',
        ]
    )
    parse = ds.scraper.parser

    def unchanged() -> float:
        return registry.get_sample_value("llmd_scheduler_metrics_pages_unchanged_total") or 0.0

    first = parse(state.key, page)
    assert first.computed_tokens == 640.0
    now[0] += 0.05
    assert parse(state.key, page) is first
    assert unchanged() == 1.0
    # a changed page is parsed (without the counters: not due yet)
    busy = page.replace("} 2", "} 5", 1)
    second = parse(state.key, busy)
    assert (second.waiting, second.computed_tokens) == (5, None)
    assert unchanged() == 1.0
    # the same page again, but the counters are now due and were not read from it: parsed
    now[0] += 1.0
    third = parse(state.key, busy)
    assert third is not second
    assert (third.waiting, third.computed_tokens) == (5, 640.0)
    now[0] += 0.05
    assert parse(state.key, busy) is third
    assert unchanged() == 2.0
