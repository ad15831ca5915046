"""A small HTTP/1.1 GET client for scraping: one kept-alive connection per engine.

The scheduler GETs every engine's `/metrics` many times a second; with a general client
(aiohttp) most of a scrape's CPU goes to the client's own machinery, not to the bytes.
`benchmarks/scrape_cost.py` measures the difference. This client does only what a scrape needs:
`GET path` on a persistent connection, a `Content-Length` or chunked body, a size bound, and a
deadline. Anything else (another status, a bad header, a closed or slow connection) is a
`ScrapeError`, and the connection is dropped and opened again on the next call.
"""

from __future__ import annotations

import asyncio
import contextlib

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


class ScrapeError(Exception):
    """The GET failed; the message says why."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """Status and lower-cased headers of a response head (without the final CRLFCRLF)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ScrapeError(f"bad status line {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ScrapeError(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return int(parts[1]), headers


class ScrapeClient:
    """GETs against one `host:port`, reusing its connection."""

    def __init__(self, host: str, port: int, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()

    async def get(self, path: str) -> bytes:
        """The body of `GET path` (status 200 only)."""
        async with self._lock:  # one request at a time on the connection
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._get(path)
            except TimeoutError:
                self._drop()
                raise ScrapeError(f"no answer within {self.timeout_s:g}s") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self._drop()
                raise ScrapeError(f"{type(exc).__name__}: {exc}") from None
            except ScrapeError:
                self._drop()
                raise

    async def _get(self, path: str) -> bytes:
        fresh = self._conn is None
        if self._conn is None:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=MAX_HEADER_BYTES
            )
            self._conn = _Conn(reader, writer)
        conn = self._conn
        conn.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: */*\r\nUser-Agent: llmd-scraper\r\n\r\n".encode()
        )
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            if fresh:
                raise
            # the engine closed an idle kept-alive connection: once more on a new one
            self._drop()
            return await self._get(path)
        status, headers = parse_head(head[:-4])
        body = await self._body(conn.reader, headers)
        if headers.get(b"connection", b"").lower() == b"close":
            self._drop()
        if status != 200:
            raise ScrapeError(f"HTTP {status}")
        return body

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts: list[bytes] = []
            total = 0
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ScrapeError(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise ScrapeError("negative chunk size")
                total += size
                if total > MAX_BODY_BYTES:
                    raise ScrapeError(f"body over {MAX_BODY_BYTES} bytes")
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise ScrapeError("chunk not followed by CRLF")
        raw = headers.get(b"content-length")
        if raw is None:
            raise ScrapeError("response without Content-Length or chunked encoding")
        try:
            length = int(raw)
        except ValueError:
            raise ScrapeError(f"bad Content-Length {raw[:40]!r}") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ScrapeError(f"Content-Length {length} out of bounds")
        return await reader.readexactly(length)

    def discard(self) -> None:
        """Close the connection now (the engine left the pool); a later get opens a new one."""
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        async with self._lock:
            self._drop()
