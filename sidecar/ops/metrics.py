"""Prometheus metrics (prometheus-client), one registry per sidecar.

Every label value is bounded: route and authorization-server names come from the config,
methods are folded to the standard set, statuses to their class, outcomes and reasons to
fixed vocabularies. No label ever carries a token, a path, a host the app made up, or an ID.
The documented list lives in docs/operations.md and a test checks it against this module.

The series every request touches (``sidecar_requests_total``, the errors the sidecar answered,
the upstream and added latency histograms) are plain counters exposed by a collector at scrape
time; the rest use prometheus-client's metric types.
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
from sidecar.errors import error_codes
from sidecar.proxy.intercept.server import REASONS as HANDSHAKE_REASONS

if TYPE_CHECKING:
    from sidecar.config import Destination
    from sidecar.runtime import Sidecar

# No *_created series: they double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNMATCHED = "(unmatched)"  # the route label of requests no route accepted
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The error label's vocabulary: the JSON ``error`` codes, and ``tls_<reason>`` for a failed
# handshake with the app on an intercepting route. Anything else would be a bug: "other".
ERROR_LABELS = error_codes() | {f"tls_{reason}" for reason in HANDSHAKE_REASONS}


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
        self,
        route: str,
        method: str,
        status: int,
        upstream_seconds: float | None,
        error: str | None = None,
        added_seconds: float | None = None,
    ) -> None:
        self._stats.record(route, method, status, upstream_seconds, error, added_seconds)

    def bind(self, sidecar: Sidecar, clock: Callable[[], float] = time.time) -> None:
        """Add the gauges that are read from the sidecar's state at scrape time."""
        self.registry.register(_StateCollector(sidecar, clock))
        self.registry.register(_AdmissionCollector(sidecar))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# What the sidecar adds is usually well under a millisecond (a token wait is seconds at most:
# tokens.wait, 3 s by default).
ADDED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 10.0)


def _observe(
    histograms: dict[str, list[float]], buckets: tuple[float, ...], route: str, seconds: float
) -> None:
    values = histograms.get(route)
    if values is None:
        values = histograms[route] = [0] * (len(buckets) + 2)
    values[bisect_left(buckets, seconds)] += 1
    values[-1] += seconds


def _histogram(
    name: str, documentation: str, buckets: tuple[float, ...], histograms: dict[str, list[float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["route"])
    bounds = [*map(floatToGoString, buckets), "+Inf"]
    for route, values in sorted(histograms.items()):
        cumulative = list(accumulate(values[:-1]))
        family.add_metric([route], list(zip(bounds, cumulative, strict=True)), sum_value=values[-1])
    return family


class _RequestStats(Collector):
    """``sidecar_requests_total``, ``sidecar_request_errors_total`` and the upstream and added
    latency histograms, kept as plain integers and exposed at scrape time: a request costs a
    few dict lookups and two bisects, not prometheus-client's lock per sample (bench/: ~3 µs
    per request). One thread (the event loop) writes and scrapes them, so no lock is needed."""

    def __init__(self) -> None:
        # (route, method label, status) -> count; statuses are folded to classes at scrape.
        self._counts: dict[tuple[str, str, int], int] = {}
        # (route, error code) -> count of the requests the sidecar answered itself
        self._errors: dict[tuple[str, str], int] = {}
        # route -> [count per bucket (the last is +Inf)..., sum]
        self._latency: dict[str, list[float]] = {}
        self._added: dict[str, list[float]] = {}

    def record(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float | None,
        error: str | None = None,
        added: float | None = None,
    ) -> None:
        key = (route, method_label(method), status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if seconds is not None:
            _observe(self._latency, LATENCY_BUCKETS, route, seconds)
        if added is not None:
            _observe(self._added, ADDED_BUCKETS, route, added)
        if error is not None:
            failed = (route, error if error in ERROR_LABELS else "other")
            self._errors[failed] = self._errors.get(failed, 0) + 1

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
        errors = CounterMetricFamily(
            "sidecar_request_errors",
            "Requests the sidecar answered with its own JSON error (or ended: app_gone, "
            "tls_<reason>), by route and error code.",
            labels=["route", "error"],
        )
        for (route, error), count in sorted(self._errors.items()):
            errors.add_metric([route, error], count)
        yield errors
        yield _histogram(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            LATENCY_BUCKETS,
            self._latency,
        )
        yield _histogram(
            "sidecar_added_latency_seconds",
            "Time the sidecar added before the upstream's response headers: from the app's "
            "request head to those headers, minus the upstream's time for the answer relayed "
            "(token waits, connection-slot queueing, signing, a nonce or token retry's round "
            "trip).",
            ADDED_BUCKETS,
            self._added,
        )


def _name(dest: Destination) -> str:
    return dest.name


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
        info = GaugeMetricFamily(
            "sidecar_route_info",
            "1 per configured route, naming its credential kind (dpop, bearer, aws_sigv4, "
            "header; tunnel for a blind CONNECT route), its authorization server ('' for "
            "none) and whether it intercepts https:// (join on route for per-kind views).",
            labels=["route", "credential", "authorization_server", "intercept"],
        )
        snapshot = sidecar.snapshot
        for dest in sorted(snapshot.config.destinations if snapshot else (), key=_name):
            info.add_metric(
                [
                    dest.name,
                    "tunnel" if dest.tunnel else dest.credential,
                    dest.authorization_server if dest.has_server else "",
                    "true" if dest.intercept else "false",
                ],
                1.0,
            )
        yield info
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
