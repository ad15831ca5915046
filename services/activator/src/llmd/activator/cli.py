"""`llmd-activator`: scale-from-zero without losing a request."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmd.activator.app import ActivatorConfig, build
from llmd.runtime.service import ServiceSpec, service_main

SPEC = ServiceSpec(
    name="llmd-activator",
    config=ActivatorConfig,
    build=build,
    description=(
        "llmd's activator: receives requests for a pool that may be at zero replicas, holds "
        "them in a bounded queue with a deadline, scales the pool up at once, and forwards "
        "them (streaming) as soon as an engine answers; optionally scales an idle pool to zero."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
