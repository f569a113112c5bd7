"""CONNECT tunnels: a blind TCP pipe to a host a route marks ``tunnel: true``.

No credential is added (the bytes are TLS the app speaks end to end); the tunnel is logged
with its route, host, port and byte counts. Everything else that asks for CONNECT gets a 403
saying why (see :meth:`sidecar.routing.RoutingTable.tunnel_for`).

After the ``200 Connection established`` line the connection stops being HTTP: the listener
hands its raw bytes over (:meth:`~sidecar.proxy.listener.Reply.take_over`). Backpressure holds both
ways: a slow upstream pauses reading from the app, a slow app pauses reading from upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.config import Destination
from sidecar.errors import Forbidden, UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.listener import Reply, Tunnel
from sidecar.proxy.origin_client import OriginRefused, OriginUnreachable, resolve
from sidecar.routing import tunnel_lookup_name

log = logging.getLogger("sidecar.tunnel")

CHUNK = 64 * 1024
HIGH_WATER = 256 * 1024


class _AppToUpstream:
    """Every byte from the app goes upstream; reading from the app pauses while it backs up."""

    def __init__(self, upstream: asyncio.StreamWriter) -> None:
        self._upstream = upstream
        self.app: Tunnel | None = None
        self.sent = 0
        self._draining: asyncio.Task[None] | None = None  # one at a time, kept referenced

    def __call__(self, data: bytes) -> None:
        self.sent += len(data)
        self._upstream.write(data)
        backed_up = self._upstream.transport.get_write_buffer_size() > HIGH_WATER
        if backed_up and self.app and self._draining is None:
            self.app.pause_reading()
            self._draining = asyncio.ensure_future(self._resume_after_drain())

    async def _resume_after_drain(self) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                await self._upstream.drain()
            if self.app is not None:
                self.app.resume_reading()
        finally:
            self._draining = None


async def open_tunnel(reply: Reply, dest: Destination, host: str, port: int) -> None:
    """Dial, answer 200, pipe until either side closes. Returns once the tunnel is over."""
    reader, writer = await _dial(dest, host, port)
    to_upstream = _AppToUpstream(writer)
    app = reply.take_over(to_upstream)
    to_upstream.app = app
    app.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    received = 0
    log.info("tunnel opened", extra={"route": dest.name, "host": host, "port": port})
    app_closed = asyncio.ensure_future(app.closed.wait())
    try:
        while not app_closed.done():
            read = asyncio.ensure_future(reader.read(CHUNK))
            await asyncio.wait({read, app_closed}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                break
            data = read.result()
            if not data:
                break
            received += len(data)
            app.write(data)
            await app.drain()  # backpressure from the app
    except (ConnectionError, OSError):
        pass
    finally:
        app_closed.cancel()
        writer.close()
        app.close()
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


async def _dial(
    dest: Destination, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(dest.connect_timeout):
            addresses = await resolve(tunnel_lookup_name(dest, host), port, dest.allow_private)
            return await asyncio.open_connection(addresses[0], port)
    except OriginRefused as exc:
        raise Forbidden(f"tunnel refused: {exc}", route=dest.name) from exc
    except TimeoutError as exc:
        raise UpstreamTimeout(f"cannot connect to {host}:{port} in time", route=dest.name) from exc
    except (OriginUnreachable, OSError) as exc:
        raise UpstreamUnavailable(
            f"cannot connect to {host}:{port} ({type(exc).__name__})", route=dest.name
        ) from exc
