"""Request counters and the upstream latency histogram, as Prometheus reads them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.ops.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_fold_methods_and_statuses_into_bounded_labels() -> None:
    m = Metrics()
    for method, status in [("GET", 200), ("GET", 204), ("BREW", 418), ("PURGE", 503), ("GET", 200)]:
        m.request_done("saas", method, status, None)
    got = {
        (dict(labels)["method"], dict(labels)["status_class"]): value
        for (name, labels), value in samples(m).items()
        if name == "sidecar_requests_total" and dict(labels)["route"] == "saas"
    }
    assert got == {("GET", "2xx"): 3, ("OTHER", "4xx"): 1, ("OTHER", "5xx"): 1}


def test_latency_buckets_are_cumulative_and_inclusive() -> None:
    m = Metrics()
    for seconds in (0.005, 0.0051, 0.3, 45.0):  # 0.005 is in le="0.005": buckets are <=
        m.request_done("saas", "GET", 200, seconds)
    m.request_done("saas", "GET", 502, None)  # no upstream answer: not observed
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("sidecar_upstream_latency_seconds_bucket", (("le", le), ("route", "saas")))]

    assert bucket("0.005") == 1
    assert bucket("0.01") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("30.0") == 3
    assert bucket("+Inf") == 4
    count = got[("sidecar_upstream_latency_seconds_count", (("route", "saas"),))]
    total = got[("sidecar_upstream_latency_seconds_sum", (("route", "saas"),))]
    assert count == 4
    assert abs(total - 45.3101) < 1e-9
