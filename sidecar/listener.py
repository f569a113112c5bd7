"""Listener: the HTTP_PROXY endpoint the legacy app talks to (aiohttp low-level server).

Below aiohttp's router on purpose: the router never matches absolute-form targets' CONNECT
(aio-libs/aiohttp#3257), and a proxy has no routes of its own. The request target is read
byte-exact from ``raw_path``; when it disagrees with the Host header, the target wins
(RFC 9112 §3.2.2).

The seam to the rest of the data path is :class:`Handler`: anything that turns a request into
a response. A leaner forwarder can replace this module without touching routing or credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web, web_protocol

from sidecar.config import Address
from sidecar.errors import BadRequest, ProxyError

log = logging.getLogger("sidecar.listener")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def error_response(error: ProxyError) -> web.Response:
    return web.Response(status=error.status, body=error.encode(), headers=error.headers())


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering unparseable requests in our JSON shape.

    aiohttp's own answer is text with the offending bytes echoed, and it logs a traceback that
    may quote a header line; a malformed ``Authorization`` line must not reach the logs.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer with an error")
        if status >= 500:
            log.error("internal error", extra={"error": type(exc).__name__ if exc else None})
            error = ProxyError("the sidecar failed to handle this request")
        else:
            reason = type(exc).__name__ if exc else "BadRequest"
            log.warning("malformed request", extra={"status": status, "error": reason})
            error = BadRequest(f"malformed HTTP request ({reason}); nothing was forwarded")
        response = error_response(error)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class Listener:
    def __init__(self, handler: Handler, *, max_header_bytes: int) -> None:
        self._handler = handler
        self._server = _Server(
            self._handle,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
            handler_cancellation=True,
            auto_decompress=False,  # request bodies pass through as the app encoded them
        )
        self._sockets: list[asyncio.Server] = []
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, address: Address, *, reuse_port: bool = False) -> Address:
        """Listen on one more address (the proxy port, or a route's ``local_port``)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._server, address.host, address.port, reuse_port=reuse_port or None
        )
        self._sockets.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` s, then close."""
        for server in self._sockets:
            server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "grace period over; closing requests still in flight",
                extra={"in_flight": self.in_flight},
            )
        await self._server.shutdown(timeout=0.1)
        for server in self._sockets:
            await server.wait_closed()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        self._idle.clear()
        started = time.perf_counter()
        status = 0
        try:
            response = await self._dispatch(request)
            status = response.status
            return response
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request",
                    extra={
                        "method": request.method,
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._handler(request)
        except ProxyError as error:
            log.warning(
                "request refused",
                extra={
                    "route": error.route,
                    "error": error.code,
                    "status": error.status,
                    "method": request.method,
                    "detail": error.detail,
                },
            )
            return error_response(error)
