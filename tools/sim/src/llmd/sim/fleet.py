"""Several simulated servers in one process: one event loop, one ZMQ context, shared tokenizers.

Server i of a fleet gets the base config with every port shifted by i (HTTP, KV-event PUB and
replay endpoints, NIXL side channel), as vLLM shifts ports per data-parallel rank, and its own
pod name; a `{pod}` in the KV topic becomes that name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
import zmq.asyncio

from llmd.protocol.kv_events import format_topic
from llmd.sim.config import SimServerConfig
from llmd.sim.server import SimServer, resolve_model_dir
from llmd.sim.storage import forget_tiers
from llmd.sim.tokenizer import SimTokenizer

_PORT = re.compile(r":(\d+)$")


def _shift_endpoint(endpoint: str, offset: int) -> str:
    match = _PORT.search(endpoint)
    if not match or offset == 0 or match.group(1) == "0":
        return endpoint
    return endpoint[: match.start()] + f":{int(match.group(1)) + offset}"


def fleet_configs(base: SimServerConfig, count: int) -> list[SimServerConfig]:
    """`count` configs derived from `base`: consecutive ports, pod names sim-0..sim-N-1."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out: list[SimServerConfig] = []
    for i in range(count):
        pod = base.pod_name if count == 1 and base.pod_name else None
        if pod is None:
            pod = f"{base.pod_name or 'sim'}-{i}" if count > 1 else f"{base.host}:{base.port}"
        update: dict[str, Any] = {
            "port": base.port + i if base.port else 0,
            "pod_name": pod,
            "side_channel_port": base.side_channel_port + i if base.side_channel_port else 0,
            "seed": base.seed + i,
        }
        events = base.kv_events_config
        if events is not None:
            model = base.served_model_name or base.model
            topic = events.topic.replace("{pod}", pod) if events.topic else format_topic(pod, model)
            update["kv_events_config"] = events.model_copy(
                update={
                    "endpoint": _shift_endpoint(events.endpoint, i),
                    "replay_endpoint": _shift_endpoint(events.replay_endpoint, i)
                    if events.replay_endpoint
                    else None,
                    "topic": topic,
                }
            )
        out.append(base.model_copy(update=update))
    return out


class SimFleet:
    """Start, address and stop a set of simulated servers in this process."""

    def __init__(self, configs: Sequence[SimServerConfig]) -> None:
        self.ctx = zmq.asyncio.Context()
        tokenizers: dict[Path, SimTokenizer] = {}
        self.servers: list[SimServer] = []
        for cfg in configs:
            tok_dir, _ = resolve_model_dir(cfg)
            tok = tokenizers.get(tok_dir)
            if tok is None:
                tok = tokenizers[tok_dir] = SimTokenizer(tok_dir)
            self.servers.append(SimServer(cfg, zmq_ctx=self.ctx, tokenizer=tok))

    async def start(self) -> None:
        for server in self.servers:
            await server.start()

    async def stop(self) -> None:
        for server in self.servers:
            if not server.crashed:
                await server.stop()
        self.ctx.term()
        forget_tiers()  # the next fleet in this process starts with empty volumes

    @property
    def alive(self) -> list[SimServer]:
        return [s for s in self.servers if not s.crashed]

    def endpoints_document(self, role: str = "both") -> dict[str, Any]:
        """llm-d's file-discovery document for the fleet (llmd.runtime StaticFileDiscovery)."""
        entries = []
        for s in self.servers:
            labels = {"llm-d.ai/role": role, "llmd.ai/simulated": "true"}
            if s.cfg.storage is not None:
                labels["llmd.ai/storage-domain"] = s.cfg.storage.domain
            events = s.cfg.kv_events_config
            if events is not None and events.enable_kv_cache_events:
                labels["llmd.ai/kv-events-endpoint"] = events.endpoint.replace("*", s.cfg.host)
                if events.replay_endpoint:
                    labels["llmd.ai/kv-replay-endpoint"] = events.replay_endpoint.replace(
                        "*", s.cfg.host
                    )
            entries.append(
                {
                    "name": s.pod_name,
                    "address": s.cfg.host,
                    "port": str(s.bound_port or s.cfg.port),
                    "labels": labels,
                }
            )
        return {"endpoints": entries}

    def write_endpoints_file(self, path: Path, role: str = "both") -> None:
        path.write_text(yaml.safe_dump(self.endpoints_document(role), sort_keys=False))
