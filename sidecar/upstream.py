"""Upstream: send the app's request to the real API over TLS, with our credentials, and stream
the answer back. This is the data path's policy; the bytes go through
:mod:`sidecar.origin_client` (a lean HTTP/1.1 client: aiohttp's was most of our CPU).

One request, at most two attempts (RFC 9449 §9 nonce, or a rejected token), never a loop:
  1. Authorization + a fresh DPoP proof for the URL actually sent;
  2. if the upstream answers 401 with ``DPoP error="use_dpop_nonce"`` (and a DPoP-Nonce), or
     ``error="invalid_token"`` (the token is evicted and a new one fetched), retry once with a
     new proof, provided the body could be buffered (``replay_buffer_bytes``). Streaming or
     larger bodies go straight through and a 401 reaches the app unchanged.

SSRF guard: only upstreams named by routes are dialled, and their addresses are checked at
connect time: loopback, link-local (169.254.0.0/16, fe80::/10: cloud metadata), unspecified
and multicast addresses are refused unless the route says ``allow_private: true``.

Answers up to 64 KiB with a Content-Length are read whole and sent to the app in one write
(a failure while reading them gives the app a clean 502); larger or unsized ones are streamed
with backpressure both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.audit import Exchange
from sidecar.credentials.broker import Credentials
from sidecar.credentials.dpop import htu
from sidecar.errors import (
    BadRequest,
    Forbidden,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.headers import has_app_credentials, request_headers, response_headers
from sidecar.listener import Reply, Request
from sidecar.origin_client import (
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
from sidecar.routing import Resolved, Route

log = logging.getLogger("sidecar.upstream")

# Answers up to this size (with a Content-Length) are read whole and sent to the app in one
# write; larger or unsized ones are streamed chunk by chunk with backpressure.
WHOLE_BODY_LIMIT = 64 * 1024
_CHALLENGE_ERROR = re.compile(r'error\s*=\s*"?([a-z_]+)"?', re.IGNORECASE)

__all__ = ["Forwarder"]


@dataclass(frozen=True)
class _UpstreamOrigin:
    """A route's ``scheme://host[:port]``, parsed once."""

    scheme: str
    host: str  # without brackets
    port: int
    explicit_port: int | None
    authority: str  # for the Host header, as configured
    nonce_key: str  # RFC 9449 nonces are per origin
    private_literal: bool  # an IP literal the SSRF guard refuses (names: checked at resolve)


