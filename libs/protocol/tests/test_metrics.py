"""Prometheus parsing into engine snapshots, checked against prometheus_client's parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmd.protocol import DecodeError, metrics
from llmd.protocol.metrics import (
    CACHE_CONFIG_INFO,
    KV_CACHE_USAGE_PERC,
    NUM_REQUESTS_RUNNING,
    SNAPSHOT_METRICS,
    parse_engine_snapshot,
    parse_samples,
    sample_names,
)

REAL_PAGE = (Path(__file__).parent / "data" / "vllm-0.32-metrics.txt").read_text()


def test_all_samples_agree_with_prometheus_client() -> None:
    ours = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in parse_samples(REAL_PAGE)}
    theirs = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for fam in text_string_to_metric_families(REAL_PAGE)
        for s in fam.samples
    }
    assert ours == theirs
    assert len(ours) > 300


def test_snapshot_from_a_real_vllm_page() -> None:
    snap = parse_engine_snapshot(REAL_PAGE)
    assert snap.waiting == 0
    assert snap.running == 0
    assert snap.kv_cache_usage == 0.0
    assert snap.prefix_cache_queries == 244.0
    assert snap.prefix_cache_hits == 96.0
    assert snap.prefix_cache_hit_rate == pytest.approx(96 / 244)
    assert snap.block_size == 32
    assert snap.num_gpu_blocks == 16384
    assert snap.cache_config["prefix_caching_hash_algo"] == "sha256"
    assert snap.lora is None
    # the counters the storage tier's weight is measured from
    assert snap.computed_tokens == 148.0
    assert snap.external_tokens == 0.0
    assert snap.prefill_seconds == pytest.approx(0.017128953)
    assert snap.kv_load_seconds is None, "no offloading connector on this server"
    gauges_only = parse_engine_snapshot(REAL_PAGE, counters=False)
    assert gauges_only.prefix_cache_hits == 96.0
    assert (gauges_only.computed_tokens, gauges_only.prefill_seconds) == (None, None)


def test_offload_load_time_is_summed_over_engines_and_refused_when_negative() -> None:
    page = "\n".join(
        [
            'vllm:kv_offload_load_time_total{engine="0",model_name="m"} 1.5',
            'vllm:kv_offload_load_time_total{engine="1",model_name="m"} 0.5',
            'vllm:prompt_tokens_by_source_total{engine="0",source="external_kv_transfer"} 64',
            'vllm:prompt_tokens_by_source_total{engine="1",source="external_kv_transfer"} 32',
        ]
    )
    snap = parse_engine_snapshot(page)
    assert (snap.kv_load_seconds, snap.external_tokens) == (2.0, 96.0)
    with pytest.raises(DecodeError, match="not a count"):
        parse_engine_snapshot('vllm:kv_offload_load_time_total{engine="0"} -1')


def test_data_parallel_engines_are_summed_and_lora_takes_the_newest_series() -> None:
    page = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 3',
            'vllm:num_requests_running{engine="1",model_name="m"} 4.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5',
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",'
            'waiting_lora_adapters=""} 100',
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="c",'
            'waiting_lora_adapters="d"} 200',
        ]
    )
    snap = parse_engine_snapshot(page)
    assert (snap.running, snap.waiting, snap.kv_cache_usage) == (7, 2, 0.5)
    assert snap.lora is not None
    assert (snap.lora.max_lora, snap.lora.running, snap.lora.waiting) == (4, ("c",), ("d",))
    assert snap.block_size is None


def test_escaped_label_values_timestamps_and_special_values() -> None:
    page = 'x{a="q\\"u\\\\o\\nte",b="2"} +Inf 1700000000\ny NaN\nz{} -1.5e3\n'
    samples = list(parse_samples(page))
    assert samples[0].labels == {"a": 'q"u\\o\nte', "b": "2"}
    assert samples[0].value == float("inf")
    assert samples[1].value != samples[1].value
    assert samples[2].value == -1500.0


def test_label_sets_seen_before_parse_the_same_and_stay_independent() -> None:
    """Wanted lines remember their label sets (a scraper sees the same ones every scrape):
    the second parse gives equal labels, as a fresh dict, including braces and escapes inside
    values; malformed lines still raise after a good line with the same labels."""
    page = (
        f'{NUM_REQUESTS_RUNNING}{{engine="0",path="/a}}b",q="x\\"y"}} 3\n'
        f'{CACHE_CONFIG_INFO}{{block_size="16",num_gpu_blocks="100"}} 1\n'
    )
    first = list(parse_samples(page, SNAPSHOT_METRICS))
    first[0].labels["engine"] = "mutated by a caller"
    again = list(parse_samples(page.replace("} 3", "} 4"), SNAPSHOT_METRICS))
    by_name = {s.name: s for s in again}
    assert by_name[NUM_REQUESTS_RUNNING].labels == {"engine": "0", "path": "/a}b", "q": 'x"y'}
    assert by_name[NUM_REQUESTS_RUNNING].value == 4.0
    assert by_name[CACHE_CONFIG_INFO].labels == {"block_size": "16", "num_gpu_blocks": "100"}
    assert by_name[NUM_REQUESTS_RUNNING].labels is not first[0].labels
    with pytest.raises(DecodeError):
        list(parse_samples(f'{NUM_REQUESTS_RUNNING}{{engine="0",path="/a}}b",q="x\\"y"}}\n',
                           SNAPSHOT_METRICS))  # fmt: skip


def test_the_label_cache_is_bounded() -> None:
    lines = [
        f'{NUM_REQUESTS_RUNNING}{{engine="{i}"}} 1' for i in range(metrics.LABEL_CACHE_SIZE + 5)
    ]
    lines.append(
        f'{NUM_REQUESTS_RUNNING}{{engine="{"x" * (metrics.LABEL_CACHE_MAX_CHARS + 1)}"}} 1'
    )
    samples = list(parse_samples("\n".join(lines), SNAPSHOT_METRICS))
    assert len(samples) == len(lines)
    assert 0 < len(metrics._label_cache) <= metrics.LABEL_CACHE_SIZE
    assert all(len(key) <= metrics.LABEL_CACHE_MAX_CHARS for key in metrics._label_cache)
    assert samples[-1].labels["engine"] == "x" * (metrics.LABEL_CACHE_MAX_CHARS + 1)


def test_filtering_skips_unwanted_lines_even_when_malformed() -> None:
    page = "garbage{{{ line\n" + f'{NUM_REQUESTS_RUNNING}{{engine="0"}} 1\n'
    assert [s.value for s in parse_samples(page, SNAPSHOT_METRICS)] == [1.0]


@pytest.mark.parametrize(
    "line",
    [
        f'{KV_CACHE_USAGE_PERC}{{engine="0"',
        f"{KV_CACHE_USAGE_PERC}{{engine=0}} 1",
        KV_CACHE_USAGE_PERC + '{engine="0} 1',
        f"{KV_CACHE_USAGE_PERC} abc",
        f"{KV_CACHE_USAGE_PERC}{{}}",
        f'{CACHE_CONFIG_INFO}{{block_size="x"}} 1',
    ],
)
def test_malformed_lines_raise_decode_error(line: str) -> None:
    with pytest.raises(DecodeError):
        parse_engine_snapshot(line)


def test_sample_names_are_every_sample_lines_metric_name() -> None:
    assert sample_names(REAL_PAGE) == {s.name for s in parse_samples(REAL_PAGE)}
    assert sample_names('# HELP a x\na 1\nb{l="v"} 2\n\nc\t3\n') == {"a", "b", "c"}


def test_dialect_sample_names_are_what_the_snapshot_reads() -> None:
    names = metrics.dialect_sample_names(metrics.VLLM)
    assert names >= SNAPSHOT_METRICS
    assert names >= metrics.SNAPSHOT_COUNTERS
    kept = "".join(
        line + "\n"
        for line in REAL_PAGE.splitlines()
        if line and line[0] != "#" and line.split("{")[0].split(" ")[0] in names
    )
    assert parse_engine_snapshot(kept) == parse_engine_snapshot(REAL_PAGE)
    assert metrics.dialect_sample_names(metrics.SGLANG) == {
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "sglang:cache_config_info",
    }
