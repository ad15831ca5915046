"""The scheduler-capacity benchmark's own pieces: its check requests and its reading of /metrics."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scheduler_capacity import check_request, gauge_total

from llmd.protocol import headers as hdr


def test_a_check_request_is_framed_as_envoy_sends_it() -> None:
    raw = check_request(b'{"model": "tiny"}', 7)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"POST {hdr.EXTAUTHZ_CHECK_PREFIX}/v1/chat/completions HTTP/1.1"
    assert "content-length: 17" in lines
    assert "x-request-id: capacity-7" in lines
    assert body == b'{"model": "tiny"}'


def test_gauges_are_summed_over_their_label_sets() -> None:
    page = "\n".join(
        [
            "# TYPE llm_d_epp_inflight_requests gauge",
            'llm_d_epp_inflight_requests{endpoint="a"} 2.0',
            'llm_d_epp_inflight_requests{endpoint="b"} 1.0',
            "llm_d_epp_inflight_requests_other 9.0",
            "llm_d_epp_request_running 0.0",
        ]
    )
    assert gauge_total(page, "llm_d_epp_inflight_requests") == 3.0
    assert gauge_total(page, "llm_d_epp_request_running") == 0.0
    assert gauge_total(page, "absent") == 0.0
