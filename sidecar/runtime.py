"""Runtime: wires the data flow together from a Config and owns every long-lived resource.

    listener -> routing -> credentials (identity -> token cache -> token client -> dpop) -> upstream

The routing table and TLS contexts for one config form a :class:`Snapshot`, built off the loop
and swapped in one assignment; a request reads ``self.snapshot`` once, so requests in flight
finish on the config they started with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from sidecar.admin import Admin
from sidecar.config import Address, AuthorizationServer, Config
from sidecar.credentials.broker import Credentials
from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.identity import WorkloadIdentity
from sidecar.credentials.token_cache import TokenCache
from sidecar.credentials.token_client import TokenClient
from sidecar.listener import Listener
from sidecar.routing import Route, RoutingTable
from sidecar.tasks import Background
from sidecar.tls import ContextCache
from sidecar.tunnel import open_tunnel

log = logging.getLogger("sidecar")


@dataclass(frozen=True)
class Snapshot:
    config: Config
    routing: RoutingTable
    tls: ContextCache = field(repr=False)


def build_snapshot(config: Config) -> Snapshot:
    """Everything derived from one config. Reads CA files: call it off the event loop."""
    tls = ContextCache()
    for server in config.authorization_servers.values():
        tls.get(server.ca_file)
    for dest in config.destinations:
        tls.get(dest.ca_file)
    return Snapshot(config, RoutingTable(config), tls)


def _local_port(request: web.BaseRequest) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else 0


class Sidecar:
    def __init__(
        self,
        config: Config,
        *,
        grace: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock  # token lifetimes; tests pass a manual clock
        self.grace = grace
        self.snapshot: Snapshot | None = None
        self.dpop_key = DpopKey()
        self.nonces = NonceStore()
        self.identity = WorkloadIdentity(config.spiffe_socket)
        self._background = Background("sidecar")
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self.stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.snapshot = await asyncio.to_thread(build_snapshot, self.config)
        log.info(
            "config loaded",
            extra={"source": str(self.config.source), "routes": len(self.config.destinations)},
        )
        self._as_session = aiohttp.ClientSession(
            trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        client = TokenClient(
            self._as_session,
            self.identity,
            self.dpop_key,
            self.nonces,
            ssl_for=self._as_ssl,
            clock=self._clock,
        )
        cache = TokenCache(self._background, clock=self._clock)
        self.credentials = Credentials(self.identity, client, cache, self.dpop_key, self.nonces)
        from sidecar.upstream import Forwarder

        self.forwarder = Forwarder(
            self.credentials, ssl_for=self._route_ssl, replay_limit=self.config.replay_buffer_bytes
        )
        self.listener = Listener(self.handle, max_header_bytes=self.config.max_header_bytes)
        self.admin = Admin(self)
        if self.config.admin is not None:
            self.admin_address = await self.admin.start(self.config.admin)
        servers = list(self.config.authorization_servers.values())
        if servers:
            log.info("waiting for SVID", extra={"socket": self.config.spiffe_socket})
            x509 = any(s.client_auth == "mtls" for s in servers)
            self._background.spawn(
                self.identity.wait_until_ready(servers[0].jwt_svid_audience, x509=x509),
                name="identity warm-up",
            )
        self.proxy_address = await self.listener.start(self.config.listen)
        self.local_addresses: dict[str, Address] = {}
        for port, route in self.snapshot.routing.local_ports.items():
            address = Address(self.config.listen.host, port)
            self.local_addresses[route.name] = await self.listener.start(address)
        log.info(
            "listening", extra={"proxy": str(self.proxy_address), "admin": str(self.admin_address)}
        )

    async def stop(self) -> None:
        self.stopping = True
        log.info("shutting down", extra={"grace_seconds": self.grace})
        await self.listener.stop(self.grace)
        await self._background.close()
        await self.forwarder.close()
        await self._as_session.close()
        await self.identity.close()
        await self.admin.stop()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- data path ----------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        snapshot = self.snapshot  # read once: this request finishes on this config
        assert snapshot is not None
        routing = snapshot.routing
        local_port = _local_port(request)
        if local_port in routing.local_ports:
            resolved = routing.resolve_local(local_port, request.method, request.raw_path)
        elif request.method == "CONNECT":
            dest, host, port = routing.tunnel_for(request.raw_path)
            return await open_tunnel(request, dest, host, port)
        else:
            resolved = routing.resolve(request.method, request.raw_path)
        return await self.forwarder.forward(request, resolved)

    def _as_ssl(self, server: AuthorizationServer) -> ssl.SSLContext:
        assert self.snapshot is not None
        return self.snapshot.tls.get(server.ca_file)

    def _route_ssl(self, route: Route) -> ssl.SSLContext:
        assert self.snapshot is not None
        return self.snapshot.tls.get(route.destination.ca_file)

    # -- health -------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        problems: dict[str, str] = {}
        if self.stopping:
            problems["sidecar"] = "shutting down"
        if self.identity.state != "ready":
            problems["identity"] = (
                f"no SVID from the Workload API at {self.config.spiffe_socket} "
                f"({self.identity.last_error or 'not fetched yet'})"
            )
        return not problems, problems
