"""Simulated servers started in the test's event loop on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from llmd.sim.config import SimServerConfig
from llmd.sim.fleet import SimFleet, fleet_configs
from llmd.vllm_cpu.server import free_port

StartFleet = Callable[..., Coroutine[Any, Any, SimFleet]]


def events_config() -> dict[str, Any]:
    return {
        "enable_kv_cache_events": True,
        "endpoint": f"tcp://*:{free_port()}",
        "replay_endpoint": f"tcp://*:{free_port()}",
    }


@pytest.fixture
async def start_fleet() -> AsyncIterator[StartFleet]:
    """start_fleet(count=1, **SimServerConfig fields) -> a started SimFleet (stopped after)."""
    fleets: list[SimFleet] = []

    async def start(count: int = 1, **fields: Any) -> SimFleet:
        fields.setdefault("profile", "instant")
        fields.setdefault("enable_prompt_tokens_details", True)
        fields.setdefault("served_model_name", "tiny")
        base = SimServerConfig(port=0, side_channel_port=free_port(), **fields)
        configs = fleet_configs(base, count)
        if count > 1:  # port 0 cannot be shifted: give every server its own ports
            configs = [c.model_copy(update={"side_channel_port": free_port()}) for c in configs]
        fleet = SimFleet(configs)
        fleets.append(fleet)
        await fleet.start()
        return fleet

    yield start
    for fleet in fleets:
        await fleet.stop()
