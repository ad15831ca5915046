"""`llmd-autoscaler`: saturation- and cost-aware scaling of model variants."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmd.autoscaler.app import AutoscalerConfig, build
from llmd.runtime.service import ServiceSpec, service_main

SPEC = ServiceSpec(
    name="llmd-autoscaler",
    config=AutoscalerConfig,
    build=build,
    description=(
        "llmd's variant autoscaler: reads every engine of every variant (KV usage, queues) and "
        "the requests queued at the gateway, decides the replicas each variant needs (WVA's "
        "saturation keys; cheapest capacity added first, most expensive removed first; scale "
        "to and from zero), exports wva_desired_replicas and, if asked, scales the pools."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
