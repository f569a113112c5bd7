"""Probes and metrics over the admin port; the metric list matches docs/operations.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.errors import IdentityUnavailable
from sidecar.ops.admin import MAX_CONNECTIONS
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, ManualClock, running_sidecar

URL = f"http://{SAAS_HOST}/v1/invoices"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


async def admin_get(sidecar: Sidecar, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{sidecar.admin_address}{path}") as resp,
    ):
        body = await (resp.json() if path != "/metrics" else resp.text())
        return resp.status, body


async def test_readiness_flips_with_the_as_and_the_svid(stack: DevStack) -> None:
    clock = ManualClock()
    stack.auth_server.set_down(True)
    async with running_sidecar(stack, clock=clock, tokens={"prefetch": True}) as sidecar:
        await stack.auth_server.wait_for_requests(1)  # the prefetch got the AS's 503
        await sidecar.credentials.cache.settle()
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 503
        assert "temporarily_unavailable" in body["problems"]["route saas"]
        assert "identity" not in body["problems"]
        stack.auth_server.set_down(False)
        clock.advance(10)  # past the token cache's backoff
        async with AppClient(sidecar) as app:
            assert (await app.request("GET", URL))[0] == 200
        status, body = await admin_get(sidecar, "/readyz")
        assert (status, body) == (
            200,
            {
                "ready": True,
                "problems": {},
                "identity": "ready",
                "routes": {"saas": {"state": "ready", "reason": "holds a usable token"}},
            },
        )
        # The SPIRE agent goes away and an SVID refresh fails: not ready.
        stack.workload_api.set_available(False)
        with pytest.raises(IdentityUnavailable):
            await sidecar.identity.jwt_svid("https://another.example")
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 503
        assert "Workload API" in body["problems"]["identity"]
        # It comes back: ready again.
        stack.workload_api.set_available(True)
        await sidecar.identity.jwt_svid("https://another.example")
        assert (await admin_get(sidecar, "/readyz"))[0] == 200


async def test_prefetch_makes_the_sidecar_ready_before_any_request(stack: DevStack) -> None:
    async with running_sidecar(stack, tokens={"prefetch": True}) as sidecar:
        await stack.auth_server.wait_for_requests(1)
        await sidecar.credentials.cache.settle()
        status, body = await admin_get(sidecar, "/readyz")
        assert status == 200, body
        assert stack.auth_server.token_requests[0].scope == ("invoices:read",)
    assert stack.saas.requests == []


async def test_healthz(sidecar: Sidecar) -> None:
    assert await admin_get(sidecar, "/healthz") == (200, {"status": "ok"})


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    rows = re.findall(r"^\| `(sidecar_[a-z_]+)` \| (\w+) \| ([^|]*)\|", DOCS.read_text(), re.M)
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


async def test_metric_names_and_labels_match_the_documented_list(
    stack: DevStack, sidecar: Sidecar, app: AppClient
) -> None:
    await app.request("GET", URL)
    await app.request("GET", "http://unknown.example/")
    await app.request("GET", f"http://{SAAS_HOST}/v1/invoices/12345?secret=1")
    status, text = await admin_get(sidecar, "/metrics")
    assert status == 200
    documented = documented_metrics()
    assert len(documented) >= 10
    seen: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("sidecar_"):
            continue
        suffix = "_total" if family.type == "counter" else ""
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        seen[family.name + suffix] = (family.type, labels)
    assert set(seen) <= set(documented), set(seen) - set(documented)
    for name, (kind, labels) in seen.items():
        assert documented[name][0] == kind, name
        assert labels <= documented[name][1], (name, labels)
    # Label values are bounded: no paths, IDs, hosts the app made up, or credentials.
    assert "12345" not in text
    assert "secret" not in text
    assert "unknown.example" not in text
    assert 'route="(unmatched)"' in text
    assert 'sidecar_requests_total{method="GET",route="saas",status_class="2xx"} 2.0' in text
    assert 'sidecar_token_requests_total{authorization_server="dev",outcome="ok"} 1.0' in text
    # The sidecar's own refusal, by its error code; what it added, for the two it relayed.
    assert [line for line in text.split("\n") if line.startswith("sidecar_request_errors")] == [
        'sidecar_request_errors_total{error="destination_not_allowed",route="(unmatched)"} 1.0'
    ]
    assert 'sidecar_added_latency_seconds_count{route="saas"} 2.0' in text
    assert (
        'sidecar_route_info{authorization_server="dev",credential="dpop",intercept="false",'
        'route="saas"} 1.0'
    ) in text
    for token in stack.auth_server.issued_tokens:
        assert token.split(".")[1] not in text


async def admin_raw(sidecar: Sidecar, data: bytes) -> bytes:
    """Hand-written bytes to the admin port; everything it answers until it closes or 10 s."""
    assert sidecar.admin_address is not None
    address = sidecar.admin_address
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_admin_paths_answer_get_only(sidecar: Sidecar, method: str) -> None:
    length = "Content-Length: 0\r\n" if method in ("POST", "PUT") else ""
    raw = f"{method} /readyz HTTP/1.1\r\nHost: a\r\n{length}Connection: close\r\n\r\n"
    answer = await admin_raw(sidecar, raw.encode())
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET\r\n" in answer


async def test_unknown_admin_paths_are_404_and_the_query_is_ignored(sidecar: Sidecar) -> None:
    answer = await admin_raw(
        sidecar, b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "not_found"
    answer = await admin_raw(
        sidecar, b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: application/json" in answer


async def test_admin_keep_alive_answers_in_order(sidecar: Sidecar) -> None:
    two = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\n\r\n"
    answer = await admin_raw(sidecar, two + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert answer.count(b"HTTP/1.1 503 ") == 1  # no token yet: not ready
    assert answer.index(b'"status"') < answer.index(b'"ready"')


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n",  # head > 8 KiB
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\nX: bare-lf\r\n\r\n\x00",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello at a plain port
    ],
)
async def test_malformed_admin_requests_are_400_and_the_port_keeps_serving(
    sidecar: Sidecar, raw: bytes
) -> None:
    answer = await admin_raw(sidecar, raw)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert await admin_get(sidecar, "/healthz") == (200, {"status": "ok"})


async def test_the_admin_port_serves_a_bounded_number_of_connections(sidecar: Sidecar) -> None:
    assert sidecar.admin_address is not None
    host, port = sidecar.admin_address.host, sidecar.admin_address.port
    held: list[asyncio.StreamWriter] = []
    probe = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    try:
        for _ in range(MAX_CONNECTIONS - 1):  # idle keep-alive connections, as an abuser holds
            _, writer = await asyncio.open_connection(host, port)
            held.append(writer)
        reader, writer = await asyncio.open_connection(host, port)  # the last one served
        held.append(writer)
        writer.write(probe)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200 ")
        reader, writer = await asyncio.open_connection(host, port)  # one too many
        held.append(writer)
        writer.write(probe)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, unanswered
    finally:
        for writer in held:
            writer.close()