def _parse_origin(text: str) -> _UpstreamOrigin:
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    explicit = parts.port
    port = explicit or (443 if scheme == "https" else 80)
    try:
        private_literal = is_private(host)
    except ValueError:
        private_literal = False  # a name
    return _UpstreamOrigin(
        scheme, host, port, explicit, parts.netloc, text.lower().rstrip("/"), private_literal
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


def _challenge_error(resp: Response) -> str | None:
    for value in resp.headers.getall("WWW-Authenticate", ()):
        if value.lstrip().lower().startswith(("dpop", "bearer")):
            match = _CHALLENGE_ERROR.search(value)
            if match:
                return match.group(1).lower()
    return None


class Forwarder:
    def __init__(
        self,
        credentials: Credentials,
        *,
        ssl_for: Callable[[Route], ssl.SSLContext],
        replay_limit: int,
    ) -> None:
        self._credentials = credentials
        self._ssl_for = ssl_for
        self.replay_limit = replay_limit
        self._pool = Pool()
        self._origins: dict[str, _UpstreamOrigin] = {}
        self._timeouts: dict[tuple[float, float], Timeouts] = {}  # without a total timeout
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}

    async def close(self) -> None:
        await self._pool.close()

    def _origin(self, text: str) -> _UpstreamOrigin:
        parsed = self._origins.get(text)
        if parsed is None:
            if len(self._origins) > 4096:  # wildcard routes: bounded
                self._origins.clear()
            parsed = self._origins[text] = _parse_origin(text)
        return parsed

    async def forward(
        self, request: Request, reply: Reply, resolved: Resolved, exchange: Exchange
    ) -> None:
        route, target = resolved.route, resolved.target
        dest = route.destination
        if dest.app_credentials == "refuse" and has_app_credentials(request.headers):
            raise BadRequest(
                "this route refuses requests that carry their own Authorization or DPoP header "
                "(the sidecar supplies the credential); remove it from the app",
                route=route.name,
            )
        up = self._origin(route.upstream_origin(target))
        if up.private_literal and not dest.allow_private:
            # Refused before a token is fetched or a body read; the pool would refuse it too.
            raise Forbidden(
                f"upstream {up.host} is a loopback or link-local address; refused "
                "(set allow_private: true on the route if this is intended)",
                route=route.name,
            )
        headers = request_headers(request.headers, up.authority)
        if dest.via:
            headers.add("Via", "1.1 spiffe-oauth-sidecar")
        body = await self._body(request)
        origin = Origin(
            up.host,
            up.port,
            self._ssl_for(route) if up.scheme == "https" else None,
            dest.allow_private,
        )
        async with self._slots(route):
            await self._exchange(
                request, reply, resolved, up, origin, list(headers.items()), body, exchange
            )

    def _slots(self, route: Route) -> asyncio.Semaphore:
        """At most ``max_connections`` requests in flight to one route's upstream."""
        limit = route.destination.max_connections
        slot = self._limits.get(route.name)
        if slot is None or slot[0] != limit:
            slot = self._limits[route.name] = (limit, asyncio.Semaphore(limit))
        return slot[1]

    async def _exchange(
        self,
        request: Request,
        reply: Reply,
        resolved: Resolved,
        up: _UpstreamOrigin,
        origin: Origin,
        headers: list[tuple[str, str]],
        body: _Body,
        exchange: Exchange,
    ) -> None:
        route, target = resolved.route, resolved.target.path
        raw = target + (f"?{resolved.target.query}" if resolved.target.query else "")
        proof_url = htu(up.scheme, up.host, up.explicit_port, target)
        key, token, hit = await self._credentials.lookup(route, resolved.scopes)
        exchange.cache = "hit" if hit else "miss"
        for attempt in (1, 2):
            exchange.token = token.reference
            send = headers + self._credentials.headers(
                token, request.method, proof_url, up.nonce_key
            )
            sent = time.perf_counter()
            resp = await self._send(request.method, origin, raw, send, body, route)
            exchange.upstream_seconds = time.perf_counter() - sent
            self._credentials.nonces.update(up.nonce_key, resp.headers.get("DPoP-Nonce"))
            retry = attempt == 1 and body.replayable and resp.status == 401
            reason = _challenge_error(resp) if retry else None
            if reason == "use_dpop_nonce" and resp.headers.get("DPoP-Nonce"):
                await _discard(resp)
                exchange.retry = reason
                log.info(
                    "retrying with the resource server's DPoP nonce", extra={"route": route.name}
                )
                continue
            if reason == "invalid_token":
                await _discard(resp)
                exchange.retry = reason
                self._credentials.evict(key, token)
                log.info(
                    "resource server rejected the token; fetching a new one",
                    extra={"route": route.name},
                )
                key, token = await self._credentials.token(route, resolved.scopes)
                continue
            break
        await self._relay(request, reply, resp, route)

    async def _body(self, request: Request) -> _Body:
        if not request.body_exists:
            # "Content-Length: 0" is passed on (a POST without it may get 411); no header, none.
            return _Body(b"" if request.content_length == 0 else None, None)
        length = request.content_length
        if length is not None and length <= self.replay_limit:
            return _Body(await request.read(), None)
        return _Body(None, request, length)

    async def _send(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: list[tuple[str, str]],
        body: _Body,
        route: Route,
    ) -> Response:
        dest = route.destination
        if dest.total_timeout is None:
            pair = (dest.connect_timeout, dest.read_timeout)
            timeouts = self._timeouts.get(pair)
            if timeouts is None:
                timeouts = self._timeouts[pair] = Timeouts(*pair)
        else:
            deadline = asyncio.get_running_loop().time() + dest.total_timeout
            timeouts = Timeouts(dest.connect_timeout, dest.read_timeout, deadline)
        try:
            return await self._pool.request(
                origin, method, target, headers, body.payload(), body.length, timeouts
            )
        except OriginError as exc:
            raise _proxy_error(exc, route) from exc

    async def _relay(self, request: Request, reply: Reply, resp: Response, route: Route) -> None:
        try:
            headers = response_headers(resp.headers.items())
            length = resp.content_length
            bodiless = request.method == "HEAD" or resp.status in (204, 304)
            if not bodiless and length is not None and length <= WHOLE_BODY_LIMIT:
                try:
                    body = await resp.read()
                except OriginError as exc:
                    # Nothing has reached the app yet: it gets a clean error, not a cut body.
                    raise _proxy_error(exc, route, mid_response=True) from exc
                reply.send(resp.status, resp.reason, headers.items(), body)
                return
            await reply.start(resp.status, resp.reason, headers.items(), sized=length is not None)
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
