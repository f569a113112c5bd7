"""The pod's one admin port with --workers: expositions merged, readiness combined (pure), and
the port itself, which is the admin server (bounded, GET only, 400 for malformed requests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Address
from sidecar.ops.admin import MAX_CONNECTIONS, Admin, local_endpoints
from sidecar.ops.metrics import Metrics
from sidecar.ops.pod_admin import (
    PodAdmin,
    WorkerAnswer,
    combine_health,
    combine_readiness,
    merge_expositions,
)
from sidecar.ops.readiness import Readiness


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


# -- the pod's port is the admin server ------------------------------------------------------------


@contextlib.asynccontextmanager
async def pod_port(ready: bool = True) -> AsyncIterator[tuple[str, int, PodAdmin]]:
    """A PodAdmin on loopback in front of two real worker admin ports."""
    not_ready = {"route saas": ("pending", "no token yet")}
    readiness = Readiness(ready, "ready", None, {}, {} if ready else not_ready)
    workers = [Admin(local_endpoints(lambda: readiness, lambda: worker_text(2, 1, 0.01).encode()))]
    workers.append(
        Admin(local_endpoints(lambda: readiness, lambda: worker_text(3, 4, 0.3).encode()))
    )
    loopback = Address("127.0.0.1", 0)
    addresses = {str(i): await w.start(loopback) for i, w in enumerate(workers)}
    pod = PodAdmin(dict(addresses))
    bound = await pod.start(loopback)
    try:
        yield bound.host, bound.port, pod
    finally:
        await pod.stop()
        for worker in workers:
            await worker.stop()


async def raw(host: str, port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


async def test_the_pod_port_merges_the_workers_answers() -> None:
    async with pod_port() as (host, port, _):
        answer = await raw(host, port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        merged = parsed(answer.partition(b"\r\n\r\n")[2])
        labels = (("method", "GET"), ("route", "saas"), ("status_class", "2xx"))
        assert merged[("sidecar_requests_total", labels)] == 5
        assert merged[("sidecar_in_flight_requests", (("worker", "1"),))] == 4
        answer = await raw(host, port, b"GET /readyz?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["workers"] == {
            "0": "ready",
            "1": "ready",
        }


@pytest.mark.parametrize(
    "data",
    [
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS at a plain port
        b"GET /healthz HTTP/1.1\r\nHost: a\nX: bare-lf\r\n\r\n",
    ],
)
async def test_the_pod_port_answers_malformed_requests_400_and_keeps_serving(data: bytes) -> None:
    # Before it served the admin server, the pod's port closed these without an answer.
    async with pod_port() as (host, port, _):
        assert (await raw(host, port, data)).startswith(b"HTTP/1.1 400 ")
        ok = await raw(host, port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("method", [b"HEAD", b"POST", b"DELETE"])
async def test_the_pod_port_answers_get_only(method: bytes) -> None:
    async with pod_port() as (host, port, _):
        answer = await raw(
            host,
            port,
            method + b" /readyz HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 405 ")
        assert b"\r\nAllow: GET\r\n" in answer


async def test_the_pod_port_serves_a_bounded_number_of_connections() -> None:
    async with pod_port() as (host, port, _):
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(MAX_CONNECTIONS):  # idle connections, as an abuser holds them
                held.append((await asyncio.open_connection(host, port))[1])
            reader, writer = await asyncio.open_connection(host, port)  # one too many
            held.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, unanswered
        finally:
            for writer in held:
                writer.close()


async def test_the_workers_texts_are_for_loopback_peers_only() -> None:
    async with pod_port(ready=False) as (host, port, pod):
        answer = await raw(host, port, b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")  # this test's peer is on loopback: texts
        problems = json.loads(answer.partition(b"\r\n\r\n")[2])["problems"]
        assert problems == {f"worker {w}: route saas": "no token yet" for w in "01"}
        # A kubelet or scraper beyond loopback (an address a test cannot connect from): states.
        status, _, body = await pod.answer("/readyz", peer_is_loopback=False)
        assert status == 503
        assert json.loads(body)["problems"] == {
            f"worker {w}: route saas": "not ready" for w in "01"
        }
