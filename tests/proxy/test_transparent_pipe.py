"""The blind relay on loopback: bytes unchanged both ways, half-close passed on, and when both
directions are done both connections are closed (no descriptor is kept by a finished relay)."""

from __future__ import annotations

import asyncio
from typing import cast

from sidecar.proxy.transparent.pipe import Pipe


class _Accepted(asyncio.Protocol):
    def __init__(self, box: asyncio.Future[asyncio.Transport]) -> None:
        self._box = box

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        tcp.pause_reading()  # as the capture hands it over
        self._box.set_result(tcp)


async def test_bytes_half_close_and_closing_when_both_directions_are_done() -> None:
    loop = asyncio.get_running_loop()
    upstream_seen = bytearray()
    upstream_done = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_seen.extend(await reader.read())  # until the app's EOF arrives through us
        writer.write(b"answer:" + bytes(upstream_seen))
        writer.write_eof()  # half-close; keep the socket open
        await reader.read()  # returns at once: EOF already seen
        await upstream_done.wait()
        writer.close()

    up_server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up_server.sockets[0].getsockname()[1]
    box: asyncio.Future[asyncio.Transport] = loop.create_future()
    front = await loop.create_server(lambda: _Accepted(box), "127.0.0.1", 0)
    front_port = front.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        pipe = Pipe(await box)
        await pipe.connect("127.0.0.1", up_port, b"first:", timeout=5)
        running = asyncio.ensure_future(pipe.run())
        writer.write(b"rest")
        writer.write_eof()
        assert await reader.read() == b"answer:first:rest"  # EOF from upstream reached us
        async with asyncio.timeout(10):  # both directions done: the relay ends by itself
            up, down = await running
        assert (up, down) == (len(b"first:rest"), len(b"answer:first:rest"))
        writer.close()
    finally:
        upstream_done.set()
        front.close()
        up_server.close()
        await front.wait_closed()
        await up_server.wait_closed()
