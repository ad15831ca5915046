"""Data-parallel rank routing behind one sidecar port (llm-d's deprecated
`data-parallel-profile-handler`, and the `primaryPort` of the P/D handlers).

A vLLM server with `--data-parallel-size N` runs N engine ranks, each on its own port, and the
pool lists each rank as an endpoint. When the gateway can reach only one port of the pod (the
sidecar's rank 0 listener, `primaryPort`), the scheduler still picks a rank: the request goes
to `address:primaryPort` and carries the picked rank's `address:port` in
`x-data-parallel-host-port`, which llmd-sidecar (`--data-parallel-size`) follows to that rank's
engine. Accounting stays on the picked rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from llmd.protocol import headers as hdr
from llmd.scheduler.framework import (
    LLMRequest,
    Plugin,
    PluginParams,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
)
from llmd.scheduler.plugins.pickers import single_result


class DataParallelParams(PluginParams):
    primary_port: int = Field(default=8000, gt=0, lt=65536, alias="primaryPort")


def rank_header(result: SchedulingResult) -> dict[str, str]:
    """x-data-parallel-host-port for a result whose targets are rewritten to a primary port
    (nothing when they are not)."""
    if not result.port or not result.targets:
        return {}
    return {hdr.DATA_PARALLEL_HOST_PORT: result.targets[0].key}


class DataParallelProfileHandler(
    ProfileHandler[DataParallelParams], PreRequest[DataParallelParams]
):
    """Runs the config's one profile; its picks are reached on `primaryPort`."""

    type_name = "data-parallel-profile-handler"
    Params = DataParallelParams

    def bind(self, plugins: Mapping[str, Plugin[Any]], profiles: Sequence[str]) -> list[str]:
        if len(profiles) != 1:
            return [
                f"runs exactly one scheduling profile; the config has {len(profiles)} "
                f"({', '.join(profiles) or 'none'})"
            ]
        return []

    def pick_profiles(
        self, request: LLMRequest, profiles: Sequence[str], results: dict[str, ProfileResult | None]
    ) -> list[str]:
        return [] if results else list(profiles[:1])

    def process_results(
        self, request: LLMRequest, results: dict[str, ProfileResult | None]
    ) -> SchedulingResult:
        return single_result(results, self.params.primary_port)

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> Mapping[str, str]:
        return rank_header(result)


DATA_PARALLEL_PLUGINS = (DataParallelProfileHandler,)
