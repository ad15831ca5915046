"""`llmd-sim`: start one or many simulated vLLM 0.32 servers.

Flags named like vLLM's mean what they mean on vLLM; the rest are the simulator's own. A YAML
file (--config) may hold any field of SimServerConfig; flags override it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmd.runtime.config import ConfigError, ConfigIssue, load_config
from llmd.sim.config import SimServerConfig
from llmd.sim.fleet import SimFleet, fleet_configs
from llmd.sim.latency import PROFILES
from llmd.sim.tokenizer import TokenizerError

EPILOG = """\
examples:
  llmd-sim                                       one server on :8000, tiny tokenizer, h100-8b
  llmd-sim --count 8 --port 9000 --profile h100-32b-tp2 --enable-prompt-tokens-details \\
      --kv-events-config '{"enable_kv_cache_events":true,"endpoint":"tcp://*:5557",
                           "replay_endpoint":"tcp://*:5657"}' --fleet-file fleet.yaml
  llmd-sim --model ~/.cache/llmd/models/tiny-llama-XXXX --served-model-name tiny --block-size 32
  llmd-sim --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'

simulator-only HTTP paths:
  POST /sim/faults   {"error_rate":0.1} {"drop_events_rate":0.5} {"hang":true} {"crash":true}
                     {"reset_event_sequence":true}
  GET  /sim/state    queue, blocks, leases, event sequence
