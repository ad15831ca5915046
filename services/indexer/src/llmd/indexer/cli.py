"""`llmd-indexer`: the standalone KV-event indexer (HTTP and gRPC scoring)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from llmd.indexer.app import IndexerApp, IndexerOptions
from llmd.runtime.lifecycle import ServiceRunner
from llmd.runtime.observability import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmd-indexer",
        description=(
            "llmd's KV-event indexer: subscribes to every engine's KV events (vLLM ZMQ, "
            "topic kv@<pod>@<model>), keeps the block index (in memory or in Valkey shared "
            "with other replicas) and scores prompts per pod over HTTP (/v1/score) and gRPC "
            "(llm-d's indexer.v1.IndexerService/GetPodScores)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    disc = p.add_mutually_exclusive_group()
    disc.add_argument("--endpoints-file", help="static discovery file (llm-d file-discovery)")
    disc.add_argument("--endpoint-selector", help="Kubernetes label selector of the engine pods")
    p.add_argument("--endpoint-target-port", type=int, default=8000, help="engine HTTP port")
    p.add_argument("--namespace", default="default", help="namespace of the pods")
    p.add_argument("--host", default="0.0.0.0", help="address the servers listen on")
    p.add_argument("--http-port", type=int, default=8085, help="HTTP port (scoring, metrics)")
    p.add_argument("--grpc-port", type=int, default=9095, help="gRPC port")
    p.add_argument("--tokenizer-dir", help="model directory whose tokenizer/chat template to use")
    p.add_argument(
        "--render-url", help="a vLLM server whose /render endpoints tokenize (exactly as vLLM)"
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per index block")
    p.add_argument("--hash-seed", default="", help="request-key hash seed (llm-d hashSeed)")
    p.add_argument("--hash-algorithm", default="cbor-fnv", choices=["cbor-fnv", "xxh64"])
    p.add_argument("--valkey-url", help="share the index in Redis/Valkey (redis:// or valkey://)")
    p.add_argument("--valkey-prefix", default="", help="key prefix in the shared index")
    p.add_argument("--max-keys", type=int, default=10_000_000, help="in-memory index: key bound")
    p.add_argument("--max-bytes", type=int, default=2 << 30, help="in-memory index: byte bound")
    p.add_argument("--socket-port", type=int, default=5557, help="engines' KV PUB port (no label)")
    p.add_argument("--replay-socket-port", type=int, default=0, help="engines' replay port")
    p.add_argument("--zmq-bind", help="also bind a SUB socket engines connect to (centralized)")
    p.add_argument("--shards", type=int, default=4, help="ordered apply queues")
    p.add_argument("--gpu-weight", type=float, default=1.0, help="score of a GPU-tier block")
    p.add_argument("--cpu-weight", type=float, default=0.8, help="score of a CPU-tier block")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("llmd-indexer", args.log_level)
    if args.block_size <= 0:
        print("llmd-indexer: --block-size must be positive", file=sys.stderr)
        return 2
    options = IndexerOptions(
        endpoints_file=args.endpoints_file,
        endpoint_selector=args.endpoint_selector,
        endpoint_target_port=args.endpoint_target_port,
        namespace=args.namespace,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        tokenizer_dir=args.tokenizer_dir,
        render_url=args.render_url,
        block_size=args.block_size,
        hash_seed=args.hash_seed,
        hash_algorithm=args.hash_algorithm,
        valkey_url=args.valkey_url,
        valkey_prefix=args.valkey_prefix,
        max_keys=args.max_keys,
        max_bytes=args.max_bytes,
        socket_port=args.socket_port,
        replay_socket_port=args.replay_socket_port,
        zmq_bind=args.zmq_bind,
        shards=args.shards,
        gpu_weight=args.gpu_weight,
        cpu_weight=args.cpu_weight,
    )
    try:
        app = IndexerApp(options)
    except ValueError as exc:
        print(f"llmd-indexer: {exc}", file=sys.stderr)
        return 2

    def wire(runner: ServiceRunner) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        runner.on_shutdown("indexer", app.stop)
        return app.run

    async def _run() -> int:
        runner = ServiceRunner("llmd-indexer", app.health)
        return await runner.run(wire(runner))

    try:
        return asyncio.run(_run())
    except OSError as exc:
        print(f"llmd-indexer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
