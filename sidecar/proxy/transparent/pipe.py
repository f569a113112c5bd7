"""A blind TCP relay between the app's connection and one the sidecar opened: every byte
unchanged, backpressure both ways (a side whose peer's write buffer is full stops being read),
half-close passed on, and closing either side closes the other.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast


class _Side(asyncio.Protocol):
    """One end: what it receives is written to ``peer``."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.received = 0
        self._done = done
        self._closed = False
        self.eof = False  # this side sent its last byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer._closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.eof:
            return False  # both directions are done: close (connection_lost closes the peer)
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep the other direction open (half-close)
        return False

    def pause_writing(self) -> None:  # our peer sends faster than we can write: stop reading it
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer._closed:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer._closed:
            peer.transport.close()
        if (peer is None or peer._closed) and not self._done.done():
            self._done.set_result(None)


class Pipe:
    """Relay ``app`` (an accepted transport, reading paused) to ``host:port``; ``first`` are
    the app's bytes already read. :meth:`run` returns when both sides are closed."""

    def __init__(self, app: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.app = _Side(self.done)
        self.upstream = _Side(self.done)
        self.app.peer, self.upstream.peer = self.upstream, self.app
        app.set_protocol(self.app)
        self.app.connection_made(app)

    async def connect(self, host: str, port: int, first: bytes, timeout: float) -> None:
        """Open the upstream side and send ``first``; raises OSError / TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: self.upstream, host, port)
        assert self.upstream.transport is not None
        if self.app._closed:  # the app left while we dialled
            self.upstream.transport.close()
            return
        self.app.received += len(first)
        if first:
            self.upstream.transport.write(first)

    async def attach(self, sock: socket.socket, first: bytes) -> None:
        """Use a connected ``sock`` as the upstream side (the in-process pair of intercepted
        TLS) and send ``first``."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self.upstream, sock=sock)
        assert self.upstream.transport is not None
        self.app.received += len(first)
        self.upstream.transport.write(first)

    async def run(self) -> tuple[int, int]:
        """Relay until both sides are closed; bytes (app -> upstream, upstream -> app)."""
        app = self.app.transport
        assert app is not None
        app.resume_reading()
        try:
            await asyncio.shield(self.done)
        finally:
            self.close()
        return self.app.received, self.upstream.received

    def close(self) -> None:
        for side in (self.app, self.upstream):
            if side.transport is not None:
                side.transport.close()
