"""A do-nothing ext_proc server on Python grpc.aio: the floor under any Python scheduler.

It answers the lean path's two messages per request (request headers, then the buffered body)
and routes round-robin over the endpoints given, with no parsing, scoring or accounting.
`gateway_overhead.py` runs it as the `noop-extproc` target.

Usage: python benchmarks/noop_extproc.py PORT HOST:PORT[,HOST:PORT...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class NoopProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, destinations: list[str]) -> None:
        self.next = itertools.cycle(destinations).__next__

    async def Process(  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "request_body":
                header = base_pb2.HeaderValue(
                    key="x-gateway-destination-endpoint", raw_value=self.next().encode()
                )
                mutation = pb.HeaderMutation(
                    set_headers=[base_pb2.HeaderValueOption(header=header)]
                )
                common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


async def serve(port: int, destinations: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(destinations), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await checks.set("envoy.service.ext_proc.v3.ExternalProcessor", serving)
    await server.wait_for_termination()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        raise SystemExit(2)
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2].split(",")))
