"""Origin client: the data path's HTTP/1.1 client to the real APIs, over pooled keep-alive
connections (asyncio protocols, responses parsed by llhttp through ``httptools``).

Why not aiohttp's client: measured with ``bench/``, it was most of the sidecar's CPU per
request. The token client uses it too (:class:`UrlClient`): the product has one HTTP stack.

What it does, and no more: resolve (refusing loopback/link-local addresses unless the route
allows them), connect with a timeout, TLS with the route's context and SNI, write one request
(a buffered body with ``Content-Length``, or a streamed one, chunked when its length is
unknown), and read one response: headers within ``read_timeout``, body chunks with bounded
buffering (reading from the origin pauses while the app is slow). A connection goes back to
the pool only if the response was read to its end and both sides allow keep-alive. Interim
1xx responses are skipped; HEAD answers close the connection (llhttp cannot be told that a
HEAD response has no body); a protocol upgrade is refused.

Response headers stay as llhttp gave them (``bytes`` pairs, names lowered once) so the
forwarder can relay them without decoding. Each connection has one timer for all its timeouts
(see ``_watch``), not one per request.

Errors are :class:`OriginError` subclasses; the forwarder turns them into the app's JSON errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from sidecar.proxy.flow import BodyBuffer, WriteFlow

HIGH_WATER = 256 * 1024  # body bytes buffered from the origin before reading pauses
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # response status line and headers
MAX_IDLE_PER_ORIGIN = 64


class OriginError(Exception):
    """The exchange with the origin failed; ``str()`` is safe to show (no header values)."""


class OriginRefused(OriginError):
    """The origin's addresses are ones the route may not dial (SSRF guard)."""


class OriginUnreachable(OriginError):
    """DNS, TCP or TLS failed."""


class OriginTimeout(OriginError):
    """Connecting or waiting for the origin took longer than allowed."""


class OriginBroken(OriginError):
    """The origin closed the connection or answered something that is not HTTP/1.1."""


# Addresses not dialled unless a route says allow_private: true. Private RFC 1918 ranges are
# not here (in-cluster APIs live there); what is here reaches the host itself or a cloud's
# instance metadata / credentials service.
_REFUSED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.x.y.z reaches the local host on Linux
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local: AWS/GCP/Azure/OCI metadata at 169.254.169.254
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
_REFUSED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::1/128",
        "::/128",
        "fe80::/10",  # link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "ff00::/8",  # multicast
        "64:ff9b:1::/48",  # RFC 8215 local-use NAT64: where the IPv4 sits depends on the prefix
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 §2.5.5.1 (deprecated) ::a.b.c.d


