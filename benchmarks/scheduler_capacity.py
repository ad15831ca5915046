"""How many requests one llmd-scheduler process routes: its ext_authz check endpoint, driven
directly as Envoy drives it, open loop, rate by rate.

The end-to-end ladder (`gateway_overhead.py --rates`) runs the client, Envoy, the engines and
the scheduler on the same 2 cores; there Envoy alone falls behind past ~400 streamed requests a
second, so that ladder cannot show where the scheduler itself stops. This benchmark takes
Envoy's place and keeps everything else real:

- **Checks**: kept-alive HTTP/1.1 connections to the scheduler's `--extauthz-port` (a new one
  only when every open one is busy, as Envoy's pool does), each request sent as Envoy's
  ext_authz filter sends it: `POST /llmd/check/v1/chat/completions` with the client's headers
  and its JSON body (streamed chat, ~`--prompt-words`-word system prompts in 16 groups).
- **Request ends**: for every allowed check, `--hold-ms` later (the request's time at the
  engine), the end is reported over Envoy's gRPC AccessLogService stream to the scheduler,
  batched every 20 ms as Envoy's access log is: the pick token, the upstream, the status, the
  first-byte time and the usage. So the scheduler does all of its per-request work: parsing,
  flow control, scheduling, the prefix-index update, in-flight accounting and its release.
- **Engines**: `--engines` llmd-sim servers (profile `instant`) that the scheduler discovers
  and scrapes every 50 ms as usual; they get no requests.
- **Config**: the scheduler's built-in default (the optimized baseline plus the overload
  filter, flow control on with `utilization-detector`), or `--config`. The engines never run
  a request, so flow control sees only what this scheduler has in flight: it learns how many
  requests each endpoint holds with an empty queue at every scrape, and a rate that jumps
  well past what it has seen is held at the gateway for a few scrape intervals (counted in
  the report's `flow_control_admissions`).

Per stage (`--stage-seconds` of Poisson arrivals at each offered rate): the rate sent and
answered, check latency p50 / p99 (request written to answer read), errors by kind, the
scheduler's CPU per request and the cores it used. After the last stage the scheduler's
in-flight gauges are read: they must be back to 0 (no leaked counts). A stage passes with 0
errors, at least 95% of the offered rate answered, and check p99 at most `--p99-ms`.

The load generator is one Python process too: at high rates its own CPU competes with the
scheduler's for the 2 cores, so a failing stage says "this machine", not only "the scheduler".
The report keeps the client's CPU beside the scheduler's.

Usage: uv run python benchmarks/scheduler_capacity.py [--rates 250,500,1000,1500,2000]
           [--stage-seconds 10] [--hold-ms 20] [--p99-ms 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import cpu_seconds, poisson_arrivals, workload
from protocol_throughput import write_report

from llmd.dev.gateway import SchedulerProcess
from llmd.dev.sim_engines import SimFleetProcess
from llmd.protocol import headers as hdr
from llmd.vllm_cpu.server import free_port

ROOT = Path(__file__).resolve().parent.parent
FLUSH_S = 0.02
"""How often the access-log batch goes out (the gateway's `feedback_flush_s`)."""
CHECK_PATH = hdr.EXTAUTHZ_CHECK_PREFIX + "/v1/chat/completions"
_TOKEN = hdr.EXTAUTHZ_TOKEN.encode()
_DEST = hdr.DESTINATION_ENDPOINT.encode()


class CheckConnection(asyncio.Protocol):
    """One kept-alive connection to the check port: one request at a time, as Envoy's."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, dict[bytes, bytes]]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        lines = bytes(self.buf[:end]).split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        total = end + 4 + int(headers.get(b"content-length", b"0"))
        if len(self.buf) < total:
            return
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(lines[0].split(b" ", 2)[1]), headers))

    async def check(self, request: bytes) -> tuple[int, dict[bytes, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


@dataclass
class Pool:
    """Envoy's connection pool to the check port: reuse an idle connection, else open one."""

    port: int
    idle: list[CheckConnection] = field(default_factory=list)
    opened: int = 0

    async def take(self) -> CheckConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(CheckConnection, "127.0.0.1", self.port)
        self.opened += 1
        return conn

    def give(self, conn: CheckConnection) -> None:
        if not conn.closed:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


@dataclass
class Ended:
    """One allowed request whose end the access log reports."""

    token: str
    upstream: str
    start_us: int
    prompt_tokens: int


class AccessLog:
    """Envoy's side of the AccessLogService stream: batches request ends every `FLUSH_S`."""

    def __init__(self, grpc_port: int, completion_tokens: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.completion_tokens = completion_tokens
        self.pending: list[Ended] = []
        self.queue: asyncio.Queue[als_pb2.StreamAccessLogsMessage | None] = asyncio.Queue()
        self.sent = 0
        self.call: Any = None
        self.flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        stub = als_pb2_grpc.AccessLogServiceStub(self.channel)
        self.call = stub.StreamAccessLogs(self._messages())
        self.flusher = asyncio.create_task(self._flush_loop())

    async def _messages(self) -> Any:
        first = True
        while (msg := await self.queue.get()) is not None:
            if first:
                msg.identifier.log_name = "llmd-feedback"
                first = False
            yield msg

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.flush()

    def add(self, ended: Ended) -> None:
        self.pending.append(ended)

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        msg = als_pb2.StreamAccessLogsMessage()
        now_us = int(time.time() * 1e6)
        for ended in batch:
            entry = msg.http_logs.log_entry.add()
            common = entry.common_properties
            meta = common.metadata.filter_metadata
            meta[hdr.EXTAUTHZ_NAMESPACE].fields[hdr.EXTAUTHZ_TOKEN].string_value = ended.token
            llmd = meta["llmd"].fields
            llmd["first_us"].string_value = str(ended.start_us + 1000)
            llmd["prompt_tokens"].string_value = str(ended.prompt_tokens)
            llmd["completion_tokens"].string_value = str(self.completion_tokens)
            llmd["events"].string_value = str(self.completion_tokens + 1)
            common.start_time.FromMicroseconds(ended.start_us)
            common.time_to_last_downstream_tx_byte.FromMicroseconds(now_us - ended.start_us)
            host, _, port = ended.upstream.rpartition(":")
            common.upstream_remote_address.socket_address.address = host
            common.upstream_remote_address.socket_address.port_value = int(port)
            entry.response.response_code.value = 200
            entry.response.response_body_bytes = 200 * self.completion_tokens
        self.sent += len(batch)
        self.queue.put_nowait(msg)

    async def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            await asyncio.gather(self.flusher, return_exceptions=True)
        self.flush()
        self.queue.put_nowait(None)
        if self.call is not None:
            await self.call
        await self.channel.close()


def check_request(body: bytes, request_id: int) -> bytes:
    head = (
        f"POST {CHECK_PATH} HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"x-forwarded-proto: http\r\nx-request-id: capacity-{request_id}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Stage:
    offered: float
    sent: int = 0
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def one(
    pool: Pool, log: AccessLog, stage: Stage, request: bytes, prompt_tokens: int, hold_s: float
) -> None:
    stage.sent += 1
    start_us = int(time.time() * 1e6)
    t0 = time.perf_counter()
    try:
        conn = await pool.take()
        status, headers = await conn.check(request)
    except (OSError, ConnectionError) as exc:
        stage.errors[type(exc).__name__] = stage.errors.get(type(exc).__name__, 0) + 1
        return
    stage.latencies.append(time.perf_counter() - t0)
    pool.give(conn)
    if status != 200:
        stage.errors[str(status)] = stage.errors.get(str(status), 0) + 1
        return
    stage.answered += 1
    token, upstream = headers.get(_TOKEN), headers.get(_DEST)
    if token is None or upstream is None:
        stage.errors["no-pick"] = stage.errors.get("no-pick", 0) + 1
        return
    ended = Ended(token.decode(), upstream.decode(), start_us, prompt_tokens)
    asyncio.get_running_loop().call_later(hold_s, log.add, ended)


async def run_stage(
    pool: Pool,
    log: AccessLog,
    rate: float,
    seconds: float,
    requests: list[tuple[bytes, int]],
    hold_s: float,
    seed: int,
) -> tuple[Stage, float]:
    """Poisson arrivals at `rate` for `seconds`; the stage and its wall time (until the last
    answer)."""
    rng = random.Random(seed)
    stage = Stage(rate)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    async for i in poisson_arrivals(rng, rate, seconds):
        body, tokens = requests[i % len(requests)]
        request = check_request(body, seed * 10**7 + i)
        task = asyncio.create_task(one(pool, log, stage, request, tokens, hold_s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return stage, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def gauge_total(metrics: str, name: str) -> float:
    """Sum of a gauge's samples in a Prometheus text page."""
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.M):
        total += float(m.group(1))
    return total


async def ladder(
    args: argparse.Namespace, sched: SchedulerProcess, authz_port: int
) -> dict[str, Any]:
    prompts = workload(4000, args.prompt_words, seed=1)
    requests = []
    for messages in prompts:
        body = {"model": "tiny", "messages": messages, "max_tokens": args.output_tokens,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        raw = json.dumps(body).encode()
        requests.append((raw, len(raw) // 4))
    pool = Pool(authz_port)
    log = AccessLog(sched.grpc_port, args.output_tokens)
    await log.start()
    pid = sched.process.pid
    rows = []
    try:
        await run_stage(pool, log, 100, 2.0, requests, args.hold_ms / 1000, seed=0)  # warm-up
        for n, rate in enumerate(args.rates, start=1):
            cpu0, client0 = cpu_seconds([pid]), time.process_time()
            stage, wall = await run_stage(
                pool, log, rate, args.stage_seconds, requests, args.hold_ms / 1000, seed=n
            )
            cpu = cpu_seconds([pid]) - cpu0
            client_cpu = time.process_time() - client0
            achieved = stage.answered / wall
            p50, p99 = percentile(stage.latencies, 0.5), percentile(stage.latencies, 0.99)
            row = {
                "offered_rps": rate,
                "sent": stage.sent,
                "answered_rps": round(achieved, 1),
                "check_p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
                "check_p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
                "errors": stage.errors,
                "scheduler_cpu_ms_per_request": round(cpu * 1000 / max(1, stage.sent), 3),
                "scheduler_cores": round(cpu / wall, 3),
                "client_cores": round(client_cpu / wall, 3),
                "connections_opened": pool.opened,
            }
            row["passed"] = (
                not stage.errors
                and achieved >= 0.95 * rate
                and p99 is not None
                and p99 * 1000 <= args.p99_ms
            )
            rows.append(row)
            print(f"  {rate:>6} req/s: answered {achieved:7.1f}/s, check p50 {row['check_p50_ms']} "
                  f"p99 {row['check_p99_ms']} ms, errors {stage.errors}, scheduler "
                  f"{row['scheduler_cpu_ms_per_request']} ms/req = {row['scheduler_cores']} core, "
                  f"client {row['client_cores']} core, {'pass' if row['passed'] else 'FAIL'}",
                  flush=True)  # fmt: skip
    finally:
        await asyncio.sleep(args.hold_ms / 1000 + 2 * FLUSH_S)
        await log.close()
        pool.close()
    await asyncio.sleep(0.5)  # the scheduler applies the last batch
    page = sched.metrics_text()
    flow = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^llm_d_epp_flow_control_request_enqueue_duration_seconds_count\{[^}]*outcome="([^"]+)"'
            r"[^}]*\} (\S+)$",
            page,
            re.M,
        )
    }
    leaks = {
        "llm_d_epp_request_running": gauge_total(page, "llm_d_epp_request_running"),
        "llm_d_epp_inflight_requests": gauge_total(page, "llm_d_epp_inflight_requests"),
        "llm_d_epp_inflight_tokens": gauge_total(page, "llm_d_epp_inflight_tokens"),
        "llmd_gateway_feedback_waiting": gauge_total(page, "llmd_gateway_feedback_waiting"),
    }
    feedback = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^llmd_gateway_feedback_total\{[^}]*outcome="([^"]+)"[^}]*\} (\S+)$', page, re.M
        )
    }
    passing = [r["offered_rps"] for r in rows if r["passed"]]
    return {
        "stages": rows,
        "highest_passing_rps": max(passing) if passing else None,
        "access_log_entries_sent": log.sent,
        "in_flight_after": leaks,
        "gateway_feedback": feedback,
        "flow_control_admissions": flow,
    }


