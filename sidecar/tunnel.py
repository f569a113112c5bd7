"""CONNECT tunnels: a blind TCP pipe to a host a route marks ``tunnel: true``.

No credential is added (the bytes are TLS the app speaks end to end); the tunnel is logged
with its route, host, port and byte counts. Everything else that asks for CONNECT gets a 403
saying why (see :meth:`sidecar.routing.RoutingTable.tunnel_for`).

aiohttp's router never sees CONNECT (aio-libs/aiohttp#3257); the listener hands the request
here below the router. After the ``200 Connection established`` line the connection stops
being HTTP: the app's bytes are taken over with ``protocol.set_parser`` (the mechanism
aiohttp's own WebSocket support uses) and written upstream; upstream bytes go straight back.
Backpressure holds both ways: a slow reader pauses the other side's reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from aiohttp import web

from sidecar.config import Destination
from sidecar.errors import Forbidden, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("sidecar.tunnel")

CHUNK = 64 * 1024
HIGH_WATER = 256 * 1024


class _AppToUpstream:
    """A payload parser for aiohttp's protocol: every byte from the app goes upstream."""

    def __init__(self, request: web.BaseRequest, upstream: asyncio.StreamWriter) -> None:
        self._app = request.transport
        self._upstream = upstream
        self.sent = 0
        self.closed = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.sent += len(data)
        self._upstream.write(data)
        if self._upstream.transport.get_write_buffer_size() > HIGH_WATER and self._app:
            self._app.pause_reading()
            asyncio.ensure_future(self._resume_after_drain())  # noqa: RUF006 - short-lived
        return False, b""

    def feed_eof(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError, RuntimeError):
            if self._upstream.can_write_eof():
                self._upstream.write_eof()

    async def _resume_after_drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._upstream.drain()
        if self._app is not None and not self._app.is_closing():
            self._app.resume_reading()


async def open_tunnel(
    request: web.BaseRequest, dest: Destination, host: str, port: int
) -> web.StreamResponse:
    """Dial, answer 200, pipe until either side closes. Returns once the tunnel is over."""
    reader, writer = await _dial(dest, host, port)
    transport = request.transport
    assert transport is not None
    await request.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    to_upstream = _AppToUpstream(request, writer)
    request.protocol.set_parser(to_upstream)  # type: ignore[arg-type]
    received = 0
    log.info("tunnel opened", extra={"route": dest.name, "host": host, "port": port})
    try:
        while not transport.is_closing():
            data = await reader.read(CHUNK)
            if not data:
                break
            received += len(data)
            await request.writer.write(data)  # drains: backpressure from the app
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        transport.close()
        log.info(
            "tunnel closed",
            extra={
                "route": dest.name,
                "host": host,
                "port": port,
                "bytes_up": to_upstream.sent,
                "bytes_down": received,
            },
        )
    # The connection is gone; aiohttp's attempt to send this is ignored as a client reset.
    return web.Response(status=200)


async def _dial(
    dest: Destination, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    from sidecar.origin_client import is_private

    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(dest.connect_timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [info[4][0] for info in infos]
            if not dest.allow_private:
                addresses = [a for a in addresses if not is_private(str(a))]
            if not addresses:
                raise Forbidden(
                    f"{host} resolves to a loopback or link-local address; tunnel refused "
                    "(set allow_private: true on the route if this is intended)",
                    route=dest.name,
                )
            return await asyncio.open_connection(str(addresses[0]), port)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"cannot connect to {host}:{port} in time", route=dest.name) from exc
    except OSError as exc:
        raise UpstreamUnavailable(
            f"cannot connect to {host}:{port} ({type(exc).__name__})", route=dest.name
        ) from exc
