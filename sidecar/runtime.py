"""Runtime: wires the data flow together from a Config and owns every long-lived resource.

    listener -> routing -> credentials (identity -> token cache -> token client -> dpop) -> upstream

The routing table and TLS contexts for one config form a :class:`Snapshot`, built off the loop
and swapped in one assignment; a request reads ``self.snapshot`` once, so requests in flight
finish on the config they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sidecar.config import (
    Address,
    AuthorizationServer,
    Config,
    Intercept,
    Transparent,
    cleartext_settings,
)
from sidecar.config import load as load_config
from sidecar.credentials.aws_sts import assume_role
from sidecar.credentials.broker import Credentials
from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.google_sts import federate
from sidecar.credentials.identity import WorkloadIdentity
from sidecar.credentials.svid_files import SvidFiles
from sidecar.credentials.token_cache import TokenCache
from sidecar.credentials.token_client import TokenClient
from sidecar.errors import APP_GONE, ConfigError, Forbidden, ProxyError
from sidecar.ops import logs as logs_module
from sidecar.ops.admin import Admin, local_endpoints
from sidecar.ops.audit import Exchange
from sidecar.ops.metrics import UNMATCHED, Metrics
from sidecar.ops.readiness import Readiness, RouteReadiness, evaluate, route_readiness
from sidecar.ops.reload import ConfigWatcher, Fingerprint, fingerprint
from sidecar.ops.tracing import Tracing
from sidecar.ops.tracing import from_env as tracing_from_env
from sidecar.proxy.admission import Admission
from sidecar.proxy.intercept.ca import CAError, load_or_create
from sidecar.proxy.intercept.server import HandshakeFailed, ServerContexts
from sidecar.proxy.listener import AppGone, Listener, Reply, Request
from sidecar.proxy.origin_client import UrlClient
from sidecar.proxy.transparent.capture import Capture, Counters, Resolver, system_resolver
from sidecar.proxy.tunnel import open_tunnel
from sidecar.proxy.upstream import Forwarder
from sidecar.routing import Route, RoutingTable
from sidecar.tasks import Background
from sidecar.tls import ContextCache

log = logging.getLogger("sidecar")


@dataclass(frozen=True)
class Snapshot:
    config: Config
    routing: RoutingTable
    tls: ContextCache = field(repr=False)


def _warn_cleartext(config: Config) -> None:
    for setting in cleartext_settings(config):
        log.warning(
            "DEVELOPMENT ONLY: cleartext http:// allowed; credentials travel unencrypted",
            extra={"setting": setting},
        )


def build_snapshot(config: Config, previous: Snapshot | None = None) -> Snapshot:
    """Everything derived from one config. Reads CA files: call it off the event loop.
    TLS contexts whose CA file did not change are carried over from ``previous``."""
    tls = ContextCache(previous.tls if previous is not None else None)
    for server in config.authorization_servers.values():
        tls.get(server.ca_file)
    for dest in config.destinations:
        tls.get(dest.ca_file)
    return Snapshot(config, RoutingTable(config), tls.seal())


def pod_ca_contexts(settings: Intercept, hosts: tuple[str, ...]) -> ServerContexts:
    """The pod CA (kept, provided or made), exported for the app. Files and signing: call it
    off the event loop. Raises :class:`~sidecar.proxy.intercept.ca.CAError`."""
    ca, origin = load_or_create(hosts, ca_dir=settings.ca_dir, provided=settings.ca_from)
    if settings.export_dir is not None:
        try:
            ca.export(settings.export_dir)
        except OSError as exc:
            raise CAError(f"cannot write the CA to {settings.export_dir} ({exc.strerror})") from exc
    log.info(
        "pod CA ready",
        extra={
            "origin": origin,
            "sha256": ca.fingerprint,
            "permitted": " ".join(ca.permitted() or ()),
            "kept_in": str(settings.ca_dir) if settings.ca_dir else "memory",
            "exported_to": str(settings.export_dir) if settings.export_dir else None,
        },
    )
    if settings.ca_dir is None and settings.ca_from is None:
        log.warning(
            "intercept.ca_dir is not set: the pod CA lives in memory only, so a sidecar restart "
            "makes a new one the app does not trust (set it to the sidecar's own emptyDir)"
        )
    return ServerContexts(ca, settings.leaf_hours)


class Sidecar:
    def __init__(
        self,
        config: Config,
        *,
        grace: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
        resolver: Resolver = system_resolver,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._initial = config
        self._env = os.environ if env is None else env  # OTEL_* (ops/tracing.py)
        self.tracing: Tracing | None = None
        self._wall_clock = wall_clock  # SVID notAfter / exp and JWT exp are epoch seconds
        self._resolver = resolver  # transparent capture: what a Host/SNI resolves to
        self._reuse_port = reuse_port  # --workers: several processes share the ports
        self._clock = clock  # token lifetimes; tests pass a manual clock
        self.grace = grace
        self.snapshot: Snapshot | None = None
        self.generation = 0  # +1 per config applied; reload tests wait on it
        self._changed = asyncio.Condition()
        self.dpop_key = DpopKey()
        self.nonces = NonceStore()
        self.identity: WorkloadIdentity = (
            SvidFiles(config.spiffe_files, clock=wall_clock)
            if config.spiffe_files is not None
            else WorkloadIdentity(config.spiffe_socket, clock=wall_clock)
        )
        self.metrics = Metrics()
        self._background = Background("sidecar")
        self._reload_lock = asyncio.Lock()
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self.local_addresses: dict[str, Address] = {}
        self.transparent_addresses: list[Address] = []
        self.capture: Capture | None = None
        self._watcher: tuple[ConfigWatcher, asyncio.Task[None]] | None = None
        self.stopping = False
        self._prefetching: asyncio.Task[None] | None = None
        self.intercept: ServerContexts | None = None  # the pod CA's leaves, when routes intercept

    @property
    def config(self) -> Config:
        """The config in force (the latest one applied)."""
        return self.snapshot.config if self.snapshot else self._initial

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        config = self._initial
        self.snapshot = await asyncio.to_thread(build_snapshot, config)
        if config.intercept_hosts:
            try:
                self.intercept = await asyncio.to_thread(
                    pod_ca_contexts, config.intercept, config.intercept_hosts
                )
            except CAError as exc:
                raise ConfigError([f"intercept: {exc}"]) from exc
        self.generation = 1
        log.info(
            "config loaded",
            extra={"source": str(config.source), "routes": len(config.destinations)},
        )
        _warn_cleartext(config)
        # Authorization servers are named by the operator's config, not by the app: they are
        # dialled wherever their names resolve, loopback included (node-local IdPs, tests).
        # The SSRF guard is for the upstreams an app's request picks (see proxy/upstream.py).
        wall_clock = self._wall_clock
        # None unless OTEL_* asks for traces; then the token client and the forwarder trace.
        self.tracing = tracing = tracing_from_env(self._env)
        observe = self._observe_token if tracing is None else tracing.observing(self._observe_token)
        self.token_client = TokenClient(
            UrlClient(allow_private=True),
            self.identity,
            self.dpop_key,
            self.nonces,
            ssl_for=self._as_ssl,
            clock=self._clock,
            wall=wall_clock,
            observe=observe,
            exchanges={"aws_sts": assume_role, "google_sts": federate},
        )
        if tracing is not None:
            self.token_client.trace_with(tracing)
        cache = TokenCache(self._background, clock=self._clock, wait=config.token_wait)
        self.credentials = Credentials(
            self.identity,
            self.token_client,
            cache,
            self.dpop_key,
            self.nonces,
            observe=self._observe_credential,
            clock=self._clock,
        )
        self.admission = Admission(config.max_app_connections)
        self.forwarder = Forwarder(
            self.credentials.kind,
            ssl_for=self._route_ssl,
            replay_limit=config.replay_buffer_bytes,
            admission=self.admission,
        )
        if tracing is not None:
            self.forwarder.trace_with(tracing)
        self.listener = Listener(
            self.handle, max_header_bytes=config.max_header_bytes, admission=self.admission
        )
        self.metrics.bind(self, clock=wall_clock)
        logs_module.set_audit(config.audit)
        listener = self.listener
        self.metrics.in_flight.set_function(lambda: listener.in_flight)  # read at scrape time
        self.admin = Admin(local_endpoints(self.readiness_state, self.metrics.exposition))
        if config.admin is not None:
            self.admin_address = await self.admin.start(config.admin, reuse_port=self._reuse_port)
        servers = list(config.authorization_servers.values())
        if servers:
            log.info("waiting for SVID", extra={"socket": config.spiffe_socket})
            self._prefetching = self._background.spawn(self._warm_up(), name="warm-up")
        # Always: a reload may add the first authorization server.
        self._background.spawn(cache.run(), name="token refresh timer")
        self.proxy_address = await self.listener.start(config.listen, reuse_port=self._reuse_port)
        for port, route in self.snapshot.routing.local_ports.items():
            address = Address(config.listen.host, port)
            self.local_addresses[route.name] = await self.listener.start(
                address, reuse_port=self._reuse_port
            )
        if config.transparent is not None:
            await self._start_transparent(config.transparent)
        if config.watch and config.source is not None:
            watcher = ConfigWatcher(
                config.source,
                config.watch_interval,
                self.reload,
                on_failure=self.metrics.reloads.labels("failure").inc,
            )
            await watcher.baseline()  # before start() returns: no change can slip past
            self._watch(watcher)
        log.info(
            "listening", extra={"proxy": str(self.proxy_address), "admin": str(self.admin_address)}
        )

    async def _start_transparent(self, settings: Transparent) -> None:
        metrics = self.metrics
        self.capture = Capture(
            self.listener,
            lambda: self._snapshot().routing,
            lambda: self.config.transparent or settings,
            Counters(
                lambda outcome: metrics.transparent_connections.labels(outcome).inc(),
                lambda action, port: metrics.transparent_unmatched.labels(action, str(port)).inc(),
                lambda route, outcome: metrics.intercept_handshakes.labels(route, outcome).inc(),
            ),
            resolver=self._resolver,
            intercept=lambda: self.intercept,
        )
        factory = self.capture.protocol
        self.transparent_addresses.append(
            await self.listener.start(settings.listen, reuse_port=self._reuse_port, factory=factory)
        )
        if settings.ipv6:
            try:  # ip6tables REDIRECT of locally generated packets goes to ::1
                address = Address("::1", settings.listen.port)
                self.transparent_addresses.append(
                    await self.listener.start(address, reuse_port=self._reuse_port, factory=factory)
                )
            except OSError as exc:
                log.warning(
                    "no IPv6 loopback: IPv6 connections are not captured",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )

    def _snapshot(self) -> Snapshot:
        assert self.snapshot is not None
        return self.snapshot

    async def stop(self) -> None:
        """Stop accepting, report not-ready, let in-flight requests finish within ``grace``."""
        self.stopping = True
        log.info("shutting down", extra={"grace_seconds": self.grace})
        if self.capture is not None:
            self.capture.close()
        await self.listener.stop(self.grace)
        await self._background.close()
        await self.forwarder.close()
        await self.token_client.close()
        if self.tracing is not None:
            await self.tracing.close()  # exports the spans still buffered
        await self.identity.close()
        await self.admin.stop()
        log.info("stopped")

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _warm_up(self) -> None:
        """Get an SVID; then, with ``prefetch``, a token per route so readiness can pass."""
        servers = list(self.config.authorization_servers.values())
        x509 = any(s.client_auth == "mtls" for s in servers)
        # Whatever the client auth: the X.509-SVID's expiry and the stream's breaks are
        # reported (events, sidecar_svid_expiry_seconds) from what the sidecar holds.
        await self.identity.watch_x509()
        await self.identity.wait_until_ready(servers[0].jwt_svid_audience, x509=x509)
        await self._prefetch()

    async def _prefetch(self) -> None:
        """With ``tokens.prefetch``, a token for every route that never got one under the
        config in force (at start, and after a reload), so readiness can pass."""
        delay = 1.0
        while self.config.prefetch:
            snapshot = self.snapshot
            assert snapshot is not None
            outcomes = self.token_client.outcomes
            pending = [
                r
                for r in snapshot.routing.routes.values()
                if not (r.name in outcomes and outcomes[r.name].ever_ok)
            ]
            results = await asyncio.gather(
                *(self.credentials.warm(r, r.prefetch_scopes) for r in pending),
                return_exceptions=True,
            )
            if not any(isinstance(r, BaseException) for r in results):
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, 60.0)

    # -- config reload ------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Load the config file again; apply it atomically if valid, else keep the old one."""
        source = self.config.source
        if source is None:
            return False
        async with self._reload_lock:
            try:
                # The file as it is before it is read: a watcher (re)started by this reload
                # then notices any change made while it was loaded.
                seen = await asyncio.to_thread(fingerprint, source)
                config = await asyncio.to_thread(load_config, source)
                snapshot = await asyncio.to_thread(build_snapshot, config, self.snapshot)
                if config.intercept_hosts and self.intercept is None:
                    try:
                        self.intercept = await asyncio.to_thread(
                            pod_ca_contexts, config.intercept, config.intercept_hosts
                        )
                    except CAError as exc:
                        raise ConfigError([f"intercept: {exc}"]) from exc
                elif self.intercept is not None:
                    for host in self.intercept.ca.uncovered(config.intercept_hosts):
                        log.error(
                            "the pod CA does not cover this intercepting host; its CONNECTs "
                            "are refused until the pod restarts (the app trusts the old CA)",
                            extra={"host": host},
                        )
            except ConfigError as exc:
                self.metrics.reloads.labels("failure").inc()
                for problem in exc.problems:
                    log.error("config reload rejected", extra={"problem": problem})
                log.error(
                    "keeping the last good config",
                    extra={"source": str(source), "problems": len(exc.problems)},
                )
                return False
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error(
                    "config reload failed; keeping the last good config",
                    extra={"source": str(source), "error": f"{type(exc).__name__}: {exc}"},
                )
                return False
            except Exception as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error(
                    "config reload failed; keeping the last good config",
                    extra={"source": str(source), "error": type(exc).__name__},
                )
                return False
            self._apply(snapshot, seen)
            return True

    def _apply(self, snapshot: Snapshot, seen: Fingerprint = None) -> None:
        old = self.config
        new = snapshot.config
        if (old.transparent and old.transparent.listen) != (
            new.transparent and new.transparent.listen
        ):
            log.warning("this setting changes only on restart", extra={"setting": "transparent"})
        for key in ("listen", "admin", "spiffe_socket", "spiffe_files"):
            if getattr(old, key) != getattr(new, key):
                log.warning("this setting changes only on restart", extra={"setting": key})
        if {d.local_port for d in old.destinations} != {d.local_port for d in new.destinations}:
            log.warning("this setting changes only on restart", extra={"setting": "local_port"})
        for name, server in old.authorization_servers.items():
            if new.authorization_servers.get(name) != server:  # its tokens may differ now
                self.credentials.cache.drop_server(name)
                routes = [d.name for d in old.destinations if d.authorization_server == name]
                self.token_client.forget(name, routes)
        _warn_cleartext(new)
        self.snapshot = snapshot  # one assignment: in-flight requests keep theirs
        self.generation += 1
        self.metrics.reloads.labels("success").inc()
        # What was derived from the old config dies with it (reloads must not grow memory):
        # prepared upstreams, token keys holding old routes, idle connections of old contexts.
        self.forwarder.config_applied(snapshot.tls.contexts(), snapshot.routing.all_route_names)
        self.credentials.config_applied()
        self._apply_settings(old, new, seen)
        log.info(
            "config reloaded",
            extra={"source": str(new.source), "routes": len(new.destinations)},
        )
        self._background.spawn(self._notify_changed(), name="config changed")
        prefetching = self._prefetching
        if new.prefetch and new.authorization_servers and (not prefetching or prefetching.done()):
            # One prefetch loop at a time; the one running reads the new snapshot anyway.
            self._prefetching = self._background.spawn(self._prefetch(), name="prefetch")

    def _apply_settings(self, old: Config, new: Config, seen: Fingerprint) -> None:
        """The settings a reload applies in place (``listen`` & co. need a restart)."""
        logs_module.set_level(new.log_level)
        logs_module.set_audit(new.audit)
        self.credentials.cache.wait = new.token_wait
        if new.log_format != old.log_format:
            logs_module.set_format(new.log_format)
        self.listener.max_header_bytes = new.max_header_bytes
        self.admission.max_connections = new.max_app_connections
        self.forwarder.replay_limit = new.replay_buffer_bytes
        watcher = self._watcher
        if watcher is not None and (not new.watch or new.watch_interval != old.watch_interval):
            watcher[1].cancel()
            self._watcher = None
        if new.watch and self._watcher is None and new.source is not None:
            self._watch(
                ConfigWatcher(
                    new.source,
                    new.watch_interval,
                    self.reload,
                    baseline=seen,
                    on_failure=self.metrics.reloads.labels("failure").inc,
                )
            )

    def _watch(self, watcher: ConfigWatcher) -> None:
        self._watcher = (watcher, self._background.spawn(watcher.run(), name="config watcher"))

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_generation(self, generation: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation >= generation)

    # -- data path ----------------------------------------------------------------------------

    async def handle(self, request: Request, reply: Reply) -> None:
        snapshot = self.snapshot  # read once: this request finishes on this config
        assert snapshot is not None
        routing = snapshot.routing
        exchange = Exchange(request.method, request.target)
        try:
            if request.authority is not None:
                exchange.intercepted = True
                resolved = routing.resolve_intercepted(
                    request.method,
                    request.target,
                    request.authority,
                    request.headers,
                    request.overrides,
                )
            elif request.local_port in routing.local_ports:
                resolved = routing.resolve_local(
                    request.local_port, request.method, request.target, request.overrides
                )
            elif request.captured is not None:  # transparent capture: origin-form, by Host
                resolved = routing.resolve_captured(
                    request.method,
                    request.target,
                    request.headers,
                    request.captured.host,
                    request.overrides,
                )
            elif request.method == "CONNECT":
                intercepting = routing.intercept_for(request.target)
                if intercepting is not None:
                    await self._intercept(reply, *intercepting, exchange)
                    return
                dest, host, port = routing.tunnel_for(request.target)
                exchange.route, exchange.host = dest.name, f"{host}:{port}"
                self.metrics.tunnels.labels(dest.name).inc()
                await open_tunnel(reply, dest, host, port)
                exchange.status = reply.status
                return
            else:
                resolved = routing.resolve(request.method, request.target, request.overrides)
            target = resolved.target
            exchange.route = resolved.route.name
            exchange.host, exchange.path, exchange.query = target.host, target.path, target.query
            exchange.scopes = resolved.scopes
            if exchange.intercepted:
                self.metrics.intercepted_requests.labels(resolved.route.name).inc()
            await self.forwarder.forward(request, reply, resolved, exchange)
            exchange.status = reply.status
        except ProxyError as error:
            exchange.status, exchange.error = error.status, error.code
            exchange.route = exchange.route or error.route
            raise
        except BaseException as exc:
            if isinstance(exc, AppGone) or request.app_gone:
                # nginx's 499: the app closed its connection first (its request was dropped
                # before it was sent, or given up while the upstream had not answered)
                exchange.status, exchange.error = reply.status or 499, APP_GONE
            else:
                exchange.status, exchange.error = reply.status or 500, "internal_error"
            raise
        finally:
            self._record(exchange, snapshot)

    async def _intercept(
        self, reply: Reply, route: Route, host: str, port: int, exchange: Exchange
    ) -> None:
        """CONNECT to an intercepting route: 200, then TLS with a pod-CA leaf for ``host``."""
        exchange.route, exchange.host = route.name, f"{host}:{port}"
        exchange.intercepted = True
        contexts = self.intercept
        if contexts is None or not contexts.ca.covers(host):
            raise Forbidden(
                f"route {route.name!r} was set to intercept after the pod CA was made; its "
                "name constraints do not cover it (restart the pod)",
                route=route.name,
            )
        try:
            await reply.intercept(host, port, contexts)
        except HandshakeFailed as failed:
            exchange.status, exchange.error = 200, f"tls_{failed.reason}"
            self.metrics.intercept_handshakes.labels(route.name, failed.reason).inc()
            log.warning(
                "TLS handshake with the app failed; nothing was forwarded",
                extra={
                    "route": route.name,
                    "host": host,
                    "reason": failed.reason,
                    "detail": failed.detail,
                },
            )
            return
        self.metrics.intercept_handshakes.labels(route.name, "ok").inc()
        exchange.status = 200

    def _record(self, exchange: Exchange, snapshot: Snapshot) -> None:
        known = exchange.route in snapshot.routing.all_route_names
        route = exchange.route if known and exchange.route else UNMATCHED
        self.metrics.request_done(
            route,
            exchange.method,
            exchange.status,
            exchange.upstream_seconds,
            exchange.error,
            exchange.added_seconds(),
        )
        if exchange.retry:
            self.metrics.retries.labels(route, exchange.retry).inc()
        exchange.record(self.identity.spiffe_id, with_query=snapshot.config.audit_query)

    def _observe_credential(self, kind: str, outcome: str) -> None:
        self.metrics.credentials.labels(kind, outcome).inc()

    def _observe_token(self, server: str, outcome: str) -> None:
        if outcome == "nonce_retry":
            self.metrics.token_nonce_retries.labels(server).inc()
        else:
            self.metrics.token_requests.labels(server, outcome).inc()

    def _as_ssl(self, server: AuthorizationServer) -> ssl.SSLContext:
        assert self.snapshot is not None
        return self.snapshot.tls.get(server.ca_file)

    def _route_ssl(self, route: Route) -> ssl.SSLContext:
        assert self.snapshot is not None
        return self.snapshot.tls.get(route.destination.ca_file)

    # -- health -------------------------------------------------------------------------------

    def token_expiries(self) -> dict[str, float]:
        """``sidecar_token_expiry_seconds`` per configured authorization server (never missing;
        see TokenCache.expiry_seconds for the values when no token is usable)."""
        return self.credentials.cache.expiry_seconds(self.config.authorization_servers)

    def route_states(self) -> dict[str, RouteReadiness]:
        """Each route's readiness, from the tokens held now and its last token request."""
        snapshot = self.snapshot
        if snapshot is None:
            return {}
        held = {
            (k.server, k.resource, k.audience, k.jkt is not None)
            for k, _ in self.credentials.cache.valid_tokens()
        }
        outcomes = self.token_client.outcomes
        states: dict[str, RouteReadiness] = {}
        for route in snapshot.routing.routes.values():
            dest = route.destination
            if route.server is None:  # a kind that needs no authorization server (header)
                states[route.name] = self._serverless_readiness(route)
                continue
            shape = (route.server.name, dest.resource, dest.audience, dest.credential == "dpop")
            last = outcomes.get(route.name)
            states[route.name] = route_readiness(
                holds_token=shape in held,
                last_ok=None if last is None else last.ok,
                last_reason="" if last is None else last.reason,
                ever_ok=last is not None and last.ever_ok,
            )
        return states

    def _serverless_readiness(self, route: Route) -> RouteReadiness:
        """A route whose credential is read from files: ready while they were read and good."""
        state, why = self.credentials.standing(route)
        return RouteReadiness(state, why, state == "ready")  # type: ignore[arg-type]

    def readiness_state(self) -> Readiness:
        """What /readyz says (sidecar/ops/readiness.py): computed now, from the data path."""
        servers = self.config.authorization_servers.values()
        # Only authorization servers take the SPIFFE identity: a config of header routes alone
        # never asks for an SVID, and must not wait for one.
        identity = (
            self.identity.problem(need_x509=any(s.client_auth == "mtls" for s in servers))
            if servers
            else None
        )
        return evaluate(
            policy=self.config.readiness,
            stopping=self.stopping,
            loaded=self.snapshot is not None,
            identity=identity,
            routes=self.route_states(),
        )

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, problem texts): the loopback view of :meth:`readiness_state`."""
        state = self.readiness_state()
        return state.ready, {k: v[1] for k, v in state.problems.items()}
