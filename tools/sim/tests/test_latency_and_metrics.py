"""Latency profiles and the Prometheus page."""

from __future__ import annotations

import pytest

from llmd.protocol.metrics import parse_engine_snapshot, parse_samples, sample_names
from llmd.sim.config import SimServerConfig
from llmd.sim.latency import PROFILES, LatencyModel, LatencyProfile, StepShape
from llmd.sim.metrics import EngineMetrics, format_value, one_two_five, restrict_page


def test_step_time_is_overhead_plus_the_larger_of_weights_and_compute_plus_kv_reads() -> None:
    p = LatencyProfile(
        step_overhead_s=0.001,
        weights_read_s=0.005,
        prefill_token_s=1e-5,
        decode_token_s=1e-5,
        kv_read_token_s=1e-8,
    )
    model = LatencyModel(p)
    assert model.step_time(StepShape()) == 0.0
    # memory bound: 10 decode tokens of compute (0.1 ms) < weights (5 ms)
    small = StepShape(decode_tokens=10, kv_read_tokens=1000)
    assert model.step_time(small) == pytest.approx(0.001 + 0.005 + 1000 * 1e-8)
    # compute bound: a 2k-token prefill chunk (20 ms) > weights
    big = StepShape(prefill_tokens=2000)
    assert model.step_time(big) == pytest.approx(0.001 + 0.02)


def test_h100_profiles_match_their_published_calibration() -> None:
    m8 = LatencyModel(PROFILES["h100-8b"])
    itl = m8.step_time(StepShape(decode_tokens=1, kv_read_tokens=1000))
    assert 0.005 < itl < 0.008  # ~6.5 ms low-batch ITL
    m32 = LatencyModel(PROFILES["h100-32b-tp2"])
    # one unloaded 8192-token chunk at 15,928 tokens/s, plus fixed costs
    t = m32.step_time(StepShape(prefill_tokens=8192))
    assert 8192 / t == pytest.approx(15928, rel=0.05)
    assert LatencyModel(PROFILES["instant"]).step_time(StepShape(prefill_tokens=5000)) == 0.0


def test_noise_is_seeded_and_bounded() -> None:
    shape = StepShape(decode_tokens=8, kv_read_tokens=8000)
    a = [LatencyModel(PROFILES["h100-8b"], noise=0.2, seed=3).step_time(shape) for _ in range(3)]
    b = [LatencyModel(PROFILES["h100-8b"], noise=0.2, seed=3).step_time(shape) for _ in range(3)]
    assert a == b
    base = LatencyModel(PROFILES["h100-8b"]).step_time(shape)
    noisy = LatencyModel(PROFILES["h100-8b"], noise=0.2, seed=1)
    values = [noisy.step_time(shape) for _ in range(500)]
    assert min(values) >= base * 0.6 - 1e-12
    assert max(values) <= base * 1.6 + 1e-12
    assert len(set(values)) > 100


def test_user_coefficients_override_the_profile() -> None:
    cfg = SimServerConfig(profile="h100-8b", latency={"weights_read_s": 0.02})
    p = cfg.latency_profile()
    assert p.weights_read_s == 0.02
    assert p.prefill_token_s == PROFILES["h100-8b"].prefill_token_s
    assert cfg.num_gpu_blocks() == PROFILES["h100-8b"].default_num_gpu_blocks
    assert SimServerConfig(block_size=32).num_gpu_blocks() == 25700 // 2


def test_values_format_like_prometheus_client() -> None:
    assert format_value(0) == "0.0"
    assert format_value(244) == "244.0"
    assert format_value(1795399239.3507674) == "1.7953992393507674e+09"
    assert format_value(float("inf")) == "+Inf"
    assert one_two_five(4096)[-1] == 2000.0
    assert one_two_five(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def test_rendered_page_parses_into_the_snapshot_llmd_reads() -> None:
    m = EngineMetrics(
        "tiny", max_model_len=4096, cache_config={"block_size": "16", "num_gpu_blocks": "100"}
    )
    m.running, m.waiting, m.kv_usage = 3, 2, 0.25
    m.prefix_queries, m.prefix_hits = 100, 40
    m.observe("vllm:time_to_first_token_seconds", 0.03)
    m.lora_info = (2, "a,b", "")
    text = m.render()
    snap = parse_engine_snapshot(text)
    assert (snap.running, snap.waiting, snap.kv_cache_usage) == (3, 2, 0.25)
    assert (snap.prefix_cache_queries, snap.prefix_cache_hits) == (100, 40)
    assert snap.block_size == 16
    assert snap.num_gpu_blocks == 100
    ttft = {
        s.labels["le"]: s.value
        for s in parse_samples(text, {"vllm:time_to_first_token_seconds_bucket"})
    }
    assert ttft["0.02"] == 0
    assert ttft["0.04"] == 1
    assert ttft["+Inf"] == 1


def test_a_restricted_page_keeps_the_named_samples_and_their_family_headers() -> None:
    m = EngineMetrics("tiny", max_model_len=4096, cache_config={"block_size": "16"})
    m.running, m.waiting = 3, 2
    m.observe("vllm:time_to_first_token_seconds", 0.03)
    wanted = {"vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_count"}
    page = restrict_page(m.render(), wanted)
    assert sample_names(page) == wanted
    assert "# TYPE vllm:num_requests_waiting gauge" in page
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in page
    assert "vllm:num_requests_running" not in page  # no sample kept: no header either
    assert parse_engine_snapshot(page).waiting == 2
    assert restrict_page(m.render(), {"vllm:unknown"}) == ""
    # rendering only the wanted families gives the same page as filtering the whole one
    assert restrict_page(m.render(wanted), wanted) == page
    assert len(m.render(wanted)) < len(m.render()) / 5
