"""Issue 15: the data-path input classes an outside review broke, sent as raw bytes to the
real sidecar in front of the dev stack. For every refused request the recording upstream (the
dev SaaS API) saw nothing and the authorization server issued no token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, running_sidecar
from tests.test_routing import DISALLOWED, REFUSED_PATHS


def destinations(stack: DevStack, **saas: Any) -> list[dict[str, Any]]:
    base = stack.sidecar_config()["destinations"][0]
    return [
        {**base, **saas},
        # A wildcard routed to the recording upstream: what reaches it is what was forwarded.
        {**base, "name": "wild", "host": "*.wild.test"},
        # A wildcard that dials the requested host itself (no upstream).
        {
            k: v
            for k, v in {**base, "name": "bare", "host": "*.bare.test"}.items()
            if k != "upstream"
        },
        {"name": "tunnel", "host": "*.tunnel.test", "tunnel": True, "allow_private": True},
    ]


@contextlib.asynccontextmanager
async def proxy(stack: DevStack, **saas: Any) -> AsyncIterator[AppClient]:
    async with (
        running_sidecar(stack, destinations=destinations(stack, **saas)) as sidecar,
        AppClient(sidecar) as client,
    ):
        yield client


@pytest.fixture
async def app(stack: DevStack) -> AsyncIterator[AppClient]:
    async with proxy(stack) as client:
        yield client


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def error_of(answer: bytes) -> str:
    return str(json.loads(answer.partition(b"\r\n\r\n")[2])["error"])


def nothing_went_out(stack: DevStack) -> None:
    assert stack.saas.requests == [], "a refused request reached the upstream"
    assert stack.auth_server.issued_tokens == [], "a token was fetched for a refused request"


async def refused(app: AppClient, stack: DevStack, data: bytes) -> bytes:
    answer = await app.raw(data)
    assert status_of(answer) == 400, answer[:200]
    nothing_went_out(stack)
    return answer


def get(target: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"GET {target} {version}\r\nHost: x\r\n{lines}Connection: close\r\n\r\n".encode()


# -- class 1: hosts ---------------------------------------------------------------------------


async def test_the_issue_examples_never_leave_the_sidecar(stack: DevStack, app: AppClient) -> None:
    for target in (
        "http://localhost?.bare.test/v1/x",
        "http://127.0.0.1?.bare.test/v1/x",
        "http://2130706433?.bare.test/v1/x",
        "http://localhost?.wild.test/v1/x",
        "http://evil].wild.test/v1/x",
        "http://.wild.test/v1/x",
        "http://[::1].bare.test/v1/x",
    ):
        answer = await refused(app, stack, get(target))
        assert error_of(answer) == "bad_request"  # never 500 internal_error
    answer = await refused(app, stack, b"CONNECT .x.tunnel.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert error_of(answer) == "bad_request"


@pytest.mark.parametrize("char", [c for c in DISALLOWED if c not in "#"])
async def test_every_disallowed_host_character_is_a_400(
    stack: DevStack, app: AppClient, char: str
) -> None:
    await refused(app, stack, get(f"http://eu{char}x.wild.test/v1/invoices"))


async def test_a_valid_wildcard_host_still_reaches_the_route(
    stack: DevStack, app: AppClient
) -> None:
    answer = await app.raw(get("http://eu.wild.test./v1/invoices"))
    assert status_of(answer) == 200
    assert [seen.raw_path for seen in stack.saas.requests] == ["/v1/invoices"]


async def test_the_audit_names_the_host_it_routed(
    stack: DevStack, app: AppClient, logs: LogCapture
) -> None:
    await app.raw(get("http://EU.wild.test./v1/invoices"))
    audits = [r for r in logs.records if r.name == "sidecar.audit" and r.getMessage() == "request"]
    assert [r.__dict__.get("host") for r in audits] == ["eu.wild.test"]


# -- class 3: method overrides ----------------------------------------------------------------

OVERRIDES = [
    ("/v1/invoices", "X-HTTP-Method-Override: DELETE"),
    ("/v1/invoices", "X-HTTP-Method: DELETE"),
    ("/v1/invoices", "X-Method-Override: DELETE"),
    ("/v1/invoices", "X-Original-URL: /v1/admin"),
    ("/v1/invoices", "X-Rewrite-URL: /v1/admin"),
    ("/v1/invoices?_method=DELETE", ""),
    ("/v1/invoices?a=1&%5fmethod=DELETE", ""),
]


def post(path: str, header: str = "") -> bytes:
    extra = f"{header}\r\n" if header else ""
    return (
        f"POST http://{SAAS_HOST}{path} HTTP/1.1\r\nHost: {SAAS_HOST}\r\n{extra}"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    ).encode()


@pytest.mark.parametrize(("path", "header"), OVERRIDES)
async def test_method_overrides_are_refused_with_the_reason(
    stack: DevStack, app: AppClient, path: str, header: str
) -> None:
    answer = await refused(app, stack, post(path, header))
    assert b"override" in answer


async def test_strip_sends_neither_the_headers_nor_the_parameter(stack: DevStack) -> None:
    async with proxy(stack, method_override="strip") as app:
        answer = await app.raw(
            post("/v1/invoices?a=1&_method=DELETE", "X-HTTP-Method-Override: DELETE")
        )
    assert status_of(answer) == 200
    (seen,) = stack.saas.requests
    assert seen.raw_path == "/v1/invoices?a=1"
    assert not any(name.lower().startswith("x-http-method") for name, _ in seen.headers)


async def test_honour_scopes_on_the_overriding_method(stack: DevStack) -> None:
    async with proxy(stack, method_override="honour") as app:
        answer = await app.raw(post("/v1/invoices/7", "X-HTTP-Method-Override: DELETE"))
    assert status_of(answer) == 200
    (seen,) = stack.saas.requests
    assert ("X-HTTP-Method-Override", "DELETE") in seen.headers
    assert seen.token_claims is not None
    assert seen.token_claims["scope"] == "invoices:write"  # the DELETE rule's, not the default


# -- class 4: paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", REFUSED_PATHS)
async def test_ambiguous_paths_never_reach_the_upstream(
    stack: DevStack, app: AppClient, path: str
) -> None:
    await refused(app, stack, get(f"http://{SAAS_HOST}{path}"))


async def test_raw_paths_forward_encodings_as_sent(stack: DevStack) -> None:
    async with proxy(stack, raw_paths=True) as app:
        answer = await app.raw(get(f"http://{SAAS_HOST}/v1/invoices/a%2Fb"))
    assert status_of(answer) == 200
    assert [seen.raw_path for seen in stack.saas.requests] == ["/v1/invoices/a%2Fb"]


# -- class 6: trailers and the listener's strictness ------------------------------------------

CHUNKED_HEAD = (
    f"POST http://{SAAS_HOST}/headers HTTP/1.1\r\nHost: {SAAS_HOST}\r\n"
    "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
).encode()
TRAILERS = b"0\r\nX-Trailer: y\r\nX-HTTP-Method-Override: DELETE\r\n\r\n"


def upstream_names(stack: DevStack) -> set[str]:
    (seen,) = stack.saas.requests
    return {name.lower() for name, _ in seen.headers}


async def test_trailers_in_the_same_read_are_not_promoted(stack: DevStack, app: AppClient) -> None:
    answer = await app.raw(CHUNKED_HEAD + b"2\r\n{}\r\n" + TRAILERS)
    assert status_of(answer) == 200
    assert {"x-trailer", "x-http-method-override"}.isdisjoint(upstream_names(stack))


async def test_trailers_in_a_later_read_are_not_promoted(stack: DevStack, app: AppClient) -> None:
    reader, writer = await asyncio.open_connection(app.address.host, app.address.port)
    try:
        writer.write(CHUNKED_HEAD + b"2\r\n{}\r\n")
        await writer.drain()
        await asyncio.wait_for(stack.saas.started.get(), 10)  # the head is upstream already
        writer.write(TRAILERS)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert status_of(answer) == 200
    assert {"x-trailer", "x-http-method-override"}.isdisjoint(upstream_names(stack))


@pytest.mark.parametrize(
    "data",
    [
        get(f"http://{SAAS_HOST}/v1/invoices", "Transfer_Encoding: chunked"),
        get(f"http://{SAAS_HOST}/v1/invoices", "Content_Length: 5"),
        get(f"http://{SAAS_HOST}/v1/invoices", "X_HTTP_Method_Override: DELETE"),
        # The '_' is looked for in the decoded name: as its last or first character too.
        get(f"http://{SAAS_HOST}/v1/invoices", "X-Forwarded_: 1"),
        get(f"http://{SAAS_HOST}/v1/invoices", "_Host: x"),
        get(f"http://{SAAS_HOST}/v1/invoices", "Content-Length: 18446744073709551615"),
        get(f"http://{SAAS_HOST}/v1/invoices", "Content-Length: 9007199254740992"),
        get(f"http://{SAAS_HOST}/v1/invoices", f"Host: {SAAS_HOST}"),  # a second Host
        get(f"http://{SAAS_HOST}/v1/invoices", version="HTTP/2.0"),
        get(f"http://{SAAS_HOST}/v1/invoices", version="HTTP/0.9"),
        f"GET http://{SAAS_HOST}/v1/invoices\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    ],
)
async def test_heads_llhttp_accepts_and_we_do_not(
    stack: DevStack, app: AppClient, data: bytes
) -> None:
    await refused(app, stack, data)


async def test_a_host_header_unlike_the_target_is_ignored(stack: DevStack, app: AppClient) -> None:
    # RFC 9112 §3.2.2: the absolute-form target wins; the forwarder sends its own Host.
    answer = await app.raw(get(f"http://{SAAS_HOST}/v1/invoices"))
    assert status_of(answer) == 200
    (seen,) = stack.saas.requests
    assert [v for n, v in seen.headers if n.lower() == "host"] != ["x"]


# -- class 5: cleartext -----------------------------------------------------------------------


async def test_a_development_cleartext_upstream_warns_at_start(
    stack: DevStack, logs: LogCapture
) -> None:
    dests = destinations(stack)[:1]
    dests[0] = {
        **dests[0],
        "upstream": "http://127.0.0.1:9",
        "allow_cleartext_development_only": True,
    }
    async with running_sidecar(stack, destinations=dests) as sidecar:
        assert isinstance(sidecar, Sidecar)
    warned = [
        r.__dict__.get("setting")
        for r in logs.records
        if r.levelno == logging.WARNING and "cleartext" in r.getMessage()
    ]
    assert warned == ["destinations[0].upstream"]
