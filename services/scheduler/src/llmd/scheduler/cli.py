"""`llmd-scheduler`: the Endpoint Picker. Flags follow llm-d's EPP where they overlap."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from opentelemetry import trace

from llmd.runtime.config import ConfigError
from llmd.runtime.lifecycle import ServiceRunner
from llmd.runtime.observability import setup_logging, setup_tracing
from llmd.scheduler.app import SchedulerApp, SchedulerOptions
from llmd.scheduler.config import parse_duration
from llmd.scheduler.plugins import builtin_registry


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmd-scheduler",
        description=(
            "llmd's Endpoint Picker: an Envoy ext_proc server (FULL_DUPLEX_STREAMED) that picks "
            "the model server for each OpenAI request with llm-d's plugin framework "
            "(EndpointPickerConfig, llm-d.ai/v1alpha1)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument(
        "--config-file", help="EndpointPickerConfig YAML (default: llm-d's optimized baseline)"
    )
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML given inline")
    disc = p.add_mutually_exclusive_group()
    disc.add_argument(
        "--endpoints-file",
        help="static discovery file (llm-d file-discovery format), re-read when it changes",
    )
    disc.add_argument(
        "--endpoint-selector",
        help="Kubernetes label selector of the model-server pods (needs cluster access)",
    )
    p.add_argument(
        "--endpoint-target-port", type=int, default=8000, help="model-server port on each pod"
    )
    p.add_argument("--pool-namespace", default="default", help="namespace of the pods")
    p.add_argument("--pool-name", default="llmd", help="pool name in metric labels")
    p.add_argument("--host", default="0.0.0.0", help="address every server listens on")
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (plaintext)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (0 = off)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="HTTP port: /metrics, /healthz, /readyz, /debug/* (0 = off)",
    )
    p.add_argument(
        "--refresh-metrics-interval",
        type=_duration,
        default=0.05,
        help="how often each endpoint's /metrics is scraped (e.g. 50ms)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_duration,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may take before the servers stop",
    )
    p.add_argument("--allow-experimental-plugins", action="store_true", help="allow Alpha plugins")
    p.add_argument(
        "--check-config", action="store_true", help="validate the config, print the profiles, exit"
    )
    p.add_argument("--list-plugins", action="store_true", help="list the plugin types and exit")
    p.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default LLMD_LOG_LEVEL or INFO)"
    )
    return p


def options_from(args: argparse.Namespace) -> SchedulerOptions:
    return SchedulerOptions(
        config_file=args.config_file,
        config_text=args.config_text,
        endpoints_file=args.endpoints_file,
        endpoint_selector=args.endpoint_selector,
        endpoint_target_port=args.endpoint_target_port,
        namespace=args.pool_namespace,
        pool_name=args.pool_name,
        host=args.host,
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        refresh_metrics_interval_s=args.refresh_metrics_interval,
        drain_timeout_s=args.drain_timeout,
        allow_experimental_plugins=args.allow_experimental_plugins,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_plugins:
        registry = builtin_registry()
        for name in registry.types():
            cls, _ = registry.resolve(name)
            assert cls is not None
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:<32} {doc}")
        return 0
    setup_logging("llmd-scheduler", args.log_level)
    provider = setup_tracing("llmd-scheduler")
    if provider is not None:
        trace.set_tracer_provider(provider)
    try:
        app = SchedulerApp(options_from(args))
    except ConfigError as exc:
        print(f"llmd-scheduler: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        for name, prof in app.built.profiles.items():
            scorers = ", ".join(f"{s.name}x{w:g}" for s, w in prof.scorers) or "-"
            filters = ", ".join(f.name for f in prof.filters) or "-"
            print(
                f"profile {name}: filters [{filters}] scorers [{scorers}] picker {prof.picker.name}"
            )
        print(f"config OK ({app.config_origin})")
        return 0
    if not (args.endpoints_file or args.endpoint_selector):
        print("llmd-scheduler: give --endpoints-file or --endpoint-selector", file=sys.stderr)
        return 2

    def wire(runner: ServiceRunner) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        runner.on_shutdown("scheduler", app.drain)
        return app.run

    async def _run() -> int:
        runner = ServiceRunner(
            "llmd-scheduler", app.health, shutdown_timeout_s=args.drain_timeout + 5
        )
        return await runner.run(wire(runner))

    try:
        return asyncio.run(_run())
    except OSError as exc:
        print(f"llmd-scheduler: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
