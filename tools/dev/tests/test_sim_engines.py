"""SimFleetProcess: a simulated fleet's HTTP, KV-event, replay and side-channel ports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmd.dev.sim_engines import SimFleetProcess

pytestmark = pytest.mark.integration


def test_a_fleets_four_port_kinds_never_overlap(tmp_path: Path) -> None:
    """The four kinds come from one probed run; four separate probes once handed out runs
    that overlapped (an HTTP port reused for KV events) and the simulator could not bind."""
    fleet = SimFleetProcess.start(count=3, block_size=16, profile="instant", work=tmp_path)
    try:
        doc = yaml.safe_load(fleet.endpoints_file.read_text())
        http = {int(e["port"]) for e in doc["endpoints"]}
        events = {
            int(e["labels"]["llmd.ai/kv-events-endpoint"].rsplit(":", 1)[1])
            for e in doc["endpoints"]
        }
        replay = {
            int(e["labels"]["llmd.ai/kv-replay-endpoint"].rsplit(":", 1)[1])
            for e in doc["endpoints"]
        }
        assert len(http) == len(events) == len(replay) == 3
        assert len(http | events | replay) == 9
    finally:
        fleet.stop()
