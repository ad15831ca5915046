"""`llmd-vllm-cpu`: build the vLLM CPU environment, generate the tiny model, serve it."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from llmd.vllm_cpu.install import ensure_vllm_env, env_dir
from llmd.vllm_cpu.server import VllmServerSpec, VllmStartError, running_servers
from llmd.vllm_cpu.tiny_model import ensure_tiny_model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmd-vllm-cpu",
        description="Real vLLM 0.32 on the CPU for llmd's tests and local runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser(
        "install",
        help=f"build the vLLM virtualenv in {env_dir()} (no-op when current)",
    )
    p_install.add_argument("--rebuild", action="store_true", help="rebuild even if current")
    sub.add_parser("model", help="generate the tiny model (if needed) and print its directory")
    p_serve = sub.add_parser("serve", help="start N tiny-model vLLM servers until Ctrl-C")
    p_serve.add_argument("-n", "--count", type=int, default=1, help="number of servers")
    p_serve.add_argument("--block-size", type=int, default=32, help="KV block size (x32)")
    args = parser.parse_args(argv)

    env = ensure_vllm_env(rebuild=getattr(args, "rebuild", False))
    if args.command == "install":
        print(env.root)
        return 0
    model = ensure_tiny_model(env)
    if args.command == "model":
        print(model)
        return 0
    specs = [
        VllmServerSpec(pod=f"vllm-{i}", model_dir=model, block_size=args.block_size, cpu_core=i)
        for i in range(args.count)
    ]
    log_dir = Path(tempfile.mkdtemp(prefix="llmd-vllm-"))
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    print(f"starting {args.count} vLLM server(s); logs in {log_dir}", file=sys.stderr)
    try:
        with running_servers(env, specs, log_dir) as servers:
            for s in servers:
                print(f"{s.spec.pod}: {s.url}  events {s.kv_events_endpoint}  topic {s.topic}")
            signal.sigwait(stop_signals)
    except VllmStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
