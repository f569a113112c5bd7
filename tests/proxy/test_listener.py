"""Bad input at the proxy port: each gets a clear 4xx, nothing is forwarded, serving goes on."""

from __future__ import annotations

import json

import pytest

from sidecar.devstack.stack import SAAS_HOST, DevStack
from tests.conftest import AppClient, LogCapture

GOOD = f"http://{SAAS_HOST}/v1/invoices"


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict[str, str]:
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert isinstance(doc, dict)
    return doc


BAD_REQUESTS = {
    "CL+TE smuggling": (
        f"POST {GOOD} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    ),
    "duplicate Content-Length": (
        f"POST {GOOD} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nContent-Length: 3\r\n"
        "Content-Length: 5\r\n\r\nabcde"
    ),
    "huge header": f"GET {GOOD} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nX-Big: {'a' * 20000}\r\n\r\n",
    "bare CR in a header value": f"GET {GOOD} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nX-A: a\rb\r\n\r\n",
    "LF folded into a value": f"GET {GOOD} HTTP/1.1\r\nHost: {SAAS_HOST}\r\nX-A: a\r\n b\r\n\r\n",
    "userinfo in the URL": (
        f"GET http://user:pw@{SAAS_HOST}/v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n"
    ),
    "non-http scheme": f"GET ftp://{SAAS_HOST}/file HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n",
    "https URL": f"GET https://{SAAS_HOST}/v1 HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n",
    "malformed IPv6 host": "GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "dot-segments": f"GET http://{SAAS_HOST}/v1/../admin HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n",
    "origin-form": f"GET /v1/invoices HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_bad_input_is_refused_and_nothing_is_forwarded(
    name: str, stack: DevStack, app: AppClient, logs: LogCapture
) -> None:
    answer = await app.raw(BAD_REQUESTS[name].encode())
    assert 400 <= status_of(answer) < 500, answer[:200]
    assert b"application/json" in answer.partition(b"\r\n\r\n")[0]
    assert body_of(answer)["error"]
    assert stack.saas.requests == []
    assert stack.auth_server.token_requests == []
    # ... and the sidecar keeps serving.
    status, _, _ = await app.request("GET", GOOD)
    assert status == 200
    assert len(stack.saas.requests) == 1


async def test_ipv6_literal_hosts_are_parsed_and_denied_when_unrouted(
    stack: DevStack, app: AppClient
) -> None:
    answer = await app.raw(b"GET http://[::1]:8080/x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert status_of(answer) == 403
    assert body_of(answer)["error"] == "destination_not_allowed"
    assert "::1" in body_of(answer)["detail"]


async def test_the_absolute_uri_wins_over_a_disagreeing_host_header(
    stack: DevStack, app: AppClient
) -> None:
    answer = await app.raw(
        f"GET {GOOD} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(answer) == 200
    seen = stack.saas.requests[-1]
    assert dict(seen.headers)["Host"] == stack.saas.base_url.removeprefix("https://")
    denied = await app.raw(
        f"GET http://evil.example/ HTTP/1.1\r\nHost: {SAAS_HOST}\r\n\r\n".encode()
    )
    assert status_of(denied) == 403
    assert len(stack.saas.requests) == 1


async def test_connect_to_a_host_without_a_tunnel_route_is_403(
    stack: DevStack, app: AppClient
) -> None:
    answer = await app.raw(
        f"CONNECT {SAAS_HOST}:443 HTTP/1.1\r\nHost: {SAAS_HOST}:443\r\n\r\n".encode()
    )
    assert status_of(answer) == 403
    detail = body_of(answer)["detail"]
    assert "no tunnel route" in detail
    assert "plain http://" in detail
    assert stack.saas.requests == []
