"""#15 class 2: whatever the authorization server says back, what the sidecar sent (client
secret, Basic credentials, JWT-SVID assertion, DPoP proof, and any part or encoding of them)
never reaches the app's body or headers, /readyz, /metrics or a log line.

The AS here is a small aiohttp server on loopback with real TLS (the dev CA) that records the
token request it received and echoes it: in ``error_description``, in ``error``, in headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops.readiness import response
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture, ManualClock, running_sidecar

URL = f"http://{SAAS_HOST}/v1/invoices"
SECRET = "s3cr3t-Value/with+odd=chars&more"
CLIENT_ID = "billing-client"


class EchoAS:
    """Answers every token request with an error that repeats what it was sent."""

    def __init__(self, mode: str, status: int = 401) -> None:
        self.mode = mode
        self.status = status
        self.sent: list[str] = []  # every credential value received, and their parts
        self.on_request: Callable[[], None] = lambda: None
        self.answer: dict[str, Any] | None = None  # set: answer 200 with this document
        self.hang: asyncio.Event | None = None  # set: answer only once it is set
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, stack: DevStack) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        tls = stack.ca.issue_server("localhost", "127.0.0.1").server_context()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}/token"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        self.on_request()
        form = {k: str(v) for k, v in (await request.post()).items()}
        received = [
            *(form[k] for k in ("client_assertion", "client_secret", "assertion") if k in form),
            *(v for k, v in request.headers.items() if k.lower() in ("authorization", "dpop")),
        ]
        basic = request.headers.get("Authorization", "")
        self.sent += received
        if self.hang is not None:
            await self.hang.wait()
        if basic.startswith("Basic "):
            received += [basic[6:], base64.b64decode(basic[6:]).decode()]  # echoed as well
            self.sent += [basic[6:], SECRET, quote(SECRET, safe="")]
        if self.answer is not None:
            return web.json_response(self.answer)
        echo = " | ".join(
            [*received, *(part for value in received for part in value.split(".")), str(form)]
        )
        doc: dict[str, Any] = {"error": "invalid_client", "error_description": echo}
        headers = {}
        if self.mode == "error":
            doc = {"error": echo}
        elif self.mode == "headers":
            headers = {"WWW-Authenticate": f'Basic error_description="{echo[:2000]}"'}
            headers["X-Echo"] = echo[:2000]
        elif self.mode == "encoded":
            doc["error_description"] = " ".join(
                [quote(v, safe="") for v in received]
                + [base64.b64encode(v.encode()).decode() for v in received]
                + [json.dumps(v) for v in received]
            )
        return web.json_response(doc, status=self.status, headers=headers)


@pytest.fixture
async def echo_as(stack: DevStack) -> AsyncIterator[Callable[[str], Any]]:
    servers: list[EchoAS] = []

    async def make(mode: str, status: int = 401) -> EchoAS:
        server = EchoAS(mode, status)
        await server.start(stack)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def server_config(stack: DevStack, echo: EchoAS, auth: str, tmp_path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "issuer": None,
        "token_endpoint": echo.url,
        "client_auth": auth,
    }
    if auth == "client_secret":
        secret_file = tmp_path / "client-secret"
        secret_file.write_text(SECRET + "\n")
        config.update(client_id=CLIENT_ID, client_secret_file=str(secret_file))
    return config


def fragments(values: list[str]) -> list[str]:
    """Every value, its JWT segments and 12-character runs, and its encodings."""
    found: set[str] = set()
    for value in values:
        forms = [value, quote(value, safe=""), base64.b64encode(value.encode()).decode()]
        for form in forms:
            found.add(form)
            found.update(p for p in form.split(".") if len(p) >= 12)
            found.update(form[i : i + 12] for i in range(0, max(1, len(form) - 12), 7))
    found.add(SECRET)
    return [f for f in found if len(f) >= 8]


async def everything_out(sidecar: Sidecar, logs: LogCapture) -> tuple[str, str]:
    """What the app, /readyz (loopback and remote views) and /metrics show, and the logs."""
    async with AppClient(sidecar) as app:
        status, headers, body = await app.request("GET", URL)
    assert status in (502, 503), body
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{sidecar.admin_address}/readyz") as resp:
            readyz = await resp.text()
        async with session.get(f"http://{sidecar.admin_address}/metrics") as resp:
            metrics = await resp.text()
    remote = json.dumps(response(sidecar.readiness_state(), peer_is_loopback=False)[1])
    shown = "\n".join([str(dict(headers)), body.decode(), readyz, remote, metrics])
    return shown, logs.text()


@pytest.mark.parametrize("mode", ["description", "error", "headers", "encoded"])
@pytest.mark.parametrize("auth", ["client_secret", "jwt_svid"])
async def test_nothing_sent_comes_back_out(
    stack: DevStack,
    echo_as: Callable[[str], Any],
    logs: LogCapture,
    tmp_path: Path,
    mode: str,
    auth: str,
) -> None:
    echo = await echo_as(mode)
    server = server_config(stack, echo, auth, tmp_path)
    async with running_sidecar(stack, authorization_server=server) as sidecar:
        shown, logged = await everything_out(sidecar, logs)
    assert echo.sent, "the AS received credentials"
    for fragment in fragments(echo.sent):
        assert fragment not in shown, (mode, fragment)
        assert fragment not in logged, (mode, fragment)
    # The registered code is kept; a code outside the registries reads "unknown".
    expected = "unknown" if mode == "error" else "invalid_client"
    assert f'"authorization_server_error": "{expected}"' in shown
    if mode in ("description", "encoded"):
        assert "authorization server error" in logged  # the scrubbed text was logged
        assert "[redacted]" in logged


async def test_a_slow_answer_does_not_lengthen_the_token(
    stack: DevStack, echo_as: Callable[[str], Any], tmp_path: Path
) -> None:
    """#16.4: the token's life starts when its request was sent, not when the answer came."""
    clock = ManualClock()
    echo = await echo_as("description")
    echo.answer = {"access_token": "opaque-token-1", "token_type": "DPoP", "expires_in": 60}
    echo.on_request = lambda: clock.advance(5)  # the AS takes 5 s to answer
    server = server_config(stack, echo, "jwt_svid", tmp_path)
    async with running_sidecar(stack, clock=clock, authorization_server=server) as sidecar:
        sent_at = clock.now
        route = sidecar.snapshot.routing.routes["saas"]  # type: ignore[union-attr]
        _, token = await sidecar.credentials.token(route, ("invoices:read",))
        assert clock.now == sent_at + 5
        assert token.issued_at == sent_at
        assert token.expires_at == sent_at + 60  # not sent_at + 5 + 60


