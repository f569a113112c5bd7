"""The token client's HTTP edge (the origin client's UrlClient): connection reuse, timeouts, a
cap on what the AS may send, no redirects. A hand-made AS on loopback TLS answers as told."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.devstack.stack import SAAS_HOST, DevStack
from tests.conftest import AppClient, ManualClock, running_sidecar

URL = f"http://{SAAS_HOST}/v1/invoices"


@dataclass
class ScriptedAs:
    """Answers token requests as ``mode`` says; records each request's TCP peer."""

    base: str = ""
    mode: str = "ok"  # ok | hang | huge | redirect
    peers: list[Any] = field(default_factory=list)
    forms: list[dict[str, list[str]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    redirected: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def scripted_as(stack: DevStack) -> AsyncIterator[ScriptedAs]:
    state = ScriptedAs()

    async def token(request: web.Request) -> web.StreamResponse:
        state.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        form = await request.post()
        state.forms.append({k: [str(v) for v in form.getall(k)] for k in form})
        state.headers.append(dict(request.headers))
        if state.mode == "hang":
            await state.release.wait()  # until the test ends: the sidecar's timeout fires first
        if state.mode == "huge":
            body = b'{"access_token": "' + b"a" * (1024 * 1024) + b'", "token_type": "DPoP"}'
            return web.Response(body=body, content_type="application/json")
        if state.mode == "redirect":
            raise web.HTTPFound(f"{state.base}/elsewhere")
        doc = {"access_token": f"tok-{len(state.peers)}", "token_type": "DPoP", "expires_in": 60}
        return web.json_response(doc)

    async def elsewhere(request: web.Request) -> web.Response:
        state.redirected += 1
        return web.json_response({"access_token": "stolen", "token_type": "DPoP"})

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_route("*", "/elsewhere", elsewhere)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    state.base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def server_for(state: ScriptedAs, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": None,
        "token_endpoint": f"{state.base}/token",
        "client_auth": "none",
        "client_id": "legacy-app",
        **extra,
    }


async def test_token_requests_reuse_one_kept_alive_connection(stack: DevStack) -> None:
    clock = ManualClock()
    async with scripted_as(stack) as state:
        server = server_for(state)
        async with (
            running_sidecar(stack, clock=clock, authorization_server=server) as sidecar,
            AppClient(sidecar) as app,
        ):
            for _ in range(3):
                # The dev SaaS API rejects our made-up tokens: what matters is the AS side.
                await app.request("GET", URL)
                clock.advance(120)  # past expiry: the next request needs a new token
    # Per app request: a token, then (the SaaS API says invalid_token) exactly one new one.
    assert len(state.peers) == 6
    assert len(set(state.peers)) == 1, state.peers  # one TCP (and TLS) connection for all
    form, headers = state.forms[0], state.headers[0]
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_id"] == ["legacy-app"]
    assert form["resource"] == ["https://api.saas.example"]
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Host"] == state.base.removeprefix("https://")
    assert "DPoP" in headers
    assert "Accept-Encoding" not in headers  # we could not decode a compressed answer


async def test_an_as_that_does_not_answer_in_time_is_a_503(stack: DevStack) -> None:
    async with scripted_as(stack) as state:
        state.mode = "hang"
        server = server_for(state, timeout=0.3)
        async with (
            running_sidecar(stack, authorization_server=server) as sidecar,
            AppClient(sidecar) as app,
        ):
            status, _, body = await app.request("GET", URL)
            assert status == 503, body
            assert json.loads(body)["error"] == "token_unavailable"
            assert sidecar.token_client.last_error["dev"] == "TimeoutError"
    assert stack.saas.requests == []


async def test_an_oversized_answer_is_cut_at_64_kib_and_refused(stack: DevStack) -> None:
    async with scripted_as(stack) as state:
        state.mode = "huge"
        async with (
            running_sidecar(stack, authorization_server=server_for(state)) as sidecar,
            AppClient(sidecar) as app,
        ):
            status, _, body = await app.request("GET", URL)
    assert status == 502, body
    assert "access_token" in json.loads(body)["detail"]
    assert stack.saas.requests == []


async def test_a_redirect_from_the_token_endpoint_is_not_followed(stack: DevStack) -> None:
    async with scripted_as(stack) as state:
        state.mode = "redirect"
        async with (
            running_sidecar(stack, authorization_server=server_for(state)) as sidecar,
            AppClient(sidecar) as app,
        ):
            status, _, body = await app.request("GET", URL)
    assert status == 502, body
    assert state.redirected == 0
    assert stack.saas.requests == []


async def test_after_an_svid_rotation_no_connection_with_the_old_certificate_is_kept(
    stack: DevStack,
) -> None:
    clock = ManualClock()
    server = {"client_auth": "mtls"}
    async with running_sidecar(stack, clock=clock, authorization_server=server) as sidecar:
        rotated = asyncio.Event()
        sidecar.identity.on_x509_rotation(lambda _: rotated.set())
        async with AppClient(sidecar) as app:
            assert (await app.request("GET", URL))[0] == 200
            pool = sidecar.token_client._transport._pool  # type: ignore[attr-defined]
            first = set(sidecar.token_client._mtls.values())  # the context presenting SVID 1
            before = {origin.ssl for origin, idle in pool._idle.items() if idle}
            assert len(first) == 1
            assert first <= before  # its connection was kept alive (discovery has its own)
            stack.workload_api.rotate_x509()
            await asyncio.wait_for(rotated.wait(), 10)
            # At once, with no token request: the rotation fetches none (tokens are not bound
            # to the certificate), so the old connections must not wait for the next one.
            pooled = {origin.ssl for origin, idle in pool._idle.items() if idle}
            assert not (pooled & first), "a connection presenting the old certificate is pooled"
            assert sidecar.token_client._mtls == {}
            assert (await app.request("GET", URL))[0] == 200
            assert len(stack.auth_server.token_requests) == 1
            clock.advance(250)  # past the refresh point of a 300 s token: the next renewal
            assert (await app.request("GET", URL))[0] == 200
            await sidecar.credentials.cache.settle()
        after = {origin.ssl for origin, idle in pool._idle.items() if idle}
        second = set(sidecar.token_client._mtls.values())
        assert second
        assert not (second & first)
        assert second <= after
        assert not (after & first), "a connection presenting the old certificate is pooled"
    fingerprints = [r.client_cert_sha256 for r in stack.auth_server.token_requests]
    assert len(fingerprints) == 2
    assert fingerprints[0] != fingerprints[1]
