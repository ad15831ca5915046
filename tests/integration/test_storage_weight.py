"""The storage tier's weight measured end to end: llmd-scheduler (precise producer) scraping two
llmd-sim engines that mount one simulated volume. Engine B reloads what engine A computed; the
scheduler's weight must equal 1 - reload / recompute seconds per token from the engines' own
counters, and be exported."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from llmd.dev.gateway import SchedulerProcess
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.sim.tokenizer import default_tokenizer_dir

pytestmark = pytest.mark.integration

PLUGIN = "precise-prefix-cache-producer"
CONFIG = f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: {PLUGIN}
  parameters:
    tokenizer: {{modelDir: "{default_tokenizer_dir()}"}}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 1}}]
"""


@dataclass
class Setup:
    fleet: SimFleetProcess
    scheduler: SchedulerProcess


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("storage-weight")
    # 2 GB/s per engine: reloading 131 kB per token costs about 66 us, against h100-8b's
    # prefill of about 36 us per token plus its fixed costs: a measurable, partial worth.
    fleet = SimFleetProcess.start(
        count=2,
        block_size=16,
        profile="h100-8b",
        work=work,
        extra_args=["--storage-domain", "vol", "--storage-read-gbps", "2"],
    )
    config = work / "epp.yaml"
    config.write_text(CONFIG)
    (work / "s").mkdir()
    try:
        scheduler = SchedulerProcess.start(fleet.endpoints_file, work / "s", config_file=config)
    except Exception:
        fleet.stop()
        raise
    try:
        yield Setup(fleet, scheduler)
    finally:
        scheduler.stop()
        fleet.stop()


def weight_sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{plugin_name="{PLUGIN}"}}'):
            return float(line.split()[-1])
    return None


def test_the_storage_weight_follows_the_engines_reload_and_recompute_costs(setup: Setup) -> None:
    a, b = setup.fleet.engines
    text = setup.scheduler.metrics_text()
    assert weight_sample(text, "llmd_precise_prefix_storage_weight") == 0.8, "the prior"
    assert weight_sample(text, "llmd_precise_prefix_storage_weight_measured") == 0.0
    with httpx.Client(timeout=30) as client:
        for i in range(12):
            prompt = f"doc{i} " + " ".join(f"w{i}x{j}" for j in range(400))
            for engine in (a, b):  # A computes and stores; B loads from the volume
                time.sleep(0.1)  # A's files are found once written (about 10 ms at 10 GB/s)
                r = client.post(
                    engine.url + "/v1/completions",
                    json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
                )
                assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        snaps = [parse_engine_snapshot(client.get(e.url + "/metrics").text) for e in (a, b)]
    recompute = sum(s.prefill_seconds or 0 for s in snaps) / sum(
        s.computed_tokens or 0 for s in snaps
    )
    reload = sum(s.kv_load_seconds or 0 for s in snaps) / sum(s.external_tokens or 0 for s in snaps)
    expected = max(0.0, min(1.0, 1 - reload / recompute))
    deadline = time.monotonic() + 15
    measured = None
    while time.monotonic() < deadline:
        text = setup.scheduler.metrics_text()
        if weight_sample(text, "llmd_precise_prefix_storage_weight_measured") == 1.0:
            measured = weight_sample(text, "llmd_precise_prefix_storage_weight")
            break
        time.sleep(0.5)
    assert measured is not None, "the weight was never measured"
    # the scheduler's sums decay (half-life 2 min) and start at its first scrape: close, not equal
    assert measured == pytest.approx(expected, abs=0.05)
    assert 0.0 < measured < 1.0, f"expected a partial worth at 2 GB/s, got {measured}"
    state = setup.scheduler.get_json("/debug/plugins/state")
    tier = state["plugins"][PLUGIN]["storage_tier"]
    assert tier["source"] == "measured"
    assert tier["reload_seconds_per_token"] == pytest.approx(reload, rel=0.1)
    assert tier["recompute_seconds_per_token"] == pytest.approx(recompute, rel=0.1)
