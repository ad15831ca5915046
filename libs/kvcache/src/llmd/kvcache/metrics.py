"""Prometheus metrics of the KV index.

Two sets: llm-d-router's families (`llm_d_epp_kv_cache_index_*`, `llm_d_epp_kv_cache_events_*`,
with its names, types and labels, so llm-d's KV-cache index dashboard and alerts work
unchanged), and llmd's own `kvcache_*` families for what llm-d does not measure (sequence
anomalies, replays, index health, predictions).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class KVCacheMetrics:
    """One set per process (pass the registry that the service exposes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        pre = "llm_d_epp_kv_cache_"
        self.admissions = Counter(
            f"{pre}index_admissions", "KV blocks written to the index", registry=r
        )
        self.evictions = Counter(
            f"{pre}index_evictions", "KV blocks removed from the index", registry=r
        )
        self.lookup_requests = Counter(
            f"{pre}index_lookup_requests", "Index lookups (one per scored request)", registry=r
        )
        self.lookup_hits = Counter(
            f"{pre}index_lookup_hits",
            "Prefix blocks matched per lookup on the best pod, summed",
            registry=r,
        )
        self.lookup_latency = Histogram(
            f"{pre}index_lookup_latency_seconds", "Index lookup latency", registry=r
        )
        self.active_subscribers = Gauge(
            f"{pre}events_active_subscribers",
            "KV-event subscriptions held, one per engine (retrying ones included)",
            registry=r,
        )
        self.messages_received = Counter(
            f"{pre}events_messages_received",
            "KV-event messages received per engine",
            ["pod_identifier"],
            registry=r,
        )
        self.reconnections = Counter(
            f"{pre}events_subscriber_reconnections",
            "Subscriber reconnections per engine",
            ["pod_identifier"],
            registry=r,
        )
        self.zmq_errors = Counter(
            f"{pre}events_zmq_errors",
            "ZMQ errors per engine and operation (connect, recv, replay)",
            ["pod_identifier", "operation"],
            registry=r,
        )
        self.pool_queue_depth = Gauge(
            f"{pre}events_pool_queue_depth",
            "Event batches queued across the worker shards",
            registry=r,
        )
        self.pool_capacity = Gauge(f"{pre}events_pool_capacity", "Event worker shards", registry=r)
        self.dedup_suppressed = Counter(
            f"{pre}events_dedup_removed_hashes_suppressed",
            "Block removals absorbed because another store still holds the block",
            registry=r,
        )
        self.dedup_forwarded = Counter(
            f"{pre}events_dedup_removed_hashes_forwarded",
            "Block removals forwarded to the index as evictions",
            registry=r,
        )
        self.stores_skipped_by_kind = Counter(
            f"{pre}events_stores_skipped",
            "BlockStored events not indexed, by cache kind and reason",
            ["cache_kind", "reason"],
            registry=r,
        )
        self.removals_skipped = Counter(
            f"{pre}events_removals_skipped",
            "BlockRemoved events not applied, by cache kind and reason",
            ["cache_kind", "reason"],
            registry=r,
        )
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
