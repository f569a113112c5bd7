"""The transparent listener's entry: what to do with a connection the nat rules redirected.

Per connection, once: SO_ORIGINAL_DST, then the first bytes (:mod:`.peek`), then a
:func:`decide` (pure, on the routing table of the config in force):

==================================  =========================================================
first bytes                          action
==================================  =========================================================
HTTP head, Host is a route           the listener serves it (:meth:`Listener.adopt`): routing,
                                     scopes, credentials, forwarder -- the proxy's own path
TLS, SNI is a tunnel route           a blind relay to the route's host (dialled by name, its
                                     ``tunnel_ports`` only), never to the original IP
TLS, SNI is an intercepting route    TLS with the pod CA's leaf (#18), then the listener serves
                                     its requests as for an intercepted CONNECT
TLS, SNI is another credential route refused: set ``intercept: true`` on the route
malformed TLS or HTTP head           refused (fail closed)
anything else, or nothing within     ``transparent.unmatched``: ``passthrough`` (a blind relay
``peek_timeout`` (server-first)      to the original destination) or ``deny`` (closed)
==================================  =========================================================

A routed Host/SNI on a connection to an address that name does not resolve to (the resolver is
injected) is logged, and refused when the route says ``on_address_mismatch: refuse``. A
connection that was not redirected (someone dialled the port itself) is closed: relaying it to
its "original" destination would be relaying it to ourselves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

from sidecar.config import Transparent
from sidecar.errors import Forbidden, ProxyError
from sidecar.proxy.intercept.server import HandshakeFailed, ServerContexts
from sidecar.proxy.listener import Captured, Listener
from sidecar.proxy.origin_client import OriginRefused, is_private
from sidecar.proxy.transparent.original_dst import OriginalDst, original_dst
from sidecar.proxy.transparent.peek import Peek, peek
from sidecar.proxy.transparent.pipe import Pipe
from sidecar.routing import RoutingTable, authority_host, is_ip_literal, tunnel_lookup_name

log = logging.getLogger("sidecar.transparent")

CONNECT_TIMEOUT = 10.0  # seconds to dial a passthrough or tunnel destination
RESOLVE_TIMEOUT = 5.0  # seconds for the Host/SNI check's name lookup
LOG_INTERVAL = 60.0  # a denied destination is logged once per minute
MAX_LOGGED = 4096  # destinations remembered for that (bounded)

# Outcomes (the label of sidecar_transparent_connections_total).
OUTCOMES = (
    "routed",
    "intercepted",
    "tunnel",
    "passthrough",
    "denied",
    "malformed",
    "needs_intercept",
    "address_mismatch",
    "handshake_failed",
    "not_redirected",
    "unreachable",
)

Resolver = Callable[[str], Awaitable[set[str]]]


async def system_resolver(host: str) -> set[str]:
    """The addresses ``host`` resolves to here (getaddrinfo, off the loop's thread)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


class Action(NamedTuple):
    kind: str  # "http", "tunnel", "passthrough", "deny", "refuse"
    outcome: str  # one of OUTCOMES
    host: str | None = None  # the routed name (http, tunnel)
    route: str | None = None
    refuse_mismatch: bool = False
    allow_private: bool = False  # a tunnel route's SSRF setting
    lookup: str | None = None  # the name a tunnel resolves (absolute when the app chose it)


def decide(routing: RoutingTable, settings: Transparent, seen: Peek, dst: OriginalDst) -> Action:
    """What to do with a captured connection, from its first bytes. Pure."""
    if seen.kind == "malformed":
        return Action("refuse", "malformed")
    name = seen.name
    if name is not None and seen.kind == "tls":
        name = authority_host(name)  # the SNI as a Host would be validated: DNS labels only
        if name is None or is_ip_literal(name):  # RFC 6066 §3: no IP literals in SNI
            return Action("refuse", "malformed")
    if name is not None and seen.kind in ("http", "tls"):
        route = routing.match(name)
        if route is not None:
            refuse = route.destination.on_address_mismatch == "refuse"
            if seen.kind == "http":
                return Action("http", "routed", name, route.name, refuse)
            if route.destination.intercept:
                return Action("intercept", "intercepted", name, route.name, refuse)
            return Action("refuse", "needs_intercept", name, route.name)
        tunnel = routing.tunnel_match(name) if seen.kind == "tls" else None
        if tunnel is not None and dst.port in tunnel.tunnel_ports:
            refuse = tunnel.on_address_mismatch == "refuse"
            lookup = tunnel_lookup_name(tunnel, name)
            return Action(
                "tunnel", "tunnel", name, tunnel.name, refuse, tunnel.allow_private, lookup
            )
    if settings.unmatched == "deny":
        return Action("deny", "denied")
    return Action("passthrough", "passthrough")


class OnceAMinute:
    """Whether a key is due a log line: once per :data:`LOG_INTERVAL` each, bounded memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[object, float] = {}

    def due(self, key: object) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            return False
        if len(self._last) >= MAX_LOGGED:
            self._last = {k: t for k, t in self._last.items() if now - t < LOG_INTERVAL}
            if len(self._last) >= MAX_LOGGED:
                self._last.clear()
        self._last[key] = now
        return True


class Counters(NamedTuple):
    """Where capture reports what it did (the runtime binds them to metrics)."""

    connection: Callable[[str], None]  # outcome
    unmatched: Callable[[str, int], None]  # action ("passthrough"/"deny"), destination port
    handshake: Callable[[str, str], None] = lambda route, outcome: None  # intercepted TLS


class Capture:
    """The transparent listener's connections: one :meth:`protocol` per accepted socket."""

    def __init__(
        self,
        listener: Listener,
        routing: Callable[[], RoutingTable],
        settings: Callable[[], Transparent],
        counters: Counters,
        *,
        resolver: Resolver = system_resolver,
        clock: Callable[[], float] = time.monotonic,
        intercept: Callable[[], ServerContexts | None] = lambda: None,
    ) -> None:
        self.listener = listener
        self._intercept = intercept  # the pod CA's leaves, when routes intercept
        self._routing = routing
        self._settings = settings
        self._counters = counters
        self._resolver = resolver
        self._denied = OnceAMinute(clock)
        self._mismatched = OnceAMinute(clock)
        self.pipes: set[Pipe] = set()
        self.peeking: set[_Peeking] = set()

    def protocol(self, port: int) -> asyncio.Protocol:
        return _Peeking(self, port)

    def close(self) -> None:
        """Shutdown: close connections still peeking and every relay."""
        for peeking in list(self.peeking):
            peeking.close()
        for pipe in list(self.pipes):
            pipe.close()

    # -- the decision, once the first bytes are in -------------------------------------------

    async def dispatch(
        self, transport: asyncio.Transport, port: int, dst: OriginalDst, seen: Peek, first: bytes
    ) -> None:
        try:
            await self._dispatch(transport, port, dst, seen, first)
        except Exception as exc:  # a bug: fail closed, say so once
            log.error("captured connection failed", extra={"error": type(exc).__name__})
            transport.close()

    async def _dispatch(
        self, transport: asyncio.Transport, port: int, dst: OriginalDst, seen: Peek, first: bytes
    ) -> None:
        action = decide(self._routing(), self._settings(), seen, dst)
        checked = action.kind in ("http", "tunnel", "intercept")
        if checked and not await self._address_ok(action, dst):
            return self._refuse(transport, action, "address_mismatch", seen)
        if action.kind == "http":
            assert action.host is not None
            self._counters.connection("routed")
            self.listener.adopt(transport, port, Captured(dst.ip, dst.port, action.host), first)
        elif action.kind == "intercept":
            assert action.host is not None
            await self._terminate_tls(transport, port, action, dst, first)
        elif action.kind == "tunnel":
            assert action.host is not None
            await self._relay(transport, action, dst, first, action.host, dst.port)
        elif action.kind == "passthrough":
            self._counters.unmatched("passthrough", dst.port)
            await self._relay(transport, action, dst, first, dst.ip, dst.port)
        elif action.kind == "deny":
            self._counters.unmatched("deny", dst.port)
            if self._denied.due(dst):
                log.warning(
                    "captured connection denied: no route (transparent.unmatched: deny)",
                    extra={"destination": str(dst), "host": (seen.name or "")[:253] or None},
                )
            self._refuse(transport, action, "denied", seen)
        else:
            if action.outcome == "needs_intercept":
                log.warning(
                    "captured TLS to a credential route refused: set 'intercept: true' on the "
                    "route (and trust the pod CA in the app), or call it over plain http://",
                    extra={"route": action.route, "host": action.host},
                )
            self._refuse(transport, action, action.outcome, seen)
        return None

    async def _address_ok(self, action: Action, dst: OriginalDst) -> bool:
        assert action.host is not None
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                addresses = await self._resolver(action.host)
        except TimeoutError:
            addresses = set()  # unresolved in time: not an address the name resolves to
        if dst.ip in addresses:
            return True
        if self._mismatched.due((action.host, dst.ip)):
            log.warning(
                "captured connection names a route but goes to an address the name does not "
                "resolve to",
                extra={
                    "route": action.route,
                    "host": action.host,
                    "destination": str(dst),
                    "refused": action.refuse_mismatch,
                },
            )
        return not action.refuse_mismatch

    def _refuse(
        self, transport: asyncio.Transport, action: Action, outcome: str, seen: Peek
    ) -> None:
        self._counters.connection(outcome)
        if seen.kind == "http":  # the app speaks HTTP: say why, in the proxy's JSON shape
            error = Forbidden(_why(outcome, seen.name), route=action.route)
            transport.write(_error_bytes(error))
        transport.close()

    async def _relay(
        self,
        transport: asyncio.Transport,
        action: Action,
        dst: OriginalDst,
        first: bytes,
        host: str,
        port: int,
    ) -> None:
        pipe = Pipe(transport)
        try:
            if action.kind == "tunnel":
                host = await self._tunnel_address(action.lookup or host, action.allow_private)
            await pipe.connect(host, port, first, CONNECT_TIMEOUT)
        except (OSError, TimeoutError, OriginRefused) as exc:
            self._counters.connection("unreachable")
            log.warning(
                "captured connection: cannot reach its destination",
                extra={"route": action.route, "destination": str(dst), "error": type(exc).__name__},
            )
            pipe.close()
            return
        self._counters.connection(action.outcome)
        self.pipes.add(pipe)
        try:
            up, down = await pipe.run()
        finally:
            self.pipes.discard(pipe)
        log.info(
            "captured connection relayed",
            extra={
                "route": action.route,
                "outcome": action.outcome,
                "destination": str(dst),
                "bytes_up": up,
                "bytes_down": down,
            },
        )

    async def _terminate_tls(
        self,
        transport: asyncio.Transport,
        port: int,
        action: Action,
        dst: OriginalDst,
        first: bytes,
    ) -> None:
        """TLS with the pod CA for an intercepting route (the step #18 uses after CONNECT).

        The ClientHello was read to choose; the handshake needs it again. The app's connection
        is therefore relayed (ClientHello first) into one end of an in-process socket pair
        whose other end the listener serves: TLS there, then origin-form requests for
        ``host:port``, routed as an intercepted CONNECT's are. One hop more, no private API."""
        assert action.host is not None
        assert action.route is not None
        contexts = self._intercept()
        if contexts is None or not contexts.ca.covers(action.host):
            log.warning(
                "captured TLS to an intercepting route the pod CA does not cover (restart)",
                extra={"route": action.route, "host": action.host},
            )
            return self._refuse(transport, action, "needs_intercept", Peek("tls"))
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.connect_accepted_socket(
                lambda: self.listener.connection(port), sock=theirs
            )
        except OSError:
            ours.close()
            theirs.close()
            return self._refuse(transport, action, "unreachable", Peek("tls"))
        # Paused before anything is written to the pair: the ClientHello waits in the socket
        # for the TLS layer, the listener's parser never sees it.
        conn.pause_reading("connect")
        handshake = asyncio.ensure_future(conn.start_tls(action.host, dst.port, contexts))
        pipe = Pipe(transport)
        await pipe.attach(ours, first)
        self.pipes.add(pipe)
        relay = asyncio.ensure_future(pipe.run())  # the handshake's later flights go through it
        try:
            try:
                await handshake
            except HandshakeFailed as failed:
                self._counters.handshake(action.route, failed.reason)
                self._counters.connection("handshake_failed")
                log.warning(
                    "TLS handshake with a captured app failed; nothing was forwarded",
                    extra={"route": action.route, "reason": failed.reason, "detail": failed.detail},
                )
                pipe.close()
                await relay
                return None
            self._counters.handshake(action.route, "ok")
            self._counters.connection("intercepted")
            await relay
        finally:
            self.pipes.discard(pipe)
            handshake.cancel()
            relay.cancel()
        return None

    async def _tunnel_address(self, host: str, allow_private: bool) -> str:
        """A tunnel route dials its own name, never the original IP; loopback and link-local
        answers are refused unless the route allows them (the tunnels' SSRF guard)."""
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            addresses = sorted(await self._resolver(host))
        allowed = [a for a in addresses if allow_private or not is_private(a)]
        if not allowed:
            raise OriginRefused(f"{host} resolves to no address a tunnel may dial")
        return allowed[0]


def _why(outcome: str, host: str | None) -> str:
    if outcome == "denied":
        return (
            f"{host or 'this destination'} is not a configured destination and "
            "transparent.unmatched is deny"
        )
    if outcome == "address_mismatch":
        return f"this connection goes to an address {host} does not resolve to"
    return "the sidecar refused this captured connection"


def _error_bytes(error: ProxyError) -> bytes:
    body = error.encode()
    headers = "".join(f"{k}: {v}\r\n" for k, v in error.headers().items())
    return (
        f"HTTP/1.1 {error.status} Forbidden\r\n{headers}Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class _Peeking(asyncio.Protocol):
    """A captured connection until its first bytes say what it is."""

    def __init__(self, capture: Capture, port: int) -> None:
        self._capture = capture
        self._port = port
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._dst: OriginalDst | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        capture = self._capture
        sock = transport.get_extra_info("socket")
        dst = original_dst(sock) if sock is not None else None
        here = transport.get_extra_info("sockname")
        if dst is None or (here is not None and (dst.ip, dst.port) == tuple(here[:2])):
            capture._counters.connection("not_redirected")
            transport.close()
            return
        listener = capture.listener
        if not listener.admission.admit(len(listener.connections), sock.fileno()):
            transport.close()
            return
        self._dst = dst
        capture.peeking.add(self)
        timeout = capture._settings().peek_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._silent)

    def data_received(self, data: bytes) -> None:
        if self._decided:
            return
        self._buffer += data
        seen = peek(bytes(self._buffer), self._capture.listener.max_header_bytes)
        if seen.kind != "need_more":
            self._decide(seen)

    def _silent(self) -> None:
        """Nothing (or not enough to tell) within peek_timeout: a server-first protocol, or a
        slow client; either way not an HTTP request we can route."""
        if not self._decided:
            self._decide(Peek("other") if not self._buffer else Peek("malformed"))

    def _decide(self, seen: Peek) -> None:
        self._decided = True
        if self._timer is not None:
            self._timer.cancel()
        transport, dst = self._transport, self._dst
        assert transport is not None
        assert dst is not None
        transport.pause_reading()
        self._capture.peeking.discard(self)
        self._capture.listener.spawn(
            self._capture.dispatch(transport, self._port, dst, seen, bytes(self._buffer))
        )

    def eof_received(self) -> bool:
        if not self._decided:
            self._decide(Peek("other") if not self._buffer else Peek("malformed"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._capture.peeking.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
