"""Prometheus metrics (prometheus-client), one registry per sidecar.

Every label value is bounded: route and authorization-server names come from the config,
methods are folded to the standard set, statuses to their class, outcomes and reasons to
fixed vocabularies. No label ever carries a token, a path, a host the app made up, or an ID.
The documented list lives in docs/operations.md and a test checks it against this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
        self.requests = Counter(
            "sidecar_requests",
            "Requests from the app, by route, method and status class.",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
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

        # Labelled children, looked up once per (route, method, status): labels() costs more
        # than the increment. Methods and statuses are folded before they become labels, and
        # the keys are bounded the same way (methods by llhttp, statuses by 3 digits).
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def request_done(
        self, route: str, method: str, status: int, upstream_seconds: float | None
    ) -> None:
        children = self._children.get((route, method, status))
        if children is None:
            if len(self._children) > 65536:
                self._children.clear()
            counter = self.requests.labels(route, method_label(method), status_class(status))
            histogram = self.upstream_latency.labels(route)
            children = self._children[(route, method, status)] = (counter, histogram)
        children[0].inc()
        if upstream_seconds is not None:
            children[1].observe(upstream_seconds)

    def bind(self, sidecar: Sidecar) -> None:
        """Add the gauges that are read from the sidecar's state at scrape time."""
        self.registry.register(_StateCollector(sidecar))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
        tokens = GaugeMetricFamily(
            "sidecar_token_expiry_seconds",
            "Seconds until the soonest-expiring cached token of each authorization server.",
            labels=["authorization_server"],
        )
        for server, seconds in sorted(sidecar.token_expiries().items()):
            tokens.add_metric([server], seconds)
        yield tokens
        svids = GaugeMetricFamily(
            "sidecar_svid_expiry_seconds",
            "Seconds until the current SVID expires (jwt: soonest of the cached JWT-SVIDs).",
            labels=["type"],
        )
        now = self._clock()
        identity = sidecar.identity
        jwt_expiry = identity.jwt_expiry()
        if jwt_expiry is not None:
            svids.add_metric(["jwt"], jwt_expiry - now)
        if identity.x509 is not None:
            svids.add_metric(["x509"], identity.x509.expires_at - now)
        yield svids
