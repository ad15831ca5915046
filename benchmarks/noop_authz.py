"""A do-nothing HTTP check server for Envoy's ext_authz filter: the floor under a scheduler that
routes through ext_authz (HTTP/1.1) instead of ext_proc (gRPC).

Envoy sends each request's headers and buffered body as one HTTP/1.1 request; the answer, 200
with `x-gateway-destination-endpoint`, is copied onto the upstream request. Round-robin over the
endpoints given, with no parsing beyond the HTTP framing. `gateway_overhead.py` runs it as the
`noop-authz` target.

Usage: python benchmarks/noop_authz.py PORT HOST:PORT[,HOST:PORT...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys


class CheckProtocol(asyncio.Protocol):
    def __init__(self, answers: itertools.cycle[bytes]) -> None:
        self.answers = answers
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"\ncontent-length:")
            length = 0
            if i >= 0:
                j = head.find(b"\r", i + 16)
                length = int(head[i + 16 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            assert self.transport is not None
            self.transport.write(next(self.answers))


async def serve(port: int, destinations: list[str]) -> None:
    answers = itertools.cycle(
        [
            b"HTTP/1.1 200 OK\r\nx-gateway-destination-endpoint: "
            + d.encode()
            + b"\r\ncontent-length: 0\r\n\r\n"
            for d in destinations
        ]
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CheckProtocol(answers), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        raise SystemExit(2)
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2].split(",")))
