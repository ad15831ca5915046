"""`llmd-indexer`: the standalone KV-event indexer (HTTP and gRPC scoring)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmd.indexer.app import IndexerConfig, build
from llmd.runtime.service import ServiceSpec, service_main

SPEC = ServiceSpec(
    name="llmd-indexer",
    config=IndexerConfig,
    build=build,
    description=(
        "llmd's KV-event indexer: subscribes to every engine's KV events (vLLM ZMQ, "
        "topic kv@<pod>@<model>), keeps the block index (in memory or in Valkey shared "
        "with other replicas) and scores prompts per pod over HTTP (/v1/score) and gRPC "
        "(llm-d's indexer.v1.IndexerService/GetPodScores)."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
