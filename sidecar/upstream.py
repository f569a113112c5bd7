"""Upstream: send the app's request to the real API over TLS, with our credentials, and stream
the answer back. This is the data path's I/O edge (aiohttp client).

One request, at most two attempts (RFC 9449 §9 nonce, or a rejected token), never a loop:
  1. Authorization + a fresh DPoP proof for the URL actually sent;
  2. if the upstream answers 401 with ``DPoP error="use_dpop_nonce"`` (and a DPoP-Nonce), or
     ``error="invalid_token"`` (the token is evicted and a new one fetched), retry once with a
     new proof, provided the body could be buffered (``replay_buffer_bytes``). Streaming or
     larger bodies go straight through and a 401 reaches the app unchanged.

SSRF guard: only upstreams named by routes are dialled, and their addresses are checked at
connect time: loopback, link-local (169.254.0.0/16, fe80::/10: cloud metadata), unspecified
and multicast addresses are refused unless the route says ``allow_private: true``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

from sidecar.audit import Exchange
from sidecar.credentials.broker import Credentials
from sidecar.credentials.dpop import htu
from sidecar.errors import BadRequest, Forbidden, UpstreamTimeout, UpstreamUnavailable
from sidecar.headers import has_app_credentials, request_headers, response_headers
from sidecar.routing import Resolved, Route

log = logging.getLogger("sidecar.upstream")

CHUNK = 64 * 1024
# Answers up to this size (with a Content-Length) are read whole and sent to the app in one
# write; larger or unsized ones are streamed chunk by chunk with backpressure.
WHOLE_BODY_LIMIT = 64 * 1024
_CHALLENGE_ERROR = re.compile(r'error\s*=\s*"?([a-z_]+)"?', re.IGNORECASE)


def _refuse_private_literal(host: str, route: Route) -> None:
    """IP-literal upstreams never reach the resolver: check them here."""
    try:
        private = is_private(host.strip("[]"))
    except ValueError:
        return  # a name: the GuardedResolver checks what it resolves to
    if private:
        raise Forbidden(
            f"upstream {host} is a loopback or link-local address; refused "
            "(set allow_private: true on the route if this is intended)",
            route=route.name,
        )


def is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, then refuses addresses that must not be dialled."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_private(r["host"])]
        if not allowed:
            raise Forbidden(
                f"upstream {host} resolves to a loopback or link-local address; refused "
                "(set allow_private: true on the route if this is intended)"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True)
class _Body:
    data: bytes | None  # buffered: replayable
    stream: web.BaseRequest | None  # streamed: sent once

    @property
    def replayable(self) -> bool:
        return self.stream is None

    def payload(self) -> Any:
        return self.data if self.stream is None else _iter_body(self.stream)


@dataclass(frozen=True)
class _Outbound:
    """One request as it will be sent upstream (attempts differ only in credentials)."""

    url: URL
    htu: str  # RFC 9449 htu of ``url``
    origin: str  # nonce key
    headers: CIMultiDict[str]
    body: _Body
    session: aiohttp.ClientSession
    timeout: aiohttp.ClientTimeout


async def _iter_body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


def _challenge_error(resp: aiohttp.ClientResponse) -> str | None:
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
        limit_per_host: int = 64,
    ) -> None:
        self._credentials = credentials
        self._ssl_for = ssl_for
        self.replay_limit = replay_limit
        kwargs: dict[str, Any] = {"limit": 0, "limit_per_host": limit_per_host}
        self._guarded = _session(aiohttp.TCPConnector(resolver=GuardedResolver(), **kwargs))
        self._open = _session(aiohttp.TCPConnector(**kwargs))
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}

    async def close(self) -> None:
        await self._guarded.close()
        await self._open.close()

    async def forward(
        self, request: web.BaseRequest, resolved: Resolved, exchange: Exchange
    ) -> web.StreamResponse:
        route, target = resolved.route, resolved.target
        dest = route.destination
        if dest.app_credentials == "refuse" and has_app_credentials(request.headers.items()):
            raise BadRequest(
                "this route refuses requests that carry their own Authorization or DPoP header "
                "(the sidecar supplies the credential); remove it from the app",
                route=route.name,
            )
        origin = URL(route.upstream_origin(target))
        if not dest.allow_private:
            _refuse_private_literal(origin.raw_host or "", route)
        raw = target.path + (f"?{target.query}" if target.query else "")
        headers = request_headers(request.headers.items(), origin.raw_authority)
        if dest.via:
            headers.add("Via", "1.1 spiffe-oauth-sidecar")
        out = _Outbound(
            url=URL(str(origin) + raw, encoded=True),  # path and query byte-for-byte
            htu=htu(origin.scheme, origin.raw_host or "", origin.explicit_port, target.path),
            origin=str(origin).lower().rstrip("/"),
            headers=headers,
            body=await self._body(request),
            session=self._open if dest.allow_private else self._guarded,
            timeout=aiohttp.ClientTimeout(
                total=dest.total_timeout,
                sock_connect=dest.connect_timeout,
                sock_read=dest.read_timeout,
            ),
        )
        async with self._slots(route):
            return await self._exchange(request, resolved, out, exchange)

    def _slots(self, route: Route) -> asyncio.Semaphore:
        """At most ``max_connections`` requests in flight to one route's upstream."""
        limit = route.destination.max_connections
        slot = self._limits.get(route.name)
        if slot is None or slot[0] != limit:
            slot = self._limits[route.name] = (limit, asyncio.Semaphore(limit))
        return slot[1]

    async def _exchange(
        self, request: web.BaseRequest, resolved: Resolved, out: _Outbound, exchange: Exchange
    ) -> web.StreamResponse:
        route = resolved.route
        key, token, hit = await self._credentials.lookup(route, resolved.scopes)
        exchange.cache = "hit" if hit else "miss"
        for attempt in (1, 2):
            exchange.token = token.reference
            send = out.headers.copy()
            send.extend(self._credentials.headers(token, request.method, out.htu, out.origin))
            if out.body.data is not None:
                send["Content-Length"] = str(len(out.body.data))
            elif request.content_length is not None:
                send["Content-Length"] = str(request.content_length)
            sent = time.perf_counter()
            resp = await self._send(request.method, out, send, route)
            exchange.upstream_seconds = time.perf_counter() - sent
            self._credentials.nonces.update(out.origin, resp.headers.get("DPoP-Nonce"))
            retry = attempt == 1 and out.body.replayable and resp.status == 401
            reason = _challenge_error(resp) if retry else None
            if reason == "use_dpop_nonce" and resp.headers.get("DPoP-Nonce"):
                resp.release()
                exchange.retry = reason
                log.info(
                    "retrying with the resource server's DPoP nonce", extra={"route": route.name}
                )
                continue
            if reason == "invalid_token":
                resp.release()
                exchange.retry = reason
                self._credentials.evict(key, token)
                log.info(
                    "resource server rejected the token; fetching a new one",
                    extra={"route": route.name},
                )
                key, token = await self._credentials.token(route, resolved.scopes)
                continue
            break
        return await self._relay(request, resp, route)

    async def _body(self, request: web.BaseRequest) -> _Body:
        if not request.body_exists:
            return _Body(None, None)
        length = request.content_length
        if length is not None and length <= self.replay_limit:
            return _Body(await request.content.readexactly(length), None)
        return _Body(None, request)

    async def _send(
        self, method: str, out: _Outbound, headers: Any, route: Route
    ) -> aiohttp.ClientResponse:
        try:
            return await out.session.request(
                method,
                out.url,
                headers=headers,
                data=out.body.payload(),
                ssl=self._ssl_for(route),
                allow_redirects=False,
                timeout=out.timeout,
                middlewares=(),
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                f"the upstream did not answer in time ({type(exc).__name__})", route=route.name
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, Forbidden):
                raise Forbidden(exc.os_error.detail, route=route.name) from exc
            raise UpstreamUnavailable(
                f"cannot connect to the upstream ({type(exc).__name__})", route=route.name
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"the upstream connection failed ({type(exc).__name__})", route=route.name
            ) from exc

    async def _relay(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        route: Route,
    ) -> web.StreamResponse:
        async with resp:
            bodiless = request.method == "HEAD" or resp.status in (204, 304)
            length = resp.content_length
            if not bodiless and length is not None and length <= WHOLE_BODY_LIMIT:
                try:
                    body = await resp.content.readexactly(length)
                except (TimeoutError, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                    # Nothing has reached the app yet: it gets a clean error, not a cut body.
                    raise UpstreamUnavailable(
                        f"the upstream failed mid-response ({type(exc).__name__})",
                        route=route.name,
                    ) from exc
                whole = web.Response(status=resp.status, reason=resp.reason, body=body)
                whole.headers.extend(response_headers(resp.headers.items()))
                return whole
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            out.headers.extend(response_headers(resp.headers.items()))
            if not bodiless and "Content-Length" not in resp.headers and request.version >= (1, 1):
                out.enable_chunked_encoding()
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await out.write(chunk)  # drain() inside: backpressure from the app
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning(
                    "upstream failed mid-response; closing the connection to the app",
                    extra={"route": route.name, "error": type(exc).__name__},
                )
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write_eof()
        return out


def _session(connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through as the upstream encoded them
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies are the app's, not ours to keep
        trust_env=False,  # never send our traffic through an environment proxy
    )
