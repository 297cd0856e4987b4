"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

httpx spends ~0.3 ms of Python per request; at a few thousand requests/s on 2 shared cores that
would make the client the thing being measured. Requests here are prebuilt byte strings (request
line + headers + body), so a send is one write and a response is one header read plus one body read.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class HttpError(Exception):
    """The server broke the protocol or the connection (counted under this class's name)."""


def build_request(method: str, url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Keep-alive connections to one host:port; grows on demand (closed loop: one per client task)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        conn = _Conn(reader, writer)
        self._all.add(conn)
        return conn

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; (status, body). Retries once on a stale keep-alive connection."""
        reused = bool(self._idle)
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            conn.writer.write(raw)
            status, body, keep = await _read_response(conn.reader)
        except (ConnectionError, asyncio.IncompleteReadError, HttpError):
            self._drop(conn)
            if not reused:
                raise
            conn = await self._connect()
            conn.writer.write(raw)
            status, body, keep = await _read_response(conn.reader)
        except BaseException:
            self._drop(conn)  # cancelled mid-response: the stream position is unknown
            raise
        if keep:
            self._idle.append(conn)
        else:
            self._drop(conn)
        return status, body

    def _drop(self, conn: _Conn) -> None:
        self._all.discard(conn)
        conn.close()

    async def close(self) -> None:
        for conn in list(self._all):
            self._drop(conn)
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError("connection closed before a response") from exc
    lines = head.decode("latin-1").split("\r\n")
    try:
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
    except ValueError as exc:
        raise HttpError(f"bad status line {lines[0]!r}") from exc
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
        keep = False
    return status, body, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailers not used by the servers we measure
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