def is_private(address: str) -> bool:
    """Loopback, link-local (cloud metadata), unspecified, multicast, or an IPv6 form that
    embeds one of those IPv4 addresses: not dialled by default. ValueError: not an address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            ip = embedded
        else:
            return any(ip in net for net in _REFUSED_V6)
    return any(ip in net for net in _REFUSED_V4)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address (the server's is a public relay)
    return None


@dataclass(frozen=True)
class Origin:
    """Where to connect, and how: the pool key."""

    host: str  # without brackets
    port: int
    ssl: ssl.SSLContext | None  # None: plain http
    allow_private: bool
    # Resolve host as an absolute name (no resolv.conf search list): a name synthesised from a
    # request, which in a cluster could otherwise reach <name>.<namespace>.svc.cluster.local.
    absolute: bool = False

    def __post_init__(self) -> None:
        # The pool's key, looked up twice per request: hashed once (equality is unchanged).
        fields = (self.host, self.port, self.ssl, self.allow_private, self.absolute)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    @property
    def lookup_name(self) -> str:
        host = self.host
        if not self.absolute or host.endswith(".") or ":" in host or host[-1:].isdigit():
            return host  # relative by choice, already absolute, or an address
        return f"{host}."


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    deadline: float | None = None  # loop time by which the whole exchange must be over


class Response:
    """One response from the origin. Read its body (whole or in chunks), then ``release()``.

    Headers stay as the parser gave them (``bytes`` pairs): they are relayed to the app as they
    are, and looked up by lower-case name (:meth:`get`).
    """

    __slots__ = ("_conn", "content_length", "lowered_names", "raw_headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        names: list[bytes],
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        self.lowered_names = names  # one per raw_headers pair, in order
        self.content_length = content_length

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        names = self.lowered_names
        return self.raw_headers[names.index(name)][1] if name in names else None

    def getall(self, name: bytes) -> list[bytes]:
        return [self.raw_headers[i][1] for i, n in enumerate(self.lowered_names) if n == name]

    def whole_body(self) -> bytes | None:
        """The whole body if it has all arrived (usual for small answers), else None."""
        conn = self._conn
        return conn.take_body() if conn.complete_body_ready() else None

    async def read(self) -> bytes:
        """The whole body (callers only do this for a known, bounded ``content_length``)."""
        body = self.whole_body()
        if body is not None:
            return body
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        conn = self._conn
        while True:
            chunk = await conn.next_chunk()
            if chunk is None:
                return
            yield chunk

    def release(self) -> None:
        """Give the connection back if the response was read to its end, else close it."""
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; one exchange at a time."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._head: asyncio.Future[Response] | None = None
        self._status_reason = b""
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_request = False
        self._body = BodyBuffer(
            self._pause_reading, self._resume_reading, high=HIGH_WATER, low=LOW_WATER
        )
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._failed: OriginError | None = None
        self._flow = WriteFlow()
        self._timeouts: Timeouts | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watched: tuple[asyncio.Future[Any], str, float] | None = None
        self._eof_body = False  # the body of the current response ends with the connection
        self.received_any = False
        self.reusable = True
        self.closed = False

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but it is one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(OriginBroken("the origin switched protocols; not supported"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, OriginError):
                self._fail(cause)
            else:
                self._fail(OriginBroken("the origin's answer is not valid HTTP/1.1"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.reusable = False
        self._pool.forget(self)
        if self._head is not None and not self._complete:
            if self._eof_body and self._head.done():
                self._complete = True  # HTTP/1.0 style: the body ends with the connection
                self._wake_body()
            else:
                self._fail(OriginBroken("the origin closed the connection"))
        self._flow.fail(OriginBroken("the origin closed the connection"))

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is None or self._complete:
            # Bytes after the end of the response we asked for: a desynchronised origin.
            raise OriginBroken("the origin sent an unsolicited response")
        self._status_reason = b""
        self._header_pairs = []
        self._head_bytes = 0
        self._eof_body = False

    def on_status(self, status: bytes) -> None:
        self._status_reason += status
        self._count(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_pairs.append((name, value))
        # _count inlined: called for every header of every answer.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise OriginBroken("the origin's status line and headers are too large")

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise OriginBroken("the origin's status line and headers are too large")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            return  # interim response (100 Continue, 103 Early Hints): wait for the real one
        pairs = self._header_pairs
        names = []
        length: int | None = None
        framed = status in (204, 304)  # bodiless
        for name, value in pairs:
            lower = name.lower()
            names.append(lower)
            if lower == b"content-length":
                length = int(value) if value.isdigit() else None  # llhttp checked it
                framed = True
            elif lower == b"transfer-encoding":
                framed = framed or b"chunked" in value.lower()
        if not parser.should_keep_alive():
            self.reusable = False
        self._eof_body = not framed  # HTTP/1.0 style: the body ends with the connection
        response = Response(self, status, self._status_reason, pairs, names, length)
        if self._head_request:
            self.reusable = False  # llhttp would wait for a body a HEAD response never has
            self._complete = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._wake_body()

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            return
        self._complete = True
        self._wake_body()

    # -- the exchange ------------------------------------------------------------------------

    def _fail(self, error: OriginError) -> None:
        if self._failed is None:
            self._failed = error
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake_body()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Timeouts: one timer per connection, not one per wait. A wait records its future and
    # deadline; the timer, when it fires, expires the future if that deadline has passed, or
    # re-arms itself for the deadline of the wait in progress. A keep-alive connection thus
    # arms a timer about once per read timeout instead of once per request.

    def _watch(self, future: asyncio.Future[Any], what: str) -> None:
        timeouts = self._timeouts
        assert timeouts is not None
        now = self._loop.time()
        deadline = now + timeouts.read
        if timeouts.deadline is not None and timeouts.deadline < deadline:
            deadline = timeouts.deadline
        self._watched = (future, what, deadline)
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        watched = self._watched
        if watched is None or watched[0].done():
            return  # nothing waits now: no timer until something does
        future, what, deadline = watched
        if self._loop.time() >= deadline:
            _expire(future, what)
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    async def _wait(self, future: asyncio.Future[Any], what: str) -> Any:
        if future.done():
            return future.result()
        self._watch(future, what)
        try:
            return await future
        finally:
            self._watched = None

    async def drain(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self.closed:
            raise OriginBroken("the origin closed the connection")
        waiter = self._flow.waiter()
        if waiter is not None:
            await self._wait(waiter, "accepting the request body")

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        method: str,
        timeouts: Timeouts,
    ) -> Response:
        """Send one request; the response once its headers are in (within ``read``)."""
        self._timeouts = timeouts
        self._head_request = method == "HEAD"
        self._complete = False
        self._failed = None
        self._body.clear()
        self.received_any = False
        loop = self._loop
        head_future: asyncio.Future[Response] = loop.create_future()
        self._head = head_future
        transport = self.transport
        assert transport is not None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
            else:
                transport.write(head)
                async for chunk in body:
                    if not chunk:
                        continue
                    if chunked:
                        transport.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    else:
                        transport.write(chunk)
                    await self.drain()
                if chunked:
                    transport.write(b"0\r\n\r\n")
            if head_future.done():
                return head_future.result()
            if self._failed is not None:
                raise self._failed
            self._watch(head_future, "answering")
            try:
                return await head_future
            finally:
                self._watched = None
        except BaseException:
            # The origin may have failed the head while the body was going out: that error is
            # raised from here, so mark it retrieved (else asyncio logs "Future exception was
            # never retrieved" when the future is collected).
            if head_future.done() and not head_future.cancelled():
                head_future.exception()
            self.close()
            raise

    async def next_chunk(self) -> bytes | None:
        while True:
            if self._body:
                return self._body.pop()
            if self._complete:
                return None
            if self._failed is not None:
                raise self._failed
            self._body_waiter = self._loop.create_future()
            await self._wait(self._body_waiter, "sending the response body")

    def complete_body_ready(self) -> bool:
        return self._complete and self._failed is None

    def take_body(self) -> bytes:
        return self._body.take_all()

    def finish(self) -> None:
        """The exchange is over: back to the pool if clean and complete, else close."""
        self._head = None
        if self._complete and self.reusable and not self._body and self._failed is None:
            self._pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()


def _expire(future: asyncio.Future[Any], what: str) -> None:
    if not future.done():
        future.set_exception(OriginTimeout(f"the origin took too long {what}"))


class Pool:
    """Idle keep-alive connections per :class:`Origin`, and the way to make new ones."""

    def __init__(
        self,
        *,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
        on_connect_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._max_idle = max_idle
        self._on_connect_error = on_connect_error  # sees EMFILE: running out of descriptors
        self._live_contexts: set[int] | None = (
            None  # ids of the live TLS contexts, after a retire()
        )

    def give_back(self, conn: _Connection) -> None:
        ssl_context = conn.origin.ssl
        if conn.closed or (
            self._live_contexts is not None
            and ssl_context is not None
            and id(ssl_context) not in self._live_contexts
        ):
            conn.close()  # made for a config that has been replaced
            return
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        if idle is not None and not idle:
            del self._idle[conn.origin]  # no empty entry per origin ever seen (wildcards)

    def retire(self, contexts: Collection[ssl.SSLContext]) -> int:
        """Close the idle connections made with a TLS context not in ``contexts`` (those of
        the config in force), so an old config's contexts and connections are not kept alive
        by the pool. Connections in use finish their exchange and are closed when released
        (their origin is no longer pooled). Returns how many were closed."""
        live = {id(context) for context in contexts}
        closed = 0
        for origin in [o for o in self._idle if o.ssl is not None and id(o.ssl) not in live]:
            for conn in self._idle.pop(origin):
                conn.close()
                closed += 1
        self._live_contexts = live
        return closed

    @property
    def idle_count(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def __len__(self) -> int:
        """Open connections, idle or in use."""
        return len(self._all)

    def drop(self, context: ssl.SSLContext) -> None:
        """Close the idle connections made with ``context`` and forget their origins (a
        superseded client certificate: nothing may present it again)."""
        for origin in [o for o in self._idle if o.ssl is context]:
            for conn in self._idle.pop(origin):
                conn.close()

    async def close(self) -> None:
        # Abort, not close: a graceful TLS close waits for the peer's close_notify, and a peer
        # that keeps the connection open without answering it (Keycloak does) left the event
        # loop unable to close at shutdown. Nothing is in flight here any more.
        for conn in list(self._all):
            if conn.transport is not None and not conn.closed:
                conn.reusable = False
                conn.transport.abort()
        self._idle.clear()

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
        timeouts: Timeouts,
    ) -> Response:
        """Send one request; return the response once its headers are in."""
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            # A value with a line break would split a header (or smuggle one).
            raise OriginBroken("refusing to send a header with a line break")
        head = f"{method} {target} HTTP/1.1\r\n{lines}".encode("utf-8", "surrogateescape")
        return await self.send(origin, method, head, body, length, timeouts)

    async def send(
        self,
        origin: Origin,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
        timeouts: Timeouts,
    ) -> Response:
        """Send a request whose head (request line and header lines, without the blank line
        and the body's framing) the caller has encoded, and whose header values it has checked
        for line breaks. The body is framed here: ``Content-Length``, or chunked when a streamed
        body's length is unknown."""
        chunked = False
        if isinstance(body, bytes):
            head += b"Content-Length: %d\r\n\r\n" % len(body)
        elif body is None:
            head += b"\r\n"
        elif length is not None:
            head += b"Content-Length: %d\r\n\r\n" % length
        else:
            chunked = True
            head += b"Transfer-Encoding: chunked\r\n\r\n"
        replayable = body is None or isinstance(body, bytes)
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return await conn.exchange(head, body, chunked, method, timeouts)
            except OriginBroken:
                # A pooled connection the origin had just closed: one fresh try, if the
                # request can be sent again and nothing at all came back.
                if not replayable or conn.received_any:
                    raise
        conn = await self._connect(origin, timeouts)
        return await conn.exchange(head, body, chunked, method, timeouts)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, origin: Origin, timeouts: Timeouts) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = timeouts.connect
        if timeouts.deadline is not None:
            limit = min(limit, timeouts.deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.0, limit)):
                addresses = await resolve(origin.lookup_name, origin.port, origin.allow_private)
                last: Exception | None = None
                for address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, origin),
                            address,
                            origin.port,
                            ssl=origin.ssl,
                            server_hostname=origin.host if origin.ssl else None,
                        )
                    except (OSError, ssl.SSLError) as exc:
                        last = exc
                        if self._on_connect_error is not None:
                            self._on_connect_error(exc)
                        continue
                    self._all.add(conn)
                    return conn
                raise OriginUnreachable(f"cannot connect to the origin ({type(last).__name__})")
        except TimeoutError as exc:
            raise OriginTimeout("connecting to the origin took too long") from exc


