"""Listener: the HTTP_PROXY endpoint the legacy app talks to.

An asyncio protocol with llhttp (through ``httptools``) as the parser: the request target is
kept byte-exact (absolute-form, as HTTP_PROXY clients send it), headers in order. llhttp is
strict: conflicting or repeated Content-Length, Content-Length with Transfer-Encoding, bare CR,
obsolete line folding and invalid tokens are errors, answered here with the JSON error shape and
a log line that never quotes the offending bytes. Head size is bounded (``max_header_bytes``),
bodies are buffered only up to a high-water mark (reading pauses until the data path takes
them), pipelined requests are answered in order, one at a time.

Stricter than llhttp, each a 400 that closes the connection (nothing is forwarded):
  - versions other than HTTP/1.0 and HTTP/1.1 (``HTTP/2.0``; a request line without a version,
    HTTP/0.9 style, followed by headers);
  - any ``_`` in a header name: CGI/WSGI-style upstreams read ``Transfer_Encoding`` as
    ``Transfer-Encoding`` and ``X_HTTP_Method_Override`` as an override, and which names an
    upstream folds cannot be known here (nginx drops such headers by default, Envoy can refuse);
  - a Content-Length above 2^53 - 1 (upstreams that parse it as a double disagree beyond it);
  - more than one Host header. A Host that differs from the absolute-form target is ignored:
    RFC 9112 §3.2.2, the target wins (the forwarder sends its own Host).
Chunked trailers (RFC 9112 §7.1.2) are dropped: never merged into the headers, whatever the
timing of the reads.

The seam to the rest of the data path is :data:`Handler`: ``await handler(request, reply)``.
The handler answers through :class:`Reply` (one write for a whole answer, or a stream), or raises
:class:`~sidecar.errors.ProxyError`, which becomes the JSON error if nothing was sent yet.
CONNECT requests are handed over raw with :meth:`Reply.take_over` (see ``tunnel.py``), or,
for an intercepting route, answered ``200`` and wrapped in TLS with :meth:`Reply.intercept`: the
same connection then goes on as origin-form requests whose :attr:`Request.authority` is the
CONNECT host (``intercept/``). One parser, one serving loop, one handler for both.

Transparent capture (``transparent/``) hands connections over with :meth:`Listener.adopt`: the
same protocol in a mode where :attr:`Request.captured` says where the app was going and which
host the connection is for (its requests are origin-form); everything else is the same path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any, NamedTuple, cast

import httptools

from sidecar.config import Address
from sidecar.errors import BadRequest, ProxyError
from sidecar.proxy.admission import Admission
from sidecar.proxy.flow import BodyBuffer, WriteFlow
from sidecar.proxy.intercept.server import ServerContexts, accept_tls
from sidecar.routing import OVERRIDE_HEADERS

log = logging.getLogger("sidecar.listener")

# An answer's headers: (name, value) pairs, or "Name: value\r\n" lines already encoded.
Headers = Iterable[tuple[str, str]] | bytes

HIGH_WATER = 256 * 1024  # request body bytes buffered before reading from the app pauses
LOW_WATER = 64 * 1024
MAX_PIPELINED = 16  # requests parsed ahead of the one being answered
KEEPALIVE_IDLE = 75.0  # seconds an idle keep-alive connection is kept
MAX_CONTENT_LENGTH = 2**53 - 1  # see the module docstring
HEAD_TIMEOUT = 30.0  # seconds to receive a request head once it started (slow-loris)
BODY_IDLE_TIMEOUT = 60.0  # seconds without a byte of a request body the data path waits for
SWEEP_INTERVAL = 5.0


class Captured(NamedTuple):
    """A connection the pod's nat rules redirected here: where it was going (``ip``, ``port``
    from SO_ORIGINAL_DST) and the routed host its first request named."""

    ip: str
    port: int
    host: str


class AppGone(ConnectionResetError):
    """The app closed its connection: nothing more can be said to it, nothing is sent for it."""


class Request:
    """One request from the app, as sent: method, raw target, headers in order, the body."""

    __slots__ = (
        "_body",
        "_complete",
        "_conn",
        "_expect_continue",
        "_failed",
        "_waiter",
        "authority",
        "captured",
        "chunked",
        "consumed",
        "content_length",
        "headers",
        "keep_alive",
        "local_port",
        "method",
        "overrides",
        "target",
        "upgrade",
        "version",
        "waiting_since",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        version: tuple[int, int],
        headers: list[tuple[str, str]],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.local_port = conn.port
        # (host, port) of the intercepted CONNECT this request was decrypted from, else None.
        self.authority = conn.authority
        self.captured = conn.captured  # None unless the connection was captured transparently
        self.content_length: int | None = None
        self.chunked = False
        self._expect_continue = False
        self.upgrade = False  # asks to switch protocols (WebSocket, h2c): refused
        # Method/URL override headers (lower-case name, value): the route's policy decides.
        self.overrides: Sequence[tuple[str, str]] = ()  # rare: no list made per request
        hosts = 0
        for name, value in headers:
            lower = name.lower()
            if lower not in _NOTED:
                continue  # the usual header: nothing to note (one set lookup, no compares)
            if lower == "host":
                hosts += 1
            elif lower == "upgrade":
                self.upgrade = method != "CONNECT"
            elif lower == "content-length":
                self.content_length = int(value)  # llhttp has checked it: one, and a number
                if self.content_length > MAX_CONTENT_LENGTH:
                    raise _Refused("Content-Length too large")
            elif lower == "transfer-encoding":
                self.chunked = self.chunked or "chunked" in value.lower()
            elif lower == "expect" and value.strip().lower() == "100-continue":
                self._expect_continue = version >= (1, 1)
            elif lower in OVERRIDE_HEADERS:
                self.overrides = [*self.overrides, (lower, value)]
        if hosts > 1:
            raise _Refused("more than one Host header")
        self._body: BodyBuffer | None = None  # made when body bytes arrive
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._failed = False
        self.consumed = False  # the whole body was read by the handler
        self.waiting_since: float | None = None  # the handler waits for body bytes since

    @property
    def peer_host(self) -> str | None:
        """The connection's peer address (host part), read when asked (the admin port's
        readiness detail): not on the data path."""
        transport = self._conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    @property
    def intercepted(self) -> bool:
        return self.authority is not None

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def app_gone(self) -> bool:
        """The app closed its connection: nobody will read an answer to this request."""
        return self._conn.closed

    def gone(self) -> asyncio.Future[None]:
        """A future completed when the app's connection closes (for waits that must end
        then: a request nobody waits for is never sent upstream)."""
        return self._conn.gone()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (llhttp has removed any chunked framing)."""
        while True:
            chunk = await self._next()
            if chunk is None:
                self.consumed = True
                return
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    # -- fed by the connection ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._body is None:
            conn = self._conn
            self._body = BodyBuffer(
                lambda: conn.pause_reading("body"),
                lambda: conn.resume_reading("body"),
                high=HIGH_WATER,
                low=LOW_WATER,
            )
        self._body.append(data)
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self) -> None:
        self._failed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self) -> bytes | None:
        if self._expect_continue:
            self._expect_continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self._failed:
                raise ConnectionResetError("the request body was malformed")
            if self._body:
                return self._body.pop()
            if self._complete:
                return None
            if self._conn.closed:
                raise AppGone("the app closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            self.waiting_since = time.monotonic()
            try:
                await self._waiter
            finally:
                self.waiting_since = None


class Reply:
    """How a handler answers. ``send`` writes a whole answer at once; ``start``/``write``/``end``
    stream one; ``take_over`` gives the raw connection to a CONNECT tunnel."""

    __slots__ = ("_bodiless", "_chunked", "_close", "_conn", "_request", "started", "status")

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self.status = 0
        self.started = False
        self._chunked = False
        self._close = not request.keep_alive
        self._bodiless = request.method == "HEAD"

    def _head(self, status: int, reason: str | bytes | None, headers: Headers) -> bytes:
        self.status = status
        self.started = True
        if self._conn.listener.stopping:
            self._close = True
        if isinstance(reason, str):
            reason = reason.encode("latin-1", "replace")
        block = headers if isinstance(headers, bytes) else _encode(headers)
        if self._chunked:
            block += b"Transfer-Encoding: chunked\r\n"
        if self._close:
            block += b"Connection: close\r\n"
        elif self._request.version < (1, 1):
            block += b"Connection: keep-alive\r\n"  # HTTP/1.0 assumes close unless told
        return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason or _phrase(status), block)

    def send(
        self,
        status: int,
        reason: str | bytes | None,
        headers: Headers,
        body: bytes = b"",
    ) -> None:
        """A whole answer in one write. ``headers`` (pairs, or ``Name: value\\r\\n`` lines
        already encoded) must carry Content-Length for the body."""
        head = self._head(status, reason, headers)
        self._conn.write(head if self._bodiless or not body else head + body)

    def send_error(self, error: ProxyError) -> None:
        body = error.encode()
        headers = [*error.headers().items(), ("Content-Length", str(len(body)))]
        self._close = self._close or error.status == 400  # the stream may be out of sync
        self.send(error.status, None, headers, body)

    async def start(
        self, status: int, reason: str | bytes | None, headers: Headers, *, sized: bool
    ) -> None:
        """Start a streamed answer; unsized bodies are chunked (HTTP/1.1) or end with the
        connection (HTTP/1.0)."""
        bodiless = self._bodiless or status in (204, 304) or 100 <= status < 200
        if not sized and not bodiless:
            if self._request.version >= (1, 1):
                self._chunked = True
            else:
                self._close = True
        self._bodiless = bodiless
        self._conn.write(self._head(status, reason, headers))
        await self._conn.drain()

    async def write(self, data: bytes) -> None:
        if not data or self._bodiless:
            return
        if self._chunked:
            self._conn.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self._conn.write(data)
        await self._conn.drain()

    async def end(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        await self._conn.drain()

    def abort(self) -> None:
        """The answer cannot be completed: close the connection (the app sees it cut)."""
        self._close = True
        self._conn.close()

    async def intercept(self, host: str, port: int, contexts: ServerContexts) -> None:
        """Answer a CONNECT ``200``, then terminate the app's TLS for ``host`` on the same
        connection; its requests come next, as origin-form for ``host:port``. Raises
        :class:`~sidecar.proxy.intercept.server.HandshakeFailed` (the connection is closed)."""
        conn = self._conn
        if conn._early_tunnel_bytes:
            # A ClientHello sent before our answer would be lost to the handshake.
            raise BadRequest("the app sent data before the CONNECT was answered")
        self.started = True
        self.status = 200
        conn.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await conn.start_tls(host, port, contexts)

    def take_over(self, sink: Callable[[bytes], None]) -> Tunnel:
        """Hand the connection to a tunnel: app bytes go to ``sink`` from now on."""
        self.started = True
        self.status = 200
        self._close = True
        return self._conn.tunnel(sink)


class Tunnel:
    """The app side of a CONNECT tunnel: write to the app, pause/resume reading from it."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.closed = conn.closed_event

    def write(self, data: bytes) -> None:
        self._conn.write(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def pause_reading(self) -> None:
        self._conn.pause_reading("tunnel")

    def resume_reading(self) -> None:
        self._conn.resume_reading("tunnel")

    def close(self) -> None:
        self._conn.close()


Handler = Callable[[Request, Reply], Awaitable[None]]


def _encode(headers: Iterable[tuple[str, str]]) -> bytes:
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    return lines.encode("utf-8", "surrogateescape")


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


class _HeadTooLarge(Exception):
    pass


class _Refused(Exception):
    """A head llhttp accepts and we do not (see the module docstring); str() is the reason."""


class _Connection(asyncio.Protocol):
    """One connection from the app."""

    def __init__(self, listener: Listener, port: int, captured: Captured | None = None) -> None:
        self.listener = listener
        self.port = port
        self.captured = captured
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._in_head = False  # False after the head: on_header then reports trailers
        self._head_bytes = 0
        self._head_started: float | None = None
        self._parsing: Request | None = None  # the request whose bytes are being parsed
        self._queue: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None  # answers requests, one at a time
        self._next: asyncio.Future[None] | None = None  # the task waits here for a request
        self.busy = False  # a request is being answered
        self._pauses: set[str] = set()
        self._flow = WriteFlow()
        self._sink: Callable[[bytes], None] | None = None
        self._broken = False  # a parse error: answer what is queued, then close
        self._early_tunnel_bytes = b""  # app bytes that followed a CONNECT head
        self.authority: tuple[str, int] | None = None  # set once TLS is intercepted
        self._handshaking = False
        self.closed = False
        self.closed_event = asyncio.Event()
        self._gone: asyncio.Future[None] | None = None  # made by the first wait that needs it
        self.last_activity = time.monotonic()

    # -- transport ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        listener = self.listener
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if not listener.admission.admit(len(listener.connections), fd):
            self.closed = True  # nothing is read from it; connection_lost has nothing to do
            transport.close()
            return
        listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closed_event.set()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self.listener.connections.discard(self)
        for request in (self._parsing, *self._queue):
            if request is not None:
                request._wake()
        self._flow.fail(AppGone("the app closed the connection"))
        if self._next is not None and not self._next.done():
            self._next.set_result(None)  # the serving task sees the connection closed and ends
        elif self.busy and self._sink is None and not self._handshaking and self._task:
            # Nobody will read the answer: stop waiting for it. A request still queued or
            # waiting for a token is never sent; one waiting on the upstream gives its
            # connection slot back now, not after read_timeout (a stalled upstream's slots
            # would otherwise stay taken by requests nobody waits for). Tunnels end by themselves.
            self._task.cancel()

    def gone(self) -> asyncio.Future[None]:
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.closed:
                self._gone.set_result(None)
        return self._gone

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise AppGone("the app closed the connection")
        waiter = self._flow.waiter()
        if waiter is not None:
            await waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def pause_reading(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def expired(self, now: float) -> bool:
        """A head that never finishes, a body that stopped arriving, or an idle keep-alive."""
        if self._sink is not None:
            return False  # tunnels end when either side closes
        started = self._head_started
        if started is not None and now - started > HEAD_TIMEOUT:
            return True
        waiting = self._queue[0].waiting_since if self._queue else None
        if waiting is not None and now - max(waiting, self.last_activity) > BODY_IDLE_TIMEOUT:
            return True
        return not self.busy and now - self.last_activity > KEEPALIVE_IDLE

    async def start_tls(self, host: str, port: int, contexts: ServerContexts) -> None:
        """Wrap this connection in TLS for ``host`` and go on as origin-form requests for
        ``host:port`` through the same parser and handler. Reading must be paused (it is
        after a CONNECT head); transparent capture (#19) calls this from its own entry."""
        transport = self.transport
        assert transport is not None
        self._handshaking = True
        try:
            tls = await accept_tls(transport, self, host, contexts)
        finally:
            self._handshaking = False
        self.transport = tls
        self.authority = (host, port)
        self._parser = httptools.HttpRequestParser(self)  # the CONNECT one is "upgraded"
        self.resume_reading("connect")

    def tunnel(self, sink: Callable[[bytes], None]) -> Tunnel:
        self._sink = sink
        early, self._early_tunnel_bytes = self._early_tunnel_bytes, b""
        if early:
            sink(early)
        self.resume_reading("connect")
        return Tunnel(self)

    # -- parsing -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self._sink is not None:
            self._sink(data)
            return
        if self._broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :] if upgrade.args else b"")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                reason = "headers too large"
            elif isinstance(cause, _Refused):
                reason = str(cause)
            else:
                reason = type(exc).__name__
                if cause is not None:  # our callback failed: a bug, not the app's fault
                    log.error(
                        "internal error parsing a request", extra={"error": type(cause).__name__}
                    )
            self._malformed(reason)

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0
        self._head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every header of every request: the size count is inlined (_count).
        if not self._in_head:
            # A chunked trailer: dropped, never promoted to a header (counted: bounded).
            self._count(len(name) + len(value) + 4)
            return
        text = name.decode("utf-8", "surrogateescape")
        # On the decoded name: ``b"_" in name`` first tries the operand as an int (a
        # TypeError raised and cleared, ~1 µs a header). Only the byte 0x5F decodes to "_".
        if "_" in text:
            raise _Refused("'_' in a header name")
        self._headers.append((text, value.decode("utf-8", "surrogateescape")))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.listener.max_header_bytes:
            raise _HeadTooLarge()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.listener.max_header_bytes:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._head_started = None
        self._in_head = False
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Refused("only HTTP/1.0 and HTTP/1.1 are supported")
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            self._headers,
            parser.should_keep_alive(),
        )
        self._parsing = request
        self._queue.append(request)
        if len(self._queue) > 1:
            self.pause_reading("pipeline")  # answer in order before parsing further
        if len(self._queue) > MAX_PIPELINED:
            self._malformed("too many pipelined requests")
            return
        if self._task is None:
            self._task = self.listener.spawn(self._serve())
        elif self._next is not None and not self._next.done():
            self._next.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._finish()
            self._parsing = None

    def _upgraded(self, rest: bytes) -> None:
        request = self._queue[-1] if self._queue else None
        if request is None or request.method != "CONNECT":
            # Upgrade (WebSocket, h2c) on a plain request: that request is answered with a
            # 400 (Request.upgrade); nothing after it is parsed.
            self._broken = True
            self.pause_reading("broken")
            return
        request._finish()
        self._parsing = None
        self.pause_reading("connect")  # until the tunnel (or an error answer) takes over
        if rest:
            self._early_tunnel_bytes = rest

    def _malformed(self, reason: str) -> None:
        self._broken = True
        self.pause_reading("broken")
        request, self._parsing = self._parsing, None
        if request is not None:
            request._fail()  # its body is cut: reading it raises, nothing incomplete is sent
            active = self.busy and self._queue and self._queue[0] is request
            if not active:
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
        if not self.busy and not self._queue:
            log.warning("malformed request", extra={"status": 400, "error": reason})
            self._send_malformed(reason)

    def _send_malformed(self, reason: str) -> None:
        error = BadRequest(f"malformed HTTP request ({reason}); nothing was forwarded")
        body = error.encode()
        headers = "".join(f"{k}: {v}\r\n" for k, v in error.headers().items())
        self.write(
            f"HTTP/1.1 400 Bad Request\r\n{headers}Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        self.close()

    # -- answering ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        """One task per connection: answer queued requests in order, wait for the next."""
        listener = self.listener
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                if not self._queue:
                    if self._broken:
                        self.close()  # what followed could not be parsed: nothing more
                        return
                    self._next = loop.create_future()
                    await self._next
                    self._next = None
                    continue
                request = self._queue[0]
                reply = Reply(self, request)
                self.busy = True
                try:
                    await listener.dispatch(request, reply)
                finally:
                    self.busy = False
                self._queue.popleft()
                self.last_activity = time.monotonic()
                if request.method == "CONNECT" and request.authority is None:
                    if self.authority is None or self.closed:
                        self.close()  # a tunnel ended, or a refusal: nothing more
                        return
                    continue  # intercepted: its requests come in TLS on this connection
                if (
                    reply._close
                    or not request.keep_alive
                    or request.method == "CONNECT"
                    or (not request.consumed and not request._complete)
                ):
                    # Closing: asked to, or the body was not read to its end.
                    self.close()
                    return
                if not request.consumed and request._body is not None:
                    request._body.clear()
                if self._pauses:
                    self.resume_reading("pipeline")
        finally:
            self._task = None


_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
# The header names Request.__init__ looks at; every other one is passed over with one lookup.
_NOTED = frozenset({"host", "upgrade", "content-length", "transfer-encoding", "expect"}) | (
    OVERRIDE_HEADERS
)


class Listener:
    def __init__(
        self, handler: Handler, *, max_header_bytes: int, admission: Admission | None = None
    ) -> None:
        self._handler = handler
        self.max_header_bytes = max_header_bytes  # both swapped on reload
        self.admission = admission or Admission(4096)
        self._servers: list[asyncio.Server] = []
        self.connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.stopping = False
        self._idle = asyncio.Event()  # set when nothing is in flight
        self._idle.set()

    async def start(
        self,
        address: Address,
        *,
        reuse_port: bool = False,
        factory: Callable[[int], asyncio.Protocol] | None = None,
    ) -> Address:
        """Listen on one more address (the proxy port, or a route's ``local_port``); with
        ``factory``, connections get ``factory(port)`` as protocol (transparent capture)."""
        loop = asyncio.get_running_loop()
        port_box: list[int] = [address.port]
        make = factory or (lambda port: _Connection(self, port))
        server = await loop.create_server(
            lambda: make(port_box[0]),
            address.host,
            address.port,
            reuse_port=reuse_port or None,
        )
        host, port = server.sockets[0].getsockname()[:2]
        port_box[0] = port
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        return Address(host, port)

    def connection(self, port: int) -> _Connection:
        """A protocol for one more connection served here (an in-process one: see
        ``transparent/capture.py``, intercepted TLS)."""
        return _Connection(self, port)

    def adopt(
        self, transport: asyncio.Transport, port: int, captured: Captured, first: bytes
    ) -> None:
        """Serve a captured connection (reading paused) from here on; ``first`` are the bytes
        already read from it (its first request's head)."""
        conn = _Connection(self, port, captured)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if conn.closed:
            return  # not admitted
        conn.data_received(first)
        if not conn.closed and not conn._pauses:
            transport.resume_reading()

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` s, then close."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()  # idle keep-alive connections
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "grace period over; closing requests still in flight",
                extra={"in_flight": self.in_flight},
            )
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            await server.wait_closed()

    async def _sweep(self) -> None:
        """Close idle keep-alive connections and heads that never finish arriving."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.expired(now):
                    conn.close()

    async def dispatch(self, request: Request, reply: Reply) -> None:
        if not self.in_flight:
            self._idle.clear()
        self.in_flight += 1
        started = time.perf_counter()
        try:
            if request.upgrade:
                raise BadRequest(
                    "protocol upgrades (WebSocket, h2c) are not supported through the sidecar; "
                    "only plain HTTP/1.1 requests are"
                )
            await self._handler(request, reply)
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
            if reply.started:
                reply.abort()
            else:
                reply.send_error(error)
        except ConnectionError:
            reply.abort()  # the app went away, or its body was cut: nothing more to say
        except asyncio.CancelledError:
            reply.abort()
            raise
        except Exception as exc:
            log.error("internal error", extra={"error": type(exc).__name__})
            if reply.started:
                reply.abort()
            else:
                reply.send_error(ProxyError("the sidecar failed to handle this request"))
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request",
                    extra={
                        "method": request.method,
                        "status": reply.status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