def table(result: dict[str, Any]) -> str:
    out = [
        "| offered req/s | answered | check p50 / p99 ms | errors | scheduler ms/req | "
        "scheduler cores | client cores | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["stages"]:
        errors = sum(r["errors"].values())
        out.append(
            f"| {r['offered_rps']} | {r['answered_rps']} | {r['check_p50_ms']} / "
            f"{r['check_p99_ms']} | {errors} | {r['scheduler_cpu_ms_per_request']} | "
            f"{r['scheduler_cores']} | {r['client_cores']} | {'yes' if r['passed'] else 'no'} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="250,500,1000,1500,2000",
                   help="offered requests/s per stage (250,500,1000,1500,2000)")  # fmt: skip
    p.add_argument("--stage-seconds", type=float, default=10.0, help="per stage (10 s)")
    p.add_argument("--hold-ms", type=float, default=20.0,
                   help="time at the engine before a request's end is logged (20 ms)")  # fmt: skip
    p.add_argument("--p99-ms", type=float, default=5.0, help="check p99 a stage may reach (5)")
    p.add_argument("--engines", type=int, default=4, help="simulated engines (4)")
    p.add_argument("--prompt-words", type=int, default=600, help="system prompt words (600)")
    p.add_argument("--output-tokens", type=int, default=64, help="usage reported per request (64)")
    p.add_argument("--config", help="an EndpointPickerConfig file (default: the built-in one)")
    p.add_argument("--scheduler-args", default="", help="extra llmd-scheduler flags")
    p.add_argument("--out", default=str(ROOT / "benchmarks/reports/scheduler-capacity.json"))
    args = p.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates needs positive numbers")
    work = Path(tempfile.mkdtemp(prefix="scheduler-capacity-"))
    fleet = SimFleetProcess.start(count=args.engines, block_size=16, profile="instant", work=work)
    authz_port = free_port()
    config = Path(args.config) if args.config else None
    try:
        sched = SchedulerProcess.start(
            fleet.endpoints_file,
            work,
            config_file=config,
            extra_args=["--extauthz-port", str(authz_port), *shlex.split(args.scheduler_args)],
        )
        try:
            print(f"scheduler pid {sched.process.pid}, check port {authz_port}; "
                  f"{len(args.rates)} stages of {args.stage_seconds:g} s", flush=True)  # fmt: skip
            result = asyncio.run(ladder(args, sched, authz_port))
        finally:
            sched.stop()
    finally:
        fleet.stop()
    print(table(result))
    print(f"highest passing stage: {result['highest_passing_rps']} req/s")
    print(f"in flight after the run: {result['in_flight_after']}")
    print(f"access-log entries by outcome: {result['gateway_feedback']}")
    print(f"flow control admissions: {result['flow_control_admissions']}")
    write_report(
        args.out,
        "scheduler-capacity",
        "uv run python benchmarks/scheduler_capacity.py " + shlex.join(sys.argv[1:]),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        result=result,
        table=table(result),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
