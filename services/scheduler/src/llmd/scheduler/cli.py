"""`llmd-scheduler`: the Endpoint Picker. Flags follow llm-d's EPP where they overlap."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmd.runtime.config import ConfigError
from llmd.runtime.service import ExtraAction, ServiceSpec, service_main
from llmd.scheduler.app import SchedulerConfig, build
from llmd.scheduler.plugins import plugin_registry


def list_plugins(config: SchedulerConfig) -> int:
    """Print every plugin type (built-in and installed) with its one-line description."""
    try:
        registry = plugin_registry()
    except ConfigError as exc:
        print(f"llmd-scheduler: {exc}", file=sys.stderr)
        return 2
    for name in registry.types():
        cls, _ = registry.resolve(name)
        assert cls is not None
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<32} {doc}")
    return 0


SPEC = ServiceSpec(
    name="llmd-scheduler",
    config=SchedulerConfig,
    build=build,
    description=(
        "llmd's Endpoint Picker: an Envoy ext_proc server (FULL_DUPLEX_STREAMED) that picks "
        "the model server for each OpenAI request with llm-d's plugin framework "
        "(EndpointPickerConfig, llm-d.ai/v1alpha1)."
    ),
    actions=(ExtraAction("--list-plugins", "list the plugin types and exit", list_plugins),),
)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