async def test_a_hung_as_makes_requests_wait_at_most_tokens_wait(
    stack: DevStack, echo_as: Callable[[str], Any], tmp_path: Path
) -> None:
    """#16.6: 503 token_unavailable with Retry-After after tokens.wait; the fetch goes on."""
    echo = await echo_as("description")
    echo.answer = {"access_token": "opaque-token-2", "token_type": "DPoP", "expires_in": 300}
    echo.hang = asyncio.Event()
    server = server_config(stack, echo, "jwt_svid", tmp_path)
    overrides: dict[str, Any] = {"authorization_server": server, "tokens": {"wait": 0.2}}
    async with running_sidecar(stack, **overrides) as sidecar, AppClient(sidecar) as app:
        stop_hanging = echo.hang.set  # whatever happens below, the AS is released at the end
        try:
            await _hung_as_checks(sidecar, app, echo)
        finally:
            stop_hanging()


async def _hung_as_checks(sidecar: Sidecar, app: AppClient, echo: EchoAS) -> None:
    answers = await asyncio.gather(*(app.request("GET", URL) for _ in range(5)))
    for status, headers, body in answers:
        assert status == 503, body
        assert json.loads(body)["error"] == "token_unavailable"
        assert headers["Retry-After"] == "1"
    assert len(echo.sent) == 2  # one token request (assertion + proof), still in flight
    assert echo.hang is not None
    echo.hang.set()
    await sidecar.credentials.cache.settle()
    assert len(echo.sent) == 2  # the same request finished: no second one
    route = sidecar.snapshot.routing.routes["saas"]  # type: ignore[union-attr]
    jkt = sidecar.dpop_key.thumbprint  # a DPoP route: tokens bound to the sidecar's key
    assert sidecar.credentials.cached(route, ("invoices:read",), jkt) is not None
