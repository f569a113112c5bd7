"""The pod's one admin port with --workers: expositions merged, readiness combined (pure)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from sidecar.ops.metrics import Metrics
from sidecar.ops.pod_admin import WorkerAnswer, combine_health, combine_readiness, merge_expositions


def worker_text(requests: int, in_flight: int, latency: float) -> str:
    m = Metrics()
    for _ in range(requests):
        m.request_done("saas", "GET", 200, latency)
    m.in_flight.set(in_flight)
    m.token_requests.labels("dev", "ok").inc()
    return m.exposition().decode()


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_and_histograms_are_summed_and_gauges_labelled_per_worker() -> None:
    merged = parsed(
        merge_expositions([("0", worker_text(3, 2, 0.01)), ("1", worker_text(4, 5, 0.3))])
    )
    labels = (("method", "GET"), ("route", "saas"), ("status_class", "2xx"))
    assert merged[("sidecar_requests_total", labels)] == 7
    auth = (("authorization_server", "dev"), ("outcome", "ok"))
    assert merged[("sidecar_token_requests_total", auth)] == 2
    assert merged[("sidecar_upstream_latency_seconds_count", (("route", "saas"),))] == 7
    bucket = (("le", "0.025"), ("route", "saas"))
    assert merged[("sidecar_upstream_latency_seconds_bucket", bucket)] == 3  # still cumulative
    assert merged[("sidecar_in_flight_requests", (("worker", "0"),))] == 2
    assert merged[("sidecar_in_flight_requests", (("worker", "1"),))] == 5
    assert ("sidecar_in_flight_requests", ()) not in merged


def test_ready_only_when_every_worker_is() -> None:
    ok = json.dumps({"ready": True, "problems": {}}).encode()
    no = json.dumps({"ready": False, "problems": {"route saas": "no token yet"}}).encode()
    status, doc = combine_readiness([WorkerAnswer("0", 200, ok), WorkerAnswer("1", 200, ok)])
    assert status == 200
    assert doc["ready"] is True
    status, doc = combine_readiness([WorkerAnswer("0", 200, ok), WorkerAnswer("1", 503, no)])
    assert status == 503
    assert doc["problems"] == {"worker 1: route saas": "no token yet"}
    assert doc["workers"] == {"0": "ready", "1": "not ready"}
    # Beyond loopback the pod's port says states, never the workers' texts.
    _, doc = combine_readiness([WorkerAnswer("1", 503, no)], detail=False)
    assert doc["problems"] == {"worker 1: route saas": "not ready"}
    status, doc = combine_readiness([WorkerAnswer("0", 200, ok), WorkerAnswer("1", None)])
    assert status == 503
    assert doc["workers"] == {"0": "ready", "1": "not answering"}
    assert combine_readiness([])[0] == 503


def test_alive_only_when_every_worker_answers() -> None:
    assert combine_health([WorkerAnswer("0", 200), WorkerAnswer("1", 200)])[0] == 200
    status, doc = combine_health([WorkerAnswer("0", 200), WorkerAnswer("1", None)])
    assert status == 503
    assert doc["workers"] == {"0": "ok", "1": "not answering"}
