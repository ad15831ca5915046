"""`llmd-dev`: run llmd's local stack on this machine."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import yaml

from llmd.dev.monitor import EngineAddress, monitor
from llmd.runtime.lifecycle import Health, ServiceRunner
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, VllmStartError, start_servers
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

STATUS = """\
llmd local stack: what runs today
  engines     real vLLM 0.32 CPU servers on a generated tiny model  (--engine vllm)
  simulated   llmd-sim engines are not built yet (issue #3); --engine sim is refused
  gateway     Envoy + llmd-scheduler are not built yet (issue #4): requests go straight
              to an engine, and this console shows the KV events and load the router will use
"""


def write_endpoints_file(servers: Sequence[VllmServer], path: Path) -> None:
    """The static discovery file (llm-d file-discovery format) for the started engines."""
    doc = {
        "endpoints": [
            {
                "name": s.spec.pod,
                "address": "127.0.0.1",
                "port": str(s.port),
                "labels": {"llm-d.ai/role": "decode"},
            }
            for s in servers
        ]
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def banner(servers: Sequence[VllmServer], endpoints_file: Path) -> str:
    first = servers[0]
    lines = ["", "engines ready:"]
    for s in servers:
        lines.append(
            f"  {s.spec.pod:<8} {s.url}   KV events {s.kv_events_endpoint}   topic {s.topic}"
        )
    lines += [
        f"discovery file: {endpoints_file}",
        "",
        "try:",
        f"  curl -s {first.url}/v1/completions -H 'Content-Type: application/json' \\",
        '    -d \'{"model": "tiny", "prompt": "the system user assistant", "max_tokens": 8}\'',
        "",
        "live KV events and load follow (Ctrl-C stops everything):",
    ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    print(STATUS, flush=True)
    if args.engine == "sim":
        print("error: --engine sim needs llmd-sim (issue #3); use --engine vllm", file=sys.stderr)
        return 2
    print(
        "preparing the vLLM CPU environment and tiny model (first run: ~2 minutes)...", flush=True
    )
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    work = Path(tempfile.mkdtemp(prefix="llmd-dev-"))
    specs = [
        VllmServerSpec(pod=f"vllm-{i}", model_dir=model, block_size=args.block_size, cpu_core=i)
        for i in range(args.count)
    ]
    print(f"starting {args.count} vLLM server(s); logs in {work}", flush=True)
    try:
        servers = start_servers(env, specs, work)
    except VllmStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    endpoints_file = work / "endpoints.yaml"
    write_endpoints_file(servers, endpoints_file)
    print(banner(servers, endpoints_file), flush=True)
    engines = [EngineAddress(s.spec.pod, s.url, s.kv_events_endpoint) for s in servers]

    def wire(runner: ServiceRunner) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        async def stop_engines() -> None:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
            print("engines stopped", flush=True)

        runner.on_shutdown("engines", stop_engines)

        async def main(stop: asyncio.Event) -> None:
            if args.duration:
                asyncio.get_running_loop().call_later(
                    args.duration, runner.request_stop, "--duration elapsed"
                )
            await monitor(engines, stop, lambda line: print(line, flush=True))

        return main

    async def run() -> int:
        runner = ServiceRunner("llmd-dev", Health(), shutdown_timeout_s=30)
        return await runner.run(wire(runner))

    try:
        return asyncio.run(run())
    finally:
        for s in servers:
            s.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-dev", description="Run llmd's local stack on this machine."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack and show live routing data until Ctrl-C")
    up.add_argument(
        "--engine",
        choices=["vllm", "sim"],
        default="vllm",
        help="engine kind: vllm = real vLLM CPU on the tiny model (sim lands with llmd-sim)",
    )
    up.add_argument(
        "-n", "--count", type=int, default=1, help="number of engines (default 1; 2 cores fit 2)"
    )
    up.add_argument(
        "--block-size", type=int, default=32, help="KV block size in tokens (multiple of 32)"
    )
    up.add_argument(
        "--duration", type=float, default=0.0, help="stop by itself after this many seconds"
    )
    sub.add_parser("status", help="say what the local stack runs today")
    args = parser.parse_args(argv)
    if args.command == "status":
        print(STATUS)
        return 0
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.block_size % 32:
        parser.error("--block-size must be a multiple of 32 on vLLM's CPU backend")
    return cmd_up(args)


if __name__ == "__main__":
    raise SystemExit(main())
