"""The example plugin, installed as a package, found through its entry point and used by the
real scheduler core: it routes by zone and adds its header to the forwarded request."""

from __future__ import annotations

import json
import subprocess
import sys

from llmd.protocol.metrics import EngineSnapshot
from llmd.runtime.discovery import Endpoint
from llmd.scheduler.core import build_core
from llmd.scheduler.plugins import plugin_registry
from llmd_example_plugin import PICKED_ZONE_HEADER, ZoneAffinityScorer

CONFIG = """
plugins:
- type: zone-affinity-scorer
  parameters: {headerName: x-preferred-zone, zoneLabel: zone}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: zone-affinity-scorer, weight: 5}, {pluginRef: queue-scorer}]
"""


def test_the_entry_point_registers_the_plugin() -> None:
    cls, _ = plugin_registry().resolve("zone-affinity-scorer")
    assert cls is ZoneAffinityScorer
    listed = subprocess.run(
        [sys.executable, "-m", "llmd.scheduler.cli", "--list-plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "zone-affinity-scorer" in listed


def test_requests_go_to_their_zone_and_carry_the_picked_zone() -> None:
    core = build_core(CONFIG)
    zones = ["a", "b", "b", "c"]
    core.datastore.set_endpoints(
        tuple(
            Endpoint(f"pod-{i}", "127.0.0.1", 9000 + i, labels={"zone": z})
            for i, z in enumerate(zones)
        )
    )
    now = core.datastore.clock()
    for e in core.datastore.all():
        e.note_scrape(now - 0.01, EngineSnapshot(waiting=0, running=0, kv_cache_usage=0.0), now)
    picked = []
    for _ in range(4):
        req = core.director.new_request({"x-preferred-zone": "b"}, "/v1/completions")
        req.body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 1}).encode()
        decision = core.director.schedule(req)
        picked.append(decision.endpoints[0].name)
        assert decision.set_headers[PICKED_ZONE_HEADER] == "b"
    assert set(picked) <= {"pod-1", "pod-2"}
    matched = core.registry.get_sample_value(
        "llmd_example_zone_affinity_picks_total",
        {"plugin_name": "zone-affinity-scorer", "matched": "true"},
    )
    assert matched == 4
