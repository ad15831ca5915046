"""Prometheus metrics of the KV index (names follow llm-d's `kvcache_*` where it has them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class KVCacheMetrics:
    """One set per process (pass the registry that the service exposes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.events = Counter(
            "kvcache_events_total", "KV events applied, by type", ["type"], registry=r
        )
        self.blocks = Counter(
            "kvcache_event_blocks_total",
            "Blocks in applied events: stored, removed, duplicate-remove (held by another store)",
            ["kind"],
            registry=r,
        )
        self.batches = Counter(
            "kvcache_event_batches_total", "Event batches queued for the index", registry=r
        )
        self.stores_skipped = Counter(
            "kvcache_events_stores_skipped_total",
            "BlockStored events not indexed, by reason",
            ["reason"],
            registry=r,
        )
        self.decode_errors = Counter(
            "kvcache_events_decode_errors_total",
            "Messages that were not valid KV-event frames or batches",
            ["what"],
            registry=r,
        )
        self.apply_errors = Counter(
            "kvcache_events_apply_errors_total",
            "Batches lost because the index backend failed",
            registry=r,
        )
        self.sequence = Counter(
            "kvcache_events_sequence_total",
            "Sequence anomalies per stream: gap, duplicate, restart",
            ["anomaly"],
            registry=r,
        )
        self.replays = Counter(
            "kvcache_events_replays_total", "Replay requests, by outcome", ["outcome"], registry=r
        )
        self.pod_clears = Counter(
            "kvcache_index_pod_clears_total",
            "Times a pod's entries were dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "kvcache_events_subscriptions", "Engines subscribed to", registry=r
        )
        self.queue_capacity = Gauge(
            "kvcache_events_queue_capacity", "Capacity of each shard queue", ["shard"], registry=r
        )
        self.lookup_seconds = Histogram(
            "kvcache_index_lookup_duration_seconds",
            "Longest-prefix lookups",
            ["backend"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=r,
        )
        self.prediction_error = Gauge(
            "kvcache_index_prediction_error_blocks",
            "|predicted - engine-reported cached blocks| of the last response, per pod",
            ["pod"],
            registry=r,
        )
        self.predictions = Counter(
            "kvcache_index_predictions_total",
            "Responses compared with the index prediction, by outcome (exact, over, under)",
            ["pod", "outcome"],
            registry=r,
        )
        self.untrusted = Gauge(
            "kvcache_index_pod_untrusted",
            "1 while a pod's index entries are down-weighted (predictions kept missing)",
            ["pod"],
            registry=r,
        )
        self.resyncs = Counter(
            "kvcache_index_resyncs_total",
            "Resyncs triggered by bad predictions, per pod",
            ["pod"],
            registry=r,
        )
