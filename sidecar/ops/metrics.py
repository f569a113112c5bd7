"""Prometheus metrics (prometheus-client), one registry per sidecar.

Every label value is bounded: route and authorization-server names come from the config,
methods are folded to the standard set, statuses to their class, outcomes and reasons to
fixed vocabularies. No label ever carries a token, a path, a host the app made up, or an ID.
The documented list lives in docs/operations.md and a test checks it against this module.

The two series every request touches (``sidecar_requests_total`` and the upstream latency
histogram) are plain counters exposed by a collector at scrape time; the rest use
prometheus-client's metric types.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.config import HTTP_METHODS

if TYPE_CHECKING:
    from sidecar.runtime import Sidecar

# No *_created series: they double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNMATCHED = "(unmatched)"  # the route label of requests no route accepted
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS or method == "CONNECT" else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The two series every request touches are counted by _RequestStats (plain ints).
        self._stats = _RequestStats()
        r.register(self._stats)
        self.token_requests = Counter(
            "sidecar_token_requests",
            "Token requests to authorization servers, by outcome (ok, rejected, unavailable).",
            ["authorization_server", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "sidecar_upstream_retries",
            "Requests retried once upstream, by reason (use_dpop_nonce, invalid_token).",
            ["route", "reason"],
            registry=r,
        )
        self.credentials = Counter(
            "sidecar_credentials",
            "Credentials obtained for kinds without a token request (header: a file read), "
            "by kind and outcome (ok, rejected, unavailable).",
            ["kind", "outcome"],
            registry=r,
        )
        self.token_nonce_retries = Counter(
            "sidecar_token_nonce_retries",
            "Token requests retried with the authorization server's DPoP nonce.",
            ["authorization_server"],
            registry=r,
        )
        self.reloads = Counter(
            "sidecar_config_reloads",
            "Config reloads, by outcome (success, failure).",
            ["outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests", "Requests being served now.", registry=r
        )
        self.tunnels = Counter(
            "sidecar_tunnels", "CONNECT tunnels opened, by route.", ["route"], registry=r
        )
        self.intercept_handshakes = Counter(
            "sidecar_intercept_handshakes",
            "TLS handshakes with the app on intercepting routes, by outcome (ok, unknown_ca, "
            "sni_mismatch, protocol, closed, timeout).",
            ["route", "outcome"],
            registry=r,
        )
        self.intercepted_requests = Counter(
            "sidecar_intercepted_requests",
            "Requests decrypted from intercepted https:// connections, by route.",
            ["route"],
            registry=r,
        )
        self.transparent_connections = Counter(
            "sidecar_transparent_connections",
            "Connections captured by the transparent listener, by outcome (routed, intercepted, "
            "tunnel, passthrough, denied, malformed, needs_intercept, address_mismatch, "
            "handshake_failed, not_redirected, unreachable).",
            ["outcome"],
            registry=r,
        )
        # The port label is bounded by 65535 and in practice by the ports the app dials.
        self.transparent_unmatched = Counter(
            "sidecar_transparent_unmatched",
            "Captured connections to destinations without a route, by action "
            "(passthrough, deny) and destination port.",
            ["action", "port"],
            registry=r,
        )

    def request_done(
        self, route: str, method: str, status: int, upstream_seconds: float | None
    ) -> None:
        self._stats.record(route, method, status, upstream_seconds)

    def bind(self, sidecar: Sidecar, clock: Callable[[], float] = time.time) -> None:
        """Add the gauges that are read from the sidecar's state at scrape time."""
        self.registry.register(_StateCollector(sidecar, clock))
        self.registry.register(_AdmissionCollector(sidecar))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RequestStats(Collector):
    """``sidecar_requests_total`` and ``sidecar_upstream_latency_seconds``, kept as plain
    integers and exposed at scrape time: a request costs two dict lookups and a bisect, not
    prometheus-client's lock per sample (bench/: ~3 µs per request). One thread (the event
    loop) writes and scrapes them, so no lock is needed."""

    def __init__(self) -> None:
        # (route, method label, status) -> count; statuses are folded to classes at scrape.
        self._counts: dict[tuple[str, str, int], int] = {}
        # route -> [count per bucket (the last is +Inf)..., sum]
        self._latency: dict[str, list[float]] = {}

    def record(self, route: str, method: str, status: int, seconds: float | None) -> None:
        key = (route, method_label(method), status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if seconds is not None:
            latency = self._latency.get(route)
            if latency is None:
                latency = self._latency[route] = [0] * (len(LATENCY_BUCKETS) + 2)
            latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            latency[-1] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "sidecar_requests",
            "Requests from the app, by route, method and status class.",
            labels=["route", "method", "status_class"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        for (route, method, status), count in list(self._counts.items()):
            labels = (route, method, status_class(status))
            totals[labels] = totals.get(labels, 0) + count
        for labels, total in sorted(totals.items()):
            requests.add_metric(list(labels), total)
        yield requests
        latency = HistogramMetricFamily(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            labels=["route"],
        )
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for route, values in sorted(self._latency.items()):
            cumulative = list(accumulate(values[:-1]))
            latency.add_metric(
                [route], list(zip(bounds, cumulative, strict=True)), sum_value=values[-1]
            )
        yield latency


class _StateCollector(Collector):
    def __init__(self, sidecar: Sidecar, clock: Callable[[], float] = time.time) -> None:
        self._sidecar = sidecar
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sidecar = self._sidecar
        cache = sidecar.credentials.cache
        events = CounterMetricFamily(
            "sidecar_token_cache_events",
            "Token cache lookups and background refreshes since start (hit, miss, refresh).",
            labels=["event"],
        )
        events.add_metric(["hit"], cache.hits)
        events.add_metric(["miss"], cache.misses)
        events.add_metric(["refresh"], cache.refreshes)
        yield events
        # Series never vanish because their value is bad news: every configured server,
        # every route and the X.509-SVID always have a sample (docs/operations.md).
        tokens = GaugeMetricFamily(
            "sidecar_token_expiry_seconds",
            "Seconds until the soonest-expiring usable token of each authorization server; "
            "<= 0 when none is usable (minus the seconds since the last expired); NaN when "
            "idle (every key lapsed).",
            labels=["authorization_server"],
        )
        for server, seconds in sorted(sidecar.token_expiries().items()):
            tokens.add_metric([server], seconds)
        yield tokens
        routes = GaugeMetricFamily(
            "sidecar_route_ready",
            "1 when the route holds a usable token or its last token request succeeded, else 0.",
            labels=["route"],
        )
        for route, state in sorted(sidecar.route_states().items()):
            routes.add_metric([route], 1.0 if state.ready else 0.0)
        yield routes
        svids = GaugeMetricFamily(
            "sidecar_svid_expiry_seconds",
            "Seconds until the SVID held expires, negative past it (x509: 0 until one arrives; "
            "jwt: the freshest cached JWT-SVID).",
            labels=["type"],
        )
        now = self._clock()
        identity = sidecar.identity
        jwt_expiry = identity.jwt_expiry()
        if jwt_expiry is not None:
            svids.add_metric(["jwt"], jwt_expiry - now)
        held = identity.held_x509
        svids.add_metric(["x509"], held.expires_at - now if held is not None else 0.0)
        yield svids
        workload_api = CounterMetricFamily(
            "sidecar_workload_api_events",
            "Workload API events when they happen: stream_broken, reconnect_attempt, "
            "fetch_failed, svid_expired.",
            labels=["event"],
        )
        for event, count in sorted(identity.events.items()):
            workload_api.add_metric([event], count)
        yield workload_api


class _AdmissionCollector(Collector):
    """Connections from the app and the file-descriptor limit (see proxy/admission.py)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sidecar = self._sidecar
        admission = sidecar.admission
        yield GaugeMetricFamily(
            "sidecar_app_connections",
            "Open connections from the app.",
            value=len(sidecar.listener.connections),
        )
        refused = CounterMetricFamily(
            "sidecar_app_connections_refused",
            "Connections from the app closed unserved (limit: limits.max_app_connections; "
            "fd_limit: too few file descriptors left).",
            labels=["reason"],
        )
        for reason, count in sorted(admission.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        exhausted = CounterMetricFamily(
            "sidecar_fd_exhausted",
            "Times the file-descriptor limit was hit (accept: a new app connection; upstream: "
            "connecting to an API).",
            labels=["where"],
        )
        for where, count in sorted(admission.fd_exhausted.items()):
            exhausted.add_metric([where], count)
        yield exhausted
        queued = GaugeMetricFamily(
            "sidecar_upstream_queued_requests",
            "Requests waiting for one of a route's max_connections slots (queue_timeout).",
            labels=["route"],
        )
        snapshot = sidecar.snapshot
        if snapshot is not None:
            for route in sorted(snapshot.routing.all_route_names):
                slots = sidecar.forwarder.slots_of(route)
                queued.add_metric([route], slots.waiting if slots is not None else 0)
        yield queued
