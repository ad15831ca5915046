"""Real processes on loopback: llmd-sim fleets, llmd-scheduler and Envoy (the gateway path)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from llmd.dev.gateway import Gateway
from llmd.dev.sim_engines import SimFleetProcess

# A test copy of the default config with a low overload threshold (sims with 4 sequences
# saturate fast), LoRA affinity, and a 1 MiB body limit.
TEST_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: utilization-filter
  name: overload-filter
  parameters:
    conditions: [{metric: waiting-queue, maxValue: 2}]
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: overload-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: lora-affinity-scorer, weight: 10}
llmd:
  maxRequestBodyBytes: 1048576
"""


@dataclass
class Stack:
    fleet: SimFleetProcess
    gateway: Gateway

    @property
    def url(self) -> str:
        return self.gateway.url

    def engine_url(self, pod: str) -> str:
        return next(e.url for e in self.fleet.engines if e.pod == pod)

    def stop(self) -> None:
        self.gateway.stop()
        self.fleet.stop()


def start_stack(
    work: Path,
    *,
    count: int = 4,
    sim_args: Sequence[str] = (),
    config: str | None = TEST_CONFIG,
    fail_open: bool = False,
    envoy: dict[str, Any] | None = None,
    scheduler_api: Literal["ext_proc", "ext_authz"] = "ext_proc",
) -> Stack:
    fleet = SimFleetProcess.start(
        count=count, block_size=16, profile="h100-8b", work=work, extra_args=sim_args
    )
    config_file = None
    if config is not None:
        config_file = work / "epp.yaml"
        config_file.write_text(config)
    try:
        gateway = Gateway.start(
            fleet.endpoints_file,
            work / "gateway",
            config_file=config_file,
            fail_open=fail_open,
            envoy_overrides=envoy,
            scheduler_api=scheduler_api,
        )
    except Exception:
        fleet.stop()
        raise
    return Stack(fleet, gateway)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("stack"),
        sim_args=[
            "--max-num-seqs",
            "4",
            "--enable-lora",
            "--max-loras",
            "2",
            "--allow-runtime-lora-updating",
        ],
    )
    yield s
    s.stop()
