"""`llmd-sidecar`: P/D disaggregation beside vLLM on a decode pod."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmd.runtime.service import ServiceSpec, service_main
from llmd.sidecar.app import SidecarConfig, build

SPEC = ServiceSpec(
    name="llmd-sidecar",
    config=SidecarConfig,
    build=build,
    description=(
        "llmd's P/D sidecar (llm-d pd-sidecar compatible): on a request naming a prefill pod "
        "(x-prefiller-host-port) it runs the prefill leg there (one token, KV kept for a "
        "remote decode), then the decode leg on the local vLLM with the prefill's "
        "kv_transfer_params, streaming the answer; every other request goes to the local vLLM."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
