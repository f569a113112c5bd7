"""Upstream: send the app's request to the real API over TLS, with our credentials, and stream
the answer back. This is the data path's policy; the bytes go through
:mod:`sidecar.proxy.origin_client` (a lean HTTP/1.1 client: aiohttp's was most of our CPU).

The credential is the route's kind (:mod:`sidecar.credentials.kind`): the forwarder asks it for
header lines from what is sent and never knows whether they are a DPoP-bound token, a Bearer
token or (issue #20) a signature. One request, at most two attempts, never a loop:
  1. the kind's header lines for the URL actually sent;
  2. if the upstream answers 401 and the kind says one more attempt could succeed (a DPoP
     nonce, a rejected token it replaces), retry once with the kind's new lines, provided the
     body could be buffered (``replay_buffer_bytes``). Streaming or larger bodies go straight
     through and a 401 reaches the app unchanged.

SSRF guard: only upstreams named by routes are dialled, and their addresses are checked at
connect time: loopback, link-local (169.254.0.0/16, fe80::/10: cloud metadata), unspecified
and multicast addresses are refused unless the route says ``allow_private: true``.

Answers up to 64 KiB with a Content-Length are read whole and sent to the app in one write
(a failure while reading them gives the app a clean 502); larger or unsized ones are streamed
with backpressure both ways.

Per request the work is kept to what depends on the request: everything that depends only on
the route (pool key, Host/Via lines, ``htu`` prefix, timeouts, connection slots) is prepared the
first time the route is used, and the upstream head is built as one string (bench/ measures it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config import Destination
from sidecar.credentials.dpop import htu
from sidecar.credentials.kind import Credential
from sidecar.errors import (
    BadRequest,
    Forbidden,
    ProxyError,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.ops.audit import Exchange
from sidecar.proxy.admission import Admission
from sidecar.proxy.flow import Slots
from sidecar.proxy.headers import forwarded, has_app_credentials, relayed_block, request_drop
from sidecar.proxy.listener import AppGone, Reply, Request
from sidecar.proxy.origin_client import (
    Origin,
    OriginError,
    OriginRefused,
    OriginTimeout,
    OriginUnreachable,
    Pool,
    Response,
    Timeouts,
    is_private,
)
from sidecar.routing import OVERRIDE_HEADERS, Dial, Resolved, Route, Target

if TYPE_CHECKING:
    from sidecar.ops.tracing import Tracing

log = logging.getLogger("sidecar.upstream")

# Answers up to this size (with a Content-Length) are read whole and sent to the app in one
# write; larger or unsized ones are streamed chunk by chunk with backpressure.
WHOLE_BODY_LIMIT = 64 * 1024

__all__ = ["Forwarder"]


@dataclass(frozen=True)
class _Upstream:
    """Where one route sends its requests (``scheme://host[:port]``), prepared once per route:
    the pool key, the static lines of every request head, the origin as credentials see it."""

    origin: Origin  # the pool key: host (without brackets), port, TLS context, SSRF policy
    private_literal: bool  # an IP literal the SSRF guard refuses (names: checked at resolve)
    static_lines: str  # "Host: ...\r\n" (and Via), as sent on every request
    htu_prefix: str  # scheme://host[:port] lower-case, default port dropped (RFC 9449 htu)
    credential: Credential[Any]  # the route's kind of credential
    drop: frozenset[str]  # app header names not forwarded (hop-by-hop, the kind's own)
    drop_overrides: frozenset[str]  # and the method/URL overrides (method_override: strip)
    timeouts: Timeouts | None  # None: the route has a total timeout, set per request
    slots: Slots  # at most max_connections requests in flight to the route's upstream
    # A refusal to check per request (app_credentials: refuse, or a private IP literal the
    # route does not allow): False on the usual route, which then checks nothing.
    checks: bool


def _prepare(
    dial: Dial,
    route: Route,
    ssl_for: Callable[[Route], ssl.SSLContext],
    slots: Slots,
    credential: Credential[Any],
) -> _Upstream:
    # From structured parts (routing's Dial): nothing here re-parses a string with app input.
    scheme, host, port, explicit, netloc = dial[:5]
    try:
        private_literal = is_private(host)
    except ValueError:
        private_literal = False  # a name
    dest = route.destination
    if any(c in netloc for c in "\r\n\0"):  # routing and the config loader refuse these too
        raise ValueError("an upstream host with a line break")
    static = f"Host: {netloc}\r\n"
    if dest.via:
        static += "Via: 1.1 spiffe-oauth-sidecar\r\n"
    timeouts = None
    if dest.total_timeout is None:
        timeouts = Timeouts(dest.connect_timeout, dest.read_timeout)
    drop = request_drop(credential.strips)
    return _Upstream(
        origin=Origin(
            host,
            port,
            ssl_for(route) if scheme == "https" else None,
            dest.allow_private,
            absolute=dial.synthesised,
        ),
        private_literal=private_literal,
        static_lines=static,
        htu_prefix=htu(scheme, host, explicit, "/")[:-1],
        credential=credential,
        drop=drop,
        drop_overrides=drop | OVERRIDE_HEADERS,
        timeouts=timeouts,
        slots=slots,
        checks=dest.app_credentials == "refuse" or (private_literal and not dest.allow_private),
    )


@dataclass(frozen=True)
class _Body:
    data: bytes | None  # buffered: replayable
    stream: Request | None  # streamed: sent once
    length: int | None = None  # of the stream, when the app said

    @property
    def replayable(self) -> bool:
        return self.stream is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        return self.data if self.stream is None else self.stream.chunks()


_NO_BODY = _Body(None, None)
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
_EMPTY_BODY = _Body(b"", None)  # "Content-Length: 0" is passed on (a POST without it may 411)


class Forwarder:
    def __init__(
        self,
        kinds: Callable[[Route], Credential[Any]],
        *,
        ssl_for: Callable[[Route], ssl.SSLContext],
        replay_limit: int,
        admission: Admission | None = None,
    ) -> None:
        self._kinds = kinds  # a route's kind of credential (the broker's Credentials.kind)
        self._ssl_for = ssl_for
        self.replay_limit = replay_limit  # swapped on reload
        on_error = None
        if admission is not None:
            check = admission.check_error
            on_error = lambda exc: check(exc, "upstream")  # noqa: E731
        self._pool = Pool(on_connect_error=on_error)
        # (route, dialled host) -> prepared; the route object is kept and compared, so a
        # reloaded config (new Route objects, maybe new CA files) never reuses an old one.
        self._upstreams: dict[tuple[int, str], tuple[Route, _Upstream]] = {}  # (route, host)
        self._slots: dict[str, Slots] = {}
        self._tracing: Tracing | None = None

    def trace_with(self, tracing: Tracing) -> None:
        """Traces on: every request is forwarded inside its span. (Off, ``forward`` is the
        plain method: the data path does nothing for tracing.)"""
        self._tracing = tracing
        self.forward = self._forward_traced  # type: ignore[method-assign]

    async def _forward_traced(
        self, request: Request, reply: Reply, resolved: Resolved, exchange: Exchange
    ) -> None:
        assert self._tracing is not None
        route, target = resolved.route, resolved.target
        up = self._upstream(route, target)
        with self._tracing.forwarding(
            request,
            reply,
            exchange,
            route=route.name,
            origin=up.htu_prefix,
            host=up.origin.host,
            port=up.origin.port,
            path=target.path,
        ):
            await Forwarder.forward(self, request, reply, resolved, exchange)

    async def close(self) -> None:
        await self._pool.close()

    def config_applied(
        self, contexts: Collection[ssl.SSLContext], route_names: Collection[str]
    ) -> None:
        """A new config is in force: forget what was prepared for the old one's routes (they
        are prepared again on first use) and close idle connections made with its TLS
        contexts. Requests in flight keep what they hold until they finish."""
        self._upstreams.clear()
        for name in [n for n in self._slots if n not in route_names]:
            del self._slots[name]  # its holders in flight still give back to their own Slots
        self._pool.retire(contexts)

    @property
    def pool(self) -> Pool:
        return self._pool

    def slots_of(self, route_name: str) -> Slots | None:
        return self._slots.get(route_name)

    @property
    def prepared(self) -> int:
        """Routes' upstreams prepared (for tests: bounded across reloads)."""
        return len(self._upstreams)

    def _upstream(self, route: Route, target: Target) -> _Upstream:
        dial = route.dial(target)
        found = self._upstreams.get((id(route), dial.host))
        if found is not None and found[0] is route:
            return found[1]
        if len(self._upstreams) > 4096:  # wildcard routes: bounded
            self._upstreams.clear()
        prepared = _prepare(dial, route, self._ssl_for, self._slots_for(route), self._kinds(route))
        self._upstreams[(id(route), dial.host)] = (route, prepared)
        return prepared

    def _slots_for(self, route: Route) -> Slots:
        """At most ``max_connections`` requests in flight to one route's upstream."""
        limit = route.destination.max_connections
        slots = self._slots.get(route.name)
        if slots is None or slots.limit != limit:
            slots = self._slots[route.name] = Slots(limit)
        return slots

    async def forward(
        self, request: Request, reply: Reply, resolved: Resolved, exchange: Exchange
    ) -> None:
        route, target, scopes = resolved.route, resolved.target, resolved.scopes
        up = self._upstream(route, target)
        credential = up.credential
        if up.checks:
            _refuse(request, route, up)
        # The request line and the app's headers: llhttp has checked they hold no line break.
        path, query = target.path, target.query
        kept = forwarded(
            request.headers, up.drop_overrides if resolved.strip_overrides else up.drop
        )
        method = request.method
        # One string; the header lines by C-level formatting of the (name, value) pairs.
        head = (
            f"{method} {path}?{query} HTTP/1.1\r\n{up.static_lines}"
            if query
            else f"{method} {path} HTTP/1.1\r\n{up.static_lines}"
        ) + "".join(map(_LINE.__mod__, kept))
        if not request.chunked and not request.content_length:  # not request.body_exists
            body = _EMPTY_BODY if request.content_length == 0 else _NO_BODY
        else:
            body = await self._body(request)
        digest = None
        if credential.wants_body_digest and body.replayable:
            # At most replay_buffer_bytes; a streamed body has none (it is not known yet).
            digest = hashlib.sha256(body.data).hexdigest() if body.data else _EMPTY_DIGEST
        held = credential.ready(route, scopes)
        if held is None:
            pending = credential.prepare(route, scopes)
            if self._tracing is not None:  # the wait is a child span of the request's
                pending = self._tracing.waited(pending, route.name)
            held, hit = await pending
            exchange.cache = "hit" if hit else "miss"
        else:
            exchange.cache = "hit"
        slots = up.slots
        timeouts = up.timeouts
        if timeouts is None or not slots.take_now():
            timeouts = await self._wait_for_slot(request, slots, route.destination, timeouts)
        try:
            origin = up.htu_prefix
            for attempt in (1, 2):
                if request.app_gone:
                    # Nobody reads the answer: not sent (a POST retried by the app must not
                    # reach the API twice because this copy waited in the queue).
                    raise AppGone("the app closed the connection")
                exchange.token = credential.reference(held)
                lines = credential.header_lines(held, method, origin, path, query, kept, digest)
                sent = time.perf_counter()
                try:
                    resp = await self._pool.send(
                        up.origin,
                        method,
                        (head + lines).encode("utf-8", "surrogateescape"),
                        body.data if body.stream is None else body.stream.chunks(),  # payload()
                        body.length,
                        timeouts,
                    )
                except OriginError as exc:
                    raise _proxy_error(exc, route) from exc
                exchange.answered = answered = time.perf_counter()
                exchange.upstream_seconds = answered - sent
                credential.learn(origin, resp)
                if resp.status != 401 or attempt == 2 or not body.replayable:
                    break
                reason = credential.retry_reason(resp)
                if reason is None:
                    break
                await _discard(resp)
                exchange.retry = reason
                held = await credential.again(held, route, scopes, reason)
            await self._relay(request, reply, resp, route)
        finally:
            slots.give()

    async def _body(self, request: Request) -> _Body:
        length = request.content_length
        if length is not None and length <= self.replay_limit:
            return _Body(await request.read(), None)
        return _Body(None, request, length)

    @staticmethod
    async def _wait_for_slot(
        request: Request, slots: Slots, dest: Destination, timeouts: Timeouts | None
    ) -> Timeouts:
        """Take a connection slot within the route's ``queue_timeout`` and the request's
        ``total_timeout`` (whose deadline starts here: the queue counts in it). Returns the
        request's timeouts; raises when the app went away meanwhile (the slot is not taken),
        503 ``upstream_busy`` or 504 when the wait ran out."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if dest.total_timeout is None else now + dest.total_timeout
        if timeouts is None:
            timeouts = Timeouts(dest.connect_timeout, dest.read_timeout, deadline)
            if slots.take_now():
                return timeouts
        queue_end = now + dest.queue_timeout
        if await slots.take(
            queue_end if deadline is None else min(queue_end, deadline), request.gone()
        ):
            return timeouts
        if request.app_gone:
            raise AppGone("the app closed the connection while queued")
        if deadline is not None and deadline <= queue_end:
            raise UpstreamTimeout(
                f"no connection to the upstream freed up within total_timeout "
                f"({dest.total_timeout:g} s); the request was not sent",
                route=dest.name,
            )
        raise UpstreamBusy(
            f"all {slots.limit} connections to the upstream stayed busy for queue_timeout "
            f"({dest.queue_timeout:g} s); the request was not sent",
            route=dest.name,
            retry_after=1,
        )

    async def _relay(self, request: Request, reply: Reply, resp: Response, route: Route) -> None:
        try:
            headers = relayed_block(resp.raw_headers, resp.lowered_names)
            length = resp.content_length
            bodiless = request.method == "HEAD" or resp.status in (204, 304)
            if not bodiless and length is not None and length <= WHOLE_BODY_LIMIT:
                body = resp.whole_body()
                if body is None:
                    try:
                        body = await resp.read()
                    except OriginError as exc:
                        # Nothing has reached the app yet: it gets a clean error, not a cut body.
                        raise _proxy_error(exc, route, mid_response=True) from exc
                reply.send(resp.status, resp.reason, headers, body)
                return
            await reply.start(resp.status, resp.reason, headers, sized=length is not None)
            try:
                async for chunk in resp.chunks():
                    await reply.write(chunk)  # drains: backpressure from the app
            except OriginError as exc:
                log.warning(
                    "upstream failed mid-response; closing the connection to the app",
                    extra={"route": route.name, "error": type(exc).__name__},
                )
                reply.abort()
                return
            await reply.end()
        finally:
            resp.release()


_LINE = "%s: %s\r\n"  # a header line from a (name, value) pair


def _refuse(request: Request, route: Route, up: _Upstream) -> None:
    """The refusals a route may check per request (``_Upstream.checks``), before a token is
    fetched or a body read."""
    dest = route.destination
    strips = up.credential.strips
    if dest.app_credentials == "refuse" and has_app_credentials(request.headers, strips):
        given = sorted({n for n, _ in request.headers if n.lower() in strips})
        raise BadRequest(
            "this route refuses requests that carry their own credential header "
            f"({', '.join(given)}: the sidecar supplies it); remove it from the app",
            route=route.name,
        )
    if up.private_literal and not dest.allow_private:
        # The pool would refuse it too.
        raise Forbidden(
            f"upstream {up.origin.host} is a loopback or link-local address; refused "
            "(set allow_private: true on the route if this is intended)",
            route=route.name,
        )


async def _discard(resp: Response) -> None:
    """Read a small answer we will not relay (so the connection can be reused), or drop it."""
    if resp.content_length is not None and resp.content_length <= WHOLE_BODY_LIMIT:
        with contextlib.suppress(OriginError):
            await resp.read()
    resp.release()


def _proxy_error(exc: OriginError, route: Route, *, mid_response: bool = False) -> ProxyError:
    name = route.name
    if isinstance(exc, OriginRefused):
        return Forbidden(str(exc), route=name)
    if isinstance(exc, OriginTimeout):
        return UpstreamTimeout(f"the upstream did not answer in time ({exc})", route=name)
    if isinstance(exc, OriginUnreachable):
        return UpstreamUnavailable(f"cannot connect to the upstream ({exc})", route=name)
    what = "failed mid-response" if mid_response else "connection failed"
    return UpstreamUnavailable(f"the upstream {what} ({exc})", route=name)
