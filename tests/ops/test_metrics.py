"""Request and error counters and the upstream and added latency histograms, as Prometheus
reads them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import error_codes
from sidecar.ops.audit import Exchange
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


def test_errors_are_counted_by_route_and_a_bounded_error_code() -> None:
    m = Metrics()
    m.request_done("saas", "GET", 403, None, "no_scope_rule")
    m.request_done("saas", "GET", 403, None, "no_scope_rule")
    m.request_done("saas", "CONNECT", 200, None, "tls_unknown_ca")
    m.request_done("(unmatched)", "GET", 403, None, "destination_not_allowed")
    m.request_done("saas", "GET", 500, None, "made-up by a bug")  # never a free-text label
    m.request_done("saas", "GET", 200, 0.01)  # no error: not counted
    got = {
        tuple(sorted(dict(labels).items())): value
        for (name, labels), value in samples(m).items()
        if name == "sidecar_request_errors_total"
    }
    assert got == {
        (("error", "no_scope_rule"), ("route", "saas")): 2,
        (("error", "tls_unknown_ca"), ("route", "saas")): 1,
        (("error", "destination_not_allowed"), ("route", "(unmatched)")): 1,
        (("error", "other"), ("route", "saas")): 1,
    }


def test_every_code_the_sidecar_answers_is_its_own_error_label() -> None:
    for code in error_codes():
        m = Metrics()
        m.request_done("saas", "GET", 503, None, code)
        assert (
            samples(m)[("sidecar_request_errors_total", (("error", code), ("route", "saas")))] == 1
        )


def test_added_latency_has_sub_millisecond_buckets() -> None:
    m = Metrics()
    for added in (0.0004, 0.0005, 0.0009, 0.2, 4.0):
        m.request_done("saas", "GET", 200, 0.05, None, added)
    m.request_done("saas", "GET", 403, None, "no_scope_rule", None)  # refused: not observed
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("sidecar_added_latency_seconds_bucket", (("le", le), ("route", "saas")))]

    assert bucket("0.0005") == 2
    assert bucket("0.001") == 3
    assert bucket("0.25") == 4
    assert bucket("3.0") == 4
    assert bucket("+Inf") == 5
    assert got[("sidecar_added_latency_seconds_count", (("route", "saas"),))] == 5


def test_added_latency_is_the_time_before_the_answer_minus_the_upstreams() -> None:
    exchange = Exchange("GET", "http://api.example/")
    assert exchange.added_seconds() is None  # nothing relayed (refused, or the app left)
    exchange.started, exchange.answered, exchange.upstream_seconds = 100.0, 100.75, 0.5
    assert exchange.added_seconds() == 0.25
    # A retry's first round trip counts as added; the relayed answer's own time does not.
    exchange.upstream_seconds = 0.75
    assert exchange.added_seconds() == 0.0