"""

IGNORED_VLLM_FLAGS = (
    "--dtype",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--gpu-memory-utilization",
    "--kv-cache-dtype",
    "--seed-vllm",
)
IGNORED_VLLM_SWITCHES = ("--enforce-eager", "--trust-remote-code", "--disable-log-requests")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmd-sim",
        description=(
            "A simulated vLLM 0.32 server (or a fleet of them in one process): the same HTTP "
            "API, Prometheus metrics, KV events, prefix caching, P/D kv_transfer_params and "
            "LoRA as vLLM, with GPU timing from a latency profile."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file with SimServerConfig fields (flags override it)")
    g = p.add_argument_group("vLLM options (same meaning as on vLLM 0.32)")
    g.add_argument("--model", help="model directory (its tokenizer is used) or a bare name")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else tiny)")
    g.add_argument("--served-model-name", help="model name clients use (default: --model)")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="HTTP port; server i of a fleet uses port+i (8000)")
    g.add_argument("--block-size", type=int, help="tokens per KV block (16)")
    g.add_argument(
        "--num-gpu-blocks-override", type=int, help="KV capacity in blocks (default: profile's)"
    )
    g.add_argument("--max-num-seqs", type=int, help="most requests running at once (256)")
    g.add_argument(
        "--max-num-batched-tokens", type=int, help="token budget per step; chunked prefill (8192)"
    )
    g.add_argument(
        "--max-model-len", type=int, help="context limit (default: model config, else 8192)"
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="prefix caching (on)",
    )
    g.add_argument(
        "--prefix-caching-hash-algo",
        choices=["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"],
        help="block hash function (sha256)",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="put usage.prompt_tokens_details.cached_tokens in responses",
    )
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    g.add_argument("--max-loras", type=int, help="adapters in one batch (1)")
    g.add_argument("--max-lora-rank", type=int, help="accepted for compatibility (16)")
    g.add_argument(
        "--lora-modules", nargs="+", metavar="NAME=PATH", help="adapters loaded at start"
    )
    g.add_argument(
        "--kv-events-config",
        help='JSON, e.g. {"enable_kv_cache_events":true,"endpoint":"tcp://*:5557",'
        '"replay_endpoint":"tcp://*:5657","topic":"kv@{pod}@tiny"}; the topic defaults to '
        "kv@<pod>@<model>",
    )
    g.add_argument(
        "--kv-transfer-config",
        help='JSON, e.g. {"kv_connector":"NixlConnector","kv_role":"kv_producer"}',
    )
    g.add_argument(
        "--ec-transfer-config",
        help='JSON, e.g. {"ec_connector":"ECExampleConnector","ec_role":"ec_producer"}: an '
        "encode pod (producer) answers multimodal items with ec_transfer_params; a consumer "
        "skips encoding the items they name",
    )
    for flag in IGNORED_VLLM_FLAGS:
        g.add_argument(flag, dest=f"_ignored{flag}", help=argparse.SUPPRESS)
    for flag in IGNORED_VLLM_SWITCHES:
        g.add_argument(flag, dest=f"_ignored{flag}", action="store_true", help=argparse.SUPPRESS)
    s = p.add_argument_group("simulator options")
    s.add_argument("--count", type=int, default=1, help="servers in this process (1)")
    s.add_argument("--pod-name", help="pod name in KV topics; a fleet appends -<i> (sim-<i>)")
    s.add_argument(
        "--side-channel-port",
        type=int,
        help="NIXL side-channel port (VLLM_NIXL_SIDE_CHANNEL_PORT, 5600); +i in a fleet",
    )
    s.add_argument(
        "--profile", help=f"latency profile: {', '.join(sorted(PROFILES))} (default h100-8b)"
    )
    s.add_argument("--list-profiles", action="store_true", help="describe the profiles and exit")
    s.add_argument(
        "--metrics-dialect",
        choices=("vllm", "sglang"),
        help="serve /metrics under vLLM's names (default) or SGLang's",
    )
    s.add_argument(
        "--latency",
        nargs="+",
        metavar="KEY=SECONDS",
        help="override profile coefficients, e.g. prefill_token_s=5e-5 weights_read_s=0.01",
    )
    s.add_argument("--speed", type=float, help="simulated seconds per wall second (1.0)")
    s.add_argument("--noise", type=float, help="relative std-dev of step times, 0..1 (0)")
    s.add_argument("--seed", type=int, help="seed for noise, sampling and faults (0)")
    s.add_argument("--hash-seed", help="NONE_HASH seed (default: $PYTHONHASHSEED, as vLLM)")
    s.add_argument(
        "--max-waiting-requests", type=int, help="queue bound; beyond it HTTP 503 (100000)"
    )
    s.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve /v1/load_lora_adapter (also VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)",
    )
    s.add_argument(
        "--storage-domain",
        help="mount a simulated shared KV volume (llmd-fs-offload); the servers of one domain "
        "share it",
    )
    s.add_argument(
        "--storage-dir",
        help="share the volume with servers in other processes through this directory (the "
        "local stack's engines are one process each)",
    )
    s.add_argument("--storage-capacity-tokens", type=int, help="tokens of KV it holds (10M)")
    s.add_argument("--storage-read-gbps", type=float, help="load bandwidth per server (10)")
    s.add_argument("--storage-write-gbps", type=float, help="store bandwidth per server (10)")
    s.add_argument(
        "--storage-volume-read-gbps", type=float, help="read bandwidth the servers share (none)"
    )
    s.add_argument(
        "--storage-volume-write-gbps", type=float, help="write bandwidth the servers share (none)"
    )
    s.add_argument(
        "--storage-max-write-queued-s",
        type=float,
        help="drop a store that would queue longer (30; 0: never)",
    )
    s.add_argument("--storage-latency-ms", type=float, help="latency of a load (1)")
    s.add_argument(
        "--storage-kv-bytes-per-token", type=int, help="KV bytes per token (131072, an 8B model)"
    )
    s.add_argument("--fleet-file", help="write the fleet as an llm-d file-discovery document")
    s.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    f = p.add_argument_group("faults (also at run time: POST /sim/faults)")
    f.add_argument("--startup-delay", type=float, help="seconds before the port opens")
    f.add_argument("--error-rate", type=float, help="share of requests answered with 500")
    f.add_argument(
        "--metrics-error-rate", type=float, help="share of /metrics scrapes answered with 500"
    )
    f.add_argument("--drop-events-rate", type=float, help="share of KV-event batches not sent")
    f.add_argument("--crash-after-requests", type=int, help="die after N inference requests")
    f.add_argument("--hang-after-requests", type=int, help="stop stepping after N requests")
    return p


_FAULT_FLAGS = {
    "startup_delay": "startup_delay_s",
    "error_rate": "error_rate",
    "metrics_error_rate": "metrics_error_rate",
    "drop_events_rate": "drop_events_rate",
    "crash_after_requests": "crash_after_requests",
    "hang_after_requests": "hang_after_requests",
}
_NOT_CONFIG = {"config", "count", "list_profiles", "fleet_file", "log_level"}


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError([ConfigIssue(what, f"{item!r} is not KEY=VALUE")], "command line")
        out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> SimServerConfig:
    """The validated base config: defaults < --config YAML < LLMD_SIM_* env < flags."""
    raw = {k: v for k, v in vars(args).items() if not k.startswith("_ignored")}
    overrides: dict[str, Any] = {}
    faults: dict[str, Any] = {}
    storage: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NOT_CONFIG:
            continue
        if key.startswith("storage_"):
            storage[key.removeprefix("storage_")] = value
            continue
        if key in _FAULT_FLAGS:
            faults[_FAULT_FLAGS[key]] = value
        elif key == "lora_modules":
            overrides[key] = [
                {"name": k, "path": v} for k, v in _pairs(value, "--lora-modules").items()
            ]
        elif key == "latency":
            try:
                overrides[key] = {k: float(v) for k, v in _pairs(value, "--latency").items()}
            except ValueError as exc:
                raise ConfigError([ConfigIssue("--latency", str(exc))], "command line") from None
        else:
            overrides[key] = value
    if "side_channel_port" not in overrides and os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT"):
        overrides["side_channel_port"] = os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    if faults:
        overrides["faults"] = faults
    if storage:
        if "domain" not in storage:
            raise ConfigError(
                [ConfigIssue("--storage-domain", "required by the other --storage-* options")],
                "command line",
            )
        overrides["storage"] = storage
    return load_config(
        SimServerConfig, raw.get("config"), env_prefix="LLMD_SIM_", overrides=overrides
    )


def describe_profiles() -> str:
    lines = []
    for name, profile in sorted(PROFILES.items()):
        lines.append(f"{name}\n  {profile.description}")
        coeffs = profile.model_dump(exclude={"description"})
        lines.append("  " + ", ".join(f"{k}={v:g}" for k, v in coeffs.items()))
    return "\n".join(lines)


async def serve(base: SimServerConfig, count: int, fleet_file: str | None) -> int:
    fleet = SimFleet(fleet_configs(base, count))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await fleet.start()
    except OSError as exc:
        print(f"llmd-sim: cannot start: {exc}", file=sys.stderr)
        await fleet.stop()
        return 1
    if fleet_file:
        fleet.write_endpoints_file(Path(fleet_file))
    first = fleet.servers[0]
    print(
        f"llmd-sim: {len(fleet.servers)} server(s) ready, first at {first.url} "
        f"(model {first.model_name!r}); Ctrl-C stops",
        flush=True,
    )
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if not fleet.alive:
            print("llmd-sim: every server crashed (fault injection); exiting", file=sys.stderr)
            await fleet.stop()
            return 1
    await fleet.stop()
    print("llmd-sim: stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "list_profiles", False):
        print(describe_profiles())
        return 0
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        base = config_from_args(args)
    except ConfigError as exc:
        print(f"llmd-sim: {exc}", file=sys.stderr)
        return 2
    count = getattr(args, "count", 1)
    if count < 1:
        print("llmd-sim: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(base, count, getattr(args, "fleet_file", None)))
    except TokenizerError as exc:
        print(f"llmd-sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
