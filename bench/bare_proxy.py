"""Floor: the least a Python proxy on this stack can do per request — uvloop, llhttp
(httptools) both ways, pooled keep-alive TLS to the origin, a static Authorization header,
one task per connection. No routing, no credentials, no header hygiene beyond Host and
Connection, no timeouts, no metrics, no error handling: never run it for anything else.

It tells what the sidecar's policy costs on top of the event loop, TLS and the kernel.

    python -m bench.bare_proxy ORIGIN_URL PORT CA_FILE
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import sys
from typing import Any
from urllib.parse import urlsplit

import httptools
import uvloop

_HOP = (b"host", b"connection", b"proxy-connection", b"keep-alive")


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.transport: Any = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.answer is not None
        self.answer.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))


class _Downstream(asyncio.Protocol):
    def __init__(self, origin: tuple[str, int], context: ssl.SSLContext) -> None:
        self.origin, self.context = origin, context
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = (
            collections.deque()
        )
        self.ready: asyncio.Future[None] | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.transport: Any = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.task = asyncio.ensure_future(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.queue.append((self.parser.get_method(), self.url, self.headers))
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.ready = loop.create_future()
                await self.ready
                continue
            method, url, headers = self.queue.popleft()
            path = httptools.parse_url(url).path or b"/"
            if _IDLE:
                conn = _IDLE.pop()
            else:
                host, port = self.origin
                _, conn = await loop.create_connection(
                    _Upstream, host, port, ssl=self.context, server_hostname="localhost"
                )
            head = [
                method + b" " + path + b" HTTP/1.1\r\nHost: api\r\n"
                b"Authorization: Bearer static-benchmark-token\r\n"
            ]
            head += [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in _HOP]
            head.append(b"\r\n")
            conn.answer = loop.create_future()
            conn.transport.write(b"".join(head))
            status, answer_headers, body = await conn.answer
            _IDLE.append(conn)
            out = [b"HTTP/1.1 %d OK\r\n" % status]
            out += [n + b": " + v + b"\r\n" for n, v in answer_headers if n.lower() not in _HOP]
            out += [b"\r\n", body]
            self.transport.write(b"".join(out))


_IDLE: list[_Upstream] = []


async def serve(origin_url: str, port: int, ca_file: str) -> None:
    parts = urlsplit(origin_url)
    context = ssl.create_default_context(cafile=ca_file)
    origin = (parts.hostname or "127.0.0.1", parts.port or 443)
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Downstream(origin, context), "127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    origin, port, ca_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    uvloop.run(serve(origin, port, ca_file))


if __name__ == "__main__":
    main()
