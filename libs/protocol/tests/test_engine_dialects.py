"""Engine snapshots from SGLang, TensorRT-LLM and Triton metric pages (llm-d's mappings)."""

from __future__ import annotations

import pytest

from llmd.protocol.errors import DecodeError
from llmd.protocol.metrics import (
    ENGINES,
    SGLANG,
    TRITON,
    TRITON_TENSORRT_LLM,
    TRTLLM_SERVE,
    VLLM,
    MetricSpec,
    parse_dialect_snapshot,
)

SGLANG_PAGE = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 3
sglang:num_queue_reqs{model_name="m"} 7
sglang:token_usage{model_name="m"} 0.25
sglang:cache_config_info{model_name="m",page_size="32",num_pages="4096"} 1
sglang:prompt_tokens_total{model_name="m"} 1234
"""
TRTLLM_PAGE = """\
trtllm_num_requests_waiting 2
trtllm_num_requests_running 5
trtllm_kv_cache_utilization 0.5
trtllm_kv_cache_tokens_per_block 64
trtllm_kv_cache_max_blocks 1000
"""
TRITON_TRT_PAGE = """\
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="ensemble",request_type="max",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble"} 0.75
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble"} 128
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble"} 512
"""
TRITON_PAGE = """\
nv_inference_pending_request_count{model="a",version="1"} 1
nv_inference_pending_request_count{model="b",version="1"} 2
nv_inference_exec_count{model="a",version="1"} 9
"""


def test_sglang() -> None:
    s = parse_dialect_snapshot(SGLANG_PAGE, SGLANG)
    assert (s.waiting, s.running, s.kv_cache_usage) == (7, 3, 0.25)
    assert (s.block_size, s.num_gpu_blocks) == (32, 4096)


def test_trtllm_serve() -> None:
    s = parse_dialect_snapshot(TRTLLM_PAGE, TRTLLM_SERVE)
    assert (s.waiting, s.running, s.kv_cache_usage) == (2, 5, 0.5)
    assert (s.block_size, s.num_gpu_blocks) == (64, 1000)


def test_triton_tensorrt_llm_selects_series_by_label() -> None:
    s = parse_dialect_snapshot(TRITON_TRT_PAGE, TRITON_TENSORRT_LLM)
    assert (s.waiting, s.running, s.kv_cache_usage) == (4, 6, 0.75)
    assert (s.block_size, s.num_gpu_blocks) == (128, 512)


def test_triton_sums_models_and_has_no_kv() -> None:
    s = parse_dialect_snapshot(TRITON_PAGE, TRITON)
    assert (s.waiting, s.running, s.kv_cache_usage) == (3, 9, None)


def test_a_page_in_another_engines_names_reads_as_nothing_not_zeros() -> None:
    s = parse_dialect_snapshot(SGLANG_PAGE, VLLM)
    assert (s.waiting, s.running, s.kv_cache_usage) == (None, None, None)


@pytest.mark.parametrize(
    "page",
    [
        "sglang:token_usage 1.5\n",
        "sglang:num_queue_reqs -1\n",
        "sglang:num_queue_reqs +Inf\n",
        'sglang:cache_config_info{page_size="x"} 1\n',
    ],
)
def test_malformed_values_are_errors(page: str) -> None:
    with pytest.raises(DecodeError):
        parse_dialect_snapshot(page, SGLANG)


def test_metric_specs() -> None:
    assert MetricSpec.parse("a_b") == MetricSpec("a_b")
    assert MetricSpec.parse('x{k=v, j="w"}') == MetricSpec("x", (("k", "v"), ("j", "w")))
    for bad in ("", "{k=v}", "x{k}", "x{k=v", "a b"):
        with pytest.raises(ValueError, match="not a"):
            MetricSpec.parse(bad)
    assert set(ENGINES) == {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"}