class UrlClient:
    """A small piece of the origin client for requests the sidecar makes for itself (the token
    client's discovery and token POSTs): a URL in, a small answer out, over a pool of its own.

    The SSRF policy is the caller's to state (``allow_private``). Nothing is followed (a 3xx is
    a status), at most ``limit`` body bytes are read (the rest closes the connection instead of
    pooling it), ``timeout`` bounds the whole exchange. Failures are raised as the builtin
    ``TimeoutError`` / ``ConnectionError``, so callers outside the proxy room need none of its
    types. No ``Accept-Encoding`` is sent: answers arrive uncompressed.
    """

    def __init__(self, *, allow_private: bool, max_idle: int = 4) -> None:
        self._pool = Pool(max_idle=max_idle)
        self._allow_private = allow_private

    async def exchange(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        context: ssl.SSLContext,
        *,
        timeout: float,
        limit: int,
    ) -> tuple[int, bytes, str | None]:
        """(status, at most ``limit`` bytes of the body, the DPoP-Nonce header) for one
        request to an ``https://`` URL."""
        parts = urlsplit(url)
        origin = Origin(parts.hostname or "", parts.port or 443, context, self._allow_private)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        deadline = asyncio.get_running_loop().time() + timeout
        pairs = [("Host", parts.netloc), *headers]
        try:
            response = await self._pool.request(
                origin, method, target, pairs, body, None, Timeouts(timeout, timeout, deadline)
            )
            try:
                answer = await _read_capped(response, limit)
            finally:
                response.release()
        except OriginTimeout as exc:
            raise TimeoutError(str(exc)) from exc
        except OriginError as exc:
            raise ConnectionError(str(exc)) from exc
        nonce = response.get(b"dpop-nonce")
        return response.status, answer, None if nonce is None else nonce.decode("latin-1")

    def drop(self, context: ssl.SSLContext) -> None:
        self._pool.drop(context)

    async def close(self) -> None:
        await self._pool.close()


async def _read_capped(response: Response, limit: int) -> bytes:
    length = response.content_length
    if length is not None and length <= limit:
        return await response.read()
    parts: list[bytes] = []
    size = 0
    async with contextlib.aclosing(response.chunks()) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    return b"".join(parts)[:limit]


Lookup = Callable[..., Awaitable[list[Any]]]


async def resolve(
    host: str, port: int, allow_private: bool, *, lookup: Lookup | None = None
) -> list[str]:
    """The addresses to dial for ``host``, refusing loopback/link-local unless allowed (SSRF).
    ``lookup``: a getaddrinfo-like coroutine (the loop's by default; tests pass their own)."""
    lookup = lookup or asyncio.get_running_loop().getaddrinfo
    try:
        infos = await lookup(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OriginUnreachable(f"cannot resolve {host} ({type(exc).__name__})") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        addresses = [a for a in addresses if not is_private(a)]
        if not addresses:
            raise OriginRefused(
                f"{host} resolves to a loopback or link-local address; refused "
                "(set allow_private: true on the route if this is intended)"
            )
    return addresses
